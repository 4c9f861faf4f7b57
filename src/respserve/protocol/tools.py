"""Tool definitions and `tool_choice`, as sent in a request and echoed on the resource."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from respserve.protocol.content import WireModel


class FunctionTool(WireModel):
    type: Literal["function"] = "function"
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_\-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


Tool = Annotated[FunctionTool, Field(discriminator="type")]


class FunctionToolChoice(WireModel):
    type: Literal["function"] = "function"
    name: str


class AllowedToolRef(WireModel):
    type: Literal["function"] = "function"
    name: str


class AllowedToolsChoice(WireModel):
    type: Literal["allowed_tools"] = "allowed_tools"
    mode: Literal["none", "auto", "required"] = "auto"
    tools: list[AllowedToolRef]


ToolChoice = (
    Literal["none", "auto", "required"]
    | Annotated[FunctionToolChoice | AllowedToolsChoice, Field(discriminator="type")]
)
