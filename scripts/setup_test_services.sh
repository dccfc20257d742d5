#!/usr/bin/env bash
# Installs what the test suite needs outside the Python venv: Label Studio (own venv) and Chromium.
# Idempotent; each step says what it did. A step that cannot be done prints why, and the tests that
# need it skip with that reason.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -f scripts/install_labelstudio.sh ]; then
  bash scripts/install_labelstudio.sh || echo "setup: Label Studio could not be installed; its tests will skip"
fi
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "setup: chromium could not be installed; browser tests will skip"
  else
    echo "setup: chromium missing and apt-get unavailable (or not root); browser tests will skip"
  fi
fi
exit 0
