"""Restart and crash safety: reopened caches still hit; a SIGKILLed writer loses nothing acked."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from semcache import SemanticCache
from semcache.embed import SentenceTransformerEmbedder

from .fakes import HashEmbedder

ROOT = Path(__file__).resolve().parents[1]


def test_thousand_entries_survive_reopen(
    tmp_path: Path, embedder: SentenceTransformerEmbedder
) -> None:
    prompts = [f"How do I configure service number {i} for region {i % 7}?" for i in range(1000)]
    with SemanticCache(tmp_path, embedder=embedder, hnsw_threshold=500) as cache:
        ids = cache.store_many([(p, f"answer {i}") for i, p in enumerate(prompts)])
    reopened = SemanticCache(tmp_path, embedder=embedder, hnsw_threshold=500)
    try:
        assert reopened.verify() == []
        assert reopened.shards.get(next(s for s, _ in reopened.shards.items())).kind == "hnsw"
        assert reopened._db.changes_since(reopened.shards.seq) == []  # nothing to replay
        vectors = reopened.embed(prompts)
        for i, (prompt, vector) in enumerate(zip(prompts, vectors, strict=True)):
            hit = reopened.lookup(prompt, vector=vector)
            assert hit is not None and hit.entry_id == ids[i] and hit.response == f"answer {i}"
        # and by meaning, not only by exact key: the semantic tier after restart
        reopened.l1.clear()
        _, found = reopened.shards.get(next(s for s, _ in reopened.shards.items())).search(
            vectors[123], 1
        )
        assert found[0] == reopened._db.rowid_of(ids[123])
    finally:
        reopened.close()


WRITER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {root!r})
    from tests.fakes import HashEmbedder
    from semcache import SemanticCache
    cache = SemanticCache({path!r}, embedder=HashEmbedder(), checkpoint_every=150)
    i = 0
    while True:
        prompt = f"crash test prompt {{i}} words {{i * 7}}"
        eid = cache.store(prompt, f"answer {{i}}", tags=[f"t{{i % 5}}"])
        print(eid, i, flush=True)
        if i % 40 == 0:
            cache.delete(eid)  # deletions interleaved: acknowledged deletes must hold too
            print("deleted", eid, flush=True)
        i += 1
    """
)


def test_sigkill_mid_stream_loses_no_acknowledged_write(tmp_path: Path) -> None:
    script = tmp_path / "writer.py"
    data = tmp_path / "data"
    script.write_text(WRITER.format(root=str(ROOT), path=str(data)))
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    acked: dict[str, int] = {}
    deleted: set[str] = set()
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    while len(acked) < 400 and time.monotonic() < deadline:
        line = proc.stdout.readline().split()
        if not line:
            break
        if line[0] == "deleted":
            deleted.add(line[1])
        else:
            acked[line[0]] = int(line[1])
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(acked) >= 400, "the writer did not get going"
    with SemanticCache(data, embedder=HashEmbedder()) as cache:
        assert cache.verify() == []
        for eid, i in acked.items():
            if eid in deleted:
                continue
            hit = cache.lookup(f"crash test prompt {i} words {i * 7}")
            assert hit is not None and hit.entry_id == eid and hit.response == f"answer {i}"
        for eid in deleted:
            assert cache.delete(eid) is False


def test_a_rebuild_and_a_re_embed_show_their_progress(tmp_path: Path) -> None:
    from rich.console import Console

    from semcache.progress import bars

    with SemanticCache(tmp_path, embedder=HashEmbedder(), threshold=0.9) as cache:
        cache.store_many([{"prompt": f"prompt {i} here", "response": str(i)} for i in range(50)])
    console = Console(record=True, width=400, force_terminal=False)
    with bars(console):
        SemanticCache(tmp_path, embedder=HashEmbedder(), threshold=0.9, rebuild=True).close()
        SemanticCache(
            tmp_path,
            embedder=HashEmbedder(model_id="test:other"),
            threshold=0.9,
            rebuild=True,
        ).close()
    text = console.export_text()
    assert text.count("rebuilding the index of") == 2  # asked for, then after the re-embed
    assert "re-embedding" in text
    assert "50/50 entries" in text and "50/50 prompts" in text


