"""The evaluation harness: labelled data, metrics with confidence intervals, workload replay.

Everything here measures how often a cache serves a *correct* answer: the precision of the
hits it serves, the share of repeatable prompts it answers, and the wrong-answer rate a user
would see. Modules:

* :mod:`.data` - load labelled pairs (JSONL ``{a, b, label, source}``) and intent groups.
* :mod:`.embcache` - embed each text once per run, with an on-disk cache keyed by model + file.
* :mod:`.metrics` - confusion counts, Wilson / Clopper-Pearson intervals, threshold sweeps.
* :mod:`.policies` - the policies compared (GPTCache's rule, RedisVL's default, ours).
* :mod:`.replay` - a workload replayed through the public ``SemanticCache`` API.
* :mod:`.plots` - matplotlib figures (Agg backend).
* :mod:`.cli` - the ``semcache eval`` command.
"""
