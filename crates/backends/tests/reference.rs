//! candle's forward passes against outputs computed independently in float64 numpy
//! (`scripts/reference/bert_numpy.py`) for tiny random-weight models in the real layouts
//! (`scripts/gen_tiny_models.py`). All cases run as one right-padded batch, so masking, padding ids
//! and position handling are exercised too.

use std::path::PathBuf;

use hearth_backends::{CandleCrossEncoder, CandleEmbedder, EncoderOptions, Head, ModelDir};
use hearth_engine::encoder::{EncoderModel, Sequence};
use hearth_engine::{Device, Pooling};
use serde::Deserialize;

const TOLERANCE: f32 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models").join(name)
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

fn unit(v: &[f32]) -> Vec<f32> {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter().map(|x| x / norm).collect()
}

fn assert_close(actual: &[f32], expected: &[f32], what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        assert!((a - e).abs() <= TOLERANCE, "{what}[{i}]: candle {a} vs reference {e}");
    }
}

fn cpu(pooling: Option<Pooling>, normalize: Option<bool>) -> EncoderOptions {
    EncoderOptions { device: Device::Cpu, pooling, normalize, ..Default::default() }
}

/// Loads `name` as an embedder with `options`, embeds every case in one batch, and compares with
/// `expected(case)`.
fn check_embedder(name: &str, options: EncoderOptions, expected: impl Fn(&EmbedCase) -> Vec<f32>) {
    let reference: EmbedReference = read(name);
    let dir = ModelDir::inspect(&fixture(name)).unwrap();
    let (mut model, info) = CandleEmbedder::load(&dir, &options).unwrap();
    assert_eq!(info.dims, 32);
    let sequences: Vec<Sequence> = reference
        .cases
        .iter()
        .map(|c| Sequence { ids: c.input_ids.clone(), type_ids: c.token_type_ids.clone() })
        .collect();
    let batch: Vec<&Sequence> = sequences.iter().collect();
    let outputs = model.forward(&batch).unwrap();
    assert_eq!(outputs.len(), reference.cases.len());
    for (i, (output, case)) in outputs.iter().zip(&reference.cases).enumerate() {
        assert_close(output, &expected(case), &format!("{name} {options:?} case {i}"));
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
    let reference: RerankReference = read(name);
    let dir = ModelDir::inspect(&fixture(name)).unwrap();
    assert_eq!(dir.head, Head::SequenceClassification { num_labels: 1 });
    let (mut model, _) = CandleCrossEncoder::load(&dir, &cpu(None, None)).unwrap();
    let sequences: Vec<Sequence> = reference
        .cases
        .iter()
        .map(|c| Sequence { ids: c.input_ids.clone(), type_ids: c.token_type_ids.clone() })
        .collect();
    let logits = model.forward(&sequences.iter().collect::<Vec<_>>()).unwrap();
    let expected: Vec<f32> = reference.cases.iter().map(|c| c.logit).collect();
    assert_close(&logits, &expected, name);
    // One at a time gives the same logits as the padded batch.
    for (sequence, want) in sequences.iter().zip(&expected) {
        assert_close(&model.forward(&[sequence]).unwrap(), &[*want], name);
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
    let embed = ModelDir::inspect(&fixture("tiny-bert-embed")).unwrap();
    assert_eq!(embed.head, Head::None);
    assert_eq!(embed.max_positions, 64);
    let st = embed.sentence_transformers.unwrap();
    assert_eq!((st.pooling, st.normalize, st.max_seq_length), (Some(Ok(Pooling::Mean)), true, Some(24)));
    let xlmr = ModelDir::inspect(&fixture("tiny-xlmr-embed")).unwrap();
    assert_eq!(xlmr.max_positions, 64, "XLM-R positions start after the padding id");
    assert_eq!(xlmr.pad_token_id, 1);
}

#[test]
fn wrong_heads_are_refused_with_a_reason() {
    let reranker = ModelDir::inspect(&fixture("tiny-bert-reranker")).unwrap();
    let err = CandleEmbedder::load(&reranker, &cpu(None, None)).err().unwrap().to_string();
    assert!(err.contains("serve it as kind `rerank`"), "{err}");
    let embedder = ModelDir::inspect(&fixture("tiny-bert-embed")).unwrap();
    let err = CandleCrossEncoder::load(&embedder, &cpu(None, None)).err().unwrap().to_string();
    assert!(err.contains("not a cross-encoder"), "{err}");
    let err = ModelDir::inspect(&fixture("does-not-exist")).unwrap_err().to_string();
    assert!(err.contains("config.json"), "{err}");
}
