//! `bench step`: AdvDMD iterations (`train::advdmd::AdvDmd::step`) on the committed Shapes
//! teacher with the default configuration.
//!
//! An iteration's cost depends on its kind: every iteration rolls out the generator and updates
//! the fake score and discriminator ("critic"); every `r_dmd`-th also updates the generator (DMD +
//! GAN), and after the RL warm-up that update carries the RL term too. Each kind is timed on its
//! own by setting the trainer's public counters before each call, and the steady-state mean per
//! iteration follows from the cadence. No MFU: an iteration mixes batch sizes, partial forwards
//! (the discriminator stops at its feature block) and the text encoder, and a FLOP count of all
//! that would be a guess dressed as a figure.

use super::measure::{time_fallible, PeakRss, Timing, WARMUP};
use super::report::{Cell, Column, Report, Table};
use super::{common_parameters, StepArgs};
use crate::error::{Error, Result};
use crate::train::advdmd::{AdvDmd, AdvDmdConfig};
use crate::train::shapes_model::ShapesModel;
use std::path::Path;

/// The kinds of iteration, in the order they are timed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Critic,
    Generator,
    GeneratorRl,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Critic => "critic only (fake score + discriminator)",
            Kind::Generator => "with generator update (DMD + GAN)",
            Kind::GeneratorRl => "with generator update (DMD + GAN + RL)",
        }
    }

    /// Puts the trainer's counters where the next `step` is of this kind: far past the LR
    /// warm-up, on (or just after) a generator iteration, before or after the RL warm-up.
    fn arm(self, t: &mut AdvDmd) {
        let c = &t.config;
        let r_dmd = c.r_dmd.max(1);
        let generator_iteration = 1000 * r_dmd;
        t.iteration = match self {
            Kind::Critic => generator_iteration + 1,
            Kind::Generator | Kind::GeneratorRl => generator_iteration,
        };
        t.generator_steps = match self {
            Kind::GeneratorRl => c.rl_warmup.next_multiple_of(c.r_rl.max(1)),
            _ => 0,
        };
    }

    /// Whether `step` did what this kind stands for.
    fn matches(self, generator_step: bool, rl_step: bool) -> bool {
        match self {
            Kind::Critic => !generator_step,
            Kind::Generator => generator_step && !rl_step,
            Kind::GeneratorRl => generator_step && rl_step,
        }
    }
}

