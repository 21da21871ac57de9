//! CUDA graphs through `KernelDevice::capture`: nothing runs at capture, every replay runs the
//! recorded work (kernels, memsets, GEMMs), and the capture rules a GPU enforces — no copies or
//! synchronisation inside, no freeing of older buffers, no allocation outliving the capture — are
//! errors under the emulator too. On a GPU (when there is one) the replay half runs as well.

use advdmd::device::kernel::{DevBuf, KernelDevice};
use advdmd::device::kernel::{EpilogueKind, GemmSpec};
use advdmd::kernels::elementwise::dev::copy;
use advdmd::kernels::gemm::dev::{gemm_bf16, EpilogueBufs};
use half::bf16;

fn devices() -> Vec<KernelDevice> {
    super::devices("graph")
}

fn bf(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|&x| bf16::from_f32(x)).collect()
}

#[test]
fn a_graph_runs_its_work_at_each_replay_not_at_capture() {
    for dev in devices() {
        let src = dev.upload(&[1f32, 2.0, 3.0, 4.0, 5.0]).unwrap();
        let dst = dev.zeros::<f32>(5).unwrap();
        let (m, n, k) = (3, 2, 4);
        let a = dev
            .upload(&bf(&(0..m * k).map(|i| i as f32 * 0.5).collect::<Vec<_>>()))
            .unwrap();
        let b = dev
            .upload(&bf(&(0..k * n)
                .map(|i| 1.0 - i as f32 * 0.25)
                .collect::<Vec<_>>()))
            .unwrap();
        let c = dev.zeros::<bf16>(m * n).unwrap();
        let spec = GemmSpec {
            m,
            n,
            k,
            trans_a: false,
            trans_b: false,
            epilogue: EpilogueKind::None,
        };
        let graph = dev
            .capture(|| {
                // a temporary the graph owns: allocated, used and freed inside the capture
                let tmp = dev.alloc::<f32>(5)?;
                copy(&dev, &tmp, &src)?;
                copy(&dev, &dst, &tmp)?;
                gemm_bf16(&dev, spec, &a, &b, &c, EpilogueBufs::default())
            })
            .unwrap();
        if dev.is_emulator() {
            assert_eq!(
                graph.recorded_ops(),
                Some(3),
                "two copies and one GEMM recorded"
            );
            assert_eq!(
                dev.download(&dst).unwrap(),
                vec![0.0; 5],
                "nothing ran at capture"
            );
        }
        graph.launch().unwrap();
        assert_eq!(dev.download(&dst).unwrap(), vec![1.0, 2.0, 3.0, 4.0, 5.0]);
        let want: Vec<f32> = (0..m * n)
            .map(|ij| {
                let (i, j) = (ij / n, ij % n);
                (0..k)
                    .map(|l| (i * k + l) as f32 * 0.5 * (1.0 - (l * n + j) as f32 * 0.25))
                    .sum()
            })
            .collect();
        let got: Vec<f32> = dev
            .download(&c)
            .unwrap()
            .iter()
            .map(|x| x.to_f32())
            .collect();
        for (g, w) in got.iter().zip(&want) {
            assert!(
                (g - w).abs() <= 0.02 * w.abs().max(1.0),
                "GEMM {got:?} vs {want:?}"
            );
        }
        // a replay reads the inputs as they are at the replay
        dev.copy_to_device(&[9f32, 8.0, 7.0, 6.0, 5.0], &src)
            .unwrap();
        graph.launch().unwrap();
        graph.launch().unwrap();
        assert_eq!(dev.download(&dst).unwrap(), vec![9.0, 8.0, 7.0, 6.0, 5.0]);
        println!("graph replay on {}: ok", dev.name());
    }
}

