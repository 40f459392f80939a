"""Preemption: SIGTERM (what schedulers and `kill` send) or SIGUSR1 (Slurm's --signal=B:USR1@120)
only sets a flag. The training loop checks it after each step -- all ranks agree through the step's
all_reduce -- then saves and exits 0. Doing the work in the handler itself could interrupt a
collective or a half-written file.

A signal can come before the training loop exists (Slurm's USR1 during the rendezvous or model
build): `install_early_handlers()`, called first thing by `python -m megatron_mixln.pretrain`,
records it, and the loop's PreemptionFlag starts raised, so the run stops after its first step.
"""
from __future__ import annotations

import signal

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_EARLY: list[str] = []  # names of preemption signals received before a PreemptionFlag took over


def _record_early(signum, frame):
    _EARLY.append(signal.Signals(signum).name)


def install_early_handlers(signals=PREEMPTION_SIGNALS) -> None:
    """Record (instead of dying of) preemption signals until the training loop installs its flag."""
    for sig in signals:
        signal.signal(sig, _record_early)


class PreemptionFlag:
    def __init__(self, signals=PREEMPTION_SIGNALS):
        self.signal_name: str | None = _EARLY[-1] if _EARLY else None  # one that came before the loop
        _EARLY.clear()
        self._previous = {}
        for sig in signals:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. some test harnesses): no handler
                pass

    def _handle(self, signum, frame):
        self.signal_name = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
