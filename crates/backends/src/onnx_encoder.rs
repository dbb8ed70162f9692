//! Encoders on ONNX Runtime: the ONNX exports Hugging Face repos ship
//! (`onnx/model_quantized.onnx`, `model_qint8_*.onnx`, `onnx/model.onnx`, see
//! [`crate::model_dir::ONNX_FILES`]) with inputs `input_ids`, `attention_mask` (and
//! `token_type_ids` when the graph takes it). Sentence embedders read the output
//! `last_hidden_state`; pooling and normalisation run on the host as the candle embedder's do, from
//! the same sentence-transformers config. Cross-encoders (`*ForSequenceClassification`) read
//! `logits` `[batch, 1]`, the relevance logit the candle cross-encoder returns. This is the CPU
//! route text-embeddings-inference takes; the int8 exports are what makes it fast on a CPU.

use hearth_engine::encoder::{EncoderModel, Sequence};
use hearth_engine::{BoxError, Device, Pooling};
use ort::session::{Session, SessionOutputs};
use ort::value::Tensor;

use crate::bert_family::{EncoderOptions, LoadedEncoder};
use crate::error::BackendError;
use crate::model_dir::{Head, ModelDir};
use crate::onnx::loaded_environment;

/// A loaded ONNX encoder graph and how to feed it a padded batch.
struct EncoderSession {
    session: Session,
    pad_id: u32,
    type_ids: bool,
}

fn onnx_error(dir: &ModelDir, error: impl std::fmt::Display) -> BackendError {
    BackendError::Unsupported(format!("{}: {error}", dir.path.display()))
}

impl EncoderSession {
    /// Opens the folder's ONNX export on the CPU and checks it has the inputs and `output` Hearth
    /// feeds and reads.
    fn open(dir: &ModelDir, options: &EncoderOptions, output: &str) -> Result<Self, BackendError> {
        if !matches!(options.device, Device::Cpu | Device::Auto) {
            return Err(BackendError::Unsupported(
                "the ONNX encoder backend runs on the CPU; use `backend = \"candle\"` on GPUs".into(),
            ));
        }
        let file = dir.onnx.as_ref().ok_or_else(|| BackendError::Missing {
            dir: dir.path.clone(),
            what: format!("ONNX export (one of {})", crate::model_dir::ONNX_FILES.join(", ")),
        })?;
        let environment = loaded_environment()?;
        // No memory pattern: ONNX Runtime would plan (and keep) allocations for every input shape
        // it sees, and every batch here has its own length. Measured on MiniLM's int8 export at
        // 32 × 256 tokens: peak RSS 1,504 → 944 MiB, the same speed (benches/README.md).
        // Its own thread pool (the process-wide one is the voices'), as measured in benches/.
        let builder = Session::builder(&environment).map_err(|e| onnx_error(dir, e))?;
        let builder = builder.with_independent_thread_pool().map_err(|e| onnx_error(dir, e))?;
        let mut builder = builder.with_memory_pattern(false).map_err(|e| onnx_error(dir, e))?;
        let session = builder.commit_from_file(file).map_err(|e| onnx_error(dir, e))?;
        let names: Vec<&str> = session.inputs().iter().map(|i| i.name()).collect();
        for wanted in ["input_ids", "attention_mask"] {
            if !names.contains(&wanted) {
                return Err(onnx_error(
                    dir,
                    format!("the ONNX export has no `{wanted}` input (inputs: {names:?})"),
                ));
            }
        }
        if !session.outputs().iter().any(|o| o.name() == output) {
            return Err(onnx_error(dir, format!("the ONNX export has no `{output}` output")));
        }
        let type_ids = names.contains(&"token_type_ids");
        tracing::info!(file = %file.display(), "ONNX encoder loaded");
        Ok(Self { session, pad_id: dir.pad_token_id, type_ids })
    }

