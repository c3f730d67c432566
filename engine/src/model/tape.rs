//! The autograd tape of one chunk's forward: autograd *segments* joined by the tensor-
//! parallel region collectives, so that a collective's backward (an all-reduce of a
//! gradient) runs between segments without custom autograd functions.
//!
//! * With tensor parallelism (tp > 1, [`Mode::Cut`]) every [`Tape::seg`] call is its own
//!   autograd graph from fresh leaves (detached views of its inputs, no copies) to its
//!   outputs, and the collectives are [`Node`]s between segments:
//!   - `copy_to_tp_region`: identity forward, all-reduce of the gradient backward;
//!   - `reduce_from_tp_region`: all-reduce forward, identity backward;
//!   - with sequence parallelism ([`Tape::with_sequence_parallel`], Megatron's
//!     `--sequence-parallel`), the regions outside the tp layers hold this rank's
//!     sequence-parallel block: rows `[r·b·s/p, (r+1)·b·s/p)` of the activation's
//!     `[b·s, d]` view, stored contiguously as `[b, s/p, d]` ([`super::sequence`]; only
//!     row-wise work runs there, and the block's shape says nothing about which rows it
//!     holds, so the tape's flag, never a shape, tells a block from a whole):
//!     `gather_from_sequence_parallel_region` (all-gather of the blocks forward,
//!     reduce-scatter backward) replaces `copy_to_tp_region` before a column-parallel
//!     layer, `reduce_scatter_to_sequence_parallel_region` (reduce-scatter forward,
//!     all-gather backward) replaces `reduce_from_tp_region` after a row-parallel one, and
//!     `scatter_to_sequence_parallel_region` (split forward, all-gather backward) enters
//!     the split regions from a replicated value. [`Tape::enter_tp_region`] and
//!     [`Tape::leave_tp_region`] pick the pair.
//!
//!   Backward walks the nodes in reverse: each segment is differentiated with its outputs
//!   seeded by their received gradients ([`super::seeded`], libtorch's autograd engine
//!   through a C++ shim: no surrogate product, no extra pass over the outputs).
//! * Without it (tp = 1, [`Mode::Fused`]) the collectives are identities and `seg` runs on
//!   the live tensors: the whole chunk is one ordinary autograd graph with no extra nodes,
//!   copies or communication, and its backward is a single segment from the chunk input.
//! * Forward-only ([`Mode::Eval`]) runs under `no_grad` and records nothing.
//!
//! Zero-bubble split ([`Tape::split`]): linear layers then multiply by *detached* weights and
//! record `(X, Y)`; the input-gradient pass `I` asks autograd for the gradients of the
//! segment inputs, of the other parameters (norms, embeddings, biases added outside a
//! linear) and of each recorded `Y` only, so no weight-gradient GEMM runs. It returns the
//! [`WeightWork`] — `X` and `dY` of every linear, nothing else — from which `W` forms
//! `dA = Xᵀ dY` (or `dYᵀ X` for a transposed weight) and `db = Σ dY`.
//!
//! Linear nodes ([`Tape::column_linears`], [`Tape::row_linear`]): on a cut tape, linear
//! layers can run as nodes of their own, without autograd, entering and leaving the tp
//! region themselves (all-reduce, or with sequence parallelism all-gather and
//! reduce-scatter), so that neither the gathered input nor the partial product is kept;
//! their backward forms `dX = dY Aᵀ` and the weight gradient `Xᵀ dY` (now, or as `W` work
//! in a split backward).
//!
//! Selective recomputation ([`Tape::with_selective`], [`Tape::rerun`]): the non-matmul
//! pieces between linear nodes run without autograd as [`Node::Rerun`]s, and their outputs
//! are dropped once the linear node that reads them has run. In the backward, the linear
//! node that needs such an input for its weight gradient first reruns the piece with
//! autograd from its kept inputs (a linear's output, a residual), which turns the node
//! into an ordinary segment that the walk differentiates when it reaches it; the rebuilt
//! value is dropped again once read. No custom autograd function is involved.
//!
//! Invariant: value 0 is the chunk input; every value a node reads was produced earlier;
//! a dropped value (undefined tensor) always has a `Rerun` node that rebuilds it.

use super::params::Param;
use super::sequence;
use super::Ctx;
use crate::comm::{Communicator, ReduceOp};
use crate::error::{Error, Result};
use tch::{Kind, Tensor};

/// Index of a value on a [`Tape`].
pub type V = usize;

/// How the tape builds autograd graphs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// No gradients (evaluation, generation).
    Eval,
    /// One autograd graph for the whole chunk (tp = 1).
    Fused,
    /// One autograd graph per segment, joined by tp collectives (tp > 1).
    Cut,
}

/// A linear layer's call in a split-backward forward.
pub struct LinearRecord {
    pub x: Tensor,
    pub y: Tensor,
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    /// The weight is stored `[out, in]` (a tied LM head uses the embedding `[V, d]`).
    pub transposed: bool,
}

