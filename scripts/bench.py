"""Side-by-side serving benchmark: respserve against `transformers serve --continuous-batching`.

Both servers load the same model folder, one after the other on this machine, and get the same load: N
concurrent streaming clients (N in --concurrency), fixed prompts, greedy decoding, a fixed
max_output_tokens. Prints one table with respserve/peer ratios and writes JSON and a PNG plot.

    python scripts/bench.py                         # the embedded SmolLM2, CPU
    python scripts/bench.py --random-init llama-1b  # a Llama-3.2-1B-shaped model with random weights (GPU)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

PROMPTS = [
    "Count from one to one thousand, in words, separated by commas.",
    "Write a very long story about a lighthouse keeper and the sea.",
    "List every country in the world with its capital city.",
    "Explain, step by step and in great detail, how a steam engine works.",
]

RANDOM_SHAPES = {
    # Llama-3.2-1B's shape.
    "llama-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    ),
    # A small shape to check the random-init path on a CPU.
    "tiny": dict(
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=49152,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    ),
}


@dataclass
class RequestResult:
    ttft: float
    latency: float
    output_tokens: int
    inter_token: list[float] = field(default_factory=list)


@dataclass
class RunResult:
    server: str
    concurrency: int
    requests: int
    wall_s: float
    output_tokens: int
    ttft_p50: float
    ttft_p99: float
    itl_p50: float
    itl_p99: float
    health_p99_ms: float | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.wall_s


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


async def stream_one(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> RequestResult:
    body = {"model": model, "input": prompt, "stream": True, "temperature": 0, "max_output_tokens": max_tokens}
    started = time.perf_counter()
    arrivals: list[float] = []
    output_tokens = 0
    async with client.stream("POST", "/v1/responses", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: ") :])
            if event["type"] == "response.output_text.delta":
                arrivals.append(time.perf_counter())
            elif event["type"] in ("response.completed", "response.incomplete"):
                usage = event["response"].get("usage") or {}
                output_tokens = usage.get("output_tokens") or len(arrivals)
    finished = time.perf_counter()
    ttft = (arrivals[0] if arrivals else finished) - started
    gaps = [later - earlier for earlier, later in zip(arrivals, arrivals[1:], strict=False)]
    return RequestResult(ttft=ttft, latency=finished - started, output_tokens=output_tokens, inter_token=gaps)


async def probe_health(client: httpx.AsyncClient, stop: asyncio.Event, latencies: list[float]) -> None:
    while not stop.is_set():
        started = time.perf_counter()
        await client.get("/health")
        latencies.append(time.perf_counter() - started)
        await asyncio.sleep(0.05)


async def run_load(
    base_url: str, server: str, model: str, concurrency: int, per_client: int, max_tokens: int
) -> RunResult:
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=base_url, timeout=1800, limits=limits) as client:

        async def one_client(index: int) -> list[RequestResult]:
            prompts = [PROMPTS[(index + k) % len(PROMPTS)] for k in range(per_client)]
            return [await stream_one(client, model, prompt, max_tokens) for prompt in prompts]

        stop, health = asyncio.Event(), []
        prober = asyncio.create_task(probe_health(client, stop, health))
        started = time.perf_counter()
        per_client_results = await asyncio.gather(*(one_client(i) for i in range(concurrency)))
        wall = time.perf_counter() - started
        stop.set()
        await prober
    results = [result for batch in per_client_results for result in batch]
    gaps = [gap for result in results for gap in result.inter_token]
    return RunResult(
        server=server,
        concurrency=concurrency,
        requests=len(results),
        wall_s=wall,
        output_tokens=sum(result.output_tokens for result in results),
        ttft_p50=percentile([r.ttft for r in results], 50),
        ttft_p99=percentile([r.ttft for r in results], 99),
        itl_p50=percentile(gaps, 50),
        itl_p99=percentile(gaps, 99),
        health_p99_ms=percentile(health, 99) * 1000 if health else None,
    )


class ServerProcess:
    def __init__(self, command: list[str], port: int, log: Path) -> None:
        self.command, self.port, self.log = command, port, log
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ServerProcess:
        handle = self.log.open("wb")
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        self.process = subprocess.Popen(
            self.command, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.command[0]} exited; see {self.log}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"server did not become healthy; see {self.log}")

    def __exit__(self, *_: object) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)


def build_random_model(shape: str, folder: Path, dtype: str) -> Path:
    """A Llama-shaped model with random weights (speed does not depend on their values)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from respserve.config import Settings
    from respserve.engine.model_source import EMBEDDED_MODEL, resolve_model_source

    config = LlamaConfig(**RANDOM_SHAPES[shape], bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(getattr(torch, dtype)).eval()
    model.save_pretrained(folder)
    # The embedded model's tokenizer and chat template: ids past its vocabulary decode to nothing.
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_source(EMBEDDED_MODEL, Settings().cache_dir).path)
    tokenizer.save_pretrained(folder)
    return folder


def hbm_copy_bandwidth() -> float:
    """Measured device-to-device copy bandwidth in bytes/s, counting bytes read and written."""
    import torch

    source = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    torch.cuda.synchronize()
    started = time.perf_counter()
    repeats = 20
    for _ in range(repeats):
        target.copy_(source)
    torch.cuda.synchronize()
    return 2 * source.numel() * repeats / (time.perf_counter() - started)


def weight_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.glob("*.safetensors"))


