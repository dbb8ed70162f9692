//! Where a decoder's hyperparameters and tensors come from: a GGUF file (its metadata and tensors)
//! or a Hugging Face safetensors folder (`config.json` and `*.safetensors`, f32 / f16 / bf16).
//!
//! Both are presented to the forward pass the same way: [`Hparams`] for the numbers, and tensors
//! asked for by their GGUF names (`blk.3.attn_q.weight`), which the safetensors source maps to the
//! Hugging Face names (`model.layers.3.self_attn.q_proj.weight`) and converts as llama.cpp's
//! converter does (Gemma's norms store `w - 1`; Phi-3's fused matrices stay fused). The
//! architecture comes from `general.architecture` or `config.json`'s `model_type`, never from a
//! file name.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::quantized::{ggml_file::qtensor_from_ggml, QTensor};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use crate::attention::{RopeConfig, RopeStyle};
use crate::decoder::GgufFile;
use crate::error::BackendError;
use crate::model_dir::read_json;

/// Decoder architectures Hearth runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecoderArch {
    /// `llama` (Llama 2/3.x, SmolLM/SmolLM2, and Mistral, which converts as `llama`).
    Llama,
    /// `qwen2` (Qwen2, Qwen2.5): biases on Q/K/V.
    Qwen2,
    /// `qwen3`: RMS norms on each query and key head.
    Qwen3,
    /// `gemma3`: scaled embeddings, per-head Q/K norms, norms after attention and the FFN, GELU,
    /// and five sliding-window layers (their own RoPE base) to each global one.
    Gemma3,
    /// `phi3` (Phi-3, Phi-3.5): fused QKV and gate/up matrices, LongRoPE frequency factors.
    Phi3,
}

impl DecoderArch {
    pub const NAMES: &'static str = "`llama`, `qwen2`, `qwen3`, `gemma3`, `phi3`";

    fn from_gguf(name: &str) -> Option<Self> {
        Some(match name {
            "llama" => Self::Llama,
            "qwen2" => Self::Qwen2,
            "qwen3" => Self::Qwen3,
            "gemma3" => Self::Gemma3,
            "phi3" => Self::Phi3,
            _ => return None,
        })
    }

    /// From `config.json`'s `model_type`.
    fn from_model_type(name: &str) -> Option<Self> {
        Some(match name {
            "llama" | "mistral" => Self::Llama,
            "qwen2" => Self::Qwen2,
            "qwen3" => Self::Qwen3,
            "gemma3" | "gemma3_text" => Self::Gemma3,
            "phi3" => Self::Phi3,
            _ => return None,
        })
    }

    fn key(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
            Self::Gemma3 => "gemma3",
            Self::Phi3 => "phi3",
        }
    }
}

/// The numbers a decoder's forward pass needs, whichever format they came from.
#[derive(Clone, Debug)]
pub struct Hparams {
    pub arch: DecoderArch,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// The context the model was trained for.
    pub context_length: usize,
    pub eps: f32,
    /// RoPE of global layers (all layers but Gemma 3's sliding ones).
    pub rope: RopeConfig,
    /// Gemma 3's sliding-window layers: their window, RoPE, and which layers they are.
    pub sliding: Option<Sliding>,
    /// What `q·k` is multiplied by.
    pub attention_scale: f32,
    /// Multiplies embeddings (Gemma: `√hidden`).
    pub embedding_scale: Option<f32>,
    /// `cap · tanh(logits / cap)` on the output.
    pub final_logit_softcap: Option<f32>,
    /// RoPE frequency factors from `config.json` (GGUF files carry them as tensors).
    pub freq_factors: FreqFactors,
    /// `tie_word_embeddings` from `config.json` (GGUF: tied when there is no `output.weight`).
    pub tied: Option<bool>,
}

/// Layers that attend through a sliding window.
#[derive(Clone, Copy, Debug)]
pub struct Sliding {
    pub window: usize,
    pub rope: RopeConfig,
    /// Every `pattern`-th layer (1-based) is global; the others slide.
    pub pattern: usize,
}

impl Hparams {
    /// A model of `(hidden, layers, heads, kv_heads, head_dim)` with none of the optional parts
    /// (no window, no scaled embeddings, no soft cap, `1/√head_dim` scores).
    fn plain(
        arch: DecoderArch,
        (hidden, layers, heads, kv_heads, head_dim): (usize, usize, usize, usize, usize),
        context_length: usize,
        eps: f32,
        rope: RopeConfig,
    ) -> Self {
        Self {
            arch,
            hidden,
            layers,
            heads,
            kv_heads,
            head_dim,
            context_length,
            eps,
            rope,
            sliding: None,
            attention_scale: 1.0 / (head_dim as f32).sqrt(),
            embedding_scale: None,
            final_logit_softcap: None,
            freq_factors: FreqFactors::default(),
            tied: None,
        }
    }

