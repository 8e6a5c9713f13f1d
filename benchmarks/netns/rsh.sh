#!/bin/sh
# Open MPI's remote-launch agent for the emulated hosts of benchmarks/netns/setup.sh: instead of
# ssh, "log in" to host 10.77.0.N by entering network namespace wkN (same machine, own network
# stack; the only link between the namespaces is the veth pair).
while [ $# -gt 0 ]; do
  case "$1" in -*) shift ;; *) break ;; esac
done
host="$1"; shift
ns="wk${host##*.}"
exec ip netns exec "$ns" sh -c "$*"
