"""`input_file` parts, read before the prompt is built: each becomes the part the model reads in its place.

A text file (or a PDF's extracted text) becomes an `input_text` part headed by the file's name in
brackets; an image file becomes an `input_image` part (a data URL), which the model takes or refuses as it
does any image. The request as sent is what is stored, so stored chains keep their `input_file` parts and
are read again when continued. A part names its file by `file_id` (uploaded, `/v1/files`) or carries it
as `file_data` (base64, or a base64 `data:` URL); `file_url` is refused: this server fetches nothing.
"""

from __future__ import annotations

import asyncio
import base64
import binascii

from respserve.api.errors import APIError, InvalidRequestError, NotFoundError
from respserve.api.file_contents import FileImage, FileLimits, UnreadableFile, read_file_content
from respserve.api.image_inputs import inline_image, read_input_images
from respserve.api.input_parts import replace_parts
from respserve.api.state import AppState
from respserve.protocol.content import InputFile, InputImage, InputText
from respserve.protocol.items import InputItem
from respserve.protocol.request import CreateResponseRequest
from respserve.store.base import ResponseStore

_SOURCES = ("file_id", "file_data", "file_url")


async def read_input_files(
    body: CreateResponseRequest, context: list[InputItem], state: AppState, owner: str | None
) -> tuple[CreateResponseRequest, list[InputItem]]:
    """The request and its stored context with every `input_file` part read (unchanged without any), and
    for a vision-language model every image part a data URL (image_inputs.py)."""
    reader = _FileReader(state.store, owner, FileLimits.from_settings(state.settings), state.settings.max_image_pixels)
    try:
        read_context = [await reader.item(item, "") for item in context]
    except APIError as exc:  # a stored item has no index the caller could name: name where it came from
        exc.param = "previous_response_id" if body.previous_response_id else "conversation"
        raise
    if not isinstance(body.input, str):
        read_input = [await reader.item(item, f"input[{index}]") for index, item in enumerate(body.input)]
        body = body.model_copy(update={"input": read_input})
    # Images (sent as such, or files just read into them) made self-contained, for a vision-language model.
    return await read_input_images(body, read_context, state, owner)


class _FileReader:
    def __init__(self, store: ResponseStore, owner: str | None, limits: FileLimits, max_pixels: int) -> None:
        self._store = store
        self._owner = owner
        self._limits = limits
        self._max_pixels = max_pixels

    async def item(self, item: InputItem, param: str) -> InputItem:
        """The item with its file parts read: a message's `content`, a tool output's `output`."""
        return await replace_parts(item, InputFile, self.part, param)

    async def part(self, part: InputFile, param: str) -> InputText | InputImage:
        given = [source for source in _SOURCES if getattr(part, source) is not None]
        if not given:
            raise InvalidRequestError(
                "An 'input_file' part needs 'file_id' (an uploaded file) or 'file_data' (its base64 bytes).",
                param=param,
                code="missing_required_parameter",
            )
        if len(given) > 1:
            raise InvalidRequestError(
                f"An 'input_file' part takes one of 'file_id', 'file_data' and 'file_url', not {' and '.join(given)}.",
                param=f"{param}.{given[1]}",
            )
        if part.file_url is not None:
            raise InvalidRequestError(
                "'file_url' is not supported by this server, which fetches nothing: upload the file "
                "(POST /v1/files) and send its 'file_id', or send its bytes as 'file_data'.",
                param=f"{param}.file_url",
                code="unsupported_parameter",
            )
        if part.file_id is not None:
            field = f"{param}.file_id"
            stored = await self._store.read_file(part.file_id, self._owner)
            if stored is None:
                raise NotFoundError(f"File with id '{part.file_id}' not found.", param=field)
            filename, data = part.filename or stored[0].filename, stored[1]
        else:
            field = f"{param}.file_data"
            filename, data = part.filename or "file", self._decoded(part.file_data or "", field)
        try:
            content = await asyncio.to_thread(read_file_content, data, filename, self._limits)
        except UnreadableFile as exc:
            raise InvalidRequestError(f"Invalid file '{filename}': {exc.message}", param=field, code=exc.code) from exc
        if isinstance(content, FileImage):
            return await inline_image(content.data, "auto", field, self._max_pixels)
        return InputText(text=f"[{filename}]\n{content.text}")

    def _decoded(self, file_data: str, param: str) -> bytes:
        """Plain base64, or a `data:<type>;base64,` URL (the type is not trusted: the bytes tell)."""
        encoded = file_data
        if file_data.startswith("data:"):
            header, comma, encoded = file_data.partition(",")
            if not comma or not header.endswith(";base64"):
                raise InvalidRequestError(
                    "'file_data' must be base64, or a data URL of the form 'data:<type>;base64,<data>'.",
                    param=param,
                )
        encoded = "".join(encoded.split())
        if len(encoded) // 4 * 3 > self._limits.max_bytes + 2:  # refused before decoding
            raise InvalidRequestError(
                f"Invalid file: it holds more than {self._limits.max_bytes} bytes.", param=param, code="file_too_large"
            )
        try:
            return base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InvalidRequestError(f"'file_data' is not valid base64: {exc}", param=param) from exc
