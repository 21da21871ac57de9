// Layout kernels of the model path on the device: column windows of row-major matrices (split and
// concatenate along the last axis), patchify / unpatchify, the cropped position embedding and its
// gradient, and in-place accumulation. All bf16 data with f32 sums; simple grid-stride loops —
// these move a few MB per step next to the GEMMs and attention.
// CPU twin: src/kernels/shape.rs (copy_cols, patchify_bf16, add_pos_embed, pos_embed_grad,
// accumulate).
//
//   copy_cols_bf16       dst[r, dst_off + c] = src[r, src_off + c], c < cols
//   patchify_bf16        [B, C, H, W] ↔ [B, (H/p)·(W/p), C·p·p] in either patch order
//   add_pos_embed        tokens[b, i·gw + j, :] += table[(top+i)·P + left + j, :]
//   pos_embed_grad       g_table[(top+i)·P + left + j, :] += Σ_b dtokens[b, i·gw + j, :]
//   add_bf16             y = a + b (y may be a)
//   accumulate_f32_bf16  g += f32(x)
//   accumulate_f32       g += x
//   gather_chunks_bf16   a modulation's gradient from its chunks' f32 gradients, in bf16
//   residual_grad_add    out = a + f32(x), and its bf16 rounding (the residual stream's gradient
//                        in the MMDiT's backward: one pass for a copy, an add and a cast)
//   select_block_f32     dst = src[idx[slot]·len .. +len]: one of several stacked blocks, picked by an
//                        index in device memory (a graph replays with the index its host staged)
#include "common.cuh"

