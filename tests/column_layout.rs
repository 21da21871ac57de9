//! The two thread layouts of the 16-byte column kernels (cuda/column_lanes.cuh) (`ColumnLayout`: row lanes, the
//! default, and one lane, kept for the kernels bench's A/B) give the same column sums up to f32
//! rounding and the same elementwise outputs bit for bit. A test binary of its own because
//! `set_column_layout` is process-wide and tests/kernels compares launches bit for bit.

use advdmd::device::kernel::{DevBuf, KernelDevice};
use advdmd::kernels::adaln::dev::{self as gpu, ColumnLayout};
use advdmd::kernels::elementwise::dev as ew;
use advdmd::Rng;
use half::bf16;

/// Everything one layout computes from the same inputs.
struct Outputs {
    bias_grad: Vec<f32>,
    dgate: Vec<f32>,
    dy: Vec<bf16>,
    dx: Vec<bf16>,
    dshift: Vec<f32>,
    dscale: Vec<f32>,
    colsum: Vec<f32>,
    gelu_dx: Vec<bf16>,
    gelu_bias: Vec<f32>,
}

struct Inputs {
    x: DevBuf<bf16>,
    dz: DevBuf<bf16>,
    modulation: DevBuf<bf16>,
    mean: DevBuf<f32>,
    rstd: DevBuf<f32>,
}

fn inputs(dev: &KernelDevice, rng: &mut Rng, (b, l, d): (usize, usize, usize)) -> Inputs {
    let mut bf = |n: usize| -> Vec<bf16> { (0..n).map(|_| bf16::from_f32(rng.normal())).collect() };
    let (x, dz, modulation) = (bf(b * l * d), bf(b * l * d), bf(b * d));
    let mean: Vec<f32> = (0..b * l).map(|r| (r % 7) as f32 * 0.1 - 0.3).collect();
    let rstd: Vec<f32> = (0..b * l).map(|r| 0.5 + (r % 5) as f32 * 0.25).collect();
    Inputs {
        x: dev.upload(&x).unwrap(),
        dz: dev.upload(&dz).unwrap(),
        modulation: dev.upload(&modulation).unwrap(),
        mean: dev.upload(&mean).unwrap(),
        rstd: dev.upload(&rstd).unwrap(),
    }
}

fn run(dev: &KernelDevice, t: &Inputs, dims: (usize, usize, usize)) -> Outputs {
    let (b, l, d) = dims;
    let bias = dev.zeros::<f32>(d).unwrap();
    let (dgate, dy) =
        gpu::gated_residual_bwd_bias(dev, (&t.modulation, d), &t.x, &t.dz, dims, &bias).unwrap();
    let (dx, dshift, dscale) =
        gpu::adaln_modulate_bwd(dev, &t.x, &t.modulation, &t.mean, &t.rstd, &t.dz, dims).unwrap();
    let colsum = dev.zeros::<f32>(d).unwrap();
    gpu::colsum_acc(dev, &t.dz, (b * l, d), &colsum).unwrap();
    let (gelu_dx, gelu_bias) = (
        dev.alloc::<bf16>(b * l * d).unwrap(),
        dev.zeros::<f32>(d).unwrap(),
    );
    ew::gelu_tanh_bwd_colsum(dev, &gelu_dx, &t.x, &t.dz, (b * l, d), &gelu_bias).unwrap();
    Outputs {
        bias_grad: dev.download(&bias).unwrap(),
        dgate: dev.download(&dgate).unwrap(),
        dy: dev.download(&dy).unwrap(),
        dx: dev.download(&dx).unwrap(),
        dshift: dev.download(&dshift).unwrap(),
        dscale: dev.download(&dscale).unwrap(),
        colsum: dev.download(&colsum).unwrap(),
        gelu_dx: dev.download(&gelu_dx).unwrap(),
        gelu_bias: dev.download(&gelu_bias).unwrap(),
    }
}

/// max |a − b| over max |b|.
fn rel_err(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
    got.iter()
        .zip(want)
        .fold(0f32, |m, (g, w)| m.max((g - w).abs() / scale))
}

#[test]
fn one_lane_and_row_lane_layouts_agree() {
    let mut devs = vec![KernelDevice::emulator()];
    match KernelDevice::gpu_if_available() {
        Some(g) => devs.push(g),
        None => eprintln!("column_layout: no usable GPU here; GPU check skipped (emulator only)"),
    }
    let mut rng = Rng::new(7);
    // many one-row splits against a few of 24 rows; a partial last split; a partial pack block
    for dims in [(2, 70, 64), (1, 333, 24), (1, 40, 2056)] {
        for dev in &devs {
            let t = inputs(dev, &mut rng, dims);
            gpu::set_column_layout(ColumnLayout::OneLane);
            let one = run(dev, &t, dims);
            gpu::set_column_layout(ColumnLayout::RowLanes);
            let lanes = run(dev, &t, dims);
            assert_eq!(one.dy, lanes.dy, "dy at {dims:?} on {}", dev.name());
            assert_eq!(one.dx, lanes.dx, "dx at {dims:?} on {}", dev.name());
            assert_eq!(
                one.gelu_dx,
                lanes.gelu_dx,
                "GELU dx at {dims:?} on {}",
                dev.name()
            );
            for (what, a, b) in [
                ("bias_grad", &one.bias_grad, &lanes.bias_grad),
                ("dgate", &one.dgate, &lanes.dgate),
                ("dshift", &one.dshift, &lanes.dshift),
                ("dscale", &one.dscale, &lanes.dscale),
                ("colsum", &one.colsum, &lanes.colsum),
                ("gelu_bias", &one.gelu_bias, &lanes.gelu_bias),
            ] {
                let err = rel_err(a, b);
                println!(
                    "{what:<10} {dims:?} on {}: max rel err {err:.2e}",
                    dev.name()
                );
                assert!(err <= 1e-5, "{what} at {dims:?} on {}: {err:e}", dev.name());
            }
        }
    }
}
