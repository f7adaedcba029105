"""The seeded split of example positions, shared by every source that splits its own examples
(arrays, image folders, ``distrain data pack``)."""
from __future__ import annotations

import numpy as np


def split_indices(n: int, fractions: tuple[float, ...], seed: int) -> list[np.ndarray]:
    """Seeded permutation of ``range(n)`` cut into the given leading fractions plus the rest."""
    order = np.random.default_rng(seed).permutation(n)
    parts, start = [], 0
    for frac in fractions:
        size = int(round(n * frac))
        parts.append(np.sort(order[start:start + size]))
        start += size
    parts.append(np.sort(order[start:]))
    return parts
