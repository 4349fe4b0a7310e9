"""One model request's chunks put together into one assistant message.

``ReplyAssembler`` is fed the parsed chunks of one request (``_wire`` and ``_responses``
decode them) and keeps what they add up to: the reply text, the reasoning text, the tool
calls gathered by ``index`` (id, name, argument fragments), the finish reason, the usage
and when the first token came. Each ``feed`` returns the events that chunk produced.
"""

from __future__ import annotations

import time
from typing import Any

from ._events import Event, ReasoningDelta, TextDelta, ToolCallDelta, ToolCallStarted
from ._types import RequestUsage, TextBuffer, ToolCall, new_id, trusted
from ._wire import REASONING_ITEM, error_from_body, request_usage

__all__ = ["ReplyAssembler"]


class _PendingCall:
    __slots__ = ("call_id", "fragments", "name")

    def __init__(self, call_id: str, name: str) -> None:
        self.call_id = call_id
        self.name = name
        self.fragments: list[str] = []


class ReplyAssembler:
    """Assembles the chunks of one model request into one assistant message.

    ``feed`` returns the events a chunk produced (text, reasoning, tool-call start and
    argument fragments), stamped with the session, turn and round they belong to.
    """

    def __init__(self, session_id: str = "", turn_id: str = "", round: int = 0) -> None:
        self.session_id = session_id
        self.turn_id = turn_id
        self.round = round
        self.text_buffer = TextBuffer()
        self.reasoning_buffer = TextBuffer()
        self.calls: dict[int, _PendingCall] = {}
        self.finish_reason: str | None = None
        self.usage: RequestUsage | None = None
        self.model: str | None = None
        self.started = time.perf_counter()
        self.first_token_at: float | None = None  # reasoning counts: the model answered
        self.first_text_at: float | None = None  # the answer itself began
        self.chunks = 0
        # The request's HTTP attempts, each its status (None: no answer), when counted:
        # the openai client retries a 429 or 5xx by itself (``_http.counting_attempts``).
        self.attempts: list[int | None] = []
        # The Responses API's reasoning items, as received: sent back with the tool calls
        # that followed them (the encrypted reasoning of a stateless request).
        self.reasoning_items: list[Any] = []

    @property
    def text(self) -> str:
        """The reply text received so far."""
        return self.text_buffer.text()

    @property
    def reasoning(self) -> str:
        """The reasoning text received so far."""
        return self.reasoning_buffer.text()

    @property
    def first_text_ms(self) -> float | None:
        """Milliseconds from the request to its first answer (text or tool-call) delta."""
        if self.first_text_at is None:
            return None
        return (self.first_text_at - self.started) * 1000

    @property
    def ttft_ms(self) -> float | None:
        """Milliseconds from the request to its first token: reasoning, text or tool call."""
        if self.first_token_at is None:
            return None
        return (self.first_token_at - self.started) * 1000

    def tool_calls(self) -> list[ToolCall]:
        """The tool calls gathered so far, in index order (arguments joined, not parsed)."""
        return [
            ToolCall(id=c.call_id, name=c.name, arguments="".join(c.fragments))
            for _, c in sorted(self.calls.items())
        ]

    def feed(self, chunk: dict[str, Any]) -> list[Event]:
        """Fold one chunk (a ``chat.completion.chunk`` object) in; return its events.

        This runs once per streamed chunk: each field is checked as it is read, and a
        field of the wrong type makes the answer broken (``ValueError``).
        """
        self.chunks += 1
        get = chunk.get
        error = get("error")
        if error is not None:
            raise error_from_body(error)
        if self.model is None:
            model = get("model")
            if model and isinstance(model, str):
                self.model = model
        usage = get("usage")
        if usage is not None:
            self.usage = request_usage(usage) or self.usage
        choices = get("choices")
        if not choices:
            return []
        if not isinstance(choices, list):
            raise ValueError(f"'choices' is not a list: {choices!r:.60}")
        events: list[Event] = []
        for choice in choices:
            if not isinstance(choice, dict):
                raise ValueError(f"a choice is not an object: {choice!r:.60}")
            finish = choice.get("finish_reason")
            if finish:
                self.finish_reason = _string(finish, "finish_reason")
            delta = choice.get("delta") or choice.get("message")
            if not delta:
                continue
            if not isinstance(delta, dict):
                raise ValueError(f"a delta is not an object: {delta!r:.60}")
            content = delta.get("content")
            if content:
                if not isinstance(content, str):
                    raise ValueError(f"'content' is not a string: {content!r:.60}")
                if self.first_text_at is None:
                    self._mark_first_token(answer=True)
                self.text_buffer.append(content)
                events.append(self._text_event(TextDelta, "text_delta", content))
                if len(delta) == 1:
                    continue  # the common chunk: its text is all it holds
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            if reasoning and isinstance(reasoning, str):  # other shapes are not text
                if self.first_token_at is None:
                    self._mark_first_token(answer=False)
                self.reasoning_buffer.append(reasoning)
                events.append(self._text_event(ReasoningDelta, "reasoning_delta", reasoning))
            calls = delta.get("tool_calls")
            if calls:
                if not isinstance(calls, list):
                    raise ValueError(f"'tool_calls' is not a list: {calls!r:.60}")
                self._mark_first_token(answer=True)  # rarer than text: no inline check
                for position, tc in enumerate(calls):
                    events.extend(self._feed_tool_call(tc, position))
            item = delta.get(REASONING_ITEM)
            if item is not None:
                self.reasoning_items.append(item)
        return events

    def _feed_tool_call(self, tc: Any, position: int) -> list[Event]:
        if not isinstance(tc, dict):
            raise ValueError(f"a tool call is not an object: {tc!r:.60}")
        # Some servers omit `index` on non-streamed messages: fall back to the position.
        index = tc.get("index")
        if index is None:
            index = position
        elif not isinstance(index, int) or isinstance(index, bool):
            raise ValueError(f"a tool call's index is not an integer: {index!r:.60}")
        fn = tc.get("function") or {}
        if not isinstance(fn, dict):
            raise ValueError(f"a tool call's function is not an object: {fn!r:.60}")
        name = _optional_string(fn.get("name"), "name")
        arguments = _optional_string(fn.get("arguments"), "arguments")
        events: list[Event] = []
        pending = self.calls.get(index)
        if pending is None:
            call_id = _optional_string(tc.get("id"), "id")
            pending = _PendingCall(call_id or f"call_{new_id()[:24]}", name or "")
            self.calls[index] = pending
            events.append(
                self._stamp(
                    ToolCallStarted.model_construct(
                        index=index, call_id=pending.call_id, name=pending.name
                    )
                )
            )
        elif name and not pending.name:
            pending.name = name
        if arguments:
            pending.fragments.append(arguments)
            events.append(
                self._stamp(
                    ToolCallDelta.model_construct(
                        index=index, call_id=pending.call_id, arguments_delta=arguments
                    )
                )
            )
        return events

    def _text_event(self, cls: type[Any], kind: str, text: str) -> Event:
        """A text or reasoning delta, built without validation (the hot path per chunk)."""
        event: Event = trusted(
            cls,
            session_id=self.session_id,
            turn_id=self.turn_id,
            round=self.round,
            kind=kind,
            text=text,
        )
        return event

    def _stamp(self, event: Any) -> Event:
        event.session_id = self.session_id
        event.turn_id = self.turn_id
        event.round = self.round
        return event  # type: ignore[no-any-return]

    def _mark_first_token(self, *, answer: bool) -> None:
        if self.first_text_at is not None:
            return  # both are known (the common case, once per chunk)
        now = time.perf_counter()
        if self.first_token_at is None:
            self.first_token_at = now
        if answer:
            self.first_text_at = now


def _string(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{field!r} is not a string: {value!r:.60}")
    return value


def _optional_string(value: Any, field: str) -> str | None:
    return None if value is None else _string(value, field)
