"""Tool definitions and `tool_choice`, as sent in a request and echoed on the resource."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, SerializerFunctionWrapHandler, model_serializer

from respserve.protocol.content import WireModel


class FunctionTool(WireModel):
    type: Literal["function"] = "function"
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_\-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ImageGenerationTool(WireModel):
    """OpenAI's hosted image tool, served by one of this server's image models."""

    type: Literal["image_generation"] = "image_generation"
    model: str | None = None  # an image model served here; others (`gpt-image-1`) mean the default one
    size: str | None = Field(default=None, pattern=r"^(auto|[0-9]{1,5}x[0-9]{1,5})$")
    output_format: Literal["png", "jpeg", "webp"] | None = None
    output_compression: int | None = Field(default=None, ge=0, le=100)
    partial_images: int | None = Field(default=None, ge=0, le=3)
    quality: Literal["low", "medium", "high", "auto"] | None = None
    background: Literal["transparent", "opaque", "auto"] | None = None

    @model_serializer(mode="wrap")
    def _set_fields_only(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Echoed as sent: OpenAI's schema has no nulls for the options a request left out.
        return {key: value for key, value in handler(self).items() if value is not None}


Tool = Annotated[FunctionTool | ImageGenerationTool, Field(discriminator="type")]


class FunctionToolChoice(WireModel):
    type: Literal["function"] = "function"
    name: str


class HostedToolChoice(WireModel):
    """Forces a hosted tool: here, `{"type": "image_generation"}`."""

    type: Literal["image_generation"] = "image_generation"


class AllowedToolRef(WireModel):
    type: Literal["function"] = "function"
    name: str


class AllowedToolsChoice(WireModel):
    type: Literal["allowed_tools"] = "allowed_tools"
    mode: Literal["none", "auto", "required"] = "auto"
    tools: list[AllowedToolRef]


ToolChoice = (
    Literal["none", "auto", "required"]
    | Annotated[FunctionToolChoice | HostedToolChoice | AllowedToolsChoice, Field(discriminator="type")]
)
