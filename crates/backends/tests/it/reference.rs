//! Hearth's encoder forward passes against outputs computed independently in float64 numpy
//! (`scripts/reference/bert_numpy.py`) for tiny random-weight models in the real layouts
//! (`scripts/gen_tiny_models.py`). All cases run as one right-padded batch, so masking, padding ids
//! and position handling are exercised too; f16 and bf16 run the GPU dtypes on the CPU.

use std::path::PathBuf;

use hearth_backends::{CandleCrossEncoder, CandleEmbedder, EncoderOptions, Head, ModelDir, ModelsRoot};
use hearth_engine::encoder::{EncoderModel, Sequence};
use hearth_engine::vector::normalized as unit;
use hearth_engine::{DType, Device, Pooling};
use serde::Deserialize;

/// Largest difference allowed from the float64 reference, per dtype: f32 rounding; f16 (11-bit
/// mantissa) and bf16 (8-bit) rounding accumulated over two layers.
fn tolerance(dtype: DType) -> f32 {
    match dtype {
        DType::F16 => 1e-2,
        DType::Bf16 => 6e-2,
        _ => 1e-4,
    }
}

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models")
}

fn fixture(name: &str) -> PathBuf {
    fixtures().join(name)
}

fn inspect(name: &str) -> ModelDir {
    ModelDir::inspect(&fixture(name), &ModelsRoot::new(&fixtures()).unwrap()).unwrap()
}

#[derive(Deserialize)]
struct EmbedReference {
    cases: Vec<EmbedCase>,
}

#[derive(Deserialize)]
struct EmbedCase {
    input_ids: Vec<u32>,
    token_type_ids: Vec<u32>,
    pooled: Pooled,
}

#[derive(Deserialize)]
struct Pooled {
    mean: Vec<f32>,
    cls: Vec<f32>,
    last_token: Vec<f32>,
}

#[derive(Deserialize)]
struct RerankReference {
    cases: Vec<RerankCase>,
}

#[derive(Deserialize)]
struct RerankCase {
    input_ids: Vec<u32>,
    token_type_ids: Vec<u32>,
    logit: f32,
}

fn read<T: for<'de> Deserialize<'de>>(name: &str) -> T {
    let text = std::fs::read_to_string(fixture(name).join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn assert_close(actual: &[f32], expected: &[f32], tolerance: f32, what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        assert!((a - e).abs() <= tolerance, "{what}[{i}]: Hearth {a} vs reference {e}");
    }
}

fn cpu(pooling: Option<Pooling>, normalize: Option<bool>) -> EncoderOptions {
    EncoderOptions { device: Device::Cpu, dtype: DType::F32, pooling, normalize }
}

const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::Bf16];

/// Loads `name` as an embedder with `options`, embeds every case in one batch, and compares with
/// `expected(case)`, in every dtype.
fn check_embedder(name: &str, options: EncoderOptions, expected: impl Fn(&EmbedCase) -> Vec<f32>) {
    for dtype in DTYPES {
        check_embedder_in(name, EncoderOptions { dtype, ..options }, &expected);
    }
}

fn check_embedder_in(name: &str, options: EncoderOptions, expected: &impl Fn(&EmbedCase) -> Vec<f32>) {
    let reference: EmbedReference = read(name);
    let dir = inspect(name);
    let (mut model, info) = CandleEmbedder::load(&dir, &options).unwrap();
    assert_eq!(info.dims, 32);
    assert_eq!(info.dtype, options.dtype);
    let sequences: Vec<Sequence> = reference
        .cases
        .iter()
        .map(|c| Sequence { ids: c.input_ids.clone(), type_ids: c.token_type_ids.clone() })
        .collect();
    let batch: Vec<&Sequence> = sequences.iter().collect();
    let outputs = model.forward(&batch).unwrap();
    assert_eq!(outputs.len(), reference.cases.len());
    for (i, (output, case)) in outputs.iter().zip(&reference.cases).enumerate() {
        assert_close(
            output,
            &expected(case),
            tolerance(options.dtype),
            &format!("{name} {options:?} case {i}"),
        );
    }
}

#[test]
fn bert_embedder_every_pooling_mode() {
    check_embedder("tiny-bert-embed", cpu(Some(Pooling::Mean), Some(false)), |c| c.pooled.mean.clone());
    check_embedder("tiny-bert-embed", cpu(Some(Pooling::Cls), Some(false)), |c| c.pooled.cls.clone());
    check_embedder("tiny-bert-embed", cpu(Some(Pooling::LastToken), Some(false)), |c| {
        c.pooled.last_token.clone()
    });
}

#[test]
fn bert_embedder_defaults_come_from_sentence_transformers_files() {
    // modules.json: mean pooling, then Normalize.
    check_embedder("tiny-bert-embed", cpu(None, None), |c| unit(&c.pooled.mean));
}

#[test]
fn xlm_roberta_embedder_every_pooling_mode() {
    check_embedder("tiny-xlmr-embed", cpu(Some(Pooling::Mean), Some(false)), |c| c.pooled.mean.clone());
    check_embedder("tiny-xlmr-embed", cpu(Some(Pooling::Cls), Some(false)), |c| c.pooled.cls.clone());
    check_embedder("tiny-xlmr-embed", cpu(Some(Pooling::LastToken), Some(true)), |c| {
        unit(&c.pooled.last_token)
    });
}

#[test]
fn xlm_roberta_embedder_defaults_come_from_sentence_transformers_files() {
    // modules.json: CLS pooling, no Normalize module.
    check_embedder("tiny-xlmr-embed", cpu(None, None), |c| c.pooled.cls.clone());
}

