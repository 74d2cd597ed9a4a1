"""Near-duplicate prompts: 64-bit SimHash over word trigrams, matched by Hamming distance.

Banded lookup: with ``distance`` d, two fingerprints within d bits agree exactly on at least one
of d + 1 bands (pigeonhole), so only fingerprints sharing a band are compared.
"""

from __future__ import annotations

import hashlib
import re

_WORD = re.compile(r"\w+", re.UNICODE)


def simhash(text: str) -> int:
    words = _WORD.findall(text.lower())
    grams = [" ".join(words[i : i + 3]) for i in range(max(1, len(words) - 2))] or [""]
    weights = [0] * 64
    for gram in grams:
        h = int.from_bytes(hashlib.blake2b(gram.encode(), digest_size=8).digest(), "big")
        for bit in range(64):
            weights[bit] += 1 if h >> bit & 1 else -1
    return sum(1 << bit for bit in range(64) if weights[bit] > 0)


class NearDuplicates:
    """Remembers fingerprints; ``seen(text)`` is True when a near-duplicate was added before."""

    def __init__(self, distance: int = 3) -> None:
        self.distance = distance
        self._bands = distance + 1
        self._width = 64 // self._bands
        self._index: list[dict[int, list[int]]] = [{} for _ in range(self._bands)]

    def _keys(self, fp: int) -> list[int]:
        mask = (1 << self._width) - 1
        return [(fp >> (i * self._width)) & mask for i in range(self._bands)]

    def seen(self, text: str) -> bool:
        """Add ``text``; True (and not added) if a near-duplicate is already there."""
        fp = simhash(text)
        keys = self._keys(fp)
        for band, key in enumerate(keys):
            for other in self._index[band].get(key, ()):
                if (fp ^ other).bit_count() <= self.distance:
                    return True
        for band, key in enumerate(keys):
            self._index[band].setdefault(key, []).append(fp)
        return False
