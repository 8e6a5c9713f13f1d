# The interaction products of one table5 Wukong layer (batch 512, n = 64, d = 128, k = 24,
# n_L = 32) in PyTorch, forward + backward, f32 and bf16 autocast, 2 threads: the reference for
# `cargo run --release --example bmm_phases` (BENCHMARKS.md, issue 18). Run with the torch venv python.
import torch, time
torch.set_num_threads(2)
b,n,d,k,nl=512,64,128,24,32
def t(name, f, flop):
    for _ in range(3): f()
    v=[]
    for _ in range(20):
        s=time.perf_counter(); f(); v.append((time.perf_counter()-s)*1e3)
    v.sort(); print(f"{name:40} {v[10]:7.2f} ms {flop/v[10]/1e6:6.0f} GFLOP/s")
for prec in ["f32","bf16"]:
    x=torch.randn(b,n,d,requires_grad=True); y=torch.randn(n,k,requires_grad=True); w=torch.randn(n,nl,requires_grad=True)
    ctx = (lambda: torch.autocast("cpu",dtype=torch.bfloat16)) if prec=="bf16" else (lambda: torch.autocast("cpu",enabled=False))
    F=lambda m,kk,nn: 2.0*b*m*kk*nn
    def fm():
        with ctx():
            xty=torch.matmul(x.transpose(1,2), y)
            o=torch.bmm(x, xty)
        o.float().sum().backward()
    def lcb():
        with ctx():
            o=torch.matmul(w.t(), x)
        o.float().sum().backward()
    t(f"torch {prec} fm fwd+bwd", fm, 3*(F(d,n,k)+F(n,d,k)))
    t(f"torch {prec} lcb fwd+bwd", lcb, 3*F(nl,n,d))
