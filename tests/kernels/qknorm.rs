//! cuda/qknorm.cu ↔ src/kernels/qknorm.rs.

use super::*;
use advdmd::kernels::qknorm::{self as cpu, dev as gpu};

/// (rows, head dim): the register path with 4, 8, 16 and 32 lanes per row, the forward's two
/// vectors per lane (320), widths that are not a multiple of 8 (37, 1000 → scalar path), and row
/// counts that are not multiples of the rows per block.
const SHAPES: &[(usize, usize)] = &[
    (1, 64),
    (7, 64),
    (300, 64),
    (33, 128),
    (2, 24),
    (19, 256),
    (3, 320),
    (5, 37),
    (4, 1000),
];

#[test]
fn rms_norm_fwd_and_bwd_match_cpu() {
    for dev in devices() {
        for &(rows, d) in SHAPES {
            let mut rng = Rng::new(31 + d as u64 + rows as u64);
            let x = randn_bf16(&mut rng, rows * d, 1.5);
            let w: Vec<f32> = randn_bf16(&mut rng, d, 0.3)
                .iter()
                .map(|v| bf16::from_f32(1.0 + v).to_f32())
                .collect();
            let dy = randn_bf16(&mut rng, rows * d, 1.0);
            let shape = format!("{rows}x{d}");
            let (xd, wd, dyd) = (
                upload_bf16(&dev, &x),
                upload_bf16(&dev, &w),
                upload_bf16(&dev, &dy),
            );

            let (y, rstd) = gpu::rms_norm_fwd(&dev, &xd, &wd, (rows, d), 1e-6).unwrap();
            let (xt, wt) = (tensor(x.clone(), &[rows, d]), tensor(w.clone(), &[d]));
            let (yc, rstd_c) = cpu::rms_norm_fwd(&xt, &wt, 1e-6);
            check(
                "rms_norm_fwd",
                &dev,
                &shape,
                &download_f32(&dev, &y),
                yc.f32s(),
                1e-2,
            );
            check(
                "rms_norm_fwd.rstd",
                &dev,
                &shape,
                &dev.download(&rstd).unwrap(),
                &rstd_c,
                1e-5,
            );

            let (dxc, dwc) = cpu::rms_norm_bwd(&xt, &wt, &rstd_c, &tensor(dy.clone(), &[rows, d]));
            let (dx, dw) = gpu::rms_norm_bwd(&dev, &xd, &wd, &rstd, &dyd, (rows, d)).unwrap();
            check(
                "rms_norm_bwd.dx",
                &dev,
                &shape,
                &download_f32(&dev, &dx),
                dxc.f32s(),
                1e-2,
            );
            check(
                "rms_norm_bwd.dweight",
                &dev,
                &shape,
                &dev.download(&dw).unwrap(),
                dwc.f32s(),
                1e-4,
            );

            // Three partial rows: every block walks the rows several times (the large-batch case).
            let dx3 = dev.alloc::<bf16>(rows * d).unwrap();
            let dw3 = dev.alloc::<f32>(d).unwrap();
            gpu::rms_norm_bwd_into(&dev, &dx3, &dw3, &xd, &wd, &rstd, &dyd, (rows, d), 3).unwrap();
            check(
                "rms_norm_bwd.dx[3 parts]",
                &dev,
                &shape,
                &download_f32(&dev, &dx3),
                dxc.f32s(),
                1e-2,
            );
            check(
                "rms_norm_bwd.dweight[3 parts]",
                &dev,
                &shape,
                &dev.download(&dw3).unwrap(),
                dwc.f32s(),
                1e-4,
            );
        }
    }
}
