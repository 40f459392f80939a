"""Which directory to pass: a one-line hint when `convert_to_hf.py --checkpoint` gets a directory that holds
a checkpoint in the wrong place (an HF export, one checkpoint tag, a compare_norms output)."""
from __future__ import annotations

import os

from megatron_mixln.checkpoint.layout import LATEST, hf_model_type, is_tag_dir


def checkpoint_directory_hint(path: str) -> str | None:
    """A message naming the directory to pass instead, or None when `path` may be a checkpoint directory
    (a training --save directory or a plain converted one). Reads only file names and small JSON files."""
    if not os.path.isdir(path):
        return None
    if hf_model_type(path) is not None:
        return (f"--checkpoint {path} is a Hugging Face export already (config.json has model_type): load it "
                f"with transformers' from_pretrained, or pass the training --save directory it was made from")
    if is_tag_dir(path):
        parent, tag = os.path.split(os.path.normpath(path))
        return (f"--checkpoint {path} is one checkpoint tag: pass the --save directory that holds it, "
                f"--checkpoint {parent or '.'} --tag {tag}")
    runs = os.path.join(path, "runs")
    if os.path.isfile(os.path.join(path, "sweep.json")) and os.path.isdir(runs):
        names = sorted(n for n in os.listdir(runs) if os.path.isdir(os.path.join(runs, n)))
        listed = ", ".join(_save_dir(os.path.join(runs, n)) for n in names) or f"{runs}/<variant>/ckpt"
        return f"--checkpoint {path} is a compare_norms output: pass one of its runs' checkpoints: {listed}"
    if not os.path.isfile(os.path.join(path, LATEST)) and _save_dir(path) != path:
        return f"--checkpoint {path} holds no checkpoint itself: pass its --save directory {_save_dir(path)}"
    return None


def _save_dir(run_dir: str) -> str:
    """The subdirectory of a run directory that holds `latest` (compare_norms: <run>/ckpt), else run_dir."""
    subdirs = sorted(n for n in os.listdir(run_dir) if os.path.isfile(os.path.join(run_dir, n, LATEST)))
    return os.path.join(run_dir, subdirs[0]) if len(subdirs) == 1 else run_dir
