"""EXPERIMENT, NOT SHIPPED: a cross-encoder verifier (the packaged MiniLM reads both prompts).

Kept to make a negative result reproducible: trained on shippable data only, it served 14% false
hits on QQP pairs at the cut calibrated on shippable data, and even with the cut chosen on QQP's
own labels it found fewer duplicates at 2% false hits than cosine alone (see README.md here).


The bi-encoder embeds each prompt alone, so "Convert 5 miles to km" and "Convert 5 km to miles"
land at cosine 0.99. A cross-encoder attends across the two texts and can see the swap. This
one is the packaged all-MiniLM-L6-v2 with its top transformer layer(s) fine-tuned as a pair
classifier and a linear head over the mean-pooled output; only those layers and the head ship,
as an fp16 delta (6.8 MB, written by ``train_reranker.py``; not in the repository) applied at
load time over the packaged base model. It was trained only on shippable data (see
``evals/train_reranker.py``).

:class:`RerankerPolicy` is a :class:`~semcache.threshold.HitPolicy`: a candidate is served when
its cosine is at least ``min_similarity`` (a floor) and the cross-encoder's P(same answer) is at
least ``min_score``. Only candidates above the floor are scored: one ~10-20 ms forward pass of
a 6-layer MiniLM on one CPU thread per verified candidate.
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from semcache.errors import InvalidInputError
from semcache.threshold import POLICY_FORMAT, check_threshold

DELTA_FORMAT = 1
#: Where train_reranker.py writes the delta by default; ``$SEMCACHE_RERANKER_DELTA`` overrides it.
DEFAULT_DELTA = Path(
    os.environ.get("SEMCACHE_RERANKER_DELTA")
    or Path(__file__).parent / "reranker_delta.safetensors"
)

_BASE: dict[str, Any] = {}
_BASE_LOCK = threading.Lock()


def _base_path() -> Path:
    from semcache.embed import default_model_path

    return default_model_path()


def load_base(base_path: str | os.PathLike[str] | None = None) -> tuple[Any, Any]:
    """A *fresh* copy of the packaged BERT (its layers get overwritten) and its tokenizer."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = str(base_path or _base_path())
    with _BASE_LOCK:
        tok = _BASE.get(path)
        if tok is None:
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
            _BASE[path] = tok
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = AutoModel.from_pretrained(path, local_files_only=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    model.eval()
    return model, tok


class PairHead:
    """Mean-pool the last hidden states over real tokens, then one linear unit: the logit."""

    @staticmethod
    def pool(hidden: Any, mask: Any) -> Any:
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


class CrossEncoder:
    """The packaged MiniLM with a fine-tuned top and a pair-classification head.

    ``logits(queries, candidates)`` returns log-odds that a cached answer to the candidate is
    right for the query. Scores are memoised (prompts repeat in a cache's traffic).
    """

    def __init__(
        self,
        delta_path: str | os.PathLike[str] | None = None,
        *,
        base_path: str | os.PathLike[str] | None = None,
        memo: int = 65536,
    ) -> None:
        import torch
        from safetensors.torch import load_file

        self.delta_path = Path(delta_path) if delta_path is not None else DEFAULT_DELTA
        if not self.delta_path.is_file():
            raise InvalidInputError(f"no cross-encoder delta at {self.delta_path}")
        self.meta = read_meta(self.delta_path)
        if self.meta.get("format") != DELTA_FORMAT:
            raise InvalidInputError("not a semcache cross-encoder delta (format 1)")
        self.model, self.tokenizer = load_base(base_path)
        tensors = load_file(str(self.delta_path))
        head_w = tensors.pop("head.weight").float()
        head_b = tensors.pop("head.bias").float()
        state = self.model.state_dict()
        missing = [k for k in tensors if k not in state]
        if missing:
            raise InvalidInputError(f"delta does not fit the base model: {missing[:3]}")
        self.model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=False)
        self.head = torch.nn.Linear(head_w.shape[1], 1)
        with torch.no_grad():
            self.head.weight.copy_(head_w)
            self.head.bias.copy_(head_b)
        self.head.eval()
        self.max_length = int(self.meta.get("max_length", 96))
        self._memo: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._memo_size = memo
        self._lock = threading.Lock()

    def _forward(self, queries: Sequence[str], candidates: Sequence[str]) -> np.ndarray:
        import torch

        enc = self.tokenizer(
            list(queries),
            list(candidates),
            truncation=True,
            max_length=self.max_length,
            padding=True,
            return_tensors="pt",
        )
        with torch.inference_mode():
            hidden = self.model(**enc).last_hidden_state
            z = self.head(PairHead.pool(hidden, enc["attention_mask"])).squeeze(-1)
        return z.float().numpy().astype(np.float64)

    def logits(
        self, queries: Sequence[str], candidates: Sequence[str], *, batch: int = 64
    ) -> np.ndarray:
        if len(queries) != len(candidates):
            raise InvalidInputError("one candidate per query")
        out = np.zeros(len(queries), dtype=np.float64)
        todo: list[int] = []
        with self._lock:
            for i, key in enumerate(zip(queries, candidates, strict=True)):
                hit = self._memo.get(key)
                if hit is None:
                    todo.append(i)
                else:
                    out[i] = hit
        # Sort by length so batches pad little.
        todo.sort(key=lambda i: len(queries[i]) + len(candidates[i]))
        for s in range(0, len(todo), batch):
            idx = todo[s : s + batch]
            z = self._forward([queries[i] for i in idx], [candidates[i] for i in idx])
            out[idx] = z
            with self._lock:
                for i, v in zip(idx, z, strict=True):
                    self._memo[(queries[i], candidates[i])] = float(v)
                while len(self._memo) > self._memo_size:
                    self._memo.popitem(last=False)
        return out

    def logit(self, query: str, candidate: str) -> float:
        return float(self.logits([query], [candidate])[0])

    def score(self, query: str, candidate: str) -> float:
        """P(a cached answer to ``candidate`` correctly answers ``query``)."""
        return 1.0 / (1.0 + math.exp(-self.logit(query, candidate)))


