"""serve.py on a tiny random checkpoint: streaming, the per-answer summary line, interactive mode and errors.
(The HTTP server behind --port is tests/test_server.py's.)

One subprocess run of the real CLI; everything else calls serve.main in-process, which is the same code without
paying for torch's import again (~8 s on the shared test machine).
"""

import io
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import serve
from zeda.data import encode_chat
from zeda.evaluation import pad_id, stop_ids
from zeda.generation import generate
from zeda.loading import load_for_inference
from zeda.sampling import SamplingParams
from zeda_toy.tiny import make_tiny_checkpoint
from zeda_toy.tokenizer import save_tokenizer

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
SUMMARY = re.compile(r"^\[(\d+) tokens \((stopped at EOS|cut at --max-new-tokens)\), ([\d.]+) tokens/s, "
                     r"zero-expert ratio ([\d.]+)%, expert FLOPs saved ([\d.]+)%\]$", re.MULTILINE)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A random tiny MoE with the char-level tokenizer; a 128-token context, so a long prompt does not fit."""
    path = tmp_path_factory.mktemp("serve") / "tiny"
    make_tiny_checkpoint(path, vocab_size=104, eos_token_id=3, pad_token_id=0, max_position_embeddings=128)
    save_tokenizer(path)
    return path


def run_main(argv, monkeypatch, capsys, stdin: str | None = None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = serve.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_answers_a_prompt(tiny):
    r = subprocess.run([sys.executable, "serve.py", "--model", str(tiny), "--prompt", "Compute 1+2.",
                        "--max-new-tokens", "8", "--seed", "0"], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    (m,) = SUMMARY.finditer(r.stdout)
    assert 1 <= int(m.group(1)) <= 8 and float(m.group(3)) > 0
    assert float(m.group(4)) == float(m.group(5)) == 0.0  # a static model has no zero experts


def test_missing_model_dir(tmp_path, monkeypatch, capsys):
    code, out, err = run_main(["--model", str(tmp_path / "nope"), "--prompt", "hi"], monkeypatch, capsys)
    assert code == 2 and f"{tmp_path / 'nope'}: no such model folder" in err and not out


def test_streamed_text_is_the_answer(tiny, monkeypatch, capsys):
    """What on_token printed, piece by piece, is exactly the decoded answer of the same generation."""
    argv = ["--model", str(tiny), "--prompt", "Compute 1+2.", "--max-new-tokens", "12", "--temperature", "0"]
    code, out, _ = run_main(argv, monkeypatch, capsys)
    assert code == 0
    streamed, summary = out.rsplit("\n[", 1)
    model, tokenizer = load_for_inference(tiny, device="cpu")
    ids = encode_chat(tokenizer, [{"role": "user", "content": "Compute 1+2."}]).ids
    cfg = model.config
    gen = generate(model, [ids], SamplingParams(temperature=0, max_new_tokens=12), stop_ids(tokenizer, cfg),
                   pad_id(tokenizer, cfg))
    assert streamed == tokenizer.decode(gen.tokens[0], skip_special_tokens=True)
    assert summary.startswith(f"{gen.new_tokens} tokens")


def test_interactive_answers_each_non_empty_line(tiny, monkeypatch, capsys):
    stdin = "Compute 1+2.\n\n   \nWrite the word cat exactly 2 times in uppercase, separated by commas.\n"
    code, out, err = run_main(["--model", str(tiny), "--max-new-tokens", "4", "--seed", "1"], monkeypatch, capsys,
                              stdin)
    assert code == 0
    assert len(SUMMARY.findall(out)) == 2  # the empty and the blank line are skipped
    assert out.startswith("> ") and out.count("> ") >= 3
    assert "One prompt per line" in err


def test_converted_model_reports_zero_experts(tiny, tmp_path, monkeypatch, capsys):
    import convert

    converted = tmp_path / "converted"
    assert convert.main(["--input-dir", str(tiny), "--output-dir", str(converted), "--num-zero-experts", "4"]) == 0
    code, out, _ = run_main(["--model", str(converted), "--prompt", "Compute 12+30.", "--max-new-tokens", "6",
                             "--seed", "0"], monkeypatch, capsys)
    assert code == 0
    (m,) = SUMMARY.finditer(out)
    ratio, saved = float(m.group(4)), float(m.group(5))
    assert 0 < ratio < 100 and saved == ratio  # one cost per real slot: FLOPs saved = share of zero slots
    # the compute dial: a large bias on the zero-expert logits routes (almost) every slot to a zero expert
    code, out, _ = run_main(["--model", str(converted), "--prompt", "Compute 12+30.", "--max-new-tokens", "6",
                             "--seed", "0", "--zero-bias", "30"], monkeypatch, capsys)
    (m,) = SUMMARY.finditer(out)
    assert code == 0 and float(m.group(4)) > ratio and float(m.group(4)) > 90
    code, _, err = run_main(["--model", str(tiny), "--prompt", "hi", "--zero-bias", "1"], monkeypatch, capsys)
    assert code == 2 and "--zero-bias needs a converted model" in err


def test_errors_exit_2_with_a_message(tiny, tmp_path, monkeypatch, capsys):
    cases = [(["--model", str(tiny), "--prompt", ""], "--prompt is empty"),
             (["--model", str(tiny), "--prompt", "  \n"], "--prompt is empty"),
             (["--model", str(tiny), "--prompt", "x" * 200], "--prompt: the prompt has")]
    for argv, message in cases:
        code, out, err = run_main(argv, monkeypatch, capsys)
        assert code == 2 and message in err and not SUMMARY.search(out), (argv, err)
    with pytest.raises(SystemExit) as e:  # refused as it is parsed (zeda/flags.py), before any model loads
        run_main(["--model", str(tiny), "--prompt", "hi", "--max-new-tokens", "0"], monkeypatch, capsys)
    assert e.value.code == 2 and "argument --max-new-tokens: must be >= 1, got 0" in capsys.readouterr().err


def test_server_flags_are_checked_before_loading(tiny, monkeypatch, capsys):
    """--port with --prompt, a port out of range or one already taken: exit 2 with a message, no model loaded."""
    code, _, err = run_main(["--model", str(tiny), "--port", "0", "--prompt", "hi"], monkeypatch, capsys)
    assert code == 2 and "--prompt and --port exclude each other" in err
    with pytest.raises(SystemExit) as e:
        serve.parse_args(["--port", "70000"])
    assert e.value.code == 2 and "argument --port: must be >= 0 and <= 65535" in capsys.readouterr().err
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        code, _, err = run_main(["--model", str(tiny / "absent"), "--port", str(port)], monkeypatch, capsys)
    assert code == 2 and f"cannot listen on 127.0.0.1:{port}" in err


def test_missing_default_teacher_says_how_to_make_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(serve, "DEFAULT_MODEL", tmp_path / "assets" / "qwen3_moe_teacher")
    code, _, err = run_main(["--prompt", "hi"], monkeypatch, capsys)
    assert code == 2 and "python -m zeda_toy.teacher --arch qwen3_moe --out assets/qwen3_moe_teacher" in err


def test_interactive_too_long_prompt_is_skipped(tiny, monkeypatch, capsys):
    code, out, err = run_main(["--model", str(tiny), "--max-new-tokens", "4"], monkeypatch, capsys,
                              "x" * 200 + "\nCompute 1+2.\n")
    assert code == 0 and len(SUMMARY.findall(out)) == 1
    assert "stdin line 1: the prompt has" in err


def test_show_compute_colours_each_answer_token_by_the_real_experts_generation_counted(tiny, tmp_path, monkeypatch,
                                                                                      capsys):
    import convert
    from zeda.token_picture import colour, token_pieces

    converted = tmp_path / "converted"
    assert convert.main(["--input-dir", str(tiny), "--output-dir", str(converted), "--num-zero-experts", "4"]) == 0
    code, out, _ = run_main(["--model", str(converted), "--prompt", "Compute 12+30.", "--max-new-tokens", "8",
                             "--temperature", "0", "--show-compute"], monkeypatch, capsys)
    assert code == 0
    # the same greedy answer, generated directly: its per-token real slots must be what the colours show
    model, tokenizer = load_for_inference(converted)
    cfg = model.config
    ids = encode_chat(tokenizer, [{"role": "user", "content": "Compute 12+30."}]).ids
    eos = stop_ids(tokenizer, cfg)
    gen = generate(model, [ids], SamplingParams(temperature=0.0, max_new_tokens=8), eos, pad_id(tokenizer, cfg))
    kept = [(t, r) for t, r in zip(gen.tokens[0], gen.real_slots[0]) if t not in eos]
    max_real = cfg.num_experts_per_tok * cfg.num_moe_layers
    spans = re.findall(r"\x1b\[48;2;(\d+);(\d+);(\d+)m\x1b\[30m", out)
    assert [tuple(map(int, s)) for s in spans] == [colour(r / max_real) for _, r in kept]
    assert len(set(spans)) > 1 or len(kept) < 2  # a random router varies its compute from token to token
    pieces = token_pieces(tokenizer, [t for t, _ in kept])
    assert f"green 0 .. red {max_real}" in out and all(p.replace("\n", "\u21b5\n") in out for p in pieces)
