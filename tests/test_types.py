"""The ground types: trusted construction matches validation exactly."""

from __future__ import annotations

from nbchat._events import EventAdapter, ReasoningDelta, TextDelta
from nbchat._types import trusted


def test_trusted_events_equal_validated_ones() -> None:
    for cls, kind in ((TextDelta, "text_delta"), (ReasoningDelta, "reasoning_delta")):
        fields = {"session_id": "s", "turn_id": "t", "round": 2, "kind": kind, "text": "hé"}
        fast = trusted(cls, **fields)
        slow = cls(**fields)
        assert fast == slow
        assert fast.model_dump() == slow.model_dump()
        assert fast.model_fields_set == slow.model_fields_set | {"kind", "round"}
        assert EventAdapter.validate_json(fast.model_dump_json()) == slow
        assert fast.model_copy(update={"text": "x"}).text == "x"


def test_an_assistant_message_without_content_or_calls_is_sent_with_empty_text() -> None:
    """Some APIs refuse ``content: null`` without ``tool_calls`` (older stores hold some)."""
    from nbchat import Message, ToolCall

    assert Message(role="assistant", content=None).to_openai()["content"] == ""
    asking = Message(role="assistant", content=None, tool_calls=[ToolCall(id="c", name="t")])
    assert asking.to_openai()["content"] is None
