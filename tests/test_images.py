"""Images end to end against the fake server: each attachment kind reaches the server as
the right content part, tools return images, the store keeps them once, exports keep them."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import struct
import zlib
from pathlib import Path
from typing import Any

import matplotlib
import pytest

import nbchat
from nbchat import AttachmentError, Image, ImagePart, Session
from nbchat._history import CHARS_PER_TOKEN, message_chars
from nbchat._images import attach, to_image
from nbchat._render import TurnView, history_views
from nbchat._render_parts import thumbnails_html
from nbchat._store import Store
from nbchat._summary import render_transcript
from nbchat._types import Message
from nbchat.testing import FakeOpenAIServer

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def png(width: int = 4, height: int = 3) -> bytes:
    """A valid PNG of ``width`` × ``height`` grey pixels, written by hand."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    rows = b"".join(b"\x00" + b"\x80" * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def make(fake: FakeOpenAIServer, **kw: Any) -> Session:
    kw.setdefault("db", False)
    return Session(model="m", base_url=fake.url, api_key="sk-test", max_retries=0, **kw)


def content_of(body: dict[str, Any], index: int = -1) -> Any:
    return body["messages"][index]["content"]


def image_urls(content: Any) -> list[str]:
    return [p["image_url"]["url"] for p in content if p.get("type") == "image_url"]


@pytest.fixture
def figure() -> Any:
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([1, 3, 2])
    yield fig
    plt.close(fig)


# ---------------------------------------------------------------------- parts


def test_each_attachment_kind_becomes_an_image_part(tmp_path: Path, figure: Any) -> None:
    raw = png(8, 6)
    path = tmp_path / "shot.bin"  # the kind is sniffed, never taken from the name
    path.write_bytes(raw)
    parts = {
        "bytes": to_image(raw),
        "path": to_image(path),
        "str path": to_image(str(path)),
        "Image": Image(raw, name="mine").part(),
        "Image(path=)": Image(path=path).part(),
        "figure": to_image(figure),
        "axes": to_image(figure.axes[0]),
    }
    for kind, part in parts.items():
        assert part is not None, kind
        assert part.mime == "image/png", kind
        assert part.data is not None and part.data.startswith(b"\x89PNG"), kind
        assert part.sha256 == hashlib.sha256(part.data).hexdigest(), kind
        assert part.size == len(part.data)
    assert (parts["bytes"].width, parts["bytes"].height) == (8, 6)
    assert parts["path"].name == "shot.bin" and parts["Image"].name == "mine"
    assert parts["figure"].width and parts["figure"].width > 100  # drawn at 100 dpi
    url = to_image("https://example.org/cat.jpg?size=2")
    assert url is not None and url.url == "https://example.org/cat.jpg?size=2"
    assert url.mime == "image/jpeg" and url.data is None
    assert url.to_openai() == {
        "type": "image_url",
        "image_url": {"url": "https://example.org/cat.jpg?size=2"},
    }


def test_a_pil_image_is_attached_as_png() -> None:
    pil = pytest.importorskip("PIL.Image")
    part = to_image(pil.new("RGB", (10, 7), "red"))
    assert part is not None and part.mime == "image/png"
    assert (part.width, part.height) == (10, 7)


def test_jpeg_gif_and_webp_sizes_come_from_their_headers() -> None:
    pil = pytest.importorskip("PIL.Image")
    for fmt, mime in (("JPEG", "image/jpeg"), ("GIF", "image/gif"), ("WEBP", "image/webp")):
        buffer = io.BytesIO()
        pil.new("RGB", (33, 21), "blue").save(buffer, format=fmt)
        part = to_image(buffer.getvalue())
        assert part is not None and part.mime == mime, fmt
        assert (part.width, part.height) == (33, 21), fmt


