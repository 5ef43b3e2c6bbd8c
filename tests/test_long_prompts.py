"""Long prompts: above the model's 256-token window a hit needs the same words."""

from __future__ import annotations

from pathlib import Path

from semcache import SemanticCache
from semcache.nearmiss import WINDOW_TOKENS, exceeds_window, same_words
from semcache.threshold import default_policy

MATERIALS = [
    "steel", "copper", "timber", "glass", "cotton", "rubber", "paper", "cement", "wool",
    "marble", "granite", "silver", "nickel", "zinc", "carbon",
]  # fmt: skip
# A pasted document of about 600 tokens (distinct sentences), then the question.
DOCUMENT = " ".join(
    f"Section {i}: the {w} supplier shipped {i * 7} crates of {w} parts to the Leeds depot, "
    f"and the invoice was settled {i + 2} days later after a routine audit of the order."
    for i, w in enumerate(MATERIALS)
)
ASK_REVENUE = DOCUMENT + "\n\nQuestion: which supplier shipped the most crates?"
ASK_AUDIT = DOCUMENT + "\n\nQuestion: summarise how the audits went."


def test_window_check_agrees_with_the_models_tokenizer(embedder) -> None:  # type: ignore[no-untyped-def]
    tok = embedder._model.tokenizer
    texts = [
        "short prompt",
        DOCUMENT[:300],
        DOCUMENT[:900],
        DOCUMENT[:1200],
        DOCUMENT[:1500],
        ASK_REVENUE,
        "x" * 250,
        "antidisestablishmentarianism " * 60,
    ]
    for text in texts:
        n = len(tok(text, add_special_tokens=True, truncation=False)["input_ids"])
        assert exceeds_window(text) is (n > WINDOW_TOKENS), (n, text[:40])
    assert exceeds_window(ASK_REVENUE) and not exceeds_window("What is the capital of France?")


def test_model_cannot_tell_the_long_prompts_apart(embedder) -> None:  # type: ignore[no-untyped-def]
    """Why the guard exists: the cosine sees only the shared document."""
    v = embedder.embed([ASK_REVENUE, ASK_AUDIT])
    assert float(v[0] @ v[1]) > 0.99


def test_shared_document_different_question_is_a_miss(tmp_path: Path, embedder) -> None:  # type: ignore[no-untyped-def]
    with SemanticCache(tmp_path / "c", embedder=embedder) as cache:
        cache.store(ASK_REVENUE, "copper")
        assert cache.lookup(ASK_AUDIT) is None
        hit = cache.lookup(ASK_REVENUE)
        assert hit is not None and hit.response == "copper"
        # Same words, other spacing and case: still the same long prompt.
        hit = cache.lookup(ASK_REVENUE.upper().replace("\n\n", "  "))
        assert hit is not None and hit.response == "copper"


def test_policy_above_the_window_decides_by_the_words() -> None:
    policy = default_policy()
    assert not policy.accept(ASK_AUDIT, ASK_REVENUE, 0.999)
    assert policy.accept(ASK_REVENUE.lower(), ASK_REVENUE, 0.999)
    assert same_words("Hello,   WORLD!", "hello world")
    assert not same_words("3.5 apples", "35 apples")
    # One long side is enough: a short prompt never matches a long one by the words.
    assert not policy.accept("which supplier shipped the most crates?", ASK_REVENUE, 0.999)
