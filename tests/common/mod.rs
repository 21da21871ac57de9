//! Shared test helpers: the finite-difference gradient check and random inputs.
#![allow(dead_code)]

pub mod parity;

use advdmd::autograd::{backward, no_grad};
use advdmd::{Rng, Tensor, Var};
use std::path::{Path, PathBuf};

/// The smallest AdvDMD run of the checkpoint-teacher tests: 2 prompts × group 2, K = 2, a
/// generator update every other iteration, RL from the start.
pub const TINY_RUN_FLAGS: [&str; 10] = [
    "--prompts",
    "2",
    "--group",
    "2",
    "--steps-per-sample",
    "2",
    "--r-dmd",
    "2",
    "--rl-warmup",
    "0",
];

/// Random normal tensor (deterministic per seed).
pub fn randn(shape: &[usize], seed: u64) -> Tensor {
    Tensor::randn(shape, &mut Rng::new(seed))
}

/// Random normal tensor with every |value| ≥ `gap` (keeps kinks such as LeakyReLU's away from
/// the finite-difference stencil).
pub fn randn_away_from_zero(shape: &[usize], seed: u64, gap: f32) -> Tensor {
    randn(shape, seed).map(|v| {
        if v.abs() < gap {
            v.signum() * gap + v
        } else {
            v
        }
    })
}

pub struct GradCheck {
    /// Finite-difference step.
    pub eps: f32,
    /// Allowed error relative to each entry.
    pub rtol: f64,
    /// Allowed error relative to the largest entry of that input's gradient.
    pub scale_tol: f64,
    /// At most this many entries per input are differenced (chosen at random), to bound time.
    pub max_entries: usize,
}

impl Default for GradCheck {
    fn default() -> Self {
        GradCheck {
            eps: 1e-2,
            rtol: 1e-2,
            scale_tol: 5e-3,
            max_entries: 400,
        }
    }
}

/// Checks the analytic gradients of `f` with respect to every input against central
/// differences of the scalar Σ_k ⟨out_k, R_k⟩ with fixed random R_k, computed in f64 from the f32
/// outputs. Panics with the worst entry on failure.
pub fn gradcheck(name: &str, inputs: &[Tensor], f: impl Fn(&[Var]) -> Vec<Var>) {
    GradCheck::default().run(name, inputs, f)
}

impl GradCheck {
    pub fn run(&self, name: &str, inputs: &[Tensor], f: impl Fn(&[Var]) -> Vec<Var>) {
        let vars: Vec<Var> = inputs.iter().cloned().map(Var::input).collect();
        let outs = f(&vars);
        let mut rng = Rng::new(0xC0FFEE);
        let seeds: Vec<Tensor> = outs
            .iter()
            .map(|o| Tensor::randn(o.shape(), &mut rng))
            .collect();
        let pairs: Vec<(&Var, Tensor)> = outs.iter().zip(seeds.iter().cloned()).collect();
        let grads = backward(&pairs);

        let objective = |xs: &[Tensor]| -> f64 {
            let _g = no_grad();
            let vs: Vec<Var> = xs.iter().cloned().map(Var::constant).collect();
            f(&vs)
                .iter()
                .zip(&seeds)
                .map(|(o, r)| {
                    o.value()
                        .f32s()
                        .iter()
                        .zip(r.f32s())
                        .map(|(&a, &b)| a as f64 * b as f64)
                        .sum::<f64>()
                })
                .sum()
        };

        for (i, x) in inputs.iter().enumerate() {
            let analytic = grads
                .get(&vars[i])
                .map(|g| g.to_vec())
                .unwrap_or_else(|| vec![0.0; x.numel()]);
            assert_eq!(analytic.len(), x.numel(), "{name}: input {i} gradient size");
            let mut entries: Vec<usize> = (0..x.numel()).collect();
            if entries.len() > self.max_entries {
                let mut r = Rng::new(i as u64 + 17);
                for j in 0..self.max_entries {
                    let k = j + r.below((entries.len() - j) as u64) as usize;
                    entries.swap(j, k);
                }
                entries.truncate(self.max_entries);
            }
            let mut numeric = Vec::with_capacity(entries.len());
            for &e in &entries {
                let mut plus = x.to_vec();
                plus[e] += self.eps;
                let mut minus = x.to_vec();
                minus[e] -= self.eps;
                let with = |v: Vec<f32>| {
                    let mut xs = inputs.to_vec();
                    xs[i] = Tensor::from_vec(v, x.shape());
                    objective(&xs)
                };
                numeric.push((with(plus) - with(minus)) / (2.0 * self.eps as f64));
            }
            let scale = numeric
                .iter()
                .map(|v| v.abs())
                .chain(entries.iter().map(|&e| analytic[e].abs() as f64))
                .fold(0.0, f64::max);
            let mut worst = (0.0f64, 0usize, 0.0f64, 0.0f64);
            for (&e, &n) in entries.iter().zip(&numeric) {
                let a = analytic[e] as f64;
                let allowed = self.rtol * n.abs() + self.scale_tol * scale + 1e-5;
                let ratio = (a - n).abs() / allowed;
                if ratio > worst.0 {
                    worst = (ratio, e, a, n);
                }
            }
            println!(
                "{name}: input {i} {:?}: {} entries, grad scale {scale:.3e}, worst error/allowed {:.3}",
                x.shape(),
                entries.len(),
                worst.0
            );
            assert!(
                worst.0 <= 1.0,
                "{name}: input {i} {:?} entry {}: analytic {:.6e} vs numeric {:.6e} (scale {scale:.3e})",
                x.shape(),
                worst.1,
                worst.2,
                worst.3
            );
        }
    }
}

