"""The training run's typed config. Field names follow Megatron-LM's flags (--train-iters -> train_iters).

Model shape flags live in `ModelConfig`; everything about *how* to train lives here. Both are
filled from the same command line / config file by `megatron_mixln.training.arguments`.
"""
from __future__ import annotations

import os

from dataclasses import dataclass, field, fields

from megatron_mixln.diagnostics.stability import parse_diagnostics
from megatron_mixln.errors import UsageError

OPTIMIZERS = ("adam", "adamw")
LR_DECAY_STYLES = ("cosine", "linear", "constant")
WANDB_MODES = ("offline", "online", "disabled")
SAMPLE_MODES = ("pack", "truncate-pad")


def _help(text: str, **kw):
    return field(metadata={"help": text}, **kw)


@dataclass
class TrainingConfig:
    # --- data ---
    data_path: list[str] | None = _help(
        "indexed dataset prefix(es), optionally weighted: 'PREFIX' or '0.3 A 0.7 B'", default=None
    )
    valid_data_path: list[str] | None = _help(
        "separate validation prefix(es) (e.g. C4 validation); then --data-path is all training data", default=None
    )
    split: str = _help("train,valid,test proportions of the documents of --data-path", default="969,30,1")
    data_cache_path: str | None = _help("where sample-index caches go (default: beside the data)", default=None)
    tokenizer: str | None = _help(
        "tokenizer (sentencepiece .model, tokenizer.json, or null:N); checks and defaults --vocab-size", default=None
    )
    make_vocab_size_divisible_by: int = _help("pad the tokenizer's vocab to a multiple of this", default=128)
    sample_mode: str = _help(
        "pack: Megatron's packed samples spanning documents; truncate-pad: the Mix-LN reference loader, one "
        "document per sample truncated/right-padded to seq+1 tokens, padding out of the loss and token counts",
        default="pack")
    # --- batch ---
    micro_batch_size: int = _help("sequences per process per forward/backward", default=4)
    global_batch_size: int | None = _help(
        "sequences per optimizer step over all data-parallel ranks (default: micro x dp)", default=None
    )
    train_iters: int = _help("optimizer steps in the whole run (sets the LR schedule length)", default=1000)
    exit_interval: int | None = _help("save and exit after the iteration divisible by this", default=None)
    # --- optimizer and schedule ---
    optimizer: str = _help("adam (no weight decay: the paper's setting) or adamw", default="adamw")
    lr: float = _help("peak learning rate", default=1e-3)
    min_lr: float | None = _help("final learning rate (default: 0.1 x --lr, the paper's setting)", default=None)
    lr_decay_style: str = _help(f"one of {', '.join(LR_DECAY_STYLES)}", default="cosine")
    lr_warmup_iters: int | None = _help("linear warm-up steps from 0 (default 0)", default=None)
    lr_warmup_fraction: float | None = _help("warm-up as a fraction of --lr-decay-iters", default=None)
    lr_decay_iters: int | None = _help("steps from start to the end of decay (default: --train-iters)", default=None)
    weight_decay: float | None = _help("decoupled weight decay (default: 0.01 for adamw, 0 for adam)", default=None)
    adam_beta1: float = _help("Adam beta1", default=0.9)
    adam_beta2: float = _help("Adam beta2", default=0.999)
    adam_eps: float = _help("Adam epsilon", default=1e-8)
    clip_grad: float = _help("clip the global gradient norm to this (0 disables)", default=1.0)
    torch_adam: bool | None = _help(
        "use torch.optim Adam/AdamW (default: yes, unless the optimizer is offloaded: DeepSpeedCPUAdam)", default=None
    )
    # --- precision, engine ---
    bf16: bool = _help("bf16 parameters and activations (fp32 master weights in the optimizer)", default=False)
    bf16_pure: bool = _help(
        "the whole model and Adam's states in bf16, no fp32 master weights (the reference code; ZeRO 0 only)",
        default=False)
    deepspeed_config: str | None = _help(
        "DeepSpeed JSON (ds_configs/zero*.json); its batch/clip/optimizer/bf16 fields are filled from the flags",
        default=None,
    )
    zero_stage: int | None = _help("ZeRO stage 0-3 (checked against --deepspeed-config; default 0 without one)", default=None)
    recompute_activations: bool = _help("activation checkpointing of every transformer block", default=False)
    compile: bool = _help("torch.compile each transformer block and the loss", default=False)
    compile_backend: str = _help("torch.compile backend: inductor, or aot_eager / eager to debug", default="inductor")
    tensor_model_parallel_size: int = _help("tensor-parallel ranks", default=1)
    pipeline_model_parallel_size: int = _help("pipeline stages", default=1)
    sequence_parallel: bool = _help("Megatron sequence parallelism (needs tensor parallelism)", default=False)
    distributed_timeout_minutes: float = _help(
        "rendezvous and collective timeout; a rank that cannot reach MASTER_ADDR:MASTER_PORT exits after it",
        default=10.0,
    )
    # --- evaluation, checkpoints ---
    eval_interval: int = _help("validate every N steps (and at the end)", default=1000)
    eval_iters: int = _help("validation set = eval_iters x global batch sequences (0 disables)", default=100)
    eval_tokens: int | None = _help(
        "validate on exactly this many target tokens (token-weighted; the paper ~10M); overrides --eval-iters",
        default=None)
    save: str | None = _help("checkpoint directory (also the run directory unless --run-dir)", default=None)
    load: str | None = _help("checkpoint directory to resume from", default=None)
    save_interval: int | None = _help("save every N steps (default: only at the end and on preemption)", default=None)
    keep_last: int = _help("keep the newest K checkpoints (0 keeps all)", default=2)
    tag: str | None = _help(
        "checkpoint tag of --load to resume (default: the one 'latest' names, falling back to the newest older "
        "one that verifies); a named tag that fails verification is an error", default=None
    )
    verify_checkpoint: bool = _help(
        "check each file of the loaded checkpoint against its manifest checksum (sizes are always checked)",
        default=True,
    )
    override_opt_param_scheduler: bool = _help(
        "resume with this run's LR schedule flags even though they differ from the checkpoint's (the LR curve "
        "changes at the resume step); Megatron-LM's --override-opt_param-scheduler", default=False,
    )
    use_checkpoint_opt_param_scheduler: bool = _help(
        "resume with the checkpoint's LR schedule (--lr, --min-lr, --lr-warmup-iters, --lr-decay-iters, "
        "--lr-decay-style) in place of this run's; Megatron-LM's --use-checkpoint-opt_param-scheduler", default=False,
    )
    override_data_check: bool = _help(
        "resume even though the data files differ from the checkpoint's fingerprint (size, mtime, .idx hash)",
        default=False,
    )
    # --- failure handling ---
    hang_timeout: float | None = _help(
        "seconds without progress in a step, evaluation or save before every rank dumps its Python stacks and "
        "exits 124 (default: 1800 on GPU, off on CPU; 0 disables)", default=None
    )
    exit_duration_in_mins: float | None = _help(
        "save and exit cleanly after this many minutes of wall-clock time (all ranks stop at the same step)",
        default=None,
    )
    # --- logging ---
    run_dir: str | None = _help("metrics.jsonl and config.json go here (default: --save)", default=None)
    log_interval: int = _help("console/metrics line every N steps", default=10)
    grad_norm_interval: int = _help("log per-layer gradient norms every N steps (0 disables)", default=100)
    diagnostics_interval: int = _help(
        "measure the instability diagnostics (--diagnostics) on one micro-batch every N steps (0 disables)",
        default=0)
    diagnostics: str = _help(
        "comma-separated diagnostics for --diagnostics-interval: activations (residual RMS in/out, max, "
        "max/median, kurtosis), attention (max logit, entropy per head), logits (output logsumexp z), "
        "updates (||dw||/||w||, weight norms)", default="activations,attention,logits,updates")
    tensorboard_dir: str | None = _help(
        "also write the metrics as TensorBoard scalars here (rank 0 only, as Megatron-LM's flag)", default=None)
    peak_tflops: float | None = _help("per-device peak TFLOP/s for MFU (default: by device and dtype)", default=None)
    wandb_project: str | None = _help("log to Weights & Biases under this project", default=None)
    wandb_name: str | None = _help("wandb run name (default: the norm position)", default=None)
    wandb_mode: str = _help(f"one of {', '.join(WANDB_MODES)}", default="offline")
    # --- stability, reproducibility ---
    max_bad_steps: int = _help("save and stop after N consecutive NaN/Inf steps (skipped, not applied)", default=5)
    z_loss_weight: float = _help("z-loss W: adds W * logsumexp(logits)^2 per token to the loss (PaLM, OLMo 2 use "
                                 "1e-4), logged apart as z_loss", default=0.0)
    spike_factor: float = _help("log a loss spike when loss > factor x running mean (0 disables)", default=1.5)
    rollback_on_spike: float = _help(
        "loss > FACTOR x running mean (or non-finite) for --rollback-patience steps in a row: reload the last "
        "good checkpoint and skip the data seen since it (0 disables; needs --save and --save-interval)", default=0.0)
    rollback_patience: int = _help("consecutive spiking steps that trigger a rollback", default=3)
    rollback_lr_factor: float = _help("multiply the LR by this after each rollback (1 keeps it)", default=1.0)
    max_rollbacks: int = _help("stop as diverged after this many rollbacks", default=3)
    seed: int = _help("random seed (model init, data order)", default=1234)

    def __post_init__(self):
        def positive(name, allow_zero=False, allow_none=False):
            v = getattr(self, name)
            if v is None and allow_none:
                return
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (v >= 0 if allow_zero else v > 0)
            if not ok:
                raise UsageError(f"--{name.replace('_', '-')}: must be {'>= 0' if allow_zero else '> 0'}, got {v!r}")

        for name in ("micro_batch_size", "train_iters", "lr", "eval_interval", "log_interval",
                     "distributed_timeout_minutes", "make_vocab_size_divisible_by", "tensor_model_parallel_size",
                     "pipeline_model_parallel_size", "max_bad_steps"):
            positive(name)
        for name in ("eval_iters", "grad_norm_interval", "diagnostics_interval", "keep_last", "clip_grad", "spike_factor",
                     "adam_eps", "z_loss_weight"):
            positive(name, allow_zero=True)
        for name in ("save", "run_dir", "tensorboard_dir"):  # directories we create: a file there fails late
            path = getattr(self, name)
            if path and os.path.exists(path) and not os.path.isdir(path):
                raise UsageError(f"--{name.replace('_', '-')} {path}: is a file; give a directory (it is created)")
        for name in ("global_batch_size", "exit_interval", "save_interval", "lr_decay_iters", "peak_tflops",
                     "exit_duration_in_mins"):
            positive(name, allow_none=True)
        for name in ("min_lr", "weight_decay", "lr_warmup_iters", "hang_timeout"):
            positive(name, allow_zero=True, allow_none=True)
        for name in ("data_path", "valid_data_path"):
            if isinstance(getattr(self, name), str):
                setattr(self, name, getattr(self, name).split())
        if self.optimizer not in OPTIMIZERS:
            raise UsageError(f"--optimizer: unknown {self.optimizer!r}; allowed: {', '.join(OPTIMIZERS)}")
        if self.lr_decay_style not in LR_DECAY_STYLES:
            raise UsageError(f"--lr-decay-style: unknown {self.lr_decay_style!r}; allowed: {', '.join(LR_DECAY_STYLES)}")
        if self.wandb_mode not in WANDB_MODES:
            raise UsageError(f"--wandb-mode: unknown {self.wandb_mode!r}; allowed: {', '.join(WANDB_MODES)}")
        if self.weight_decay is None:
            self.weight_decay = 0.01 if self.optimizer == "adamw" else 0.0
        if self.optimizer == "adam" and self.weight_decay > 0:
            raise UsageError(
                f"--weight-decay {self.weight_decay} with --optimizer adam: Adam's weight decay is an L2 term "
                "coupled to the adaptive step; use --optimizer adamw for (decoupled) weight decay"
            )
        if self.min_lr is None:
            self.min_lr = 0.1 * self.lr
        if self.min_lr > self.lr:
            raise UsageError(f"--min-lr {self.min_lr} is larger than --lr {self.lr}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise UsageError(f"--{name.replace('_', '-')}: must be in [0, 1), got {getattr(self, name)}")
        if self.lr_decay_iters is None:
            self.lr_decay_iters = self.train_iters
        if self.lr_warmup_iters is not None and self.lr_warmup_fraction is not None:
            raise UsageError("--lr-warmup-iters and --lr-warmup-fraction: give one, not both")
        if self.lr_warmup_fraction is not None:
            if not 0.0 <= self.lr_warmup_fraction < 1.0:
                raise UsageError(f"--lr-warmup-fraction: must be in [0, 1), got {self.lr_warmup_fraction}")
            self.lr_warmup_iters = warmup_iters_from_fraction(self.lr_warmup_fraction, self.lr_decay_iters)
            self.lr_warmup_fraction = None  # resolved: the config now says one thing only
        if self.lr_warmup_iters is None:
            self.lr_warmup_iters = 0
        if self.lr_warmup_iters > self.lr_decay_iters:
            raise UsageError(
                f"--lr-warmup-iters {self.lr_warmup_iters} is longer than the decay ({self.lr_decay_iters} steps)"
            )
        if self.compile:
            import torch._dynamo

            backends = torch._dynamo.list_backends(exclude_tags=())
            if self.compile_backend not in backends:
                raise UsageError(f"--compile-backend: unknown {self.compile_backend!r}; allowed: {', '.join(backends)}")
        self._check_paper_modes()
        if self.zero_stage is not None and self.zero_stage not in (0, 1, 2, 3):
            raise UsageError(f"--zero-stage: must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.tag is not None and not self.load:
            raise UsageError(f"--tag {self.tag}: needs --load (the checkpoint directory the tag is in)")
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise UsageError("--sequence-parallel needs --tensor-model-parallel-size > 1")
        if self.pipeline_model_parallel_size > 1 and self.zero_stage is not None and self.zero_stage > 1:
            raise UsageError(
                f"--pipeline-model-parallel-size {self.pipeline_model_parallel_size} with --zero-stage "
                f"{self.zero_stage}: DeepSpeed's pipeline engine supports ZeRO stage 0 or 1 only"
            )
        try:
            parse_diagnostics(self.diagnostics)
        except ValueError as exc:
            raise UsageError(str(exc)) from None

    def _check_paper_modes(self) -> None:
        if self.sample_mode not in SAMPLE_MODES:
            raise UsageError(f"--sample-mode: unknown {self.sample_mode!r}; allowed: {', '.join(SAMPLE_MODES)}")
        if self.bf16 and self.bf16_pure:
            raise UsageError("--bf16 and --bf16-pure: give one (--bf16 keeps fp32 master weights, --bf16-pure none)")
        if self.bf16_pure and self.zero_stage not in (None, 0):
            raise UsageError(f"--bf16-pure with --zero-stage {self.zero_stage}: pure bf16 trains the bf16 weights "
                             "in place, which only ZeRO stage 0 does (ZeRO 1-3 keep fp32 partitions)")
        if self.eval_tokens is not None and self.eval_tokens <= 0:
            raise UsageError(f"--eval-tokens: must be > 0, got {self.eval_tokens}")
        if self.pipeline_model_parallel_size > 1 and (self.sample_mode != "pack" or self.eval_tokens):
            raise UsageError("--sample-mode truncate-pad and --eval-tokens mask tokens out of the loss, which the "
                             "pipeline engine's loss does not do: use --pipeline-model-parallel-size 1")
        if self.rollback_on_spike:
            if self.rollback_on_spike <= 1.0:
                raise UsageError(f"--rollback-on-spike: must be > 1 (a factor over the running mean) or 0, "
                                 f"got {self.rollback_on_spike}")
            if not (self.save and self.save_interval):
                raise UsageError("--rollback-on-spike needs --save and --save-interval (the good checkpoints to "
                                 "roll back to)")
            if self.keep_last == 1:
                raise UsageError("--rollback-on-spike with --keep-last 1: keep at least 2 checkpoints, so one from "
                                 "before the spike survives")
        if self.rollback_patience < 1 or self.max_rollbacks < 1:
            raise UsageError("--rollback-patience and --max-rollbacks: must be >= 1")
        if not 0.0 < self.rollback_lr_factor <= 1.0:
            raise UsageError(f"--rollback-lr-factor: must be in (0, 1], got {self.rollback_lr_factor}")

    @property
    def evaluates(self) -> bool:
        return bool(self.eval_tokens) or self.eval_iters > 0

    @property
    def run_directory(self) -> str | None:
        return self.run_dir or self.save

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}


def warmup_iters_from_fraction(fraction: float, decay_iters: int) -> int:
    """Megatron's warm-up of `fraction * decay_iters` steps, rounded to the nearest whole step (halves
    up). The product is taken exactly, on the decimal the user wrote (`Fraction(repr(fraction))`): in
    floating point 0.29 * 100 is 28.999999999999996, and the result must be 29 steps."""
    from fractions import Fraction

    exact = Fraction(repr(float(fraction))) * decay_iters
    return int(exact + Fraction(1, 2))  # floor(x + 1/2) for x >= 0


def gradient_accumulation_steps(global_batch_size: int, micro_batch_size: int, data_parallel_size: int) -> int:
    """global = micro x data-parallel size x accumulation steps; anything else is an error."""
    per_step = micro_batch_size * data_parallel_size
    if global_batch_size % per_step:
        raise UsageError(
            f"--global-batch-size {global_batch_size} is not divisible by --micro-batch-size {micro_batch_size} "
            f"x data-parallel size {data_parallel_size} (= {per_step}); choose a global batch that is a "
            f"multiple of {per_step}"
        )
    return global_batch_size // per_step
