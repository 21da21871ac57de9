//! The CPU SIMT emulator (src/device/emu.rs, cuda/emu/) on its own test kernels
//! (cuda/emu/tests/emu_tests.cu): block and warp collectives, dynamic shared memory, the
//! tensor-core twins against plain loops, bf16/fp16 rounding, and the errors it must report
//! instead of hanging or aborting.

use advdmd::device::emu::{emu_kernel_names, emu_launch, set_schedule, EmuError, Schedule};
use advdmd::device::emu_memory::HostMemory;
use advdmd::device::tma::{TileMap4, TmaMap};
use std::ffi::c_void;

/// `&mut value` as the launch's untyped argument pointer.
fn arg<T>(v: &mut T) -> *mut c_void {
    (v as *mut T).cast()
}

/// A deterministic pseudo-random sequence in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

#[test]
fn block_sum_over_rows_not_a_multiple_of_the_block() {
    for (rows, n, threads) in [
        (3usize, 1000usize, 256u32),
        (5, 37, 64),
        (2, 4099, 1024),
        (4, 1, 32),
    ] {
        let mut x = values(rows * n, n as u64);
        x[0] = 0.0; // one zero, for the nonzero count
        let mut out = vec![f32::NAN; rows];
        let mut nonzero = vec![-1i32; rows];
        let (mut px, mut po, mut pn, mut n32) =
            (x.as_ptr(), out.as_mut_ptr(), nonzero.as_mut_ptr(), n as i32);
        emu_launch(
            "emu_test_block_sum",
            [rows as u32, 1, 1],
            [threads, 1, 1],
            0,
            &mut [arg(&mut px), arg(&mut po), arg(&mut pn), arg(&mut n32)],
        )
        .unwrap();
        for r in 0..rows {
            let row = &x[r * n..(r + 1) * n];
            let want: f64 = row.iter().map(|&v| v as f64).sum();
            assert!(
                (out[r] as f64 - want).abs() < 1e-4 * (1.0 + want.abs()) + 1e-4,
                "rows {rows} n {n} threads {threads}: row {r}: {} vs {want}",
                out[r]
            );
            // Threads with at least one nonzero element in their block-stride slice.
            let want_nz = (0..threads as usize)
                .filter(|&t| (t..n).step_by(threads as usize).any(|i| row[i] != 0.0))
                .count();
            assert_eq!(nonzero[r] as usize, want_nz, "row {r}");
        }
    }
}

#[test]
fn warp_intrinsics_match_cuda_semantics() {
    for threads in [64u32, 96] {
        let mut out = vec![i32::MIN; 12 * threads as usize];
        let mut po = out.as_mut_ptr();
        emu_launch(
            "emu_test_warp_ops",
            [1, 1, 1],
            [threads, 1, 1],
            0,
            &mut [arg(&mut po)],
        )
        .unwrap();
        for t in 0..threads as i32 {
            let o = &out[12 * t as usize..12 * t as usize + 12];
            let (lane, base) = (t % 32, t - t % 32);
            let v = |l: i32| 100 * (base + l);
            let ballot3 = (0..32).filter(|l| l % 3 == 0).fold(0u32, |m, l| m | 1 << l) as i32;
            let seg = lane & !7;
            let want = [
                v(3),
                v(lane ^ 5),
                if lane + 4 < 32 { v(lane + 4) } else { v(lane) },
                if lane >= 4 { v(lane - 4) } else { v(lane) },
                v(lane), // lane ^ 9 leaves the 8-lane segment
                v(seg + 5),
                ballot3,
                1,
                1,
                if lane % 2 == 0 { v(lane ^ 2) } else { -1 },
                if lane % 2 == 0 { 0b0101_0101 } else { -1 },
                (if lane < 31 { v(lane + 1) } else { v(lane) }) as f32 as i32,
            ];
            assert_eq!(o, want, "thread {t} of {threads}");
        }
    }
}

#[test]
fn partial_warp_reads_missing_lanes_as_poison() {
    let mut sums = vec![0f32; 2];
    let mut ps = sums.as_mut_ptr();
    emu_launch(
        "emu_test_partial_warp",
        [1, 1, 1],
        [48, 1, 1],
        0,
        &mut [arg(&mut ps)],
    )
    .unwrap();
    assert_eq!(sums[0], 32.0);
    assert!(
        sums[1].is_nan(),
        "a warp of 16 lanes summing over 32: {}",
        sums[1]
    );
}

