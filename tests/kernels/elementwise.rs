//! cuda/elementwise.cu ↔ src/kernels/elementwise.rs (activations) and half::bf16 (casts).

use super::*;
use advdmd::kernels::elementwise::{self as cpu, dev as gpu, Activation};

/// Lengths: below one vector, exactly one, and with every tail length 1..7 after full vectors.
const LENS: &[usize] = &[1, 7, 8, 1000, 4099, 70_001];

/// Inputs over the whole useful range plus the saturated tails (no NaN may come out).
fn inputs(rng: &mut Rng, n: usize) -> Vec<f32> {
    let mut x = randn_bf16(rng, n, 3.0);
    for (i, v) in [-100.0, 100.0, -20.0, 20.0, 0.0, -1e-3, 1e-3]
        .iter()
        .enumerate()
    {
        if i < n {
            x[(i * 7919) % n] = bf16::from_f32(*v).to_f32();
        }
    }
    x
}

/// Per element: |got − want| ≤ |want|/128 + 1e-4 — one bf16 rounding of the f32 result (at most
/// half an ulp, 2⁻⁸ relative) plus the f32 difference between expf and the CPU's fast_exp.
fn check_each(kernel: &str, dev: &KernelDevice, shape: &str, got: &[f32], want: &[f32]) {
    check(kernel, dev, shape, got, want, 1e-2);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= w.abs() / 128.0 + 1e-4,
            "{kernel} on {} at {shape}: element {i}: {g} vs {w}",
            dev.name()
        );
    }
}

#[test]
fn activations_match_cpu() {
    for dev in devices() {
        for &n in LENS {
            for act in [Activation::GeluTanh, Activation::Silu] {
                let mut rng = Rng::new(11 + n as u64);
                let x = inputs(&mut rng, n);
                let dy = randn_bf16(&mut rng, n, 1.0);
                let (xd, dyd) = (upload_bf16(&dev, &x), upload_bf16(&dev, &dy));
                let shape = format!("{n}");
                let name = match act {
                    Activation::GeluTanh => "gelu_tanh",
                    _ => "silu",
                };
                let y = gpu::activation_fwd(&dev, &xd, act).unwrap();
                let yc = cpu::activation_fwd(&tensor(x.clone(), &[n]), act);
                check_each(
                    &format!("{name}_fwd"),
                    &dev,
                    &shape,
                    &download_f32(&dev, &y),
                    yc.f32s(),
                );
                let dx = gpu::activation_bwd(&dev, &xd, &dyd, act).unwrap();
                let dxc = cpu::activation_bwd(&tensor(x, &[n]), &tensor(dy, &[n]), act);
                check_each(
                    &format!("{name}_bwd"),
                    &dev,
                    &shape,
                    &download_f32(&dev, &dx),
                    dxc.f32s(),
                );
            }
        }
        let x = upload_bf16(&dev, &[1.0, 2.0]);
        assert!(gpu::activation_fwd(&dev, &x, Activation::Softplus).is_err());
    }
}

