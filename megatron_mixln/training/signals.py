"""Stop requests: SIGTERM (what schedulers and `kill` send), SIGUSR1 (Slurm's --signal=B:USR1@120) and
SIGINT (Ctrl-C) only set a flag. The training loop checks it after each step -- all ranks agree through
the step's all_reduce -- then saves, prints one line and exits 0 (as Megatron-LM's
DistributedSignalHandler and torchtitan do for a termination request). Doing the work in the handler
itself could interrupt a collective or a half-written file.

A second SIGINT (Ctrl-C pressed again) aborts at once: one line on stderr, exit 130 (128 + SIGINT, as a
shell reports it), nothing saved beyond the checkpoints already complete.

A signal can come before the training loop exists (Slurm's USR1 during the rendezvous or model
build): `install_early_handlers()`, called first thing by `python -m megatron_mixln.pretrain`,
records it, and the loop's PreemptionFlag starts raised, so the run stops after its first step --
on every rank, since the flag rides on that step's all_reduce. That is the one outcome of a signal
that lands during start-up, whenever it lands.
"""
from __future__ import annotations

import os
import signal
import sys

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
ABORT_EXIT_CODE = 128 + signal.SIGINT  # a second Ctrl-C
_EARLY: list[str] = []  # names of stop signals received before a PreemptionFlag took over


def _abort_on_second_sigint(signum: int, seen: list[str]) -> None:
    """Ctrl-C after an earlier Ctrl-C (`seen`: the signals so far): leave now, without cleanup that could
    block (a collective)."""
    if signum == signal.SIGINT and "SIGINT" in seen:
        rank = os.environ.get("RANK")
        prefix = f"[rank {rank}] " if rank not in (None, "0") else ""
        sys.stderr.write(f"{prefix}second SIGINT: aborting without saving (exit {ABORT_EXIT_CODE}); the newest "
                         "complete checkpoint is the resume point\n")
        sys.stderr.flush()
        os._exit(ABORT_EXIT_CODE)


def _record_early(signum, frame):
    _abort_on_second_sigint(signum, _EARLY)
    _EARLY.append(signal.Signals(signum).name)


def install_early_handlers(signals=PREEMPTION_SIGNALS) -> None:
    """Record (instead of dying of) stop signals until the training loop installs its flag."""
    for sig in signals:
        signal.signal(sig, _record_early)


class PreemptionFlag:
    """Raised by the first stop signal (or one recorded during start-up); `signal_name` names it."""

    def __init__(self, signals=PREEMPTION_SIGNALS):
        self.signal_name: str | None = _EARLY[-1] if _EARLY else None  # one that came before the loop
        self._seen: list[str] = list(_EARLY)
        _EARLY.clear()
        self._previous = {}
        for sig in signals:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. some test harnesses): no handler
                pass

    def _handle(self, signum, frame):
        _abort_on_second_sigint(signum, self._seen)
        self._seen.append(signal.Signals(signum).name)
        self.signal_name = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
