//! The kernel device's op profile (`KernelDevice::profile`, `advdmd bench … --profile`): every op
//! queued is timed once, under its kernel's name or its GEMM's shape, with its matmul FLOPs; ops
//! recorded into a capture are not, a replay is (as one op). On the emulator the times are the
//! host's (meaningless for speed); on a GPU, when there is one, the same checks run on events.

use advdmd::device::kernel::{DevBuf, EpilogueKind, GemmSpec, KernelDevice};
use advdmd::kernels::attention::dev::{joint_attention_flops, joint_attention_fwd, AttnDims};
use advdmd::kernels::elementwise::dev::copy;
use advdmd::kernels::gemm::dev::{gemm_bf16, EpilogueBufs};
use half::bf16;

fn devices() -> Vec<KernelDevice> {
    super::devices("profile")
}

fn bf(dev: &KernelDevice, n: usize) -> DevBuf<bf16> {
    let v: Vec<bf16> = (0..n)
        .map(|i| bf16::from_f32((i % 7) as f32 * 0.1))
        .collect();
    dev.upload(&v).unwrap()
}

#[test]
fn every_op_is_timed_once_under_its_name() {
    for dev in devices() {
        // more than 8 rows: a GEMM (`gemv_small_m` takes linear layers over at most 8)
        let (m, n, k) = (12, 6, 8);
        let (a, b, c) = (bf(&dev, m * k), bf(&dev, k * n), bf(&dev, m * n));
        let (src, dst) = (dev.zeros::<f32>(64).unwrap(), dev.zeros::<f32>(64).unwrap());
        let spec = GemmSpec {
            m,
            n,
            k,
            trans_a: false,
            trans_b: true,
            epilogue: EpilogueKind::None,
        };
        let p = dev
            .profile(|| {
                for _ in 0..3 {
                    copy(&dev, &dst, &src)?;
                }
                dev.memset_zero(&dst)?;
                gemm_bf16(&dev, spec, &a, &b, &c, EpilogueBufs::default())
            })
            .unwrap();
        let row = |name: &str| p.rows.iter().find(|r| r.name == name);
        assert_eq!(p.ops, 5, "{:?}", p.rows);
        let copies = row("copy_bytes").expect("the copies' row");
        assert_eq!((copies.calls, copies.flops), (3, 0));
        assert_eq!(row("memset").expect("the memset's row").calls, 1);
        let g = row("gemm 12×6×8 NT None bf16").expect("the GEMM's row");
        assert_eq!((g.calls, g.flops), (1, 2 * 12 * 6 * 8));
        assert!(p.rows.iter().all(|r| r.ms >= 0.0));
        assert_eq!(p.families().iter().map(|r| r.calls).sum::<u64>(), 5);
        // the next profile starts empty
        let p = dev.profile(|| copy(&dev, &dst, &src)).unwrap();
        assert_eq!(p.ops, 1);
        println!("profile on {}: {:?}", dev.name(), p.rows);
    }
}

#[test]
fn attention_flops_go_to_the_attention_kernel() {
    for dev in devices() {
        let dims = AttnDims {
            b: 1,
            la: 8,
            lb: 24,
            h: 2,
            d: 64,
        };
        let (na, nb) = (dims.la * dims.h * dims.d, dims.lb * dims.h * dims.d);
        let [qa, ka, va] = [0, 1, 2].map(|_| bf(&dev, na));
        let [qb, kb, vb] = [0, 1, 2].map(|_| bf(&dev, nb));
        let p = dev
            .profile(|| joint_attention_fwd(&dev, &qa, &ka, &va, &qb, &kb, &vb, dims).map(|_| ()))
            .unwrap();
        let with_flops: Vec<_> = p.rows.iter().filter(|r| r.flops > 0).collect();
        assert_eq!(with_flops.len(), 1, "{:?}", p.rows);
        assert!(
            with_flops[0].name.starts_with("joint_attn_fwd"),
            "{:?}",
            p.rows
        );
        assert_eq!(
            with_flops[0].flops,
            joint_attention_flops(dims, false) as u64
        );
    }
}

#[test]
fn a_capture_is_not_timed_and_a_replay_is_one_op() {
    for dev in devices() {
        let (src, dst) = (dev.zeros::<f32>(64).unwrap(), dev.zeros::<f32>(64).unwrap());
        let mut graph = None;
        let p = dev
            .profile(|| {
                graph = Some(dev.capture(|| {
                    copy(&dev, &dst, &src)?;
                    copy(&dev, &src, &dst)
                })?);
                Ok(())
            })
            .unwrap();
        assert_eq!(p.ops, 0, "{:?}", p.rows);
        let graph = graph.unwrap();
        let p = dev.profile(|| graph.launch()).unwrap();
        assert_eq!(p.ops, 1);
        assert_eq!(p.rows[0].name, "graph replay");
        // not inside a capture, nor inside another profile
        assert!(dev.capture(|| dev.profile(|| Ok(())).map(|_| ())).is_err());
        assert!(dev.profile(|| dev.profile(|| Ok(())).map(|_| ())).is_err());
        // and the device works on after both refusals
        assert_eq!(dev.profile(|| copy(&dev, &dst, &src)).unwrap().ops, 1);
    }
}

