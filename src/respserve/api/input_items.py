"""Input items as they are stored and listed: each with an id and its content as a list of parts.

Stored items (a response's input and output, a conversation's items) come back into a request's context
by being parsed again as `InputItem`s.
"""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter

from respserve.protocol.ids import new_id
from respserve.protocol.items import (
    AssistantInputMessage,
    FunctionCallInput,
    FunctionCallOutputInput,
    ImageGenerationCall,
    InputItem,
)

_ITEMS = TypeAdapter(list[InputItem])
# The id an item sent without one is stored under, by type (messages and function calls are handled apart).
_ID_PREFIXES = {
    "reasoning": "rs",
    "custom_tool_call": "ctc",
    "custom_tool_call_output": "ctco",
    "local_shell_call": "lsh",
    "local_shell_call_output": "lsho",
    "shell_call": "sh",
    "shell_call_output": "sho",
    "apply_patch_call": "apc",
    "apply_patch_call_output": "apco",
    "mcp_list_tools": "mcpl",
    "mcp_call": "mcp",
    "mcp_approval_request": "mcpr",
    "mcp_approval_response": "mcpa",
}


def stored_input_items(request_input: str | list[Any]) -> list[dict[str, Any]]:
    """The request's `input`, normalised to wire items with ids, as `input_items` lists them."""
    if isinstance(request_input, str):
        return [_message("user", [{"type": "input_text", "text": request_input}])]
    stored = []
    for item in request_input:
        data = item.model_dump(mode="json", exclude_none=True)
        if item.type in _ID_PREFIXES:
            stored.append({**data, "id": item.id or new_id(_ID_PREFIXES[item.type])})
            continue
        if isinstance(item, ImageGenerationCall):
            stored.append(data)
            continue
        if isinstance(item, FunctionCallInput | FunctionCallOutputInput):
            prefix = "fc" if isinstance(item, FunctionCallInput) else "fco"
            stored.append({**data, "id": item.id or new_id(prefix), "status": item.status or "completed"})
            continue
        if isinstance(data["content"], str):
            part_type = "output_text" if isinstance(item, AssistantInputMessage) else "input_text"
            data["content"] = [{"type": part_type, "text": data["content"]}]
        for part in data["content"]:
            if part["type"] == "output_text":
                part.setdefault("annotations", [])
        stored.append(_message(data["role"], data["content"], data.get("id")))
    return stored


def _message(role: str, content: list[dict[str, Any]], item_id: str | None = None) -> dict[str, Any]:
    return {"type": "message", "id": item_id or new_id("msg"), "status": "completed", "role": role, "content": content}


def context_items(stored: list[dict[str, Any]]) -> list[InputItem]:
    """Stored items (earlier inputs and outputs) parsed back into input items for a new prompt."""
    return _ITEMS.validate_python(stored)