    /// Runs `batch` right-padded to its longest sequence; returns the outputs and that length.
    fn run(&mut self, batch: &[&Sequence]) -> Result<(SessionOutputs<'_>, usize), BoxError> {
        let n = batch.len();
        let longest = batch.iter().map(|s| s.len()).max().unwrap_or(0).max(1);
        let mut ids = vec![i64::from(self.pad_id); n * longest];
        let mut mask = vec![0i64; n * longest];
        let mut types = vec![0i64; n * longest];
        for (row, sequence) in batch.iter().enumerate() {
            for (i, (&id, &ty)) in sequence.ids.iter().zip(&sequence.type_ids).enumerate() {
                ids[row * longest + i] = i64::from(id);
                mask[row * longest + i] = 1;
                types[row * longest + i] = i64::from(ty);
            }
        }
        let mut inputs = ort::inputs![
            "input_ids" => Tensor::from_array(([n, longest], ids))?,
            "attention_mask" => Tensor::from_array(([n, longest], mask))?,
        ];
        if self.type_ids {
            inputs.push(("token_type_ids".into(), Tensor::from_array(([n, longest], types))?.into()));
        }
        Ok((self.session.run(inputs)?, longest))
    }
}

/// ONNX Runtime's arena holds the graph's intermediate tensors: the equivalent of about 32
/// `[n, longest, hidden]` f32 activations (the feed-forward's are four times as wide; the int8
/// graphs add quantized copies) and four copies of the attention scores (scores, mask added,
/// soft-max, its int8 input). Fitted to what the arena really grew to on MiniLM's int8 export
/// (about 740 MiB at 32 × 256 tokens; this gives 806), so the memory budget bounds it.
fn activation_bytes(hidden: usize, n: usize, longest: usize) -> usize {
    let hidden_states = n * longest * hidden * 4 * 32;
    let scores = n * 12 * longest * longest * 4 * 4;
    hidden_states + scores
}

fn loaded_info(dir: &ModelDir, pooling: Option<Pooling>, normalize: bool) -> LoadedEncoder {
    LoadedEncoder {
        architecture: dir.architecture,
        dims: dir.hidden_size,
        vocab_size: dir.vocab_size,
        max_positions: dir.max_positions,
        pooling,
        normalize,
        device: Device::Cpu,
        dtype: hearth_engine::DType::F32,
    }
}

pub struct OnnxEmbedder {
    session: EncoderSession,
    pooling: Pooling,
    normalize: bool,
    hidden: usize,
}

impl OnnxEmbedder {
    /// Loads the folder's ONNX export on the CPU. ONNX Runtime must have been loaded already
    /// ([`crate::onnx::onnx_environment`]); the loader does that with the configured library.
    pub fn load(dir: &ModelDir, options: &EncoderOptions) -> Result<(Self, LoadedEncoder), BackendError> {
        if let Head::SequenceClassification { .. } = dir.head {
            return Err(BackendError::Unsupported(format!(
                "{} holds a cross-encoder, which serves `kind = \"rerank\"`, not embeddings",
                dir.path.display()
            )));
        }
        let st = dir.sentence_transformers.as_ref();
        let pooling = match (options.pooling, st.and_then(|st| st.pooling.clone())) {
            (Some(pooling), _) | (None, Some(Ok(pooling))) => pooling,
            (None, Some(Err(problem))) => return Err(onnx_error(dir, format!("{problem}; set `pooling`"))),
            (None, None) => {
                return Err(onnx_error(dir, "no sentence-transformers pooling config; set `pooling`"));
            }
        };
        let normalize = options.normalize.unwrap_or_else(|| st.is_some_and(|st| st.normalize));
        let session = EncoderSession::open(dir, options, "last_hidden_state")?;
        let model = OnnxEmbedder { session, pooling, normalize, hidden: dir.hidden_size };
        Ok((model, loaded_info(dir, Some(pooling), normalize)))
    }
}

impl EncoderModel for OnnxEmbedder {
    type Output = Vec<f32>;

