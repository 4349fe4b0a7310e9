"""The ground types: trusted construction matches validation exactly."""

from __future__ import annotations

from nbchat._types import EventAdapter, ReasoningDelta, TextDelta, trusted


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
