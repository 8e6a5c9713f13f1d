#!/usr/bin/env python3
"""The Python yardstick for `wukong loadtest` (never a dependency of the product).

Serves a run directory's model the way a typical Python stack does: the PyTorch reference model
(benchmarks/torch_ref.py, same architecture and sizes; weights random, scores not compared)
behind the standard library's ThreadingHTTPServer, one forward pass per request under
torch.inference_mode, `torch.set_num_threads(threads)`. Requests are encoded exactly as ours are:
FNV-1a of the value's text, the run's vocabularies (encoder.json), OOV row or hash bucket, dense
log1p and standardisation. Same contract: POST /v1/score {"rows": [...]} -> {"scores": [...]}.

  python3 benchmarks/serve_torch.py RUN_DIR --port 8090 --threads 2

Wukong runs with one-hot fields only (the reference has no multi-hot pooling).
"""
import argparse
import json
import math
import os
import sys
import tomllib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_ref  # noqa: E402  (the same model code `wukong bench` measures against)
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

MISSING = 0x9E3779B97F4A7C15
MASK = (1 << 64) - 1


def fnv1a(b):
    h = 0xCBF29CE484222325
    for x in b:
        h = ((h ^ x) * 0x100000001B3) & MASK
    return h


def key_of(v):
    if v is None or v == "":
        return MISSING
    if isinstance(v, bool):
        v = int(v)
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e15:
        v = int(v)
    return fnv1a(str(v).encode())


class Encoder:
    def __init__(self, run_dir, data_cfg):
        enc = json.load(open(os.path.join(run_dir, "encoder.json")))
        self.fields, self.offsets, off = [], [], 0
        for f in enc["fields"]:
            if f["width"] != 1:
                sys.exit(f"field {f['name']}: multi-hot fields are not supported by this reference")
            self.fields.append((f["name"], {k: i + 1 for i, k in enumerate(f["vocab"])}, len(f["vocab"]), f["hash_buckets"]))
            self.offsets.append(off)
            off += 1 + len(f["vocab"]) + f["hash_buckets"]
        self.rows = off
        log1p = set()
        for spec in data_cfg.get("fields", []):
            if spec.get("kind") == "numeric" and spec.get("transform") == "log1p":
                log1p.update(spec.get("names", []) + ([spec["name"]] if "name" in spec else []))
        missing = {}
        for spec in data_cfg.get("fields", []):
            for n in spec.get("names", []) + ([spec["name"]] if "name" in spec else []):
                missing[n] = spec.get("missing", 0.0)
        self.dense = [(d["name"], d["shift"], d["scale"], d["name"] in log1p, missing.get(d["name"], 0.0)) for d in enc["dense"]]

    def encode(self, rows):
        ids, dense = [], []
        for r in rows:
            for (name, vocab, n, hb), off in zip(self.fields, self.offsets):
                k = key_of(r.get(name))
                local = vocab.get(k)
                if local is None:
                    local = 1 + n + k % hb if hb > 0 else 0
                ids.append(off + local)
            for name, shift, scale, log1p, miss in self.dense:
                v = r.get(name)
                x = miss if v is None or v == "" else float(v)
                if log1p:
                    x = math.copysign(math.log1p(abs(x)), x)
                dense.append((x - shift) / scale)
        return ids, dense


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--port", type=int, default=8090)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = tomllib.load(open(os.path.join(args.run, "config.toml"), "rb"))
    mcfg = cfg["model"]
    if mcfg["name"] not in torch_ref.BODIES:
        sys.exit(f"no PyTorch reference for model {mcfg['name']!r}")
    enc = Encoder(args.run, cfg["data"])
    nf, nd = len(enc.fields), len(enc.dense)
    emb = nn.Embedding(enc.rows, mcfg["embedding_dim"])
    body = torch_ref.BODIES[mcfg["name"]](mcfg, nf, nd, lambda _p: None)
    emb.eval()
    body.eval()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Without this, keep-alive responses (headers and body written separately) meet the
        # client's delayed ACK: ~40 ms per request, which would not be a fair yardstick.
        disable_nagle_algorithm = True

        def log_message(self, *a):
            pass

        def reply(self, code, obj):
            b = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(b)))
            self.end_headers()
            self.wfile.write(b)

        def do_GET(self):
            self.reply(200, {"status": "ok"})

        def do_POST(self):
            n = int(self.headers.get("Content-Length", 0))
            try:
                rows = json.loads(self.rfile.read(n))["rows"]
                ids, dense = enc.encode(rows)
            except Exception as e:  # noqa: BLE001
                return self.reply(400, {"error": {"kind": "bad_request", "message": str(e)}})
            b = len(rows)
            if b == 0:
                return self.reply(200, {"scores": []})
            with torch.inference_mode():
                x = emb(torch.tensor(ids, dtype=torch.long).view(b, nf))
                dn = torch.tensor(dense, dtype=torch.float32).view(b, nd) if nd else None
                p = torch.sigmoid(body(x, dn)).tolist()
            self.reply(200, {"scores": p})

    ThreadingHTTPServer.daemon_threads = True
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print(f"serving {args.run} (PyTorch {torch.__version__}, {args.threads} threads) on http://127.0.0.1:{args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
