"""Drives one response from the worker's outputs to its end, keeping what the request asked to keep.

The same runner serves a plain request, a stream and a background job: it yields the converter's events,
records them when asked (background streams, for resuming), and saves the resource and, for a
conversation, the new items to the store.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio

from respserve.api.converter import ResponseConverter
from respserve.api.metrics import RequestTimer
from respserve.api.response_events import ResponseEvents
from respserve.engine.generation import GenerationOutput
from respserve.engine.image_encoding import MEDIA_TYPES
from respserve.engine.request_queue import OutputStream
from respserve.protocol.events import (
    ResponseCompletedEvent,
    ResponseFailedEvent,
    ResponseIncompleteEvent,
    StreamEvent,
)
from respserve.protocol.response import ResponseError, ResponseStatus
from respserve.store.base import ResponseStore, StoredImage

if TYPE_CHECKING:
    from respserve.api.leases import LeaseKeeper
    from respserve.api.mcp import McpSession

_TERMINAL_EVENTS = (ResponseCompletedEvent, ResponseIncompleteEvent, ResponseFailedEvent)


@dataclass(frozen=True)
class Persistence:
    store: ResponseStore
    owner: str | None
    input_items: list[dict[str, Any]]
    save_response: bool  # `store: true`
    conversation_id: str | None
    record_events: bool  # background streams, so that GET ?stream=true can replay them
    image_ids: tuple[str, ...] = ()  # images served by URL: image i is kept under image_ids[i]
    leases: LeaseKeeper | None = None  # holds a lease on the stored response while it runs


class ResponseRunner:
    def __init__(
        self,
        converter: ResponseEvents,
        outputs: OutputStream,
        persistence: Persistence | None,
        timer: RequestTimer | None = None,
        turns: McpSession | None = None,
    ) -> None:
        self.converter = converter
        self._turns = turns  # MCP tools: more generations may follow the first
        self._timer = timer or RequestTimer(None)
        self._outputs = outputs
        self._persistence = persistence
        self._finished = False
        # What an interrupted run is recorded as: `cancelled` (client or cancel call), or `failed` (shutdown).
        self.interrupted_status: ResponseStatus = "cancelled"

    @property
    def response_id(self) -> str:
        return self.converter.resource.id

    async def save_initial(self) -> None:
        """Stores the response as created (queued or in progress) with its input items."""
        persistence = self._persistence
        if persistence and persistence.save_response:
            if persistence.leases is not None:
                persistence.leases.hold(self.response_id)
            await persistence.store.save_response(
                self.converter.resource.to_wire(), persistence.input_items, persistence.owner
            )

    async def events(self) -> AsyncIterator[StreamEvent]:
        try:
            was_queued = self.converter.resource.status == "queued"
            started = await self._recorded(self.converter.start())
            if was_queued:  # a background job: whoever polls it now sees it in progress
                await self._save_resource()
            for event in started:
                yield event
            turns = self._turns
            if turns is not None and isinstance(self.converter, ResponseConverter):
                for event in await self._recorded(turns.start(self.converter)):
                    yield event
            outputs: OutputStream | None = self._outputs
            while outputs is not None:
                async with aclosing(outputs):
                    async for output in outputs:
                        if output.images:
                            await self._keep_images(output)
                        if output.output_tokens:
                            self._timer.token()
                        for event in await self._recorded(self.converter.on_output(output)):
                            yield event
                        if output.final_status.is_done:
                            self._timer.finish(output.prompt_tokens, output.output_tokens)
                outputs = None
                if turns is not None and isinstance(self.converter, ResponseConverter):
                    between, outputs = await turns.next_turn(self.converter)
                    finished = [] if outputs is not None else self.converter.finish()
                    for event in await self._recorded(between + finished):
                        yield event
            if not self._finished:  # (normally saved already, before its terminal event)
                self._finished = True
                await self._save_final()
        finally:
            if not self._finished:
                # Interrupted (disconnect, cancel, shutdown). A stream whose client left runs this inside a
                # cancelled anyio scope, which would cancel every await here: the write is shielded from it.
                with anyio.CancelScope(shield=True):
                    await self._mark_interrupted()
            if self._persistence and self._persistence.leases:
                self._persistence.leases.release(self.response_id)

    async def run_to_end(self) -> None:
        async for _ in self.events():
            pass

    async def _keep_images(self, output: GenerationOutput) -> None:
        """Saves the images a URL points at before the events that carry the URL go out."""
        persistence = self._persistence
        if persistence is None or not persistence.image_ids:
            return
        for image in output.images:
            stored = StoredImage(
                id=persistence.image_ids[image.index],
                response_id=self.response_id,
                media_type=MEDIA_TYPES[image.format],
                data=image.data,
            )
            await persistence.store.save_image(stored, persistence.owner)

    async def _recorded(self, events: list[StreamEvent]) -> list[StreamEvent]:
        """Records the events for stream resumption. Before a terminal event goes anywhere, the final
        resource is saved: a client (or a follower on another replica) that saw the response end can always
        read it back, even if this process dies the moment after."""
        if not self._finished and any(isinstance(event, _TERMINAL_EVENTS) for event in events):
            self._finished = True
            await self._save_final()
        persistence = self._persistence
        if persistence and persistence.record_events and events:
            rows = [(event.sequence_number, event.to_wire_json()) for event in events]
            await persistence.store.append_events(self.response_id, rows)
        return events

    async def _save_resource(self) -> None:
        persistence = self._persistence
        if persistence and persistence.save_response:
            await persistence.store.save_response(self.converter.resource.to_wire(), None, persistence.owner)

    async def _save_final(self) -> None:
        persistence = self._persistence
        if persistence is None:
            return
        await self._save_resource()
        if persistence.conversation_id:
            output = self.converter.resource.to_wire()["output"]
            await persistence.store.add_conversation_items(
                persistence.conversation_id, persistence.input_items + output, persistence.owner
            )

    async def _mark_interrupted(self) -> None:
        resource = self.converter.resource
        if resource.status not in ("queued", "in_progress"):
            return
        resource.status = self.interrupted_status
        if self.interrupted_status == "failed":
            resource.error = ResponseError(
                code="server_error", message="The server shut down before this response finished."
            )
        await self._save_resource()
