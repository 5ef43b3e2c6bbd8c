"""The operator commands, run as the real ``semcache`` CLI in subprocesses on a temp folder:
import (batched, progress bar, bad lines reported by number and skipped), export (round trip),
stats, verify [--fix], invalidate --tag/--namespace/--similar."""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from semcache import Scope, SemanticCache
from semcache.embed import SentenceTransformerEmbedder

ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "COLUMNS": "120",
}
SUPPORT = {"namespace": "support", "model": "gpt-x"}
LINES = [
    {"prompt": "What is the capital of France?", "response": "Paris", "tags": ["geo"]},
    {
        "prompt": "How do I reset my password?",
        "response": "Use the reset link on the sign-in page.",
        "scope": SUPPORT,
        "tags": ["account"],
        "ttl": 3600,
    },
    '{"prompt": "broken line',
    {"prompt": "Who wrote Hamlet?", "response": "Shakespeare", "ttl": -5},
    "",
    {"prompt": "How can I cancel my subscription?", "response": "Settings > Billing > Cancel."},
    {"prompt": "Who painted the Mona Lisa?", "response": "Leonardo da Vinci", "metadata": {"s": 1}},
]


def semcache_cli(
    *args: str, timeout: float = 180, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """The installed console script's code path: ``semcache.cli:main`` in a new process."""
    return subprocess.run(
        [sys.executable, "-c", "from semcache.cli import main; main()", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**ENV, **(env or {})},
    )


def write_jsonl(path: Path, lines: list[object]) -> Path:
    path.write_text(
        "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines),
        encoding="utf-8",
    )
    return path


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:  # type: ignore[type-arg]
    """A folder filled by one ``semcache import`` (batches of 2 lines), left closed."""
    base = tmp_path_factory.mktemp("ops")
    source = write_jsonl(base / "known.jsonl", LINES)
    done = semcache_cli("import", str(source), "--data", str(base / "data"), "--batch-size", "2")
    return base / "data", done


def copy_of(folder: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(folder, target)
    return target


def test_import_stores_good_lines_and_reports_bad_ones_by_number(
    imported: tuple[Path, subprocess.CompletedProcess],  # type: ignore[type-arg]
    embedder: SentenceTransformerEmbedder,
) -> None:
    data, done = imported
    assert done.returncode == 1, done.stdout + done.stderr  # some lines were bad
    assert "stored 4 entries" in done.stdout and "2 bad line(s)" in done.stdout
    assert ":3: not JSON" in done.stderr
    assert ":4: 'ttl' must be seconds" in done.stderr
    assert done.stderr.count("nothing stored from this line") == 2
    # the progress bar, with its count and ETA (rich renders its final state off a terminal)
    assert "importing" in done.stderr and "7/7 lines" in done.stderr and "ETA" in done.stderr
    assert re.search(r"ETA \d+:\d\d:\d\d", done.stderr), done.stderr
    # where the time went, and which thread counts embedded the 4 good lines
    assert re.search(r"embedding [\d.]+s, storing [\d.]+s, reading [\d.]+s", done.stdout)
    counts = re.findall(r"(\d+) threads?: (\d+) lines", done.stdout)
    assert counts and sum(int(n) for _, n in counts) == 4, done.stdout

    with SemanticCache(data, embedder=embedder) as cache:
        assert cache.stats()["entries"] == 4
        hit = cache.lookup("What is the capital city of France?")
        assert hit is not None and hit.response == "Paris"
        # the scope from the line: found in it, not outside it
        assert cache.lookup("How do I reset my password?") is None
        hit = cache.lookup("How do I reset my password?", scope=Scope.from_dict(SUPPORT))
        assert hit is not None
        entry = cache.get(hit.entry_id)
        assert entry.tags == ("account",)
        assert entry.expires_at is not None
        assert 3000 < entry.expires_at - time.time() <= 3600
        # nothing from the bad line whose prompt was fine
        assert cache.lookup("Who wrote Hamlet?") is None
        mona = cache.lookup("Who painted the Mona Lisa?")
        assert mona is not None and dict(cache.get(mona.entry_id).metadata) == {"s": 1}


def test_import_of_a_missing_file_fails_cleanly(tmp_path: Path) -> None:
    done = semcache_cli("import", str(tmp_path / "nope.jsonl"), "--data", str(tmp_path / "d"))
    assert done.returncode == 2
    assert "is not a file" in done.stderr and "Traceback" not in done.stderr


def test_stats_reads_the_folder_without_loading_the_model(
    imported: tuple[Path, subprocess.CompletedProcess],  # type: ignore[type-arg]
) -> None:
    data, _ = imported
    done = semcache_cli("stats", "--data", str(data), "--json")
    assert done.returncode == 0, done.stderr
    numbers = json.loads(done.stdout)
    assert numbers["entries"] == 4
    assert numbers["model_id"].endswith("all-MiniLM-L6-v2")
    table = semcache_cli("stats", "--data", str(data))
    assert table.returncode == 0 and "entries" in table.stdout


def test_stats_on_a_folder_without_a_cache_says_so(tmp_path: Path) -> None:
    done = semcache_cli("stats", "--data", str(tmp_path / "empty"))
    assert done.returncode == 1
    assert "no cache in" in done.stderr
    assert not (tmp_path / "empty").exists()  # looking did not create a cache


def test_verify_reports_and_fixes_a_drifted_counter(
    imported: tuple[Path, subprocess.CompletedProcess],  # type: ignore[type-arg]
    tmp_path: Path,
) -> None:
    data = copy_of(imported[0], tmp_path)
    ok = semcache_cli("verify", "--data", str(data))
    assert ok.returncode == 0 and "ok: store and index agree" in ok.stdout
    with sqlite3.connect(data / "semcache.db") as db:  # a counter that drifted from the table
        db.execute("UPDATE counters SET entries = entries + 5")
    found = semcache_cli("verify", "--data", str(data))
    assert found.returncode == 1
    assert "entry counter says 9, table has 4" in found.stdout
    assert "--fix" in found.stderr
    fixed = semcache_cli("verify", "--data", str(data), "--fix")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert "fixed: 1 problem(s) repaired" in fixed.stdout
    assert "rebuilding the index" in fixed.stderr and "ETA" in fixed.stderr  # its progress bar
    again = semcache_cli("verify", "--data", str(data))
    assert again.returncode == 0 and "ok:" in again.stdout


def test_an_opening_that_rebuilds_the_index_shows_its_bar_on_stderr(
    imported: tuple[Path, subprocess.CompletedProcess],  # type: ignore[type-arg]
    tmp_path: Path,
) -> None:
    data = copy_of(imported[0], tmp_path)
    for path in data.iterdir():  # the index files gone: opening rebuilds from the store
        if path.is_dir():
            shutil.rmtree(path)
    done = semcache_cli("stats", "--data", str(data), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["entries"] == 4  # stdout stays the command's output
    assert "rebuilding the index" in done.stderr and "4/4 entries" in done.stderr


def test_export_writes_what_import_reads(
    imported: tuple[Path, subprocess.CompletedProcess],  # type: ignore[type-arg]
    tmp_path: Path,
    embedder: SentenceTransformerEmbedder,
) -> None:
    data, _ = imported
    out = tmp_path / "export.jsonl"
    done = semcache_cli("export", "--data", str(data), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "exported 4 entries" in done.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    by_prompt = {row["prompt"]: row for row in rows}
    assert set(by_prompt) == {
        "What is the capital of France?",
        "How do I reset my password?",
        "How can I cancel my subscription?",
        "Who painted the Mona Lisa?",
    }
    reset = by_prompt["How do I reset my password?"]
    assert Scope.from_dict(reset["scope"]) == Scope.from_dict(SUPPORT)
    assert reset["tags"] == ["account"] and 3000 < reset["ttl"] <= 3600
    assert by_prompt["What is the capital of France?"]["ttl"] is None

    # one namespace only, to stdout
    support = semcache_cli("export", "--data", str(data), "--namespace", "support")
    assert [json.loads(x)["prompt"] for x in support.stdout.splitlines()] == [
        "How do I reset my password?"
    ]

    # and the export loads into another folder as the same entries
    again = semcache_cli("import", str(out), "--data", str(tmp_path / "other"), "--no-progress")
    assert again.returncode == 0, again.stderr
    with SemanticCache(tmp_path / "other", embedder=embedder) as other:
        assert other.stats()["entries"] == 4
        hit = other.lookup("How do I reset my password?", scope=Scope.from_dict(SUPPORT))
        assert hit is not None and other.get(hit.entry_id).tags == ("account",)


def test_export_leaves_out_what_is_not_live_and_import_reads_every_ttl(tmp_path: Path) -> None:
    """Entries dead since a bump or expired are not exported (an export | import used to bring
    a bumped answer back); a TTL longer than import takes is written as import's maximum."""
    from semcache.cli_ops import MAX_TTL, parse_line

    from .fakes import HashEmbedder

    data = tmp_path / "src"
    acme = Scope(namespace="acme")
    with SemanticCache(data, embedder=HashEmbedder()) as c:
        c.store("What is the refund policy?", "30 days (stale)", scope=acme)
        c.store("an expired answer", "gone", scope=acme, ttl=0)
        c.bump("acme")
        c.store("What is the refund policy?", "14 days", scope=acme)
        c.store("a very long lived answer", "kept", ttl=1e300)
    done = semcache_cli("export", "--data", str(data))
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert sorted(row["response"] for row in rows) == ["14 days", "kept"]
    assert max(row["ttl"] for row in rows if row["ttl"] is not None) == MAX_TTL
    items = [parse_line(line) for line in done.stdout.splitlines()]  # import takes every line
    with SemanticCache(data, embedder=HashEmbedder()) as c:
        c.store_many(items)
        hit = c.lookup("What is the refund policy?", scope=acme)
        assert hit is not None and hit.response == "14 days"


def test_invalidate_by_tag_namespace_and_meaning(
    imported: tuple[Path, subprocess.CompletedProcess],  # type: ignore[type-arg]
    tmp_path: Path,
    embedder: SentenceTransformerEmbedder,
) -> None:
    data = copy_of(imported[0], tmp_path)
    tagged = semcache_cli("invalidate", "--data", str(data), "--tag", "geo")
    assert tagged.returncode == 0, tagged.stderr
    assert "removed 1 entries tagged geo" in tagged.stdout
    bumped = semcache_cli("invalidate", "--data", str(data), "--namespace", "support")
    assert bumped.returncode == 0 and "now version 1" in bumped.stdout
    similar = semcache_cli(
        "invalidate", "--data", str(data), "--similar", "who painted mona lisa", "--radius", "0.8"
    )
    assert similar.returncode == 0, similar.stderr
    assert "removed 1 entries similar to" in similar.stdout
    with SemanticCache(data, embedder=embedder) as cache:
        assert cache.lookup("What is the capital of France?") is None
        assert cache.lookup("How do I reset my password?", scope=Scope.from_dict(SUPPORT)) is None
        assert cache.lookup("Who painted the Mona Lisa?") is None
        kept = cache.lookup("How can I cancel my subscription?")
        assert kept is not None  # the one entry no invalidation covered


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "give --tag, --namespace or --similar"),
        (("--similar", "x"), "--similar needs --radius"),
        (("--radius", "0.9"), "--radius goes with --similar"),
        (("--similar", "x", "--radius", "0.9", "--tag", "t"), "cannot be combined"),
    ],
)
def test_invalidate_refuses_unclear_requests(
    args: tuple[str, ...], message: str, tmp_path: Path
) -> None:
    done = semcache_cli("invalidate", "--data", str(tmp_path), *args)
    assert done.returncode == 2
    assert message in done.stderr


def test_the_cli_works_on_the_folder_a_running_sidecar_serves(tmp_path: Path) -> None:
    """Import and invalidate from the CLI while the sidecar has the folder open: the sidecar
    serves what was imported and stops serving what was invalidated."""
    import httpx

    from .fake_upstream import start_sidecar, stop

    data = tmp_path / "shared"
    proc, url = start_sidecar(data, None, {"SEMCACHE_LOG_LEVEL": "warning"})
    base = url.removesuffix("/v1")
    try:
        source = write_jsonl(
            tmp_path / "faq.jsonl",
            [{"prompt": "How do I reset my password?", "response": "Use it.", "tags": ["faq"]}],
        )
        done = semcache_cli("import", str(source), "--data", str(data), "--no-progress")
        assert done.returncode == 0, done.stderr
        found = httpx.post(
            f"{base}/v1/cache/lookup", json={"prompt": "How can I reset my password?"}, timeout=60
        ).json()
        assert found["hit"] is True and found["response"] == "Use it."
        gone = semcache_cli("invalidate", "--data", str(data), "--tag", "faq")
        assert gone.returncode == 0 and "removed 1 entries" in gone.stdout
        after = httpx.post(
            f"{base}/v1/cache/lookup", json={"prompt": "How can I reset my password?"}, timeout=60
        ).json()
        assert after["hit"] is False
    finally:
        stop(proc)


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ('{"prompt": "p"}', "'response' must be a non-empty string"),
        ('{"prompt": "  ", "response": "r"}', "'prompt' must be a non-empty string"),
        ('["p", "r"]', "not a JSON object"),
        ('{"prompt": "p", "response": "r", "tag": ["x"]}', "unknown field(s) ['tag']"),
        ('{"prompt": "p", "response": "r", "scope": {"namespce": "a"}}', "unknown scope field"),
        ('{"prompt": "p", "response": "r", "scope": {"params": [1]}}', "bad scope"),
        ('{"prompt": "p", "response": "r", "tags": "x"}', "'tags' must be a list"),
        ('{"prompt": "p", "response": "r", "ttl": true}', "'ttl' must be seconds"),
        ('{"prompt": "p", "response": "r", "ttl": NaN}', "'ttl' must be seconds"),
        ('{"prompt": "p", "response": "r", "ttl": 1e999}', "'ttl' must be seconds"),
        ('{"prompt": "p", "response": "r", "ttl": 1' + "0" * 400 + "}", "'ttl' must be seconds"),
        ('{"prompt": "p", "response": "r", "metadata": 3}', "'metadata' must be an object"),
    ],
)
def test_each_kind_of_bad_line_is_named(line: str, reason: str) -> None:
    from semcache.cli_ops import BadLine, parse_line

    with pytest.raises(BadLine, match=re.escape(reason)):
        parse_line(line)