/// What `W` needs of one linear layer: its input and its output gradient.
pub struct WeightGrad {
    x: Tensor,
    dy: Tensor,
    weight: Tensor,
    bias: Option<Tensor>,
    transposed: bool,
}

/// The weight-gradient work left by an input-gradient pass.
#[derive(Default)]
pub struct WeightWork(Vec<WeightGrad>);

impl WeightWork {
    /// Appends `other`'s work (each weight's gradient still gets one addition per call).
    pub fn extend(&mut self, other: WeightWork) {
        self.0.extend(other.0);
    }

    /// `dA += Xᵀ dY` (or `dYᵀ X`), `db += Σ dY` for every recorded linear layer.
    pub fn run(self) -> Result<()> {
        tch::no_grad(|| {
            for w in self.0 {
                let width_in = *w.x.size().last().unwrap_or(&1);
                let width_out = *w.dy.size().last().unwrap_or(&1);
                let x = w.x.f_reshape([-1, width_in]).ctx("W input")?;
                let dy = w.dy.f_reshape([-1, width_out]).ctx("W output grad")?;
                let dw = if w.transposed {
                    dy.f_transpose(0, 1).and_then(|t| t.f_matmul(&x))
                } else {
                    x.f_transpose(0, 1).and_then(|t| t.f_matmul(&dy))
                }
                .ctx("weight gradient")?;
                let _ = w.weight.grad().f_add_(&dw).ctx("weight gradient")?;
                if let Some(b) = &w.bias {
                    let db = dy
                        .f_sum_dim_intlist([0i64].as_slice(), false, Kind::Float)
                        .ctx("bias gradient")?;
                    let _ = b.grad().f_add_(&db).ctx("bias gradient")?;
                }
            }
            Ok(())
        })
    }
}

/// What a tape's backward leaves.
pub struct Backward {
    /// The gradient of the tape's input (None for token ids).
    pub input_grad: Option<Tensor>,
    /// The weight-gradient work of a split backward (empty otherwise).
    pub work: WeightWork,
    /// The gradients of the held parameters (`hold` of [`Tape::backward`]) by index into
    /// `params`, in the order the segments produced them, not accumulated into `.grad`.
    pub held: Vec<(usize, Tensor)>,
}

/// Where linear layers put their records during a segment.
pub struct Recorder {
    split: bool,
    records: Vec<LinearRecord>,
}

impl Recorder {
    /// True when linear layers must use detached weights and record their calls.
    pub fn split(&self) -> bool {
        self.split
    }

    pub fn push(&mut self, r: LinearRecord) {
        self.records.push(r);
    }
}

struct Segment {
    inputs: Vec<(V, Tensor)>,
    outputs: Vec<(V, Tensor)>,
    records: Vec<LinearRecord>,
}

enum Node {
    Seg(Segment),
    /// `copy_to_tp_region`: `to` is `from`; backward all-reduces the gradient.
    CopyToTp {
        from: V,
        to: V,
    },
    /// `reduce_from_tp_region`: `to = Σ_ranks from`; backward passes the gradient through.
    ReduceFromTp {
        from: V,
        to: V,
    },
    /// `gather_from_sequence_parallel_region`: `to` is the all-gather of the blocks `from`
    /// (the whole `[b, s, d]`); backward reduce-scatters the gradient.
    GatherFromSp {
        from: V,
        to: V,
    },
    /// `reduce_scatter_to_sequence_parallel_region`: `to` is this rank's block of
    /// `Σ_ranks from`; backward all-gathers the gradient.
    ReduceScatterToSp {
        from: V,
        to: V,
    },
    /// `scatter_to_sequence_parallel_region`: `to` is this rank's block of the
    /// replicated `from`; backward all-gathers the gradient.
    ScatterToSp {
        from: V,
        to: V,
    },
    /// Column-parallel linears on one input, without autograd: `outs[i] = X Aᵢ + bᵢ`.
    /// `X` is `from` entered into the tp region: the blocks all-gathered when
    /// `gather` (sequence parallelism; the gathered copy is not kept), else `from` itself.
    /// Backward: `dX = Σ dYᵢ Aᵢᵀ`, reduce-scattered (`gather`) or all-reduced (tp > 1)
    /// into `from`, and `dAᵢ += Xᵀ dYᵢ` with `X` gathered again, or rebuilt first when
    /// `from` was a [`Node::Rerun`] output and has been dropped.
    ColumnLinears {
        from: V,
        outs: Vec<(V, Dense)>,
        gather: bool,
    },
    /// A row-parallel linear, without autograd: `to` is `from·A (+ b)` summed over tp and,
    /// when `scatter` (sequence parallelism), this rank's block of the sum; the
    /// partial product is not kept. Backward all-gathers the gradient `dP` (`scatter`),
    /// then `d from = dP Aᵀ` and `dA += fromᵀ dP` (`from` rebuilt first if dropped).
    RowLinear {
        from: V,
        to: V,
        dense: Dense,
        scatter: bool,
    },
    /// Selective recomputation: `outputs = f(inputs)` ran without autograd, and the
    /// outputs are dropped once the linear layers that read them have run. The backward
    /// reruns `f` with autograd (into a [`Node::Seg`]) when a linear needs its output
    /// for a weight gradient, or when the walk reaches it with a gradient.
    Rerun {
        inputs: Vec<V>,
        outputs: Vec<V>,
        f: RerunFn,
    },
}

