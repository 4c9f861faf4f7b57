"""Tool definitions and `tool_choice`, as sent in a request and echoed on the resource."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

from respserve.protocol.content import WireModel
from respserve.protocol.input_image_mask import InputImageMask


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
    action: Literal["generate", "edit", "auto"] | None = None  # auto: edit when the input has an image
    input_image_mask: InputImageMask | None = None

    @model_serializer(mode="wrap")
    def _set_fields_only(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Echoed as sent: OpenAI's schema has no nulls for the options a request left out.
        return {key: value for key, value in handler(self).items() if value is not None}


UnservedToolType = Literal[
    "web_search",
    "web_search_2025_08_26",
    "web_search_preview",
    "web_search_preview_2025_03_11",
    "file_search",
    "code_interpreter",
    "computer",
    "computer_use_preview",
    "tool_search",
    "programmatic_tool_calling",
]


class UnservedTool(WireModel):
    """A tool type of OpenAI's `Tool` union that this server has no backend for yet: the request is served,
    the tool is echoed as sent but not offered to the model, and the response says so (a header)."""

    model_config = ConfigDict(extra="allow")
    type: UnservedToolType


class CustomTextFormat(WireModel):
    type: Literal["text"] = "text"


class CustomGrammarFormat(WireModel):
    type: Literal["grammar"] = "grammar"
    syntax: Literal["lark", "regex"]
    definition: str = Field(min_length=1)


class CustomTool(WireModel):
    """A tool whose input is free text (`format` text, the default) or text a grammar allows. Its call is a
    `custom_tool_call` item carrying `input`; when forced by `tool_choice`, the grammar constrains decoding."""

    type: Literal["custom"] = "custom"
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_\-]+$")
    description: str | None = None
    format: Annotated[CustomTextFormat | CustomGrammarFormat, Field(discriminator="type")] | None = None

    @model_serializer(mode="wrap")
    def _set_fields_only(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {key: value for key, value in handler(self).items() if value is not None}


class McpToolFilter(WireModel):
    tool_names: list[str] | None = None
    read_only: bool | None = None


class McpApprovalFilter(WireModel):
    always: McpToolFilter | None = None
    never: McpToolFilter | None = None


class McpTool(WireModel):
    """A remote MCP server (streamable HTTP) whose tools respserve lists, offers to the model as
    `server_label.tool`, and calls itself. As at OpenAI, a call needs approval unless `require_approval`
    says `never` for it."""

    type: Literal["mcp"] = "mcp"
    server_label: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_\-]+$")
    server_url: str = Field(pattern=r"^https?://")
    server_description: str | None = None
    headers: dict[str, str] | None = None  # sent to the server (auth); never echoed
    allowed_tools: list[str] | McpToolFilter | None = None
    require_approval: Literal["always", "never"] | McpApprovalFilter | None = None

    def allows(self, tool: str) -> bool:
        allowed = self.allowed_tools
        names = allowed.tool_names if isinstance(allowed, McpToolFilter) else allowed
        return names is None or tool in names

    def needs_approval(self, tool: str) -> bool:
        policy = self.require_approval
        if policy is None or isinstance(policy, str):
            return policy != "never"
        if policy.never is not None and tool in (policy.never.tool_names or []):
            return False
        if policy.always is not None:
            return tool in (policy.always.tool_names or [])
        return policy.never is None  # only `never` given: the tools it does not name need approval

    @model_serializer(mode="wrap")
    def _echo_without_secrets(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = {key: value for key, value in handler(self).items() if value is not None}
        data.pop("headers", None)
        return data


def qualified_name(namespace: str | None, name: str) -> str:
    """The name a function of a namespace is offered to the model under (and read back from its calls)."""
    return f"{namespace}.{name}" if namespace else name


class ClientTool(WireModel):
    """OpenAI's client-executed tools: the model's call becomes a `local_shell_call`, `shell_call` or
    `apply_patch_call` item for the client to run, and its result comes back as the matching output item."""

    model_config = ConfigDict(extra="allow")
    type: Literal["local_shell", "shell", "apply_patch"]


NamespaceMember = Annotated[FunctionTool | CustomTool, Field(discriminator="type")]


class NamespaceTool(WireModel):
    """Function tools grouped under a name (Codex sends its sub-agent tools so). Each is offered to the model
    as `namespace.name`; its calls come back carrying `namespace` and the inner `name`, as OpenAI's do."""

    type: Literal["namespace"] = "namespace"
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_\-]+$")
    description: str | None = None
    tools: list[NamespaceMember] = Field(min_length=1)

    @model_serializer(mode="wrap")
    def _members_as_sent(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # OpenAI's schema types a member's `strict` and `description` as optional, not nullable.
        data = handler(self)
        data["tools"] = [{key: value for key, value in member.items() if value is not None} for member in data["tools"]]
        return data


Tool = Annotated[
    FunctionTool | CustomTool | ImageGenerationTool | NamespaceTool | McpTool | ClientTool | UnservedTool,
    Field(discriminator="type"),
]


class FunctionToolChoice(WireModel):
    type: Literal["function"] = "function"
    name: str


class CustomToolChoice(WireModel):
    type: Literal["custom"] = "custom"
    name: str


class McpToolChoice(WireModel):
    """Forces a call to an MCP server's tool (`name`), or to any of its tools."""

    type: Literal["mcp"] = "mcp"
    server_label: str
    name: str | None = None


class ClientToolChoice(WireModel):
    """Forces the `shell` or `apply_patch` tool."""

    type: Literal["shell", "apply_patch"]


class HostedToolChoice(WireModel):
    """Forces a hosted tool: here, `{"type": "image_generation"}`."""

    type: Literal["image_generation"] = "image_generation"


class UnservedToolChoice(WireModel):
    """Forces a tool type this server has no backend for: refused with a 400 that names it."""

    model_config = ConfigDict(extra="allow")
    type: Literal[
        "file_search",
        "web_search_preview",
        "web_search_preview_2025_03_11",
        "computer",
        "computer_use",
        "computer_use_preview",
        "code_interpreter",
        "programmatic_tool_calling",
    ]


class AllowedToolRef(WireModel):
    type: Literal["function"] = "function"
    name: str


class AllowedToolsChoice(WireModel):
    type: Literal["allowed_tools"] = "allowed_tools"
    mode: Literal["none", "auto", "required"] = "auto"
    tools: list[AllowedToolRef]


ToolChoice = (
    Literal["none", "auto", "required"]
    | Annotated[
        FunctionToolChoice
        | CustomToolChoice
        | McpToolChoice
        | ClientToolChoice
        | HostedToolChoice
        | AllowedToolsChoice
        | UnservedToolChoice,
        Field(discriminator="type"),
    ]
)
