//! The emulator's "device memory": each buffer is host memory in a mapping of its own whose last
//! 16-byte granule ends against an inaccessible page (and whose mapping starts with one), so a
//! kernel that runs past a buffer's end faults at once — the emulator's SIGSEGV report names the
//! kernel, block and thread (`cuda/emu/emu.cpp`) — instead of reading a neighbour's bytes or
//! corrupting them, as an access into a heap allocation would. Buffers stay 16-byte aligned (a
//! GPU's are 256-byte aligned, and kernels pick their vector paths by alignment), so the last
//! granule's bytes past the buffer's end are slack: they hold a canary, a NaN pattern distinct
//! from the 0xFF poison, and every launch checks the canaries of the buffers it was passed
//! ([`check_slack`]): a write that runs less than 16 bytes past the end is an error naming the
//! kernel. compute-sanitizer's memcheck does this on a GPU; this brings the overrun half of it
//! into CI. (Reads of the slack are not caught; they see NaN.)

use std::collections::BTreeMap;
use std::sync::Mutex;

/// The slack's bytes: `C1 7F` repeated is a NaN read as bf16 (0x7FC1) and as f32 (0x7FC17FC1).
const CANARY: [u8; 2] = [0xC1, 0x7F];

/// Every live buffer: first byte → (bytes, bytes rounded up to 16).
static LIVE: Mutex<BTreeMap<usize, (usize, usize)>> = Mutex::new(BTreeMap::new());

fn live() -> std::sync::MutexGuard<'static, BTreeMap<usize, (usize, usize)>> {
    LIVE.lock().unwrap_or_else(|e| e.into_inner())
}

/// After a launch of `kernel` with argument slots `slots`: an error when a slot points into a live
/// buffer whose slack no longer holds the canary (the kernel wrote past that buffer's end).
pub fn check_slack(kernel: &str, slots: &[u64]) -> Result<(), String> {
    let live = live();
    for &slot in slots {
        let addr = slot as usize;
        let Some((&start, &(bytes, payload))) = live.range(..=addr).next_back() else {
            continue;
        };
        if addr >= start + payload || bytes == payload {
            continue;
        }
        // SAFETY: the buffer is live (it is in LIVE, and Drop removes it under this lock before
        // unmapping), and [start + bytes, start + payload) is inside its mapped payload.
        let slack =
            unsafe { std::slice::from_raw_parts((start + bytes) as *const u8, payload - bytes) };
        if let Some(k) = slack
            .iter()
            .enumerate()
            .position(|(i, &b)| b != CANARY[(start + bytes + i) % 2])
        {
            return Err(format!(
                "{kernel} wrote past the end of a {bytes}-byte buffer (byte {} after it)",
                k + 1
            ));
        }
    }
    Ok(())
}

/// Which end of a buffer meets its guard page: the end (the default: overruns fault), or with
/// `ADVDMD_EMU_GUARD=start` the start (underruns fault; the canaries still catch writes up to 15
/// bytes past the end). CI runs the kernel tests both ways.
pub fn guard_at_start() -> bool {
    static AT_START: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AT_START.get_or_init(|| {
        guard_env().unwrap_or_else(|e| {
            eprintln!("{e}: guarding buffer ends");
            false
        })
    })
}

/// `ADVDMD_EMU_GUARD` read: `Ok(true)` for `start`, `Ok(false)` for `end` or unset, an error
/// naming any other value (the CLI refuses it when it starts).
pub fn guard_env() -> Result<bool, String> {
    match std::env::var("ADVDMD_EMU_GUARD").as_deref() {
        Err(_) | Ok("") | Ok("end") => Ok(false),
        Ok("start") => Ok(true),
        Ok(other) => Err(format!(
            "ADVDMD_EMU_GUARD={other:?} is not `end` or `start`"
        )),
    }
}

/// One buffer's memory: `bytes` (rounded up to 16, the vector width a kernel may load) right
/// before a guard page (or right after one: [`guard_at_start`]). Empty (`Default`) owns nothing.
pub struct HostMemory {
    map: *mut libc::c_void,
    map_len: usize,
    ptr: *mut u8,
}

// SAFETY: the mapping is owned by this value alone (no aliasing handles); moving it to or sharing
// it with another thread is as safe as for a `Vec<u8>`.
unsafe impl Send for HostMemory {}
unsafe impl Sync for HostMemory {}