    /// True when layer `layer` attends through the sliding window.
    pub fn slides(&self, layer: usize) -> bool {
        self.sliding.is_some_and(|s| layer % s.pattern < s.pattern - 1)
    }
}

/// Per-pair RoPE frequency divisors.
#[derive(Clone, Debug, Default)]
pub struct FreqFactors {
    /// Used at every context (Llama 3.x).
    pub always: Option<Vec<f32>>,
    /// LongRoPE (Phi-3): `short` up to `original_context` positions, `long` beyond.
    pub short: Option<Vec<f32>>,
    pub long: Option<Vec<f32>>,
    pub original_context: Option<usize>,
}

impl FreqFactors {
    /// The factors a model served with `context` positions uses, as llama.cpp picks them.
    pub fn pick(&self, context: usize) -> Option<&[f32]> {
        if let Some(always) = &self.always {
            return Some(always);
        }
        match (&self.long, self.original_context) {
            (Some(long), Some(original)) if context > original => Some(long),
            _ => self.short.as_deref(),
        }
    }
}

/// Gemma 3: `1/√(hidden/heads)` for the 27B model (62 layers), `1/√head_dim` otherwise, as
/// llama.cpp sets it from the layer count (the GGUF has no key for it).
fn gemma3_gguf_attention_scale(layers: usize, hidden: usize, heads: usize, head_dim: usize) -> f32 {
    let d = if layers == 62 { hidden / heads } else { head_dim };
    1.0 / (d as f32).sqrt()
}

/// Reads [`Hparams`] from GGUF metadata.
pub fn gguf_hparams(gguf: &GgufFile) -> Result<Hparams, BackendError> {
    let md = gguf.metadata();
    let path = &gguf.path;
    let arch_name = md.string("general.architecture")?;
    let arch = DecoderArch::from_gguf(arch_name).ok_or_else(|| {
        BackendError::Unsupported(format!(
            "{}: architecture `{arch_name}` is not supported; supported: {}",
            path.display(),
            DecoderArch::NAMES
        ))
    })?;
    let key = |name: &str| format!("{}.{name}", arch.key());
    let hidden = md.usize(&key("embedding_length"))?;
    let layers = md.usize(&key("block_count"))?;
    let heads = md.usize(&key("attention.head_count"))?;
    let kv_heads = md.usize(&key("attention.head_count_kv")).unwrap_or(heads);
    if heads == 0 {
        return Err(BackendError::Unsupported(format!("{}: no attention heads", path.display())));
    }
    let head_dim = md.usize(&key("attention.key_length")).unwrap_or(hidden / heads);
    let rope_dims = md.usize(&key("rope.dimension_count")).unwrap_or(head_dim);
    let scaling = md.string(&key("rope.scaling.type")).unwrap_or("none");
    let factor = md.f32(&key("rope.scaling.factor")).unwrap_or(0.0);
    let freq_scale = match scaling {
        "none" => 1.0,
        "linear" if factor > 0.0 => 1.0 / factor,
        "linear" => 1.0,
        other => {
            return Err(BackendError::Unsupported(format!(
            "{}: RoPE scaling `{other}` is not supported (none, linear, and frequency-factor tensors are)",
            path.display()
        )))
        }
    };
    let style = if arch == DecoderArch::Llama { RopeStyle::Interleaved } else { RopeStyle::Neox };
    let rope = RopeConfig {
        style,
        dims: rope_dims,
        base: md.f32(&key("rope.freq_base")).unwrap_or(10_000.0),
        freq_scale,
        attn_factor: md.f32(&key("rope.scaling.attn_factor")).unwrap_or(1.0),
    };
    let shape = (hidden, layers, heads, kv_heads, head_dim);
    let context = md.usize(&key("context_length"))?;
    let mut hparams =
        Hparams::plain(arch, shape, context, md.f32(&key("attention.layer_norm_rms_epsilon"))?, rope);
    hparams.final_logit_softcap = md.f32(&key("final_logit_softcapping")).ok().filter(|&c| c > 0.0);
    hparams.freq_factors.original_context = md.usize(&key("rope.scaling.original_context_length")).ok();
    if arch == DecoderArch::Gemma3 {
        // llama.cpp: windowed layers rotate with base 10 000 (or `rope.freq_base_swa`) and no
        // scaling; every sixth layer is global.
        if let Some(window) = md.usize(&key("attention.sliding_window")).ok().filter(|&w| w > 0) {
            let base = md.f32(&key("rope.freq_base_swa")).unwrap_or(10_000.0);
            let rope = RopeConfig { base, freq_scale: 1.0, ..rope };
            hparams.sliding = Some(Sliding { window, rope, pattern: 6 });
        }
        hparams.attention_scale = gemma3_gguf_attention_scale(layers, hidden, heads, head_dim);
        hparams.embedding_scale = Some((hidden as f32).sqrt());
    }
    check_shape(&hparams, path)?;
    Ok(hparams)
}

