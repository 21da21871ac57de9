//! The AdvDMD trainer's per-sample arithmetic between model calls, as the device does it
//! (`cuda/rl.cu`) so that an iteration reads nothing back before its end: the discriminator
//! losses' logit gradients, the rewards' returns-to-go with their group-normalised advantages,
//! and the clipped policy objective's gradient (ALGORITHM.md §4.3–§4.5).
//!
//! These CPU functions are the twins of `cuda/rl.cu`. They mirror — rather than call, since
//! `kernels` sits below `train` — `train::losses::{returns_to_go, group_advantages, ppo_loss}` and
//! the logit gradients the trainer seeds; tests/kernels/rl.rs checks that all three agree.

use crate::kernels::elementwise::sigmoid;

/// `dl[i] = scale·sign·sigmoid(sign·l[i])`: the gradient of `scale·softplus(sign·l)`.
pub fn logit_grads(logits: &[f32], sign: f32, scale: f32) -> Vec<f32> {
    logits
        .iter()
        .map(|&l| scale * sign * sigmoid(sign * l))
        .collect()
}

/// The advantages `[K−1][n]` of every stochastic transition from the discriminator's logits at
/// states 1..K (`logits[j·n + i]`: sample i at state j+1): rewards clamped to ±`reward_clip`,
/// returns-to-go, normalised within groups of `group` consecutive samples, clamped to ±`adv_clip`.
pub fn advantages(
    logits: &[f32],
    n: usize,
    k: usize,
    group: usize,
    reward_clip: f32,
    adv_clip: f32,
) -> Vec<f32> {
    assert!(
        k >= 2 && group > 0 && n % group == 0 && logits.len() == n * k,
        "advantages: {} logits for {n} samples, {k} states, groups of {group}",
        logits.len()
    );
    let reward = |i: usize, j: usize| logits[j * n + i].clamp(-reward_clip, reward_clip);
    let mut adv = vec![0f32; (k - 1) * n];
    for t in 0..k - 1 {
        let ret: Vec<f32> = (0..n)
            .map(|i| (t..k).map(|j| reward(i, j) as f64).sum::<f64>() as f32)
            .collect();
        for (g, chunk) in ret.chunks(group).enumerate() {
            let len = chunk.len() as f64;
            let mean = chunk.iter().map(|&v| v as f64).sum::<f64>() / len;
            let var = chunk
                .iter()
                .map(|&v| {
                    let d = v as f64 - mean;
                    d * d
                })
                .sum::<f64>();
            let std = (var / len).sqrt();
            for (j, &v) in chunk.iter().enumerate() {
                let a = ((v as f64 - mean) / (std + 1e-4)) as f32;
                adv[t * n + g * group + j] = a.clamp(-adv_clip, adv_clip);
            }
        }
    }
    adv
}

/// The clipped policy objective of one transition and its gradient: `(coef, loss)` with
/// `coef[i] = share·∂loss/∂ℓ_i` (f32) and `loss = mean_i max(−A_i·r_i, −A_i·clip(r_i, 1±ε))`,
/// `r_i = exp(ℓ_i − ℓ_old,i)`.
pub fn ppo_grad(
    logp: &[f64],
    logp_old: &[f64],
    adv: &[f32],
    eps: f64,
    share: f64,
) -> (Vec<f32>, f64) {
    assert!(
        logp.len() == logp_old.len() && logp.len() == adv.len(),
        "ppo_grad: sizes differ"
    );
    let n = logp.len().max(1) as f64;
    let mut loss = 0.0;
    let coef = logp
        .iter()
        .zip(logp_old)
        .zip(adv)
        .map(|((l, lo), &a)| {
            let (a, r) = (a as f64, (l - lo).exp());
            let (unclipped, clipped) = (-a * r, -a * r.clamp(1.0 - eps, 1.0 + eps));
            loss += unclipped.max(clipped) / n;
            let g = if unclipped >= clipped {
                -a * r / n
            } else {
                0.0
            };
            (g * share) as f32
        })
        .collect();
    (coef, loss)
}

/// Launchers of `cuda/rl.cu` on a [`KernelDevice`] (a GPU, or the emulator in CI). They copy
/// nothing between host and device and allocate nothing, so a CUDA graph can record them; bad
/// sizes or parameters (those on which the twins' `clamp` would panic) are
/// [`KernelError::Invalid`].
pub mod dev {
    use crate::device::kernel::{
        blocks_for, DevBuf, KernelArgs, KernelDevice, KernelError, KernelResult, LaunchCfg,
    };

