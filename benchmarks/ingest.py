#!/usr/bin/env python3
"""Ingest benchmark: Criteo-format TSV -> encoded binary cache, ours vs pandas / pyarrow.

Both sides do the same work on the same generated file (`wukong gen-criteo`): parse 40 tab-separated
columns (empty = missing), fit per-field vocabularies on the file with min_count 10 and 1000 hash
buckets for the rest (as configs/criteo_wukong.toml), map every categorical value to its table row,
fill and log-transform the 13 numeric columns, and write the encoded columns to disk. Ours also
reads the cache back in shuffled batches (epoch read throughput).

    python3 benchmarks/ingest.py --rows 1000000

Needs pandas and pyarrow (installed on demand with pip); the product itself never needs Python.
Prints a markdown table; every figure is the median of --repeat runs.
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time


def ensure(pkgs):
    missing = []
    for p in pkgs:
        try:
            __import__(p)
        except ImportError:
            missing.append(p)
    if missing:
        subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", *missing])


def criteo_names():
    return ["label"] + [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)]


def encode_frame(df, np, pd, out_dir, min_count=10, buckets=1000):
    """The reference encoding: vocab by count with min_count, hash buckets for the rest."""
    labels = df["label"].to_numpy(np.float32)
    dense = df[[f"I{i}" for i in range(1, 14)]].fillna(0).to_numpy(np.float64)
    dense = (np.sign(dense) * np.log1p(np.abs(dense))).astype(np.float32)
    rows = np.empty((len(df), 26), dtype=np.uint32)
    offset = 0
    for j in range(26):
        col = df[f"C{j + 1}"].fillna("__missing__")
        codes, uniques = pd.factorize(col)
        counts = np.bincount(codes, minlength=len(uniques))
        keep = counts >= min_count
        local = np.empty(len(uniques), dtype=np.uint32)
        local[keep] = 1 + np.arange(keep.sum(), dtype=np.uint32)
        # rare values: a bucket from a hash of the value (pandas' stable hash)
        rare = ~keep
        if rare.any():
            h = pd.util.hash_array(np.asarray(uniques[rare], dtype=object)) % buckets
            local[rare] = 1 + keep.sum() + h.astype(np.uint32)
        rows[:, j] = offset + local[codes]
        offset += 1 + int(keep.sum()) + buckets
    for name, arr in [("labels", labels), ("rows", rows), ("dense", dense)]:
        np.save(os.path.join(out_dir, name + ".npy"), arr)
    return len(df)


def run_pandas(path, out_dir):
    import numpy as np
    import pandas as pd

    dtypes = {"label": np.float32, **{f"I{i}": np.float64 for i in range(1, 14)}, **{f"C{i}": object for i in range(1, 27)}}
    df = pd.read_csv(path, sep="\t", header=None, names=criteo_names(), dtype=dtypes, na_filter=True)
    return encode_frame(df, np, pd, out_dir)


def run_pyarrow(path, out_dir):
    import numpy as np
    import pandas as pd
    import pyarrow as pa
    import pyarrow.csv as pacsv

    types = {"label": pa.float32(), **{f"I{i}": pa.float64() for i in range(1, 14)}, **{f"C{i}": pa.string() for i in range(1, 27)}}
    table = pacsv.read_csv(
        path,
        read_options=pacsv.ReadOptions(column_names=criteo_names()),
        parse_options=pacsv.ParseOptions(delimiter="\t"),
        convert_options=pacsv.ConvertOptions(column_types=types, strings_can_be_null=True),
    )
    return encode_frame(table.to_pandas(), np, pd, out_dir)


def timed(fn, repeat):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), min(times), max(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--wukong", default="target/release/wukong")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    ensure(["pandas", "pyarrow"])
    import pandas as pd
    import pyarrow as pa

    work = args.workdir or tempfile.mkdtemp(prefix="wukong-ingest-")
    os.makedirs(work, exist_ok=True)
    data = os.path.join(work, "criteo_train.tsv")
    small = os.path.join(work, "criteo_valid.tsv")
    if not os.path.exists(data):
        subprocess.check_call([args.wukong, "gen-criteo", "--rows", str(args.rows), "--seed", "1", "--out", data], stdout=subprocess.DEVNULL)
        subprocess.check_call([args.wukong, "gen-criteo", "--rows", "1000", "--seed", "2", "--out", small], stdout=subprocess.DEVNULL)
    mb = os.path.getsize(data) / 1e6
    cfg = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "criteo_wukong.toml")

    ours_train, ours_read = [], []

    def ours():
        out = subprocess.run(
            [args.wukong, "--threads", str(args.threads), "cache", "--config", cfg, "--train", data, "--valid", small, "--test", small,
             "--cache-dir", os.path.join(work, "cache"), "--rebuild-cache", "--read-passes", "2"],
            check=True, capture_output=True, text=True).stdout
        row = next(l for l in out.splitlines() if l.startswith("train "))
        ours_train.append(float(row.split()[5]))
        reads = [float(m) for m in re.findall(r"= (\d+) rows/s", out)]
        ours_read.append(reads[-1])

    for _ in range(args.repeat):
        ours()
    t_ours = statistics.median(ours_train)
    ref = os.path.join(work, "ref")
    os.makedirs(ref, exist_ok=True)
    t_pd = timed(lambda: run_pandas(data, ref), args.repeat)
    t_pa = timed(lambda: run_pyarrow(data, ref), args.repeat)

    print(f"Criteo-format TSV, {args.rows:,} rows, {mb:.1f} MB; median of {args.repeat} runs; "
          f"pandas {pd.__version__}, pyarrow {pa.__version__}; {args.threads} threads for ours (pyarrow's reader uses its own pool)")
    print()
    print("| text → encoded cache | seconds | MB/s | rows/s | ours vs this |")
    print("|---|---|---|---|---|")
    print(f"| wukong cache | {t_ours:.2f} | {mb / t_ours:.1f} | {args.rows / t_ours:,.0f} | 1.00× |")
    for name, (t, _, _) in [("pandas read_csv (C engine) + factorize", t_pd), ("pyarrow.csv + pandas factorize", t_pa)]:
        print(f"| {name} | {t:.2f} | {mb / t:.1f} | {args.rows / t:,.0f} | {t / t_ours:.2f}× faster |")
    print()
    print(f"cached epoch read (ours, shuffled batches of 4096): {statistics.median(ours_read):,.0f} rows/s")


if __name__ == "__main__":
    main()
