"""A deterministic stand-in model for the notebooks in ``notebooks/``.

``FakeOpenAIServer(fallback=notebook_reply)`` answers the prompts those notebooks send
with fixed text, and calls the tools they define when a prompt asks for them, so the
notebooks' outputs are the same on every run. Anything else gets an echo.
"""

from __future__ import annotations

from typing import Any

from nbchat.testing import FakeOpenAIServer, Reply, ToolCallSpec, echo_reply

# (words the last user message contains, tool the request must offer, its arguments)
TOOL_RULES: list[tuple[str, str, dict[str, Any]]] = [
    ("umbrella", "get_weather", {"city": "Paris"}),
    ("weather in lima", "get_weather", {"city": "Lima"}),
    ("most people", "python", {"code": "cities.sort_values('population_m').iloc[-1]"}),
]

# What the model says once a tool answered, by tool name.
AFTER_TOOL: dict[str, str] = {
    "get_weather": "No umbrella needed: the weather tool says it is **sunny and 21 °C**.",
    "python": "**Lagos** has the most people in `cities`: 15.4 million.",
}

# Replies to prompts without tools, by a word the prompt contains.
ANSWERS: list[tuple[str, str]] = [
    (
        "highest revenue",
        "**2026-03-31** had the highest revenue (89): `revenue` rises by one every day.",
    ),
    (
        "window function",
        "A **window function** computes a value for each row from a *window* of related "
        "rows — a running total, a rank, a moving average — without collapsing the rows "
        "the way `GROUP BY` does.",
    ),
    (
        "example",
        "```sql\nSELECT day, revenue,\n       avg(revenue) OVER (ORDER BY day ROWS 6 PRECEDING)"
        " AS weekly_avg\nFROM sales;\n```\nEach row keeps its own revenue and gains the "
        "average of the last seven days.",
    ),
    (
        "duckdb",
        "Arr, **DuckDB** be a SQL database that sails inside yer own process — no server "
        "to hoist, and fast as a schooner on analytical seas!",
    ),
    (
        "summarise",
        "p-values measure surprise, overfitting memorises noise, and a confusion matrix "
        "tallies the hits and misses.",
    ),
    (
        "this plot",
        "Revenue climbs in a straight line, one unit a day: nothing looks wrong, but a "
        "real series this smooth is worth a second look at how it was made.",
    ),
    ("p-value", "A p-value is the chance of data at least this extreme if nothing were going on."),
    ("overfitting", "Overfitting is a model learning the noise in its training data."),
    ("confusion matrix", "A confusion matrix counts right and wrong predictions per class."),
]


# notebooks/context.ipynb: a fix, a typed answer (by schema name) and a JSON answer.
FIX_REPLY = (
    "`sales` has no `week` column: derive the week from `day` first.\n\n"
    '```python\nsales.groupby(sales["day"].dt.isocalendar().week)["revenue"].sum()\n```'
)
TYPED_ANSWERS: dict[str, str] = {"Trend": '{"direction": "up", "weekly_change": 7.0}'}
JSON_REPLY = '[{"day": "2026-01-01", "revenue": 0}, {"day": "2026-01-02", "revenue": 1}]'


def _structured_reply(body: dict[str, Any], prompt: str) -> Reply | None:
    """The context notebook's answers that have a fixed form, or ``None``."""
    schema = (body.get("response_format") or {}).get("json_schema") or {}
    if schema.get("name") in TYPED_ANSWERS:
        return Reply(text=TYPED_ANSWERS[schema["name"]])
    if "give the whole corrected cell" in prompt:
        return Reply(text=FIX_REPLY, chunk_size=4)
    if "answer with one json value" in prompt:
        return Reply(text=JSON_REPLY)
    return None


def _last_user_text(messages: list[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            content = message.get("content") or ""
            if isinstance(content, list):  # text and image parts: the text
                return " ".join(str(p.get("text", "")) for p in content if p.get("type") == "text")
            return str(content)
    return ""


def notebook_reply(body: dict[str, Any]) -> Reply:
    """The reply to one chat-completions request from a notebook."""
    messages = body.get("messages") or []
    if messages and messages[-1].get("role") == "tool":
        text = AFTER_TOOL.get(str(messages[-1].get("name")), "The tool answered.")
        return Reply(text=text, chunk_size=4)
    prompt = _last_user_text(messages).lower()
    structured = _structured_reply(body, prompt)
    if structured is not None:
        return structured
    offered = {t["function"]["name"] for t in body.get("tools") or []}
    for words, tool, arguments in TOOL_RULES:
        if words in prompt and tool in offered:
            return Reply(tool_calls=[ToolCallSpec(name=tool, arguments=arguments)])
    for words, answer in ANSWERS:
        if words in prompt:
            return Reply(text=answer, chunk_size=4, delay=0.002)
    return echo_reply(body)


def notebook_server() -> FakeOpenAIServer:
    """A started fake server that answers like the notebooks expect."""
    return FakeOpenAIServer(fallback=notebook_reply).start()
