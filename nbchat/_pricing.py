"""What a model request cost, from genai-prices' bundled price data (never the network).

The provider is recognised from the base URL's host (``api.openai.com`` -> openai,
...); a URL it does not know (a proxy, a local server) falls back to recognising the
model name. A model nobody knows costs ``None`` — unknown, never 0. Users can
register their own price per model, and mark models free (local ones); any model
named ``local/...`` (the embedded model) is free.

``genai_prices`` is imported inside the functions: it takes a quarter of a second
to load, and ``import nbchat`` must stay cheap. Pricing never raises into a turn:
token counts it cannot price (negative, not integers) and any failure inside
genai-prices make the cost unknown, and a cost is never negative.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from ._config import LOCAL_PREFIX, is_loopback
from ._exceptions import ConfigError
from ._types import CostSource, RequestUsage

__all__ = [
    "UserPrice",
    "context_window",
    "forget_price",
    "is_free",
    "mark_free",
    "mark_free_endpoint",
    "price_request",
    "provider_for",
    "provider_from_url",
    "register_price",
    "request_cost",
]


@dataclass(frozen=True)
class UserPrice:
    """A price the user registered, in USD per million tokens, or a free model."""

    input_per_mtok: float = 0.0
    output_per_mtok: float = 0.0
    cached_input_per_mtok: float | None = None
    context_window: int | None = None
    free: bool = False


_user_prices: dict[str, UserPrice] = {}
_free_endpoints: set[str] = set()  # base URLs where every model is free (the embedded one)
_lock = threading.Lock()


def _key(model: str) -> str:
    return model.strip().lower()


def _check_rate(name: str, value: float | None) -> None:
    if value is not None and not (isinstance(value, int | float) and math.isfinite(value)):
        raise ConfigError(f"{name} must be a finite number of USD per million tokens.")
    if value is not None and value < 0:
        raise ConfigError(f"{name} cannot be negative (got {value}).")


def register_price(
    model: str,
    *,
    input_per_mtok: float,
    output_per_mtok: float,
    cached_input_per_mtok: float | None = None,
    context_window: int | None = None,
) -> None:
    """Price ``model`` yourself, in USD per million tokens; overrides genai-prices.

    ``cached_input_per_mtok`` prices prompt tokens the server reports as cached
    (default: the input price). ``context_window`` (tokens) lets compaction know
    when the history is getting long.
    """
    _check_rate("input_per_mtok", input_per_mtok)
    _check_rate("output_per_mtok", output_per_mtok)
    _check_rate("cached_input_per_mtok", cached_input_per_mtok)
    with _lock:
        _user_prices[_key(model)] = UserPrice(
            float(input_per_mtok),
            float(output_per_mtok),
            None if cached_input_per_mtok is None else float(cached_input_per_mtok),
            context_window,
        )


def mark_free(model: str, *, context_window: int | None = None) -> None:
    """Record that ``model`` costs nothing (a local model): its cost is 0.0, not unknown."""
    with _lock:
        _user_prices[_key(model)] = UserPrice(context_window=context_window, free=True)


def mark_free_endpoint(base_url: str) -> None:
    """Record that every model at ``base_url`` costs nothing (the embedded model's
    server answers whatever model name a request gives, ``-m gpt-5`` included)."""
    with _lock:
        _free_endpoints.add(base_url.rstrip("/"))


def forget_free_endpoint(base_url: str) -> None:
    """Undo ``mark_free_endpoint`` (the server at ``base_url`` is gone)."""
    with _lock:
        _free_endpoints.discard(base_url.rstrip("/"))


def forget_price(model: str) -> None:
    """Undo ``register_price``/``mark_free`` for ``model``."""
    with _lock:
        _user_prices.pop(_key(model), None)


def _user_price(model: str, base_url: str | None = None) -> UserPrice | None:
    if base_url is not None and base_url.rstrip("/") in _free_endpoints:
        return UserPrice(free=True)
    if _key(model).startswith(LOCAL_PREFIX):
        with _lock:
            return _user_prices.get(_key(model), UserPrice(free=True))
    with _lock:
        return _user_prices.get(_key(model))


def is_free(model: str) -> bool:
    """Whether ``model`` was marked free (or is a ``local/...`` model)."""
    price = _user_price(model)
    return price is not None and price.free


@lru_cache(maxsize=64)
def provider_from_url(base_url: str) -> str | None:
    """The provider genai-prices recognises from an API URL alone, if any.

    genai-prices has no public call for this (``calc_price(provider_api_url=...)``
    also needs a model it knows), so this is nbchat's one use of its private snapshot
    API; ``tests/test_pricing.py`` fails if an upgrade changes it.
    """
    from genai_prices.data_snapshot import get_snapshot

    try:
        provider = get_snapshot().find_provider(None, None, base_url)
    except LookupError:
        return None  # a proxy or local server: the model name is recognised instead
    except Exception:  # a changed private API must not cost a turn; the test catches it
        return None
    return str(provider.id)


@lru_cache(maxsize=256)
def _lookup(model: str, base_url: str | None) -> tuple[str | None, Any]:
    """(provider id, genai-prices ModelInfo) for a model at an endpoint; either may be None."""
    from genai_prices import Usage, calc_price

    provider = provider_from_url(base_url) if base_url else None
    try:
        # Pricing nothing is the public way to ask which model and provider match.
        found = calc_price(Usage(input_tokens=0, output_tokens=0), model, provider_id=provider)
    except Exception:  # LookupError for an unknown model; anything else is genai-prices'
        return provider, None
    return str(found.provider.id), found.model


def provider_for(model: str, base_url: str | None = None) -> str | None:
    """The provider id genai-prices recognises for this model and endpoint, if any."""
    if _key(model).startswith(LOCAL_PREFIX):
        return "local"
    return _lookup(model, base_url)[0]


def request_cost(
    model: str, base_url: str | None, usage: RequestUsage | None
) -> tuple[float | None, str | None]:
    """(cost in USD or ``None`` if unknown, provider id or ``None``) of one request.

    A free model costs 0.0 even when the server reported no usage. Otherwise the
    cost is unknown when usage, its prompt or its completion tokens are missing, or
    when neither the user nor genai-prices has a price for the model.
    """
    cost, provider, _ = price_request(model, base_url, usage)
    return cost, provider


def price_request(
    model: str, base_url: str | None, usage: RequestUsage | None
) -> tuple[float | None, str | None, CostSource | None]:
    """``request_cost`` and where the cost came from (``None`` when it is unknown).

    A cost the server reported with the usage (OpenRouter's ``usage.cost``) is what
    the request cost: it wins over any price list, including a model marked free.
    """
    reported = getattr(usage, "reported_cost_usd", None)
    if reported is not None:
        return _cost(float(reported)), provider_for(model, base_url), "server"
    price = _user_price(model, base_url)
    if price is not None and price.free:
        local = _key(model).startswith(LOCAL_PREFIX) or is_loopback(base_url)
        return 0.0, "local" if local else provider_for(model, base_url), "free"
    cost, provider = _listed_cost(model, base_url, usage, price)
    if cost is None:
        return None, provider, None
    return cost, provider, "registered" if price is not None else "genai-prices"


def _listed_cost(
    model: str, base_url: str | None, usage: RequestUsage | None, price: UserPrice | None
) -> tuple[float | None, str | None]:
    """The cost from the user's price or genai-prices' list, and the provider."""
    provider = provider_for(model, base_url)
    prompt, completion = _count(usage, "prompt_tokens"), _count(usage, "completion_tokens")
    if prompt is None or completion is None:
        return None, provider
    cached = min(_count(usage, "cached_tokens") or 0, prompt)
    if price is not None:
        cached_rate = price.input_per_mtok
        if price.cached_input_per_mtok is not None:
            cached_rate = price.cached_input_per_mtok
        total = (
            (prompt - cached) * price.input_per_mtok
            + cached * cached_rate
            + completion * price.output_per_mtok
        )
        return _cost(total / 1_000_000), provider
    _, info = _lookup(model, base_url)
    if info is None:
        return None, provider
    from genai_prices import Usage, calc_price

    try:
        # OpenAI counts cached tokens inside prompt_tokens, as genai-prices expects of
        # input_tokens; reasoning tokens are likewise inside completion_tokens.
        written = min(_count(usage, "cache_write_tokens") or 0, prompt - cached)
        tokens = Usage(
            input_tokens=prompt,
            cache_read_tokens=cached or None,
            cache_write_tokens=written or None,
            output_tokens=completion,
        )
        result = calc_price(tokens, model, provider_id=provider)
        return _cost(float(result.total_price)), provider
    except Exception:  # genai-prices refusing a count (or failing) must not cost a turn
        return None, provider


def _count(usage: RequestUsage | None, field: str) -> int | None:
    """A token count that can be priced: a non-negative int, else ``None`` (unknown)."""
    value = getattr(usage, field, None)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def _cost(value: float) -> float | None:
    """A cost as recorded: finite and non-negative, else unknown."""
    return value if math.isfinite(value) and value >= 0 else None


def context_window(model: str, base_url: str | None = None) -> int | None:
    """The model's context window in tokens (registered, or genai-prices'), or ``None``."""
    price = _user_price(model)
    if price is not None and price.context_window is not None:
        return price.context_window
    if _key(model).startswith(LOCAL_PREFIX):
        return None
    info = _lookup(model, base_url)[1]
    window = getattr(info, "context_window", None)
    return int(window) if window else None
