//! Whisper in Hugging Face's layout: Transformers' `model.safetensors` (f32, f16 or bf16; shards
//! too) or a GGUF file with the same tensor names (candle's quantized Whisper files), read through
//! CTranslate2's names so that one builder ([`super::CandleWhisper::from_weights`]) serves every
//! format. Transformers keeps query, key and value apart (the key without a bias) where
//! CTranslate2 fuses them: the fused matrices are concatenated here, the key's bias is zeros.
//! GGUF files may leave out the encoder's positions (candle's do): they are Whisper's fixed
//! sinusoids, computed here.

use std::cell::RefCell;
use std::collections::HashSet;
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use super::WeightSource;
use crate::BackendError;

/// The fields of Transformers' `WhisperConfig` the weights' shapes do not carry.
#[derive(Debug, Clone, serde::Deserialize)]
struct HfConfig {
    encoder_attention_heads: usize,
    decoder_attention_heads: usize,
    max_source_positions: usize,
    d_model: usize,
}

enum Tensors {
    Safetensors { tensors: MmapedSafetensors, names: HashSet<String> },
    Gguf { content: gguf_file::Content, file: RefCell<File> },
}

/// A Transformers or GGUF Whisper's tensors.
pub struct HfWeights {
    path: PathBuf,
    config: HfConfig,
    tensors: Tensors,
}

/// The parameter a CTranslate2 name ends in, by Transformers' name.
fn parameter(ct2: &str) -> Option<&'static str> {
    Some(match ct2 {
        "weight" | "gamma" | "encodings" => "weight",
        "bias" | "beta" => "bias",
        _ => return None,
    })
}

/// Transformers' modules whose `param` make up CTranslate2's variable `name` (several for the
/// fused projections, in row order), and the parameter (`weight` / `bias`).
fn hf_modules(name: &str) -> Option<(Vec<String>, &'static str)> {
    let (module, param) = name.rsplit_once('/')?;
    let param = parameter(param)?;
    let mut parts = module.split('/');
    let side = parts.next().filter(|s| *s == "encoder" || *s == "decoder")?;
    let rest: Vec<&str> = parts.collect();
    let root = format!("model.{side}");
    let modules = match rest.as_slice() {
        ["conv1"] | ["conv2"] | ["layer_norm"] => vec![format!("{root}.{}", rest[0])],
        ["position_encodings"] => vec![format!("{root}.embed_positions")],
        ["embeddings"] if side == "decoder" => vec![format!("{root}.embed_tokens")],
        [layer, tail @ ..] => {
            let index: usize = layer.strip_prefix("layer_")?.parse().ok()?;
            let m = |s: &str| format!("{root}.layers.{index}.{s}");
            match tail {
                ["self_attention", "layer_norm"] => vec![m("self_attn_layer_norm")],
                ["self_attention", "linear_0"] => {
                    vec![m("self_attn.q_proj"), m("self_attn.k_proj"), m("self_attn.v_proj")]
                }
                ["self_attention", "linear_1"] => vec![m("self_attn.out_proj")],
                ["attention", "layer_norm"] => vec![m("encoder_attn_layer_norm")],
                ["attention", "linear_0"] => vec![m("encoder_attn.q_proj")],
                ["attention", "linear_1"] => vec![m("encoder_attn.k_proj"), m("encoder_attn.v_proj")],
                ["attention", "linear_2"] => vec![m("encoder_attn.out_proj")],
                ["ffn", "layer_norm"] => vec![m("final_layer_norm")],
                ["ffn", "linear_0"] => vec![m("fc1")],
                ["ffn", "linear_1"] => vec![m("fc2")],
                _ => return None,
            }
        }
        _ => return None,
    };
    Some((modules, param))
}

