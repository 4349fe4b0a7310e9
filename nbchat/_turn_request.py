"""The request steps of a turn: limits and compaction before a request, then sending it.

``_prepare_request`` checks the budgets against what was spent, compacts the history
when the prompt nears the context window, and checks the budgets again against the
estimate of the request about to go. ``_send_request`` streams the reply into a
``ReplyAssembler`` and records its usage; a prompt the server refused as too long is
compacted and retried once, and an endpoint that takes no ``response_format`` is asked
through the ``final_answer`` tool instead.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator, Iterable
from typing import Any

from ._assembler import ReplyAssembler
from ._client import truncation_notice
from ._events import Event, LimitReached, MessagesMarked, Notice, UsageEvent
from ._exceptions import ModelAPIError
from ._history import is_context_overflow
from ._limits import Projection
from ._turn_state import LoopState, _Turn, fault_text
from ._types import Message, RequestUsage

__all__ = ["MAX_ROUNDS_NOTE", "REASONING_FIELDS", "RequestSteps", "refuses_json_schema"]

# The field reasoning is sent back in, per wire: chat completions (DeepSeek's and vLLM's
# name), and the Responses API's reasoning items (which _responses puts before the calls).
REASONING_FIELDS = {"chat": "reasoning_content", "responses": "reasoning_items"}
MAX_ROUNDS_NOTE = (
    "You have reached the limit on tool calls for this turn. Do not call tools; "
    "answer now as well as you can with the information you already have."
)


class RequestSteps(LoopState):
    """Checking limits, compacting, sending a request and recording what it used."""

    async def _prepare_request(
        self, turn: _Turn, tools: list[dict[str, Any]] | None
    ) -> AsyncIterator[Event]:
        """Budgets from what was spent, compaction, then the budget the request would need."""
        for event in self._check_budgets(turn):
            yield event
        if turn.status == "running":
            async for event in self._maybe_compact(turn, tools):
                yield event
        if turn.status != "running":
            return
        turn.projection = self._projection(turn, tools)
        for event in self._check_budgets(turn, next_request=turn.projection):
            yield event

    async def _send_request(
        self, turn: _Turn, tools: list[dict[str, Any]] | None, final: bool
    ) -> AsyncIterator[Event]:
        """Stream the request's reply; a prompt refused as too long is compacted, retried once.

        The reply is left in ``turn.reply``, and the error that ended it (if one did) in
        ``turn.failure``.
        """
        # Output guardrails judge the whole reply, so its text is shown once they passed it.
        hold_text = bool(self.output_guardrails)
        retried = False
        while True:
            payload = self._wire_messages(turn)
            if final:
                payload.append({"role": "system", "content": MAX_ROUNDS_NOTE})
            params = turn.settings.request_params
            output = turn.settings.output
            if output is not None:
                payload.append({"role": "system", "content": output.instruction(turn.output_mode)})
                if turn.output_mode == "json_schema":
                    params = {**params, "response_format": output.response_format()}
            assembler = ReplyAssembler(self.id, turn.turn_id, turn.round)
            turn.assembler = turn.reply = assembler
            turn.failure = None
            reserved = turn.projection.cost_usd if turn.projection else None
            self._reserved_usd += reserved or 0.0
            try:
                settings = turn.settings
                async for event in settings.client.astream(
                    payload, assembler, tools=tools, stream=settings.streaming, **params
                ):
                    if not (hold_text and event.kind == "text_delta"):
                        yield self._emit(event)
            except ModelAPIError as exc:
                turn.failure = exc
            except Exception as exc:  # not the server's: the request is recorded as failed too
                turn.failure = ModelAPIError(fault_text(turn, exc))
                raise
            finally:
                # Runs on cancellation too: a request that was cut short is still recorded.
                self._reserved_usd -= reserved or 0.0
                usage_event = self._record_usage(turn, assembler, turn.failure, turn.projection)
            yield usage_event
            for event in self._check_budgets(turn, stop=False):
                yield event
            turn.assembler = None
            error = turn.failure
            cut = (
                self._truncation_notice(turn, assembler)
                if usage_event.suspected_truncation
                else None
            )
            if cut is not None:  # the server probably dropped the start of the prompt
                yield self._emit(Notice(session_id=self.id, turn_id=turn.turn_id, message=cut))
            elif error is None and assembler.usage is not None and not turn.settings.isolated:
                self.estimator.observe(self._messages, _chars(tools), assembler.usage.prompt_tokens)
            if error is not None and _refuses_response_format(error, turn):
                # This endpoint takes no json_schema: ask through a final_answer tool.
                _NO_RESPONSE_FORMAT.add(turn.settings.client.settings.base_url)
                turn.output_mode = "tool"
                assert output is not None
                tools = [*(tools or []), output.tool_spec()]
                turn.extra_requests += 1  # the refused request is not a round of the turn
                continue
            if (
                error is None
                or retried
                or self.compactor is None
                or assembler.chunks
                or not is_context_overflow(error)
            ):
                return
            # The server refused the prompt as too long: compact once, and retry once.
            retried = True
            compactions = turn.compactions
            async for event in self._maybe_compact(turn, tools, overflow=error):
                yield event
            if turn.status != "running" or turn.compactions == compactions:
                return
            turn.extra_requests += 1  # the refused request is not a round of the turn

    def _projection(self, turn: _Turn, tools: list[dict[str, Any]] | None) -> Projection:
        """The estimated size and cost of the request about to be sent."""
        from ._pricing import request_cost

        prompt = self.estimator.estimate(self._context(turn), _chars(tools))
        params = turn.settings.request_params
        client = turn.settings.client
        cap = params.get("max_completion_tokens") or params.get("max_tokens") or 0
        cap = cap if isinstance(cap, int) and cap > 0 else 0
        usage = RequestUsage(prompt_tokens=prompt, completion_tokens=cap)
        cost, _ = request_cost(client.model, client.settings.base_url, usage)
        return Projection(prompt_tokens=prompt, reply_cap=cap, cost_usd=cost)

    def _check_budgets(
        self, turn: _Turn, *, stop: bool = True, next_request: Projection | None = None
    ) -> Iterable[Event]:
        """Say once when a budget cannot be checked; with ``stop``, end the turn at a limit.

        ``next_request`` (the estimate of the request about to go) also stops a request
        that would cross a USD limit.
        """
        spent = self.usage
        if self._reserved_usd and spent.cost_usd is not None:
            # Requests of other turns in flight (isolated turns run at once) count too.
            spent = spent.model_copy(update={"cost_usd": spent.cost_usd + self._reserved_usd})
        check = turn.settings.budgets.check(spent, turn.usage, next_request)
        for notice in check.notices:
            if notice not in self._notices_given:
                self._notices_given.add(notice)
                yield self._emit(Notice(session_id=self.id, turn_id=turn.turn_id, message=notice))
        if stop and check.limit is not None:
            turn.status, turn.error = "budget_exceeded", check.message
            yield self._emit(
                LimitReached(
                    session_id=self.id,
                    turn_id=turn.turn_id,
                    limit=check.limit,
                    message=check.message or "",
                )
            )

    def _truncation_notice(self, turn: _Turn, assembler: ReplyAssembler) -> str | None:
        """One line if the server reported far fewer prompt tokens than were sent."""
        if turn.projection is None or assembler.usage is None:
            return None
        client = turn.settings.client
        return truncation_notice(
            turn.projection.prompt_tokens,
            assembler.usage.prompt_tokens,
            client.cached_context_window(),
        )

    def _replayed(self, turn: _Turn, message: Message) -> str | None:
        """The field a message's reasoning is sent back in, or ``None`` to leave it out.

        ``reasoning_replay="auto"``: within the turn's own tool rounds (models such as
        DeepSeek's refuse a tool round without it), never from earlier turns (it is
        kept in the store); ``"always"`` / ``"never"``.
        """
        if (message.reasoning is None and message.reasoning_items is None) or (
            self.reasoning_replay == "never"
        ):
            return None
        if self.reasoning_replay == "auto" and message.turn_id != turn.turn_id:
            return None
        return REASONING_FIELDS[turn.settings.client.api]

    def _wire_messages(self, turn: _Turn) -> list[dict[str, Any]]:
        """The context as the chat dicts a request sends; a message's dict is made once
        and handed again while it is unchanged, so the client encodes it only once."""
        messages = self._context(turn)

        def convert(m: Message) -> dict[str, Any]:
            return m.to_openai(self._replayed(turn, m))

        if turn.settings.isolated:  # its own few messages; the conversation's are kept
            return joined_user_messages([convert(m) for m in messages])
        replay = (turn.turn_id, self.reasoning_replay, turn.settings.client.api)
        last, again = self._wire_replay, None
        if last is not None and last != replay:
            if last[1:] != replay[1:]:
                again = 0  # another mode or wire: any message's reasoning field may change
            elif self.reasoning_replay == "auto":
                # The last turn's own reasoning was sent back; a later turn's is not.
                again = next((i for i, m in enumerate(messages) if m.turn_id == last[0]
                              and (m.reasoning is not None or m.reasoning_items is not None)),
                             None)  # fmt: skip
        self._wire_replay = replay
        return joined_user_messages(self._wire.convert(messages, convert, reuse_below=again))

    def _context(self, turn: _Turn) -> list[Message]:
        """The messages a request of ``turn`` sends: the conversation, or for an isolated
        turn the system prompt and the turn's own messages."""
        if not turn.settings.isolated:
            return self._messages
        system = [m for m in self._messages if m.role == "system" and m.turn_id is None]
        return system + [m for m in turn.messages if m.state == "active"]

    async def _maybe_compact(
        self,
        turn: _Turn,
        tools: list[dict[str, Any]] | None,
        overflow: ModelAPIError | None = None,
    ) -> AsyncIterator[Event]:
        """Fold the middle of the history when the prompt nears the context window."""
        if self.compactor is None or turn.settings.isolated:
            return
        outcome = await self.compactor.maybe_compact(
            self._messages,
            client=turn.settings.client,
            extra_chars=_chars(tools),
            session_id=self.id,
            turn_id=turn.turn_id,
            round=turn.round,
            overflow=overflow,
        )
        if outcome is None:
            return
        for request in outcome.requests:
            turn.extra_requests += 1
            turn.usage = turn.usage.add(request.usage, request.cost_usd)
            self.usage = self.usage.add(request.usage, request.cost_usd)
            yield self._emit(request)
        if outcome.messages is not None:
            turn.compactions += 1
            self._messages = outcome.messages
            for m in outcome.folded:
                m.state = "compacted"
            yield self._emit(
                MessagesMarked(
                    session_id=self.id,
                    turn_id=turn.turn_id,
                    message_ids=[m.id for m in outcome.folded],
                    state="compacted",
                )
            )
            if outcome.summary is not None:
                # Numbered after the last message it folds (and stored after it), so the
                # store's order is the context's: the summary precedes what was kept.
                yield self._record(outcome.summary, seq=outcome.event.to_seq)
        yield self._emit(outcome.event)
        if outcome.requests:  # the summariser spent: the next request must still fit
            for event in self._check_budgets(turn):
                yield event

    def _record_usage(
        self,
        turn: _Turn,
        assembler: ReplyAssembler,
        error: ModelAPIError | None,
        projection: Projection | None = None,
    ) -> UsageEvent:
        event = turn.settings.client.usage_event(
            assembler, error, interrupted=self._runner.cancel_requested
        )
        if projection is not None:  # kept beside the actual figures
            event.estimated_prompt_tokens = projection.prompt_tokens
            event.estimated_cost_usd = projection.cost_usd
            if error is None:
                event.suspected_truncation = self._truncation_notice(turn, assembler) is not None
        turn.usage = turn.usage.add(event.usage, event.cost_usd)
        self.usage = self.usage.add(event.usage, event.cost_usd)
        return self._emit(event)  # type: ignore[return-value]


