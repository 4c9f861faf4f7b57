"""The engine issue's targets, checked in the same `make bench` run as the throughput table (on the CPU, with
respserve and vLLM's CPU build both measured), so that one run says whether all of them hold:

- output tok/s at least x1.0 vLLM's at 1 stream and x1.5 at 8 and 32 streams; TTFT p50 at most vLLM's;
- turn 8 of a `previous_response_id` chain at most x1.5 the TTFT of a fresh ~50-token prompt, and 8 decoding
  streams' inter-token latency p99 at most 3x their p50 while a ~3,000-token prompt arrives (bench_engine.py);
- respserve's resident memory while it is measured (up to 32 streams) at most x1.5 its idle RSS, read once
  it is healthy, before any request;
- the KV pool's bytes per token slot (from the server's /metrics) within 5% of 2 x layers x KV heads x head size
  x the dtype's size.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

THROUGHPUT = {1: 1.0, 8: 1.5, 32: 1.5}  # streams: least respserve/vLLM output tok/s


@dataclass
class Target:
    what: str
    measured: float | None  # None: not measured in this run
    limit: float
    at_least: bool  # met when measured >= limit; else when measured <= limit

    @property
    def met(self) -> bool | None:
        if self.measured is None:
            return None
        return self.measured >= self.limit if self.at_least else self.measured <= self.limit

    def as_json(self) -> dict[str, Any]:
        return {"what": self.what, "measured": self.measured, "limit": self.limit, "met": self.met}


def resident_bytes(pid: int, field: str = "VmRSS") -> int:
    """A process's resident set now (VmRSS) or at its peak so far (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == field:
            return int(value.split()[0]) * 1024
    raise KeyError(f"no {field} for process {pid}")


class ResidentPeak:
    """While entered, reads a process's resident set every `every_s` in a thread; `peak` is the largest seen
    (0 for no process). VmHWM would also count the peak of loading the model, before the server was idle."""

    def __init__(self, pid: int | None, every_s: float = 0.05) -> None:
        self.pid, self.every_s, self.peak = pid, every_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> ResidentPeak:
        if self.pid is not None:
            self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _sample(self) -> None:
        assert self.pid is not None
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, resident_bytes(self.pid))
            except (OSError, KeyError):  # the server is gone: the rounds report that
                return
            self._stop.wait(self.every_s)


def pool_bytes_per_token(base_url: str) -> float | None:
    """The KV pool's bytes per token slot, from the server's /metrics (None if it does not say)."""
    text = httpx.get(f"{base_url}/metrics").text
    found = {
        name: float(value)
        for name, value in re.findall(r"^respserve:(kv_cache_bytes|kv_cache_capacity_tokens) (\S+)$", text, re.M)
    }
    if not found.get("kv_cache_capacity_tokens") or "kv_cache_bytes" not in found:
        return None
    return found["kv_cache_bytes"] / found["kv_cache_capacity_tokens"]


def check(
    ratios: list[dict[str, object]],
    scenarios: dict[str, Any],
    idle_rss: int,
    peak_rss: int,
    pool_per_token: float | None,
    model_per_token: int,
) -> list[Target]:
    """Every target, from the run's median respserve/vLLM ratios, bench_engine.py's scenarios, the server's
    memory and its pool's size."""
    vllm = {int(row["concurrency"]): row for row in ratios if row["peer"] == "vllm"}  # type: ignore[call-overload]
    targets: list[Target] = []
    for streams, least in THROUGHPUT.items():
        row = vllm.get(streams, {})
        targets.append(Target(f"output tok/s x vLLM, {streams} streams", row.get("tokens_per_s"), least, True))  # type: ignore[arg-type]
        targets.append(Target(f"TTFT p50 x vLLM, {streams} streams", row.get("ttft_p50"), 1.0, False))  # type: ignore[arg-type]
    long_prompt = scenarios.get("long_prompt", {})
    spread = long_prompt["itl_p99"] / long_prompt["itl_p50"] if long_prompt else None
    targets += [
        Target("chain turn 8 TTFT x a fresh prompt's", scenarios.get("chain", {}).get("ratio"), 1.5, False),
        Target("ITL p99 / p50 while a long prompt arrives", spread, 3.0, False),
        Target("RSS while measured / idle RSS", peak_rss / idle_rss if idle_rss else None, 1.5, False),
    ]
    kv_error = abs(pool_per_token / model_per_token - 1) if pool_per_token else None
    targets.append(Target("KV bytes a token off 2 x layers x KV heads x D x size", kv_error, 0.05, False))
    return targets


def print_targets(targets: list[Target]) -> None:
    print("\nthe engine issue's targets in this run:")
    for target in targets:
        relation = ">=" if target.at_least else "<="
        measured = "not measured" if target.measured is None else f"{target.measured:.3f}"
        verdict = {True: "met", False: "MISSED", None: "-"}[target.met]
        print(f"  {target.what:<56} {measured:>12}  ({relation} {target.limit:g}) {verdict}")
