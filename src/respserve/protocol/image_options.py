"""`provider_options.image`: what an image model's request may set (Modular MAX carries them there).

Bounds that do not depend on the model are checked here; the size multiple and the largest side depend on
the pipeline and are checked when the request is planned (api/image_plan.py). `strength` and
`input_image_mask` apply to edits: a request whose user message carries an `input_image`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from respserve.protocol.content import WireModel
from respserve.protocol.input_image_mask import InputImageMask

MAX_IMAGES_PER_REQUEST = 8
MAX_STEPS = 200


class ImageOptions(WireModel):
    width: int | None = Field(default=None, ge=1)
    height: int | None = Field(default=None, ge=1)
    steps: int | None = Field(default=None, ge=1, le=MAX_STEPS)
    guidance_scale: float | None = Field(default=None, ge=0.0, le=50.0)
    negative_prompt: str | None = Field(default=None, max_length=4000)
    num_images: int = Field(default=1, ge=1, le=MAX_IMAGES_PER_REQUEST)
    output_format: Literal["png", "jpeg", "webp"] = "png"
    output_compression: int | None = Field(default=None, ge=0, le=100)  # jpeg/webp quality, 100 best
    response_format: Literal["b64_json", "url"] = "b64_json"
    partial_images: int = Field(default=0, ge=0, le=3)  # previews while streaming
    # Edits: how far the input image is noised before denoising (1: all the way, as if there were none).
    strength: float | None = Field(default=None, gt=0.0, le=1.0)
    input_image_mask: InputImageMask | None = None  # inpainting: where the image may change


class ProviderOptions(WireModel):
    image: ImageOptions | None = None
