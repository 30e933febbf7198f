"""zeda checkpoints under lm-evaluation-harness (lm_eval), measured side by side with evaluate.py on the same items.

    python bench/harness.py                                   # the shipped qwen3_moe teacher and its conversion (Z=4)
    python bench/harness.py --model assets/qwen3_moe_teacher --model runs/pipeline/opd/final --json harness.json
    python bench/harness.py --n 300                           # every family's full test slice (slower)
    python bench/harness.py --export-only --tasks-dir my_tasks  # just the lm-eval task folder, to run lm_eval yourself

What is measured, per model folder (greedy everywhere, the same --max-new-tokens, fp32, on --device: cpu):

1. evaluate.py --tasks math,code: accuracy per family (tasks.verify: the rest of the line after the last
   "Answer:", stripped, equals the reference exactly). Its LL column is zeda's own log-likelihood of the same
   multiple-choice items (zeda.model.token_logprobs in this process), the reference for the two below.
2. lm_eval through zeda's OpenAI-compatible server (serve.py --port, started here):
   `--model local-chat-completions --apply_chat_template` on the generation tasks (the server applies the chat
   template), and `--model local-completions` (token ids, echo + logprobs) on the log-likelihood task.
3. lm_eval's `hf` backend (`pretrained=M,trust_remote_code=True,dtype=float32`): plain transformers, and for a
   dynamic checkpoint the modeling_zeda.py it carries, on the same three tasks.

The items are zeda.evaluation.suite_items of the math and code families (the test split, --task-seed), exported to
JSONL with the prompt and the reference answer, and three lm-eval tasks are written beside them (YAML, local
files only: `dataset_path: json`):
- zeda_math_gen, zeda_code_gen (generate_until, greedy, no stop string but the model's EOS): a regex filter takes
  the rest of the line after the *last* "Answer:" and exact_match compares it with the reference, which is
  tasks.verify's rule for these families exactly (ANSWER_REGEX). The instruction-following family ("if") is left
  out: its verifier checks constraints (order, case, count, separator; any valid answer passes), which one
  reference string and exact_match cannot express.
- zeda_math_ll (multiple_choice, scored by log-likelihood): the context is the chat-templated prompt followed by
  the reference worked solution up to and including "Answer:" (lm-eval's gen_prefix; needs --apply_chat_template),
  the choices are " <answer>" and three deterministic distractors (math_distractors), the metric is acc (argmax of
  the summed log-probs of the choice's tokens).

The models: every --model (default: the shipped qwen3_moe teacher) and, unless --converted 0, the first one
converted by convert.py with --converted zero experts (when it is a static checkpoint).

The table: rows model x path, columns math and code accuracy, LL accuracy, seconds (wall clock of the path's
processes: model load and lm_eval's start included). Below it, per model, from lm_eval --log_samples: how many
items each lm-eval path scores differently from evaluate.py; how many items tasks.verify, applied to lm-eval's
raw text, scores differently from lm-eval's regex filter + exact_match; how many answers the server and the hf
backend wrote identically; and the largest |log-likelihood| difference between the server, the hf backend and
zeda in-process over every item and choice. --json writes all of it.

lm_eval is not a zeda dependency: `pip install "lm_eval[api]>=0.4.13"` (the version measured). Everything runs
offline (HF_HUB_OFFLINE=1, HF_DATASETS_OFFLINE=1): the tasks read local files and the models local folders.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.serve_load import Server, free_port  # noqa: E402
from zeda_toy import tasks  # noqa: E402
from zeda.evaluation import suite_items, write_json_atomic  # noqa: E402
from zeda.flags import int_range  # noqa: E402
from zeda_toy.tasks import ANSWER_PREFIX  # noqa: E402

DEFAULT_MODEL = ROOT / "assets" / "qwen3_moe_teacher"
GEN_FAMILIES = ("math", "code")  # scored by one exact answer; "if" is not (see the docstring)
GEN_TASKS = {family: f"zeda_{family}_gen" for family in GEN_FAMILIES}
LL_TASK = "zeda_math_ll"
# group 1 = the rest of the line after the LAST "Answer:" (the greedy (?s:.*) skips every earlier one), which the
# regex filter then strips: tasks.extract_answer's rule. The naive "Answer: (.*)" differs in three ways (none of
# them met in the answers measured, each holding one "Answer: "): it takes the first match (group_select 0), needs
# the space, and on a line holding "Answer:" twice keeps both.
ANSWER_REGEX = r"(?s:.*)Answer:([^\n]*)"
SERVED_NAME = "zeda"  # the server's model name, which lm-eval sends back
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


# ---------------------------------------------------------------------------------------------------------------
# Export: the items evaluate.py scores, as JSONL, and the lm-eval tasks that read them.


def math_distractors(answer: str, k: int = 3) -> list[str]:
    """k wrong answers to a math item, the same for every run: the answer +-1, +-10, +-100, ... in that order,
    kept when >= 0 (every math answer is) and when neither it nor any choice before it is a prefix of the other,
    since a choice that is a prefix of another has the larger log-likelihood whatever the model knows."""
    value, chosen = int(answer), [answer]
    for magnitude in (1, 10, 100, 2, 20, 200, 3, 30, 300, 1000, 5, 50, 500):
        for delta in (magnitude, -magnitude):
            candidate = str(value + delta)
            if value + delta < 0 or any(c.startswith(candidate) or candidate.startswith(c) for c in chosen):
                continue
            chosen.append(candidate)
            if len(chosen) == k + 1:
                return chosen[1:]
    raise ValueError(f"no {k} distractors for {answer!r}")  # not reached for numbers >= 0


def answer_prefix(response: str) -> str:
    """The reference worked solution up to and including its last "Answer:" (the log-likelihood task's context)."""
    cut = response.rfind(ANSWER_PREFIX)
    if cut < 0:
        raise ValueError(f"a reference response without {ANSWER_PREFIX!r}: {response!r}")
    return response[:cut + len(ANSWER_PREFIX)]


def export_records(n: int, task_seed: int = 0) -> dict[str, list[dict]]:
    """{family: generation records, ..., "math_ll": multiple-choice records}, items in suite_items' order (the
    order of evaluate.py's per-item `correct_items`)."""
    items = suite_items(GEN_FAMILIES, n, task_seed)
    records: dict[str, list[dict]] = {family: [] for family in GEN_FAMILIES}
    records["math_ll"] = []
    for item in items:
        prompt = item.messages[-1]["content"]
        records[item.group].append({"where": item.where, "messages": item.messages, "prompt": prompt,
                                    "answer": item.reference})
        if item.group == "math":
            choices = [item.reference] + math_distractors(item.reference)
            # the correct choice at a place drawn from the prompt: not always first, the same in every run
            random.Random(f"zeda.harness:{prompt}").shuffle(choices)
            records["math_ll"].append({"where": item.where, "prompt": prompt,
                                       "prefix": answer_prefix(item.task.response), "choices": choices,
                                       "label": choices.index(item.reference)})
    return records


def task_configs(data_files: dict[str, str], max_new_tokens: int) -> dict[str, dict]:
    """{task name: lm-eval task config} for the exported JSONL files ({"math": path, "code": path, "math_ll":
    path}; absolute paths: the datasets library resolves relative ones against the working folder)."""
    configs = {}
    for family in GEN_FAMILIES:
        configs[GEN_TASKS[family]] = {
            "task": GEN_TASKS[family],
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": data_files[family]}},
            "test_split": "test",
            "output_type": "generate_until",
            "doc_to_text": "prompt",  # a field name: the prompt verbatim, no template rendering
            "doc_to_target": "answer",
            # greedy; no stop string, so the answer ends where evaluate.py's does, at the model's EOS: the hf and
            # completions backends add its text to `until`, the server stops at it anyway. An empty list stays
            # empty; a missing `until` would become ["\n\n"]
            "generation_kwargs": {"until": [], "max_gen_toks": max_new_tokens, "do_sample": False,
                                  "temperature": 0.0},
            "filter_list": [{"name": "answer", "filter": [
                {"function": "regex", "regex_pattern": ANSWER_REGEX, "group_select": -1},
                {"function": "take_first"}]}],
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": 1.0},
        }
    configs[LL_TASK] = {
        "task": LL_TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": data_files["math_ll"]}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "prompt",
        "gen_prefix": "prefix",  # the assistant turn starts with the worked solution up to "Answer:"
        "doc_to_choice": "choices",
        "doc_to_target": "label",
        "target_delimiter": " ",  # each choice is scored as " <answer>", as the reference writes it
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }
    return configs


def write_task_folder(folder: str | os.PathLike, n: int, task_seed: int, max_new_tokens: int) -> dict:
    """The JSONL items and one YAML per lm-eval task in `folder` (pass it to lm_eval --include_path); returns
    the records."""
    import yaml  # a transformers dependency, so always here

    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    records = export_records(n, task_seed)
    data_files = {}
    for name, rows in records.items():
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        data_files[name] = str(path)
    for task, config in task_configs(data_files, max_new_tokens).items():
        (folder / f"{task}.yaml").write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    return records


# ---------------------------------------------------------------------------------------------------------------
# Models: the folders measured.


def hf_loadable(folder: Path, work: Path) -> Path:
    """A folder transformers can load with trust_remote_code: the folder itself, or, for a dynamic checkpoint
    written before checkpoints carried modeling_zeda.py, a copy in `work` with it added (zeda.hf)."""
    from zeda.hf import write_remote_code

    config = json.loads((folder / "config.json").read_text())
    if not config.get("zce_nums") or config.get("auto_map"):
        return folder
    copy = work / f"{folder.name}-with-remote-code"
    if not copy.exists():
        shutil.copytree(folder, copy)
        (copy / "config.json").write_text(json.dumps(write_remote_code(copy, config), indent=2) + "\n")
        print(f"harness: {folder} has no modeling_zeda.py; the hf backend loads a copy with it: {copy}",
              file=sys.stderr)
    return copy


def context_length(folder: Path) -> int:
    """config.json's max_position_embeddings: lm-eval's API models assume 2048 unless told."""
    return int(json.loads((folder / "config.json").read_text())["max_position_embeddings"])


def convert(source: Path, zero_experts: int, work: Path) -> Path:
    out = work / f"{source.name}-z{zero_experts}"
    if not out.exists():
        run_checked([sys.executable, "convert.py", "--input-dir", str(source), "--output-dir", str(out),
                     "--num-zero-experts", str(zero_experts)], "convert.py")
    return out


# ---------------------------------------------------------------------------------------------------------------
# Running the three paths.


def run_checked(argv: list[str], what: str, log: Path | None = None) -> float:
    """Run a command from the repository root, offline; its wall seconds. A failure raises with the output's tail."""
    t0 = time.monotonic()
    proc = subprocess.run(argv, cwd=ROOT, env={**os.environ, **OFFLINE}, capture_output=True, text=True)
    seconds = time.monotonic() - t0
    if log is not None:
        log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
        raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{tail}")
    return seconds


def run_evaluate(model: Path, args, out: Path) -> dict:
    seconds = run_checked([sys.executable, "evaluate.py", "--model", str(model), "--tasks", ",".join(GEN_FAMILIES),
                           "--n", str(args.n), "--task-seed", str(args.task_seed), "--max-new-tokens",
                           str(args.max_new_tokens), "--dtype", "float32", "--device", args.device, "--out", str(out),
                           "--no-progress"], "evaluate.py")
    report = json.loads(out.read_text())
    return {"seconds": seconds, "accuracy": {f: report["accuracy"][f] for f in GEN_FAMILIES},
            "correct_items": {f: [c == "1" for c in report["counts"][f]["correct_items"]] for f in GEN_FAMILIES}}


def zeda_loglikelihoods(model_dir: Path, records: list[dict], device: str = "cpu") -> list[list[float]]:
    """zeda's own summed log-probs of each choice's tokens given the chat-templated prompt + the solution prefix
    (token_logprobs, left-padded batches): the reference the two lm-eval paths are compared with."""
    import torch

    from zeda.model import token_logprobs
    from zeda.loading import load_for_inference

    model, tokenizer = load_for_inference(model_dir, device, "float32")
    rows = []  # (item, context ids, continuation ids)
    for i, r in enumerate(records):
        context = tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=False,
                                                add_generation_prompt=True) + r["prefix"]
        context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
        for choice in r["choices"]:
            # as lm-eval splits a (context, continuation) pair: encode the whole, the continuation is what follows
            whole = tokenizer(context + " " + choice, add_special_tokens=False)["input_ids"]
            rows.append((i, context_ids, whole[len(context_ids):]))
    lls: list[list[float]] = [[] for _ in records]
    with torch.no_grad():
        for start in range(0, len(rows), 32):
            batch = rows[start:start + 32]
            seqs = [c + x for _, c, x in batch]
            width = max(map(len, seqs))
            ids = torch.tensor([[0] * (width - len(s)) + s for s in seqs], device=device)
            mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=device)
            lp = token_logprobs(model, ids, mask)  # [B, width - 1]: lp[:, t] = log p(ids[t + 1])
            for row, (i, _, cont) in enumerate(batch):
                lls[i].append(lp[row, width - 1 - len(cont):].sum().item())
    return lls


