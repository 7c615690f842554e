"""Running a job's steps each in a fresh interpreter, and the memory that takes.

A step in its own process trains the same whether or not earlier steps ran (no allocator or library state
carried over), and hands all its memory back when it ends.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

PR_SET_PDEATHSIG = 1
"""Linux prctl option: the signal this process gets when the thread that started it exits."""
M_MMAP_THRESHOLD = -3
"""glibc ``mallopt`` parameter: blocks at least this large get a mapping of their own, unmapped when freed."""
HEAP_MMAP_THRESHOLD = 4 * 2**20
"""Bytes. glibc's default threshold rises with every large block freed (up to 32 MiB), after which tensors of a
few MiB come from the heap, whose freed holes between live blocks stay resident: a PPO run (the benchmark's
seed 0) peaked at 1,889 MiB so, at 1,570 MiB with 4 MiB fixed (1 MiB: 1,288 MiB but 50% slower; 16 MiB: 1,774),
with the same results. Fresh mappings cost page faults: PPO took 4% longer, TRL's SFT training 18% (so only
the rollout trainers, the memory peaks, use it)."""


def limit_heap_growth(threshold: int = HEAP_MMAP_THRESHOLD) -> bool:
    """Give blocks of ``threshold`` bytes or more their own mappings from now on (glibc's ``mallopt``), so memory
    freed during training is handed back instead of staying in heap holes. Process-wide and not undoable, so only
    processes of our own call it: ``dialogrl ppo`` / ``dialogrl dpo`` and a job's PPO and DPO step processes (a
    script can call it first thing). A threshold the user set (``MALLOC_MMAP_THRESHOLD_``, ``GLIBC_TUNABLES``)
    wins. True if applied."""
    import ctypes
    import sys

    if ("MALLOC_MMAP_THRESHOLD_" in os.environ or "mmap_threshold" in os.environ.get("GLIBC_TUNABLES", "")
            or not sys.platform.startswith("linux")):
        return False
    try:
        return bool(ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, threshold))
    except AttributeError:  # not glibc (musl has no mallopt)
        return False


HEAP_BOUNDED = frozenset({"ppo", "dpo"})
"""The trainers whose processes bound their heap: the rollout trainers, the memory peaks (a quickstart method
counts by its first word, so ``ppo-rm`` is PPO)."""


def limit_heap_growth_for(trainer: str) -> bool:
    """:func:`limit_heap_growth` in a process of our own about to run ``trainer`` (a ``dialogrl`` command or a
    quickstart method), if it is one of :data:`HEAP_BOUNDED`. True if applied."""
    return trainer.split("-")[0] in HEAP_BOUNDED and limit_heap_growth()


def _die_with_parent(parent_pid: int) -> None:
    """In a step's process: end with the job, even when the job is killed (SIGKILL gives it no chance to stop
    its steps). Linux only; elsewhere a killed job's step runs to its end."""
    import ctypes
    import sys

    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent_pid:  # the job died before the line above
            os._exit(1)


def own_peak_mb() -> float:
    """This process's peak resident memory so far."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)


def own_rss_mb() -> float:
    """This process's resident memory now (Linux); elsewhere its peak so far, an upper bound."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return own_peak_mb()
    return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)


Result = TypeVar("Result")


def _measured(step: Callable[..., Result], *args: Any) -> tuple[Result, float]:
    """What runs in a step's process: the step's result and the process's peak memory."""
    return step(*args), own_peak_mb()


class StepRunner:
    """Runs a step here, or in a fresh interpreter (its exceptions, a DialogRLError too, re-raise here), and
    keeps the job's peak resident memory."""

    def __init__(self, isolate: bool) -> None:
        self.isolate = isolate
        self.isolated_peak_mb = 0.0
        """Largest (this process's memory while it waited + the step process's peak) of the isolated steps."""

    def __call__(self, step: Callable[..., Result], *args: Any) -> Result:
        if not self.isolate:
            return step(*args)
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        waiting = own_rss_mb()
        # spawn, not fork: a forked child would start with this process's memory and threads.
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_die_with_parent, initargs=(os.getpid(),)) as pool:
            result, peak = pool.submit(_measured, step, *args).result()
        self.isolated_peak_mb = max(self.isolated_peak_mb, round(waiting + peak, 1))
        return result

    def peak_mb(self) -> float:
        """The job's peak resident memory so far (the multiprocessing resource tracker's ~13 MB not counted)."""
        return max(own_peak_mb(), self.isolated_peak_mb)