fn check_cross_encoder(name: &str) {
    for dtype in DTYPES {
        check_cross_encoder_in(name, dtype);
    }
}

fn check_cross_encoder_in(name: &str, dtype: DType) {
    let reference: RerankReference = read(name);
    let dir = inspect(name);
    assert_eq!(dir.head, Head::SequenceClassification { num_labels: 1 });
    let (mut model, _) =
        CandleCrossEncoder::load(&dir, &EncoderOptions { dtype, ..cpu(None, None) }).unwrap();
    let tolerance = tolerance(dtype);
    let sequences: Vec<Sequence> = reference
        .cases
        .iter()
        .map(|c| Sequence { ids: c.input_ids.clone(), type_ids: c.token_type_ids.clone() })
        .collect();
    let logits = model.forward(&sequences.iter().collect::<Vec<_>>()).unwrap();
    let expected: Vec<f32> = reference.cases.iter().map(|c| c.logit).collect();
    assert_close(&logits, &expected, tolerance, name);
    // One at a time gives the same logits as the padded batch.
    for (sequence, want) in sequences.iter().zip(&expected) {
        assert_close(&model.forward(&[sequence]).unwrap(), &[*want], tolerance, name);
    }
}

#[test]
fn bert_cross_encoder_layout() {
    check_cross_encoder("tiny-bert-reranker");
}

#[test]
fn xlm_roberta_cross_encoder_layout() {
    check_cross_encoder("tiny-xlmr-reranker");
}

#[test]
fn model_dirs_are_classified() {
    let embed = inspect("tiny-bert-embed");
    assert_eq!(embed.head, Head::None);
    assert_eq!(embed.max_positions, 64);
    let st = embed.sentence_transformers.unwrap();
    assert_eq!((st.pooling, st.normalize, st.max_seq_length), (Some(Ok(Pooling::Mean)), true, Some(24)));
    let xlmr = inspect("tiny-xlmr-embed");
    assert_eq!(xlmr.max_positions, 64, "XLM-R positions start after the padding id");
    assert_eq!(xlmr.pad_token_id, 1);
}

#[test]
fn wrong_heads_are_refused_with_a_reason() {
    let reranker = inspect("tiny-bert-reranker");
    let err = CandleEmbedder::load(&reranker, &cpu(None, None)).err().unwrap().to_string();
    assert!(err.contains("serve it as kind `rerank`"), "{err}");
    let embedder = inspect("tiny-bert-embed");
    let err = CandleCrossEncoder::load(&embedder, &cpu(None, None)).err().unwrap().to_string();
    assert!(err.contains("not a cross-encoder"), "{err}");
    let root = ModelsRoot::new(&fixtures()).unwrap();
    let err = ModelDir::inspect(&fixture("does-not-exist"), &root).unwrap_err().to_string();
    assert!(err.contains("does not exist"), "{err}");
}

/// A tiny fixture's bare encoder in f32 on the CPU, its reference cases as one padded batch.
fn tiny_encoder(
    name: &str,
) -> (hearth_backends::bert::BertEncoder, hearth_backends::bert::PaddedBatch, EmbedReference) {
    use hearth_backends::bert::{BertEncoder, EncoderConfig, PaddedBatch};
    let dir = inspect(name);
    let reference: EmbedReference = read(name);
    let config: EncoderConfig =
        serde_json::from_str(&std::fs::read_to_string(fixture(name).join("config.json")).unwrap()).unwrap();
    let files = [fixture(name).join("model.safetensors")];
    // SAFETY: test fixtures are not modified while mapped.
    let vb = unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(
            &files,
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
    }
    .unwrap();
    let encoder = BertEncoder::load(vb, &config, dir.architecture, dir.pad_token_id).unwrap();
    let batch = PaddedBatch::new(
        reference.cases.iter().map(|c| (c.input_ids.as_slice(), c.token_type_ids.as_slice())),
        dir.pad_token_id,
    );
    (encoder, batch, reference)
}

#[test]
fn attention_in_blocks_of_one_row_matches_attention_in_one_block() {
    for name in ["tiny-bert-embed", "tiny-xlmr-embed"] {
        let (whole, batch, _) = tiny_encoder(name);
        let (by_row, _, _) = tiny_encoder(name);
        let whole = whole.forward(&batch).unwrap();
        let by_row = by_row.with_attention_block_bytes(1).forward(&batch).unwrap();
        let diff = (whole - by_row).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-5, "{name}: blockwise attention differs by {diff}");
    }
}

/// The int8 products (`BertEncoder::with_int8_products`, measured in benches/encoder_routes.rs) keep
/// the mean-pooled embeddings of every reference case within cosine 0.99 of the float64 reference;
/// skipped on CPUs without AVX-512 VNNI, where they are refused.
#[test]
fn int8_products_stay_within_cosine_099_of_the_reference() {
    let (encoder, batch, reference) = tiny_encoder("tiny-bert-embed");
    let encoder = match encoder.with_int8_products() {
        Ok(encoder) => encoder,
        Err(e) if !hearth_backends::int8::available() => {
            eprintln!("skipped: {e}");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    let states = encoder.forward(&batch).unwrap();
    let pooled = hearth_backends::bert::mean_pool(&states, &batch).unwrap().to_vec2::<f32>().unwrap();
    let mut worst = 1f32;
    for (ours, case) in pooled.iter().zip(&reference.cases) {
        worst = worst.min(hearth_engine::vector::cosine(ours, &case.pooled.mean));
    }
    eprintln!("int8 products: worst cosine to the float64 reference {worst:.5}");
    assert!(worst >= 0.99, "worst cosine {worst}");
}
