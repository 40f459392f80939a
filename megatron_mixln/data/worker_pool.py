"""A small process pool for shard tasks that notices dead workers.

``multiprocessing.Pool`` waits forever for the result of a worker killed by the OOM killer, and
``ProcessPoolExecutor`` cannot stop running tasks on error. Here each worker pulls tasks from a
queue and reports progress, results and errors on another; the parent watches the workers' exit
codes, and on any error terminates them at once (finished shards stay on disk for a resume).
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import queue as queue_module
import signal
import sys
import traceback
from typing import Callable

from .errors import DataError
from .inputs import Task
from .shard_worker import ShardSettings, init_worker, process_task


def _die_with_parent(parent_pid: int) -> None:
    """Make sure a worker does not outlive a killed parent (``kill -9``, the OOM killer): it
    would go on tokenizing its task, then wait for the next one forever."""
    # Only where the parent is the OS parent too (fork, spawn; not forkserver).
    if sys.platform.startswith("linux") and os.getppid() == parent_pid:
        try:
            ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            return
        if os.getppid() != parent_pid:  # the parent died before that took effect
            os._exit(1)


def _next_task(tasks) -> Task | None:
    parent = multiprocessing.parent_process()
    while True:
        if parent is not None and not parent.is_alive():  # where the above is not available
            os._exit(1)
        try:
            return tasks.get(timeout=1.0)
        except queue_module.Empty:
            pass


def _worker_main(settings: ShardSettings, tasks, results,
                 parent_pid: int) -> None:
    _die_with_parent(parent_pid)
    init_worker(settings, lambda r: results.put(("progress", r)))
    while True:
        task = _next_task(tasks)
        if task is None:
            return
        try:
            results.put(("done", task.ordinal, process_task(task, settings)))
        except BaseException as err:  # noqa: BLE001 -- reported to the parent, which re-raises
            is_data_error = isinstance(err, DataError)
            results.put(("error", task.ordinal,
                         str(err) if is_data_error else traceback.format_exc(), is_data_error))
            return


def run_in_workers(todo: list[Task], settings: ShardSettings, workers: int,
                   on_progress: Callable[[tuple], None], on_done: Callable[[int, dict], None],
                   still_needed: Callable[[Task], bool]) -> None:
    """Run ``todo`` on ``workers`` processes; tasks are handed out in order, at most two per
    worker ahead, and skipped once ``still_needed`` says no (``--max-docs`` reached)."""
    ctx = multiprocessing.get_context()
    tasks, results = ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=_worker_main,
                         args=(settings, tasks, results, os.getpid()),
                         daemon=True) for _ in range(workers)]
    for proc in procs:
        proc.start()
    waiting, outstanding = list(todo), 0
    try:
        while waiting or outstanding:
            while waiting and outstanding < 2 * workers:
                task = waiting.pop(0)
                if still_needed(task):
                    tasks.put(task)
                    outstanding += 1
            try:
                message = results.get(timeout=0.2)
            except queue_module.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise DataError(
                        f"a tokenizer worker (pid {dead[0].pid}) died with exit code "
                        f"{dead[0].exitcode} (killed, e.g. out of memory?); finished shards are "
                        f"kept, rerun the same command to resume") from None
                continue
            if message[0] == "progress":
                on_progress(message[1])
            elif message[0] == "done":
                outstanding -= 1
                on_done(message[1], message[2])
            else:
                _, ordinal, text, is_data_error = message
                if is_data_error:
                    raise DataError(text)
                raise RuntimeError(f"tokenizer worker failed on task {ordinal}:\n{text}")
        for _ in procs:
            tasks.put(None)
        for proc in procs:
            proc.join()
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        for proc in procs:
            proc.join()
        for q in (tasks, results):
            q.cancel_join_thread()
            q.close()