#[test]
fn tiled_matmul_with_dynamic_shared_memory() {
    for (m, n, k) in [(33usize, 17usize, 40usize), (16, 16, 16), (5, 70, 3)] {
        let a = values(m * k, 1);
        let b = values(k * n, 2);
        let mut c = vec![f32::NAN; m * n];
        let (mut pa, mut pb, mut pc) = (a.as_ptr(), b.as_ptr(), c.as_mut_ptr());
        let (mut mi, mut ni, mut ki) = (m as i32, n as i32, k as i32);
        emu_launch(
            "emu_test_matmul",
            [n.div_ceil(16) as u32, m.div_ceil(16) as u32, 1],
            [16, 16, 1],
            2 * 16 * 16 * 4,
            &mut [
                arg(&mut pa),
                arg(&mut pb),
                arg(&mut pc),
                arg(&mut mi),
                arg(&mut ni),
                arg(&mut ki),
            ],
        )
        .unwrap();
        for i in 0..m {
            for j in 0..n {
                let want: f32 = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
                let got = c[i * n + j];
                assert!(
                    (got - want).abs() < 1e-4,
                    "{m}x{n}x{k} at ({i},{j}): {got} vs {want}"
                );
            }
        }
    }
}

#[test]
fn dynamic_shared_memory_is_poisoned_before_every_block() {
    let mut out = vec![0f32; 3 * 32];
    let mut po = out.as_mut_ptr();
    emu_launch(
        "emu_test_smem_poison",
        [3, 1, 1],
        [32, 1, 1],
        32 * 4,
        &mut [arg(&mut po)],
    )
    .unwrap();
    assert!(out.iter().all(|v| v.is_nan()), "{out:?}");
}

fn bf16_bits(x: f32) -> u16 {
    half::bf16::from_f32(x).to_bits()
}

#[test]
fn mma_and_ldmatrix_match_a_plain_product() {
    // bf16 inputs with few significant bits so every product and sum is exact in f32.
    let round = |v: f32| (v * 8.0).round() / 8.0;
    let a: Vec<f32> = values(256, 7).into_iter().map(round).collect();
    let b: Vec<f32> = values(256, 8).into_iter().map(round).collect();
    let c: Vec<f32> = values(256, 9).into_iter().map(round).collect();
    let ab: Vec<u16> = a.iter().map(|&v| bf16_bits(v)).collect();
    let bb: Vec<u16> = b.iter().map(|&v| bf16_bits(v)).collect();
    for mode in 0..3i32 {
        let mut d = vec![f32::NAN; 256];
        let (mut pa, mut pb, mut pc, mut pd, mut md) =
            (ab.as_ptr(), bb.as_ptr(), c.as_ptr(), d.as_mut_ptr(), mode);
        emu_launch(
            "emu_test_mma",
            [1, 1, 1],
            [32, 1, 1],
            0,
            &mut [
                arg(&mut pa),
                arg(&mut pb),
                arg(&mut pc),
                arg(&mut pd),
                arg(&mut md),
            ],
        )
        .unwrap();
        for i in 0..16 {
            for j in 0..16 {
                let want =
                    c[i * 16 + j] + (0..16).map(|k| a[i * 16 + k] * b[k * 16 + j]).sum::<f32>();
                assert_eq!(d[i * 16 + j], want, "mode {mode} at ({i},{j})");
            }
        }
    }
}

/// stmatrix_x4 writes each lane's fragments to the rows the lanes addressed (the PTX ISA
/// layout: ldmatrix_x4's inverse), and ldmatrix_x4 of the same addresses gives them back.
#[test]
fn stmatrix_stores_fragments_as_ldmatrix_reads_them() {
    let mut out = vec![0xFFFFu16; 32 * 8];
    let mut out2 = vec![0u32; 32 * 4];
    let (mut po, mut po2) = (out.as_mut_ptr(), out2.as_mut_ptr());
    emu_launch(
        "emu_test_stmatrix",
        [1, 1, 1],
        [32, 1, 1],
        0,
        &mut [arg(&mut po), arg(&mut po2)],
    )
    .unwrap();
    for m in 0..4usize {
        for q in 0..8usize {
            let row = (8 * m + q) ^ 5;
            for c in 0..8usize {
                let want = (64 * m + 8 * q + c) as u16;
                assert_eq!(out[row * 8 + c], want, "matrix {m} row {q} col {c}");
            }
        }
    }
    for lane in 0..32u32 {
        for j in 0..4u32 {
            let v = 64 * j + 8 * (lane / 4) + 2 * (lane % 4);
            assert_eq!(
                out2[(4 * lane + j) as usize],
                v | (v + 1) << 16,
                "lane {lane} reg {j}"
            );
        }
    }
}

