#!/usr/bin/env bash
# Make a headless browser available for the /ui test (tests/test_ui.py), idempotently:
# Debian's chromium and chromium-driver packages, installed only when /usr/bin/chromium or
# /usr/bin/chromedriver is missing. Selenium is then given Service('/usr/bin/chromedriver'),
# so it downloads nothing. Needs root (or sudo) and apt; when neither works the script says so
# and exits 0, and the test skips with that reason rather than failing the whole run.
set -uo pipefail

if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
        echo "ensure_chromium: not root and no sudo; /ui browser test will skip" >&2
        exit 0
    fi
fi
export DEBIAN_FRONTEND=noninteractive
if ! $SUDO apt-get install -y -q chromium chromium-driver >/dev/null; then
    $SUDO apt-get update -q >/dev/null && \
        $SUDO apt-get install -y -q chromium chromium-driver >/dev/null || \
        echo "ensure_chromium: apt-get could not install chromium; /ui browser test will skip" >&2
fi
exit 0
