//! Two streams through `KernelDevice::fork` / `on_side` / `join`: the side stream's work is
//! ordered after the fork and before the join, and nothing else. Under the emulator the side work
//! is deferred to the join, and the races a GPU would show now and then are errors every time
//! (`device::emu_lanes`). On a GPU (when there is one) the correct patterns run there too.

use advdmd::device::kernel::KernelDevice;
use advdmd::kernels::elementwise::dev::copy;

fn two_stream_devices() -> Vec<KernelDevice> {
    let v = super::devices("stream");
    for d in &v {
        d.set_streams(2).unwrap();
    }
    v
}

#[test]
fn side_work_is_ordered_after_the_fork_and_before_the_join() {
    for dev in two_stream_devices() {
        let src = dev.upload(&[1f32, 2.0, 3.0]).unwrap();
        let main_out = dev.zeros::<f32>(3).unwrap();
        let side_out = dev.zeros::<f32>(3).unwrap();
        dev.fork(&[src.span()]).unwrap();
        let tmp = dev
            .on_side(|| {
                // allocated, written and partly freed on the side stream
                let t = dev.alloc::<f32>(3)?;
                let scratch = dev.alloc::<f32>(3)?;
                copy(&dev, &scratch, &src)?;
                copy(&dev, &t, &scratch)?;
                copy(&dev, &side_out, &t)?;
                Ok(t)
            })
            .unwrap();
        copy(&dev, &main_out, &src).unwrap();
        if dev.is_emulator() {
            assert!(
                dev.download(&main_out).is_err(),
                "a download before the join must be refused"
            );
        }
        dev.join().unwrap();
        assert_eq!(dev.download(&side_out).unwrap(), vec![1.0, 2.0, 3.0]);
        assert_eq!(dev.download(&tmp).unwrap(), vec![1.0, 2.0, 3.0]);
        assert_eq!(dev.download(&main_out).unwrap(), vec![1.0, 2.0, 3.0]);
        println!("two streams on {}: fork, side work, join", dev.name());
    }
}

#[test]
fn the_emulator_defers_side_work_to_the_join() {
    let dev = &two_stream_devices()[0];
    let src = dev.upload(&[4f32, 5.0]).unwrap();
    let out = dev.zeros::<f32>(2).unwrap();
    dev.fork(&[]).unwrap();
    dev.on_side(|| copy(dev, &out, &src)).unwrap();
    dev.join().unwrap();
    assert_eq!(dev.download(&out).unwrap(), vec![4.0, 5.0]);
    // with one stream the same calls run in place
    dev.set_streams(1).unwrap();
    assert_eq!(dev.streams(), 1);
    let out1 = dev.zeros::<f32>(2).unwrap();
    dev.fork(&[]).unwrap();
    dev.on_side(|| copy(dev, &out1, &src)).unwrap();
    assert_eq!(dev.download(&out1).unwrap(), vec![4.0, 5.0]);
}

#[test]
fn a_main_stream_read_of_side_results_before_the_join_is_an_error() {
    let dev = &two_stream_devices()[0];
    let src = dev.upload(&[1f32; 8]).unwrap();
    let mid = dev.zeros::<f32>(8).unwrap();
    let out = dev.zeros::<f32>(8).unwrap();
    dev.fork(&[]).unwrap();
    dev.on_side(|| copy(dev, &mid, &src)).unwrap();
    let e = copy(dev, &out, &mid).unwrap_err().to_string();
    assert!(e.contains("copy_bytes") && e.contains("main stream"), "{e}");
    dev.join().unwrap();
}

#[test]
fn a_main_stream_write_to_what_the_side_reads_is_an_error_unless_both_only_read() {
    let dev = &two_stream_devices()[0];
    let src = dev.upload(&[1f32; 8]).unwrap();
    let (a, b) = (dev.zeros::<f32>(8).unwrap(), dev.zeros::<f32>(8).unwrap());
    // both read `src`, declared shared: fine
    dev.fork(&[src.span()]).unwrap();
    dev.on_side(|| copy(dev, &a, &src)).unwrap();
    copy(dev, &b, &src).unwrap();
    dev.join().unwrap();
    // the main stream overwrites what the side stream is still to read: refused
    dev.fork(&[]).unwrap();
    dev.on_side(|| copy(dev, &a, &src)).unwrap();
    assert!(copy(dev, &src, &b).is_err());
    dev.join().unwrap();
    // and the other way round: side work touching what the main stream wrote since the fork
    dev.fork(&[]).unwrap();
    copy(dev, &b, &src).unwrap();
    assert!(dev.on_side(|| copy(dev, &a, &b)).is_err());
    dev.join().unwrap();
    // disjoint windows of one buffer (as the flat parameter buffer's) do not conflict
    let flat = dev.zeros::<f32>(16).unwrap();
    let (lo, hi) = (flat.view(0, 8).unwrap(), flat.view(8, 8).unwrap());
    dev.fork(&[src.span()]).unwrap();
    dev.on_side(|| copy(dev, &lo, &src)).unwrap();
    copy(dev, &hi, &src).unwrap();
    dev.join().unwrap();
    assert_eq!(dev.download(&flat).unwrap(), vec![1.0; 16]);
}

