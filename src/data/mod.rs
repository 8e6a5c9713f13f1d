//! Data: file formats ([`source`]: libfm/libsvm, Criteo TSV, CSV/TSV, Parquet, joins), the schema
//! ([`schema`]), the encoding fit on the training split ([`encoder`]), the binary cache
//! ([`cache`]), the read-and-encode pipeline ([`pipeline`]) and the batch loader ([`loader`]).

pub mod cache;
pub mod encoder;
pub mod loader;
pub mod pipeline;
pub mod probe;
pub mod schema;
pub mod source;
pub mod synth;

pub use encoder::{EncodedDataset, Encoder};
pub use loader::{Batch, BatchLoader};
pub use pipeline::{CachePolicy, Prepared, SplitData, prepare};
pub use schema::DataConfig;
pub use source::{BadLines, open_maybe_gz};
