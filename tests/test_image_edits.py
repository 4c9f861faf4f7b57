"""Image edits: an `input_image` (a data URL or an uploaded file) sent to an image model, or to OpenAI's
`image_generation` tool, runs the pipeline's image-to-image variant, and with a mask its inpainting
variant, through tiny random SD and Flux pipelines built and saved here and loaded through the real path."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import struct
import sys
import zlib
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
    serving,
    stream_events,
    wait_for,
)
from PIL import Image

from respserve.api.image_decoding import as_mask
from respserve.config import load_settings
from respserve.engine.image_pipeline import EditBatch, ImagePipeline
from respserve.engine.image_worker import preview_steps

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from random_pipelines import build  # noqa: E402

TEXT_MODEL = "SmolLM2-135M-Instruct"
MODELS = ["tiny-sd", "tiny-flux"]
FAST = {"steps": 4}


@pytest.fixture(scope="module")
def edit_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("edit-pipelines")
    specs = [f"{kind}={build(kind, root / kind)}" for kind in MODELS]
    data_dir = str(tmp_path_factory.mktemp("edit-data"))
    settings = load_settings(port=free_port(), data_dir=data_dir, image_models=specs, image_max_side=128)
    yield from serving(settings)


@pytest.fixture(scope="module")
def ehttp(edit_server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=edit_server.base_url, timeout=120) as client:
        yield client


def _picture(width: int, height: int) -> Image.Image:
    """A gradient with a square in it: a picture with content, made here."""
    x = np.linspace(0, 255, width, dtype=np.uint8)[None, :].repeat(height, 0)
    y = np.linspace(255, 0, height, dtype=np.uint8)[:, None].repeat(width, 1)
    pixels = np.stack([x, y, np.full_like(x, 90)], axis=-1)
    pixels[height // 4 : height // 2, width // 4 : width // 2] = (250, 250, 20)
    return Image.fromarray(pixels)


def _mask(width: int, height: int) -> Image.Image:
    """OpenAI's kind of mask: transparent (alpha 0) where the picture may change, here its left half."""
    mask = Image.new("RGBA", (width, height), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, width // 2, height))
    return mask


def _bytes(image: Image.Image, image_format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return buffer.getvalue()


def _data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def _edit_body(model: str, image: dict[str, Any], seed: int = 1, **options: Any) -> dict[str, Any]:
    content = [{"type": "input_text", "text": "make it autumn"}, {"type": "input_image", **image}]
    return {
        "model": model,
        "input": [{"role": "user", "content": content}],
        "seed": seed,
        "provider_options": {"image": {**FAST, **options}},
    }


def _picture_url(width: int = 48, height: int = 32) -> dict[str, str]:
    return {"image_url": _data_url(_bytes(_picture(width, height)))}


def _decode(data: str | bytes) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(data) if isinstance(data, str) else data))
    image.load()
    return image


def _output(body: dict[str, Any]) -> list[Image.Image]:
    (message,) = body["output"]
    assert message["type"] == "message" and message["status"] == "completed"
    return [_decode(part["image_data"]) for part in message["content"]]


def _upload(http: httpx.Client, data: bytes, name: str = "picture.png") -> str:
    response = http.post("/v1/files", files={"file": (name, data, "image/png")}, data={"purpose": "vision"})
    assert response.status_code == 200, response.text
    return response.json()["id"]


def _post(http: httpx.Client, body: dict[str, Any], schema: OpenResponsesSchema) -> dict[str, Any]:
    response = http.post("/v1/responses", json=body)
    assert response.status_code == 200, response.text
    schema.response(response.json())
    return response.json()


