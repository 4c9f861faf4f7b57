"""How many of the CPU's cores torch may use for a step, chosen by measuring both.

On a small CPU the server's other threads (the event loop writing each token's events, the HTTP clients
beside it) need a core too. Whether a step of few rows is faster on every core or on all but one depends on
the machine, and no rule picked ahead of time is right on both of the 2-core machines this project runs on
(SmolLM2-135M float32, one stream, 64 streamed tokens a request): on an AMD EPYC one thread gave 35.2 and
two 28.0 tokens/s (a parallel kernel whose threads take every core is held up whenever one of them is
descheduled), on an Intel Xeon whose single core reads memory at half the pace of two, a token took 97 ms
with one thread and 75 ms with two.

So each size of small step (rows rounded down to a power of two) tries both counts, alternating, and then
keeps the one whose steps come round faster: the time from one step's start to the next one's, per row,
which counts whatever the step's threads lost to the rest of the process. Now and then it tries the other
again, as the load around it changes. Larger steps always take every core (faster on both machines).

The server loads its models through `on_passing_thread`, so that the worker's OpenMP team is the process's
only one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

logger = logging.getLogger(__name__)

SMALL_STEP_ROWS = 16  # up to this many tokens in a step, leaving a core free may pay
_MAX_CORES_SPARED = 4  # on bigger CPUs one spare core is plenty; this bounds where the choice applies
_TRIALS = 8  # steps measured with each count before choosing
_RETRY_EVERY = 50  # then one step in this many tries the count not chosen
_SMOOTHING = 0.2  # weight of a new measurement in a count's running mean

T = TypeVar("T")


class ThreadChoice:
    """The running mean of seconds per row for each candidate thread count, for one size of step."""

    def __init__(self, candidates: tuple[int, ...], label: str = "") -> None:
        self.seconds: dict[int, float] = {}
        self.trials = dict.fromkeys(candidates, 0)
        self.label = label  # which steps, for the log
        self._steps = 0
        self._chosen = False

    def pick(self) -> int:
        self._steps += 1
        fewest = min(self.trials, key=self.trials.__getitem__)
        if self.trials[fewest] < _TRIALS:
            return fewest
        ranked = sorted(self.seconds, key=self.seconds.__getitem__)
        if not self._chosen:
            self._chosen = True
            times = ", ".join(f"{n} threads {self.seconds[n] * 1e3:.1f} ms" for n in ranked)
            logger.info("steps of %s: %d threads (a row: %s)", self.label, ranked[0], times)
        return ranked[1] if self._steps % _RETRY_EVERY == 0 else ranked[0]

    @property
    def best(self) -> int:
        return min(self.seconds, key=self.seconds.__getitem__)

    def observe(self, threads: int, seconds_per_row: float) -> None:
        self.trials[threads] += 1
        mean = self.seconds.get(threads)
        self.seconds[threads] = seconds_per_row if mean is None else mean + _SMOOTHING * (seconds_per_row - mean)


class CpuThreads:
    def __init__(self, device: torch.device, spare_a_core: bool = True) -> None:
        """`spare_a_core` False: keep torch's threads as they are (tensor-parallel ranks share the cores)."""
        self.cores = torch.get_num_threads()
        self.enabled = spare_a_core and device.type == "cpu" and 2 <= self.cores <= _MAX_CORES_SPARED
        self.choices: dict[int, ThreadChoice] = {}
        self._current = self.cores
        self._last: tuple[ThreadChoice, int, int, float] | None = None  # choice, threads, rows, start

    def for_step(self, rows: int) -> None:
        """Sets torch's intra-op threads for a step computing `rows` tokens, which starts now."""
        if not self.enabled:
            return
        now = time.perf_counter()
        if self._last is not None:
            choice, threads, last_rows, started = self._last
            choice.observe(threads, (now - started) / last_rows)
        self._last = None
        wanted = self.cores
        if rows <= SMALL_STEP_ROWS:
            size = rows.bit_length()
            choice = self.choices.get(size)
            if choice is None:
                choice = self.choices[size] = ThreadChoice((self.cores, self.cores - 1), _rows_label(size))
            wanted = choice.pick()
            self._last = (choice, wanted, rows, now)
        if wanted != self._current:
            torch.set_num_threads(wanted)
            self._current = wanted

    def idle(self) -> None:
        """The worker waits for requests: the time until the next step is not the last step's."""
        self._last = None

    def restore(self) -> None:
        """torch's thread count as it was before the first step (it is the whole process's)."""
        if self.enabled and self._current != self.cores:
            torch.set_num_threads(self.cores)
            self._current = self.cores


def _rows_label(size: int) -> str:
    """The steps whose row count has `size` bits, for the log: "1 row", "4-7 rows", "16 rows"."""
    low, high = 2 ** (size - 1), min(2**size - 1, SMALL_STEP_ROWS)
    return "1 row" if high == 1 else f"{low} rows" if low == high else f"{low}-{high} rows"


def on_passing_thread(load: Callable[[], T]) -> T:
    """`load()` run on a thread of its own that ends when it returns: its result, or its error raised here.

    OpenMP keeps a team of threads for every thread that ran a parallel torch op, for as long as that thread
    lives. Models loaded on the main thread left it such a team beside the worker thread's; with more OpenMP
    threads than cores libgomp stops spinning between parallel regions, and each of the hundreds a decode
    step runs then costs a sleep and a wake-up. Loaded on a thread that ends, they leave no team behind.
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="respserve-load") as pool:
        return pool.submit(load).result()
