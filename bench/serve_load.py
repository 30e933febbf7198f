"""Load on the HTTP server: N concurrent streaming clients on loopback against `serve.py --port`, and the same
against `transformers serve` (Hugging Face's own OpenAI-compatible server) on the same static teacher.

    python -m bench.serve_load                                   # 16 clients vs 1, zeda vs transformers serve (~75 s)
    python -m bench.serve_load --clients 8 --requests 2 --no-peer --json serve_load.json

The peer runs twice: as it starts by default, and with --continuous-batching (its own batching of concurrent
requests, the fair comparison). Each server is started as a subprocess on 127.0.0.1 (all with
OMP_NUM_THREADS=--threads) and stopped at the end (SIGTERM, then kill). Per server: one warm-up request, then a
single client sending --single-requests requests one after another, then --clients clients each sending
--requests requests one after another; a phase stops issuing requests after --phase-seconds, so every run ends
by itself. Every request is a streamed chat completion of a task-suite prompt
(zeda.evaluation.suite_items: math, code, if) at temperature 0 with max_tokens --max-tokens, so both servers do
the same greedy work. Measured per request: time to first token (first chunk with text), latency (until the
stream ends) and completion tokens (the usage chunk; text chunks if a server sends none). Reported per phase:
aggregate tokens/s (all completion tokens / phase wall time), TTFT and latency p50 / p99, and whether the
greedy answers of both servers agree.

The peer installs with `pip install -e '.[peers]'` (transformers' serving extra, accelerate included) and runs
offline (HF_HUB_OFFLINE=1: the machine reaches no hub). Without it the bench says so, measures zeda alone and
marks the peer "not installed" in the table and the JSON, rather than printing a table without it. transformers
serve picks the model class from config.json's "architectures", which every checkpoint zeda ships or writes
names, so both servers load the same folder.
"""

from __future__ import annotations

import argparse
import http.client
import importlib.util
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from zeda.flags import float_range, int_range  # noqa: E402

DEFAULT_MODEL = ROOT / "assets" / "qwen3_moe_teacher"
STARTUP_S = 180  # a server that is not answering /health by then is reported as failed


# ---------------------------------------------------------------------------------------------------------------
# Servers.


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return s.getsockname()[1]


def health_ok(port: int) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        conn.request("GET", "/health")
        return conn.getresponse().status == 200
    except OSError:
        return False


