"""The pictures of an edit: the `input_image` of the request's last user message (the message the prompt
comes from) and, for inpainting, its mask (`provider_options.image.input_image_mask`, or the
`image_generation` tool's `input_image_mask`).

Each is a `data:` URL or the `file_id` of an uploaded file (`input_file` parts were read into data URLs
before this, see file_inputs.py); other URLs are refused: this server fetches nothing. The bytes are decoded
within bounds off the event loop (image_decoding.py). The mask must be the image's size, as OpenAI's edits
require: a mask of another size is a 400, never stretched over the picture. Both are then shrunk to fit
`--image-max-side`, so a queued request holds no more than a picture of the largest size it could make.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from PIL import Image

from respserve.api.errors import InvalidRequestError, NotFoundError
from respserve.api.image_decoding import UndecodableImage, as_mask, data_url_bytes, decode_image
from respserve.api.state import AppState
from respserve.protocol.content import InputImage
from respserve.protocol.input_image_mask import InputImageMask
from respserve.protocol.items import InputMessage
from respserve.protocol.request import CreateResponseRequest

MAX_INPUT_PIXELS = 4096 * 4096  # larger pictures are refused before a pixel is decoded


@dataclass(frozen=True)
class EditImages:
    image: Image.Image  # RGB, at most --image-max-side on a side
    mask: Image.Image | None  # grayscale, white where the image may change; the image's size
    size: tuple[int, int]  # the input image's size as sent


@dataclass(frozen=True)
class _Source:
    data: bytes
    param: str  # the field it came from, named by errors about its content


async def read_edit_images(
    body: CreateResponseRequest,
    mask: InputImageMask | None,
    mask_param: str,
    state: AppState,
    owner: str | None,
) -> EditImages | None:
    """The request's input image and mask, decoded; None when it has no input image (text to image)."""
    found = _input_image(body)
    if found is None:
        if mask is not None:
            raise InvalidRequestError(
                "'input_image_mask' needs an image to edit: send an 'input_image' part with the prompt.",
                param=mask_param,
            )
        return None
    part, param = found
    image = await _source(part.image_url, part.file_id, param, state, owner)
    mask_source = await _source(mask.image_url, mask.file_id, mask_param, state, owner) if mask else None
    return await asyncio.to_thread(_decoded, image, mask_source, state.settings.image_max_side)


def _input_image(body: CreateResponseRequest) -> tuple[InputImage, str] | None:
    """The one `input_image` part of the last user message, and its param; None without one."""
    if isinstance(body.input, str):
        return None
    messages = [
        (i, item) for i, item in enumerate(body.input) if isinstance(item, InputMessage) and item.role == "user"
    ]
    if not messages or isinstance(messages[-1][1].content, str):
        return None
    index, message = messages[-1]
    parts = [(j, part) for j, part in enumerate(message.content) if isinstance(part, InputImage)]
    if len(parts) > 1:
        raise InvalidRequestError(
            "An image edit takes one 'input_image'; this message has several.",
            param=f"input[{index}].content[{parts[1][0]}]",
        )
    return (parts[0][1], f"input[{index}].content[{parts[0][0]}]") if parts else None


async def _source(
    image_url: str | None, file_id: str | None, param: str, state: AppState, owner: str | None
) -> _Source:
    """The bytes behind an image reference: exactly one of a data URL and an uploaded file's id."""
    if (image_url is None) == (file_id is None):
        raise InvalidRequestError(
            "An image is given by one of 'image_url' (a data URL) and 'file_id' (an uploaded file).",
            param=param,
            code="missing_required_parameter" if image_url is None else None,
        )
    if file_id is not None:
        stored = await state.store.read_file(file_id, owner)
        if stored is None:
            raise NotFoundError(f"File with id '{file_id}' not found.", param=f"{param}.file_id")
        return _Source(stored[1], f"{param}.file_id")
    field = f"{param}.image_url"
    if not (image_url or "").startswith("data:"):
        raise InvalidRequestError(
            "Image URLs are not fetched by this server: send the image as a data URL, or upload it "
            "(POST /v1/files) and send its 'file_id'.",
            param=field,
            code="unsupported_parameter",
        )
    try:
        return _Source(data_url_bytes(image_url or "", state.settings.max_file_bytes), field)
    except UndecodableImage as exc:
        raise InvalidRequestError(f"Invalid image: {exc.message}", param=field, code=exc.code) from exc


def _decoded(image: _Source, mask: _Source | None, max_side: int) -> EditImages:
    picture = _decode(image)
    size = picture.size
    picture = picture.convert("RGB")
    mask_picture = None
    if mask is not None:
        mask_picture = _decode(mask)
        if mask_picture.size != size:
            raise InvalidRequestError(
                f"The mask is {mask_picture.width}x{mask_picture.height} but the image is {size[0]}x{size[1]}: "
                "they must be the same size.",
                param=mask.param,
            )
        mask_picture = as_mask(mask_picture)
    if max(size) > max_side:
        picture.thumbnail((max_side, max_side))
        if mask_picture is not None:
            mask_picture = mask_picture.resize(picture.size)
    return EditImages(picture, mask_picture, size)


def _decode(source: _Source) -> Image.Image:
    try:
        return decode_image(source.data, MAX_INPUT_PIXELS)
    except UndecodableImage as exc:
        raise InvalidRequestError(f"Invalid image: {exc.message}", param=source.param, code=exc.code) from exc
