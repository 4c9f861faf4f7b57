"""`mcp` tools: respserve is the MCP client (the `mcp` package, streamable HTTP). It lists each server's
tools before the first generation, offers them to the model, runs the calls the model makes, and lets the
model go on with their results, turn after turn, until it answers without calling one, a call needs the
caller's approval, or `max_tool_calls` is spent.

A listing found in the context (an earlier response's `mcp_list_tools`) is reused. A call that needs
approval becomes an `mcp_approval_request` and ends the response; a later request that answers it with an
approving `mcp_approval_response` runs the call first, then generates.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from mcp import Client
from mcp.client.streamable_http import create_mcp_http_client, streamable_http_client

from respserve.api.converter import ResponseConverter
from respserve.api.errors import InvalidRequestError
from respserve.engine.request_queue import OutputStream
from respserve.protocol.events import StreamEvent
from respserve.protocol.ids import new_id
from respserve.protocol.items import (
    InputItem,
    McpApprovalRequestInput,
    McpApprovalResponseInput,
    McpCallItem,
    McpListToolsInput,
    McpListToolsItem,
)
from respserve.protocol.request import CreateResponseRequest
from respserve.protocol.tools import McpTool

logger = logging.getLogger(__name__)
# Generations one response may run: a model that calls a tool after every result would otherwise never
# stop when `max_tool_calls` is not set.
MAX_GENERATIONS = 16


def mcp_servers(body: CreateResponseRequest) -> list[McpTool]:
    return [tool for tool in body.tools or [] if isinstance(tool, McpTool)]


def _client(server: McpTool) -> Client:
    http = create_mcp_http_client(headers=server.headers)
    return Client(streamable_http_client(server.server_url, http_client=http))


async def list_tools(server: McpTool) -> list[dict[str, Any]]:
    async with _client(server) as client:
        tools, cursor = [], None
        while True:
            page = await client.list_tools(cursor=cursor)
            tools.extend(page.tools)
            cursor = page.next_cursor
            if not cursor:
                break
    return [
        {
            "name": tool.name,
            "description": tool.description,
            "input_schema": tool.input_schema,
            "annotations": tool.annotations.model_dump(mode="json", exclude_none=True) if tool.annotations else None,
        }
        for tool in tools
    ]


async def call_tool(server: McpTool, name: str, arguments: str) -> tuple[str | None, str | None]:
    """(output, None) or (None, error): what the call returned as text, or why it failed."""
    try:
        parsed = json.loads(arguments or "{}")
        async with _client(server) as client:
            result = await client.call_tool(name, parsed if isinstance(parsed, dict) else {})
    except Exception as exc:  # the server, not respserve, failed: the model sees the error
        logger.warning("MCP call %s.%s failed: %s", server.server_label, name, exc)
        return None, _describe(exc)
    texts = [part.text for part in result.content if getattr(part, "type", None) == "text"]
    text = "\n".join(texts) if texts else json.dumps(result.structured_content)
    return (None, text) if result.is_error else (text, None)


def _describe(exc: BaseException) -> str:
    """The first real cause: the MCP client wraps transport errors in task-group exception groups."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"


@dataclass
class McpSession:
    """One response's MCP work: what was listed and run before the first generation, and the loop after it.

    `plan_turn(context)` plans and submits a generation over the given context items, returning its
    outputs, parser and call targets; the route builds it, so planning stays in one place.
    """

    servers: dict[str, McpTool]
    listings: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    new_listings: list[McpListToolsItem] = field(default_factory=list)
    approved: list[McpCallItem] = field(default_factory=list)
    generations: int = 1
    plan_turn: Callable[[list[dict[str, Any]]], Awaitable[tuple[OutputStream, Any, Any]]] | None = None

    @classmethod
    async def open(cls, body: CreateResponseRequest, context: list[InputItem]) -> McpSession:
        """Lists the servers' tools (unless the context already has their listing) and runs the approved calls."""
        servers = {server.server_label: server for server in mcp_servers(body)}
        session = cls(servers=servers)
        sent = list(body.input) if isinstance(body.input, list) else []
        for item in [*context, *sent]:
            if isinstance(item, McpListToolsInput) and item.server_label in servers and not item.error:
                session.listings[item.server_label] = item.tools
        for label, server in servers.items():
            if label in session.listings:
                continue
            item = McpListToolsItem(id=new_id("mcpl"), server_label=label)
            try:
                item.tools = [tool for tool in await list_tools(server) if server.allows(tool["name"])]
                session.listings[label] = item.tools
            except Exception as exc:
                logger.warning("listing the tools of MCP server %s failed: %s", label, exc)
                item.error = _describe(exc)
            session.new_listings.append(item)
        await session._run_approved(context, sent)
        return session

    async def _run_approved(self, context: list[InputItem], sent: list[Any]) -> None:
        requests = {item.id: item for item in [*context, *sent] if isinstance(item, McpApprovalRequestInput)}
        for index, answer in enumerate(sent):
            if not isinstance(answer, McpApprovalResponseInput) or not answer.approve:
                continue
            request = requests.get(answer.approval_request_id)
            if request is None or request.server_label not in self.servers:
                raise InvalidRequestError(
                    f"No mcp_approval_request '{answer.approval_request_id}' for a server in 'tools'.",
                    param=f"input[{index}].approval_request_id",
                )
            call = McpCallItem(
                id=new_id("mcp"),
                server_label=request.server_label,
                name=request.name,
                arguments=request.arguments,
                status="in_progress",
                approval_request_id=request.id,
            )
            call.settle(*await call_tool(self.servers[request.server_label], request.name, request.arguments))
            self.approved.append(call)

    def context_items(self) -> list[dict[str, Any]]:
        """What the first generation must see beyond the request: the approved calls just run."""
        return [call.model_dump(mode="json") for call in self.approved]

    def start(self, converter: ResponseConverter) -> list[StreamEvent]:
        events = [event for item in self.new_listings for event in converter.mcp_listing(item)]
        for call in self.approved:
            events += converter.approved_mcp_call(call)
        return events

    async def next_turn(self, converter: ResponseConverter) -> tuple[list[StreamEvent], OutputStream | None]:
        """Runs the calls the last generation made and starts the next one; (events, None) when done."""
        pending = converter.pending_mcp_calls()
        if not pending or converter.awaits_approval or not converter.last_turn_completed or self.plan_turn is None:
            return [], None
        events: list[StreamEvent] = []
        for call in pending:
            output, error = await call_tool(self.servers[call.server_label], call.name, call.arguments)
            events += converter.mcp_call_done(call, output, error)
        if self.generations >= MAX_GENERATIONS:
            logger.warning("a response reached %d generations of MCP calls; it ends there", MAX_GENERATIONS)
            return events, None
        self.generations += 1
        outputs, parser, targets = await self.plan_turn(converter.output_so_far())
        converter.next_turn(parser, targets)
        return events, outputs
