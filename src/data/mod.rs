//! Data: the libfm/libsvm reader, the per-field encoder fit on the training split, and the
//! batch loader (seeded shuffling, unique-row extraction, background prefetch).

pub mod encoder;
pub mod libfm;
pub mod loader;

pub use encoder::Encoder;
pub use libfm::{BadLines, LibfmOptions, RawDataset, read_libfm};
pub use loader::{Batch, BatchLoader, EncodedDataset};