def test_what_is_not_an_image_is_refused_clearly(tmp_path: Path) -> None:
    pdf = tmp_path / "paper.pdf"
    pdf.write_bytes(b"%PDF-1.7\n...")
    with pytest.raises(AttachmentError, match="PDF files are not supported by this endpoint"):
        attach([pdf])
    with pytest.raises(AttachmentError, match="not a PNG, JPEG, GIF or WebP"):
        to_image(b"\x00\x01garbage")
    with pytest.raises(AttachmentError, match="Cannot read the attachment"):
        attach([tmp_path / "missing.png"])
    with pytest.raises(AttachmentError, match="Cannot attach a dict"):
        attach([{"a": 1}])
    with pytest.raises(AttachmentError, match="exactly one of"):
        Image(b"x", url="https://example.org/a.png")


def test_a_text_file_is_inlined_under_its_name(tmp_path: Path) -> None:
    notes = tmp_path / "notes.md"
    notes.write_text("# Findings\nrevenue fell in ```March```")
    attached = attach([notes])
    assert attached.images == []
    (text,) = attached.texts
    assert text.startswith("Attached file `notes.md`:\n````\n# Findings")
    assert text.endswith("````")  # a longer fence than the text's own


def test_image_tokens_follow_openais_rule() -> None:
    def part(w: int, h: int, detail: Any = "auto") -> ImagePart:
        return ImagePart(mime="image/png", sha256="x", width=w, height=h, detail=detail)

    assert part(4000, 4000, "low").tokens() == 85
    assert part(1024, 1024).tokens() == 765  # 768² → 4 tiles
    assert part(2048, 4096, "high").tokens() == 1105  # 1024×2048 → 768×1536 → 6 tiles
    assert part(300, 200).tokens() == 255  # small: one tile, never scaled up
    assert ImagePart(mime="image/png", sha256="x").tokens() == 765  # unknown size: 1024²


def test_an_image_counts_as_its_tokens_never_its_base64() -> None:
    raw = png(512, 512) + b"\x00" * 200_000  # a big file of a small image
    image = to_image(raw)
    assert image is not None
    with_image = Message(role="user", content="look", attachments=[image])
    without = Message(role="user", content="look")
    added = message_chars(with_image) - message_chars(without)
    assert added == int(image.tokens() * CHARS_PER_TOKEN)
    assert added < len(base64.b64encode(raw)) / 50


def test_a_summary_mentions_an_image_it_folds() -> None:
    image = ImagePart(mime="image/png", sha256="x", width=640, height=480, name="fig")
    text = render_transcript([Message(role="user", content="why?", attachments=[image])], 10_000)
    assert "[image: fig, 640×480 png]" in text


# ---------------------------------------------------------------------- the wire


def test_attachments_reach_the_server_as_content_parts(
    fake: FakeOpenAIServer, tmp_path: Path, figure: Any
) -> None:
    raw = png()
    path = tmp_path / "plot.png"
    path.write_bytes(raw)
    notes = tmp_path / "notes.txt"
    notes.write_text("q3 numbers")
    fake.enqueue("It rises, then falls.")
    s = make(fake)
    result = s.send(
        "what is wrong with this plot?",
        attachments=[
            figure,
            path,
            raw,
            "https://example.org/a.png",
            Image(raw, detail="low"),
            notes,
        ],
    )
    assert result.status == "completed"
    content = content_of(fake.requests[0])
    assert content[0]["type"] == "text"
    assert content[0]["text"].startswith(
        "what is wrong with this plot?\n\nAttached file `notes.txt`"
    )
    urls = image_urls(content)
    assert len(urls) == 5
    assert urls[0].startswith("data:image/png;base64,")
    assert base64.b64decode(urls[1].split(",", 1)[1]) == raw
    assert urls[3] == "https://example.org/a.png"
    assert content[5]["image_url"]["detail"] == "low"
    # The next request sends the images of the history again (they are context).
    fake.enqueue("ok")
    s.send("and now?")
    assert image_urls(fake.requests[1]["messages"][0]["content"]) == urls


def test_a_single_attachment_need_not_be_a_list(fake: FakeOpenAIServer) -> None:
    fake.enqueue("a grey square")
    make(fake).send("what is it?", attachments=png())
    assert len(image_urls(content_of(fake.requests[0]))) == 1


def test_a_bad_attachment_fails_before_anything_is_sent(fake: FakeOpenAIServer) -> None:
    s = make(fake)
    with pytest.raises(AttachmentError):
        s.send("look", attachments=[b"%PDF-1.4"])
    assert fake.requests == [] and s.history == []


