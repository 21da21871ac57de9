//! Programmatic dependent launches (`ADVDMD_PDL=1`, `KernelDevice::set_pdl`): each kernel may be
//! scheduled while the one before it on the stream finishes, and waits in its `kernel_prologue`
//! (cuda/common.cuh) before touching memory. A chain of kernels that each read what the previous
//! wrote, and overwrite what it read, gives the same bits with and without, launched directly and
//! replayed from a graph. (The emulator runs launches one after another either way: there the
//! test checks the chain itself; on a GPU, the attribute and the prologue.)

use advdmd::device::kernel::{DevBuf, KernelDevice, KernelResult};
use advdmd::kernels::elementwise::dev::{activation_fwd_into, cast_bf16_to_f32_into, copy};
use advdmd::kernels::elementwise::Activation;
use half::bf16;

/// Large enough (8 MB a buffer) that a kernel reading early would see its input half-written.
const N: usize = 1 << 22;

fn chain(
    dev: &KernelDevice,
    x: &DevBuf<bf16>,
    y: &DevBuf<bf16>,
    f: &DevBuf<f32>,
) -> KernelResult<()> {
    for _ in 0..6 {
        activation_fwd_into(dev, y, x, Activation::Silu)?; // reads x, writes y
        activation_fwd_into(dev, x, y, Activation::GeluTanh)?; // reads y, overwrites x
        cast_bf16_to_f32_into(dev, f, x)?;
        copy(dev, y, x)?;
    }
    Ok(())
}

fn run(dev: &KernelDevice, pdl: bool, graph: bool) -> (Vec<u16>, Vec<u32>) {
    let start: Vec<bf16> = (0..N)
        .map(|i| bf16::from_f32(((i % 97) as f32 - 48.0) * 0.0625))
        .collect();
    let x = dev.upload(&start).unwrap();
    let y = dev.zeros::<bf16>(N).unwrap();
    let f = dev.zeros::<f32>(N).unwrap();
    dev.set_pdl(pdl);
    if graph {
        let g = dev.capture(|| chain(dev, &x, &y, &f)).unwrap();
        g.launch().unwrap();
    } else {
        chain(dev, &x, &y, &f).unwrap();
    }
    dev.set_pdl(false);
    let xs = dev
        .download(&x)
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect();
    let fs = dev
        .download(&f)
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect();
    (xs, fs)
}

#[test]
fn dependent_launches_give_the_same_bits() {
    for dev in super::devices("programmatic dependent launch") {
        let plain = run(&dev, false, false);
        assert!(
            plain.0.iter().any(|&b| b != 0),
            "the chain computed nothing"
        );
        for graph in [false, true] {
            assert!(
                run(&dev, true, graph) == plain,
                "{}: dependent launches (graph: {graph}) differ from plain ones",
                dev.name()
            );
        }
        println!(
            "pdl chain on {}: the same bits with and without",
            dev.name()
        );
    }
}
