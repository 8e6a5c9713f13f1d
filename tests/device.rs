//! The same model on two devices. `WUKONG_TEST_DEVICE` names the device under test (default
//! `cpu`, which checks the machinery against itself); the GPU script runs this file's test binary
//! with `WUKONG_TEST_DEVICE=vulkan` on the GPU machine, against the CPU.

use burn::module::Module;
use burn::tensor::Device;
use wukong::bench::{Spec, equivalence, generate};
use wukong::model::{DataShape, ModelConfig, SlotLayout, SparseInput};

fn device_under_test() -> (String, Device) {
    let spec = std::env::var("WUKONG_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    let dev = wukong::runtime::parse_device(&spec).unwrap_or_else(|e| panic!("WUKONG_TEST_DEVICE={spec}: {e:#}"));
    (spec, dev)
}

fn spec(model: &str) -> Spec {
    Spec::parse(&format!(
        r#"
name = "device-test"
[model]
{model}
[train]
batch_size = 256
lr = 0.003
emb_lr = 0.05
[shape]
vocab = [50, 200, 7, 1000, 31]
dense = 3
warmup = 0
steps = 4
infer_batches = 1
"#
    ))
    .unwrap()
}

const MODELS: &[&str] = &[
    "name = \"wukong\"\nembedding_dim = 16\nnum_fmb = 4\nnum_lcb = 4\nfm_rank = 3\nfmb_mlp = [32]\ntop_mlp = [32]\ndropout = 0.1",
    "name = \"wukong\"\nembedding_dim = 8\nfm_kind = \"attentive\"\nnum_fmb = 4\nnum_lcb = 4\nfm_rank = 3\nattention_compress = 2\nattention_hidden = [16]\nfmb_mlp = [32]\ntop_mlp = [16]",
    "name = \"fm\"\nembedding_dim = 8",
    "name = \"dcnv2\"\nembedding_dim = 8",
    "name = \"dlrm\"\nembedding_dim = 8",
    "name = \"masknet\"\nembedding_dim = 8",
    "name = \"autoint+\"\nembedding_dim = 8",
];

#[test]
fn forward_on_the_device_equals_the_cpu() {
    let (name, dev) = device_under_test();
    for m in MODELS {
        let s = spec(m);
        let data = generate(&s, 11);
        let shape = DataShape { fields: s.vocab.len(), dense: s.dense, table_rows: s.table_rows };
        let cpu = Device::flex();
        cpu.seed(5);
        let model = s.model.init(&shape, &cpu);
        let on_dev = model.clone().fork(&dev);
        let loader = wukong::data::BatchLoader::new(std::sync::Arc::new(data), s.table_rows, 256);
        let batch = loader.epoch(None).next().unwrap().unwrap();
        let layout = SlotLayout::one_hot(shape.fields);
        let a = model
            .forward(&SparseInput::from_batch(&batch, &layout, &cpu), false, &wukong::model::Pass::f32())
            .0
            .into_data()
            .try_into_vec::<f32>()
            .unwrap();
        let b = on_dev
            .forward(&SparseInput::from_batch(&batch, &layout, &dev), false, &wukong::model::Pass::f32())
            .0
            .into_data()
            .try_into_vec::<f32>()
            .unwrap();
        let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        let scale = a.iter().map(|x| x.abs()).fold(1e-3f32, f32::max);
        assert!(diff / scale < 1e-4, "{}: {name} logits differ from the CPU by {diff} (scale {scale})", ModelConfig::name(&s.model));
    }
}

#[test]
fn training_steps_on_the_device_equal_the_cpu() {
    let (name, _) = device_under_test();
    for m in MODELS.iter().take(3) {
        let s = spec(m);
        let data = generate(&s, 12);
        let r = equivalence(&s, data, "cpu", &name, 4, 1e-3).unwrap();
        assert!(r.passed, "{}: {r:?}", s.model.name());
        if name == "cpu" {
            // The same device must give the same numbers bit for bit.
            assert_eq!(r.losses_a, r.losses_b);
        }
        assert!(r.losses_a.iter().all(|l| l.is_finite() && *l > 0.0));
    }
}
