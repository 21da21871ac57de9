//! Reverse-mode autograd: variables, parameters, the tape and backward.
//!
//! Every differentiable op produces a node holding its output values, its input variables and a
//! backward closure. Nodes get increasing ids when created, so the creation order *is* the tape:
//! backward walks the nodes reachable from its seeds in decreasing id order, which is a valid
//! reverse topological order without any graph sort.
//!
//! * Backward starts from a scalar loss ([`Var::backward`]) or from seed gradients placed on any
//!   variables ([`backward`]): DMD injects its gradient at x̂0 that way (ALGORITHM.md App. A).
//! * Parameters ([`Param`]) outlive graphs. Their leaf variables accumulate into the parameter's
//!   gradient across backward calls until [`Param::zero_grad`]. A frozen parameter gets no
//!   gradient, but gradients still flow through the ops that use it to their other inputs.
//! * [`no_grad`] turns recording off on this thread (sampling, rollouts, the teacher).

use crate::tensor::Tensor;
use std::cell::Cell;
use std::collections::{BinaryHeap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// Receives the gradients of a node's outputs (zeros for outputs no gradient reached) and which
/// inputs need a gradient; returns one optional gradient per input, shaped like that input.
pub type BackwardFn = Box<dyn Fn(&[Tensor], &[bool]) -> Vec<Option<Tensor>> + Send + Sync>;

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static NO_GRAD_DEPTH: Cell<usize> = const { Cell::new(0) };
}

/// Whether ops on this thread record their backward.
pub fn grad_enabled() -> bool {
    NO_GRAD_DEPTH.with(|d| d.get() == 0)
}

/// Disables recording on this thread until the guard is dropped (nests).
pub fn no_grad() -> NoGradGuard {
    NO_GRAD_DEPTH.with(|d| d.set(d.get() + 1));
    NoGradGuard {
        _not_send: std::marker::PhantomData,
    }
}

pub struct NoGradGuard {
    _not_send: std::marker::PhantomData<*const ()>,
}

impl Drop for NoGradGuard {
    fn drop(&mut self) {
        NO_GRAD_DEPTH.with(|d| d.set(d.get() - 1));
    }
}

struct Node {
    id: u64,
    op: &'static str,
    values: Vec<Tensor>,
    inputs: Vec<Var>,
    backward: Option<BackwardFn>,
    requires_grad: bool,
    param: Option<Param>,
}

/// One output of a node: a tensor value plus, when it requires grad, the way back to its inputs.
#[derive(Clone)]
pub struct Var {
    node: Arc<Node>,
    out: usize,
}

impl std::fmt::Debug for Var {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Var#{}.{}({}, {:?}, requires_grad={})",
            self.node.id,
            self.out,
            self.node.op,
            self.value().shape(),
            self.node.requires_grad
        )
    }
}

impl Var {
    fn leaf(value: Tensor, requires_grad: bool, param: Option<Param>) -> Var {
        Var {
            node: Arc::new(Node {
                id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
                op: "leaf",
                values: vec![value],
                inputs: Vec::new(),
                backward: None,
                requires_grad,
                param,
            }),
            out: 0,
        }
    }

    /// A constant: no gradient is computed for it.
    pub fn constant(value: Tensor) -> Var {
        Var::leaf(value, false, None)
    }

    /// An input whose gradient is wanted (read it from the [`Gradients`] of a backward call).
    /// Under [`no_grad`] it is a constant.
    pub fn input(value: Tensor) -> Var {
        Var::leaf(value, grad_enabled(), None)
    }

    pub fn value(&self) -> &Tensor {
        &self.node.values[self.out]
    }

    pub fn shape(&self) -> &[usize] {
        self.value().shape()
    }

    pub fn requires_grad(&self) -> bool {
        self.node.requires_grad
    }

    /// The same value cut off from the graph.
    pub fn detach(&self) -> Var {
        Var::constant(self.value().clone())
    }