/// The function of a [`Node::Rerun`]: a pure function of its inputs (no linear layers).
pub type RerunFn = Box<dyn Fn(&[Tensor]) -> Result<Vec<Tensor>> + Send>;

/// A dense linear layer's tensors, as the tape's linear nodes use them.
pub struct Dense {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    /// The weight is stored `[out, in]`.
    pub transposed: bool,
}

impl Dense {
    /// The weight as `[out, in]` (what `linear` takes), without autograd.
    fn out_in(&self) -> Result<Tensor> {
        let w = self.weight.detach();
        if self.transposed {
            Ok(w)
        } else {
            w.f_transpose(0, 1).ctx("linear")
        }
    }

    /// `Y = XA (+ b)` without autograd (the same libtorch call as a layer's forward).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let b = self.bias.as_ref().map(Tensor::detach);
        tch::no_grad(|| x.f_linear(&self.out_in()?, b.as_ref()).ctx("linear"))
    }

    /// `dX = dY Aᵀ` (without autograd).
    fn input_grad(&self, dy: &Tensor) -> Result<Tensor> {
        tch::no_grad(|| dy.f_matmul(&self.out_in()?).ctx("linear input gradient"))
    }

    /// The weight-gradient work of `X`, `dY` (and of the bias, if any).
    fn weight_grad(&self, x: Tensor, dy: Tensor) -> WeightGrad {
        WeightGrad {
            x,
            dy,
            weight: self.weight.shallow_clone(),
            bias: self.bias.as_ref().map(Tensor::shallow_clone),
            transposed: self.transposed,
        }
    }
}

/// A chunk's forward; see the module docs.
pub struct Tape {
    mode: Mode,
    split: bool,
    /// Regions outside the tp layers hold sequence-parallel blocks (see the module docs).
    sequence_parallel: bool,
    /// Selective recomputation: [`Tape::rerun`] drops its outputs after use.
    selective: bool,
    values: Vec<Tensor>,
    /// Values produced by [`Node::Rerun`]s, dropped once read by a linear node.
    volatile: Vec<V>,
    nodes: Vec<Node>,
    /// Fused mode: the chunk input's leaf (hidden inputs only) and every record.
    input_leaf: Option<Tensor>,
    records: Vec<LinearRecord>,
}

/// All-reduces `t` over the tensor-parallel group into a new tensor. Zero-copy: the
/// collective reads `t`'s memory (when it already is a contiguous f32 CPU tensor, as
/// activations are) and writes the result straight into the new tensor's memory; `t`
/// itself is left as it was (autograd may hold it).
pub fn all_reduce(t: &Tensor, tp: &mut dyn Communicator, op: ReduceOp) -> Result<Tensor> {
    let t = t
        .f_to_kind(Kind::Float)
        .and_then(|t| t.f_contiguous())
        .ctx("all-reduce input")?;
    if t.device() != tch::Device::Cpu {
        return Err(Error::Internal(format!(
            "tensor-parallel all-reduce needs a CPU tensor, got one on {:?}",
            t.device()
        )));
    }
    let out = Tensor::f_empty(t.size(), (Kind::Float, t.device())).ctx("all-reduce result")?;
    let n = t.numel();
    if n == 0 {
        return Ok(out);
    }
    // SAFETY: both are contiguous f32 CPU tensors of `n` elements, alive for the call;
    // `out` is fresh, so the two do not overlap, and nothing else touches them meanwhile.
    let (send, recv) = unsafe {
        (
            std::slice::from_raw_parts(t.data_ptr() as *const f32, n),
            std::slice::from_raw_parts_mut(out.data_ptr() as *mut f32, n),
        )
    };
    tp.all_reduce_into(send, recv, op)?;
    Ok(out)
}

impl Tape {
    /// A tape whose value 0 is `input` (token ids, or a hidden state that receives a
    /// gradient in training). `split` records linear layers for a zero-bubble backward.
    pub fn new(mode: Mode, split: bool, input: &Tensor) -> Tape {
        let mut tape = Tape {
            mode,
            split: split && mode != Mode::Eval,
            sequence_parallel: false,
            selective: false,
            values: Vec::new(),
            volatile: Vec::new(),
            nodes: Vec::new(),
            input_leaf: None,
            records: Vec::new(),
        };
        let hidden = input.is_floating_point();
        let first = if mode == Mode::Fused && hidden {
            let leaf = input.detach().set_requires_grad(true);
            tape.input_leaf = Some(leaf.shallow_clone());
            leaf
        } else {
            input.shallow_clone()
        };
        tape.values.push(first);
        tape
    }

