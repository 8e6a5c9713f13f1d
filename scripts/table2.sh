#!/usr/bin/env bash
# The tuned, multi-seed Table 2 (issue 14): for each dataset given, every model's search space in
# configs/tune/<dataset>_<model>.toml is run by `wukong tune` into experiments/table2/<search>/,
# then `wukong compare --tuned` writes experiments/table2/<dataset>.md.
#
#   scripts/table2.sh movielens100k [frappe movielens10m_tags]   (THREADS=2 by default)
#
# Resumable at every level: a finished trial or seed re-run is read back, not retrained, and an
# interrupted one resumes from its checkpoint. The small files of finished runs (config,
# metrics, result) are meant to be committed (see .gitignore), so a new checkout continues the
# table where the last one stopped: only unfinished runs start over.
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${THREADS:-2}
BIN=${WUKONG_BIN:-target/release/wukong}
[ -x "$BIN" ] || cargo build --release
MODELS="wukong finalmlp dcnv2 dlrm masknet xdeepfm autoint afn"
for ds in "$@"; do
  dirs=()
  for m in $MODELS; do
    space="configs/tune/${ds}_${m}.toml"
    out="experiments/table2/${ds}_${m}"
    [ -f "$space" ] || { echo "no search space $space" >&2; exit 1; }
    echo "== $(date -u +%FT%TZ) $space → $out"
    "$BIN" --threads "$THREADS" tune "$space" --out "$out"
    dirs+=(--tuned "$out")
  done
  "$BIN" compare "${dirs[@]}" --out "experiments/table2/${ds}.md"
done
