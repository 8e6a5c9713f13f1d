#!/usr/bin/env python3
"""PyTorch reference for `wukong bench` (never a dependency of the product).

Reads a work directory written by `wukong bench` (spec.json with the model and train configs,
rows.u32 / labels.f32 / dense.f32 with the generated data), builds the same model in idiomatic
fast PyTorch, times the same steps and prints one `BENCH_RESULT {json}` line.

  python3 benchmarks/torch_ref.py target/bench-work/frappe --mode eager --threads 2
  python3 benchmarks/torch_ref.py --matmul --threads 2

The idiomatic path: one nn.Embedding(sparse=True) over the concatenated tables, updated by
torch.optim.Adagrad on its sparse gradient (touched rows only); fused Adam on the dense
parameters; clip_grad_norm_ (foreach). `--mode compile` wraps everything after the embedding
lookup (interaction, MLPs, loss) in torch.compile (the sparse lookup stays eager).

Install on demand: pip install -r benchmarks/requirements.txt
"""
import argparse
import json
import math
import os
import resource
import sys
import time

try:
    import numpy as np
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
except ImportError as e:  # the bench prints this line as the reason the column is missing
    print(f"PyTorch reference unavailable ({e}); install with: pip install -r benchmarks/requirements.txt")
    sys.exit(2)


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class MLP(nn.Module):
    """Hidden layers Linear -> (BatchNorm) -> ReLU -> Dropout, then a linear output (as ours)."""

    def __init__(self, d_in, hidden, d_out, dropout=0.0, batch_norm=False):
        super().__init__()
        layers, d = [], d_in
        for h in hidden:
            layers.append(nn.Linear(d, h))
            if batch_norm:
                layers.append(nn.BatchNorm1d(h))
            layers.append(nn.ReLU())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            d = h
        layers.append(nn.Linear(d, d_out))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class LinearCompress(nn.Module):
    """[b, n_in, d] -> [b, n_out, d] = W^T X."""

    def __init__(self, n_in, n_out):
        super().__init__()
        bound = 1.0 / math.sqrt(n_in)
        self.weight = nn.Parameter(torch.empty(n_in, n_out).uniform_(-bound, bound))

    def forward(self, x):
        return torch.matmul(self.weight.t(), x)


class FMBlock(nn.Module):
    def __init__(self, kind, n_in, n_out, d, k, att_c, att_hidden, mlp_hidden, dropout, batch_norm):
        super().__init__()
        self.kind, self.n_in, self.n_out, self.d, self.k = kind, n_in, n_out, d, k
        if kind == "static":
            bound = 1.0 / math.sqrt(n_in)
            self.y = nn.Parameter(torch.empty(n_in, k).uniform_(-bound, bound))
        elif kind == "attentive":
            self.compress = LinearCompress(n_in, att_c)
            self.att_mlp = MLP(att_c * d, att_hidden, n_in * k)
        width = n_in * n_in if kind == "full" else n_in * k
        self.norm = nn.LayerNorm(width)
        self.mlp = MLP(width, mlp_hidden, n_out * d, dropout, batch_norm)

    def forward(self, x):
        b = x.shape[0]
        xt = x.transpose(1, 2)
        if self.kind == "static":
            fm = torch.matmul(x, torch.matmul(xt, self.y))
        elif self.kind == "attentive":
            y = self.att_mlp(self.compress(x).reshape(b, -1)).view(b, self.n_in, self.k)
            fm = torch.matmul(x, torch.matmul(xt, y))
        else:
            fm = torch.matmul(x, xt)
        return self.mlp(self.norm(fm.reshape(b, -1))).view(b, self.n_out, self.d)


class WukongLayer(nn.Module):
    def __init__(self, n_in, c, d):
        super().__init__()
        n_out = c["num_fmb"] + c["num_lcb"]
        self.fmb = FMBlock(c["fm_kind"], n_in, c["num_fmb"], d, c["fm_rank"], c["attention_compress"],
                           c["attention_hidden"], c["fmb_mlp"], c["dropout"], c["batch_norm"])
        self.lcb = LinearCompress(n_in, c["num_lcb"])
        self.residual = LinearCompress(n_in, n_out) if n_in != n_out else None
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        out = torch.cat([self.fmb(x), self.lcb(x)], dim=1)
        res = self.residual(x) if self.residual is not None else x
        return self.norm(out + res)


class DenseEmbeddings(nn.Module):
    def __init__(self, num_dense, hidden, n, d):
        super().__init__()
        self.n, self.d = n, d
        self.mlp = MLP(num_dense, hidden, n * d)

    def forward(self, dense):
        return self.mlp(dense).view(dense.shape[0], self.n, self.d)


