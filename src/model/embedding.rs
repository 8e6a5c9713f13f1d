//! Sparse embedding tables.
//!
//! All categorical fields share one concatenated table (each field owns a block of rows, see
//! [`crate::data::Encoder`]). The table is a parameter that autodiff never tracks: a training
//! step gathers only the batch's unique rows, makes that small `[U, d]` tensor the autodiff
//! leaf, and the row-wise optimizer ([`crate::train::RowWiseAdagrad`]) writes the update back
//! into those rows in place. No full-table gradient or optimizer pass happens per step.

use burn::module::{Module, Param, ParamId};
use burn::tensor::{DType, Device, Distribution, Int, Tensor, TensorData, bf16, f16};
use serde::{Deserialize, Serialize};

use crate::data::Batch;

#[derive(Module, Debug)]
pub struct SparseEmbedding {
    pub weight: Param<Tensor<2>>,
}

/// Number format of the stored table rows. Lookups and optimizer arithmetic are always f32; a
/// half-precision table halves its memory (the paper trains its tables in FP16). Writes back to a
/// half table round *stochastically* (unbiased), so updates smaller than half an ulp are not
/// lost the way round-to-nearest loses them.
/// How a model's embedding table is created: its storage, and in a job with a row-sharded table
/// the `(rank, ranks)` whose rows this process keeps (the others are drawn and dropped block by
/// block, so the whole table never exists in one process).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TableInit {
    pub storage: TableStorage,
    pub shard: Option<(usize, usize)>,
}