def test_a_good_line_becomes_a_store_many_item() -> None:
    from semcache.cli_ops import parse_line

    item = parse_line(json.dumps({**LINES[1], "metadata": {"k": 1}}))  # type: ignore[dict-item]
    assert item["scope"] == Scope.from_dict(SUPPORT)
    assert item["tags"] == ["account"] and item["ttl"] == 3600 and item["metadata"] == {"k": 1}
    assert "ttl" not in parse_line('{"prompt": "p", "response": "r"}')  # the cache's default
    assert parse_line('{"prompt": "p", "response": "r", "ttl": null}')["ttl"] is None


class RefusesOne:
    """Refuses (as the cache does, with InvalidInputError) any batch holding the prompt "bad";
    records which vector came with each stored prompt."""

    def __init__(self) -> None:
        self.stored: list[tuple[str, float]] = []

    def store_many(self, items: list[dict[str, object]], *, vectors: object) -> list[str]:
        import numpy as np

        from semcache import InvalidInputError

        rows = np.asarray(vectors)
        assert len(rows) == len(items)
        if any(item["prompt"] == "bad" for item in items):
            raise InvalidInputError("refused")
        self.stored += [(str(i["prompt"]), float(v[0])) for i, v in zip(items, rows, strict=True)]
        return [f"id{len(self.stored)}"] * len(items)


