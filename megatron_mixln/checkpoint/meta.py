"""What the trainer records about a checkpoint: the mixln_meta.json sidecar and the client state.

mixln_meta.json (`CheckpointMeta`) is small JSON next to DeepSpeed's files, read before anything is
built or unpickled (shape and layout checks, the data fingerprint). The client state, stored by
DeepSpeed inside its model-states file under CLIENT_KEY ("mixln"), carries what an exact resume
needs: the `TrainState` counters, both configs and every rank's RNG states.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields

from megatron_mixln.checkpoint.layout import META
from megatron_mixln.fileio import atomic_write_text

CLIENT_KEY = "mixln"
CLIENT_FORMAT = 1
# The training flags that define the LR curve (Megatron's OptimizerParamScheduler checks the same ones).
LR_SCHEDULE_FIELDS = ("lr", "min_lr", "lr_warmup_iters", "lr_decay_iters", "lr_decay_style")


def lr_schedule_of(cfg) -> dict:
    """The LR-curve flags of a TrainingConfig, as recorded in mixln_meta.json."""
    return {name: getattr(cfg, name) for name in LR_SCHEDULE_FIELDS}


@dataclass
class TrainState:
    iteration: int = 0  # optimizer steps taken (applied or skipped)
    consumed_samples: int = 0  # training samples read, over all data-parallel ranks
    skipped_steps: int = 0  # non-finite steps whose update was dropped
    bad_steps_in_a_row: int = 0
    consumed_tokens: int = 0  # target tokens trained on (padding excluded), over all data-parallel ranks
    rollbacks: int = 0  # --rollback-on-spike reloads so far
    lr_scale: float = 1.0  # product of --rollback-lr-factor over the rollbacks
    monitors: dict = field(default_factory=dict)  # the loss monitors' state (spike detector, rollback streak)


@dataclass
class CheckpointMeta:
    """mixln_meta.json. A field a checkpoint predates reads as its default (None: not recorded)."""
    tag: str
    train_state: dict  # asdict(TrainState)
    model_config: dict  # ModelConfig.to_dict()
    world_size: int | None = None
    data_parallel_size: int | None = None
    zero_stage: int | None = None
    bf16: bool | None = None
    bf16_pure: bool = False
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    data_fingerprint: dict | None = None  # megatron_mixln.training.data_fingerprint
    imported_from: str | None = None  # the HF directory of a checkpoint made by hf.hf_import
    lr_schedule: dict | None = None  # LR_SCHEDULE_FIELDS of the run that wrote it (resolved values)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, default=str)

    def write(self, tag_dir: str) -> None:
        atomic_write_text(os.path.join(tag_dir, META), self.to_json())

    @classmethod
    def from_dict(cls, data: dict) -> "CheckpointMeta":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def read(cls, tag_dir: str) -> "CheckpointMeta":
        """Raises OSError when the sidecar is missing, ValueError when it is not JSON."""
        with open(os.path.join(tag_dir, META)) as fh:
            return cls.from_dict(json.load(fh))


def client_state(train_state: TrainState, model_config: dict, training_config: dict, rng_states: list) -> dict:
    """The trainer's entry of DeepSpeed's client state (under CLIENT_KEY)."""
    return {"format": CLIENT_FORMAT, "train_state": asdict(train_state), "model_config": model_config,
            "training_config": training_config, "rng_states": rng_states}
