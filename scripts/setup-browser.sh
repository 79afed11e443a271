#!/bin/sh
# What the browser tests (tests/browser/) need besides the venv: Debian's Chromium, driven by Playwright for Python
# (pinned in pyproject's dev extra) with executable_path=/usr/bin/chromium; no browser is downloaded.
# Idempotent: installs the package only when /usr/bin/chromium is missing. Needs root (or sudo) and apt.
set -eu
if [ -x /usr/bin/chromium ]; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "setup-browser: /usr/bin/chromium is missing; install the Debian package 'chromium' as root" >&2; exit 1; }
    SUDO=sudo
fi
echo "setup-browser: installing Debian's chromium (for tests/browser/)"
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q chromium
/usr/bin/chromium --version