class Server:
    """A server subprocess: started, waited for, stopped; its output kept in a file for the report (a temporary
    one removed at stop, or `log_path`, kept)."""

    def __init__(self, name: str, argv: list[str], port: int, model_name: str, env: dict | None = None,
                 log_path: Path | None = None):
        self.name, self.argv, self.port, self.model_name = name, argv, port, model_name
        self.keep_log = log_path is not None
        self.log = (open(log_path, "w+") if self.keep_log
                    else tempfile.NamedTemporaryFile("w+", prefix="serve_load-", suffix=".log", delete=False))
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})
        self.started_s: float | None = None

    def wait_ready(self, timeout: float = STARTUP_S) -> str | None:
        """None once /health answers; else why not (the process exited, or the timeout)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                return f"exited with code {self.proc.returncode} after {time.monotonic() - t0:.1f} s: {self.tail()}"
            if health_ok(self.port):
                self.started_s = time.monotonic() - t0
                return None
            time.sleep(0.25)
        return f"not answering /health after {timeout:.0f} s: {self.tail()}"

    def tail(self, lines: int = 1) -> str:
        self.log.flush()
        text = Path(self.log.name).read_text(errors="replace").strip().splitlines()
        return " | ".join(text[-lines:]) if text else "(no output)"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        if not self.keep_log:
            os.unlink(self.log.name)


def start_zeda(model: Path, clients: int, threads: int) -> Server:
    port = free_port()
    argv = [sys.executable, "serve.py", "--model", str(model), "--port", str(port), "--max-batch-size",
            str(max(clients, 1))]
    return Server("zeda serve.py", argv, port, model.resolve().name, env={"OMP_NUM_THREADS": str(threads)})


PEER_NEEDS = ("accelerate", "fastapi", "uvicorn", "openai", "rich")  # transformers[serving], what `serve` imports


def peer_missing() -> list[str]:
    """The packages transformers serve needs that are not installed (install: pip install -e '.[peers]')."""
    return [name for name in PEER_NEEDS if importlib.util.find_spec(name) is None]


def start_peer(model: Path, extra: list[str], threads: int) -> Server:
    port = free_port()
    exe = shutil.which("transformers", path=str(Path(sys.executable).parent)) or "transformers"
    argv = [exe, "serve", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", *extra, str(model)]
    return Server("transformers serve" + (" " + " ".join(extra) if extra else ""), argv, port, str(model),
                  env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)})


# ---------------------------------------------------------------------------------------------------------------
# Clients.


def one_request(port: int, model_name: str, messages: list[dict], max_tokens: int) -> dict:
    """One streamed chat completion: {ttft, latency, tokens, text} (seconds), or {error}."""
    body = {"model": model_name, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        if r.status != 200:
            return {"error": f"HTTP {r.status}: {r.read()[:200]!r}"}
        ttft, pieces, usage = None, [], None
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices") or []:
                text = (choice.get("delta") or {}).get("content")
                if text:
                    ttft = ttft if ttft is not None else time.perf_counter() - t0
                    pieces.append(text)
        conn.close()
    except OSError as e:
        return {"error": f"{type(e).__name__}: {e}"}
    tokens = usage["completion_tokens"] if usage else len(pieces)
    return {"ttft": ttft if ttft is not None else time.perf_counter() - t0, "latency": time.perf_counter() - t0,
            "tokens": tokens, "text": "".join(pieces)}


def run_phase(server: Server, prompts: list[list[dict]], clients: int, requests: int, max_tokens: int,
              seconds: float) -> dict:
    """`clients` threads, each sending up to `requests` requests in turn (prompt i * clients + c), none started
    after `seconds`. Returns the phase's numbers and every answer by prompt index."""
    results: list[tuple[int, dict]] = []
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def client(c: int) -> None:
        for i in range(requests):
            if time.perf_counter() > deadline:
                return
            k = (i * clients + c) % len(prompts)
            out = one_request(server.port, server.model_name, prompts[k], max_tokens)
            with lock:
                results.append((k, out))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 600)
    wall = time.perf_counter() - t0
    ok = [r for _, r in results if "error" not in r]
    errors = [r["error"] for _, r in results if "error" in r]
    tokens = sum(r["tokens"] for r in ok)
    return {"clients": clients, "requests": len(ok), "errors": len(errors), "first_error": errors[0] if errors
            else None, "tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall if wall > 0 else 0.0,
            "ttft_p50": pct([r["ttft"] for r in ok], 50), "ttft_p99": pct([r["ttft"] for r in ok], 99),
            "latency_p50": pct([r["latency"] for r in ok], 50), "latency_p99": pct([r["latency"] for r in ok], 99),
            "answers": {k: r["text"] for k, r in results if "error" not in r}}