def print_table(results: list[RunResult]) -> None:
    header = (
        f"{'server':<10} {'conc':>4} {'reqs':>5} {'out tok/s':>10} {'req/s':>7} {'TTFT p50':>9} {'TTFT p99':>9} "
        f"{'ITL p50':>8} {'ITL p99':>8} {'health p99':>10}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        health = f"{r.health_p99_ms:.1f} ms" if r.health_p99_ms is not None else "-"
        print(
            f"{r.server:<10} {r.concurrency:>4} {r.requests:>5} {r.tokens_per_s:>10.1f} {r.requests_per_s:>7.2f} "
            f"{r.ttft_p50:>8.3f}s {r.ttft_p99:>8.3f}s {r.itl_p50 * 1000:>6.1f}ms {r.itl_p99 * 1000:>6.1f}ms "
            f"{health:>10}"
        )
    print()
    print("respserve / peer:")
    for ours in (r for r in results if r.server == "respserve"):
        peer = next((r for r in results if r.server == "peer" and r.concurrency == ours.concurrency), None)
        if peer:
            print(
                f"  concurrency {ours.concurrency:>3}: output tokens/s x{ours.tokens_per_s / peer.tokens_per_s:.2f}, "
                f"TTFT p50 x{ours.ttft_p50 / peer.ttft_p50:.2f} (lower is better), "
                f"ITL p50 x{ours.itl_p50 / peer.itl_p50:.2f} (lower is better)"
            )


def plot(results: list[RunResult], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    figure, (throughput, ttft) = plt.subplots(1, 2, figsize=(10, 4))
    for server in sorted({r.server for r in results}):
        rows = sorted((r for r in results if r.server == server), key=lambda r: r.concurrency)
        levels = [r.concurrency for r in rows]
        throughput.plot(levels, [r.tokens_per_s for r in rows], marker="o", label=server)
        ttft.plot(levels, [r.ttft_p50 for r in rows], marker="o", label=server)
    throughput.set(xlabel="concurrent streams", ylabel="output tokens/s", title="Throughput", xscale="log")
    ttft.set(xlabel="concurrent streams", ylabel="seconds", title="TTFT p50", xscale="log")
    throughput.legend()
    ttft.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a transformers folder (default: the embedded SmolLM2, converted)")
    parser.add_argument("--random-init", choices=sorted(RANDOM_SHAPES), help="build a random-weight model")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--max-output-tokens", type=int, default=64)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="auto", help="for both servers; auto: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--servers", nargs="+", default=["respserve", "peer"], choices=["respserve", "peer"])
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--port", type=int, default=8123)
    args = parser.parse_args()

    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype if args.dtype != "auto" else ("float32" if device == "cpu" else "bfloat16")
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="respserve-bench-"))
    if args.random_init:
        folder = build_random_model(args.random_init, workdir / args.random_init, dtype)
    elif args.model:
        folder = Path(args.model)
    else:
        from respserve.config import Settings
        from respserve.engine.model_source import EMBEDDED_MODEL, resolve_model_source

        folder = Path(resolve_model_source(EMBEDDED_MODEL, Settings().cache_dir).path)

    commands = {
        "respserve": [
            sys.executable, "-m", "respserve", "serve", "--model", str(folder), "--port", str(args.port),
            "--device", device, "--dtype", dtype, "--served-model-name", str(folder), "--log-level", "warning",
        ],
        "peer": [
            str(Path(sys.executable).with_name("transformers")), "serve", str(folder), "--continuous-batching",
            "--device", device, "--dtype", dtype, "--port", str(args.port), "--host", "127.0.0.1",
        ],
    }  # fmt: skip
    print(f"model {folder} on {device} ({dtype}); {args.max_output_tokens} output tokens, greedy")
    results: list[RunResult] = []
    for server in args.servers:
        with ServerProcess(commands[server], args.port, args.out / f"{server}.log"):
            asyncio.run(run_load(f"http://127.0.0.1:{args.port}", server, str(folder), 1, 1, 16))  # warm-up
            for concurrency in args.concurrency:
                result = asyncio.run(
                    run_load(
                        f"http://127.0.0.1:{args.port}",
                        server,
                        str(folder),
                        concurrency,
                        args.requests_per_client,
                        args.max_output_tokens,
                    )
                )
                results.append(result)
                print(f"  {server} concurrency {concurrency}: {result.tokens_per_s:.1f} output tokens/s", flush=True)

    print()
    print_table(results)
    summary: dict[str, object] = {
        "date": time.strftime("%Y-%m-%d"),
        "model": str(folder),
        "device": device,
        "dtype": dtype,
        "max_output_tokens": args.max_output_tokens,
        "results": [asdict(r) | {"tokens_per_s": r.tokens_per_s, "requests_per_s": r.requests_per_s} for r in results],
    }
    if device == "cuda":
        bandwidth = hbm_copy_bandwidth()
        size = weight_bytes(folder)
        print(f"\nHBM copy bandwidth {bandwidth / 1e12:.2f} TB/s; weights {size / 1e9:.2f} GB")
        for r in (r for r in results if r.server == "respserve"):
            steps_per_s = 1 / r.itl_p50
            fraction = steps_per_s * size / bandwidth
            print(f"  concurrency {r.concurrency}: {steps_per_s:.0f} decode steps/s = {fraction:.0%} of the roofline")
        summary["hbm_bandwidth"] = bandwidth
        summary["weight_bytes"] = size
    (args.out / "bench.json").write_text(json.dumps(summary, indent=2))
    plot(results, args.out / "bench.png")
    print(f"\nwrote {args.out / 'bench.json'} and {args.out / 'bench.png'}")
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
