"""The ground floor: messages, their parts, tool calls, usage and turn results.

Everything here is a pydantic model, so messages and the events that carry them
(``_events.py``) are written to and read from the store as JSON. Nothing here does I/O.
"""

from __future__ import annotations

import base64
import math
import uuid
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

Role = Literal["system", "user", "assistant", "tool"]
MessageState = Literal["active", "compacted", "superseded"]
# How a message ended. "ok" for every normally finished message; the others say why not.
# "declined": a tool call the user chose not to run; "not_run": one made past the turn's
# limit on tool rounds (neither is an error).
MessageStatus = Literal[
    "ok",
    "interrupted",
    "error",
    "cancelled",
    "aborted",
    "rejected",
    "summary",
    "declined",
    "not_run",
]
# The first words of a compaction's summary message (status "summary"): the model reads
# what it is, and views show it as a summary rather than the system's words.
SUMMARY_HEADER = (
    "[Summary of the earlier part of this conversation; the original messages were "
    "folded into it to save context space.]\n\n"
)
# "running" until a turn ends; "aborted": its pending tool calls were closed by
# abort_pending() after the process running it stopped.
TurnStatus = Literal[
    "running",
    "completed",
    "interrupted",
    "max_rounds",
    "budget_exceeded",
    "error",
    "rejected",
    "aborted",
]


# "server": the server reported the cost; "registered": the user's register_price;
# "genai-prices": its bundled price data; "free": a model marked free (local).
CostSource = Literal["server", "genai-prices", "registered", "free"]


def new_id() -> str:
    """A fresh random identifier (32 hex characters)."""
    return uuid.uuid4().hex


def utcnow() -> datetime:
    """The current time, timezone-aware in UTC."""
    return datetime.now(UTC)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


M = TypeVar("M", bound=BaseModel)


def trusted(cls: type[M], **values: Any) -> M:
    """``cls`` built from ``values`` that are already valid and complete (every field).

    For the events made per streamed chunk, where ``model_construct`` (defaults looked
    up and copied for each) is a sixth of nbchat's cost per chunk. It sets what
    ``model_construct`` sets; tests/test_types.py checks the result equals the validated
    model, so a pydantic release that changes those attributes fails loudly there.
    """
    obj = _new(cls)
    _set_dict(obj, values)
    _set_fields_set(obj, set(values))
    _set_extra(obj, None)
    _set_private(obj, None)
    return obj


# BaseModel's slots, set through their descriptors: half the cost of object.__setattr__
# by name (which looks each one up again), for an object built per streamed chunk.
_new = object.__new__
_set_dict = BaseModel.__dict__["__dict__"].__set__
_set_fields_set = BaseModel.__dict__["__pydantic_fields_set__"].__set__
_set_extra = BaseModel.__dict__["__pydantic_extra__"].__set__
_set_private = BaseModel.__dict__["__pydantic_private__"].__set__


class TextBuffer:
    """Collects streamed text pieces in memory linear in the text, whatever the piece size.

    A list of thousands of 4-character strings costs ~14x the text in object headers;
    pieces are joined into blocks every ``block`` pieces, so the overhead stays small and
    no piece is copied more than twice.
    """

    __slots__ = ("_blocks", "_pieces", "block", "size")

    def __init__(self, block: int = 256) -> None:
        self._blocks: list[str] = []
        self._pieces: list[str] = []
        self.block = block
        self.size = 0

    def append(self, piece: str) -> None:
        """Add a piece of text."""
        self._pieces.append(piece)
        self.size += len(piece)
        if len(self._pieces) >= self.block:
            self._blocks.append("".join(self._pieces))
            self._pieces.clear()

    def __len__(self) -> int:
        return self.size

    def __bool__(self) -> bool:
        return self.size > 0

    def text(self) -> str:
        """All the text so far."""
        return "".join(self._blocks) + "".join(self._pieces)


# --------------------------------------------------------------------------- messages


