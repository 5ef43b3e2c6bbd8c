"""notebooks/threshold_tuning.ipynb executes top to bottom (so it never goes stale)."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "threshold_tuning.ipynb"


def test_notebook_executes(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # Committed without outputs.
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("SEMCACHE_EVAL_CACHE", str(tmp_path / "emb"))
    client = NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}})  # fmt: skip
    client.execute()
    text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert "GPTCache rule" in text and "verifier" in text
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert errors == []
