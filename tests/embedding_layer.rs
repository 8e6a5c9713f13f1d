//! The paper's whole embedding layer (§3.2): several embeddings for an important field
//! (`[data] embeddings`, every model) and narrow fields grouped by an MLP (Wukong's
//! `field_dims`): layout, batches, semantics, FLOPs and errors. Training with both is in
//! `end_to_end.rs`; their gradients are in `models.rs` (the grouped Wukong is one of
//! `common::MODELS`).

use std::collections::BTreeMap;
use std::sync::Arc;

use burn::tensor::Device;
use wukong::data::loader::batch_of;
use wukong::data::{Batch, BatchLoader, EncodedDataset, Encoder};
use wukong::model::{DataShape, ModelConfig, Pass, SlotLayout, SparseEmbedding, SparseInput, TableStorage};

mod common;

fn plan(items: &[(&str, usize)]) -> BTreeMap<String, usize> {
    items.iter().map(|&(k, m)| (k.to_string(), m)).collect()
}

/// Fields `user` (one slot, rows 0..6), `tags` (two slots, rows 6..11), `ctx` (rows 11..15).
fn encoder() -> Encoder {
    Encoder::fixed(vec![("user".into(), 1, 5), ("tags".into(), 2, 4), ("ctx".into(), 1, 3)], vec![])
}

/// Three examples: (user row, two tag rows, ctx row) with mean-pooled tag weights.
fn dataset() -> EncodedDataset {
    let mut d = EncodedDataset::new(4, 0);
    for (i, rows) in [[1u32, 7, 8, 12], [5, 10, 6, 14], [1, 9, 9, 11]].iter().enumerate() {
        d.labels.push((i % 2) as f32);
        d.rows.extend_from_slice(rows);
        d.values.extend_from_slice(&[1.0, 0.5, 0.5, 1.0]);
    }
    d
}

/// Every (example, slot)'s row and value, read back from a batch.
fn slots_of(b: &Batch, slots: usize) -> Vec<Vec<(i64, f32)>> {
    (0..b.size)
        .map(|i| {
            (0..slots)
                .map(|s| {
                    let k = i * slots + s;
                    (b.unique_rows[b.inverse[k] as usize], b.values.as_ref().map_or(1.0, |v| v[k]))
                })
                .collect()
        })
        .collect()
}

#[test]
fn several_embeddings_per_field_are_their_own_rows_and_fields() {
    // `user` by name, `tags` by position
    let enc = encoder().with_embeddings(&plan(&[("user", 2), ("1", 3)])).unwrap();
    assert_eq!(enc.total_rows(), 15, "the encoding itself is unchanged");
    assert_eq!(enc.model_fields(), 2 + 3 + 1);
    assert_eq!(enc.model_rows(), 15 + 6 + 2 * 5);
    assert_eq!(enc.model_slot_fields(), vec![0, 1, 1, 2, 3, 4, 4, 5, 5]);
    assert_eq!(DataShape::of(&enc), DataShape { fields: 6, dense: 0, table_rows: 31 });
    assert!(enc.describe().contains("user (0 + 5 buckets, 2 embeddings)"), "{}", enc.describe());

    // user's copy: rows 15..21; tags' copies: 21..26 and 26..31 — each value's own rows
    let expected = |r: [u32; 4]| -> Vec<(i64, f32)> {
        let (u, t1, t2, c) = (r[0] as i64, r[1] as i64, r[2] as i64, r[3] as i64);
        vec![
            (u, 1.0),
            (t1, 0.5),
            (t2, 0.5),
            (c, 1.0),
            (15 + u, 1.0),
            (21 + t1 - 6, 0.5),
            (21 + t2 - 6, 0.5),
            (26 + t1 - 6, 0.5),
            (26 + t2 - 6, 0.5),
        ]
    };
    let want: Vec<_> = [[1, 7, 8, 12], [5, 10, 6, 14], [1, 9, 9, 11]].into_iter().map(expected).collect();
    let data = dataset();
    // the serving path (hash-map de-duplication) …
    let served = batch_of(&data, 15, &enc.extra_embeddings()).unwrap();
    assert_eq!(slots_of(&served, 9), want);
    // … and the training loader agree
    let loader = BatchLoader::new(Arc::new(data.clone()), 15, 3).with_extra(enc.extra_embeddings());
    let trained = loader.epoch(None).next().unwrap().unwrap();
    assert_eq!(slots_of(&trained, 9), want);
    let mut distinct = trained.unique_rows.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), trained.unique_rows.len(), "unique rows are distinct");

    // the model's layout pools each copy of the multi-hot field into its own field
    let layout = SlotLayout::of(&enc);
    assert_eq!((layout.slots(), layout.fields), (9, 6));
    let input = SparseInput::from_batch(&trained, &layout, &Device::flex());
    let table = SparseEmbedding::new(31, 4, 1.0, &Device::flex());
    let (x, _) = table.lookup(&input, false);
    assert_eq!(x.dims(), [3, 6, 4]);
    // field 4 (tags' first copy) of example 0 = 0.5·row 22 + 0.5·row 23
    let all = table.values_f32().unwrap();
    let got: Vec<f32> = x.slice([0..1, 4..5, 0..4]).into_data().try_to_vec().unwrap();
    for c in 0..4 {
        let want = 0.5 * all[22 * 4 + c] + 0.5 * all[23 * 4 + c];
        assert!((got[c] - want).abs() < 1e-6, "column {c}: {} vs {want}", got[c]);
    }
}

