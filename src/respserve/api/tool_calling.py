"""What a request's `tools` and `tool_choice` mean for one generation: which functions the prompt offers,
the grammar that forces a call, and the parser that reads calls out of the output.

Functions of a `namespace` tool are offered as `namespace.name`. Tool types this server has no backend for
(hosted search, MCP, custom, shells...) are left out of the prompt and listed in `ToolPlan.unserved`; a
`tool_choice` that forces one is a 400.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

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
    FunctionTool,
    FunctionToolChoice,
    NamespaceTool,
    UnservedTool,
    UnservedToolChoice,
    qualified_name,
)

ToolParserName = Literal["hermes", "json"]
UNSERVED_TOOLS_HEADER = "X-Respserve-Unserved-Tools"
_ANY_OBJECT: dict[str, Any] = {"type": "object"}


@dataclass(frozen=True)
class OfferedFunction:
    spec: ToolSpec  # as the prompt shows it (a namespaced function under its qualified name)
    namespace: str | None
    name: str
    param: str  # where its parameters sit in the request, for errors


@dataclass(frozen=True)
class ToolPlan:
    tools: list[ToolSpec]  # offered in the prompt
    grammar: str | None  # set when a call is forced (`required`, or a named function)
    parser: OutputParser
    namespaced: dict[str, tuple[str, str]] = field(default_factory=dict)  # qualified name -> (namespace, name)

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


def plan_tools(body: CreateResponseRequest, grammars: GrammarCompiler, parser_name: ToolParserName) -> ToolPlan:
    # Hosted tools (image_generation) are not offered to the text model: a forced one never gets here.
    offered = _functions(body)
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
    specs = [function.spec for function in offered]
    namespaced = {f.spec.name: (f.namespace, f.name) for f in offered if f.namespace is not None}
    if isinstance(choice, FunctionToolChoice):
        function = next((f for f in offered if choice.name in (f.name, f.spec.name)), None)
        if function is None:
            raise InvalidRequestError(
                f"tool_choice names the function '{choice.name}', which is not in 'tools'.", param="tool_choice.name"
            )
        # Forced: the output is exactly this function's arguments, streamed as argument deltas.
        grammar = _compile(grammars, function.spec.parameters, function.param)
        parser = ForcedArgumentsParser(function.spec.name)
        return ToolPlan(tools=[function.spec], grammar=grammar, parser=parser, namespaced=namespaced)
    if choice == "required":
        one_of = [
            {
                "type": "object",
                "properties": {"name": {"const": spec.name}, "arguments": spec.parameters},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for spec in specs
        ]
        schema = one_of[0] if len(one_of) == 1 else {"anyOf": one_of}
        grammar = _compile(grammars, schema, "tools")
        return ToolPlan(tools=specs, grammar=grammar, parser=JsonToolParser(), namespaced=namespaced)
    parser = JsonToolParser() if parser_name == "json" else HermesToolParser()
    return ToolPlan(tools=specs, grammar=None, parser=parser, namespaced=namespaced)


def _functions(body: CreateResponseRequest) -> list[OfferedFunction]:
    """Every function the model may call: top-level ones, then those inside namespaces, in request order."""
    offered = []
    for index, tool in enumerate(body.tools or []):
        if isinstance(tool, FunctionTool):
            offered.append(_offered(tool, None, f"tools[{index}].parameters"))
        elif isinstance(tool, NamespaceTool):
            for inner, member in enumerate(tool.tools):
                if isinstance(member, FunctionTool):
                    offered.append(_offered(member, tool, f"tools[{index}].tools[{inner}].parameters"))
    return offered


def _offered(tool: FunctionTool, namespace: NamespaceTool | None, param: str) -> OfferedFunction:
    description = tool.description
    if namespace is not None and namespace.description:
        description = f"{namespace.description} {description or ''}".strip()
    name = qualified_name(namespace.name if namespace else None, tool.name)
    spec = ToolSpec(name=name, description=description, parameters=tool.parameters or dict(_ANY_OBJECT))
    return OfferedFunction(spec=spec, namespace=namespace.name if namespace else None, name=tool.name, param=param)


def _allowed(offered: list[OfferedFunction], choice: AllowedToolsChoice) -> list[OfferedFunction]:
    names = {f.name for f in offered} | {f.spec.name for f in offered}
    for index, ref in enumerate(choice.tools):
        if ref.name not in names:
            raise InvalidRequestError(
                f"allowed_tools names the function '{ref.name}', which is not in 'tools'.",
                param=f"tool_choice.tools[{index}].name",
            )
    allowed = {ref.name for ref in choice.tools}
    return [f for f in offered if f.name in allowed or f.spec.name in allowed]


def _compile(grammars: GrammarCompiler, schema: dict[str, Any], param: str) -> str:
    try:
        return grammars.json_schema(schema)
    except InvalidGrammar as exc:
        raise InvalidRequestError(f"Invalid JSON schema in '{param}': {exc}", param=param) from exc
