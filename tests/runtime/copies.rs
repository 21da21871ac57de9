//! Uploads and downloads on the main stream: an upload is ordered after the work queued before it
//! and before the work queued after it, and its host buffer may be dropped (and its memory reused)
//! as soon as the call returns — on a GPU the driver stages pageable memory before returning.

use advdmd::device::kernel::KernelDevice;
use advdmd::kernels::elementwise::dev::copy;

fn devices() -> Vec<KernelDevice> {
    super::devices("copy")
}

#[test]
fn an_upload_is_ordered_with_the_stream_and_owns_nothing_after_it_returns() {
    let n = 16 << 20; // 64 MiB of f32: many staging chunks on a GPU
    for dev in devices() {
        let a = dev.zeros::<f32>(n).unwrap();
        let b = dev.zeros::<f32>(n).unwrap();
        for round in 0..3u32 {
            let mut host: Vec<f32> = (0..n).map(|i| (i as u32 ^ round) as f32).collect();
            // b ← a (queued), then a ← host: the copy must read a's old contents
            copy(&dev, &b, &a).unwrap();
            dev.copy_to_device(&host, &a).unwrap();
            let want_b: Vec<f32> = if round == 0 {
                vec![0.0; n]
            } else {
                (0..n).map(|i| (i as u32 ^ (round - 1)) as f32).collect()
            };
            // the host buffer is overwritten and dropped at once
            host.iter_mut().for_each(|v| *v = -1.0);
            drop(host);
            let want_a: Vec<f32> = (0..n).map(|i| (i as u32 ^ round) as f32).collect();
            assert!(
                dev.download(&a).unwrap() == want_a,
                "round {round}: a on {}",
                dev.name()
            );
            assert!(
                dev.download(&b).unwrap() == want_b,
                "round {round}: b on {}",
                dev.name()
            );
        }
        println!("64 MiB uploads ordered and staged on {}", dev.name());
    }
}

/// With asynchronous copies (`set_async_copies`: uploads staged in a ring of pinned memory,
/// `download_later` into pinned memory): each upload still lands in stream order and owns nothing
/// once the call returns, across the ring's wrap (~100 MB through a 64 MiB ring) and for an upload
/// larger than the ring (the pageable path); a queued download reads the buffer as it was when
/// queued, not as later work leaves it; an upload inside a capture is refused.
#[test]
fn staged_uploads_and_queued_downloads_keep_the_stream_order() {
    let n = 1 << 20; // 4 MiB of f32 an upload
    for dev in devices() {
        dev.set_async_copies(true);
        let a = dev.zeros::<f32>(n).unwrap();
        let outs: Vec<_> = (0..24).map(|_| dev.zeros::<f32>(n).unwrap()).collect();
        let value = |k: usize, i: usize| (i ^ (k * 7919)) as f32;
        let mut pending = Vec::new();
        for (k, out) in outs.iter().enumerate() {
            let mut host: Vec<f32> = (0..n).map(|i| value(k, i)).collect();
            dev.copy_to_device(&host, &a).unwrap();
            host.iter_mut().for_each(|v| *v = -1.0);
            drop(host);
            copy(&dev, out, &a).unwrap();
            // read `out` as it is now; the next round's work overwrites it with round k + 1's
            pending.push(dev.download_later(out).unwrap());
            if k + 1 < outs.len() {
                copy(&dev, out, &a).unwrap();
            }
        }
        for (k, later) in pending.into_iter().enumerate() {
            let got = later.wait().unwrap();
            assert!(
                got.iter().enumerate().all(|(i, &v)| v == value(k, i)),
                "round {k}: a queued download on {}",
                dev.name()
            );
        }
        // larger than the ring: staged by the driver instead
        let big = 20 << 20; // 80 MiB of f32
        let host: Vec<f32> = (0..big).map(|i| (i % 1000) as f32).collect();
        let b = dev.upload(&host).unwrap();
        assert!(
            dev.download(&b).unwrap() == host,
            "a large upload on {}",
            dev.name()
        );
        assert!(
            dev.capture(|| dev.copy_to_device(&[1.0f32; 4], &outs[0]))
                .is_err(),
            "an upload inside a capture on {}",
            dev.name()
        );
        dev.set_async_copies(false);
        println!(
            "staged uploads and queued downloads in order on {}",
            dev.name()
        );
    }
}