class WukongBody(nn.Module):
    """Everything after the embedding lookup: [b, fields, d] (+ dense) -> logits."""

    def __init__(self, c, fields, num_dense, marks):
        super().__init__()
        d = c["embedding_dim"]
        self.d, self.marks = d, marks
        self.dense = DenseEmbeddings(num_dense, c["dense_mlp"], c["num_dense_embeddings"], d) if num_dense else None
        n = fields + (c["num_dense_embeddings"] if num_dense else 0)
        layers = []
        for _ in range(c["num_layers"]):
            layers.append(WukongLayer(n, c, d))
            n = c["num_fmb"] + c["num_lcb"]
        self.layers = nn.ModuleList(layers)
        self.top = MLP(n * d, c["top_mlp"], 1, c["dropout"], c["batch_norm"])

    def forward(self, x, dense):
        if self.dense is not None:
            x = torch.cat([x, self.dense(dense)], dim=1)
        self.marks("embedding")
        for layer in self.layers:
            x = layer(x)
        self.marks("interaction")
        return self.top(x.reshape(x.shape[0], -1)).squeeze(1)


class FmBody(nn.Module):
    """FM over [b, fields, d+1] rows (last column: first-order weight), as ours."""

    def __init__(self, c, fields, num_dense, marks):
        super().__init__()
        assert num_dense == 0, "the FM reference takes categorical fields only"
        self.bias = nn.Parameter(torch.zeros(1))
        self.marks = marks

    def forward(self, x, dense):
        self.marks("embedding")
        first = x[:, :, -1].sum(1)
        v = x[:, :, :-1]
        s = v.sum(1)
        pairwise = 0.5 * (s * s - (v * v).sum(1)).sum(1)
        self.marks("interaction")
        return first + pairwise + self.bias


BODIES = {"wukong": WukongBody, "fm": FmBody}


class Clock:
    """Phase clock mirroring ours: mark(p) charges the time since the previous mark to p."""

    def __init__(self, sync):
        self.on, self.sync, self.seconds, self.last = False, sync, {}, time.perf_counter()

    def restart(self):
        self.last = time.perf_counter()

    def __call__(self, phase):
        if not self.on:
            return
        if self.sync:
            self.sync()
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self.last
        self.last = now


