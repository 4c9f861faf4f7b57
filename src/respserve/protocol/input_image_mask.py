"""`input_image_mask`: the mask of an inpainting edit, as OpenAI's `image_generation` tool carries it.

The same object rides in `provider_options.image.input_image_mask` for a request to an image model.
Exactly one of `image_url` (a `data:` URL) and `file_id` (an uploaded file) is given; that is checked
where the mask is read (api/edit_images.py), so the error names the field as the client sent it.
"""

from __future__ import annotations

from typing import Any

from pydantic import ConfigDict, SerializerFunctionWrapHandler, model_serializer

from respserve.protocol.content import WireModel


class InputImageMask(WireModel):
    model_config = ConfigDict(extra="forbid")  # OpenAI's schema: additionalProperties false

    image_url: str | None = None
    file_id: str | None = None

    @model_serializer(mode="wrap")
    def _set_fields_only(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Echoed with the tool as sent: OpenAI's schema has no nulls here.
        return {key: value for key, value in handler(self).items() if value is not None}
