"""What ``%chat``'s subcommands show: a table or a sentence, a stored conversation, matches.

``Info`` is a short table (settings, endpoints, costs) or one sentence; ``Conversation``
a stored conversation turn by turn, in the layout of cells and the panel
(``%chat history``); ``Found`` the matches of ``%chat search``, marked. Model and user
text in them is escaped, as in a live turn.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from html import escape
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._types import Message

__all__ = ["Conversation", "Found", "Info"]


class Info:
    """A short piece of information for ``%chat`` subcommands: a table or a sentence."""

    def __init__(
        self,
        title: str,
        rows: list[tuple[str, str]] | None = None,
        columns: tuple[str, str] = ("setting", "value"),
    ) -> None:
        self.title = title
        self.rows = rows or []
        self.columns = columns

    def _repr_markdown_(self) -> str:
        if not self.rows:
            return self.title
        table = "\n".join(f"| {k} | {_cell(v)} |" for k, v in self.rows)
        head = f"| {self.columns[0]} | {self.columns[1]} |"
        return f"{self.title}\n\n{head}\n|---|---|\n{table}"

    def __repr__(self) -> str:
        if not self.rows:
            return self.title
        width = max(len(k) for k, _ in self.rows)
        return "\n".join([self.title, *(f"  {k.ljust(width)}  {v}" for k, v in self.rows)])


class Conversation:
    """A stored conversation shown turn by turn, in the layout of cells and the panel.

    For ``%chat history``-style views: model text is escaped like a live turn's.
    """

    def __init__(
        self,
        history: Iterable[Message],
        outcomes: Mapping[str, tuple[str, str | None]] | None = None,
    ) -> None:
        self.history = list(history)
        self.outcomes = dict(outcomes or {})  # how each turn ended (Session.turn_outcomes)

    def _parts(self, markdown: bool) -> list[str]:
        from ._markup import safe_markdown, to_html
        from ._render import history_views
        from ._render_parts import thumbnails_html

        parts: list[str] = []
        for view in history_views(self.history, self.outcomes):
            if view.user_text is not None:
                # The user's Markdown (tables, lists) as the panel shows it, its HTML escaped;
                # below the label, so a table's first row starts a line of its own.
                said = view.user_text
                if markdown:
                    parts.append(f"**You:**\n\n{safe_markdown(said)}")
                else:
                    parts.append(f"<p><b>You:</b></p>\n{to_html(said, hard_wrap=True)}")
                if view.user_images:
                    parts.append(thumbnails_html(view.user_images))
            view.show_user_images = False
            if view.parts or view.badges:
                reply = view.markdown() if markdown else view.html()
                if view.user_text is not None:  # an answer, labelled as the question is
                    label = "**Assistant:**\n\n" if markdown else "<p><b>Assistant:</b></p>\n"
                    reply = label + reply
                parts.append(reply)
        return parts

    def _repr_html_(self) -> str:
        return '<div class="nbchat-conversation">' + "\n<hr>\n".join(self._parts(False)) + "</div>"

    def _repr_markdown_(self) -> str:
        return "\n\n---\n\n".join(self._parts(True))

    def __repr__(self) -> str:
        from ._context import without_format_instruction

        def said(m: Message) -> str:  # what the user wrote, not nbchat's --format line
            text = m.content or ""
            return without_format_instruction(text) if m.role == "user" else text

        return "\n".join(f"{m.role}: {said(m)}" for m in self.history)


class Found:
    """``%chat search``'s matches: a table with the matches marked, the frame in ``.frame``.

    A DataFrame's cells are not Markdown, so the ``**`` of ``search()``'s snippets would
    show as they are; here the text is escaped (it is model and user text) and the
    matches are ``<mark>``-ed. The plain repr shows the snippets without markers.
    """

    COLUMNS = ("session_id", "title", "role", "snippet", "created_at")

    def __init__(self, frame: Any, snippets: list[list[tuple[str, bool]]]) -> None:
        self.frame = frame
        self.snippets = snippets

    def __len__(self) -> int:
        return len(self.frame)

    def __getitem__(self, key: Any) -> Any:
        """A column (or columns) of ``search()``'s frame, as code that used it expects."""
        return self.frame[key]

    def _repr_html_(self) -> str:
        from ._markup import protect_dollars

        def cell(value: Any) -> str:
            return "" if value is None else protect_dollars(escape(str(value)))

        def snippet(pieces: list[tuple[str, bool]]) -> str:
            return "".join(f"<mark>{cell(p)}</mark>" if hit else cell(p) for p, hit in pieces)

        head = "".join(f"<th>{c}</th>" for c in self.COLUMNS)
        rows = []
        for (_, row), pieces in zip(self._shown().iterrows(), self.snippets, strict=True):
            cells = [snippet(pieces) if c == "snippet" else cell(row[c]) for c in self.COLUMNS]
            rows.append("<tr>" + "".join(f"<td>{v}</td>" for v in cells) + "</tr>")
        if not rows:
            return "<p>No stored message has these words.</p>"
        return (
            '<table class="nbchat-search"><thead><tr>'
            + head
            + "</tr></thead><tbody>"
            + "".join(rows)
            + "</tbody></table>"
        )

    def __repr__(self) -> str:
        if not self.snippets:
            return "No stored message has these words."
        plain = self._shown()
        plain["snippet"] = ["".join(p for p, _ in pieces) for pieces in self.snippets]
        return str(plain.to_string(index=False))

    def _shown(self) -> Any:
        """The columns shown, for people: a message no longer in its conversation says
        so beside its role (a re-run cell superseded it, or compaction folded it), and
        times read as times."""
        from ._tables import utc_text

        shown = self.frame[list(self.COLUMNS)].copy()
        state = self.frame["state"].fillna("active")
        shown["role"] = [
            role if s == "active" else f"{role} ({s})"
            for role, s in zip(shown["role"], state, strict=True)
        ]
        shown["created_at"] = utc_text(shown["created_at"])
        return shown


def _cell(value: str) -> str:
    return value.replace("|", "\\|").replace("\n", " ")
