//! The two thread layouts of the 16-byte column kernels (cuda/column_lanes.cuh) (`ColumnLayout`:
//! row lanes, the default, and one lane) and the two ways of summing their partial rows
//! (`ColumnSums`: the kernel's last block of each column slice, the default, and a `sum_splits`
//! launch), both kept for the kernels bench's A/B, give the same column sums up to f32 rounding
//! and the same elementwise outputs bit for bit, and the kernels leave every ticket they took at
//! zero. The RMSNorm backward's weight gradient (cuda/qknorm.cu) and the modulation layers' input
//! gradient (`gemv_small_m_nn_partial`, cuda/small_gemm.cu) follow `ColumnSums` too, and so
//! does the ρ-step's per-sample log-probability (`sde_rho_step`, cuda/sde.cu). A
//! test binary of its own because `set_column_layout` and `set_column_sums` are process-wide and
//! tests/kernels compares launches bit for bit.

use advdmd::device::kernel::GemmSpec;
use advdmd::device::kernel::{DevBuf, KernelDevice};
use advdmd::kernels::adaln::dev::{self as gpu, ColumnLayout, ColumnSums};
use advdmd::kernels::elementwise::dev as ew;
use advdmd::kernels::gemm::dev::gemm_bf16_acc_f32;
use advdmd::kernels::qknorm::dev as qknorm;
use advdmd::kernels::sde::dev as sde;
use advdmd::Rng;
use half::bf16;

/// The modes are process-wide: the tests take turns.
static MODES: std::sync::Mutex<()> = std::sync::Mutex::new(());

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
    rms_dx: Vec<bf16>,
    rms_dw: Vec<f32>,
    /// q's and k's weight gradients of the paired backward (k's accumulating).
    rms_pair_dw: Vec<f32>,
    /// A modulation layer's input gradient added into f32 (`gemv_small_m_nn_partial`).
    gemv_acc: Vec<f32>,
    /// The ρ-step's next state and per-sample log-probabilities (`sde_rho_step`).
    rho_next: Vec<f32>,
    rho_log_prob: Vec<f64>,
}

struct Inputs {
    x: DevBuf<bf16>,
    dz: DevBuf<bf16>,
    modulation: DevBuf<bf16>,
    mean: DevBuf<f32>,
    rstd: DevBuf<f32>,
    /// `[rows, 2·d]`: q and k side by side, as the paired RMSNorm reads them.
    qk: DevBuf<bf16>,
    /// The ρ-step's state, velocity and noise, f32 `[b, l·d]`.
    sde: [DevBuf<f32>; 3],
}

fn inputs(dev: &KernelDevice, rng: &mut Rng, (b, l, d): (usize, usize, usize)) -> Inputs {
    let mut bf = |n: usize| -> Vec<bf16> { (0..n).map(|_| bf16::from_f32(rng.normal())).collect() };
    let (x, dz, modulation) = (bf(b * l * d), bf(b * l * d), bf(b * d));
    let qk = bf(2 * b * l * d);
    let sde = [0, 1, 2].map(|_| (0..b * l * d).map(|_| rng.normal()).collect::<Vec<f32>>());
    let mean: Vec<f32> = (0..b * l).map(|r| (r % 7) as f32 * 0.1 - 0.3).collect();
    let rstd: Vec<f32> = (0..b * l).map(|r| 0.5 + (r % 5) as f32 * 0.25).collect();
    Inputs {
        x: dev.upload(&x).unwrap(),
        dz: dev.upload(&dz).unwrap(),
        modulation: dev.upload(&modulation).unwrap(),
        mean: dev.upload(&mean).unwrap(),
        rstd: dev.upload(&rstd).unwrap(),
        qk: dev.upload(&qk).unwrap(),
        sde: sde.map(|v| dev.upload(&v).unwrap()),
    }
}

