"""Conversation items: what a request's `input` holds and what a response's `output` holds."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, SerializerFunctionWrapHandler, Tag, model_serializer

from respserve.protocol.content import AssistantContent, InputContent, OutputContent, ReasoningText, WireModel

MessageStatus = Literal["in_progress", "completed", "incomplete"]


class InputMessage(WireModel):
    """A user, system or developer message; `type` may be omitted (the SDK's EasyInputMessage)."""

    type: Literal["message"] = "message"
    id: str | None = None
    role: Literal["user", "system", "developer"]
    content: str | list[InputContent]
    status: MessageStatus | None = None


class AssistantInputMessage(WireModel):
    """An earlier assistant turn sent back as input."""

    type: Literal["message"] = "message"
    id: str | None = None
    role: Literal["assistant"]
    content: str | list[AssistantContent]
    status: MessageStatus | None = None


class FunctionCallInput(WireModel):
    """A function call the model made earlier, sent back as input."""

    type: Literal["function_call"] = "function_call"
    id: str | None = None
    call_id: str
    namespace: str | None = None
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"] | None = None


class FunctionCallOutputInput(WireModel):
    """What the caller's function returned for `call_id`."""

    type: Literal["function_call_output"] = "function_call_output"
    id: str | None = None
    call_id: str
    output: str | list[InputContent]
    status: Literal["in_progress", "completed", "incomplete"] | None = None


class CustomToolCallInput(WireModel):
    """A custom tool call the model made earlier, sent back as input."""

    type: Literal["custom_tool_call"] = "custom_tool_call"
    id: str | None = None
    call_id: str
    namespace: str | None = None
    name: str
    input: str


class CustomToolCallOutputInput(WireModel):
    """What the caller's custom tool returned for `call_id`."""

    type: Literal["custom_tool_call_output"] = "custom_tool_call_output"
    id: str | None = None
    call_id: str
    output: str | list[InputContent]


class McpListToolsInput(WireModel):
    """The tools an MCP server listed, as an earlier response gave them: reused rather than listed again."""

    type: Literal["mcp_list_tools"] = "mcp_list_tools"
    id: str | None = None
    server_label: str
    tools: list[dict[str, Any]]
    error: str | None = None


class McpCallInput(WireModel):
    """An MCP call respserve ran earlier, with its output: rendered as a tool call and its result."""

    type: Literal["mcp_call"] = "mcp_call"
    id: str | None = None
    server_label: str
    name: str
    arguments: str
    output: str | None = None
    error: Any = None
    status: str | None = None
    approval_request_id: str | None = None


class McpApprovalRequestInput(WireModel):
    type: Literal["mcp_approval_request"] = "mcp_approval_request"
    id: str
    server_label: str
    name: str
    arguments: str


class McpApprovalResponseInput(WireModel):
    """The caller's answer to an `mcp_approval_request`: approved, the call runs before the model goes on."""

    type: Literal["mcp_approval_response"] = "mcp_approval_response"
    id: str | None = None
    approval_request_id: str
    approve: bool
    reason: str | None = None


class ClientToolCallInput(WireModel):
    """A `local_shell_call`, `shell_call` or `apply_patch_call` the model made earlier, sent back."""

    model_config = ConfigDict(extra="allow")
    type: Literal["local_shell_call", "shell_call", "apply_patch_call"]
    id: str | None = None
    call_id: str
    action: dict[str, Any] | None = None  # local_shell_call, shell_call
    operation: dict[str, Any] | None = None  # apply_patch_call
    status: str | None = None


class ClientToolOutputInput(WireModel):
    """What the client's shell or patch run gave: text (local shell, apply_patch) or shell output chunks."""

    model_config = ConfigDict(extra="allow")
    type: Literal["local_shell_call_output", "shell_call_output", "apply_patch_call_output"]
    id: str | None = None
    call_id: str | None = None  # local_shell_call_output names its call by `id`
    output: str | list[dict[str, Any]] | None = None
    status: str | None = None


class ReasoningInput(WireModel):
    """Earlier reasoning sent back (the Agents SDK does): accepted, and left out of the prompt, as chat
    templates drop the thoughts of earlier turns."""

    type: Literal["reasoning"] = "reasoning"
    id: str | None = None
    summary: list[dict[str, Any]] = Field(default_factory=list)
    content: list[dict[str, Any]] | None = None
    encrypted_content: str | None = None


class ImageGenerationCall(WireModel):
    """OpenAI's `image_generation` tool at work: the image (base64) in `result`. Output, and accepted back as
    input (left out of a text model's prompt)."""

    type: Literal["image_generation_call"] = "image_generation_call"
    id: str
    status: Literal["in_progress", "generating", "completed", "failed"]
    result: str | None = None
    revised_prompt: str | None = None
    output_format: Literal["png", "jpeg", "webp"] | None = None
    size: str | None = None


def _item_tag(value: Any) -> str | None:
    """Messages are told apart by role, other items by type; a missing type means a message."""
    get = value.get if isinstance(value, dict) else lambda key, default=None: getattr(value, key, default)
    item_type = get("type", "message")
    if item_type == "message":
        return "message:assistant" if get("role") == "assistant" else "message:input"
    return item_type


InputItem = Annotated[
    Annotated[InputMessage, Tag("message:input")]
    | Annotated[AssistantInputMessage, Tag("message:assistant")]
    | Annotated[FunctionCallInput, Tag("function_call")]
    | Annotated[FunctionCallOutputInput, Tag("function_call_output")]
    | Annotated[CustomToolCallInput, Tag("custom_tool_call")]
    | Annotated[CustomToolCallOutputInput, Tag("custom_tool_call_output")]
    | Annotated[ClientToolCallInput, Tag("local_shell_call")]
    | Annotated[ClientToolCallInput, Tag("shell_call")]
    | Annotated[ClientToolCallInput, Tag("apply_patch_call")]
    | Annotated[ClientToolOutputInput, Tag("local_shell_call_output")]
    | Annotated[ClientToolOutputInput, Tag("shell_call_output")]
    | Annotated[ClientToolOutputInput, Tag("apply_patch_call_output")]
    | Annotated[McpListToolsInput, Tag("mcp_list_tools")]
    | Annotated[McpCallInput, Tag("mcp_call")]
    | Annotated[McpApprovalRequestInput, Tag("mcp_approval_request")]
    | Annotated[McpApprovalResponseInput, Tag("mcp_approval_response")]
    | Annotated[ReasoningInput, Tag("reasoning")]
    | Annotated[ImageGenerationCall, Tag("image_generation_call")],
    Discriminator(_item_tag, custom_error_type="invalid_item", custom_error_message="unsupported input item"),
]


class OutputMessage(BaseModel):
    type: Literal["message"] = "message"
    id: str
    status: MessageStatus
    role: Literal["assistant"] = "assistant"
    content: list[OutputContent] = Field(default_factory=list)


class _OptionalKeys(BaseModel):
    """An output item with keys OpenAI's schema makes optional but not nullable: left out while None."""

    _optional: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _without_unset_optionals(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        for key in self._optional:
            if data.get(key) is None:
                data.pop(key, None)
        return data


class FunctionCallItem(_OptionalKeys):
    _optional = ("namespace",)
    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    namespace: str | None = None  # set for a function of a `namespace` tool
    name: str
    arguments: str
    status: MessageStatus


class CustomToolCallItem(_OptionalKeys):
    _optional = ("namespace",)
    type: Literal["custom_tool_call"] = "custom_tool_call"
    id: str
    call_id: str
    namespace: str | None = None
    name: str
    input: str
    status: MessageStatus


class McpListToolsItem(BaseModel):
    type: Literal["mcp_list_tools"] = "mcp_list_tools"
    id: str
    server_label: str
    tools: list[dict[str, Any]] = Field(default_factory=list)
    error: str | None = None


class McpCallItem(BaseModel):
    type: Literal["mcp_call"] = "mcp_call"
    id: str
    server_label: str
    name: str
    arguments: str
    output: str | None = None
    error: dict[str, Any] | None = None  # {"type": "tool_execution_error" | "protocol_error" | ..., "message"}
    status: Literal["in_progress", "completed", "incomplete", "calling", "failed"]
    approval_request_id: str | None = None

    def settle(self, output: str | None, error: str | None) -> None:
        """Records what running the call gave: its output, or the error that failed it."""
        self.output, self.status = output, "failed" if error else "completed"
        if error:
            self.error = {"type": "tool_execution_error", "message": error}


class McpApprovalRequestItem(BaseModel):
    type: Literal["mcp_approval_request"] = "mcp_approval_request"
    id: str
    server_label: str
    name: str
    arguments: str


class LocalShellCallItem(BaseModel):
    type: Literal["local_shell_call"] = "local_shell_call"
    id: str
    call_id: str
    action: dict[str, Any]  # {"type": "exec", "command": [...], "env": {}, "timeout_ms", "working_directory", "user"}
    status: MessageStatus


class ShellCallItem(BaseModel):
    type: Literal["shell_call"] = "shell_call"
    id: str
    call_id: str
    action: dict[str, Any]  # {"commands": [...], "timeout_ms", "max_output_length"}
    status: MessageStatus
    environment: dict[str, Any] | None = None


class ApplyPatchCallItem(BaseModel):
    type: Literal["apply_patch_call"] = "apply_patch_call"
    id: str
    call_id: str
    status: Literal["in_progress", "completed"]
    operation: dict[str, Any]  # {"type": "create_file" | "update_file" | "delete_file", "path", "diff"}


ClientCallItem = LocalShellCallItem | ShellCallItem | ApplyPatchCallItem


class ReasoningItem(_OptionalKeys):
    _optional = ("encrypted_content",)
    type: Literal["reasoning"] = "reasoning"
    id: str
    summary: list[dict[str, Any]] = Field(default_factory=list)
    content: list[ReasoningText] = Field(default_factory=list)
    encrypted_content: str | None = None  # only with include "reasoning.encrypted_content"


OutputItem = Annotated[
    OutputMessage
    | FunctionCallItem
    | CustomToolCallItem
    | McpListToolsItem
    | McpCallItem
    | McpApprovalRequestItem
    | LocalShellCallItem
    | ShellCallItem
    | ApplyPatchCallItem
    | ReasoningItem
    | ImageGenerationCall,
    Field(discriminator="type"),
]
