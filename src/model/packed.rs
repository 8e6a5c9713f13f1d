//! Packed bf16 weights kept between products (`--precision bf16` on the AMX and AVX512-BF16
//! kernels): each weight matrix is packed once per step instead of once per product that reads
//! it, and not at all while it does not change (evaluation, serving).
//!
//! An entry holds a reference to the f32 storage it was packed from. The storage cannot change
//! while it is held: the CPU backend writes a buffer in place only when the tensor is its only
//! owner (`FlexTensor::is_unique`), and copies it first otherwise. So an entry found by its
//! storage's address is always the packing of the current values — a stale packing is
//! impossible by construction, whoever writes the weights (burn's Adam, a checkpoint load, the
//! explosion guard's rollback). The fused Adam takes the entry out before it updates W in place
//! (so that the update stays in place) and packs the updated W band by band while the rows are
//! in cache ([`crate::train::adam`]). An entry whose storage nobody else holds any more (the
//! weight was replaced or dropped) is removed at the next lookup.

use std::sync::{Arc, Mutex};

use burn::backend::flex::FlexTensor;
use burn::tensor::DType;

use super::amx::PackedWeight;
use super::bf16::Bf16Kernel;

struct Entry {
    /// The packed storage (a clone of the tensor: it holds the storage, not a copy).
    storage: FlexTensor,
    packed: Arc<PackedWeight>,
}

static CACHE: Mutex<Vec<Entry>> = Mutex::new(Vec::new());

fn cache() -> std::sync::MutexGuard<'static, Vec<Entry>> {
    // an entry is consistent whenever it is in the list: a panic elsewhere cannot leave it half made
    CACHE.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Whether two tensors share one storage buffer.
fn same_storage(a: &FlexTensor, b: &FlexTensor) -> bool {
    let (a, b) = (a.bytes(), b.bytes());
    a.as_ptr() == b.as_ptr() && a.len() == b.len()
}

impl Entry {
    /// Whether this is the packing of `w`'s storage as a `shape` matrix.
    fn packs(&self, w: &FlexTensor, shape: [usize; 2]) -> bool {
        same_storage(&self.storage, w) && self.packed.shape() == shape
    }
}

/// Whether `w` is exactly one whole row-major `k × n` f32 buffer (the only tensors cached).
fn whole(w: &FlexTensor, [k, n]: [usize; 2]) -> bool {
    w.dtype() == DType::F32 && w.is_contiguous() && w.bytes().len() == k * n * 4 && w.as_slice::<f32>().is_some_and(|s| s.len() == k * n)
}

/// Which packing the process's bf16 kernel reads: `Some(amx)`, or None off the packed kernels.
fn kernel() -> Option<bool> {
    match Bf16Kernel::chosen() {
        Bf16Kernel::Amx => Some(true),
        Bf16Kernel::Avx512 => Some(false),
        _ => None,
    }
}

/// The cached packing of `w` as a `[k, n]` matrix, if any (removing entries nobody else holds).
pub(crate) fn find(w: &FlexTensor, shape: [usize; 2]) -> Option<Arc<PackedWeight>> {
    let mut entries = cache();
    entries.retain(|e| !e.storage.is_unique());
    entries.iter().find(|e| e.packs(w, shape)).map(|e| e.packed.clone())
}

/// W's packing (`w` a `[k, n]` weight): the cached one when W's storage was packed before as that
/// shape, else packed now and kept. None when `w` is not one whole contiguous f32 buffer of that
/// shape, or where no packed kernel runs (the caller packs per product then).
pub(crate) fn lookup_or_pack(w: &FlexTensor, shape: [usize; 2]) -> Option<Arc<PackedWeight>> {
    let amx = kernel()?;
    if !whole(w, shape) {
        return None;
    }
    if let Some(found) = find(w, shape) {
        return Some(found);
    }
    let mut packed = PackedWeight::new(shape[0], shape[1], amx)?;
    packed.pack(w.as_slice::<f32>().expect("checked by `whole`"));
    let packed = Arc::new(packed);
    let mut entries = cache();
    // another thread may have packed the same W meanwhile: keep one entry
    if let Some(e) = entries.iter().find(|e| e.packs(w, shape)) {
        return Some(e.packed.clone());
    }
    entries.push(Entry { storage: w.clone(), packed: packed.clone() });
    Some(packed)
}

