//! The host memory a run may still take, and the check that refuses a run too large for it.
//!
//! Rust aborts the process when an allocation fails, and Linux's OOM killer ends one that touches
//! more pages than there are; either way a run sized past the machine (a huge `--batch`, an
//! SD3.5 model on the emulator of a small machine) dies without a word. So each command adds up a
//! lower bound of what it will allocate — parts it certainly keeps, named — and refuses to start
//! when that alone exceeds what the machine has.

use crate::error::{Error, Result};

const GIB: f64 = (1u64 << 30) as f64;

/// A `Name:   N kB` field of a /proc text file, in bytes (Linux only).
pub fn proc_kb_field(path: &str, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line[field.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// What the host can still give a process: `MemAvailable` plus free swap (`None` where there is
/// no /proc/meminfo: the check is then skipped).
pub fn available_bytes() -> Option<u64> {
    let available = proc_kb_field("/proc/meminfo", "MemAvailable:")?;
    let swap = proc_kb_field("/proc/meminfo", "SwapFree:").unwrap_or(0);
    Some(available.saturating_add(swap))
}

/// A lower bound on the host memory a run allocates, part by part (sums saturate: a product of
/// flags can exceed `u64`).
#[derive(Clone, Debug, Default)]
pub struct Footprint {
    parts: Vec<(&'static str, u64)>,
}

impl Footprint {
    pub fn new() -> Footprint {
        Footprint::default()
    }

    /// Adds `bytes` under `what` (parts of zero bytes are left out of the message).
    pub fn with(mut self, what: &'static str, bytes: u64) -> Footprint {
        if bytes > 0 {
            self.parts.push((what, bytes));
        }
        self
    }

    pub fn total(&self) -> u64 {
        self.parts
            .iter()
            .fold(0u64, |sum, &(_, b)| sum.saturating_add(b))
    }

    /// An error when the footprint exceeds `available` bytes, naming `run` and each part.
    pub fn check_against(&self, run: &str, available: Option<u64>) -> Result<()> {
        let need = self.total();
        match available {
            Some(avail) if need > avail => {
                let parts: Vec<String> = self
                    .parts
                    .iter()
                    .map(|&(what, b)| format!("{what} {}", gib(b)))
                    .collect();
                Err(Error::Invalid(format!(
                    "{run} needs at least {} of memory ({}) and this machine has {} available",
                    gib(need),
                    parts.join(", "),
                    gib(avail)
                )))
            }
            _ => Ok(()),
        }
    }

    /// [`Footprint::check_against`] the memory this machine has now.
    pub fn check(&self, run: &str) -> Result<()> {
        self.check_against(run, available_bytes())
    }
}

fn gib(bytes: u64) -> String {
    let g = bytes as f64 / GIB;
    if g >= 1e6 {
        format!("{g:.2e} GiB")
    } else if g >= 1.0 {
        format!("{g:.1} GiB")
    } else {
        format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
    }
}

/// `a · b · …` saturating at `u64::MAX`.
pub fn product(factors: &[u64]) -> u64 {
    factors.iter().fold(1u64, |p, &f| p.saturating_mul(f))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_footprint_past_the_memory_is_refused_with_its_parts() {
        let f = Footprint::new()
            .with("weights", 3 << 30)
            .with("nothing", 0)
            .with("activations", u64::MAX);
        assert_eq!(f.total(), u64::MAX);
        let err = f
            .check_against("bench mmdit", Some(8 << 30))
            .unwrap_err()
            .to_string();
        assert!(err.contains("bench mmdit needs at least"), "{err}");
        assert!(
            err.contains("weights 3.0 GiB") && err.contains("activations"),
            "{err}"
        );
        assert!(
            !err.contains("nothing") && err.contains("8.0 GiB available"),
            "{err}"
        );
        let small = Footprint::new().with("weights", 1 << 30);
        assert!(small.check_against("x", Some(2 << 30)).is_ok());
        assert!(small.check_against("x", None).is_ok());
        assert_eq!(product(&[1 << 40, 1 << 40]), u64::MAX);
        assert_eq!(product(&[3, 4, 5]), 60);
    }
}
