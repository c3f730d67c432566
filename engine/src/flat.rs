//! Contiguous parameter and gradient buffers, as in Megatron's DDP: every parameter of a
//! rank is a view into one flat buffer per group, and its `.grad` a view into a matching
//! flat gradient buffer, so the optimizer, gradient clipping and the data-parallel
//! all-reduce each work on a few whole buffers instead of one tensor per parameter.
//!
//! Groups are keyed by (dtype, weight decay, owner): AdamW decays one group and not the
//! other, and the global gradient norm counts only the groups this rank owns.
//!
//! Invariants: after [`FlatBuffers::adopt`], `param.tensor` and `param.tensor.grad()`
//! of every member alias its group's buffers (autograd accumulates into them in place);
//! members are laid out in parameter order; the buffers are never reallocated.

use crate::error::{Error, Result};
use crate::model::Param;
use tch::{Kind, Tensor};

/// Where one parameter sits in its group's buffers.
#[derive(Clone, Debug)]
pub struct Member {
    /// Index in the parameter list given to [`FlatBuffers::adopt`].
    pub param: usize,
    pub offset: usize,
    pub numel: usize,
}

/// One flat buffer of parameters and one of their gradients.
#[derive(Debug)]
pub struct FlatGroup {
    pub kind: Kind,
    /// Weight decay applies to every member.
    pub decay: bool,
    /// This rank counts the members in the global gradient norm.
    pub owner: bool,
    pub params: Tensor,
    pub grads: Tensor,
    pub members: Vec<Member>,
}

impl FlatGroup {
    /// The `[offset, offset + numel)` slice of `buf`.
    pub fn slice(buf: &Tensor, m: &Member) -> Result<Tensor> {
        buf.f_narrow(0, m.offset as i64, m.numel as i64)
            .map_err(Error::torch("flat buffer view"))
    }
}

/// Every group of one rank.
#[derive(Debug, Default)]
pub struct FlatBuffers {
    pub groups: Vec<FlatGroup>,
}

fn torch(what: &'static str) -> impl FnOnce(tch::TchError) -> Error {
    Error::torch(what)
}

impl FlatBuffers {
    /// Moves every parameter's value into its group's flat buffer and makes the parameter
    /// and its gradient views of the buffers (values kept, gradients zeroed).
    pub fn adopt(params: &[Param]) -> Result<FlatBuffers> {
        let mut groups: Vec<FlatGroup> = Vec::new();
        let mut layout: Vec<(usize, usize)> = Vec::with_capacity(params.len());
        for (i, p) in params.iter().enumerate() {
            let kind = p.tensor.kind();
            let key = |g: &FlatGroup| g.kind == kind && g.decay == p.decay && g.owner == p.owner;
            let g = match groups.iter().position(key) {
                Some(g) => g,
                None => {
                    groups.push(FlatGroup {
                        kind,
                        decay: p.decay,
                        owner: p.owner,
                        params: Tensor::new(),
                        grads: Tensor::new(),
                        members: Vec::new(),
                    });
                    groups.len() - 1
                }
            };
            let offset = groups[g].members.iter().map(|m| m.numel).sum();
            let numel = p.tensor.numel();
            groups[g].members.push(Member {
                param: i,
                offset,
                numel,
            });
            layout.push((g, groups[g].members.len() - 1));
        }
        for g in &mut groups {
            let total: usize = g.members.iter().map(|m| m.numel).sum();
            let device = params[g.members[0].param].tensor.device();
            g.params = Tensor::f_zeros([total as i64], (g.kind, device))
                .map_err(torch("flat parameters"))?;
            g.grads = Tensor::f_zeros([total as i64], (g.kind, device))
                .map_err(torch("flat gradients"))?;
        }
        for (p, (g, m)) in params.iter().zip(layout) {
            let group = &groups[g];
            let m = &group.members[m];
            point_into(p, &group.params, &group.grads, m)?;
        }
        Ok(FlatBuffers { groups })
    }

    /// Zeroes every gradient buffer.
    pub fn zero_grads(&self) -> Result<()> {
        for g in &self.groups {
            let _ = g
                .grads
                .shallow_clone()
                .f_zero_()
                .map_err(torch("zeroing gradients"))?;
        }
        Ok(())
    }

