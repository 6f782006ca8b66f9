"""Where a query's terms stand in a document's text, and how close together: the proximity and sequence parts of
a search score (search.rescore) and where a snippet starts. Offsets are characters of lower-case raw text; each
term is a sorted list of the offsets where it starts."""

from __future__ import annotations

import bisect

# Proximity: two terms this many characters apart count half as much as two side by side, and two found only in
# the opposite order to the query's count ORDERED times as much (words typed together were usually read together,
# in that order).
PAIR_SCALE = 60
ORDERED = 0.5
# Sequence: the shortest stretch holding every term in the query's order counts half at this many characters.
SEQUENCE_SCALE = 100
# Occurrences of one term looked at in one document: enough to find it near the others.
MAX_OCCURRENCES = 200


def word_starts(text: str, key: str, cjk: bool) -> list[int]:
    """Offsets in `text` where a word starts with `key` (anywhere, for CJK), at most MAX_OCCURRENCES of them."""
    found: list[int] = []
    at = text.find(key)
    while at >= 0 and len(found) < MAX_OCCURRENCES:
        if cjk or at == 0 or not text[at - 1].isalnum():
            found.append(at)
        at = text.find(key, at + 1)
    return found


def _gap(first: list[int], second: list[int]) -> int | None:
    """The smallest distance between an offset in `first` and one in `second` (both sorted)."""
    if not first or not second:
        return None
    few, many = (first, second) if len(first) <= len(second) else (second, first)
    best: int | None = None
    for at in few:
        i = bisect.bisect_left(many, at)
        for j in (i - 1, i):
            if 0 <= j < len(many) and (best is None or abs(many[j] - at) < best):
                best = abs(many[j] - at)
    return best


def _ordered_gap(first: list[int], second: list[int]) -> int | None:
    """The smallest distance from an offset in `first` forward to one in `second` (both sorted)."""
    best: int | None = None
    for at in first:
        i = bisect.bisect_right(second, at)
        if i == len(second):
            break
        if best is None or second[i] - at < best:
            best = second[i] - at
    return best


def pair_proximity(starts: list[list[int]], weights: list[float], all_pairs: bool) -> float:
    """How close together the terms are, 0-1: every pair of terms (with `all_pairs`; else neighbours in the query,
    for long queries) counts by its weight and by how near its closest occurrences are (1 when adjacent, 1/2 at
    PAIR_SCALE)."""
    count = len(starts)
    pairs = (
        [(i, j) for i in range(count) for j in range(i + 1, count)]
        if all_pairs
        else [(i, i + 1) for i in range(count - 1)]
    )
    total = found = 0.0
    for i, j in pairs:
        weight = weights[i] + weights[j]
        total += weight
        gap = _gap(starts[i], starts[j])
        if gap is not None:
            ahead = _ordered_gap(starts[i], starts[j]) if ORDERED < 1 else gap
            close = 1 / (1 + gap / PAIR_SCALE)
            if ahead is not None:
                close = max(close * ORDERED, 1 / (1 + ahead / PAIR_SCALE))
            else:
                close *= ORDERED
            found += weight * close
    return found / total if total else 0.0


def in_order(starts: list[list[int]]) -> float:
    """How close together the terms stand in the query's order, 0-1: 1 when the shortest stretch holding each term
    after the one before it is short, 1/2 when it is SEQUENCE_SCALE characters long, 0 when no such stretch exists
    (a term is missing, or no occurrence of one follows the one before)."""
    if len(starts) < 2 or not all(starts):
        return 0.0
    best: int | None = None
    for first in starts[0]:
        at = first
        for offsets in starts[1:]:
            i = bisect.bisect_right(offsets, at)
            if i == len(offsets):
                break
            at = offsets[i]
        else:
            best = at - first if best is None else min(best, at - first)
            continue
        break  # no later occurrence of some term follows this one, hence none follows any later one either
    return 0.0 if best is None else 1 / (1 + best / SEQUENCE_SCALE)


def densest(starts: list[list[int]], width: int) -> int | None:
    """The offset that opens the stretch of `width` characters holding the most distinct terms (for snippets)."""
    events = sorted((at, term) for term, offsets in enumerate(starts) for at in offsets)
    if not events:
        return None
    counts = [0] * len(starts)
    distinct = best = low = 0
    best_at = events[0][0]
    for at, term in events:
        distinct += counts[term] == 0
        counts[term] += 1
        while at - events[low][0] > width:
            gone = events[low][1]
            counts[gone] -= 1
            distinct -= counts[gone] == 0
            low += 1
        if distinct > best:
            best, best_at = distinct, events[low][0]
    return best_at
