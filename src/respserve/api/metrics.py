"""Prometheus metrics, named after vLLM's where the meaning is the same (`vllm:` → `respserve:`)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from respserve.engine.image_worker import ImageWorker
from respserve.engine.worker import PipelineWorker

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)


class Metrics:
    """One registry per app, so several apps (tests) never share counters."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.http_requests = Counter(
            "respserve:http_requests", "HTTP requests by route and status.", ["method", "route", "status"],
            registry=registry,
        )  # fmt: skip
        self.time_to_first_token = Histogram(
            "respserve:time_to_first_token_seconds", "Time to the first output token.", buckets=_LATENCY_BUCKETS,
            registry=registry,
        )  # fmt: skip
        self.inter_token_latency = Histogram(
            "respserve:inter_token_latency_seconds", "Time between output tokens.", buckets=_ITL_BUCKETS,
            registry=registry,
        )  # fmt: skip
        self.e2e_latency = Histogram(
            "respserve:e2e_request_latency_seconds", "Time from request to its last token.", buckets=_LATENCY_BUCKETS,
            registry=registry,
        )  # fmt: skip
        self.prompt_tokens = Counter("respserve:prompt_tokens", "Prompt tokens processed.", registry=registry)
        self.generation_tokens = Counter("respserve:generation_tokens", "Output tokens generated.", registry=registry)
        self._running = Gauge("respserve:num_requests_running", "Sequences in the running batch.", registry=registry)
        self._waiting = Gauge("respserve:num_requests_waiting", "Requests waiting for a slot.", registry=registry)
        self._kv_tokens = Gauge(
            "respserve:kv_cache_tokens", "Token positions held in the running batch's KV cache.", registry=registry
        )
        self._kv_capacity = Gauge(
            "respserve:kv_cache_capacity_tokens", "Token slots in the KV pool.", registry=registry
        )
        self._kv_bytes = Gauge(
            "respserve:kv_cache_bytes", "Bytes of the KV pool: every layer's keys and values.", registry=registry
        )
        self._gpu_memory = Gauge("respserve:gpu_memory_bytes", "GPU memory allocated by the worker.", registry=registry)
        self._images_running = Gauge(
            "respserve:image_requests_running", "Image requests in the current pipeline call.", ["model"],
            registry=registry,
        )  # fmt: skip
        self._images_waiting = Gauge(
            "respserve:image_requests_waiting", "Image requests waiting for a pipeline call.", ["model"],
            registry=registry,
        )  # fmt: skip
        self._image_calls = Gauge(
            "respserve:image_pipeline_calls", "Pipeline calls made (several batched requests make one).", ["model"],
            registry=registry,
        )  # fmt: skip

    def watch(self, worker: PipelineWorker) -> None:
        """Gauges read from the worker when scraped."""
        self._running.set_function(lambda: worker.num_running)
        self._waiting.set_function(lambda: worker.num_queued)
        self._kv_tokens.set_function(lambda: worker.kv_cache_tokens)
        self._kv_capacity.set(worker.kv_cache.num_blocks * worker.kv_cache.block_size)
        self._kv_bytes.set(worker.kv_cache.num_bytes)
        self._gpu_memory.set_function(lambda: worker.gpu_memory_bytes)

    def watch_images(self, model: str, worker: ImageWorker) -> None:
        self._images_running.labels(model=model).set_function(lambda: worker.num_running)
        self._images_waiting.labels(model=model).set_function(lambda: worker.num_queued)
        self._image_calls.labels(model=model).set_function(lambda: worker.batches)


class RequestTimer:
    """Times one generation: first token, the gaps between tokens, and the whole request."""

    def __init__(self, metrics: Metrics | None) -> None:
        self._metrics = metrics
        self._started = time.perf_counter()
        self._last: float | None = None

    def token(self) -> None:
        if self._metrics is None:
            return
        now = time.perf_counter()
        if self._last is None:
            self._metrics.time_to_first_token.observe(now - self._started)
        else:
            self._metrics.inter_token_latency.observe(now - self._last)
        self._last = now

    def finish(self, prompt_tokens: int, output_tokens: int) -> None:
        if self._metrics is None:
            return
        self._metrics.e2e_latency.observe(time.perf_counter() - self._started)
        self._metrics.prompt_tokens.inc(prompt_tokens)
        self._metrics.generation_tokens.inc(output_tokens)