def test_a_batch_the_cache_refuses_is_stored_line_by_line_with_its_vectors() -> None:
    import numpy as np

    from semcache.cli_ops import _store_batch

    fake = RefusesOne()
    errors: list[tuple[int, str]] = []
    batch = [(1, {"prompt": "a"}), (2, {"prompt": "bad"}), (3, {"prompt": "c"})]
    vectors = np.array([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]])
    assert _store_batch(fake, batch, vectors, errors) == 2  # type: ignore[arg-type]
    assert fake.stored == [("a", 1.0), ("c", 3.0)] and errors == [(2, "refused")]


def test_a_failing_store_stops_the_batch_instead_of_blaming_lines(
    fast_cache: SemanticCache,
) -> None:
    import numpy as np

    from semcache import CacheClosedError
    from semcache.cli_ops import _store_batch

    fast_cache.close()
    errors: list[tuple[int, str]] = []
    with pytest.raises(CacheClosedError):
        _store_batch(fast_cache, [(1, {"prompt": "a", "response": "b"})], np.ones((1, 8)), errors)
    assert errors == []


def test_the_bar_total_counts_a_last_line_without_its_newline(tmp_path: Path) -> None:
    from semcache.cli_ops import _count_lines

    path = tmp_path / "a.jsonl"
    for text, lines in [(b"", 0), (b"x\n", 1), (b"x\ny", 2), (b"x\n\n", 2), (b"y", 1)]:
        path.write_bytes(text)
        assert _count_lines(path) == lines, text


