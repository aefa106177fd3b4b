"""A batch of finished features: geometries in the work CRS plus attribute columns."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

__all__ = ["FeatureBatch", "stable_ids"]


@dataclass
class FeatureBatch:
    """Features of one layer; ``key`` (n, 2) is each feature's first pixel (row, col)."""

    geoms: np.ndarray
    key: np.ndarray
    columns: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.geoms)

    @classmethod
    def empty(cls) -> FeatureBatch:
        return cls(np.empty(0, dtype=object), np.empty((0, 2), dtype=np.int64), {})

    def take(self, idx: np.ndarray) -> FeatureBatch:
        return FeatureBatch(
            self.geoms[idx], self.key[idx], {k: v[idx] for k, v in self.columns.items()}
        )

    def sorted(self) -> FeatureBatch:
        """The same features ordered by first pixel (row, then column)."""
        if len(self) == 0:
            return self
        return self.take(np.lexsort((self.key[:, 1], self.key[:, 0])))


def stable_ids(scene: str, layer: str, key: np.ndarray) -> np.ndarray:
    """Ids that depend only on the scene, layer and first pixel: identical for any chunking."""
    out = np.empty(len(key), dtype=object)
    for i, (r, c) in enumerate(key.tolist()):
        out[i] = hashlib.sha1(f"{scene}|{layer}|{r}|{c}".encode()).hexdigest()[:16]
    return out