    /// The tape with sequence parallelism on or off (off when built): the caller's
    /// hidden values outside the tp layers are then this rank's blocks of contiguous
    /// token rows, shaped `[b, s/p, d]` (see [`super::sequence`]).
    pub fn with_sequence_parallel(mut self, on: bool) -> Tape {
        self.sequence_parallel = on;
        self
    }

    /// The tape with selective recomputation on or off (off when built; on only for a
    /// [`Mode::Cut`] tape): see [`Tape::rerun`].
    pub fn with_selective(mut self, on: bool) -> Tape {
        self.selective = on && self.mode == Mode::Cut;
        self
    }

    /// True when [`Tape::rerun`] recomputes its work in the backward.
    pub fn selective(&self) -> bool {
        self.selective
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// True when the regions outside the tp layers hold sequence-parallel blocks (the
    /// only way to tell: a block has the shape of a `[b, s/p, d]` whole).
    pub fn sequence_parallel(&self) -> bool {
        self.sequence_parallel
    }

    /// How many values selective recomputation has dropped (kept for the backward: none).
    pub fn dropped(&self) -> usize {
        self.values.iter().filter(|t| !t.defined()).count()
    }

    /// The tensor of value `v`.
    pub fn value(&self, v: V) -> &Tensor {
        &self.values[v]
    }

    pub fn push(&mut self, t: Tensor) -> V {
        self.values.push(t);
        self.values.len() - 1
    }

    /// Runs `f` on `inputs` as one autograd segment (see the module docs) and returns the
    /// ids of its outputs.
    pub fn seg(
        &mut self,
        inputs: &[V],
        f: impl FnOnce(&[Tensor], &mut Recorder) -> Result<Vec<Tensor>>,
    ) -> Result<Vec<V>> {
        let mut rec = Recorder {
            split: self.split,
            records: Vec::new(),
        };
        match self.mode {
            Mode::Eval => {
                let xs: Vec<Tensor> = inputs
                    .iter()
                    .map(|&v| self.values[v].shallow_clone())
                    .collect();
                let outs = tch::no_grad(|| f(&xs, &mut rec))?;
                Ok(outs.into_iter().map(|o| self.push(o)).collect())
            }
            Mode::Fused => {
                let xs: Vec<Tensor> = inputs
                    .iter()
                    .map(|&v| self.values[v].shallow_clone())
                    .collect();
                let outs = f(&xs, &mut rec)?;
                self.records.append(&mut rec.records);
                Ok(outs.into_iter().map(|o| self.push(o)).collect())
            }
            Mode::Cut => {
                let leaves: Vec<Tensor> = inputs
                    .iter()
                    .map(|&v| {
                        let t = self.values[v].detach();
                        if t.is_floating_point() {
                            t.set_requires_grad(true)
                        } else {
                            t
                        }
                    })
                    .collect();
                let outs = f(&leaves, &mut rec)?;
                let ids: Vec<V> = outs.iter().map(|o| self.push(o.detach())).collect();
                self.nodes.push(Node::Seg(Segment {
                    inputs: inputs.iter().copied().zip(leaves).collect(),
                    outputs: ids.iter().copied().zip(outs).collect(),
                    records: rec.records,
                }));
                Ok(ids)
            }
        }
    }

    /// [`Tape::seg`] with one output.
    pub fn seg1(
        &mut self,
        inputs: &[V],
        f: impl FnOnce(&[Tensor], &mut Recorder) -> Result<Tensor>,
    ) -> Result<V> {
        Ok(self.seg(inputs, |x, rec| Ok(vec![f(x, rec)?]))?[0])
    }

    /// `copy_to_tp_region`: identity forward; backward all-reduces the gradient.
    pub fn copy_to_tp_region(&mut self, v: V) -> V {
        if self.mode != Mode::Cut {
            return v;
        }
        let to = self.push(self.values[v].shallow_clone());
        self.nodes.push(Node::CopyToTp { from: v, to });
        to
    }

    /// `reduce_from_tp_region`: all-reduce (sum) forward; backward is the identity.
    pub fn reduce_from_tp_region(&mut self, v: V, tp: &mut dyn Communicator) -> Result<V> {
        if tp.size() == 1 {
            return Ok(v);
        }
        let sum = all_reduce(&self.values[v], tp, ReduceOp::Sum)?;
        let to = self.push(sum);
        if self.mode == Mode::Cut {
            self.nodes.push(Node::ReduceFromTp { from: v, to });
        } else if self.mode == Mode::Fused {
            return Err(Error::Internal(
                "a fused (tp = 1) tape cannot reduce over a tensor-parallel group".into(),
            ));
        }
        Ok(to)
    }

    /// Enters a tensor-parallel region before a column-parallel layer:
    /// `gather_from_sequence_parallel_region` with sequence parallelism, else
    /// `copy_to_tp_region`.
    pub fn enter_tp_region(&mut self, v: V, tp: &mut dyn Communicator) -> Result<V> {
        if !self.sequence_parallel || tp.size() == 1 {
            return Ok(self.copy_to_tp_region(v));
        }
        let full = sequence::all_gather(&self.values[v], tp)?;
        Ok(self.collective(full, |to| Node::GatherFromSp { from: v, to }))
    }

    /// Leaves a tensor-parallel region after a row-parallel layer's partial product:
    /// `reduce_scatter_to_sequence_parallel_region` with sequence parallelism, else
    /// `reduce_from_tp_region`.
    pub fn leave_tp_region(&mut self, v: V, tp: &mut dyn Communicator) -> Result<V> {
        if !self.sequence_parallel || tp.size() == 1 {
            return self.reduce_from_tp_region(v, tp);
        }
        let block = sequence::reduce_scatter(&self.values[v], tp)?;
        Ok(self.collective(block, |to| Node::ReduceScatterToSp { from: v, to }))
    }

    /// `scatter_to_sequence_parallel_region` with sequence parallelism (this rank's block
    /// of a replicated `[b, s, d]`: a view of its rows), else the identity.
    pub fn scatter_to_sequence_parallel_region(
        &mut self,
        v: V,
        tp: &mut dyn Communicator,
    ) -> Result<V> {
        if !self.sequence_parallel || tp.size() == 1 {
            return Ok(v);
        }
        let block = sequence::split(&self.values[v], tp.rank().0, tp.size())?;
        Ok(self.collective(block, |to| Node::ScatterToSp { from: v, to }))
    }

    /// A non-matmul piece of a block (norm, attention core, activation) with one output.
    /// On a selective tape it runs without autograd, and its output is dropped once the
    /// linear layers that read it ([`Tape::column_linears`], [`Tape::row_linear`]) have
    /// run; the backward reruns it ([`Node::Rerun`]). Otherwise it is an ordinary
    /// segment.
    pub fn rerun(
        &mut self,
        inputs: &[V],
        f: impl Fn(&[Tensor]) -> Result<Tensor> + Send + 'static,
    ) -> Result<V> {
        if !self.selective {
            return self.seg1(inputs, |t, _| f(t));
        }
        let xs: Vec<Tensor> = inputs
            .iter()
            .map(|&v| self.values[v].shallow_clone())
            .collect();
        let out = tch::no_grad(|| f(&xs))?;
        let v = self.push(out);
        self.volatile.push(v);
        self.nodes.push(Node::Rerun {
            inputs: inputs.to_vec(),
            outputs: vec![v],
            f: Box::new(move |t| Ok(vec![f(t)?])),
        });
        Ok(v)
    }

    /// Drops `v` if it is a [`Tape::rerun`] output (its reader has run).
    fn release(&mut self, v: V) {
        if self.volatile.contains(&v) {
            self.values[v] = Tensor::new();
        }
    }

    /// Column-parallel linears on one input `v` (see [`Node::ColumnLinears`]): `v` enters
    /// the tp region (its blocks all-gathered with sequence parallelism, the
    /// gathered copy dropped at once as Megatron does) and `X Aᵢ + bᵢ` is returned for
    /// each layer, computed without autograd. Only on cut tapes (or forward-only ones).
    pub fn column_linears(
        &mut self,
        v: V,
        layers: Vec<Dense>,
        tp: &mut dyn Communicator,
    ) -> Result<Vec<V>> {
        self.linear_node_allowed()?;
        let gather = self.sequence_parallel && tp.size() > 1;
        let x = match gather {
            true => sequence::all_gather(&self.values[v], tp)?,
            false => self.values[v].shallow_clone(),
        };
        let mut outs = Vec::with_capacity(layers.len());
        for dense in layers {
            let y = dense.forward(&x)?;
            outs.push((self.push(y), dense));
        }
        drop(x);
        self.release(v);
        let ids = outs.iter().map(|(id, _)| *id).collect();
        if self.mode == Mode::Cut {
            self.nodes.push(Node::ColumnLinears {
                from: v,
                outs,
                gather,
            });
        }
        Ok(ids)
    }

    /// A row-parallel linear (see [`Node::RowLinear`]): `Σ_ranks v·A (+ b)`, or this
    /// rank's sequence block of it with sequence parallelism; computed without autograd,
    /// the partial product not kept. `dense` carries a bias only where it is fused into
    /// the product (tp = 1); a replicated bias is added after, by the caller.
    pub fn row_linear(&mut self, v: V, dense: Dense, tp: &mut dyn Communicator) -> Result<V> {
        self.linear_node_allowed()?;
        let scatter = self.sequence_parallel && tp.size() > 1;
        let partial = dense.forward(&self.values[v])?;
        let out = if scatter {
            sequence::reduce_scatter(&partial, tp)?
        } else if tp.size() > 1 {
            all_reduce(&partial, tp, ReduceOp::Sum)?
        } else {
            partial.shallow_clone()
        };
        drop(partial);
        self.release(v);
        Ok(self.collective(out, |to| Node::RowLinear {
            from: v,
            to,
            dense,
            scatter,
        }))
    }

    /// The linear nodes compute without autograd, so a fused tape cannot use them.
    fn linear_node_allowed(&self) -> Result<()> {
        match self.mode {
            Mode::Fused => Err(Error::Internal(
                "tape linear nodes need a cut (or forward-only) tape".into(),
            )),
            _ => Ok(()),
        }
    }

    /// Pushes a collective's result and, on a cut tape, its node.
    fn collective(&mut self, value: Tensor, node: impl FnOnce(V) -> Node) -> V {
        let to = self.push(value);
        if self.mode == Mode::Cut {
            self.nodes.push(node(to));
        }
        to
    }

    /// Backpropagates `seeds` (value, gradient of that value), accumulating parameter
    /// gradients into `.grad`. Returns the gradient of the chunk input (None for token
    /// inputs) and, for a split backward, the weight-gradient work left for `W`.
    /// `params` are the chunk's parameters (asked for by name-less position in a split).
    /// The gradients of `hold` (indices into `params`) are returned instead of added, so
    /// that a caller joining several tapes can add a shared parameter's contributions with
    /// one addition, as one autograd graph does.
    pub fn backward(
        self,
        seeds: Vec<(V, Tensor)>,
        tp: &mut dyn Communicator,
        params: &[Param],
        hold: &[usize],
    ) -> Result<Backward> {
        let split = self.split;
        let mut held = Vec::new();
        let (input_grad, work) = match self.mode {
            Mode::Eval => {
                return Err(Error::Internal("backward of a forward-only tape".into()));
            }
            Mode::Fused => {
                let outputs = seeds
                    .iter()
                    .map(|(v, _)| (*v, self.values[*v].shallow_clone()))
                    .collect();
                let seg = Segment {
                    inputs: self.input_leaf.map(|l| (0, l)).into_iter().collect(),
                    outputs,
                    records: self.records,
                };
                let mut work = WeightWork::default();
                let mut out = Out {
                    work: &mut work,
                    held: &mut held,
                };
                let grads = backward_segment(seg, &seeds, split, params, hold, &mut out)?;
                (grads.into_iter().next().flatten(), work)
            }
            Mode::Cut => {
                let how = How {
                    split,
                    params,
                    hold,
                };
                backward_cut(self.values, self.nodes, seeds, tp, how, &mut held)?
            }
        };
        Ok(Backward {
            input_grad,
            work,
            held,
        })
    }
}

fn accumulate(slot: &mut Option<Tensor>, g: Tensor) -> Result<()> {
    *slot = Some(match slot.take() {
        Some(old) => old.f_add(&g).ctx("gradient accumulation")?,
        None => g,
    });
    Ok(())
}

/// How segments are differentiated: split or whole, the chunk's parameters, the held ones.
struct How<'a> {
    split: bool,
    params: &'a [Param],
    hold: &'a [usize],
}

