"""Feedback on served answers: per-entry similarity floors learned online.

A wrong semantic hit at similarity ``s`` gives the entry its own floor just above ``s``, so
prompts that far from it are never answered by it again (per-entry thresholds learned online, in
the spirit of vCache); a wrong exact repeat (similarity 1.0) means the answer itself is wrong,
and the entry is deleted.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from .errors import InvalidInputError
from .store import Store
from .threshold import check_threshold

#: How far above a wrongly served similarity an entry's own floor is set by feedback.
FEEDBACK_MARGIN = 0.005


class Feedback:
    """Remembers the similarity each entry was last served at, and applies verdicts."""

    def __init__(self, store: Store, remember: int = 10_000) -> None:
        self.store = store
        # uid -> (similarity, a learning policy's score, namespace) of its last semantic hit
        self._served: OrderedDict[str, tuple[float, float | None, str]] = OrderedDict()
        self._remember = remember

    def served(
        self, uid: str, similarity: float, score: float | None = None, namespace: str = ""
    ) -> None:
        self._served[uid] = (similarity, score, namespace)
        self._served.move_to_end(uid)
        if len(self._served) > self._remember:
            self._served.popitem(last=False)

    def score_of(self, uid: str) -> tuple[float | None, str]:
        """The learning policy's score of the entry's last semantic hit, and its namespace."""
        _, score, namespace = self._served.get(uid, (1.0, None, ""))
        return score, namespace

    @staticmethod
    def check_similarity(sim: Any) -> float:
        """A similarity a verdict may carry (a cosine in [-1, 1]); InvalidInputError if not."""
        if isinstance(sim, float) and 1.0 < sim < 1.0 + 1e-5:
            sim = 1.0  # float32 rounding of a unit vector's self-similarity
        try:
            return check_threshold(sim)
        except InvalidInputError:
            raise InvalidInputError(
                f"similarity must be a cosine similarity in [-1, 1], not {sim!r}"
            ) from None

    def apply(self, rowid: int, uid: str, correct: bool, similarity: float | None) -> bool:
        """Record a verdict; True when the entry was deleted (a wrong exact answer)."""
        sim = self._served.get(uid, (1.0, None, ""))[0] if similarity is None else similarity
        sim = self.check_similarity(sim)
        if correct:
            self.store.feedback_good(rowid)
            return False
        if sim >= 1.0 - 1e-6:
            self.store.delete_ids([rowid])
            return True
        self.store.feedback_bad(rowid, min(sim + FEEDBACK_MARGIN, 1.0))
        return False
