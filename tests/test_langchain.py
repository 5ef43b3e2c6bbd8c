"""semcache.langchain.SemanticLangChainCache with the real langchain-core and its fake chat
models: paraphrases are served, other models / parameters / histories miss, clear() bumps the
namespace, async works, and streaming follows LangChain's own rules."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("langchain_core", reason="the langchain extra is not installed")

from langchain_core.globals import get_llm_cache, set_llm_cache
from langchain_core.language_models.fake import FakeListLLM
from langchain_core.language_models.fake_chat_models import (
    FakeListChatModel,
    FakeMessagesListChatModel,
    GenericFakeChatModel,
)
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langchain_core.outputs import ChatGeneration

from semcache import SemanticCache
from semcache.embed import SentenceTransformerEmbedder
from semcache.langchain import SemanticLangChainCache, split_prompt

QUESTION = "What is the capital of France?"
PARAPHRASE = "What is the capital city of France?"


@pytest.fixture
def lc_cache(
    tmp_path: Path, embedder: SentenceTransformerEmbedder
) -> Iterator[SemanticLangChainCache]:
    cache = SemanticCache(tmp_path / "lc", embedder=embedder)
    yield SemanticLangChainCache(cache)
    cache.close()


@pytest.fixture
def global_cache(lc_cache: SemanticLangChainCache) -> Iterator[SemanticLangChainCache]:
    """The adapter installed with set_llm_cache, as a LangChain app does (restored after)."""
    before = get_llm_cache()
    set_llm_cache(lc_cache)
    yield lc_cache
    set_llm_cache(before)


def generic(*answers: str, **kwargs: object) -> GenericFakeChatModel:
    return GenericFakeChatModel(messages=iter(answers), **kwargs)


def test_a_paraphrase_is_served_from_the_cache(global_cache: SemanticLangChainCache) -> None:
    model = FakeListChatModel(responses=["Paris.", "the model ran again"])
    first = model.invoke(QUESTION)
    assert first.content == "Paris."
    again = model.invoke(PARAPHRASE)
    assert again.content == "Paris."  # from the cache: the model would have said otherwise
    assert global_cache.cache.stats()["entries"] == 1
    other = model.invoke("How do I bake sourdough bread?")
    assert other.content == "the model ran again"


def test_cache_argument_of_one_model(lc_cache: SemanticLangChainCache) -> None:
    model = generic("Paris.", "second", cache=lc_cache)
    assert model.invoke(QUESTION).content == "Paris."
    hit = model.invoke(PARAPHRASE)
    assert hit.content == "Paris." and isinstance(hit, AIMessage)
    # what lookup returns are LangChain's own generations, revived
    (generation,) = lc_cache.lookup(*_key(QUESTION, model))  # type: ignore[misc]
    assert isinstance(generation, ChatGeneration) and generation.message.content == "Paris."


def _key(question: str, model: GenericFakeChatModel) -> tuple[str, str]:
    from langchain_core.load import dumps

    return dumps([HumanMessage(question)]), model._get_llm_string(stop=None)


def test_another_model_or_other_parameters_miss(lc_cache: SemanticLangChainCache) -> None:
    assert generic("Paris.", cache=lc_cache).invoke(QUESTION).content == "Paris."
    # another model (another llm_string) never gets that answer, even for the same words
    other = FakeListChatModel(responses=["from the other model"], cache=lc_cache)
    assert other.invoke(QUESTION).content == "from the other model"
    # the same model with other invocation parameters misses too
    same = generic("with a stop list", cache=lc_cache)
    assert same.invoke(QUESTION, stop=["\n"]).content == "with a stop list"
    assert generic("unused", cache=lc_cache).invoke(PARAPHRASE).content == "Paris."


def test_earlier_messages_are_part_of_the_scope(lc_cache: SemanticLangChainCache) -> None:
    brief = [SystemMessage("Answer in one word."), HumanMessage(QUESTION)]
    assert generic("Paris", cache=lc_cache).invoke(brief).content == "Paris"
    french = [SystemMessage("Answer in French."), HumanMessage(QUESTION)]
    assert generic("C'est Paris.", cache=lc_cache).invoke(french).content == "C'est Paris."
    # the same history with a paraphrased last question: served
    brief2 = [SystemMessage("Answer in one word."), HumanMessage(PARAPHRASE)]
    assert generic("unused", cache=lc_cache).invoke(brief2).content == "Paris"
    # another earlier turn: a miss, though the last question is the same
    talk = [HumanMessage("Let's talk about Germany."), AIMessage("Sure."), HumanMessage(QUESTION)]
    assert generic("Berlin? No: Paris.", cache=lc_cache).invoke(talk).content == (
        "Berlin? No: Paris."
    )


def test_split_prompt_compares_only_the_last_human_message() -> None:
    from langchain_core.load import dumps

    prompt = dumps([SystemMessage("sys"), HumanMessage("first"), AIMessage("a"), HumanMessage("q")])
    text, context = split_prompt(prompt)
    assert text == "q"
    assert [m.get("content") for m in context[:3]] == ["sys", "first", "a"]
    assert context[3]["compared"] is True
    assert split_prompt("a plain LLM prompt") == ("a plain LLM prompt", [])


def test_clear_bumps_the_namespace_only(
    lc_cache: SemanticLangChainCache, embedder: SentenceTransformerEmbedder
) -> None:
    other = SemanticLangChainCache(lc_cache.cache, namespace="other-app")
    generic("Paris.", cache=lc_cache).invoke(QUESTION)
    generic("Paris (other app).", cache=other).invoke(QUESTION)
    version = lc_cache.cache.version("langchain")
    lc_cache.clear()
    assert lc_cache.cache.version("langchain") == version + 1
    assert generic("asked again", cache=lc_cache).invoke(QUESTION).content == "asked again"
    assert generic("unused", cache=other).invoke(QUESTION).content == "Paris (other app)."


async def test_async_lookup_update_clear(lc_cache: SemanticLangChainCache) -> None:
    model = generic("Paris.", "the model ran again", cache=lc_cache)
    assert (await model.ainvoke(QUESTION)).content == "Paris."
    assert (await model.ainvoke(PARAPHRASE)).content == "Paris."
    prompt, llm_string = _key(PARAPHRASE, model)
    assert await lc_cache.alookup(prompt, llm_string) is not None
    await lc_cache.aclear()
    assert await lc_cache.alookup(prompt, llm_string) is None
    assert (await model.ainvoke(QUESTION)).content == "the model ran again"


def test_plain_llms_compare_the_prompt(lc_cache: SemanticLangChainCache) -> None:
    llm = FakeListLLM(responses=["Paris.", "the model ran again"], cache=lc_cache)
    assert llm.invoke(QUESTION) == "Paris."
    assert llm.invoke(PARAPHRASE) == "Paris."


def test_streaming_follows_langchains_rules(lc_cache: SemanticLangChainCache) -> None:
    """langchain-core: ``stream()`` of a model that implements streaming neither reads nor
    writes the cache; ``stream()`` of one that does not falls back to ``invoke()``, which does;
    ``invoke()`` of a streaming model reads and writes it."""
    streaming = generic("Paris.", "streamed, not cached", "third", cache=lc_cache)
    assert streaming.invoke(QUESTION).content == "Paris."
    entries = lc_cache.cache.stats()["entries"]
    chunks = list(streaming.stream(QUESTION))
    assert "".join(str(c.content) for c in chunks) == "streamed, not cached"
    assert lc_cache.cache.stats()["entries"] == entries  # nothing written by streaming
    assert streaming.invoke(PARAPHRASE).content == "Paris."  # the cache still answers

    plain = FakeMessagesListChatModel(
        responses=[AIMessage("Lyon."), AIMessage("the model ran again")], cache=lc_cache
    )
    assert plain.invoke("What is the third largest city in France?").content == "Lyon."
    (cached,) = list(plain.stream("What is the third-largest city in France?"))
    assert cached.content == "Lyon."  # no _stream: stream() is invoke(), served from the cache


def test_a_prompt_the_cache_refuses_runs_the_model_and_stores_nothing(
    lc_cache: SemanticLangChainCache,
) -> None:
    """Input the cache rejects (here a human message with only an image) never fails the
    LangChain call: the model answers and nothing is stored."""
    image_only = HumanMessage(content=[{"type": "image_url", "image_url": {"url": "data:,"}}])
    model = generic("an answer", "another", cache=lc_cache)
    assert model.invoke([image_only]).content == "an answer"
    assert model.invoke([image_only]).content == "another"
    assert lc_cache.cache.stats()["entries"] == 0


def test_the_readme_three_lines(tmp_path: Path) -> None:
    """README: set_llm_cache(SemanticLangChainCache("indexes/langchain")) opens a cache there."""
    before = get_llm_cache()
    adapter = SemanticLangChainCache(str(tmp_path / "langchain"))
    set_llm_cache(adapter)
    try:
        model = generic("Paris.", "the model ran again")
        assert model.invoke(QUESTION).content == "Paris."
        assert model.invoke(PARAPHRASE).content == "Paris."
        assert (tmp_path / "langchain").is_dir()
    finally:
        set_llm_cache(before)
        adapter.cache.close()
