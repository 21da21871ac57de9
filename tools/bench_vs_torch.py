#!/usr/bin/env python3
"""The same shapes in PyTorch on the same GPU, so advdmd's figures are ratios measured in one run.

Attention: torch.nn.functional.scaled_dot_product_attention (whatever backend PyTorch picks, and
the flash backend explicitly) at the MMDiT joint-attention shapes of issue 7, bf16, forward and
forward+backward, in TFLOP/s with the FlashAttention convention (forward 4·Lq·Lk·d·heads·batch,
backward 2.5× forward). Also the two ceilings (device copy GB/s, bf16 GEMM TFLOP/s).
Timing: CUDA events, warm-up first, median of repeats.
"""
import argparse, json, statistics
import torch
import torch.nn.functional as F

SHAPES = [  # name, batch, heads, text tokens, image tokens, head dim
    ("sd35m-1024px-d64", 2, 24, 333, 4096, 64),
    ("d128-1024px", 2, 12, 333, 4096, 128),
    ("sd35m-512px-d64", 2, 24, 333, 1024, 64),
]


def bench(fn, reps=20, warmup=5):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); fn(); e.record(); e.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def attention(results):
    for name, b, h, la, lb, d in SHAPES:
        L = la + lb
        q, k, v = (torch.randn(b, h, L, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        do = torch.randn(b, h, L, d, device="cuda", dtype=torch.bfloat16)
        flops = 4.0 * L * L * d * h * b
        for backend in ("default", "flash"):
            ctx = torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION) if backend == "flash" else torch.autocast("cuda", enabled=False)
            try:
                with ctx:
                    fwd = bench(lambda: F.scaled_dot_product_attention(q, k, v))
                    o = F.scaled_dot_product_attention(q, k, v)
                    bwd_total = bench(lambda: torch.autograd.grad(F.scaled_dot_product_attention(q, k, v), (q, k, v), do))
            except Exception as ex:  # a backend may refuse a shape
                results.append({"op": "sdpa", "shape": name, "backend": backend, "error": str(ex)[:200]})
                continue
            bwd = max(bwd_total - fwd, 1e-6)
            r = {"op": "sdpa", "shape": name, "backend": backend, "fwd_ms": fwd, "bwd_ms": bwd,
                 "fwd_tflops": flops / fwd / 1e9, "bwd_tflops": 2.5 * flops / bwd / 1e9}
            results.append(r)
            print(f"sdpa {backend:8s} {name:20s} fwd {fwd:7.3f} ms {r['fwd_tflops']:6.1f} TFLOP/s   bwd {bwd:7.3f} ms {r['bwd_tflops']:6.1f} TFLOP/s")


def ceilings(results):
    n = 1 << 30  # 1 GiB copies, several buffers to defeat L2
    src = [torch.empty(n, dtype=torch.uint8, device="cuda").random_() for _ in range(2)]
    dst = torch.empty(n, dtype=torch.uint8, device="cuda")
    i = [0]
    def copy():
        dst.copy_(src[i[0] % 2]); i[0] += 1
    ms = bench(copy)
    results.append({"op": "copy", "GBps": 2 * n / ms / 1e6})
    print(f"copy  {2 * n / ms / 1e6:.0f} GB/s (read + write)")
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    bm = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = bench(lambda: a @ bm)
    results.append({"op": "gemm_bf16_8192", "tflops": 2 * 8192**3 / ms / 1e9})
    print(f"gemm  bf16 8192^3 {2 * 8192**3 / ms / 1e9:.0f} TFLOP/s")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    args = ap.parse_args()
    res = []
    print(torch.__version__, torch.cuda.get_device_name())
    ceilings(res)
    attention(res)
    if args.json:
        json.dump({"torch": torch.__version__, "device": torch.cuda.get_device_name(), "results": res}, open(args.json, "w"), indent=1)
