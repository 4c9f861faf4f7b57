"""What a file holds, read from its bytes alone: text, a PDF's text, or an image.

The kind is told by the content (PDF and image signatures, then text that decodes), never by the name a
client gave. Files come from strangers, so reading one is bounded: its size, a PDF's pages, the text it
yields, pypdf's decompression (a small file can inflate to gigabytes) and the time extraction takes; and
whatever pypdf raises on a malformed file is caught. Every refusal is an `UnreadableFile`.
"""

from __future__ import annotations

import codecs
import io
import mimetypes
import time
from dataclasses import dataclass

import pypdf

from respserve.config import Settings


@dataclass(frozen=True)
class FileLimits:
    max_bytes: int
    max_pages: int
    max_chars: int

    @classmethod
    def from_settings(cls, settings: Settings) -> FileLimits:
        return cls(settings.max_file_bytes, settings.max_file_pages, settings.max_file_chars)


@dataclass(frozen=True)
class FileText:
    text: str


@dataclass(frozen=True)
class FileImage:
    media_type: str
    data: bytes


class UnreadableFile(Exception):
    def __init__(self, message: str, code: str = "invalid_file") -> None:
        super().__init__(message)
        self.message = message
        self.code = code


PDF = "application/pdf"
_IMAGE_SIGNATURES = {
    b"\x89PNG\r\n\x1a\n": "image/png",
    b"\xff\xd8\xff": "image/jpeg",
    b"GIF87a": "image/gif",
    b"GIF89a": "image/gif",
}
# Bounds on pypdf's work for one file: no content stream of text legitimately inflates past these.
_PDF_STREAM_BYTES = 16 * 1024 * 1024
_PDF_BOUNDS = {
    "maximum_declared_stream_length": _PDF_STREAM_BYTES,
    "array_based_stream_maximum_output_length": _PDF_STREAM_BYTES,
    "zlib_maximum_output_length": _PDF_STREAM_BYTES,
    "lzw_maximum_output_length": _PDF_STREAM_BYTES,
    "run_length_maximum_output_length": _PDF_STREAM_BYTES,
    "brotli_maximum_output_length": _PDF_STREAM_BYTES,
    "jbig2_maximum_output_length": _PDF_STREAM_BYTES,
    "image_maximum_buffer_size": _PDF_STREAM_BYTES,
    "stream_decoding_work_maximum_length": 4 * _PDF_STREAM_BYTES,
    "jbig2dec_binary": None,  # never run an outside program on a stranger's file
}
_PDF_SECONDS = 20.0  # checked between pages; one page's work is bounded by the limits above


def media_type(data: bytes, filename: str | None = None) -> str:
    """A PDF or image by its signature; text by decoding (named after the file when it names a text type);
    else what the name suggests, or `application/octet-stream`."""
    if data.startswith(b"%PDF-"):
        return PDF
    for signature, image_type in _IMAGE_SIGNATURES.items():
        if data.startswith(signature):
            return image_type
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    guessed = mimetypes.guess_type(filename or "")[0]
    if _decoded_text(data) is not None:
        return guessed if guessed and guessed.startswith("text/") else "text/plain"
    return guessed or "application/octet-stream"


def read_file_content(data: bytes, filename: str, limits: FileLimits) -> FileText | FileImage:
    """The file as the model reads it. CPU work (a PDF's parsing): call it off the event loop."""
    if len(data) > limits.max_bytes:
        raise UnreadableFile(
            f"The file has {len(data)} bytes; at most {limits.max_bytes} are accepted.", "file_too_large"
        )
    kind = media_type(data, filename)
    if kind == PDF:
        return FileText(_pdf_text(data, limits))
    if kind.startswith("image/"):
        return FileImage(kind, data)
    text = _decoded_text(data)
    if text is None:
        raise UnreadableFile(
            f"'{filename}' is not a file this server reads ({kind}): send text (UTF-8), a PDF or an image.",
            "unsupported_file",
        )
    return FileText(_bounded(text, limits))


def _decoded_text(data: bytes) -> str | None:
    """UTF-8 (or UTF-16 with its byte-order mark) text without NUL characters, or None."""
    encoding = "utf-16" if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) else "utf-8-sig"
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError:
        return None
    return None if "\x00" in text else text


def _bounded(text: str, limits: FileLimits) -> str:
    if len(text) > limits.max_chars:
        raise UnreadableFile(f"The file's text is longer than {limits.max_chars} characters.", "file_too_large")
    return text


def _pdf_text(data: bytes, limits: FileLimits) -> str:
    # A PDF ends with its cross-reference trailer and `%%EOF`; pypdf would guess its way through a
    # truncated one, reading whatever part arrived as if it were the whole document.
    if b"%%EOF" not in data[-1024:]:
        raise UnreadableFile("The PDF is truncated: it has no end-of-file marker.")
    deadline = time.monotonic() + _PDF_SECONDS
    try:
        with pypdf.apply_configuration(**_PDF_BOUNDS):
            reader = pypdf.PdfReader(io.BytesIO(data))
            if reader.is_encrypted:
                raise UnreadableFile("The PDF is encrypted.")
            if len(reader.pages) > limits.max_pages:
                raise UnreadableFile(
                    f"The PDF has {len(reader.pages)} pages; at most {limits.max_pages} are read.", "file_too_large"
                )
            texts: list[str] = []
            for page in reader.pages:
                texts.append(page.extract_text())
                if sum(map(len, texts)) > limits.max_chars:
                    raise UnreadableFile(
                        f"The PDF's text is longer than {limits.max_chars} characters.", "file_too_large"
                    )
                if time.monotonic() > deadline:
                    raise UnreadableFile(f"Reading the PDF took longer than {_PDF_SECONDS:g} s.")
    except UnreadableFile:
        raise
    except pypdf.errors.LimitReachedError as exc:
        raise UnreadableFile(f"The PDF expands past what this server reads: {exc}", "file_too_large") from exc
    except Exception as exc:  # pypdf raises many kinds on malformed input, LimitReachedError past a bound
        raise UnreadableFile(f"The PDF could not be read: {type(exc).__name__}: {exc}") from exc
    return "\n\n".join(texts)
