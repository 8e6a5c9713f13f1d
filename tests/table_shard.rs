//! A row-sharded table is drawn block by block without the whole table ever existing in one
//! process: each shard must hold exactly the values the whole table has at its rows (row r on
//! rank r mod N), for tables of several draw blocks and every storage. (Its own test binary: the
//! comparison needs the device generator's sequence to itself.)

use burn::tensor::{Int, Tensor, TensorData};
use wukong::model::{SparseEmbedding, TableInit, TableStorage};

fn values(e: &SparseEmbedding) -> Vec<f32> {
    let device = wukong::runtime::parse_device("cpu").unwrap();
    let n = e.rows();
    e.current_rows(Tensor::<1, Int>::from_data(TensorData::new((0..n as i64).collect::<Vec<_>>(), [n]), &device))
        .into_data()
        .convert::<f32>()
        .iter::<f32>()
        .collect()
}

#[test]
fn every_shard_holds_the_block_drawn_tables_values_at_its_rows() {
    // One test: the comparisons need the device generator's sequence to themselves.
    let device = wukong::runtime::parse_device("cpu").unwrap();
    let (rows, dim) = (2 * 65_536 + 7, 3); // three draw blocks, the last one short
    for storage in [TableStorage::F32, TableStorage::F16] {
        // the whole table drawn block by block: rank 0 of 1
        device.seed(41);
        let whole = values(&SparseEmbedding::new_in(rows, dim, 0.1, TableInit { storage, shard: Some((0, 1)) }, &device));
        if storage == TableStorage::F16 {
            device.seed(41);
            assert!(values(&SparseEmbedding::new_in(rows, dim, 0.1, storage, &device)) == whole, "a half table is the block draw");
        }
        for ranks in [2, 3] {
            let mut seen = 0;
            for rank in 0..ranks {
                device.seed(41);
                let shard = SparseEmbedding::new_in(rows, dim, 0.1, TableInit { storage, shard: Some((rank, ranks)) }, &device);
                assert_eq!(shard.storage(), storage);
                let got = values(&shard);
                let want: Vec<f32> = (rank..rows).step_by(ranks).flat_map(|r| whole[r * dim..(r + 1) * dim].to_vec()).collect();
                assert_eq!(got.len(), want.len(), "rank {rank} of {ranks}: {} rows", got.len() / dim);
                assert!(got == want, "rank {rank} of {ranks} ({storage:?}): values differ from the table's rows");
                seen += got.len() / dim;
            }
            assert_eq!(seen, rows, "the shards partition the table");
        }
    }
    // A whole f32 table stays the one draw it always was (earlier runs keep their numbers).
    device.seed(43);
    let one: Vec<f32> = Tensor::<2>::random([rows, dim], burn::tensor::Distribution::Normal(0.0, 0.1), &device)
        .into_data()
        .convert::<f32>()
        .iter::<f32>()
        .collect();
    device.seed(43);
    assert!(values(&SparseEmbedding::new_in(rows, dim, 0.1, TableStorage::F32, &device)) == one);
    // and a small table (one block) is the same whether drawn whole or as shards
    device.seed(44);
    let small = values(&SparseEmbedding::new_in(1000, dim, 0.1, TableStorage::F32, &device));
    device.seed(44);
    let shard = values(&SparseEmbedding::new_in(1000, dim, 0.1, TableInit { storage: TableStorage::F32, shard: Some((1, 2)) }, &device));
    let want: Vec<f32> = (1..1000).step_by(2).flat_map(|r| small[r * dim..(r + 1) * dim].to_vec()).collect();
    assert!(shard == want);
}
