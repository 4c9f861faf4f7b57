"""Qwen3-VL, and `detail` for the Qwen-VL family: a tiny random Qwen3-VL (a three-block vision tower, two of
whose blocks feed deepstack features into the two text layers) served through the real `--model` path.

Qwen3-VL adds features from several vision depths to the language model's hidden states at the image rows
after its first decoder layers (deepstack), and reads interleaved 3-D positions. The logits checks tie the
engine's steps (a chunked prefill cut inside the image, decode steps, steps that mix an image chunk with a
text prompt's tokens, a recompute after preemption) to transformers' own forward with pixel values, and
show that forward depends on the deepstack features, so an engine that dropped them would not match.
`detail: "low"` sizes a picture within 512 x 512 pixels on Qwen2-VL, Qwen2.5-VL and Qwen3-VL.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import httpx
import pytest
import torch
from conftest import OpenResponsesSchema, RunningServer, decode_greedily
from PIL import Image
from test_vision import (
    BLOCK,
    DONE,
    QUESTION,
    _build_qwen,
    ask,
    build_qwen2_5_vl,
    build_qwen2_vl,
    checked_stream,
    chunked_logprobs,
    expansion,
    image_part,
    picture,
    serve_vlm,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from respserve.config import load_settings
from respserve.engine.block_manager import BlockManager
from respserve.engine.generation import ChatMessage, GenerationRequest, PromptImage, SamplingParams
from respserve.engine.kv_cache import PagedKVCache
from respserve.engine.model_runner import ModelRunner, StepInputs
from respserve.engine.model_source import EMBEDDED_MODEL, ModelSource, resolve_model_source
from respserve.engine.prefill_budget import PrefillBudget
from respserve.engine.scheduler import Scheduler
from respserve.engine.sequence import Sequence
from respserve.engine.vision import encode_images, rope_positions
from respserve.engine.vision_pipeline import VisionLanguagePipeline, load_processor

PICTURE = (192, 160)  # 6 x 5 tokens of 32 x 32 pixels (16-pixel patches merged 2 x 2)
LARGE = (1024, 768)  # 768 tokens at the processor's own budget, over 512 x 512 pixels


def build_qwen3_vl(tokenizer_path: str, folder: Path) -> Path:
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    # Blocks 0 and 1 of three feed deepstack: their features are added after text layers 0 and 1.
    vision = {
        "depth": 3,
        "hidden_size": 32,
        "intermediate_size": 64,
        "out_hidden_size": 64,
        "num_heads": 2,
        "num_position_embeddings": 64,
        "deepstack_visual_indexes": [0, 1],
    }
    # head_dim 16: 8 rotary frequencies, interleaved over (temporal, height, width).
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2], "mrope_interleaved": True}
    classes = (Qwen3VLConfig, Qwen3VLForConditionalGeneration)
    return _build_qwen(
        tokenizer_path,
        folder,
        classes,
        vision,
        patch_size=16,
        max_pixels=1024 * 1024,
        text={"head_dim": 16, "rope_parameters": rope},
    )


@pytest.fixture(scope="module")
def tokenizer_path() -> str:
    return resolve_model_source(EMBEDDED_MODEL, load_settings().cache_dir).path


@pytest.fixture(scope="module")
def vlm(tokenizer_path: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    folder = build_qwen3_vl(tokenizer_path, tmp_path_factory.mktemp("qwen3_vl") / "qwen3_vl")
    yield from serve_vlm(folder, tmp_path_factory)


@pytest.fixture(scope="module")
def http(vlm: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=vlm.base_url, timeout=120) as client:
        yield client


def _model(folder: str) -> Any:
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()


def test_an_image_is_read_in_bodies_and_streams(
    vlm: RunningServer, http: httpx.Client, schema: OpenResponsesSchema
) -> None:
    red = picture((220, 20, 20), PICTURE)
    text_only = ask(http, schema, [{"type": "input_text", "text": QUESTION}])["usage"]["input_tokens"]
    body = ask(http, schema, [image_part(red), {"type": "input_text", "text": QUESTION}])
    assert body["status"] in DONE
    assert expansion(vlm, red) == 30 + 2  # the grid's tokens between the vision start and end tokens
    assert body["usage"]["input_tokens"] == text_only + expansion(vlm, red)
    content = [image_part(picture((20, 20, 220), PICTURE)), {"type": "input_text", "text": QUESTION}]
    events = checked_stream(http, schema, content)
    assert events[-1]["response"]["usage"]["input_tokens"] == body["usage"]["input_tokens"]


def test_logprobs_match_transformers_forward_with_pixels(vlm: RunningServer, http: httpx.Client) -> None:
    folder = vlm.state.settings.model
    processor = load_processor(folder)
    model = _model(folder)
    question = "Describe the picture for a museum catalogue, then say which colour fills most of it."
    turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
    green = picture((40, 200, 90), PICTURE)
    inputs = dict(processor(text=[text], images=[[Image.open(io.BytesIO(green))]], return_tensors="pt"))
    image = (inputs["input_ids"][0] == model.config.image_token_id).nonzero()[:, 0].tolist()
    assert any(image[0] < cut <= image[-1] for cut in range(BLOCK, len(image) + image[0], BLOCK))  # cut inside

    tokens = chunked_logprobs(vlm, http, green, question)
    for step, token in enumerate(tokens):  # greedy decoding by whole forward passes, no cache
        with torch.no_grad():
            logprobs = torch.log_softmax(model(**inputs).logits[0, -1], -1)
        served = sorted((top["logprob"] for top in token["top_logprobs"]), reverse=True)
        assert served == pytest.approx(logprobs.topk(5).values.tolist(), abs=2e-4), f"output token {step}"
        new = logprobs.argmax().view(1, 1)
        columns = {"input_ids": new, "attention_mask": torch.ones_like(new), "mm_token_type_ids": torch.zeros_like(new)}
        for name, column in columns.items():
            inputs[name] = torch.cat([inputs[name], column.to(inputs[name].dtype)], dim=1)


def test_steps_mixing_image_and_text_chunks_and_recomputes_match_transformers(vlm: RunningServer) -> None:
    """The engine's own loop over a pool too small for two growing image prompts beside a text prompt: image
    chunks share steps with the text prompt's tokens, the newer image prompt is preempted and recomputed from
    its kept rows (deepstack ones too); every sampled position matches transformers' forward with pixels, which
    itself changes when the deepstack features are dropped."""
    pipeline = vlm.state.default_model.worker.pipeline
    model, reference = _model(vlm.state.settings.model), _model(vlm.state.settings.model)
    sequences = []
    for index, color in enumerate(((200, 40, 40), None, (40, 40, 200))):
        images = () if color is None else (PromptImage(Image.open(io.BytesIO(picture(color, PICTURE))).convert("RGB")),)
        prompt, vision = pipeline.render([ChatMessage("user", f"Picture {index}: {QUESTION}", images=images)])
        request = GenerationRequest(f"mix-{index}", prompt, SamplingParams(max_tokens=16, temperature=0), vision)
        sequence = Sequence(request, pipeline.tokenizer, pipeline.vocab_size, pipeline.grammars, pipeline.token_texts)
        if vision is not None:
            sequence.images = encode_images(model, vision)
            assert len(sequence.images.deepstack) == 2
            sequence.rope_positions = rope_positions(model, vision, prompt)
        sequences.append(sequence)
    block_size = 4
    prompts = sum(-(-len(sequence.token_ids) // block_size) for sequence in sequences)
    num_blocks = 1 + prompts + 4  # the three prompts fit at once, not with their 16 output tokens each
    cpu = torch.device("cpu")
    cache = PagedKVCache(model.config.get_text_config(), num_blocks, block_size, torch.float32, cpu)
    runner = ModelRunner(model, cache, cpu)
    scheduler = Scheduler(BlockManager(num_blocks, block_size), max_running=4, max_prefill_tokens=8)
    scheduler.prefill_budget = PrefillBudget(8, idle_tokens=8)
    for sequence in sequences:
        scheduler.add(sequence)
    mixed = deepstack_checked = 0

    def count_mixed(chunks: list[Any]) -> None:
        nonlocal mixed
        step = StepInputs.of(chunks)
        if step.deepstack_features and any(chunk.sequence.images is None for chunk in chunks):
            mixed += 1

    def check(sequence: Sequence, row: torch.Tensor) -> None:
        nonlocal deepstack_checked
        ids = torch.tensor([sequence.token_ids])
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        vision = sequence.request.vision
        if vision is not None:
            inputs |= {**vision.tensors, "mm_token_type_ids": (ids == vision.image_token_id).int()}
        with torch.inference_mode():
            expected = reference(**inputs).logits[0, -1]
        torch.testing.assert_close(row, expected, atol=2e-4, rtol=1e-4)
        if vision is not None and not deepstack_checked:
            language_model = reference.model.language_model
            with torch.inference_mode(), mock.patch.object(language_model, "_deepstack_process", _unchanged):
                without = reference(**inputs).logits[0, -1]
            assert (without - expected).abs().max() > 1e-2  # dropping deepstack changes the logits
            deepstack_checked += 1

    decode_greedily(scheduler, runner, 16, check, after_step=count_mixed, steps=400)
    assert mixed > 0 and deepstack_checked and scheduler.preemptions > 0


def _unchanged(hidden_states: torch.Tensor, visual_pos_masks: Any, visual_embeds: Any) -> torch.Tensor:
    return hidden_states


def _low_and_high(pipeline: VisionLanguagePipeline, factor: int) -> None:
    """A large picture's tokens at `low`, `high` and `auto` detail, alone and beside one another."""
    large = Image.open(io.BytesIO(picture((30, 160, 30), LARGE))).convert("RGB")
    width, height = LARGE

    def tokens(*details: str) -> int:
        images = tuple(PromptImage(large, detail) for detail in details)
        prompt, _ = pipeline.render([ChatMessage("user", QUESTION, images=images)])
        return prompt.count(pipeline.image_token_id)

    budget = pipeline.pixel_budget
    assert budget is not None and budget.max_pixels >= width * height  # its own budget keeps the picture whole
    own = smart_resize(height, width, factor, budget.min_pixels, budget.max_pixels)
    low = smart_resize(height, width, factor, budget.min_pixels, 512 * 512)
    assert low[0] * low[1] <= 512 * 512 < own[0] * own[1]
    own_tokens, low_tokens = own[0] * own[1] // factor**2, low[0] * low[1] // factor**2
    assert tokens("high") == tokens("auto") == own_tokens
    assert tokens("low") == low_tokens
    assert tokens("low", "high") == low_tokens + own_tokens  # each picture of a prompt at its own detail