def pct(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (p99 of a few dozen requests is their slowest)."""
    if not values:
        return None
    s = sorted(values)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


def bench_server(server: Server, prompts, args) -> dict:
    why = server.wait_ready()
    if why is not None:
        server.stop()
        return {"server": server.name, "error": why}
    try:
        warm = one_request(server.port, server.model_name, prompts[0], args.max_tokens)
        if "error" in warm:
            return {"server": server.name, "error": f"warm-up request failed: {warm['error']}"}
        single = run_phase(server, prompts, 1, args.single_requests, args.max_tokens, args.phase_seconds)
        many = run_phase(server, prompts, args.clients, args.requests, args.max_tokens, args.phase_seconds)
    finally:
        server.stop()
    return {"server": server.name, "startup_s": server.started_s, "single": single, "concurrent": many}


# ---------------------------------------------------------------------------------------------------------------
# Report.


def fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def table(runs: list[dict]) -> str:
    lines = [f"{'server':<36}{'clients':>8}{'reqs':>6}{'tokens/s':>10}{'TTFT p50':>10}{'TTFT p99':>10}"
             f"{'lat p50':>9}{'lat p99':>9}{'x single':>10}"]
    for run in runs:
        if "error" in run:
            lines.append(f"{run['server']:<36}  failed: {run['error']}")
            continue
        base = run["single"]["tokens_per_s"]
        for phase in (run["single"], run["concurrent"]):
            ratio = phase["tokens_per_s"] / base if base else None
            lines.append(f"{run['server']:<36}{phase['clients']:>8}{phase['requests']:>6}"
                         f"{phase['tokens_per_s']:>10.1f}{fmt(phase['ttft_p50'], '.3f'):>10}"
                         f"{fmt(phase['ttft_p99'], '.3f'):>10}{fmt(phase['latency_p50'], '.2f'):>9}"
                         f"{fmt(phase['latency_p99'], '.2f'):>9}{fmt(ratio, '.1f'):>10}"
                         + (f"  ({phase['errors']} errors: {phase['first_error']})" if phase["errors"] else ""))
    return "\n".join(lines)


def agreement(a: dict, b: dict) -> dict:
    """How many prompts both servers answered identically (greedy: the same model should say the same)."""
    common = sorted(set(a) & set(b))
    return {"compared": len(common), "identical": sum(a[k] == b[k] for k in common)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="static checkpoint folder (default: teacher)")
    p.add_argument("--clients", type=int_range(min=1, max=64), default=16, help="concurrent clients (default 16)")
    p.add_argument("--requests", type=int_range(min=1, max=100), default=6,
                   help="requests per concurrent client (default 6)")
    p.add_argument("--single-requests", type=int_range(min=1, max=100), default=12,
                   help="requests of the single client (default 12)")
    p.add_argument("--max-tokens", type=int_range(min=1, max=4096), default=64,
                   help="max_tokens of every request (default 64)")
    p.add_argument("--phase-seconds", type=float_range(above=0, max=600), default=60,
                   help="no request starts after this many seconds of a phase (default 60)")
    p.add_argument("--threads", type=int_range(min=1), default=1,
                   help="OMP_NUM_THREADS of both servers (default 1: on a small shared CPU the client threads and\n"
                   "the server's event loop need the other cores, and a second torch thread mostly spins)")
    p.add_argument("--no-peer", action="store_true", help="skip transformers serve")
    p.add_argument("--json", type=Path, default=None, help="write the numbers here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from zeda.evaluation import suite_items

    n = max(args.clients * args.requests, args.single_requests) // 3 + 1
    prompts = [item.messages for item in suite_items(("math", "code", "if"), n)]
    report = {"machine": {"cpus": os.cpu_count(), "platform": sys.platform}, "model": str(args.model),
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "runs": []}
    runs = report["runs"]
    print(f"serve_load: {args.model.name}, {args.clients} clients x {args.requests} requests vs 1 x "
          f"{args.single_requests}, max_tokens {args.max_tokens}, greedy, streamed", file=sys.stderr)
    runs.append(bench_server(start_zeda(args.model, args.clients, args.threads), prompts, args))
    missing = [] if args.no_peer else peer_missing()
    if missing:
        report["peer"] = f"not installed ({', '.join(missing)} missing): pip install -e '.[peers]'"
        print(f"serve_load: transformers serve is {report['peer']}; measuring zeda alone", file=sys.stderr)
        runs.append({"server": "transformers serve", "error": report["peer"]})
    elif not args.no_peer:
        for extra in ([], ["--continuous-batching"]):  # its default, and its own batching of concurrent requests
            runs.append(bench_server(start_peer(args.model, extra, args.threads), prompts, args))
    print(table(runs))
    zeda = runs[0]
    if "error" not in zeda:
        ratio = zeda["concurrent"]["tokens_per_s"] / max(zeda["single"]["tokens_per_s"], 1e-9)
        peers = [r for r in runs[1:] if "error" not in r]
        best_peer = max((r["concurrent"]["tokens_per_s"] for r in peers), default=None)
        report["target"] = {"concurrent_over_single": ratio, "at_least_4x": ratio >= 4,
                            "best_peer_tokens_per_s": best_peer,
                            "ahead_of_peer": None if best_peer is None else
                            zeda["concurrent"]["tokens_per_s"] > best_peer}
        for r in peers:
            r["greedy_answers_vs_zeda"] = agreement({**zeda["single"]["answers"], **zeda["concurrent"]["answers"]},
                                                    {**r["single"]["answers"], **r["concurrent"]["answers"]})
        t = report["target"]
        print(f"target: {args.clients} clients {ratio:.1f}x a single client's tokens/s "
              f"({'met' if t['at_least_4x'] else 'NOT met'}: >= 4x); "
              + ("no peer ran" if best_peer is None else
                 f"{'ahead of' if t['ahead_of_peer'] else 'NOT ahead of'} the peer's best {best_peer:.1f} tokens/s"))
        for r in peers:
            g = r["greedy_answers_vs_zeda"]
            print(f"greedy answers identical to zeda's: {g['identical']}/{g['compared']} ({r['server']})")
    if report.get("peer_on_original_folder") not in (None, "loaded"):
        print(f"note: transformers serve could not load {args.model} as it is ({report['peer_on_original_folder']});"
              " it served a copy whose config.json names the architecture")
    if args.json is not None:
        for r in runs:  # the answers themselves stay out of the JSON: the numbers are the point
            for phase in ("single", "concurrent"):
                r.get(phase, {}).pop("answers", None)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
