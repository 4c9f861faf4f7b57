"""Vision-language models: tiny random LLaVA, SmolVLM/Idefics3, Qwen2-VL and Qwen2.5-VL models (SmolLM2's
tokenizer, one- or two-layer vision towers) built here, served through the real `--model` path, asked about
images the tests draw.

What is checked is what a user sees of the protocol: token counts (`usage.input_tokens` holds the tokens
the processor expands each image into), prefix-cache hits (`cached_tokens`: two pictures behind the same
placeholders share nothing past the text before them), schema-valid bodies and events, and 400s naming the
field for hostile images. The logprobs check ties the engine's paged, embeddings-fed forward pass, over a
prefill cut into chunks and then decode steps, to transformers' own forward with pixel values: the features
reach the model where the processor put them, and Qwen2-VL's tokens sit on its 3-D (M-RoPE) positions. The
engine's own loop over a pool too small for its image prompts checks the same after preemption.
"""

from __future__ import annotations

import base64
import io
import ipaddress
import struct
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from conftest import (
    TINY_LAYERS,
    OpenResponsesSchema,
    RunningServer,
    decode_greedily,
    free_port,
    sdk_client,
    serving,
    stream_events,
)
from PIL import Image
from transformers import AutoTokenizer

from respserve.api.image_urls import _is_public
from respserve.config import load_settings
from respserve.engine.block_manager import BlockManager
from respserve.engine.generation import ChatMessage, GenerationRequest, PromptImage, SamplingParams
from respserve.engine.kv_cache import PagedKVCache
from respserve.engine.model_runner import ModelRunner
from respserve.engine.model_source import ModelSource, ModelSourceError
from respserve.engine.prefill_budget import PrefillBudget
from respserve.engine.scheduler import Scheduler
from respserve.engine.sequence import Sequence
from respserve.engine.vision import encode_images, rope_positions
from respserve.engine.vision_pipeline import VisionLanguagePipeline, load_processor, processor_class

