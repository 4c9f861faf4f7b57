"""Image generation: tiny random-weight diffusers pipelines (SD, Flux and SD3 shapes), saved to a folder and
served through the real `AutoPipelineForText2Image.from_pretrained` path beside the text model."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from conftest import (
    OpenResponsesSchema,
    RunningServer,
    free_port,
    sdk_client,
    serving,
    stream_events,
    wait_for,
)
from PIL import Image

from respserve.config import load_settings
from respserve.engine.image_pipeline import ImagePipeline

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from random_pipelines import TINY_BUILDERS, build  # noqa: E402

TEXT_MODEL = "SmolLM2-135M-Instruct"
IMAGE_MODELS = list(TINY_BUILDERS)  # tiny-sd, tiny-flux, tiny-sd3
FAST = {"steps": 2}


@pytest.fixture(scope="module")
def image_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("pipelines")
    specs = [f"{kind}={build(kind, root / kind)}" for kind in IMAGE_MODELS]
    settings = load_settings(
        port=free_port(), data_dir=str(tmp_path_factory.mktemp("image-data")), image_models=specs, image_max_side=256
    )
    yield from serving(settings)


@pytest.fixture(scope="module")
def ihttp(image_server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=image_server.base_url, timeout=120) as client:
        yield client


def _create(http: httpx.Client, model: str, prompt: str = "a red fox", seed: int | None = 1, **options: Any) -> Any:
    body: dict[str, Any] = {"model": model, "input": prompt, "provider_options": {"image": {**FAST, **options}}}
    if seed is not None:
        body["seed"] = seed
    return http.post("/v1/responses", json=body)


def _images(body: dict[str, Any]) -> list[dict[str, Any]]:
    (message,) = body["output"]
    assert message["type"] == "message" and message["role"] == "assistant" and message["status"] == "completed"
    return message["content"]


def _decode(data: str | bytes) -> Image.Image:
    raw = base64.b64decode(data) if isinstance(data, str) else data
    image = Image.open(io.BytesIO(raw))
    image.load()
    return image


def _pixels(part: dict[str, Any]) -> np.ndarray:
    return np.asarray(_decode(part["image_data"]).convert("RGB"), dtype=np.int16)


def test_models_lists_text_and_image_models(ihttp: httpx.Client) -> None:
    ids = [card["id"] for card in ihttp.get("/v1/models").json()["data"]]
    assert ids == [TEXT_MODEL, *IMAGE_MODELS]
    assert ihttp.get("/v1/models/tiny-flux").json()["id"] == "tiny-flux"


@pytest.mark.parametrize("model", IMAGE_MODELS)
def test_each_pipeline_makes_images_of_the_asked_size_and_count(
    ihttp: httpx.Client, schema: OpenResponsesSchema, model: str
) -> None:
    response = _create(ihttp, model, width=64, height=32, num_images=2)
    assert response.status_code == 200, response.text
    body = response.json()
    schema.response(body)
    assert body["status"] == "completed" and body["model"] == model and body["usage"] is None
    parts = _images(body)
    assert len(parts) == 2
    for part in parts:
        assert part["type"] == "output_image" and part["format"] == "png" and part["image_url"] is None
        image = _decode(part["image_data"])
        assert image.format == "PNG" and image.size == (64, 32)
    assert not np.array_equal(_pixels(parts[0]), _pixels(parts[1]))  # image i is drawn from seed + i


def test_default_size_comes_from_the_pipeline(ihttp: httpx.Client) -> None:
    (part,) = _images(_create(ihttp, "tiny-sd").json())
    assert _decode(part["image_data"]).size == (64, 64)  # unet sample_size 8 x vae scale 8


@pytest.mark.parametrize(("image_format", "pil_format"), [("jpeg", "JPEG"), ("webp", "WEBP"), ("png", "PNG")])
def test_output_formats(ihttp: httpx.Client, image_format: str, pil_format: str) -> None:
    (part,) = _images(_create(ihttp, "tiny-sd3", output_format=image_format, output_compression=80).json())
    assert part["format"] == image_format
    assert _decode(part["image_data"]).format == pil_format


def test_seed_makes_images_reproducible(ihttp: httpx.Client) -> None:
    first = _images(_create(ihttp, "tiny-sd", seed=7).json())[0]["image_data"]
    again = _images(_create(ihttp, "tiny-sd", seed=7).json())[0]["image_data"]
    other = _images(_create(ihttp, "tiny-sd", seed=8).json())[0]["image_data"]
    assert first == again
    assert first != other
    # The second image of seed 7 is the first image of seed 8 (up to batch-size rounding in the pixels).
    pair = _images(_create(ihttp, "tiny-sd", seed=7, num_images=2).json())
    assert np.abs(_pixels(pair[1]) - _pixels({"image_data": other})).max() <= 2


def test_url_response_format_serves_the_image_and_delete_removes_it(
    ihttp: httpx.Client, schema: OpenResponsesSchema
) -> None:
    response = _create(ihttp, "tiny-flux", width=48, height=32, output_format="jpeg", response_format="url")
    body = response.json()
    schema.response(body)
    (part,) = _images(body)
    assert part["image_data"] is None and part["format"] == "jpeg"
    url = part["image_url"]
    assert url.startswith(f"{str(ihttp.base_url).rstrip('/')}/v1/images/img_") and url.endswith("/content")
    content = ihttp.get(url)
    assert content.status_code == 200
    assert content.headers["content-type"] == "image/jpeg"
    assert _decode(content.content).size == (48, 32)
    # Stored with its response: retrievable, and gone once the response is deleted.
    assert ihttp.get(f"/v1/responses/{body['id']}").json()["output"] == body["output"]
    assert ihttp.delete(f"/v1/responses/{body['id']}").status_code == 200
    missing = ihttp.get(url)
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "image_id"


def test_streaming_sends_previews_then_the_images(ihttp: httpx.Client, schema: OpenResponsesSchema) -> None:
    body = {
        "model": "tiny-sd",
        "input": "a lighthouse",
        "seed": 3,
        "provider_options": {"image": {"steps": 4, "partial_images": 2, "num_images": 2, "width": 32, "height": 48}},
    }
    events, frames = stream_events(ihttp, body)
    assert frames[-1].data == "[DONE]"
    for event in events:
        schema.event(event)
    types = [event["type"] for event in events]
    assert types == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        *["response.output_image.partial_image"] * 4,  # two rounds of previews, one per image
        *["response.content_part.added", "response.content_part.done"] * 2,
        "response.output_item.done",
        "response.completed",
    ]
    assert [event["sequence_number"] for event in events] == list(range(len(events)))
    previews = [event for event in events if event["type"] == "response.output_image.partial_image"]
    assert [(event["partial_image_index"], event["content_index"]) for event in previews] == [
        (0, 0), (0, 1), (1, 0), (1, 1),
    ]  # fmt: skip
    for preview in previews:
        assert _decode(preview["partial_image_b64"]).size == (32, 48)
    completed = events[-1]["response"]
    schema.response(completed)
    # The stream and a plain request with the same seed give the same images.
    plain = ihttp.post("/v1/responses", json={**body, "stream": False}).json()
    assert [part["image_data"] for part in _images(completed)] == [part["image_data"] for part in _images(plain)]


def test_compatible_requests_share_one_pipeline_call(image_server: RunningServer, ihttp: httpx.Client) -> None:
    worker = image_server.state.models["tiny-sd"].worker
    solo = {seed: _pixels(_images(_create(ihttp, "tiny-sd", seed=seed).json())[0]) for seed in (11, 12, 13)}
    calls = worker.batches
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        # A long request first, so that the three short ones wait together and go as one call.
        slow = pool.submit(_create, ihttp, "tiny-sd", steps=60, width=128, height=128)
        assert wait_for(lambda: worker.num_running > 0)
        quick = {seed: pool.submit(_create, ihttp, "tiny-sd", seed=seed) for seed in solo}
        assert slow.result().status_code == 200
        batched = {seed: _pixels(_images(future.result().json())[0]) for seed, future in quick.items()}
    assert worker.batches - calls == 2
    scraped = ihttp.get("/metrics").text
    assert f'respserve:image_pipeline_calls{{model="tiny-sd"}} {float(worker.batches)}' in scraped
    assert 'respserve:image_requests_waiting{model="tiny-flux"} 0.0' in scraped
    for seed, pixels in batched.items():
        assert np.abs(pixels - solo[seed]).max() <= 2


@pytest.mark.parametrize(
    ("model", "options", "param"),
    [
        ("tiny-sd", {"width": 65}, "provider_options.image.width"),
        ("tiny-sd3", {"height": 40}, "provider_options.image.height"),  # SD3 needs multiples of 16
        ("tiny-sd", {"width": 512}, "provider_options.image.width"),  # past image_max_side
        ("tiny-sd", {"steps": 0}, "provider_options.image.steps"),
        ("tiny-sd", {"num_images": 9}, "provider_options.image.num_images"),
        ("tiny-sd", {"guidance_scale": -1}, "provider_options.image.guidance_scale"),
        ("tiny-sd", {"output_format": "gif"}, "provider_options.image.output_format"),
        ("tiny-sd", {"response_format": "file"}, "provider_options.image.response_format"),
        ("tiny-sd", {"output_compression": 101}, "provider_options.image.output_compression"),
        ("tiny-sd", {"partial_images": 4}, "provider_options.image.partial_images"),
        ("tiny-flux", {"negative_prompt": "blur"}, "provider_options.image.negative_prompt"),
    ],
)
def test_bad_image_options_are_400s_naming_the_field(
    ihttp: httpx.Client, model: str, options: dict[str, Any], param: str
) -> None:
    response = _create(ihttp, model, **options)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": "   "}, "input"),
        ({"input": [{"role": "assistant", "content": "hi"}]}, "input"),
        ({"input": "fox", "tools": [{"type": "function", "name": "f"}]}, "tools"),
        ({"input": "fox", "text": {"format": {"type": "json_object"}}}, "text.format"),
    ],
)
def test_requests_an_image_model_cannot_serve_are_400s(ihttp: httpx.Client, body: dict[str, Any], param: str) -> None:
    response = ihttp.post("/v1/responses", json={"model": "tiny-sd", **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_negative_prompt_changes_the_image(ihttp: httpx.Client) -> None:
    plain = _images(_create(ihttp, "tiny-sd", seed=4).json())[0]["image_data"]
    negative = _images(_create(ihttp, "tiny-sd", seed=4, negative_prompt="blurry").json())[0]["image_data"]
    assert plain != negative


def test_image_generation_tool_on_a_text_model(image_server: RunningServer) -> None:
    client = sdk_client(image_server, "x")
    response = client.responses.create(
        model=TEXT_MODEL,
        input="Draw a lighthouse at night.",
        tools=[{"type": "image_generation", "model": "tiny-sd3", "size": "32x48", "output_format": "webp"}],
        tool_choice={"type": "image_generation"},
    )
    assert response.status == "completed" and response.model == TEXT_MODEL
    (call,) = response.output
    assert call.type == "image_generation_call" and call.status == "completed"
    assert call.revised_prompt == "Draw a lighthouse at night."
    image = _decode(call.result)
    assert image.format == "WEBP" and image.size == (32, 48)


def test_required_tool_choice_with_only_the_image_tool_makes_an_image(ihttp: httpx.Client) -> None:
    body = {"model": TEXT_MODEL, "input": "a cat", "tools": [{"type": "image_generation"}], "tool_choice": "required"}
    (call,) = ihttp.post("/v1/responses", json=body).json()["output"]
    assert call["type"] == "image_generation_call" and call["status"] == "completed"


def test_image_generation_tool_streams_openai_events(ihttp: httpx.Client, schema: OpenResponsesSchema) -> None:
    body = {
        "model": TEXT_MODEL,
        "input": "a cat",
        "tools": [{"type": "image_generation", "size": "64x64", "partial_images": 1}],
        "tool_choice": {"type": "image_generation"},
    }
    events, _ = stream_events(ihttp, body)
    for event in events:
        schema.event(event)
    assert [event["type"] for event in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.image_generation_call.in_progress",
        "response.image_generation_call.generating",
        "response.image_generation_call.partial_image",
        "response.image_generation_call.completed",
        "response.output_item.done",
        "response.completed",
    ]
    done = events[-2]["item"]
    assert done["status"] == "completed" and _decode(done["result"]).size == (64, 64)
    assert events[-1]["response"]["output"] == [done]


@pytest.mark.parametrize(
    ("tools", "tool_choice", "param"),
    [
        ([{"type": "function", "name": "f"}], {"type": "image_generation"}, "tool_choice.type"),
        ([{"type": "image_generation", "size": "30x30"}], {"type": "image_generation"}, "tools[0].size"),
        ([{"type": "image_generation", "size": "big"}], {"type": "image_generation"}, "tools[0].size"),
    ],
)
def test_bad_image_tool_requests_are_400s(ihttp: httpx.Client, tools: list[Any], tool_choice: Any, param: str) -> None:
    body = {"model": TEXT_MODEL, "input": "a cat", "tools": tools, "tool_choice": tool_choice}
    response = ihttp.post("/v1/responses", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_text_model_goes_on_from_an_image_response(ihttp: httpx.Client) -> None:
    """An image response in a chain (its output_image parts and image_generation_call items) is context a
    text model accepts; the images themselves are left out of its prompt."""
    image = _create(ihttp, "tiny-sd").json()
    tool = ihttp.post(
        "/v1/responses",
        json={
            "model": TEXT_MODEL,
            "input": "a cat",
            "previous_response_id": image["id"],
            "tools": [{"type": "image_generation"}],
            "tool_choice": {"type": "image_generation"},
        },
    ).json()
    follow_up = ihttp.post(
        "/v1/responses",
        json={"model": TEXT_MODEL, "input": "Say hi.", "previous_response_id": tool["id"], "max_output_tokens": 16},
    )
    assert follow_up.status_code == 200, follow_up.text
    assert follow_up.json()["status"] in ("completed", "incomplete")
    # The Agents SDK sends the items back as input, and a conversation keeps them.
    items = [*image["output"], *tool["output"], {"role": "user", "content": "Say hi."}]
    sent_back = ihttp.post("/v1/responses", json={"model": TEXT_MODEL, "input": items, "max_output_tokens": 16})
    assert sent_back.status_code == 200, sent_back.text
    conversation = ihttp.post("/v1/conversations", json={"items": tool["output"]}).json()
    listed = ihttp.get(f"/v1/conversations/{conversation['id']}/items").json()["data"]
    assert listed[0]["type"] == "image_generation_call" and listed[0]["result"] == tool["output"][0]["result"]


def test_image_tool_without_an_image_model_is_a_400(http: httpx.Client) -> None:
    body = {"input": "a cat", "tools": [{"type": "image_generation"}], "tool_choice": {"type": "image_generation"}}
    response = http.post("/v1/responses", json=body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "tools"


def test_an_abandoned_image_stream_leaves_the_worker_serving(ihttp: httpx.Client) -> None:
    body = {"model": "tiny-sd", "input": "fox", "stream": True, "provider_options": {"image": {"steps": 40}}}
    with ihttp.stream("POST", "/v1/responses", json=body) as response:
        for line in response.iter_lines():
            if "response.output_item.added" in line:
                break
    assert _create(ihttp, "tiny-sd").status_code == 200


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_pipeline_runs_in_bf16_and_matches_its_seed(tmp_path: Path) -> None:
    pipeline = ImagePipeline.load(build("tiny-sd", tmp_path / "tiny-sd"), device="cuda")
    assert pipeline.device.type == "cuda" and pipeline.dtype == torch.bfloat16

    def run(seed: int) -> np.ndarray:
        (image,) = pipeline.generate(["a fox"], None, [seed], 64, 64, 2, 5.0, lambda step, total, latents: False)
        return np.asarray(image)

    assert run(1).shape == (64, 64, 3)
    assert np.array_equal(run(1), run(1))


def test_background_image_response_completes_and_is_retrievable(ihttp: httpx.Client) -> None:
    body = {"model": "tiny-sd", "input": "fox", "background": True, "provider_options": {"image": FAST}}
    created = ihttp.post("/v1/responses", json=body).json()
    assert created["status"] == "queued"
    assert wait_for(lambda: ihttp.get(f"/v1/responses/{created['id']}").json()["status"] == "completed")
    (part,) = _images(ihttp.get(f"/v1/responses/{created['id']}").json())
    assert _decode(part["image_data"]).size == (64, 64)
