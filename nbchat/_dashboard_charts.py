"""The dashboard's charts, drawn again in milliseconds when their figures change a little.

A refresh after a request was written moves one bar a little and the latency boxes a
little. Drawing a whole chart again costs ~100 ms, and most of that is text: matplotlib
lays out and renders every tick label, legend entry and title again on every draw. So
each chart keeps its figure and a picture of everything but its data artists (bars,
hatched columns, "? N" labels, boxes, and the spines, which are drawn over them). When a
refresh's figures give the same layout (the same bars and models, title, legend and y
scale), the new figures are set on the kept artists, the picture is put back, and only
those artists are drawn on it; when none of them moved by a 256th of a pixel (Agg's own
precision: on a large store one more request moves a cost bar by about a thousandth of
a pixel), the PNG made last is kept too. The y scale ends at a round tick above the data,
so it stays the same while the data grows a little. Any other change draws the whole
chart again with ``nbchat.plot``'s code, which draws the same artists.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import TYPE_CHECKING, Any, Protocol

from ._plot_data import cost_bars, quantile_boxes
from ._plot_draw import (
    LATENCY_METRICS,
    draw_cost_bars,
    draw_latency_quantiles,
    plain,
    stacked,
    step_outline,
    usd_ticks,
)
from ._plot_png import drawn_area, figure_png

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.artist import Artist
    from matplotlib.axes import Axes

__all__ = ["CostScene", "LatencyScene", "LiveChart", "Scene"]

# Inches of canvas beyond a chart's own 8 x 3.6: at its left and bottom, and at its right
# (where the legends drawn outside the axes go).
_AROUND, _ROOM = 0.5, 1.6
_PAD_INCHES = 0.05
_FONT_POINTS = 12  # matplotlib's default is 10


class Scene(Protocol):
    """What one chart shows, for ``LiveChart.picture``."""

    def layout(self, ax: Axes) -> Hashable:
        """Everything drawn but the data artists: equal layouts, the same picture around."""

    def draw(self, ax: Axes) -> None:
        """Draw the whole chart on a cleared ``ax``."""

    def place(self, ax: Axes) -> list[Artist]:
        """Set the figures on the chart's data artists (drawn by ``draw`` for this layout)
        and the y scale; returns those artists."""


class LiveChart:
    """One chart's figure and the picture of it without its data artists."""

    def __init__(self, right: float = 0.7, dpi: int = 80) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        # Fixed margins, not constrained layout (laying out again costs as much as
        # drawing). The chart is 8 x 3.6 inches on a larger canvas, so what is drawn
        # outside its axes (a legend, long tick labels) fits on it, and the PNG is cut to
        # what was drawn.
        left, bottom, width, height = _AROUND, _AROUND, 8.0 + _AROUND + _ROOM, 3.6 + _AROUND
        self.figure = Figure(figsize=(width, height), dpi=dpi)
        self.figure.subplots_adjust(
            left=(left + 0.88) / width,
            right=(left + 8.0 * right) / width,
            bottom=(bottom + 0.72) / height,
            top=(bottom + 3.24) / height,
        )
        self.ax: Axes = self.figure.subplots()
        self.dpi = dpi
        self._canvas: Any = FigureCanvasAgg(self.figure)  # Agg's methods carry no annotations
        self._layout: Hashable = None
        self._background: Any = None  # the canvas without the data artists
        self._area: tuple[slice, slice] | None = None  # where the canvas was drawn on
        self._artists: list[Artist] = []
        self._picture = b""  # the PNG made last, of the artists at _drawn_at
        self._drawn_at: _Where | None = None

    def picture(self, scene: Scene) -> bytes:
        """The chart of ``scene`` as PNG bytes, cut to what was drawn."""
        ax = self.ax
        layout = scene.layout(ax)
        if self._background is not None and layout == self._layout:
            placed = scene.place(ax)
            # The same layout was drawn with the same artists; checked, as it is cheap.
            if len(placed) == len(self._artists) and all(
                a is b for a, b in zip(placed, self._artists, strict=True)
            ):
                where = self._where()
                if _within(where, self._drawn_at, ax):  # nothing moved by a 256th of a pixel
                    return self._picture
                self._canvas.restore_region(self._background)
                for artist in self._drawn_last():
                    if not _nothing(artist):
                        self.figure.draw_artist(artist)
                return self._png(where)
        import matplotlib

        # The picture is shown at half the dashboard's width, about 0.8 of its size: text
        # a size up keeps legends and ticks readable there (a trial measured 6 px).
        with matplotlib.rc_context({"font.size": _FONT_POINTS}):
            return self._draw_whole(scene, layout)

    def _draw_whole(self, scene: Scene, layout: Hashable) -> bytes:
        ax = self.ax
        ax.clear()
        scene.draw(ax)
        self._artists = scene.place(ax)
        for artist in self._drawn_last():
            artist.set_animated(True)
        self._canvas.draw()  # all but the animated artists
        self._background = self._canvas.copy_from_bbox(self.figure.bbox)
        for artist in self._drawn_last():
            self.figure.draw_artist(artist)
        self._area = drawn_area(self._pixels(), round(_PAD_INCHES * self.dpi))
        if self._area is None:  # something reaches the canvas's edge: grown by savefig
            for artist in self._drawn_last():
                artist.set_animated(False)
            self._background = None
            return figure_png(self.figure, dpi=self.dpi, tight=True)
        self._layout = layout
        return self._png(self._where())

    def _drawn_last(self) -> list[Artist]:
        # In the order the Axes draws them: by zorder, the spines over the data.
        return sorted([*self._artists, *self.ax.spines.values()], key=lambda a: a.get_zorder())

    def _pixels(self) -> Any:
        import numpy as np

        return np.asarray(self._canvas.buffer_rgba())

    def _png(self, where: _Where | None) -> bytes:
        assert self._area is not None
        self._picture, self._drawn_at = png_of(self._pixels()[self._area]), where
        return self._picture

    def _where(self) -> _Where | None:
        """Where the data artists are, in data coordinates, and their texts (``None``: an
        artist of another kind, never taken as unmoved). Compared within one layout, where
        data maps to pixels the same way (``_within``)."""
        from matplotlib.collections import Collection
        from matplotlib.lines import Line2D
        from matplotlib.patches import PathPatch, Rectangle
        from matplotlib.text import Annotation

        data = self.ax.transData
        points: list[Any] = []
        texts: list[str] = []
        for artist in self._artists:
            if isinstance(artist, Rectangle) and artist.get_angle() == 0:
                x, y, w, h = artist.get_x(), artist.get_y(), artist.get_width(), artist.get_height()
                points.append([[x, y], [x + w, y + h]])
            elif isinstance(artist, PathPatch) and artist.get_data_transform() is data:
                points.append(artist.get_path().vertices)
            elif isinstance(artist, Line2D) and artist.get_transform() is data:
                points.append(artist.get_xydata())
            elif isinstance(artist, Collection) and artist.get_transform() is data:
                points.extend(path.vertices for path in artist.get_paths())
            elif isinstance(artist, Annotation) and artist.xycoords == "data":
                points.append([artist.xy])
                texts.append(artist.get_text())
            else:
                return None
        return points, texts


