"""Images from strangers' bytes, decoded within bounds: the input image and the mask of an edit.

A small file can declare an enormous picture (a PNG of zeros compresses a thousandfold), so the size in
the header is checked against `max_pixels` right after `Image.open`, which reads only the header, and
before `load` decodes a single pixel. Only PNG, JPEG, WebP and GIF are opened (the first frame of an
animation). A truncated file fails in `load` (PIL refuses truncated data unless told otherwise), and
whatever else PIL raises on a malformed file is caught: every refusal is an `UndecodableImage`. CPU work:
call these off the event loop.
"""

from __future__ import annotations

import base64
import binascii
import io

from PIL import Image

FORMATS = ("PNG", "JPEG", "WEBP", "GIF")


class UndecodableImage(Exception):
    def __init__(self, message: str, code: str = "invalid_image") -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def data_url_bytes(url: str, max_bytes: int) -> bytes:
    """The bytes of a base64 `data:` URL (its media type is not trusted: the bytes tell)."""
    header, comma, encoded = url.partition(",")
    if not url.startswith("data:") or not comma or not header.endswith(";base64"):
        raise UndecodableImage(
            "Expected a data URL of the form 'data:image/<type>;base64,<data>'.", "invalid_image_url"
        )
    encoded = "".join(encoded.split())
    if len(encoded) // 4 * 3 > max_bytes + 2:  # refused before decoding
        raise UndecodableImage(f"The image holds more than {max_bytes} bytes.", "image_too_large")
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise UndecodableImage(f"The data URL is not valid base64: {exc}", "invalid_image_url") from exc


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """The picture in `data`, decoded in its own mode (alpha kept: a mask may need it)."""
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as exc:  # PIL's own cap, far above ours: refused all the same
        raise UndecodableImage(f"The image is too large: {exc}", "image_too_large") from exc
    except Exception as exc:  # UnidentifiedImageError, or a header PIL cannot parse
        raise UndecodableImage("The data is not a PNG, JPEG, WebP or GIF image.") from exc
    width, height = image.size
    if width * height > max_pixels:
        raise UndecodableImage(
            f"The image is {width}x{height} ({width * height} pixels); at most {max_pixels} pixels are accepted.",
            "image_too_large",
        )
    if width < 1 or height < 1:
        raise UndecodableImage(f"The image is {width}x{height}: it has no pixels.")
    try:
        image.load()
    except Exception as exc:  # truncated data, a broken stream, a bad checksum...
        raise UndecodableImage(f"The image could not be decoded (truncated or corrupt?): {exc}") from exc
    return image


def as_mask(image: Image.Image) -> Image.Image:
    """A decoded mask as the pipelines take it: grayscale, white where the image may change. A mask with
    transparency is read as OpenAI's are, by its alpha: transparent pixels are the ones to edit; an opaque
    one (or one without alpha) by its brightness: white is edited, black kept."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        alpha = image.convert("RGBA").getchannel("A")
        if alpha.getextrema() != (255, 255):
            return alpha.point(lambda value: 255 - value)
    return image.convert("L")
