"""How many of the CPU's cores torch may use for a step.

On a small CPU the server's other threads (the event loop writing each token's events, the HTTP clients
beside it) need a core too. A parallel kernel whose threads take every core is held up whenever one of them
is descheduled, which for the skinny matmuls of a small batch costs more than the second thread gains.
Measured through the server (SmolLM2-135M float32, 2-core AMD EPYC, 64 streamed tokens a request):
1 stream 35.2 vs 28.0 tokens/s with one thread instead of two, 8 streams 139.1 vs 120.1, but 32 streams
304.4 vs 331.1. So a step of few rows leaves one core to the rest of the server; a larger step takes all.
"""

from __future__ import annotations

import torch

SMALL_STEP_ROWS = 16  # up to this many tokens in a step, one core is left free
_MAX_CORES_SPARED = 4  # on bigger CPUs one spare core is plenty; this bounds where the rule applies


class CpuThreads:
    def __init__(self, device: torch.device, spare_a_core: bool = True) -> None:
        """`spare_a_core` False: keep torch's threads as they are (tensor-parallel ranks share the cores)."""
        self.cores = torch.get_num_threads()
        self.enabled = spare_a_core and device.type == "cpu" and 2 <= self.cores <= _MAX_CORES_SPARED
        self._current = self.cores

    def for_step(self, rows: int) -> None:
        """Sets torch's intra-op threads for a step computing `rows` tokens."""
        if not self.enabled:
            return
        wanted = self.cores - 1 if rows <= SMALL_STEP_ROWS else self.cores
        if wanted != self._current:
            torch.set_num_threads(wanted)
            self._current = wanted