def test_an_image_the_server_refuses_does_not_fail_every_later_turn(
    fake: FakeOpenAIServer, store_db: str
) -> None:
    """A trial on the embedded text-only model: the refused image stayed in the history and
    every later cell failed with the same 500. A turn refused as sent (400/413/415/422)
    before any answer leaves the conversation; it stays in the store, marked superseded."""
    fake.enqueue_error(400, "image input is not supported", should_retry=False)
    fake.enqueue("Hi!")
    s = make(fake, db=store_db)
    failed = s.send("What is wrong with this plot?", attachments=[png()])
    assert failed.status == "error" and "image input is not supported" in (failed.error or "")
    assert s.send("Say hi.").text == "Hi!"
    sent = fake.requests[1]["messages"]
    assert [m["role"] for m in sent] == ["user"] and sent[0]["content"] == "Say hi."
    assert [m.content for m in s.history] == ["Say hi.", "Hi!"]
    stored = nbchat.transcript(s.id, db=store_db, include_superseded=True)
    assert list(stored["state"]) == ["superseded", "active", "active"]
    assert list(nbchat.turns(db=store_db)["status"]) == ["error", "completed"]
    resumed = nbchat.Session(session_id=s.id, db=store_db, base_url=fake.url, api_key="k")
    assert [m.content for m in resumed.history] == ["Say hi.", "Hi!"]


def test_images_go_over_the_responses_api_as_input_images(fake: FakeOpenAIServer) -> None:
    fake.enqueue("grey")
    make(fake, api="responses").send("colour?", attachments=[png()])
    (item,) = [i for i in fake.requests[0]["input"] if i.get("role") == "user"]
    kinds = [p["type"] for p in item["content"]]
    assert kinds == ["input_text", "input_image"]
    assert item["content"][1]["image_url"].startswith("data:image/png;base64,")


@pytest.mark.parametrize("wire", ["chat", "responses"])
def test_a_tool_returning_a_figure_sends_it_after_the_results(
    fake: FakeOpenAIServer, wire: str
) -> None:
    @nbchat.tool
    def make_plot(n: int) -> Any:
        """Plot n points."""
        fig, ax = plt.subplots()
        ax.plot(range(n))
        plt.close(fig)
        return ["plotted", fig]

    fake.enqueue(tool_calls=[{"name": "make_plot", "arguments": {"n": 4}}])
    fake.enqueue("A straight line.")
    s = make(fake, tools=[make_plot], api=wire)
    result = s.send("plot 4 points")
    assert result.text == "A straight line."
    (call,) = result.tool_calls
    assert call.images and call.images[0].mime == "image/png"
    assert call.result.startswith("plotted\n\n(Returned [image: figure, ")
    assert "the image follows in the next message" in call.result
    roles = [m.role for m in s.history]
    assert roles == ["user", "assistant", "tool", "user", "assistant"]
    follow = s.history[3]
    assert follow.content == "Image returned by `make_plot`:" and follow.attachments
    body = fake.requests[1]
    if wire == "chat":
        assert body["messages"][2]["role"] == "tool"
        assert isinstance(body["messages"][2]["content"], str)  # tool messages: text only
        assert len(image_urls(body["messages"][3]["content"])) == 1
    else:
        last = body["input"][-1]
        assert [p["type"] for p in last["content"]] == ["input_text", "input_image"]


def test_a_tool_whose_figure_cannot_be_drawn_reports_an_error(fake: FakeOpenAIServer) -> None:
    class Broken:
        __module__ = "matplotlib.figure"

        def savefig(self, *args: Any, **kwargs: Any) -> None:
            raise RuntimeError("no renderer")

    @nbchat.tool
    def bad() -> Any:
        """Return a figure that fails to draw."""
        return Broken()

    fake.enqueue(tool_calls=[{"name": "bad", "arguments": {}}])
    fake.enqueue("sorry")
    result = make(fake, tools=[bad]).send("go")
    (call,) = result.tool_calls
    assert call.is_error and "no renderer" in call.result
    assert result.status == "completed"