fn check_shape(h: &Hparams, path: &Path) -> Result<(), BackendError> {
    if h.heads == 0
        || h.kv_heads == 0
        || !h.heads.is_multiple_of(h.kv_heads)
        || h.head_dim == 0
        || h.rope.dims > h.head_dim
        || !h.rope.dims.is_multiple_of(2)
    {
        return Err(BackendError::Unsupported(format!(
            "{}: {} heads, {} KV heads of width {} (rotating {}) do not fit together",
            path.display(),
            h.heads,
            h.kv_heads,
            h.head_dim,
            h.rope.dims
        )));
    }
    Ok(())
}

/// The parts of a Hugging Face `config.json` decoders use.
#[derive(Deserialize)]
struct HfDecoderConfig {
    model_type: Option<String>,
    /// Multimodal Gemma 3 checkpoints keep the language model's numbers here.
    text_config: Option<Box<HfDecoderConfig>>,
    hidden_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    max_position_embeddings: Option<usize>,
    original_max_position_embeddings: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_local_base_freq: Option<f64>,
    rope_scaling: Option<serde_json::Value>,
    partial_rotary_factor: Option<f64>,
    sliding_window: Option<usize>,
    sliding_window_pattern: Option<usize>,
    layer_types: Option<Vec<String>>,
    query_pre_attn_scalar: Option<f64>,
    final_logit_softcapping: Option<f64>,
    tie_word_embeddings: Option<bool>,
}

