"""A character-level Hugging Face tokenizer with a Qwen-style chat template, for the embedded teachers.

The default teachers are tiny MoE models trained from scratch on zeda_toy/tasks.py, whose text is printable
ASCII plus newline. One token per character keeps the vocabulary under 128 entries (a small embedding
matrix) and makes digit-by-digit arithmetic line up with tokens. The tokenizer is a real
`PreTrainedTokenizerFast` saved as `tokenizer.json` + `tokenizer_config.json`, so the rest of the
project treats these teachers exactly like a downloaded Qwen3-MoE checkpoint: `AutoTokenizer`,
`apply_chat_template`, eos = `<|im_end|>`.

Ids: 0 `<|pad|>`, 1 `<|endoftext|>`, 2 `<|im_start|>`, 3 `<|im_end|>`, 4 `<|unk|>`, 5 "\\n", then
the 95 printable ASCII characters " " .. "~" (ids 6..100). Vocabulary size 101.
"""

from __future__ import annotations

import json
import os

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, EOT, IM_START, IM_END, UNK = "<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|unk|>"
SPECIAL_TOKENS = (PAD, EOT, IM_START, IM_END, UNK)
# Newline, then printable ASCII " " .. "~" in code-point order. Tabs and "\r" are left out on purpose:
# task text never has them, and they become <|unk|> rather than silently changing meaning.
CHARACTERS = "\n" + "".join(chr(c) for c in range(32, 127))

# Qwen's template without tools or thinking: `<|im_start|>{role}\n{content}<|im_end|>\n` per message.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The char-level tokenizer: special tokens first, then one entry per character."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + tuple(CHARACTERS))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Isolate every character (newline included: [\s\S], not "."). No normalizer: text round-trips.
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    # Fuse joins tokens with "" on decode; the default would put a space between every character.
    core.decoder = decoders.Fuse()
    # Registered as special so "<|im_end|>" in text is one token and skip_special_tokens drops it.
    core.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        eos_token=IM_END,  # chat generation stops at the end of the assistant turn
        unk_token=UNK,
        bos_token=None,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,  # it would rewrite " ," to "," and break round-trips
        padding_side="right",
    )


def save_tokenizer(directory: str | os.PathLike) -> PreTrainedTokenizerFast:
    """Write the tokenizer to `directory` (loadable offline with `AutoTokenizer.from_pretrained`).

    Files: tokenizer.json, tokenizer_config.json, chat_template.jinja."""
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(directory)
    # transformers 5 records its own class name "TokenizersBackend", which 4.x (and servers pinned to
    # it) cannot resolve; "PreTrainedTokenizerFast" loads the same tokenizer.json under both.
    config_path = os.path.join(directory, "tokenizer_config.json")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    tmp_path = config_path + ".tmp"
    with open(tmp_path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    os.replace(tmp_path, config_path)
    return tokenizer
