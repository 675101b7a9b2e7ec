#!/usr/bin/env bash
# Debian's Chromium for the browser tests of the "Remote ML" view (tests/deployment/test_ui_view.py), driven
# by Playwright from PyPI (the dev extra). Playwright's own browser download needs a host that is not
# reachable here, so the tests launch this one (executable_path).
set -euo pipefail
cd "$(dirname "$0")/.."
say() { echo "[browser] $*"; }
# shellcheck source=.ci/apt.sh
. .ci/apt.sh

if command -v chromium >/dev/null 2>&1; then
    say "$(chromium --version 2>/dev/null || echo chromium) present"
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    say "chromium is missing and this is not root: install Debian's chromium package"
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
say "installing Debian's chromium"
apt_get update -q >/dev/null
apt_get install -y -q --no-install-recommends chromium fonts-dejavu-core >/dev/null
say "$(chromium --version 2>/dev/null) installed"