/// Reads [`Hparams`] from a Hugging Face `config.json`.
pub fn config_hparams(config_json: &Path) -> Result<Hparams, BackendError> {
    let top: HfDecoderConfig = read_json(config_json)?;
    let unsupported = |what: String| BackendError::Unsupported(format!("{}: {what}", config_json.display()));
    let model_type = top.model_type.clone().unwrap_or_default();
    let arch = DecoderArch::from_model_type(&model_type).ok_or_else(|| {
        unsupported(format!(
            "model_type `{model_type}` is not a supported decoder; supported: {}",
            DecoderArch::NAMES
        ))
    })?;
    let tied_top = top.tie_word_embeddings;
    let c = match top.text_config {
        Some(text) => *text,
        None => top,
    };
    let need = |v: Option<usize>, name: &str| v.ok_or_else(|| unsupported(format!("no `{name}`")));
    let hidden = need(c.hidden_size, "hidden_size")?;
    let layers = need(c.num_hidden_layers, "num_hidden_layers")?;
    let heads = need(c.num_attention_heads, "num_attention_heads")?;
    if heads == 0 {
        return Err(unsupported("no attention heads".into()));
    }
    let kv_heads = c.num_key_value_heads.unwrap_or(heads);
    let head_dim = c.head_dim.unwrap_or(hidden / heads);
    let rope_dims = (head_dim as f64 * c.partial_rotary_factor.unwrap_or(1.0)) as usize;
    let default_theta = if arch == DecoderArch::Gemma3 { 1_000_000.0 } else { 10_000.0 };
    let base = c.rope_theta.unwrap_or(default_theta) as f32;
    let context_length = c.max_position_embeddings.unwrap_or(4096);
    let mut rope = RopeConfig::plain(RopeStyle::Neox, rope_dims, base);
    let mut freq_factors = FreqFactors::default();
    if let Some(scaling) = c.rope_scaling.as_ref().filter(|v| !v.is_null()) {
        let field = |name: &str| scaling.get(name).and_then(serde_json::Value::as_f64);
        let kind =
            scaling.get("rope_type").or_else(|| scaling.get("type")).and_then(|v| v.as_str()).unwrap_or("");
        match kind {
            "linear" => rope.freq_scale = 1.0 / field("factor").unwrap_or(1.0) as f32,
            "default" => {}
            "llama3" => {
                let get = |name: &str| {
                    field(name).ok_or_else(|| unsupported(format!("rope_scaling has no `{name}`")))
                };
                freq_factors.always = Some(llama3_freq_factors(
                    base,
                    rope_dims,
                    get("factor")?,
                    get("low_freq_factor")?,
                    get("high_freq_factor")?,
                    get("original_max_position_embeddings")?,
                ));
            }
            "longrope" | "su" => {
                let factors = |name: &str| -> Result<Vec<f32>, BackendError> {
                    let list = scaling
                        .get(name)
                        .and_then(|v| v.as_array())
                        .ok_or_else(|| unsupported(format!("rope_scaling has no `{name}` list")))?;
                    Ok(list.iter().filter_map(serde_json::Value::as_f64).map(|v| v as f32).collect())
                };
                freq_factors.short = Some(factors("short_factor")?);
                freq_factors.long = Some(factors("long_factor")?);
                let original = c.original_max_position_embeddings.unwrap_or(context_length);
                freq_factors.original_context = Some(original);
                // The converter's (and Hugging Face's) attention factor for the extended range.
                let scale = context_length as f64 / original as f64;
                if scale > 1.0 {
                    rope.attn_factor = (1.0 + scale.ln() / (original as f64).ln()).sqrt() as f32;
                }
            }
            other => return Err(unsupported(format!("rope_scaling `{other}` is not supported"))),
        }
    }
    let shape = (hidden, layers, heads, kv_heads, head_dim);
    let eps = c.rms_norm_eps.unwrap_or(1e-6) as f32;
    let mut hparams = Hparams::plain(arch, shape, context_length, eps, rope);
    hparams.final_logit_softcap = c.final_logit_softcapping.filter(|&v| v > 0.0).map(|v| v as f32);
    hparams.freq_factors = freq_factors;
    hparams.tied = c.tie_word_embeddings.or(tied_top);
    if arch == DecoderArch::Gemma3 {
        if let Some(scalar) = c.query_pre_attn_scalar {
            hparams.attention_scale = (1.0 / scalar.sqrt()) as f32;
        }
        hparams.embedding_scale = Some((hidden as f32).sqrt());
        if let Some(window) = c.sliding_window.filter(|&w| w > 0) {
            let pattern = match &c.layer_types {
                // Hugging Face's newer configs list each layer; Hearth needs the regular pattern.
                Some(types) => {
                    let first_full =
                        types.iter().position(|t| t == "full_attention").map_or(layers + 1, |i| i + 1);
                    let regular = types
                        .iter()
                        .enumerate()
                        .all(|(i, t)| (t == "full_attention") == ((i + 1) % first_full == 0));
                    if !regular {
                        return Err(unsupported("layer_types is not a repeating pattern".into()));
                    }
                    first_full
                }
                None => c.sliding_window_pattern.unwrap_or(6),
            };
            let local = RopeConfig {
                base: c.rope_local_base_freq.unwrap_or(10_000.0) as f32,
                freq_scale: 1.0,
                ..rope
            };
            hparams.sliding = Some(Sliding { window, rope: local, pattern: pattern.max(1) });
        }
    }
    check_shape(&hparams, config_json)?;
    Ok(hparams)
}

/// Llama 3.1's frequency factors, as llama.cpp's converter writes them into `rope_freqs.weight`:
/// low frequencies are divided by `factor`, high ones kept, and the band between blended.
fn llama3_freq_factors(base: f32, dims: usize, factor: f64, low: f64, high: f64, original: f64) -> Vec<f32> {
    let (low_wavelen, high_wavelen) = (original / low, original / high);
    (0..dims / 2)
        .map(|i| {
            let freq = 1.0 / f64::from(base).powf(2.0 * i as f64 / dims as f64);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor as f32
            } else {
                let smooth = (original / wavelen - low) / (high - low);
                (1.0 / ((1.0 - smooth) / factor + smooth)) as f32
            }
        })
        .collect()
}

/// A tensor as a source stores it: GGML blocks, or a dense tensor (safetensors).
pub enum RawTensor {
    Quant(QTensor),
    Dense(Tensor),
}

impl RawTensor {
    /// Its values in f32 on `device` (norms, biases, factors).
    pub fn to_f32(&self, device: &Device) -> Result<Tensor, BackendError> {
        Ok(match self {
            Self::Quant(t) => t.dequantize(device)?,
            Self::Dense(t) => t.to_device(device)?.to_dtype(DType::F32)?,
        })
    }

