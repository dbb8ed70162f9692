//! BERT and XLM-RoBERTa encoders on candle: sentence embedders (pooling + optional L2 normalisation)
//! and cross-encoders (`*ForSequenceClassification`, one relevance logit per pair).

use candle_core::{DType, Device, IndexOp, Module, Tensor};
use candle_nn::{Linear, VarBuilder};
use candle_transformers::models::{bert, xlm_roberta};
use hearth_engine::encoder::{EncoderModel, Sequence};
use hearth_engine::{BoxError, Pooling};

use crate::device::{describe, select_device, select_dtype};
use crate::error::BackendError;
use crate::model_dir::{read_json, Architecture, Head, ModelDir, Weights};

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
    pub device: String,
    pub dtype: String,
}

enum Backbone {
    Bert(bert::BertModel),
    XlmRoberta(xlm_roberta::XLMRobertaModel),
}

impl Backbone {
    fn load(dir: &ModelDir, vb: VarBuilder) -> Result<Self, BackendError> {
        // Bare encoders keep their tensors at the root; task checkpoints nest them under a prefix.
        let prefix = ["", "bert", "roberta", "model"]
            .into_iter()
            .find(|p| {
                let name = if p.is_empty() {
                    "embeddings.word_embeddings.weight".to_string()
                } else {
                    format!("{p}.embeddings.word_embeddings.weight")
                };
                vb.contains_tensor(&name)
            })
            .ok_or_else(|| {
                BackendError::Unsupported(format!(
                    "{}: no `embeddings.word_embeddings.weight` tensor (with or without a \
                     `bert.`/`roberta.` prefix)",
                    dir.path.display()
                ))
            })?;
        let vb = if prefix.is_empty() { vb } else { vb.pp(prefix) };
        Ok(match dir.architecture {
            Architecture::Bert => {
                let mut config: bert::Config = read_json(&dir.config_json)?;
                // candle retries under `{model_type}.` when the root has no tensors; we chose already.
                config.model_type = None;
                Self::Bert(bert::BertModel::load(vb, &config)?)
            }
            Architecture::XlmRoberta => {
                let config: xlm_roberta::Config = read_json(&dir.config_json)?;
                Self::XlmRoberta(xlm_roberta::XLMRobertaModel::new(&config, vb)?)
            }
        })
    }

    /// Token states `[batch, len, hidden]`.
    fn forward(&self, inputs: &BatchTensors) -> candle_core::Result<Tensor> {
        match self {
            Self::Bert(m) => m.forward(&inputs.ids, &inputs.type_ids, Some(&inputs.mask)),
            Self::XlmRoberta(m) => m.forward(&inputs.ids, &inputs.mask, &inputs.type_ids, None, None, None),
        }
    }
}

/// A padded batch on the model's device.
struct BatchTensors {
    ids: Tensor,
    type_ids: Tensor,
    /// 1 for real tokens, 0 for padding.
    mask: Tensor,
    lengths: Vec<usize>,
}

impl BatchTensors {
    fn new(batch: &[&Sequence], pad_id: u32, device: &Device) -> candle_core::Result<Self> {
        let longest = batch.iter().map(|s| s.len()).max().unwrap_or(0);
        let n = batch.len();
        let mut ids = Vec::with_capacity(n * longest);
        let mut type_ids = Vec::with_capacity(n * longest);
        let mut mask = Vec::with_capacity(n * longest);
        for sequence in batch {
            let pad = longest - sequence.len();
            ids.extend_from_slice(&sequence.ids);
            ids.extend(std::iter::repeat_n(pad_id, pad));
            type_ids.extend_from_slice(&sequence.type_ids);
            type_ids.extend(std::iter::repeat_n(0, pad));
            mask.extend(std::iter::repeat_n(1u32, sequence.len()));
            mask.extend(std::iter::repeat_n(0u32, pad));
        }
        Ok(Self {
            ids: Tensor::from_vec(ids, (n, longest), device)?,
            type_ids: Tensor::from_vec(type_ids, (n, longest), device)?,
            mask: Tensor::from_vec(mask, (n, longest), device)?,
            lengths: batch.iter().map(|s| s.len()).collect(),
        })
    }
}

struct Loaded {
    backbone: Backbone,
    vb: VarBuilder<'static>,
    device: Device,
    dtype: DType,
}

fn load_backbone(dir: &ModelDir, options: &EncoderOptions) -> Result<Loaded, BackendError> {
    let device = select_device(options.device)?;
    let dtype = select_dtype(options.dtype, &device);
    let vb = match &dir.weights {
        // SAFETY: the weight files are memory-mapped read-only; Hearth never writes to them while
        // serving, and the models directory is documented as not to be modified in place.
        Weights::Safetensors(files) => unsafe { VarBuilder::from_mmaped_safetensors(files, dtype, &device)? },
        Weights::PyTorch(file) => VarBuilder::from_pth(file, dtype, &device)?,
    };
    let backbone = Backbone::load(dir, vb.clone())?;
    Ok(Loaded { backbone, vb, device, dtype })
}

