#!/usr/bin/env python
"""Compare norm positions with one command: train every variant, analyse, report (logic: megatron_mixln/research/).

    python tools/compare_norms.py --positions pre,post,mix,deepnorm,lns,peri [--post-ln-fraction 0,0.25,0.5] \
        [--seeds 1,2,3] --out runs/compare-71m [--launcher local|slurm] [--parallel K] \
        --preset 71m --data-path D_train_text_document --valid-data-path D_valid_text_document --train-iters N ...

Every flag this tool does not know is a pretraining flag (python -m megatron_mixln.pretrain --help) and is
passed to every run unchanged; --config FILE too (the swept fields are taken out of it). Per variant
the sweep sets --norm-position, --post-ln-fraction or --post-ln-layers, --seed, --save and --run-dir.

Rerunning the same command skips finished runs, resumes interrupted ones (--load of their last
checkpoint; pass --save-interval so there is one) and rewrites the report. Writes into --out:
report.md, results.json, curves.png, grad_norm_profiles.png, angular_distance.png, layer_removal.png,
alpha.png (fraction sweeps), lr_sensitivity.png and diagnostics_profiles.png (--lr-sweep), runs/<variant>/
(metrics.jsonl, config.json, ckpt/, layers/, train.log) and tensorboard/<variant>/ (`tensorboard --logdir`).

--lr-sweep 3e-4,1e-3,3e-3 trains every variant at each peak LR (run names gain -lr<η>) and reports
Wortsman et al.'s LR sensitivity E_η[min(ℓ(η), ℓ_0) − ℓ*] per variant.
Exit codes: 0 all runs finished (diverged runs count as finished) or a Slurm array was submitted /
is still running; 1 some run failed or is unfinished; 2 bad input (before any training).
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--positions", required=True, help="comma-separated: pre, post, mix, peri, lns, deepnorm, deeppost")
    p.add_argument("--post-ln-fraction", default=None,
                   help="comma-separated post-layer fractions for the mix variants (the alpha sweep)")
    p.add_argument("--post-ln-layers", type=int, default=None, help="k of the mix variants without a fraction sweep")
    p.add_argument("--seeds", default="1234", help="comma-separated seeds (init and data order)")
    p.add_argument("--lr-sweep", default=None,
                   help="comma-separated peak learning rates: train every variant at each and report the LR "
                        "sensitivity (Wortsman et al. 2023, arXiv 2309.14322)")
    p.add_argument("--out", required=True, help="sweep directory")
    p.add_argument("--launcher", choices=("local", "slurm"), default="local")
    p.add_argument("--parallel", type=int, default=None, help="runs at a time (local: default 1; slurm: array %%K)")
    p.add_argument("--nproc-per-run", type=int, default=1, help="local: processes per run (torchrun --standalone)")
    p.add_argument("--sbatch-args", default="", help="slurm: extra sbatch options, e.g. '--nodes=1 --gpus-per-node=8'")
    p.add_argument("--divergence-factor", type=float, default=1.5,
                   help="verdict: diverged when the loss stays above this x its best (see research/collect.py)")
    p.add_argument("--skip-layer-analysis", action="store_true", help="no angular distance / layer removal")
    p.add_argument("--analysis-samples", type=int, default=64, help="validation samples for the layer analysis")
    p.add_argument("--dry-run", action="store_true", help="validate and print the runs' commands; write nothing")
    p.add_argument("--report-only", action="store_true", help="launch nothing; report on the runs there are")
    argv = list(sys.argv[1:] if argv is None else argv)
    for i, a in enumerate(argv[:-1]):  # "--sbatch-args --nodes=1": argparse takes a lone "--x" for a flag
        if a == "--sbatch-args":
            argv[i:i + 2] = [f"--sbatch-args={argv[i + 1]}"]
            break
    args, passthrough = p.parse_known_args(argv)
    if args.parallel is not None and args.parallel < 1:
        p.error("--parallel: must be >= 1")
    if args.nproc_per_run < 1 or args.analysis_samples < 1 or args.divergence_factor <= 1:
        p.error("--nproc-per-run and --analysis-samples must be >= 1, --divergence-factor > 1")
    return args, passthrough


def main(argv=None) -> int:
    from megatron_mixln.research import launch
    from megatron_mixln.research.sweep import SweepError, build_sweep, check_out_dir, validate, write_sweep_files

    argv = sys.argv[1:] if argv is None else argv
    args, passthrough = parse_args(argv)
    try:
        sweep = build_sweep(args.positions, args.post_ln_fraction, args.seeds, args.post_ln_layers, passthrough,
                            args.out, args.lr_sweep)
        common = validate(sweep)
        check_out_dir(sweep.out, common)
        if args.dry_run:
            for v in sweep.variants:
                if args.launcher == "slurm":
                    print(f"{v.name}: " + " ".join(f"{k}={shlex.quote(x)}" for k, x in launch.slurm_env(sweep, v).items()))
                else:
                    print(f"{v.name}: {shlex.join(launch.local_command(sweep, v, nproc=args.nproc_per_run))}")
            return 0
        write_sweep_files(sweep, common, [os.path.abspath(__file__), *argv])
        train_iters = common["training"]["train_iters"]
        states = {v.name: launch.run_state(sweep.run_dir(v), train_iters) for v in sweep.variants}
        todo = [v for v in sweep.variants if states[v.name] in ("new", "partial")]
        done = len(sweep.variants) - len(todo)
        resume = sum(states[v.name] == "partial" for v in todo)
        print(f"[compare_norms] {len(sweep.variants)} runs: {done} finished (skipped), {resume} to resume, "
              f"{len(todo) - resume} new")
        if todo and not args.report_only:
            if args.launcher == "slurm":
                active = launch.slurm_job_active(sweep.out)
                if active:
                    print(f"[compare_norms] job array {active} is still queued or running; rerun this command when "
                          "it has finished to write the report")
                    return 0
                job = launch.submit_slurm(sweep, todo, args.parallel, shlex.split(args.sbatch_args), REPO)
                print(f"[compare_norms] submitted job array {job} ({len(todo)} tasks); rerun this command when it "
                      "has finished to write the report")
                return 0
            launch.run_local(sweep, todo, args.parallel or 1, args.nproc_per_run, REPO)
    except SweepError as exc:
        print(f"compare_norms: error: {exc}", file=sys.stderr)
        return 2
    return report(sweep, common, args)


def report(sweep, common: dict, args) -> int:
    import json

    from megatron_mixln.research import launch
    from megatron_mixln.research.collect import collect_run
    from megatron_mixln.research.figures import write_figures
    from megatron_mixln.research.layers import analysis_data_prefix, analyze_run
    from megatron_mixln.research.report import label, ppl_cell, write_report

    train_iters = common["training"]["train_iters"]
    states = {v.name: launch.run_state(sweep.run_dir(v), train_iters) for v in sweep.variants}
    if not args.skip_layer_analysis:
        prefix = analysis_data_prefix(common["training"])
        for v in sweep.variants:
            if states[v.name] in ("finished", "diverged") and prefix:
                code = analyze_run(REPO, sweep.run_dir(v), prefix, common["model"]["seq_length"], args.analysis_samples,
                                   common["training"]["micro_batch_size"], v.seed)
                if code:
                    print(f"[compare_norms] layer analysis of {v.name} failed (exit {code}): see "
                          f"{sweep.run_dir(v)}/layers/analysis.log")
    runs = [collect_run(sweep.run_dir(v), v, states[v.name], args.divergence_factor) for v in sweep.variants]
    figures = write_figures(runs, sweep.out)
    with open(os.path.join(sweep.out, "sweep.json")) as fh:
        record = json.load(fh)
    res = write_report(sweep.out, record, runs, figures)
    for row in res["settings"]:
        div = ", diverged: " + ", ".join(f"seed {d['seed']} at step {d['step']}" for d in row["diverged"]) \
            if row["diverged"] else ""
        print(f"  {label(row):<24s} validation perplexity {ppl_cell(row)} ({len(row['ppl'])} seeds){div}")
    print(f"[compare_norms] wrote {sweep.out}/report.md, results.json and {len(figures)} figures")
    unfinished = [n for n, s in states.items() if s not in ("finished", "diverged")]
    if unfinished:
        print(f"[compare_norms] unfinished or failed runs: {', '.join(unfinished)} (see runs/<name>/train.log)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