impl From<TableStorage> for TableInit {
    fn from(storage: TableStorage) -> Self {
        Self { storage, shard: None }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum TableStorage {
    #[default]
    F32,
    F16,
    Bf16,
}

impl TableStorage {
    pub fn dtype(self) -> DType {
        match self {
            TableStorage::F32 => DType::F32,
            TableStorage::F16 => DType::F16,
            TableStorage::Bf16 => DType::BF16,
        }
    }
    pub fn bytes_per_value(self) -> usize {
        match self {
            TableStorage::F32 => 4,
            _ => 2,
        }
    }
    /// Explicit mantissa bits and the smallest normal exponent of the format.
    fn grid(self) -> (i32, i32) {
        match self {
            TableStorage::F32 => (23, -126),
            TableStorage::F16 => (10, -14),
            TableStorage::Bf16 => (7, -126),
        }
    }

    /// Rounds f32 values to this format's grid, up or down at random with the probabilities that
    /// make the result unbiased (E[round(v)] = v), and returns them in this format: one pass of
    /// bit arithmetic on the CPU, tensor operations on other backends.
    pub fn round_stochastic(self, v: Tensor<2>) -> Tensor<2> {
        if self == TableStorage::F32 {
            return v;
        }
        if super::fused::fused_enabled() && v.device().inner() == Device::flex() && v.dtype() == DType::F32 {
            return self.round_stochastic_host(v);
        }
        self.round_stochastic_portable(v)
    }

    /// [`Self::round_stochastic`] with tensor operations only (any backend; ~18 element-wise
    /// passes). The grid spacing at v is 2^(⌊log₂|v|⌋ − mantissa bits), floored at the format's
    /// subnormal spacing. Where float error in log₂ picks the exponent one too high (just below a
    /// power of two) the grid is coarser than the format's — still representable, still unbiased;
    /// one too low only happens at exact powers of two, which every grid contains.
    pub fn round_stochastic_portable(self, v: Tensor<2>) -> Tensor<2> {
        if self == TableStorage::F32 {
            return v;
        }
        let (bits, min_exp) = self.grid();
        let exponent = v.clone().abs().clamp_min(2f32.powi(min_exp)).log().div_scalar(std::f32::consts::LN_2).floor();
        let spacing = exponent.sub_scalar(bits as f32).mul_scalar(std::f32::consts::LN_2).exp();
        let down = (v.clone() / spacing.clone()).floor() * spacing.clone();
        let p_up = (v - down.clone()) / spacing.clone();
        let u = Tensor::<2>::random(p_up.dims(), Distribution::Default, &p_up.device());
        let up = u.lower(p_up).float();
        (down + up * spacing).cast(self.dtype())
    }

    /// [`Self::round_stochastic`] on the CPU in one pass of bit arithmetic on the f32 values, one
    /// random draw per value. The stream is seeded by one draw from the device generator, so runs
    /// stay reproducible under `Device::seed`.
    fn round_stochastic_host(self, v: Tensor<2>) -> Tensor<2> {
        let device = v.device();
        let dims = v.dims();
        let draw: Vec<f32> =
            Tensor::<1>::random([4], Distribution::Uniform(0.0, 65536.0), &device).into_data().try_into_vec::<f32>().expect("f32 draws");
        let seed = draw.iter().fold(0u64, |acc, &d| (acc << 16) | (d as u64 & 0xFFFF));
        let x: Vec<f32> = v.into_data().try_into_vec::<f32>().expect("f32 values");
        let data = match self {
            TableStorage::F16 => TensorData::new(round_all(&x, seed, round_f16), dims),
            _ => TensorData::new(round_all(&x, seed, round_bf16), dims),
        };
        Tensor::<2>::from_data(data, (&device, self.dtype()))
    }
}

/// `round(x[i], r_i)` for every value, in parallel; `r_i` is a hash of (seed, i), so the result
/// does not depend on how the work is split across threads.
fn round_all<T: Send + Default + Clone>(x: &[f32], seed: u64, round: fn(f32, u32) -> T) -> Vec<T> {
    use rayon::prelude::*;
    const CHUNK: usize = 4096;
    let mut out = vec![T::default(); x.len()];
    x.par_chunks(CHUNK).zip(out.par_chunks_mut(CHUNK)).enumerate().for_each(|(c, (x, out))| {
        for (i, (&x, o)) in x.iter().zip(out.iter_mut()).enumerate() {
            *o = round(x, splitmix64(seed ^ (c * CHUNK + i) as u64) as u32);
        }
    });
    out
}

use crate::rng::splitmix64;

/// Stochastic rounding of an f32 to a coarser grid by its bits: the format keeps the f32's top
/// bits, so adding a uniform random number below the dropped bits' weight to the magnitude and
/// then dropping them rounds up with probability (x − lo) / (hi − lo) — exactly unbiased, and a
/// carry into the exponent lands on the next binade's first value as it should.
fn drop_bits_stochastic(x: f32, drop: u32, r: u32) -> f32 {
    let mask = (1u32 << drop) - 1;
    f32::from_bits((x.to_bits() + (r & mask)) & !mask)
}

/// bf16 keeps an f32's top 16 bits (same exponent range).
fn round_bf16(x: f32, r: u32) -> bf16 {
    if !x.is_finite() || x.abs() >= bf16::MAX.to_f32() {
        return bf16::from_f32(x);
    }
    bf16::from_f32(drop_bits_stochastic(x, 16, r))
}

/// f16 keeps 10 of the 23 mantissa bits for normal values; below 2⁻¹⁴ its grid is fixed at
/// 2⁻²⁴, so more bits are dropped there (and values below 2⁻²⁵ round between 0 and 2⁻²⁴).
fn round_f16(x: f32, r: u32) -> f16 {
    if !x.is_finite() || x.abs() >= f16::MAX.to_f32() {
        return f16::from_f32(x);
    }
    let exponent = ((x.to_bits() >> 23) & 0xFF) as i32 - 127;
    let drop = 13 + (-14 - exponent).max(0);
    if drop >= 24 {
        // |x| < 2⁻²⁴·½: between 0 and the smallest subnormal 2⁻²⁴.
        let tiny = 2f32.powi(-24);
        let up = (r as f64 / 4294967296.0) < (x.abs() / tiny) as f64;
        let v = if up { tiny.copysign(x) } else { 0f32.copysign(x) };
        return f16::from_f32(v);
    }
    f16::from_f32(drop_bits_stochastic(x, drop as u32, r))
}

/// Which field each embedding slot belongs to: a multi-hot field has several slots that are
/// pooled (summed; mean pooling is in the slot weights) into the field's one embedding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotLayout {
    pub slot_fields: Vec<usize>,
    pub fields: usize,
}

impl SlotLayout {
    /// One slot per field.
    pub fn one_hot(fields: usize) -> Self {
        Self { slot_fields: (0..fields).collect(), fields }
    }
    pub fn of(encoder: &crate::data::Encoder) -> Self {
        Self { slot_fields: encoder.model_slot_fields(), fields: encoder.model_fields() }
    }
    pub fn slots(&self) -> usize {
        self.slot_fields.len()
    }
    /// The `[fields, slots]` 0/1 matrix that sums each field's slots (None when every field has one).
    fn pooling(&self) -> Option<Vec<f32>> {
        (self.slots() != self.fields).then(|| {
            let mut m = vec![0.0; self.fields * self.slots()];
            for (s, &f) in self.slot_fields.iter().enumerate() {
                m[f * self.slots() + s] = 1.0;
            }
            m
        })
    }
}

/// A batch's tensors on the device.
#[derive(Debug, Clone)]
pub struct SparseInput {
    pub batch: usize,
    pub slots: usize,
    pub fields: usize,
    pub unique_rows: Tensor<1, Int>,
    pub inverse: Tensor<1, Int>,
    pub values: Option<Tensor<3>>,
    /// `[batch, fields, slots]` pooling of multi-hot slots.
    pub pool: Option<Tensor<3>>,
    /// Dense features `[batch, num_dense]`.
    pub dense: Option<Tensor<2>>,
    /// The values of `unique_rows` (f32, `[U, d]`) fetched from elsewhere — the ranks that own
    /// them in a job with a row-sharded table; `None`: read from the model's own table.
    pub rows: Option<Tensor<2>>,
}

impl SparseInput {
    pub fn from_batch(b: &Batch, layout: &SlotLayout, device: &Device) -> Self {
        let u = b.unique_rows.len();
        let ints = |v: &[i64], n: usize| Tensor::<1, Int>::from_data(TensorData::new(v.to_vec(), [n]), device);
        let (slots, fields) = (layout.slots(), layout.fields);
        Self {
            batch: b.size,
            slots,
            fields,
            unique_rows: ints(&b.unique_rows, u),
            inverse: ints(&b.inverse, b.inverse.len()),
            values: b.values.as_ref().map(|v| Tensor::<3>::from_data(TensorData::new(v.clone(), [b.size, slots, 1]), device)),
            pool: layout.pooling().map(|m| {
                Tensor::<2>::from_data(TensorData::new(m, [fields, slots]), device).unsqueeze::<3>().expand([b.size, fields, slots])
            }),
            dense: b.dense.as_ref().map(|v| {
                let nd = v.len() / b.size.max(1);
                Tensor::<2>::from_data(TensorData::new(v.clone(), [b.size, nd]), device)
            }),
            rows: None,
        }
    }
}

/// The gathered rows of one step; `rows` is the autodiff leaf whose gradient feeds the sparse
/// optimizer.
pub struct Gathered {
    pub rows: Tensor<2>,
    pub unique_rows: Tensor<1, Int>,
}

impl SparseEmbedding {
    /// An f32 table of `rows × dim`, initialised N(0, init_std²).
    pub fn new(rows: usize, dim: usize, init_std: f64, device: &Device) -> Self {
        Self::new_in(rows, dim, init_std, TableStorage::F32, device)
    }

