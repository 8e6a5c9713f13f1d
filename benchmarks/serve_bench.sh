#!/usr/bin/env bash
# The serving load table (issue "Scoring in production"): one run directory served by
# `wukong serve` and by the Python yardstick (benchmarks/serve_torch.py: the PyTorch reference
# model behind the standard library's threading HTTP server), both loaded by `wukong loadtest`
# on loopback with the same requests, in one invocation.
#
#   benchmarks/serve_bench.sh RUN_DIR [SECONDS] [THREADS]
#
# Env: WUKONG (binary, default target/release/wukong), PYTHON (default: the torch venv of
# ../shared/tools/torch-venv.sh), ROWS (default 1,16,256), CLIENTS (default 1,8,64),
# SERVE_ARGS (extra `wukong serve` flags), OUT (directory for the JSON results).
set -euo pipefail
run=${1:?usage: serve_bench.sh RUN_DIR [SECONDS] [THREADS]}
secs=${2:-5}
threads=${3:-2}
here=$(cd "$(dirname "$0")" && pwd)
wukong=${WUKONG:-$here/../target/release/wukong}
python=${PYTHON:-$("$here/../../shared/tools/torch-venv.sh" 2>/dev/null || echo python3)}
rows=${ROWS:-1,16,256}
clients=${CLIENTS:-1,8,64}
out=${OUT:-$(mktemp -d)}
mkdir -p "$out"
port_ours=18080
port_py=18090

wait_up() {
  for _ in $(seq 1 600); do
    if (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "server on port $1 did not come up" >&2
  return 1
}

echo "run: $run"
echo "server threads: $threads; client: wukong loadtest, 1 thread; ${secs}s per cell after 1s warm-up"
"$wukong" --threads "$threads" serve --run "$run" --addr 127.0.0.1:$port_ours ${SERVE_ARGS:-} 2>"$out/ours.log" &
ours=$!
trap 'kill $ours 2>/dev/null || true; kill ${py:-0} 2>/dev/null || true' EXIT
wait_up $port_ours
"$wukong" loadtest --url http://127.0.0.1:$port_ours/v1/score --run "$run" --rows "$rows" --concurrency "$clients" \
  --seconds "$secs" --name "wukong serve" --json "$out/ours.json" | tee "$out/ours.md"
rss_ours=$(awk '/VmHWM/ {print $2}' /proc/$ours/status)
kill -TERM $ours; wait $ours || true

"$python" "$here/serve_torch.py" "$run" --port $port_py --threads "$threads" >"$out/py.log" 2>&1 &
py=$!
wait_up $port_py
"$wukong" loadtest --url http://127.0.0.1:$port_py/v1/score --run "$run" --rows "$rows" --concurrency "$clients" \
  --seconds "$secs" --name "PyTorch + http.server" --json "$out/py.json" | tail -n +4 | tee "$out/py.md"
rss_py=$(awk '/VmHWM/ {print $2}' /proc/$py/status)
head -1 "$out/py.log"
kill $py; wait $py 2>/dev/null || true
echo "peak RSS: wukong serve $((rss_ours / 1024)) MiB, Python server $((rss_py / 1024)) MiB"

# ratio table: ours / Python per cell
"$python" - "$out/ours.json" "$out/py.json" <<'EOF'
import json, sys
a, b = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
print("\n| rows/request | clients | rows/s ours / Python | p99 ours / Python |\n|---:|---:|---:|---:|")
for x, y in zip(a, b):
    r = x["rows_per_s"] / y["rows_per_s"] if y["rows_per_s"] else float("inf")
    p = x["p99_ms"] / y["p99_ms"] if y["p99_ms"] else float("nan")
    print(f"| {x['rows_per_request']} | {x['concurrency']} | {r:.2f}× | {p:.2f} |")
EOF