/// Where a segment's backward leaves weight work and held parameter gradients.
struct Out<'a> {
    work: &'a mut WeightWork,
    held: &'a mut Vec<(usize, Tensor)>,
}

fn backward_cut(
    mut values: Vec<Tensor>,
    nodes: Vec<Node>,
    seeds: Vec<(V, Tensor)>,
    tp: &mut dyn Communicator,
    how: How<'_>,
    held: &mut Vec<(usize, Tensor)>,
) -> Result<(Option<Tensor>, WeightWork)> {
    let mut grads: Vec<Option<Tensor>> = (0..values.len()).map(|_| None).collect();
    for (v, g) in seeds {
        accumulate(&mut grads[v], g)?;
    }
    // The node that produced each value dropped by selective recomputation.
    let mut producer: Vec<Option<usize>> = vec![None; values.len()];
    for (i, node) in nodes.iter().enumerate() {
        if let Node::Rerun { outputs, .. } = node {
            for &v in outputs {
                producer[v] = Some(i);
            }
        }
    }
    let mut nodes: Vec<Option<Node>> = nodes.into_iter().map(Some).collect();
    let mut work = WeightWork::default();
    for i in (0..nodes.len()).rev() {
        let node = nodes[i]
            .take()
            .ok_or_else(|| Error::Internal("a tape node was walked twice".into()))?;
        match node {
            Node::ReduceFromTp { from, to } => {
                if let Some(g) = grads[to].take() {
                    accumulate(&mut grads[from], g)?;
                }
            }
            Node::CopyToTp { from, to } => {
                if let Some(g) = grads[to].take() {
                    let g = match tp.size() {
                        1 => g,
                        _ => all_reduce(&g, tp, ReduceOp::Sum)?,
                    };
                    accumulate(&mut grads[from], g)?;
                }
            }
            Node::GatherFromSp { from, to } => {
                if let Some(g) = grads[to].take() {
                    accumulate(&mut grads[from], sequence::reduce_scatter(&g, tp)?)?;
                }
            }
            Node::ReduceScatterToSp { from, to } | Node::ScatterToSp { from, to } => {
                if let Some(g) = grads[to].take() {
                    accumulate(&mut grads[from], sequence::all_gather(&g, tp)?)?;
                }
            }
            Node::ColumnLinears { from, outs, gather } => {
                let mut dx: Option<Tensor> = None;
                let mut weight_work = Vec::new();
                let mut x: Option<Tensor> = None;
                for (to, dense) in outs {
                    let Some(dy) = grads[to].take() else { continue };
                    accumulate(&mut dx, dense.input_grad(&dy)?)?;
                    let input = match &x {
                        Some(x) => x.shallow_clone(),
                        None => {
                            rebuild(from, &producer, &mut nodes, &mut values)?;
                            let input = match gather {
                                true => sequence::all_gather(&values[from], tp)?,
                                false => values[from].shallow_clone(),
                            };
                            x = Some(input.shallow_clone());
                            input
                        }
                    };
                    weight_work.push(dense.weight_grad(input, dy));
                }
                drop(x);
                release(from, &producer, &mut values);
                if let Some(dx) = dx {
                    let dx = if gather {
                        sequence::reduce_scatter(&dx, tp)?
                    } else if tp.size() > 1 {
                        all_reduce(&dx, tp, ReduceOp::Sum)?
                    } else {
                        dx
                    };
                    accumulate(&mut grads[from], dx)?;
                }
                weight_grads(weight_work, how.split, &mut work)?;
            }
            Node::RowLinear {
                from,
                to,
                dense,
                scatter,
            } => {
                if let Some(g) = grads[to].take() {
                    let dp = match scatter {
                        true => sequence::all_gather(&g, tp)?,
                        false => g,
                    };
                    accumulate(&mut grads[from], dense.input_grad(&dp)?)?;
                    rebuild(from, &producer, &mut nodes, &mut values)?;
                    let x = values[from].shallow_clone();
                    release(from, &producer, &mut values);
                    weight_grads(vec![dense.weight_grad(x, dp)], how.split, &mut work)?;
                }
            }
            Node::Rerun { .. } | Node::Seg(_) => {
                let seg = match node {
                    Node::Seg(seg) => seg,
                    Node::Rerun { ref outputs, .. }
                        if !outputs.iter().any(|v| grads[*v].is_some()) =>
                    {
                        continue
                    }
                    rerun => rerun_segment(rerun, &mut values)?,
                };
                let seeds: Vec<(V, Tensor)> = seg
                    .outputs
                    .iter()
                    .filter_map(|(v, _)| grads[*v].take().map(|g| (*v, g)))
                    .collect();
                if seeds.is_empty() {
                    continue;
                }
                let ids: Vec<V> = seg.inputs.iter().map(|(v, _)| *v).collect();
                let mut out = Out {
                    work: &mut work,
                    held,
                };
                let leaf_grads =
                    backward_segment(seg, &seeds, how.split, how.params, how.hold, &mut out)?;
                for (v, g) in ids.into_iter().zip(leaf_grads) {
                    if let Some(g) = g {
                        accumulate(&mut grads[v], g)?;
                    }
                }
            }
        }
    }
    Ok((grads.swap_remove(0), work))
}

