//! The sparse embedding path: gathered-row gradients and the in-place row-wise Adagrad update
//! against the dense computation.

use burn::tensor::{Device, Distribution, Tensor, TensorData};
use wukong::data::Batch;
use wukong::model::{SlotLayout, SparseEmbedding, SparseInput};
use wukong::train::RowWiseAdagrad;

mod common;

fn to_vec<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_to_vec::<f32>().unwrap()
}

/// 3 examples × 2 fields over a 10-row table; rows 0, 2, 5, 9 are touched (5 twice).
fn batch() -> Batch {
    let slots: Vec<i64> = vec![2, 5, 0, 5, 9, 2];
    let mut unique = Vec::new();
    let inverse = slots
        .iter()
        .map(|r| match unique.iter().position(|u| u == r) {
            Some(p) => p as i64,
            None => {
                unique.push(*r);
                unique.len() as i64 - 1
            }
        })
        .collect();
    Batch { size: 3, labels: vec![1.0, 0.0, 1.0], unique_rows: unique, inverse, values: None, dense: None }
}

const D: usize = 3;
const ROWS: usize = 10;

/// The batch's distinct rows as an index tensor.
fn unique_index(b: &Batch, device: &Device) -> Tensor<1, burn::tensor::Int> {
    Tensor::from_data(TensorData::new(b.unique_rows.clone(), [b.unique_rows.len()]), device)
}

/// After an optimizer step: touched rows equal the host computation `expected`, untouched rows
/// are bit-identical to `before`.
fn assert_touched_rows_follow(touched: &[i64], before: &[f32], after: &[f32], expected: &[f32]) {
    for r in 0..ROWS {
        for j in 0..D {
            let i = r * D + j;
            if touched.contains(&(r as i64)) {
                assert!((after[i] - expected[i]).abs() < 1e-5, "row {r}: {} vs {}", after[i], expected[i]);
            } else {
                assert_eq!(after[i].to_bits(), before[i].to_bits(), "untouched row {r} changed");
            }
        }
    }
}

/// A smooth non-linear loss of the looked-up embeddings.
fn loss_of(x: Tensor<3>, w: &Tensor<3>) -> Tensor<1> {
    (x.clone() * w.clone()).sum() + x.powi_scalar(2).sum().mul_scalar(0.5) + (w.clone().sum_dim(2) * 0.0).sum()
}

#[test]
fn gathered_row_gradient_matches_dense_and_finite_differences() {
    let _turn = common::serial();
    let device = Device::flex();
    device.seed(3);
    let ad = device.clone().autodiff();
    let emb = SparseEmbedding::new(ROWS, D, 0.5, &ad);
    let table = to_vec(emb.weight.val().inner());
    let w = Tensor::<3>::random([3, 2, D], Distribution::Normal(0.0, 1.0), &ad);
    let b = batch();
    let input = SparseInput::from_batch(&b, &SlotLayout::one_hot(2), &ad);

    // sparse path: gradient of the [U, d] leaf
    let (x, gathered) = emb.lookup(&input, true);
    let mut grads = loss_of(x, &w).backward();
    let g = gathered.unwrap();
    let sparse_grad = to_vec(g.rows.grad_remove(&mut grads).unwrap());

    // dense path: the whole table as a leaf, gathered slot by slot
    let full = Tensor::<2>::from_data(TensorData::new(table.clone(), [ROWS, D]), &ad).require_grad();
    let slots = Tensor::<1, burn::tensor::Int>::from_data(TensorData::new(vec![2i64, 5, 0, 5, 9, 2], [6]), &ad);
    let x = full.clone().select(0, slots).reshape([3, 2, D]);
    let grads = loss_of(x, &w).backward();
    let dense_grad = to_vec(full.grad(&grads).unwrap());
    for (u, &r) in b.unique_rows.iter().enumerate() {
        for j in 0..D {
            let (s, d) = (sparse_grad[u * D + j], dense_grad[r as usize * D + j]);
            assert!((s - d).abs() < 1e-5, "row {r} dim {j}: sparse {s} vs dense {d}");
        }
    }
    for r in [1, 3, 4, 6, 7, 8] {
        assert!(dense_grad[r * D..(r + 1) * D].iter().all(|&v| v == 0.0), "untouched row {r} has a gradient");
    }

    // finite differences on the table entries of touched rows
    let w_plain = w.inner();
    let f = |t: &[f32]| {
        let e = SparseEmbedding {
            weight: burn::module::Param::from_tensor(Tensor::from_data(TensorData::new(t.to_vec(), [ROWS, D]), &device)),
        };
        let (x, _) = e.lookup(&SparseInput::from_batch(&b, &SlotLayout::one_hot(2), &device), false);
        loss_of(x, &w_plain).into_scalar::<f32>() as f64
    };
    let h = 1e-2f32;
    for (u, &r) in b.unique_rows.iter().enumerate() {
        for j in 0..D {
            let i = r as usize * D + j;
            let (mut p, mut m) = (table.clone(), table.clone());
            p[i] += h;
            m[i] -= h;
            let numeric = (f(&p) - f(&m)) / (2.0 * h as f64);
            assert!((numeric - sparse_grad[u * D + j] as f64).abs() < 1e-2, "row {r}: fd {numeric} vs {}", sparse_grad[u * D + j]);
        }
    }
}

