"""What a request's `tools` and `tool_choice` mean for one generation: which functions the prompt offers,
the grammar that forces a call, and the parser that reads calls out of the output."""

from __future__ import annotations

from dataclasses import dataclass
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
from respserve.protocol.tools import AllowedToolsChoice, FunctionTool, FunctionToolChoice

ToolParserName = Literal["hermes", "json"]
_ANY_OBJECT: dict[str, Any] = {"type": "object"}


@dataclass(frozen=True)
class ToolPlan:
    tools: list[ToolSpec]  # offered in the prompt
    grammar: str | None  # set when a call is forced (`required`, or a named function)
    parser: OutputParser

    @classmethod
    def none(cls) -> ToolPlan:
        return cls(tools=[], grammar=None, parser=OutputParser())


def plan_tools(body: CreateResponseRequest, grammars: GrammarCompiler, parser_name: ToolParserName) -> ToolPlan:
    # Hosted tools (image_generation) are not offered to the text model: a forced one never gets here.
    tools = [tool for tool in body.tools or [] if isinstance(tool, FunctionTool)]
    choice = body.tool_choice or "auto"
    if isinstance(choice, AllowedToolsChoice):
        tools = _allowed(tools, choice)
        choice = choice.mode
    if not tools or choice == "none":
        return ToolPlan.none()
    specs = [ToolSpec(name=tool.name, description=tool.description, parameters=_parameters(tool)) for tool in tools]
    if isinstance(choice, FunctionToolChoice):
        spec = next((spec for spec in specs if spec.name == choice.name), None)
        if spec is None:
            raise InvalidRequestError(
                f"tool_choice names the function '{choice.name}', which is not in 'tools'.", param="tool_choice.name"
            )
        # Forced: the output is exactly this function's arguments, streamed as argument deltas.
        index = (body.tools or []).index(_tool(tools, spec.name))
        grammar = _compile(grammars, spec.parameters, f"tools[{index}].parameters")
        return ToolPlan(tools=[spec], grammar=grammar, parser=ForcedArgumentsParser(spec.name))
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
        return ToolPlan(tools=specs, grammar=_compile(grammars, schema, "tools"), parser=JsonToolParser())
    parser = JsonToolParser() if parser_name == "json" else HermesToolParser()
    return ToolPlan(tools=specs, grammar=None, parser=parser)


def _parameters(tool: FunctionTool) -> dict[str, Any]:
    return tool.parameters if tool.parameters else dict(_ANY_OBJECT)


def _tool(tools: list[FunctionTool], name: str) -> FunctionTool:
    return next(tool for tool in tools if tool.name == name)


def _allowed(tools: list[FunctionTool], choice: AllowedToolsChoice) -> list[FunctionTool]:
    names = {tool.name for tool in tools}
    for index, ref in enumerate(choice.tools):
        if ref.name not in names:
            raise InvalidRequestError(
                f"allowed_tools names the function '{ref.name}', which is not in 'tools'.",
                param=f"tool_choice.tools[{index}].name",
            )
    allowed = {ref.name for ref in choice.tools}
    return [tool for tool in tools if tool.name in allowed]


def _compile(grammars: GrammarCompiler, schema: dict[str, Any], param: str) -> str:
    try:
        return grammars.json_schema(schema)
    except InvalidGrammar as exc:
        raise InvalidRequestError(f"Invalid JSON schema in '{param}': {exc}", param=param) from exc
