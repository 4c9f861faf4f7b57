"""`POST /v1/responses`: validate, build the prompt, run it in the worker, answer as JSON or SSE."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine
from contextlib import aclosing
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse, ServerSentEvent

from respserve.api.chat_messages import build_chat_messages
from respserve.api.converter import ResponseConverter, initial_resource
from respserve.api.errors import InvalidRequestError, NotFoundError, RateLimitError
from respserve.api.state import AppState, ServedModel, StateDep
from respserve.engine.generation import GenerationRequest, SamplingParams
from respserve.engine.text_pipeline import ContextLengthExceeded
from respserve.engine.worker import OutputStream, QueueFull
from respserve.protocol.events import StreamEvent
from respserve.protocol.ids import new_id
from respserve.protocol.request import CreateResponseRequest

router = APIRouter()

# Seconds a client told 429 should wait: about one short generation on a loaded CPU.
RETRY_AFTER_S = 1


@router.post("/v1/responses", response_model=None)
async def create_response(
    body: CreateResponseRequest, http_request: Request, state: StateDep
) -> JSONResponse | EventSourceResponse:
    served = state.resolve_model(body.model)
    if body.background:
        raise InvalidRequestError("Background responses are not supported yet.", param="background")
    if body.previous_response_id:
        raise NotFoundError(
            f"Previous response with id '{body.previous_response_id}' not found.",
            param="previous_response_id",
        )
    generation = await _generation_request(body, served, state)
    converter = ResponseConverter(initial_resource(body, served.name))
    try:
        outputs = served.worker.submit(generation)
    except QueueFull as exc:
        raise RateLimitError(
            "The server is at capacity; retry shortly.",
            code="server_overloaded",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        ) from exc
    if body.stream:
        return EventSourceResponse(_stream(converter, outputs), sep="\n", ping=15)
    await _run_until_disconnect(_collect(converter, outputs), http_request)
    return JSONResponse(converter.resource.to_wire())


async def _collect(converter: ResponseConverter, outputs: OutputStream) -> None:
    async with aclosing(outputs):
        async for output in outputs:
            converter.on_output(output)


async def _run_until_disconnect(work: Coroutine[Any, Any, None], http_request: Request) -> None:
    """Runs `work`, cancelling it (and so its generation) if the client hangs up first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(http_request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    await task


async def _disconnected(http_request: Request) -> None:
    # The body has been read, so the next ASGI message can only be the disconnect.
    while (await http_request.receive())["type"] != "http.disconnect":
        pass


async def _generation_request(body: CreateResponseRequest, served: ServedModel, state: AppState) -> GenerationRequest:
    pipeline = served.worker.pipeline
    messages = build_chat_messages(body, served.name, pipeline.accepts_images)
    try:
        # Tokenising a long prompt is CPU work: keep it off the event loop.
        prompt = await asyncio.to_thread(pipeline.render_prompt, messages)
    except ContextLengthExceeded as exc:
        raise InvalidRequestError(str(exc), param="input", code="context_length_exceeded") from exc
    room = pipeline.context_length - len(prompt)
    max_tokens = min(body.max_output_tokens or state.settings.max_output_tokens, room)
    sampling = SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k or 0,
        seed=body.seed,
        frequency_penalty=body.frequency_penalty or 0.0,
        presence_penalty=body.presence_penalty or 0.0,
        stop=tuple(body.stop_sequences),
    )
    return GenerationRequest(request_id=new_id("req"), prompt_token_ids=prompt, sampling=sampling)


async def _stream(converter: ResponseConverter, outputs: OutputStream) -> AsyncIterator[ServerSentEvent]:
    # Leaving early (the client went away) closes `outputs`, which cancels the request in the worker.
    async with aclosing(outputs):
        for event in converter.start():
            yield _frame(event)
        async for output in outputs:
            for event in converter.on_output(output):
                yield _frame(event)
    yield ServerSentEvent(data="[DONE]", sep="\n")


def _frame(event: StreamEvent) -> ServerSentEvent:
    return ServerSentEvent(data=event.to_wire_json(), event=event.type, sep="\n")
