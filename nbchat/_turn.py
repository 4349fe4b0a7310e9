"""One turn of the loop, as named steps: start → prepare_request → send_request →
take_reply / request_failed → run_tools → … → finish.

``TurnLoop`` is mixed into ``Session``, whose state the steps use (``_turn_state``
declares it). The request steps are ``_turn_request``'s, the reply steps
``_turn_reply``'s; here is the turn itself: its start, its rounds, an interruption and
its end. Every step emits typed events; the session hands each to the store first.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterable

from ._config import require_key
from ._events import Event, MessagesMarked, TurnFinished, TurnStarted
from ._exceptions import GuardrailRejected
from ._images import refuse_images
from ._limits import apply_guardrails
from ._output import OutputMode
from ._text import valid_text
from ._tools import error_payload
from ._turn_reply import ReplySteps
from ._turn_request import RequestSteps, refuses_json_schema
from ._turn_state import TurnOptions, _Turn, fault_text
from ._types import ImagePart, Message, TurnResult, new_id

__all__ = ["TurnLoop", "TurnOptions"]


class TurnLoop(RequestSteps, ReplySteps):
    """The steps of one turn (mixed into ``Session``, which sets the state they use)."""

    async def _turn(
        self,
        text: str | None,
        cell_id: str | None,
        *,
        resume: bool = False,
        options: TurnOptions | None = None,
        turn_id: str | None = None,
        images: list[ImagePart] | None = None,
    ) -> AsyncIterator[Event]:
        settings = self._turn_settings(options)
        # Before the turn starts, as an unreadable attachment is: nothing is stored or sent.
        refuse_images(settings.client.settings.base_url, images)
        require_key(settings.client.settings)  # a session opened only to be read
        if resume:
            last = next(m for m in reversed(self._messages) if m.role == "assistant")
            turn = _Turn(last.turn_id or new_id(), last.cell_id, settings)
        else:
            turn = _Turn(turn_id or new_id(), cell_id, settings)
        if settings.output is not None:
            endpoint = settings.client.settings.base_url
            refused = refuses_json_schema(endpoint)
            auto: OutputMode = "tool" if refused else "json_schema"
            turn.output_mode = auto if self.output_mode == "auto" else self.output_mode
        yield self._emit(
            TurnStarted(
                session_id=self.id,
                turn_id=turn.turn_id,
                text=text or "",
                cell_id=cell_id,
                attachments=images or None,
            )
        )
        fault: Exception | None = None
        try:
            if resume:
                async for event in self._run_tools(turn, self.pending_tool_calls):
                    yield event
            else:
                assert text is not None
                for event in self._start(turn, text, images):
                    yield event
            while turn.status == "running":
                async for event in self._request_model(turn):
                    yield event
                if turn.ask_again:  # a typed answer did not validate: one more try
                    turn.ask_again = False
                    turn.round += 1
                    continue
                if turn.status != "running" or not turn.unanswered:
                    break
                async for event in self._run_tools(turn, turn.unanswered):
                    yield event
                turn.round += 1
        except asyncio.CancelledError:
            for event in self._interrupted(turn):
                yield event
        except Exception as exc:  # a bug (nbchat's, or a hook's or guardrail's): raised below
            fault = exc
            turn.status, turn.error = "error", fault_text(turn, exc)
            yield self._turn_error(turn, "internal")
        yield self._finish(turn)  # stored as failed, never left "running"
        # A stop that comes after the turn ended (■ or Ctrl-C as it finishes) has nothing
        # left to stop; the writer keeps going in the background.
        with contextlib.suppress(asyncio.CancelledError):
            await self._barrier()  # a turn is stored by the time send() returns
        if fault is not None:
            raise fault  # with its traceback: a bug should be seen, not summed up

    def _start(self, turn: _Turn, text: str, images: list[ImagePart] | None) -> Iterable[Event]:
        """Guard the user's text, fork the conversation on a cell re-run, add the message."""
        if turn.cell_id is not None:
            yield from self._supersede_cell(turn.cell_id)
        text = valid_text(text)
        try:
            text = apply_guardrails(text, self.input_guardrails)
        except GuardrailRejected as exc:
            turn.status, turn.error = "rejected", f"Input rejected by a guardrail: {exc}"
            yield self._record(
                Message(
                    role="user",
                    content=text,
                    attachments=images or None,
                    turn_id=turn.turn_id,
                    cell_id=turn.cell_id,
                    status="rejected",
                    state="superseded",
                ),
                turn,
            )
            yield self._turn_error(turn, "guardrail")
            return
        message = Message(
            role="user",
            content=text,
            attachments=images or None,
            turn_id=turn.turn_id,
            cell_id=turn.cell_id,
        )
        yield self._add(message, turn)

    def _supersede_cell(self, cell_id: str) -> Iterable[Event]:
        """Re-running a cell replaces its earlier turn and everything after it."""
        start = next(
            (i for i, m in enumerate(self._messages) if m.role == "user" and m.cell_id == cell_id),
            None,
        )
        if start is None:
            return
        dropped, self._messages = self._messages[start:], self._messages[:start]
        for m in dropped:
            m.state = "superseded"
        yield self._emit(
            MessagesMarked(
                session_id=self.id, message_ids=[m.id for m in dropped], state="superseded"
            )
        )

    async def _request_model(self, turn: _Turn) -> AsyncIterator[Event]:
        """One round's request: check limits → send it → take the reply into the history."""
        final = turn.round >= turn.settings.max_rounds
        tools = None if final else turn.settings.tools.specs() or None
        output = turn.settings.output
        if output is not None and turn.output_mode == "tool":
            tools = [*(tools or []), output.tool_spec()]  # even in the last round
        async for event in self._prepare_request(turn, tools):
            yield event
        if turn.status != "running":
            return
        async for event in self._send_request(turn, tools, final):
            yield event
        assembler = turn.reply
        if turn.status != "running" or assembler is None:
            return
        if turn.failure is not None:
            for event in self._request_failed(turn, assembler, turn.failure):
                yield event
            return
        for event in self._take_reply(turn, assembler, final):
            yield event

    def _interrupted(self, turn: _Turn) -> Iterable[Event]:
        """Keep what arrived, and answer every dangling tool call so the history stays valid."""
        turn.status = "interrupted"
        assembler = turn.assembler
        if assembler is not None and assembler.text:
            message = self._assistant(turn, assembler, status="interrupted", with_calls=False)
            # Partial text held back from display is judged before it is shown.
            yield from self._judge_reply(turn, message, rejection_ends_turn=False)
            if message.state == "active":
                turn.text = message.content or ""
                yield self._add(message, turn)
        stopped = error_payload(
            "cancelled", "The user stopped this turn before the tool call finished."
        )
        started = turn.tools_started
        for call in turn.unanswered:
            # One that was running is recorded as a cancelled tool call.
            ran = None if started is None else (time.perf_counter() - started) * 1000
            yield from self._answer_unfinished(
                turn, call, stopped, "cancelled", is_error=True, duration_ms=ran
            )
        turn.unanswered = []

    def _finish(self, turn: _Turn) -> Event:
        if turn.status == "running":  # nothing stopped it: it ran to its end
            turn.status = "completed"
        result = TurnResult(
            session_id=self.id,
            turn_id=turn.turn_id,
            status=turn.status,
            text=turn.text,
            usage=turn.usage,
            tool_calls=turn.tool_calls,
            messages=turn.messages,
            rounds=turn.usage.requests - turn.extra_requests,
            error=turn.error,
            duration_ms=(time.perf_counter() - turn.started) * 1000,
            output=turn.output,
            truncated=turn.truncated,
            reasoning="".join(m.reasoning or "" for m in turn.messages if m.role == "assistant"),
        )
        return self._emit(TurnFinished(session_id=self.id, turn_id=turn.turn_id, result=result))
