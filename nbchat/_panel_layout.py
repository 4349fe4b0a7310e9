"""Where each part of the chat panel sits, and the CSS class its styles know it by.

From the top: the header (title, model picker, New chat), the transcript in a box that
scrolls, the input box beside Send / Stop, the status line. The styles that name
these classes are the panel's stylesheet in ``_panel_input``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ipywidgets as widgets

__all__ = ["arrange"]


def arrange(
    header: Sequence[Any],
    messages: widgets.VBox,
    entry: Any,
    buttons: Sequence[Any],
    status: widgets.HTML,
) -> list[Any]:
    """The panel's rows: ``header`` after the title, ``messages`` scrolling, ``entry``
    beside ``buttons`` (one above the other), ``status`` last."""
    title = widgets.HTML("<b>nbchat</b>")
    top = widgets.HBox([title, *header])
    scroll = widgets.Box([messages])
    column = widgets.VBox(list(buttons))
    row = widgets.HBox([entry, column])
    for w, cls in [
        (title, "nbchat-title"),
        (top, "nbchat-header"),
        (scroll, "nbchat-scroll"),
        (messages, "nbchat-messages"),
        (column, "nbchat-buttons"),
        (row, "nbchat-row"),
        (status, "nbchat-status"),
    ]:
        w.add_class(cls)
    return [top, scroll, row, status]