/// Asserts two float slices agree within `atol + rtol·|reference|` entrywise.
pub fn assert_close(name: &str, got: &[f32], reference: &[f32], atol: f32, rtol: f32) {
    assert_eq!(got.len(), reference.len(), "{name}: lengths differ");
    for (i, (g, r)) in got.iter().zip(reference).enumerate() {
        assert!(
            (g - r).abs() <= atol + rtol * r.abs(),
            "{name}: entry {i}: got {g}, reference {r}"
        );
    }
}

/// The sizes of the tiny Shapes model the training tests use.
pub fn tiny_shapes_size() -> advdmd::train::shapes_model::ShapesModelSize {
    advdmd::train::shapes_model::ShapesModelSize {
        hidden: 32,
        depth: 2,
        head_dim: 16,
        text_dim: 32,
        text_layers: 1,
        text_heads: 2,
    }
}

/// A fresh tiny Shapes model. adaLN-Zero starts every block as the identity and the output at
/// zero; `awake` gives the modulations and the final layer small random weights so the network
/// and its gradients are not trivially zero.
pub fn tiny_shapes_model(seed: u64, awake: bool) -> advdmd::train::shapes_model::ShapesModel {
    let words = advdmd::data::shapes::vocabulary();
    let m = advdmd::train::shapes_model::ShapesModel::init(
        &tiny_shapes_size(),
        &words,
        &mut Rng::new(seed),
    )
    .unwrap();
    if awake {
        for (name, p) in m.mmdit.params.iter() {
            if name.contains("adaLN") || name.starts_with("final_layer") {
                let t = Tensor::randn(p.value().shape(), &mut Rng::new(name.len() as u64));
                p.set_value(t.map(|v| 0.05 * v));
            }
        }
    }
    m
}

/// The MMDiT fixture folders: `MMDIT_FIXTURES` (`:`-separated; tools/gpu-check.sh carries them to
/// the GPU machine), else every folder of `../shared/fixtures/mmdit/` with a
/// `forward_backward.safetensors` (a new folder of the same format needs no code).
pub fn fixture_dirs() -> Vec<PathBuf> {
    if let Ok(list) = std::env::var("MMDIT_FIXTURES") {
        return list
            .split(':')
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
            .collect();
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/mmdit");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("fixtures {}: {e} (set MMDIT_FIXTURES)", root.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("forward_backward.safetensors").is_file())
        .collect();
    dirs.sort();
    assert!(!dirs.is_empty(), "no fixtures in {}", root.display());
    dirs
}

/// The devices the device-path tests run on: the emulator, plus the GPU when one is usable;
/// with a GPU and `ADVDMD_KERNEL_TESTS_GPU_ONLY=1` (tools/gpu-check.sh) the GPU alone. `what`
/// names the test file in the message printed when there is no GPU.
pub fn kernel_devices(what: &str) -> Vec<advdmd::device::kernel::KernelDevice> {
    use advdmd::device::kernel::KernelDevice;
    let gpu_only = std::env::var("ADVDMD_KERNEL_TESTS_GPU_ONLY").is_ok_and(|v| v == "1");
    match KernelDevice::gpu_if_available() {
        Some(g) if gpu_only => vec![g],
        Some(g) => vec![KernelDevice::emulator(), g],
        None => {
            eprintln!("{what}: no usable GPU here; GPU checks skipped (emulator only)");
            vec![KernelDevice::emulator()]
        }
    }
}

/// A fresh folder under the system's temporary folder, removed when dropped — kept, and its path
/// printed, when the test is failing, so a failure can be looked at. Tests run in parallel in one
/// process, so the name carries the pid and a per-process count.
pub struct ScratchDir(PathBuf);

impl ScratchDir {
    pub fn new(name: &str) -> ScratchDir {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("advdmd-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        ScratchDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl std::ops::Deref for ScratchDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for ScratchDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<std::ffi::OsStr> for ScratchDir {
    fn as_ref(&self) -> &std::ffi::OsStr {
        self.0.as_os_str()
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("test failed: its files are kept in {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