    pub fn rows(&self) -> Result<usize, BackendError> {
        Ok(match self {
            Self::Quant(t) => t.shape().dims2()?.0,
            Self::Dense(t) => t.dims2()?.0,
        })
    }

    pub fn type_name(&self) -> String {
        match self {
            Self::Quant(t) => format!("{:?}", t.dtype()),
            Self::Dense(t) => format!("{:?}", t.dtype()).to_uppercase(),
        }
    }

    /// Splits a fused matrix (Phi-3's QKV, gate/up) into consecutive row blocks of `sizes`.
    pub fn split_rows(self, sizes: &[usize], device: &Device) -> Result<Vec<RawTensor>, BackendError> {
        let total = self.rows()?;
        if sizes.iter().sum::<usize>() != total {
            return Err(BackendError::Unsupported(format!(
                "a fused matrix of {total} rows does not split into {sizes:?}"
            )));
        }
        let mut parts = Vec::with_capacity(sizes.len());
        let mut start = 0;
        match self {
            Self::Dense(t) => {
                for &n in sizes {
                    parts.push(Self::Dense(t.narrow(0, start, n)?.contiguous()?));
                    start += n;
                }
            }
            Self::Quant(t) => {
                let (_, cols) = t.shape().dims2()?;
                let dtype = t.dtype();
                let row_bytes = cols / dtype.block_size() * dtype.type_size();
                let data = t.data()?;
                for &n in sizes {
                    let bytes = &data[start * row_bytes..(start + n) * row_bytes];
                    parts.push(Self::Quant(qtensor_from_ggml(dtype, bytes, vec![n, cols], device)?));
                    start += n;
                }
            }
        }
        Ok(parts)
    }
}

/// Tensors by GGUF name.
pub trait TensorSource {
    fn has(&self, name: &str) -> bool;
    fn get(&mut self, name: &str) -> Result<RawTensor, BackendError>;
}

/// A GGUF file's tensors.
pub struct GgufTensors<'a> {
    gguf: &'a GgufFile,
    file: File,
    device: Device,
}

impl<'a> GgufTensors<'a> {
    pub fn new(gguf: &'a GgufFile, device: &Device) -> Result<Self, BackendError> {
        let file =
            File::open(&gguf.path).map_err(|source| BackendError::Io { path: gguf.path.clone(), source })?;
        Ok(Self { gguf, file, device: device.clone() })
    }
}

impl TensorSource for GgufTensors<'_> {
    fn has(&self, name: &str) -> bool {
        self.gguf.content.tensor_infos.contains_key(name)
    }

    fn get(&mut self, name: &str) -> Result<RawTensor, BackendError> {
        let t = self.gguf.content.tensor(&mut self.file, name, &self.device).map_err(|e| {
            BackendError::Unsupported(format!("{}: tensor `{name}`: {e}", self.gguf.path.display()))
        })?;
        Ok(RawTensor::Quant(t))
    }
}

/// A Hugging Face checkpoint's safetensors shards, read through GGUF names.
pub struct SafetensorsTensors {
    dir: PathBuf,
    tensors: MmapedSafetensors,
    names: HashMap<String, ()>,
    /// `model.` or, in multimodal checkpoints, `language_model.model.` / `model.language_model.`.
    prefix: String,
    lm_head: String,
    arch: DecoderArch,
    device: Device,
    /// Matrices on the CPU are widened to f32 (candle's f16/bf16 CPU matmuls are slow); on GPUs
    /// they keep their stored type.
    widen: bool,
}

impl SafetensorsTensors {
    pub fn open(
        dir: &Path,
        shards: &[PathBuf],
        arch: DecoderArch,
        device: &Device,
    ) -> Result<Self, BackendError> {
        if shards.is_empty() {
            return Err(BackendError::Missing { dir: dir.to_owned(), what: "*.safetensors".into() });
        }
        // SAFETY: the files are memory-mapped read-only; Hearth does not write model files while
        // serving them (the same contract as candle's own loaders).
        let tensors = unsafe { MmapedSafetensors::multi(shards) }.map_err(|e| {
            BackendError::Unsupported(format!("{}: cannot read safetensors: {e}", dir.display()))
        })?;
        let names: HashMap<String, ()> = tensors.tensors().into_iter().map(|(n, _)| (n, ())).collect();
        let prefix = ["model.", "language_model.model.", "model.language_model."]
            .into_iter()
            .find(|p| names.contains_key(&format!("{p}embed_tokens.weight")))
            .ok_or_else(|| {
                BackendError::Unsupported(format!(
                    "{}: no `model.embed_tokens.weight` in the safetensors",
                    dir.display()
                ))
            })?
            .to_string();
        let lm_head = if prefix == "language_model.model." {
            "language_model.lm_head.weight"
        } else {
            "lm_head.weight"
        };
        Ok(Self {
            dir: dir.to_owned(),
            tensors,
            names,
            prefix,
            lm_head: lm_head.to_string(),
            arch,
            device: device.clone(),
            widen: device.is_cpu(),
        })
    }