def png_of(pixels: Any) -> bytes:
    """RGBA pixels (height x width x 4 bytes) as a PNG: no row filters, and zlib's quickest
    level. ~3x quicker than Pillow's encoder (which tries five filters on every row) for
    a PNG ~10% larger; the dashboard makes one on each chart's every redraw."""
    import struct
    import zlib

    import numpy as np

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    height, width, _ = pixels.shape
    rows = np.zeros((height, 1 + 4 * width), dtype=np.uint8)  # each: filter 0 (none), pixels
    rows[:, 1:] = pixels.reshape(height, -1)
    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)  # 8-bit RGBA, no interlace
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows.tobytes(), 1))
        + chunk(b"IEND", b"")
    )


_Where = tuple[list[Any], list[str]]


def _within(now: _Where | None, drawn: _Where | None, ax: Axes) -> bool:
    """Whether the data artists are where they were drawn, to a 256th of a pixel (the
    precision Agg draws at: a move that small changes an edge pixel by at most one level
    of 255), with the same texts. Both are of one layout, so data maps to pixels the same
    way: by ``ax.transData``'s scale (the dashboard's axes are linear)."""
    import numpy as np

    if now is None or drawn is None or now[1] != drawn[1] or len(now[0]) != len(drawn[0]):
        return False
    matrix = ax.transData.get_affine().get_matrix()
    pixels = np.abs([matrix[0, 0], matrix[1, 1]])  # per unit of x, of y
    for a, b in zip(now[0], drawn[0], strict=True):
        a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
        if a.shape != b.shape or not bool(np.all(np.abs(a - b) * pixels < 1 / 256)):
            return False
    return True


