#!/usr/bin/env bash
# The tuned, multi-seed Table 2 (issue 14): for each dataset given, every model's search space in
# configs/tune/<dataset>_<model>.toml is run by `wukong tune` into experiments/table2/<search>/,
# then `wukong compare --tuned` writes experiments/table2/<dataset>.md.
#
#   scripts/table2.sh movielens100k [frappe movielens10m_tags movielens100k3]   (THREADS=2 by default)
#   scripts/table2.sh --save     stages the finished runs' small files for a commit
#   scripts/table2.sh --status movielens100k3 [...]   one line per search: running or not, points
#                                finished, time left (`wukong tune --status`)
#
# Resumable at every level: a finished trial or seed re-run is read back, not retrained, and an
# interrupted one resumes from its checkpoint. The small files of finished runs (config,
# metrics, result; never weights) are committed via --save (the points are ignored otherwise, see
# .gitignore), so a new checkout continues the table where the last one stopped: only unfinished
# runs start over.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--save" ]; then
  for result in experiments/table2/*/points/*/result.json; do
    [ -f "$result" ] || continue
    d=$(dirname "$result")
    for f in config.toml env.json metrics.jsonl result.json reliability.csv; do
      [ -f "$d/$f" ] && git add -f "$d/$f"
    done
  done
  git add experiments/table2
  exit 0
fi
THREADS=${THREADS:-2}
BIN=${WUKONG_BIN:-target/release/wukong}
[ -x "$BIN" ] || cargo build --release
# MODELS= picks and orders the models (all eight by default)
MODELS=${MODELS:-"wukong finalmlp dcnv2 dlrm masknet xdeepfm autoint afn"}
if [ "${1:-}" = "--status" ]; then
  shift
  [ "$#" -gt 0 ] || { echo "usage: scripts/table2.sh --status DATASET..." >&2; exit 2; }
  for ds in "$@"; do
    for m in $MODELS; do
      space="configs/tune/${ds}_${m}.toml"
      out="experiments/table2/${ds}_${m}"
      [ -f "$space" ] || { echo "no search space $space" >&2; exit 1; }
      if [ -d "$out" ]; then
        "$BIN" tune "$space" --out "$out" --status | sed -n 1p  # sed reads it all: no broken pipe
      else
        echo "$out: not started"
      fi
    done
  done
  exit 0
fi
# A search that fails (a bad space, a directory another process holds) is reported and the
# queue goes on with the next one: the queue runs for days, and one failure should not idle it.
failed=()
for ds in "$@"; do
  dirs=()
  ok=1
  for m in $MODELS; do
    space="configs/tune/${ds}_${m}.toml"
    out="experiments/table2/${ds}_${m}"
    [ -f "$space" ] || { echo "no search space $space" >&2; exit 1; }
    echo "== $(date -u +%FT%TZ) $space → $out"
    if "$BIN" --threads "$THREADS" tune "$space" --out "$out"; then
      dirs+=(--tuned "$out")
    else
      echo "== FAILED: $space (exit $?); going on with the next search" >&2
      failed+=("$space")
      ok=0
    fi
  done
  if [ "$ok" = 1 ]; then
    "$BIN" compare "${dirs[@]}" --out "experiments/table2/${ds}.md"
  fi
done
if [ "${#failed[@]}" -gt 0 ]; then
  echo "failed searches: ${failed[*]}" >&2
  exit 1
fi