#[test]
fn bf16_and_fp16_round_to_nearest_even() {
    let mut x: Vec<f32> = values(4096, 3).into_iter().map(|v| v * 70000.0).collect();
    x.extend([
        0.0,
        -0.0,
        1.0 + 1.0 / 256.0, // bf16 tie: rounds to even (1.0)
        1.0 + 3.0 / 256.0, // bf16 tie: rounds up
        65504.0,
        65520.0, // fp16 overflows to inf
        1e-7,    // fp16 subnormal
        6e-8,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::MAX,
        f32::MIN_POSITIVE,
    ]);
    let n = x.len();
    let (mut y, mut h) = (vec![0u16; n], vec![0u16; n]);
    let (mut px, mut py, mut ph, mut ni) = (x.as_ptr(), y.as_mut_ptr(), h.as_mut_ptr(), n as i32);
    emu_launch(
        "emu_test_convert",
        [n.div_ceil(128) as u32, 1, 1],
        [128, 1, 1],
        0,
        &mut [arg(&mut px), arg(&mut py), arg(&mut ph), arg(&mut ni)],
    )
    .unwrap();
    for i in 0..n {
        assert_eq!(y[i], bf16_bits(x[i]), "bf16({})", x[i]);
        assert_eq!(h[i], half::f16::from_f32(x[i]).to_bits(), "f16({})", x[i]);
    }
}

/// The deadlock report of one block of `threads` running test kernel `name` on a 64-float buffer
/// (`smem` dynamic shared bytes); it panics if the launch does not deadlock.
fn deadlock_of(name: &str, threads: u32, smem: u32) -> String {
    let mut x = vec![0f32; 64];
    let mut px = x.as_mut_ptr();
    let err = emu_launch(name, [1, 1, 1], [threads, 1, 1], smem, &mut [arg(&mut px)]).unwrap_err();
    let EmuError::Deadlock(msg) = err else {
        panic!("{name}: expected a deadlock, got {err}")
    };
    eprintln!("{msg}");
    msg
}

#[test]
fn a_barrier_that_half_the_block_skips_is_a_deadlock() {
    let mut x = vec![0f32; 32];
    let mut px = x.as_mut_ptr();
    let err = emu_launch(
        "emu_test_deadlock",
        [2, 1, 1],
        [32, 1, 1],
        0,
        &mut [arg(&mut px)],
    )
    .unwrap_err();
    let EmuError::Deadlock(msg) = &err else {
        panic!("expected a deadlock, got {err}")
    };
    eprintln!("{msg}");
    assert!(msg.contains("emu_test_deadlock"), "{msg}");
    assert!(msg.contains("block (0,0,0)"), "{msg}");
    assert!(msg.contains("threads 0-15 wait at __syncthreads"), "{msg}");
    assert!(msg.contains("threads 16-31 have exited"), "{msg}");

    // The emulator is usable again afterwards on this thread.
    block_sum_over_rows_not_a_multiple_of_the_block();
}

#[test]
fn divergent_barriers_and_warp_deadlocks_are_reported() {
    let mut x = vec![0f32; 64];
    let mut px = x.as_mut_ptr();
    let err = emu_launch(
        "emu_test_divergent",
        [1, 1, 1],
        [64, 1, 1],
        0,
        &mut [arg(&mut px)],
    )
    .unwrap_err();
    assert!(
        matches!(&err, EmuError::Deadlock(m) if m.contains("different __syncthreads")),
        "{err}"
    );
    let msg = deadlock_of("emu_test_warp_deadlock", 64, 0);
    assert!(msg.contains("__shfl_xor_sync"), "{msg}");
    assert!(msg.contains("0xffff0000"), "the missing lanes: {msg}");
    let err = emu_launch(
        "emu_test_bad_mask",
        [1, 1, 1],
        [32, 1, 1],
        0,
        &mut [arg(&mut px)],
    )
    .unwrap_err();
    eprintln!("{err}");
    assert!(
        matches!(&err, EmuError::Fault(m) if m.contains("not in the mask")),
        "{err}"
    );
}

