"""What a request's `tools` and `tool_choice` mean for one generation: which tools the prompt offers,
the grammar that forces a call, and the parser that reads calls out of the output.

Functions and custom tools are offered to the model alike (a custom tool as a function of one string,
`input`); tools of a `namespace` as `namespace.name`. A custom tool forced by `tool_choice` is decoded
under its grammar, and the output is its input itself. Tool types this server has no backend for (hosted
search, MCP, shells...) are left out of the prompt (`unserved_tools`); a `tool_choice` that forces one is a
400.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from respserve.api import client_tools
from respserve.api.errors import InvalidRequestError
from respserve.api.output_parsers import (
    ForcedArgumentsParser,
    HermesToolParser,
    JsonToolParser,
    OutputParser,
)
from respserve.engine.generation import ToolSpec
from respserve.engine.structured_output import GrammarCompiler, InvalidGrammar
from respserve.protocol.request import CreateResponseRequest
from respserve.protocol.tools import (
    AllowedToolsChoice,
    ClientTool,
    ClientToolChoice,
    CustomGrammarFormat,
    CustomTool,
    CustomToolChoice,
    FunctionTool,
    FunctionToolChoice,
    McpTool,
    McpToolChoice,
    NamespaceTool,
    UnservedTool,
    UnservedToolChoice,
    qualified_name,
)

ToolParserName = Literal["hermes", "json"]
UNSERVED_TOOLS_HEADER = "X-Respserve-Unserved-Tools"
_ANY_OBJECT: dict[str, Any] = {"type": "object"}
# How a custom tool looks to a model that calls tools by JSON: a function of one string.
_CUSTOM_INPUT: dict[str, Any] = {
    "type": "object",
    "properties": {"input": {"type": "string"}},
    "required": ["input"],
    "additionalProperties": False,
}


@dataclass(frozen=True)
class CallTarget:
    """What a call the model writes under an offered name is, on the wire."""

    name: str
    namespace: str | None = None
    # function_call, custom_tool_call, mcp_call, or the call item of a client-executed tool
    kind: Literal["function", "custom", "mcp", "local_shell", "shell", "apply_patch"] = "function"
    server_label: str | None = None  # an MCP tool's server
    needs_approval: bool = False  # an MCP tool whose call waits for the caller's approval


@dataclass(frozen=True)
class OfferedTool:
    spec: ToolSpec  # as the prompt shows it (a namespaced tool under its qualified name)
    target: CallTarget
    param: str  # where it sits in the request, for errors
    tool: FunctionTool | CustomTool | ClientTool | None  # None for an MCP server's tool


@dataclass(frozen=True)
class ToolPlan:
    tools: list[ToolSpec]  # offered in the prompt
    grammar: str | None  # set when a call is forced (`required`, or a named tool)
    parser: OutputParser
    targets: dict[str, CallTarget] = field(default_factory=dict)  # by the name the prompt offers
    raw_input: bool = False  # a forced custom tool: the output is its input, not JSON arguments

    @classmethod
    def none(cls) -> ToolPlan:
        return cls(tools=[], grammar=None, parser=OutputParser())


def unserved_tools(body: CreateResponseRequest) -> list[str]:
    """The types of the request's tools that are not offered to the model, in request order, once each."""
    types: list[str] = []
    for tool in body.tools or []:
        members = tool.tools if isinstance(tool, NamespaceTool) else [tool]
        types.extend(member.type for member in members if isinstance(member, UnservedTool))
    return list(dict.fromkeys(types))