def _nothing(artist: Artist) -> bool:
    """Whether ``artist`` draws nothing: a bar of no height (``ax.bar`` gives each model a
    bar at every key, most of them empty on the by-model chart)."""
    from matplotlib.colors import to_rgba
    from matplotlib.patches import Rectangle

    return (
        isinstance(artist, Rectangle)
        and (artist.get_height() == 0 or artist.get_width() == 0)
        and (artist.get_linewidth() == 0 or to_rgba(artist.get_edgecolor())[3] == 0)
        and not artist.get_hatch()
    )


def _round_top(ax: Axes, value: float) -> float:
    """The first tick at or above ``value`` that matplotlib's default locator would put
    on ``ax``'s y axis for 0 to ``value`` (1 when ``value`` is not above 0)."""
    from matplotlib.ticker import AutoLocator

    if not value > 0:
        return 1.0
    locator = AutoLocator()
    locator.set_axis(ax.yaxis)
    above = [float(t) for t in locator.tick_values(0.0, value) if t >= value]
    return min(above) if above else value


def _fill_between_updates() -> bool:
    """Whether matplotlib can give a ``fill_between`` shape new curves (3.10 and later)."""
    import matplotlib.collections

    shape = getattr(matplotlib.collections, "FillBetweenPolyCollection", None)
    return hasattr(shape, "set_data")


class CostScene:
    """A ``draw_costs`` chart of ``cost_groups``-shaped rows."""

    def __init__(self, groups: pd.DataFrame, by: str) -> None:
        self.by = by
        self.bars = cost_bars(groups, by)
        self._top: float | None = None

    def top(self, ax: Axes) -> float:
        """The top of the y scale."""
        if self._top is None:
            bars = self.bars
            assert bars is not None
            if bars.totals is None:  # no known dollar: no y scale (0 to 1, as drawn)
                self._top = 1.0
            else:  # matplotlib's 5% margin, or room above the bars for the hatched columns
                margin = 1.25 if bars.missing else 1.05
                self._top = _round_top(ax, float(bars.totals.max()) * margin)
        return self._top

    def layout(self, ax: Axes) -> Hashable:
        bars = self.bars
        if bars is None:
            return ("empty", self.by)
        if bars.many and not _fill_between_updates():
            return object()  # never the same: drawn whole each time
        marked = () if bars.many else tuple(k for k in bars.order if bars.unknown[k])
        return (
            self.by,
            tuple(bars.order),
            tuple(str(c) for c in bars.table.columns),
            bars.missing,  # in the title and the legend
            marked,
            bars.totals is None,
            bars.free,  # says so in the chart
            self.top(ax),
        )

    def draw(self, ax: Axes) -> None:
        if self.bars is None:
            from ._plot_draw import empty_chart

            empty_chart(ax, f"Cost by {self.by}")
        else:
            draw_cost_bars(ax, self.bars)

    def place(self, ax: Axes) -> list[Artist]:
        import numpy as np

        bars = self.bars
        if bars is None:
            return []
        top, totals = self.top(ax), bars.totals
        if totals is not None:
            ax.set_ylim(0, top)
            usd_ticks(ax)  # its decimals follow the scale's top
        placed: list[Artist] = []
        if bars.many:
            shapes = {c.get_gid(): c for c in ax.collections}
            for column, bottom, heights in stacked(bars.table):
                shape: Any = shapes[f"bar:{column}"]
                shape.set_data(*step_outline(bottom, bottom + heights))
                placed.append(shape)
        else:
            rectangles = {str(c.get_label()): list(c) for c in ax.containers}
            for column, bottom, heights in stacked(bars.table):
                for rectangle, low, height in zip(
                    rectangles[plain(str(column))], bottom, heights, strict=True
                ):
                    rectangle.set_y(float(low))
                    rectangle.set_height(float(height))
                    placed.append(rectangle)
        if not bars.missing:
            return placed
        base = np.zeros(len(bars.order)) if totals is None else totals.to_numpy(dtype=float)
        if bars.many:
            shape = next(c for c in ax.collections if c.get_gid() == "unknown-bars")
            has = bars.unknown.to_numpy() > 0
            shape.set_data(*step_outline(base, np.where(has, top, base)))
            return [*placed, shape]
        parts = {p.get_gid(): p for p in ax.patches}
        labels = {t.get_gid(): t for t in ax.texts}
        marks: list[Artist] = []
        for i, key in enumerate(bars.order):
            n = int(bars.unknown[key])
            if not n:
                continue
            hatch: Any = parts[f"unknown-bar:{key}"]
            hatch.set_y(base[i])
            hatch.set_height(top - base[i])
            label: Any = labels[f"unknown:{key}"]
            label.set_text(f"? {n}")
            label.xy = (i, base[i])
            placed.append(hatch)
            marks.append(label)
        return [*placed, *marks]


