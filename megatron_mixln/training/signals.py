"""Preemption: SIGTERM (what schedulers and `kill` send) or SIGUSR1 (Slurm's --signal=B:USR1@120)
only sets a flag. The training loop checks it after each step -- all ranks agree through the step's
all_reduce -- then saves and exits 0. Doing the work in the handler itself could interrupt a
collective or a half-written file.
"""
from __future__ import annotations

import signal

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionFlag:
    def __init__(self, signals=PREEMPTION_SIGNALS):
        self.signal_name: str | None = None
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