#[test]
fn launch_errors() {
    assert!(emu_kernel_names().contains(&"emu_test_args"));
    let mut out = 0i64;
    let (mut po, mut a, mut b, mut c) = (&mut out as *mut i64, 40i64, 2u32, 0.5f32);
    let err = emu_launch("no_such_kernel", [1, 1, 1], [32, 1, 1], 0, &mut []).unwrap_err();
    assert_eq!(err, EmuError::UnknownKernel("no_such_kernel".into()));
    let err = emu_launch(
        "emu_test_args",
        [1, 1, 1],
        [32, 1, 1],
        0,
        &mut [arg(&mut po)],
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            EmuError::ArgCount {
                expected: 4,
                got: 1,
                ..
            }
        ),
        "{err}"
    );
    let mut args = [arg(&mut po), arg(&mut a), arg(&mut b), arg(&mut c)];
    for (grid, block) in [
        ([1, 1, 1], [1025, 1, 1]),
        ([1, 1, 1], [32, 33, 1]),
        ([0, 1, 1], [32, 1, 1]),
        ([1, 1, 1], [32, 1, 0]),
    ] {
        let err = emu_launch("emu_test_args", grid, block, 0, &mut args).unwrap_err();
        assert!(
            matches!(err, EmuError::BadLaunch { .. }),
            "{grid:?} {block:?}: {err}"
        );
    }
    emu_launch("emu_test_args", [1, 1, 1], [32, 1, 1], 0, &mut args).unwrap();
    assert_eq!(out, 42);
}

#[test]
fn launches_from_parallel_threads_do_not_interfere() {
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(tiled_matmul_with_dynamic_shared_memory);
            s.spawn(warp_intrinsics_match_cuda_semantics);
        }
    });
}

#[test]
fn mbarrier_pipeline_with_named_barrier_turns() {
    let n = 7usize;
    let mut out = vec![0f32; 32];
    let mut po = out.as_mut_ptr();
    let mut ni = n as i32;
    emu_launch(
        "emu_test_pipeline",
        [2, 1, 1],
        [96, 1, 1],
        2 * 32 * 4 + 4 * 8,
        &mut [arg(&mut po), arg(&mut ni)],
    )
    .unwrap();
    // Two blocks, each adding every item once.
    for (lane, &v) in out.iter().enumerate() {
        let want: f32 = (0..n).map(|i| (i * 32 + lane) as f32).sum::<f32>() * 2.0;
        assert_eq!(v, want, "lane {lane}");
    }
}

#[test]
fn mbarrier_and_named_barrier_misuse_is_reported() {
    let msg = deadlock_of("emu_test_mbar_deadlock", 32, 8);
    assert!(msg.contains("threads 0-31 spin at mbarrier wait"), "{msg}");
    let msg = deadlock_of("emu_test_named_dangling", 64, 0);
    assert!(msg.contains("named barrier 3"), "{msg}");
    // The emulator is usable again afterwards on this thread.
    mbarrier_pipeline_with_named_barrier_turns();
}