class LatencyScene:
    """A ``draw_latency_quantiles`` chart of ``overview().latency``."""

    def __init__(self, stats: pd.DataFrame, sampled: bool) -> None:
        self.stats, self.sampled = stats, sampled
        self.models = sorted(stats["model"].unique()) if len(stats) else []
        # In the order draw_latency_quantiles draws them: by model, then metric.
        figures = quantile_boxes(stats)
        self.boxes = {
            (model, metric): figures[model, metric]
            for model in self.models
            for metric in LATENCY_METRICS
            if (model, metric) in figures
        }
        self._top: float | None = None

    def top(self, ax: Axes) -> float:
        """The top of the y scale: a round tick above matplotlib's 5% margin."""
        if self._top is None:
            highest = max(figures["whishi"] for figures in self.boxes.values())
            self._top = _round_top(ax, 1.05 * highest)
        return self._top

    def layout(self, ax: Axes) -> Hashable:
        if not self.boxes:
            return ("empty", self.sampled)
        return (self.sampled, tuple(self.models), tuple(self.boxes), self.top(ax))

    def draw(self, ax: Axes) -> None:
        draw_latency_quantiles(ax, self.stats, sampled=self.sampled)

    def place(self, ax: Axes) -> list[Artist]:
        from matplotlib.path import Path

        if not self.boxes:
            return []
        if ax.get_yscale() == "log":  # no 0 on it: the bottom stays where it was drawn
            ax.set_ylim(top=self.top(ax))
        else:
            ax.set_ylim(0, self.top(ax))
        parts: dict[str | None, Any] = {a.get_gid(): a for a in [*ax.lines, *ax.patches]}
        placed: list[Artist] = []
        for (model, metric), f in self.boxes.items():
            which = f"{metric}:{model}"
            box = parts[f"box:{which}"]
            xs = box.get_path().vertices[:, 0]
            left, right = float(xs.min()), float(xs.max())
            corners = [(left, f["q1"]), (right, f["q1"]), (right, f["q3"]), (left, f["q3"])]
            box.set_path(Path([*corners, corners[0]], closed=True))
            ys = {
                "whisker-low": [f["q1"], f["whislo"]],
                "whisker-high": [f["q3"], f["whishi"]],
                "cap-low": [f["whislo"]] * 2,
                "cap-high": [f["whishi"]] * 2,
                "median": [f["med"]] * 2,
            }
            placed.append(box)
            for part, y in ys.items():
                line = parts[f"{part}:{which}"]
                line.set_ydata(y)
                placed.append(line)
        return placed
