//! CUDA graphs under the emulator: [`super::kernel::KernelDevice::capture`] records the work's
//! launches, memsets and emulated GEMMs instead of running them, and a replay runs the record —
//! so the code that builds a graph runs in CI exactly as on a GPU, where nothing runs at capture
//! either.
//!
//! The recorder also enforces what a real capture demands (and reports it as an error at the
//! capture's end, or at once for a copy or a synchronisation), so a capture that would fail or
//! misbehave on the GPU fails here first:
//! * no host↔device copy and no synchronisation inside the capture (the driver refuses them, and
//!   a host value read there would be the capture's, not the replay's);
//! * no buffer allocated before the capture may be freed inside it (every replay would free it
//!   again);
//! * no buffer allocated inside the capture may outlive it (a graph whose allocation is still
//!   live cannot be launched again).
//!
//! Buffers allocated and freed inside the capture become the graph's own: their memory is kept
//! for the replays, as the driver keeps a graph's allocations.

use std::sync::Mutex;

use super::emu;
use super::emu_memory::HostMemory;
use super::kernel::{KernelError, KernelResult, LaunchCfg};

/// A host step recorded in place of device work the emulator does on the CPU (its GEMMs).
pub(crate) type HostStep = Box<dyn Fn() -> KernelResult<()> + Send + Sync>;

/// One recorded piece of work.
pub(crate) enum Op {
    Launch {
        kernel: String,
        cfg: LaunchCfg,
        /// The arguments' slots and where each begins (`KernelArgs`).
        slots: Vec<u64>,
        starts: Vec<usize>,
    },
    Memset {
        ptr: u64,
        bytes: usize,
    },
    Host(HostStep),
}

/// A capture in progress.
pub(crate) struct Recording {
    /// Tags the buffers allocated during this capture (never 0: 0 is "outside any capture").
    pub generation: u64,
    pub ops: Vec<Op>,
    /// Host memory of buffers allocated and freed inside the capture.
    pub owned: Vec<HostMemory>,
    /// Buffers allocated inside the capture and not yet freed.
    pub born_live: usize,
    pub violations: Vec<String>,
}

/// The capture state a device and its buffers share.
#[derive(Default)]
pub(crate) struct CaptureSlot {
    state: Mutex<Option<Recording>>,
    generations: std::sync::atomic::AtomicU64,
}

impl CaptureSlot {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Recording>> {
        // a panic while holding the lock leaves plain data: keep using it
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn begin(&self) -> KernelResult<()> {
        let mut s = self.lock();
        if s.is_some() {
            return Err(KernelError::Invalid(
                "capture: a capture is already running on this device".into(),
            ));
        }
        let generation = self
            .generations
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        *s = Some(Recording {
            generation,
            ops: Vec::new(),
            owned: Vec::new(),
            born_live: 0,
            violations: Vec::new(),
        });
        Ok(())
    }

    /// Ends the capture: its graph, or every rule it broke.
    pub fn end(&self) -> KernelResult<EmuGraph> {
        let r = self.lock().take().ok_or_else(|| {
            KernelError::Invalid("capture: no capture is running on this device".into())
        })?;
        let mut violations = r.violations;
        if r.born_live > 0 {
            violations.push(format!(
                "{} buffer(s) allocated inside the capture outlive it (a graph whose \
                 allocations are live cannot be launched again: allocate them before capturing)",
                r.born_live
            ));
        }
        if !violations.is_empty() {
            return Err(KernelError::Invalid(format!(
                "graph capture: {}",
                violations.join("; ")
            )));
        }
        Ok(EmuGraph {
            ops: r.ops,
            _owned: r.owned,
        })
    }

    /// Drops a running capture without a graph (the work failed).
    pub fn abort(&self) {
        self.lock().take();
    }

    /// Records `op` when capturing; otherwise hands it back to be run now.
    pub fn record(&self, op: Op) -> Option<Op> {
        match self.lock().as_mut() {
            Some(r) => {
                r.ops.push(op);
                None
            }
            None => Some(op),
        }
    }

    /// Whether a capture is running.
    pub fn is_active(&self) -> bool {
        self.lock().is_some()
    }

    /// An error when a capture is running: `what` may not happen inside one.
    pub fn forbid(&self, what: &str) -> KernelResult<()> {
        if self.lock().is_some() {
            return Err(KernelError::Invalid(format!(
                "graph capture: {what} inside a capture (the driver refuses it, and a replay \
                 would not repeat it)"
            )));
        }
        Ok(())
    }

    /// A buffer of this device was allocated.
    pub fn allocated(&self) -> u64 {
        match self.lock().as_mut() {
            Some(r) => {
                r.born_live += 1;
                r.generation
            }
            None => 0,
        }
    }

    /// A buffer born in capture `born` (0: outside any) is freed; under a capture its host
    /// memory `host` is handed to the graph.
    pub fn freed(&self, born: u64, host: Option<HostMemory>) {
        let mut s = self.lock();
        let Some(r) = s.as_mut() else { return };
        if born == r.generation {
            r.born_live -= 1;
            r.owned.extend(host);
        } else if r.violations.len() < 8 {
            r.violations.push(
                "a buffer allocated before the capture is freed inside it (every replay would \
                 free it again)"
                    .into(),
            );
        }
    }
}

/// A recorded graph: its work in order, and the memory of the buffers it owns.
pub struct EmuGraph {
    ops: Vec<Op>,
    _owned: Vec<HostMemory>,
}

impl EmuGraph {
    /// Runs the recorded work once.
    pub fn replay(&self) -> KernelResult<()> {
        for op in &self.ops {
            run(op)?;
        }
        Ok(())
    }

    /// How many pieces of work the graph holds.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// Runs one piece of work now.
pub(crate) fn run(op: &Op) -> KernelResult<()> {
    match op {
        Op::Launch {
            kernel,
            cfg,
            slots,
            starts,
        } => {
            let mut slots = slots.clone();
            let mut ptrs = super::kernel::arg_pointers(&mut slots, starts);
            emu::emu_launch(kernel, cfg.grid, cfg.block, cfg.shared_bytes, &mut ptrs)?;
            super::emu_memory::check_slack(kernel, &slots)
                .map_err(|e| emu::EmuError::Fault(e).into())
        }
        Op::Memset { ptr, bytes } => {
            // SAFETY: recorded from a live buffer of at least `bytes` bytes, which the graph
            // keeps (its own) or the caller keeps alive (allocated before the capture).
            unsafe { std::ptr::write_bytes(*ptr as *mut u8, 0, *bytes) };
            Ok(())
        }
        Op::Host(f) => f(),
    }
}
