// The discriminator head's convolution on the device as a GEMM over token-major features
// (ALGORITHM.md §2): the MMDiT's image tokens [B, H·W, C] (NHWC) are gathered into per-sample
// column matrices [B, K+1, OH·OW] with K = C·KH·KW in (c, kh, kw) order — the order of a
// checkpoint's [O, C, KH, KW] weight — and a last row of ones that carries the bias through the
// GEMM, so one GEMM per sample writes the output channel-major [O, OH·OW] (what GroupNorm reads).
// CPU twin: src/kernels/conv.rs (`tokens::im2col`, `tokens::col2im`).
//
//   im2col_tokens:  cols[b, k, s] = x[b, iy·W + ix, c] (0 outside the image), row K = 1
//   col2im_tokens:  dx[b, iy·W + ix, c] = Σ over the windows holding the pixel of dcols[b, k, s]
//                   (one thread per input element, no atomics; the bias row is not read)
#include "common.cuh"

// The launch's sizes (the kernels take them as ten ints: launches pass scalars and pointers).
struct ConvDims {
    int B, H, W, C, KH, KW, stride, pad, OH, OW;
};

__device__ __forceinline__ long long conv_k(const ConvDims& d) { return (long long)d.C * d.KH * d.KW; }


// grid: ceil(B·(K+1)·OH·OW / 256) (any grid is correct), block: 256.
extern "C" __global__ void im2col_tokens(bf16* __restrict__ cols, const bf16* __restrict__ x, int B, int H, int W, int C, int KH, int KW, int stride, int pad,
                                         int OH, int OW) {
    kernel_prologue();
    const ConvDims d{B, H, W, C, KH, KW, stride, pad, OH, OW};
    const long long K = conv_k(d), S = (long long)d.OH * d.OW, n = d.B * (K + 1) * S;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const long long s = i % S, k = (i / S) % (K + 1), b = i / (S * (K + 1));
        if (k == K) {
            cols[i] = f2bf(1.f);
            continue;
        }
        const int kw = (int)(k % d.KW), kh = (int)((k / d.KW) % d.KH), c = (int)(k / ((long long)d.KW * d.KH));
        const int oy = (int)(s / d.OW), ox = (int)(s % d.OW);
        const int iy = oy * d.stride - d.pad + kh, ix = ox * d.stride - d.pad + kw;
        const bool inside = iy >= 0 && iy < d.H && ix >= 0 && ix < d.W;
        cols[i] = inside ? x[((b * d.H + iy) * d.W + ix) * d.C + c] : f2bf(0.f);
    }
}

// grid: ceil(B·H·W·C / 256) (any grid is correct), block: 256.
extern "C" __global__ void col2im_tokens(bf16* __restrict__ dx, const bf16* __restrict__ dcols, int B, int H, int W, int C, int KH, int KW, int stride, int pad,
                                         int OH, int OW) {
    kernel_prologue();
    const ConvDims d{B, H, W, C, KH, KW, stride, pad, OH, OW};
    const long long K = conv_k(d), S = (long long)d.OH * d.OW, n = (long long)d.B * d.H * d.W * d.C;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const int c = (int)(i % d.C), ix = (int)((i / d.C) % d.W), iy = (int)((i / ((long long)d.C * d.W)) % d.H);
        const long long b = i / ((long long)d.C * d.W * d.H);
        float sum = 0.f;
        for (int kh = 0; kh < d.KH; kh++) {
            const int ty = iy + d.pad - kh;
            if (ty < 0 || ty % d.stride != 0 || ty / d.stride >= d.OH) continue;
            for (int kw = 0; kw < d.KW; kw++) {
                const int tx = ix + d.pad - kw;
                if (tx < 0 || tx % d.stride != 0 || tx / d.stride >= d.OW) continue;
                const long long k = ((long long)c * d.KH + kh) * d.KW + kw;
                const long long s = (long long)(ty / d.stride) * d.OW + tx / d.stride;
                sum += bf2f(dcols[(b * (K + 1) + k) * S + s]);
            }
        }
        dx[i] = f2bf(sum);
    }
}