fn describe_loaded(
    dir: &ModelDir,
    loaded: &Loaded,
    dims: usize,
    pooling: Option<Pooling>,
    normalize: bool,
) -> LoadedEncoder {
    LoadedEncoder {
        architecture: dir.architecture,
        dims,
        vocab_size: dir.vocab_size,
        max_positions: dir.max_positions,
        pooling,
        normalize,
        device: describe(&loaded.device),
        dtype: format!("{:?}", loaded.dtype).to_lowercase(),
    }
}

/// A sentence embedder: encoder → pooling → optional L2 normalisation.
pub struct CandleEmbedder {
    backbone: Backbone,
    pooling: Pooling,
    normalize: bool,
    pad_id: u32,
    device: Device,
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
        let loaded = load_backbone(dir, options)?;
        let info = describe_loaded(dir, &loaded, dir.hidden_size, Some(pooling), normalize);
        let model = Self {
            backbone: loaded.backbone,
            pooling,
            normalize,
            pad_id: dir.pad_token_id,
            device: loaded.device,
        };
        Ok((model, info))
    }

    fn run(&self, batch: &[&Sequence]) -> candle_core::Result<Vec<Vec<f32>>> {
        let inputs = BatchTensors::new(batch, self.pad_id, &self.device)?;
        let states = self.backbone.forward(&inputs)?;
        let pooled = pool(&states, &inputs, self.pooling)?;
        let mut vectors = pooled.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        if self.normalize {
            vectors.iter_mut().for_each(|v| hearth_engine::embed::normalize(v));
        }
        Ok(vectors)
    }
}

impl EncoderModel for CandleEmbedder {
    type Output = Vec<f32>;

    fn forward(&mut self, batch: &[&Sequence]) -> Result<Vec<Vec<f32>>, BoxError> {
        Ok(self.run(batch)?)
    }
}

fn pool(states: &Tensor, inputs: &BatchTensors, pooling: Pooling) -> candle_core::Result<Tensor> {
    match pooling {
        Pooling::Cls => states.i((.., 0))?.contiguous(),
        Pooling::Mean => {
            let mask = inputs.mask.to_dtype(states.dtype())?.unsqueeze(2)?;
            let summed = states.broadcast_mul(&mask)?.sum(1)?;
            let counts = mask.sum(1)?;
            summed.broadcast_div(&counts)
        }
        Pooling::LastToken => {
            let (n, longest, hidden) = states.dims3()?;
            let rows: Vec<u32> = inputs
                .lengths
                .iter()
                .enumerate()
                .map(|(b, &len)| (b * longest + len.max(1) - 1) as u32)
                .collect();
            let rows = Tensor::from_vec(rows, n, states.device())?;
            states.reshape((n * longest, hidden))?.index_select(&rows, 0)
        }
    }
}

/// `*ForSequenceClassification` head: first token → dense → tanh → output projection. BERT names
/// these `bert.pooler.dense` and `classifier`; (XLM-)RoBERTa `classifier.dense` and
/// `classifier.out_proj`.
struct ClassificationHead {
    dense: Linear,
    out: Linear,
}

impl ClassificationHead {
    fn load(dir: &ModelDir, vb: &VarBuilder, num_labels: usize) -> candle_core::Result<Self> {
        let hidden = dir.hidden_size;
        let (dense, out) = match dir.architecture {
            Architecture::Bert => (vb.pp("bert.pooler.dense"), vb.pp("classifier")),
            Architecture::XlmRoberta => (vb.pp("classifier.dense"), vb.pp("classifier.out_proj")),
        };
        Ok(Self {
            dense: candle_nn::linear(hidden, hidden, dense)?,
            out: candle_nn::linear(hidden, num_labels, out)?,
        })
    }

    fn forward(&self, states: &Tensor) -> candle_core::Result<Tensor> {
        let first = states.i((.., 0))?.contiguous()?;
        self.out.forward(&self.dense.forward(&first)?.tanh()?)
    }
}

/// A cross-encoder reranker: one relevance logit per `(query, document)` sequence.
pub struct CandleCrossEncoder {
    backbone: Backbone,
    head: ClassificationHead,
    pad_id: u32,
    device: Device,
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
        let loaded = load_backbone(dir, options)?;
        let head = ClassificationHead::load(dir, &loaded.vb, num_labels)?;
        let info = describe_loaded(dir, &loaded, 1, None, false);
        let _ = loaded.dtype;
        Ok((Self { backbone: loaded.backbone, head, pad_id: dir.pad_token_id, device: loaded.device }, info))
    }

    fn run(&self, batch: &[&Sequence]) -> candle_core::Result<Vec<f32>> {
        let inputs = BatchTensors::new(batch, self.pad_id, &self.device)?;
        let states = self.backbone.forward(&inputs)?;
        self.head.forward(&states)?.squeeze(1)?.to_dtype(DType::F32)?.to_vec1::<f32>()
    }
}

impl EncoderModel for CandleCrossEncoder {
    type Output = f32;

    fn forward(&mut self, batch: &[&Sequence]) -> Result<Vec<f32>, BoxError> {
        Ok(self.run(batch)?)
    }
}
