"""Load test on loopback: many concurrent streaming clients, a share of them hanging up mid-stream.

Starts its own respserve (or uses --base-url), runs for a fixed time, then checks: no 5xx, memory back
to where it was, and every response that completed is retrievable from the store.

    python scripts/load_test.py --clients 200 --seconds 60 --disconnect-share 0.2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
from bench_peers import ServerProcess  # scripts/ is on the path when run as a script

PROMPTS = ["Say hello.", "Name a color.", "Count to five.", "What is the capital of France?", "Tell a joke."]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def client_loop(
    http: httpx.AsyncClient, stop_at: float, share: float, rng: random.Random, stats: Counter, done: list[str]
) -> None:
    while time.monotonic() < stop_at:
        body = {"input": rng.choice(PROMPTS), "stream": True, "max_output_tokens": 32, "temperature": 0.7}
        hang_up_after = rng.randint(1, 20) if rng.random() < share else None
        events = 0
        try:
            async with http.stream("POST", "/v1/responses", json=body) as response:
                stats[f"http_{response.status_code}"] += 1
                if response.status_code != 200:
                    await response.aread()
                    await asyncio.sleep(0.5)
                    continue
                async for line in response.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    events += 1
                    if hang_up_after is not None and events >= hang_up_after:
                        stats["disconnected"] += 1
                        break
                    event = json.loads(line[len("data: ") :])
                    if event["type"] in ("response.completed", "response.incomplete"):
                        done.append(event["response"]["id"])
                        stats["completed"] += 1
        except httpx.HTTPError as exc:
            stats[f"error_{type(exc).__name__}"] += 1


async def run(base_url: str, clients: int, seconds: float, share: float) -> tuple[Counter, list[str]]:
    stats: Counter = Counter()
    done: list[str] = []
    limits = httpx.Limits(max_connections=clients + 8)
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as http:
        stop_at = time.monotonic() + seconds
        rngs = [random.Random(seed) for seed in range(clients)]
        await asyncio.gather(*(client_loop(http, stop_at, share, rngs[i], stats, done) for i in range(clients)))
    return stats, done


async def check_stored(base_url: str, ids: list[str]) -> int:
    missing = 0
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as http:
        for response_id in ids:
            if (await http.get(f"/v1/responses/{response_id}")).status_code != 200:
                missing += 1
    return missing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--disconnect-share", type=float, default=0.2)
    parser.add_argument("--port", type=int, default=8131)
    args = parser.parse_args()
    data_dir = tempfile.mkdtemp(prefix="respserve-load-")
    command = [sys.executable, "-m", "respserve", "serve", "--port", str(args.port), "--data-dir", data_dir]
    base_url = f"http://127.0.0.1:{args.port}"
    with ServerProcess(command, args.port, Path(data_dir) / "server.log") as server:
        pid = server.process.pid
        asyncio.run(run(base_url, 8, 5, 0.0))  # warm-up
        before = rss_mib(pid)
        started = time.monotonic()
        stats, done = asyncio.run(run(base_url, args.clients, args.seconds, args.disconnect_share))
        elapsed = time.monotonic() - started
        time.sleep(5)  # let cancelled work drain
        after = rss_mib(pid)
        # A second, identical run: a leak grows memory again; allocator high-water marks do not.
        started_second = time.monotonic()
        second, second_done = asyncio.run(run(base_url, args.clients, args.seconds, args.disconnect_share))
        elapsed += time.monotonic() - started_second
        time.sleep(5)
        after_second = rss_mib(pid)
        stats.update(second)
        done += second_done
        missing = asyncio.run(check_stored(base_url, done))
        server_errors = sum(count for key, count in stats.items() if key.startswith("http_5"))
        print(f"{args.clients} streaming clients, twice {args.seconds:.0f} s, {args.disconnect_share:.0%} hanging up")
        print(f"  both runs took {elapsed:.0f} s (in-flight requests finish after each deadline)")
        for key, count in sorted(stats.items()):
            print(f"  {key}: {count}")
        print(f"  completed responses/s: {stats['completed'] / elapsed:.2f}")
        print(f"  5xx: {server_errors}")
        print(
            f"  server RSS: {before:.0f} MiB before, {after:.0f} MiB after the first run, "
            f"{after_second:.0f} MiB after the second ({after_second - after:+.0f} MiB)"
        )
        print(f"  completed responses not retrievable: {missing} of {len(done)}")
        flat = after_second - after < 0.05 * after
        ok = server_errors == 0 and missing == 0 and flat
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