def matmul_peak(device, precision="f32"):
    a = torch.randn(4096, 2048, device=device)
    b = torch.randn(2048, 2048, device=device)
    if precision == "bf16":
        a, b = a.bfloat16(), b.bfloat16()
    # 10 timed products after 2 warm-up ones, or fewer (at least 3) where one takes seconds (a
    # bf16 product on a CPU without bf16 units runs a slow fallback).
    times, start = [], time.perf_counter()
    for i in range(12):
        t = time.perf_counter()
        c = a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2 or time.perf_counter() - start > 10.0:
            times.append(time.perf_counter() - t)
        del c
        if len(times) >= 3 and time.perf_counter() - start > 30.0:
            break
    times.sort()
    return 2.0 * 4096 * 2048 * 2048 / times[len(times) // 2] / 1e9


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", nargs="?")
    ap.add_argument("--mode", choices=["eager", "compile"], default="eager")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--device", default="cpu", help="cpu, or a GPU spec (vulkan:N / cuda:N map to cuda:N)")
    ap.add_argument("--matmul", action="store_true", help="measure the matrix-multiply peak only")
    ap.add_argument("--precision", choices=["f32", "bf16"], default="f32", help="with --matmul: the operands' type")
    ap.add_argument("--sync-phases", action="store_true")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    dev = torch.device("cpu" if args.device in ("cpu", "flex") else "cuda:" + (args.device.split(":") + ["0"])[1])
    if args.matmul:
        print("BENCH_RESULT " + json.dumps({"gflops": matmul_peak(dev, args.precision)}))
        return

    spec = json.load(open(os.path.join(args.dir, "spec.json")))
    cfg, tr = spec["model"], spec["train"]
    name = cfg["name"]
    if name not in BODIES:
        print(f"no PyTorch reference for model {name!r} (have: {', '.join(BODIES)})")
        sys.exit(3)
    fields, nd, n = len(spec["vocab"]), spec["dense"], spec["examples"]
    rows = np.fromfile(os.path.join(args.dir, "rows.u32"), dtype="<u4").reshape(n, fields).astype(np.int64)
    labels = np.fromfile(os.path.join(args.dir, "labels.f32"), dtype="<f4")
    dense = np.fromfile(os.path.join(args.dir, "dense.f32"), dtype="<f4").reshape(n, nd) if nd else None

    torch.manual_seed(tr["seed"])
    setup = time.perf_counter()
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" and args.sync_phases else None
    clock = Clock(sync)
    emb = nn.Embedding(spec["table_rows"], spec["table_dim"], sparse=True).to(dev)
    nn.init.normal_(emb.weight, 0.0, cfg["embedding_init_std"])
    body = BODIES[name](cfg, fields, nd, clock).to(dev)
    step_body = body
    if args.mode == "compile":
        clock = Clock(None)  # fused graphs have no phases; the clock stays off
        body.marks = lambda _p: None
        step_body = torch.compile(body)

    dense_params = list(body.parameters())
    try:
        adam = torch.optim.Adam(dense_params, lr=tr["lr"], betas=(tr["adam_beta1"], tr["adam_beta2"]),
                                eps=tr["adam_epsilon"], weight_decay=0.0, fused=True)
        adam_kind = "fused"
    except (RuntimeError, TypeError):
        adam = torch.optim.Adam(dense_params, lr=tr["lr"], betas=(tr["adam_beta1"], tr["adam_beta2"]),
                                eps=tr["adam_epsilon"], foreach=True)
        adam_kind = "foreach"
    adagrad = torch.optim.Adagrad(emb.parameters(), lr=tr["emb_lr"], eps=tr["emb_epsilon"],
                                  initial_accumulator_value=tr["emb_initial_accumulator"])
    clip = tr["grad_clip_norm"]
    # Mixed precision like ours: bf16 products under autocast, f32 parameters and optimizer state.
    bf16 = tr.get("precision", "f32") == "bf16"
    autocast = lambda: torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=bf16)
    bsz, steps, warmup = spec["batch_size"], spec["steps"], spec["warmup"]

    def batch(i, size):
        sl = slice(i * size, (i + 1) * size)
        ids = torch.from_numpy(rows[sl]).to(dev, non_blocking=True)
        y = torch.from_numpy(labels[sl]).to(dev, non_blocking=True)
        dn = torch.from_numpy(dense[sl]).to(dev, non_blocking=True) if dense is not None else None
        return ids, y, dn

    body.train()
    setup_s = time.perf_counter() - setup
    step_ms, first_loss, last_loss = [], float("nan"), float("nan")
    for i in range(warmup + steps):
        if i == warmup:
            clock.on = args.mode == "eager"
            clock.seconds = {}
        t = time.perf_counter()
        clock.restart()
        warm = min((i + 1) / tr["warmup_steps"], 1.0) if tr["warmup_steps"] > 0 else 1.0  # the trainer's warm-up
        for g in adam.param_groups:
            g["lr"] = tr["lr"] * warm
        for g in adagrad.param_groups:
            g["lr"] = tr["emb_lr"] * warm
        ids, y, dn = batch(i, bsz)
        clock("data")
        x = emb(ids)
        with autocast():
            logits = step_body(x, dn)
        loss = F.binary_cross_entropy_with_logits(logits.float(), y)
        clock("mlp")
        adam.zero_grad(set_to_none=True)
        adagrad.zero_grad(set_to_none=True)
        loss.backward()
        loss_v = loss.item()
        clock("backward")
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(dense_params, clip, foreach=True)
        adam.step()
        clock("dense_optimizer")
        adagrad.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        clock("sparse_optimizer")
        if i >= warmup:
            step_ms.append((time.perf_counter() - t) * 1e3)
        if i == 0:
            first_loss = loss_v
            setup_s += time.perf_counter() - t  # includes compilation in compile mode
        last_loss = loss_v
    phases = list(clock.seconds.items()) if args.mode == "eager" else []

    body.eval()
    ib, nb = spec["infer_batch_size"], spec["infer_batches"]
    scored, start = 0, time.perf_counter()
    with torch.inference_mode():
        for i in range(nb + 1):
            if i == 1:
                start = time.perf_counter()
            ids, _, dn = batch(i, ib)
            with autocast():
                out = step_body(emb(ids), dn).float().cpu()
            if i >= 1:
                scored += out.numel()
    infer = scored / (time.perf_counter() - start)

    print("BENCH_RESULT " + json.dumps({
        "framework": "pytorch-" + args.mode,
        "version": f"torch {torch.__version__} (Adam {adam_kind}, sparse Adagrad)",
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "step_ms": step_ms,
        "phases": phases,
        "infer_examples_per_s": infer,
        "peak_rss_mb": peak_rss_mb(),
        "first_loss": first_loss,
        "last_loss": last_loss,
        "setup_s": setup_s,
    }))


if __name__ == "__main__":
    main()