pub fn run(a: &StepArgs, teacher: &Path) -> Result<Report> {
    if a.prompts == 0 || a.group == 0 {
        return Err(Error::Invalid(
            "bench step: --prompts and --group must be at least 1".into(),
        ));
    }
    if !(1..=8).contains(&a.steps_per_sample) {
        return Err(Error::Invalid(
            "bench step: --steps-per-sample must be 1 to 8".into(),
        ));
    }
    let config = AdvDmdConfig {
        prompts: a.prompts,
        group: a.group,
        steps_per_sample: a.steps_per_sample,
        ..Default::default()
    };
    let mut trainer = AdvDmd::new(ShapesModel::load(teacher)?, config);
    if trainer.config.r_dmd <= 1 {
        return Err(Error::Invalid(
            "bench step: r_dmd = 1 leaves no critic-only iterations to time".into(),
        ));
    }
    // The RL term needs a stochastic transition: K ≥ 2 and ρ > 0 (AdvDmd::step).
    let rl_possible = trainer.config.steps_per_sample >= 2 && trainer.config.rho > 0.0;
    let kinds: Vec<Kind> = [Kind::Critic, Kind::Generator, Kind::GeneratorRl]
        .into_iter()
        .filter(|&k| k != Kind::GeneratorRl || rl_possible)
        .collect();

    let memory = PeakRss::start();
    let mut timings = Vec::new();
    for &kind in &kinds {
        timings.push((kind, time_kind(&mut trainer, kind, a.common.iters)?));
    }
    let peak = memory.growth_bytes();

    let median = |k: Kind| {
        timings
            .iter()
            .find(|(kind, _)| *kind == k)
            .map(|(_, t)| t.median_ms())
    };
    let r_dmd = trainer.config.r_dmd;
    // Steady state (after the RL warm-up): r_dmd − 1 critic iterations per generator iteration.
    let generator_kind = if rl_possible {
        Kind::GeneratorRl
    } else {
        Kind::Generator
    };
    let critic = median(Kind::Critic).expect("always timed");
    let generator = median(generator_kind).expect("timed");
    let steady = ((r_dmd - 1) as f64 * critic + generator) / r_dmd as f64;
    let samples = a.prompts * a.group;

    let mut params = vec![
        ("model", "shapes".into()),
        ("prompts", a.prompts.into()),
        ("group", a.group.into()),
        ("steps_per_sample", a.steps_per_sample.into()),
        ("r_dmd", r_dmd.into()),
    ];
    params.extend(common_parameters(&a.common));
    let mut r = Report::new("step", params);
    r.figure(
        "iteration_ms",
        "mean iteration, steady state",
        Cell::num(steady, 1),
        "ms",
    );
    r.figure(
        "critic_iteration_ms",
        "critic-only iteration",
        Cell::num(critic, 1),
        "ms",
    );
    r.figure(
        "generator_iteration_ms",
        "generator iteration (DMD + GAN)",
        Cell::num(median(Kind::Generator).expect("always timed"), 1),
        "ms",
    );
    r.figure(
        "generator_rl_iteration_ms",
        "generator iteration (DMD + GAN + RL)",
        median(Kind::GeneratorRl).map_or(Cell::NotAvailable, |v| Cell::num(v, 1)),
        "ms",
    );
    r.figure(
        "samples_per_s",
        "generator samples, steady state",
        Cell::num(samples as f64 / (steady * 1e-3), 2),
        "samples/s",
    );
    r.figure("mfu", "MFU", Cell::NotAvailable, "");
    r.figure("peak_memory_bytes", "peak memory", Cell::bytes(peak), "");
    r.table = Some(kinds_table(&timings));
    r.note(format!(
        "steady state = ((r_dmd − 1)·critic + generator{}) / r_dmd with r_dmd = {r_dmd}",
        if rl_possible { " with RL" } else { "" }
    ));
    r.note("MFU n/a: an iteration mixes batch sizes, partial forwards and the text encoder; no honest FLOP count");
    r.note(format!(
        "peak memory is on top of the loaded teacher, generator, fake score and head: {}",
        memory.method()
    ));
    Ok(r)
}

/// A warm-up then `iters` timed iterations of one kind, each checked to be of that kind.
fn time_kind(trainer: &mut AdvDmd, kind: Kind, iters: usize) -> Result<Timing> {
    time_fallible(WARMUP, iters, || {
        kind.arm(trainer);
        let m = trainer.step()?;
        if !kind.matches(m.generator_step, m.rl_step) {
            return Err(Error::Invalid(format!(
                "bench step: an iteration meant as `{}` ran generator={} rl={}",
                kind.name(),
                m.generator_step,
                m.rl_step
            )));
        }
        Ok(())
    })
}

fn kinds_table(timings: &[(Kind, Timing)]) -> Table {
    Table {
        name: "iterations",
        columns: vec![
            Column {
                key: "kind",
                header: "iteration kind",
            },
            Column {
                key: "median_ms",
                header: "median ms",
            },
            Column {
                key: "runs_ms",
                header: "runs (ms)",
            },
        ],
        rows: timings
            .iter()
            .map(|(k, t)| {
                let runs: Vec<String> = t.runs_ms.iter().map(|v| format!("{v:.1}")).collect();
                vec![
                    Cell::Text(k.name().into()),
                    Cell::num(t.median_ms(), 1),
                    Cell::Text(runs.join(" ")),
                ]
            })
            .collect(),
    }
}