#[test]
fn row_wise_adagrad_updates_touched_rows_only_and_matches_the_formula() {
    let _turn = common::serial();
    let device = Device::flex();
    device.seed(5);
    let emb = SparseEmbedding::new(ROWS, D, 0.5, &device);
    let before = to_vec(emb.weight.val());
    let b = batch();
    let u = b.unique_rows.len();
    let grad_host: Vec<f32> = (0..u * D).map(|i| (i as f32 * 0.37).sin()).collect();
    let (lr, eps, l2, init_acc) = (0.1f64, 1e-8f64, 0.01f64, 0.1f64);

    let mut opt = RowWiseAdagrad::new(ROWS, init_acc, eps, l2, &device);
    let idx = unique_index(&b, &device);
    let rows = emb.weight.val().select(0, idx.clone());
    let grad = Tensor::<2>::from_data(TensorData::new(grad_host.clone(), [u, D]), &device);
    // two steps with the same gradient: the accumulator must carry over
    let emb = opt.step(emb, idx.clone(), rows, grad.clone(), lr);
    let rows = emb.weight.val().select(0, idx.clone());
    let emb = opt.step(emb, idx, rows, grad, lr);
    let after = to_vec(emb.weight.val());
    let acc = to_vec(opt.accumulator().clone());

    // the dense computation, on the host
    let mut w = before.clone();
    let mut a = [init_acc as f32; ROWS];
    for _ in 0..2 {
        for (k, &r) in b.unique_rows.iter().enumerate() {
            let r = r as usize;
            let g: Vec<f32> = (0..D).map(|j| grad_host[k * D + j] + l2 as f32 * w[r * D + j]).collect();
            a[r] += g.iter().map(|v| v * v).sum::<f32>() / D as f32;
            for j in 0..D {
                w[r * D + j] -= lr as f32 * g[j] / (a[r].sqrt() + eps as f32);
            }
        }
    }
    assert_touched_rows_follow(&b.unique_rows, &before, &after, &w);
    for r in 0..ROWS {
        assert!((acc[r] - a[r]).abs() < 1e-6);
    }
}