/// Makes value `v` available again if selective recomputation dropped it: reruns its
/// [`Node::Rerun`] with autograd, leaving the resulting segment in its place for the
/// walk to differentiate when it gets there.
fn rebuild(
    v: V,
    producer: &[Option<usize>],
    nodes: &mut [Option<Node>],
    values: &mut [Tensor],
) -> Result<()> {
    if values[v].defined() {
        return Ok(());
    }
    let node = producer[v]
        .and_then(|i| nodes[i].as_mut())
        .ok_or_else(|| Error::Internal(format!("value {v} was dropped and has no rerun")))?;
    let rerun = std::mem::replace(
        node,
        Node::Seg(Segment {
            inputs: Vec::new(),
            outputs: Vec::new(),
            records: Vec::new(),
        }),
    );
    *node = Node::Seg(rerun_segment(rerun, values)?);
    Ok(())
}

/// Drops a rebuilt value again once its linear node has read it (its segment holds what
/// its own backward needs).
fn release(v: V, producer: &[Option<usize>], values: &mut [Tensor]) {
    if producer[v].is_some() {
        values[v] = Tensor::new();
    }
}

/// Reruns a [`Node::Rerun`] with autograd on fresh leaves of its (kept) inputs, as a
/// cut tape's segment, and puts its outputs back into `values`.
fn rerun_segment(node: Node, values: &mut [Tensor]) -> Result<Segment> {
    let Node::Rerun { inputs, outputs, f } = node else {
        return Err(Error::Internal("only a rerun node can be rerun".into()));
    };
    let leaves: Vec<Tensor> = inputs
        .iter()
        .map(|&v| {
            let t = values[v].detach();
            if t.is_floating_point() {
                t.set_requires_grad(true)
            } else {
                t
            }
        })
        .collect();
    let outs = f(&leaves)?;
    if outs.len() != outputs.len() {
        return Err(Error::Internal(
            "a rerun gave a different number of outputs".into(),
        ));
    }
    for (&v, o) in outputs.iter().zip(&outs) {
        values[v] = o.detach();
    }
    Ok(Segment {
        inputs: inputs.into_iter().zip(leaves).collect(),
        outputs: outputs.into_iter().zip(outs).collect(),
        records: Vec::new(),
    })
}

