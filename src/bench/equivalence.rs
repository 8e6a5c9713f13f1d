//! `wukong equivalence`: the same training steps on two devices from identical parameters,
//! batches and dropout masks; losses and final parameters compared (the CPU-vs-GPU check).

use anyhow::Result;
use serde::Serialize;
use std::sync::Arc;

use super::Spec;
use crate::data::{BatchLoader, EncodedDataset};
use crate::model::SlotLayout;
use crate::train::Stepper;

/// Result of running the same steps on two devices from the same initial parameters.
#[derive(Debug, Clone, Serialize)]
pub struct Equivalence {
    pub device_a: String,
    pub device_b: String,
    pub losses_a: Vec<f32>,
    pub losses_b: Vec<f32>,
    /// max over steps of |loss_a − loss_b|.
    pub max_loss_diff: f64,
    /// max over parameter tensors of ‖p_a − p_b‖ / max(‖p_a‖, 1e-12) after the last step.
    pub max_param_rel_diff: f64,
    /// The tensor where that maximum is (its path, as checkpoint keys) and its norm ‖p_a‖:
    /// a small tensor (a bias, a LayerNorm shift) magnifies float-order differences.
    pub worst_param: String,
    pub worst_param_norm: f64,
    pub tolerance: f64,
    pub passed: bool,
}

/// Trains `steps` steps of the spec's model on two devices from identical parameters (built on
/// `a`, copied to `b`), same batches and dropout masks; compares losses and final parameters.
pub fn equivalence(spec: &Spec, data: EncodedDataset, device_a: &str, device_b: &str, steps: usize, tolerance: f64) -> Result<Equivalence> {
    use burn::module::Module;
    let (da, db) = (crate::runtime::parse_device(device_a)?, crate::runtime::parse_device(device_b)?);
    da.seed(spec.train.seed);
    let shape = spec.shape();
    let layout = SlotLayout::one_hot(shape.fields);
    let model_a = spec.model.init_with_storage(&shape, spec.train.emb_storage, &da.clone().autodiff());
    let model_b = model_a.clone().fork(&db.clone().autodiff());
    let mut sa = Stepper::new(model_a, &spec.model, &spec.train, layout.clone(), &da);
    let mut sb = Stepper::new(model_b, &spec.model, &spec.train, layout, &db);
    let loader = BatchLoader::new(Arc::new(data), spec.table_rows, spec.batch_size);
    let (mut losses_a, mut losses_b) = (Vec::new(), Vec::new());
    for batch in loader.epoch(None).take(steps) {
        let batch = batch?;
        // the same dropout masks on both devices
        sb.set_dropout_stream(sa.dropout_stream());
        losses_a.push(sa.step(&batch, spec.train.lr, spec.train.emb_lr)?);
        losses_b.push(sb.step(&batch, spec.train.lr, spec.train.emb_lr)?);
    }
    let (pa, pb) = (crate::model::export::named_parameters(sa.model()), crate::model::export::named_parameters(sb.model()));
    anyhow::ensure!(pa.len() == pb.len(), "the two models have different parameter lists");
    let (mut max_rel, mut worst_param, mut worst_param_norm) = (0.0f64, String::new(), 0.0f64);
    for (a, b) in pa.iter().zip(&pb) {
        anyhow::ensure!(a.values.len() == b.values.len(), "parameter {} differs in size between devices", a.name);
        let diff = a.values.iter().zip(&b.values).map(|(x, y)| ((x - y) as f64).powi(2)).sum::<f64>().sqrt();
        let norm = a.values.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        let rel = diff / norm.max(1e-12);
        if rel > max_rel {
            (max_rel, worst_param, worst_param_norm) = (rel, a.name.clone(), norm);
        }
    }
    let max_loss_diff = losses_a.iter().zip(&losses_b).map(|(a, b)| (a - b).abs() as f64).fold(0.0, f64::max);
    let passed = max_loss_diff <= tolerance && max_rel <= tolerance && losses_a.len() == steps;
    Ok(Equivalence {
        device_a: device_a.into(),
        device_b: device_b.into(),
        losses_a,
        losses_b,
        max_loss_diff,
        max_param_rel_diff: max_rel,
        worst_param,
        worst_param_norm,
        tolerance,
        passed,
    })
}
