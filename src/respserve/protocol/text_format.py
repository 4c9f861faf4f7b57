"""`text` configuration: the output format (plain text, JSON object, JSON schema) and verbosity."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from respserve.protocol.content import WireModel


class TextFormat(WireModel):
    type: Literal["text"] = "text"


class JsonObjectFormat(WireModel):
    type: Literal["json_object"] = "json_object"


class JsonSchemaFormat(WireModel):
    type: Literal["json_schema"] = "json_schema"
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_\-]+$")
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema", serialization_alias="schema")
    strict: bool = False


class TextConfig(WireModel):
    format: Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")] = Field(
        default_factory=TextFormat
    )
    verbosity: Literal["low", "medium", "high"] = "medium"