/// What a GPU's asynchronous wgmma would get wrong and the emulator's at-once twin cannot show:
/// a cp.async into a shared operand of a product no thread of its warpgroup has waited for, and a
/// wgmma wait (an `.aligned` instruction) executed by some warps of the warpgroup and not others.
#[test]
fn wgmma_hazards_are_faults() {
    let mut out = vec![0f32; 128];
    let src = [0f32; 4];
    let run = |name: &str, out: &mut Vec<f32>, flag: i32, smem: u32| {
        let (mut po, mut ps, mut f) = (out.as_mut_ptr(), src.as_ptr(), flag);
        let mut args = vec![arg(&mut po)];
        if name.ends_with("war") {
            args.push(arg(&mut ps));
        }
        args.push(arg(&mut f));
        emu_launch(name, [1, 1, 1], [128, 1, 1], smem, &mut args)
    };
    run("emu_test_wgmma_war", &mut out, 0, 5 << 10).unwrap();
    let err = run("emu_test_wgmma_war", &mut out, 1, 5 << 10).unwrap_err();
    let EmuError::Fault(msg) = err else {
        panic!("expected a fault, got {err}")
    };
    assert!(msg.contains("still reads"), "{msg}");
    run("emu_test_wgmma_divergent_wait", &mut out, 0, 0).unwrap();
    let err = run("emu_test_wgmma_divergent_wait", &mut out, 1, 0).unwrap_err();
    let EmuError::Fault(msg) = err else {
        panic!("expected a fault, got {err}")
    };
    assert!(msg.contains("different sequences of .aligned"), "{msg}");
    // Stores through the generic proxy reach a wgmma only across a proxy fence, by the writer
    // after its stores or by the reader after the barrier.
    for mode in [1, 2] {
        out.fill(0.0);
        run("emu_test_wgmma_proxy", &mut out, mode, 5 << 10).unwrap();
        assert!(out.iter().all(|&v| v == 16.0), "mode {mode}: {out:?}");
    }
    for mode in [0, 3] {
        let err = run("emu_test_wgmma_proxy", &mut out, mode, 5 << 10).unwrap_err();
        let EmuError::Fault(msg) = err else {
            panic!("mode {mode}: expected a fault, got {err}")
        };
        assert!(msg.contains("no fence_proxy_async"), "{msg}");
    }
}

/// Runs `emu_test_race` (4 blocks of 64 threads, the value in dynamic shared memory) under
/// `schedule`: what each thread read, and the order the blocks ran in.
fn race_run(schedule: Schedule, sync: bool) -> (Vec<f32>, Vec<i32>) {
    race_run_in(schedule, sync, false)
}

/// `race_run` with the value in dynamic or (`in_static`) static shared memory.
fn race_run_in(schedule: Schedule, sync: bool, in_static: bool) -> (Vec<f32>, Vec<i32>) {
    let (blocks, threads) = (4usize, 64usize);
    let mut out = vec![0f32; blocks * threads];
    let mut order = vec![-1i32; blocks];
    let mut counter = 0i32;
    let (mut po, mut pord, mut pc, mut s, mut st) = (
        out.as_mut_ptr(),
        order.as_mut_ptr(),
        &mut counter as *mut i32,
        sync as i32,
        in_static as i32,
    );
    set_schedule(Some(schedule));
    let r = emu_launch(
        "emu_test_race",
        [blocks as u32, 1, 1],
        [threads as u32, 1, 1],
        4,
        &mut [
            arg(&mut po),
            arg(&mut pord),
            arg(&mut pc),
            arg(&mut s),
            arg(&mut st),
        ],
    );
    set_schedule(None);
    r.unwrap();
    (out, order)
}

#[test]
fn other_schedules_expose_a_missing_barrier() {
    let wrote = |out: &[f32], b: usize| {
        out[b * 64..(b + 1) * 64]
            .iter()
            .all(|&v| v == 1.0 + b as f32)
    };
    let schedules = [
        Schedule::Forward,
        Schedule::Reverse,
        Schedule::Shuffle(1),
        Schedule::Shuffle(7),
    ];
    // With the barrier every schedule reads thread 0's value.
    for s in schedules {
        let (out, _) = race_run(s, true);
        assert!((0..4).all(|b| wrote(&out, b)), "{s:?}: {out:?}");
    }
    // Without it, forward runs thread 0 first and hides the race; reverse runs it last, so every
    // other thread reads the poison; a shuffle puts some readers before it.
    let (out, order) = race_run(Schedule::Forward, false);
    assert!((0..4).all(|b| wrote(&out, b)));
    assert_eq!(order, [0, 1, 2, 3]);
    let (out, order) = race_run(Schedule::Reverse, false);
    for b in 0..4 {
        assert_eq!(out[b * 64], 1.0 + b as f32);
        assert!(
            out[b * 64 + 1..(b + 1) * 64].iter().all(|v| v.is_nan()),
            "{out:?}"
        );
    }
    assert_eq!(order, [3, 2, 1, 0]);
    for seed in [1, 7] {
        let (out, order) = race_run(Schedule::Shuffle(seed), false);
        assert!(
            (0..4).all(|b| out[b * 64..(b + 1) * 64].iter().any(|v| v.is_nan())),
            "{out:?}"
        );
        let mut sorted = order.clone();
        sorted.sort();
        assert_eq!(sorted, [0, 1, 2, 3], "every block runs once");
    }
    // The same seed gives the same run; another seed another.
    let bits = |(out, order): (Vec<f32>, Vec<i32>)| {
        (out.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), order)
    };
    let seven = bits(race_run(Schedule::Shuffle(7), false));
    assert_eq!(seven, bits(race_run(Schedule::Shuffle(7), false)));
    assert_ne!(seven, bits(race_run(Schedule::Shuffle(1), false)));
}