@pytest.mark.parametrize("model", MODELS)
def test_an_input_image_is_edited_at_its_own_size(
    edit_server: RunningServer, ehttp: httpx.Client, schema: OpenResponsesSchema, model: str
) -> None:
    pipeline = edit_server.state.models[model].worker.pipeline
    denoiser = "unet" if model == "tiny-sd" else "transformer"
    for kind in ("edit", "inpaint"):  # the variants share the loaded weights: no second copy
        assert getattr(pipeline.pipes[kind], denoiser) is getattr(pipeline.pipe, denoiser)
        assert pipeline.pipes[kind].vae is pipeline.pipe.vae
    body = _post(ehttp, _edit_body(model, _picture_url(48, 32), num_images=2), schema)
    assert body["status"] == "completed" and body["model"] == model
    images = _output(body)
    assert [(image.format, image.size) for image in images] == [("PNG", (48, 32))] * 2
    # The input image is what the pipeline starts from: another picture gives another image. (At half
    # strength: at 0.8 of 4 steps Flux starts from sigma 1, pure noise, where the input counts for nothing.)
    other = _picture(48, 32).transpose(Image.Transpose.ROTATE_180)
    half = [
        _edit_body(model, image, strength=0.5)
        for image in (_picture_url(48, 32), {"image_url": _data_url(_bytes(other))})
    ]
    first, again = (_output(_post(ehttp, body, schema))[0] for body in half)
    assert not np.array_equal(np.asarray(first), np.asarray(again))


def test_an_uploaded_file_is_edited_and_a_size_can_be_asked_for(
    ehttp: httpx.Client, schema: OpenResponsesSchema
) -> None:
    file_id = _upload(ehttp, _bytes(_picture(200, 100), "JPEG"), "picture.jpg")
    body = _post(ehttp, _edit_body("tiny-sd", {"file_id": file_id}, width=64, height=64), schema)
    assert _output(body)[0].size == (64, 64)
    # Without a size, the input's is shrunk to fit --image-max-side (128 here), to the multiple of 8.
    assert _output(_post(ehttp, _edit_body("tiny-sd", {"file_id": file_id}), schema))[0].size == (128, 64)
    # An input_file part holding an image is an input image too.
    content = [{"type": "input_text", "text": "make it autumn"}, {"type": "input_file", "file_id": file_id}]
    as_file = {"model": "tiny-sd", "input": [{"role": "user", "content": content}], "provider_options": {"image": FAST}}
    assert _output(_post(ehttp, as_file, schema))[0].size == (128, 64)


def _counting_steps(monkeypatch: pytest.MonkeyPatch, server: RunningServer, model: str) -> list[int]:
    """Counts, per pipeline call, the denoising steps the pipeline actually runs (its step callbacks)."""
    pipeline = server.state.models[model].worker.pipeline
    generate = pipeline.generate
    counts: list[int] = []

    def counted(*args: Any) -> Any:
        counts.append(0)
        *head, on_step, edit = args  # the worker passes every argument in order

        def on_step_counted(step: int, total: int, latents: Any) -> bool:
            counts[-1] += 1
            return on_step(step, total, latents)

        return generate(*head, on_step_counted, edit)

    monkeypatch.setattr(pipeline, "generate", counted)
    return counts


@pytest.mark.parametrize("model", MODELS)
def test_strength_sets_the_denoising_steps_run(
    edit_server: RunningServer,
    ehttp: httpx.Client,
    schema: OpenResponsesSchema,
    monkeypatch: pytest.MonkeyPatch,
    model: str,
) -> None:
    counts = _counting_steps(monkeypatch, edit_server, model)
    outputs = {}
    for strength in (0.25, 0.5, 1.0):
        body = _edit_body(model, _picture_url(32, 32), seed=3, steps=8, strength=strength)
        outputs[strength] = np.asarray(_output(_post(ehttp, body, schema))[0])
    assert counts == [2, 4, 8]  # diffusers runs steps x strength of the steps
    assert not np.array_equal(outputs[0.25], outputs[1.0])
    again = _edit_body(model, _picture_url(32, 32), seed=3, steps=8, strength=0.25)
    assert np.array_equal(np.asarray(_output(_post(ehttp, again, schema))[0]), outputs[0.25])
    # Without strength, the default 0.8: 6.4 steps, rounded down by SD's pipelines and up by Flux's.
    _post(ehttp, _edit_body(model, _picture_url(32, 32), steps=8), schema)
    assert counts[-1] == {"tiny-sd": 6, "tiny-flux": 7}[model]


