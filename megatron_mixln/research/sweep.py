"""A sweep's variants and their pretraining command lines, validated before anything trains.

A variant = one norm position (for `mix`: one post-layer fraction, or the k of the config/flags), one
seed and, with --lr-sweep, one peak learning rate. Every variant gets the same pass-through pretraining flags, so data order, initial seed,
LR schedule, batch and evaluation set are identical for a given seed; only the swept setting
differs. Flags that the sweep sets itself are refused in the pass-through list.

The sweep's identity (`sweep.json` in the output directory) is every config field except the swept
ones; a directory holding runs of another configuration is refused, naming the differing fields.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shlex
import sys
from dataclasses import dataclass, field

from megatron_mixln.errors import UsageError
from megatron_mixln.model.positions import ALIASES, POSITIONS

# Named norm-zoo variants (docs/norm-zoo.md): a position plus the flags that make the published recipe.
ZOO_VARIANTS = {
    "olmo2-recipe": ["--norm-position", "reordered", "--qk-norm", "full", "--z-loss-weight", "1e-4"],
    "qwen3-qk": ["--norm-position", "pre", "--qk-norm", "head"],
    "hybridnorm-star": ["--norm-position", "hybridnorm-star"],
    "dyt-pre": ["--norm-position", "pre", "--normalization", "DyT"],
    "derf-pre": ["--norm-position", "pre", "--normalization", "Derf"],
}

SWEPT_FIELDS = ("norm_position", "post_ln_layers", "post_ln_fraction", "seed")
HARNESS_FIELDS = ("save", "load", "run_dir", "wandb_name", "tensorboard_dir")
LR_FIELD = "lr"  # swept (and then owned by the sweep) only with --lr-sweep
OWNED_FLAGS = tuple("--" + f.replace("_", "-") for f in SWEPT_FIELDS + HARNESS_FIELDS)
# Fields that do not change what a run computes (interruption, bookkeeping): not part of the identity.
NEUTRAL_FIELDS = ("exit_interval", "save_interval", "keep_last", "wandb_project", "wandb_mode", "data_cache_path",
                  "log_interval", "peak_tflops")
SWEEP_FILE = "sweep.json"
SWEEP_CONFIG = "sweep_config.json"


class SweepError(UsageError):
    """Bad sweep input, found before any training; the message names the flag or file."""


@dataclass(frozen=True)
class Variant:
    position: str  # a POSITIONS name or "mix"
    fraction: float | None  # mix: swept post-layer fraction (None: k from --post-ln-layers / the config)
    post_ln_layers: int | None  # mix without a fraction sweep
    seed: int
    lr: float | None = None  # --lr-sweep: this run's peak learning rate

    @property
    def base_setting(self) -> str:
        """The norm setting alone: 'pre', 'mix', 'mix-a0.25' (what an LR sweep compares)."""
        if self.position != "mix":
            return self.position
        if self.fraction is not None:
            return f"mix-a{self.fraction:g}"
        return "mix" if self.post_ln_layers is None else f"mix-k{self.post_ln_layers}"

    @property
    def setting(self) -> str:
        """The swept setting without the seed: 'pre', 'mix-a0.25', 'mix-lr0.001' (with --lr-sweep)."""
        return self.base_setting if self.lr is None else f"{self.base_setting}-lr{self.lr:g}"

    @property
    def name(self) -> str:
        return f"{self.setting}-s{self.seed}"

    def flags(self) -> list[str]:
        out = list(ZOO_VARIANTS.get(self.position, ["--norm-position", self.position]))
        if self.fraction is not None:
            out += ["--post-ln-fraction", repr(self.fraction)]
        elif self.post_ln_layers is not None:
            out += ["--post-ln-layers", str(self.post_ln_layers)]
        if self.lr is not None:
            out += ["--lr", repr(self.lr)]
        return out + ["--seed", str(self.seed)]


@dataclass
class Sweep:
    variants: list[Variant]
    passthrough: list[str]  # pretraining flags for every run (a --config replaced by the sweep's copy)
    config_values: dict = field(default_factory=dict)  # the --config file's values minus the swept fields
    out: str = ""
    lrs: list[float] | None = None  # --lr-sweep

    def run_dir(self, v: Variant) -> str:
        return os.path.join(self.out, "runs", v.name)

    def pretrain_args(self, v: Variant, config_path: str | None = None) -> list[str]:
        """The pretraining flags of one run (without --load, which the launcher adds when resuming)."""
        args = list(self.passthrough)
        if self.config_values:
            args = ["--config", config_path or os.path.join(self.out, SWEEP_CONFIG)] + args
        run = self.run_dir(v)
        return args + v.flags() + ["--save", os.path.join(run, "ckpt"), "--run-dir", run, "--wandb-name", v.name,
                                   "--tensorboard-dir", os.path.join(self.out, "tensorboard", v.name)]


def parse_list(text: str, flag: str, kind):
    items = [s.strip() for s in str(text).split(",")]
    if not all(items):
        raise SweepError(f"{flag} {text!r}: empty entry; expected a comma-separated list")
    try:
        return [kind(s) for s in items]
    except ValueError:
        raise SweepError(f"{flag} {text!r}: expected a comma-separated list of {kind.__name__}s") from None


def parse_positions(text: str) -> list[str]:
    allowed = POSITIONS + ("mix",) + tuple(ZOO_VARIANTS)
    out = []
    for p in parse_list(text, "--positions", str):
        name = p if p in ZOO_VARIANTS else ALIASES.get(p, p)
        if name not in allowed:
            raise SweepError(f"--positions: unknown position {p!r}; allowed: {', '.join(allowed)} "
                             f"(aliases: {', '.join(ALIASES)})")
        if name in out:
            raise SweepError(f"--positions: {p!r} given twice")
        out.append(name)
    return out


def parse_fractions(text: str | None) -> list[float] | None:
    if text is None:
        return None
    values = parse_list(text, "--post-ln-fraction", float)
    for f in values:
        if not (math.isfinite(f) and 0.0 <= f <= 1.0):
            raise SweepError(f"--post-ln-fraction: {f!r} is not a fraction of the layers in [0, 1]")
    if len(set(values)) != len(values):
        raise SweepError(f"--post-ln-fraction {text!r}: a fraction is given twice")
    return values


def parse_lrs(text: str | None) -> list[float] | None:
    """--lr-sweep '3e-4,1e-3,3e-3' -> [3e-4, 1e-3, 3e-3]: two or more distinct positive rates."""
    if text is None:
        return None
    values = parse_list(text, "--lr-sweep", float)
    if any(not (math.isfinite(v) and v > 0) for v in values):
        raise SweepError(f"--lr-sweep {text!r}: learning rates must be positive numbers")
    if len(set(values)) != len(values):
        raise SweepError(f"--lr-sweep {text!r}: a learning rate is given twice")
    if len(values) < 2:
        raise SweepError(f"--lr-sweep {text!r}: the LR sensitivity needs at least two learning rates "
                         "(for one, pass --lr)")
    return sorted(values)


ZOO_FIELDS = ("qk_norm", "normalization", "z_loss_weight")  # set per run by the ZOO_VARIANTS
ZOO_FLAGS = tuple("--" + f.replace("_", "-") for f in ZOO_FIELDS)
# defaults that follow a per-run field: the DyT/Derf variants' --normalization turns on --learnable-embedding-scale
ZOO_DERIVED_FIELDS = ("learnable_embedding_scale",)


def check_passthrough(args: list[str], lr_swept: bool = False, positions=()) -> None:
    zoo = [p for p in positions if p in ZOO_VARIANTS]
    for a in args:
        name = a.split("=", 1)[0]
        if lr_swept and name == "--lr":
            raise SweepError("--lr: set per run by --lr-sweep; drop it from the pretraining flags")
        if zoo and name in ZOO_FLAGS:
            raise SweepError(f"{name}: set per run by the zoo variant(s) {', '.join(zoo)} in --positions; drop it "
                             "from the pretraining flags")
        if name in OWNED_FLAGS:
            raise SweepError(f"{name}: set by the sweep for every run (swept: --positions, --post-ln-fraction, "
                             f"--seeds; per-run: --save/--run-dir under --out); drop it from the pretraining flags")


def extract_config(args: list[str]) -> tuple[str | None, list[str]]:
    """Pull `--config FILE` out of the pass-through flags."""
    out, path, i = [], None, 0
    while i < len(args):
        if args[i] == "--config" and i + 1 < len(args):
            path, i = args[i + 1], i + 2
        elif args[i].startswith("--config="):
            path, i = args[i].split("=", 1)[1], i + 1
        else:
            out.append(args[i])
            i += 1
    return path, out


def build_sweep(positions: str, fractions: str | None, seeds: str, post_ln_layers: int | None,
                passthrough: list[str], out: str, lr_sweep: str | None = None) -> Sweep:
    """Parse and expand the sweep. A --config file's swept fields are taken out of it (its post_ln_layers
    becomes the k of Mix-LN variants unless a fraction sweep is given)."""
    pos = parse_positions(positions)
    fracs = parse_fractions(fractions)
    seed_list = parse_list(seeds, "--seeds", int)
    if len(set(seed_list)) != len(seed_list):
        raise SweepError(f"--seeds {seeds!r}: a seed is given twice")
    if fracs is not None and "mix" not in pos:
        raise SweepError("--post-ln-fraction: a fraction sweep needs 'mix' in --positions")
    lrs = parse_lrs(lr_sweep)
    check_passthrough(passthrough, lrs is not None, pos)
    config_path, rest = extract_config(passthrough)
    values = {}
    if config_path:
        from megatron_mixln.training.arguments import load_config_file

        try:
            values = load_config_file(config_path)
        except UsageError as exc:
            raise SweepError(str(exc)) from None
        if post_ln_layers is None and values.get("post_ln_layers") is not None:
            post_ln_layers = int(values["post_ln_layers"])
        for name in SWEPT_FIELDS + HARNESS_FIELDS + ((LR_FIELD,) if lrs else ()):
            values.pop(name, None)
        clash = [f for f in ZOO_FIELDS if f in values] if any(p in ZOO_VARIANTS for p in pos) else []
        if clash:
            raise SweepError(f"--config {config_path}: {', '.join(clash)} set per run by the zoo variant(s) in "
                             "--positions; drop it from the file")
    variants = []
    for p in pos:
        settings = [(f, None) for f in fracs] if p == "mix" and fracs is not None else \
            [(None, post_ln_layers if p == "mix" else None)]
        variants += [Variant(p, f, k, s, lr) for f, k in settings for lr in (lrs or [None]) for s in seed_list]
    return Sweep(variants, rest, values, os.path.abspath(out), lrs)


def validate(sweep: Sweep) -> dict:
    """Parse every run's flags as the trainer will (one clear error before any training) and check that
    the runs differ in nothing but the swept setting. Returns the common configuration."""
    import tempfile

    from megatron_mixln.training.arguments import parse_configs
    from megatron_mixln.training.data import check_data_path

    common = None
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path = os.path.join(tmp, SWEEP_CONFIG)
        with open(cfg_path, "w") as fh:
            json.dump(sweep.config_values, fh)
        for v in sweep.variants:
            parser_output = io.StringIO()  # argparse prints the trainer's whole usage before its error line
            try:
                with contextlib.redirect_stderr(parser_output):
                    model, train = parse_configs(sweep.pretrain_args(v, cfg_path))
            except SystemExit:
                lines = [ln for ln in parser_output.getvalue().splitlines() if ": error: " in ln]
                reason = lines[-1].split(": error: ", 1)[1].removesuffix(" (see --help)") if lines else "the flags do not parse"
                raise SweepError(f"run {v.name}: a pretraining flag: {reason} (flags passed to the trainer: "
                                 f"{shlex.join(sweep.pretrain_args(v, cfg_path))})") from None
            except (UsageError, ValueError) as exc:
                sys.stderr.write(parser_output.getvalue())
                raise SweepError(f"run {v.name}: {exc}") from None
            sys.stderr.write(parser_output.getvalue())  # warnings of a parse that succeeded
            swept = (LR_FIELD, "min_lr") if sweep.lrs else ()  # min_lr defaults to 0.1 x lr
            if any(u.position in ZOO_VARIANTS for u in sweep.variants):
                swept += ZOO_FIELDS + ZOO_DERIVED_FIELDS
            this = {"model": _strip(model.to_dict(), swept), "training": _strip(train.to_dict(), swept)}
            if common is None:
                common = this
                try:
                    check_data_path(train.data_path)
                    if train.valid_data_path:
                        check_data_path(train.valid_data_path, "--valid-data-path")
                except UsageError as exc:
                    raise SweepError(str(exc)) from None
            elif this != common:
                diffs = _diff(common, this)
                raise SweepError(f"run {v.name} differs from run {sweep.variants[0].name} in {', '.join(diffs)}, "
                                 "not only in the swept setting")
    return common


def _strip(d: dict, swept: tuple = ()) -> dict:
    return {k: v for k, v in d.items() if k not in SWEPT_FIELDS + HARNESS_FIELDS + NEUTRAL_FIELDS + swept}


def _diff(a: dict, b: dict) -> list[str]:
    out = []
    for part in a:
        for key in sorted(set(a[part]) | set(b[part])):
            if a[part].get(key) != b[part].get(key):
                out.append(f"{key} ({a[part].get(key)!r} vs {b[part].get(key)!r})")
    return out


def check_out_dir(out: str, common: dict) -> None:
    """Refuse a directory that holds runs of another configuration (or runs without a sweep record)."""
    path = os.path.join(out, SWEEP_FILE)
    if os.path.isfile(path):
        with open(path) as fh:
            old = json.load(fh).get("common")
        if old != json.loads(json.dumps(common)):
            diffs = _diff(old, json.loads(json.dumps(common)))
            raise SweepError(f"--out {out}: holds runs of another configuration ({'; '.join(diffs[:6])}); "
                             "use another --out directory or the same pretraining flags")
    elif os.path.isdir(os.path.join(out, "runs")) and os.listdir(os.path.join(out, "runs")):
        raise SweepError(f"--out {out}: holds runs but no {SWEEP_FILE}, so their configuration is unknown; "
                         "use another --out directory")


def write_sweep_files(sweep: Sweep, common: dict, argv: list[str]) -> None:
    from megatron_mixln.fileio import atomic_write_json

    os.makedirs(os.path.join(sweep.out, "runs"), exist_ok=True)
    if sweep.config_values:
        atomic_write_json(os.path.join(sweep.out, SWEEP_CONFIG), sweep.config_values)
    record = {"common": common, "command": [sys.executable, *argv],
              "variants": sorted({v.name for v in sweep.variants} | _known_variants(sweep.out))}
    atomic_write_json(os.path.join(sweep.out, SWEEP_FILE), record)


def _known_variants(out: str) -> set[str]:
    path = os.path.join(out, SWEEP_FILE)
    if not os.path.isfile(path):
        return set()
    with open(path) as fh:
        return set(json.load(fh).get("variants", []))