namespace shape {

__device__ __forceinline__ long long thread_index() {
    return (long long)blockIdx.x * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ long long thread_count() { return (long long)gridDim.x * blockDim.x; }

}  // namespace shape

// 16 bytes per thread when every window and both pointers are 8-element aligned (the MMDiT's
// q/k/v and modulation chunks always are): the element-wise loop ran at a sixth of the copy
// bandwidth on an H100-class card (docs/perf-log.md, 2026-11-26).
// grid: ceil(rows·cols / 256), or ceil(rows·cols / 8 / 256) when aligned (any grid is correct),
// block: 256.
extern "C" __global__ void copy_cols_bf16(bf16* __restrict__ dst, const bf16* __restrict__ src, long long rows,
                                          int cols, int dst_ld, int dst_off, int src_ld, int src_off) {
    kernel_prologue();
    const bool vec = ((cols | dst_ld | dst_off | src_ld | src_off) & 7) == 0 &&
                     (((uintptr_t)dst | (uintptr_t)src) & 15) == 0;
    if (vec) {
        const int cv = cols >> 3;
        const long long n = rows * cv;
        for (long long i = shape::thread_index(); i < n; i += shape::thread_count()) {
            const long long r = i / cv;
            const int c = (int)(i - r * cv) << 3;
            store16(dst + r * dst_ld + dst_off + c, load16(src + r * src_ld + src_off + c));
        }
        return;
    }
    if (cols >= 128) {
        // a row's columns by consecutive threads, rows and column chunks by blocks: one division
        // a block's turn, where the flat loop below divides a 64-bit index at every element (the
        // discriminator head's [768, 24576] weight into its [768, 24577] bias-augmented copy
        // took ~110 µs on an H100, a quarter of the copy rate)
        const int chunks = (cols + blockDim.x - 1) / blockDim.x;
        const long long n = rows * chunks;
        for (long long t = blockIdx.x; t < n; t += gridDim.x) {
            const long long r = t / chunks;
            const int c = (int)(t - r * chunks) * blockDim.x + threadIdx.x;
            if (c < cols) dst[r * dst_ld + dst_off + c] = src[r * src_ld + src_off + c];
        }
        return;
    }
    const long long n = rows * cols;
    for (long long i = shape::thread_index(); i < n; i += shape::thread_count()) {
        const long long r = i / cols;
        const int c = (int)(i - r * cols);
        dst[r * dst_ld + dst_off + c] = src[r * src_ld + src_off + c];
    }
}

// One thread per image element (b, c, y, x). Within a patch the token's features are ordered
// (c, kh, kw) when channel_last = 0 (the conv weight's order) and (kh, kw, c) when 1 (SD3's
// final layer). to_tokens = 1 gathers image → tokens, 0 scatters tokens → image.
// grid: ceil(B·C·H·W / 256) (any grid is correct), block: 256.
extern "C" __global__ void patchify_bf16(bf16* __restrict__ out, const bf16* __restrict__ in, int B, int C, int H,
                                         int W, int p, int channel_last, int to_tokens) {
    kernel_prologue();
    const long long n = (long long)B * C * H * W;
    const int gw = W / p;
    for (long long i = shape::thread_index(); i < n; i += shape::thread_count()) {
        const int x = (int)(i % W);
        const int y = (int)((i / W) % H);
        const int c = (int)((i / ((long long)W * H)) % C);
        const long long b = i / ((long long)W * H * C);
        const long long token = (long long)(y / p) * gw + x / p;
        const int ky = y % p, kx = x % p;
        const int inner = channel_last ? (ky * p + kx) * C + c : (c * p + ky) * p + kx;
        const long long t = (b * ((long long)(H / p) * gw) + token) * ((long long)C * p * p) + inner;
        if (to_tokens)
            out[t] = in[i];
        else
            out[i] = in[t];
    }
}

// grid: ceil(B·gh·gw·D / 256) (any grid is correct), block: 256.
extern "C" __global__ void add_pos_embed(bf16* __restrict__ tokens, const bf16* __restrict__ table, int B, int gh,
                                         int gw, int D, int P, int top, int left) {
    kernel_prologue();
    const long long n = (long long)B * gh * gw * D;
    for (long long i = shape::thread_index(); i < n; i += shape::thread_count()) {
        const int d = (int)(i % D);
        const long long cell = (i / D) % ((long long)gh * gw);
        const int r = (int)(cell / gw), c = (int)(cell % gw);
        const long long src = ((long long)(top + r) * P + left + c) * D + d;
        tokens[i] = f2bf(bf2f(tokens[i]) + bf2f(table[src]));
    }
}

// One thread per table element of the crop, summing over the batch (no atomics).
// grid: ceil(gh·gw·D / 256) (any grid is correct), block: 256.
extern "C" __global__ void pos_embed_grad(float* __restrict__ g_table, const bf16* __restrict__ dtokens, int B,
                                          int gh, int gw, int D, int P, int top, int left) {
    kernel_prologue();
    const long long per_image = (long long)gh * gw * D;
    for (long long i = shape::thread_index(); i < per_image; i += shape::thread_count()) {
        const int d = (int)(i % D);
        const long long cell = i / D;
        const int r = (int)(cell / gw), c = (int)(cell % gw);
        float s = 0.f;
        for (int b = 0; b < B; b++) s += bf2f(dtokens[b * per_image + i]);
        g_table[((long long)(top + r) * P + left + c) * D + d] += s;
    }
}

// grid: ceil(n / 256) (any grid is correct), block: 256.
extern "C" __global__ void add_bf16(bf16* y, const bf16* a, const bf16* b, long long n) {
    kernel_prologue();
    for (long long i = shape::thread_index(); i < n; i += shape::thread_count()) y[i] = f2bf(bf2f(a[i]) + bf2f(b[i]));
}

extern "C" __global__ void accumulate_f32_bf16(float* __restrict__ g, const bf16* __restrict__ x, long long n) {
    kernel_prologue();
    for (long long i = shape::thread_index(); i < n; i += shape::thread_count()) g[i] += bf2f(x[i]);
}

extern "C" __global__ void accumulate_f32(float* __restrict__ g, const float* __restrict__ x, long long n) {
    kernel_prologue();
    for (long long i = shape::thread_index(); i < n; i += shape::thread_count()) g[i] += x[i];
}

// A modulation's gradient from its chunks': dst[r, j·D + c] = bf16(src_j[r·D + c]) for r < rows,
// c < D and the n ≤ 9 chunks j (a null src_j, a chunk without gradient, writes zeros). One launch
// where a cast per chunk and a memset of dst took up to ten (325 casts, 1.4 ms of an SD3.5-medium
// forward+backward on an H200). grid-stride over rows·n·D.
__device__ __forceinline__ const float* chunk_ptr(int j, const float* s0, const float* s1, const float* s2,
                                                  const float* s3, const float* s4, const float* s5,
                                                  const float* s6, const float* s7, const float* s8) {
    switch (j) {
        case 0: return s0;
        case 1: return s1;
        case 2: return s2;
        case 3: return s3;
        case 4: return s4;
        case 5: return s5;
        case 6: return s6;
        case 7: return s7;
        default: return s8;
    }
}
extern "C" __global__ void gather_chunks_bf16(bf16* __restrict__ dst, long long rows, int D, int n,
                                              const float* s0, const float* s1, const float* s2, const float* s3,
                                              const float* s4, const float* s5, const float* s6, const float* s7,
                                              const float* s8) {
    kernel_prologue();
    const long long width = (long long)n * D, total = rows * width;
    for (long long i = shape::thread_index(); i < total; i += shape::thread_count()) {
        const long long r = i / width;
        const int rem = (int)(i - r * width);
        const int j = rem / D, c = rem - j * D;
        const float* s = chunk_ptr(j, s0, s1, s2, s3, s4, s5, s6, s7, s8);
        dst[i] = f2bf(s != nullptr ? s[r * D + c] : 0.f);
    }
}

// out = a + f32(x) (out may be a), and out16 = bf16(out) when out16 is not null. 8 elements a
// thread (two float4 and one 16-byte bf16 load) when n % 8 == 0 and every pointer is 16-byte
// aligned, else one. grid-stride over n / 8 (or n).
extern "C" __global__ void residual_grad_add(float* out, bf16* __restrict__ out16, const float* a,
                                             const bf16* __restrict__ x, long long n) {
    kernel_prologue();
    const bool vec = (n & 7) == 0 &&
                     (((uintptr_t)out | (uintptr_t)out16 | (uintptr_t)a | (uintptr_t)x) & 15) == 0;
    if (vec) {
        for (long long i = shape::thread_index(); i < n / 8; i += shape::thread_count()) {
            const float4 a0 = load_f4(a + 8 * i);
            const float4 a1 = load_f4(a + 8 * i + 4);
            const pack16 xv = load16(x + 8 * i);
            const bf16* xs = reinterpret_cast<const bf16*>(&xv);
            float o[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
#pragma unroll
            for (int k = 0; k < 8; k++) o[k] += bf2f(xs[k]);
            store_f4(out + 8 * i, make_float4(o[0], o[1], o[2], o[3]));
            store_f4(out + 8 * i + 4, make_float4(o[4], o[5], o[6], o[7]));
            if (out16) store16(out16 + 8 * i, pack_bf16x8(o));
        }
        return;
    }
    for (long long i = shape::thread_index(); i < n; i += shape::thread_count()) {
        const float o = a[i] + bf2f(x[i]);
        out[i] = o;
        if (out16) out16[i] = f2bf(o);
    }
}

// grid-stride over len.
extern "C" __global__ void select_block_f32(float* __restrict__ dst, const float* __restrict__ src,
                                            const int* __restrict__ idx, int slot, long long len) {
    kernel_prologue();
    const float* from = src + (long long)idx[slot] * len;
    for (long long i = shape::thread_index(); i < len; i += shape::thread_count()) dst[i] = from[i];
}
