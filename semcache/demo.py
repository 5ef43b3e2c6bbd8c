"""A short end-to-end demo on the embedded default: store, paraphrase hit, scope miss, restart.

Run: ``python -m semcache.demo [DATA_DIR]`` (``make demo``).
"""

from __future__ import annotations

import sys
import tempfile

from . import Scope, SemanticCache


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    path = args[0] if args else tempfile.mkdtemp(prefix="semcache-demo-")
    scope = Scope(namespace="demo", model="gpt-4o-mini", params={"temperature": 0})
    with SemanticCache(path) as cache:
        entry = cache.store("What is the capital of France?", "Paris.", scope=scope, tags=["geo"])
        print(f"stored {entry} in {path}")
        hit = cache.lookup("What's France's capital city?", scope=scope)
        print(
            f"paraphrase      -> {hit.response if hit else None!r} "
            f"(similarity {hit.similarity:.3f})"
            if hit
            else "paraphrase -> miss"
        )
        print(f"other question  -> {cache.lookup('What is the capital of Germany?', scope=scope)}")
        other = Scope(namespace="demo", model="gpt-4o", params={"temperature": 0})
        print(f"other model     -> {cache.lookup('What is the capital of France?', scope=other)}")
    with SemanticCache(path) as cache:
        hit = cache.lookup("Tell me France's capital.", scope=scope)
        print(f"after restart   -> {hit.response if hit else None!r}; verify: {cache.verify()}")


if __name__ == "__main__":
    main()
