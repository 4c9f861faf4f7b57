"""The CUDA path of the text worker: the model in bf16 on the GPU, eight requests decoded as one batch.
Marked `gpu`; skipped where torch sees no CUDA device. The model is the configured one (RESPSERVE_MODEL,
else the embedded SmolLM2), so scripts/gpu_check.sh can run it with a small one that travels."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import pytest
import torch

from respserve.config import load_settings
from respserve.engine.generation import GenerationRequest, SamplingParams
from respserve.engine.model_source import resolve_model_source
from respserve.engine.text_pipeline import TextPipeline
from respserve.engine.worker import PipelineWorker

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


async def _generate(worker: PipelineWorker, prompts: list[list[int]]) -> list[list[str]]:
    async def one(index: int, prompt: list[int]) -> list[str]:
        stream = worker.submit(GenerationRequest(f"gpu-{index}", prompt, SamplingParams(max_tokens=24, temperature=0)))
        return [output.text async for output in stream]

    return await asyncio.gather(*(one(index, prompt) for index, prompt in enumerate(prompts)))


def test_cuda_worker_decodes_a_batch_in_bf16() -> None:
    source = resolve_model_source(load_settings().model, Path(tempfile.gettempdir()) / "respserve-gpu-test")
    pipeline = TextPipeline.load(source, device="cuda")
    assert pipeline.device.type == "cuda" and next(pipeline.model.parameters()).dtype == torch.bfloat16
    worker = PipelineWorker(pipeline)
    worker.start()
    try:
        prompts = [pipeline.tokenizer(f"Fact {n}: the number {n} is")["input_ids"] for n in range(8)]
        together = asyncio.run(_generate(worker, prompts))
        assert all(len(texts) > 1 for texts in together)
        assert torch.cuda.memory_allocated() > 0 and worker.gpu_memory_bytes > 0
    finally:
        worker.stop()
