#!/usr/bin/env bash
# Fetch the offline training corpus (docs/formats.md §3.1): Jane Austen's six novels from
# r-cran-janeaustenr and Moby Dick from r-cran-tokenizers, taken out of the Debian packages'
# R lazy-load databases by tools/corpus/extract_rdata — R itself is never installed.
#
#   tools/corpus/fetch_corpus.sh [--extractor PATH] [--out DIR]
#
#   --extractor PATH  the built extract_rdata (default: the first build*/tools/extract_rdata)
#   --out DIR         where the texts go (default: <repo>/data/corpus, which git ignores)
#
# Idempotent: when every file is already there with its pinned sha256, nothing is downloaded.
# Any hash or line-count mismatch fails loudly and leaves existing files untouched.
set -euo pipefail

die() { echo "fetch_corpus: error: $*" >&2; exit 1; }

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
out_dir="$repo/data/corpus"
extractor=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --extractor) [[ $# -ge 2 ]] || die "--extractor needs a path"; extractor="$2"; shift 2 ;;
    --out) [[ $# -ge 2 ]] || die "--out needs a directory"; out_dir="$2"; shift 2 ;;
    -h|--help) sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (try --help)" ;;
  esac
done

# name | elements (lines) | sha256 of the "\n"-joined text as decoded. The first 16 hex digits of
# each are the ones pinned in docs/formats.md §3.1; the rest was computed from the same bytes.
austen=(
  "emma|16235|dd08b340a56ad4a0a00718d5682528a5a5886ae0aef91c9e0fa528074fa64b75"
  "mansfield_park|15349|e0e9ef3863ea77f51f6070062ee0dd50ad9b933223880617629e4e4963ea40ff"
  "northanger_abbey|7856|8618a5acf5be50cc6e9b7680c7469fb6012649ab08c709dfc63c6367989fd31d"
  "persuasion|8328|726513a6c18bb678427bcbcf7c72d0d20816a67c25b0471b26ddcabf3ebac140"
  "pride_and_prejudice|13030|2e44edaa4946d64ad541c68e0224f5d672f43bf3ce2a8a0b0637ad5e02fc6eb3"
  "sense_and_sensibility|12624|0996d90842bbe8093f3b8142c1e77d1b20cff52d1d0615f3ed67733653e74e26"
)
# Moby Dick: the decoded object (CRLF, with the Project Gutenberg header/footer) must match the
# prefix pinned in docs/formats.md §3.1; what we keep (see strip_gutenberg) is pinned in full here.
moby_raw_prefix="829d6f1f7012a031"
moby_sha256="0a4f9d0a1e6faae432487248d0ae84221f1cd26f47a11bdf029314669a7bfc28"

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }
lines_of() { awk 'END { print NR }' "$1"; }  # counts a last line without "\n" too

# True when every file in $1 is present with its pinned hash.
corpus_ok() {
  local dir="$1" entry name _ sha
  for entry in "${austen[@]}"; do
    IFS='|' read -r name _ sha <<<"$entry"
    [[ -f "$dir/$name.txt" && "$(sha256_of "$dir/$name.txt")" == "$sha" ]] || return 1
  done
  [[ -f "$dir/moby_dick.txt" && "$(sha256_of "$dir/moby_dick.txt")" == "$moby_sha256" ]] || return 1
  [[ -f "$dir/LICENSE.md" ]]
}

summary() {
  local f
  printf '%-26s %9s %7s  %s\n' file bytes lines sha256
  for f in "$out_dir"/*.txt; do
    printf '%-26s %9s %7s  %s\n' "$(basename "$f")" "$(stat -c %s "$f")" "$(lines_of "$f")" "$(sha256_of "$f")"
  done
}

if corpus_ok "$out_dir"; then
  echo "fetch_corpus: $out_dir is complete and verified; nothing to do"
  summary
  exit 0
fi

if [[ -z "$extractor" ]]; then
  for candidate in "$repo"/build/tools/extract_rdata "$repo"/build*/tools/extract_rdata; do
    if [[ -x "$candidate" ]]; then extractor="$candidate"; break; fi
  done
  [[ -n "$extractor" ]] || die "extract_rdata not found under $repo/build*/tools; build it (ninja -C build extract_rdata) or pass --extractor"
fi
[[ -x "$extractor" ]] || die "extractor '$extractor' is not an executable"
for tool in apt-get dpkg-deb sha256sum awk; do
  command -v "$tool" >/dev/null || die "'$tool' is required"
done

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
mkdir "$tmp/debs"
# As root, apt-get download writes through the unprivileged _apt user (else it warns and falls
# back to an unsandboxed download), so give that user the download directory.
if [[ $EUID -eq 0 ]] && id _apt >/dev/null 2>&1; then
  chmod 755 "$tmp"
  chown _apt "$tmp/debs"
fi

# Download only: installing these would pull in r-base-core and hundreds of packages (§3.1).
(cd "$tmp/debs" && apt-get download r-cran-janeaustenr r-cran-tokenizers) >&2 \
  || die "apt-get download failed (run 'apt-get update' first?)"
declare -A pkg_version
for deb in "$tmp"/debs/*.deb; do
  pkg="$(dpkg-deb -f "$deb" Package)"
  pkg_version[$pkg]="$(dpkg-deb -f "$deb" Version)"
  dpkg-deb -x "$deb" "$tmp/root"
done
[[ -n "${pkg_version[r-cran-janeaustenr]:-}" && -n "${pkg_version[r-cran-tokenizers]:-}" ]] \
  || die "expected both r-cran-janeaustenr and r-cran-tokenizers .debs in $tmp"

site="$tmp/root/usr/lib/R/site-library"
"$extractor" "$site/janeaustenr/data/Rdata.rdb" "$tmp/austen" >&2 || die "extracting janeaustenr failed"
"$extractor" "$site/tokenizers/data/Rdata.rdb" "$tmp/tokenizers" >&2 || die "extracting tokenizers failed"

stage="$tmp/stage"
mkdir -p "$stage"

# The .rdb holds no names we read (they live in Rdata.rdx), so each Austen object is identified by
# its hash and checked against its line count (docs/formats.md §3.1).
declare -A seen
for obj in "$tmp"/austen/object_*.txt; do
  sha="$(sha256_of "$obj")"
  match=""
  for entry in "${austen[@]}"; do
    IFS='|' read -r name lines want <<<"$entry"
    if [[ "$sha" == "$want" ]]; then match="$name"; break; fi
  done
  [[ -n "$match" ]] || die "$(basename "$obj") from janeaustenr has unknown sha256 $sha ($(lines_of "$obj") lines)"
  [[ -z "${seen[$match]:-}" ]] || die "two janeaustenr objects decode to $match"
  [[ "$(lines_of "$obj")" == "$lines" ]] || die "$match: $(lines_of "$obj") lines, expected $lines"
  seen[$match]=1
  cp "$obj" "$stage/$match.txt"
done
for entry in "${austen[@]}"; do
  IFS='|' read -r name _ _ <<<"$entry"
  [[ -n "${seen[$name]:-}" ]] || die "janeaustenr has no object matching $name"
done

# Keeps the book between the "*** START OF THIS PROJECT GUTENBERG EBOOK" line and the "End of
# Project Gutenberg's" footer, dropping the producer credit and the blank lines around the text.
strip_gutenberg() {
  awk '
    /^\*\*\* ?START OF TH(IS|E) PROJECT GUTENBERG EBOOK/ { inside = 1; next }
    inside && (/^End of (the )?Project Gutenberg/ || /^\*\*\* ?END OF TH(IS|E) PROJECT GUTENBERG EBOOK/) {
      inside = 0; done = 1; next
    }
    !inside { next }
    !started && /^[[:space:]]*$/ { next }
    !started && /^Produced by / { next }
    { started = 1; kept[n++] = $0 }
    END {
      if (!done) exit 3
      last = n - 1
      while (last >= 0 && kept[last] ~ /^[[:space:]]*$/) last--
      for (i = 0; i <= last; i++) print kept[i]
    }'
}

moby_objects=("$tmp"/tokenizers/object_*.txt)
[[ ${#moby_objects[@]} -eq 1 ]] || die "tokenizers holds ${#moby_objects[@]} objects, expected 1 (Moby Dick)"
raw="${moby_objects[0]}"
raw_sha="$(sha256_of "$raw")"
[[ "${raw_sha:0:16}" == "$moby_raw_prefix" ]] \
  || die "Moby Dick as decoded has sha256 $raw_sha, expected prefix $moby_raw_prefix (docs/formats.md §3.1)"
# CRLF -> LF (every CR in this text is part of a CRLF), then strip the PG boilerplate.
tr -d '\r' <"$raw" | strip_gutenberg >"$stage/moby_dick.txt" \
  || die "Moby Dick: Project Gutenberg START/END markers not found"
got="$(sha256_of "$stage/moby_dick.txt")"
[[ "$got" == "$moby_sha256" ]] || die "moby_dick.txt (stripped) has sha256 $got, expected $moby_sha256"

cat >"$stage/LICENSE.md" <<EOF
# data/corpus: provenance and licenses

Made by \`tools/corpus/fetch_corpus.sh\` (spec: docs/formats.md §3.1). Not committed to git.

| file | text | taken from |
|---|---|---|
| emma.txt | Jane Austen, *Emma* (1815) | r-cran-janeaustenr ${pkg_version[r-cran-janeaustenr]} |
| mansfield_park.txt | Jane Austen, *Mansfield Park* (1814) | r-cran-janeaustenr ${pkg_version[r-cran-janeaustenr]} |
| northanger_abbey.txt | Jane Austen, *Northanger Abbey* (1817) | r-cran-janeaustenr ${pkg_version[r-cran-janeaustenr]} |
| persuasion.txt | Jane Austen, *Persuasion* (1817) | r-cran-janeaustenr ${pkg_version[r-cran-janeaustenr]} |
| pride_and_prejudice.txt | Jane Austen, *Pride and Prejudice* (1813) | r-cran-janeaustenr ${pkg_version[r-cran-janeaustenr]} |
| sense_and_sensibility.txt | Jane Austen, *Sense and Sensibility* (1811) | r-cran-janeaustenr ${pkg_version[r-cran-janeaustenr]} |
| moby_dick.txt | Herman Melville, *Moby Dick; or The Whale* (1851), Project Gutenberg EBook #2701 | r-cran-tokenizers ${pkg_version[r-cran-tokenizers]} |

- **The texts are in the public domain.** The Austen files are the package's character vectors
  as decoded, one element per line. For Moby Dick the Project Gutenberg header, footer and license
  were removed and CRLF line ends turned into LF; what remains is the public-domain book text.
- **The packages are MIT-licensed** (Debian bookworm, main): janeaustenr © 2016-2017 Julia Silge;
  tokenizers © 2016-2018 Lincoln Mullen, Os Keyes, Dmitriy Selivanov, Jeffrey Arnold, Kenneth
  Benoit; Debian packaging © 2021 Andreas Tille. Only their public-domain data is used here.
EOF

mkdir -p "$out_dir"
# Copy next to the target, then rename, so an interrupted run never leaves a half-written file.
for f in "$stage"/*; do
  cp "$f" "$out_dir/.$(basename "$f").tmp"
  mv -f "$out_dir/.$(basename "$f").tmp" "$out_dir/$(basename "$f")"
done
corpus_ok "$out_dir" || die "verification of $out_dir failed after writing"
echo "fetch_corpus: wrote and verified $out_dir"
summary