@pytest.mark.parametrize("model", MODELS)
def test_inpainting_streams_previews_of_the_steps_run(
    ehttp: httpx.Client, schema: OpenResponsesSchema, model: str
) -> None:
    mask = {"image_url": _data_url(_bytes(_mask(32, 48)))}
    body = _edit_body(model, _picture_url(32, 48), steps=8, strength=0.5, partial_images=3, input_image_mask=mask)
    events, frames = stream_events(ehttp, body)
    assert frames[-1].data == "[DONE]"
    for event in events:
        schema.event(event)
    previews = [event for event in events if event["type"] == "response.output_image.partial_image"]
    # Four steps run (8 x 0.5), so the previews come after steps 1, 2 and 3 of them.
    assert len(previews) == len(preview_steps(4, 3)) == 3
    assert all(_decode(preview["partial_image_b64"]).size == (32, 48) for preview in previews)
    completed = events[-1]
    assert completed["type"] == "response.completed"
    schema.response(completed["response"])
    (image,) = _output(completed["response"])
    assert image.size == (32, 48)


def test_the_mask_reaches_the_inpainting_pipeline(ehttp: httpx.Client, schema: OpenResponsesSchema) -> None:
    picture = {"image_url": _data_url(_bytes(_picture(64, 64)))}
    file_id = _upload(ehttp, _bytes(_mask(64, 64)), "mask.png")
    masks = [{}, {"input_image_mask": {"file_id": file_id}}, {"input_image_mask": _mask_url(_mask(64, 64).rotate(90))}]
    outputs = [
        np.asarray(_output(_post(ehttp, _edit_body("tiny-sd", picture, strength=1.0, **mask), schema))[0])
        for mask in masks
    ]
    assert all(output.shape == (64, 64, 3) for output in outputs)
    # img2img, and inpainting under two masks: three different images from one seed.
    assert len({output.tobytes() for output in outputs}) == 3


def _mask_url(mask: Image.Image) -> dict[str, str]:
    return {"image_url": _data_url(_bytes(mask))}


def test_masks_are_read_by_alpha_as_openai_draws_them_else_by_brightness() -> None:
    transparent_left = np.asarray(as_mask(_mask(8, 4)))
    assert (transparent_left[:, :4] == 255).all() and (transparent_left[:, 4:] == 0).all()  # white: edited
    white_left = Image.new("L", (8, 4), 0)
    white_left.paste(255, (0, 0, 4, 4))
    assert np.array_equal(np.asarray(as_mask(white_left)), transparent_left)
    opaque = white_left.convert("RGBA")  # alpha without transparency: read by brightness
    assert np.array_equal(np.asarray(as_mask(opaque)), transparent_left)


def test_kinds_are_never_batched_together(edit_server: RunningServer, ehttp: httpx.Client) -> None:
    worker = edit_server.state.models["tiny-sd"].worker
    mask = {"image_url": _data_url(_bytes(_mask(32, 32)))}
    bodies = {
        "generate": {"model": "tiny-sd", "input": "fox", "provider_options": {"image": {**FAST, "width": 32}}},
        "edit": _edit_body("tiny-sd", _picture_url(32, 32)),
        "edit again": _edit_body("tiny-sd", _picture_url(32, 32), seed=2),
        "inpaint": _edit_body("tiny-sd", _picture_url(32, 32), input_image_mask=mask),
    }  # fmt: skip
    calls = worker.batches
    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        # A long request first, so that the others wait together for the next call.
        slow = pool.submit(ehttp.post, "/v1/responses", json=_edit_body("tiny-sd", _picture_url(128, 128), steps=60))
        assert wait_for(lambda: worker.num_running > 0)
        waiting = {name: pool.submit(ehttp.post, "/v1/responses", json=body) for name, body in bodies.items()}
        assert slow.result().status_code == 200
        for name, future in waiting.items():
            assert future.result().status_code == 200, name
            assert _output(future.result().json())[0].size[0] == 32
    # slow | generate | edit + edit again (same kind and strength) | inpaint
    assert worker.batches - calls == 4