def _chars(tools: list[dict[str, Any]] | None) -> int:
    """Characters the tool definitions add to a request (part of its prompt tokens)."""
    return len(json.dumps(tools, separators=(",", ":"))) if tools else 0


# Endpoints that answered a json_schema response_format with an error: typed answers go
# through the final_answer tool there for the rest of the process.
_NO_RESPONSE_FORMAT: set[str] = set()


def refuses_json_schema(base_url: str) -> bool:
    """Whether the endpoint answered a json_schema ``response_format`` with an error."""
    return base_url in _NO_RESPONSE_FORMAT


def _refuses_response_format(error: ModelAPIError, turn: _Turn) -> bool:
    """Whether a request failed because the server does not take ``response_format``."""
    if turn.settings.output is None or turn.output_mode != "json_schema":
        return False
    text = str(error).lower()
    return error.status_code in (400, 422) and any(
        word in text for word in ("response_format", "json_schema", "structured output")
    )


def joined_user_messages(wire: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``wire`` with each run of user messages sent as one message.

    A turn that failed before any reply leaves its question in the conversation, to go
    with the next one (a trial); two user messages in a row are refused by chat
    templates that want roles to alternate. The store keeps them apart; only the
    request joins them (texts by a blank line, content parts in order). Untouched
    messages are the same dicts, so the client's encoding of them is reused.
    """
    if not any(a["role"] == b["role"] == "user" for a, b in itertools.pairwise(wire)):
        return wire
    out: list[dict[str, Any]] = []
    for message in wire:
        before = out[-1] if out else None
        if before is None or not (before["role"] == message["role"] == "user"):
            out.append(message)
            continue
        first, then = before.get("content"), message.get("content")
        if isinstance(first, str) and isinstance(then, str):
            content: Any = f"{first}\n\n{then}" if first and then else first or then
        else:
            content = [*_parts(first), *_parts(then)]
        out[-1] = {**before, "content": content}
    return out


def _parts(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, list):
        return list(content)
    return [{"type": "text", "text": content}] if content else []
