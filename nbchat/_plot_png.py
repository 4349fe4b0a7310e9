"""Charts as PNG bytes: figures outside pyplot, and the tight crop of what was drawn.

``%chat cost --plot`` and the dashboard draw on their own Agg figures (``new_figure``:
no backend, no global state) and send PNGs (``figure_png``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["drawn_area", "figure_png", "new_figure"]


def new_figure(width: float = 8.0, height: float = 4.0) -> Figure:
    """A matplotlib figure outside pyplot (Agg canvas): no backend, no global state."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def figure_png(figure: Figure, dpi: int = 100, *, tight: bool = False) -> bytes:
    """``figure`` as PNG bytes; ``tight`` grows or crops it to what was drawn.

    Tight, the figure is drawn once and the drawn pixels cut out of the canvas; only when
    something reaches the canvas's edge (a long legend, cut off) is it drawn again by
    ``savefig``, which grows the canvas to it (laying the figure out once more to find
    how far). A figure's Agg canvas is kept: drawn again, it reuses the text it measured.
    """
    import io

    buffer = io.BytesIO()
    if tight:
        import numpy as np
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from PIL import Image

        figure.set_dpi(dpi)
        canvas: Any = figure.canvas  # Agg's methods carry no annotations
        if not isinstance(canvas, FigureCanvasAgg):
            canvas = FigureCanvasAgg(figure)
        canvas.draw()
        pixels = np.asarray(canvas.buffer_rgba())
        area = drawn_area(pixels, round(_PAD_INCHES * dpi))
        if area is not None:
            Image.fromarray(pixels[area]).save(buffer, format="png")
            return buffer.getvalue()
    extra: dict[str, Any] = {"bbox_inches": "tight", "pad_inches": _PAD_INCHES} if tight else {}
    figure.savefig(buffer, format="png", dpi=dpi, **extra)
    return buffer.getvalue()


_PAD_INCHES = 0.05


def drawn_area(pixels: Any, pad: int) -> tuple[slice, slice] | None:
    """The rows and columns of an RGBA canvas that were drawn on (not its first pixel's
    colour), ``pad`` pixels wider; ``None`` when the drawing reaches an edge (it may have
    been cut off) or there is none."""
    import numpy as np

    drawn = (pixels != pixels[0, 0]).any(axis=2)
    rows, columns = np.flatnonzero(drawn.any(axis=1)), np.flatnonzero(drawn.any(axis=0))
    if not len(rows) or not len(columns):
        return None
    top, bottom, left, right = int(rows[0]), int(rows[-1]), int(columns[0]), int(columns[-1])
    if top == 0 or left == 0 or bottom == len(drawn) - 1 or right == len(drawn[0]) - 1:
        return None
    return slice(max(0, top - pad), bottom + 1 + pad), slice(max(0, left - pad), right + 1 + pad)
