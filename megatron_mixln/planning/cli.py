"""Command line of tools/estimate_memory.py: Megatron flag names -> (ModelConfig, Layout, ZeRO section)."""
from __future__ import annotations

import argparse

from megatron_mixln.cli import add_dataclass_args, given_fields
from megatron_mixln.model import PRESETS, ModelConfig
from megatron_mixln.planning.layout import Layout, LayoutError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python tools/estimate_memory.py",
        description="Per-GPU (and per-node CPU) memory of a training layout; says whether it fits and, if not, "
                    "the smallest change that would.", allow_abbrev=False)
    p.add_argument("--job-script", default=None,
                   help="take the defaults from a Slurm job script (its trainer flags and #SBATCH --nodes/"
                        "--gpus-per-node); flags given here override them")
    p.add_argument("--preset", choices=list(PRESETS), help="model shape; model flags override it")
    add_dataclass_args(p, ModelConfig, "model")
    c = p.add_argument_group("cluster")
    c.add_argument("--nodes", type=int, default=1)
    c.add_argument("--gpus-per-node", type=int, default=8)
    c.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU (A100/H100-80GB: 80)")
    c.add_argument("--cpu-memory-gib", type=float, default=None, help="host memory per node (checked with offload)")
    c.add_argument("--reserve-gib", type=float, default=2.0,
                   help="per-GPU headroom for the CUDA context, NCCL and allocator fragmentation (default: 2)")
    t = p.add_argument_group("training (the trainer's flags)")
    t.add_argument("--micro-batch-size", type=int, default=1)
    t.add_argument("--global-batch-size", type=int, default=None, help="sets the micro-batches in flight under PP")
    t.add_argument("--zero-stage", type=int, default=None, help="ZeRO stage (default: the --deepspeed-config's, else 0)")
    t.add_argument("--deepspeed-config", default=None, help="DeepSpeed JSON: stage, offload and bucket sizes")
    t.add_argument("--offload-optimizer", action=argparse.BooleanOptionalAction, default=False, help="ZeRO-Offload of the optimizer states to CPU")
    t.add_argument("--offload-param", action=argparse.BooleanOptionalAction, default=False, help="ZeRO-3 parameter offload to CPU")
    t.add_argument("--recompute-activations", action=argparse.BooleanOptionalAction, default=False)
    t.add_argument("--tensor-model-parallel-size", type=int, default=1)
    t.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    t.add_argument("--sequence-parallel", action=argparse.BooleanOptionalAction, default=False)
    t.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=False, help="bf16 mixed precision (else fp32)")
    return p


def _zero_section(path: str | None, flag_stage: int | None, hidden_size: int) -> dict:
    from megatron_mixln.training.config import UsageError
    from megatron_mixln.training.ds_config import fill_zero_auto, load_ds_json

    if path is None:
        return {"stage": flag_stage or 0}
    try:
        zero = dict(load_ds_json(path).get("zero_optimization") or {})
        fill_zero_auto(zero, hidden_size, f"--deepspeed-config {path}")
    except UsageError as exc:
        raise LayoutError(str(exc)) from None
    stage = zero.get("stage", 0)
    if flag_stage is not None and flag_stage != stage:
        raise LayoutError(f"--deepspeed-config {path}: \"zero_optimization.stage\" is {stage} but --zero-stage "
                          f"gives {flag_stage}; make them agree")
    zero["stage"] = stage
    return zero


def _offloaded(zero: dict, key: str) -> bool:
    return ((zero.get(key) or {}).get("device") or "none") != "none"


def _job_script_argv(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """The job script's flags this parser knows, then the allocation, then argv (later flags win)."""
    from megatron_mixln.planning.job_script import read_job_script

    first, _ = parser.parse_known_args(argv)
    if not first.job_script:
        return argv
    try:
        flags, alloc = read_job_script(first.job_script)
    except LayoutError as exc:
        parser.error(str(exc))
    known, _ = _known_flags(parser, flags)
    return known + ["--nodes", str(alloc["nodes"]), "--gpus-per-node", str(alloc["gpus_per_node"])] + argv


def _known_flags(parser: argparse.ArgumentParser, flags: list[str]) -> tuple[list[str], list[str]]:
    """Split a trainer command line into the flags (with their values) this parser has, and the rest."""
    actions = {opt: a for a in parser._actions for opt in a.option_strings}
    known, rest, i = [], [], 0
    while i < len(flags):
        action = actions.get(flags[i].split("=", 1)[0])
        if action is None or flags[i] in ("--job-script",):
            rest.append(flags[i])
            i += 1
            continue
        n = 0 if action.nargs == 0 or "=" in flags[i] else 1
        known += flags[i:i + 1 + n]
        i += 1 + n
    return known, rest


def parse(argv=None) -> tuple[ModelConfig, Layout, dict, argparse.Namespace]:
    import sys

    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(_job_script_argv(argv, parser))
    given = given_fields(args, ModelConfig)
    try:
        model = ModelConfig.from_preset(args.preset, **given) if args.preset else ModelConfig(**given)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        zero = _zero_section(args.deepspeed_config, args.zero_stage, model.hidden_size)
    except LayoutError as exc:
        parser.error(str(exc))
    impl = model.norm_impl if model.norm_impl != "auto" else "triton"  # auto runs Triton on CUDA
    layout = Layout(
        nodes=args.nodes, gpus_per_node=args.gpus_per_node,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size, sequence_parallel=args.sequence_parallel,
        zero_stage=zero["stage"], offload_optimizer=args.offload_optimizer or _offloaded(zero, "offload_optimizer"),
        offload_param=args.offload_param or _offloaded(zero, "offload_param"),
        micro_batch_size=args.micro_batch_size, seq_length=model.seq_length, bf16=args.bf16,
        recompute_activations=args.recompute_activations, norm_impl=impl)
    return model, layout, zero, args
