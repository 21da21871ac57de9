//! Two streams under the emulator, and the checker of their discipline.
//!
//! On a GPU the model may queue one stream's work (the text tokens') on a side stream while the
//! main stream does the image tokens' (`KernelDevice::fork` / `on_side` / `join`). A missing
//! dependency between the two is a race that shows only now and then, on a card. The emulator
//! makes it show every time:
//! * side-stream work is *deferred* — queued, and run only at the next join — so it runs as late
//!   as a GPU could run it: a main-stream read of a side result before the join reads poison or
//!   a stale value, and a main-stream write after the fork to something the side reads changes
//!   what the side sees (both fail the parity tests);
//! * each piece of work names the byte ranges it touches (its buffer arguments), and a main-stream
//!   piece touching what pending side work touches — or side work touching what the main stream
//!   touched since the fork — is an error at once, unless both only read it (declared at the fork);
//! * a buffer freed on the main stream while pending side work uses it (or on the side stream
//!   while the main stream used it since the fork) is an error at the join: on a GPU its memory
//!   could be handed out again while the other stream still reads it. Its host memory is kept
//!   until the join so the deferred work stays sound;
//! * a host copy or a synchronisation while side work is pending is an error (the GPU's copies
//!   wait for the main stream only).
//!
//! With one stream (the default) every call here is a pass-through.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use super::emu_graph::{self, Op};
use super::emu_memory::HostMemory;
use super::kernel::{KernelError, KernelResult};

/// A byte range `[start, start + bytes)` of device memory some work touches.
pub type Span = (u64, usize);

fn overlaps(a: &[Span], b: &[Span]) -> bool {
    a.iter().any(|&(s, n)| {
        b.iter()
            .any(|&(t, m)| n > 0 && m > 0 && s < t + m as u64 && t < s + n as u64)
    })
}

#[derive(Default)]
struct LaneState {
    on_side: bool,
    /// Forked and not joined since (a capture must not end so: the side stream is part of it).
    forked: bool,
    /// Side work queued since the last join, in order, with what it touches.
    pending: Vec<(Op, Vec<Span>)>,
    /// What the main stream touched since the last fork.
    main_since_fork: Vec<Span>,
    /// Declared read-only for both streams until the join.
    shared: Vec<Span>,
    /// Host memory of buffers freed while deferred work may still use it.
    graveyard: Vec<HostMemory>,
    hazards: Vec<String>,
}

/// The lane state a device and its buffers share.
#[derive(Default)]
pub(crate) struct EmuLanes {
    enabled: AtomicBool,
    state: Mutex<LaneState>,
    /// Set while deferred or immediate host steps (the emulated GEMMs) run: their own copies are
    /// not the caller's.
    in_host_step: AtomicBool,
}

