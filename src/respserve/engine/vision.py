"""Images in a text request: what the processor made of them, and their embeddings, computed once.

The processor (vision_pipeline.py) expands each image into placeholder tokens in the prompt and turns the
pictures into pixel tensors (`VisionInputs`, on the `GenerationRequest`). When the worker admits the
request it runs the vision encoder and projector once (`encode_images`); the sequence keeps the result
(`ImageEmbeddings`: one row per placeholder token, in prompt order) for as long as it lives, so prefill
chunks, and a recompute after preemption, take their image rows from it rather than from the encoder.

Placeholder tokens are the same for every picture of a size, so the prefix cache cannot tell two images
apart by tokens: `hash_salt` (a hash of the pixel tensors) is mixed into the block hashes from the block
holding the first placeholder on (block_manager.py).

Gemma 3's image tokens attend to each other both ways during prefill: its `VisionInputs` carry
`bidirectional_spans`, one [first, last) per run of placeholders (transformers groups an image's tokens the
same way, by runs), which the scheduler keeps whole in one chunk and the paged attention reads.

Qwen3-VL also adds features from several depths of its vision tower to the language model's hidden states
after its first decoder layers, at the placeholder rows ("deepstack"): `ImageEmbeddings.deepstack` keeps
them beside the main features, one tensor per such layer, sliced per chunk the same way.

Qwen2-VL, Qwen2.5-VL and Qwen3-VL place tokens on 3-D (M-RoPE) positions: (temporal, height, width), which for an
image's tokens follow its grid rather than the token index, and text after an image sits at its index plus
a per-prompt offset. `rope_positions` asks the model's own `get_rope_index` for them once, at admission;
the sequence keeps them (`RopePositions`), so every chunk, decode token and recompute reads its positions
from there.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True, eq=False)
class VisionInputs:
    """The processor's image tensors for one prompt (pixel values, and whatever else its model takes)."""

    tensors: dict[str, torch.Tensor]
    image_token_id: int
    positions: tuple[int, ...]  # the prompt positions of the placeholder tokens, ascending
    hash_salt: int
    bidirectional_spans: tuple[tuple[int, int], ...] = ()  # Gemma 3: each image's tokens, attended both ways

    @classmethod
    def of(
        cls, tensors: dict[str, torch.Tensor], prompt: list[int], image_token_id: int, bidirectional: bool = False
    ) -> VisionInputs:
        positions = tuple(index for index, token in enumerate(prompt) if token == image_token_id)
        if not positions:
            raise ValueError("the processor put no image token in the prompt")
        spans = image_spans(positions) if bidirectional else ()
        return cls(tensors, image_token_id, positions, _tensor_hash(tensors), spans)

    @property
    def first_image_token(self) -> int:
        return self.positions[0]

    @property
    def num_image_tokens(self) -> int:
        return len(self.positions)


def image_spans(positions: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """[first, last) of each run of consecutive placeholder positions (ascending)."""
    spans: list[tuple[int, int]] = []
    for position in positions:
        if spans and spans[-1][1] == position:
            spans[-1] = (spans[-1][0], position + 1)
        else:
            spans.append((position, position + 1))
    return tuple(spans)


@dataclass(frozen=True, eq=False)
class ImageEmbeddings:
    """One embedding row per placeholder token; `positions` are those tokens' places in the prompt."""

    positions: torch.Tensor  # [n] long, ascending, on the CPU
    features: torch.Tensor  # [n, hidden], on the model's device
    deepstack: tuple[torch.Tensor, ...] = ()  # Qwen3-VL: [n, hidden] per deepstack layer; () for the others

    def rows(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
        """(offsets into [start, end), feature rows, deepstack rows per layer) of the placeholders in that span
        of the prompt."""
        first = int(torch.searchsorted(self.positions, start))
        last = int(torch.searchsorted(self.positions, end))
        deepstack = tuple(layer[first:last] for layer in self.deepstack)
        return self.positions[first:last] - start, self.features[first:last], deepstack


@dataclass(frozen=True, eq=False)
class RopePositions:
    """A prompt's M-RoPE positions; tokens past the prompt (the output) sit at their index + `delta` in all
    three components, as in the model's own generation after the prompt."""

    prompt: torch.Tensor  # [3, prompt length] long, on the CPU: (temporal, height, width) per token
    delta: int  # the highest prompt position + 1 - the prompt's length

    def span(self, start: int, end: int) -> torch.Tensor:
        """[3, end - start] positions of the sequence's tokens [start, end)."""
        length = self.prompt.shape[1]
        known = self.prompt[:, min(start, length) : min(end, length)]
        after = torch.arange(max(start, length), max(end, length)) + self.delta
        return torch.cat([known, after.expand(3, -1)], dim=1)


def encode_images(model: Any, vision: VisionInputs) -> ImageEmbeddings:
    """Runs the vision tower and projector over the request's images (the worker thread, at admission)."""
    device, dtype = model.device, model.dtype
    tensors = {
        name: tensor.to(device, dtype) if tensor.is_floating_point() else tensor.to(device)
        for name, tensor in vision.tensors.items()
    }
    with torch.inference_mode():
        output = model.get_image_features(**tensors, return_dict=True)
    features = _rows(output.pooler_output, dtype)
    # Qwen3-VL: per deepstack layer, the images' rows (a tuple per image, as pooler_output is).
    deepstack = tuple(_rows(layer, dtype) for layer in getattr(output, "deepstack_features", None) or ())
    positions = torch.tensor(vision.positions, dtype=torch.long)
    for rows in (features, *deepstack):
        if rows.shape[0] != positions.shape[0]:
            raise ValueError(f"the vision encoder made {rows.shape[0]} rows for {positions.shape[0]} image tokens")
    return ImageEmbeddings(positions, features, deepstack)


def _rows(features: torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, ...], dtype: torch.dtype) -> torch.Tensor:
    """[n, hidden] from one tensor or one per image (in prompt order)."""
    flat = torch.cat(list(features), dim=0) if isinstance(features, list | tuple) else features
    return flat.reshape(-1, flat.shape[-1]).to(dtype)


def rope_positions(model: Any, vision: VisionInputs, prompt: list[int]) -> RopePositions | None:
    """The prompt's M-RoPE positions from the model's own `get_rope_index` (Qwen2-VL's family and Qwen3-VL,
    whose signatures agree: the rules are the model's, so they are not restated here); None for models whose
    tokens sit at their index."""
    get_rope_index = getattr(getattr(model, "model", None), "get_rope_index", None)
    if get_rope_index is None:
        return None
    ids = torch.tensor([prompt], dtype=torch.long)
    # Text (0) or image (1) per token, as the processor marks them: each run of 1s is one image's grid.
    token_types = (ids == vision.image_token_id).int()
    with torch.inference_mode():
        positions, deltas = get_rope_index(
            ids, mm_token_type_ids=token_types, image_grid_thw=vision.tensors.get("image_grid_thw")
        )
    return RopePositions(positions[:, 0].to("cpu", torch.long), int(deltas.reshape(-1)[0]))


def _tensor_hash(tensors: dict[str, torch.Tensor]) -> int:
    """A hash of the pixels as the model sees them (after resizing, so `detail` counts too)."""
    digest = hashlib.blake2b(digest_size=8)
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return int.from_bytes(digest.digest(), "little", signed=True)