    fn forward(&mut self, batch: &[&Sequence]) -> Result<Vec<Vec<f32>>, BoxError> {
        let n = batch.len();
        let hidden = self.hidden;
        let (outputs, longest) = self.session.run(batch)?;
        let (shape, states) = outputs["last_hidden_state"].try_extract_tensor::<f32>()?;
        if shape.len() != 3
            || shape[0] as usize != n
            || shape[1] as usize != longest
            || shape[2] as usize != hidden
        {
            return Err(format!(
                "the ONNX export returned shape {shape:?}, expected [{n}, {longest}, {hidden}]"
            )
            .into());
        }
        Ok(batch
            .iter()
            .enumerate()
            .map(|(row, sequence)| {
                let token =
                    |t: usize| &states[(row * longest + t) * hidden..(row * longest + t + 1) * hidden];
                let len = sequence.len().max(1);
                let mut pooled = match self.pooling {
                    Pooling::Cls => token(0).to_vec(),
                    Pooling::LastToken => token(len - 1).to_vec(),
                    Pooling::Mean => {
                        let mut sum = vec![0f32; hidden];
                        for t in 0..len {
                            sum.iter_mut().zip(token(t)).for_each(|(s, x)| *s += x);
                        }
                        sum.iter_mut().for_each(|s| *s /= len as f32);
                        sum
                    }
                };
                if self.normalize {
                    let norm = pooled.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
                    pooled.iter_mut().for_each(|x| *x /= norm);
                }
                pooled
            })
            .collect())
    }

    fn activation_bytes(&self, n: usize, longest: usize) -> usize {
        activation_bytes(self.hidden, n, longest)
    }

    fn default_memory_budget(&self) -> usize {
        1 << 30
    }

    fn default_batch_tokens(&self) -> usize {
        crate::device::CPU_BATCH_TOKENS
    }
}

/// A cross-encoder (`*ForSequenceClassification` with one label) on ONNX Runtime: one relevance
/// logit per (query, document) pair, as [`crate::bert_family::CandleCrossEncoder`] returns.
pub struct OnnxCrossEncoder {
    session: EncoderSession,
    hidden: usize,
}

impl OnnxCrossEncoder {
    /// Loads the folder's ONNX export on the CPU; the folder's `config.json` must name a
    /// sequence-classification head with one label.
    pub fn load(dir: &ModelDir, options: &EncoderOptions) -> Result<(Self, LoadedEncoder), BackendError> {
        match dir.head {
            Head::SequenceClassification { num_labels: 1 } => {}
            Head::SequenceClassification { num_labels } => {
                return Err(onnx_error(
                    dir,
                    format!(
                    "a {num_labels}-label classification head; a reranker needs exactly one relevance logit"
                ),
                ))
            }
            Head::None => {
                return Err(onnx_error(dir, "no sequence-classification head, so not a cross-encoder"))
            }
        }
        let session = EncoderSession::open(dir, options, "logits")?;
        Ok((Self { session, hidden: dir.hidden_size }, loaded_info(dir, None, false)))
    }
}

impl EncoderModel for OnnxCrossEncoder {
    type Output = f32;

    fn forward(&mut self, batch: &[&Sequence]) -> Result<Vec<f32>, BoxError> {
        let n = batch.len();
        let (outputs, _) = self.session.run(batch)?;
        let (shape, logits) = outputs["logits"].try_extract_tensor::<f32>()?;
        if shape.len() != 2 || shape[0] as usize != n || shape[1] != 1 {
            return Err(
                format!("the ONNX export returned logits of shape {shape:?}, expected [{n}, 1]").into()
            );
        }
        Ok(logits.to_vec())
    }

    fn activation_bytes(&self, n: usize, longest: usize) -> usize {
        activation_bytes(self.hidden, n, longest)
    }

    fn default_memory_budget(&self) -> usize {
        1 << 30
    }

    fn default_batch_tokens(&self) -> usize {
        crate::device::CPU_BATCH_TOKENS
    }
}