    /// Backward from this scalar (gradient 1).
    pub fn backward(&self) -> Gradients {
        assert_eq!(
            self.value().numel(),
            1,
            "backward() needs a scalar, got {:?}; use autograd::backward with a seed",
            self.shape()
        );
        let seed = Tensor::full(self.shape(), 1.0);
        backward(&[(self, seed)])
    }

    fn key(&self) -> (u64, usize) {
        (self.node.id, self.out)
    }
}

/// Records an op with one output. `backward` is only kept when some input requires grad and
/// recording is on; otherwise the result is a constant.
pub fn record(
    op: &'static str,
    inputs: &[&Var],
    value: Tensor,
    backward: impl Fn(&Tensor, &[bool]) -> Vec<Option<Tensor>> + Send + Sync + 'static,
) -> Var {
    record_multi(op, inputs, vec![value], move |g, need| {
        backward(&g[0], need)
    })
    .pop()
    .expect("one output")
}

/// Records an op with several outputs (split, joint attention).
pub fn record_multi(
    op: &'static str,
    inputs: &[&Var],
    values: Vec<Tensor>,
    backward: impl Fn(&[Tensor], &[bool]) -> Vec<Option<Tensor>> + Send + Sync + 'static,
) -> Vec<Var> {
    let requires_grad = grad_enabled() && inputs.iter().any(|v| v.requires_grad());
    let n = values.len();
    let node = Arc::new(Node {
        id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        op,
        values,
        inputs: if requires_grad {
            inputs.iter().map(|v| (*v).clone()).collect()
        } else {
            Vec::new()
        },
        backward: if requires_grad {
            Some(Box::new(backward))
        } else {
            None
        },
        requires_grad,
        param: None,
    });
    (0..n)
        .map(|out| Var {
            node: node.clone(),
            out,
        })
        .collect()
}

/// Gradients of the non-parameter leaves (made with [`Var::input`]) reached by a backward call.
/// Parameter gradients go into the parameters themselves.
#[derive(Default)]
pub struct Gradients {
    leaves: HashMap<u64, Tensor>,
}

impl Gradients {
    pub fn get(&self, v: &Var) -> Option<&Tensor> {
        self.leaves.get(&v.node.id)
    }
}

struct Pending {
    node: Arc<Node>,
    grads: Vec<Option<Tensor>>,
}

/// Runs backward from seed gradients placed on any variables (each seed shaped like its var).
/// Seeds on the same variable add up.
pub fn backward(seeds: &[(&Var, Tensor)]) -> Gradients {
    let mut pending: HashMap<u64, Pending> = HashMap::new();
    let mut order: BinaryHeap<u64> = BinaryHeap::new();
    for (var, g) in seeds {
        assert_eq!(
            var.shape(),
            g.shape(),
            "backward seed shape {:?} for a variable of shape {:?}",
            g.shape(),
            var.shape()
        );
        if var.requires_grad() {
            accumulate(&mut pending, &mut order, var, g.clone());
        }
    }
    let mut result = Gradients::default();
    while let Some(id) = order.pop() {
        let Some(Pending { node, grads }) = pending.remove(&id) else {
            continue;
        };
        if let Some(param) = &node.param {
            if let Some(g) = grads.into_iter().next().flatten() {
                param.accumulate_grad(&g);
            }
            continue;
        }
        let Some(bw) = &node.backward else {
            if let Some(g) = grads.into_iter().next().flatten() {
                result.leaves.insert(node.id, g);
            }
            continue;
        };
        let grads: Vec<Tensor> = grads
            .into_iter()
            .zip(&node.values)
            .map(|(g, v)| g.unwrap_or_else(|| Tensor::zeros(v.shape())))
            .collect();
        let need: Vec<bool> = node.inputs.iter().map(|v| v.requires_grad()).collect();
        let input_grads = bw(&grads, &need);
        assert_eq!(
            input_grads.len(),
            node.inputs.len(),
            "op {}: grads per input",
            node.op
        );
        for ((input, g), needed) in node.inputs.iter().zip(input_grads).zip(need) {
            if let (Some(g), true) = (g, needed) {
                assert_eq!(
                    g.shape(),
                    input.shape(),
                    "op {}: gradient shape {:?} for an input of shape {:?}",
                    node.op,
                    g.shape(),
                    input.shape()
                );
                accumulate(&mut pending, &mut order, input, g);
            }
        }
    }
    result
}

