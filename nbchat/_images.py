"""Attachments: what a user or a tool hands over (figures, PIL images, bytes, files, URLs)
as the ``ImagePart`` a message carries, or as text to inline.

The kind of a file is sniffed from its first bytes, never taken from its name; an
image's size comes from its header (PNG, GIF, JPEG, WebP) so its token cost can be
estimated without decoding it. matplotlib and PIL are used only when the object given
is one of theirs: nbchat does not depend on either.
"""

from __future__ import annotations

import hashlib
import io
import mimetypes
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._exceptions import AttachmentError
from ._types import ImageDetail, ImagePart

__all__ = [
    "MAX_IMAGE_BYTES",
    "MAX_TEXT_CHARS",
    "MAX_TOOL_IMAGES",
    "Attached",
    "Image",
    "attach",
    "forget_text_only",
    "is_image",
    "mark_text_only",
    "refuse_images",
    "to_image",
]

MAX_IMAGE_BYTES = 20 * 1024 * 1024  # what OpenAI accepts per image
MAX_TOOL_IMAGES = 8  # images one tool call may hand the model (a loop of plots...)
MAX_TEXT_CHARS = 100_000  # a text file inlined past this is cut, and says so
_FIGURE_DPI = 100

# Base URLs of servers known to read no images (the embedded model), with what to tell
# the user: llama.cpp answers an image with an HTTP 500, after the turn has started.
_text_only: dict[str, str] = {}


def mark_text_only(base_url: str, model: str) -> None:
    """The server at ``base_url`` (serving ``model``) reads text only: images are refused."""
    _text_only[base_url.rstrip("/")] = model


def forget_text_only(base_url: str) -> None:
    """Undo ``mark_text_only`` (the server at ``base_url`` is gone)."""
    _text_only.pop(base_url.rstrip("/"), None)


def refuse_images(base_url: str, images: Iterable[ImagePart] | None) -> None:
    """``AttachmentError`` if ``images`` would go to a text-only server, before sending."""
    model = _text_only.get(base_url.rstrip("/"))
    labels = [image.label for image in images or []]
    if model is None or not labels:
        return
    raise AttachmentError(
        f"{model} is a text-only model: it cannot read images ({', '.join(labels)}); "
        "nothing was sent. Send the text alone, or use a vision model for images "
        "(e.g. %chat config model=gpt-4o-mini base_url=https://api.openai.com/v1, or "
        "Session(model=..., base_url=...) of any server with a vision model)."
    )


class Image:
    """An image to send: ``Image(data)``, ``Image(path="plot.png")`` or ``Image(url=...)``.

    ``data`` may also be a matplotlib figure or a PIL image. ``mime`` overrides the
    sniffed type; ``detail`` ("low", "high", "auto") is passed to the server and sets
    the token estimate; ``name`` labels it in the transcript.
    """

    def __init__(
        self,
        data: Any = None,
        *,
        path: str | Path | None = None,
        url: str | None = None,
        mime: str | None = None,
        detail: ImageDetail = "auto",
        name: str | None = None,
    ) -> None:
        given = [x for x in (data, path, url) if x is not None]
        if len(given) != 1:
            raise AttachmentError("Image() takes exactly one of data, path= or url=.")
        if mime is not None and not mime.startswith("image/"):
            raise AttachmentError(f"Image(mime={mime!r}): an image type such as image/png.")
        self._source: Any = given[0] if path is None else Path(path)
        self.mime = mime
        self.detail: ImageDetail = detail
        self.name = name

    def part(self) -> ImagePart:
        """The image as a message part (reads a file now)."""
        part = to_image(self._source, detail=self.detail, name=self.name)
        if part is None:
            raise AttachmentError(f"{self._source!r} is not an image nbchat can send.")
        if self.mime is not None:
            part = part.model_copy(update={"mime": self.mime})
        return part

    def _repr_mimebundle_(self, **_: Any) -> dict[str, Any]:
        part = self.part()
        if part.data is None:
            return {"text/plain": part.label}
        return {part.mime: part.data, "text/plain": part.label}

    def __repr__(self) -> str:
        return f"Image({self._source!r:.60})"