/// Whisper's positional sinusoids `[length, channels]` (OpenAI's `sinusoids`: sines of
/// `t · 10000^(-i / (channels/2 - 1))`, then cosines), computed in f64.
pub fn sinusoids(length: usize, channels: usize) -> Vec<f32> {
    let half = channels / 2;
    let increment = 10000f64.ln() / (half.max(2) - 1) as f64;
    let mut out = Vec::with_capacity(length * channels);
    for t in 0..length {
        let angle = |i: usize| t as f64 * (-increment * i as f64).exp();
        out.extend((0..half).map(|i| angle(i).sin() as f32));
        out.extend((0..half).map(|i| angle(i).cos() as f32));
    }
    out
}

impl HfWeights {
    /// Transformers' safetensors `files` (one, or a checkpoint's shards) with `config.json` in `dir`.
    pub fn safetensors(dir: &Path, files: &[PathBuf]) -> Result<Self, BackendError> {
        // SAFETY: memory-mapped read-only; Hearth does not write model files while serving them.
        let tensors = unsafe { MmapedSafetensors::multi(files) }.map_err(|e| {
            BackendError::Unsupported(format!("{}: cannot read safetensors: {e}", dir.display()))
        })?;
        let names = tensors.tensors().into_iter().map(|(name, _)| name).collect();
        Self::new(dir, dir.to_owned(), Tensors::Safetensors { tensors, names })
    }

    /// A GGUF file of Transformers' names with `config.json` in `dir`.
    pub fn gguf(dir: &Path, path: &Path) -> Result<Self, BackendError> {
        let mut file =
            File::open(path).map_err(|source| BackendError::Io { path: path.to_owned(), source })?;
        let content = gguf_file::Content::read(&mut file).map_err(|e| {
            BackendError::Unsupported(format!("{} is not a readable GGUF file: {e}", path.display()))
        })?;
        Self::new(dir, path.to_owned(), Tensors::Gguf { content, file: RefCell::new(file) })
    }

    fn new(dir: &Path, path: PathBuf, tensors: Tensors) -> Result<Self, BackendError> {
        let config_path = dir.join("config.json");
        let bytes = std::fs::read(&config_path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                BackendError::Missing {
                    dir: dir.to_owned(),
                    what: "config.json (Transformers' WhisperConfig)".into(),
                }
            } else {
                BackendError::Io { path: config_path.clone(), source }
            }
        })?;
        let config: HfConfig = serde_json::from_slice(&bytes)
            .map_err(|source| BackendError::Json { path: config_path, source })?;
        if config.encoder_attention_heads == 0 || config.decoder_attention_heads == 0 {
            return Err(BackendError::Unsupported(format!(
                "{}: config.json names zero heads",
                dir.display()
            )));
        }
        let weights = Self { path, config, tensors };
        if !weights.has_hf("model.decoder.embed_tokens.weight") {
            return Err(BackendError::Unsupported(format!(
                "{}: no `model.decoder.embed_tokens.weight`: not a Transformers Whisper checkpoint",
                weights.path.display()
            )));
        }
        Ok(weights)
    }

    fn has_hf(&self, name: &str) -> bool {
        match &self.tensors {
            Tensors::Safetensors { names, .. } => names.contains(name),
            Tensors::Gguf { content, .. } => content.tensor_infos.contains_key(name),
        }
    }

    /// A tensor by Transformers' name, in f32 on the host (GGUF blocks dequantized).
    fn load_hf(&self, name: &str) -> Result<Tensor, BackendError> {
        let wrap = |e: candle_core::Error| {
            BackendError::Unsupported(format!("{}: tensor `{name}`: {e}", self.path.display()))
        };
        let tensor = match &self.tensors {
            Tensors::Safetensors { tensors, .. } => tensors.load(name, &Device::Cpu).map_err(wrap)?,
            Tensors::Gguf { content, file } => {
                let mut file = file.borrow_mut();
                content
                    .tensor(&mut *file, name, &Device::Cpu)
                    .and_then(|t| t.dequantize(&Device::Cpu))
                    .map_err(wrap)?
            }
        };
        Ok(tensor.to_dtype(DType::F32)?)
    }
}

