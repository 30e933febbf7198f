"""bench/fused_gate_up.py compares like with like: the fused [N, 2I, H] layout computes the separate layout's output
and gradients (the fused weight's gradient is the gate and up gradients stacked), and the script runs."""

from __future__ import annotations

import torch

from bench import fused_gate_up


def test_fused_layout_has_the_separate_layouts_output_and_gradients():
    N, H, I, per_expert = 4, 32, 16, 3
    g = torch.Generator().manual_seed(0)
    gate, up = torch.randn(N, I, H, generator=g), torch.randn(N, I, H, generator=g)
    down = torch.randn(N, H, I, generator=g)
    gate_up = torch.cat([gate, up], dim=1).requires_grad_()
    for t in (gate, up, down):
        t.requires_grad_()
    offs = torch.full((N,), per_expert, dtype=torch.long).cumsum(0).to(torch.int32)
    x = torch.randn(N * per_expert, H, generator=g)
    dy = torch.randn(N * per_expert, H, generator=g)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_sep = fused_gate_up.swiglu_separate(x1, offs, gate, up, down)
    y_sep.backward(dy)
    down_sep = down.grad.clone()
    down.grad = None
    y_fused = fused_gate_up.swiglu_fused(x2, offs, gate_up, down)
    y_fused.backward(dy)
    torch.testing.assert_close(y_fused, y_sep)
    torch.testing.assert_close(x2.grad, x1.grad)
    torch.testing.assert_close(gate_up.grad, torch.cat([gate.grad, up.grad], dim=1))
    torch.testing.assert_close(down.grad, down_sep)


def test_the_script_prints_a_row_per_slot_count(capsys):
    fused_gate_up.main(["--experts", "4", "--hidden", "32", "--intermediate", "16", "--slots", "16", "8",
                        "--threads", "1", "--repeats", "2"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [row.split(" | ")[0] for row in rows] == ["| 16", "| 8"]
