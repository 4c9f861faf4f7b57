"""Gemma 3: a tiny random Gemma3ForConditionalGeneration (SigLIP tower of one layer, 16 tokens per image, two
text layers, the first a sliding-window one; SmolLM2's tokenizer with Gemma's image tokens added) built
here, served through the real `--model` path.

Gemma 3's image tokens attend to each other both ways during prefill, the rest causally. The engine-level
test drives the scheduler, block manager and model runner over image prompts cut into small chunks (some
ending before an image, some stretched to its end), batched, one admitted on a prefix-cache hit that ends
inside an image, then decoded; every sampled row must equal transformers' own forward with pixel values and
`token_type_ids`, and the same run with causal attention inside images must not. The served tests check
token counts (`detail: "high"` is pan-and-scan), schema-valid bodies and events, and `cached_tokens`.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from conftest import TINY_LAYERS, OpenResponsesSchema, RunningServer, decode_greedily
from PIL import Image
from test_vision import (
    BLOCK,
    DONE,
    QUESTION,
    TEMPLATE,
    ask,
    checked_stream,
    expansion,
    image_part,
    picture,
    prefill_chunks,
    serve_vlm,
)
from transformers import AutoModelForImageTextToText, AutoTokenizer

from respserve.config import load_settings
from respserve.engine.block_manager import BlockManager
from respserve.engine.generation import ChatMessage, GenerationRequest, PromptImage, SamplingParams
from respserve.engine.kv_cache import PagedKVCache
from respserve.engine.model_runner import ModelRunner
from respserve.engine.model_source import EMBEDDED_MODEL, ModelSource, ModelSourceError, resolve_model_source
from respserve.engine.prefill_budget import PrefillBudget
from respserve.engine.scheduler import Chunk, Scheduler
from respserve.engine.sequence import Sequence
from respserve.engine.text_pipeline import TextPipeline
from respserve.engine.vision import encode_images
from respserve.engine.vision_pipeline import VisionLanguagePipeline, load_processor

GEMMA_TEMPLATE = TEMPLATE.replace("<image>", "<start_of_image>")  # Gemma 3's template marks an image so
IMAGE_TOKENS = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
TOKENS_PER_IMAGE = 16
RED, BLUE, GREEN = picture((220, 20, 20)), picture((20, 20, 220)), picture((40, 200, 90))
WIDE = picture((200, 160, 30), size=(1200, 300))  # pan-and-scan cuts it into 4 crops of 300x300


def build_gemma3(folder: Path) -> Path:
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor, SiglipVisionConfig
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    source = resolve_model_source(EMBEDDED_MODEL, load_settings().cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(source.path, extra_special_tokens=IMAGE_TOKENS)
    images = Gemma3ImageProcessorPil(size={"height": 32, "width": 32})
    processor = Gemma3Processor(images, tokenizer, GEMMA_TEMPLATE, image_seq_length=TOKENS_PER_IMAGE)
    # 4x4 patches: 8x8 per picture, average-pooled 2x2 into 16 tokens.
    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=4
    )
    text = {
        "vocab_size": len(tokenizer),
        **TINY_LAYERS,
        "head_dim": 16,
        "query_pre_attn_scalar": 32,  # scaling 32**-0.5, not head_dim's: the model's must be used
        "sliding_window": 8,  # shorter than an image: its later tokens see only part of it on that layer
        "layer_types": ["sliding_attention", "full_attention"],
        "max_position_embeddings": 4096,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=TOKENS_PER_IMAGE,
        boi_token_index=tokenizer.boi_token_id,
        eoi_token_index=tokenizer.eoi_token_id,
        image_token_index=tokenizer.image_token_id,
    )
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(config)
    with torch.no_grad():  # a random projector starts at zeros: every picture would look the same
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=0.5)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def gemma(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    folder = build_gemma3(tmp_path_factory.mktemp("gemma3") / "gemma3")
    yield from serve_vlm(folder, tmp_path_factory)


@pytest.fixture(scope="module")
def http(gemma: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gemma.base_url, timeout=120) as client:
        yield client


def reference_logits(model: Any, sequence: Sequence) -> torch.Tensor:
    """transformers' forward over the whole sequence with its pixels; the image tokens marked as such, as
    Gemma3Processor marks them (`token_type_ids`), so they attend to each other both ways."""
    vision = sequence.request.vision
    ids = torch.tensor([sequence.token_ids])
    token_types = (ids == vision.image_token_id).long()
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": token_types}
    with torch.inference_mode():
        return model(**inputs, **vision.tensors).logits[0, -1]


def image_sequence(
    pipeline: Any, model: Any, name: str, system: str, pictures: tuple[bytes, ...], text: str
) -> Sequence:
    images = tuple(PromptImage(Image.open(io.BytesIO(data)).convert("RGB")) for data in pictures)
    messages = [ChatMessage("system", system), ChatMessage("user", text, images=images)]
    prompt, vision = pipeline.render(messages)
    request = GenerationRequest(name, prompt, SamplingParams(max_tokens=4, temperature=0), vision)
    sequence = Sequence(request, pipeline.tokenizer, pipeline.vocab_size, pipeline.grammars, pipeline.token_texts)
    sequence.images = encode_images(model, vision)
    return sequence


def run_engine(model: Any, reference: Any, sequences: list[Sequence], later: Sequence) -> tuple[list[Chunk], float]:
    """The engine's loop (blocks of 4 tokens, at most 6 prompt tokens a step) over `sequences`, greedy, 4
    tokens each. The first is cancelled once it has computed its image (its client went away), and `later`
    added then. Returns every chunk scheduled and the largest difference of a sampled row from `reference`'s
    logits."""
    block_size, num_blocks = 4, 128
    cpu = torch.device("cpu")
    cache = PagedKVCache(model.config.get_text_config(), num_blocks, block_size, torch.float32, cpu)
    runner = ModelRunner(model, cache, cpu)
    scheduler = Scheduler(BlockManager(num_blocks, block_size), max_running=4, max_prefill_tokens=6)
    scheduler.prefill_budget = PrefillBudget(6, idle_tokens=6)  # never observed: 6 tokens a step throughout
    for sequence in sequences:
        scheduler.add(sequence)
    cancelled = sequences[0]
    image_end = cancelled.request.vision.first_image_token + TOKENS_PER_IMAGE
    scheduled: list[Chunk] = []
    worst = 0.0

    def cancel_after_its_image(chunks: list[Chunk]) -> None:
        scheduled.extend(chunks)
        if cancelled in scheduler.running and cancelled.num_computed >= image_end:
            scheduler.finish(cancelled)  # its published blocks stay cached
            scheduler.add(later)

    def measure(sequence: Sequence, row: torch.Tensor) -> None:
        nonlocal worst
        worst = max(worst, float((row - reference_logits(reference, sequence)).abs().max()))

    decode_greedily(scheduler, runner, 4, measure, after_step=cancel_after_its_image, steps=200)
    return scheduled, worst


def test_chunked_prefill_and_decode_match_transformers_with_images_attended_both_ways(gemma: RunningServer) -> None:
    pipeline = gemma.state.default_model.worker.pipeline
    folder = gemma.state.settings.model
    reference = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()

    def scenario() -> tuple[Any, list[Sequence], Sequence]:
        """A model for the engine (it takes the paged attention), and its sequences."""
        model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
        system = "You describe pictures briefly."
        ghost = image_sequence(pipeline, model, "ghost", system, (RED,), QUESTION)
        first = image_sequence(pipeline, model, "a", system, (GREEN,), QUESTION)
        two = image_sequence(pipeline, model, "b", "Compare.", (BLUE, GREEN), "Which is bluer?")
        # The ghost's picture behind the same text: admitted on the blocks it published.
        again = image_sequence(pipeline, model, "c", system, (RED,), "And what colour is it?")
        return model, [ghost, first, two], again

    model, sequences, again = scenario()
    chunks, worst = run_engine(model, reference, sequences, again)
    assert worst < 2e-4

    spans = {chunk.sequence.request_id: chunk.sequence.image_spans for chunk in chunks}
    assert spans["a"] == spans["c"] == ((14, 30),) and len(spans["b"]) == 2
    for chunk in chunks:
        assert not any(first < chunk.end < last for first, last in chunk.sequence.image_spans), chunk
    ends = {(chunk.sequence.request_id, chunk.start, chunk.end) for chunk in chunks}
    assert ("ghost", 12, 14) in ends  # ended before the image rather than inside it...
    assert ("ghost", 14, 30) in ends  # ...which the next chunk took whole, past its budget of 6
    # The repeat hit the ghost's blocks, up to inside the image (28 of [14, 30)); its first chunk computes
    # the image's last two tokens, the first of which reads the second (later in the same chunk).
    assert again.cached_tokens == 28
    assert any(name == "c" and start == 28 and end >= 30 for name, start, end in ends)

    model, sequences, again = scenario()
    for sequence in [*sequences, again]:
        sequence.image_spans = ()  # as if the images were text: causal attention inside them
    _, causal = run_engine(model, reference, sequences, again)
    assert causal > 1e-2  # the check above can fail: images attended causally give other logits


def test_an_image_from_a_data_url_is_read_and_counted(
    gemma: RunningServer, http: httpx.Client, schema: OpenResponsesSchema
) -> None:
    plain = ask(http, schema, [{"type": "input_text", "text": QUESTION}])
    viewed = ask(http, schema, [image_part(RED), {"type": "input_text", "text": QUESTION}])
    assert viewed["status"] in DONE
    # Its 16 placeholders between the begin- and end-of-image tokens, and the blank lines around them.
    assert expansion(gemma, RED) > TOKENS_PER_IMAGE + 2
    assert viewed["usage"]["input_tokens"] == plain["usage"]["input_tokens"] + expansion(gemma, RED)

    events = checked_stream(http, schema, [image_part(BLUE)])
    streamed = events[-1]["response"]["usage"]["input_tokens"]
    assert streamed == ask(http, None, [image_part(BLUE)])["usage"]["input_tokens"]


def test_high_detail_adds_pan_and_scan_crops(gemma: RunningServer, http: httpx.Client) -> None:
    text = {"type": "input_text", "text": QUESTION}
    auto, low, high = (
        ask(http, None, [image_part(WIDE, **detail), text])["usage"]["input_tokens"]
        for detail in ({}, {"detail": "low"}, {"detail": "high"})
    )
    assert auto == low  # one image at the fixed resolution
    crops = expansion(gemma, WIDE, do_pan_and_scan=True) - expansion(gemma, WIDE)
    assert high - auto == crops > 4 * TOKENS_PER_IMAGE  # the whole picture, and 4 crops of it, each 16 tokens


def test_cached_images_and_chunked_prefill_match_transformers_logprobs(
    gemma: RunningServer, http: httpx.Client
) -> None:
    folder = gemma.state.settings.model
    processor = load_processor(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    instructions = "You describe pictures for a museum catalogue, briefly and precisely. " * 3
    questions = ("Describe the picture, then say which colour fills most of it.", "Which colour is in the corner?")

    def prompt(question: str, data: bytes) -> dict[str, torch.Tensor]:
        turns = [
            {"role": "system", "content": [{"type": "text", "text": instructions}]},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
        ]
        text = processor.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
        image = Image.open(io.BytesIO(data)).convert("RGB")
        return dict(processor(text=[text], images=[[image]], return_tensors="pt", add_special_tokens=False))

    def reference(inputs: dict[str, torch.Tensor], steps: int) -> list[list[float]]:
        """Greedy decoding by whole forward passes: the top 5 logprobs before each new token."""
        tops = []
        for _ in range(steps):
            with torch.no_grad():
                logprobs = torch.log_softmax(model(**inputs).logits[0, -1].float(), -1)
            tops.append(logprobs.topk(5).values.tolist())
            token = logprobs.argmax().view(1, 1)
            columns = {"input_ids": token, "attention_mask": torch.ones_like(token), "token_type_ids": token * 0}
            for name, column in columns.items():  # the new token is text
                inputs[name] = torch.cat([inputs[name], column], dim=1)
        return tops

    def served(question: str, data: bytes) -> dict[str, Any]:
        content = [image_part(data), {"type": "input_text", "text": question}]
        logprobs = {"include": ["message.output_text.logprobs"], "top_logprobs": 5}
        body = ask(http, None, content, instructions=instructions, **logprobs)
        inputs = prompt(question, data)
        assert body["usage"]["input_tokens"] == inputs["input_ids"].shape[1]
        tokens = body["output"][0]["content"][0]["logprobs"][:4]
        assert tokens
        for step, (token, wanted) in enumerate(zip(tokens, reference(inputs, len(tokens)), strict=True)):
            got = sorted((top["logprob"] for top in token["top_logprobs"]), reverse=True)
            assert got == pytest.approx(wanted, abs=2e-4), f"output token {step}"
        return body["usage"]

    ids = [prompt(question, GREEN)["input_ids"][0].tolist() for question in questions]
    first_image = ids[0].index(gemma.state.default_model.worker.pipeline.image_token_id)
    shared = next(index for index, (a, b) in enumerate(zip(*ids, strict=False)) if a != b)
    assert first_image % BLOCK and shared > first_image + TOKENS_PER_IMAGE

    with prefill_chunks(gemma, 6):  # chunks of 6 tokens: one would end inside the image
        first = served(questions[0], GREEN)  # a picture no other test sends: nothing cached
        other_picture = ask(
            http, None, [image_part(BLUE), {"type": "input_text", "text": questions[0]}], instructions=instructions
        )["usage"]
        again = served(questions[1], GREEN)
    assert first["input_tokens_details"]["cached_tokens"] == 0
    # The same placeholders, another picture: only the blocks before the image's are shared...
    assert other_picture["input_tokens_details"]["cached_tokens"] == first_image // BLOCK * BLOCK
    # ...and the same picture shares everything up to the question.
    assert again["input_tokens_details"]["cached_tokens"] == shared // BLOCK * BLOCK > first_image


def test_what_the_attention_cannot_do_is_refused_at_load(tmp_path: Path) -> None:
    from transformers import Gemma2Config, Gemma3Config, Gemma3nConfig, PaliGemmaConfig

    softcapped = Gemma3Config(text_config={"attn_logit_softcapping": 50.0})
    refused = (
        (VisionLanguagePipeline, Gemma3nConfig(), "untested"),
        (VisionLanguagePipeline, PaliGemmaConfig(), "whole prompt prefix"),
        (VisionLanguagePipeline, softcapped, "softcaps"),
        (TextPipeline, Gemma2Config(), "softcaps"),  # Gemma 2 softcaps every layer's attention logits
    )
    for pipeline, config, reason in refused:
        folder = tmp_path / config.model_type
        config.save_pretrained(folder)
        with pytest.raises(ModelSourceError, match=reason):
            pipeline.load(ModelSource(str(folder), config.model_type))
