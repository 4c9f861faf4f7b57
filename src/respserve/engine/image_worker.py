"""The image worker: a thread that owns a diffusers pipeline and batches compatible requests.

Waiting requests of the same kind (text to image, edit, inpainting: each has its own pipeline) with the
same size, steps, guidance, negative-prompt presence and, for edits, strength (`ImageRequest.batch_key`)
run as one pipeline call, up to `max_batch_images` images. A request's previews are decoded from the
latents at evenly spaced steps; its final images are encoded here, off the event loop.

A thread of its own, beside the text worker: each denoising step is one call into torch, which releases
the GIL, so text decoding goes on between (and, on a GPU, beside: this worker uses its own CUDA stream).
Cancelling a request drops its images; when every request of a call is gone, the call stops at the next
step.
"""

from __future__ import annotations

import logging
import random
from collections import deque
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from PIL import Image

from respserve.engine.generation import EncodedImage, GenerationOutput, GenerationStatus, ImageRequest
from respserve.engine.image_encoding import encode_image
from respserve.engine.image_pipeline import EditBatch, ImagePipeline
from respserve.engine.worker_thread import WorkerThread

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageWorkerLimits:
    max_batch_images: int = 4  # images in one pipeline call
    max_queued: int = 64  # requests waiting; past it, QueueFull


def preview_steps(steps: int, partial_images: int) -> list[int]:
    """The steps after which previews are decoded: evenly spaced, never the last step (that is the image)."""
    marks = sorted({round(steps * (k + 1) / (partial_images + 1)) for k in range(partial_images)})
    return [mark for mark in marks if 0 < mark < steps]


class ImageWorker(WorkerThread[ImageRequest]):
    def __init__(self, pipeline: ImagePipeline, limits: ImageWorkerLimits | None = None) -> None:
        self.limits = limits or ImageWorkerLimits()
        super().__init__("respserve-image-worker", self.limits.max_queued)
        self.pipeline = pipeline
        self._waiting: deque[ImageRequest] = deque()
        self._cancelled: set[str] = set()
        self._running = 0
        self._stream = torch.cuda.Stream(pipeline.device) if pipeline.device.type == "cuda" else None
        self.batches = 0  # pipeline calls made; a call of several requests is one

    # ---- event-loop side -------------------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return self._running

    # ---- worker-thread side ----------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._receive()
                self._cancelled |= self._queue.channels.take_cancelled()
                batch = self._next_batch()
                if batch:
                    self._generate(batch)
            except Exception:  # a bug past the per-call guard: keep serving the next requests
                logger.exception("the image worker failed between calls")

    def _receive(self) -> None:
        self._waiting.extend(self._queue.receive(block=not self._waiting))

    def _next_batch(self) -> list[ImageRequest]:
        """The oldest waiting request and the later ones it can share a call with (order kept otherwise)."""
        batch: list[ImageRequest] = []
        kept: deque[ImageRequest] = deque()
        images = 0
        waiting = len(self._waiting)
        while self._waiting:
            request = self._waiting.popleft()
            if request.request_id in self._cancelled:
                self._cancelled.discard(request.request_id)
                continue
            fits = not batch or (
                request.batch_key == batch[0].batch_key and images + request.num_images <= self.limits.max_batch_images
            )
            if fits:
                batch.append(request)
                images += request.num_images
            else:
                kept.append(request)
        self._waiting = kept
        self._queue.left(waiting - len(kept))
        self._running = len(batch)
        return batch

    def _generate(self, batch: list[ImageRequest]) -> None:
        pipeline = self.pipeline
        first = batch[0]
        prompts: list[str] = []
        negatives: list[str] = []
        seeds: list[int] = []
        rows: dict[str, range] = {}  # each request's images in the call
        for request in batch:
            start = len(prompts)
            base = request.seed if request.seed is not None else random.randrange(2**32)
            prompts += [request.prompt] * request.num_images
            negatives += [request.negative_prompt or ""] * request.num_images
            seeds += [base + index for index in range(request.num_images)]
            rows[request.request_id] = range(start, len(prompts))
        marks: dict[str, list[int]] = {}  # each request's preview steps, once the call's step count is known

        def on_step(step: int, total: int, latents: torch.Tensor) -> bool:
            self._cancelled |= self._queue.channels.take_cancelled()
            live = [request for request in batch if request.request_id not in self._cancelled]
            for request in live:
                request_marks = marks.setdefault(request.request_id, preview_steps(total, request.partial_images))
                if step in request_marks:
                    self._emit_preview(request, request_marks.index(step), latents[rows[request.request_id]])
            return not live

        guidance = first.guidance_scale if first.guidance_scale is not None else pipeline.default_guidance_scale
        try:
            with self._device_stream():
                images = pipeline.generate(
                    prompts,
                    negatives if first.negative_prompt is not None else None,
                    seeds,
                    first.width,
                    first.height,
                    first.steps,
                    guidance,
                    on_step,
                    _edit_batch(batch),
                )
            self.batches += 1
        except Exception as exc:  # a failed call fails its requests; the worker goes on
            logger.exception("image generation failed for %d requests", len(batch))
            for request in batch:
                self._queue.channels.emit(
                    GenerationOutput(request.request_id, final_status=GenerationStatus.FAILED, error=f"{exc}")
                )
            return
        finally:
            self._running = 0
        for request in batch:
            if request.request_id in self._cancelled:
                self._cancelled.discard(request.request_id)
                continue
            encoded = _encoded(request, [images[row] for row in rows[request.request_id]])
            self._queue.channels.emit(
                GenerationOutput(request.request_id, final_status=GenerationStatus.END_OF_SEQUENCE, images=encoded)
            )

    def _emit_preview(self, request: ImageRequest, preview_index: int, latents: torch.Tensor) -> None:
        previews = _encoded(request, self.pipeline.preview(latents, request.width, request.height))
        if previews:
            self._queue.channels.emit(
                GenerationOutput(request.request_id, previews=previews, preview_index=preview_index)
            )

    def _device_stream(self) -> AbstractContextManager[object]:
        return torch.cuda.stream(self._stream) if self._stream is not None else nullcontext()


def _edit_batch(batch: list[ImageRequest]) -> EditBatch | None:
    """The pictures of a batch of edits (all of one kind and strength: see `ImageRequest.batch_key`)."""
    edits = [(request.edit, request.num_images) for request in batch if request.edit is not None]
    if not edits:
        return None
    images = [edit.image for edit, count in edits for _ in range(count)]
    masks = [edit.mask for edit, count in edits for _ in range(count) if edit.mask is not None]
    return EditBatch(images, masks or None, edits[0][0].strength)


def _encoded(request: ImageRequest, pictures: list[Image.Image]) -> list[EncodedImage]:
    image_format, compression = request.output_format, request.output_compression
    return [
        EncodedImage(index, encode_image(picture, image_format, compression), image_format)
        for index, picture in enumerate(pictures)
    ]