/// On a GPU, the host's time before a copy (preparing its data while the stream has nothing to
/// run, or while the profiler's gate holds the ops queued so far) is in no op's row — timed as
/// its own row or as the profile's wait at the gates — so the copy's row is the transfer alone.
#[test]
fn host_time_before_a_copy_is_timed_apart() {
    for dev in devices() {
        if dev.is_emulator() {
            println!("skipped on the emulator: its copies are host copies, not timed");
            continue;
        }
        let host = vec![1f32; 1 << 20];
        let buf = dev.zeros::<f32>(host.len()).unwrap();
        let p = dev
            .profile(|| {
                std::thread::sleep(std::time::Duration::from_millis(30));
                dev.copy_to_device(&host, &buf)
            })
            .unwrap();
        let row = |name: &str| p.rows.iter().find(|r| r.name == name).expect(name);
        let idle = row("idle (host work before a copy)");
        let upload = row("upload (host to device)");
        assert_eq!((idle.calls, upload.calls), (1, 1), "{:?}", p.rows);
        let waited = idle.ms + p.host_wait_ms;
        assert!(
            waited >= 25.0 && upload.ms < 20.0,
            "{:?}, {waited} ms",
            p.rows
        );
    }
}

/// `bench … --profile` profiles on one stream (`profile_one_stream`): the work of `on_side` then
/// queues on the main stream and no op is the side stream's, where a plain profile with two
/// streams has it there (and an op's gap on the side stream would include its waits).
#[test]
fn a_one_stream_profile_has_no_side_stream_ops() {
    use advdmd::bench::profile::profile_one_stream;
    for dev in devices() {
        let streams = dev.streams();
        dev.set_streams(2).unwrap();
        let src = dev.zeros::<f32>(64).unwrap();
        let (dst, dst_side) = (dev.zeros::<f32>(64).unwrap(), dev.zeros::<f32>(64).unwrap());
        let work = || {
            dev.fork(&[src.span()])?;
            dev.on_side(|| copy(&dev, &dst_side, &src))?;
            copy(&dev, &dst, &src)?;
            dev.join()
        };
        let two = dev.profile(work).unwrap();
        assert_eq!(
            (two.ops, two.side_ops, two.streams),
            (2, 1, 2),
            "{:?}",
            two.rows
        );
        let one = profile_one_stream(&dev, work).unwrap();
        assert_eq!(
            (one.ops, one.side_ops, one.streams),
            (2, 0, 1),
            "{:?}",
            one.rows
        );
        assert_eq!(dev.streams(), 2, "the stream setting is restored");
        dev.set_streams(streams).unwrap();
    }
}

/// On a GPU, a host slower than the GPU adds nothing to the ops' rows: the profiler's gate holds
/// the ops until the host has queued the next few dozen, so each row is its op's own time and the
/// host's lag is the profile's wait at the gates.
#[test]
fn a_slow_host_adds_nothing_to_the_ops_rows() {
    for dev in devices() {
        if dev.is_emulator() {
            println!("skipped on the emulator: its profile times the host");
            continue;
        }
        let (src, dst) = (
            dev.zeros::<f32>(1 << 16).unwrap(),
            dev.zeros::<f32>(1 << 16).unwrap(),
        );
        // more ops than one gate holds, so later gates are queued and released too
        let n = 120;
        let p = dev
            .profile(|| {
                for _ in 0..n {
                    std::thread::sleep(std::time::Duration::from_micros(500));
                    copy(&dev, &dst, &src)?;
                }
                Ok(())
            })
            .unwrap();
        let copies = p.rows.iter().find(|r| r.name == "copy_bytes").unwrap();
        assert_eq!(p.ops, n as u64, "{:?}", p.rows);
        // a 256 KB copy takes a few µs; unheld, each would show the host's 500 µs sleep
        assert!(copies.ms < 0.1 * n as f64 * 0.5, "{:?}", p.rows);
        assert!(
            p.host_wait_ms > 0.5 * n as f64 * 0.5,
            "{} ms",
            p.host_wait_ms
        );
        println!(
            "profile on {}: {} copies {:.3} ms, {:.1} ms waited at the gates",
            dev.name(),
            n,
            copies.ms,
            p.host_wait_ms
        );
    }
}