    /// The Hugging Face name of a GGUF tensor name.
    fn hf_name(&self, name: &str) -> Option<String> {
        let p = &self.prefix;
        match name {
            "token_embd.weight" => return Some(format!("{p}embed_tokens.weight")),
            "output_norm.weight" => return Some(format!("{p}norm.weight")),
            "output.weight" => return Some(self.lm_head.clone()),
            _ => {}
        }
        let rest = name.strip_prefix("blk.")?;
        let (layer, rest) = rest.split_once('.')?;
        let (tensor, kind) = rest.rsplit_once('.')?;
        let gemma = self.arch == DecoderArch::Gemma3;
        let hf = match tensor {
            "attn_norm" => "input_layernorm",
            "attn_q" => "self_attn.q_proj",
            "attn_k" => "self_attn.k_proj",
            "attn_v" => "self_attn.v_proj",
            "attn_qkv" => "self_attn.qkv_proj",
            "attn_output" => "self_attn.o_proj",
            "attn_q_norm" => "self_attn.q_norm",
            "attn_k_norm" => "self_attn.k_norm",
            // Gemma's `post_attention_layernorm` follows attention; elsewhere it is the FFN's input norm.
            "post_attention_norm" if gemma => "post_attention_layernorm",
            "ffn_norm" if gemma => "pre_feedforward_layernorm",
            "ffn_norm" => "post_attention_layernorm",
            "post_ffw_norm" => "post_feedforward_layernorm",
            "ffn_gate" => "mlp.gate_proj",
            "ffn_up" if self.arch == DecoderArch::Phi3 => "mlp.gate_up_proj",
            "ffn_up" => "mlp.up_proj",
            "ffn_down" => "mlp.down_proj",
            _ => return None,
        };
        Some(format!("{p}layers.{layer}.{hf}.{kind}"))
    }
}

impl TensorSource for SafetensorsTensors {
    fn has(&self, name: &str) -> bool {
        self.hf_name(name).is_some_and(|n| self.names.contains_key(&n))
    }

    fn get(&mut self, name: &str) -> Result<RawTensor, BackendError> {
        let hf = self.hf_name(name).ok_or_else(|| {
            BackendError::Unsupported(format!("{}: no safetensors name for `{name}`", self.dir.display()))
        })?;
        let t = self
            .tensors
            .load(&hf, &self.device)
            .map_err(|e| BackendError::Unsupported(format!("{}: tensor `{hf}`: {e}", self.dir.display())))?;
        let is_norm = name.contains("norm");
        let t = if is_norm {
            let t = t.to_dtype(DType::F32)?;
            // Gemma multiplies by `1 + w`; llama.cpp's converter stores `w + 1`, and so does this.
            if self.arch == DecoderArch::Gemma3 {
                (t + 1.0)?
            } else {
                t
            }
        } else if self.widen || t.dims().len() == 1 {
            t.to_dtype(DType::F32)?
        } else {
            t
        };
        Ok(RawTensor::Dense(t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_factors_blend_between_the_two_wavelengths() {
        // Llama 3.2's numbers: base 500 000, head 64, factor 32, low 1, high 4, original 8192.
        let f = llama3_freq_factors(500_000.0, 64, 32.0, 1.0, 4.0, 8192.0);
        assert_eq!(f.len(), 32);
        assert_eq!(f[0], 1.0); // the highest frequency is kept
        assert_eq!(f[31], 32.0); // the lowest is divided by the factor
        assert!(f.windows(2).all(|w| w[0] <= w[1]), "{f:?}");
    }

    #[test]
    fn longrope_uses_long_factors_beyond_the_original_context() {
        let ff = FreqFactors {
            always: None,
            short: Some(vec![1.0]),
            long: Some(vec![2.0]),
            original_context: Some(4096),
        };
        assert_eq!(ff.pick(4096), Some(&[1.0][..]));
        assert_eq!(ff.pick(8192), Some(&[2.0][..]));
    }
}