def test_the_store_keeps_each_vector_once_and_a_reopen_reads_them_back(tmp_path: Path) -> None:
    """Index files hold a graph's links, not its vectors: the store of record keeps each vector
    once (half precision), and a reopen fills the graph from it. Entries deleted, replaced or
    re-embedded after the checkpoint are caught up from the log, and the reopened index agrees
    with the store (``verify``)."""
    embedder = HashEmbedder(dim=64)
    prompts = [f"question number {i} about topic {i % 11}" for i in range(3000)]
    with SemanticCache(tmp_path, embedder=embedder, hnsw_threshold=500) as cache:
        ids = cache.store_many([(p, f"answer {i}") for i, p in enumerate(prompts)])
        while any(getattr(index, "pending", 0) for _, index in cache.shards.items()):
            time.sleep(0.05)
        cache.checkpoint()
        files = list((tmp_path / "index").glob("*.idx"))
        (shard_index,) = (index for _, index in cache.shards.items())
        saved = sum(f.stat().st_size for f in files)  # one shard: one file
        assert len(shard_index.to_bytes()) - saved >= 3000 * 64 * 4  # every vector left out
        cache.delete(ids[5])
        cache.update(ids[6], prompt="an entirely different question now")
        cache.store(prompts[7], "a new answer")  # replaces the exact repeat
        cache.shards.mark_all_dirty()  # keep the old checkpoint: close() must not write one
        cache.replica.checkpoint = lambda now: False  # type: ignore[method-assign]
    checkpointed = json.loads((tmp_path / "index" / "manifest.json").read_text())["seq"]
    reopened = SemanticCache(tmp_path, embedder=embedder, hnsw_threshold=500)
    try:
        assert reopened._db.last_seq() > checkpointed  # changes after the checkpoint ...
        assert reopened.replica.rebuilds == 0  # ... caught up from the log, no rebuild
        assert reopened.verify() == []
        vectors = reopened.embed(prompts[:200])
        for i in range(8, 200):
            hit = reopened.lookup(prompts[i], vector=vectors[i])
            assert hit is not None and hit.entry_id == ids[i]
        assert reopened.lookup(prompts[5]) is None
        hit = reopened.lookup(prompts[7])
        assert hit is not None and hit.response == "a new answer"
        found = reopened.lookup("an entirely different question now")
        assert found is not None and found.entry_id == ids[6]
    finally:
        reopened.close()


def test_automatic_checkpoints_space_out_as_the_index_grows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """By default a checkpoint waits for a quarter of the entries, at least CHECKPOINT_MIN and
    at most CHECKPOINT_MAX changes (a bulk load writes a few, not one per fixed interval, and a
    reopen replays at most the cap); an explicit ``checkpoint_every`` is kept to the letter;
    and the reopened cache has every entry."""
    from semcache import replica as replica_module

    monkeypatch.setattr(replica_module, "CHECKPOINT_MIN", 10)
    made: dict[str, list[int]] = {}
    for name, every, cap in (("adaptive", None, 10**9), ("capped", None, 30), ("fixed", 10, 0)):
        monkeypatch.setattr(replica_module, "CHECKPOINT_MAX", cap)
        with SemanticCache(
            tmp_path / name, embedder=HashEmbedder(), threshold=0.9, checkpoint_every=every
        ) as cache:
            seqs = made[name] = [0]
            real = cache.replica.checkpoint

            def spy(now: float | None, real: Any = real, seqs: list[int] = seqs) -> bool:
                if now is None:  # automatic, from following the log (close passes a time)
                    seqs.append(cache.replica.shards.seq)
                return bool(real(now))

            monkeypatch.setattr(cache.replica, "checkpoint", spy)
            for i in range(40):
                cache.store_many([(f"prompt {i} {j}", "ok") for j in range(10)])
        with SemanticCache(tmp_path / name, embedder=HashEmbedder(), threshold=0.9) as again:
            assert again.stats()["entries"] == 400 and again.verify() == []
    gaps = {name: [b - a for a, b in itertools.pairwise(seqs)] for name, seqs in made.items()}
    assert gaps["fixed"] == [10] * 40
    assert 5 <= len(gaps["adaptive"]) <= 15 and min(gaps["adaptive"]) >= 10
    assert max(gaps["adaptive"]) >= 80  # a quarter of 300-odd entries
    assert max(gaps["capped"]) <= 30 and len(gaps["capped"]) >= 13


@pytest.mark.parametrize("every", [None, 10])
def test_a_process_that_does_not_own_the_checkpoints_asks_once_per_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, every: int | None
) -> None:
    """While another cache owns the folder's checkpoints, a writer's catch-ups do not try to
    take them over (and count the entries) on every write past the interval: once per
    interval (CHECKPOINT_MIN changes, or ``checkpoint_every``). The owner keeps its
    checkpoints; both stay consistent."""
    from semcache import replica as replica_module

    monkeypatch.setattr(replica_module, "CHECKPOINT_MIN", 10)
    with SemanticCache(tmp_path, embedder=HashEmbedder(), threshold=0.9) as owner:
        owner.store("owner words", "ok")
        owner.checkpoint()
        assert owner.shards.owner
        with SemanticCache(
            tmp_path, embedder=HashEmbedder(), threshold=0.9, checkpoint_every=every
        ) as other:
            assert not other.shards.owner
            tried: list[bool] = []
            real = other.replica.checkpoint

            def spy(now: float | None) -> bool:
                took = bool(real(now))
                tried.append(took)
                return took

            monkeypatch.setattr(other.replica, "checkpoint", spy)
            for i in range(200):
                other.store(f"other prompt {i}", "ok")
            assert tried and not any(tried) and len(tried) <= 25
            assert other.verify() == []
        assert owner.verify() == [] and owner.stats()["entries"] == 201