#[test]
fn static_shared_memory_is_poisoned_in_every_block() {
    // Thread 0 of each block writes the block's value last (reverse order) without a barrier:
    // every other thread reads static shared memory before this block wrote it, so it must see the
    // poison — in every block, not the block before's value — as in dynamic shared memory.
    for in_static in [false, true] {
        let (out, _) = race_run_in(Schedule::Reverse, false, in_static);
        for b in 0..4 {
            assert_eq!(out[b * 64], 1.0 + b as f32);
            let early = &out[b * 64 + 1..(b + 1) * 64];
            assert!(
                early.iter().all(|v| v.to_bits() == u32::MAX),
                "static {in_static}, block {b}: {early:?}"
            );
        }
        // A second launch on this thread starts from the poison too.
        let (again, _) = race_run_in(Schedule::Reverse, false, in_static);
        assert_eq!(
            out.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            again.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        let (synced, _) = race_run_in(Schedule::Shuffle(3), true, in_static);
        assert!((0..256).all(|i| synced[i] == 1.0 + (i / 64) as f32));
    }
}

/// Row sums and sums of squares by `emu_test_two_sums` (8 rows of 1000, blocks of 256 threads)
/// under `schedule`.
fn two_sums(schedule: Schedule, racy: bool) -> Vec<f32> {
    let (rows, n) = (8usize, 1000usize);
    let x = values(rows * n, 5);
    let mut out = vec![0f32; 2 * rows];
    let (mut px, mut po, mut pn, mut pr) = (x.as_ptr(), out.as_mut_ptr(), n as i32, racy as i32);
    set_schedule(Some(schedule));
    let r = emu_launch(
        "emu_test_two_sums",
        [rows as u32, 1, 1],
        [256, 1, 1],
        32 * 4,
        &mut [arg(&mut px), arg(&mut po), arg(&mut pn), arg(&mut pr)],
    );
    set_schedule(None);
    r.unwrap();
    out
}

#[test]
fn slow_warps_expose_a_write_after_read_race() {
    // Without its first barrier a second block_sum may overwrite the first one's partials before
    // every warp has read them: every thread's reads and writes are five shuffles apart, so no
    // order of one pass shows it, but a shuffle's slow warps read after the fast ones' next writes.
    let safe = two_sums(Schedule::Forward, false);
    for s in [
        Schedule::Forward,
        Schedule::Reverse,
        Schedule::Shuffle(1),
        Schedule::Shuffle(2),
    ] {
        assert_eq!(two_sums(s, false), safe, "{s:?}");
    }
    assert_eq!(two_sums(Schedule::Forward, true), safe);
    assert_eq!(two_sums(Schedule::Reverse, true), safe);
    for seed in [1, 2] {
        assert_ne!(two_sums(Schedule::Shuffle(seed), true), safe, "seed {seed}");
    }
}

#[test]
fn cp_async_copies_land_at_the_wait_that_covers_them() {
    let src: Vec<f32> = (0..384).map(|i| i as f32).collect();
    let mut out = vec![0f32; 6 * 32];
    let (mut po, mut ps) = (out.as_mut_ptr(), src.as_ptr());
    emu_launch(
        "emu_test_cp_async_late",
        [1, 1, 1],
        [32, 1, 1],
        2048,
        &mut [arg(&mut po), arg(&mut ps)],
    )
    .unwrap();
    for t in 0..32 {
        let o = &out[6 * t..6 * t + 6];
        let v = |region: usize| src[128 * region + 4 * t];
        assert!(o[0].is_nan(), "thread {t}: group 0 before any wait: {o:?}");
        assert_eq!(o[1], v(0), "thread {t}: group 0 after wait<1>");
        assert!(o[2].is_nan(), "thread {t}: group 1 after wait<1>: {o:?}");
        assert_eq!(o[3], v(1), "thread {t}: group 1 after wait<0>");
        assert!(
            o[4].is_nan(),
            "thread {t}: an uncommitted copy after wait<0>: {o:?}"
        );
        assert_eq!(
            o[5],
            v(2),
            "thread {t}: the uncommitted copy after the mbarrier arrival"
        );
    }
}

#[test]
fn schedules_parse_and_bad_ones_are_refused() {
    assert_eq!(Schedule::parse("forward"), Ok(Schedule::Forward));
    assert_eq!(Schedule::parse(""), Ok(Schedule::Forward));
    assert_eq!(Schedule::parse("reverse"), Ok(Schedule::Reverse));
    assert_eq!(Schedule::parse("shuffle"), Ok(Schedule::Shuffle(1)));
    assert_eq!(Schedule::parse("shuffle:42"), Ok(Schedule::Shuffle(42)));
    for bad in ["backward", "shuffle:", "shuffle:x", "shuffle:-1"] {
        let e = Schedule::parse(bad).unwrap_err();
        assert!(e.contains(bad) && e.contains("shuffle:SEED"), "{e}");
    }
}

/// Runs `emu_test_overrun` (one block of 64 threads) over a 100-float buffer of emulator memory,
/// `extra` elements past its end, starting `before` elements before its start; returns the
/// buffer.
fn overrun(extra: i32, before: usize) -> Vec<f32> {
    let n = 100usize;
    let mem = HostMemory::filled(n * 4, 0xFF).unwrap();
    let p = mem.ptr() as *mut f32;
    let (mut po, mut pn, mut pe) = (p.wrapping_sub(before), (n + before) as i32, extra);
    emu_launch(
        "emu_test_overrun",
        [1, 1, 1],
        [64, 1, 1],
        0,
        &mut [arg(&mut po), arg(&mut pn), arg(&mut pe)],
    )
    .unwrap();
    // SAFETY: `mem` holds n floats.
    unsafe { std::slice::from_raw_parts(p, n) }.to_vec()
}

#[test]
fn a_kernel_running_past_a_buffer_faults_and_is_named() {
    const CHILD: &str = "ADVDMD_EMU_OVERRUN_CHILD";
    if let Ok(how) = std::env::var(CHILD) {
        // The child: write past the end ("end") or before the start ("start", with the guard
        // page there); it must die of it.
        match how.as_str() {
            "end" => drop(overrun(1, 0)),
            "start" => drop(overrun(0, 4)),
            "copy" => {
                // a cp.async of the 16 bytes after a 64-byte buffer: it faults when it lands
                let mem = HostMemory::filled(64, 0).unwrap();
                one_vector_access(mem.ptr(), 64, 0).unwrap();
            }
            _ => drop(overrun(0, 0)),
        }
        println!("no fault");
        return;
    }
    let written = overrun(0, 0);
    assert!((0..100).all(|i| written[i] == i as f32));
    // 100 floats are 400 bytes, a whole number of 16-byte granules: the 101st float is the first
    // byte of the guard page (and with ADVDMD_EMU_GUARD=start the float before the first is the
    // last of the guard page before it).
    let child = |how: &str| {
        std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "a_kernel_running_past_a_buffer_faults_and_is_named",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD, how)
            .env(
                "ADVDMD_EMU_GUARD",
                if how == "start" { "start" } else { "end" },
            )
            .output()
            .unwrap()
    };
    use std::os::unix::process::ExitStatusExt;
    for (how, kernel, thread) in [
        ("end", "emu_test_overrun", 36),
        ("start", "emu_test_overrun", 0),
        ("copy", "emu_test_misaligned", 0),
    ] {
        let out = child(how);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGSEGV),
            "{how}: {:?}: {stderr}",
            out.status
        );
        let at = format!("kernel {kernel}, block (0,0,0), thread ({thread},0,0)");
        assert!(
            stderr.contains("emulator: SIGSEGV") && stderr.contains(&at),
            "{how}: {stderr}"
        );
        assert!(!String::from_utf8_lossy(&out.stdout).contains("no fault"));
        if how == "copy" {
            assert!(
                stderr.contains("landing the cp.async of 16 bytes")
                    && stderr.contains("emu_tests.cu:"),
                "{stderr}"
            );
        }
    }
    // The child itself runs to its end when nothing overruns.
    let ok = child("none");
    assert!(ok.status.success(), "{:?}", ok.status);
    assert!(String::from_utf8_lossy(&ok.stdout).contains("no fault"));
}

