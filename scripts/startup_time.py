"""Start-up time: from spawning `respserve serve` to its first 200 on `POST /v1/responses`.

Each run starts a fresh process with the cached default model (run `make serve` once first, so the GGUF is
already converted), posts a short request every 20 ms until one is answered with 200, records the time
since the spawn, and stops the server. Prints every run and the median.

    python scripts/startup_time.py            # 5 runs
    python scripts/startup_time.py --runs 9 --model PATH
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

BODY = {"input": "Hi", "max_output_tokens": 16, "temperature": 0}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def time_to_first_response(extra_args: list[str], timeout_s: float = 120.0) -> float:
    port = _free_port()
    with tempfile.TemporaryDirectory() as data_dir:
        command = [sys.executable, "-m", "respserve", "serve", "--port", str(port), "--data-dir", data_dir]
        started = time.perf_counter()
        process = subprocess.Popen([*command, *extra_args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=timeout_s) as client:
                while time.perf_counter() - started < timeout_s:
                    if process.poll() is not None:
                        raise RuntimeError(f"the server exited with {process.returncode}")
                    try:
                        if client.post("/v1/responses", json=BODY).status_code == 200:
                            return time.perf_counter() - started
                    except httpx.TransportError:
                        pass  # not listening yet
                    time.sleep(0.02)
            raise TimeoutError(f"no 200 within {timeout_s} s")
        finally:
            process.terminate()
            process.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--model", help="passed to `respserve serve --model`")
    args = parser.parse_args()
    extra = ["--model", args.model] if args.model else []
    time_to_first_response(extra)  # warm the page cache and the converted model; not counted
    times = []
    for run in range(1, args.runs + 1):
        seconds = time_to_first_response(extra)
        times.append(seconds)
        print(f"run {run}: first 200 after {seconds:.2f} s", flush=True)
    print(f"median of {len(times)}: {statistics.median(times):.2f} s (min {min(times):.2f}, max {max(times):.2f})")


if __name__ == "__main__":
    main()
