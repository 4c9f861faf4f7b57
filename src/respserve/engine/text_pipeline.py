"""The text model on its device: loading, and prompt rendering with the chat template."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from respserve.engine.cpu_kernels import load_cpu_kernels
from respserve.engine.device import pick_device, pick_dtype
from respserve.engine.fused_norms import fuse_rms_norms
from respserve.engine.generation import ChatMessage, ToolSpec
from respserve.engine.model_source import ModelSource, ModelSourceError
from respserve.engine.packed_linear import can_pack, pack_linears
from respserve.engine.paged_attention import refusal
from respserve.engine.structured_output import GrammarCompiler
from respserve.engine.token_text import TokenTexts
from respserve.engine.tool_prompt import fallback_turns, native_tools, native_turn, template_knows_tools

if TYPE_CHECKING:
    from respserve.engine.vision import VisionInputs

logger = logging.getLogger(__name__)


class ContextLengthExceeded(ValueError):
    def __init__(self, prompt_tokens: int, context_length: int) -> None:
        super().__init__(f"the input is {prompt_tokens} tokens, and this model's context is {context_length} tokens")
        self.prompt_tokens = prompt_tokens
        self.context_length = context_length


def uses_cpu_kernels(kernel_dir: Path | None, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a model on `device` in `dtype` runs with respserve's CPU kernels (float32 on the CPU),
    built into `kernel_dir` if need be (None: never)."""
    if kernel_dir is None or device.type != "cpu" or dtype != torch.float32:
        return False
    return load_cpu_kernels(kernel_dir)


class TextPipeline:
    """Owns a causal LM and its tokenizer; called only from the worker thread, except `render_prompt`."""

    accepts_images = False

    def __init__(
        self, model: Any, tokenizer: Any, device: torch.device, tensor_parallel: int = 1, cpu_kernels: bool = False
    ) -> None:
        self.model = model
        self.cpu_kernels = cpu_kernels  # respserve's CPU kernels are loaded for this model (cpu_kernels.py)
        self.tensor_parallel = tensor_parallel
        self.tokenizer = tokenizer
        self.device = device
        self.dtype: torch.dtype = model.dtype
        config = model.config.get_text_config()  # a vision-language model's language half
        self.vocab_size: int = int(config.vocab_size)
        self.context_length: int = int(getattr(config, "max_position_embeddings", 0) or 2048)
        self.num_layers: int = int(config.num_hidden_layers)
        eos = model.generation_config.eos_token_id if model.generation_config else None
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            eos_ids.add(tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos_ids)
        self.grammars = GrammarCompiler(tokenizer)
        self.token_texts = TokenTexts(tokenizer)

    @classmethod
    def load(
        cls,
        source: ModelSource,
        device: str = "auto",
        dtype: str = "auto",
        tensor_parallel: int = 1,
        kernel_dir: Path | None = None,
    ) -> TextPipeline:
        """`tensor_parallel` > 1: this process is one rank of a started group (tensor_parallel.py), and
        transformers loads its shard of every layer. `kernel_dir`: where our CPU kernels are built and kept
        (cpu_kernels.py); None: not used."""
        config = AutoConfig.from_pretrained(source.path)
        reason = refusal(config.get_text_config())
        if reason is not None:  # it would serve the model, wrongly (Gemma 2's softcapping)
            raise ModelSourceError(f"{config.model_type} {reason}")
        torch_device = pick_device(device)
        torch_dtype = pick_dtype(dtype, torch_device)
        started = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(source.path)
        if tensor_parallel > 1:
            model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch_dtype, tp_plan="auto").eval()
        else:
            model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch_dtype).to(torch_device).eval()
        kernels = tensor_parallel == 1 and uses_cpu_kernels(kernel_dir, torch_device, torch_dtype)
        if can_pack(torch_device, torch_dtype) and tensor_parallel == 1:  # (sharded weights stay DTensors)
            pack_linears(model, kernels)  # half the decode matmul time on the CPU (see packed_linear.py)
        if kernels:
            fuse_rms_norms(model)  # one kernel call a norm (fused_norms.py)
        logger.info(
            "loaded %s on %s (%s%s) in %.2f s",
            source.name,
            torch_device,
            torch_dtype,
            ", respserve's CPU kernels" if kernels else "",
            time.perf_counter() - started,
        )
        return cls(model, tokenizer, torch_device, tensor_parallel, kernels)

    def render(
        self, messages: list[ChatMessage], tools: list[ToolSpec] | None = None
    ) -> tuple[list[int], VisionInputs | None]:
        """The prompt's token ids, and what its images became (never any here: a text model refuses them)."""
        return self.render_prompt(messages, tools), None

    def render_prompt(self, messages: list[ChatMessage], tools: list[ToolSpec] | None = None) -> list[int]:
        """Token ids of the chat-templated conversation, ending with the assistant's generation prompt."""
        tools = tools or []
        if not self.tokenizer.chat_template:
            # Base models without a template: plain concatenation, as transformers' pipelines do.
            ids = self.tokenizer("\n".join(message.content for message in messages))["input_ids"]
        elif template_knows_tools(self.tokenizer.chat_template):
            ids = self.tokenizer.apply_chat_template(
                [native_turn(message) for message in messages],
                tools=native_tools(tools) or None,
                add_generation_prompt=True,
                tokenize=True,
                return_dict=False,
            )
        else:
            ids = self.tokenizer.apply_chat_template(
                fallback_turns(messages, tools), add_generation_prompt=True, tokenize=True, return_dict=False
            )
        if len(ids) >= self.context_length:
            raise ContextLengthExceeded(len(ids), self.context_length)
        return list(ids)

    @property
    def thinks(self) -> bool:
        """Whether the chat template is a reasoning model's (it writes `<think>` blocks)."""
        return "<think>" in (self.tokenizer.chat_template or "")

    def prompt_opens_thinking(self, prompt: list[int]) -> bool:
        """Whether the generation prompt already opened `<think>`, so the reply starts inside it."""
        return self.tokenizer.decode(prompt[-4:]).rstrip().endswith("<think>")