/// Runs the weight-gradient work of a tape linear node now, or leaves it for `W` (split).
fn weight_grads(grads: Vec<WeightGrad>, split: bool, work: &mut WeightWork) -> Result<()> {
    if split {
        work.0.extend(grads);
        Ok(())
    } else {
        WeightWork(grads).run()
    }
}

/// Differentiates one segment from `seeds`; returns the gradient of each input leaf (None
/// where it has none). A split backward skips weight-gradient GEMMs and leaves them in
/// `out.work`; otherwise `.backward()` fills every parameter's `.grad`. The gradients of
/// `hold` go to `out.held` instead: the segment is then differentiated by asking autograd
/// for the parameters' gradients and adding them (the same one addition per parameter
/// that `.backward()` makes).
fn backward_segment(
    seg: Segment,
    seeds: &[(V, Tensor)],
    split: bool,
    params: &[Param],
    hold: &[usize],
    out: &mut Out<'_>,
) -> Result<Vec<Option<Tensor>>> {
    // Each seeded output gets its gradient directly (no `sum(out ⊙ g)` surrogate; see
    // [`super::seeded`]). An output that does not require grad passes nothing back.
    let matched: Vec<(&Tensor, &Tensor)> = seeds
        .iter()
        .filter_map(|(v, g)| {
            let (_, out) = seg.outputs.iter().find(|(o, _)| o == v)?;
            Some((out, g))
        })
        .collect();
    if matched.is_empty() {
        return Err(Error::Internal(
            "a segment was seeded with no gradient".into(),
        ));
    }
    let seeded: Vec<(&Tensor, &Tensor)> = matched
        .into_iter()
        .filter(|(out, _)| out.requires_grad())
        .collect();
    let leaves: Vec<&Tensor> = seg.inputs.iter().map(|(_, l)| l).collect();
    if seeded.is_empty() {
        return Ok(leaves.iter().map(|_| None).collect());
    }
    if !split && hold.is_empty() {
        super::seeded::backward(&seeded, &[])?;
        return Ok(leaves
            .iter()
            .map(|l| Some(l.grad()).filter(Tensor::defined))
            .collect());
    }
    let trainable: Vec<(usize, &Param)> = params
        .iter()
        .enumerate()
        .filter(|(_, p)| p.tensor.requires_grad())
        .collect();
    let wanted_leaves: Vec<&Tensor> = leaves
        .iter()
        .copied()
        .filter(|l| l.requires_grad())
        .collect();
    if let Some(r) = seg.records.iter().find(|r| !r.y.requires_grad()) {
        return Err(Error::Internal(format!(
            "a recorded linear output of shape {:?} has no gradient path",
            r.y.size()
        )));
    }
    let mut wrt: Vec<&Tensor> = wanted_leaves.clone();
    wrt.extend(trainable.iter().map(|(_, p)| &p.tensor));
    wrt.extend(seg.records.iter().map(|r| &r.y));
    let mut grads = super::seeded::backward(&seeded, &wrt)?.into_iter();
    let mut leaf_grads: Vec<Option<Tensor>> = Vec::with_capacity(leaves.len());
    let mut by_leaf = grads
        .by_ref()
        .take(wanted_leaves.len())
        .collect::<Vec<_>>()
        .into_iter();
    for l in &leaves {
        leaf_grads.push(if l.requires_grad() {
            by_leaf.next().filter(Tensor::defined)
        } else {
            None
        });
    }
    tch::no_grad(|| -> Result<()> {
        for ((i, p), g) in trainable.iter().zip(grads.by_ref()) {
            if !g.defined() {
                continue;
            }
            if hold.contains(i) {
                out.held.push((*i, g));
            } else {
                let _ = p.tensor.grad().f_add_(&g).ctx("parameter gradient")?;
            }
        }
        Ok(())
    })?;
    for (r, dy) in seg.records.into_iter().zip(grads) {
        if dy.defined() {
            out.work.0.push(WeightGrad {
                x: r.x,
                dy,
                weight: r.weight,
                bias: r.bias,
                transposed: r.transposed,
            });
        }
    }
    Ok(leaf_grads)
}
