"""``GET /ui`` in a real headless browser (Debian's chromium and chromium-driver through Selenium,
which downloads nothing) against a real sidecar process: the page loads without console errors,
fetches nothing from the internet, and its numbers change after requests are made. Admin tokens
only, when tokens are set."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from .fake_upstream import start_sidecar, stop

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ADMIN = "ui-admin-token-01"
TENANT = "ui-tenant-token-01"


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    data = tmp_path_factory.mktemp("ui") / "data"
    env = {
        "SEMCACHE_TOKENS": f"{ADMIN},{TENANT}=acme",
        "SEMCACHE_LOG_LEVEL": "warning",
        "SEMCACHE_THRESHOLD": "0.85",  # the page is tested, not the policy
    }
    proc, url = start_sidecar(data, None, env)
    try:
        yield url.removesuffix("/v1")
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip(
            "chromium / chromedriver missing: run scripts/ensure_chromium.sh (make test does)"
        )
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium (dev extra) missing")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def api(sidecar: str, path: str, body: dict[str, Any], token: str = ADMIN) -> httpx.Response:
    return httpx.post(
        f"{sidecar}{path}", json=body, headers={"Authorization": f"Bearer {token}"}, timeout=60
    )


def numbers(driver: Any) -> dict[str, int]:
    """The page's counters, read from the rendered DOM."""
    ids = ("lookups", "hits", "accepted-count", "near-miss-count", "removed-tag", "entries")
    return {i: int(driver.find_element("id", i).text) for i in ids}


def console_errors(driver: Any) -> list[dict[str, Any]]:
    return [e for e in driver.get_log("browser") if e.get("level") in ("SEVERE", "ERROR")]


def test_ui_needs_an_admin_token(sidecar: str) -> None:
    assert httpx.get(f"{sidecar}/ui", timeout=30).status_code == 401
    tenant = httpx.get(f"{sidecar}/ui", headers={"Authorization": f"Bearer {TENANT}"})
    assert tenant.status_code == 403
    admin = httpx.get(f"{sidecar}/ui", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30)
    assert admin.status_code == 200
    assert admin.headers["content-type"].startswith("text/html")
    # nothing is fetched from elsewhere: no external scripts, styles, images or fonts
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", admin.text)
    assert "<script" not in admin.text


def test_the_page_loads_cleanly_and_its_numbers_follow_the_traffic(
    sidecar: str, browser: Any
) -> None:
    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd(
        "Network.setExtraHTTPHeaders", {"headers": {"Authorization": f"Bearer {ADMIN}"}}
    )
    browser.get(f"{sidecar}/ui")
    assert browser.title == "semcache status"
    assert console_errors(browser) == []
    before = numbers(browser)
    assert "none" in browser.find_element("id", "cdc").text  # no CDC consumer on this folder

    stored = api(
        sidecar,
        "/v1/cache/store",
        {"prompt": "What is the capital of France?", "response": "Paris", "tags": ["geo"]},
    )
    assert stored.status_code == 201, stored.text
    hit = api(sidecar, "/v1/cache/lookup", {"prompt": "What is the capital city of France?"})
    assert hit.json()["hit"] is True
    miss = api(sidecar, "/v1/cache/lookup", {"prompt": "What is the capital of Spain?"})
    assert miss.json()["hit"] is False
    removed = api(sidecar, "/v1/cache/invalidate/tags", {"tags": ["geo"]})
    assert removed.status_code == 200, removed.text

    time.sleep(1.1)  # a new sample for the history (at most one a second)
    browser.refresh()
    assert console_errors(browser) == []
    after = numbers(browser)
    assert after["lookups"] == before["lookups"] + 2
    assert after["hits"] == before["hits"] + 1
    assert after["accepted-count"] == before["accepted-count"] + 1
    assert after["near-miss-count"] == before["near-miss-count"] + 1
    assert after["removed-tag"] == before["removed-tag"] + 1
    assert after["entries"] == before["entries"]  # stored, then invalidated
    # the history now has an interval: the lookups made between the two loads
    rows = browser.find_elements("css selector", "#intervals tr")
    assert len(rows) >= 2 and rows[1].find_elements("tag name", "td")[1].text == "2"
    svg = browser.find_element("id", "similarity-histogram")
    assert "operating point" in svg.text
