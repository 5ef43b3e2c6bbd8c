"""``SemanticCache(target_error=...)``: the error-budget policy wired into the facade (labels
from the cache's own traffic, exploration, feedback, state kept in the store)."""

from __future__ import annotations

from pathlib import Path

import pytest

from semcache import InvalidInputError, SemanticCache
from semcache.embed import SentenceTransformerEmbedder
from semcache.errorbudget import ErrorBudget

from .fakes import HashEmbedder


def budget(**kwargs: float) -> ErrorBudget:
    """A budget whose score is the cosine itself, so the test controls every decision."""
    options = {"prior": 0.95, "min_similarity": 0.3, "explore": 0.0, "seed": 1, **kwargs}
    return ErrorBudget(0.02, scorer=lambda q, c, s: s, **options)  # type: ignore[arg-type]


def test_target_error_is_a_rate_and_excludes_a_threshold(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="not both"):
        SemanticCache(tmp_path, embedder=HashEmbedder(), threshold=0.9, target_error=0.02)
    with pytest.raises(InvalidInputError):
        SemanticCache(tmp_path, embedder=HashEmbedder(), target_error=1.5)


def test_a_refused_candidate_gets_a_free_label_when_the_llm_answers(tmp_path: Path) -> None:
    policy = budget()
    with SemanticCache(tmp_path, embedder=HashEmbedder(), threshold=policy) as c:
        c.store("alpha beta gamma delta epsilon", "same answer")
        # similar enough to score, below the 0.95 point: refused, then answered by the LLM
        got = c.get_or_compute("alpha beta gamma delta zeta", lambda p: "same answer")
        assert got == "same answer"
        assert c.stats()["labels"]["free"] == 1
        state = c.stats()["policy_state"]["default"]
        assert state["labels"] == 1 and state["labels_by_source"]["free"] == 1


def test_exploration_answers_an_uncertain_hit_from_the_llm_and_labels_it(tmp_path: Path) -> None:
    policy = budget(prior=0.5, explore=1.0, band=1.0)
    calls: list[str] = []
    with SemanticCache(tmp_path, embedder=HashEmbedder(), threshold=policy) as c:
        c.store("alpha beta gamma delta epsilon", "cached answer")
        assert c.lookup("alpha beta gamma delta zeta") is not None  # a hit at this point

        def llm(prompt: str) -> str:
            calls.append(prompt)
            return "fresh answer"

        assert c.get_or_compute("alpha beta gamma delta zeta", llm) == "fresh answer"
        assert calls == ["alpha beta gamma delta zeta"]
        assert c.stats()["explored"] == 1 and c.stats()["labels"]["explore"] == 1
        assert policy.stats()["labels_by_source"]["explore"] == 1
        labels = policy.state_dict()["namespaces"]["default"]
        assert sum(labels["wrong"]) == 1 and sum(labels["right"]) == 0  # the answers disagreed


def test_feedback_labels_and_the_state_survives_a_restart(tmp_path: Path) -> None:
    with SemanticCache(tmp_path, embedder=HashEmbedder(), threshold=budget(prior=0.5)) as c:
        eid = c.store("alpha beta gamma delta epsilon", "answer")
        hit = c.lookup("alpha beta gamma delta zeta")
        assert hit is not None and hit.entry_id == eid and hit.tier == "semantic"
        c.feedback(eid, False)
        assert c.stats()["policy_state"]["default"]["labels_by_source"]["feedback"] == 1
    reopened = budget(prior=0.5)
    with SemanticCache(tmp_path, embedder=HashEmbedder(), threshold=reopened) as c:
        assert reopened.stats()["labels_by_source"]["feedback"] == 1  # loaded from the store
        assert c.stats()["policy_state"]["default"]["labels"] == 1


def test_feedback_refused_for_its_similarity_counts_and_teaches_nothing(tmp_path: Path) -> None:
    """The similarity is checked before the verdict is counted or given to the policy: a
    refused call changes nothing (it used to count a wrong answer and a label first)."""
    with SemanticCache(tmp_path, embedder=HashEmbedder(), threshold=budget(prior=0.5)) as c:
        eid = c.store("alpha beta gamma delta epsilon", "answer")
        assert c.lookup("alpha beta gamma delta zeta") is not None
        for bad in (float("nan"), 5.0, "0.9"):
            with pytest.raises(InvalidInputError, match="similarity"):
                c.feedback(eid, False, similarity=bad)  # type: ignore[arg-type]
        assert c.stats()["feedback_wrong"] == 0
        assert c.stats()["policy_state"]["default"]["labels"] == 0
        assert c.get(eid).response == "answer"


def test_target_error_with_the_real_model(
    tmp_path: Path, embedder: SentenceTransformerEmbedder
) -> None:
    with SemanticCache(tmp_path, embedder=embedder, target_error=0.02) as c:
        c.store("What is the price of item 366?", "$12")
        assert c.lookup("What is the price of item 367?") is None  # numbers differ: never
        state = c.stats()["policy_state"]["default"]
        assert state["target"] == 0.02 and state["source"] == "prior"
        assert c.verify() == []


def test_labels_reach_the_store_as_they_arrive_and_survive_a_kill(tmp_path: Path) -> None:
    """A process killed with SIGKILL (no close, no checkpoint) keeps all but the last batch of
    its labels: the policy saves them to the store every 16 labels."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        f"""
        import os, signal
        from semcache import SemanticCache
        from semcache.errorbudget import ErrorBudget
        from tests.fakes import HashEmbedder
        policy = ErrorBudget(0.02, scorer=lambda q, c, s: s, prior=0.5, min_similarity=0.3,
                             explore=0.0, seed=1)
        c = SemanticCache({str(tmp_path)!r}, embedder=HashEmbedder(), threshold=policy)
        eid = c.store("alpha beta gamma delta epsilon", "answer")
        for _ in range(40):
            assert c.lookup("alpha beta gamma delta zeta") is not None
            c.feedback(eid, True)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True)
    assert done.returncode == -9, done.stderr
    reopened = budget(prior=0.5)
    with SemanticCache(tmp_path, embedder=HashEmbedder(), threshold=reopened):
        saved = reopened.stats()["labels_by_source"].get("feedback", 0)
        assert 40 - 16 < saved <= 40  # at most one batch of 16 lost
