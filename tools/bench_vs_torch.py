#!/usr/bin/env python3
"""The same shapes in PyTorch on the same GPU, so advdmd's figures are ratios measured in one run.

Attention: torch.nn.functional.scaled_dot_product_attention (whatever backend PyTorch picks, and
the flash backend explicitly) at the MMDiT joint-attention shapes of issue 7, bf16, forward and
forward+backward, in TFLOP/s with the FlashAttention convention (forward 4·Lq·Lk·d·heads·batch,
backward 2.5× forward). Also the two ceilings (device copy GB/s, bf16 GEMM TFLOP/s).

The MMDiT: diffusers' SD3Transformer2DModel in the SD3.5-medium configuration (random weights,
bf16), at the shapes of `advdmd bench mmdit|sample` (1024 px, batch 1, 333 text tokens): forward,
forward+backward and a 4-step Euler loop (transformer only), eager and, with --compile,
torch.compile. diffusers is pure Python: carry its wheel (and importlib_metadata's) where the GPU
machine lacks it; without it this part is skipped with a message.
Timing: CUDA events, warm-up first, median of repeats.
"""
import argparse, json, statistics, time
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


def sd35_medium(results, res=1024, batch=1, steps=4, compile_too=False):
    try:
        from diffusers import SD3Transformer2DModel
    except Exception as ex:
        print(f"diffusers not importable, MMDiT comparison skipped: {ex}")
        results.append({"op": "diffusers", "error": str(ex)[:200]})
        return
    torch.manual_seed(0)
    model = SD3Transformer2DModel(
        sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
        pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
        dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
    ).to("cuda", torch.bfloat16)
    side = res // 8
    x = torch.randn(batch, 16, side, side, device="cuda", dtype=torch.bfloat16)
    ctx = torch.randn(batch, 333, 4096, device="cuda", dtype=torch.bfloat16)
    pooled = torch.randn(batch, 2048, device="cuda", dtype=torch.bfloat16)
    t = torch.full((batch,), 500.0, device="cuda")

    def forward(m, xin):
        return m(hidden_states=xin, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t, return_dict=False)[0]

    def sample(m):
        xs = x
        for k in range(steps):
            v = forward(m, xs)
            xs = xs - (1.0 / steps) * v
        return xs

    variants = [("eager", model)]
    if compile_too:
        variants.append(("compile", torch.compile(model)))
    for name, m in variants:
        t0 = time.time()
        with torch.no_grad():
            forward(m, x)
        torch.cuda.synchronize()
        first = time.time() - t0
        with torch.no_grad():
            fwd = bench(lambda: forward(m, x), reps=20, warmup=3)
            smp = bench(lambda: sample(m), reps=10, warmup=2)
        r = {"op": "diffusers_sd35m", "variant": name, "res": res, "batch": batch, "first_call_s": first,
             "fwd_ms": fwd, f"sample{steps}_ms": smp}
        if name == "eager":
            model.train()
            xg = x.clone()
            fb = bench(lambda: forward(m, xg).float().square().mean().backward(), reps=5, warmup=2)
            model.zero_grad(set_to_none=True)
            r["fwd_bwd_ms"] = fb
            model.eval()
        results.append(r)
        print(f"diffusers SD3.5-medium {name:7s} {res}px b{batch}: fwd {fwd:7.2f} ms  {steps}-step sample {smp:7.2f} ms"
              + (f"  fwd+bwd {r['fwd_bwd_ms']:7.2f} ms" if "fwd_bwd_ms" in r else "") + f"  (first call {first:.1f} s)")
    torch.cuda.synchronize()
    print(f"diffusers peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--no-attention", action="store_true")
    ap.add_argument("--no-mmdit", action="store_true")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (minutes of compiling)")
    args = ap.parse_args()
    res = []
    print(torch.__version__, torch.cuda.get_device_name())

    def save():
        if args.json:
            json.dump({"torch": torch.__version__, "device": torch.cuda.get_device_name(), "results": res}, open(args.json, "w"), indent=1)

    ceilings(res)
    if not args.no_attention:
        attention(res)
    save()
    if not args.no_mmdit:
        sd35_medium(res, compile_too=args.compile)
    save()
