"""Hang watchdog: no progress for --hang-timeout seconds -> this rank's Python stacks to stderr, exit 124.

Each rank runs its own watchdog thread; the training loop reports progress before every step,
evaluation and save (`progress(what)`). When one rank is stuck (a sleeping or deadlocked step, a
dead filesystem) the others block in the next collective, so every rank's watchdog fires within
about one step of the others. A firing rank writes one line naming the rank, what it was doing and
for how long, then `faulthandler.dump_traceback(all_threads=True)`, waits `grace_s` (so that the
peers dump their stacks too before this exit breaks their collectives) and leaves with
os._exit(HANG_EXIT_CODE): no cleanup that could block again, and a non-zero code a scheduler can
requeue on. A C-level backstop (`faulthandler.dump_traceback_later`, which needs no GIL) fires
`backstop_s` later in case the stuck call holds the GIL.

Start-up (building the model, loading a checkpoint) and the first step (torch.compile, allocator
warm-up) are allowed max(timeout, STARTUP_MIN_S): they are legitimately slower than a step.

Default: 1800 s on GPU (longer than a first torch.compile step or a 7B ZeRO save to a slow shared
filesystem; raised NCCL timeouts keep NCCL's own watchdog from aborting first), off on CPU, where
runs are tests and debugging sessions (a breakpoint would look like a hang) and no GPU allocation
is being burned.
"""
from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time

from megatron_mixln.errors import EXIT_HANG

HANG_EXIT_CODE = EXIT_HANG  # 124, as timeout(1)
DEFAULT_GPU_TIMEOUT_S = 1800.0
STARTUP_MIN_S = 600.0  # start-up (build, checkpoint load) and the first step (compilation) get at least this


def resolve_hang_timeout(value: float | None, on_gpu: bool) -> float:
    """--hang-timeout as given, or the default for the device (0 = off)."""
    if value is not None:
        return float(value)
    return DEFAULT_GPU_TIMEOUT_S if on_gpu else 0.0


def grace_seconds(timeout_s: float) -> float:
    """How long a firing rank waits before exiting: 10% of the timeout, between 5 s and 60 s."""
    return min(60.0, max(5.0, 0.1 * timeout_s))


class HangWatchdog:
    """A daemon thread that fires when `progress()` has not been called for `timeout_s` seconds."""

    def __init__(self, timeout_s: float, rank: int = 0, grace_s: float | None = None, backstop_s: float = 60.0):
        self.timeout_s = float(timeout_s)
        self.rank = rank
        self.grace_s = grace_seconds(timeout_s) if grace_s is None else grace_s
        self.backstop_s = backstop_s
        self._what = "startup"
        self._last = time.monotonic()
        self._limit = max(self.timeout_s, STARTUP_MIN_S)
        self._stopped = threading.Event()
        self._thread = None

    @property
    def enabled(self) -> bool:
        return self.timeout_s > 0

    def start(self) -> "HangWatchdog":
        if self.enabled and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="mixln-hang-watchdog", daemon=True)
            self._thread.start()
            self.progress(self._what, self._limit)
        return self

    def progress(self, what: str, limit_s: float | None = None) -> None:
        """Something finished: the clock restarts for `what` (e.g. "step 12", "checkpoint save"),
        which may take `limit_s` seconds (default: the timeout)."""
        self._what, self._last = what, time.monotonic()
        self._limit = self.timeout_s if limit_s is None else limit_s
        if self._thread is not None:
            faulthandler.dump_traceback_later(self._limit + self.grace_s + self.backstop_s, exit=True)

    def stop(self) -> None:
        if self._thread is not None:
            self._stopped.set()
            faulthandler.cancel_dump_traceback_later()
            self._thread.join(timeout=5)
            self._thread = None

    def _run(self) -> None:
        poll = min(1.0, self.timeout_s / 4)
        while not self._stopped.wait(poll):
            idle = time.monotonic() - self._last
            if idle > self._limit:
                self._fire(idle)

    def _fire(self, idle: float) -> None:
        sys.stderr.write(
            f"[rank {self.rank}] hang watchdog: no progress for {idle:.0f} s in {self._what} (--hang-timeout "
            f"{self.timeout_s:g}, allowed {self._limit:g} s here); Python stacks of every thread follow, "
            f"then exit {HANG_EXIT_CODE}\n"
        )
        sys.stderr.flush()
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        time.sleep(self.grace_s)
        os._exit(HANG_EXIT_CODE)