class ToolCall(_Model):
    """A tool call as the model asked for it; ``arguments`` is the raw JSON text."""

    id: str
    name: str
    arguments: str = ""

    def to_openai(self) -> dict[str, Any]:
        """This call in OpenAI's chat format."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


ImageDetail = Literal["auto", "low", "high"]


class ImagePart(_Model):
    """An image a message carries: its bytes (sniffed, never trusted by name) or a URL.

    ``sha256`` identifies it (of the bytes, or of the URL): the store keeps each image
    once. A part loaded from the store without its bytes has ``data`` None and
    ``stored`` True; the store fills the bytes in when a session is resumed.
    """

    model_config = ConfigDict(extra="forbid", ser_json_bytes="base64", val_json_bytes="base64")

    part_kind: Literal["image"] = "image"
    mime: str
    sha256: str
    size: int = 0  # bytes; 0 for a URL
    data: bytes | None = None
    url: str | None = None  # an http(s) URL the server fetches itself
    width: int | None = None
    height: int | None = None
    detail: ImageDetail = "auto"
    name: str | None = None  # where it came from: "fig", "plot.png", "tool make_plot"

    def __repr_args__(self) -> Any:  # the bytes as their length: a repr stays readable
        for name, value in super().__repr_args__():
            yield name, (f"<{len(value):,} bytes>" if name == "data" and value else value)

    @property
    def label(self) -> str:
        """A short description for text-only places: ``[image: fig, 640×480 png]``."""
        shape = f"{self.width}×{self.height} " if self.width and self.height else ""
        kind = self.mime.split("/")[-1]
        name = f"{self.name}, " if self.name else ""
        return f"[image: {name}{shape}{kind}]"

    def tokens(self) -> int:
        """Prompt tokens the image costs by OpenAI's rule (never by its base64 length).

        ``low``: 85. Otherwise the image is fitted into 2048×2048, its short side brought
        down to 768, and each 512-px tile costs 170 more. An unknown size counts as 1024².
        """
        if self.detail == "low":
            return 85
        w, h = float(self.width or 1024), float(self.height or 1024)
        fit = min(1.0, 2048 / max(w, h))
        w, h = w * fit, h * fit
        short = min(1.0, 768 / min(w, h))
        w, h = w * short, h * short
        return 85 + 170 * math.ceil(w / 512) * math.ceil(h / 512)

    def source(self) -> str:
        """The URL the wire carries: a ``data:`` URL of the bytes, or the http(s) URL."""
        if self.data is not None:
            return f"data:{self.mime};base64,{base64.b64encode(self.data).decode()}"
        if self.url is not None:
            return self.url
        raise ValueError(f"{self.label} has neither bytes nor a URL (not loaded from the store?)")

    def to_openai(self) -> dict[str, Any]:
        """This image as a chat completions content part."""
        image: dict[str, Any] = {"url": self.source()}
        if self.detail != "auto":
            image["detail"] = self.detail
        return {"type": "image_url", "image_url": image}

    def ref(self) -> dict[str, Any]:
        """What a message row keeps of it: everything but the bytes."""
        return self.model_dump(exclude={"data", "part_kind"}, exclude_defaults=False)


class Message(_Model):
    """One message of a conversation, with the bookkeeping the store keeps beside it.

    The wire parts are ``content`` (the text), ``reasoning`` (an assistant's thinking)
    and ``attachments`` (images, sent after the text as content parts); ``to_openai``
    is their one mapping to the chat format (the Responses client maps that in turn).
    The rest is bookkeeping: the conversation's order, turn, cell and state.
    """

    role: Role
    content: str | None = None
    reasoning: str | None = None  # what a reasoning model thought before this reply
    attachments: list[ImagePart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    # The Responses API's reasoning items (id, summary, encrypted content) this reply came
    # with: sent back with its tool calls. Opaque, and kept in memory only (not stored).
    reasoning_items: list[dict[str, Any]] | None = Field(default=None, exclude=True)

    id: str = Field(default_factory=new_id)
    seq: int = 0
    turn_id: str | None = None
    round: int | None = None
    cell_id: str | None = None
    status: MessageStatus = "ok"
    state: MessageState = "active"
    created_at: datetime = Field(default_factory=utcnow)

    def to_openai(self, reasoning_field: str | None = None) -> dict[str, Any]:
        """This message as the dict the chat completions API expects.

        Its reasoning goes along only when ``reasoning_field`` names the field to put it
        in (``"reasoning_content"``: some servers want it back within a turn), or with
        ``"reasoning_items"`` its Responses API items (which that wire sends back).
        """
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.content is None and self.role == "assistant" and not self.tool_calls:
            # Neither content nor calls is refused by some APIs (a store from before
            # empty replies were left out of the conversation may hold one).
            out["content"] = ""
        if self.attachments:
            text = [{"type": "text", "text": self.content}] if self.content else []
            out["content"] = text + [part.to_openai() for part in self.attachments]
        if reasoning_field == "reasoning_items":
            if self.reasoning_items:
                out[reasoning_field] = self.reasoning_items
        elif reasoning_field is not None and self.reasoning:
            out[reasoning_field] = self.reasoning
        if self.name is not None:
            out["name"] = self.name
        if self.tool_calls:
            out["tool_calls"] = [tc.to_openai() for tc in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


# --------------------------------------------------------------------------- usage


class RequestUsage(_Model):
    """Token counts of one model request, as the server reported them.

    A field is ``None`` when the server did not report it: unknown, never zero.
    """

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    reasoning_tokens: int | None = None
    # Prompt tokens written to the provider's cache (priced above plain input by some).
    cache_write_tokens: int | None = None
    # The request's cost as the server itself reported it (OpenRouter's ``usage.cost``).
    reported_cost_usd: float | None = None

    @property
    def total_tokens(self) -> int | None:
        """Prompt plus completion tokens, or ``None`` if either is unknown."""
        if self.prompt_tokens is None or self.completion_tokens is None:
            return None
        return self.prompt_tokens + self.completion_tokens


def _add(a: int | float | None, b: int | float | None) -> Any:
    return None if a is None or b is None else a + b


class Usage(_Model):
    """Usage summed over several requests (a turn or a session).

    A total is ``None`` as soon as one request in it is unknown, so a sum is never
    smaller than the truth without saying so. ``requests`` counts every request.
    ``known_tokens`` and ``known_cost_usd`` sum the requests whose figures are known, and
    ``requests_without_tokens`` / ``requests_without_cost`` count the others: what can
    be said ("≥ 1,234 tokens", "$0.02 + 1 unknown") when a total is ``None``.
    """

    requests: int = 0
    prompt_tokens: int | None = 0
    completion_tokens: int | None = 0
    cached_tokens: int | None = 0
    reasoning_tokens: int | None = 0
    cost_usd: float | None = 0.0
    known_tokens: int = 0  # prompt + completion of the requests that reported both
    known_cost_usd: float = 0.0
    requests_without_tokens: int = 0
    requests_without_cost: int = 0

    @property
    def total_tokens(self) -> int | None:
        """Prompt plus completion tokens, or ``None`` if unknown."""
        total: int | None = _add(self.prompt_tokens, self.completion_tokens)
        return total

    def add(self, usage: RequestUsage | None, cost_usd: float | None) -> Usage:
        """A new total with one more request added."""
        u = usage or RequestUsage()
        tokens = u.total_tokens
        return self + Usage(
            requests=1,
            prompt_tokens=u.prompt_tokens,
            completion_tokens=u.completion_tokens,
            # cached/reasoning tokens are often simply not reported: count them as 0.
            cached_tokens=u.cached_tokens or 0,
            reasoning_tokens=u.reasoning_tokens or 0,
            cost_usd=cost_usd,
            known_tokens=tokens or 0,
            known_cost_usd=cost_usd or 0.0,
            requests_without_tokens=int(tokens is None),
            requests_without_cost=int(cost_usd is None),
        )

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            requests=self.requests + other.requests,
            prompt_tokens=_add(self.prompt_tokens, other.prompt_tokens),
            completion_tokens=_add(self.completion_tokens, other.completion_tokens),
            cached_tokens=_add(self.cached_tokens, other.cached_tokens),
            reasoning_tokens=_add(self.reasoning_tokens, other.reasoning_tokens),
            cost_usd=_add(self.cost_usd, other.cost_usd),
            known_tokens=self.known_tokens + other.known_tokens,
            known_cost_usd=self.known_cost_usd + other.known_cost_usd,
            requests_without_tokens=self.requests_without_tokens + other.requests_without_tokens,
            requests_without_cost=self.requests_without_cost + other.requests_without_cost,
        )


# --------------------------------------------------------------------------- results


class ToolCallRecord(_Model):
    """A tool call that ran (or failed to), as shown to users and stored."""

    call_id: str
    name: str
    arguments: str
    result: str
    is_error: bool = False
    error_kind: str | None = None
    duration_ms: float = 0.0
    turn_id: str | None = None
    round: int | None = None
    id: str = Field(default_factory=new_id)  # the stored row's key: call ids get reused
    # Images the tool returned: shown in its block, sent to the model after the results.
    images: list[ImagePart] | None = None

    @property
    def parsed_arguments(self) -> Any:
        """The arguments decoded from JSON, or the raw text if they are not valid JSON."""
        import json

        try:
            return json.loads(self.arguments)
        except ValueError:
            return self.arguments


class TurnResult(_Model):
    """What one ``Session.send()`` produced."""

    session_id: str
    turn_id: str
    status: TurnStatus
    text: str = ""
    usage: Usage = Field(default_factory=Usage)
    tool_calls: list[ToolCallRecord] = Field(default_factory=list)
    messages: list[Message] = Field(default_factory=list)
    rounds: int = 0
    error: str | None = None
    duration_ms: float = 0.0
    reasoning: str = ""  # the turn's reasoning text (servers that stream it), in order
    output: Any = None  # the validated answer of a turn asked for a type (output_type=...)
    truncated: bool = False  # a reply was cut at max_tokens (finish_reason "length")

    @property
    def cost_usd(self) -> float | None:
        """Dollar cost of the turn, ``None`` when any request's price is unknown."""
        return self.usage.cost_usd


ToolCallsAdapter: TypeAdapter[list[ToolCall]] = TypeAdapter(list[ToolCall])
