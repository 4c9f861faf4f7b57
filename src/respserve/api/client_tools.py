"""OpenAI's client-executed tools (`local_shell`, `shell`, `apply_patch`): how they look to the model, the
call items its calls become, and how those calls and their outputs read in a later prompt.

The model sees each as a function with a small JSON schema; respserve runs nothing: the call item is the
answer, and the client sends back `*_call_output` items with what happened.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from respserve.engine.generation import ToolSpec
from respserve.protocol.ids import new_id
from respserve.protocol.items import (
    ApplyPatchCallItem,
    ClientCallItem,
    ClientToolCallInput,
    ClientToolOutputInput,
    LocalShellCallItem,
    ShellCallItem,
)

ClientToolType = Literal["local_shell", "shell", "apply_patch"]
_STRINGS = {"type": "array", "items": {"type": "string"}, "minItems": 1}
_TIMEOUT = {"type": "integer", "minimum": 1}

SPECS: dict[ClientToolType, ToolSpec] = {
    "local_shell": ToolSpec(
        name="local_shell",
        description="Run a command on the user's machine; the command is an argv list.",
        parameters={
            "type": "object",
            "properties": {"command": _STRINGS, "working_directory": {"type": "string"}, "timeout_ms": _TIMEOUT},
            "required": ["command"],
        },
    ),
    "shell": ToolSpec(
        name="shell",
        description="Run shell commands on the user's machine, one after the other.",
        parameters={
            "type": "object",
            "properties": {
                "commands": _STRINGS,
                "timeout_ms": _TIMEOUT,
            },
            "required": ["commands"],
        },
    ),
    "apply_patch": ToolSpec(
        name="apply_patch",
        description="Create, update or delete one file (`diff`: the new file, or a diff for update_file).",
        parameters={
            "type": "object",
            "properties": {
                "type": {"enum": ["create_file", "update_file", "delete_file"]},
                "path": {"type": "string"},
                "diff": {"type": "string"},
            },
            "required": ["type", "path"],
        },
    ),
}


def new_call(kind: ClientToolType) -> ClientCallItem:
    """The item a call starts as, before its arguments are known (`complete_call` fills it)."""
    ids = {"call_id": new_id("call"), "status": "in_progress"}
    if kind == "local_shell":
        return LocalShellCallItem(id=new_id("lsh"), action={"type": "exec", "command": [], "env": {}}, **ids)
    if kind == "shell":
        return ShellCallItem(id=new_id("sh"), action={"commands": []}, **ids)
    return ApplyPatchCallItem(id=new_id("apc"), operation={}, **ids)


def complete_call(call: ClientCallItem, arguments: str, finished: bool) -> None:
    """Fills the call from the arguments the model wrote (what it wrote, even if it is not quite right: the
    client is the judge of a command)."""
    try:
        args: dict[str, Any] = json.loads(arguments)
    except json.JSONDecodeError:
        args = {}
    args = args if isinstance(args, dict) else {}
    if isinstance(call, LocalShellCallItem):
        command = args.get("command")
        call.action = {
            "type": "exec",
            "command": command if isinstance(command, list) else [str(command)] if command else [],
            "env": {},
            "timeout_ms": args.get("timeout_ms"),
            "working_directory": args.get("working_directory"),
            "user": None,
        }
    elif isinstance(call, ShellCallItem):
        commands = args.get("commands")
        call.action = {
            "commands": commands if isinstance(commands, list) else [],
            "timeout_ms": args.get("timeout_ms"),
            "max_output_length": None,
        }
    else:
        operation = {"type": args.get("type", "update_file"), "path": args.get("path", "")}
        if operation["type"] != "delete_file":
            operation["diff"] = args.get("diff", "")
        call.operation = operation
    call.status = "completed" if finished or isinstance(call, ApplyPatchCallItem) else "incomplete"


def call_arguments(item: ClientToolCallInput) -> tuple[str, str]:
    """(tool name, JSON arguments) of a call sent back: how the prompt shows it, as the model wrote it."""
    if item.type == "apply_patch_call":
        return "apply_patch", json.dumps(item.operation or {})
    action = item.action or {}
    if item.type == "shell_call":
        return "shell", json.dumps({"commands": action.get("commands", [])})
    return "local_shell", json.dumps({"command": action.get("command", [])})


def output_text(item: ClientToolOutputInput) -> str:
    """What a client's run gave, as the tool turn of a later prompt reads it."""
    if isinstance(item.output, list):  # shell_call_output: stdout, stderr and outcome per command
        parts = []
        for chunk in item.output:
            outcome = chunk.get("outcome") or {}
            ending = f"exit code {outcome.get('exit_code')}" if outcome.get("type") == "exit" else "timed out"
            parts.append("\n".join(filter(None, [chunk.get("stdout"), chunk.get("stderr"), f"({ending})"])))
        return "\n\n".join(parts)
    if item.output is None:
        return item.status or ""
    return item.output


def output_call_id(item: ClientToolOutputInput) -> str:
    return item.call_id or item.id or ""
