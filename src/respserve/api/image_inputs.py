"""`input_image` parts for a vision-language model: each image's bytes found, then decoded within bounds.

Before the prompt is built, every image part of the request and of its stored context is made
self-contained (`read_input_images`): an uploaded `file_id` is read from the store (the caller's files
only) and an `https://` URL is fetched (image_urls.py), each becoming a base64 data URL with its `detail`.
The request as sent is what is stored, so a stored chain is read again when continued. Then, while the chat
turns are built, `prompt_image` decodes a data URL into the RGB picture the processor reads: the size in the
header is checked against `--max-image-pixels` before a pixel is decoded, and truncated or foreign bytes
are refused (image_decoding.py). Every refusal is a 400 naming the part's field.

Text-only and image models are left alone here: a text model refuses images as before (chat_messages.py),
and an image model reads its input image as an edit (edit_images.py).
"""

from __future__ import annotations

import asyncio
import base64
from dataclasses import dataclass

from respserve.api.errors import APIError, InvalidRequestError, NotFoundError
from respserve.api.file_contents import media_type
from respserve.api.image_decoding import UndecodableImage, data_url_bytes, decode_image
from respserve.api.image_urls import ImageUrlRefused, UrlPolicy, fetch_image_url
from respserve.api.input_parts import replace_parts
from respserve.api.state import AppState, ServedModel
from respserve.config import Settings
from respserve.engine.generation import PromptImage
from respserve.protocol.content import InputImage
from respserve.protocol.items import InputItem
from respserve.protocol.request import CreateResponseRequest


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int
    max_pixels: int

    @classmethod
    def from_settings(cls, settings: Settings) -> ImageLimits:
        return cls(settings.max_file_bytes, settings.max_image_pixels)


async def read_input_images(
    body: CreateResponseRequest, context: list[InputItem], state: AppState, owner: str | None
) -> tuple[CreateResponseRequest, list[InputItem]]:
    """The request and its context with every image part a data URL, when the model reads images."""
    served = state.resolve_model(body.model)
    if not isinstance(served, ServedModel) or not served.worker.pipeline.accepts_images:
        return body, context
    reader = _ImageSources(state, owner)
    try:
        read_context = [await reader.item(item, "") for item in context]
    except APIError as exc:  # a stored item has no index the caller could name: name where it came from
        exc.param = "previous_response_id" if body.previous_response_id else "conversation"
        raise
    if isinstance(body.input, str):
        return body, read_context
    read_input = [await reader.item(item, f"input[{index}]") for index, item in enumerate(body.input)]
    return body.model_copy(update={"input": read_input}), read_context


async def inline_image(data: bytes, detail: str, field: str, max_pixels: int) -> InputImage:
    """An image part holding `data` as a data URL, once the bytes decode (so that a bad file or download is
    refused naming its own field, not the data URL made of it)."""
    try:
        await asyncio.to_thread(decode_image, data, max_pixels)
    except UndecodableImage as exc:
        raise InvalidRequestError(f"Invalid image: {exc.message}", param=field, code=exc.code) from exc
    url = f"data:{media_type(data)};base64,{base64.b64encode(data).decode()}"
    return InputImage(image_url=url, detail=detail)  # type: ignore[arg-type]


def prompt_image(part: InputImage, param: str, limits: ImageLimits) -> PromptImage:
    """The decoded picture of a part `read_input_images` made self-contained. CPU work: off the event loop."""
    try:
        data = data_url_bytes(part.image_url or "", limits.max_bytes)
        image = decode_image(data, limits.max_pixels)
    except UndecodableImage as exc:
        raise InvalidRequestError(f"Invalid image: {exc.message}", param=f"{param}.image_url", code=exc.code) from exc
    return PromptImage(image=image.convert("RGB"), detail=part.detail)


class _ImageSources:
    def __init__(self, state: AppState, owner: str | None) -> None:
        self._state = state
        self._owner = owner
        settings = state.settings
        self._max_pixels = settings.max_image_pixels
        self._policy = UrlPolicy(
            enabled=settings.allow_image_urls,
            allow_private=settings.image_url_allow_private,
            max_bytes=settings.max_file_bytes,
            timeout_s=settings.image_url_timeout_s,
        )

    async def item(self, item: InputItem, param: str) -> InputItem:
        """The item with its image parts self-contained: a message's `content`, a tool output's `output`."""
        return await replace_parts(item, InputImage, self.part, param)

    async def part(self, part: InputImage, param: str) -> InputImage:
        if (part.image_url is None) == (part.file_id is None):
            raise InvalidRequestError(
                "An 'input_image' part needs one of 'image_url' (a data URL, or https:// when the server "
                "allows it) and 'file_id' (an uploaded image).",
                param=param,
                code="missing_required_parameter" if part.image_url is None else None,
            )
        if part.file_id is not None:
            stored = await self._state.store.read_file(part.file_id, self._owner)
            if stored is None:
                raise NotFoundError(f"File with id '{part.file_id}' not found.", param=f"{param}.file_id")
            return await inline_image(stored[1], part.detail, f"{param}.file_id", self._max_pixels)
        url = part.image_url or ""
        if url.startswith("data:"):
            return part
        try:
            data = await fetch_image_url(url, self._policy)
        except ImageUrlRefused as exc:
            raise InvalidRequestError(exc.message, param=f"{param}.image_url", code=exc.code) from exc
        return await inline_image(data, part.detail, f"{param}.image_url", self._max_pixels)
