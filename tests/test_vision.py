"""Vision-language models: tiny random LLaVA and SmolVLM/Idefics3 models (SmolLM2's tokenizer, 32x32
vision towers) built here, served through the real `--model` path, asked about images the tests draw.

What is checked is what a user sees of the protocol: token counts (`usage.input_tokens` holds the tokens
the processor expands each image into), prefix-cache hits (`cached_tokens`: two pictures behind the same
placeholders share nothing past the text before them), schema-valid bodies and events, and 400s naming the
field for hostile images. The logprobs check ties the engine's paged, embeddings-fed forward pass to
transformers' own forward with pixel values: the features reach the model where the processor put them.
"""

from __future__ import annotations

import base64
import io
import ipaddress
import json
import struct
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from conftest import OpenResponsesSchema, RunningServer, free_port, parse_sse, sdk_client, start_server, stop_server
from PIL import Image
from transformers import AutoProcessor, AutoTokenizer

from respserve.api.image_urls import _is_public
from respserve.config import load_settings
from respserve.engine.model_source import ModelSource, ModelSourceError
from respserve.engine.vision_pipeline import VisionLanguagePipeline

# Renders each part in order, as SmolVLM's own template does.
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for p in m['content'] %}{% if p['type'] == 'image' %}<image>{% else %}{{ p['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
BLOCK = 16  # the engine's KV block size
QUESTION = "What is in the picture?"
DONE = ("completed", "incomplete")  # a random model ends by itself or at max_output_tokens


def _text_config(tokenizer: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
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


BUILDERS = {"llava": build_llava, "idefics3": build_idefics3}


@pytest.fixture(scope="module", params=list(BUILDERS))
def vlm(
    request: pytest.FixtureRequest, server: RunningServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    tokenizer_path = server.state.default_model.worker.pipeline.tokenizer.name_or_path
    folder = BUILDERS[request.param](tokenizer_path, tmp_path_factory.mktemp(request.param) / request.param)
    settings = load_settings(
        port=free_port(),
        data_dir=str(tmp_path_factory.mktemp(f"data-{request.param}")),
        model=str(folder),
        device="cpu",  # float32 on the CPU: the logprobs test compares with transformers' own forward there
        dtype="float32",
        kv_cache_memory="64MiB",
        allow_image_urls=True,
        max_image_pixels=4_000_000,
    )
    uv_server, thread, running = start_server(settings)
    yield running
    stop_server(uv_server, thread)


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
    """How many tokens the processor makes of one image (its placeholder's expansion)."""
    processor = AutoProcessor.from_pretrained(vlm.state.settings.model)
    token = processor.image_token if hasattr(processor, "image_token") else "<image>"
    image = Image.open(io.BytesIO(data)).convert("RGB")
    ids = processor(text=[token], images=[[image]], add_special_tokens=False, **options)["input_ids"][0]
    return len(ids)


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
    processor = AutoProcessor.from_pretrained(vlm.state.settings.model)
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
    else:  # LLaVA sees one fixed resolution: detail is ignored
        assert auto["input_tokens"] == low["input_tokens"]


def test_streamed_and_batched_with_text_requests(
    vlm: RunningServer, http: httpx.Client, schema: OpenResponsesSchema
) -> None:
    payload = {"input": [{"role": "user", "content": [image_part(RED)]}], "stream": True, "max_output_tokens": 16}
    frames = parse_sse(http.post("/v1/responses", json=payload).text)
    assert frames[-1].data == "[DONE]"
    events = [json.loads(frame.data) for frame in frames[:-1]]
    for event in events:
        schema.event(event)
    assert events[-1]["type"] in ("response.completed", "response.incomplete")

    def one(index: int) -> dict[str, Any]:
        content: Any = QUESTION if index % 2 else [image_part(picture((index * 40, 90, 10)))]
        return ask(http, None, content, max_output_tokens=24)

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(one, range(6)))
    assert all(answer["status"] in DONE for answer in answers)


def test_logprobs_match_transformers_forward_with_pixels(vlm: RunningServer, http: httpx.Client) -> None:
    from transformers import AutoModelForImageTextToText

    folder = vlm.state.settings.model
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)

    def reference(data: bytes) -> list[float]:
        inputs = processor(text=[text], images=[[Image.open(io.BytesIO(data))]], return_tensors="pt")
        with torch.no_grad():
            logits = model(**inputs).logits[0, -1]
        return torch.log_softmax(logits.float(), -1).topk(5).values.tolist()

    body = ask(
        http,
        None,
        [image_part(RED), {"type": "input_text", "text": QUESTION}],
        include=["message.output_text.logprobs"],
        top_logprobs=5,
    )
    first = body["output"][0]["content"][0]["logprobs"][0]
    served = sorted((top["logprob"] for top in first["top_logprobs"]), reverse=True)
    assert served == pytest.approx(reference(RED), abs=2e-4)
    assert reference(BLUE) != pytest.approx(reference(RED), abs=2e-4)  # the picture matters to the logits


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


def test_mrope_models_are_refused_at_load(tmp_path: Path) -> None:
    from transformers import Qwen2VLConfig

    Qwen2VLConfig().save_pretrained(tmp_path)
    with pytest.raises(ModelSourceError, match="M-RoPE"):
        VisionLanguagePipeline.load(ModelSource(str(tmp_path), "qwen2-vl"))
