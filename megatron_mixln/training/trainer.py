"""The training loop: `setup_run` builds a run once, `train_loop` steps it, `train_step` is one step.

    pretrain(model_config, cfg) -> setup_run(...) -> Run -> train_loop(run) -> RunSummary
    train_loop: run_step -> record_step -> handle_spike -> maybe_log -> maybe_evaluate -> stop_reason -> maybe_save

A step = `gradient_accumulation_steps` micro-batches per data-parallel rank, then one optimizer
update at the LR of that step. The reported loss is the mean over the whole global batch.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from itertools import islice

import torch
import torch.distributed as dist

from megatron_mixln.diagnostics import flatten_grad_norms, layer_grad_norms
from megatron_mixln.model import ModelConfig
from megatron_mixln.checkpoint.compat import check_resume_layout
from megatron_mixln.checkpoint.layout import write_latest
from megatron_mixln.checkpoint.load import fallback_warning, inspect_checkpoint, load_checkpoint
from megatron_mixln.checkpoint.meta import TrainState
from megatron_mixln.checkpoint.rng import seed_everything
from megatron_mixln.checkpoint.save import save_checkpoint
from megatron_mixln.errors import UsageError
from megatron_mixln.training.config import TrainingConfig
from megatron_mixln.training.arguments import check_writable
from megatron_mixln.training.data import (build_datasets, check_data_path, eval_token_budgets, micro_batches,
                                          validation_batches)
from megatron_mixln.training.data_fingerprint import check_data_fingerprint, data_fingerprint
from megatron_mixln.training.diagnostics import finish_probe, start_probe
from megatron_mixln.training.distributed import (
    barrier, data_parallel_group, data_parallel_rank_and_size, init_distributed, is_rank0, setup_model_parallel,
)
from megatron_mixln.training.ds_config import build_ds_config, zero_stage_of
from megatron_mixln.training.deepspeed_patches import before_model_step
from megatron_mixln.training.evaluate import evaluate, is_pipeline_engine
from megatron_mixln.training.flops import default_peak_tflops, flops_per_token, memory_gib
from megatron_mixln.training.loss import (make_token_loss_fn, make_z_loss_fn, masked_sum_and_count, mean_loss,
                                          split_batch)
from megatron_mixln.training.metrics import MetricsLogger, format_train_line, paper_modes
from megatron_mixln.training.model_setup import (build_model_and_optimizer, compile_loss, compiled_block_count,
                                                 compiled_graph_count)
from megatron_mixln.training.param_groups import describe_param_groups, param_group_counts
from megatron_mixln.training.rollback import RollbackMonitor, drop_abandoned, verified_rollback_target
from megatron_mixln.training.schedule import check_resumed_schedule, lr_at, set_lr
from megatron_mixln.training.signals import PREEMPTION_SIGNALS, PreemptionFlag
from megatron_mixln.training.stability import SpikeDetector, StepGuard
from megatron_mixln.training.startup_checks import check_startup_layout
from megatron_mixln.training.watchdog import STARTUP_MIN_S, HangWatchdog, grace_seconds, resolve_hang_timeout


STOP_SIGNAL_NAMES = tuple(sig.name for sig in PREEMPTION_SIGNALS)


@dataclass
class StepResult:
    loss: float  # mean NLL over the global batch
    grad_norm: float | None  # global gradient norm before clipping
    applied: bool  # False: non-finite gradients, update skipped
    stop_requested: bool  # some rank got a stop signal (SIGTERM, SIGUSR1, SIGINT)
    layer_norms: list[dict] | None  # per-layer gradient norms, when asked for
    time_up: bool = False  # some rank is past --exit-duration-in-mins
    tokens: int = 0  # target tokens of the global batch that counted (padding excluded)
    diagnostics: dict | None = None  # --diagnostics-interval's probe of this step (training.diagnostics)
    stop_signal: str | None = None  # which one (any rank's: every rank names the same one)
    z_loss: float | None = None  # mean z-loss over the global batch (--z-loss-weight), not part of `loss`


def _grad_getter(engine, state=None):
    """Where full (averaged) gradients live between the last backward and the step."""
    if engine.zero_optimization_stage() == 0 and not engine.bfloat16_enabled():
        getter = lambda p: p.grad  # noqa: E731
    else:
        from deepspeed.utils import safe_get_full_grad

        getter = safe_get_full_grad  # ZeRO-1/2/3 partitions and bf16 fp32 buffers; collective, all ranks call it
    if state is not None and state.tp_size > 1:
        from megatron_mixln.parallel import tensor_parallel_grad_getter

        getter = tensor_parallel_grad_getter(state, getter)  # TP shards gathered: TP=1's per-layer norms
    return getter


def _plain_grad_norm(engine, state=None) -> float:
    """ZeRO-0 fp32: DeepSpeed does not keep the norm, and every rank holds the full averaged grads
    (of its TP shard / pipeline stage: those pieces are summed over the model-parallel group)."""
    from megatron_mixln.parallel import global_grad_norm

    return global_grad_norm(engine.module, state)


def train_step(engine, batches, lr: float, guard: StepGuard, token_loss_fn, stop_requested,
               want_layer_norms: bool, state=None, time_up=lambda: False, pad_id: int = 0,
               z_loss_fn=None) -> StepResult:
    """One optimizer step over `gradient_accumulation_steps` micro-batches of `batches` (each [micro_batch,
    seq_length + 1] token ids), at learning rate `lr`. `stop_requested()` (the name of a stop signal this
    rank received, or None) is read after this rank's compute, right before the all_reduce, so a signal that
    arrives during the step stops the run after this step, not after the next one; the all_reduce carries
    one count per signal, so every rank (rank 0's log line included) names the signal whichever rank
    received it. `time_up()` (past --exit-duration-in-mins on this rank's clock) rides on the same
    all_reduce, so every rank stops after the same step. `z_loss_fn` (--z-loss-weight): the z-loss is trained
    with the NLL and reported apart from it."""
    # ZeRO-0 fp32: DeepSpeed keeps no norm. With clipping, the global clip (deepspeed_patches) measures it
    # (and get_global_grad_norm returns it); without, it is measured here, between backward and step.
    measure_norm = (engine.zero_optimization_stage() == 0 and not engine.bfloat16_enabled()
                    and not engine.gradient_clipping())
    half = _pipeline_step if is_pipeline_engine(engine) else _plain_step
    local_loss, local_tokens, layer_norms, grad_norm, z = half(engine, batches, lr, guard, token_loss_fn,
                                                               want_layer_norms, measure_norm, state, pad_id, z_loss_fn)
    if grad_norm is None:
        norm = engine.get_global_grad_norm()
        grad_norm = None if norm is None else float(norm)
    return _reduce_step(engine, local_loss, local_tokens, grad_norm, guard, layer_norms, stop_requested, time_up,
                        state, z)


def _pipeline_step(engine, batches, lr, guard, token_loss_fn, want_layer_norms, measure_norm, state, pad_id,
                   z_loss_fn=None):
    """DeepSpeed's 1F1B engine runs all micro-batches, backward and the step itself; its loss is already
    averaged over data-parallel ranks. -> (loss, target tokens, per-layer norms, grad norm, z) of this rank,
    z = None or (mean z-loss, 1 if this rank's z counts: the last stage's only)."""
    device = torch.device(engine.device)
    ga = engine.gradient_accumulation_steps()
    set_lr(engine.optimizer, lr)
    guard.arm()
    data = ((b[:, :-1].to(device), b[:, 1:].to(device)) for b in islice(batches, ga))
    collected, norms = [], []

    def before_step():
        if want_layer_norms:
            from megatron_mixln.parallel import pipeline_layer_grad_norms

            collected.extend(pipeline_layer_grad_norms(engine.module, state, _grad_getter(engine, state)))
        if measure_norm:
            norms.append(_plain_grad_norm(engine, state))

    with before_model_step(engine, before_step):
        local_loss = engine.train_batch(data_iter=data).detach().float().reshape(())
    local_tokens = torch.tensor(float(ga * engine.train_micro_batch_size_per_gpu()
                                      * engine.module.model_config.seq_length), device=device)
    z = None
    if z_loss_fn is not None:  # DeepSpeed's loss is CE + z-loss: the loss function kept the z terms
        mean_z = engine.module.loss_fn.pop_mean()
        z = ((mean_z.to(device), torch.ones((), device=device)) if mean_z is not None
             else (torch.zeros((), device=device), torch.zeros((), device=device)))
    return local_loss, local_tokens, collected if want_layer_norms else None, norms[0] if norms else None, z


def _plain_step(engine, batches, lr, guard, token_loss_fn, want_layer_norms, measure_norm, state, pad_id,
                z_loss_fn=None):
    """Forward/backward per micro-batch (DeepSpeed scales by 1/ga and all-reduces at the boundary), the LR
    set and the guard armed right before the boundary's step. -> (loss, target tokens, per-layer norms,
    grad norm, z) of this rank, z = None or (mean z-loss, 1)."""
    device = torch.device(engine.device)
    ga = engine.gradient_accumulation_steps()
    local_loss, local_tokens = torch.zeros((), device=device), torch.zeros((), device=device)
    layer_norms, grad_norm = None, None
    local_z = torch.zeros((), device=device)
    for _ in range(ga):
        inputs, labels, mask = split_batch(next(batches).to(device), pad_id)
        logits = engine(inputs)
        nll = token_loss_fn(logits, labels)
        loss = mean_loss(nll, mask)  # per micro-batch, over its real targets
        local_tokens += masked_sum_and_count(nll.detach(), mask)[1]
        if z_loss_fn is not None:  # logged apart from the NLL, trained as their sum
            z = mean_loss(z_loss_fn(logits), mask)
            local_z += z.detach().float() / ga
            loss_to_train = loss + z
        else:
            loss_to_train = loss
        engine.backward(loss_to_train)
        local_loss += loss.detach().float() / ga
        if engine.is_gradient_accumulation_boundary():
            if want_layer_norms:
                layer_norms = layer_grad_norms(engine.module, _grad_getter(engine, state))
            if measure_norm:
                grad_norm = _plain_grad_norm(engine, state)
            set_lr(engine.optimizer, lr)
            guard.arm()
        engine.step()  # a no-op except at the boundary
    z = (local_z, torch.ones((), device=device)) if z_loss_fn is not None else None
    return local_loss, local_tokens, layer_norms, grad_norm, z


def _reduce_step(engine, local_loss, local_tokens, grad_norm, guard, layer_norms, stop_requested, time_up,
                 state, z=None) -> StepResult:
    """One all_reduce for the loss, the time limit, the token count and one count per stop signal. TP ranks
    hold replicas of their DP rank's loss, so the world mean is the data-parallel mean."""
    device = torch.device(engine.device)
    got = stop_requested()
    signals = [float(got == name) for name in STOP_SIGNAL_NAMES]
    local_z, z_ranks = z if z is not None else (torch.zeros((), device=device), torch.zeros((), device=device))
    stats = torch.stack([local_loss.reshape(()), torch.tensor(float(time_up()), device=device),
                         local_tokens.float().reshape(()), local_z.float().reshape(()), z_ranks.float().reshape(()),
                         *(torch.tensor(flag, device=device) for flag in signals)])
    dist.all_reduce(stats)
    world = dist.get_world_size()
    replicas = world // _data_parallel_size(state, world)  # TP/PP ranks of one data-parallel rank count its tokens again
    stop_signal = next((name for name, n in zip(STOP_SIGNAL_NAMES, stats[5:].tolist()) if n > 0), None)
    z_loss = stats[3].item() / max(stats[4].item(), 1.0) if z is not None else None
    loss = stats[0].item() / world
    if z_loss is not None and is_pipeline_engine(engine):
        loss -= z_loss  # report the NLL alone, as without pipeline parallelism
    return StepResult(loss, grad_norm, guard.applied, stop_signal is not None, layer_norms,
                      time_up=stats[1].item() > 0, tokens=round(stats[2].item() / replicas), stop_signal=stop_signal,
                      z_loss=z_loss)


def _data_parallel_size(state, world: int) -> int:
    return world if state is None else state.dp_size


def _num_params(model, state=None) -> int:
    """The whole model's parameter count (TP shards and pipeline stages summed; collective)."""
    from megatron_mixln.parallel import global_num_parameters

    return global_num_parameters(model, state)


def _minutes_since(start: float) -> float:
    """Wall-clock minutes since `start` (time.monotonic()); --exit-duration-in-mins compares it."""
    return (time.monotonic() - start) / 60.0


def _warn(line: str | None) -> None:
    """A warning line on rank 0's stderr (the log a scheduler keeps)."""
    if line and is_rank0():
        print(line, file=sys.stderr, flush=True)


def _data_fingerprint(cfg: TrainingConfig) -> dict | None:
    """Rank 0 hashes the data files' .idx; the others get its result (one read, not one per rank)."""
    if not cfg.data_path:
        return None
    # The files exist: pretrain() checked them on every rank before the rendezvous.
    result = [data_fingerprint(cfg) if is_rank0() else None]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(result, src=0)
    return result[0]


@dataclass
class Window:
    """What the next log line averages over: the steps since the last one."""
    seconds: float = 0.0
    steps: int = 0
    losses: list = field(default_factory=list)  # the finite losses


@dataclass
class Run:
    """Everything a run builds once (setup_run) and the loop reads and advances (train_loop)."""
    model_config: ModelConfig
    cfg: TrainingConfig
    engine: object  # the DeepSpeed engine (plain or pipeline)
    state: object  # parallel.ParallelState, or None without model parallelism
    train_state: TrainState
    logger: MetricsLogger
    watchdog: HangWatchdog
    train_ds: object
    valid_ds: object
    dp_rank: int
    dp_size: int
    dp_group: object
    global_batch: int
    accumulation: int  # gradient accumulation steps
    eval_budgets: list | None  # per-batch token budgets of --eval-tokens, else None
    eval_samples: int  # validation samples per evaluation (or len(eval_budgets))
    fingerprint: dict | None  # of the data, stored in every checkpoint
    token_loss_fn: object
    z_loss_fn: object  # None unless --z-loss-weight
    guard: StepGuard
    spikes: SpikeDetector
    rollback: RollbackMonitor | None
    preempt: PreemptionFlag
    time_up: object  # () -> bool: past --exit-duration-in-mins on this rank's clock
    start: float  # time.monotonic() at pretrain()
    flops_per_token: float
    peak_tflops: float | None
    graphs_before: int  # compiled graphs before the first step (--compile's proof)
    batches: object = None  # this rank's micro-batch iterator, from train_state.consumed_samples
    first_iteration: int = 0
    window: Window = field(default_factory=Window)
    history: list = field(default_factory=list)
    evals: list = field(default_factory=list)
    stop_reason: str | None = None
    stop_signal: str | None = None  # the signal that stopped a "preempted" run


@dataclass
class RunSummary:
    """What pretrain() returns."""
    history: list  # one record per step: step, loss, lr, grad_norm, applied, consumed_samples
    evals: list  # one record per evaluation: step, valid_loss, valid_ppl, valid_tokens
    train_state: dict  # asdict(TrainState) at the end
    stop_reason: str  # "done", "preempted", "exit_interval", "exit_duration" or "diverged"
    engine: object  # the DeepSpeed engine (the caller destroys it)
    global_batch_size: int
    gradient_accumulation_steps: int

    def to_dict(self) -> dict:
        """Everything but the engine (plain data: it can cross a process boundary)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "engine"}


def pretrain(model_config: ModelConfig, cfg: TrainingConfig, datasets=None) -> RunSummary:
    """Train (or resume) to --train-iters. `datasets` = (train, valid) skips --data-path (tests).

    Returns a RunSummary: per-step history, evaluations, the final TrainState and why it stopped. A hang
    (see megatron_mixln.training.watchdog) ends the process with exit code 124 instead.
    """
    start = time.monotonic()
    if datasets is None:  # a missing data path fails here, before the rendezvous
        check_data_path(cfg.data_path)
        if cfg.valid_data_path:
            check_data_path(cfg.valid_data_path, "--valid-data-path")
    hang_timeout = resolve_hang_timeout(cfg.hang_timeout, torch.cuda.is_available())
    # NCCL's own timeout (10 min by default) would abort a stuck collective before the watchdog dumps stacks.
    init_distributed(cfg.distributed_timeout_minutes,
                     collective_timeout_s=hang_timeout + grace_seconds(hang_timeout) + 300 if hang_timeout else None)
    watchdog = HangWatchdog(hang_timeout, dist.get_rank()).start()
    try:
        return train_loop(setup_run(model_config, cfg, datasets, watchdog, start))
    finally:
        watchdog.stop()


def setup_run(model_config: ModelConfig, cfg: TrainingConfig, datasets, watchdog: HangWatchdog, start: float) -> Run:
    """Check every input, then build the engine, resume, open the log: the Run the loop needs."""
    # Bad layouts fail here, before any group or model is built (the memory planner runs the same checks).
    batch = check_startup_layout(
        model_config, dist.get_world_size(), tensor_model_parallel_size=cfg.tensor_model_parallel_size,
        pipeline_model_parallel_size=cfg.pipeline_model_parallel_size, sequence_parallel=cfg.sequence_parallel,
        zero_stage=cfg.zero_stage, micro_batch_size=cfg.micro_batch_size, global_batch_size=cfg.global_batch_size)
    state = setup_model_parallel(cfg)
    dp_rank, dp_size = data_parallel_rank_and_size(state)
    global_batch, accumulation = batch.global_batch_size, batch.gradient_accumulation_steps
    ds_config = build_ds_config(cfg, global_batch, accumulation, model_config.hidden_size)
    # Bad inputs fail here, before the model is built.
    resume = _check_resume(model_config, cfg, ds_config, dp_size)
    if cfg.save:
        check_writable(cfg.save, "--save")
    fingerprint = _data_fingerprint(cfg) if datasets is None else None
    if resume:
        _warn(check_data_fingerprint(resume, fingerprint, cfg.load, cfg.override_data_check))
    if datasets is None:
        datasets = build_datasets(cfg, model_config.seq_length, global_batch, model_config.vocab_size,
                                  model_config.pad_id)
    train_ds, valid_ds = datasets
    budgets = None
    if cfg.eval_tokens:
        budgets = eval_token_budgets(valid_ds, cfg.eval_tokens, model_config.seq_length, cfg.micro_batch_size * dp_size)

    seed_everything(cfg.seed)
    engine = build_model_and_optimizer(model_config, cfg, ds_config, state)
    train_state = TrainState()
    if resume:
        train_state, saved_training = load_checkpoint(engine, cfg.load, resume["tag"])
        if resume.get("lr_schedule") is None:  # written before mixln_meta.json recorded it: the client state has it
            _warn(check_resumed_schedule(saved_training, cfg, f"--load {cfg.load} ({resume['tag']})"))
    watchdog.progress("the first step (after building the model)", max(watchdog.timeout_s, STARTUP_MIN_S))

    n_params = _num_params(engine.module, state)
    logger = _open_log(model_config, cfg, engine, state, n_params, dp_size, global_batch, accumulation,
                       zero_stage_of(ds_config))
    if resume:
        for tag, problem in resume["skipped"]:
            logger.log("event", train_state.iteration, {"event": "checkpoint_skipped", "tag": tag, "problem": problem})
        logger.log("event", train_state.iteration, {"event": "resumed", "from": cfg.load, "tag": resume["tag"]})
        logger.print(f"resumed from {cfg.load} ({resume['tag']}): iteration {train_state.iteration}, "
                     f"{train_state.consumed_samples} samples consumed")
    token_loss_fn = make_token_loss_fn(state)
    if cfg.compile and cfg.pipeline_model_parallel_size == 1 and cfg.tensor_model_parallel_size == 1:
        token_loss_fn = compile_loss(token_loss_fn, backend=cfg.compile_backend)  # (TP's vocab-parallel loss holds collectives: left eager)
    limit = cfg.exit_duration_in_mins
    run = Run(
        model_config=model_config, cfg=cfg, engine=engine, state=state, train_state=train_state, logger=logger,
        watchdog=watchdog, train_ds=train_ds, valid_ds=valid_ds, dp_rank=dp_rank, dp_size=dp_size,
        dp_group=data_parallel_group(state), global_batch=global_batch, accumulation=accumulation,
        eval_budgets=budgets, eval_samples=len(budgets) if budgets is not None else cfg.eval_iters * global_batch,
        fingerprint=fingerprint, token_loss_fn=token_loss_fn, z_loss_fn=make_z_loss_fn(cfg.z_loss_weight, state),
        guard=StepGuard(engine),
        spikes=SpikeDetector(cfg.spike_factor),
        rollback=RollbackMonitor(cfg.rollback_on_spike, cfg.rollback_patience) if cfg.rollback_on_spike else None,
        preempt=PreemptionFlag(), time_up=(lambda: _minutes_since(start) > limit) if limit else (lambda: False),
        start=start, first_iteration=train_state.iteration, graphs_before=compiled_graph_count(),
        flops_per_token=flops_per_token(n_params, model_config.vocab_size * model_config.hidden_size,
                                        model_config.num_layers, model_config.hidden_size, model_config.seq_length),
        peak_tflops=cfg.peak_tflops or default_peak_tflops(cfg.bf16),
    )
    _restore_monitors(train_state.monitors, run.spikes, run.rollback)  # a resumed run continues their means and streak
    restart_batches(run)
    return run


def _check_resume(model_config: ModelConfig, cfg: TrainingConfig, ds_config: dict, dp_size: int) -> dict | None:
    """--load checked before anything is built: the checkpoint's sidecar (load.inspect_checkpoint), or None
    without --load. Turns on DeepSpeed's universal loading for a universal checkpoint."""
    if not cfg.load:
        return None
    meta = inspect_checkpoint(cfg.load, model_config, cfg.tag, cfg.verify_checkpoint,
                              (cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size))
    _warn(fallback_warning(cfg.load, meta))
    check_resume_layout(meta, cfg.load, dp_size, zero_stage_of(ds_config),
                        cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size, cfg.bf16)
    if meta.get("universal"):  # DeepSpeed cuts this run's TP slices and ZeRO partitions out of it
        ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
    _warn(check_resumed_schedule(meta.get("lr_schedule"), cfg, f"--load {cfg.load} ({meta['tag']})"))
    if bool(meta.get("bf16_pure", False)) != cfg.bf16_pure:
        raise UsageError(f"--load {cfg.load} ({meta['tag']}) was written {'with' if meta.get('bf16_pure') else 'without'}"
                         f" --bf16-pure; resume with the same precision")
    return meta


def _open_log(model_config, cfg, engine, state, n_params, dp_size, global_batch, accumulation, zero_stage):
    """The run's MetricsLogger (config.json, metrics.jsonl, wandb), and the run described on rank 0's console."""
    groups = param_group_counts(engine.module, state)
    compiled_blocks = compiled_block_count(engine.module, state)
    run_config = {
        "model": model_config.to_dict(), "training": cfg.to_dict(), "positions": model_config.positions_str,
        "world_size": dist.get_world_size(), "data_parallel_size": dp_size, "global_batch_size": global_batch,
        "gradient_accumulation_steps": accumulation, "zero_stage": zero_stage, "parameters": n_params,
        "param_groups": groups, "compiled_blocks": compiled_blocks,
    }
    logger = MetricsLogger(cfg.run_directory, is_rank0(), run_config, cfg.wandb_project,
                           cfg.wandb_name or model_config.norm_position, cfg.wandb_mode, cfg.tensorboard_dir)
    logger.print(f"modes: {paper_modes(model_config, cfg)}")
    logger.print(f"model: {n_params:,} parameters, positions {model_config.positions_str}; world {dist.get_world_size()}"
                 f" (data-parallel {dp_size}), global batch {global_batch} = micro {cfg.micro_batch_size} x dp "
                 f"{dp_size} x accumulation {accumulation}, ZeRO stage {zero_stage}, "
                 f"{'pure bf16' if cfg.bf16_pure else 'bf16' if cfg.bf16 else 'fp32'}")
    logger.print(describe_param_groups(groups, cfg.weight_decay))
    logger.print(f"torch.compile: {'on' if cfg.compile else 'off'}"
                 + (f" (backend {cfg.compile_backend}), {compiled_blocks} of {model_config.num_layers} blocks compiled"
                    if cfg.compile else "")
                 + f"; activation recomputation {'on' if cfg.recompute_activations else 'off'}")
    if cfg.compile and zero_stage == 3:
        logger.print("WARNING: --compile with ZeRO-3: DeepSpeed's per-module parameter hooks break each block's graph "
                     "and Dynamo recompiles per module up to its recompile limit; results are unchanged, the "
                     "speed-up is partial")
    return logger


def restart_batches(run: Run) -> None:
    """This rank's micro-batches from the sample the run has reached (at the start, and after a rollback)."""
    run.batches = micro_batches(run.train_ds, len(run.train_ds), run.train_state.consumed_samples,
                                run.cfg.micro_batch_size, run.dp_rank, run.dp_size)


def train_loop(run: Run) -> RunSummary:
    """Step until --train-iters or a stop reason; each named step below decides whether this step is its step."""
    cfg = run.cfg
    try:
        while run.train_state.iteration < cfg.train_iters:
            step = run.train_state.iteration + 1
            lr = lr_at(step, cfg) * run.train_state.lr_scale
            result = run_step(run, step, lr)
            record_step(run, step, lr, result)
            if handle_spike(run, step, result):  # rolled back: the loop goes on from the restored iteration
                continue
            maybe_log(run, step, lr, result)
            maybe_evaluate(run, step)
            run.stop_reason = stop_reason(run, step, result)
            maybe_save(run, step)
            if run.stop_reason:
                break
    finally:
        run.preempt.restore()
        run.logger.close()
    if run.stop_reason == "preempted" and is_rank0():
        where = f"checkpoint saved in {cfg.save}" if cfg.save else "no --save given, nothing saved"
        print(f"preemption signal ({run.stop_signal}) at iteration {run.train_state.iteration}: {where}; "
              "exiting cleanly", flush=True)
    return RunSummary(run.history, run.evals, asdict(run.train_state), run.stop_reason or "done", run.engine,
                      run.global_batch, run.accumulation)


def run_step(run: Run, step: int, lr: float) -> StepResult:
    """train_step, timed for the log line, with the watchdog told (the first step keeps its start-up allowance)."""
    cfg = run.cfg
    want_layer_norms = cfg.grad_norm_interval > 0 and step % cfg.grad_norm_interval == 0
    t0 = time.perf_counter()
    if step > run.first_iteration + 1:
        run.watchdog.progress(f"step {step}")
    probe = start_probe(run.engine, cfg, run.state, run.model_config.seq_length, step)  # None unless a diagnostics step
    result = train_step(run.engine, run.batches, lr, run.guard, run.token_loss_fn, lambda: run.preempt.signal_name,
                        want_layer_norms, run.state, run.time_up, run.model_config.pad_id, run.z_loss_fn)
    result.diagnostics = finish_probe(probe) if probe is not None else None
    run.window.seconds += time.perf_counter() - t0
    run.window.steps += 1
    if cfg.compile and run.window.steps == 1 and not run.history:  # proof that compilation took effect
        graphs = compiled_graph_count() - run.graphs_before
        run.logger.log("event", step, {"event": "compiled", "graphs": graphs})
        run.logger.print(f"torch.compile: {graphs} graph{'s' * (graphs != 1)} compiled in the first step"
                         if graphs else "WARNING: --compile is on but torch.compile produced no graph in the "
                         "first step: the blocks run eagerly")
    return result


def record_step(run: Run, step: int, lr: float, result: StepResult) -> None:
    """Advance the counters and the history; a skipped (non-finite) step is said and logged."""
    ts = run.train_state
    if math.isfinite(result.loss):
        run.window.losses.append(result.loss)
    ts.iteration, ts.consumed_samples = step, ts.consumed_samples + run.global_batch
    ts.consumed_tokens += result.tokens
    bad = not result.applied or not math.isfinite(result.loss)
    ts.skipped_steps += int(bad)
    ts.bad_steps_in_a_row = ts.bad_steps_in_a_row + 1 if bad else 0
    run.history.append({"step": step, "loss": result.loss, "lr": lr, "grad_norm": result.grad_norm,
                        "applied": result.applied, "consumed_samples": ts.consumed_samples,
                        **({"z_loss": result.z_loss} if result.z_loss is not None else {})})
    if bad:
        run.logger.print(f"step {step}: non-finite loss/gradients (loss {result.loss}, grad norm {result.grad_norm}); "
                         f"update skipped ({ts.bad_steps_in_a_row} in a row, {ts.skipped_steps} in total)")
        run.logger.log("event", step, {"event": "skipped_step", "loss": result.loss, "grad_norm": result.grad_norm})


def handle_spike(run: Run, step: int, result: StepResult) -> bool:
    """Note a loss spike; with --rollback-on-spike, roll back after --rollback-patience spiking steps (True:
    rolled back) or, past --max-rollbacks, mark the run diverged."""
    cfg = run.cfg
    spike_mean = run.spikes.update(result.loss)
    if spike_mean is not None:
        run.logger.print(f"step {step}: loss spike {result.loss:.4f} > {cfg.spike_factor} x running mean {spike_mean:.4f}")
        run.logger.log("event", step, {"event": "loss_spike", "loss": result.loss, "running_mean": spike_mean})
    if run.rollback is None or not run.rollback.update(step, result.loss):
        return False
    if run.train_state.rollbacks >= cfg.max_rollbacks:
        run.stop_reason = "diverged"
        run.logger.print(f"step {step}: loss still spiking after {run.train_state.rollbacks} rollbacks (--max-rollbacks)")
        return False
    run.train_state = _roll_back(run.engine, cfg, run.train_state, run.rollback, step, run.logger)
    restart_batches(run)
    run.window = Window()
    return True


def maybe_log(run: Run, step: int, lr: float, result: StepResult) -> None:
    """Every --log-interval steps (and the last): the window's mean loss, throughput, MFU, memory; and the
    per-layer gradient norms and instability diagnostics when this step measured them."""
    cfg, ts = run.cfg, run.train_state
    if step % cfg.log_interval == 0 or step == cfg.train_iters:
        window = run.window
        tps = run.global_batch * run.model_config.seq_length * window.steps / max(window.seconds, 1e-9)
        # Like Megatron: the loss of a log line is the mean over its window (finite steps only).
        loss = sum(window.losses) / len(window.losses) if window.losses else float("nan")
        peak = run.peak_tflops
        values = {"loss": loss, "lr": lr, "grad_norm": result.grad_norm, "tokens_per_sec": tps,
                  "consumed_tokens": ts.consumed_tokens,
                  "mfu": run.flops_per_token * tps / (peak * 1e12 * dist.get_world_size()) if peak else None,
                  "memory_gib": memory_gib(), "consumed_samples": ts.consumed_samples,
                  "skipped_steps": ts.skipped_steps}
        if result.z_loss is not None:
            values["z_loss"] = result.z_loss
        run.logger.log("train", step, values)
        run.logger.print(format_train_line(step, cfg.train_iters, values))
        run.window = Window()
    if result.layer_norms is not None:
        run.logger.log("grad_norms", step, flatten_grad_norms(result.layer_norms))
    if result.diagnostics is not None:
        run.logger.log("diagnostics", step, result.diagnostics)


def maybe_evaluate(run: Run, step: int) -> None:
    """Every --eval-interval steps (and the last): the validation loss and perplexity."""
    cfg = run.cfg
    if not cfg.evaluates or not (step % cfg.eval_interval == 0 or step == cfg.train_iters):
        return
    run.watchdog.progress(f"evaluation at step {step}")
    batches = validation_batches(run.valid_ds, run.eval_samples, cfg.micro_batch_size, run.dp_rank, run.dp_size,
                                 run.eval_budgets)
    result = evaluate(run.engine, batches, run.token_loss_fn, run.dp_group, run.model_config.pad_id)
    run.evals.append({"step": step, **result})
    run.logger.log("valid", step, result)
    run.logger.print(f"step {step}: validation loss {result['valid_loss']:.4f} | perplexity "
                     f"{result['valid_ppl']:.3f} ({result['valid_tokens']:,} tokens)")


def stop_reason(run: Run, step: int, result: StepResult) -> str | None:
    """Why the run stops after this step: diverged, preempted, exit_interval, exit_duration (None: it goes on)."""
    cfg = run.cfg
    if run.stop_reason == "diverged" or run.train_state.bad_steps_in_a_row >= cfg.max_bad_steps:
        run.logger.log("event", step, {"event": "diverged", "loss": result.loss})
        return "diverged"
    if result.stop_requested:
        run.stop_signal = result.stop_signal
        return "preempted"
    if cfg.exit_interval and step % cfg.exit_interval == 0 and step < cfg.train_iters:
        return "exit_interval"
    if result.time_up and step < cfg.train_iters:
        run.logger.print(f"step {step}: --exit-duration-in-mins {cfg.exit_duration_in_mins:g} reached "
                         f"({_minutes_since(run.start):.2f} min on rank 0's clock); saving and exiting")
        return "exit_duration"
    return None


def maybe_save(run: Run, step: int) -> None:
    """Every --save-interval steps, at the last step and before stopping. While a spike is under way (rollback
    on) no periodic save, and a stop save prunes nothing: the good checkpoint must survive (the stop save
    carries the open streak in TrainState.monitors)."""
    cfg = run.cfg
    in_spike = run.rollback is not None and run.rollback.in_spike
    periodic = cfg.save_interval and step % cfg.save_interval == 0 and not in_spike
    if not cfg.save or not (run.stop_reason or periodic or step == cfg.train_iters):
        return
    run.watchdog.progress(f"checkpoint save at step {step}")
    run.train_state.monitors = _monitor_states(run.spikes, run.rollback)
    tag = save_checkpoint(run.engine, cfg.save, run.train_state, run.model_config, cfg, 0 if in_spike else cfg.keep_last,
                          run.dp_size, cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size, run.fingerprint)
    run.logger.print(f"step {step}: saved checkpoint {cfg.save}/{tag}")


def _monitor_states(spikes: SpikeDetector, rollback: RollbackMonitor | None) -> dict:
    """The loss monitors' state, saved with every checkpoint (TrainState.monitors)."""
    return {"spikes": spikes.state_dict(), **({"rollback": rollback.state_dict()} if rollback is not None else {})}


def _restore_monitors(states: dict, spikes: SpikeDetector, rollback: RollbackMonitor | None) -> None:
    if "spikes" in states:
        spikes.load_state_dict(states["spikes"])
    if rollback is not None and "rollback" in states:
        rollback.load_state_dict(states["rollback"])


def _roll_back(engine, cfg: TrainingConfig, ts: TrainState, monitor: RollbackMonitor, step: int, logger) -> TrainState:
    """Reload the newest verified checkpoint older than the first bad update (the one before the first
    spiking step); keep the data position (the window since that checkpoint is skipped); scale the LR;
    make that checkpoint `latest` (the resume point until the next save). Raises UsageError when no such
    checkpoint exists or none passes verification."""
    first, bad_update = monitor.first_spike_step, monitor.first_bad_update
    tag, skipped = verified_rollback_target(cfg.save, bad_update, cfg.verify_checkpoint)
    for bad_tag, problem in skipped:
        logger.print(f"warning: --rollback-on-spike: {bad_tag} is unusable ({problem}); trying an older checkpoint")
        logger.log("event", step, {"event": "checkpoint_skipped", "tag": bad_tag, "problem": problem})
    if tag is None:
        raise UsageError(f"--rollback-on-spike: the loss spiked from step {first}, so the update of step {bad_update} "
                         f"may be the bad one, but {cfg.save} holds no verified checkpoint from before it"
                         + (f" ({len(skipped)} failed verification)" if skipped else "") + "; lower --save-interval")
    barrier()
    consumed_samples, consumed_tokens = ts.consumed_samples, ts.consumed_tokens
    restored, _ = load_checkpoint(engine, cfg.save, tag)
    restored.consumed_samples, restored.consumed_tokens = consumed_samples, consumed_tokens
    restored.rollbacks = ts.rollbacks + 1
    restored.lr_scale = ts.lr_scale * cfg.rollback_lr_factor
    restored.bad_steps_in_a_row = 0
    monitor.reset()
    dropped = []
    if is_rank0():  # the resume point is the good checkpoint, not a newer one holding the spike
        write_latest(cfg.save, tag)
        dropped = drop_abandoned(cfg.save, tag)
    barrier()
    if dropped:
        logger.print(f"step {step}: deleted {', '.join(dropped)} (saved after the rollback target: they hold the spike)")
    logger.print(f"step {step}: loss above {cfg.rollback_on_spike} x its running mean since step "
                 f"{first}; rolled back to {tag} (iteration {restored.iteration}, before the update of step "
                 f"{bad_update}), skipping the data up to sample {consumed_samples}, lr scale {restored.lr_scale:g} "
                 f"(rollback {restored.rollbacks})")
    logger.log("event", step, {"event": "rollback", "first_spike_step": first, "to_iteration": restored.iteration, "tag": tag,
                               "resume_sample": consumed_samples, "lr_scale": restored.lr_scale,
                               "rollbacks": restored.rollbacks})
    return restored