impl WeightSource for HfWeights {
    fn contains(&self, name: &str) -> bool {
        if name == "encoder/position_encodings/encodings" {
            return true;
        }
        let Some((modules, param)) = hf_modules(name) else { return false };
        match param {
            // A fused bias exists when any part has one (Whisper's keys have none).
            "bias" => modules.iter().any(|m| self.has_hf(&format!("{m}.bias"))),
            _ => modules.iter().all(|m| self.has_hf(&format!("{m}.weight"))),
        }
    }

    fn tensor(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor, BackendError> {
        if name == "encoder/position_encodings/encodings"
            && !self.has_hf("model.encoder.embed_positions.weight")
        {
            let (length, channels) = (self.config.max_source_positions, self.config.d_model);
            let table = Tensor::from_vec(sinusoids(length, channels), (length, channels), &Device::Cpu)?;
            return Ok(table.to_dtype(dtype)?.to_device(device)?);
        }
        let (modules, param) = hf_modules(name).ok_or_else(|| {
            BackendError::Unsupported(format!("{}: no Transformers name for `{name}`", self.path.display()))
        })?;
        let mut parts = Vec::with_capacity(modules.len());
        for module in &modules {
            let full = format!("{module}.{param}");
            if self.has_hf(&full) {
                parts.push(self.load_hf(&full)?);
            } else if param == "bias" && modules.len() > 1 {
                // The key projection's missing bias in a fused one.
                let rows = self.load_hf(&format!("{module}.weight"))?.dim(0)?;
                parts.push(Tensor::zeros(rows, DType::F32, &Device::Cpu)?);
            } else {
                return Err(BackendError::Unsupported(format!(
                    "{}: no tensor `{full}`",
                    self.path.display()
                )));
            }
        }
        let tensor = if parts.len() == 1 { parts.remove(0) } else { Tensor::cat(&parts, 0)? };
        Ok(tensor.to_dtype(dtype)?.to_device(device)?)
    }

    fn heads(&self, side: &str) -> Result<usize, BackendError> {
        Ok(if side == "encoder" {
            self.config.encoder_attention_heads
        } else {
            self.config.decoder_attention_heads
        })
    }

    fn describe(&self) -> String {
        match self.tensors {
            Tensors::Safetensors { .. } => format!("{} (Transformers safetensors)", self.path.display()),
            Tensors::Gguf { .. } => format!("{} (GGUF)", self.path.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fused_projections_map_to_transformers_parts_in_row_order() {
        let (modules, param) = hf_modules("decoder/layer_3/attention/linear_1/bias").unwrap();
        assert_eq!(
            modules,
            ["model.decoder.layers.3.encoder_attn.k_proj", "model.decoder.layers.3.encoder_attn.v_proj"]
        );
        assert_eq!(param, "bias");
        let (modules, param) = hf_modules("encoder/layer_0/self_attention/layer_norm/gamma").unwrap();
        assert_eq!(modules, ["model.encoder.layers.0.self_attn_layer_norm"]);
        assert_eq!(param, "weight");
        assert_eq!(hf_modules("decoder/embeddings/weight").unwrap().0, ["model.decoder.embed_tokens"]);
        assert!(hf_modules("encoder/embeddings/weight").is_none());
        assert!(hf_modules("encoder/layer_x/ffn/linear_0/weight").is_none());
    }

    #[test]
    fn sinusoids_start_with_sines_of_zero_and_cosines_of_one() {
        let table = sinusoids(3, 8);
        assert_eq!(&table[..8], &[0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]);
        // Position 1, channel 0: sin(1); channel 3 (the slowest): sin(1 / 10000).
        assert!((table[8] - 1f32.sin()).abs() < 1e-7);
        assert!((table[11] - (1e-4f32).sin()).abs() < 1e-9);
    }
}