fn accumulate(
    pending: &mut HashMap<u64, Pending>,
    order: &mut BinaryHeap<u64>,
    var: &Var,
    g: Tensor,
) {
    let (id, out) = var.key();
    let entry = pending.entry(id).or_insert_with(|| {
        order.push(id);
        Pending {
            node: var.node.clone(),
            grads: vec![None; var.node.values.len()],
        }
    });
    let slot = &mut entry.grads[out];
    *slot = Some(match slot.take() {
        None => g,
        Some(prev) => crate::kernels::elementwise::add(&prev, &g),
    });
}

struct ParamInner {
    name: String,
    value: RwLock<Tensor>,
    grad: Mutex<Option<Tensor>>,
    trainable: AtomicBool,
}

/// A named, persistent, trainable tensor (a model weight). Cloning shares it.
#[derive(Clone)]
pub struct Param(Arc<ParamInner>);

impl std::fmt::Debug for Param {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Param({}, {:?})", self.0.name, self.value().shape())
    }
}

impl Param {
    pub fn new(name: impl Into<String>, value: Tensor) -> Param {
        Param(Arc::new(ParamInner {
            name: name.into(),
            value: RwLock::new(value),
            grad: Mutex::new(None),
            trainable: AtomicBool::new(true),
        }))
    }

    pub fn name(&self) -> &str {
        &self.0.name
    }

    pub fn value(&self) -> Tensor {
        self.0.value.read().expect("param lock").clone()
    }

    /// Replaces the value (optimizer step, checkpoint load). The shape must not change.
    pub fn set_value(&self, value: Tensor) {
        let mut v = self.0.value.write().expect("param lock");
        assert_eq!(
            v.shape(),
            value.shape(),
            "param {}: new value shape differs",
            self.0.name
        );
        *v = value;
    }

    /// A leaf variable for use in a graph. It requires grad when the parameter is trainable and
    /// recording is on.
    pub fn var(&self) -> Var {
        let requires = grad_enabled() && self.trainable();
        Var::leaf(self.value(), requires, requires.then(|| self.clone()))
    }

    pub fn trainable(&self) -> bool {
        self.0.trainable.load(Ordering::Relaxed)
    }

    /// Freezes (false) or unfreezes (true) the parameter.
    pub fn set_trainable(&self, trainable: bool) {
        self.0.trainable.store(trainable, Ordering::Relaxed);
    }

    /// The gradient accumulated since the last [`Param::zero_grad`], if any.
    pub fn grad(&self) -> Option<Tensor> {
        self.0.grad.lock().expect("grad lock").clone()
    }

    pub fn zero_grad(&self) {
        *self.0.grad.lock().expect("grad lock") = None;
    }

    /// Replaces the accumulated gradient (gradient clipping, loading a state).
    pub fn set_grad(&self, g: Tensor) {
        assert_eq!(
            g.shape(),
            self.value().shape(),
            "param {}: gradient shape",
            self.0.name
        );
        *self.0.grad.lock().expect("grad lock") = Some(g);
    }

    fn accumulate_grad(&self, g: &Tensor) {
        let mut slot = self.0.grad.lock().expect("grad lock");
        *slot = Some(match slot.take() {
            None => g.clone(),
            Some(prev) => crate::kernels::elementwise::add(&prev, g),
        });
    }
}
