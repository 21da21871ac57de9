//! The Hopper warpgroup MMA wrappers of `cuda/common.cuh` (`cuda/wgmma.cu`): a 64×64 (and
//! 64×128, 64×192) tile through `wgmma.mma_async` with 128-byte-swizzled shared-memory operands
//! (A K-major or MN-major, B K-major or MN-major) and with A from registers, as one N = 64
//! product or two N = 32 halves, against an f64 product. On the GPU this checks the
//! descriptor and layout formulas against the hardware; under the emulator, the twins.

use super::*;
use advdmd::device::kernel::{KernelArgs, LaunchCfg};

/// C = A·Bᵀ (`b` is N × K) or A·B (`b` is K × N, `b_mn_major`), A 64 × K.
fn reference(a: &[f32], b: &[f32], (k, n): (usize, usize), b_mn_major: bool) -> Vec<f32> {
    let mut c = vec![0f32; 64 * n];
    for i in 0..64 {
        for j in 0..n {
            let s: f64 = (0..k)
                .map(|p| {
                    let bv = if b_mn_major {
                        b[p * n + j]
                    } else {
                        b[j * k + p]
                    };
                    a[i * k + p] as f64 * bv as f64
                })
                .sum();
            c[i * n + j] = s as f32;
        }
    }
    c
}

/// One probe launch (`wgmma_probe_m64n{n}`: `n_halves` only for N = 64) on random A (64 × k)
/// and B, checked against the f64 product.
fn probe(
    dev: &KernelDevice,
    (n, k): (usize, usize),
    (b_mn_major, a_mode, n_halves): (bool, i32, Option<bool>),
    seed: u64,
) {
    let mut rng = Rng::new(seed);
    let a = randn_bf16(&mut rng, 64 * k, 1.0);
    let b = randn_bf16(&mut rng, n * k, 1.0);
    let (ad, bd) = (upload_bf16(dev, &a), upload_bf16(dev, &b));
    let c = dev.alloc::<f32>(64 * n).unwrap();
    let cfg = LaunchCfg {
        grid: [1, 1, 1],
        block: [128, 1, 1],
        shared_bytes: (1024 + (64 + n) * k * 2) as u32,
    };
    let args = KernelArgs::new().buf(&ad).buf(&bd).buf(&c).i32(k as i32);
    // the N = 192 probe has one form: both operands K-major in shared memory
    let args = if n == 192 {
        assert!(
            !b_mn_major && a_mode == 0,
            "wgmma_probe_m64n192 takes no modes"
        );
        args
    } else {
        args.i32(b_mn_major as i32).i32(a_mode)
    };
    let args = match n_halves {
        Some(h) => args.i32(h as i32),
        None => args,
    };
    dev.launch(&format!("wgmma_probe_m64n{n}"), cfg, args)
        .unwrap();
    let shape = format!(
        "64x{n}x{k} B {} A {}{}",
        if b_mn_major { "mn" } else { "k" },
        ["smem-k", "regs", "smem-mn"][a_mode as usize],
        if n_halves == Some(true) { " 2xN32" } else { "" }
    );
    check(
        &format!("wgmma_m64n{n}k16"),
        dev,
        &shape,
        &dev.download(&c).unwrap(),
        &reference(&a, &b, (k, n), b_mn_major),
        1e-5,
    );
}

/// N = 64: A K-major, in registers or MN-major; B K- or MN-major; one product or two N = 32 halves.
#[test]
fn wgmma_tile_matches_reference() {
    for dev in devices() {
        for k in [64usize, 128] {
            for b_mn_major in [false, true] {
                for a_mode in 0..3i32 {
                    for n_halves in [false, true] {
                        let seed = k as u64 * 16 + b_mn_major as u64 * 8 + a_mode as u64 * 2;
                        let modes = (b_mn_major, a_mode, Some(n_halves));
                        probe(&dev, (64, k), modes, seed + n_halves as u64);
                    }
                }
            }
        }
    }
}

/// N = 128 (`wgmma_probe_m64n128`): K-major B over two 8 KB row blocks per 64 k, MN-major B over
/// two 64-column halves (the descriptor's leading byte offset), A from shared memory or registers.
#[test]
fn wgmma_n128_tile_matches_reference() {
    for dev in devices() {
        for k in [64usize, 128] {
            for b_mn_major in [false, true] {
                for a_mode in 0..2i32 {
                    let seed = 1000 + k as u64 * 16 + b_mn_major as u64 * 8 + a_mode as u64;
                    probe(&dev, (128, k), (b_mn_major, a_mode, None), seed);
                }
            }
        }
    }
}

/// N = 192 (`wgmma_probe_m64n192`, the H7 forward's S at d = 64): both operands K-major in shared
/// memory, B over three 8 KB row blocks per 64 k.
#[test]
fn wgmma_n192_tile_matches_reference() {
    for dev in devices() {
        for k in [64usize, 128] {
            probe(&dev, (192, k), (false, 0, None), 2000 + k as u64);
        }
    }
}