/// `emu_test_misaligned`: one 16-byte access (`how`: 0 cp.async, 1 load16, 2 __ldg) at `src` +
/// `offset` bytes; the four floats read.
fn one_vector_access(src: *const u8, offset: i32, how: i32) -> Result<Vec<f32>, EmuError> {
    let mut out = vec![0f32; 4];
    let (mut po, mut ps, mut off, mut h) = (out.as_mut_ptr(), src, offset, how);
    emu_launch(
        "emu_test_misaligned",
        [1, 1, 1],
        [32, 1, 1],
        16,
        &mut [arg(&mut po), arg(&mut ps), arg(&mut off), arg(&mut h)],
    )
    .map(|()| out)
}

#[test]
fn misaligned_vector_accesses_are_faults() {
    // 16 floats 0..16 in emulator memory (16-byte aligned).
    let mem = HostMemory::filled(64, 0).unwrap();
    let src = mem.ptr() as *mut f32;
    for i in 0..16 {
        // SAFETY: `mem` holds 16 floats.
        unsafe { *src.add(i) = i as f32 };
    }
    let run = |offset: i32, how: i32| one_vector_access(mem.ptr(), offset, how);
    for how in 0..3 {
        assert_eq!(run(16, how).unwrap(), [4.0, 5.0, 6.0, 7.0], "how {how}");
        for offset in [4, 8, 12] {
            let Err(EmuError::Fault(msg)) = run(offset, how) else {
                panic!("how {how}, offset {offset}: expected a fault")
            };
            assert!(msg.contains("aligned"), "{msg}");
        }
    }
}

