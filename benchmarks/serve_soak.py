#!/usr/bin/env python3
"""A bounded soak of `wukong serve` on loopback (standard library only).

Mixes, for --minutes: valid requests (1-64 rows, checked: 200 and one score per row), malformed
JSON, unknown fields, oversized bodies, and slow clients (headers dribbled byte by byte, bodies
that stop half-way, connections opened and left idle). Samples the server's resident memory every
10 s. Passes when no valid request failed, every bad one got a 4xx, the server never answered
5xx to a well-formed request, and the peak resident memory of the last third of the run is < 10% above that of the first
third (after a 20 s warm-up).

  python3 benchmarks/serve_soak.py --pid PID --url http://127.0.0.1:8080 --rows rows.jsonl --minutes 10
"""
import argparse
import http.client
import json
import random
import socket
import threading
import time


def rss_kib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1])
    return 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--rows", required=True, help="JSON lines: one row object per line")
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--max-body", type=int, default=8 << 20)
    args = ap.parse_args()
    host, port = args.url.split("//")[1].split(":")
    port = int(port)
    rows = [json.loads(l) for l in open(args.rows)]
    end = time.time() + args.minutes * 60
    stats, lock = {}, threading.Lock()

    def count(kind):
        with lock:
            stats[kind] = stats.get(kind, 0) + 1

    def post(conn, body):
        conn.request("POST", "/v1/score", body=body, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, r.read()

    def valid_client(seed):
        rnd = random.Random(seed)
        conn = http.client.HTTPConnection(host, port, timeout=30)
        while time.time() < end:
            n = rnd.choice([1, 1, 4, 16, 64])
            batch = [rows[rnd.randrange(len(rows))] for _ in range(n)]
            try:
                status, body = post(conn, json.dumps({"rows": batch}))
                ok = status == 200 and len(json.loads(body)["scores"]) == n
                count("valid_ok" if ok else f"valid_FAILED_{status}")
            except Exception as e:  # noqa: BLE001
                count(f"valid_FAILED_{type(e).__name__}")
                conn = http.client.HTTPConnection(host, port, timeout=30)

    def bad_client(seed):
        rnd = random.Random(seed)
        while time.time() < end:
            conn = http.client.HTTPConnection(host, port, timeout=30)
            kind = rnd.choice(["malformed", "unknown_field", "wrong_type", "oversized", "too_many_rows"])
            body = {
                "malformed": '{"rows": [{"a": ',
                "unknown_field": json.dumps({"rows": [{"no_such_field": 1}]}),
                "wrong_type": json.dumps({"rows": [{k: {"x": 1} for k in list(rows[0])[:1]}]}),
                "oversized": '{"rows": [' + " " * (args.max_body + 10) + "]}",
                "too_many_rows": json.dumps({"rows": [{}] * 100_000}),
            }[kind]
            try:
                status, _ = post(conn, body)
                count(f"bad_{kind}_{status}")
            except Exception as e:  # noqa: BLE001  (a server may close on an oversized body)
                count(f"bad_{kind}_{type(e).__name__}")
            conn.close()
            time.sleep(0.05)

    def slow_client(seed):
        rnd = random.Random(seed)
        while time.time() < end:
            s = socket.create_connection((host, port), timeout=60)
            kind = rnd.choice(["dribble", "half_body", "idle"])
            try:
                if kind == "dribble":
                    body = json.dumps({"rows": [rows[0]]}).encode()
                    req = (f"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
                    for b in req:
                        s.send(bytes([b]))
                        time.sleep(0.01)
                    reply = s.recv(65536)
                    count("slow_dribble_" + reply.split(b" ")[1].decode() if reply else "slow_dribble_closed")
                elif kind == "half_body":
                    s.send(b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"rows\": [")
                    time.sleep(rnd.uniform(1, 5))
                    count("slow_half_body")
                else:
                    time.sleep(rnd.uniform(1, 10))
                    count("slow_idle")
            except Exception as e:  # noqa: BLE001
                count(f"slow_{kind}_{type(e).__name__}")
            s.close()

    threads = [threading.Thread(target=f, args=(i,)) for i, f in enumerate([valid_client] * 4 + [bad_client] * 2 + [slow_client] * 4)]
    for t in threads:
        t.start()
    samples, t0 = [], time.time()
    while time.time() < end:
        time.sleep(10)
        samples.append((round(time.time() - t0), rss_kib(args.pid)))
        with lock:
            print(f"t={samples[-1][0]}s rss={samples[-1][1] / 1024:.1f} MiB valid_ok={stats.get('valid_ok', 0)}", flush=True)
    for t in threads:
        t.join()
    # resident memory moves with the requests in flight: compare the peak of the last third of
    # the run with the peak of the first third (after 20 s of warm-up)
    warm = [r for t, r in samples if t >= 20] or [r for _, r in samples]
    third = max(1, len(warm) // 3)
    base = max(warm[:third])
    growth = (max(warm[-third:]) - base) / base
    failed = {k: v for k, v in stats.items() if "FAILED" in k}
    fivexx = {k: v for k, v in stats.items() if k.startswith("bad_") and k.rsplit("_", 1)[1].startswith("5")}
    print(json.dumps({"minutes": args.minutes, "counts": dict(sorted(stats.items())), "rss_mib_peak_first_third": base / 1024,
                      "rss_mib_last": samples[-1][1] / 1024, "rss_mib_max": max(s for _, s in samples) / 1024,
                      "rss_growth": growth, "valid_failed": failed, "bad_got_5xx": fivexx}, indent=1))
    ok = not failed and not fivexx and growth < 0.10
    print("SOAK", "PASSED" if ok else "FAILED")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
