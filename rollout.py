"""Teacher rollouts for SFT (docs/method.md §4): the frozen teacher answers the training prompts.

    python rollout.py --teacher assets/qwen3_moe_teacher --prompts prompts.jsonl --out rollouts.jsonl

Prompts: JSONL or Parquet in the authors' format (`{"messages": [...]}`) or with a plain `{"prompt": "..."}`.
Output: the same messages with the teacher's answer appended (zeda/rollout.py says exactly what a line holds).
Resumable by content: a rerun skips the answers already written (keyed by a hash of the prompt's messages and
the sample index, so an edited or reordered prompt file is answered exactly --samples-per-prompt times per prompt)
and appends the rest. Prompts that do not fit the context with --max-new-tokens are skipped and named (--strict
refuses them). The last line printed is the run's counts as JSON (`unfinished`: answers that hit
--max-new-tokens, marked "finished": false, which train_sft.py drops unless --keep-unfinished).

The teacher on an OpenAI-compatible server instead (vLLM, SGLang, transformers serve, zeda's serve.py):

    python rollout.py --server http://127.0.0.1:8000 --prompts prompts.jsonl --out rollouts.jsonl --concurrency 64

The server renders each chat with its own template (/v1/chat/completions); add --teacher DIR to render them here
with that folder's tokenizer and send token ids (/v1/completions) instead. Same lines, resume and summary; an
unreachable server, an HTTP error, a timeout or a malformed reply ends the run with one line (exit 2), keeping
the answers that arrived (docs/usage.md, External inference engines).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from zeda.config import ModelConfig
from zeda.data import check_writable
from zeda.errors import UsageError, ZedaError, exit_status
from zeda.flags import add_chat_template_kwargs, int_range
from zeda.loading import load_for_inference, load_tokenizer
from zeda.remote import Server, add_connection_args
from zeda.rollout import rollout, rollout_remote
from zeda.sampling import add_sampling_args, sampling_from_args


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="rollout.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", type=Path, help="teacher checkpoint folder (static model); with --server only its "
                                                "tokenizer, chat template and context are read")
    p.add_argument("--server", metavar="URL", help="an OpenAI-compatible server that serves the teacher, e.g. "
                                                   "http://127.0.0.1:8000 (with or without /v1)")
    p.add_argument("--model", metavar="NAME", help="--server: the model name to ask for (default: the only one the "
                                                   "server lists)")
    p.add_argument("--concurrency", type=int_range(min=1), default=16, help="--server: requests at a time")
    add_connection_args(p, timeout=3600.0)
    p.add_argument("--prompts", type=Path, required=True, help="prompts JSONL ({'messages': ...} or {'prompt': ...})")
    p.add_argument("--out", type=Path, required=True, help="rollouts JSONL to write (appended to when resuming)")
    p.add_argument("--samples-per-prompt", type=int_range(min=1), default=1, help="answers sampled per prompt")
    add_sampling_args(p)
    p.add_argument("--max-new-tokens", type=int_range(min=1), default=256, help="answer length limit")
    p.add_argument("--batch-size", type=int_range(min=1), default=64,
                   help="prompts per generation batch (--server: answers per append to --out)")
    p.add_argument("--seed", type=int_range(min=0), default=0, help="sampling seed")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda")
    add_chat_template_kwargs(p)
    p.add_argument("--strict", action="store_true",
                   help="refuse a prompt that does not fit the context (default: skip it, counted and named)")
    args = p.parse_args(argv)
    if args.teacher is None and args.server is None:
        p.error("one of --teacher (a model folder) or --server (a URL) is required")
    try:
        check_writable(args.out, "--out")
        if args.server is None:
            if args.model is not None:
                raise UsageError("--model names the model a --server serves; without --server there is none")
            model, tokenizer = load_for_inference(args.teacher, args.device)
            params = sampling_from_args(args, args.max_new_tokens, model_dir=args.teacher)
            with torch.no_grad():
                stats = rollout(model, tokenizer, args.prompts, args.out, params, args.samples_per_prompt,
                                args.batch_size, args.seed, chat_template_kwargs=args.chat_template_kwargs,
                                strict=args.strict)
        else:
            stats = rollout_from_server(args)
    except (ZedaError, OSError) as e:
        print(f"rollout.py: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {stats['written']} rollouts to {args.out} ({stats['skipped_existing']} already there, "
          f"{stats['unfinished']} unfinished: hit --max-new-tokens, {stats['new_tokens']} tokens, {stats['seconds']} s)")
    if stats["skipped_too_long"]:
        print(f"skipped {stats['skipped_too_long']} prompt(s) too long for the context: {', '.join(stats['too_long'])}")
    if stats["checked"]:
        print(f"{stats['correct']} of the {stats['checked']} answers with a reference are correct "
              f"({stats['correct'] / stats['checked']:.1%})")
    print(json.dumps(stats))
    return 0


def rollout_from_server(args) -> dict:
    """--server: the rollouts from an OpenAI-compatible server; with --teacher, chats rendered here as token ids
    and prompts too long for the context (the folder's, or the server's if smaller) skipped as in process."""
    if args.device != "auto":
        raise UsageError(f"--device {args.device}: with --server the server runs the model")
    server = Server(args.server, "--server", args.request_timeout, args.retries)
    tokenizer = context = None
    if args.teacher is not None:
        context = ModelConfig.from_hf_config(args.teacher).max_position_embeddings
        tokenizer = load_tokenizer(args.teacher)
    name, served = server.model(args.model)
    context = min(c for c in (context, served) if c) if context or served else None
    if context is not None and args.max_new_tokens >= context:
        raise UsageError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in the teacher's "
                         f"context of {context} tokens")
    # sent explicitly: the folder's generation_config.json where --teacher names one, else the paper's values
    params = sampling_from_args(args, args.max_new_tokens, model_dir=args.teacher)
    return rollout_remote(server, name, args.prompts, args.out, params, args.samples_per_prompt, args.concurrency,
                          args.seed, chat_template_kwargs=args.chat_template_kwargs, strict=args.strict,
                          tokenizer=tokenizer, context=context, batch_size=args.batch_size)


if __name__ == "__main__":
    sys.exit(exit_status("rollout.py", main, "interrupted; the answers so far are kept in --out, rerun to continue"))