    /// A table created directly in `storage` (a half-precision table never exists in f32), or
    /// only the rows of one shard (`TableInit::shard`).
    pub fn new_in(rows: usize, dim: usize, init_std: f64, init: impl Into<TableInit>, device: &Device) -> Self {
        let TableInit { storage, shard } = init.into();
        // An f32 table is one draw; a half table and a shard are drawn in f32 blocks of rows in
        // table order (the same values whatever is kept), each cast to the storage type and, for
        // a shard, cut down to its rows. So a shard's values are those of the half table, or of
        // the f32 table when it fits one block; past that an f32 shard draws other (equally
        // distributed) values than one process's single draw would.
        const BLOCK: usize = 1 << 16;
        let w = match (storage, shard) {
            (TableStorage::F32, None) => Tensor::<2>::random([rows, dim], Distribution::Normal(0.0, init_std), device).inner(),
            (storage, None) => {
                let mut w = Tensor::<2>::zeros([rows, dim], (device, storage.dtype())).inner();
                for start in (0..rows).step_by(BLOCK) {
                    let end = (start + BLOCK).min(rows);
                    let block = Tensor::<2>::random([end - start, dim], Distribution::Normal(0.0, init_std), device).inner();
                    w = w.slice_assign([start..end, 0..dim], block.cast(storage.dtype()));
                }
                w
            }
            (storage, Some((rank, size))) => {
                let own = crate::dist::shard_rows(rows, rank, size);
                let mut w = Tensor::<2>::zeros([own, dim], (device, storage.dtype())).inner();
                let mut at = 0;
                for start in (0..rows).step_by(BLOCK) {
                    let end = (start + BLOCK).min(rows);
                    let block = Tensor::<2>::random([end - start, dim], Distribution::Normal(0.0, init_std), device).inner();
                    let first = start + (rank + size - start % size) % size; // first owned row ≥ start
                    let keep: Vec<i64> = (first..end).step_by(size).map(|r| (r - start) as i64).collect();
                    if keep.is_empty() {
                        continue;
                    }
                    let n = keep.len();
                    let part = block.select(0, Tensor::<1, Int>::from_data(TensorData::new(keep, [n]), &device.clone().inner()));
                    let part = if storage == TableStorage::F32 { part } else { part.cast(storage.dtype()) };
                    w = w.slice_assign([at..at + n, 0..dim], part);
                    at += n;
                }
                w
            }
        };
        Self { weight: Param::initialized(ParamId::new(), w).set_require_grad(false) }
    }

