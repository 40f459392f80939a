"""The training loop: one function for a step, one for the run.

A step = `gradient_accumulation_steps` micro-batches per data-parallel rank, then one optimizer
update at the LR of that step. The reported loss is the mean over the whole global batch.
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import asdict, dataclass
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
from megatron_mixln.training.config import TrainingConfig, UsageError
from megatron_mixln.training.data import (build_datasets, check_data_path, eval_token_budgets, micro_batches,
                                          validation_batches)
from megatron_mixln.training.data_fingerprint import check_data_fingerprint, data_fingerprint
from megatron_mixln.training.diagnostics import finish_probe, start_probe
from megatron_mixln.training.distributed import (
    barrier, data_parallel_group, data_parallel_rank_and_size, init_distributed, is_rank0, setup_model_parallel,
)
from megatron_mixln.training.ds_config import build_ds_config, zero_stage_of
from megatron_mixln.training.evaluate import evaluate, is_pipeline_engine
from megatron_mixln.training.flops import default_peak_tflops, flops_per_token, memory_gib
from megatron_mixln.training.loss import (make_token_loss_fn, make_z_loss_fn, masked_sum_and_count, mean_loss,
                                          split_batch)
from megatron_mixln.training.metrics import MetricsLogger, format_train_line
from megatron_mixln.training.model_setup import (build_model_and_optimizer, compile_loss, compiled_block_count,
                                                 compiled_graph_count)
from megatron_mixln.training.param_groups import describe_param_groups, param_group_counts
from megatron_mixln.training.rollback import RollbackMonitor, drop_abandoned, verified_rollback_target
from megatron_mixln.training.schedule import lr_at, set_lr
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


@contextlib.contextmanager
def _before_model_step(engine, fn):
    """Run fn inside the pipeline engine's train_batch, after its gradient reduction and before the
    update (`_take_model_step` is looked up on the instance, so shadowing it there hooks it)."""
    take_model_step = engine._take_model_step

    def hooked(*args, **kwargs):
        fn()
        return take_model_step(*args, **kwargs)

    engine._take_model_step = hooked
    try:
        yield
    finally:
        del engine._take_model_step


def train_step(engine, batches, lr: float, guard: StepGuard, token_loss_fn, stop_requested,
               want_layer_norms: bool, state=None, time_up=lambda: False, pad_id: int = 0,
               z_loss_fn=None) -> StepResult:
    """`stop_requested()` (the name of a stop signal this rank received, or None) is read after this rank's
    compute, right before the all_reduce, so a signal that arrives during the step stops the run after this
    step, not after the next one; the all_reduce carries one count per signal, so every rank (rank 0's log
    line included) names the signal whichever rank received it. `time_up()`
    (past --exit-duration-in-mins on this rank's clock) rides on the same all_reduce, so every rank
    stops after the same step."""
    device = torch.device(engine.device)
    ga = engine.gradient_accumulation_steps()
    layer_norms, grad_norm = None, None
    # ZeRO-0 fp32: DeepSpeed keeps no norm. With clipping, grad_clip's global clip measures it (and
    # get_global_grad_norm returns it); without, it is measured here, between backward and step.
    measure_norm = (engine.zero_optimization_stage() == 0 and not engine.bfloat16_enabled()
                    and not engine.gradient_clipping())
    local_tokens = torch.zeros((), device=device)
    local_z = torch.zeros((), device=device)
    z_ranks = torch.ones((), device=device)  # ranks whose local_z counts (pipeline: the last stage only)
    if is_pipeline_engine(engine):
        # Pipeline seam: DeepSpeed's 1F1B engine runs all micro-batches, backward and the step itself;
        # its loss is already averaged over data-parallel ranks.
        set_lr(engine.optimizer, lr)
        guard.arm()
        data = ((b[:, :-1].to(device), b[:, 1:].to(device)) for b in islice(batches, ga))
        collected, norms = [], []

        def before_step():
            if want_layer_norms:
                from megatron_mixln.parallel import pipeline_layer_grad_norms

                collected.extend(pipeline_layer_grad_norms(engine.module, state, _grad_getter(engine, state)))
            if measure_norm:  # as below
                norms.append(_plain_grad_norm(engine, state))

        with _before_model_step(engine, before_step):
            local_loss = engine.train_batch(data_iter=data).detach().float().reshape(())
        if z_loss_fn is not None:  # DeepSpeed's loss is CE + z-loss: the loss function kept the z terms
            z = engine.module.loss_fn.pop_mean()
            local_z, z_ranks = (z.to(device), z_ranks) if z is not None else (local_z, torch.zeros((), device=device))
        layer_norms = collected if want_layer_norms else None
        grad_norm = norms[0] if norms else None
        local_tokens += ga * engine.train_micro_batch_size_per_gpu() * (engine.module.model_config.seq_length)
    else:
        local_loss = torch.zeros((), device=device)
        for _ in range(ga):
            inputs, labels, mask = split_batch(next(batches).to(device), pad_id)
            logits = engine(inputs)
            nll = token_loss_fn(logits, labels)
            loss = mean_loss(nll, mask)  # per micro-batch, over its real targets
            local_tokens += masked_sum_and_count(nll.detach(), mask)[1]
            if z_loss_fn is not None:  # logged apart from the NLL, trained as their sum
                z = mean_loss(z_loss_fn(logits), mask)
                local_z += z.detach().float() / ga
                engine.backward(loss + z)
            else:
                engine.backward(loss)  # DeepSpeed scales by 1/ga and all-reduces at the boundary
            local_loss += loss.detach().float() / ga
            if engine.is_gradient_accumulation_boundary():
                if want_layer_norms:
                    layer_norms = layer_grad_norms(engine.module, _grad_getter(engine, state))
                if measure_norm:
                    grad_norm = _plain_grad_norm(engine, state)
                set_lr(engine.optimizer, lr)
                guard.arm()
            engine.step()  # a no-op except at the boundary
    if grad_norm is None:
        norm = engine.get_global_grad_norm()
        grad_norm = None if norm is None else float(norm)
    # One all_reduce for the loss, the time limit and one count per stop signal. TP ranks hold replicas of their DP
    # rank's loss, so the world mean is the data-parallel mean.
    got = stop_requested()
    signals = [float(got == name) for name in STOP_SIGNAL_NAMES]
    stats = torch.stack([local_loss.reshape(()), torch.tensor(float(time_up()), device=device), local_tokens.float(),
                         local_z, z_ranks, *(torch.tensor(flag, device=device) for flag in signals)])
    dist.all_reduce(stats)
    world = dist.get_world_size()
    replicas = world // _data_parallel_size(state, world)  # TP/PP ranks of one data-parallel rank count its tokens again
    stop_signal = next((name for name, n in zip(STOP_SIGNAL_NAMES, stats[5:].tolist()) if n > 0), None)
    z_loss = stats[3].item() / max(stats[4].item(), 1.0) if z_loss_fn is not None else None
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


def pretrain(model_config: ModelConfig, cfg: TrainingConfig, datasets=None) -> dict:
    """Train (or resume) to --train-iters. `datasets` = (train, valid) skips --data-path (tests).

    Returns a summary: per-step history, evaluations, the final TrainState and why it stopped
    ("done", "preempted", "exit_interval", "exit_duration", "diverged"). A hang (see
    megatron_mixln.training.watchdog) ends the process with exit code 124 instead.
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
        return _pretrain(model_config, cfg, datasets, watchdog, start)
    finally:
        watchdog.stop()


def _pretrain(model_config: ModelConfig, cfg: TrainingConfig, datasets, watchdog: HangWatchdog, start: float) -> dict:
    # Bad layouts fail here, before any group or model is built (the memory planner runs the same checks).
    batch = check_startup_layout(
        model_config, dist.get_world_size(), tensor_model_parallel_size=cfg.tensor_model_parallel_size,
        pipeline_model_parallel_size=cfg.pipeline_model_parallel_size, sequence_parallel=cfg.sequence_parallel,
        zero_stage=cfg.zero_stage, micro_batch_size=cfg.micro_batch_size, global_batch_size=cfg.global_batch_size)
    state = setup_model_parallel(cfg)
    dp_rank, dp_size = data_parallel_rank_and_size(state)
    dp_group = data_parallel_group(state)
    global_batch, ga = batch.global_batch_size, batch.gradient_accumulation_steps
    ds_config = build_ds_config(cfg, global_batch, ga, model_config.hidden_size)
    # Bad inputs fail here, before the model is built.
    meta = inspect_checkpoint(cfg.load, model_config, cfg.tag, cfg.verify_checkpoint) if cfg.load else None
    if meta:
        _warn(fallback_warning(cfg.load, meta))
        check_resume_layout(meta, cfg.load, dp_size, zero_stage_of(ds_config),
                            cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size, cfg.bf16)
        if meta.get("universal"):  # DeepSpeed cuts this run's TP slices and ZeRO partitions out of it
            ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
        if bool(meta.get("bf16_pure", False)) != cfg.bf16_pure:
            raise UsageError(f"--load {cfg.load} ({meta['tag']}) was written {'with' if meta.get('bf16_pure') else 'without'}"
                             f" --bf16-pure; resume with the same precision")
    if cfg.save:
        _check_writable(cfg.save, "--save")
    fingerprint = _data_fingerprint(cfg) if datasets is None else None
    if meta:
        _warn(check_data_fingerprint(meta, fingerprint, cfg.load, cfg.override_data_check))
    if datasets is None:
        datasets = build_datasets(cfg, model_config.seq_length, global_batch, model_config.vocab_size,
                                  model_config.pad_id)
    train_ds, valid_ds = datasets
    budgets = None
    if cfg.eval_tokens:
        budgets = eval_token_budgets(valid_ds, cfg.eval_tokens, model_config.seq_length, cfg.micro_batch_size * dp_size)
    n_valid = len(budgets) if budgets is not None else cfg.eval_iters * global_batch

    seed_everything(cfg.seed)
    engine = build_model_and_optimizer(model_config, cfg, ds_config, state)
    ts = load_checkpoint(engine, cfg.load, meta["tag"]) if meta else TrainState()
    watchdog.progress("the first step (after building the model)", max(watchdog.timeout_s, STARTUP_MIN_S))

    n_params = _num_params(engine.module, state)
    groups = param_group_counts(engine.module, state)
    compiled_blocks = compiled_block_count(engine.module, state)
    run_config = {
        "model": model_config.to_dict(), "training": cfg.to_dict(), "positions": model_config.positions_str,
        "world_size": dist.get_world_size(), "data_parallel_size": dp_size, "global_batch_size": global_batch,
        "gradient_accumulation_steps": ga, "zero_stage": zero_stage_of(ds_config), "parameters": n_params,
        "param_groups": groups, "compiled_blocks": compiled_blocks,
    }
    logger = MetricsLogger(cfg.run_directory, is_rank0(), run_config, cfg.wandb_project,
                           cfg.wandb_name or model_config.norm_position, cfg.wandb_mode, cfg.tensorboard_dir)
    if meta:
        for tag, problem in meta["skipped"]:
            logger.log("event", ts.iteration, {"event": "checkpoint_skipped", "tag": tag, "problem": problem})
        logger.log("event", ts.iteration, {"event": "resumed", "from": cfg.load, "tag": meta["tag"]})
        logger.print(f"resumed from {cfg.load} ({meta['tag']}): iteration {ts.iteration}, "
                     f"{ts.consumed_samples} samples consumed")
    modes = _paper_modes(model_config, cfg)
    logger.print(f"modes: {modes}")
    logger.print(f"model: {n_params:,} parameters, positions {model_config.positions_str}; world {dist.get_world_size()}"
                 f" (data-parallel {dp_size}), global batch {global_batch} = micro {cfg.micro_batch_size} x dp "
                 f"{dp_size} x accumulation {ga}, ZeRO stage {zero_stage_of(ds_config)}, "
                 f"{'pure bf16' if cfg.bf16_pure else 'bf16' if cfg.bf16 else 'fp32'}")
    logger.print(describe_param_groups(groups, cfg.weight_decay))
    logger.print(f"torch.compile: {'on' if cfg.compile else 'off'}"
                 + (f" (backend {cfg.compile_backend}), {compiled_blocks} of {model_config.num_layers} blocks compiled"
                    if cfg.compile else "")
                 + f"; activation recomputation {'on' if cfg.recompute_activations else 'off'}")
    if cfg.compile and zero_stage_of(ds_config) == 3:
        logger.print("WARNING: --compile with ZeRO-3: DeepSpeed's per-module parameter hooks break each block's graph "
                     "and Dynamo recompiles per module up to its recompile limit; results are unchanged, the "
                     "speed-up is partial")
    graphs_before = compiled_graph_count()

    tokens_per_step = global_batch * model_config.seq_length
    embed_params = model_config.vocab_size * model_config.hidden_size  # whatever rank/stage holds it
    fpt = flops_per_token(n_params, embed_params, model_config.num_layers, model_config.hidden_size,
                          model_config.seq_length)
    peak = cfg.peak_tflops or default_peak_tflops(cfg.bf16)
    token_loss_fn = make_token_loss_fn(state)
    z_loss_fn = make_z_loss_fn(cfg.z_loss_weight, state)
    if cfg.compile and cfg.pipeline_model_parallel_size == 1 and cfg.tensor_model_parallel_size == 1:
        token_loss_fn = compile_loss(token_loss_fn, backend=cfg.compile_backend)  # (TP's vocab-parallel loss holds collectives: left eager)
    guard = StepGuard(engine)
    spikes = SpikeDetector(cfg.spike_factor)
    rollback = RollbackMonitor(cfg.rollback_on_spike, cfg.rollback_patience) if cfg.rollback_on_spike else None
    _restore_monitors(ts.monitors, spikes, rollback)  # a resumed run continues their running means and streak
    pad_id = model_config.pad_id
    preempt = PreemptionFlag()
    ts_start = ts.iteration
    limit = cfg.exit_duration_in_mins
    time_up = (lambda: _minutes_since(start) > limit) if limit else (lambda: False)
    batches = micro_batches(train_ds, len(train_ds), ts.consumed_samples, cfg.micro_batch_size, dp_rank, dp_size)
    history, evals = [], []
    stop_reason, stop_signal = None, None
    window_time, window_steps, window_losses = 0.0, 0, []
    try:
        while ts.iteration < cfg.train_iters:
            step = ts.iteration + 1
            lr = lr_at(step, cfg) * ts.lr_scale
            want_layers = cfg.grad_norm_interval > 0 and step % cfg.grad_norm_interval == 0
            t0 = time.perf_counter()
            if step > ts_start + 1:  # the first step keeps the start-up allowance
                watchdog.progress(f"step {step}")
            probe = start_probe(engine, cfg, state, model_config.seq_length, step)  # None unless a diagnostics step
            res = train_step(engine, batches, lr, guard, token_loss_fn, lambda: preempt.signal_name, want_layers, state,
                             time_up, pad_id, z_loss_fn)
            diagnostics = finish_probe(probe) if probe is not None else None
            window_time += time.perf_counter() - t0
            window_steps += 1
            if cfg.compile and window_steps == 1 and not history:  # proof that compilation took effect
                graphs = compiled_graph_count() - graphs_before
                logger.log("event", step, {"event": "compiled", "graphs": graphs})
                logger.print(f"torch.compile: {graphs} graph{'s' * (graphs != 1)} compiled in the first step"
                             if graphs else "WARNING: --compile is on but torch.compile produced no graph in the "
                             "first step: the blocks run eagerly")
            if math.isfinite(res.loss):
                window_losses.append(res.loss)
            ts.iteration, ts.consumed_samples = step, ts.consumed_samples + global_batch
            ts.consumed_tokens += res.tokens

            bad = not res.applied or not math.isfinite(res.loss)
            ts.skipped_steps += int(bad)
            ts.bad_steps_in_a_row = ts.bad_steps_in_a_row + 1 if bad else 0
            history.append({"step": step, "loss": res.loss, "lr": lr, "grad_norm": res.grad_norm,
                            "applied": res.applied, "consumed_samples": ts.consumed_samples,
                            **({"z_loss": res.z_loss} if res.z_loss is not None else {})})
            if bad:
                logger.print(f"step {step}: non-finite loss/gradients (loss {res.loss}, grad norm {res.grad_norm}); "
                             f"update skipped ({ts.bad_steps_in_a_row} in a row, {ts.skipped_steps} in total)")
                logger.log("event", step, {"event": "skipped_step", "loss": res.loss, "grad_norm": res.grad_norm})
            spike_mean = spikes.update(res.loss)
            if spike_mean is not None:
                logger.print(f"step {step}: loss spike {res.loss:.4f} > {cfg.spike_factor} x running mean {spike_mean:.4f}")
                logger.log("event", step, {"event": "loss_spike", "loss": res.loss, "running_mean": spike_mean})
            if rollback is not None and rollback.update(step, res.loss):
                if ts.rollbacks >= cfg.max_rollbacks:
                    stop_reason = "diverged"
                    logger.print(f"step {step}: loss still spiking after {ts.rollbacks} rollbacks (--max-rollbacks)")
                else:
                    ts = _roll_back(engine, cfg, ts, rollback, step, logger)
                    batches = micro_batches(train_ds, len(train_ds), ts.consumed_samples, cfg.micro_batch_size,
                                            dp_rank, dp_size)
                    window_time, window_steps, window_losses = 0.0, 0, []
                    continue

            if step % cfg.log_interval == 0 or step == cfg.train_iters:
                tps = tokens_per_step * window_steps / max(window_time, 1e-9)
                # Like Megatron: the loss of a log line is the mean over its window (finite steps only).
                loss = sum(window_losses) / len(window_losses) if window_losses else float("nan")
                values = {"loss": loss, "lr": lr, "grad_norm": res.grad_norm, "tokens_per_sec": tps,
                          "consumed_tokens": ts.consumed_tokens,
                          "mfu": fpt * tps / (peak * 1e12 * dist.get_world_size()) if peak else None,
                          "memory_gib": memory_gib(), "consumed_samples": ts.consumed_samples,
                          "skipped_steps": ts.skipped_steps}
                if res.z_loss is not None:
                    values["z_loss"] = res.z_loss
                logger.log("train", step, values)
                logger.print(format_train_line(step, cfg.train_iters, values))
                window_time, window_steps, window_losses = 0.0, 0, []
            if res.layer_norms is not None:
                logger.log("grad_norms", step, flatten_grad_norms(res.layer_norms))
            if diagnostics is not None:
                logger.log("diagnostics", step, diagnostics)

            if cfg.evaluates and (step % cfg.eval_interval == 0 or step == cfg.train_iters):
                watchdog.progress(f"evaluation at step {step}")
                result = evaluate(engine, validation_batches(valid_ds, n_valid, cfg.micro_batch_size, dp_rank, dp_size,
                                                             budgets), token_loss_fn, dp_group, pad_id)
                evals.append({"step": step, **result})
                logger.log("valid", step, result)
                logger.print(f"step {step}: validation loss {result['valid_loss']:.4f} | perplexity "
                             f"{result['valid_ppl']:.3f} ({result['valid_tokens']:,} tokens)")

            if ts.bad_steps_in_a_row >= cfg.max_bad_steps:
                stop_reason = "diverged"
            if stop_reason == "diverged":
                logger.log("event", step, {"event": "diverged", "loss": res.loss})
            elif res.stop_requested:
                stop_reason = "preempted"
                stop_signal = res.stop_signal
            elif cfg.exit_interval and step % cfg.exit_interval == 0 and step < cfg.train_iters:
                stop_reason = "exit_interval"
            elif res.time_up and step < cfg.train_iters:
                stop_reason = "exit_duration"
                logger.print(f"step {step}: --exit-duration-in-mins {limit:g} reached "
                             f"({_minutes_since(start):.2f} min on rank 0's clock); saving and exiting")
            # While a spike is under way (rollback on), no periodic save, and a stop save prunes nothing:
            # the good checkpoint must survive (the stop save carries the open streak in ts.monitors).
            in_spike = rollback is not None and rollback.in_spike
            periodic = cfg.save_interval and step % cfg.save_interval == 0 and not in_spike
            if cfg.save and (stop_reason or periodic or step == cfg.train_iters):
                watchdog.progress(f"checkpoint save at step {step}")
                ts.monitors = _monitor_states(spikes, rollback)
                tag = save_checkpoint(engine, cfg.save, ts, model_config, cfg, 0 if in_spike else cfg.keep_last, dp_size,
                                      cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size, fingerprint)
                logger.print(f"step {step}: saved checkpoint {cfg.save}/{tag}")
            if stop_reason:
                break
    finally:
        preempt.restore()
        logger.close()
    if stop_reason == "preempted":
        where = f"checkpoint saved in {cfg.save}" if cfg.save else "no --save given, nothing saved"
        if is_rank0():
            print(f"preemption signal ({stop_signal}) at iteration {ts.iteration}: "
                  f"{where}; exiting cleanly", flush=True)
    return {"history": history, "evals": evals, "train_state": asdict(ts), "stop_reason": stop_reason or "done",
            "engine": engine, "global_batch_size": global_batch, "gradient_accumulation_steps": ga}


def _check_writable(path: str, flag: str) -> None:
    import os

    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{flag} {path}: cannot create the directory: {exc.strerror}") from None
    if not os.access(path, os.W_OK):
        raise UsageError(f"{flag} {path}: not writable")


def _paper_modes(model_config: ModelConfig, cfg: TrainingConfig) -> str:
    """The paper-faithful choices of this run, in one line (they are also in config.json)."""
    parts = [f"sample-mode {cfg.sample_mode}", "pure bf16" if cfg.bf16_pure else "bf16 (fp32 masters)" if cfg.bf16
             else "fp32", f"eval {cfg.eval_tokens} tokens" if cfg.eval_tokens else f"eval {cfg.eval_iters} iters",
             f"embedding std {'sqrt(2/5)' if model_config.scaled_embedding_init else model_config.init_method_std}"]
    if model_config.scaled_output_layers:
        parts.append(f"scaled output init on layers {list(model_config.scaled_output_layers)}")
    if model_config.gated_layers:
        parts.append(f"residual gates on layers {list(model_config.gated_layers)} (init {model_config.residual_gate_init})")
    if model_config.freeze_pad_embedding:
        parts.append(f"frozen pad embedding row {model_config.pad_id}")
    if cfg.rollback_on_spike:
        parts.append(f"rollback on spike x{cfg.rollback_on_spike} for {cfg.rollback_patience} steps "
                     f"(lr factor {cfg.rollback_lr_factor})")
    return ", ".join(parts)


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
    restored = load_checkpoint(engine, cfg.save, tag)
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
