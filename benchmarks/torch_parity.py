#!/usr/bin/env python3
"""PyTorch references of every model, for the parity test (`cargo test --release --test parity`).

Reads one safetensors file written by tests/parity.rs: our weights before and after one training
step (`param.*`, `after.*`, named by our module paths; Linear weights are [in, out]), a batch
(`batch.*`), our inference logits, training loss and gradients (`out.*`, `grad.*`, `grad_rows`)
and the model/train configs (metadata). Builds the model's forward pass here in PyTorch after
the published reference implementations (the papers' and FuxiCTR's; DLRM's and TorchRec's
row-wise Adagrad), on the same weights, then:

  1. inference logits (batch norm on running statistics), against ours;
  2. the training loss and the gradients of every dense parameter and embedding row;
  3. one step — clip_grad_norm_ and torch.optim.Adam on the dense parameters, row-wise Adagrad
     (one accumulator per row segment, as DLRM/TorchRec) on the touched rows — against our
     parameters after our step.

Prints `PARITY {json}` with the largest difference of each kind; exits 1 when one exceeds the
tolerance (1e-5; gradients relative to max(1, their largest magnitude)).

Never a dependency of the product. Install: ../shared/tools/torch-venv.sh (or pip install torch numpy).
"""
import json
import math
import struct
import sys

try:
    import numpy as np
    import torch
    import torch.nn.functional as F
except ImportError as e:
    print(f"PyTorch unavailable ({e})")
    sys.exit(2)

TOLERANCE = 1e-5
DTYPES = {"F32": np.float32, "I64": np.int64}