/// GELU's backward over [M, N] rows with the column sums of its (bf16) result added into an f32
/// bias gradient: the one-pass kernel (N % 8 == 0, more rows than splits too) and the two-kernel
/// path (N = 37), against the CPU twin.
#[test]
fn gelu_bwd_with_column_sums_matches_cpu() {
    for dev in devices() {
        for (m, n) in [(7, 24), (5, 37), (300, 64), (33, 1536)] {
            let mut rng = Rng::new(31 + (m * n) as u64);
            let x = inputs(&mut rng, m * n);
            let dy = randn_bf16(&mut rng, m * n, 1.0);
            let old: Vec<f32> = (0..n).map(|j| j as f32 * 0.5 - 3.0).collect();
            let (xd, dyd, gd) = (
                upload_bf16(&dev, &x),
                upload_bf16(&dev, &dy),
                dev.upload(&old).unwrap(),
            );
            let dx = dev.alloc(m * n).unwrap();
            gpu::gelu_tanh_bwd_colsum(&dev, &dx, &xd, &dyd, (m, n), &gd).unwrap();
            let want = cpu::activation_bwd(
                &tensor(x, &[m * n]),
                &tensor(dy, &[m * n]),
                Activation::GeluTanh,
            );
            let got = download_f32(&dev, &dx);
            let shape = format!("{m}x{n}");
            check_each("gelu_tanh_bwd_colsum.dx", &dev, &shape, &got, want.f32s());
            // the sums of what was stored, to f32 accuracy
            let mut sums: Vec<f64> = old.iter().map(|&v| v as f64).collect();
            got.iter()
                .enumerate()
                .for_each(|(i, &v)| sums[i % n] += v as f64);
            let sums: Vec<f32> = sums.iter().map(|&v| v as f32).collect();
            check(
                "gelu_tanh_bwd_colsum.bias_grad",
                &dev,
                &shape,
                &dev.download(&gd).unwrap(),
                &sums,
                1e-5,
            );
        }
    }
}

#[test]
fn casts_are_exact() {
    for dev in devices() {
        for &n in LENS {
            let mut rng = Rng::new(23 + n as u64);
            let mut x: Vec<f32> = (0..n).map(|_| rng.normal() * 10.0).collect();
            // Ties (round to even), a subnormal, overflow to infinity, signed zero.
            let special = [
                1.0 + 1.0 / 256.0,
                1.0 + 3.0 / 256.0,
                1e-40,
                3.4e38,
                -0.0,
                f32::INFINITY,
            ];
            for (i, v) in special.iter().enumerate() {
                if i < n {
                    x[(i * 104_729) % n] = *v;
                }
            }
            let shape = format!("{n}");
            let xd = dev.upload(&x).unwrap();
            let got: Vec<u16> = dev
                .download(&gpu::cast_f32_to_bf16(&dev, &xd).unwrap())
                .unwrap()
                .iter()
                .map(|b| b.to_bits())
                .collect();
            let want: Vec<u16> = x.iter().map(|&v| bf16::from_f32(v).to_bits()).collect();
            let bad = got.iter().zip(&want).filter(|(a, b)| a != b).count();
            println!(
                "kernel {:<28} device {:<24} shape {shape:<18} mismatched_bits {bad}",
                "cast_f32_to_bf16",
                dev.name()
            );
            assert_eq!(got, want, "cast_f32_to_bf16 on {} at {shape}", dev.name());

            let xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
            let back = dev
                .download(&gpu::cast_bf16_to_f32(&dev, &dev.upload(&xb).unwrap()).unwrap())
                .unwrap();
            let want: Vec<u32> = xb.iter().map(|b| b.to_f32().to_bits()).collect();
            let got: Vec<u32> = back.iter().map(|v| v.to_bits()).collect();
            let bad = got.iter().zip(&want).filter(|(a, b)| a != b).count();
            println!(
                "kernel {:<28} device {:<24} shape {shape:<18} mismatched_bits {bad}",
                "cast_bf16_to_f32",
                dev.name()
            );
            assert_eq!(got, want, "cast_bf16_to_f32 on {} at {shape}", dev.name());
        }
    }
}

#[test]
fn copy_bytes_copies() {
    for dev in devices() {
        for n in [1usize, 15, 16, 37, 100_003] {
            let src: Vec<u8> = (0..n).map(|i| (i * 31 % 251) as u8).collect();
            let (s, d) = (dev.upload(&src).unwrap(), dev.alloc::<u8>(n).unwrap());
            gpu::copy(&dev, &d, &s).unwrap();
            let got = dev.download(&d).unwrap();
            println!(
                "kernel {:<28} device {:<24} shape {n:<18} exact {}",
                "copy_bytes",
                dev.name(),
                got == src
            );
            assert_eq!(got, src, "copy_bytes on {} at {n}", dev.name());
        }
    }
}
