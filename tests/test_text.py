"""Ground-floor text helpers: redacting secrets, making text valid Unicode."""

from __future__ import annotations

from nbchat._text import redact, redact_data, valid_data, valid_text


def test_redact_replaces_the_given_secrets_and_key_shapes() -> None:
    text = (
        "key my-own-secret-value rejected (Authorization: Bearer tok.en-1/2+3==), sk-proj-AbC123xyz"
    )
    assert redact(text, "my-own-secret-value") == (
        "key [redacted] rejected (Authorization: Bearer [redacted]), sk-[redacted]"
    )
    assert redact("BEARER abcdefgh and SK-ABCDEFGH") == "BEARER [redacted] and sk-[redacted]"
    # OpenAI's own half-masked echo is still key-shaped.
    assert redact("Incorrect API key provided: sk-abc1****************wxyz.") == (
        "Incorrect API key provided: sk-[redacted]."
    )


def test_redact_leaves_ordinary_text_and_tiny_secrets_alone() -> None:
    text = "a task-list, sk-learn, sk- alone, the Bearer of news"
    assert redact(text, "a", "", "sk") == text
    assert redact("no secrets here", "k") == "no secrets here"


def test_redact_data_walks_bodies() -> None:
    body = {"error": {"message": "bad sk-abcdefgh1234", "list": ["Bearer xyz12345", 3, None]}}
    assert redact_data(body) == {
        "error": {"message": "bad sk-[redacted]", "list": ["Bearer [redacted]", 3, None]}
    }
    assert redact_data(None) is None


def test_valid_text_fast_path_and_repairs() -> None:
    ok = "plain ascii" * 100
    assert valid_text(ok) is ok
    emoji = "naïve 🐼"
    assert valid_text(emoji) is emoji
    assert valid_text("a\udcffb") == "a\ufffdb"
    assert valid_text("\ud83d\udc3c") == "🐼"  # a pair left split in a str is joined
    assert valid_text("\ud83d") == "\ufffd" and valid_text("\udc3c\ud83d") == "\ufffd\ufffd"
    assert valid_data({"k\ud800": ["v\udfff", 1]}) == {"k\ufffd": ["v\ufffd", 1]}