fn run(dev: &KernelDevice, t: &Inputs, dims: (usize, usize, usize)) -> Outputs {
    let (b, l, d) = dims;
    // the accumulating sums start from values of their own, so that adding is checked too
    let start: Vec<f32> = (0..d).map(|j| 0.25 + j as f32 * 0.5).collect();
    let bias = dev.upload(&start).unwrap();
    let (dgate, dy) =
        gpu::gated_residual_bwd_bias(dev, (&t.modulation, d), &t.x, &t.dz, dims, &bias).unwrap();
    let (dx, dshift, dscale) =
        gpu::adaln_modulate_bwd(dev, &t.x, &t.modulation, &t.mean, &t.rstd, &t.dz, dims).unwrap();
    let colsum = dev.upload(&start).unwrap();
    gpu::colsum_acc(dev, &t.dz, (b * l, d), &colsum).unwrap();
    let (gelu_dx, gelu_bias) = (
        dev.alloc::<bf16>(b * l * d).unwrap(),
        dev.upload(&start).unwrap(),
    );
    ew::gelu_tanh_bwd_colsum(dev, &gelu_dx, &t.x, &t.dz, (b * l, d), &gelu_bias).unwrap();
    let rows = b * l;
    let w = t.modulation.view(0, d).unwrap();
    let (rms_dx, rms_dw) = (dev.alloc::<bf16>(rows * d).unwrap(), dev.alloc(d).unwrap());
    let max_parts = qknorm::MAX_PARTS;
    qknorm::rms_norm_bwd_into(
        dev,
        &rms_dx,
        &rms_dw,
        &t.x,
        &w,
        &t.rstd,
        &t.dz,
        (rows, d),
        max_parts,
    )
    .unwrap();
    let laid = |off| qknorm::RowLayout {
        heads: 1,
        ld: 2 * d,
        off,
    };
    let qk_dx = dev.alloc::<bf16>(2 * rows * d).unwrap();
    let (dq, dk) = (dev.alloc::<f32>(d).unwrap(), dev.upload(&start).unwrap());
    qknorm::rms_norm_bwd_laid_pair(
        dev,
        &qk_dx,
        &t.qk,
        [laid(0), laid(d)],
        [&w, &w],
        [&t.rstd, &t.rstd],
        [&t.dz, &t.dz],
        (rows, d),
        Some([(&dq, false), (&dk, true)]),
    )
    .unwrap();
    let mut rms_pair_dw = dev.download(&dq).unwrap();
    rms_pair_dw.extend(dev.download(&dk).unwrap());
    // [2, l]·[l, d] added into [2, d]
    let gemv_acc = dev
        .upload(&[start.clone(), start.clone()].concat())
        .unwrap();
    let (a, w) = (t.dz.view(0, 2 * l).unwrap(), t.x.view(0, l * d).unwrap());
    gemm_bf16_acc_f32(dev, GemmSpec::nn(2, d, l), &a, &w, &gemv_acc, None).unwrap();
    let (sigma, sigma_next) = (
        dev.upload(&vec![0.8f32; b]).unwrap(),
        dev.upload(&vec![0.55f32; b]).unwrap(),
    );
    let [sx, sv, sz] = &t.sde;
    let rho = sde::rho_step(
        dev,
        sx,
        sv,
        sde::NextState::Sample(sz),
        &sigma,
        &sigma_next,
        0.7,
        (b, l * d),
    )
    .unwrap();
    Outputs {
        rho_next: dev.download(rho.next.as_ref().unwrap()).unwrap(),
        rho_log_prob: dev.download(&rho.log_prob).unwrap(),
        bias_grad: dev.download(&bias).unwrap(),
        dgate: dev.download(&dgate).unwrap(),
        dy: dev.download(&dy).unwrap(),
        dx: dev.download(&dx).unwrap(),
        dshift: dev.download(&dshift).unwrap(),
        dscale: dev.download(&dscale).unwrap(),
        colsum: dev.download(&colsum).unwrap(),
        gelu_dx: dev.download(&gelu_dx).unwrap(),
        gelu_bias: dev.download(&gelu_bias).unwrap(),
        rms_dx: dev.download(&rms_dx).unwrap(),
        rms_dw: dev.download(&rms_dw).unwrap(),
        rms_pair_dw,
        gemv_acc: dev.download(&gemv_acc).unwrap(),
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
fn column_layouts_and_column_sums_agree() {
    let _turn = MODES.lock().unwrap_or_else(|e| e.into_inner());
    let mut devs = vec![KernelDevice::emulator()];
    match KernelDevice::gpu_if_available() {
        Some(g) => devs.push(g),
        None => eprintln!("column_layout: no usable GPU here; GPU check skipped (emulator only)"),
    }
    let mut rng = Rng::new(7);
    let modes = [
        (ColumnLayout::RowLanes, ColumnSums::InKernel),
        (ColumnLayout::RowLanes, ColumnSums::SumSplits),
        (ColumnLayout::OneLane, ColumnSums::InKernel),
    ];
    // many one-row splits against a few of 24 rows; a partial last split; a partial pack block
    // and 9 column slices
    for dims in [(2, 70, 64), (1, 333, 24), (1, 40, 2056)] {
        for dev in &devs {
            let t = inputs(dev, &mut rng, dims);
            gpu::set_column_layout(ColumnLayout::OneLane);
            gpu::set_column_sums(ColumnSums::SumSplits);
            let base = run(dev, &t, dims);
            for (layout, sums) in modes {
                gpu::set_column_layout(layout);
                gpu::set_column_sums(sums);
                let got = run(dev, &t, dims);
                let mode = format!("{layout:?}, {sums:?}, at {dims:?} on {}", dev.name());
                assert_eq!(base.dy, got.dy, "dy, {mode}");
                assert_eq!(base.dx, got.dx, "dx, {mode}");
                assert_eq!(base.gelu_dx, got.gelu_dx, "GELU dx, {mode}");
                assert_eq!(base.rms_dx, got.rms_dx, "RMSNorm dx, {mode}");
                assert_eq!(base.rho_next, got.rho_next, "ρ-step next state, {mode}");
                // the same f64 sum of the same partials, in the kernel or after it
                assert_eq!(
                    base.rho_log_prob, got.rho_log_prob,
                    "ρ-step log-probabilities, {mode}"
                );
                for (what, a, b) in [
                    ("bias_grad", &got.bias_grad, &base.bias_grad),
                    ("dgate", &got.dgate, &base.dgate),
                    ("dshift", &got.dshift, &base.dshift),
                    ("dscale", &got.dscale, &base.dscale),
                    ("colsum", &got.colsum, &base.colsum),
                    ("gelu_bias", &got.gelu_bias, &base.gelu_bias),
                    ("rms_dw", &got.rms_dw, &base.rms_dw),
                    ("rms_pair_dw", &got.rms_pair_dw, &base.rms_pair_dw),
                    ("gemv_acc", &got.gemv_acc, &base.gemv_acc),
                ] {
                    let err = rel_err(a, b);
                    println!("{what:<10} {mode}: max rel err {err:.2e}");
                    assert!(err <= 1e-5, "{what}, {mode}: {err:e}");
                }
            }
            gpu::set_column_layout(ColumnLayout::RowLanes);
            gpu::set_column_sums(ColumnSums::InKernel);
            let counts = dev.column_ticket_counts().unwrap();
            let held = counts.iter().filter(|&&c| c != 0).count();
            assert_eq!(
                held,
                0,
                "{held} column tickets left nonzero on {}",
                dev.name()
            );
        }
    }
}

/// A launch takes the ring's next tickets, wrapping to its start: past its end, the sums stay
/// right (every ticket was left at zero by the launch before that held it).
#[test]
fn column_tickets_wrap_round_the_ring() {
    let _turn = MODES.lock().unwrap_or_else(|e| e.into_inner());
    gpu::set_column_layout(ColumnLayout::RowLanes);
    gpu::set_column_sums(ColumnSums::InKernel);
    let dev = KernelDevice::emulator();
    let mut rng = Rng::new(11);
    let (rows, d) = (40, 8 * 32 * 16);
    let a: Vec<bf16> = (0..rows * d)
        .map(|_| bf16::from_f32(rng.normal()))
        .collect();
    let want: Vec<f32> = (0..d)
        .map(|j| (0..rows).map(|r| a[r * d + j].to_f32()).sum())
        .collect();
    let a = dev.upload(&a).unwrap();
    // 16 column slices a launch: the 16384-ticket ring wraps after 1024 launches
    let ring = dev.column_ticket_counts().unwrap().len();
    let launches = ring / 16 + 3;
    for i in 0..launches {
        let out = dev.zeros::<f32>(d).unwrap();
        gpu::colsum_acc(&dev, &a, (rows, d), &out).unwrap();
        if i % 257 == 0 || i + 3 >= launches {
            let got = dev.download(&out).unwrap();
            let err = rel_err(&got, &want);
            assert!(err <= 1e-5, "launch {i}: max rel err {err:e}");
        }
    }
    let counts = dev.column_ticket_counts().unwrap();
    assert!(counts.iter().all(|&c| c == 0), "tickets left nonzero");
}