    /// Multiplies every gradient by `factor` (global-norm clipping).
    pub fn scale_grads(&self, factor: f64) -> Result<()> {
        for g in &self.groups {
            let _ = g
                .grads
                .shallow_clone()
                .f_mul_scalar_(factor)
                .map_err(torch("clipping gradients"))?;
        }
        Ok(())
    }

    /// Sum of squared gradients over the groups this rank owns (f64 accumulation).
    pub fn owned_grad_sq_norm(&self) -> Result<f64> {
        let mut total = 0.0;
        for g in self.groups.iter().filter(|g| g.owner) {
            total += g
                .grads
                .f_square()
                .and_then(|t| t.f_sum(Kind::Double))
                .and_then(|t| t.f_double_value(&[]))
                .map_err(torch("gradient norm"))?;
        }
        Ok(total)
    }
}

/// Makes `p` a view of `params[m]` (keeping its value) and its gradient a zeroed view of
/// `grads[m]`.
fn point_into(p: &Param, params: &Tensor, grads: &Tensor, m: &Member) -> Result<()> {
    let shape = p.tensor.size();
    let value = FlatGroup::slice(params, m)?;
    tch::no_grad(|| value.shallow_clone().f_copy_(&p.tensor.f_reshape([-1])?))
        .map_err(torch("moving a parameter into its flat buffer"))?;
    let view = value
        .f_view(shape.as_slice())
        .map_err(torch("flat parameter view"))?;
    p.tensor
        .shallow_clone()
        .f_set_data(&view)
        .map_err(torch("flat parameter view"))?;
    let mut grad = p.tensor.grad();
    if !grad.defined() {
        return Err(Error::Internal(format!(
            "{} has no gradient to re-point",
            p.name
        )));
    }
    let gview = FlatGroup::slice(grads, m)?
        .f_view(shape.as_slice())
        .map_err(torch("flat gradient view"))?;
    grad.f_set_data(&gview)
        .map_err(torch("flat gradient view"))?;
    let _ = grad.f_zero_().map_err(torch("flat gradient view"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::sharding::TpRank;
    use crate::model::{Model, ModelSpec};
    use partitioner::{LayerKind, ModelShape};

    #[test]
    fn parameters_and_gradients_alias_the_buffers() {
        let spec = ModelSpec::new(ModelShape::gpt(16, 4, 8, 2, 1, 16));
        let layers = [LayerKind::Embedding, LayerKind::Block(0), LayerKind::Head];
        let model = Model::new(&spec, &layers, 1, TpRank::SINGLE).unwrap();
        let before: Vec<Tensor> = model.params().iter().map(|p| p.tensor.copy()).collect();
        let flat = FlatBuffers::adopt(model.params()).unwrap();
        assert!(flat.groups.len() >= 2, "decay and no-decay groups");
        for (p, b) in model.params().iter().zip(&before) {
            assert!(p.tensor.equal(b), "{} kept its value", p.name);
        }
        // A backward accumulates into the flat gradient buffers, in place.
        let loss: Tensor = model
            .params()
            .iter()
            .map(|p| p.tensor.sum(Kind::Float))
            .sum();
        loss.backward();
        loss.backward();
        let total: i64 = model.params().iter().map(|p| p.tensor.numel() as i64).sum();
        let in_buffers: f64 = flat
            .groups
            .iter()
            .map(|g| g.grads.sum(Kind::Double).double_value(&[]))
            .sum();
        assert_eq!(in_buffers, 2.0 * total as f64);
        // Writing the buffer changes the parameters.
        for g in &flat.groups {
            let _ = g.params.shallow_clone().fill_(0.5);
        }
        assert!(model
            .params()
            .iter()
            .all(|p| p.tensor.mean(Kind::Float).double_value(&[]) == 0.5));
        flat.zero_grads().unwrap();
        assert!(model.params().iter().all(|p| p
            .tensor
            .grad()
            .abs()
            .sum(Kind::Float)
            .double_value(&[])
            == 0.0));
    }
}
