"""Model text made safe to show: as HTML (cells, panel) or as Markdown (cells, exports).

Model text is untrusted: a prompt-injected reply can contain ``<img onerror=...>`` or
``<iframe srcdoc=...>``, and a notebook output produced in a live kernel is trusted,
so it would run again every time the saved notebook is opened. Both renditions
therefore show raw HTML as text, show Markdown images as links (nothing is fetched on
render), and drop ``javascript:``-style links.

Dollars and math: Jupyter renders ``$…$`` as TeX, so "$5 and $20" would become
italic math. Math is recognised the way people write it — ``$$…$$``, ``\\[…\\]``,
``\\(…\\)`` and ``$x$`` with no space just inside the delimiters — and kept verbatim
(the Markdown renderer would eat ``\\,``); every other ``$`` is currency and is put in
an element of its own, so MathJax, which never pairs delimiters across elements,
leaves it alone. Code (fenced blocks and backtick spans) is never touched.
"""

from __future__ import annotations

import functools
import html
import json
import re
import threading
from collections.abc import Callable
from typing import Any, cast

import mistune

from ._text import money

__all__ = [
    "MARKDOWN_USD",
    "PRE",
    "clip",
    "escape",
    "highlight",
    "money",
    "pretty_json",
    "protect_dollars",
    "safe_markdown",
    "to_html",
]

# What every CommonMark renderer (Jupyter's is marked) certainly treats as code, so it
# may be left unescaped: a fenced block opened at the start of a line (a fence indented
# in a list item is not recognised, and its text is then escaped: safe, at worst shown
# with a visible &lt;), up to a closing fence or the end; and a backtick code span on
# one line whose opening backtick is not escaped. Anything else counts as prose.
_CODE = re.compile(
    r"^(?P<mark>`{3,}(?=[^`\n]*$)|~{3,})[^\n]*\n.*?(?:^[ ]{0,3}(?P=mark)[`~]*[ \t]*$|\Z)"
    r"|(?<![`\\])(?P<ticks>`+)(?!`)[^\n]+?(?<!`)(?P=ticks)(?!`)",
    re.M | re.S,
)
_MATH = re.compile(
    r"\$\$.+?\$\$"
    r"|\\\[.+?\\\]"
    r"|\\\(.+?\\\)"
    # $x$: no space just inside, no digit after the opening $ (that is a price).
    r"|(?<![\\$\w])\$(?=[^\s$\d])[^$\n]*?[^\s\\$]\$(?![\w$])",
    re.S,
)
_DOLLAR = re.compile(r"\\?\$")
_IMAGE = re.compile(r"!\[")
# A link destination: inline ``](url`` or a reference definition ``[x]: url``.
_LINK = re.compile(r"(?P<head>\]\(\s*<?|^[ ]{0,3}\[[^\]\n]+\]:[ \t]*<?)(?P<url>[^\s)>]*)", re.M)
_SAFE_SCHEMES = ("http", "https", "mailto")

# Placeholders that survive the Markdown renderer untouched (Unicode private use).
_MATH_MARK = "\ue000{}\ue001"
_MATH_BACK = re.compile("\ue000(\\d+)\ue001")
_USD_MARK = "\ue002"
USD_HTML = '<span class="nbchat-usd">$</span>'
# The placeholders as the renderer percent-encodes them in a link's URL.
_TAG = re.compile(r"<[^>]*%EE%80%8[02][^>]*>")
_MATH_IN_URL = re.compile(r"%EE%80%80(\d+)%EE%80%81")
_USD_IN_URL = "%EE%80%82"


def escape(text: str) -> str:
    """``text`` as HTML text (quotes left as they are: this is never an attribute)."""
    return html.escape(text, quote=False)


def _split_code(text: str) -> list[tuple[bool, str]]:
    """``text`` as (is_code, piece) pieces, in order."""
    pieces: list[tuple[bool, str]] = []
    at = 0
    for match in _CODE.finditer(text):
        if match.start() > at:
            pieces.append((False, text[at : match.start()]))
        pieces.append((True, match.group(0)))
        at = match.end()
    if at < len(text):
        pieces.append((False, text[at:]))
    return pieces


def _prose(text: str, on_prose: Callable[[str], str]) -> str:
    return "".join(piece if code else on_prose(piece) for code, piece in _split_code(text))


# ---------------------------------------------------------------------- Markdown out