def run_lm_eval(model_type: str, model_args: str, tasks: list[str], tasks_dir: Path, out: Path, batch_size: int,
                log: Path, device: str) -> dict:
    """One lm_eval run: {"seconds", "results": {task: metrics}, "samples": {task: [per-doc record, doc order]}}."""
    argv = [sys.executable, "-m", "lm_eval", "--model", model_type, "--model_args", model_args,
            "--tasks", ",".join(tasks), "--include_path", str(tasks_dir), "--batch_size", str(batch_size),
            "--output_path", str(out), "--log_samples", "--apply_chat_template"]
    if model_type == "hf":
        argv += ["--device", device]
    seconds = run_checked(argv, f"lm_eval --model {model_type}", log=log)
    results_file = max(glob.glob(str(out / "**" / "results_*.json"), recursive=True), key=os.path.getmtime)
    results = json.loads(Path(results_file).read_text())["results"]
    samples = {}
    for task in tasks:
        found = sorted(glob.glob(str(out / "**" / f"samples_{task}_*.jsonl"), recursive=True), key=os.path.getmtime)
        docs = [json.loads(line) for line in Path(found[-1]).read_text().splitlines() if line.strip()]
        samples[task] = sorted(docs, key=lambda d: d["doc_id"])
    return {"seconds": seconds, "results": results, "samples": samples}