impl EmuLanes {
    fn lock(&self) -> std::sync::MutexGuard<'_, LaneState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    pub fn set_enabled(&self, on: bool) -> KernelResult<()> {
        let s = self.lock();
        if s.on_side || s.forked || !s.pending.is_empty() {
            return Err(KernelError::Invalid(
                "streams: changed while side-stream work is queued (join first)".into(),
            ));
        }
        self.enabled.store(on, Ordering::Relaxed);
        Ok(())
    }

    /// Runs `op` now (main stream) or queues it (side stream), after the checks above.
    pub fn submit(&self, op: Op, touches: Vec<Span>) -> KernelResult<()> {
        if !self.enabled() {
            return self.run(&op);
        }
        {
            let mut s = self.lock();
            let free = |t: &[Span], shared: &[Span]| -> Vec<Span> {
                t.iter()
                    .copied()
                    .filter(|x| !overlaps(std::slice::from_ref(x), shared))
                    .collect()
            };
            let own = free(&touches, &s.shared);
            if s.on_side {
                if overlaps(&own, &s.main_since_fork) {
                    return Err(hazard(&op, "side", "the main stream used since the fork"));
                }
                s.pending.push((op, touches));
                return Ok(());
            }
            if s.pending.iter().any(|(_, t)| overlaps(&own, t)) {
                return Err(hazard(&op, "main", "queued side-stream work uses"));
            }
            s.main_since_fork.extend(own);
        }
        self.run(&op)
    }

    fn run(&self, op: &Op) -> KernelResult<()> {
        if let Op::Host(_) = op {
            let was = self.in_host_step.swap(true, Ordering::Relaxed);
            let r = emu_graph::run(op);
            self.in_host_step.store(was, Ordering::Relaxed);
            return r;
        }
        emu_graph::run(op)
    }

    /// The side stream waits for everything the main stream queued so far; `shared` may be read
    /// by both until the join.
    pub fn fork(&self, shared: &[Span]) -> KernelResult<()> {
        if !self.enabled() {
            return Ok(());
        }
        let mut s = self.lock();
        if s.on_side {
            return Err(KernelError::Invalid(
                "streams: fork from the side stream".into(),
            ));
        }
        s.main_since_fork.clear();
        s.shared.extend_from_slice(shared);
        s.forked = true;
        Ok(())
    }

    /// The main stream waits for the side stream: the deferred work runs now, then any broken
    /// rule is reported.
    pub fn join(&self) -> KernelResult<()> {
        if !self.enabled() {
            return Ok(());
        }
        let pending = {
            let mut s = self.lock();
            if s.on_side {
                return Err(KernelError::Invalid(
                    "streams: join from the side stream".into(),
                ));
            }
            s.shared.clear();
            s.forked = false;
            std::mem::take(&mut s.pending)
        };
        let mut result = Ok(());
        for (op, _) in &pending {
            if let Err(e) = self.run(op) {
                result = Err(e);
                break;
            }
        }
        drop(pending);
        let mut s = self.lock();
        s.graveyard.clear();
        let hazards = std::mem::take(&mut s.hazards);
        result?;
        if hazards.is_empty() {
            Ok(())
        } else {
            Err(KernelError::Invalid(format!(
                "streams: {}",
                hazards.join("; ")
            )))
        }
    }

    /// Whether new work goes to the side lane now.
    pub fn is_side(&self) -> bool {
        self.lock().on_side
    }

    /// Switches the lane new work goes to; returns the previous one.
    pub fn set_side(&self, on: bool) -> bool {
        std::mem::replace(&mut self.lock().on_side, on)
    }

    /// A buffer `span` is freed: its host memory back to drop now, or `None` when deferred work
    /// may still use it (kept until the join).
    pub fn freed(&self, span: Span, host: HostMemory) -> Option<HostMemory> {
        if !self.enabled() {
            return Some(host);
        }
        let mut s = self.lock();
        let used_by_pending = s.pending.iter().any(|(_, t)| overlaps(&[span], t));
        if s.on_side && overlaps(&[span], &s.main_since_fork) && s.hazards.len() < 8 {
            s.hazards.push(
                "a buffer the main stream used since the fork is freed on the side stream".into(),
            );
        }
        if !used_by_pending {
            return Some(host);
        }
        if !s.on_side && s.hazards.len() < 8 {
            s.hazards.push(
                "a buffer queued side-stream work uses is freed on the main stream before the \
                 join"
                    .into(),
            );
        }
        s.graveyard.push(host);
        None
    }

    /// A GPU's fork (`true`) or join: the state the checks above read, kept on both back ends.
    pub fn set_forked(&self, on: bool) {
        self.lock().forked = on;
    }

    /// An error when the side stream was forked and not joined: a capture must not start or end
    /// so (on a GPU its end fails: the side stream joined the capture at the fork).
    pub fn require_no_fork(&self, what: &str) -> KernelResult<()> {
        if self.enabled() && self.lock().forked {
            return Err(KernelError::Invalid(format!(
                "streams: {what} with the side stream forked and not joined"
            )));
        }
        Ok(())
    }

    /// An error when side work is pending: `what` (a host copy, a synchronisation) would not
    /// wait for it on a GPU.
    pub fn require_joined(&self, what: &str) -> KernelResult<()> {
        if !self.enabled() || self.in_host_step.load(Ordering::Relaxed) {
            return Ok(());
        }
        let s = self.lock();
        if s.on_side || !s.pending.is_empty() {
            return Err(KernelError::Invalid(format!(
                "streams: {what} while side-stream work is queued (join first: on a GPU it \
                 would not wait for the side stream)"
            )));
        }
        Ok(())
    }
}

fn hazard(op: &Op, lane: &str, what: &str) -> KernelError {
    let name = match op {
        Op::Launch { kernel, .. } => kernel.as_str(),
        Op::Memset { .. } => "a memset",
        Op::Host(_) => "a GEMM",
    };
    KernelError::Invalid(format!(
        "streams: {name} on the {lane} stream touches memory {what} (a race on a GPU: join \
         first, or declare it read-only at the fork)"
    ))
}
