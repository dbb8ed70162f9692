//! Sentence embedders on ONNX Runtime: the ONNX exports Hugging Face repos ship
//! (`onnx/model_quantized.onnx`, `model_qint8_*.onnx`, `onnx/model.onnx`, see
//! [`crate::model_dir::ONNX_FILES`]) with inputs `input_ids`, `attention_mask` (and
//! `token_type_ids` when the graph takes it) and output `last_hidden_state`. Pooling and
//! normalisation run on the host as the candle embedder's do, from the same sentence-transformers
//! config. This is the CPU route text-embeddings-inference takes; the int8 exports are what makes
//! it fast on a CPU.

use hearth_engine::encoder::{EncoderModel, Sequence};
use hearth_engine::{BoxError, Device, Pooling};
use ort::session::Session;
use ort::value::Tensor;

use crate::bert_family::{EncoderOptions, LoadedEncoder};
use crate::error::BackendError;
use crate::model_dir::{Head, ModelDir};
use crate::onnx::loaded_environment;

pub struct OnnxEmbedder {
    session: Session,
    pooling: Pooling,
    normalize: bool,
    pad_id: u32,
    hidden: usize,
    type_ids: bool,
}

fn onnx_error(dir: &ModelDir, error: impl std::fmt::Display) -> BackendError {
    BackendError::Unsupported(format!("{}: {error}", dir.path.display()))
}

impl OnnxEmbedder {
    /// Loads the folder's ONNX export on the CPU. ONNX Runtime must have been loaded already
    /// ([`crate::onnx::onnx_environment`]); the loader does that with the configured library.
    pub fn load(dir: &ModelDir, options: &EncoderOptions) -> Result<(Self, LoadedEncoder), BackendError> {
        if let Head::SequenceClassification { .. } = dir.head {
            return Err(BackendError::Unsupported(format!(
                "{} holds a cross-encoder; the ONNX backend serves embedders only (use `backend = \"candle\"`)",
                dir.path.display()
            )));
        }
        if !matches!(options.device, Device::Cpu | Device::Auto) {
            return Err(BackendError::Unsupported(
                "the ONNX encoder backend runs on the CPU; use `backend = \"candle\"` on GPUs".into(),
            ));
        }
        let file = dir.onnx.as_ref().ok_or_else(|| BackendError::Missing {
            dir: dir.path.clone(),
            what: format!("ONNX export (one of {})", crate::model_dir::ONNX_FILES.join(", ")),
        })?;
        let st = dir.sentence_transformers.as_ref();
        let pooling = match (options.pooling, st.and_then(|st| st.pooling.clone())) {
            (Some(pooling), _) | (None, Some(Ok(pooling))) => pooling,
            (None, Some(Err(problem))) => return Err(onnx_error(dir, format!("{problem}; set `pooling`"))),
            (None, None) => {
                return Err(onnx_error(dir, "no sentence-transformers pooling config; set `pooling`"));
            }
        };
        let normalize = options.normalize.unwrap_or_else(|| st.is_some_and(|st| st.normalize));
        let environment = loaded_environment()?;
        let session = Session::builder(&environment)
            .and_then(|mut b| b.commit_from_file(file))
            .map_err(|e| onnx_error(dir, e))?;
        let names: Vec<&str> = session.inputs().iter().map(|i| i.name()).collect();
        for wanted in ["input_ids", "attention_mask"] {
            if !names.contains(&wanted) {
                return Err(onnx_error(
                    dir,
                    format!("the ONNX export has no `{wanted}` input (inputs: {names:?})"),
                ));
            }
        }
        if !session.outputs().iter().any(|o| o.name() == "last_hidden_state") {
            return Err(onnx_error(dir, "the ONNX export has no `last_hidden_state` output"));
        }
        let type_ids = names.contains(&"token_type_ids");
        let info = LoadedEncoder {
            architecture: dir.architecture,
            dims: dir.hidden_size,
            vocab_size: dir.vocab_size,
            max_positions: dir.max_positions,
            pooling: Some(pooling),
            normalize,
            device: Device::Cpu,
            dtype: hearth_engine::DType::F32,
        };
        tracing::info!(file = %file.display(), "ONNX encoder loaded");
        let model = OnnxEmbedder {
            session,
            pooling,
            normalize,
            pad_id: dir.pad_token_id,
            hidden: dir.hidden_size,
            type_ids,
        };
        Ok((model, info))
    }
}

impl EncoderModel for OnnxEmbedder {
    type Output = Vec<f32>;

    fn forward(&mut self, batch: &[&Sequence]) -> Result<Vec<Vec<f32>>, BoxError> {
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
        let outputs = self.session.run(inputs)?;
        let (shape, states) = outputs["last_hidden_state"].try_extract_tensor::<f32>()?;
        let hidden = self.hidden;
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

    /// ONNX Runtime's arena holds the graph's intermediate tensors: about a dozen `[n, longest,
    /// hidden]` f32 activations and the attention scores, as for the candle encoder.
    fn activation_bytes(&self, n: usize, longest: usize) -> usize {
        let hidden_states = n * longest * self.hidden * 4 * 16;
        let scores = n * 12 * longest * longest * 4 * 2;
        hidden_states + scores
    }

    fn default_memory_budget(&self) -> usize {
        1 << 30
    }

    fn default_batch_tokens(&self) -> usize {
        crate::device::CPU_BATCH_TOKENS
    }
}
