#!/usr/bin/env python3
"""Cost model of one data-parallel training step (issue 16), checked against `wukong bench-dp`
and projected to more ranks and faster links. Standard library only.

    python3 benchmarks/dp_cost_model.py

Model, per step of a global batch of B examples on N ranks:
  compute      T_c(N) = 3 · F · B / (N · R)                 F forward FLOPs/example, R FLOP/s per rank
  dense        ring all-reduce of P f32 gradients: 2 · (N-1)/N · 4P bytes sent per rank
  replicated   all-gather of every rank's touched rows (8-byte id + 4d-byte gradient):
               each rank receives (N-1) · U(B/N) · (4d + 8) bytes
  sharded      (row-wise) rows to the ranks that look them up and their
               gradients back, all-to-all: 2 · (N-1)/N · U(B/N) · 4d bytes per rank
  time         T(N) = T_c(N) + bytes / link + 2 · log2(N) · latency
U(b), the distinct rows in b examples, is b · fields · rho with rho the distinct fraction
measured at b = B/2 (generated Zipf-1.1 data); smaller shares have rho at least as large, so
the row traffic here is a lower bound for large N (the upper bound is rho = 1).
"""

import math

# Measured on this machine (BENCHMARKS.md "Data parallelism on MPI", bench-dp, 2 ranks x 1 thread):
# forward MFLOP/example, dense parameters, embedding dim, fields, rows bytes per rank and step at
# N = 2 (bytes sent minus the dense buffer), ms/step and communication share at N = 2 (unshaped veth).
MODELS = {
    "frappe": dict(F=2.81e6, P=1_304_273, d=64, fields=10, rows_bytes_n2=0.37e6, step_ms_n2=346.7, comm_share_n2=0.05),
    "criteo10m": dict(F=2.02e6, P=984_209, d=16, fields=39, rows_bytes_n2=2.73e6, step_ms_n2=214.9, comm_share_n2=0.07),
}
B = 4096
LATENCY = 10e-6  # per message stage, TCP/RoCE order of magnitude
GPU_FLOPS = 100e12  # an assumed effective rate of one GPU-class rank (H100 bf16 at ~10% of peak)


def rho(m):
    return m["rows_bytes_n2"] / ((4 * m["d"] + 8) * (B / 2) * m["fields"])


def cpu_rate(m):
    """FLOP/s of one of our CPU ranks (1 thread), from its compute time at N = 2."""
    compute = m["step_ms_n2"] * (1 - m["comm_share_n2"]) / 1e3
    return 3 * m["F"] * (B / 2) / compute


def bytes_per_rank(m, n, mode):
    if n == 1:
        return 0.0
    dense = 2 * (n - 1) / n * 4 * m["P"]
    u = (B / n) * m["fields"] * rho(m)
    if mode == "replicated":
        rows = (n - 1) * u * (4 * m["d"] + 8)
    else:
        rows = 2 * (n - 1) / n * u * 4 * m["d"]
    return dense + rows


def step_time(m, n, link_bps, rate, mode):
    t_c = 3 * m["F"] * B / (n * rate)
    t_comm = bytes_per_rank(m, n, mode) * 8 / link_bps + (2 * math.log2(n) * LATENCY if n > 1 else 0)
    return t_c, t_comm


def check():
    print("Check at N = 2 (MB sent per rank: model vs bench-dp's payload count; 1 Gb/s veth: predicted vs measured ms in the collectives)")
    measured_1g = {"frappe": (383.3, 0.14), "criteo10m": (323.4, 0.27)}
    for name, m in MODELS.items():
        mb = bytes_per_rank(m, 2, "replicated") / 1e6
        pred = bytes_per_rank(m, 2, "replicated") * 8 / 1e9 * 1e3
        step, share = measured_1g[name]
        print(f"  {name}: {mb:.2f} MB/step/rank; 1 Gb/s: predicted {pred:.0f} ms, measured {step * share:.0f} ms ({share:.0%} of {step} ms)")


def project():
    for label, rate_of in (("CPU ranks like this machine's (1 thread each)", cpu_rate), ("GPU-class ranks at an assumed 100 TFLOP/s effective", lambda m: GPU_FLOPS)):
        print(f"\nProjection, global batch {B}, {label}: speedup over one rank (communication share)")
        print("| model | mode | link | N=8 | N=64 | N=256 |")
        print("|---|---|---|---|---|---|")
        for name, m in MODELS.items():
            rate = rate_of(m)
            t1 = 3 * m["F"] * B / rate
            for mode in ("replicated", "sharded"):
                for gbps in (25, 100, 400):
                    cells = []
                    for n in (8, 64, 256):
                        t_c, t_comm = step_time(m, n, gbps * 1e9, rate, mode)
                        cells.append(f"{t1 / (t_c + t_comm):.1f}× ({t_comm / (t_c + t_comm):.0%})")
                    print(f"| {name} | {mode} | {gbps} Gb/s | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    for name, m in MODELS.items():
        print(f"{name}: distinct-row fraction at {B // 2} examples {rho(m):.3f}; one CPU rank {cpu_rate(m) / 1e9:.1f} GFLOP/s")
    check()
    project()
