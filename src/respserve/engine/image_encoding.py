"""Images to the bytes of a file format, done on the worker thread so the event loop never encodes."""

from __future__ import annotations

import io

from PIL import Image

from respserve.engine.generation import ImageFormat

MEDIA_TYPES: dict[ImageFormat, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
_DEFAULT_QUALITY = 90


def encode_image(image: Image.Image, image_format: ImageFormat, compression: int | None = None) -> bytes:
    """`compression` is the jpeg/webp quality (0-100); png is lossless and ignores it."""
    buffer = io.BytesIO()
    if image_format == "png":
        image.save(buffer, format="PNG")
    else:
        quality = _DEFAULT_QUALITY if compression is None else compression
        image.convert("RGB").save(buffer, format=image_format.upper(), quality=quality)
    return buffer.getvalue()