def test_image_generation_tool_edits_the_input_image(ehttp: httpx.Client, schema: OpenResponsesSchema) -> None:
    mask = {"image_url": _data_url(_bytes(_mask(48, 32)))}
    content = [
        {"type": "input_text", "text": "Paint the left half blue."},
        {"type": "input_image", **_picture_url(48, 32)},
    ]
    body = {
        "model": TEXT_MODEL,
        "input": [{"role": "user", "content": content}],
        "tools": [{"type": "image_generation", "model": "tiny-flux", "input_image_mask": mask, "partial_images": 1}],
        "tool_choice": {"type": "image_generation"},
    }
    events, _ = stream_events(ehttp, body)
    for event in events:
        schema.event(event)
    types = [event["type"] for event in events]
    assert "response.image_generation_call.partial_image" in types and types[-1] == "response.completed"
    (call,) = events[-1]["response"]["output"]
    assert call["type"] == "image_generation_call" and call["status"] == "completed"
    assert _decode(call["result"]).size == (48, 32)  # "auto" size: the input's
    assert events[-1]["response"]["tools"][0]["input_image_mask"] == mask
    # action "generate" ignores the input image; "edit" without one is a 400.
    generate = {
        **body,
        "tools": [{"type": "image_generation", "model": "tiny-flux", "action": "generate", "size": "32x32"}],
    }
    (call,) = _post(ehttp, generate, schema)["output"]
    assert _decode(call["result"]).size == (32, 32)
    edit = {**body, "input": "a cat", "tools": [{"type": "image_generation", "action": "edit"}]}
    refused = ehttp.post("/v1/responses", json=edit)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "input"


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares `width` x `height` (100 megapixels below) over a few bytes of zeros: a
    decompression bomb's shape, refused from its header."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = zlib.compress(b"\x00" * (width + 1) * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


_PNG = _bytes(_picture(32, 32))
_JPEG = _bytes(_picture(32, 32), "JPEG")
_IMAGE_URL = "input[0].content[1].image_url"
_MASK = "provider_options.image.input_image_mask"
_STRENGTH = "provider_options.image.strength"


