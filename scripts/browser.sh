#!/usr/bin/env bash
# Install headless Chromium and its WebDriver (Debian packages `chromium` and
# `chromium-driver`) for tests/integration/test_dashboard.py, which loads the
# scheduler's status page in a real browser.  Idempotent: returns at once when
# both are present.  `apt-get update` runs only if the first install fails
# (a fresh image has no package lists).  Needs root, or sudo.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

install() {
    $SUDO apt-get install -y --no-install-recommends -q chromium chromium-driver
}

if ! install; then
    $SUDO apt-get update -q
    install
fi
command -v chromium >/dev/null
echo "chromium: $(chromium --version 2>/dev/null || echo installed)"
