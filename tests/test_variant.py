"""experiments/variant.py: baselines and ablations run through the user's scripts with one piece swapped
(zeda/trainer.py:Swaps), while the scripts themselves carry the method alone."""

import json

import pytest
import torch

import train_sft
import variant
from conftest import tiny_sft_setup
from zeda.config import ModelConfig
from zeda.losses import auxiliary_loss, load_balancing_loss
from zeda.moe import Router


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_sft_setup(tmp_path_factory.mktemp("variant"))


def sft_argv(d, out, *extra):
    return ["--student", str(d / "student"), "--rollouts", str(d / "r.jsonl"), "--out", str(out),
            "--global-batch-size", "2", "--micro-batch-size", "2", "--device", "cpu", "--keep-unfinished", *extra]


@pytest.mark.parametrize("argv, words", [
    (["--loss", "full-reverse-kl", "train_sft.py"], "--loss does not apply to train_sft.py"),
    (["--routing", "topk:1", "train_opd.py"], "--routing does not apply to train_opd.py"),
    (["--aux-loss", "switch", "convert.py"], "--aux-loss does not apply to convert.py"),
    (["--normalization", "adamoe", "train_sft.py"], "--normalization does not apply to train_sft.py"),
    (["--loss", "full-reverse-kl", "train_opd.py", "--teacher-url", "http://127.0.0.1:1"],
     "needs the teacher's logits over the whole vocabulary"),
    (["rollout.py"], "invalid choice: 'rollout.py'"),
])
def test_refuses_a_swap_its_script_has_no_piece_for(argv, words, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        variant.main([*argv, "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and words in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_the_user_scripts_have_no_baseline_flags(capsys):
    """The stage scripts read as the method: the baselines' flags are variant.py's alone."""
    for main, flag in ((train_sft.main, "--routing"), (train_sft.main, "--aux-loss")):
        with pytest.raises(SystemExit):
            main(["--help"])
        assert flag not in capsys.readouterr().out


def test_switch_loss_is_adamoes_balance_loss_over_all_outputs(setup):
    """The swapped routing loss is alpha x the Switch loss over all N + Z outputs, not the Group Auxiliary Loss."""
    cfg = ModelConfig.from_hf_config(setup / "student")
    torch.manual_seed(0)
    router = Router(cfg)
    torch.nn.init.normal_(router.weight, std=1.0)
    x = torch.randn(64, cfg.hidden_size)
    r = router(x)
    routing, valid = [r, r], torch.ones(64, dtype=torch.bool)
    swapped = variant.switch_loss(routing, cfg, valid, alpha=0.3, w=2.0)
    assert swapped.item() == pytest.approx(0.3 * load_balancing_loss(routing, cfg.num_router_outputs, valid,
                                                                     cfg.router_scoring).item())
    assert swapped.item() != pytest.approx(auxiliary_loss(routing, cfg, valid, alpha=0.3, w=2.0).item())


def test_a_swapped_run_is_recorded_and_not_resumed_as_another(setup, tmp_path, capsys):
    out = tmp_path / "run"
    assert variant.main(["--aux-loss", "switch", "train_sft.py",
                         *sft_argv(setup, out, "--max-steps", "2", "--save-every", "1")]) == 0
    state = json.loads((out / "step-1" / "trainer_state.json").read_text())
    assert state["args"]["variant"] == "--aux-loss switch"
    capsys.readouterr()
    code = train_sft.main(sft_argv(setup, out, "--max-steps", "3", "--resume"))
    assert code == 2 and "--variant --aux-loss switch -> zeda" in capsys.readouterr().err
    assert variant.main(["--aux-loss", "switch", "train_sft.py", *sft_argv(setup, out, "--max-steps", "3",
                                                                           "--resume")]) == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
