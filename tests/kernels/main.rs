//! Every CUDA kernel against its CPU twin (ARCHITECTURE.md rule 3): through the SIMT emulator
//! always, and on the GPU when one is present (else skipped with a message). Each check prints
//! one line: kernel, device, shape, max relative error. One module per kernel family.

mod adaln;
mod attention;
mod conv;
mod disc_head;
mod elementwise;
mod gemm;
mod optim;
mod qknorm;
mod rl;
mod sde;
mod shape;
mod wgmma;

use advdmd::device::kernel::{DevBuf, KernelDevice};
use advdmd::{Rng, Tensor};
use half::bf16;

/// The devices to check on: the emulator, plus the first GPU when one is usable.
/// `ADVDMD_KERNEL_TESTS_GPU_ONLY=1` leaves the emulator out (tools/gpu-check.sh under the
/// sanitizers, where only the GPU side is of interest).
pub fn devices() -> Vec<KernelDevice> {
    let gpu_only = std::env::var("ADVDMD_KERNEL_TESTS_GPU_ONLY").is_ok_and(|v| v == "1");
    let mut d = if gpu_only {
        vec![]
    } else {
        vec![KernelDevice::emulator()]
    };
    match KernelDevice::gpu_if_available() {
        Some(g) => d.push(g),
        None => {
            use std::sync::Once;
            static ONCE: Once = Once::new();
            ONCE.call_once(|| {
                eprintln!("kernels: no usable GPU here; GPU checks skipped (emulator only)")
            });
        }
    }
    d
}

/// Normal(0, std) values, rounded to bf16 so CPU and device see the same inputs.
pub fn randn_bf16(rng: &mut Rng, n: usize, std: f32) -> Vec<f32> {
    (0..n)
        .map(|_| bf16::from_f32(rng.normal() * std).to_f32())
        .collect()
}

pub fn to_bf16(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|&x| bf16::from_f32(x)).collect()
}

pub fn upload_bf16(dev: &KernelDevice, v: &[f32]) -> DevBuf<bf16> {
    dev.upload(&to_bf16(v)).expect("upload")
}

pub fn download_f32(dev: &KernelDevice, b: &DevBuf<bf16>) -> Vec<f32> {
    dev.download(b)
        .expect("download")
        .iter()
        .map(|x| x.to_f32())
        .collect()
}

/// max |a − b| / max(max |b|, floor): a relative error robust to near-zero elements.
pub fn max_rel_err(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len(), "length mismatch");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    let mut worst = 0f32;
    for (g, w) in got.iter().zip(want) {
        if !g.is_finite() {
            return f32::INFINITY;
        }
        worst = worst.max((g - w).abs() / scale);
    }
    worst
}

/// Checks and prints one comparison.
pub fn check(kernel: &str, dev: &KernelDevice, shape: &str, got: &[f32], want: &[f32], tol: f32) {
    let err = max_rel_err(got, want);
    println!(
        "kernel {kernel:<28} device {:<24} shape {shape:<18} max_rel_err {err:.3e}",
        dev.name()
    );
    assert!(
        err <= tol,
        "{kernel} on {} at {shape}: max relative error {err:e} > {tol:e}",
        dev.name()
    );
}

pub fn tensor(v: Vec<f32>, shape: &[usize]) -> Tensor {
    Tensor::from_vec(v, shape)
}
