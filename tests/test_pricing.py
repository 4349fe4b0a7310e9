"""Request costs from genai-prices' bundled data, user prices and free local models."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

from nbchat import ConfigError
from nbchat._pricing import (
    context_window,
    forget_free_endpoint,
    forget_price,
    is_free,
    mark_free,
    mark_free_endpoint,
    price_request,
    provider_for,
    register_price,
    request_cost,
)
from nbchat._types import RequestUsage

OPENAI = "https://api.openai.com/v1"
LOCAL = "http://127.0.0.1:8080/v1"
USAGE = RequestUsage(prompt_tokens=1_000_000, completion_tokens=100_000, cached_tokens=200_000)


@pytest.fixture(autouse=True)
def clean_prices() -> Iterator[None]:
    yield
    for model in ("my-model", "llama3.2:3b", "gpt-4o-mini", "tiny"):
        forget_price(model)


def test_known_openai_model_has_a_positive_cost_and_provider() -> None:
    cost, provider = request_cost("gpt-4o-mini", OPENAI, USAGE)
    assert provider == "openai"
    assert cost is not None and cost > 0
    # Cached prompt tokens are cheaper than fresh ones.
    uncached, _ = request_cost(
        "gpt-4o-mini", OPENAI, RequestUsage(prompt_tokens=1_000_000, completion_tokens=100_000)
    )
    assert uncached is not None and cost < uncached


def test_cost_grows_with_tokens() -> None:
    small, _ = request_cost("gpt-4o", OPENAI, RequestUsage(prompt_tokens=10, completion_tokens=1))
    large, _ = request_cost(
        "gpt-4o", OPENAI, RequestUsage(prompt_tokens=1000, completion_tokens=100)
    )
    assert small is not None and large is not None
    assert large == pytest.approx(small * 100)


def test_provider_comes_from_the_host_or_else_the_model_name() -> None:
    assert provider_for("claude-3-5-sonnet-latest", "https://api.anthropic.com/v1") == "anthropic"
    # An unknown host (a proxy, the fake server) falls back to the model name.
    assert provider_for("gpt-4o-mini", LOCAL) == "openai"
    cost, provider = request_cost("gpt-4o-mini", LOCAL, USAGE)
    assert provider == "openai" and cost == request_cost("gpt-4o-mini", OPENAI, USAGE)[0]


def test_unknown_model_costs_none_never_zero() -> None:
    assert request_cost("totally-unknown-model-x", LOCAL, USAGE) == (None, None)
    # A known provider with a model it does not price: provider known, cost unknown.
    assert request_cost("totally-unknown-model-x", OPENAI, USAGE) == (None, "openai")


@pytest.mark.parametrize(
    "usage",
    [None, RequestUsage(), RequestUsage(prompt_tokens=10), RequestUsage(completion_tokens=10)],
)
def test_missing_usage_means_unknown_cost(usage: RequestUsage | None) -> None:
    cost, provider = request_cost("gpt-4o-mini", OPENAI, usage)
    assert cost is None and provider == "openai"


def test_registered_price_is_used_and_overrides_genai_prices() -> None:
    register_price("my-model", input_per_mtok=2.0, output_per_mtok=10.0, cached_input_per_mtok=0.5)
    cost, _ = request_cost("my-model", LOCAL, USAGE)
    # 800k fresh * $2 + 200k cached * $0.5 + 100k out * $10, per million
    assert cost == pytest.approx(1.6 + 0.1 + 1.0)
    register_price("GPT-4o-mini", input_per_mtok=1.0, output_per_mtok=1.0)  # case-insensitive
    cost, provider = request_cost("gpt-4o-mini", OPENAI, USAGE)
    assert cost == pytest.approx(1.1) and provider == "openai"


def test_registered_price_without_cached_rate_charges_the_input_rate() -> None:
    register_price("my-model", input_per_mtok=2.0, output_per_mtok=0.0)
    assert request_cost("my-model", None, USAGE)[0] == pytest.approx(2.0)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_register_price_rejects_nonsense(bad: float) -> None:
    with pytest.raises(ConfigError):
        register_price("my-model", input_per_mtok=bad, output_per_mtok=1.0)


def test_local_and_marked_free_models_cost_zero() -> None:
    assert request_cost("local/SmolLM2-135M-Instruct", LOCAL, USAGE) == (0.0, "local")
    assert request_cost("local/anything", LOCAL, None) == (0.0, "local")
    assert is_free("local/x") and not is_free("llama3.2:3b")
    assert request_cost("llama3.2:3b", "http://localhost:11434/v1", USAGE) == (None, None)
    mark_free("llama3.2:3b")
    assert request_cost("llama3.2:3b", "http://localhost:11434/v1", USAGE) == (0.0, "local")


def test_every_model_at_a_free_endpoint_costs_zero() -> None:
    # The embedded server answers any model name (%%chat -m gpt-5 after %chat local):
    # a trial saw such a request counted as "cost unknown" everywhere.
    url = "http://127.0.0.1:50123/v1"
    assert request_cost("gpt-5-nonexistent", url, USAGE) == (None, None)
    mark_free_endpoint(url + "/")
    try:
        assert request_cost("gpt-5-nonexistent", url, USAGE) == (0.0, "local")
        assert request_cost("gpt-4o-mini", url, None) == (0.0, "local")
        assert request_cost("gpt-4o-mini", "http://127.0.0.1:50124/v1", USAGE)[0] != 0.0
    finally:
        forget_free_endpoint(url)
    assert request_cost("gpt-5-nonexistent", url, USAGE) == (None, None)


def test_context_window_from_data_or_registration() -> None:
    assert context_window("gpt-4o-mini", OPENAI) == 128_000
    assert context_window("gpt-4o-mini") == 128_000
    assert context_window("totally-unknown-model-x") is None
    assert context_window("local/x") is None
    mark_free("tiny", context_window=2048)
    assert context_window("tiny") == 2048
    register_price("my-model", input_per_mtok=1, output_per_mtok=1, context_window=9000)
    assert context_window("my-model", LOCAL) == 9000


def test_import_nbchat_does_not_load_genai_prices_or_duckdb() -> None:
    code = (
        "import sys, nbchat, nbchat._pricing, nbchat._store;"
        "print(sorted(m for m in ('genai_prices', 'duckdb', 'pandas') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "usage",
    [
        RequestUsage.model_construct(prompt_tokens=-5, completion_tokens=10),
        RequestUsage.model_construct(prompt_tokens=10, completion_tokens=-1),
        RequestUsage.model_construct(prompt_tokens=10.5, completion_tokens=1),
        RequestUsage.model_construct(prompt_tokens="n/a", completion_tokens=1),
        RequestUsage.model_construct(prompt_tokens=True, completion_tokens=1),
    ],
)
def test_counts_that_cannot_be_priced_are_unknown_never_an_exception(usage: RequestUsage) -> None:
    # genai-prices' Usage() raises a bare ValueError on negatives; a turn must not see it.
    assert request_cost("gpt-4o-mini", OPENAI, usage) == (None, "openai")
    register_price("my-model", input_per_mtok=1.0, output_per_mtok=1.0)
    assert request_cost("my-model", LOCAL, usage)[0] is None


def test_a_cost_is_never_negative() -> None:
    # More cached than prompt tokens (a server's bookkeeping bug) is capped at the prompt.
    odd = RequestUsage(prompt_tokens=10, completion_tokens=0, cached_tokens=10**9)
    cost, _ = request_cost("gpt-4o-mini", OPENAI, odd)
    assert cost is not None and cost >= 0
    huge = RequestUsage(prompt_tokens=2**63 - 1, completion_tokens=2**63 - 1)
    cost, _ = request_cost("gpt-4o-mini", OPENAI, huge)
    assert cost is not None and cost > 0


def test_provider_from_url_pins_the_one_private_genai_prices_use() -> None:
    # nbchat's only use of genai-prices' private snapshot API: if an upgrade changes it,
    # provider_from_url quietly answers None at run time, and this test says so.
    from nbchat._pricing import provider_from_url

    assert provider_from_url("https://api.openai.com/v1") == "openai"
    assert provider_from_url("https://api.anthropic.com/v1") == "anthropic"
    assert provider_from_url(LOCAL) is None


def test_cost_source_says_where_each_cost_came_from() -> None:
    assert price_request("gpt-4o-mini", OPENAI, USAGE)[2] == "genai-prices"
    served = USAGE.model_copy(update={"reported_cost_usd": 0.5})
    assert price_request("gpt-4o-mini", OPENAI, served) == (0.5, "openai", "server")
    assert price_request("totally-unknown-model-x", OPENAI, USAGE)[2] is None
    register_price("my-model", input_per_mtok=1, output_per_mtok=1)
    mark_free("my-free-model")
    try:
        assert price_request("my-model", LOCAL, USAGE)[2] == "registered"
        assert price_request("my-free-model", LOCAL, USAGE)[1:] == ("local", "free")
    finally:
        forget_price("my-model")
        forget_price("my-free-model")


def test_cache_writes_are_priced_by_genai_prices() -> None:
    base = RequestUsage(prompt_tokens=10_000, completion_tokens=0)
    written = base.model_copy(update={"cache_write_tokens": 10_000})
    plain, _ = request_cost("claude-3-5-sonnet-latest", None, base)
    cached, _ = request_cost("claude-3-5-sonnet-latest", None, written)
    assert plain is not None and cached is not None and cached > plain
