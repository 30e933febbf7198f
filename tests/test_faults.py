"""Faults outside the happy path, each ending cleanly: outputs that are not files (a FIFO, a device, a link to
one) refused before any work, links to files written through, modes that follow the umask, a really full
filesystem at a save or at a final report (the result printed, nothing half-written), and Ctrl-C during a model
load (one line, exit 130, no traceback) in every script that loads a model."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import ROOT
from zeda.checkpoint import save_checkpoint
from zeda.data import append_jsonl, check_writable, write_text_atomic
from zeda.errors import DataError, ZedaError
from zeda.loading import load_model

TEACHER = ROOT / "assets" / "qwen3_moe_teacher"
PYTHON = sys.executable


def run(*argv: str, cwd=ROOT, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, *argv], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def error_lines(stderr: str) -> list[str]:
    """stderr without progress bars and third-party import noise (torchao's optional kernels warn on CPU)."""
    return [line for line in stderr.replace("\r", "\n").splitlines()
            if line.strip() and "%|" not in line and "torchao" not in line and "_pytree" not in line
            and "Enum" not in line]


# --- outputs that are not files ---------------------------------------------------------------------------------

def special_paths(tmp_path: Path) -> dict[str, Path]:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    sock_path = tmp_path / "sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sock_path))
    sock.close()  # the socket file stays
    link_to_fifo = tmp_path / "link-to-fifo"
    link_to_fifo.symlink_to(fifo)
    link_to_device = tmp_path / "stdout"  # as /dev/stdout is, on a terminal
    link_to_device.symlink_to("/dev/null")
    return {"a FIFO": fifo, "a socket": sock_path, "a device": Path("/dev/null"), "link": link_to_fifo,
            "device link": link_to_device}


def test_writers_refuse_a_fifo_a_device_a_socket_and_links_to_them(tmp_path):
    for name, path in special_paths(tmp_path).items():
        before = os.stat(path).st_mode
        for write in (lambda: write_text_atomic(path, "x"), lambda: append_jsonl(path, {"a": 1}),
                      lambda: check_writable(path, "--out")):
            with pytest.raises(DataError, match="not a file") as e:
                write()
            if name in ("a FIFO", "a socket", "a device"):
                assert name in str(e.value)
        assert os.stat(path).st_mode == before  # still what it was, not replaced by a regular file
        assert not stat.S_ISREG(os.stat(path).st_mode)


def test_a_script_refuses_a_fifo_as_out_before_loading_anything(tmp_path):
    fifo = tmp_path / "report.json"
    os.mkfifo(fifo)
    r = run("evaluate.py", "--model", str(TEACHER), "--tasks", "math", "--n", "1", "--out", str(fifo))
    assert r.returncode == 2, r.stderr
    lines = error_lines(r.stderr)
    assert len(lines) == 1 and "FIFO" in lines[0] and str(fifo) in lines[0]
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_a_link_to_a_file_is_written_through(tmp_path):
    target = tmp_path / "reports" / "real.json"
    target.parent.mkdir()
    target.write_text("old")
    link = tmp_path / "latest.json"
    link.symlink_to(target)
    write_text_atomic(link, "{\"b\": 0}\n")
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_text() == "{\"b\": 0}\n"
    append_jsonl(link, {"a": 1})
    assert link.is_symlink() and target.read_text() == "{\"b\": 0}\n{\"a\": 1}\n"


def test_written_files_follow_the_umask_and_keep_an_existing_mode(tmp_path):
    old = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "report.json", "{}")
        assert stat.S_IMODE(os.stat(tmp_path / "report.json").st_mode) == 0o644  # not tempfile's 0600
        private = tmp_path / "private.json"
        private.write_text("{}")
        private.chmod(0o600)
        write_text_atomic(private, "{}")
        assert stat.S_IMODE(os.stat(private).st_mode) == 0o600  # a rewrite keeps what the user chose
        os.umask(0o027)
        write_text_atomic(tmp_path / "group.json", "{}")
        assert stat.S_IMODE(os.stat(tmp_path / "group.json").st_mode) == 0o640
        os.umask(0o022)
        model = load_model(TEACHER, device="cpu", dtype="float32")
        save_checkpoint(model, tmp_path / "ckpt", copy_from=TEACHER)
        modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in (tmp_path / "ckpt").iterdir()}
        assert set(modes.values()) == {0o644}, modes
    finally:
        os.umask(old)


# --- a really full filesystem -------------------------------------------------------------------------------------