@dataclass
class Attached:
    """A list of attachments sorted into what a message sends: text to add, and images."""

    texts: list[str] = field(default_factory=list)
    images: list[ImagePart] = field(default_factory=list)


def attach(items: Iterable[Any], *, detail: ImageDetail = "auto") -> Attached:
    """Each attachment as an image part, or (a text file) as text to inline under its name.

    Accepts matplotlib figures (or axes), PIL images, ``bytes``, file paths, http(s) URLs,
    ``nbchat.Image`` and ``ImagePart``. Anything else raises ``AttachmentError`` saying why.
    """
    out = Attached()
    for item in items:
        if isinstance(item, (str, Path)) and not _is_url(item):
            path = Path(item).expanduser()
            data = _read(path)
            if _sniff(data) is None:
                out.texts.append(_inline_text(path.name, data))
            else:
                out.images.append(_bytes_part(data, detail=detail, name=path.name))
            continue
        image = item.part() if isinstance(item, Image) else to_image(item, detail=detail)
        if image is None:
            raise AttachmentError(
                f"Cannot attach a {type(item).__name__}: attach a matplotlib figure, a PIL "
                "image, bytes, a file path, an http(s) URL or nbchat.Image(...)."
            )
        out.images.append(image)
    return out


def is_image(value: Any) -> bool:
    """Whether ``value`` is something ``to_image`` turns into an image (no file reads)."""
    return isinstance(value, (Image, ImagePart)) or _figure_of(value) is not None or _is_pil(value)


def to_image(
    value: Any, *, detail: ImageDetail = "auto", name: str | None = None
) -> ImagePart | None:
    """``value`` as an image part, or ``None`` if it is not an image.

    A path must name an image file (sniffed); ``bytes`` must be an image's bytes.
    """
    if isinstance(value, ImagePart):
        return value
    if isinstance(value, Image):
        return value.part()
    if isinstance(value, (str, Path)):
        if _is_url(value):
            return _url_part(str(value), detail=detail, name=name)
        path = Path(value).expanduser()
        data = _read(path)
        if _sniff(data) is None:
            return None
        return _bytes_part(data, detail=detail, name=name or path.name)
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        if _sniff(data) is None:
            raise AttachmentError(_not_an_image(data, "these bytes"))
        return _bytes_part(data, detail=detail, name=name)
    figure = _figure_of(value)
    if figure is not None:
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=_FIGURE_DPI, bbox_inches="tight")
        return _bytes_part(buffer.getvalue(), detail=detail, name=name or "figure")
    if _is_pil(value):
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        return _bytes_part(buffer.getvalue(), detail=detail, name=name or "image")
    return None


# ------------------------------------------------------------------ what an object is


def _figure_of(value: Any) -> Any:
    """The matplotlib Figure of a figure, an axes or an array of axes; else None."""
    module = type(value).__module__ or ""
    if module.startswith("numpy") and getattr(value, "size", None):
        value = value.flat[0]  # plt.subplots(2, 2) gives an array of axes
        module = type(value).__module__ or ""
    if not module.startswith("matplotlib"):
        return None
    if hasattr(value, "savefig"):
        return value
    figure = getattr(value, "figure", None)
    return figure if hasattr(figure, "savefig") else None


def _is_pil(value: Any) -> bool:
    return (type(value).__module__ or "").startswith("PIL.") and hasattr(value, "save")


def _is_url(value: str | Path) -> bool:
    return isinstance(value, str) and value.startswith(("http://", "https://"))


# ------------------------------------------------------------------ bytes


