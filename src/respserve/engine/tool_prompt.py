"""How tools and tool turns reach a chat template.

A template that knows tools (it mentions `tools`, as Qwen's and Hermes' do) gets them natively. Others
(SmolLM2's) get the fallback: a system prompt listing the functions and asking for Hermes-style
`<tool_call>` blocks, earlier calls written as such blocks, and results as `<tool_response>` user turns.
"""

from __future__ import annotations

import json
from typing import Any

from respserve.engine.generation import ChatMessage, ToolSpec

FALLBACK_TOOL_PROMPT = """You can call functions to help answer. The functions, as JSON schemas:
<tools>
{tools}
</tools>
To call a function, reply with one block per call, and nothing else:
<tool_call>
{{"name": "<function name>", "arguments": <the arguments as a JSON object>}}
</tool_call>
Function results come back inside <tool_response></tool_response>. If no function is needed, answer normally."""


def template_knows_tools(chat_template: str | None) -> bool:
    return bool(chat_template) and "tools" in chat_template


def _schema(tool: ToolSpec) -> dict[str, Any]:
    return {"name": tool.name, "description": tool.description or "", "parameters": tool.parameters}


def native_tools(tools: list[ToolSpec]) -> list[dict[str, Any]]:
    return [{"type": "function", "function": _schema(tool)} for tool in tools]


def native_turn(message: ChatMessage) -> dict[str, Any]:
    turn: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        turn["tool_calls"] = [
            {
                "type": "function",
                "id": call.call_id,
                "function": {"name": call.name, "arguments": _args(call.arguments)},
            }
            for call in message.tool_calls
        ]
    if message.tool_call_id:
        turn["tool_call_id"] = message.tool_call_id
    return turn


def fallback_turns(messages: list[ChatMessage], tools: list[ToolSpec]) -> list[dict[str, str]]:
    """The conversation for a template without tool support."""
    turns: list[dict[str, str]] = []
    for message in messages:
        if message.role == "tool":
            turns.append({"role": "user", "content": f"<tool_response>\n{message.content}\n</tool_response>"})
            continue
        content = message.content
        for call in message.tool_calls:
            block = json.dumps({"name": call.name, "arguments": _args(call.arguments)})
            content += f"\n<tool_call>\n{block}\n</tool_call>" if content else f"<tool_call>\n{block}\n</tool_call>"
        turns.append({"role": message.role, "content": content})
    if tools:
        listing = "\n".join(json.dumps(_schema(tool)) for tool in tools)
        prompt = FALLBACK_TOOL_PROMPT.format(tools=listing)
        if turns and turns[0]["role"] == "system":
            turns[0] = {"role": "system", "content": f"{turns[0]['content']}\n\n{prompt}"}
        else:
            turns.insert(0, {"role": "system", "content": prompt})
    return turns


def _args(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments
