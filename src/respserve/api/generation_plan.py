"""From a validated request to what the worker runs: the stored context it continues, the prompt, the
sampling parameters, the grammar (structured output or a forced tool call) and the output parser."""

from __future__ import annotations

import asyncio
from typing import Any

from respserve.api.chat_messages import build_chat_messages
from respserve.api.errors import InvalidRequestError, NotFoundError
from respserve.api.image_inputs import ImageLimits
from respserve.api.input_items import context_items
from respserve.api.output_parsers import OutputParser, ReasoningParser
from respserve.api.state import AppState, ServedModel
from respserve.api.tool_calling import ToolParserName, ToolPlan, plan_tools
from respserve.engine.generation import ChatMessage, GenerationRequest, SamplingParams, ToolSpec
from respserve.engine.structured_output import GrammarCompiler, InvalidGrammar
from respserve.engine.text_pipeline import ContextLengthExceeded, TextPipeline
from respserve.engine.vision import VisionInputs
from respserve.protocol.ids import new_id
from respserve.protocol.items import InputItem
from respserve.protocol.request import CreateResponseRequest
from respserve.protocol.text_format import JsonObjectFormat, JsonSchemaFormat

LOGPROBS_INCLUDE = "message.output_text.logprobs"


async def stored_context_items(body: CreateResponseRequest, state: AppState, owner: str | None) -> list[InputItem]:
    """The earlier items a request continues from: its previous response's chain, or its conversation."""
    if body.previous_response_id:
        items = await state.store.chain_items(body.previous_response_id, owner)
        if items is None:
            raise NotFoundError(
                f"Previous response with id '{body.previous_response_id}' not found.",
                param="previous_response_id",
            )
        return context_items(items)
    if body.conversation_id:
        items = await state.store.all_conversation_items(body.conversation_id, owner)
        if items is None:
            raise NotFoundError(f"Conversation with id '{body.conversation_id}' not found.", param="conversation")
        return context_items(items)
    return []


async def plan_generation(
    body: CreateResponseRequest,
    context: list[InputItem],
    served: ServedModel,
    state: AppState,
    mcp_tools: dict[str, list[dict[str, Any]]] | None = None,
) -> tuple[GenerationRequest, ToolPlan]:
    pipeline = served.worker.pipeline
    images = ImageLimits.from_settings(state.settings) if pipeline.accepts_images else None
    plan, grammar, prompt, vision = await asyncio.to_thread(
        _prepare, body, context, served.name, images, pipeline, state.settings.tool_parser, mcp_tools
    )
    room = pipeline.context_length - len(prompt)
    # The server's cap applies to every request, whatever it asks for.
    max_tokens = min(body.max_output_tokens or state.settings.max_output_tokens, state.settings.max_output_tokens, room)
    sampling = SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k or 0,
        seed=body.seed,
        frequency_penalty=body.frequency_penalty or 0.0,
        presence_penalty=body.presence_penalty or 0.0,
        stop=tuple(body.stop_sequences),
        logit_bias=_logit_bias(body, pipeline.vocab_size),
        logprobs=(body.top_logprobs or 0) if LOGPROBS_INCLUDE in (body.include or []) else None,
        grammar=grammar,
    )
    return GenerationRequest(request_id=new_id("req"), prompt_token_ids=prompt, sampling=sampling, vision=vision), plan


def _prepare(
    body: CreateResponseRequest,
    context: list[InputItem],
    model_name: str,
    images: ImageLimits | None,
    pipeline: TextPipeline,
    tool_parser: ToolParserName,
    mcp_tools: dict[str, list[dict[str, Any]]] | None,
) -> tuple[ToolPlan, str | None, list[int], VisionInputs | None]:
    """The request's CPU work, in one trip off the event loop: decoding its images, compiling its schemas
    (the first time, the grammar tokenizer too) and rendering its prompt; (tool plan, grammar, prompt ids,
    image inputs)."""
    messages = build_chat_messages(body, context, model_name, images)
    plan = plan_tools(body, pipeline.grammars, tool_parser, mcp_tools)
    grammar = plan.grammar or _grammar(body, pipeline.grammars)
    prompt, vision = _render(pipeline, messages, plan.tools, body.truncation == "auto")
    return plan, grammar, prompt, vision


def _render(
    pipeline: TextPipeline, messages: list[ChatMessage], tools: list[ToolSpec], truncate: bool
) -> tuple[list[int], VisionInputs | None]:
    """The prompt's tokens (and its images' tensors, for a vision-language model). With `truncation:
    "auto"`, while it does not fit the context, the oldest turn that is not a system turn is dropped (with
    the tool results answering it), as OpenAI describes; the instructions and system/developer turns always
    stay, and so does the last turn."""
    while True:
        try:
            return pipeline.render(messages, tools)
        except ContextLengthExceeded as exc:
            dropped = _without_oldest_turn(messages) if truncate else None
            if dropped is None:
                raise InvalidRequestError(str(exc), param="input", code="context_length_exceeded") from exc
            messages = dropped


def _without_oldest_turn(messages: list[ChatMessage]) -> list[ChatMessage] | None:
    turns = [index for index, message in enumerate(messages) if message.role != "system"]
    if len(turns) < 2:
        return None
    oldest = messages[turns[0]]
    answered = {call.call_id for call in oldest.tool_calls}
    return [
        message
        for index, message in enumerate(messages)
        if index != turns[0] and not (message.role == "tool" and message.tool_call_id in answered)
    ]


def output_parser(plan: ToolPlan, generation: GenerationRequest, served: ServedModel, state: AppState) -> OutputParser:
    """The tool plan's parser, behind a reasoning parser for models that think first."""
    pipeline = served.worker.pipeline
    setting = state.settings.reasoning_parser
    thinks = setting == "think" or (setting == "auto" and pipeline.thinks)
    if not thinks or plan.grammar is not None:  # a forced call starts at once, without thoughts
        return plan.parser
    return ReasoningParser(plan.parser, starts_inside=pipeline.prompt_opens_thinking(generation.prompt_token_ids))


def _logit_bias(body: CreateResponseRequest, vocab_size: int) -> tuple[tuple[int, float], ...]:
    bias = tuple((int(token), value) for token, value in (body.logit_bias or {}).items())
    for token, _ in bias:
        if token >= vocab_size:
            raise InvalidRequestError(
                f"logit_bias names token {token}, past this model's vocabulary of {vocab_size}.",
                param=f"logit_bias.{token}",
            )
    return bias


def _grammar(body: CreateResponseRequest, grammars: GrammarCompiler) -> str | None:
    """The grammar `text.format` asks for: none for plain text, else a JSON schema's."""
    text_format = body.text.format if body.text else None
    if isinstance(text_format, JsonObjectFormat):
        return grammars.json_schema({"type": "object"})
    if isinstance(text_format, JsonSchemaFormat):
        try:
            return grammars.json_schema(text_format.schema_)
        except InvalidGrammar as exc:
            raise InvalidRequestError(
                f"Invalid JSON schema in 'text.format.schema': {exc}", param="text.format.schema"
            ) from exc
    return None