def _read(path: Path) -> bytes:
    try:
        size = path.stat().st_size
        if size > MAX_IMAGE_BYTES:
            raise AttachmentError(
                f"{path}: {size / 1e6:.1f} MB is larger than nbchat sends "
                f"({MAX_IMAGE_BYTES // (1024 * 1024)} MB)."
            )
        return path.read_bytes()
    except OSError as exc:
        raise AttachmentError(f"Cannot read the attachment {path}: {exc.strerror or exc}.") from exc


def _sniff(data: bytes) -> str | None:
    """The image type of ``data`` from its first bytes; None when it is not an image."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def _not_an_image(data: bytes, what: str) -> str:
    if data.startswith(b"%PDF"):
        return f"{what}: PDF files are not supported by this endpoint yet (send an image or text)."
    return f"{what}: not a PNG, JPEG, GIF or WebP image."


def _inline_text(name: str, data: bytes) -> str:
    if data.startswith(b"%PDF") or b"\x00" in data[:8192]:
        raise AttachmentError(_not_an_image(data, name))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise AttachmentError(_not_an_image(data, name)) from None
    cut = ""
    if len(text) > MAX_TEXT_CHARS:
        cut = f"\n[… cut at {MAX_TEXT_CHARS:,} of {len(text):,} characters]"
        text = text[:MAX_TEXT_CHARS]
    fence = "````" if "```" in text else "```"
    return f"Attached file `{name}`:\n{fence}\n{text}\n{fence}{cut}"


def _bytes_part(data: bytes, *, detail: ImageDetail, name: str | None) -> ImagePart:
    if len(data) > MAX_IMAGE_BYTES:
        raise AttachmentError(
            f"An image of {len(data) / 1e6:.1f} MB is larger than nbchat sends "
            f"({MAX_IMAGE_BYTES // (1024 * 1024)} MB)."
        )
    mime = _sniff(data)
    if mime is None:
        raise AttachmentError(_not_an_image(data, name or "the attachment"))
    width, height = _dimensions(data, mime)
    return ImagePart(
        mime=mime,
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        data=data,
        width=width,
        height=height,
        detail=detail,
        name=name,
    )


def _url_part(url: str, *, detail: ImageDetail, name: str | None) -> ImagePart:
    guessed, _ = mimetypes.guess_type(url.split("?", 1)[0])
    return ImagePart(
        mime=guessed if guessed and guessed.startswith("image/") else "image/*",
        sha256=hashlib.sha256(url.encode()).hexdigest(),
        url=url,
        detail=detail,
        name=name or url.rsplit("/", 1)[-1][:80] or url[:80],
    )


def _dimensions(data: bytes, mime: str) -> tuple[int | None, int | None]:
    """Width and height from the image's header; (None, None) if it cannot be read."""
    try:
        if mime == "image/png" and data[12:16] == b"IHDR":
            return struct.unpack(">II", data[16:24])
        if mime == "image/gif":
            return struct.unpack("<HH", data[6:10])
        if mime == "image/webp":
            return _webp_dimensions(data)
        if mime == "image/jpeg":
            return _jpeg_dimensions(data)
    except struct.error:
        pass
    return None, None


def _webp_dimensions(data: bytes) -> tuple[int | None, int | None]:
    chunk = data[12:16]
    if chunk == b"VP8X":
        w = int.from_bytes(data[24:27], "little") + 1
        h = int.from_bytes(data[27:30], "little") + 1
        return w, h
    if chunk == b"VP8 ":
        w, h = struct.unpack("<HH", data[26:30])
        return w & 0x3FFF, h & 0x3FFF
    if chunk == b"VP8L":
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    return None, None


def _jpeg_dimensions(data: bytes) -> tuple[int | None, int | None]:
    # Walk the segments to the first start-of-frame marker (SOF0..SOF15 but DHT/JPG/DAC).
    i = 2
    while i + 9 < len(data):
        if data[i] != 0xFF:
            return None, None
        marker = data[i + 1]
        length = struct.unpack(">H", data[i + 2 : i + 4])[0]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            h, w = struct.unpack(">HH", data[i + 5 : i + 9])
            return w, h
        i += 2 + length
    return None, None
