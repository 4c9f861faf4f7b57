"""A vision-language model on its device: an image-text-to-text folder (AutoModelForImageTextToText and its
AutoProcessor: LLaVA, SmolVLM/Idefics3, ...) served by the same paged engine as text models.

Only the language model's attention is the engine's; the vision tower keeps its own, since it runs once
per request over the pictures (vision.py), outside the paged steps. Prompts are rendered by the
processor's chat template, each turn's images before its text, then tokenized by the processor, which
expands every image into the placeholder tokens its model fills with image features.

Qwen2-VL, Qwen2.5-VL and Qwen3-VL place tokens on 3-D (M-RoPE) positions that follow each image's grid; the
engine takes them from the model at admission (vision.py's `RopePositions`). Qwen3-VL also adds image
features inside its first decoder layers (deepstack), which the sequence keeps beside the main ones
(vision.py) and each step passes on (model_runner.py). Other M-RoPE families are refused at load, each with
its reason (`_REFUSED`). The three size each picture within their processor's pixel budget, which
`detail: "low"` caps (vision_detail.py).

Gemma 3 lets each image's tokens attend to each other both ways: its prompts carry those spans
(`VisionInputs.bidirectional_spans`), which the scheduler and the paged attention honour. PaliGemma (both
ways over its whole prompt prefix) and Gemma 3n stay refused, and so does any model whose attention softcaps
its logits or attends both ways over all text (paged_attention.refusal). `detail: "high"` turns Gemma 3's
pan-and-scan on (crops of a large picture, each one more image); `low`/`auto` leave one image at its fixed
resolution.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
from transformers.utils import is_torchvision_available

from respserve.engine.device import pick_device, pick_dtype
from respserve.engine.fused_norms import fuse_rms_norms
from respserve.engine.generation import ChatMessage, PromptImage, ToolSpec
from respserve.engine.model_source import ModelSource, ModelSourceError
from respserve.engine.packed_linear import can_pack, pack_linears, prepared_linear
from respserve.engine.paged_attention import refusal
from respserve.engine.text_pipeline import ContextLengthExceeded, TextPipeline, uses_cpu_kernels
from respserve.engine.tool_prompt import fallback_turns, native_tools, native_turn, template_knows_tools
from respserve.engine.vision import VisionInputs
from respserve.engine.vision_detail import PixelBudget

logger = logging.getLogger(__name__)

# M-RoPE families whose positions the engine gets from the model's own `get_rope_index` (vision.py), with
# their processors' names.
_MROPE_SERVED = {
    "qwen2_vl": "Qwen2VLProcessor",
    "qwen2_5_vl": "Qwen2_5_VLProcessor",
    "qwen3_vl": "Qwen3VLProcessor",
}
_QWEN3_VL_MOE = (
    "is untested: the engine serves Qwen3-VL's deepstack and positions for the dense model, and no test covers "
    "its mixture-of-experts sibling"
)
_UNTESTED_MROPE = (
    "places tokens on 3-D (M-RoPE) positions, which the engine computes only for Qwen2-VL's family and Qwen3-VL"
)
_PREFIX_LM = (
    "attends both ways over its whole prompt prefix (images and text), and the engine's paged attention does "
    "so only within each image (Gemma 3); it would serve the model, wrongly"
)
_GEMMA3N = (
    "is untested: its image tokens attend both ways and its layers also read per-layer embeddings of the token "
    "ids, which the engine's image steps (fed input embeddings) do not carry"
)
# Families whose tokens of one image attend to each other both ways (transformers: `token_type_ids`).
_BIDIRECTIONAL_IMAGES = frozenset({"gemma3"})
# Why other families cannot be served (M-RoPE ones, and those whose image tokens attend both ways); any
# other config that mentions M-RoPE is refused too.
_REFUSED = {
    "qwen3_vl_moe": _QWEN3_VL_MOE,
    "qwen2_5_omni": _UNTESTED_MROPE,
    "glm4v": _UNTESTED_MROPE,
    "glm4v_moe": _UNTESTED_MROPE,
    "gemma3n": _GEMMA3N,
    "paligemma": _PREFIX_LM,
}


# What the processor returns about the text, not the pictures: kept away from the vision encoder (Qwen2-VL's
# token types are derived again from the prompt where its positions are computed, vision.py).
_TEXT_INPUTS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


def is_vision_model(source: ModelSource) -> bool:
    """Whether `source` is an image-text-to-text model with an image processor beside it."""
    folder = Path(source.path)
    if not (folder / "config.json").is_file():
        return False
    model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    has_processor = (folder / "preprocessor_config.json").is_file() or (folder / "processor_config.json").is_file()
    return model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES and has_processor


def processor_class(model_type: str) -> type | None:
    """The processor class for a Qwen2-VL-family `model_type`; None for the others (AutoProcessor's choice).

    Qwen2-VL's processors also hold a video processor, which transformers builds only with torchvision (and
    without it fails to build the processor at all). respserve reads images alone, so there it takes the
    same processor without its video half: the same class name (a folder it saves is Qwen2-VL's own), an
    `__init__` whose signature lists only the image processor and the tokenizer (the processor's halves are
    read from that signature), passing no video processor on."""
    name = _MROPE_SERVED.get(model_type)
    if name is None:
        return None
    full: type = getattr(transformers, name)
    if is_torchvision_available():
        return full

    def init(
        self: Any, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None, **kwargs: Any
    ) -> None:
        full.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return type(name, (full,), {"__init__": init, "__module__": __name__})


def load_processor(path: str) -> Any:
    """The model folder's processor (see `processor_class`)."""
    known = processor_class(AutoConfig.from_pretrained(path).model_type)
    return AutoProcessor.from_pretrained(path) if known is None else known.from_pretrained(path)


def _refuse_unserved(config: Any) -> None:
    if config.model_type in _MROPE_SERVED:
        return
    reason = _REFUSED.get(config.model_type)
    if reason is None and "mrope" in json.dumps(config.to_dict(), default=str):
        reason = _UNTESTED_MROPE
    if reason is None:
        reason = refusal(config.get_text_config())
    if reason is not None:
        raise ModelSourceError(
            f"{config.model_type} {reason}; serve a Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Gemma 3, LLaVA or "
            "SmolVLM/Idefics3-style model"
        )


class VisionLanguagePipeline(TextPipeline):
    """A TextPipeline whose prompts may hold images; `processor` renders and tokenizes them."""

    accepts_images = True

    def __init__(self, model: Any, processor: Any, device: torch.device, cpu_kernels: bool = False) -> None:
        super().__init__(model, processor.tokenizer, device, cpu_kernels=cpu_kernels)
        self.processor = processor
        self.image_token_id = int(model.config.image_token_id)
        # SmolVLM/Idefics3 tile large images (more tokens); `detail: "low"` turns that off.
        self.splits_images = getattr(processor.image_processor, "do_image_splitting", None) is not None
        # The Qwen-VL family sizes each picture within a pixel budget; `detail: "low"` caps it (per image).
        served = model.config.model_type in _MROPE_SERVED
        self.pixel_budget = PixelBudget.of(processor.image_processor) if served else None
        # Gemma 3: crops of a large picture beside it, only when asked (`detail: "high"`).
        self.pans_and_scans = hasattr(processor.image_processor, "do_pan_and_scan")
        self.bidirectional_images = model.config.model_type in _BIDIRECTIONAL_IMAGES

    @classmethod
    def load(
        cls,
        source: ModelSource,
        device: str = "auto",
        dtype: str = "auto",
        tensor_parallel: int = 1,
        kernel_dir: Path | None = None,
    ) -> VisionLanguagePipeline:
        if tensor_parallel > 1:
            raise ModelSourceError("vision-language models are served on one device (no tensor parallelism)")
        _refuse_unserved(AutoConfig.from_pretrained(source.path))
        torch_device = pick_device(device)
        torch_dtype = pick_dtype(dtype, torch_device)
        started = time.perf_counter()
        processor = load_processor(source.path)
        model = AutoModelForImageTextToText.from_pretrained(source.path, dtype=torch_dtype).to(torch_device).eval()
        kernels = uses_cpu_kernels(kernel_dir, torch_device, torch_dtype)
        if can_pack(torch_device, torch_dtype):  # the decode path only: the vision tower runs once a request
            pack_linears(model.get_decoder(), kernels)
            model.lm_head = prepared_linear(model.get_output_embeddings(), kernels)
        if kernels:
            fuse_rms_norms(model.get_decoder())
        seconds = time.perf_counter() - started
        logger.info("loaded %s (vision) on %s (%s) in %.2f s", source.name, torch_device, torch_dtype, seconds)
        return cls(model, processor, torch_device, kernels)

    def render(
        self, messages: list[ChatMessage], tools: list[ToolSpec] | None = None
    ) -> tuple[list[int], VisionInputs | None]:
        tools = tools or []
        template = self.processor.chat_template or self.tokenizer.chat_template
        native = template_knows_tools(template)
        turns: list[dict[str, Any]] = (
            [native_turn(message) for message in messages] if native else list(fallback_turns(messages, tools))
        )
        # The fallback may put a system turn first; otherwise turns and messages correspond one to one.
        offset = len(turns) - len(messages)
        images: list[PromptImage] = []
        for message, turn in zip(messages, turns[offset:], strict=True):
            images.extend(message.images)
            parts = [{"type": "image"} for _ in message.images]
            turn["content"] = [*parts, {"type": "text", "text": turn["content"] or ""}]
        for turn in turns[:offset]:
            turn["content"] = [{"type": "text", "text": turn["content"]}]
        text = self.processor.apply_chat_template(
            turns, tools=native_tools(tools) or None if native else None, add_generation_prompt=True, tokenize=False
        )
        if not images:
            ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            vision = None
        else:
            ids, vision = self._with_images(text, images)
        if len(ids) >= self.context_length:
            raise ContextLengthExceeded(len(ids), self.context_length)
        return ids, vision

    def render_prompt(self, messages: list[ChatMessage], tools: list[ToolSpec] | None = None) -> list[int]:
        return self.render(messages, tools)[0]

    def _with_images(self, text: str, images: list[PromptImage]) -> tuple[list[int], VisionInputs]:
        options: dict[str, Any] = {}
        if self.splits_images and all(image.detail == "low" for image in images):
            options["do_image_splitting"] = False
        if self.pans_and_scans:  # on when some image asks for `high` detail (the call takes one setting)
            options["do_pan_and_scan"] = any(image.detail == "high" for image in images)
        encoded = self.processor(
            text=[text],
            images=[[self._sized(image) for image in images]],
            return_tensors="pt",
            add_special_tokens=False,
            **options,
        )
        ids = encoded["input_ids"][0].tolist()
        tensors = {name: value for name, value in encoded.items() if name not in _TEXT_INPUTS}
        return ids, VisionInputs.of(tensors, ids, self.image_token_id, self.bidirectional_images)

    def _sized(self, image: PromptImage) -> Any:
        """The picture as the processor is to see it: a low-detail one within the low budget (Qwen-VL family)."""
        if self.pixel_budget is not None and image.detail == "low":
            return self.pixel_budget.low_detail(image.image)
        return image.image