    pub fn storage(&self) -> TableStorage {
        match self.weight.dtype() {
            DType::F16 => TableStorage::F16,
            DType::BF16 => TableStorage::Bf16,
            _ => TableStorage::F32,
        }
    }

    /// Bytes the table's values occupy.
    pub fn table_bytes(&self) -> usize {
        self.rows() * self.dim() * self.storage().bytes_per_value()
    }

    pub fn rows(&self) -> usize {
        self.weight.dims()[0]
    }
    pub fn dim(&self) -> usize {
        self.weight.dims()[1]
    }

    /// Looks up `[batch, fields, d]` (multi-hot slots weighted and pooled). With `track = true` the unique rows become an autodiff
    /// leaf (returned) so their gradient can be read after `backward`.
    pub fn lookup(&self, input: &SparseInput, track: bool) -> (Tensor<3>, Option<Gathered>) {
        let rows = match &input.rows {
            Some(r) => r.clone().inner(),
            None => {
                let rows = self.weight.val().inner().select(0, input.unique_rows.clone());
                if rows.dtype() != DType::F32 { rows.cast(DType::F32) } else { rows }
            }
        };
        let rows = if track { rows.autodiff().require_grad() } else { rows };
        let x = rows.clone().select(0, input.inverse.clone()).reshape([input.batch, input.slots, self.dim()]);
        let x = match &input.values {
            Some(v) => x * v.clone(),
            None => x,
        };
        let x = match &input.pool {
            Some(p) => p.clone().matmul(x),
            None => x,
        };
        let gathered = track.then(|| Gathered { rows, unique_rows: input.unique_rows.clone() });
        (x, gathered)
    }

    /// A table holding `values` (`rows × dim`, f32), stored as `storage`.
    pub fn from_values(values: Vec<f32>, rows: usize, dim: usize, storage: TableStorage, device: &Device) -> Self {
        let t = Tensor::<2>::from_data(TensorData::new(values, [rows, dim]), &device.clone().inner());
        let t = if storage == TableStorage::F32 { t } else { t.cast(storage.dtype()) };
        Self { weight: Param::initialized(ParamId::new(), t).set_require_grad(false) }
    }

    /// All rows in f32 (`rows × dim`, row-major).
    pub fn values_f32(&self) -> anyhow::Result<Vec<f32>> {
        let t = self.weight.val().inner();
        let t = if t.dtype() != DType::F32 { t.cast(DType::F32) } else { t };
        t.into_data().try_to_vec::<f32>().map_err(|e| anyhow::anyhow!("{e:?}"))
    }

    /// The present values of the given rows in f32 (`[U, d]`), outside autodiff: what a rank that
    /// did not gather a row itself passes to the optimizer when applying a merged gradient.
    pub fn current_rows(&self, unique_rows: Tensor<1, Int>) -> Tensor<2> {
        let rows = self.weight.val().inner().select(0, unique_rows);
        if rows.dtype() != DType::F32 { rows.cast(DType::F32) } else { rows }
    }

    /// Adds `delta` (`[U, d]`) to the given distinct rows, in place when the table is not shared.
    /// `current` holds those rows' present values in f32 (the gathered rows): a half-precision
    /// table gets `round_stochastic(current + delta)` written back.
    pub fn add_rows(self, unique_rows: Tensor<1, Int>, current: Tensor<2>, delta: Tensor<2>) -> Self {
        use burn::tensor::IndexingUpdateOp;
        let storage = self.storage();
        let weight = self.weight.map(|t| match storage {
            TableStorage::F32 => t.inner().select_assign(0, unique_rows, delta, IndexingUpdateOp::Add),
            half => {
                let new = half.round_stochastic(current.inner() + delta);
                t.inner().select_assign(0, unique_rows, new, IndexingUpdateOp::Assign)
            }
        });
        Self { weight }
    }
}
