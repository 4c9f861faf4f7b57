"""What goes into the workers (`GenerationRequest` for text, `ImageRequest` for images) and what comes out
(`GenerationOutput`: text deltas, images, and the final status)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from PIL import Image

    from respserve.engine.vision import VisionInputs


@dataclass(frozen=True)
class ToolCallTurn:
    """A function call the assistant made, as a chat turn carries it."""

    call_id: str
    name: str
    arguments: str  # JSON


@dataclass(frozen=True, eq=False)
class PromptImage:
    """A picture in a turn (decoded, RGB), for a vision-language model, with the `detail` asked for."""

    image: Image.Image
    detail: str = "auto"


@dataclass(frozen=True)
class ChatMessage:
    """One turn of the conversation, as the chat template sees it (role `tool` answers a call). A turn's
    images come before its text."""

    role: str
    content: str
    tool_calls: tuple[ToolCallTurn, ...] = ()
    tool_call_id: str | None = None
    images: tuple[PromptImage, ...] = ()


@dataclass(frozen=True)
class ToolSpec:
    """A function the model may call."""

    name: str
    description: str | None
    parameters: dict[str, Any]


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    logprobs: int | None = None  # None: no logprobs; n: the sampled token's and the n most likely
    grammar: str | None = None  # an llguidance grammar the output must follow (JSON schema, ...)


@dataclass
class GenerationRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    vision: VisionInputs | None = None  # the prompt's images, for a vision-language model


ImageFormat = Literal["png", "jpeg", "webp"]
ImageKind = Literal["generate", "edit", "inpaint"]


@dataclass(frozen=True, eq=False)
class ImageEdit:
    """What an edit starts from: a picture (RGB) and, for inpainting, a mask (grayscale, white where the
    picture may change, its size). The pipeline noises the picture to `strength` and denoises from there."""

    image: Image.Image
    mask: Image.Image | None
    strength: float

    @property
    def kind(self) -> ImageKind:
        return "inpaint" if self.mask is not None else "edit"


@dataclass(frozen=True)
class ImageRequest:
    """One image request: `num_images` images of one prompt, encoded as `output_format`; drawn from noise,
    or from the picture of an `edit`."""

    request_id: str
    prompt: str
    width: int
    height: int
    steps: int
    num_images: int = 1
    guidance_scale: float | None = None  # None: the pipeline's default
    negative_prompt: str | None = None
    seed: int | None = None  # image i is drawn from seed + i, so each image is reproducible on its own
    output_format: ImageFormat = "png"
    output_compression: int | None = None  # jpeg/webp quality, 0-100
    partial_images: int = 0  # previews decoded from the latents along the way (0-3)
    edit: ImageEdit | None = None

    @property
    def kind(self) -> ImageKind:
        return "generate" if self.edit is None else self.edit.kind

    @property
    def batch_key(self) -> tuple[object, ...]:
        """Requests with equal keys can share one pipeline call: one kind (each has its own pipeline), one
        strength for edits, and the same size, steps, guidance and negative-prompt presence."""
        strength = None if self.edit is None else self.edit.strength
        shape = (self.width, self.height, self.steps, self.guidance_scale, self.negative_prompt is not None)
        return (self.kind, strength, *shape)


@dataclass(frozen=True)
class EncodedImage:
    index: int  # which of the request's images
    data: bytes
    format: ImageFormat


class GenerationStatus(enum.Enum):
    ACTIVE = "active"
    END_OF_SEQUENCE = "end_of_sequence"  # the model emitted EOS or a stop string matched
    MAXIMUM_LENGTH = "maximum_length"  # max_tokens reached
    CANCELLED = "cancelled"
    FAILED = "failed"

    @property
    def is_done(self) -> bool:
        return self is not GenerationStatus.ACTIVE


@dataclass(frozen=True)
class TopToken:
    token: str
    bytes: list[int]
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """One sampled token with its log-probability and the most likely alternatives."""

    token: str
    bytes: list[int]
    logprob: float
    top: list[TopToken]


@dataclass
class GenerationOutput:
    """One step of one request: new text, and the final status once it is done."""

    request_id: str
    text: str = ""
    final_status: GenerationStatus = GenerationStatus.ACTIVE
    prompt_tokens: int = 0
    cached_tokens: int = 0  # of the prompt tokens, those served from the prefix cache
    output_tokens: int = 0
    error: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)  # tokens behind `text`, when asked for
    images: list[EncodedImage] = field(default_factory=list)  # the finished images (image requests)
    previews: list[EncodedImage] = field(default_factory=list)  # partial images along the way
    preview_index: int = 0  # which round of previews `previews` is (0-based)