def plan_tools(
    body: CreateResponseRequest,
    grammars: GrammarCompiler,
    parser_name: ToolParserName,
    mcp_tools: dict[str, list[dict[str, Any]]] | None = None,
) -> ToolPlan:
    """`mcp_tools`: each MCP server's listed tools, by server label (listing is the caller's, async, work)."""
    # Hosted tools (image_generation) are not offered to the text model: a forced one never gets here.
    offered = _offered_tools(body) + _mcp_offered(body, mcp_tools or {})
    choice = body.tool_choice or "auto"
    if isinstance(choice, UnservedToolChoice):
        raise InvalidRequestError(
            f"tool_choice forces a '{choice.type}' tool, which this server has no backend for.",
            param="tool_choice.type",
        )
    if isinstance(choice, AllowedToolsChoice):
        offered = _allowed(offered, choice)
        choice = choice.mode
    if not offered or choice == "none":
        return ToolPlan.none()
    targets = {tool.spec.name: tool.target for tool in offered}
    if isinstance(choice, McpToolChoice):  # any tool of that server (or the one named): a required call
        offered = [t for t in offered if t.target.server_label == choice.server_label]
        offered = [t for t in offered if choice.name in (None, t.target.name)]
        if not offered:
            raise InvalidRequestError(
                f"tool_choice names an MCP tool that server '{choice.server_label}' does not offer.",
                param="tool_choice",
            )
        choice = "required"
    if isinstance(choice, ClientToolChoice):
        choice = FunctionToolChoice(name=choice.type)  # offered under its type's name
    if isinstance(choice, FunctionToolChoice | CustomToolChoice):
        return _forced(offered, choice, grammars, targets)
    specs = [tool.spec for tool in offered]
    if choice == "required":
        one_of = [
            {
                "type": "object",
                "properties": {"name": {"const": tool.spec.name}, "arguments": _grammar_schema(tool)},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for tool in offered
        ]
        schema = one_of[0] if len(one_of) == 1 else {"anyOf": one_of}
        grammar = _compile(grammars, schema, "tools")
        return ToolPlan(tools=specs, grammar=grammar, parser=JsonToolParser(), targets=targets)
    parser = JsonToolParser() if parser_name == "json" else HermesToolParser()
    return ToolPlan(tools=specs, grammar=None, parser=parser, targets=targets)


def _forced(
    offered: list[OfferedTool],
    choice: FunctionToolChoice | CustomToolChoice,
    grammars: GrammarCompiler,
    targets: dict[str, CallTarget],
) -> ToolPlan:
    """One named tool, forced: the output is its arguments (a function) or its input (a custom tool),
    streamed as deltas of the call."""
    kind = (FunctionTool, ClientTool) if isinstance(choice, FunctionToolChoice) else CustomTool
    tool = next((t for t in offered if isinstance(t.tool, kind) and choice.name in (t.target.name, t.spec.name)), None)
    if tool is None:
        raise InvalidRequestError(
            f"tool_choice names the {choice.type} tool '{choice.name}', which is not in 'tools'.",
            param="tool_choice.name",
        )
    parser = ForcedArgumentsParser(tool.spec.name)
    if isinstance(tool.tool, FunctionTool | ClientTool):
        grammar = _compile(grammars, _grammar_schema(tool), f"{tool.param}.parameters")
        return ToolPlan(tools=[tool.spec], grammar=grammar, parser=parser, targets=targets)
    text_format = tool.tool.format
    grammar = None
    if isinstance(text_format, CustomGrammarFormat):
        param = f"{tool.param}.format.definition"
        try:
            grammar = grammars.text_grammar(text_format.syntax, text_format.definition)
        except InvalidGrammar as exc:
            raise InvalidRequestError(f"Invalid {text_format.syntax} grammar in '{param}': {exc}", param=param) from exc
    return ToolPlan(tools=[tool.spec], grammar=grammar, parser=parser, targets=targets, raw_input=True)


def _offered_tools(body: CreateResponseRequest) -> list[OfferedTool]:
    """Every tool the model may call: top-level ones, and those inside namespaces, in request order."""
    offered = []
    for index, tool in enumerate(body.tools or []):
        if isinstance(tool, FunctionTool | CustomTool):
            offered.append(_offered(tool, None, f"tools[{index}]"))
        elif isinstance(tool, ClientTool):
            target = CallTarget(name=tool.type, kind=tool.type)
            offered.append(
                OfferedTool(spec=client_tools.SPECS[tool.type], target=target, param=f"tools[{index}]", tool=tool)
            )
        elif isinstance(tool, NamespaceTool):
            offered.extend(
                _offered(member, tool, f"tools[{index}].tools[{inner}]") for inner, member in enumerate(tool.tools)
            )
    return offered


def _offered(tool: FunctionTool | CustomTool, namespace: NamespaceTool | None, param: str) -> OfferedTool:
    description = tool.description
    if namespace is not None and namespace.description:
        description = f"{namespace.description} {description or ''}".strip()
    namespace_name = namespace.name if namespace else None
    parameters = dict(_CUSTOM_INPUT) if isinstance(tool, CustomTool) else tool.parameters or dict(_ANY_OBJECT)
    spec = ToolSpec(name=qualified_name(namespace_name, tool.name), description=description, parameters=parameters)
    kind: Literal["function", "custom"] = "custom" if isinstance(tool, CustomTool) else "function"
    target = CallTarget(name=tool.name, namespace=namespace_name, kind=kind)
    return OfferedTool(spec=spec, target=target, param=param, tool=tool)


def _mcp_offered(body: CreateResponseRequest, listings: dict[str, list[dict[str, Any]]]) -> list[OfferedTool]:
    """The tools each MCP server listed (those `allowed_tools` lets through), as `server_label.tool`."""
    offered = []
    for index, server in enumerate(body.tools or []):
        if not isinstance(server, McpTool):
            continue
        for listed in listings.get(server.server_label, []):
            name = listed["name"]
            if not server.allows(name):
                continue
            description = " ".join(filter(None, [server.server_description, listed.get("description")])) or None
            spec = ToolSpec(
                name=qualified_name(server.server_label, name),
                description=description,
                parameters=listed.get("input_schema") or dict(_ANY_OBJECT),
            )
            target = CallTarget(
                name=name, kind="mcp", server_label=server.server_label, needs_approval=server.needs_approval(name)
            )
            offered.append(OfferedTool(spec=spec, target=target, param=f"tools[{index}]", tool=None))
    return offered


def _allowed(offered: list[OfferedTool], choice: AllowedToolsChoice) -> list[OfferedTool]:
    names = {t.target.name for t in offered} | {t.spec.name for t in offered}
    for index, ref in enumerate(choice.tools):
        if ref.name not in names:
            raise InvalidRequestError(
                f"allowed_tools names the function '{ref.name}', which is not in 'tools'.",
                param=f"tool_choice.tools[{index}].name",
            )
    allowed = {ref.name for ref in choice.tools}
    return [t for t in offered if t.target.name in allowed or t.spec.name in allowed]


def _grammar_schema(tool: OfferedTool) -> dict[str, Any]:
    """The arguments' schema a forced call is decoded under. As OpenAI does unless `strict` is false, objects
    that list their properties take no others: left open, a grammar lets a small model add keys forever."""
    if isinstance(tool.tool, FunctionTool) and tool.tool.strict is False:
        return tool.spec.parameters
    return _closed(tool.spec.parameters)


def _closed(schema: Any) -> Any:
    """`schema` with `additionalProperties: false` on every object that lists properties and says nothing."""
    if not isinstance(schema, dict):
        return schema
    closed = dict(schema)
    for key in ("properties", "$defs", "definitions", "patternProperties"):
        if isinstance(schema.get(key), dict):
            closed[key] = {name: _closed(sub) for name, sub in schema[key].items()}
    for key in ("items", "not", "additionalProperties", "contains"):
        if isinstance(schema.get(key), dict):
            closed[key] = _closed(schema[key])
    for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
        if isinstance(schema.get(key), list):
            closed[key] = [_closed(sub) for sub in schema[key]]
    if "properties" in schema and "additionalProperties" not in schema:
        closed["additionalProperties"] = False
    return closed


def _compile(grammars: GrammarCompiler, schema: dict[str, Any], param: str) -> str:
    try:
        return grammars.json_schema(schema)
    except InvalidGrammar as exc:
        raise InvalidRequestError(f"Invalid JSON schema in '{param}': {exc}", param=param) from exc
