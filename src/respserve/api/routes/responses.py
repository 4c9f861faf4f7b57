"""`/v1/responses`: create (JSON, SSE or background), retrieve (or resume its stream), delete, cancel,
list input items. Thin: the work is in chat_messages, the converter, the runner and the store."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse, ServerSentEvent

from respserve.api.auth import Owner
from respserve.api.converter import ResponseConverter
from respserve.api.encrypted_reasoning import INCLUDE as ENCRYPTED_REASONING
from respserve.api.encrypted_reasoning import open_reasoning_items
from respserve.api.errors import GatewayTimeoutError, InvalidRequestError, NotFoundError, RateLimitError
from respserve.api.file_inputs import read_input_files
from respserve.api.generation_plan import output_parser, plan_generation, stored_context_items
from respserve.api.image_converter import ImageCallConverter, ImageMessageConverter
from respserve.api.image_plan import forced_image_tool, plan_image, plan_image_tool, tool_image_model
from respserve.api.input_items import context_items, stored_input_items
from respserve.api.mcp import McpSession, mcp_servers
from respserve.api.metrics import RequestTimer
from respserve.api.output_parsers import OutputParser
from respserve.api.pagination import Include, Limit, Order
from respserve.api.response_events import ResponseEvents, initial_resource
from respserve.api.response_runner import Persistence, ResponseRunner
from respserve.api.sse import DONE, event_frame, frame
from respserve.api.state import AppState, ServedImageModel, ServedModel, StateDep
from respserve.api.tool_calling import UNSERVED_TOOLS_HEADER, CallTarget, ToolPlan, unserved_tools
from respserve.engine.generation import GenerationRequest, ImageRequest
from respserve.engine.image_worker import ImageWorker
from respserve.engine.request_queue import OutputStream, QueueFull
from respserve.engine.worker import PipelineWorker
from respserve.protocol.ids import new_id
from respserve.protocol.items import InputItem, InputMessage
from respserve.protocol.lists import ItemList
from respserve.protocol.request import CreateResponseRequest
from respserve.protocol.response import ResponseDeleted, ResponseResource

logger = logging.getLogger(__name__)
router = APIRouter()

# Seconds a client told 429 should wait: about one short generation on a loaded CPU.
RETRY_AFTER_S = 1


@router.post("/v1/responses", response_model=None)
async def create_response(
    body: CreateResponseRequest, http_request: Request, state: StateDep, owner: Owner
) -> JSONResponse | EventSourceResponse:
    served = state.resolve_model(body.model)
    if body.background and not body.store:
        raise InvalidRequestError("Background responses must be stored: set 'store' to true.", param="background")
    if body.previous_response_id and body.conversation is not None:
        raise InvalidRequestError(
            "'previous_response_id' and 'conversation' cannot be used together.", param="conversation"
        )
    open_reasoning_items(body, state.reasoning_sealer)
    stored_context = await stored_context_items(body, state, owner)
    input_items = stored_input_items(body.input)  # as sent: input_file parts are stored as they came
    # What the model reads: every input_file part read into the text or image part it holds.
    read_body, read_context = await read_input_files(body, stored_context, state, owner)
    resource = initial_resource(body, served.name)
    if body.background:
        resource.status = "queued"
    work = await _plan(read_body, read_context, served, state, resource, str(http_request.base_url), owner)
    try:
        outputs = work.worker.submit(work.request)
    except QueueFull as exc:
        raise RateLimitError(
            "The server is at capacity; retry shortly.",
            code="server_overloaded",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        ) from exc
    persistence = Persistence(
        store=state.store,
        owner=owner,
        input_items=input_items,
        save_response=body.store,
        conversation_id=body.conversation_id,
        record_events=body.background and body.stream,
        image_ids=work.image_ids,
        leases=state.leases,
    )
    runner = ResponseRunner(work.converter, outputs, persistence, RequestTimer(state.metrics), work.turns)
    await runner.save_initial()
    headers = _unserved_tools_header(body, resource.id)

    if body.background:
        snapshot = resource.to_wire()
        state.background.start(runner)
        if body.stream:
            follow = _follow(state, resource.id, -1, owner)
            return EventSourceResponse(follow, sep="\n", ping=15, headers=headers)
        return JSONResponse(snapshot, headers=headers)
    if body.stream:
        return EventSourceResponse(_stream(runner), sep="\n", ping=15, headers=headers)
    await _run_until_disconnect(runner.run_to_end(), http_request, state.settings.request_timeout_s)
    return JSONResponse(runner.converter.resource.to_wire(), headers=headers)


def _unserved_tools_header(body: CreateResponseRequest, response_id: str) -> dict[str, str]:
    """Tools the request listed but the model was not offered (no backend here), said in a header and a log
    line rather than refused: clients such as Codex send hosted tools with every turn."""
    unserved = unserved_tools(body)
    if not unserved:
        return {}
    logger.info("%s: tools not offered to the model (no backend here): %s", response_id, ", ".join(unserved))
    return {UNSERVED_TOOLS_HEADER: ", ".join(unserved)}


@dataclass(frozen=True)
class _Work:
    """What one response runs: a request for a worker, and the converter that turns its outputs into events."""

    worker: PipelineWorker | ImageWorker
    request: GenerationRequest | ImageRequest
    converter: ResponseEvents
    image_ids: tuple[str, ...] = ()
    turns: McpSession | None = None  # MCP tools: the generations after the first


async def _plan(
    body: CreateResponseRequest,
    stored_context: list[InputItem],
    served: ServedModel | ServedImageModel,
    state: AppState,
    resource: ResponseResource,
    base_url: str,
    owner: str | None,
) -> _Work:
    """An image model makes images; a text model forced to call `image_generation` hands the prompt to an
    image model; otherwise the text model generates."""
    if isinstance(served, ServedImageModel):
        request = await plan_image(body, served, state, owner)
        if body.image_options.response_format == "b64_json":
            return _Work(served.worker, request, ImageMessageConverter(resource))
        image_ids = tuple(new_id("img") for _ in range(request.num_images))
        urls = [f"{base_url}v1/images/{image_id}/content" for image_id in image_ids]
        return _Work(served.worker, request, ImageMessageConverter(resource, urls), image_ids)
    tool = forced_image_tool(body)
    if tool is not None:
        image_model = tool_image_model(tool, state)
        request = await plan_image_tool(body, tool, image_model, state, owner)
        converter = ImageCallConverter(resource, request.prompt, f"{request.width}x{request.height}")
        return _Work(image_model.worker, request, converter)
    turns = await McpSession.open(body, stored_context) if mcp_servers(body) else None
    if turns is not None:
        made = turns.context_items()  # the approved calls just run
        generation, tool_plan = await _plan_mcp_turn(body, stored_context, served, state, turns, made, first=True)
    else:
        generation, tool_plan = await plan_generation(body, stored_context, served, state)
    # One call when parallel calls are off; at most max_tool_calls otherwise (over every turn with MCP).
    max_calls = 1 if body.parallel_tool_calls is False and turns is None else body.max_tool_calls
    parser = output_parser(tool_plan, generation, served, state)
    sealer = state.reasoning_sealer if ENCRYPTED_REASONING in (body.include or []) else None
    summarize = body.reasoning is not None and body.reasoning.summary is not None
    converter = ResponseConverter(
        resource,
        parser,
        max_calls,
        tool_plan.targets,
        tool_plan.raw_input,
        sealer.seal if sealer else None,
        summarize,
        multi_turn=turns is not None,
    )
    if turns is not None:

        async def plan_turn(made: list[dict[str, Any]]) -> tuple[OutputStream, OutputParser, dict[str, CallTarget]]:
            generation, plan = await _plan_mcp_turn(body, stored_context, served, state, turns, made, first=False)
            return served.worker.submit(generation), output_parser(plan, generation, served, state), plan.targets

        turns.plan_turn = plan_turn
    return _Work(served.worker, generation, converter, turns=turns)


async def _plan_mcp_turn(
    body: CreateResponseRequest,
    stored_context: list[InputItem],
    served: ServedModel,
    state: AppState,
    turns: McpSession,
    made: list[dict[str, Any]],
    first: bool,
) -> tuple[GenerationRequest, ToolPlan]:
    """A generation of a response with MCP tools: over the stored context, the request's input and what the
    response has made so far (`made`, wire items); only the first one is held to `tool_choice` (the next
    ones may answer)."""
    sent = [InputMessage(role="user", content=body.input)] if isinstance(body.input, str) else list(body.input)
    context = [*stored_context, *sent, *context_items(made)]
    turn = body.model_copy(update={"input": [], "tool_choice": body.tool_choice if first else "auto"})
    return await plan_generation(turn, context, served, state, turns.listings)


async def _stream(runner: ResponseRunner) -> AsyncIterator[ServerSentEvent]:
    # Leaving early (the client went away) closes the runner, which cancels the request in the worker.
    async for event in runner.events():
        yield event_frame(event)
    yield DONE


async def _follow(
    state: AppState, response_id: str, starting_after: int, owner: str | None
) -> AsyncIterator[ServerSentEvent]:
    # Following a background response never cancels it: a client may leave and resume later.
    async for event in state.background.follow(response_id, starting_after, owner):
        yield frame(event, json.loads(event)["type"])
    yield DONE


async def _run_until_disconnect(work: Coroutine[Any, Any, None], http_request: Request, timeout: float) -> None:
    """Runs `work`, cancelling it (and so its generation) if the client hangs up first or time runs out."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(http_request))
    try:
        await asyncio.wait({task, watcher}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        timed_out = not task.done() and not watcher.done()
        if not task.done():
            task.cancel()
    if timed_out:
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise GatewayTimeoutError(f"The response took longer than {timeout:g} s and was stopped.", code="timeout")
    await task


async def _disconnected(http_request: Request) -> None:
    # The body has been read, so the next ASGI message can only be the disconnect.
    while (await http_request.receive())["type"] != "http.disconnect":
        pass


async def _stored(state: AppState, response_id: str, owner: str | None) -> dict[str, Any]:
    resource = await state.store.get_response(response_id, owner)
    if resource is None:
        raise NotFoundError(f"Response with id '{response_id}' not found.", param="response_id")
    return resource


@router.get("/v1/responses/{response_id}", response_model=None)
async def retrieve_response(
    response_id: str,
    state: StateDep,
    owner: Owner,
    stream: bool = False,
    starting_after: int | None = Query(default=None, ge=-1),
) -> JSONResponse | EventSourceResponse:
    resource = await _stored(state, response_id, owner)
    if stream:
        if not resource.get("background"):
            raise InvalidRequestError("Only background responses can be streamed again.", param="stream")
        after = -1 if starting_after is None else starting_after
        return EventSourceResponse(_follow(state, response_id, after, owner), sep="\n", ping=15)
    return JSONResponse(resource)


@router.delete("/v1/responses/{response_id}")
async def delete_response(response_id: str, state: StateDep, owner: Owner) -> ResponseDeleted:
    await _stored(state, response_id, owner)  # another owner's response does not exist for this caller
    await state.background.cancel(response_id, owner)
    if not await state.store.delete_response(response_id, owner):
        raise NotFoundError(f"Response with id '{response_id}' not found.", param="response_id")
    return ResponseDeleted(id=response_id)


@router.post("/v1/responses/{response_id}/cancel", response_model=None)
async def cancel_response(response_id: str, state: StateDep, owner: Owner) -> JSONResponse:
    resource = await _stored(state, response_id, owner)
    if not resource.get("background"):
        raise InvalidRequestError("Only background responses can be cancelled.", param="response_id")
    if resource["status"] not in ("queued", "in_progress") or not await state.background.cancel(response_id, owner):
        raise InvalidRequestError(f"Cannot cancel a response with status '{resource['status']}'.", param="response_id")
    return JSONResponse(await _stored(state, response_id, owner))


@router.get("/v1/responses/{response_id}/input_items")
async def list_input_items(
    response_id: str,
    state: StateDep,
    owner: Owner,
    limit: Limit = 20,
    order: Order = "desc",
    after: str | None = None,
    include: Include = None,
) -> ItemList:
    page = await state.store.list_input_items(response_id, owner, limit, order, after)
    if page is None:
        raise NotFoundError(f"Response with id '{response_id}' not found.", param="response_id")
    return ItemList.of(page.items, page.has_more)
