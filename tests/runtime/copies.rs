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