fn refused(
    dev: &KernelDevice,
    what: &str,
    work: impl FnOnce() -> advdmd::device::kernel::KernelResult<()>,
) {
    let err = dev
        .capture(work)
        .err()
        .unwrap_or_else(|| panic!("{what}: captured"));
    println!("{what}: {err}");
    // the device is usable afterwards: a fresh capture works
    let ok = dev.zeros::<f32>(4).unwrap();
    dev.capture(|| dev.memset_zero(&ok))
        .unwrap()
        .launch()
        .unwrap();
}

#[test]
fn the_emulator_refuses_what_a_capture_may_not_do() {
    let dev = KernelDevice::emulator();
    let buf = dev.upload(&[1f32, 2.0]).unwrap();
    refused(&dev, "download", || dev.download(&buf).map(|_| ()));
    refused(&dev, "upload", || dev.copy_to_device(&[3f32, 4.0], &buf));
    refused(&dev, "synchronize", || dev.synchronize());
    let mut escaped: Option<DevBuf<f32>> = None;
    refused(&dev, "an allocation outliving the capture", || {
        escaped = Some(dev.alloc::<f32>(8)?);
        Ok(())
    });
    drop(escaped);
    let old = dev.upload(&[1f32]).unwrap();
    refused(&dev, "freeing an older buffer", move || {
        drop(old);
        Ok(())
    });
    // the work's own error comes back, and the capture is dropped
    let err = dev
        .capture(|| Err(advdmd::device::kernel::KernelError::Invalid("boom".into())))
        .err()
        .unwrap();
    assert!(err.to_string().contains("boom"), "{err}");
    assert_eq!(dev.download(&buf).unwrap(), vec![1.0, 2.0], "nothing ran");
}

#[test]
fn time_graph_ms_replays_on_the_emulator() {
    let dev = KernelDevice::emulator();
    let src = dev.upload(&[1f32; 64]).unwrap();
    let dst = dev.zeros::<f32>(64).unwrap();
    let ms = dev.time_graph_ms(|| copy(&dev, &dst, &src)).unwrap();
    assert!(ms >= 0.0);
    assert_eq!(dev.download(&dst).unwrap(), vec![1.0; 64]);
}

/// A graph's temporaries stay mapped after its replay; a large direct allocation after it (a
/// kind of training iteration run before its graph exists) must not find them still held, or two
/// working sets share the card (the 1024 px AdvDMD iteration ran out of an H100's memory so).
#[test]
fn direct_work_after_a_replay_gets_the_graphs_memory_back() {
    for dev in devices() {
        if dev.is_emulator() {
            assert_eq!(dev.graph_memory_bytes().unwrap(), None);
            continue;
        }
        let n = 64 << 20; // 256 MB of f32 temporaries in the graph
        let src = dev.upload(&vec![1.5f32; n]).unwrap();
        let sum = dev.zeros::<f32>(n).unwrap();
        let graph = dev
            .capture(|| {
                let tmp = dev.alloc::<f32>(n)?;
                copy(&dev, &tmp, &src)?;
                copy(&dev, &sum, &tmp)
            })
            .unwrap();
        graph.launch().unwrap();
        dev.synchronize().unwrap();
        let held = dev.graph_memory_bytes().unwrap().unwrap();
        assert!(
            held >= 4 * n as u64,
            "graph memory after a replay: {held} B"
        );
        // direct work past the hand-over size (1 GiB), in pieces as a model allocates
        let direct: Vec<DevBuf<f32>> = (0..5).map(|_| dev.zeros::<f32>(n).unwrap()).collect();
        let after = dev.graph_memory_bytes().unwrap().unwrap();
        assert_eq!(after, 0, "graph memory still mapped during direct work");
        drop(direct);
        dev.copy_to_device(&vec![2.5f32; n], &src).unwrap();
        graph.launch().unwrap();
        let got = dev.download(&sum).unwrap();
        assert!(
            got.iter().all(|&x| x == 2.5),
            "the replay after the hand-over"
        );
        println!(
            "graph memory on {}: {held} B mapped after a replay, {after} B during direct work",
            dev.name()
        );
    }
}