# ---------------------------------------------------------------------- the store


def test_the_store_keeps_each_image_once_and_resumes_with_its_bytes(
    fake: FakeOpenAIServer, store_db: str, tmp_path: Path
) -> None:
    db = store_db
    raw = png(5, 5)
    fake.enqueue("same picture twice")
    s = make(fake, db=db)
    s.send("compare", attachments=[raw, raw])
    stored = nbchat.sql("SELECT sha256, size, octet_length(data) AS n FROM attachments", db=db)
    assert len(stored) == 1 and stored["n"][0] == len(raw)
    listed = nbchat.attachments(db=db)
    assert len(listed) == 2 and set(listed["sha256"]) == {hashlib.sha256(raw).hexdigest()}
    assert list(listed["width"]) == [5, 5] and listed["data"].isna().all()
    with_data = nbchat.attachments(db=db, session_id=s.id, with_data=True)
    assert bytes(with_data["data"][0]) == raw
    copied = nbchat.copy_store(db, tmp_path / "copy.duckdb")
    assert copied["attachments"] == 1 and copied["messages"] == 2
    assert nbchat.copy_store(db, tmp_path / "copy.duckdb")["attachments"] == 0  # idempotent
    df = nbchat.transcript(s.id, db=db)
    refs = df["attachments"][0]
    assert [r["sha256"] for r in refs] == [hashlib.sha256(raw).hexdigest()] * 2
    assert "data" not in refs[0]
    # A reopened session sends the stored images again.
    fake.enqueue("still the same")
    again = make(fake, db=db, session_id=s.id)
    assert again.history[0].attachments and again.history[0].attachments[0].data == raw
    again.send("and now?")
    assert len(image_urls(fake.requests[1]["messages"][0]["content"])) == 2


def test_a_store_from_before_attachments_opens_and_gains_them(tmp_path: Path) -> None:
    import duckdb

    from nbchat._store._migrations import migrate

    db = tmp_path / "old.duckdb"
    con = duckdb.connect(str(db))
    migrate(con, stop_after="m004_reasoning_and_cost_sources")
    con.execute("INSERT INTO sessions (id, created_at, model) VALUES ('old', now(), 'm')")
    con.execute(
        "INSERT INTO messages (id, session_id, seq, role, content, status, state, created_at)"
        " VALUES ('m1', 'old', 0, 'user', 'hi', 'ok', 'active', now())"
    )
    con.close()
    with Store.open(db) as store:
        loaded = store.load_session("old")
    assert [m.content for m in loaded.messages] == ["hi"]
    assert loaded.messages[0].attachments is None
    assert nbchat.attachments(db=db).empty


def test_export_and_import_round_trip_an_image(fake: FakeOpenAIServer, store_db: str) -> None:
    db = store_db
    raw = png(3, 3)
    fake.enqueue("a tiny square")
    s = make(fake, db=db)
    s.send("what is this?", attachments=[raw])
    exported = nbchat.export_session(s.id, db=db, format="openai")
    messages = json.loads(exported) if isinstance(exported, str) else exported
    user = next(m for m in messages if m["role"] == "user")
    (url,) = image_urls(user["content"])
    assert base64.b64decode(url.split(",", 1)[1]) == raw
    copy = nbchat.import_session(exported, db=db)
    loaded = make(fake, db=db, session_id=copy)
    (image,) = loaded.history[0].attachments or []
    assert image.data == raw and loaded.history[0].content == "what is this?"
    markdown = nbchat.export_session(s.id, db=db, format="markdown")
    assert "[image: " in markdown and "base64" not in markdown


def test_an_imported_session_keeps_its_title_and_image_names(
    fake: FakeOpenAIServer, store_db: str
) -> None:
    db = store_db
    raw = png(3, 3)
    fake.enqueue("a tiny square")
    s = make(fake, db=db, title="Square study")
    s.send("what is this?", attachments=[to_image(raw, name="square.png")])
    kept = nbchat.export_session(s.id, db=db, format="nbchat")
    copy = nbchat.import_session(kept, db=db)
    with Store.open(db) as store:
        loaded = store.load_session(copy)
    (image,) = loaded.messages[0].attachments or []
    assert loaded.title == "Square study" and (image.name, image.data) == ("square.png", raw)
    assert json.loads(kept)["messages"] == json.loads(nbchat.export_session(s.id, db=db))
    # The bare wire list has no room for either: the title comes from the first message.
    plain = nbchat.import_session(nbchat.export_session(s.id, db=db), db=db)
    with Store.open(db) as store:
        assert store.load_session(plain).title == "what is this?"


