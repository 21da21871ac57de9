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
//   im2col_tokens_tiled, col2im_tokens_tiled: the same where C is a multiple of 8, by blocks of
//                   16 channels and a band of rows through shared memory
// The plain kernels are the fallback: consecutive threads take consecutive s (im2col) or c
// (col2im), so the other side's accesses are C elements apart — a 32-byte sector read for every
// bf16 — and each element splits a 64-bit index by five divisions (an H100 ran the head's
// 16 × 16 × 1536 im2col in 361 µs, where its 12.6 MB of columns take ~10 µs to write). The
// tiled kernels read and write whole sectors (a pixel's 16 channels, 32 bytes; a run of s) and
// divide only once per thread.
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

// Channels a block of the tiled kernels takes (two 16-byte packs of a pixel).
constexpr int kConvTileChannels = 16;

// grid: (ceil(C / 16), B, ceil(OH / R)), block: 256, dynamic shared memory 16 · rows_in · W · 2
// bytes with rows_in = (R − 1)·stride + KH (the launcher sizes R); C a multiple of 8. A block
// gathers output rows oy0 .. oy0 + R − 1 of its 16 channels: first the input rows they read,
// every pixel's 16 channels as two 16-byte loads, into one shared plane per channel (zeros for
// rows outside the image); then each thread takes output positions s, s + 256, … of the band
// and writes its column entry of every (channel, kh, kw) row, rows S apart — a warp's stores
// are 32 consecutive s, its plane reads consecutive or stride-apart pixels of one row.
extern "C" __global__ void __launch_bounds__(256)
    im2col_tokens_tiled(bf16* __restrict__ cols, const bf16* __restrict__ x, int B, int H, int W, int C, int KH,
                        int KW, int stride, int pad, int OH, int OW, int R) {
    kernel_prologue();
    DYNAMIC_SMEM(uint16_t, planes);
    constexpr int CT = kConvTileChannels;
    const int c0 = blockIdx.x * CT, b = blockIdx.y, oy0 = blockIdx.z * R;
    const int oy1 = min(OH, oy0 + R), rows_in = (R - 1) * stride + KH, iy_lo = oy0 * stride - pad;
    const int plane = rows_in * W, nc = min(CT, C - c0);
    const long long K = (long long)C * KH * KW, S = (long long)OH * OW;

    // the band's input rows: thread i takes pack i % 2 of pixel i / 2
    for (int i = threadIdx.x; i < plane * 2; i += blockDim.x) {
        const int half = i & 1, p = i >> 1, iy = iy_lo + p / W, ix = p % W;
        if (8 * half >= nc) continue;
        pack16 v = {};
        if (iy >= 0 && iy < H) v = load16(x + (((long long)b * H + iy) * W + ix) * C + c0 + 8 * half);
#pragma unroll
        for (int j = 0; j < 8; j++) planes[(8 * half + j) * plane + p] = (uint16_t)(v.w[j / 2] >> (16 * (j & 1)));
    }
    __syncthreads();

    uint16_t* out = reinterpret_cast<uint16_t*>(cols);
    const int ns = (oy1 - oy0) * OW;
    for (int sl = threadIdx.x; sl < ns; sl += blockDim.x) {
        const int oy = oy0 + sl / OW, ox = sl % OW, r0 = (oy - oy0) * stride, ix0 = ox * stride - pad;
        uint16_t* o = out + ((long long)b * (K + 1) + (long long)c0 * KH * KW) * S + (long long)oy * OW + ox;
        for (int cl = 0; cl < nc; cl++) {
            const uint16_t* pl = planes + cl * plane + r0 * W;
            for (int kh = 0; kh < KH; kh++) {
                for (int kw = 0; kw < KW; kw++, o += S) {
                    const int ix = ix0 + kw;
                    *o = ix >= 0 && ix < W ? pl[kh * W + ix] : (uint16_t)0;
                }
            }
        }
        // the bias row of ones, by the blocks of the first channels
        if (blockIdx.x == 0) out[((long long)b * (K + 1) + K) * S + (long long)oy * OW + ox] = 0x3f80;
    }
}

// grid: (ceil(C / 16), B, ceil(H / RI)), block: 256, dynamic shared memory RI · W · 16 · 4 bytes
// (the launcher sizes RI); C a multiple of 8. A block sums input rows iy0 .. iy0 + RI − 1 of its
// 16 channels: each thread takes pixels p, p + 256, … of the band, finds the (≤ KH·KW) windows
// holding the pixel once, and sums their column entries for the 16 channels (a warp's loads:
// runs of consecutive s of one row); the sums go through shared memory so that each pixel's 16
// channels leave as two 16-byte stores.
extern "C" __global__ void __launch_bounds__(256)
    col2im_tokens_tiled(bf16* __restrict__ dx, const bf16* __restrict__ dcols, int B, int H, int W, int C, int KH,
                        int KW, int stride, int pad, int OH, int OW, int RI) {
    kernel_prologue();
    DYNAMIC_SMEM(float, sums);
    constexpr int CT = kConvTileChannels;
    const int c0 = blockIdx.x * CT, b = blockIdx.y, iy0 = blockIdx.z * RI;
    const int np = (min(H, iy0 + RI) - iy0) * W, nc = min(CT, C - c0);
    const long long K = (long long)C * KH * KW, S = (long long)OH * OW, cstep = (long long)KH * KW * S;
    const bf16* base = dcols + ((long long)b * (K + 1) + (long long)c0 * KH * KW) * S;

    for (int p = threadIdx.x; p < np; p += blockDim.x) {
        const int iy = iy0 + p / W, ix = p % W;
        float acc[CT];
#pragma unroll
        for (int j = 0; j < CT; j++) acc[j] = 0.f;
        for (int kh = 0; kh < KH; kh++) {
            const int ty = iy + pad - kh;
            if (ty < 0 || ty % stride != 0 || ty / stride >= OH) continue;
            for (int kw = 0; kw < KW; kw++) {
                const int tx = ix + pad - kw;
                if (tx < 0 || tx % stride != 0 || tx / stride >= OW) continue;
                // the channels' rows cstep apart: a pointer step a load
                const bf16* src = base + (long long)(kh * KW + kw) * S + (long long)(ty / stride) * OW + tx / stride;
#pragma unroll
                for (int j = 0; j < CT; j++, src += cstep)
                    if (j < nc) acc[j] += bf2f(*src);
            }
        }
#pragma unroll
        for (int j = 0; j < CT; j++) sums[p * CT + j] = acc[j];
    }
    __syncthreads();

    for (int i = threadIdx.x; i < np * 2; i += blockDim.x) {
        const int half = i & 1, p = i >> 1;
        if (8 * half >= nc) continue;
        const int iy = iy0 + p / W, ix = p % W;
        store16(dx + (((long long)b * H + iy) * W + ix) * C + c0 + 8 * half, pack_bf16x8(sums + p * CT + 8 * half));
    }
}