def read_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON metadata stored in a delta file's header."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        raw = (fh.metadata() or {}).get("semcache", "{}")
    try:
        return dict(json.loads(raw))
    except json.JSONDecodeError:
        raise InvalidInputError(f"bad metadata in {path}") from None


_SHIPPED: dict[str, CrossEncoder] = {}


def shipped_cross_encoder() -> CrossEncoder:
    """The cross-encoder built from the shipped delta (loaded once per process)."""
    with _BASE_LOCK:
        ce = _SHIPPED.get("ce")
    if ce is None:
        ce = CrossEncoder()
        with _BASE_LOCK:
            ce = _SHIPPED.setdefault("ce", ce)
    return ce


class RerankerPolicy:
    """A :class:`~semcache.threshold.HitPolicy`: cosine floor, then the cross-encoder's vote."""

    kind = "reranker"

    def __init__(
        self,
        min_similarity: float = 0.8,
        min_score: float = 0.5,
        *,
        model: CrossEncoder | None = None,
        delta_path: str | os.PathLike[str] | None = None,
        info: dict[str, Any] | None = None,
    ) -> None:
        self.min_similarity = check_threshold(min_similarity)
        if not 0.0 <= float(min_score) <= 1.0:
            raise InvalidInputError("min_score is a probability in [0, 1]")
        self.min_score = float(min_score)
        self.delta_path = str(delta_path) if delta_path is not None else None
        self._model = model
        self.info = dict(info or {})

    @property
    def model(self) -> CrossEncoder:
        if self._model is None:
            self._model = (
                CrossEncoder(self.delta_path) if self.delta_path else shipped_cross_encoder()
            )
        return self._model

    def score(self, query: str, candidate: str, similarity: float) -> float:
        return self.model.score(query, candidate)

    def accept(self, query: str, candidate: str, similarity: float) -> bool:
        if similarity < self.min_similarity:
            return False
        return self.model.score(query, candidate) >= self.min_score

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": POLICY_FORMAT,
            "kind": self.kind,
            "min_similarity": self.min_similarity,
            "min_score": self.min_score,
            "delta_path": self.delta_path,
            "info": self.info,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RerankerPolicy:
        try:
            return cls(
                d["min_similarity"], d["min_score"], delta_path=d.get("delta_path"),
                info=d.get("info"),
            )  # fmt: skip
        except KeyError as exc:
            raise InvalidInputError(f"not a reranker policy record: missing {exc}") from None

    def __repr__(self) -> str:
        return f"RerankerPolicy(min_similarity={self.min_similarity}, min_score={self.min_score})"


def shipped_reranker_policy() -> RerankerPolicy:
    """The shipped cross-encoder at the operating point calibrated when it was trained."""
    meta = read_meta(DEFAULT_DELTA)
    rec = meta.get("policy")
    if not rec:
        raise InvalidInputError("the shipped cross-encoder delta has no operating point")
    return RerankerPolicy(rec["min_similarity"], rec["min_score"], info=rec.get("info"))
