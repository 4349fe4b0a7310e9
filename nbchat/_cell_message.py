"""What a ``%%chat`` cell sends (mixed into the magics): its text with ``{name}``
placeholders filled from the notebook, ``%chat fix``'s question about the last error,
``--context`` values and the answer format asked for, and its attachments (``--attach``
values or files, and the images placeholders name). Anything it cannot send is refused,
in one line, before anything is sent.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from IPython.core.error import UsageError

if TYPE_CHECKING:
    from ._magic_options import ChatOptions
    from ._notebook import NotebookCells

__all__ = ["CellMessage"]


class CellMessage:
    """A cell's message and attachments (mixed into ``ChatMagics``, which sets the state)."""

    notebook: NotebookCells
    max_context_chars: int | None

    if TYPE_CHECKING:  # what ChatMagics provides

        @property
        def user_ns(self) -> dict[str, Any]: ...

    def _message(self, opts: ChatOptions, cell: str) -> tuple[str, list[Any]]:
        """The text a cell sends — placeholders filled, the fix asked, context attached —
        and the images it attaches (``--attach``, and ``{fig}`` placeholders)."""
        from ._context import DEFAULT_MAX_CONTEXT_CHARS, FORMAT_INSTRUCTIONS, fix_prompt
        from ._magic_options import interpolate

        max_chars = opts.max_context_chars or self.max_context_chars or DEFAULT_MAX_CONTEXT_CHARS
        missing: list[str] = []
        images: list[tuple[str, Any]] = []
        text = interpolate(
            cell, self.user_ns, missing, cells=self.notebook, max_chars=max_chars, images=images
        ).strip()
        if missing:  # a typo in a placeholder: say so, send the text as typed
            names = ", ".join(dict.fromkeys(missing))
            print(
                f"nbchat: {names} matched no variable, cell or error in the notebook; sent "
                "as typed (write {{name}} for literal braces).",
                file=sys.stderr,
            )
        if opts.fix:
            error = self.notebook.last_error
            if error is None:
                raise UsageError("%chat fix: no cell has failed in this kernel yet")
            text = fix_prompt(error, text)
        if not text:
            raise UsageError("%%chat: the cell is empty; write your message below the magic line")
        if opts.context:
            text += "\n\n" + self._context(opts.context, max_chars)
        texts, parts = self._attachments(opts.attach or [], images)
        if opts.format is not None and not opts.fix:  # last: history views leave it out
            texts.append(FORMAT_INSTRUCTIONS[opts.format])
        return "\n\n".join([text, *texts]), parts

    def _attachments(
        self, names: list[str], placeholders: list[tuple[str, Any]]
    ) -> tuple[list[str], list[Any]]:
        """``--attach`` entries (notebook values by name, else file paths) and the images
        of ``{placeholders}``: the text files' text to inline, and the image parts. A bad
        one is refused before anything is sent."""
        from ._exceptions import AttachmentError
        from ._images import attach, to_image
        from ._magic_options import MISSING, resolve

        texts: list[str] = []
        parts: list[Any] = []
        try:
            for name in names:
                value = resolve(name, self.user_ns, self.notebook)
                if value is MISSING:
                    path = Path(name).expanduser()
                    if not path.is_file():
                        raise UsageError(
                            f"%%chat: --attach {name}: no such variable in the notebook, "
                            "and no such file"
                        )
                    attached = attach([path])
                    texts += attached.texts
                    parts += attached.images
                    continue
                image = to_image(value, name=name)
                if image is None:
                    raise UsageError(
                        f"%%chat: --attach {name}: a {type(value).__name__} is not an image "
                        "(attach a figure, a PIL image, nbchat.Image or an image file)"
                    )
                parts.append(image)
            parts += [to_image(value, name=name) for name, value in placeholders]
        except AttachmentError as exc:
            raise UsageError(f"%%chat: {exc}") from None
        return texts, parts

    def _context(self, names: list[str], max_chars: int) -> str:
        """The ``--context`` values, each under its name; an unknown name is refused."""
        from ._context import context_section
        from ._magic_options import MISSING, resolve

        values = {}
        for name in names:
            value = resolve(name, self.user_ns, self.notebook)
            if value is MISSING:
                raise UsageError(
                    f"%%chat: --context {name}: no such variable, cell or error in the notebook"
                )
            values[name] = value
        return context_section(values, max_chars)