def test_low_detail_caps_a_large_picture_at_512_by_512_pixels(vlm: RunningServer, http: httpx.Client) -> None:
    pipeline = vlm.state.default_model.worker.pipeline
    _low_and_high(pipeline, 32)
    large = picture((160, 30, 160), LARGE)
    usage = {
        detail: ask(http, None, [image_part(large, detail=detail), {"type": "input_text", "text": QUESTION}])["usage"]
        for detail in ("low", "high")
    }
    # 24 x 32 tokens at the processor's budget; 13 x 18 within 512 x 512 pixels.
    assert usage["high"]["input_tokens"] - usage["low"]["input_tokens"] == 24 * 32 - 13 * 18


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_low_detail_on_qwen2_vl_processors(family: str, tokenizer_path: str, tmp_path: Path) -> None:
    """Qwen2-VL's and Qwen2.5-VL's processors at their real patch size (14 pixels, 28 a token), a 1 Mpixel
    budget: the prompt's tokens only (nothing runs the model)."""
    builder = {"qwen2_vl": build_qwen2_vl, "qwen2_5_vl": build_qwen2_5_vl}[family]
    folder = builder(tokenizer_path, tmp_path / family, patch_size=14, max_pixels=1024 * 1024)
    pipeline = VisionLanguagePipeline.load(ModelSource(str(folder), family), device="cpu", dtype="float32")
    _low_and_high(pipeline, 28)