#[test]
fn multi_hot_slots_are_weighted_and_pooled_per_field() {
    let _turn = common::serial();
    let device = Device::flex();
    device.seed(5);
    let emb = SparseEmbedding::new(ROWS, D, 0.5, &device);
    let table = to_vec(emb.weight.val().inner());
    // two examples, layout: field 0 = slot 0, field 1 = slots 1..3 (a multi-hot of width 2)
    let layout = SlotLayout { slot_fields: vec![0, 1, 1], fields: 2 };
    let b = Batch {
        size: 2,
        labels: vec![1.0, 0.0],
        unique_rows: vec![1, 4, 6, 0],
        inverse: vec![0, 1, 2, 3, 1, 0],
        values: Some(vec![1.0, 0.5, 0.5, 1.0, 2.0, 0.0]),
        dense: None,
    };
    let (x, _) = emb.lookup(&SparseInput::from_batch(&b, &layout, &device), false);
    assert_eq!(x.dims(), [2, 2, D]);
    let x = to_vec(x);
    let row = |r: usize, j: usize| table[r * D + j];
    for j in 0..D {
        assert!((x[j] - row(1, j)).abs() < 1e-6);
        assert!((x[D + j] - (0.5 * row(4, j) + 0.5 * row(6, j))).abs() < 1e-6, "mean of rows 4 and 6");
        assert!((x[2 * D + j] - row(0, j)).abs() < 1e-6);
        assert!((x[3 * D + j] - 2.0 * row(4, j)).abs() < 1e-6, "weight 2 on row 4, padding slot weight 0");
    }
}

#[test]
fn stochastic_rounding_is_unbiased_and_stays_on_the_format_grid() {
    use burn::tensor::DType;
    use wukong::model::TableStorage;
    let _turn = common::serial();
    let device = Device::flex();
    device.seed(11);
    let n = 20_000;
    // ordinary values, a value just below a power of two, and an f16 subnormal
    // Both implementations: the one-pass CPU kernel and the tensor-operation one other backends use.
    type Round = fn(TableStorage, Tensor<2>) -> Tensor<2>;
    let kernels: [(&str, Round); 2] =
        [("cpu kernel", TableStorage::round_stochastic), ("portable", TableStorage::round_stochastic_portable)];
    for (storage, (kernel, round)) in [TableStorage::F16, TableStorage::Bf16].into_iter().flat_map(|s| kernels.map(|k| (s, k))) {
        for v in [0.123_456_7f32, -3.300_001, 0.999_99, 3.0e-6, -2.0e-7, 1.0e-8] {
            let x = Tensor::<2>::full([n, 1], v, &device);
            let storage_name = format!("{storage:?} ({kernel})");
            let r = round(storage, x.clone());
            assert_eq!(r.dtype(), storage.dtype());
            let r = to_vec(r.cast(DType::F32));
            // the two neighbours on the grid, found by round-to-nearest of values nudged either way
            let nearest = to_vec(x.cast(storage.dtype()).cast(DType::F32))[0];
            let mut seen: Vec<f32> = r.clone();
            seen.sort_by(f32::total_cmp);
            seen.dedup();
            assert!(seen.len() <= 2, "{storage_name} {v}: more than two rounded values {seen:?}");
            assert!(seen.contains(&nearest) || v == 0.0, "{storage_name} {v}: nearest {nearest} never produced: {seen:?}");
            let (lo, hi) = (seen[0], *seen.last().unwrap());
            assert!(lo <= v && v <= hi, "{storage_name} {v}: {seen:?} do not bracket the value");
            let mean = r.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
            // Bernoulli between the two neighbours: σ(mean) ≤ (hi − lo) / (2 √n)
            let tol = 4.0 * (hi - lo) as f64 / (2.0 * (n as f64).sqrt()) + 1e-12;
            assert!((mean - v as f64).abs() <= tol, "{storage_name} {v}: mean {mean} (tolerance {tol})");
        }
    }
}

