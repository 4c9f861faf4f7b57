"""The converter: a worker's `GenerationOutput`s become a Response resource and its stream of events.

One converter serves one response. The streaming and the plain JSON paths feed it the same outputs; the
first forwards the events it returns, the second only reads `resource` at the end.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from respserve.api import client_tools
from respserve.api.output_parsers import (
    CallArguments,
    CallStart,
    OutputParser,
    ReasoningSegment,
    Segment,
    TextSegment,
)
from respserve.api.response_events import FINAL_STATUS, ResponseEvents
from respserve.api.tool_calling import CallTarget
from respserve.engine.generation import GenerationOutput, TokenLogprob
from respserve.protocol.content import LogProb, OutputText, ReasoningText, TopLogProb
from respserve.protocol.events import (
    ContentPartAddedEvent,
    ContentPartDoneEvent,
    CustomToolCallInputDeltaEvent,
    CustomToolCallInputDoneEvent,
    FunctionCallArgumentsDeltaEvent,
    FunctionCallArgumentsDoneEvent,
    McpCallArgumentsDeltaEvent,
    McpCallArgumentsDoneEvent,
    McpCallCompletedEvent,
    McpCallFailedEvent,
    McpCallInProgressEvent,
    McpListToolsCompletedEvent,
    McpListToolsFailedEvent,
    McpListToolsInProgressEvent,
    OutputItemAddedEvent,
    OutputItemDoneEvent,
    OutputTextDeltaEvent,
    OutputTextDoneEvent,
    ReasoningTextDeltaEvent,
    ReasoningTextDoneEvent,
    StreamEvent,
)
from respserve.protocol.ids import new_id
from respserve.protocol.items import (
    ApplyPatchCallItem,
    ClientCallItem,
    CustomToolCallItem,
    FunctionCallItem,
    LocalShellCallItem,
    McpApprovalRequestItem,
    McpCallItem,
    McpListToolsItem,
    MessageStatus,
    OutputItem,
    OutputMessage,
    ReasoningItem,
    ShellCallItem,
)
from respserve.protocol.response import (
    IncompleteDetails,
    ResponseResource,
    ResponseStatus,
    Usage,
)


def _wire_logprob(logprob: TokenLogprob) -> LogProb:
    return LogProb(
        token=logprob.token,
        logprob=logprob.logprob,
        bytes=logprob.bytes,
        top_logprobs=[TopLogProb(token=top.token, logprob=top.logprob, bytes=top.bytes) for top in logprob.top],
    )


class ResponseConverter(ResponseEvents):
    """Keeps the output items of one response and the stream events that build them.

    The parser splits the model's text into message text and function calls; a message item opens at the
    first text and closes when a call starts or the response ends.
    """

    def __init__(
        self,
        resource: ResponseResource,
        parser: OutputParser | None = None,
        max_tool_calls: int | None = None,
        targets: dict[str, CallTarget] | None = None,
        raw_input: bool = False,
        seal_reasoning: Callable[[str], str] | None = None,
        summarize_reasoning: bool = False,
        multi_turn: bool = False,
    ) -> None:
        super().__init__(resource)
        # With MCP tools a response spans several generations (turns); the runner calls `finish` after the
        # last one. Otherwise the first generation's end is the response's.
        self._multi_turn = multi_turn
        self._closing_status: MessageStatus = "completed"  # what a call closed by the model ends as
        self._usage = Usage(input_tokens=0, output_tokens=0, total_tokens=0)
        self._last_status: ResponseStatus = "completed"
        self._last_error: str | None = None
        self._seal_reasoning = seal_reasoning  # set when the request includes reasoning.encrypted_content
        self._summarize_reasoning = summarize_reasoning  # `reasoning.summary` was asked for
        self._parser = parser or OutputParser()
        self._max_tool_calls = max_tool_calls
        self._targets = targets or {}  # what a call under an offered name is on the wire
        self._raw_input = raw_input  # a forced custom tool: the output is its input as it streams
        self._items: list[OutputItem] = []
        self._message: OutputMessage | None = None
        self._text: list[str] = []
        self._logprobs: list[LogProb] = []
        self._pending_logprobs: list[LogProb] = []  # tokens whose text is still held back
        self._call: FunctionCallItem | CustomToolCallItem | McpCallItem | McpApprovalRequestItem | ClientCallItem | None
        self._call = None
        self._arguments: list[str] = []
        self._reasoning: ReasoningItem | None = None
        self._reasoning_text: list[str] = []
        self._reasoning_tokens = 0

    def on_output(self, output: GenerationOutput) -> list[StreamEvent]:
        self._pending_logprobs.extend(_wire_logprob(logprob) for logprob in output.logprobs)
        events: list[StreamEvent] = []
        segments = self._parser.feed(output.text)
        if self._parser.in_reasoning or any(isinstance(segment, ReasoningSegment) for segment in segments):
            self._reasoning_tokens += 1
        for segment in segments:
            events.extend(self._apply(segment))
        if output.final_status.is_done:
            # A call the parser closes now was cut off if the generation ran out of tokens.
            if FINAL_STATUS[output.final_status] != "completed":
                self._closing_status = "incomplete"
            for segment in self._parser.finish():
                events.extend(self._apply(segment))
            self._closing_status = "completed"
            events.extend(self._end_turn(output))
            if not self._multi_turn:
                events.extend(self.finish())
        return events

    def next_turn(self, parser: OutputParser, targets: dict[str, CallTarget]) -> None:
        """The next generation of a multi-turn response: its parser and offered tools."""
        self._parser, self._targets, self._raw_input = parser, targets, False

    # ---- segments ------------------------------------------------------------------------------------------
    def _apply(self, segment: Segment) -> list[StreamEvent]:
        if isinstance(segment, ReasoningSegment):
            return self._reasoning_delta(segment.text)
        events = self._close_reasoning()
        return events + self._apply_answer(segment)

    def _apply_answer(self, segment: Segment) -> list[StreamEvent]:
        if isinstance(segment, TextSegment):
            return self._message_delta(segment.text)
        if isinstance(segment, CallStart):
            return self._start_call(segment.name)
        if isinstance(segment, CallArguments):
            return self._call_delta(segment.delta)
        return self._close_call(self._closing_status)

    @property
    def _index(self) -> int:
        return len(self._items) - 1

    def _reasoning_delta(self, text: str) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        if self._reasoning is None:
            self._reasoning = ReasoningItem(id=new_id("rs"))
            self._items.append(self._reasoning)
            self._reasoning_text = []
            events.append(
                self._event(OutputItemAddedEvent(output_index=self._index, item=self._reasoning.model_copy()))
            )
        self._reasoning_text.append(text)
        self._pending_logprobs = []  # logprobs describe message text only
        delta = ReasoningTextDeltaEvent(item_id=self._reasoning.id, output_index=self._index, delta=text)
        return [*events, self._event(delta)]

    def _close_reasoning(self) -> list[StreamEvent]:
        item = self._reasoning
        if item is None:
            return []
        self._reasoning = None
        index = self._items.index(item)
        text = "".join(self._reasoning_text)
        item.content = [ReasoningText(text=text)]
        if self._summarize_reasoning:  # no separate summariser: the summary is the reasoning itself
            item.summary = [{"type": "summary_text", "text": text}]
        if self._seal_reasoning is not None:
            item.encrypted_content = self._seal_reasoning(text)
        return [
            self._event(ReasoningTextDoneEvent(item_id=item.id, output_index=index, text=text)),
            self._event(OutputItemDoneEvent(output_index=index, item=item.model_copy(deep=True))),
        ]

    def _message_delta(self, text: str) -> list[StreamEvent]:
        if not text or self._call is not None:
            return []
        events = [] if self._message is not None else self._open_message()
        assert self._message is not None
        self._text.append(text)
        logprobs, self._pending_logprobs = self._pending_logprobs, []
        self._logprobs.extend(logprobs)
        delta = OutputTextDeltaEvent(
            item_id=self._message.id, output_index=self._index, content_index=0, delta=text, logprobs=logprobs
        )
        return [*events, self._event(delta)]

    def _open_message(self) -> list[StreamEvent]:
        self._message = OutputMessage(id=new_id("msg"), status="in_progress", content=[])
        self._items.append(self._message)
        self._text, self._logprobs = [], []
        empty = OutputText(text="")
        return [
            self._event(OutputItemAddedEvent(output_index=self._index, item=self._message.model_copy(deep=True))),
            self._event(
                ContentPartAddedEvent(item_id=self._message.id, output_index=self._index, content_index=0, part=empty)
            ),
        ]

    def _close_message(self, status: MessageStatus) -> list[StreamEvent]:
        message = self._message
        if message is None:
            return []
        self._message = None
        index = self._items.index(message)
        text = "".join(self._text)
        part = OutputText(text=text, logprobs=self._logprobs)
        message.status = status
        message.content = [part]
        done = OutputTextDoneEvent(
            item_id=message.id, output_index=index, content_index=0, text=text, logprobs=self._logprobs
        )
        return [
            self._event(done),
            self._event(ContentPartDoneEvent(item_id=message.id, output_index=index, content_index=0, part=part)),
            self._event(OutputItemDoneEvent(output_index=index, item=message.model_copy(deep=True))),
        ]

    def _start_call(self, name: str) -> list[StreamEvent]:
        events = self._close_message("completed")
        self._pending_logprobs = []  # those tokens were call markup, not text
        calls = sum(isinstance(item, _CALLS) for item in self._items)
        if self._max_tool_calls is not None and calls >= self._max_tool_calls:
            return events
        target = self._targets.get(name, CallTarget(name=name))
        ids = {"call_id": new_id("call"), "namespace": target.namespace, "name": target.name, "status": "in_progress"}
        if target.kind == "mcp":
            self._call = self._mcp_call(target)
        elif target.kind in ("local_shell", "shell", "apply_patch"):
            self._call = client_tools.new_call(target.kind)
        elif target.kind == "custom":
            self._call = CustomToolCallItem(id=new_id("ctc"), input="", **ids)
        else:
            self._call = FunctionCallItem(id=new_id("fc"), arguments="", **ids)
        self._items.append(self._call)
        self._arguments = []
        if isinstance(self._call, ClientCallItem):
            return events  # announced once complete: its action is only known from the whole arguments
        events.append(self._event(OutputItemAddedEvent(output_index=self._index, item=self._call.model_copy())))
        if isinstance(self._call, McpCallItem):
            events.append(self._event(McpCallInProgressEvent(item_id=self._call.id, output_index=self._index)))
        return events

    @staticmethod
    def _mcp_call(target: CallTarget) -> McpCallItem | McpApprovalRequestItem:
        """A call to an MCP tool: run by the server after this turn, or, if the tool needs approval, a request
        for it that ends the response."""
        label = target.server_label or ""
        if target.needs_approval:
            return McpApprovalRequestItem(id=new_id("mcpr"), server_label=label, name=target.name, arguments="")
        return McpCallItem(id=new_id("mcp"), server_label=label, name=target.name, arguments="", status="in_progress")

    def _call_delta(self, delta: str) -> list[StreamEvent]:
        call = self._call
        if call is None:
            return []
        self._arguments.append(delta)
        where = {"item_id": call.id, "output_index": self._index}
        if isinstance(call, FunctionCallItem):
            return [self._event(FunctionCallArgumentsDeltaEvent(**where, delta=delta))]
        if isinstance(call, McpCallItem):
            return [self._event(McpCallArgumentsDeltaEvent(**where, delta=delta))]
        if isinstance(call, McpApprovalRequestItem | ClientCallItem):
            return []  # the item carries its arguments once they are complete
        if self._raw_input:
            return [self._event(CustomToolCallInputDeltaEvent(**where, delta=delta))]
        return []  # JSON `{"input": ...}` from a parsed call: its input is known at the end

    def _close_call(self, status: MessageStatus) -> list[StreamEvent]:
        call = self._call
        if call is None:
            return []
        self._call = None
        index = self._items.index(call)
        written = "".join(self._arguments)
        if isinstance(call, McpApprovalRequestItem):
            call.arguments = written
            return [self._event(OutputItemDoneEvent(output_index=index, item=call.model_copy()))]
        if isinstance(call, ClientCallItem):
            client_tools.complete_call(call, written, finished=status == "completed")
            return [
                self._event(OutputItemAddedEvent(output_index=index, item=call.model_copy())),
                self._event(OutputItemDoneEvent(output_index=index, item=call.model_copy())),
            ]
        if isinstance(call, McpCallItem):  # stays in progress: the runner runs it, then closes it
            call.arguments = written
            return [self._event(McpCallArgumentsDoneEvent(item_id=call.id, output_index=index, arguments=written))]
        call.status = status
        if isinstance(call, FunctionCallItem):
            call.arguments = written
            done: StreamEvent = FunctionCallArgumentsDoneEvent(
                item_id=call.id, output_index=index, name=call.name, arguments=written
            )
            return [self._event(done), self._event(OutputItemDoneEvent(output_index=index, item=call.model_copy()))]
        events = []
        call.input = written if self._raw_input else _custom_input(written)
        if not self._raw_input and call.input:
            events.append(
                self._event(CustomToolCallInputDeltaEvent(item_id=call.id, output_index=index, delta=call.input))
            )
        events.append(self._event(CustomToolCallInputDoneEvent(item_id=call.id, output_index=index, input=call.input)))
        events.append(self._event(OutputItemDoneEvent(output_index=index, item=call.model_copy())))
        return events

    # ---- the end ---------------------------------------------------------------------------------------------
    def _end_turn(self, output: GenerationOutput) -> list[StreamEvent]:
        """Closes what this generation left open and adds its tokens to the response's usage."""
        status = FINAL_STATUS[output.final_status]
        item_status: MessageStatus = "completed" if status == "completed" else "incomplete"
        events = self._close_reasoning() + self._close_call(item_status) + self._close_message(item_status)
        usage = self._usage
        usage.input_tokens += output.prompt_tokens
        usage.input_tokens_details.cached_tokens += output.cached_tokens
        usage.output_tokens += output.output_tokens
        usage.total_tokens = usage.input_tokens + usage.output_tokens
        self._last_status, self._last_error = status, output.error
        return events

    @property
    def last_turn_completed(self) -> bool:
        return self._last_status == "completed"

    def finish(self) -> list[StreamEvent]:
        """Ends the response with the last generation's status."""
        events: list[StreamEvent] = []
        if not any(isinstance(item, _ANSWERS) for item in self._items):
            item_status: MessageStatus = "completed" if self._last_status == "completed" else "incomplete"
            events.extend(self._open_message())  # an empty answer is still one (empty) message
            events.extend(self._close_message(item_status))
        resource = self.resource
        resource.output = list(self._items)
        self._usage.output_tokens_details.reasoning_tokens = self._reasoning_tokens
        resource.usage = self._usage
        if self._last_status == "incomplete":
            resource.incomplete_details = IncompleteDetails(reason="max_output_tokens")
        return events + self._end(self._last_status, self._last_error)

    # ---- MCP: listings and calls the runner performs between generations --------------------------------
    def mcp_listing(self, item: McpListToolsItem) -> list[StreamEvent]:
        """A listing done before the first generation, told as it would have streamed."""
        self._items.append(item)
        index = self._index
        where = {"item_id": item.id, "output_index": index}
        outcome = McpListToolsFailedEvent(**where) if item.error else McpListToolsCompletedEvent(**where)
        return [
            self._event(OutputItemAddedEvent(output_index=index, item=item.model_copy(update={"tools": []}))),
            self._event(McpListToolsInProgressEvent(**where)),
            self._event(outcome),
            self._event(OutputItemDoneEvent(output_index=index, item=item.model_copy())),
        ]

    def approved_mcp_call(self, call: McpCallItem) -> list[StreamEvent]:
        """A call the caller approved (`mcp_approval_response`), run before the first generation, told as it
        would have streamed."""
        self._items.append(call)
        where = {"item_id": call.id, "output_index": self._index}
        started = call.model_copy(update={"status": "in_progress", "output": None, "error": None})
        return [
            self._event(OutputItemAddedEvent(output_index=self._index, item=started)),
            self._event(McpCallInProgressEvent(**where)),
            self._event(McpCallArgumentsDoneEvent(**where, arguments=call.arguments)),
            *self._mcp_outcome(call),
        ]

    def pending_mcp_calls(self) -> list[McpCallItem]:
        return [item for item in self._items if isinstance(item, McpCallItem) and item.status == "in_progress"]

    @property
    def awaits_approval(self) -> bool:
        return any(isinstance(item, McpApprovalRequestItem) for item in self._items)

    def mcp_call_done(self, call: McpCallItem, output: str | None, error: str | None) -> list[StreamEvent]:
        call.settle(output, error)
        return self._mcp_outcome(call)

    def _mcp_outcome(self, call: McpCallItem) -> list[StreamEvent]:
        index = self._items.index(call)
        where = {"item_id": call.id, "output_index": index}
        outcome = McpCallFailedEvent(**where) if call.status == "failed" else McpCallCompletedEvent(**where)
        return [self._event(outcome), self._event(OutputItemDoneEvent(output_index=index, item=call.model_copy()))]

    def output_so_far(self) -> list[dict[str, Any]]:
        """The items made so far, as the wire has them: the next generation's context."""
        return [item.model_dump(mode="json") for item in self._items]


# Every kind of call the model makes (they count toward max_tool_calls), and what counts as the model having
# answered at all (else the response still gets one empty message).
_CALLS = (
    FunctionCallItem,
    CustomToolCallItem,
    McpCallItem,
    McpApprovalRequestItem,
    LocalShellCallItem,
    ShellCallItem,
    ApplyPatchCallItem,
)
_ANSWERS = (OutputMessage, *_CALLS)


def _custom_input(arguments: str) -> str:
    """A custom tool's input from the JSON a model wrote when it called it as a function of `input`."""
    try:
        parsed = json.loads(arguments)
    except json.JSONDecodeError:
        return arguments
    if isinstance(parsed, dict) and isinstance(parsed.get("input"), str):
        return parsed["input"]
    return arguments
