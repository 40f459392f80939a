"""Whether a Hugging Face directory's custom code is this project's own exported modeling code (the only
code `trust_remote_code=True` may run)."""
from __future__ import annotations

import json
import os

REMOTE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "remote")
REMOTE_FILES = ("configuration_mixln_llama.py", "modeling_mixln_llama.py")


def _auto_maps(hf_dir: str) -> list[str]:
    """Every class reference of config.json's and tokenizer_config.json's auto_map ("module.Class")."""
    refs = []
    for name in ("config.json", "tokenizer_config.json"):
        path = os.path.join(hf_dir, name)
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                auto_map = json.load(f).get("auto_map") or {}
        except (OSError, ValueError, AttributeError):
            continue
        values = auto_map.values() if isinstance(auto_map, dict) else [auto_map]
        for value in values:
            refs += [v for v in (value if isinstance(value, (list, tuple)) else [value]) if v]
    return refs


def remote_code_verdict(hf_dir: str) -> tuple[bool, str | None]:
    """(trust_remote_code, reason). True only when the directory's auto_map names nothing but this
    project's modeling/configuration modules and those files equal (byte for byte) the ones this
    version exports; False with a one-line reason when it names other code; (False, None) when it needs
    no custom code."""
    refs = _auto_maps(hf_dir)
    if not refs:
        return False, None
    modules = {ref.rsplit(".", 1)[0] for ref in refs}
    foreign = sorted(m for m in modules if "--" in m or m + ".py" not in REMOTE_FILES)
    if foreign:
        return False, f"{hf_dir}: auto_map names code this project did not write ({', '.join(foreign)})"
    for module in sorted(modules):
        name = module + ".py"
        try:
            with open(os.path.join(hf_dir, name), "rb") as f:
                theirs = f.read()
        except OSError:
            return False, f"{hf_dir}: auto_map names {name}, which the directory lacks"
        with open(os.path.join(REMOTE_DIR, name), "rb") as f:
            if theirs != f.read():
                return False, (f"{hf_dir}: {name} differs from the one this version of megatron-mixln exports "
                               "(re-export the model, or load it yourself if you trust that code)")
    return True, None
