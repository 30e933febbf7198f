"""Chat with a static or converted checkpoint, token by token, and see what each answer cost (docs/method.md §6).

    python serve.py                                        # the shipped teacher, interactive (one prompt a line)
    python serve.py --prompt "Compute 358+67-149."
    python serve.py --model runs/student --temperature 0 --max-new-tokens 128
    python serve.py --model runs/student --port 8000       # an OpenAI-compatible HTTP server (zeda/server.py)

With --port, the model is served over HTTP on 127.0.0.1 (--host to change it): POST /v1/chat/completions and
/v1/completions (streamed or not), GET /v1/models and /health. Concurrent requests are batched into shared
decode steps (up to --max-batch-size; at most --max-queue wait, beyond that 503); --temperature, --top-p,
--top-k and --max-new-tokens become the defaults of requests that do not set them, and each response's
`usage` reports its zero-expert ratio and expert FLOPs saved. --max-request-bytes, --request-timeout, --keep-alive
and --limit-concurrency bound what one client can hold (zeda/server.py). Ctrl-C or SIGTERM stops it (exit 130 /
143).

Each prompt is a fresh single-turn chat (the model's own chat template). Tokens are printed as they are sampled
(generation's on_token callback); after each answer one line reports the tokens, tokens/s, the zero-expert ratio
and the expert FLOPs saved against the static original (1 - dynamic / static, flops.flop_report over every token
the answer processed, prompt included). A static checkpoint reports 0% for both; a converted one its routing.
Sampling defaults are the paper's evaluation settings: temperature 0.6, top-p 0.95, top-k 20.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

from zeda.baselines import set_routing
from zeda.token_picture import render_terminal, token_pieces
from zeda.errors import EvaluationError, ZedaError, exit_status
from zeda.evaluation import Item, encode_items, pad_id, stop_ids
from zeda.flags import add_chat_template_kwargs, add_compute_args, float_range, int_range
from zeda.flops import flop_report
from zeda.generation import Generation, generate
from zeda.loading import load_for_inference
from zeda.sampling import SamplingParams, add_sampling_args, sampling_from_args

DEFAULT_MODEL = Path(__file__).resolve().parent / "assets" / "qwen3_moe_teacher"
MAKE_TEACHER = "python -m zeda_toy.teacher --arch qwen3_moe --out assets/qwen3_moe_teacher"


class TokenPrinter:
    """on_token callback: decode the answer so far and print only what is new, at once (no newline, flushed).

    Decoding the whole answer each time (not token by token) keeps multi-token characters and a BPE's leading
    spaces right; text ending in U+FFFD is half a UTF-8 character, so it waits for the next token."""

    def __init__(self, tokenizer, eos_ids: set[int], out=None):
        self.tokenizer, self.eos_ids, self.out = tokenizer, eos_ids, out or sys.stdout
        self.ids: list[int] = []
        self.printed = 0  # characters of the decoded answer already written

    def __call__(self, row: int, token: int) -> None:
        if token in self.eos_ids:
            return
        self.ids.append(token)
        self.flush(final=False)

    def flush(self, final: bool = True) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not final and text.endswith("\ufffd"):
            return
        self.out.write(text[self.printed:])
        self.out.flush()
        self.printed = len(text)


def answer(model, tokenizer, prompt: str, sampling: SamplingParams, seed: int | None, where: str = "--prompt",
           out=None, show_compute: bool = False, chat_template_kwargs: dict | None = None) -> Generation:
    """Stream one answer to `out`, then its summary line; with show_compute, the answer once more, each token
    coloured by the real experts that produced it. EvaluationError naming `where` if the prompt does not fit in
    the context."""
    cfg, out = model.config, out or sys.stdout
    item = Item("serve", where, [{"role": "user", "content": prompt}], "", None)
    ids = encode_items(tokenizer, [item], sampling.max_new_tokens, cfg.max_position_embeddings,
                       chat_template_kwargs)[0]
    eos = stop_ids(tokenizer, cfg)
    printer = TokenPrinter(tokenizer, eos, out)
    gen = generate(model, [ids], sampling, eos, pad_id(tokenizer, cfg), seed=seed, on_token=printer)
    printer.flush()
    if show_compute:
        shown = [i for i, t in enumerate(gen.tokens[0]) if t not in eos]  # EOS produced no text
        tokens = [gen.tokens[0][i] for i in shown]
        real = [gen.real_slots[0][i] for i in shown]
        out.write("\n" + render_terminal(token_pieces(tokenizer, tokens), real,
                                         cfg.num_experts_per_tok * cfg.num_moe_layers))
    out.write("\n" + summary_line(cfg, gen) + "\n")
    out.flush()
    return gen


def summary_line(cfg, gen: Generation) -> str:
    report = flop_report(cfg, gen.stats, gen.attended_keys)
    speed = gen.new_tokens / gen.seconds if gen.seconds > 0 else 0.0
    stop = "stopped at EOS" if gen.finished[0] else "cut at --max-new-tokens"
    return (f"[{gen.new_tokens} tokens ({stop}), {speed:.1f} tokens/s, zero-expert ratio "
            f"{report['zero_expert_ratio']:.1%}, expert FLOPs saved {report['expert_flops_reduction']:.1%}]")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="serve.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, default=None,
                   help="checkpoint folder, static or converted (default: assets/qwen3_moe_teacher beside serve.py)")
    p.add_argument("--prompt", default=None, help="answer this prompt and exit (default: read prompts from stdin)")
    add_sampling_args(p)  # --temperature, --top-p, --top-k: the model folder's generation_config.json, else the paper's
    p.add_argument("--max-new-tokens", type=int_range(min=1), default=256,
                   help="generation limit per answer (default 256)")
    p.add_argument("--seed", type=int_range(min=0), default=None,
                   help="sampling seed (answer i uses seed + i; default: random)")
    add_compute_args(p)
    p.add_argument("--zero-bias", type=float_range(), default=0.0,
                   help="added to every zero-expert router logit: a converted model's compute dial, more zero "
                        "experts (cheaper) above 0, fewer below (default 0: as trained)")
    p.add_argument("--show-compute", action="store_true",
                   help="after each answer, show it again with every token coloured by the real experts it used "
                        "(summed over MoE layers; 24-bit colour terminal)")
    add_chat_template_kwargs(p)  # a request's own chat_template_kwargs win over these
    http = p.add_argument_group("HTTP server (zeda/server.py)")
    http.add_argument("--port", type=int_range(min=0, max=65535), default=None,
                      help="serve the OpenAI-compatible API on this port instead of chatting (0: any free port)")
    http.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    http.add_argument("--served-model-name", default=None,
                      help="the model's name in the API (default: the model folder's name)")
    http.add_argument("--max-batch-size", type=int_range(min=1), default=16,
                      help="requests decoded together in one batch (default 16)")
    http.add_argument("--max-queue", type=int_range(min=1), default=64,
                      help="requests that may wait for the next batch; more get 503 + Retry-After (default 64)")
    http.add_argument("--max-request-bytes", type=int_range(min=1), default=1 << 20,
                      help="largest request body; a larger one gets 413 before it is read (default 1048576 = 1 MiB)")
    http.add_argument("--request-timeout", type=float_range(above=0), default=10.0,
                      help="seconds a request's headers and body may take to arrive; a slower one gets 408 and\n"
                           "its connection closes (default 10)")
    http.add_argument("--keep-alive", type=int_range(min=1), default=5,
                      help="seconds an idle keep-alive connection stays open (default 5)")
    http.add_argument("--limit-concurrency", type=int_range(min=1), default=1000,
                      help="open connections at most; a connection over it closes the one that has waited longest\n"
                           "for a request, or gets 503 if all are busy. Lowered to fit the open-file limit, which\n"
                           "is raised to its hard limit at start (default 1000)")
    return p.parse_args(argv)


def error(message: str) -> int:
    print(f"serve.py: error: {message}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.prompt is not None and not args.prompt.strip():
        return error("--prompt is empty")
    if args.model is None and not DEFAULT_MODEL.is_dir():
        return error(f"the default teacher {DEFAULT_MODEL} does not exist yet; create it with\n    {MAKE_TEACHER}\n"
                     "or pass --model DIR")
    model_dir = args.model or DEFAULT_MODEL
    if args.port is not None:
        if args.prompt is not None:
            return error("--prompt and --port exclude each other: a server answers HTTP requests")
        return run_server(args, model_dir)
    try:
        sampling = sampling_from_args(args, args.max_new_tokens, model_dir=model_dir)
        model, tokenizer = load(args, model_dir)
    except (ZedaError, OSError) as e:
        return error(str(e))
    seed = args.seed

    if args.prompt is not None:
        try:
            answer(model, tokenizer, args.prompt, sampling, seed, show_compute=args.show_compute,
                   chat_template_kwargs=args.chat_template_kwargs)
        except EvaluationError as e:
            return error(str(e))
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return 130
        return 0

    cfg = model.config
    print(f"{model_dir}: {cfg.model_type}, {cfg.num_experts} experts + {cfg.num_zero_experts} zero experts, "
          f"top-{cfg.num_experts_per_tok}. One prompt per line; Ctrl-D to quit.", file=sys.stderr)
    try:
        return chat(model, tokenizer, sampling, seed, args.show_compute, args.chat_template_kwargs)
    except KeyboardInterrupt:  # Ctrl-C: end the answer's line and leave quietly, as a shell does
        print(file=sys.stderr)
        return 130


def load(args: argparse.Namespace, model_dir: Path):
    """The model and its tokenizer, with the compute dial set (zeda/baselines.py)."""
    model, tokenizer = load_for_inference(model_dir, args.device, args.dtype, args.expert_backend)
    set_routing(model, zero_bias=args.zero_bias)
    return model, tokenizer


def run_server(args: argparse.Namespace, model_dir: Path) -> int:
    """--port: bind first (a taken port fails before the model loads), load, serve until SIGINT / SIGTERM."""
    try:
        from zeda.server import ServerOptions, create_app, listen, serve_forever
    except ModuleNotFoundError as e:  # FastAPI and uvicorn are the `serve` extra, not core dependencies
        return error(f"--port needs the serve extra ({e.name} is missing): pip install -e '.[serve]'")

    try:
        sock = listen(args.host, args.port)
    except OSError as e:
        return error(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}")
    try:
        model, tokenizer = load(args, model_dir)
    except (ZedaError, OSError) as e:
        sock.close()
        return error(str(e))
    except KeyboardInterrupt:
        return 130
    name = args.served_model_name or Path(model_dir).resolve().name
    try:
        defaults = sampling_from_args(args, args.max_new_tokens, model_dir=model_dir)  # a request's own values win
    except ZedaError as e:
        sock.close()
        return error(str(e))
    options = ServerOptions(temperature=defaults.temperature, top_p=defaults.top_p, top_k=defaults.top_k,
                            max_tokens=args.max_new_tokens, max_batch_size=args.max_batch_size,
                            max_queue=args.max_queue, max_request_bytes=args.max_request_bytes,
                            request_timeout=args.request_timeout, keep_alive=args.keep_alive,
                            max_connections=args.limit_concurrency, chat_template_kwargs=args.chat_template_kwargs)
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"
    cfg = model.config
    print(f"serve.py: {name} ({cfg.model_type}, {cfg.num_experts} experts + {cfg.num_zero_experts} zero experts) "
          f"at {url}, batches of up to {args.max_batch_size}; Ctrl-C to stop", file=sys.stderr, flush=True)
    return serve_forever(create_app(model, tokenizer, name, options), sock)


def chat(model, tokenizer, sampling: SamplingParams, seed: int | None, show_compute: bool = False,
         chat_template_kwargs: dict | None = None) -> int:
    """The interactive loop: one prompt a line on stdin until EOF."""
    turn = 0
    for lineno in itertools.count(1):
        print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:  # EOF
            print()
            return 0
        prompt = line.rstrip("\n")
        if not prompt.strip():
            continue
        try:
            answer(model, tokenizer, prompt, sampling, None if seed is None else seed + turn, f"stdin line {lineno}",
                   show_compute=show_compute, chat_template_kwargs=chat_template_kwargs)
        except EvaluationError as e:  # too long: say so and wait for the next prompt
            print(f"serve.py: {e}", file=sys.stderr)
        turn += 1


if __name__ == "__main__":
    sys.exit(exit_status("serve.py", main))
