//! BERT and XLM-RoBERTa models as the engine sees them: sentence embedders (pooling + optional L2
//! normalisation) and cross-encoders (`*ForSequenceClassification`, one relevance logit per pair),
//! both on the encoder in [`crate::bert`].

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use hearth_engine::encoder::{EncoderModel, Sequence};
use hearth_engine::vector::normalize;
use hearth_engine::{BoxError, Pooling};

use crate::bert::{first_token, mean_pool, select_tokens, BertEncoder, Dense, EncoderConfig, PaddedBatch};
use crate::device::{
    default_activation_budget, default_batch_tokens, resolved_device, select_device, select_dtype,
};
use crate::error::BackendError;
use crate::model_dir::{Architecture, Head, ModelDir, Weights};

/// How to load an encoder; `None` fields come from the model directory.
#[derive(Clone, Copy, Debug, Default)]
pub struct EncoderOptions {
    pub device: hearth_engine::Device,
    pub dtype: hearth_engine::DType,
    pub pooling: Option<Pooling>,
    pub normalize: Option<bool>,
}

/// What a loaded encoder reports about itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadedEncoder {
    pub architecture: Architecture,
    pub dims: usize,
    pub vocab_size: usize,
    pub max_positions: usize,
    /// Embedders only.
    pub pooling: Option<Pooling>,
    pub normalize: bool,
    /// The device it runs on (`auto` resolved).
    pub device: hearth_engine::Device,
    /// The dtype it runs in (`auto` resolved).
    pub dtype: hearth_engine::DType,
}

/// The encoder and the tensors around it, loaded on the model's device in the chosen dtype.
struct Loaded {
    encoder: BertEncoder,
    /// Where the checkpoint keeps its head (`classifier.*`, `bert.pooler.*`).
    root: VarBuilder<'static>,
    pad_id: u32,
    info: LoadedEncoder,
}

fn load(
    dir: &ModelDir,
    options: &EncoderOptions,
    dims: usize,
    pooling: Option<Pooling>,
    normalize: bool,
) -> Result<Loaded, BackendError> {
    let device = select_device(options.device)?;
    let dtype = select_dtype(options.dtype, &device);
    let root = match &dir.weights {
        // SAFETY: the weight files are memory-mapped read-only; Hearth never writes to them while
        // serving, and the models directory is documented as not to be modified in place.
        Weights::Safetensors(files) => unsafe { VarBuilder::from_mmaped_safetensors(files, dtype, &device)? },
        Weights::PyTorch(file) => VarBuilder::from_pth(file, dtype, &device)?,
        Weights::OnnxOnly => {
            return Err(BackendError::Unsupported(format!(
                "{} holds only an ONNX export, which candle cannot run; serve it with `backend = \"onnx\"` \
                 (a build with `--features tts` or `onnx`), or add model.safetensors",
                dir.path.display()
            )))
        }
    };
    // Bare encoders keep their tensors at the root; task checkpoints nest them under a prefix.
    let prefix = ["", "bert", "roberta", "model"]
        .into_iter()
        .find(|p| {
            let name = if p.is_empty() {
                "embeddings.word_embeddings.weight".to_string()
            } else {
                format!("{p}.embeddings.word_embeddings.weight")
            };
            root.contains_tensor(&name)
        })
        .ok_or_else(|| {
            BackendError::Unsupported(format!(
                "{}: no `embeddings.word_embeddings.weight` tensor (with or without a \
                 `bert.`/`roberta.` prefix)",
                dir.path.display()
            ))
        })?;
    let encoder_vb = if prefix.is_empty() { root.clone() } else { root.pp(prefix) };
    let config: EncoderConfig = crate::model_dir::read_json(&dir.config_json)?;
    let encoder = BertEncoder::load(encoder_vb, &config, dir.architecture, dir.pad_token_id)?;
    let info = LoadedEncoder {
        architecture: dir.architecture,
        dims,
        vocab_size: dir.vocab_size,
        max_positions: dir.max_positions,
        pooling,
        normalize,
        device: resolved_device(&device),
        dtype: match dtype {
            DType::F16 => hearth_engine::DType::F16,
            DType::BF16 => hearth_engine::DType::Bf16,
            _ => hearth_engine::DType::F32,
        },
    };
    Ok(Loaded { encoder, root, pad_id: dir.pad_token_id, info })
}

fn padded(batch: &[&Sequence], pad_id: u32) -> PaddedBatch {
    PaddedBatch::new(batch.iter().map(|s| (s.ids.as_slice(), s.type_ids.as_slice())), pad_id)
}

/// A sentence embedder: encoder → pooling → optional L2 normalisation.
pub struct CandleEmbedder {
    encoder: BertEncoder,
    pooling: Pooling,
    normalize: bool,
    pad_id: u32,
}