# Each currency ``$`` in Markdown: Jupyter takes math out of the raw text before it
# parses Markdown (a ``\\$`` is not a delimiter there, and Markdown makes it ``$``),
# then MathJax typesets the page, where a bare ``$5 … $20`` would pair up again; in an
# element of its own it cannot. GitHub shows the span's ``\\$`` as ``$`` too. (``&#36;``
# is ``$`` before MathJax looks: it pairs.)
MARKDOWN_USD = "<span>\\$</span>"
# What a heading may stand behind on its line: block quote markers and list item
# markers, nested ("> ## User" is a heading inside a quote, "- # x" inside an item).
_QUOTES = r"(?:[ ]{0,3}>[ ]?)*"
_CONTAINERS = r"(?:[ ]{0,3}(?:>[ ]?|[-*+][ ]+|\d{1,9}[.)][ ]+))*"
_ATX = re.compile(rf"^({_CONTAINERS}[ ]{{0,3}})(#{{1,6}})(?=[ \t]|$)", re.M)
_SETEXT = re.compile(rf"({_QUOTES}[ ]{{0,3}})(?:=+|-+)[ \t]*")
_QUOTED = re.compile(rf"^{_QUOTES}")
_RULE = re.compile(r"[ ]{0,3}(?:[-=*_][ \t]*)+")


def safe_markdown(text: str, *, headings: bool = True) -> str:
    """Model text as Markdown whose renderers show no live HTML and fetch no images.

    ``headings=False`` (an export, whose own headings are its outline, H1 and H2): a
    ``#`` heading is demoted two levels, under its message's heading, and a setext
    underline (``===``, ``---`` under a line) is shown as text.
    """

    def prose(piece: str) -> str:
        if not headings:
            piece = _below_headings(piece)
        out: list[str] = []
        at = 0
        for match in _MATH.finditer(piece):
            out.append(_plain_markdown(piece[at : match.start()]))
            # Jupyter's Markdown renderer finds \\( and \\[ (one backslash is Markdown's).
            tex = match.group(0)
            if tex.startswith(("\\(", "\\[")):
                tex = "\\" + tex[:-2] + "\\" + tex[-2:]
            out.append(tex)
            at = match.end()
        out.append(_plain_markdown(piece[at:]))
        return "".join(out)

    return _prose(text, prose)


def _below_headings(text: str) -> str:
    """Prose whose headings are H3 or smaller: ``# x`` is ``### x``; setext underlines
    are escaped (a line of ``-`` after a blank line stays a rule)."""
    text = _ATX.sub(lambda m: m.group(1) + "#" * min(6, len(m.group(2)) + 2), text)
    lines = text.split("\n")
    for i in range(1, len(lines)):
        underline = _SETEXT.fullmatch(lines[i])
        # An underline under a line of text (in a quote: under quoted text), not under
        # a rule or another underline.
        above = _QUOTED.sub("", lines[i - 1], count=1)
        if underline and above.strip() and not _RULE.fullmatch(above):
            lines[i] = underline.group(1) + "\\" + lines[i][underline.end(1) :]
    return "\n".join(lines)


def _plain_markdown(text: str) -> str:
    text = text.replace("<", "&lt;")
    text = _IMAGE.sub("🖼 [", text)
    text = _LINK.sub(_safe_link, text)
    return _DOLLAR.sub(lambda _: MARKDOWN_USD, text)


def _safe_link(match: re.Match[str]) -> str:
    """A link destination kept only if it is relative or http(s)/mailto once decoded."""
    url = match.group("url")
    # Browsers drop tabs and newlines in URLs, and renderers decode entities in them.
    decoded = re.sub(r"[\x00-\x20]", "", html.unescape(url)).lower()
    scheme = re.match(r"[a-z][a-z0-9+.\-]*:", decoded)
    if scheme is None or scheme.group(0)[:-1] in _SAFE_SCHEMES:
        return match.group(0)
    return match.group("head") + "#unsafe-link-removed"


# ---------------------------------------------------------------------- HTML out


def highlight(code: str, language: str) -> str | None:
    """``code`` highlighted as HTML with inline colours, or None for an unknown language."""
    return _highlight(code, language.strip().lower())


@functools.lru_cache(maxsize=256)
def _highlight(code: str, language: str) -> str | None:
    from pygments import highlight as pygmentize  # type: ignore[import-untyped]
    from pygments.formatters import HtmlFormatter  # type: ignore[import-untyped]
    from pygments.lexers import get_lexer_by_name  # type: ignore[import-untyped]
    from pygments.util import ClassNotFound  # type: ignore[import-untyped]

    try:
        lexer = get_lexer_by_name(language)
    except ClassNotFound:
        return None
    # Inline styles: a cell output has no stylesheet of ours.
    formatter = HtmlFormatter(nowrap=True, noclasses=True, style="default")
    return cast(str, pygmentize(code, lexer, formatter))