#[test]
fn a_row_outside_its_field_and_a_bad_plan_are_clear_errors() {
    let enc = encoder().with_embeddings(&plan(&[("tags", 2)])).unwrap();
    let mut data = dataset();
    data.rows[4 + 1] = 12; // example 1's first tag slot holds a `ctx` row
    let err = batch_of(&data, 15, &enc.extra_embeddings()).unwrap_err().to_string();
    assert!(err.contains("example 1") && err.contains("slot 1") && err.contains("not a row of its field"), "{err}");
    let err =
        BatchLoader::new(Arc::new(data), 15, 3).with_extra(enc.extra_embeddings()).epoch(None).next().unwrap().unwrap_err().to_string();
    assert!(err.contains("example 1") && err.contains("not a row of its field"), "{err}");

    let err = encoder().with_embeddings(&plan(&[("usr", 2)])).unwrap_err().to_string();
    assert!(err.contains("no field \"usr\"") && err.contains("user, tags, ctx"), "{err}");
    let err = encoder().with_embeddings(&plan(&[("user", 0)])).unwrap_err().to_string();
    assert!(err.contains("data.embeddings.user = 0"), "{err}");
    let err = encoder().with_embeddings(&plan(&[("7", 2)])).unwrap_err().to_string();
    assert!(err.contains("no field \"7\""), "{err}");
    // one embedding everywhere is the plain layout
    let plain = encoder().with_embeddings(&plan(&[("user", 1)])).unwrap();
    assert_eq!(plain, encoder());
    assert!(plain.extra_embeddings().is_empty());
}

fn wukong(extra: &str) -> ModelConfig {
    toml::from_str(&format!(
        "name = \"wukong\"\nembedding_dim = 8\nnum_layers = 2\nnum_fmb = 4\nnum_lcb = 4\nfm_rank = 2\nfmb_mlp = [16]\ntop_mlp = [16]\n{extra}"
    ))
    .unwrap()
}

/// A batch of 4 examples, one row of each field's block (field f owns rows 4f..4f+4).
fn one_hot_batch() -> Batch {
    let rows: Vec<i64> = (0..4 * 3).map(|k| (k % 3) as i64 * 4 + (k / 3) as i64).collect();
    Batch { size: 4, labels: vec![0.0, 1.0, 0.0, 1.0], unique_rows: rows.clone(), inverse: (0..12).collect(), values: None, dense: None }
}

#[test]
fn a_narrow_field_reads_only_its_first_columns() {
    let _turn = common::serial();
    let device = Device::flex();
    device.seed(3);
    let shape = DataShape { fields: 3, dense: 0, table_rows: 12 };
    let c = wukong("field_dims = { 1 = 3 }");
    c.validate().unwrap();
    c.check_shape(&shape).unwrap();
    let model = c.init(&shape, &device);
    let input = SparseInput::from_batch(&one_hot_batch(), &SlotLayout::one_hot(3), &device);
    let logits = |m: &wukong::model::Model| -> Vec<f32> { m.forward(&input, false, &Pass::f32()).0.into_data().try_to_vec().unwrap() };
    let base = logits(&model);
    let values = model.embedding().values_f32().unwrap();
    // the original table with one value changed
    let with = |row: usize, col: usize, model: wukong::model::Model| {
        let mut v = values.clone();
        v[row * 8 + col] += 1.0;
        model.map_embedding(|_| SparseEmbedding::from_values(v, 12, 8, TableStorage::F32, &Device::flex()))
    };
    // field 1 owns rows 4..8: its columns 3.. are never read
    let model = with(5, 6, model);
    assert_eq!(logits(&model), base, "column 6 of a width-3 field must not matter");
    let model = with(5, 2, model);
    assert_ne!(logits(&model), base, "column 2 of a width-3 field must matter");
    // a wide field reads every column
    let model = with(1, 7, model);
    assert_ne!(logits(&model), base, "column 7 of a wide field must matter");
}

#[test]
fn grouping_is_counted_in_flops_and_checked_against_the_data() {
    let shape = DataShape { fields: 3, dense: 0, table_rows: 12 };
    // fields 1 and 2 (widths 3 and 5) → one embedding: two embeddings enter the stack, as with a
    // two-field dataset, plus the group MLP 8 → 6 → 8
    let grouped = wukong("field_dims = { 1 = 3, 2 = 5 }\ngroup_mlp = [6]");
    let plain = wukong("");
    let two = DataShape { fields: 2, ..shape };
    assert_eq!(grouped.forward_flops(&shape), plain.forward_flops(&two) + 2 * (8 * 6 + 6 * 8));
    let ModelConfig::Wukong(w) = &grouped else { unreachable!() };
    assert_eq!(w.n0(&shape), 2);
    // the built model has those parameters (its draw waits its turn: another test here is seeded)
    let _turn = common::serial();
    let m = grouped.init(&shape, &Device::flex());
    let wukong::model::Model::Wukong(inner) = &m else { unreachable!() };
    assert_eq!((inner.wide_fields.clone(), inner.narrow_fields.clone(), inner.narrow_widths.clone()), (vec![0], vec![1, 2], vec![3, 5]));

    let err = wukong("field_dims = { 3 = 4 }").check_shape(&shape).unwrap_err().to_string();
    assert!(err.contains("model.field_dims.3") && err.contains("3 categorical fields"), "{err}");
    let err = wukong("field_dims = { 1 = 8 }").validate().unwrap_err().to_string();
    assert!(err.contains("model.field_dims.1 = 8"), "{err}");
    let err = wukong("field_dims = { user = 4 }").validate().unwrap_err().to_string();
    assert!(err.contains("not a field position"), "{err}");
    let err = wukong("field_dims = { 1 = 4 }\ngroup_embeddings = 0").validate().unwrap_err().to_string();
    assert!(err.contains("group_embeddings"), "{err}");
    // untouched configs serialise as before (checkpoint and sweep configs stay comparable)
    assert!(!toml::to_string(&plain).unwrap().contains("group"));
}
