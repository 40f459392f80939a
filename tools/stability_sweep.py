#!/usr/bin/env python
"""Run a stability sweep file (configs/paper/mixln_stability*.yaml): one tools/compare_norms.py LR sweep
per combination of its `grid`, each in OUT/<cell>/, then one table of every cell's LR sensitivity.

    python tools/stability_sweep.py configs/paper/mixln_stability_cpu.yaml --out runs/stability-cpu \
        [compare_norms options: --launcher slurm --parallel K ...] [pretraining flags: --data-path ...]

The file has three mappings: `grid` (flag -> list of values: the outer product makes the cells),
`compare_norms` (its options for every cell: positions, post-ln-fraction, seeds, lr-sweep, ...) and
`pretrain` (pretraining flags of every run). Flags after the file override the file's (argparse keeps
the last). Rerunning resumes: every cell is a resumable compare_norms sweep. Writes OUT/summary.md.
Exit code: the worst of the cells' (0 done or submitted, 1 unfinished, 2 bad input).
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def _flags(mapping: dict) -> list[str]:
    out = []
    for key, value in mapping.items():
        flag = "--" + str(key).replace("_", "-")
        if value is True:
            out.append(flag)
        elif value is not False and value is not None:
            out += [flag, str(value)]
    return out


def load_sweep_file(path: str) -> dict:
    """The YAML file -> {"grid": {flag: [values]}, "compare_norms": {...}, "pretrain": {...}}; SystemExit
    with one line naming the file and the key for anything else."""
    import yaml

    if not os.path.isfile(path):
        raise SystemExit(f"stability_sweep: error: {path}: no such file")
    with open(path) as fh:
        data = yaml.safe_load(fh) or {}
    unknown = set(data) - {"grid", "compare_norms", "pretrain"}
    if unknown:
        raise SystemExit(f"stability_sweep: error: {path}: unknown key(s) {', '.join(sorted(unknown))}; "
                         "allowed: grid, compare_norms, pretrain")
    grid = data.get("grid") or {}
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise SystemExit(f"stability_sweep: error: {path}: grid.{key} must be a non-empty list")
    if "lr-sweep" not in (data.get("compare_norms") or {}):
        raise SystemExit(f"stability_sweep: error: {path}: compare_norms.lr-sweep is required (the sweep measures "
                         "LR sensitivity)")
    return {"grid": grid, "compare_norms": data.get("compare_norms") or {}, "pretrain": data.get("pretrain") or {}}


def cells(grid: dict) -> list[tuple[str, dict]]:
    """(directory name, {flag: value}) per combination, e.g. ("lr-warmup-fraction0.01_clip-grad0", ...)."""
    keys = list(grid)
    out = []
    for combo in itertools.product(*(grid[k] for k in keys)):
        values = dict(zip(keys, combo))
        out.append(("_".join(f"{k}{v:g}" if isinstance(v, float) else f"{k}{v}" for k, v in values.items()) or "all",
                    values))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("sweep_file")
    p.add_argument("--out", required=True, help="one compare_norms sweep per grid cell goes in OUT/<cell>/")
    args, extra = p.parse_known_args(argv)
    spec = load_sweep_file(args.sweep_file)
    import importlib.util

    tool_spec = importlib.util.spec_from_file_location("compare_norms", os.path.join(REPO, "tools", "compare_norms.py"))
    compare_norms = importlib.util.module_from_spec(tool_spec)
    tool_spec.loader.exec_module(compare_norms)
    worst, summary = 0, []
    for name, values in cells(spec["grid"]):
        out = os.path.join(args.out, name)
        cmd = [*_flags(spec["compare_norms"]), "--out", out, *_flags(spec["pretrain"]), *_flags(values), *extra]
        print(f"[stability_sweep] cell {name}: tools/compare_norms.py {' '.join(cmd)}", flush=True)
        code = compare_norms.main(cmd)
        worst = max(worst, code)
        if code == 2:
            break
        summary.append((name, out))
    if "--dry-run" not in extra and worst != 2:
        write_summary(args.out, summary)
    return worst


def write_summary(out_dir: str, cells_done: list[tuple[str, str]]) -> None:
    """OUT/summary.md: the LR sensitivity S and the largest stable rate of every setting in every cell."""
    import json

    from megatron_mixln.data.fileio import atomic_write_text

    lines = ["# Stability sweep: LR sensitivity per cell", "",
             "S = E_η[min(ℓ(η), ℓ_0) − ℓ*] (Wortsman et al. 2023, arXiv 2309.14322); each cell's report.md has "
             "the losses per rate and the figures.", "", "| cell | setting | S | largest stable η |", "|---|---|---|---|"]
    for name, out in cells_done:
        path = os.path.join(out, "results.json")
        if not os.path.isfile(path):
            lines.append(f"| {name} | (not reported yet) | | |")
            continue
        with open(path) as fh:
            rows = json.load(fh).get("lr_sensitivity") or []
        for r in rows:
            stable = f"{r['largest_stable_lr']:g}" if r["largest_stable_lr"] is not None else "none"
            lines.append(f"| {name} | {r['setting']} | {r['sensitivity']:.4f} ± {r['sensitivity_std']:.4f} | {stable} |")
    os.makedirs(out_dir, exist_ok=True)
    atomic_write_text(os.path.join(out_dir, "summary.md"), "\n".join(lines) + "\n")
    print(f"[stability_sweep] wrote {os.path.join(out_dir, 'summary.md')}")


if __name__ == "__main__":
    sys.exit(main())