# Code blocks and tables scroll sideways in their own box, while the prose around them
# wraps anywhere (a turn's long URL must not widen a cell's output or the panel). The
# style is inline because a cell's output may carry no <style> element (a hostile
# reply's would look the same); overflow-wrap and word-break are inherited, so a table
# that sets them back to normal keeps its cells' words whole.
_SCROLLS = "overflow-x: auto; max-width: 100%; overflow-wrap: normal; word-break: normal"
# A gap under the block: JupyterLab's output styles give a <pre> none, and the next
# paragraph (or the footer) sat right under the code (a trial).
PRE = f'<pre style="white-space: pre; margin: 0 0 0.8em; {_SCROLLS}">'
_TABLE = f'<table style="display: block; {_SCROLLS}">'


class _SafeRenderer(mistune.HTMLRenderer):
    """Mistune's HTML renderer with raw HTML escaped, no remote images, highlighted code."""

    def link(self, text: str, url: str, title: str | None = None) -> str:
        # A link must not navigate the notebook page away.
        return (
            f'<a href="{self.safe_url(url)}" target="_blank" rel="noopener noreferrer">{text}</a>'
        )

    def image(self, text: str, url: str, title: str | None = None) -> str:
        # An image would be fetched as soon as a reply streams in, so a prompt-injected
        # reply could leak data in its URL: show a link the user may choose to open.
        return "🖼 " + self.link(text or escape(url), url)

    def block_code(self, code: str, info: str | None = None) -> str:
        language = (info or "").split(None, 1)[0] if info else ""
        shown = highlight(code, language) if language else None
        if shown is None:
            return super().block_code(code, info).replace("<pre>", PRE, 1)
        return f'{PRE}<code class="language-{escape(language)}">{shown}</code></pre>\n'

    def table(self, text: str) -> str:  # found before the table plugin's own renderer
        return f"{_TABLE}\n{text}</table>\n"


_PLUGINS: list[Any] = ["strikethrough", "table", "url"]
_markdown = mistune.create_markdown(renderer=_SafeRenderer(escape=True), plugins=_PLUGINS)
# What a person typed keeps its line breaks (Shift+Enter), as chat boxes do.
_markdown_typed = mistune.create_markdown(
    renderer=_SafeRenderer(escape=True), plugins=_PLUGINS, hard_wrap=True
)
_markdown_lock = threading.Lock()  # mistune's parser state is not thread-safe


def to_html(text: str, *, hard_wrap: bool = False) -> str:
    """Markdown to HTML that is safe to show: raw HTML escaped, images as links.

    Math stays verbatim TeX (MathJax typesets it where the page has MathJax) and
    currency dollars are kept apart from it. ``hard_wrap=True`` turns every newline
    into a line break.
    """
    maths: list[str] = []

    def prose(piece: str) -> str:
        def keep(match: re.Match[str]) -> str:
            maths.append(match.group(0))
            return _MATH_MARK.format(len(maths) - 1)

        return _DOLLAR.sub(_USD_MARK, _MATH.sub(keep, piece))

    source = _prose(text, prose)
    with _markdown_lock:
        out = cast(str, (_markdown_typed if hard_wrap else _markdown)(source))

    def in_tag(tag: re.Match[str]) -> str:  # a URL with a $ in it: plain characters
        plain = _MATH_IN_URL.sub(lambda m: html.escape(maths[int(m.group(1))]), tag.group(0))
        return plain.replace(_USD_IN_URL, "$")

    out = _TAG.sub(in_tag, out)
    out = _MATH_BACK.sub(
        lambda m: f'<span class="nbchat-math">{escape(maths[int(m.group(1))])}</span>', out
    )
    return out.replace(_USD_MARK, USD_HTML)


def protect_dollars(text_html: str) -> str:
    """HTML of nbchat's own lines (footers, notices) with each ``$`` kept from MathJax."""
    return text_html.replace("$", USD_HTML)


# ---------------------------------------------------------------------- small formats


def pretty_json(text: str, indent: int = 1) -> str:
    """JSON text indented for reading; other text as it is."""
    try:
        return json.dumps(json.loads(text), indent=indent, ensure_ascii=False)
    except ValueError:
        return text


def clip(text: str, max_chars: int) -> str:
    """``text`` cut to ``max_chars``, saying how much was left out."""
    if len(text) <= max_chars:
        return text
    return text[:max_chars] + f"… [{len(text) - max_chars:,} more characters]"
