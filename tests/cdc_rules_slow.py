"""tests.cdc_rules' rules behind a slow import, for the test of a SIGTERM that reaches
``semcache cdc`` while it is still starting: the module writes ``SEMCACHE_TEST_CDC_MARKER`` and
then sleeps ``SEMCACHE_TEST_CDC_IMPORT_DELAY`` seconds before the rules are handed over."""

from __future__ import annotations

import os
import time
from pathlib import Path

from tests.cdc_rules import RULES

Path(os.environ["SEMCACHE_TEST_CDC_MARKER"]).write_text("loading the rules")
time.sleep(float(os.environ.get("SEMCACHE_TEST_CDC_IMPORT_DELAY", "2")))

__all__ = ["RULES"]
