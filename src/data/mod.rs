//! Data: file formats ([`source`]: libfm/libsvm, Criteo TSV, CSV/TSV, Parquet, joins), the schema
//! ([`schema`]), value extraction ([`extract`]), the encoding fit on the training split
//! ([`encoder`]) into encoded rows ([`dataset`]), the binary cache
//! ([`cache`]), the read-and-encode pipeline ([`pipeline`]) and the batch loader ([`loader`]).

pub mod cache;
pub mod dataset;
pub mod encoder;
pub mod extract;
pub mod loader;
pub mod pipeline;
pub mod probe;
pub mod schema;
pub mod source;
pub mod synth;
pub mod world;

pub use dataset::EncodedDataset;
pub use encoder::Encoder;
pub use loader::{Batch, BatchLoader};
pub use pipeline::{CachePolicy, Prepared, SplitData, prepare};
pub use schema::DataConfig;
pub use source::{BadLines, open_maybe_gz};