#[test]
fn half_precision_tables_keep_updates_smaller_than_their_spacing() {
    use burn::tensor::DType;
    use wukong::model::TableStorage;
    let _turn = common::serial();
    let device = Device::flex();
    device.seed(12);
    for storage in [TableStorage::F16, TableStorage::Bf16] {
        let start = 0.5f32;
        let mut emb =
            SparseEmbedding { weight: burn::module::Param::from_tensor(Tensor::<2>::full([4, 8], start, (&device, storage.dtype()))) };
        assert_eq!(emb.weight.dtype(), storage.dtype());
        assert_eq!(emb.table_bytes(), 4 * 8 * 2);
        // a tenth of the grid spacing at 0.5: round-to-nearest would drop every one of them
        let spacing = if storage == TableStorage::F16 { 2f32.powi(-11) } else { 2f32.powi(-8) };
        let delta = spacing / 10.0;
        let nearest = to_vec(Tensor::<2>::full([1, 1], start + delta, &device).cast(storage.dtype()).cast(DType::F32))[0];
        assert_eq!(nearest, start, "the test needs updates that round-to-nearest loses");
        let idx = Tensor::<1, burn::tensor::Int>::from_data(TensorData::new(vec![1i64, 3], [2]), &device);
        let steps = 2000;
        for _ in 0..steps {
            let current = emb.weight.val().select(0, idx.clone()).cast(DType::F32);
            emb = emb.add_rows(idx.clone(), current, Tensor::<2>::full([2, 8], delta, &device));
        }
        let table = to_vec(emb.weight.val().cast(DType::F32));
        let expected = start + steps as f32 * delta;
        for r in 0..4 {
            let row = &table[r * 8..(r + 1) * 8];
            let mean = row.iter().sum::<f32>() / 8.0;
            if r == 1 || r == 3 {
                assert!((mean - expected).abs() < 0.1 * (expected - start), "{storage:?} row {r}: {mean} vs {expected}");
            } else {
                assert!(row.iter().all(|&x| x == start), "{storage:?}: untouched row {r} changed");
            }
        }
    }
}

#[test]
fn sparse_adam_updates_touched_rows_only_and_matches_the_formula() {
    use wukong::train::SparseAdam;
    let _turn = common::serial();
    let device = Device::flex();
    device.seed(6);
    let emb = SparseEmbedding::new(ROWS, D, 0.5, &device);
    let before = to_vec(emb.weight.val());
    let b = batch();
    let u = b.unique_rows.len();
    let (lr, b1, b2, eps, l2) = (0.01f64, 0.9f64, 0.999f64, 1e-8f64, 0.01f64);
    let mut opt = SparseAdam::new(ROWS, D, b1, b2, eps, l2, &device);
    let idx = unique_index(&b, &device);
    let grads: Vec<Vec<f32>> = (0..3).map(|s| (0..u * D).map(|i| ((i + 7 * s) as f32 * 0.37).sin()).collect()).collect();
    let mut emb = emb;
    for g in &grads {
        let rows = emb.weight.val().select(0, idx.clone());
        emb = opt.step(emb, idx.clone(), rows, Tensor::<2>::from_data(TensorData::new(g.clone(), [u, D]), &device), lr);
    }
    let after = to_vec(emb.weight.val());

    // PyTorch SparseAdam's arithmetic, on the host
    let mut w = before.clone();
    let (mut m, mut v) = (vec![0f32; ROWS * D], vec![0f32; ROWS * D]);
    for (s, g) in grads.iter().enumerate() {
        let t = s as i32 + 1;
        let step_size = (lr * (1.0 - b2.powi(t)).sqrt() / (1.0 - b1.powi(t))) as f32;
        for (k, &r) in b.unique_rows.iter().enumerate() {
            for j in 0..D {
                let i = r as usize * D + j;
                let gi = g[k * D + j] + l2 as f32 * w[i];
                m[i] = b1 as f32 * m[i] + (1.0 - b1 as f32) * gi;
                v[i] = b2 as f32 * v[i] + (1.0 - b2 as f32) * gi * gi;
                w[i] -= step_size * m[i] / (v[i].sqrt() + eps as f32);
            }
        }
    }
    assert_touched_rows_follow(&b.unique_rows, &before, &after, &w);
    for &r in &b.unique_rows {
        for j in 0..D {
            let i = r as usize * D + j;
            assert!((after[i] - before[i]).abs() > 1e-3, "row {r} did not move");
        }
    }
    let (m_t, v_t) = opt.moments();
    let (m_t, v_t) = (to_vec(m_t.clone()), to_vec(v_t.clone()));
    for i in 0..ROWS * D {
        assert!((m_t[i] - m[i]).abs() < 1e-6 && (v_t[i] - v[i]).abs() < 1e-6, "moments at {i}");
    }
}
