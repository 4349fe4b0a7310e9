"""The reply steps of a turn: what a reply, or a failed request, does to the conversation.

A reply is judged by the output guardrails (held-back text shown once they pass it),
added to the history, and its tool calls (made acceptable to send back) are what runs
next; a typed answer is validated, and explained to the model when it does not fit. A
failed request keeps the text that arrived; one the server refused as sent, before any
answer, leaves the conversation. ``_run_tools`` runs a round's calls once the message
asking for them is durable.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterable
from typing import Literal

from ._assembler import ReplyAssembler
from ._events import ErrorEvent, Event, LimitReached, MessagesMarked, Notice, TextDelta, ToolResult
from ._exceptions import GuardrailRejected, ModelAPIError
from ._limits import apply_guardrails
from ._output import FINAL_ANSWER_TOOL, Parsed
from ._text import valid_text
from ._tool_results import DECLINED, NOT_RUN
from ._tools import INVALID_TOOL_NAME, error_payload, valid_tool_name
from ._turn_state import LoopState, _Turn
from ._types import Message, MessageStatus, ToolCall, ToolCallRecord, new_id

__all__ = ["ReplySteps", "tool_message"]


class ReplySteps(LoopState):
    """Taking a reply (or a failure) into the history, and running its tool calls."""

    def _request_failed(
        self, turn: _Turn, assembler: ReplyAssembler, error: ModelAPIError
    ) -> Iterable[Event]:
        """End the turn on a failed request, keeping the text that arrived before it."""
        turn.status, turn.error = "error", str(error)
        if assembler.text:
            message = self._assistant(turn, assembler, status="error", with_calls=False)
            yield from self._judge_reply(turn, message, rejection_ends_turn=False)
            if message.state == "active":
                turn.text = message.content or ""
                yield self._add(message, turn)
        yield self._emit(
            ErrorEvent(
                session_id=self.id,
                turn_id=turn.turn_id,
                message=str(error),
                error_kind="model_api",
                status_code=error.status_code,
            )
        )
        refused = error.status_code in _REFUSED_AS_SENT
        if refused and not any(m.role == "assistant" for m in turn.messages):
            yield from self._withdraw(turn)

    def _withdraw(self, turn: _Turn) -> Iterable[Event]:
        """A turn the server refused as sent, before any answer, leaves the conversation
        (stored, marked superseded), as a rejected input does: what it refused (an image a
        text-only model cannot read) would fail every later turn that sent it again."""
        ids = {m.id for m in turn.messages if m.state == "active"}
        if not ids:
            return
        self._messages = [m for m in self._messages if m.id not in ids]
        for m in turn.messages:
            if m.id in ids:
                m.state = "superseded"
        yield self._emit(
            MessagesMarked(session_id=self.id, message_ids=sorted(ids), state="superseded")
        )

    def _take_reply(self, turn: _Turn, assembler: ReplyAssembler, final: bool) -> Iterable[Event]:
        """Judge the reply, add it to the history; its tool calls are what runs next."""
        message = self._assistant(turn, assembler, status="ok", with_calls=True)
        if not message.content and not message.tool_calls and turn.settings.output is None:
            yield from self._empty_reply(turn, assembler, message)
            return
        if assembler.finish_reason == "length":  # the server stopped at max_tokens
            turn.truncated = True
            yield self._emit(
                Notice(
                    session_id=self.id,
                    turn_id=turn.turn_id,
                    message="The reply was cut off at the reply length limit (max_tokens); "
                    "ask the model to continue, or allow a longer reply.",
                )
            )
        if message.content or not message.tool_calls:
            yield from self._judge_reply(turn, message)
            if turn.status != "running":
                return
        if turn.settings.output is not None:
            yield from self._take_output(turn, message, final)
            return
        turn.text = message.content or ""
        yield self._add(message, turn)
        if final and (turn.round > 0 or message.tool_calls):
            # Tool rounds were cut short (not merely absent); calls the model made anyway
            # are answered as not run, so the history stays valid and no block waits.
            n = turn.settings.max_rounds
            turn.status = "max_rounds"
            # The result says why the turn ended, as a budget's does: the limit's notice.
            turn.error = (
                f"Stopped after {n} round{'' if n == 1 else 's'} of tool calls "
                "(max_rounds); the last answer was asked for without tools."
            )
            yield from self._not_run(
                turn,
                message.tool_calls or [],
                f"Not run: the limit on tool rounds for this turn (max_rounds={n}) was reached.",
            )
            yield self._emit(
                LimitReached(
                    session_id=self.id,
                    turn_id=turn.turn_id,
                    limit="max_rounds",
                    message=turn.error,
                )
            )
            return
        turn.unanswered = list(message.tool_calls or [])
        turn.tools_started = None  # asked for, not running yet

    def _empty_reply(
        self, turn: _Turn, assembler: ReplyAssembler, message: Message
    ) -> Iterable[Event]:
        """A reply with neither text nor tool calls is not an answer: the turn fails saying
        why. The reply is stored out of the conversation, and so is the user's message
        when nothing else of the turn is in it: an assistant message without content is
        refused by some APIs, and two user messages in a row by some chat templates."""
        reason = assembler.finish_reason
        if reason == "length":
            spent = " (spent on reasoning)" if message.reasoning else ""
            why = f"it was cut off at max_tokens{spent} before any answer text"
        elif reason == "content_filter":
            why = "the server's content filter stopped it"
        else:
            why = f"finish reason {reason!r}" if reason else "no finish reason"
        turn.status = "error"
        turn.error = (
            f"The model sent an empty reply ({why}); it is left out of the conversation. "
            "Send the message again (re-run the cell) to ask again."
        )
        message.status, message.state = "error", "superseded"
        turn.truncated = reason == "length"
        yield self._record(message, turn)
        if not any(m.role == "assistant" and m.state == "active" for m in turn.messages):
            yield from self._withdraw(turn)
        yield self._turn_error(turn, "empty_reply")

    def _not_run(self, turn: _Turn, calls: list[ToolCall], why: str) -> Iterable[Event]:
        """Answer ``calls`` without running them: a result each, so no call is left open."""
        payload = error_payload(NOT_RUN, why)
        for call in calls:
            yield from self._answer_unfinished(
                turn, call, payload, NOT_RUN, is_error=False, duration_ms=0.0
            )

    def _answer_unfinished(
        self,
        turn: _Turn,
        call: ToolCall,
        payload: str,
        kind: Literal["cancelled", "not_run"],
        *,
        is_error: bool,
        duration_ms: float | None,
    ) -> Iterable[Event]:
        """Answer a call that did not finish (stopped, or never run): its tool message and,
        with a ``duration_ms`` (it ran, or is shown as not run), its tool-call record."""
        if duration_ms is not None:
            record = ToolCallRecord(
                call_id=call.id,
                name=call.name,
                arguments=call.arguments,
                result=payload,
                is_error=is_error,
                error_kind=kind,
                duration_ms=duration_ms,
                turn_id=turn.turn_id,
                round=turn.round,
            )
            turn.tool_calls.append(record)
            yield self._emit(ToolResult(session_id=self.id, turn_id=turn.turn_id, call=record))
        yield self._add(tool_message(turn, call.id, call.name, payload, kind), turn)

    def _take_output(self, turn: _Turn, message: Message, final: bool) -> Iterable[Event]:
        """Validate a typed answer (the reply's JSON, or the final_answer tool's arguments).

        A valid answer ends the turn; an invalid one is explained to the model, which gets
        ``output_retries`` more tries; then the turn ends ``error`` with the reason.
        """
        spec = turn.settings.output
        assert spec is not None
        answer = next((c for c in message.tool_calls or [] if c.name == FINAL_ANSWER_TOOL), None)
        others = [c for c in message.tool_calls or [] if c.name != FINAL_ANSWER_TOOL]
        if answer is None and others and not final:  # other tools first: run them
            yield self._add(message, turn)
            turn.unanswered, turn.tools_started = others, None
            return
        if answer is not None:
            parsed = spec.parse(answer.arguments)
        elif turn.output_mode == "tool":
            parsed = Parsed(error=f"no {FINAL_ANSWER_TOOL} call (answer through the tool)")
        else:
            parsed = spec.parse(message.content or "")
        turn.text = message.content or (answer.arguments if answer is not None else "")
        yield self._add(message, turn)
        if message.tool_calls:  # every call gets its answer, so the history stays valid
            for call in message.tool_calls:
                if call is answer:
                    content = (
                        "ok"
                        if parsed.error is None
                        else error_payload("invalid_answer", spec.correction(parsed.error))
                    )
                else:
                    content = error_payload("not_run", "Not run: the final answer was given.")
                yield self._add(tool_message(turn, call.id, call.name, content, "ok"), turn)
        if parsed.error is None:
            turn.output = parsed.value
            return
        turn.output_tries += 1
        if turn.output_tries > self.output_retries:
            turn.status = "error"
            turn.error = (
                f"The model's answer did not fit {spec.name} after {turn.output_tries} "
                f"tries: {parsed.error}."
            )
            yield self._turn_error(turn, "invalid_output")
            return
        if answer is None:  # the correction goes to the model as the user's next words
            correction = Message(
                role="user",
                content=spec.correction(parsed.error),
                turn_id=turn.turn_id,
                round=turn.round,
                cell_id=turn.cell_id,
            )
            yield self._add(correction, turn)
        turn.ask_again = True

    def _judge_reply(
        self, turn: _Turn, message: Message, *, rejection_ends_turn: bool = True
    ) -> Iterable[Event]:
        """Run the output guardrails over a reply's text, then show text that was held.

        A rejected reply is stored as rejected and superseded (out of the conversation);
        with ``rejection_ends_turn`` the turn ends as ``rejected``.
        """
        if not self.output_guardrails:
            return
        try:
            message.content = apply_guardrails(message.content or "", self.output_guardrails)
        except GuardrailRejected as exc:
            message.status, message.state = "rejected", "superseded"
            if rejection_ends_turn:
                turn.status, turn.error = "rejected", f"Reply rejected by a guardrail: {exc}"
            yield self._record(message, turn)
            if rejection_ends_turn:
                yield self._turn_error(turn, "guardrail")
            return
        if message.content:  # held back from display until now
            yield self._emit(
                TextDelta(
                    session_id=self.id, turn_id=turn.turn_id, text=message.content, round=turn.round
                )
            )

    def _assistant(
        self, turn: _Turn, assembler: ReplyAssembler, *, status: MessageStatus, with_calls: bool
    ) -> Message:
        calls = self._valid_calls(turn, assembler.tool_calls()) if with_calls else []
        return Message(
            role="assistant",
            content=assembler.text or None,
            reasoning=assembler.reasoning or None,
            reasoning_items=assembler.reasoning_items or None,
            tool_calls=calls or None,
            turn_id=turn.turn_id,
            round=turn.round,
            cell_id=turn.cell_id,
            status=status,
        )

    def _valid_calls(self, turn: _Turn, calls: list[ToolCall]) -> list[ToolCall]:
        """The model's tool calls made acceptable to send back, before they are stored.

        OpenAI refuses every later request of a conversation that holds a tool call with
        an empty or malformed name, or two calls with one id. A nameless call keeps its
        place under a placeholder name and is answered with an error the model can read;
        an id used before in this conversation gets a fresh one.
        """
        seen = {c.id for m in self._messages if m.tool_calls for c in m.tool_calls}
        fixed = []
        for call in calls:
            if call.id in seen or not call.id:
                call = call.model_copy(update={"id": f"call_{new_id()[:24]}"})
            call.arguments = valid_text(call.arguments)
            if not valid_tool_name(call.name):
                turn.bad_names[call.id] = call.name
                call = call.model_copy(update={"name": INVALID_TOOL_NAME})
            seen.add(call.id)
            fixed.append(call)
        return fixed

    async def _run_tools(self, turn: _Turn, calls: list[ToolCall]) -> AsyncIterator[Event]:
        """Run the round's tool calls together; append their results in call order."""
        turn.unanswered = list(calls)
        await self._barrier()  # the message asking for these tools is stored before they run
        turn.tools_started = time.perf_counter()
        records = await turn.settings.tools.run(
            calls, turn_id=turn.turn_id, round=turn.round, bad_names=turn.bad_names
        )
        for record in records:
            turn.tool_calls.append(record)
            yield self._emit(ToolResult(session_id=self.id, turn_id=turn.turn_id, call=record))
            turn.unanswered = [c for c in turn.unanswered if c.id != record.call_id]
            status: MessageStatus = "error" if record.is_error else "ok"
            if record.error_kind == DECLINED:
                status = "declined"
            message = tool_message(turn, record.call_id, record.name, record.result, status)
            yield self._add(message, turn)
            if record.error_kind == "interrupted":  # Ctrl-C inside a tool stops the turn
                turn.status = "interrupted"
        # Chat tool messages carry text only: the images tools returned follow as one
        # user message, after every result of the round (the peers' way, see README).
        returned = [(r, image) for r in records for image in r.images or []]
        if returned:
            names = ", ".join(dict.fromkeys(f"`{r.name}`" for r, _ in returned))
            plural = "s" if len(returned) > 1 else ""
            message = Message(
                role="user",
                content=f"Image{plural} returned by {names}:",
                attachments=[image for _, image in returned],
                turn_id=turn.turn_id,
                round=turn.round,
                cell_id=turn.cell_id,
            )
            yield self._add(message, turn)


# Statuses that say the request itself cannot be served, however often it is sent: a
# bad request, too large, an unsupported media type, unprocessable. (429, 5xx, 401, 404
# and timeouts are not: the same message may well go through later, so it stays.)
_REFUSED_AS_SENT = frozenset({400, 413, 415, 422})


def tool_message(
    turn: _Turn, call_id: str, name: str, content: str, status: MessageStatus
) -> Message:
    """The tool-result message answering ``call_id`` in this turn's current round."""
    return Message(
        role="tool",
        content=content,
        tool_call_id=call_id,
        name=name,
        turn_id=turn.turn_id,
        round=turn.round,
        cell_id=turn.cell_id,
        status=status,
    )