    const THREADS: u32 = 256;

    fn invalid(msg: String) -> KernelError {
        KernelError::Invalid(msg)
    }

    /// The kernels index with `int`.
    fn fits_i32(n: usize) -> bool {
        i32::try_from(n).is_ok()
    }

    /// `x ≥ 0` and not NaN: a clip bound `clamp(−x, x)` (or `1±x`) accepts.
    fn clip_ok(x: f64) -> bool {
        x >= 0.0
    }

    /// `dl = scale·sign·sigmoid(sign·logits)` (see [`super::logit_grads`]).
    pub fn logit_grads(
        dev: &KernelDevice,
        dl: &DevBuf<f32>,
        logits: &DevBuf<f32>,
        sign: f32,
        scale: f32,
    ) -> KernelResult<()> {
        let n = logits.len();
        if dl.len() != n || !fits_i32(n) {
            return Err(invalid(format!(
                "rl_logit_grads: {} gradients for {n} logits",
                dl.len()
            )));
        }
        if n == 0 {
            return Ok(());
        }
        dev.launch(
            "rl_logit_grads",
            LaunchCfg::linear(blocks_for(n, THREADS), THREADS),
            KernelArgs::new()
                .buf(dl)
                .buf(logits)
                .i32(n as i32)
                .f32(sign)
                .f32(scale),
        )
    }

    /// The advantages `adv [K−1][n]` from the logits `[K][n]` (see [`super::advantages`]).
    #[allow(clippy::too_many_arguments)]
    pub fn advantages(
        dev: &KernelDevice,
        adv: &DevBuf<f32>,
        logits: &DevBuf<f32>,
        n: usize,
        k: usize,
        group: usize,
        reward_clip: f32,
        adv_clip: f32,
    ) -> KernelResult<()> {
        if k < 2
            || group == 0
            || n % group != 0
            || n.checked_mul(k)
                .is_none_or(|nk| !fits_i32(nk) || logits.len() != nk)
            || adv.len() != (k - 1) * n
        {
            return Err(invalid(format!(
                "rl_advantages: {} logits, {} advantages for {n} samples, {k} states, groups of \
                 {group}",
                logits.len(),
                adv.len()
            )));
        }
        // f32::clamp's precondition (−clip ≤ clip, neither NaN)
        if !clip_ok(reward_clip as f64) || !clip_ok(adv_clip as f64) {
            return Err(invalid(format!(
                "rl_advantages: reward clip {reward_clip} and advantage clip {adv_clip} must be ≥ 0"
            )));
        }
        let pairs = (k - 1) * (n / group);
        dev.launch(
            "rl_advantages",
            LaunchCfg::linear(blocks_for(pairs, THREADS), THREADS),
            KernelArgs::new()
                .buf(adv)
                .buf(logits)
                .i32(n as i32)
                .i32(k as i32)
                .i32(group as i32)
                .f32(reward_clip)
                .f32(adv_clip),
        )
    }

    /// One transition's PPO gradient coefficients `coef [n]` and its loss `loss [1]` (see
    /// [`super::ppo_grad`]).
    #[allow(clippy::too_many_arguments)]
    pub fn ppo_grad(
        dev: &KernelDevice,
        coef: &DevBuf<f32>,
        loss: &DevBuf<f64>,
        logp: &DevBuf<f64>,
        logp_old: &DevBuf<f64>,
        adv: &DevBuf<f32>,
        eps: f64,
        share: f64,
    ) -> KernelResult<()> {
        let n = logp.len();
        if coef.len() != n
            || logp_old.len() != n
            || adv.len() != n
            || loss.len() != 1
            || !fits_i32(n)
        {
            return Err(invalid(format!(
                "rl_ppo_grad: {n} log-probs, {} old, {} advantages, {} coefficients, {} losses",
                logp_old.len(),
                adv.len(),
                coef.len(),
                loss.len()
            )));
        }
        // f64::clamp's precondition (1−ε ≤ 1+ε, neither NaN)
        if !clip_ok(eps) {
            return Err(invalid(format!("rl_ppo_grad: clip ε {eps} must be ≥ 0")));
        }
        // n = 0 still launches: the loss is written (0).
        dev.launch(
            "rl_ppo_grad",
            LaunchCfg::linear(1, THREADS),
            KernelArgs::new()
                .buf(coef)
                .buf(loss)
                .buf(logp)
                .buf(logp_old)
                .buf(adv)
                .i32(n as i32)
                .f64(eps)
                .f64(share),
        )
    }
}