/// Removes W's entries, if any, before W is written in place (an entry's reference would make
/// the write copy W). Returns a packing that nothing else holds, for the writer to re-pack in
/// place ([`insert`] afterwards).
pub(crate) fn take(w: &FlexTensor) -> Option<PackedWeight> {
    let taken: Vec<Entry> = {
        let mut entries = cache();
        let (taken, kept) = std::mem::take(&mut *entries).into_iter().partition(|e| same_storage(&e.storage, w));
        *entries = kept;
        taken
    };
    taken.into_iter().find_map(|e| Arc::try_unwrap(e.packed).ok())
}

/// Keeps `packed` as the packing of `w`'s current values. The caller packed exactly those values
/// (`w` `[k, n]` as the packing's shape); `w` not one whole buffer of that shape is not kept.
pub(crate) fn insert(w: &FlexTensor, packed: PackedWeight) {
    if !whole(w, packed.shape()) {
        return;
    }
    let mut entries = cache();
    entries.retain(|e| !e.packs(w, packed.shape()));
    entries.push(Entry { storage: w.clone(), packed: Arc::new(packed) });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::amx::{dot_product, product, weight_product};
    use crate::model::bf16::Operand;
    use burn::tensor::TensorData;

    fn values(len: usize, seed: u64) -> Vec<f32> {
        (0..len).map(|i| (crate::rng::splitmix64(seed ^ i as u64) % 2001) as f32 / 1000.0 - 1.0).collect()
    }

    /// `x · W` and `g · Wᵀ` through the packing equal the per-product kernel on W's values, bit
    /// for bit.
    fn check(packed: &PackedWeight, w: &FlexTensor, [k, n]: [usize; 2], amx: bool, what: &str) {
        let per_product: fn(Operand<f32>, Operand<f32>) -> Vec<f32> = if amx { product } else { dot_product };
        let wv = w.as_slice::<f32>().unwrap();
        let (x, g) = (values(7 * k, 3), values(7 * n, 4));
        assert!(
            weight_product(Operand::new(&x, 7, k), packed, false) == per_product(Operand::new(&x, 7, k), Operand::new(wv, k, n)),
            "{what}: X·W"
        );
        assert!(
            weight_product(Operand::new(&g, 7, n), packed, true) == per_product(Operand::new(&g, 7, n), Operand::transpose_of(wv, k, n)),
            "{what}: dY·Wᵀ"
        );
    }

    /// The cache's guarantee: a packing found is the packing of the weight's current values. A
    /// second lookup finds the first packing; a write to W through another handle (as burn's
    /// in-place ops and the optimizers write) copies the storage first, so the old packing stays
    /// that of the old values and the new values get their own; another shape of the same
    /// storage is another entry; a view is not cached; an entry whose weight was dropped goes.
    #[test]
    fn a_cached_packing_is_always_that_of_the_current_values() {
        let Some(amx) = kernel() else {
            eprintln!("no packed bf16 kernel here (AMX or AVX512-BF16): the weight cache is not used");
            return;
        };
        let shape = [37, 29];
        let w = FlexTensor::from_data(TensorData::new(values(37 * 29, 1), shape));
        let first = lookup_or_pack(&w, shape).unwrap();
        assert!(Arc::ptr_eq(&first, &lookup_or_pack(&w, shape).unwrap()), "the second lookup packed again");
        assert!(!w.is_unique(), "the entry holds W's storage");
        let mut w2 = w.clone();
        w2.storage_mut::<f32>()[5] += 0.5;
        assert!(!same_storage(&w, &w2), "a write to a held storage must copy it");
        let second = lookup_or_pack(&w2, shape).unwrap();
        assert!(!Arc::ptr_eq(&first, &second));
        check(&first, &w, shape, amx, "the first W");
        check(&second, &w2, shape, amx, "the written copy");
        let other = lookup_or_pack(&w, [29, 37]).unwrap();
        assert_eq!(other.shape(), [29, 37]);
        assert!(Arc::ptr_eq(&first, &find(&w, shape).unwrap()), "another shape replaced the first entry");
        assert!(lookup_or_pack(&w.transpose(0, 1), [29, 37]).is_none(), "a transposed view was cached");
        let at = w2.bytes().as_ptr();
        drop(w2);
        let _ = find(&w, shape);
        assert!(!cache().iter().any(|e| e.storage.bytes().as_ptr() == at), "the dropped weight's entry is still held");
        assert!(take(&w).is_none(), "the packings are still held by this test");
        assert!(find(&w, shape).is_none() && find(&w, [29, 37]).is_none(), "take left an entry");
        assert!(w.is_unique(), "take left W's storage shared");
    }
}