def _with_image(url: str) -> dict[str, Any]:
    return _edit_body("tiny-sd", {"image_url": url})


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        (_with_image(_data_url(b"not an image at all")), _IMAGE_URL, "invalid_image"),
        (_with_image(_data_url(_PNG[: len(_PNG) // 2])), _IMAGE_URL, "invalid_image"),  # truncated PNG
        (_with_image(_data_url(_JPEG[: len(_JPEG) // 2], "image/jpeg")), _IMAGE_URL, "invalid_image"),
        (_with_image(_data_url(_png_header(10_000, 10_000))), _IMAGE_URL, "image_too_large"),
        (_with_image("data:image/png;base64,@@@"), _IMAGE_URL, "invalid_image_url"),
        (_with_image("https://127.0.0.1/picture.png"), _IMAGE_URL, "unsupported_parameter"),
        (_edit_body("tiny-sd", {}), "input[0].content[1]", "missing_required_parameter"),
        (_edit_body("tiny-sd", {"file_id": "file_nope"}), "input[0].content[1].file_id", None),
        (_edit_body("tiny-sd", _picture_url(), input_image_mask=_mask_url(_mask(32, 32))), f"{_MASK}.image_url", None),
        (_edit_body("tiny-sd", _picture_url(), input_image_mask={}), _MASK, "missing_required_parameter"),
        (_edit_body("tiny-sd", _picture_url(), input_image_mask={"url": "x"}), f"{_MASK}.url", None),
        (_edit_body("tiny-sd", _picture_url(), strength=0), _STRENGTH, None),
        (_edit_body("tiny-sd", _picture_url(), strength=1.5), _STRENGTH, None),
        (_edit_body("tiny-sd", _picture_url(), steps=2, strength=0.3), _STRENGTH, None),  # int(0.6): no step
        (_edit_body("tiny-sd", _picture_url(), steps=1), "provider_options.image.steps", None),  # x 0.8 default
        (_edit_body("tiny-sd", _picture_url(), width=20), "provider_options.image.width", None),
        ({"model": "tiny-sd", "input": "fox", "provider_options": {"image": {"strength": 0.5}}}, _STRENGTH, None),
        ({"model": "tiny-sd", "input": "fox", "provider_options": {"image": {"input_image_mask": {}}}}, _MASK, None),
    ],
)  # fmt: skip
def test_bad_edits_are_400s_naming_the_field(
    edit_server: RunningServer, ehttp: httpx.Client, body: dict[str, Any], param: str, code: str | None
) -> None:
    response = ehttp.post("/v1/responses", json=body)
    expected = 404 if param.endswith("file_id") else 400
    assert response.status_code == expected, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    assert ehttp.get("/health").status_code == 200


def test_two_input_images_and_uploaded_bombs_are_400s_and_the_server_goes_on(
    ehttp: httpx.Client, schema: OpenResponsesSchema
) -> None:
    two = _edit_body("tiny-sd", _picture_url())
    two["input"][0]["content"].append({"type": "input_image", **_picture_url()})
    response = ehttp.post("/v1/responses", json=two)
    assert response.status_code == 400 and response.json()["error"]["param"] == "input[0].content[2]"
    bomb = _upload(ehttp, _png_header(10_000, 10_000), "bomb.png")
    for body, param in [
        (_edit_body("tiny-sd", {"file_id": bomb}), "input[0].content[1].file_id"),
        (_edit_body("tiny-sd", _picture_url(), input_image_mask={"file_id": bomb}), f"{_MASK}.file_id"),
    ]:
        response = ehttp.post("/v1/responses", json=body)
        assert response.status_code == 400, response.text
        assert response.json()["error"] == {**response.json()["error"], "param": param, "code": "image_too_large"}
    assert ehttp.get("/health").status_code == 200
    assert _output(_post(ehttp, _edit_body("tiny-sd", _picture_url(16, 16)), schema))[0].size == (16, 16)


@pytest.mark.parametrize("model", MODELS)
def test_edits_leave_text_to_image_as_it_was(ehttp: httpx.Client, schema: OpenResponsesSchema, model: str) -> None:
    """The variants share the scheduler with the text-to-image pipeline: an edit between two seeded
    generations must not change the second."""
    body = {
        "model": model,
        "input": "fox",
        "seed": 5,
        "provider_options": {"image": {**FAST, "width": 32, "height": 32}},
    }
    before = _post(ehttp, body, schema)["output"][0]["content"][0]["image_data"]
    _post(
        ehttp, _edit_body(model, _picture_url(32, 32), strength=0.5, input_image_mask=_mask_url(_mask(32, 32))), schema
    )
    assert _post(ehttp, body, schema)["output"][0]["content"][0]["image_data"] == before


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("model", MODELS)
def test_cuda_edits_run_in_bf16_and_match_their_seed(tmp_path: Path, model: str) -> None:
    pipeline = ImagePipeline.load(build(model, tmp_path / model), device="cuda")
    assert pipeline.dtype == torch.bfloat16
    picture, mask = _picture(64, 48), _mask(64, 48).getchannel("A").point(lambda value: 255 - value)
    steps: list[int] = []

    def run(seed: int, masks: list[Image.Image] | None) -> np.ndarray:
        edit = EditBatch([picture], masks, strength=0.5)
        (image,) = pipeline.generate(
            ["a fox"], None, [seed], 64, 48, 8, 3.5, lambda s, t, _: steps.append(t) is not None, edit
        )
        return np.asarray(image)

    for masks in (None, [mask]):
        first = run(1, masks)
        assert first.shape == (48, 64, 3) and np.array_equal(first, run(1, masks))
    assert set(steps) == {4}
