"""Rules for the CDC consumer subprocess in tests/test_cdc.py (``--rules tests.cdc_rules:RULES``).

The tests run each time in a schema of their own, named by ``SEMCACHE_TEST_CDC_SCHEMA``.
"""

from __future__ import annotations

import os

from semcache.cdc import Rule

SCHEMA = os.environ.get("SEMCACHE_TEST_CDC_SCHEMA", "public")

RULES = [
    Rule("users", schema=SCHEMA, tags=lambda row: [f"user:{row['id']}"]),
    Rule("counters", schema=SCHEMA, namespace="counters"),
]