def generation_part(run: dict, records: dict) -> dict:
    """Accuracy and per-item correctness of the generation tasks of one lm_eval run, and the items where
    tasks.verify on lm-eval's raw text disagrees with its regex filter + exact_match (none, if they mirror)."""
    out = {"accuracy": {}, "correct_items": {}, "answers": {}, "filter_vs_verify_items": {}}
    for family in GEN_FAMILIES:
        task = GEN_TASKS[family]
        metrics = run["results"][task]
        out["accuracy"][family] = metrics["exact_match,answer"]
        out["correct_items"][family] = [bool(d["exact_match"]) for d in run["samples"][task]]
        out["answers"][family] = [d["resps"][0][0] for d in run["samples"][task]]  # the raw generated text
        verified = [tasks.verify(tasks.Task(family, r["prompt"], "", r["answer"]), text)
                    for r, text in zip(records[family], out["answers"][family])]
        out["filter_vs_verify_items"][family] = [i for i, (a, b) in enumerate(zip(verified,
                                                 out["correct_items"][family])) if a != b]
    return out


def loglikelihood_part(run: dict) -> dict:
    metrics = run["results"][LL_TASK]
    lls = [[float(choice[0]) for choice in d["filtered_resps"]] for d in run["samples"][LL_TASK]]
    return {"accuracy": metrics["acc,none"], "acc_norm": metrics["acc_norm,none"], "loglikelihoods": lls}


