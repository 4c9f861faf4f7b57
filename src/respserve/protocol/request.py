"""The body of `POST /v1/responses`, with the extra sampling fields Modular MAX adds (`seed`, `stop`...)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from respserve.protocol.content import WireModel
from respserve.protocol.image_options import ImageOptions, ProviderOptions
from respserve.protocol.items import InputItem
from respserve.protocol.text_format import TextConfig
from respserve.protocol.tools import Tool, ToolChoice

Metadata = dict[str, str]


def _validate_metadata(value: Metadata | None) -> Metadata | None:
    if value is None:
        return value
    if len(value) > 16:
        raise ValueError("metadata may hold at most 16 keys")
    for key, item in value.items():
        if len(key) > 64 or len(item) > 512:
            raise ValueError("metadata keys are at most 64 characters and values at most 512")
    return value


# Shared by every body that carries `metadata`.
check_metadata = field_validator("metadata")(_validate_metadata)


class ConversationRef(WireModel):
    id: str


class ReasoningConfig(WireModel):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None


class StreamOptions(WireModel):
    include_obfuscation: bool | None = None


class CreateResponseRequest(WireModel):
    model: str | None = None
    input: str | list[InputItem] = Field(default_factory=list)
    instructions: str | None = None
    previous_response_id: str | None = None
    conversation: str | ConversationRef | None = None
    include: list[str] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    max_tool_calls: int | None = Field(default=None, ge=1)
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    max_output_tokens: int | None = Field(default=None, ge=16)
    truncation: Literal["auto", "disabled"] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    background: bool = False
    store: bool = True
    metadata: Metadata | None = None
    user: str | None = None
    safety_identifier: str | None = Field(default=None, max_length=64)
    prompt_cache_key: str | None = Field(default=None, max_length=64)
    service_tier: Literal["auto", "default", "flex", "priority"] | None = None
    # Beyond OpenAI, as Modular MAX and vLLM accept them.
    seed: int | None = None
    stop: str | list[str] | None = None
    top_k: int | None = Field(default=None, ge=0)
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias in [-100, 100]
    provider_options: ProviderOptions | None = None  # `image`: options for image models

    _check_metadata = check_metadata

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for token, bias in (value or {}).items():
            if not token.isdigit():
                raise ValueError(f"logit_bias keys are token ids, got {token!r}")
            if not -100 <= bias <= 100:
                raise ValueError("logit_bias values are between -100 and 100")
        return value

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not stop for stop in stops):
            raise ValueError("stop sequences must not be empty")
        return value

    @property
    def conversation_id(self) -> str | None:
        return self.conversation.id if isinstance(self.conversation, ConversationRef) else self.conversation

    @property
    def image_options(self) -> ImageOptions:
        """`provider_options.image`, with its defaults when absent."""
        return (self.provider_options.image if self.provider_options else None) or ImageOptions()

    @property
    def stop_sequences(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