#[test]
fn freeing_on_the_main_stream_what_side_work_uses_is_an_error_at_the_join() {
    let dev = &two_stream_devices()[0];
    let out = dev.zeros::<f32>(4).unwrap();
    let src = dev.upload(&[7f32; 4]).unwrap();
    dev.fork(&[]).unwrap();
    dev.on_side(|| copy(dev, &out, &src)).unwrap();
    drop(src);
    let e = dev.join().unwrap_err().to_string();
    assert!(e.contains("freed on the main stream"), "{e}");
    // the deferred copy still read live memory (kept until the join)
    assert_eq!(dev.download(&out).unwrap(), vec![7.0; 4]);
}

#[test]
fn misuse_of_the_lanes_is_refused() {
    let dev = &two_stream_devices()[0];
    assert!(dev.set_streams(3).is_err());
    let e = dev.on_side(|| dev.on_side(|| Ok(()))).unwrap_err();
    assert!(e.to_string().contains("inside on_side"), "{e}");
    // a capture may not start while side work is pending
    let (a, b) = (dev.zeros::<f32>(2).unwrap(), dev.zeros::<f32>(2).unwrap());
    dev.fork(&[]).unwrap();
    dev.on_side(|| copy(dev, &a, &b)).unwrap();
    assert!(dev.capture(|| Ok(())).is_err());
    assert!(dev.set_streams(1).is_err());
    dev.join().unwrap();
    dev.set_streams(1).unwrap();
}

/// Fork, side work and join inside a capture: the graph replays the side work (on a GPU the
/// side stream joins the capture through the fork's event and leaves it at the join), and
/// buffers the side work allocates and frees inside the capture become the graph's own.
#[test]
fn two_stream_work_is_captured_and_replayed() {
    for dev in two_stream_devices() {
        let src = dev.upload(&[1f32, 2.0, 3.0, 4.0]).unwrap();
        let (a, b) = (dev.zeros::<f32>(4).unwrap(), dev.zeros::<f32>(4).unwrap());
        let graph = dev
            .capture(|| {
                dev.fork(&[src.span()])?;
                dev.on_side(|| {
                    let t = dev.alloc::<f32>(4)?;
                    copy(&dev, &t, &src)?;
                    copy(&dev, &a, &t)
                })?;
                copy(&dev, &b, &src)?;
                dev.join()
            })
            .unwrap();
        graph.launch().unwrap();
        dev.synchronize().unwrap();
        assert_eq!(dev.download(&a).unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
        assert_eq!(dev.download(&b).unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
        println!("two streams captured and replayed on {}", dev.name());
    }
}

/// A capture that forks and does not join would fail on a GPU (the side stream joined the capture
/// at the fork and must leave it before its end): the emulator refuses it too, at the capture's
/// end, and a capture cannot start with a fork still open.
#[test]
fn a_capture_must_join_what_it_forks() {
    let dev = &two_stream_devices()[0];
    let (a, b) = (dev.zeros::<f32>(2).unwrap(), dev.zeros::<f32>(2).unwrap());
    let e = dev
        .capture(|| {
            dev.fork(&[])?;
            dev.on_side(|| copy(dev, &a, &b))
        })
        .err()
        .expect("an unjoined capture is refused");
    assert!(e.to_string().contains("capture's end"), "{e}");
    dev.join().unwrap();
    dev.fork(&[]).unwrap();
    let e = dev.capture(|| Ok(())).err().expect("refused");
    assert!(e.to_string().contains("capture's start"), "{e}");
    dev.join().unwrap();
    dev.capture(|| Ok(())).unwrap();
}