impl Default for HostMemory {
    fn default() -> Self {
        Self {
            map: std::ptr::null_mut(),
            map_len: 0,
            ptr: std::ptr::null_mut(),
        }
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as usize
    } else {
        4096
    }
}

impl HostMemory {
    /// `bytes` (at least one granule) filled with `fill`, 16-byte aligned, its rounded end against
    /// a guard page. `None` when the system refuses the mapping.
    pub fn filled(bytes: usize, fill: u8) -> Option<Self> {
        let page = page_size();
        let payload = bytes.max(1).checked_next_multiple_of(16)?;
        let body = payload.checked_next_multiple_of(page)?;
        let map_len = body.checked_add(2 * page)?;
        // SAFETY: an anonymous private mapping with no address hint; checked below.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if map == libc::MAP_FAILED {
            return None;
        }
        let mem = Self {
            map,
            map_len,
            // SAFETY: `page + body - payload` < `map_len`, inside the mapping.
            ptr: unsafe {
                (map as *mut u8).add(if guard_at_start() {
                    page
                } else {
                    page + body - payload
                })
            },
        };
        // SAFETY: the range [map + page, map + page + body) lies inside the mapping.
        let rw = unsafe {
            libc::mprotect(
                (map as *mut u8).add(page) as *mut libc::c_void,
                body,
                libc::PROT_READ | libc::PROT_WRITE,
            )
        };
        if rw != 0 {
            return None; // (dropping `mem` unmaps)
        }
        let start = mem.ptr as usize;
        // SAFETY: [ptr, ptr + payload) is inside the readable and writable body.
        let all = unsafe { std::slice::from_raw_parts_mut(mem.ptr, payload) };
        all[..bytes].fill(fill);
        for (i, b) in all[bytes..].iter_mut().enumerate() {
            *b = CANARY[(start + bytes + i) % 2];
        }
        live().insert(start, (bytes, payload));
        Some(mem)
    }

    /// The first byte (null for an empty value).
    pub fn ptr(&self) -> *mut u8 {
        self.ptr
    }
}

impl Drop for HostMemory {
    fn drop(&mut self) {
        if !self.map.is_null() {
            let mut live = live();
            live.remove(&(self.ptr as usize));
            // SAFETY: `map`/`map_len` are exactly what mmap returned, unmapped once.
            unsafe { libc::munmap(self.map, self.map_len) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_filled_aligned_and_end_at_a_page() {
        let page = page_size();
        for bytes in [0usize, 1, 15, 16, 17, 4095, 4096, 4097, 100_000] {
            let m = HostMemory::filled(bytes, 0xAB).unwrap();
            let p = m.ptr() as usize;
            let payload = bytes.max(1).next_multiple_of(16);
            assert_eq!(p % 16, 0, "{bytes}");
            if guard_at_start() {
                assert_eq!(p % page, 0, "{bytes}: the start abuts the guard page");
            } else {
                assert_eq!((p + payload) % page, 0, "{bytes}: the end abuts the page");
            }
            // SAFETY: the payload is mapped readable.
            let s = unsafe { std::slice::from_raw_parts(m.ptr(), payload) };
            assert!(s[..bytes].iter().all(|&b| b == 0xAB));
            assert!(s[bytes..].iter().all(|&b| b == 0xC1 || b == 0x7F));
        }
        assert!(HostMemory::default().ptr().is_null());
    }

    #[test]
    fn a_write_into_the_slack_is_named_and_in_bounds_writes_are_not() {
        let m = HostMemory::filled(10, 0).unwrap();
        let p = m.ptr() as u64;
        // Any slot pointing into the buffer finds it; other values are ignored.
        assert_eq!(check_slack("k", &[p, p + 3, 0, 7]), Ok(()));
        // SAFETY: bytes 0..16 are the buffer's payload (10 bytes and 6 of slack).
        unsafe { std::ptr::write_bytes(m.ptr(), 1, 10) };
        assert_eq!(check_slack("k", &[p + 4]), Ok(()));
        // SAFETY: as above.
        unsafe { *m.ptr().add(12) = 0 };
        assert_eq!(
            check_slack("twelve", &[0, p + 9]),
            Err("twelve wrote past the end of a 10-byte buffer (byte 3 after it)".into())
        );
        // A slot outside it: not its business.
        assert_eq!(check_slack("k", &[p + 16]), Ok(()));
    }
}