def ll_accuracy(lls: list[list[float]], records: list[dict]) -> float:
    return sum(max(range(len(row)), key=row.__getitem__) == r["label"] for row, r in zip(lls, records)) / len(lls)


def max_abs_diff(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


def disagreements(a: dict[str, list[bool]], b: dict[str, list[bool]]) -> dict[str, list[int]]:
    return {f: [i for i, (x, y) in enumerate(zip(a[f], b[f])) if x != y] for f in GEN_FAMILIES}


def measure(model: Path, label: str, args, tasks_dir: Path, records: dict, work: Path) -> dict:
    """The three paths on one model folder."""
    slug = re.sub(r"[^\w.-]+", "_", label)  # "qwen3_moe_teacher +4 zero" -> "qwen3_moe_teacher_4_zero"
    print(f"harness: {label}: evaluate.py", file=sys.stderr, flush=True)
    evaluate = run_evaluate(model, args, work / f"{slug}-evaluate.json")
    t0 = time.monotonic()
    zeda_lls = zeda_loglikelihoods(model, records["math_ll"], args.device)
    evaluate["ll_seconds"] = time.monotonic() - t0
    evaluate["ll_accuracy"] = ll_accuracy(zeda_lls, records["math_ll"])

    print(f"harness: {label}: lm_eval through serve.py", file=sys.stderr, flush=True)
    # every prompt of every concurrent request must fit in the queue: a 503 fails lm_eval's run (max_retries=1, so
    # that a refusal is reported, not retried away)
    max_queue = max(64, args.concurrent * args.ll_batch_size)
    port = free_port()
    server = Server("zeda serve.py", [sys.executable, "serve.py", "--model", str(model), "--port", str(port),
                                      "--served-model-name", SERVED_NAME, "--max-batch-size", str(args.max_batch_size),
                                      "--max-queue", str(max_queue), "--dtype", "float32", "--device", args.device],
                    port, SERVED_NAME, env=OFFLINE, log_path=work / f"{slug}-serve.log")
    try:
        why = server.wait_ready()
        if why is not None:
            raise RuntimeError(f"serve.py {why} (log: {server.log.name})")
        startup = server.started_s
        base = f"http://127.0.0.1:{server.port}/v1"
        # the chat path sends messages (the server applies the template); the completions path sends token ids of
        # the context lm-eval renders with the folder's own tokenizer, so it must know the real context length
        common = f"model={SERVED_NAME},num_concurrent={args.concurrent},max_retries=1"
        chat = run_lm_eval("local-chat-completions", f"{common},base_url={base}/chat/completions",
                           list(GEN_TASKS.values()), tasks_dir, work / f"{slug}-lm_eval-chat", 1,
                           work / f"{slug}-lm_eval-chat.log", args.device)
        completions = run_lm_eval("local-completions",
                                  f"{common},base_url={base}/completions,tokenizer_backend=huggingface,"
                                  f"tokenizer={model},max_length={context_length(model)}",
                                  [LL_TASK], tasks_dir, work / f"{slug}-lm_eval-completions", args.ll_batch_size,
                                  work / f"{slug}-lm_eval-completions.log", args.device)
    finally:
        server.stop()
    server_path = {"seconds": startup + chat["seconds"] + completions["seconds"], "server_startup_seconds": startup,
                   "generate_seconds": chat["seconds"], "ll_seconds": completions["seconds"],
                   **generation_part(chat, records), "ll": loglikelihood_part(completions)}

    print(f"harness: {label}: lm_eval --model hf", file=sys.stderr, flush=True)
    hf_dir = hf_loadable(model, work)
    hf_run = run_lm_eval("hf", f"pretrained={hf_dir},trust_remote_code=True,dtype=float32",
                         [*GEN_TASKS.values(), LL_TASK], tasks_dir, work / f"{slug}-lm_eval-hf", args.hf_batch_size,
                         work / f"{slug}-lm_eval-hf.log", args.device)
    hf_path = {"seconds": hf_run["seconds"], **generation_part(hf_run, records), "ll": loglikelihood_part(hf_run)}

    same_text = {f: sum(a == b for a, b in zip(server_path["answers"][f], hf_path["answers"][f]))
                 for f in GEN_FAMILIES}
    return {
        "model": str(model), "label": label,
        "evaluate": evaluate,
        "server": server_path,
        "hf": hf_path,
        "agreement": {
            "server_vs_evaluate_items": disagreements(server_path["correct_items"], evaluate["correct_items"]),
            "hf_vs_evaluate_items": disagreements(hf_path["correct_items"], evaluate["correct_items"]),
            "server_vs_hf_identical_text": same_text,
            "filter_vs_verify_items": {"server": server_path["filter_vs_verify_items"],
                                       "hf": hf_path["filter_vs_verify_items"]},
            "ll_max_abs_diff": {"server_vs_hf": max_abs_diff(server_path["ll"]["loglikelihoods"],
                                                             hf_path["ll"]["loglikelihoods"]),
                                "server_vs_zeda": max_abs_diff(server_path["ll"]["loglikelihoods"], zeda_lls),
                                "hf_vs_zeda": max_abs_diff(hf_path["ll"]["loglikelihoods"], zeda_lls)},
        },
        "zeda_loglikelihoods": zeda_lls,
    }


# ---------------------------------------------------------------------------------------------------------------
# Report.


def table(runs: list[dict]) -> str:
    lines = [f"{'model':<28}{'path':<34}{'math':>7}{'code':>7}{'LL acc':>8}{'seconds':>9}",
             "-" * 93]
    for r in runs:
        e, s, h = r["evaluate"], r["server"], r["hf"]
        rows = [("evaluate.py (+ zeda LL)", e["accuracy"], e["ll_accuracy"], e["seconds"] + e["ll_seconds"]),
                ("lm_eval via serve.py", s["accuracy"], s["ll"]["accuracy"], s["seconds"]),
                ("lm_eval hf (trust_remote_code)", h["accuracy"], h["ll"]["accuracy"], h["seconds"])]
        for path, acc, ll, seconds in rows:
            lines.append(f"{r['label'][:27]:<28}{path:<34}{acc['math']:>7.1%}{acc['code']:>7.1%}{ll:>8.1%}"
                         f"{seconds:>9.1f}")
    for r in runs:
        a, ll = r["agreement"], r["agreement"]["ll_max_abs_diff"]
        items = sum(len(v) for v in r["evaluate"]["correct_items"].values())
        choices = sum(len(row) for row in r["zeda_loglikelihoods"])

        def count(by_family: dict) -> int:
            return sum(len(v) for v in by_family.values())

        lines += ["", f"{r['label']}:",
                  f"  items scored differently from evaluate.py: server {count(a['server_vs_evaluate_items'])}/"
                  f"{items}, hf {count(a['hf_vs_evaluate_items'])}/{items}",
                  f"  lm-eval's regex filter + exact_match against tasks.verify on the same text: "
                  f"{count(a['filter_vs_verify_items']['server'])} (server) and "
                  f"{count(a['filter_vs_verify_items']['hf'])} (hf) items differ",
                  f"  identical answer text, server and hf: {sum(a['server_vs_hf_identical_text'].values())}/{items}",
                  f"  largest |log-likelihood difference| over {choices} choices: server-hf {ll['server_vs_hf']:.1e}, "
                  f"server-zeda {ll['server_vs_zeda']:.1e}, hf-zeda {ll['hf_vs_zeda']:.1e}"]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/harness.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, action="append", default=None,
                   help="model folder to measure; repeat for several (default: assets/qwen3_moe_teacher)")
    p.add_argument("--converted", type=int_range(min=0), default=4, metavar="Z",
                   help="also measure the first --model, if static, converted with Z zero experts by convert.py "
                        "(default 4; 0: don't)")
    p.add_argument("--n", type=int_range(min=1), default=50, help="test items per family (default 50; 300 is "
                   "evaluate.py's default)")
    p.add_argument("--task-seed", type=int_range(min=0), default=0, help="draws the items (default 0)")
    p.add_argument("--max-new-tokens", type=int_range(min=1), default=256,
                   help="generation limit on every path (default 256, evaluate.py's)")
    p.add_argument("--concurrent", type=int_range(min=1), default=16,
                   help="lm_eval's num_concurrent requests to the server (default 16)")
    p.add_argument("--max-batch-size", type=int_range(min=1), default=16, help="serve.py --max-batch-size (default 16)")
    p.add_argument("--ll-batch-size", type=int_range(min=1), default=8,
                   help="prompts per local-completions request (default 8)")
    p.add_argument("--hf-batch-size", type=int_range(min=1), default=32, help="lm_eval hf --batch_size (default 32)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, ...: every path runs there, in fp32")
    p.add_argument("--tasks-dir", type=Path, default=None,
                   help="write the lm-eval tasks (YAML + JSONL) here and keep them (default: a temporary folder)")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="the logs, lm_eval outputs and converted models (default: a new temporary folder; kept, and "
                        "named at the end)")
    p.add_argument("--export-only", action="store_true", help="write the tasks to --tasks-dir and stop")
    p.add_argument("--json", type=Path, default=None, help="write the numbers here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.export_only:
        if args.tasks_dir is None:
            print("bench/harness.py: error: --export-only needs --tasks-dir", file=sys.stderr)
            return 2
        write_task_folder(args.tasks_dir, args.n, args.task_seed, args.max_new_tokens)
        print(f"wrote {', '.join(GEN_TASKS.values())}, {LL_TASK} to {args.tasks_dir.resolve()}: "
              f"lm_eval --include_path {args.tasks_dir.resolve()} --tasks {','.join(GEN_TASKS.values())} ... "
              f"(docs/usage.md)")
        return 0
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        print('bench/harness.py: error: lm_eval is not installed: pip install "lm_eval[api]>=0.4"', file=sys.stderr)
        return 2
    models = [m.resolve() for m in (args.model or [DEFAULT_MODEL])]
    for m in models:
        if not (m / "config.json").is_file():
            print(f"bench/harness.py: error: --model {m}: not a model folder (no config.json)", file=sys.stderr)
            return 2
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="zeda-harness-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    tasks_dir = (args.tasks_dir or work / "tasks").resolve()
    records = write_task_folder(tasks_dir, args.n, args.task_seed, args.max_new_tokens)
    os.environ["HF_DATASETS_CACHE"] = str(work / "datasets-cache")  # the exported files' cache stays in here
    labelled = [(m, m.name) for m in models]
    converted_already = bool(json.loads((models[0] / "config.json").read_text()).get("zce_nums"))
    if args.converted and converted_already:
        print(f"harness: {models[0]} has zero experts already; no conversion of it is measured", file=sys.stderr)
    runs = []
    try:
        if args.converted and not converted_already:
            labelled.insert(1, (convert(models[0], args.converted, work), f"{models[0].name} +{args.converted} zero"))
        for model, label in labelled:
            runs.append(measure(model, label, args, tasks_dir, records, work))
    except RuntimeError as e:  # a failed step: its own output's tail, and where the whole logs are
        print(f"bench/harness.py: error: {e}\nlogs: {work}", file=sys.stderr)
        return 1
    print(table(runs))
    print(f"logs and lm_eval outputs: {work}", file=sys.stderr)
    if args.json is not None:
        import platform

        import lm_eval
        import torch
        import transformers

        report = {"date": time.strftime("%Y-%m-%d"),
                  "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                              "transformers": transformers.__version__, "lm_eval": lm_eval.__version__},
                  "settings": {k: (str(v) if isinstance(v, Path) else [str(x) for x in v] if isinstance(v, list)
                               else v) for k, v in vars(args).items()},
                  "answer_regex": ANSWER_REGEX, "runs": runs}
        write_json_atomic(args.json, report)  # a temporary file renamed into place
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
