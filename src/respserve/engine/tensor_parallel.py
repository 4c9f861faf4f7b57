"""Tensor parallelism on one host: the server and N - 1 peer processes each hold 1/N of every layer.

transformers shards the model itself (`tp_plan="auto"`: DTensor weights over torch.distributed, gloo on the
CPU, NCCL on CUDA), so the engine only has to keep the ranks in step. Rank 0 is the server's worker thread:
it schedules and samples, and before each step it broadcasts the step (model_runner.StepInputs) to the
peers; every rank then runs the same forward pass over its own KV pool, which holds its share of the KV
heads. The sharded lm_head gathers the logits on every rank; only rank 0 uses them.

A peer is `python -m respserve.engine.tensor_parallel RANK SIZE MODEL DEVICE DTYPE`, started by rank 0 with
the rendezvous address in its environment. It loads the model, learns the pool's size from rank 0 (block
ids must mean the same slots everywhere) and runs steps until rank 0 sends None.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from respserve.engine.kv_cache import PagedKVCache
from respserve.engine.model_runner import ModelRunner, StepInputs

_TIMEOUT = timedelta(minutes=10)  # loading a large model on every rank can take this long


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Each rank's device: its own GPU on CUDA, the CPU otherwise."""
    return torch.device("cuda", rank) if device.type == "cuda" else device


def _join(rank: int, size: int, device: torch.device) -> None:
    os.environ["LOCAL_RANK"] = str(rank)  # transformers places each rank's shard by it
    if device.type == "cpu":
        # The ranks share the machine's cores instead of each taking all of them.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=size, timeout=_TIMEOUT)


class TensorParallelGroup:
    """Rank 0's side: starts the peers, joins the group with them, and sends them each step."""

    def __init__(self, size: int, model_path: str, device: torch.device, dtype: str) -> None:
        self.size = size
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(size))
        command = [sys.executable, "-m", "respserve.engine.tensor_parallel"]
        self._peers = [
            subprocess.Popen([*command, str(rank), str(size), model_path, device.type, dtype])
            for rank in range(1, size)
        ]
        _join(0, size, device)

    def share_pool_size(self, num_blocks: int, block_size: int) -> None:
        dist.broadcast_object_list([(num_blocks, block_size)], src=0)

    def send(self, step: StepInputs) -> None:
        dist.broadcast_object_list([step], src=0)

    def close(self) -> None:
        """Tells the peers to stop and waits for them."""
        dist.broadcast_object_list([None], src=0)
        for peer in self._peers:
            try:
                peer.wait(timeout=30)
            except subprocess.TimeoutExpired:
                peer.kill()
        dist.destroy_process_group()


def _receive() -> Any:
    message: list[Any] = [None]
    dist.broadcast_object_list(message, src=0)
    return message[0]


def serve_as_peer(rank: int, size: int, model_path: str, device_type: str, dtype: str) -> None:
    from respserve.engine.model_source import ModelSource
    from respserve.engine.text_pipeline import TextPipeline

    device = rank_device(torch.device(device_type), rank)
    _join(rank, size, device)
    pipeline = TextPipeline.load(
        ModelSource(name=os.path.basename(model_path), path=model_path), str(device), dtype, tensor_parallel=size
    )
    num_blocks, block_size = _receive()
    cache = PagedKVCache(pipeline.model.config, num_blocks, block_size, pipeline.dtype, device, shards=size)
    runner = ModelRunner(pipeline.model, cache, device)
    while (step := _receive()) is not None:
        runner.forward(step)
    dist.destroy_process_group()


if __name__ == "__main__":
    rank_arg, size_arg, path_arg, device_arg, dtype_arg = sys.argv[1:6]
    serve_as_peer(int(rank_arg), int(size_arg), path_arg, device_arg, dtype_arg)