@contextmanager
def small_filesystem(tmp_path: Path, size: str):
    """A tmpfs of `size` mounted at tmp_path/fs: a real ENOSPC from the kernel, as safetensors and json see it."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    where = tmp_path / "fs"
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(folder: Path) -> None:
    """Use up every byte of the filesystem (files can still be created empty: tmpfs counts blocks)."""
    with open(folder / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 16))
                f.flush()
        except OSError:
            pass


def test_a_full_disk_at_a_checkpoint_save_is_an_oserror_and_leaves_nothing(tmp_path):
    model = load_model(TEACHER, device="cpu", dtype="float32")
    with small_filesystem(tmp_path, "1m") as fs:
        with pytest.raises(OSError, match="No space left"):  # safetensors' own SafetensorError, as an OSError
            save_checkpoint(model, fs / "step-1", copy_from=TEACHER)
        assert list(fs.iterdir()) == []


def test_convert_onto_a_full_disk_is_one_line_and_leaves_nothing(tmp_path):
    with small_filesystem(tmp_path, "1m") as fs:
        r = run("convert.py", "--input-dir", str(TEACHER), "--output-dir", str(fs / "student"),
                "--num-zero-experts", "4")
        assert r.returncode == 2, r.stderr
        lines = error_lines(r.stderr)
        assert len(lines) == 1 and "No space left" in lines[0], r.stderr
        assert list(fs.iterdir()) == []


def test_a_full_disk_at_the_final_report_prints_the_report(tmp_path):
    with small_filesystem(tmp_path, "256k") as fs:
        fill(fs)
        out = fs / "report.json"
        r = run("evaluate.py", "--model", str(TEACHER), "--tasks", "math", "--n", "2", "--max-new-tokens", "8",
                "--no-progress", "--out", str(out))
        assert r.returncode == 2, r.stderr
        lines = error_lines(r.stderr)
        assert len(lines) == 1 and "No space left" in lines[0] and str(out) in lines[0], r.stderr
        assert not out.exists() and sorted(p.name for p in fs.iterdir()) == ["filler"]  # no temp file left
        report = json.loads(r.stdout[r.stdout.index("\n{") + 1:])  # the summary table, then the report itself
        assert report["n_per_family"] == 2 and "math" in report["accuracy"]


# --- Ctrl-C while a model loads ---------------------------------------------------------------------------------------

# Each script runs with a load_weights that announces itself and waits: the interrupt lands inside the model load.
SLOW_LOAD = """
import os, runpy, sys, time
import zeda.loading
real = zeda.loading.load_weights
def slow_load_weights(model, folder):
    print("LOADING", file=sys.stderr, flush=True)
    time.sleep(60)
    return real(model, folder)
zeda.loading.load_weights = slow_load_weights
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))  # as `python script.py` would
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_ctrl_c_during_a_model_load_is_one_line_and_exit_130(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "2+2="}) + "\n")
    scripts = {
        "evaluate.py": ["--model", str(TEACHER), "--tasks", "math", "--n", "1"],
        "rollout.py": ["--teacher", str(TEACHER), "--prompts", str(prompts), "--out", str(tmp_path / "r.jsonl")],
        "experiments/compare.py": ["--reference", str(TEACHER), "--model", str(TEACHER), "--n", "1"],
        "experiments/compute_use.py": ["--student", str(TEACHER), "--teacher", str(TEACHER), "--n", "1"],
        "serve.py": ["--model", str(TEACHER), "--prompt", "hi"],
    }
    procs = {}
    for script, argv in scripts.items():  # all at once: each spends most of its time importing torch
        procs[script] = subprocess.Popen([PYTHON, "-c", SLOW_LOAD, script, *argv], cwd=ROOT, text=True,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         # a suite run in the background starts children with SIGINT ignored
                                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for script, p in procs.items():
            deadline = time.time() + 120
            seen = ""
            while "LOADING" not in seen and time.time() < deadline and p.poll() is None:
                seen += p.stderr.readline()
            assert "LOADING" in seen, f"{script} never reached its model load: {seen}"
            p.send_signal(signal.SIGINT)
        for script, p in procs.items():
            _, err = p.communicate(timeout=60)
            lines = error_lines(err)
            assert p.returncode == 130, (script, err)
            assert "Traceback" not in err and len(lines) == 1 and "interrupted" in lines[0], (script, err)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()


# --- models checked for what they are ---------------------------------------------------------------------------------

def test_compare_and_compute_use_refuse_a_tokenizer_with_other_ids(tmp_path):
    """Same size, other ids (two tokens swapped in tokenizer.json): refused before any weight is read."""
    import compare
    import compute_use
    permuted = tmp_path / "permuted"
    shutil.copytree(TEACHER, permuted)
    tok = json.loads((permuted / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[20:22]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (permuted / "tokenizer.json").write_text(json.dumps(tok))
    for main, argv in ((compare.main, ["--reference", str(TEACHER), "--model", str(permuted), "--n", "1"]),
                       (compute_use.main, ["--student", str(TEACHER), "--teacher", str(permuted), "--n", "1"])):
        assert main(argv) == 2
    r = run("experiments/compare.py", "--reference", str(TEACHER), "--model", str(permuted), "--n", "1")
    lines = error_lines(r.stderr)
    assert r.returncode == 2 and len(lines) == 1 and f"{permuted}: its tokenizer is not the reference's" in lines[0]


def test_weights_that_cannot_fit_are_refused_before_anything_is_allocated(tmp_path):
    """A config with a typo'd size (here a vocabulary of 2^34 tokens: 4 TiB of embeddings) is refused by name in
    a second, not after a failed multi-GB allocation."""
    big = tmp_path / "big"
    shutil.copytree(TEACHER, big)
    hf = json.loads((big / "config.json").read_text())
    (big / "config.json").write_text(json.dumps(hf | {"vocab_size": 2**34}))
    with pytest.raises(ZedaError, match=r"the weights need \d+\.\d GiB on cpu but .* GiB is free"):
        load_model(big, device="cpu", dtype="float32")
    r = run("evaluate.py", "--model", str(big), "--tasks", "math", "--n", "1")
    lines = error_lines(r.stderr)
    assert r.returncode == 2 and len(lines) == 1 and f"{big}: the weights need" in lines[0], r.stderr