/// The TMA twin: a box lands swizzled as the 128-byte swizzle places it (chunk c of row r at
/// c ^ r mod 8), rows past the tensor zero; only once a thread waits on its mbarrier (a read
/// before sees the poison); a destination off the swizzle's 1024-byte pattern and a copy nobody
/// waits for are faults.
#[test]
fn tma_copies_land_swizzled_late_and_zero_filled() {
    // [B = 1, L = 20, H = 2, D = 64] bf16: element (l, h, d) holds l·1000 + h·100 + d.
    let (l, h, d) = (20usize, 2usize, 64usize);
    let x: Vec<u16> = (0..l * h * d)
        .map(|i| ((i / (h * d)) * 1000 + (i / d % h) * 100 + i % d) as u16)
        .collect();
    let map = TileMap4 {
        elem_bytes: 2,
        base: x.as_ptr() as u64,
        dims: [d as u64, h as u64, l as u64, 1],
        strides: [2 * d as u64, 2 * (h * d) as u64, 2 * (l * h * d) as u64],
        boxes: [64, 1, 16, 1],
    };
    map.check().unwrap();
    let run = |c2: i32, at: i32, wait: i32| {
        let mut m: TmaMap = map.emulator_map();
        let mut out = vec![0u16; 16 * 64 + 1];
        let mut po = out.as_mut_ptr();
        let (mut c2, mut at2, mut w) = (c2, at, wait);
        let smem = (2048 + at + 16) as u32;
        emu_launch(
            "emu_test_tma",
            [1, 1, 1],
            [64, 1, 1],
            smem,
            &mut [
                arg(&mut m),
                arg(&mut po),
                arg(&mut c2),
                arg(&mut at2),
                arg(&mut w),
            ],
        )
        .map(|()| out)
    };
    // Rows 10..26 of head 1: rows 20.. are past the tensor.
    let out = run(10, 1024, 1).unwrap();
    assert_eq!(out[16 * 64], 0xFFFF, "read before the wait: the poison");
    for r in 0..16usize {
        for c in 0..8usize {
            for e in 0..8usize {
                let got = out[r * 64 + ((c ^ (r % 8)) * 8) + e];
                let row = 10 + r;
                let want = if row < l {
                    (row * 1000 + 100 + c * 8 + e) as u16
                } else {
                    0
                };
                assert_eq!(got, want, "row {r} chunk {c} element {e}");
            }
        }
    }
    let err = run(0, 512, 1).unwrap_err().to_string();
    assert!(err.contains("1024-byte aligned"), "{err}");
    let err = run(0, 1024, 0).unwrap_err().to_string();
    assert!(err.contains("bulk tensor copies pending"), "{err}");
}
