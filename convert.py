"""Static HF MoE checkpoint -> dynamic ZEDA checkpoint with zero experts (docs/method.md §1).

    python convert.py --input-dir Qwen3-30B-A3B --output-dir Qwen3-30B-A3B-zeda --new-num-experts 192
    python convert.py --input-dir assets/qwen3_moe_teacher --output-dir /tmp/student --num-zero-experts 8

Every router grows from N to N + Z outputs (GLM's MTP layer's too): the N original rows are copied bit for bit,
the Z new ones sampled from the statistics of the originals; every other tensor is copied byte-identical and
config.json gains zce_nums / zce_types / use_zce_mask. Streams one shard at a time and writes atomically. The
conversion itself is zeda.conversion.convert_checkpoint; this script is its command line.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from zeda.conversion import ConversionStopped, convert_checkpoint
from zeda.errors import ZedaError
from zeda.flags import int_range


def main(argv=None, normalization: str = "zeda") -> int:
    """normalization "adamoe": the AdaMoE baseline's checkpoint (experiments/variant.py --normalization adamoe)."""
    p = argparse.ArgumentParser(prog="convert.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--input-dir", required=True, type=Path, help="static HF checkpoint folder (never modified)")
    p.add_argument("--output-dir", required=True, type=Path, help="where the dynamic checkpoint is written")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--new-num-experts", type=int_range(min=2),
                       help="router outputs after conversion, N + Z (authors' flag)")
    group.add_argument("--num-zero-experts", type=int_range(min=1), help="number of zero experts Z to add")
    p.add_argument("--seed", type=int_range(min=0), default=0, help="seed for the new router rows (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    args = p.parse_args(argv)
    # SIGTERM and Ctrl-C only mark the stop; the conversion stops at its next shard and removes its temporary
    # folder (zeda/conversion.py:convert_checkpoint, stop_requested).
    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        s = convert_checkpoint(args.input_dir, args.output_dir, args.num_zero_experts, args.new_num_experts,
                               args.seed, args.overwrite, normalization=normalization,
                               stop_requested=lambda: stop["signal"])
    except (ZedaError, OSError) as e:
        print(f"convert.py: error: {e}", file=sys.stderr)
        return 2
    except ConversionStopped as e:
        print(f"\nconvert.py: {e}; nothing was written", file=sys.stderr)
        return 128 + e.signum
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    mtp = f", {s['mtp_tensors_changed']} of them in the MTP layer" if s["mtp_tensors_changed"] else ""
    print(f"converted {s['model_type']} {s['input_dir']} -> {s['output_dir']}")
    print(f"  experts: {s['real_experts']} real -> {s['real_experts']} real + {s['zero_experts']} zero "
          f"({s['router_outputs_before']} -> {s['router_outputs_after']} router outputs), top-k {s['top_k']} kept")
    print(f"  tensors changed: {s['tensors_changed']} (router weights and correction biases{mtp}); every other "
          f"tensor copied byte-identical from {s['shards']} shard(s)")
    print(f"  files copied: {', '.join(s['files_copied']) or 'none'}")
    print(f"  seed {s['seed']}, {s['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
