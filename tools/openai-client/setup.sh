#!/usr/bin/env bash
# Installs the pinned openai npm client (package-lock.json) that tests/serve uses as a real client of
# `diffmoe serve` (tests/serve/openai_client.mjs). Run by tools/setup.sh; nothing downloads at test time.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
npm ci --no-audit --no-fund
