//! A model's float parameters by their stable names (the module path of each parameter, e.g.
//! `layers.0.fmb.mlp.hidden.0.weight`, the same names as the checkpoint keys) and as safetensors
//! bytes, the format PyTorch and most other frameworks read. Linear weights are stored as burn
//! holds them, `[in, out]` (PyTorch's `nn.Linear` holds the transpose).

use std::collections::HashMap;

use anyhow::{Context, Result};
use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::Tensor;

/// One named parameter: name, shape, values.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

/// Collects float parameters (or, with `grads`, their gradients) with their paths. Enum variants
/// (the model registry's `Model`) are entered like fields; `model_parameters` drops that first
/// component.
struct Named<'a> {
    path: Vec<String>,
    grads: Option<&'a burn::tensor::Gradients>,
    out: Vec<NamedTensor>,
}

impl ModuleVisitor for Named<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let t = match self.grads {
            Some(g) => match param.val().grad(g) {
                Some(t) => t,
                None => return,
            },
            None => param.val(),
        };
        let shape = t.dims().to_vec();
        let values = t.into_data().convert::<f32>().try_into_vec::<f32>().unwrap_or_default();
        self.out.push(NamedTensor { name: self.path.join("."), shape, values });
    }
}

/// Every float parameter of `module` (in visiting order), named by its path.
pub fn named_parameters<M: Module>(module: &M) -> Vec<NamedTensor> {
    let mut v = Named { path: Vec::new(), grads: None, out: Vec::new() };
    module.visit(&mut v);
    v.out
}

/// The gradients in `grads` of `module`'s float parameters (those that have one), named as by
/// [`named_parameters`].
pub fn named_gradients<M: Module>(module: &M, grads: &burn::tensor::Gradients) -> Vec<NamedTensor> {
    let mut v = Named { path: Vec::new(), grads: Some(grads), out: Vec::new() };
    module.visit(&mut v);
    v.out
}

/// Drops the first path component (a registry model's variant name).
pub fn strip_variant(mut tensors: Vec<NamedTensor>) -> Vec<NamedTensor> {
    for t in &mut tensors {
        if let Some((_, rest)) = t.name.split_once('.') {
            t.name = rest.to_string();
        }
    }
    tensors
}

/// Every float parameter of a registry model, named by its path inside the model (without the
/// model's variant name).
pub fn model_parameters(model: &super::Model) -> Vec<NamedTensor> {
    strip_variant(named_parameters(model))
}

/// Tensors of any of the kinds safetensors stores, for [`safetensors_bytes`].
#[derive(Debug, Clone)]
pub enum Values {
    F32(Vec<f32>),
    I64(Vec<i64>),
}

/// The safetensors file of `tensors` (names must be distinct) with string `metadata`.
pub fn safetensors_bytes(tensors: &[(String, Vec<usize>, Values)], metadata: HashMap<String, String>) -> Result<Vec<u8>> {
    use safetensors::tensor::{Dtype, TensorView};
    let bytes: Vec<(Dtype, Vec<u8>)> = tensors
        .iter()
        .map(|(_, _, v)| match v {
            Values::F32(v) => (Dtype::F32, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
            Values::I64(v) => (Dtype::I64, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        })
        .collect();
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), (dtype, data))| {
            TensorView::new(*dtype, shape.clone(), data).map(|v| (name.clone(), v)).with_context(|| format!("tensor {name}"))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::tensor::serialize(views, Some(metadata)).context("cannot serialize safetensors")
}
