#!/bin/sh
# Two emulated hosts on one machine for MPI over TCP (issue 16): network namespaces wk1
# (10.77.0.1) and wk2 (10.77.0.2) joined by a veth pair; optional link rate (e.g. `1gbit`) set
# with a token-bucket filter on both ends. Needs root (or CAP_NET_ADMIN) and iproute2.
#   benchmarks/netns/setup.sh [RATE]      then run mpirun inside wk1 with benchmarks/netns/rsh.sh
#   benchmarks/netns/setup.sh --down      removes both namespaces
set -eu
if [ "${1:-}" = "--down" ]; then
  ip netns del wk1 2>/dev/null || true
  ip netns del wk2 2>/dev/null || true
  exit 0
fi
ip netns del wk1 2>/dev/null || true
ip netns del wk2 2>/dev/null || true
ip netns add wk1
ip netns add wk2
ip link add veth-wk1 type veth peer name veth-wk2
ip link set veth-wk1 netns wk1
ip link set veth-wk2 netns wk2
for n in 1 2; do
  ip -n wk$n addr add 10.77.0.$n/24 dev veth-wk$n
  ip -n wk$n link set veth-wk$n up
  ip -n wk$n link set lo up
  if [ -n "${1:-}" ]; then
    ip netns exec wk$n tc qdisc add dev veth-wk$n root tbf rate "$1" burst 256kb latency 50ms
  fi
done
echo "hosts 10.77.0.1 (netns wk1) and 10.77.0.2 (netns wk2)${1:+, link rate $1}"
