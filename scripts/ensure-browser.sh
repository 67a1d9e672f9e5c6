#!/usr/bin/env bash
# Makes sure Debian's Chromium and its WebDriver are installed for the browser tests
# (tests/integration/test_web_browser.py), and openssl for the console's HTTPS test
# (a throw-away certificate). Idempotent and quiet when they are there;
# installs them with apt-get otherwise (as root; `apt-get update` only if the first
# install attempt fails). Nothing is downloaded at pip-install time: the browser is
# the distribution's package. Without root it only says what is missing: the tests
# then skip locally with that reason (and fail under CI=true).
set -uo pipefail

have() {
    command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 &&
        command -v openssl >/dev/null 2>&1
}

if have; then
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure-browser: chromium/chromedriver/openssl missing and cannot install them here" \
        "(needs root and apt-get): the browser tests will skip" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
install() {
    apt-get install -y -qq --no-install-recommends chromium chromium-driver openssl >/dev/null
}
echo "ensure-browser: installing chromium, chromium-driver and openssl"
if ! install; then
    apt-get update -qq >/dev/null && install
fi
if have; then
    echo "ensure-browser: chromium is installed"
    exit 0
fi
echo "ensure-browser: could not install chromium and chromium-driver" >&2
exit 1
