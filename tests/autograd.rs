//! The tape itself: seeding gradients on intermediate tensors, parameter gradient accumulation,
//! frozen parameters, no-grad mode, detach, and that the gradient check catches a wrong backward.

mod common;

use advdmd::autograd::{backward, no_grad, record};
use advdmd::ops::linear;
use advdmd::{Param, Tensor, Var};
use common::{assert_close, gradcheck, randn};

#[test]
#[should_panic(expected = "analytic")]
fn gradcheck_catches_a_wrong_backward() {
    // y = 2x with a backward that claims 2.1: the harness must fail.
    gradcheck("wrong", &[randn(&[4, 3], 1)], |v| {
        let out = v[0].value().map(|x| 2.0 * x);
        vec![record("wrong_double", &[&v[0]], out, |g, _| {
            vec![Some(g.map(|x| 2.1 * x))]
        })]
    });
}

#[test]
fn seed_on_intermediate_tensor_grad() {
    // h = x·Wᵀ; loss seeded directly on h with gradient s: dW = sᵀ·x, dx = s·W.
    let x = Var::input(randn(&[3, 4], 2));
    let w = Param::new("w", randn(&[5, 4], 3));
    let h = linear(&x, &w.var(), None);
    let out = h.silu().sum(); // unrelated downstream part, never seeded
    let _ = out;
    let s = randn(&[3, 5], 4);
    let grads = backward(&[(&h, s.clone())]);
    let (xv, wv, sv) = (x.value().f32s(), w.value(), s.f32s());
    let wv = wv.f32s();
    let dx: Vec<f32> = (0..12)
        .map(|i| {
            (0..5)
                .map(|o| sv[(i / 4) * 5 + o] * wv[o * 4 + i % 4])
                .sum()
        })
        .collect();
    let dw: Vec<f32> = (0..20)
        .map(|i| (0..3).map(|r| sv[r * 5 + i / 4] * xv[r * 4 + i % 4]).sum())
        .collect();
    assert_close("dx", grads.get(&x).unwrap().f32s(), &dx, 1e-5, 1e-5);
    assert_close("dW", w.grad().unwrap().f32s(), &dw, 1e-5, 1e-5);
}

#[test]
fn several_seeds_add_up_grad() {
    let x = Var::input(randn(&[6], 5));
    let a = x.scale(3.0);
    let b = x.scale(-2.0);
    let g = backward(&[(&a, Tensor::ones(&[6])), (&b, Tensor::full(&[6], 0.5))]);
    assert_close("seeds", g.get(&x).unwrap().f32s(), &[2.0; 6], 1e-6, 0.0);
}

#[test]
fn param_grads_accumulate_across_backward_calls_until_zeroed() {
    let w = Param::new("w", randn(&[2, 3], 6));
    let x = Var::constant(randn(&[4, 3], 7));
    let loss = || linear(&x, &w.var(), None).sum();
    loss().backward();
    let once = w.grad().unwrap();
    loss().backward();
    let twice = w.grad().unwrap();
    assert_close(
        "accumulated",
        twice.f32s(),
        &once.map(|v| 2.0 * v).to_vec(),
        1e-6,
        1e-6,
    );
    w.zero_grad();
    assert!(w.grad().is_none());
    loss().backward();
    assert_close(
        "after zero_grad",
        w.grad().unwrap().f32s(),
        once.f32s(),
        0.0,
        0.0,
    );
}

#[test]
fn param_used_twice_in_one_graph_gets_both_contributions() {
    let w = Param::new("w", Tensor::from_vec(vec![1.5], &[1, 1]));
    let x = Var::constant(Tensor::from_vec(vec![2.0], &[1, 1]));
    // y = w·(w·x) = w²x → dy/dw = 2wx = 6
    let y = linear(&linear(&x, &w.var(), None), &w.var(), None).sum();
    y.backward();
    assert_close("w used twice", w.grad().unwrap().f32s(), &[6.0], 1e-6, 0.0);
}

#[test]
fn frozen_param_gets_no_grad_but_input_grad_flows() {
    let w = Param::new("frozen", randn(&[5, 4], 8));
    w.set_trainable(false);
    let x = Var::input(randn(&[3, 4], 9));
    let y = linear(&x, &w.var(), None).sum();
    let g = y.backward();
    assert!(
        w.grad().is_none(),
        "a frozen parameter must not receive a gradient"
    );
    let wv = w.value();
    let want: Vec<f32> = (0..12)
        .map(|i| (0..5).map(|o| wv.f32s()[o * 4 + i % 4]).sum())
        .collect();
    assert_close(
        "input grad through frozen",
        g.get(&x).unwrap().f32s(),
        &want,
        1e-5,
        1e-5,
    );
    w.set_trainable(true);
    linear(&x, &w.var(), None).sum().backward();
    assert!(w.grad().is_some(), "unfrozen again, it trains");
}

#[test]
fn no_grad_records_nothing() {
    let w = Param::new("w", randn(&[5, 4], 10));
    let x = Var::input(randn(&[3, 4], 11));
    let y = {
        let _g = no_grad();
        linear(&x, &w.var(), None).silu()
    };
    assert!(!y.requires_grad());
    // Recording is back on after the guard.
    assert!(linear(&x, &w.var(), None).requires_grad());
}

#[test]
fn detach_cuts_the_graph() {
    let x = Var::input(randn(&[3], 12));
    let y = x.scale(2.0).detach().mul(&x).sum();
    let g = y.backward();
    // d/dx of (c·x) with c = 2x held constant is c.
    let want: Vec<f32> = x.value().f32s().iter().map(|v| 2.0 * v).collect();
    assert_close("detach", g.get(&x).unwrap().f32s(), &want, 1e-6, 0.0);
}

#[test]
fn unreached_output_of_multi_output_op_gets_zero_grad() {
    let x = Var::input(randn(&[2, 6], 13));
    let parts = x.split(1, &[2, 4]);
    let g = parts[1].sum().backward();
    let gx = g.get(&x).unwrap().f32s().to_vec();
    for r in 0..2 {
        assert_eq!(&gx[r * 6..r * 6 + 2], &[0.0, 0.0]);
        assert_eq!(&gx[r * 6 + 2..r * 6 + 6], &[1.0; 4]);
    }
}