impl CandleEmbedder {
    pub fn load(dir: &ModelDir, options: &EncoderOptions) -> Result<(Self, LoadedEncoder), BackendError> {
        if let Head::SequenceClassification { .. } = dir.head {
            return Err(BackendError::Unsupported(format!(
                "{} holds a sequence-classification (cross-encoder) model, which cannot serve \
                 embeddings; serve it as kind `rerank`",
                dir.path.display()
            )));
        }
        let st = dir.sentence_transformers.as_ref();
        let pooling = match (options.pooling, st.and_then(|st| st.pooling.clone())) {
            (Some(pooling), _) => pooling,
            (None, Some(Ok(pooling))) => pooling,
            (None, Some(Err(problem))) => {
                return Err(BackendError::Unsupported(format!(
                    "{}: {problem}; set `pooling` for this model",
                    dir.path.display()
                )))
            }
            (None, None) => {
                return Err(BackendError::Unsupported(format!(
                    "{} has no sentence-transformers pooling config (modules.json + \
                     1_Pooling/config.json); set `pooling` (`mean`, `cls` or `last-token`)",
                    dir.path.display()
                )))
            }
        };
        let normalize = options.normalize.unwrap_or_else(|| st.is_some_and(|st| st.normalize));
        let loaded = load(dir, options, dir.hidden_size, Some(pooling), normalize)?;
        let model = Self { encoder: loaded.encoder, pooling, normalize, pad_id: loaded.pad_id };
        Ok((model, loaded.info))
    }

    fn run(&self, batch: &[&Sequence]) -> candle_core::Result<Vec<Vec<f32>>> {
        let padded = padded(batch, self.pad_id);
        let states = self.encoder.forward(&padded)?;
        let pooled = match self.pooling {
            Pooling::Mean => mean_pool(&states, &padded)?,
            Pooling::Cls => first_token(&states)?.to_dtype(DType::F32)?,
            Pooling::LastToken => {
                let last: Vec<usize> = padded.lengths.iter().map(|&len| len.max(1) - 1).collect();
                select_tokens(&states, &last)?
            }
        };
        let mut vectors = pooled.to_vec2::<f32>()?;
        if self.normalize {
            vectors.iter_mut().for_each(|v| normalize(v));
        }
        Ok(vectors)
    }
}

impl EncoderModel for CandleEmbedder {
    type Output = Vec<f32>;

    fn forward(&mut self, batch: &[&Sequence]) -> Result<Vec<Vec<f32>>, BoxError> {
        Ok(self.run(batch)?)
    }

    fn activation_bytes(&self, n: usize, longest: usize) -> usize {
        self.encoder.activation_bytes(n, longest)
    }

    fn default_memory_budget(&self) -> usize {
        default_activation_budget(self.encoder.device())
    }

    fn default_batch_tokens(&self) -> usize {
        default_batch_tokens(self.encoder.device())
    }
}

/// `*ForSequenceClassification` head: first token → dense → tanh → output projection. BERT names
/// these `bert.pooler.dense` and `classifier`; (XLM-)RoBERTa `classifier.dense` and
/// `classifier.out_proj`.
struct ClassificationHead {
    dense: Dense,
    out: Dense,
}

impl ClassificationHead {
    fn load(dir: &ModelDir, vb: &VarBuilder, num_labels: usize) -> candle_core::Result<Self> {
        let hidden = dir.hidden_size;
        let (dense, out) = match dir.architecture {
            Architecture::Bert => (vb.pp("bert.pooler.dense"), vb.pp("classifier")),
            Architecture::XlmRoberta => (vb.pp("classifier.dense"), vb.pp("classifier.out_proj")),
        };
        Ok(Self { dense: Dense::load(dense, hidden, hidden)?, out: Dense::load(out, hidden, num_labels)? })
    }

    fn forward(&self, states: &Tensor) -> candle_core::Result<Tensor> {
        self.out.forward(&self.dense.forward(&first_token(states)?)?.tanh()?)
    }
}

/// A cross-encoder reranker: one relevance logit per `(query, document)` sequence.
pub struct CandleCrossEncoder {
    encoder: BertEncoder,
    head: ClassificationHead,
    pad_id: u32,
}

impl CandleCrossEncoder {
    pub fn load(dir: &ModelDir, options: &EncoderOptions) -> Result<(Self, LoadedEncoder), BackendError> {
        let num_labels = match dir.head {
            Head::SequenceClassification { num_labels: 1 } => 1,
            Head::SequenceClassification { num_labels } => {
                return Err(BackendError::Unsupported(format!(
                    "{} has a {num_labels}-label classification head; a reranker needs exactly one \
                     relevance logit",
                    dir.path.display()
                )))
            }
            Head::None => {
                return Err(BackendError::Unsupported(format!(
                    "{} holds no sequence-classification head, so it is not a cross-encoder",
                    dir.path.display()
                )))
            }
        };
        let loaded = load(dir, options, 1, None, false)?;
        let head = ClassificationHead::load(dir, &loaded.root, num_labels)?;
        Ok((Self { encoder: loaded.encoder, head, pad_id: loaded.pad_id }, loaded.info))
    }

    fn run(&self, batch: &[&Sequence]) -> candle_core::Result<Vec<f32>> {
        let states = self.encoder.forward(&padded(batch, self.pad_id))?;
        self.head.forward(&states)?.squeeze(1)?.to_dtype(DType::F32)?.to_vec1::<f32>()
    }
}

impl EncoderModel for CandleCrossEncoder {
    type Output = f32;

    fn forward(&mut self, batch: &[&Sequence]) -> Result<Vec<f32>, BoxError> {
        Ok(self.run(batch)?)
    }

    fn activation_bytes(&self, n: usize, longest: usize) -> usize {
        self.encoder.activation_bytes(n, longest)
    }

    fn default_memory_budget(&self) -> usize {
        default_activation_budget(self.encoder.device())
    }

    fn default_batch_tokens(&self) -> usize {
        default_batch_tokens(self.encoder.device())
    }
}
