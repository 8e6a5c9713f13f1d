#!/bin/sh
# `wukong bench-dp` with its two ranks on the two emulated hosts of setup.sh (MPI over TCP on the
# veth pair only). Usage: benchmarks/netns/bench.sh [RATE] -- BENCH_CONFIG... (from the repository
# root, after `cargo build --release --features mpi`).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
rate=""
if [ "${1:-}" != "--" ] && [ $# -gt 0 ]; then rate="$1"; shift; fi
[ "${1:-}" = "--" ] && shift
"$here/setup.sh" $rate
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
args="--host 10.77.0.1:1,10.77.0.2:1 --mca plm_rsh_agent $here/rsh.sh --mca btl tcp,self --mca btl_tcp_if_include 10.77.0.0/24 --mca oob_tcp_if_include 10.77.0.0/24"
ip netns exec wk1 target/release/wukong bench-dp "$@" --mpirun-args "$args"
"$here/setup.sh" --down
