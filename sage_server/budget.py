"""Token budgets for results: the default, the hard ceiling, and cutting a result down until it fits."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from pydantic import BaseModel

from sage_server.errors import InvalidInput
from sage_server.text import ASCII_CHARS_PER_TOKEN, estimate_tokens

DEFAULT_MAX_TOKENS = 4000
# Assistants refuse a tool result over 25,000 tokens (Claude Code's default MAX_MCP_OUTPUT_TOKENS); the
# ceiling stays well under it, since clients count with their own tokenizer and ours is an estimate.
MAX_TOKENS_CEILING = 20_000
MIN_MAX_TOKENS = 200

M = TypeVar("M", bound=BaseModel)


def check(max_tokens: int | None) -> int:
    """The budget to use: `max_tokens`, or the default when it is None; InvalidInput outside the bounds."""
    if max_tokens is None:
        return DEFAULT_MAX_TOKENS
    if not MIN_MAX_TOKENS <= max_tokens <= MAX_TOKENS_CEILING:
        raise InvalidInput(
            f"max_tokens must be between {MIN_MAX_TOKENS} and {MAX_TOKENS_CEILING}, got {max_tokens}",
            field="max_tokens",
        )
    return max_tokens


def cost(model: BaseModel) -> int:
    """Estimated tokens of `model` serialized as compact JSON, the form a client hands to the model."""
    return estimate_tokens(model.model_dump_json())


def ensure(model: M, max_tokens: int) -> M:
    """Return `model` if it fits `max_tokens`; otherwise the budget is too small for even a minimal answer."""
    needed = cost(model)
    if needed > max_tokens:
        raise InvalidInput(
            f"max_tokens={max_tokens} cannot hold even the smallest answer here (about {needed} tokens); "
            "ask with a larger max_tokens",
            field="max_tokens",
            needed=needed,
        )
    return model


def largest(count: int, fits: Callable[[int], bool]) -> int:
    """The largest k in 0..count for which `fits(k)` holds, for a `fits` that holds up to some k and not after.

    Binary search: a result of a few hundred items or a long text is serialized O(log n) times, not n.
    """
    low, high = 0, count
    while low < high:
        middle = (low + high + 1) // 2
        if fits(middle):
            low = middle
        else:
            high = middle - 1
    return low


def boundary(text: str, end: int) -> int:
    """Move a cut at `end` back to the last paragraph, line or word break in its final quarter, if there is one.

    The text before the returned offset keeps the break, so the next part starts on fresh text.
    """
    if end >= len(text):
        return len(text)
    floor = end * 3 // 4
    for separator in ("\n\n", "\n", " "):
        at = text.rfind(separator, floor, end)
        if at > 0:
            return at + len(separator)
    return end


def fit_text(text: str, build: Callable[[int], M], max_tokens: int) -> M:
    """`build(n)` for the largest `n` (cut at a break) whose result fits `max_tokens`; `build(len(text))` if all fits.

    `build(n)` makes the result from `text[:n]` and must say itself that it was cut when `n < len(text)`.
    The result may still be over budget when even `build(0)` is; pass it through `ensure`.
    """
    whole = build(len(text))
    if cost(whole) <= max_tokens:
        return whole
    # Every character costs at least 1/ASCII_CHARS_PER_TOKEN of a token: no longer prefix can fit.
    reach = min(len(text), int(max_tokens * ASCII_CHARS_PER_TOKEN) + 1)
    end = largest(reach, lambda n: cost(build(n)) <= max_tokens)
    tidy = build(boundary(text, end))
    return tidy if cost(tidy) <= max_tokens else build(end)
