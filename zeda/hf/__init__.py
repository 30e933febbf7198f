"""Dynamic zeda checkpoints that load in plain transformers (`trust_remote_code=True`).

    from zeda.hf import write_remote_code
    hf = write_remote_code(folder, hf)   # copies modeling_zeda.py into folder, returns hf with `auto_map` added

modeling_zeda.py is the one file a checkpoint needs besides its weights and config.json: it imports only torch
and transformers, so the checkpoint loads where zeda is not installed (docs/usage.md, "Loading zeda checkpoints
in transformers"). A static checkpoint (Z = 0) loads with transformers' own classes and gets nothing.
"""

from __future__ import annotations

import shutil
from pathlib import Path

MODELING_FILE = Path(__file__).with_name("modeling_zeda.py")
# config.json model_type -> the classes modeling_zeda.py defines for it (the authors' architecture names)
AUTO_MAP = {
    "qwen3_moe": {"AutoConfig": "modeling_zeda.Qwen3MoePlusPlusConfig",
                  "AutoModelForCausalLM": "modeling_zeda.Qwen3MoePlusPlusForCausalLM"},
    "glm4_moe_lite": {"AutoConfig": "modeling_zeda.Glm4MoeLitePlusPlusConfig",
                      "AutoModelForCausalLM": "modeling_zeda.Glm4MoeLitePlusPlusForCausalLM"},
}


def write_remote_code(folder: str | Path, hf: dict) -> dict:
    """For a dynamic checkpoint (config.json `zce_nums` set): copy modeling_zeda.py into `folder` and return the
    config dict `hf` with `auto_map` naming its classes. Any other config is returned unchanged, nothing copied.

    The caller writes the returned dict as config.json (so the file is written once, atomically with the rest)."""
    if not sum(hf.get("zce_nums") or []) or hf.get("model_type") not in AUTO_MAP:
        return hf
    shutil.copyfile(MODELING_FILE, Path(folder) / MODELING_FILE.name)
    return {**hf, "auto_map": AUTO_MAP[hf["model_type"]]}
