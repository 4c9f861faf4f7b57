"""--tensor-parallel-size: the server and a peer process each hold half of every layer (transformers'
tp_plan over torch.distributed, gloo on the CPU), and answer with the same greedy tokens as one process."""

from __future__ import annotations

from pathlib import Path

import httpx
import psutil
import pytest
from conftest import RunningServer, free_port, never_ends, spawn_server, tiny_qwen3, wait_for
from transformers import AutoTokenizer


def _greedy_tokens(port: int, logit_bias: dict[str, float]) -> list[dict]:
    body = {
        "input": "Count the boats in the harbour, one by one.",
        "temperature": 0,
        "max_output_tokens": 24,
        "logit_bias": logit_bias,
        "include": ["message.output_text.logprobs"],
        "top_logprobs": 2,
    }
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
        response = client.post("/v1/responses", json=body)
    assert response.status_code == 200, response.text
    return response.json()["output"][0]["content"][0]["logprobs"]


def _peers_of(folder: Path) -> list[str]:
    return [
        " ".join(process.info["cmdline"] or [])
        for process in psutil.process_iter(["cmdline"])
        if "respserve.engine.tensor_parallel" in (process.info["cmdline"] or [])
        and str(folder) in process.info["cmdline"]
    ]


def test_two_ranks_answer_as_one(server: RunningServer, tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(server.state.default_model.worker.pipeline.tokenizer.name_or_path)
    folder = tmp_path / "tiny"
    tiny_qwen3(tokenizer, num_attention_heads=4, num_key_value_heads=2).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    answers = []
    for size in (1, 2):
        port = free_port()
        flags = ["--model", str(folder), "--tensor-parallel-size", str(size), "--kv-cache-memory", "64MB"]
        process = spawn_server(port, tmp_path / f"data-{size}", *flags)
        try:
            answers.append(_greedy_tokens(port, never_ends(server)))
        finally:
            process.terminate()
            process.wait(timeout=60)
        # The peer does not outlive its server.
        assert wait_for(lambda: not _peers_of(folder), timeout=30), _peers_of(folder)
    alone, sharded = answers
    assert len(alone) == len(sharded) == 24
    # Sharded matmuls add in another order: the tokens agree unless two were all but tied.
    for mine, theirs in zip(sharded, alone, strict=True):
        if mine["token"] != theirs["token"]:
            runner_up = theirs["top_logprobs"][1]
            assert runner_up["token"] == mine["token"] and theirs["logprob"] - runner_up["logprob"] < 0.01
            break
        assert mine["logprob"] == pytest.approx(theirs["logprob"], abs=1e-3)
