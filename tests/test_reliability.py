"""Bad input and interruptions the scripts meet in the field: an output path that cannot be written is refused
before any work; a tokenizer larger than the model's vocabulary is refused at load; Ctrl-C in the chat ends it
cleanly (exit 130, no traceback); a stopped training run exits 143 and says how to resume (tests/test_sft.py),
and a kill -9 then --resume logs each step once (tests/test_sft.py)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import compare
import evaluate
import rollout
from zeda.errors import ConfigError
from zeda.loading import load_for_inference
from zeda_toy.tiny import make_tiny_checkpoint
from zeda_toy.tokenizer import save_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("rel") / "tiny"
    make_tiny_checkpoint(path, vocab_size=104, eos_token_id=3, pad_token_id=0, max_position_embeddings=128)
    save_tokenizer(path)
    return path


def unwritable(tmp_path: Path) -> Path:
    """A path whose parent is a file: no user, root included, can write there."""
    (tmp_path / "a_file").write_text("x")
    return tmp_path / "a_file" / "out.json"


@pytest.mark.parametrize("main,argv", [
    (evaluate.main, ["--model", "{tiny}", "--n", "1", "--out", "{out}"]),
    (compare.main, ["--reference", "{tiny}", "--model", "{tiny}", "--n", "1", "--out", "{out}"]),
    (rollout.main, ["--teacher", "{tiny}", "--prompts", "{tiny}/config.json", "--out", "{out}"]),
])
def test_unwritable_output_is_refused_before_any_work(main, argv, tiny, tmp_path, capsys, monkeypatch):
    out = unwritable(tmp_path)
    calls = []
    monkeypatch.setattr("zeda.loading.load_model", lambda *a, **k: calls.append(a))  # must never be reached
    code = main([a.format(tiny=tiny, out=out) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and f"--out {out}: cannot write there" in err, err
    assert not calls


def test_unwritable_training_output_is_refused(tiny, tmp_path, capsys):
    import train_sft
    from zeda.conversion import convert_checkpoint

    convert_checkpoint(tiny, tmp_path / "student", num_zero=4, progress=False)
    rollouts = tmp_path / "r.jsonl"
    rollouts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": "1+1?"},
                                                         {"role": "assistant", "content": "2"}]}) + "\n"
                                for _ in range(4)))
    out = unwritable(tmp_path).parent / "run"
    code = train_sft.main(["--student", str(tmp_path / "student"), "--rollouts", str(rollouts), "--out", str(out),
                           "--global-batch-size", "2", "--micro-batch-size", "2", "--max-steps", "1"])
    assert code == 2 and f"--out {out}: cannot write there" in capsys.readouterr().err


def test_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path):
    make_tiny_checkpoint(tmp_path / "m", vocab_size=64, max_position_embeddings=128)  # the tokenizer has 101
    save_tokenizer(tmp_path / "m")
    with pytest.raises(ConfigError, match="tokenizer has 101 tokens but config.json's vocab_size is 64"):
        load_for_inference(tmp_path / "m", device="cpu")


def test_ctrl_c_in_the_chat_exits_130_without_a_traceback(tiny):
    # SIGINT back to its default in the child: a test run started in the background inherits it ignored, and
    # Python then installs no KeyboardInterrupt handler (Ctrl-C would do nothing, as it should under nohup)
    proc = subprocess.Popen([sys.executable, "serve.py", "--model", str(tiny), "--max-new-tokens", "4"], cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 120
        banner = ""
        while "Ctrl-D to quit" not in banner:  # the model is loaded and the chat waits for a line
            assert proc.poll() is None and time.time() < deadline
            banner += proc.stderr.readline()
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        # wait() before reading: communicate() would close stdin, and on a loaded machine the chat could read
        # that EOF (a clean exit 0) before the signal arrives
        proc.wait(timeout=60)
        out, err = proc.stdout.read(), proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    assert "Traceback" not in err and "KeyboardInterrupt" not in err


# ----------------------------------------------------------------------------------------------
# --resume from a damaged checkpoint, and a full disk: one line naming the file, exit 2, nothing half-written


@pytest.fixture(scope="module")
def sft_setup(tiny, tmp_path_factory):
    from zeda.conversion import convert_checkpoint

    root = tmp_path_factory.mktemp("resume")
    convert_checkpoint(tiny, root / "student", num_zero=4, progress=False)
    (root / "r.jsonl").write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"{i}+1?"},
                                                                  {"role": "assistant", "content": f"{i + 1}"}]})
                                          + "\n" for i in range(4)))
    return root


def sft_argv(root: Path, out: Path, *extra):
    return ["--student", str(root / "student"), "--rollouts", str(root / "r.jsonl"), "--out", str(out),
            "--global-batch-size", "2", "--micro-batch-size", "2", "--device", "cpu", *extra]


@pytest.mark.parametrize("damage", ["trainer_state.json", "optimizer.safetensors"])
def test_resume_from_a_damaged_checkpoint_names_the_file(sft_setup, tmp_path, capsys, damage):
    import train_sft

    out = tmp_path / "run"
    assert train_sft.main(sft_argv(sft_setup, out, "--max-steps", "2", "--save-every", "1")) == 0
    (out / "step-1" / damage).write_bytes(b"\x00not what it should be")
    capsys.readouterr()
    code = train_sft.main(sft_argv(sft_setup, out, "--max-steps", "3", "--resume"))
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and err.count("\n") == 1, err
    assert damage in err and str(out) in err


def test_a_full_disk_during_a_save_is_one_line_and_leaves_no_output(sft_setup, tmp_path, capsys, monkeypatch):
    import errno

    import train_sft
    import zeda.checkpoint as checkpoint

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", disk_full)
    out = tmp_path / "run"
    code = train_sft.main(sft_argv(sft_setup, out, "--max-steps", "1"))
    err = capsys.readouterr().err
    assert code == 2 and "No space left on device" in err and "Traceback" not in err
    assert not (out / "final").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary folder left behind