# Renders each part in order, as SmolVLM's own template does.
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for p in m['content'] %}{% if p['type'] == 'image' %}<image>{% else %}{{ p['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen2-VL's template puts each image's placeholder between its vision start and end tokens.
QWEN_TEMPLATE = TEMPLATE.replace("<image>", "<|vision_start|><|image_pad|><|vision_end|>")
BLOCK = 16  # the engine's KV block size
QUESTION = "What is in the picture?"
DONE = ("completed", "incomplete")  # a random model ends by itself or at max_output_tokens


def _text_config(tokenizer: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        **TINY_LAYERS,
        head_dim=16,
        max_position_embeddings=4096,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_llava(tokenizer_path: str, folder: Path) -> Path:
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    images = LlavaImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=TEMPLATE,
    )
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=_text_config(tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def build_idefics3(tokenizer_path: str, folder: Path) -> Path:
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor, Idefics3VisionConfig
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    added = ["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>"]
    tokenizer.add_special_tokens({"additional_special_tokens": added})
    # Images are split into 32x32 tiles (plus the whole picture), each 4 tokens after the pixel shuffle.
    images = Idefics3ImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 32})
    processor = Idefics3Processor(image_processor=images, tokenizer=tokenizer, image_seq_len=4, chat_template=TEMPLATE)
    vision = Idefics3VisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8
    )
    config = Idefics3Config(
        vision_config=vision,
        text_config=_text_config(tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        scale_factor=2,
    )
    torch.manual_seed(0)
    Idefics3ForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def build_qwen2_vl(tokenizer_path: str, folder: Path, **options: Any) -> Path:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    classes = (Qwen2VLConfig, Qwen2VLForConditionalGeneration)
    vision = {"depth": 1, "embed_dim": 32, "hidden_size": 64, "num_heads": 2}
    return _build_qwen(tokenizer_path, folder, classes, vision, **options)


def build_qwen2_5_vl(tokenizer_path: str, folder: Path, **options: Any) -> Path:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    classes = (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration)
    # Two blocks: the first attends within 16x16-pixel windows (2x2 tokens), the second over the whole picture.
    vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "out_hidden_size": 64, "num_heads": 2}
    vision |= {"window_size": 16, "fullatt_block_indexes": [1]}
    return _build_qwen(tokenizer_path, folder, classes, vision, **options)


def _build_qwen(
    tokenizer_path: str,
    folder: Path,
    classes: tuple[Any, Any],
    vision: dict[str, Any],
    *,
    patch_size: int = 4,
    max_pixels: int = 128 * 128,
    text: dict[str, Any] | None = None,
) -> Path:
    """A tiny Qwen-VL-family model; `text` adds to (or overrides) its language model's config."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    config_class, model_class = classes
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    added = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tokenizer.add_special_tokens({"additional_special_tokens": added})
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in added}
    # 4x4 patches merged 2x2: one token per 8x8 pixels, so a 48x40 picture is a grid of 5 rows of 6 tokens.
    images = Qwen2VLImageProcessorPil(patch_size=patch_size, merge_size=2, min_pixels=16 * 16, max_pixels=max_pixels)
    # The model's processor as respserve loads it (without its video half where torchvision is missing).
    processors = processor_class(config_class.model_type)
    assert processors is not None
    processor = processors(image_processor=images, tokenizer=tokenizer, chat_template=QWEN_TEMPLATE)
    text_config = {
        "vocab_size": len(tokenizer),
        **TINY_LAYERS,
        "max_position_embeddings": 4096,
        # head_dim 16: 8 rotary frequencies, split over (temporal, height, width).
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        **(text or {}),
    }
    config = config_class(
        text_config=text_config,
        vision_config={**vision, "patch_size": patch_size, "spatial_merge_size": 2},
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(0)
    model_class(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


BUILDERS = {
    "llava": build_llava,
    "idefics3": build_idefics3,
    "qwen2_vl": build_qwen2_vl,
    "qwen2_5_vl": build_qwen2_5_vl,
}


@pytest.fixture(scope="module", params=list(BUILDERS))
def vlm(
    request: pytest.FixtureRequest, server: RunningServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    tokenizer_path = server.state.default_model.worker.pipeline.tokenizer.name_or_path
    folder = BUILDERS[request.param](tokenizer_path, tmp_path_factory.mktemp(request.param) / request.param)
    yield from serve_vlm(folder, tmp_path_factory, allow_image_urls=True)


def serve_vlm(folder: Path, tmp_path_factory: pytest.TempPathFactory, **settings: Any) -> Iterator[RunningServer]:
    """A server for the model `folder` (a fixture's body: yields it, then stops it)."""
    loaded = load_settings(
        port=free_port(),
        data_dir=str(tmp_path_factory.mktemp(f"data-{folder.name}")),
        model=str(folder),
        device="cpu",  # float32 on the CPU: the logprobs tests compare with transformers' own forward there
        dtype="float32",
        kv_cache_memory="64MiB",
        max_image_pixels=4_000_000,
        **settings,
    )
    yield from serving(loaded)


@contextmanager
def prefill_chunks(server: RunningServer, tokens: int) -> Iterator[None]:
    """Inside, prompts are prefilled `tokens` a step, so that chunks start and end within images."""
    budget = server.state.default_model.worker.scheduler.prefill_budget
    limits = budget.max_tokens, budget.idle_tokens
    budget.max_tokens = budget.idle_tokens = tokens
    try:
        yield
    finally:
        budget.max_tokens, budget.idle_tokens = limits


def chunked_logprobs(server: RunningServer, http: httpx.Client, data: bytes, question: str) -> list[dict[str, Any]]:
    """The first output tokens' logprobs (5 alternatives each) for a picture and a question, its prompt
    prefilled a block a step; the picture must be new to the server (its tokens not cached)."""
    with prefill_chunks(server, BLOCK):
        body = ask(
            http,
            None,
            [image_part(data), {"type": "input_text", "text": question}],
            include=["message.output_text.logprobs"],
            top_logprobs=5,
        )
    assert body["usage"]["input_tokens"] - body["usage"]["input_tokens_details"]["cached_tokens"] > 2 * BLOCK
    tokens = body["output"][0]["content"][0]["logprobs"][:6]
    assert tokens
    return tokens


def checked_stream(http: httpx.Client, schema: OpenResponsesSchema, content: list[Any]) -> list[dict[str, Any]]:
    """A streamed request of one user turn: its events, each checked against the schema, ending terminally."""
    events, frames = stream_events(http, {"input": [{"role": "user", "content": content}], "max_output_tokens": 16})
    assert frames[-1].data == "[DONE]"
    for event in events:
        schema.event(event)
    assert events[-1]["type"] in ("response.completed", "response.incomplete")
    return events


@pytest.fixture(scope="module")
def client(vlm: RunningServer) -> openai.OpenAI:
    return sdk_client(vlm)


@pytest.fixture(scope="module")
def http(vlm: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=vlm.base_url, timeout=120) as client:
        yield client


def picture(color: tuple[int, int, int], size: tuple[int, int] = (48, 40), kind: str = "PNG") -> bytes:
    image = Image.new("RGB", size, color)
    image.paste((255 - color[0], 128, color[2] // 2), (4, 4, size[0] // 2, size[1] // 2))
    buffer = io.BytesIO()
    image.save(buffer, format=kind)
    return buffer.getvalue()


def data_url(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64,{base64.b64encode(data).decode()}"


RED, BLUE = picture((220, 20, 20)), picture((20, 20, 220))


def image_part(data: bytes, **extra: Any) -> dict[str, Any]:
    return {"type": "input_image", "image_url": data_url(data), **extra}


def ask(http: httpx.Client, schema: OpenResponsesSchema | None, content: Any, **body: Any) -> dict[str, Any]:
    """A greedy 16-token answer to one user turn; the body, schema-checked."""
    payload = {"input": [{"role": "user", "content": content}], "temperature": 0, "max_output_tokens": 16, **body}
    answer = http.post("/v1/responses", json=payload)
    assert answer.status_code == 200, answer.text
    if schema is not None:
        schema.response(answer.json())
    return answer.json()


def expansion(vlm: RunningServer, data: bytes, **options: Any) -> int:
    """How many tokens one image adds to a turn (its markup in the template, expanded by the processor)."""
    processor = load_processor(vlm.state.settings.model)
    image = Image.open(io.BytesIO(data)).convert("RGB")

    def tokens(parts: list[dict[str, str]], images: Any) -> int:
        text = processor.apply_chat_template([{"role": "user", "content": parts}], tokenize=False)
        return len(processor(text=[text], images=images, add_special_tokens=False, **options)["input_ids"][0])

    text = {"type": "text", "text": QUESTION}
    return tokens([{"type": "image"}, text], [[image]]) - tokens([text], None)


def test_image_tokens_are_in_the_prompt_from_data_urls_files_and_tool_outputs(
    vlm: RunningServer, client: openai.OpenAI, http: httpx.Client, schema: OpenResponsesSchema
) -> None:
    text_only = ask(http, schema, [{"type": "input_text", "text": QUESTION}])["usage"]["input_tokens"]
    with_image = ask(http, schema, [image_part(RED), {"type": "input_text", "text": QUESTION}])
    assert with_image["status"] in DONE
    assert with_image["usage"]["input_tokens"] == text_only + expansion(vlm, RED)
    uploaded = client.files.create(file=("red.png", RED, "image/png"), purpose="vision")
    for part in ({"type": "input_image", "file_id": uploaded.id}, {"type": "input_file", "file_id": uploaded.id}):
        by_file = ask(http, schema, [part, {"type": "input_text", "text": QUESTION}])
        assert by_file["usage"]["input_tokens"] == with_image["usage"]["input_tokens"]

    # Codex's view_image: the picture comes back inside a function_call_output.
    def tool_turn(output: Any) -> list[dict[str, Any]]:
        call = {"type": "function_call", "call_id": "call_1", "name": "view_image", "arguments": '{"path": "a.png"}'}
        return [
            {"role": "user", "content": "Look at a.png."},
            call,
            {"type": "function_call_output", "call_id": "call_1", "output": output},
        ]

    tool = {"type": "function", "name": "view_image", "parameters": {"type": "object", "properties": {}}}
    plain = http.post("/v1/responses", json={"input": tool_turn(""), "tools": [tool], "max_output_tokens": 16})
    viewed = http.post(
        "/v1/responses", json={"input": tool_turn([image_part(BLUE)]), "tools": [tool], "max_output_tokens": 16}
    )
    assert plain.status_code == viewed.status_code == 200, viewed.text
    schema.response(viewed.json())
    assert viewed.json()["usage"]["input_tokens"] == plain.json()["usage"]["input_tokens"] + expansion(vlm, BLUE)


def test_different_images_share_only_the_text_before_them(vlm: RunningServer, http: httpx.Client) -> None:
    instructions = "You describe pictures for a museum catalogue, briefly and precisely. " * 3
    processor = load_processor(vlm.state.settings.model)
    turn = [{"role": "system", "content": instructions}, {"role": "user", "content": [{"type": "image"}]}]
    text = processor.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
    ids = processor(text=[text], images=[[Image.open(io.BytesIO(RED))]], add_special_tokens=False)["input_ids"][0]
    first_image = list(ids).index(vlm.state.default_model.worker.pipeline.image_token_id)
    assert first_image >= 2 * BLOCK  # the instructions fill whole blocks before the image's

    content = [image_part(RED), {"type": "input_text", "text": QUESTION}]
    red = ask(http, None, content, instructions=instructions)["usage"]
    assert red["input_tokens_details"]["cached_tokens"] == 0
    blue = ask(http, None, [image_part(BLUE), content[1]], instructions=instructions)["usage"]
    assert blue["input_tokens"] == red["input_tokens"]  # the same placeholders...
    assert blue["input_tokens_details"]["cached_tokens"] == first_image // BLOCK * BLOCK  # ...not the same KV
    again = ask(http, None, content, instructions=instructions)["usage"]
    assert again["input_tokens_details"]["cached_tokens"] == (red["input_tokens"] - 1) // BLOCK * BLOCK


def test_images_in_a_stored_chain_are_read_again(vlm: RunningServer, http: httpx.Client) -> None:
    first = ask(http, None, [image_part(BLUE), {"type": "input_text", "text": "Remember this picture."}])
    second = http.post(
        "/v1/responses",
        json={"input": QUESTION, "previous_response_id": first["id"], "temperature": 0, "max_output_tokens": 16},
    )
    assert second.status_code == 200, second.text
    usage = second.json()["usage"]
    assert usage["input_tokens"] > first["usage"]["input_tokens"] + first["usage"]["output_tokens"]
    # The picture's KV is reused: the same pixels hash the same.
    assert usage["input_tokens_details"]["cached_tokens"] >= first["usage"]["input_tokens"] // BLOCK * BLOCK


def test_low_detail_skips_tiling_where_the_processor_tiles(vlm: RunningServer, http: httpx.Client) -> None:
    large = picture((30, 160, 30), size=(96, 80))
    auto = ask(http, None, [image_part(large), {"type": "input_text", "text": QUESTION}])["usage"]
    low = ask(http, None, [image_part(large, detail="low"), {"type": "input_text", "text": QUESTION}])["usage"]
    if vlm.state.default_model.worker.pipeline.splits_images:  # SmolVLM/Idefics3: one tile, not 3x3 + 1
        tiles = expansion(vlm, large) - expansion(vlm, large, do_image_splitting=False)
        assert auto["input_tokens"] - low["input_tokens"] == tiles > 0
    else:  # LLaVA: one fixed resolution; these Qwen-VLs: a budget under low detail's (test_vision_qwen3.py)
        assert auto["input_tokens"] == low["input_tokens"]


def test_streamed_and_batched_with_text_requests(
    vlm: RunningServer, http: httpx.Client, schema: OpenResponsesSchema
) -> None:
    checked_stream(http, schema, [image_part(RED)])

    def one(index: int) -> dict[str, Any]:
        content: Any = QUESTION if index % 2 else [image_part(picture((index * 40, 90, 10)))]
        return ask(http, None, content, max_output_tokens=24)

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(one, range(6)))
    assert all(answer["status"] in DONE for answer in answers)


def test_logprobs_match_transformers_forward_with_pixels(vlm: RunningServer, http: httpx.Client) -> None:
    from transformers import AutoModelForImageTextToText

    folder = vlm.state.settings.model
    processor = load_processor(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    question = "Describe the picture for a museum catalogue, then say which colour fills most of it."
    turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)

    def reference(data: bytes, steps: int) -> list[list[float]]:
        """Greedy decoding by whole forward passes (no cache): the top 5 logprobs before each new token."""
        inputs = dict(processor(text=[text], images=[[Image.open(io.BytesIO(data))]], return_tensors="pt"))
        tops = []
        for _ in range(steps):
            with torch.no_grad():
                logprobs = torch.log_softmax(model(**inputs).logits[0, -1].float(), -1)
            tops.append(logprobs.topk(5).values.tolist())
            token = logprobs.argmax().view(1, 1)
            appended = {"input_ids": token, "attention_mask": torch.ones_like(token)}
            appended["mm_token_type_ids"] = torch.zeros_like(token)  # Qwen2-VL: the new token is text
            for name, column in appended.items():
                if name in inputs:
                    inputs[name] = torch.cat([inputs[name], column.to(inputs[name].dtype)], dim=1)
        return tops

    # A picture no earlier test sent (its KV is not cached), prefilled 16 tokens a step: chunks start inside it.
    green = picture((40, 200, 90))
    tokens = chunked_logprobs(vlm, http, green, question)
    expected = reference(green, len(tokens))
    for step, (token, wanted) in enumerate(zip(tokens, expected, strict=True)):
        served = sorted((top["logprob"] for top in token["top_logprobs"]), reverse=True)
        assert served == pytest.approx(wanted, abs=2e-4), f"output token {step}"
    assert reference(BLUE, 1)[0] != pytest.approx(reference(RED, 1)[0], abs=2e-4)  # the picture matters


def test_preempted_image_prompts_recompute_without_changing_a_logit(vlm: RunningServer) -> None:
    """The engine's own loop over a pool too small for two growing image prompts: the newer is preempted and
    recomputed from its kept image rows and positions; every sampled position matches transformers' forward
    over the whole sequence with its pixels."""
    from transformers import AutoModelForImageTextToText

    pipeline = vlm.state.default_model.worker.pipeline
    folder = vlm.state.settings.model
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    reference = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    sequences = []
    for index, color in enumerate(((200, 40, 40), (40, 200, 40), (40, 40, 200))):
        image = PromptImage(Image.open(io.BytesIO(picture(color))).convert("RGB"))
        prompt, vision = pipeline.render([ChatMessage("user", f"Picture {index}: {QUESTION}", images=(image,))])
        request = GenerationRequest(f"pre-{index}", prompt, SamplingParams(max_tokens=16, temperature=0), vision)
        sequence = Sequence(request, pipeline.tokenizer, pipeline.vocab_size, pipeline.grammars, pipeline.token_texts)
        sequence.images = encode_images(model, vision)
        sequence.rope_positions = rope_positions(model, vision, prompt)
        sequences.append(sequence)
    block_size = 4
    blocks = -(-max(len(sequence.token_ids) for sequence in sequences) // block_size)  # the longest prompt's
    num_blocks = 1 + 2 * blocks + 2  # two prompts fit at once, not their 16 output tokens each
    cpu = torch.device("cpu")
    cache = PagedKVCache(model.config.get_text_config(), num_blocks, block_size, torch.float32, cpu)
    runner = ModelRunner(model, cache, cpu)
    scheduler = Scheduler(BlockManager(num_blocks, block_size), max_running=4, max_prefill_tokens=8)
    scheduler.prefill_budget = PrefillBudget(8, idle_tokens=8)  # chunks of 8 tokens, decoding or not
    for sequence in sequences:
        scheduler.add(sequence)

    def check(sequence: Sequence, row: torch.Tensor) -> None:
        vision = sequence.request.vision
        ids = torch.tensor([sequence.token_ids])
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), **vision.tensors}
        inputs["mm_token_type_ids"] = (ids == vision.image_token_id).int()  # read by Qwen2-VL's family only
        with torch.inference_mode():
            expected = reference(**inputs).logits[0, -1]
        torch.testing.assert_close(row, expected, atol=2e-4, rtol=1e-4)

    decode_greedily(scheduler, runner, 16, check, steps=400)
    assert scheduler.preemptions > 0


def test_mrope_positions_follow_the_image_grid(vlm: RunningServer) -> None:
    pipeline = vlm.state.default_model.worker.pipeline
    image = PromptImage(Image.open(io.BytesIO(RED)).convert("RGB"))
    prompt, vision = pipeline.render([ChatMessage("user", QUESTION, images=(image,))])
    assert vision is not None
    positions = rope_positions(pipeline.model, vision, prompt)
    if not hasattr(pipeline.model.model, "get_rope_index"):  # LLaVA, Idefics3: every token at its index
        assert positions is None
        return
    assert positions is not None
    first, count = vision.first_image_token, vision.num_image_tokens
    rows, columns = (int(size) // 2 for size in vision.tensors["image_grid_thw"][0, 1:])  # merged 2x2
    assert rows * columns == count and rows > 1 and columns > 1
    grid = positions.span(first, first + count) - first
    assert grid[0].tolist() == [0] * count  # one picture: a single temporal step
    assert grid[1].tolist() == [row for row in range(rows) for _ in range(columns)]
    assert grid[2].tolist() == [column for _ in range(rows) for column in range(columns)]
    # Text after the picture goes on from its largest side, and so do the output tokens.
    assert positions.delta == max(rows, columns) - count
    after = positions.span(first + count, len(prompt) + 3)
    assert after.tolist() == [list(range(first + max(rows, columns), len(prompt) + 3 + positions.delta))] * 3


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG declaring width x height with almost no pixel data: a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def test_hostile_images_are_400s_naming_the_field(
    vlm: RunningServer, client: openai.OpenAI, http: httpx.Client, schema: OpenResponsesSchema
) -> None:
    jpeg = picture((10, 200, 10), kind="JPEG")
    hostile = {
        "100 megapixels": (data_url(_png_header_only(10_000, 10_000)), "image_too_large"),
        "truncated jpeg": (data_url(jpeg[: len(jpeg) // 2], "image/jpeg"), "invalid_image"),
        "not an image": (data_url(b"just some text, not pixels"), "invalid_image"),
        "loopback url": ("https://127.0.0.1/cat.png", "image_url_forbidden"),
        "loopback by name": ("https://localhost:8443/cat.png", "image_url_forbidden"),  # checked after DNS
        "plain http": ("http://example.com/cat.png", "invalid_image_url"),
    }
    for name, (url, code) in hostile.items():
        answer = http.post(
            "/v1/responses", json={"input": [{"role": "user", "content": [{"type": "input_image", "image_url": url}]}]}
        )
        assert answer.status_code == 400, (name, answer.text)
        error = answer.json()["error"]
        assert (error["param"], error["code"]) == ("input[0].content[0].image_url", code), name
    bomb = client.files.create(file=("bomb.png", _png_header_only(10_000, 10_000)), purpose="vision")
    answer = http.post(
        "/v1/responses", json={"input": [{"role": "user", "content": [{"type": "input_image", "file_id": bomb.id}]}]}
    )
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "input[0].content[0].file_id"
    assert http.get("/health").status_code == 200
    assert ask(http, schema, [image_part(RED)])["status"] in DONE


def test_image_urls_are_refused_unless_allowed(vlm: RunningServer, http: httpx.Client) -> None:
    settings = vlm.state.settings
    settings_before = settings.allow_image_urls
    settings.allow_image_urls = False
    try:
        content = [{"type": "input_image", "image_url": "https://example.com/cat.png"}]
        answer = http.post("/v1/responses", json={"input": [{"role": "user", "content": content}]})
    finally:
        settings.allow_image_urls = settings_before
    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == "unsupported_parameter"


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("2606:4700::1111", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("192.168.0.7", False),
        ("169.254.169.254", False),  # cloud metadata
        ("100.64.0.1", False),  # carrier-grade NAT
        ("::1", False),
        ("fe80::1", False),
        ("::ffff:127.0.0.1", False),  # IPv4-mapped loopback
        ("224.0.0.1", False),
    ],
)
def test_only_public_addresses_are_fetched(address: str, public: bool) -> None:
    assert _is_public(ipaddress.ip_address(address)) is public


def test_unserved_families_are_refused_at_load_with_the_reason(tmp_path: Path) -> None:
    from transformers import Glm4vConfig, PaliGemmaConfig, Qwen3VLMoeConfig

    refused = ((Qwen3VLMoeConfig(), "mixture-of-experts"), (Glm4vConfig(), "M-RoPE"), (PaliGemmaConfig(), "both ways"))
    for config, reason in refused:
        folder = tmp_path / config.model_type
        config.save_pretrained(folder)
        with pytest.raises(ModelSourceError, match=reason):
            VisionLanguagePipeline.load(ModelSource(str(folder), config.model_type))