# ---------------------------------------------------------------------- rendering


def test_thumbnails_show_only_sniffed_images_and_never_load_urls() -> None:
    image = to_image(png())
    assert image is not None
    html = thumbnails_html([image])
    assert html.count("<img") == 1 and 'src="data:image/png;base64,' in html
    remote = to_image("https://tracker.example/pixel.png")
    assert remote is not None
    shown = thumbnails_html([remote])
    assert "<img" not in shown and "tracker.example" not in shown.split("alt=")[0]
    hostile = ImagePart(mime="image/png", sha256="x", name='"><script>alert(1)</script>')
    assert "<script>" not in thumbnails_html([hostile])


def test_a_turn_view_shows_the_users_images_and_a_tools_images() -> None:
    image = to_image(png())
    assert image is not None
    view = TurnView("m")
    view.handle(nbchat.TurnStarted(text="look", attachments=[image]))
    assert view.html().startswith('<div class="nbchat-images"><img')
    stored = [
        Message(role="user", content="plot", attachments=None),
        Message(
            role="assistant",
            tool_calls=[nbchat.ToolCall(id="c1", name="make_plot", arguments="{}")],
        ),
        Message(role="tool", tool_call_id="c1", name="make_plot", content="(Returned ...)"),
        Message(
            role="user", content="Image returned by `make_plot`:", attachments=[image], round=0
        ),
        Message(role="assistant", content="a line", round=1),
    ]
    (turn,) = history_views(stored)
    assert "<img" in turn.html() and "a line" in turn.html()


def test_a_tool_hands_the_model_at_most_eight_images(fake: FakeOpenAIServer) -> None:
    @nbchat.tool
    def many() -> Any:
        """Return too many images."""
        return [Image(png(2 + i, 2)) for i in range(11)]

    fake.enqueue(tool_calls=[{"name": "many", "arguments": {}}])
    fake.enqueue("ok")
    result = make(fake, tools=[many]).send("go")
    (call,) = result.tool_calls
    assert call.images is not None and len(call.images) == 8
    assert "3 more images were not sent (at most 8)" in call.result
    assert len(image_urls(fake.requests[1]["messages"][-1]["content"])) == 8


def test_only_image_types_can_be_named_or_shown() -> None:
    with pytest.raises(AttachmentError, match="an image type such as image/png"):
        Image(png(), mime="text/html")
    odd = ImagePart(mime="image/svg+xml", sha256="x", data=b"<svg onload=alert(1)>", size=20)
    shown = thumbnails_html([odd])
    assert "<img" not in shown and "onload" not in shown.replace("&lt;", "")


def test_an_image_row_survives_the_team_stores_spool() -> None:
    from nbchat._store._rows import attachment_rows
    from nbchat._store._spool import decode_unit, encode_unit

    raw = png(2, 2)
    message = Message(role="user", content="x", attachments=[to_image(raw)])  # type: ignore[list-item]
    unit = list(attachment_rows(message))
    (back,) = decode_unit(encode_unit(unit))
    assert back == unit[0] and bytes(back.values[5]) == raw  # type: ignore[union-attr]


def test_the_fake_server_counts_an_image_by_its_tiles_not_its_base64(
    fake: FakeOpenAIServer,
) -> None:
    from nbchat.testing import estimate_prompt_tokens

    big = png(1024, 1024) + b"\x00" * 100_000  # a large file of a 1024² image
    fake.enqueue("seen")
    result = make(fake).send("look", attachments=[big])
    sent = fake.requests[0]["messages"]
    assert estimate_prompt_tokens(sent) < 800  # 765 for the image, a few for the text
    assert result.usage.prompt_tokens == estimate_prompt_tokens(sent)
