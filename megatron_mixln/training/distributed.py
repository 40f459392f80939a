"""Process-group setup and the one place that says which ranks share data.

Works under `deepspeed`, `torchrun`, `srun` (one task per GPU) and as a plain single process:
with no launcher we create a 1-rank group through a file store, so no socket is ever opened.
"""
from __future__ import annotations

import atexit
import datetime
import os
import tempfile

import torch
import torch.distributed as dist

from megatron_mixln.errors import RendezvousError, UsageError
from megatron_mixln.training.config import TrainingConfig



def _slurm_env_to_torch():
    """srun starts one task per GPU with SLURM_* variables only; map them onto torch's names."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ or "SLURM_NTASKS" not in os.environ:
        return
    if int(os.environ["SLURM_NTASKS"]) <= 1 and "MASTER_ADDR" not in os.environ:
        return  # a single task (e.g. an interactive allocation): treat as no launcher
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")


_CREATED_GROUP = False  # whether init_distributed made the process group (then shutdown ends it)
_SET_ENV: list[str] = []  # variables it set, removed again by shutdown


def init_distributed(timeout_minutes: float | None = None, collective_timeout_s: float | None = None) -> None:
    """Initialise torch.distributed (if nobody did) and DeepSpeed's comm layer on top of it.

    `timeout_minutes` (torch's default, 10 min, when None) bounds the rendezvous and every collective;
    `collective_timeout_s`, when larger, then raises the collectives' bound alone (the hang watchdog
    must fire before NCCL aborts a stuck collective, without making a failed rendezvous wait as long).
    Raises RendezvousError, naming MASTER_ADDR:MASTER_PORT, when the launcher's rendezvous fails.
    """
    global _CREATED_GROUP
    import deepspeed

    on_cuda = torch.cuda.is_available()
    if not on_cuda:
        # DeepSpeed would JIT-compile a shared-memory all-reduce op (~30 s) on CPU; gloo is enough.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not dist.is_initialized():
        _slurm_env_to_torch()
        backend = "nccl" if on_cuda else "gloo"
        if on_cuda:  # modulo: a scheduler may already have narrowed CUDA_VISIBLE_DEVICES per task
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        limit_s = max(collective_timeout_s or 0, 60 * (timeout_minutes or 0))
        kwargs = {"timeout": datetime.timedelta(seconds=limit_s)} if limit_s else {}
        if "WORLD_SIZE" in os.environ:
            _rendezvous(backend, timeout_minutes)  # env:// from the launcher
            if collective_timeout_s and collective_timeout_s > 60 * (timeout_minutes or 10):
                from torch.distributed.distributed_c10d import _set_pg_timeout

                _set_pg_timeout(datetime.timedelta(seconds=collective_timeout_s))
        else:
            # No launcher: a 1-rank group through a file store (no TCP store), gloo bound to loopback.
            if "GLOO_SOCKET_IFNAME" not in os.environ:  # removed again by shutdown: must not leak to children
                os.environ["GLOO_SOCKET_IFNAME"] = "lo"
                _SET_ENV.append("GLOO_SOCKET_IFNAME")
            if "LOCAL_RANK" not in os.environ:  # DeepSpeed's engine insists on it
                os.environ["LOCAL_RANK"] = "0"
                _SET_ENV.append("LOCAL_RANK")
            fd, path = tempfile.mkstemp(prefix="mixln_pg_")  # an empty file is a valid new store
            os.close(fd)
            atexit.register(lambda: os.path.exists(path) and os.unlink(path))
            dist.init_process_group(backend, init_method=f"file://{path}", rank=0, world_size=1, **kwargs)
        _CREATED_GROUP = True
        _forget_stale_deepspeed_groups()
    deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False, verbose=False)


def _rendezvous(backend: str, timeout_minutes: float | None) -> None:
    """env:// init; a failure (unreachable or unresolvable address, a rank that never came) becomes one line."""
    kwargs = {} if timeout_minutes is None else {"timeout": datetime.timedelta(minutes=timeout_minutes)}
    try:
        dist.init_process_group(backend, **kwargs)
    except (dist.DistError, TimeoutError, ValueError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        addr, port = os.environ.get("MASTER_ADDR", "?"), os.environ.get("MASTER_PORT", "?")
        limit = f"{timeout_minutes:g} min" if timeout_minutes is not None else "the default timeout"
        raise RendezvousError(
            f"rendezvous with MASTER_ADDR={addr} MASTER_PORT={port} failed within {limit} (rank "
            f"{os.environ.get('RANK', '?')} of {os.environ.get('WORLD_SIZE', '?')}): {reason} -- MASTER_ADDR must "
            "be an address every node reaches (under Slurm: the first node's NodeAddr) and the port free there"
        ) from None


def _forget_stale_deepspeed_groups() -> None:
    """DeepSpeed caches subgroups of the world group; after an earlier group in this process was
    destroyed with torch's API those handles are dead, and a fresh group must not reuse them."""
    try:
        from deepspeed.utils import groups

        groups._release_process_group_references(group=None)
    except (ImportError, AttributeError):
        pass


def shutdown_distributed() -> None:
    """End the process group if init_distributed created it (a caller's own group is left alone)."""
    global _CREATED_GROUP
    from megatron_mixln.parallel import destroy_model_parallel

    destroy_model_parallel()  # forget the TP/PP groups of this run
    if _CREATED_GROUP and dist.is_initialized():
        import deepspeed.comm

        deepspeed.comm.destroy_process_group()  # also drops DeepSpeed's cached subgroups
    _CREATED_GROUP = False
    while _SET_ENV:
        os.environ.pop(_SET_ENV.pop(), None)


def setup_model_parallel(cfg: TrainingConfig):
    """The ParallelState for TP/PP > 1 (from megatron_mixln.parallel), or None for pure data parallelism."""
    tp, pp = cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size
    world = dist.get_world_size()
    if world % (tp * pp):
        raise UsageError(
            f"world size {world} is not divisible by --tensor-model-parallel-size {tp} x "
            f"--pipeline-model-parallel-size {pp}"
        )
    if tp == 1 and pp == 1:
        return None
    initialize_model_parallel = parallel_api(
        "initialize_model_parallel",
        "--tensor-model-parallel-size" if tp > 1 else "--pipeline-model-parallel-size",
    )
    return initialize_model_parallel(tp, pp)


def parallel_api(name: str, flag: str):
    """A name from megatron_mixln.parallel, or a clear NotImplementedError naming the flag that needs it."""
    import megatron_mixln.parallel as parallel

    fn = getattr(parallel, name, None)
    if fn is None:
        raise NotImplementedError(f"{flag} > 1 needs megatron_mixln.parallel.{name}, which is not available yet")
    return fn


def data_parallel_rank_and_size(state=None) -> tuple[int, int]:
    """Data parallelism only: samples are sharded over these ranks (TP/PP ranks see the same data)."""
    if state is not None:
        return state.dp_rank, state.dp_size
    return dist.get_rank(), dist.get_world_size()


def data_parallel_group(state=None):
    return state.dp_group if state is not None else None  # None = the world group


def barrier():
    if dist.is_initialized():
        dist.barrier()


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0
