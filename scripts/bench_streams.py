"""The client side every benchmark shares: one response streamed through the Responses API, its tokens timed."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import httpx


@dataclass
class RequestResult:
    ttft: float
    latency: float
    output_tokens: int
    inter_token: list[float] = field(default_factory=list)
    input_tokens: int = 0  # as the server's usage counts them (chat template included); 0 if not reported


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


async def stream_response(client: httpx.AsyncClient, body: dict) -> tuple[float, list[float], dict]:
    """POSTs `body` as a streamed response: when it was sent, when each text delta arrived, and the final
    resource (from response.completed, or response.incomplete when max tokens cut it; {} if neither came)."""
    started = time.perf_counter()
    arrivals: list[float] = []
    final: dict = {}
    async with client.stream("POST", "/v1/responses", json={**body, "stream": True}) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: ") :])
            if event["type"] == "response.output_text.delta":
                arrivals.append(time.perf_counter())
            elif event["type"] in ("response.completed", "response.incomplete"):
                final = event["response"]
    return started, arrivals, final


async def stream_one(
    client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int, sampling: dict | None = None
) -> RequestResult:
    body = {"model": model, "input": prompt, "temperature": 0, "max_output_tokens": max_tokens, **(sampling or {})}
    started, arrivals, final = await stream_response(client, body)
    finished = time.perf_counter()
    usage = final.get("usage") or {}
    output_tokens = usage.get("output_tokens") or len(arrivals)
    ttft = (arrivals[0] if arrivals else finished) - started
    gaps = [later - earlier for earlier, later in zip(arrivals, arrivals[1:], strict=False)]
    return RequestResult(ttft, finished - started, output_tokens, gaps, usage.get("input_tokens") or 0)