def read_safetensors(path):
    """Tensors and metadata of a safetensors file (the format is an 8-byte header length, a
    JSON header, then the raw little-endian data)."""
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    meta = header.pop("__metadata__", {})
    base = 8 + n
    tensors = {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        arr = np.frombuffer(raw[base + start : base + end], dtype=DTYPES[info["dtype"]]).reshape(info["shape"])
        tensors[name] = torch.from_numpy(arr.copy())
    return tensors, meta


# ---------------------------------------------------------------- building blocks (our names)


def lin(P, name, x):
    """x W + b with W stored [in, out] (burn's layout)."""
    y = x @ P[name + ".weight"]
    b = P.get(name + ".bias")
    return y if b is None else y + b


def batch_norm(P, name, x, training):
    """BatchNorm over dim 1 (ε = 1e-5, momentum 0.1); in training it normalises with the batch
    statistics and updates the running statistics in P in place. The one deliberate deviation
    from torch.nn.BatchNorm: burn's BatchNorm averages the *biased* batch variance into its
    running variance, PyTorch the unbiased one (a factor N/(N-1): 1.0002 at batch 4096)."""
    rm, rv, gamma, beta = P[name + ".running_mean"], P[name + ".running_var"], P[name + ".gamma"], P[name + ".beta"]
    if not training:
        return F.batch_norm(x, rm, rv, gamma, beta, training=False, eps=1e-5)
    dims = [0] + list(range(2, x.dim()))
    with torch.no_grad():
        rm.mul_(0.9).add_(0.1 * x.mean(dims))
        rv.mul_(0.9).add_(0.1 * x.var(dims, unbiased=False))
    return F.batch_norm(x, None, None, gamma, beta, training=True, eps=1e-5)


def mlp(P, name, x, training, hidden_key="hidden", output=True):
    """Hidden layers Linear → (BatchNorm) → ReLU, then a linear output layer (when `output`)."""
    i = 0
    while f"{name}.{hidden_key}.{i}.weight" in P:
        x = lin(P, f"{name}.{hidden_key}.{i}", x)
        if f"{name}.norms.{i}.gamma" in P:
            x = batch_norm(P, f"{name}.norms.{i}", x, training)
        x = torch.relu(x)
        i += 1
    return lin(P, name + ".output", x) if output else x


def layer_norm(P, name, x):
    return F.layer_norm(x, x.shape[-1:], P[name + ".gamma"], P[name + ".beta"], eps=1e-5)


def compress(W, x):
    """Linear compression along the embedding axis: [b, n, d] -> [b, m, d] with W [n, m]."""
    return torch.einsum("nm,bnd->bmd", W, x)


def dense_embeddings(P, dense, width, training):
    """Dense features -> embeddings of `width` ([b, k, width]): through the MLP, or one per
    feature, x_i · v_i (`numeric_embedding = "per_feature"`, FuxiCTR's numeric embedding)."""
    if "numeric" in P:
        return dense[:, :, None] * P["numeric"][None]
    if "dense.output.weight" not in P:
        return None
    e = mlp(P, "dense", dense, training)
    return e.reshape(e.shape[0], -1, width)


def fields(sparse, dense_e):
    return sparse if dense_e is None else torch.cat([sparse, dense_e], 1)


# ---------------------------------------------------------------- the models


def wukong(P, c, x, dense, training):
    d = c["embedding_dim"]
    x = fields(x, dense_embeddings(P, dense, d, training))
    b = x.shape[0]
    i = 0
    while f"layers.{i}.norm.gamma" in P:
        p = f"layers.{i}"
        n = x.shape[1]
        if p + ".fmb.projection" in P:  # static: X (Xᵀ Y)
            fm = x @ (x.transpose(1, 2) @ P[p + ".fmb.projection"])
        elif p + ".fmb.attentive.compress.weight" in P:  # attentive: Y = MLP(compress(X))
            cx = compress(P[p + ".fmb.attentive.compress.weight"], x).reshape(b, -1)
            y = mlp(P, p + ".fmb.attentive.mlp", cx, training).reshape(b, n, c["fm_rank"])
            fm = x @ (x.transpose(1, 2) @ y)
        else:  # full X Xᵀ
            fm = x @ x.transpose(1, 2)
        h = mlp(P, p + ".fmb.mlp", layer_norm(P, p + ".fmb.norm", fm.reshape(b, -1)), training).reshape(b, -1, d)
        l = compress(P[p + ".lcb.weight"], x)
        out = torch.cat([h, l], 1)
        res = compress(P[p + ".residual.weight"], x) if p + ".residual.weight" in P else x
        x = layer_norm(P, p + ".norm", out + res)
        i += 1
    return mlp(P, "top", x.reshape(b, -1), training).reshape(b)


def lr(P, c, x, dense, training):
    x = fields(x, dense_embeddings(P, dense, 1, training))
    return x.sum((1, 2)) + P["bias"]


def fm(P, c, x, dense, training):
    d = c["embedding_dim"]
    x = fields(x, dense_embeddings(P, dense, d + 1, training))
    first = x[..., d].sum(1)
    v = x[..., :d]
    pair = 0.5 * (v.sum(1) ** 2 - (v**2).sum(1)).sum(1)
    return P["bias"] + first + pair


def dnn(P, c, x, dense, training):
    x = fields(x, dense_embeddings(P, dense, c["embedding_dim"], training))
    return mlp(P, "mlp", x.reshape(x.shape[0], -1), training).reshape(-1)


def dlrm(P, c, x, dense, training):
    bottom = torch.relu(mlp(P, "dense", dense, training))
    x = torch.cat([x, bottom[:, None, :]], 1)
    b, n, _ = x.shape
    if c["interaction"] == "dot":
        gram = x @ x.transpose(1, 2)
        i, j = torch.triu_indices(n, n, offset=1)
        top_in = torch.cat([gram[:, i, j], bottom], 1)
    else:
        top_in = x.reshape(b, -1)
    return mlp(P, "top", top_in, training).reshape(b)


def dcnv2(P, c, x, dense, training):
    x0 = fields(x, dense_embeddings(P, dense, c["embedding_dim"], training))
    x0 = x0.reshape(x0.shape[0], -1)
    x = x0
    i = 0
    while f"cross.{i}.u.weight" in P:  # CrossNetV2
        x = x + x0 * lin(P, f"cross.{i}.u", x)
        i += 1
    i = 0
    while f"cross_mix.{i}.v" in P:  # CrossNetMix, expert by expert as the reference code
        p = f"cross_mix.{i}"
        V, C, U = P[p + ".v"], P[p + ".c"], P[p + ".u"]
        experts, r = C.shape[0], C.shape[1]
        outs, scores = [], []
        for e in range(experts):
            scores.append(x @ P[p + ".gate.weight"][:, e : e + 1])
            h = torch.tanh(x @ V[:, e * r : (e + 1) * r])
            h = torch.tanh(h @ C[e])
            outs.append(x0 * (h @ U[e] + P[p + ".bias"]))
        gates = torch.softmax(torch.cat(scores, 1), 1)  # [b, E]
        x = torch.einsum("ebd,be->bd", torch.stack(outs), gates) + x
        i += 1
    s = c["model_structure"]
    if s == "parallel":
        out = lin(P, "cross_out", x) + mlp(P, "dnn", x0, training)
    elif s == "stacked":
        out = mlp(P, "dnn", x, training)
    else:
        out = lin(P, "cross_out", x)
    return out.reshape(-1)


def autoint(P, c, x, dense, training):
    x0 = fields(x, dense_embeddings(P, dense, c["embedding_dim"], training))
    b, n, _ = x0.shape
    heads = c["num_heads"]
    x = x0
    i = 0
    while f"attention.{i}.query.weight" in P:  # FuxiCTR's MultiHeadSelfAttention
        p = f"attention.{i}"
        q, k, v = (lin(P, f"{p}.{w}", x) for w in ("query", "key", "value"))
        a = q.shape[2]
        split = lambda t: t.reshape(b, n, heads, a // heads).transpose(1, 2)
        q, k, v = split(q), split(k), split(v)
        scores = q @ k.transpose(2, 3)
        if c["use_scale"]:
            scores = scores / math.sqrt(a // heads)
        out = (torch.softmax(scores, -1) @ v).transpose(1, 2).reshape(b, n, a)
        if p + ".residual.weight" in P:
            out = out + lin(P, p + ".residual", x)
        elif c["use_residual"]:
            out = out + x
        if c["layer_norm"]:
            out = layer_norm(P, p + ".norm", out)
        x = torch.relu(out)
        i += 1
    logit = lin(P, "attention_out", x.reshape(b, -1))
    if "dnn.output.weight" in P:
        logit = logit + mlp(P, "dnn", x0.reshape(b, -1), training)
    return logit.reshape(b)


def afn(P, c, x, dense, training):
    d = c["embedding_dim"]
    width = d * (2 if c["ensemble_dnn"] else 1)
    x = fields(x, dense_embeddings(P, dense, width, training))
    b = x.shape[0]
    e = x[..., :d]
    log = batch_norm(P, "log_norm", torch.log(torch.clamp(e.abs(), min=1e-7)), training)
    y = batch_norm(P, "exp_norm", torch.exp(compress(P["log_neurons.weight"], log)), training)
    logit = mlp(P, "afn_mlp", y.reshape(b, -1), training)
    if c["ensemble_dnn"]:
        second = mlp(P, "dnn", x[..., d:].reshape(b, -1), training)
        logit = lin(P, "combine", torch.cat([logit, second], 1))
    return logit.reshape(b)


def finalmlp(P, c, x, dense, training):
    d = c["embedding_dim"]
    flat = fields(x[..., :d], dense_embeddings(P, dense, d, training))
    b = flat.shape[0]
    flat = flat.reshape(b, -1)
    part = 1
    feats = []
    for g, ctx in (("gate1", c["fs1_context"]), ("gate2", c["fs2_context"])):
        if not c["use_fs"]:
            feats.append(flat)
            continue
        if ctx:  # the gate's own embeddings of its context fields
            cin = torch.cat([x[:, f, part * d : (part + 1) * d] for f in ctx], 1)
            part += 1
        else:  # FuxiCTR's fs_ctx_bias, repeated over the batch
            cin = P[g + ".context"].repeat(b, 1)
        feats.append(flat * torch.sigmoid(mlp(P, g + ".mlp", cin, training)) * 2)
    h1 = mlp(P, "mlp1", feats[0], training, hidden_key="layers", output=False)
    h2 = mlp(P, "mlp2", feats[1], training, hidden_key="layers", output=False)
    W = P["bilinear"]  # [heads, a, c]
    heads = W.shape[0]
    pair = torch.einsum("bha,hac,bhc->b", h1.reshape(b, heads, -1), W, h2.reshape(b, heads, -1))
    return (lin(P, "w1", h1) + lin(P, "w2", h2)).reshape(b) + pair


def masknet(P, c, x, dense, training):
    x = fields(x, dense_embeddings(P, dense, c["embedding_dim"], training))
    b = x.shape[0]
    if c["emb_layernorm"]:  # one LayerNorm per field
        normed = F.layer_norm(x, x.shape[-1:], eps=1e-5) * P["emb_norm.gamma"] + P["emb_norm.beta"]
    else:
        normed = x
    emb, normed = x.reshape(b, -1), normed.reshape(b, -1)

    def block(p, h):  # FuxiCTR's MaskBlock
        mask = lin(P, p + ".mask_out", torch.relu(lin(P, p + ".mask_hidden", emb)))
        out = (mask * h) @ P[p + ".hidden.weight"]
        if c["net_layernorm"]:
            out = layer_norm(P, p + ".norm", out)
        return torch.relu(out)

    n_blocks = sum(1 for k in P if k.startswith("blocks.") and k.endswith(".hidden.weight"))
    if c["model_type"] == "serial":
        h = normed
        for i in range(n_blocks):
            h = block(f"blocks.{i}", h)
    else:
        h = torch.cat([block(f"blocks.{i}", normed) for i in range(n_blocks)], 1)
    return mlp(P, "head", h, training).reshape(b)


def xdeepfm(P, c, x, dense, training):
    d = c["embedding_dim"]
    x = fields(x, dense_embeddings(P, dense, d + 1, training))
    b, m, _ = x.shape
    first = x[..., d].sum(1)
    x0 = x[..., :d]
    h, pooled, i = x0, [], 0
    while f"cin.{i}.weight" in P:  # CIN: outer products along fields, then a 1×1 convolution
        z = torch.einsum("bhd,bmd->bhmd", h, x0).reshape(b, -1, d)
        h = compress(P[f"cin.{i}.weight"], z)
        pooled.append(h.sum(2))
        i += 1
    logit = lin(P, "cin_out", torch.cat(pooled, 1)).reshape(b) + first + P["bias"]
    if "dnn.output.weight" in P:
        logit = logit + mlp(P, "dnn", x0.reshape(b, -1), training).reshape(b)
    return logit


MODELS = {
    "wukong": wukong,
    "lr": lr,
    "fm": fm,
    "dnn": dnn,
    "dlrm": dlrm,
    "dcnv2": dcnv2,
    "autoint+": autoint,
    "afn+": afn,
    "finalmlp": finalmlp,
    "masknet": masknet,
    "xdeepfm": xdeepfm,
}


def max_diff(a, b):
    if a.shape != b.shape:
        return float("inf")
    return 0.0 if a.numel() == 0 else (a.double() - b.double()).abs().max().item()


def check_file(path):
    """Checks one case; returns its report (with the problems found)."""
    T, meta = read_safetensors(path)
    cfg, train = json.loads(meta["model"]), json.loads(meta["train"])
    forward = MODELS[cfg["name"]]
    params = {k[len("param.") :]: v for k, v in T.items() if k.startswith("param.")}
    rows, dense, labels = T["batch.rows"], T["batch.dense"], T["batch.labels"]
    unique = T["batch.unique_rows"]
    inverse = torch.searchsorted(unique, rows)  # position of each (example, field) in `unique`
    report, problems = {}, []

    def check(kind, value, what="", limit=TOLERANCE):
        report[kind] = max(report.get(kind, 0.0), value)
        if not value <= limit:
            problems.append(f"{kind}{' ' + what if what else ''}: {value:.3e}")

    # 1. inference logits
    with torch.no_grad():
        P = {k: v.clone() for k, v in params.items()}
        logits = forward(P, cfg, P["embedding.weight"][rows], dense, training=False)
    check("logits", max_diff(logits, T["out.logits"]))

    # 2. loss and gradients (embedding rows as their own leaf, as our gather does)
    table = params.pop("embedding.weight")
    running = {k: v.clone() for k, v in params.items() if k.endswith((".running_mean", ".running_var"))}
    dense_params = {k: v.clone().requires_grad_(True) for k, v in params.items() if k not in running}
    rows_leaf = table[unique].clone().requires_grad_(True)
    P = {**dense_params, **running}
    loss = F.binary_cross_entropy_with_logits(forward(P, cfg, rows_leaf[inverse], dense, training=True), labels)
    loss.backward()
    check("loss", abs(loss.item() - T["out.loss"].item()))
    check("loss", abs(loss.item() - T["out.step_loss"].item()))
    ours = {k[len("grad.") :]: v for k, v in T.items() if k.startswith("grad.")}
    theirs = {k: p.grad for k, p in dense_params.items() if p.grad is not None}
    if set(ours) != set(theirs):
        problems.append(f"gradient sets differ: only ours {sorted(set(ours) - set(theirs))}, only theirs {sorted(set(theirs) - set(ours))}")
    for k in set(ours) & set(theirs):
        check("grads", max_diff(ours[k], theirs[k]) / max(1.0, theirs[k].abs().max().item()), k)
    g_rows = rows_leaf.grad
    check("rows_grad", max_diff(T["grad_rows"], g_rows) / max(1.0, g_rows.abs().max().item()))

    # 3. one step: clipping + Adam on the dense parameters, row-wise Adagrad on the rows
    with_grad = [p for p in dense_params.values() if p.grad is not None]
    if train["grad_clip_norm"] > 0:
        torch.nn.utils.clip_grad_norm_(with_grad, train["grad_clip_norm"])
    opt = torch.optim.Adam(with_grad, lr=train["lr"], betas=(train["beta1"], train["beta2"]), eps=train["eps"])
    opt.step()
    new_rows = rows_leaf.detach().clone()
    start = 0
    for width in train["segments"]:
        g = g_rows[:, start : start + width]
        acc = train["emb_initial_accumulator"] + (g * g).mean(1, keepdim=True)
        new_rows[:, start : start + width] -= train["emb_lr"] * g / (acc.sqrt() + train["emb_epsilon"])
        start += width
    new_table = table.clone()
    new_table[unique] = new_rows
    after = {k[len("after.") :]: v for k, v in T.items() if k.startswith("after.")}
    check("after", max_diff(after.pop("embedding.weight"), new_table))
    for k, v in after.items():
        check("after", max_diff(v, running[k] if k in running else dense_params[k].detach()), k)

    report["case"] = meta.get("case")
    report["problems"] = problems
    return report


def main():
    """One `PARITY {json}` line per file (torch imports once for all cases); exit 1 if any differs."""
    failed = False
    for path in sys.argv[1:]:
        report = check_file(path)
        print("PARITY " + json.dumps(report), flush=True)
        failed |= bool(report["problems"])
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