@pytest.mark.postgres
def test_operator_commands_work_on_a_shared_postgres_store(tmp_path: Path) -> None:
    """``--data postgresql://...`` opens the store as one more replica (schema and index folder
    from SEMCACHE_SCHEMA and SEMCACHE_INDEX_DIR, as for the sidecar), without the model."""
    import uuid

    import psycopg

    from .fakes import HashEmbedder

    url = "postgresql://root@127.0.0.1:5432/test"
    schema = "semcache_cli_" + uuid.uuid4().hex[:10]
    try:
        with SemanticCache(
            url, embedder=HashEmbedder(), schema=schema, index_dir=tmp_path / "app", threshold=0.9
        ) as cache:
            cache.store("alpha beta", "a", tags=["doc:1"])
            cache.store("gamma delta", "b")
        env = {"SEMCACHE_SCHEMA": schema, "SEMCACHE_INDEX_DIR": str(tmp_path / "ops")}
        out = semcache_cli("stats", "--data", url, "--json", env=env)
        assert out.returncode == 0, out.stderr
        numbers = json.loads(out.stdout)
        assert numbers["entries"] == 2 and f"schema {schema}" in numbers["store"]
        assert semcache_cli("verify", "--data", url, env=env).returncode == 0
        out = semcache_cli("invalidate", "--data", url, "--tag", "doc:1", env=env)
        assert out.returncode == 0, out.stderr
        out = semcache_cli("export", "--data", url, env=env)
        assert [json.loads(line)["response"] for line in out.stdout.splitlines()] == ["b"]
        assert (tmp_path / "ops").is_dir()  # the operator's replica kept its index there
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")  # type: ignore[arg-type]
