"""The per-token picture of a dynamic MoE's compute: each answer token coloured by how many real experts it
used (summed over the MoE layers), green (few) through yellow to red (all K in every layer).

    pieces = token_pieces(tokenizer, answer_ids)
    print(render_terminal(pieces, real_T, max_real))   # 24-bit ANSI, with a legend
    page = render_html(pieces, real_T, max_real, title="...")

serve.py shows it under an answer (--show-compute); experiments/compute_use.py measures it over a test split.
"""

from __future__ import annotations

import html
from collections.abc import Sequence


def token_pieces(tokenizer, tokens: list[int]) -> list[str]:
    """The text each token adds to the decoded answer (decoding prefixes keeps multi-token characters and a
    BPE's leading spaces right; a token that completes nothing shows as empty)."""
    pieces, before = [], ""
    for i in range(len(tokens)):
        text = tokenizer.decode(tokens[:i + 1], skip_special_tokens=True)
        if text.endswith("\ufffd"):
            pieces.append("")
            continue
        pieces.append(text[len(before):])
        before = text
    return pieces


def colour(fraction: float) -> tuple[int, int, int]:
    """Green (few real experts) through yellow to red (all K in every layer): RGB for a share in [0, 1]."""
    f = min(max(fraction, 0.0), 1.0)
    return (int(255 * min(1.0, 2 * f)), int(255 * min(1.0, 2 * (1 - f))), 60)


def render_terminal(pieces: Sequence[str], real_T: Sequence[int], max_real: int) -> str:
    """The answer with each token's background coloured by its real experts (24-bit ANSI), and a legend."""
    out = []
    for piece, real in zip(pieces, real_T):
        r, g, b = colour(real / max_real)
        shown = piece.replace("\n", "\u21b5\n")  # keep line breaks visible inside a coloured run
        out.append(f"\x1b[48;2;{r};{g};{b}m\x1b[30m{shown}\x1b[0m")
    mean = sum(real_T) / max(len(real_T), 1)
    legend = (f"[real experts per token, summed over MoE layers: green 0 .. red {max_real} (the static model's); "
              f"mean {mean:.1f}, {1 - mean / max_real:.1%} of this answer's expert FLOPs skipped]")
    return "".join(out) + "\n" + legend


def render_html(pieces: Sequence[str], real_T: Sequence[int], max_real: int, title: str = "") -> str:
    """The same as a standalone HTML page; hovering a token shows its count."""
    spans = []
    for piece, real in zip(pieces, real_T):
        r, g, b = colour(real / max_real)
        spans.append(f'<span title="{real} / {max_real} real experts" style="background: rgb({r},{g},{b})">'
                     f"{html.escape(piece)}</span>")
    return (f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<h3>{html.escape(title)}</h3><pre style='font-size: 15px; white-space: pre-wrap'>{''.join(spans)}</pre>"
            f"<p>background: real experts per token summed over MoE layers, green 0 to red {max_real}.</p>")


