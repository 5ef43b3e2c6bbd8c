"""A fake embedder with exactly known similarities, for tests that reason about radii and k.

``"topic 3"`` is the unit vector on axis 3. ``"topic 3 variant 2"`` leans off that axis by a
known amount (towards axis ``half + 3``), so its cosine with ``"topic 3"`` is exactly
``1 / sqrt(1 + (STEP * 2) ** 2)``. Topics are orthogonal to each other (similarity 0), so a
lookup of one topic can only ever be answered by an entry of the same topic. Any other text
falls back to :class:`tests.fakes.HashEmbedder`. It satisfies the Embedder protocol.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np

from .fakes import HashEmbedder

#: How far each variant step leans off its topic's axis.
STEP = 0.05
_TOPIC = re.compile(r"^topic (\d+)(?: variant (\d+))?$")


def similarity(variant_a: int, variant_b: int) -> float:
    """The exact cosine between two variants of one topic (variant 0 is the topic itself)."""
    a, b = STEP * variant_a, STEP * variant_b
    return (1 + a * b) / math.sqrt((1 + a * a) * (1 + b * b))


class AxisEmbedder:
    """Maps ``"topic i [variant j]"`` to fixed vectors; other texts to hashed bags of words."""

    def __init__(self, dim: int = 64, model_id: str = "test:axis") -> None:
        if dim % 2:
            raise ValueError("dim must be even")
        self.dim = dim
        self.model_id = model_id
        self.half = dim // 2
        self._fallback = HashEmbedder(dim=dim, model_id=model_id)
        self.calls = 0

    def topic_vector(self, topic: int, variant: int = 0) -> np.ndarray:
        """The unit vector of ``"topic {topic} variant {variant}"``."""
        if not 0 <= topic < self.half:
            raise ValueError(f"topic must be in [0, {self.half})")
        out = np.zeros(self.dim, dtype=np.float32)
        out[topic] = 1.0
        out[self.half + topic] = STEP * variant
        return out / np.linalg.norm(out)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        self.calls += 1
        rows = []
        for text in texts:
            match = _TOPIC.match(text.strip().lower())
            if match is None:
                rows.append(self._fallback.embed([text])[0])
            else:
                rows.append(self.topic_vector(int(match[1]), int(match[2] or 0)))
        return np.stack(rows).astype(np.float32) if rows else np.zeros((0, self.dim), np.float32)
