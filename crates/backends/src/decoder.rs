//! Hearth's decoder forward pass for the llama family (Llama, SmolLM, Mistral, Qwen2, Qwen3), Gemma 3
//! and Phi-3, from GGUF or safetensors ([`crate::decoder_source`]), on candle's kernels and Hearth's
//! own CPU kernels.
//!
//! candle-transformers' decoders keep one KV cache inside the model and assume one sequence, so they
//! cannot batch sequences at different positions. Here one step serves every running sequence: the
//! weight matmuls run once over all chunks' new tokens stacked as `[tokens, hidden]` (`QMatMul`
//! treats leading dimensions as rows), and attention runs per sequence against that sequence's own
//! cache ([`crate::attention`]). Each row's arithmetic is independent of the others (quantized
//! matmuls quantize activations per row), so a sequence gets the same logits alone or in a batch.
//!
//! The architecture comes from the file's `general.architecture` or `config.json`, never from a name.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use hearth_engine::generate::model::{Chunk, DecoderInfo, DecoderModel, SeqId};
use hearth_engine::BoxError;
use rayon::prelude::*;

pub use crate::attention::KvPrecision;
use crate::attention::{AttentionShape, ChunkRows, KvCaches, LayerAttention, Rope};
use crate::decoder_source::{
    config_hparams, gguf_hparams, GgufTensors, RawTensor, SafetensorsTensors, TensorSource,
};
pub use crate::decoder_source::{DecoderArch, Hparams};
use crate::device::{default_activation_budget, resolved_device, select_device};
use crate::error::BackendError;
use crate::quant::{QuantFormat, QuantMatrix};

/// Typed access to a GGUF file's metadata, with errors that name the key and the file.
pub struct Metadata<'a> {
    content: &'a gguf_file::Content,
    path: &'a Path,
}

impl<'a> Metadata<'a> {
    pub fn new(content: &'a gguf_file::Content, path: &'a Path) -> Self {
        Self { content, path }
    }

    fn missing(&self, key: &str) -> BackendError {
        BackendError::Unsupported(format!("{}: no `{key}` in the GGUF metadata", self.path.display()))
    }

    fn wrong(&self, key: &str, e: candle_core::Error) -> BackendError {
        BackendError::Unsupported(format!("{}: `{key}`: {e}", self.path.display()))
    }

    pub fn get(&self, key: &str) -> Option<&'a Value> {
        self.content.metadata.get(key)
    }

    pub fn string(&self, key: &str) -> Result<&'a str, BackendError> {
        let value = self.get(key).ok_or_else(|| self.missing(key))?;
        value.to_string().map(String::as_str).map_err(|e| self.wrong(key, e))
    }

    pub fn usize(&self, key: &str) -> Result<usize, BackendError> {
        let value = self.get(key).ok_or_else(|| self.missing(key))?;
        let n = match value {
            Value::U64(v) => *v,
            Value::I64(v) => u64::try_from(*v).map_err(|_| self.missing(key))?,
            other => u64::from(other.to_u32().map_err(|e| self.wrong(key, e))?),
        };
        usize::try_from(n).map_err(|_| self.missing(key))
    }

    pub fn f32(&self, key: &str) -> Result<f32, BackendError> {
        let value = self.get(key).ok_or_else(|| self.missing(key))?;
        match value {
            Value::F64(v) => Ok(*v as f32),
            other => other.to_f32().map_err(|e| self.wrong(key, e)),
        }
    }

    pub fn bool(&self, key: &str) -> Result<bool, BackendError> {
        let value = self.get(key).ok_or_else(|| self.missing(key))?;
        value.to_bool().map_err(|e| self.wrong(key, e))
    }

    /// An array of strings (token texts, merges).
    pub fn strings(&self, key: &str) -> Result<Vec<&'a str>, BackendError> {
        let value = self.get(key).ok_or_else(|| self.missing(key))?;
        let items = value.to_vec().map_err(|e| self.wrong(key, e))?;
        items.iter().map(|v| v.to_string().map(String::as_str).map_err(|e| self.wrong(key, e))).collect()
    }

    /// An array of integers (token types).
    pub fn ints(&self, key: &str) -> Result<Vec<i64>, BackendError> {
        let value = self.get(key).ok_or_else(|| self.missing(key))?;
        let items = value.to_vec().map_err(|e| self.wrong(key, e))?;
        items
            .iter()
            .map(|v| match v {
                Value::I32(x) => Ok(i64::from(*x)),
                Value::U32(x) => Ok(i64::from(*x)),
                Value::I64(x) => Ok(*x),
                Value::U8(x) => Ok(i64::from(*x)),
                Value::I8(x) => Ok(i64::from(*x)),
                Value::U16(x) => Ok(i64::from(*x)),
                Value::I16(x) => Ok(i64::from(*x)),
                other => Err(self.wrong(key, candle_core::Error::Msg(format!("not an integer: {other:?}")))),
            })
            .collect()
    }
}

/// A GGUF file, opened and inspected (tensors not read yet).
pub struct GgufFile {
    pub path: PathBuf,
    pub content: gguf_file::Content,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self, BackendError> {
        let mut file =
            File::open(path).map_err(|source| BackendError::Io { path: path.to_owned(), source })?;
        let content = gguf_file::Content::read(&mut file).map_err(|e| {
            BackendError::Unsupported(format!("{} is not a readable GGUF file: {e}", path.display()))
        })?;
        Ok(Self { path: path.to_owned(), content })
    }

    pub fn metadata(&self) -> Metadata<'_> {
        Metadata::new(&self.content, &self.path)
    }
}

/// `y = x Wᵀ (+ b)`, with W quantized or not.
struct Linear {
    weight: Weight,
    /// The bias as a tensor (candle path) and as host values (CPU path).
    bias: Option<(Tensor, Vec<f32>)>,
}

/// A weight matrix and the kernel that multiplies by it.
enum Weight {
    /// candle's kernels (every type, every device).
    Candle(QMatMul),
    /// Hearth's CPU kernels for Q4_1 and Q8_0 ([`crate::quant`]), shared when tied.
    Host(Arc<QuantMatrix>),
    /// A dense matrix from safetensors (f32 on the CPU; its stored type on GPUs).
    Dense(Tensor),
}

impl Weight {
    fn new(tensor: RawTensor, matmul: MatmulImplementation) -> Result<Self, BackendError> {
        let tensor = match tensor {
            RawTensor::Dense(t) => return Ok(Self::Dense(t)),
            RawTensor::Quant(t) => t,
        };
        match host_matrix(&tensor, matmul)? {
            Some(matrix) => Ok(Self::Host(Arc::new(matrix))),
            None => Ok(Self::Candle(QMatMul::from_qtensor(tensor)?)),
        }
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Candle(weight) => weight.forward(x),
            Self::Dense(w) => x.to_dtype(w.dtype())?.matmul(&w.t()?)?.to_dtype(DType::F32),
            Self::Host(weight) => {
                let (m, _) = x.dims2()?;
                let y = weight.matmul(&x.flatten_all()?.to_vec1::<f32>()?, m);
                Tensor::from_vec(y, (m, weight.rows()), x.device())
            }
        }
    }

    /// `x` is `m` rows on the host.
    fn forward_host(&self, x: &[f32], m: usize) -> candle_core::Result<Vec<f32>> {
        match self {
            Self::Host(weight) => Ok(weight.matmul(x, m)),
            Self::Candle(_) | Self::Dense(_) => {
                let x = Tensor::from_slice(x, (m, x.len() / m.max(1)), &Device::Cpu)?;
                self.forward(&x)?.flatten_all()?.to_vec1::<f32>()
            }
        }
    }
}

/// The tensor as a host matrix for Hearth's kernels, where one serves its type on this device.
fn host_matrix(tensor: &QTensor, matmul: MatmulImplementation) -> Result<Option<QuantMatrix>, BackendError> {
    let format = match tensor.dtype() {
        GgmlDType::Q4_1 => QuantFormat::Q4_1,
        GgmlDType::Q8_0 => QuantFormat::Q8_0,
        _ => return Ok(None),
    };
    if matmul != MatmulImplementation::Auto || !tensor.device().is_cpu() {
        return Ok(None);
    }
    let (n, k) = tensor.shape().dims2()?;
    Ok(Some(QuantMatrix::from_ggml(format, &tensor.data()?, n, k, true)?))
}

impl Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = self.weight.forward(x)?;
        match &self.bias {
            Some((b, _)) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    fn forward_host(&self, x: &[f32], m: usize) -> candle_core::Result<Vec<f32>> {
        let y = self.weight.forward_host(x, m)?;
        Ok(self.add_bias(y))
    }

    fn add_bias(&self, mut y: Vec<f32>) -> Vec<f32> {
        if let Some((_, b)) = &self.bias {
            for row in y.chunks_exact_mut(b.len()) {
                row.iter_mut().zip(b).for_each(|(y, b)| *y += b);
            }
        }
        y
    }

    /// Several linears of the same input (a layer's Q, K, V; its gate and up): when all are
    /// Hearth's host matrices, one pass of [`QuantMatrix::matmul_many`] (the input quantized once,
    /// one parallel dispatch); else one by one. The same values either way.
    fn forward_host_many<const N: usize>(
        linears: [&Linear; N],
        x: &[f32],
        m: usize,
    ) -> candle_core::Result<[Vec<f32>; N]> {
        let hosts: Option<Vec<&QuantMatrix>> = linears
            .iter()
            .map(|l| match &l.weight {
                Weight::Host(w) => Some(&**w),
                _ => None,
            })
            .collect();
        let outputs = match hosts {
            Some(matrices) => QuantMatrix::matmul_many(&matrices, x, m)
                .into_iter()
                .zip(linears)
                .map(|(y, l)| l.add_bias(y))
                .collect::<Vec<_>>(),
            None => linears.iter().map(|l| l.forward_host(x, m)).collect::<candle_core::Result<Vec<_>>>()?,
        };
        Ok(outputs.try_into().unwrap_or_else(|_| unreachable!("one output per linear")))
    }
}

/// The token embedding table.
enum Embedding {
    Candle(QTensor),
    /// A Q4_1/Q8_0 table on the host, shared with the output projection when the two are tied.
    Host(Arc<QuantMatrix>),
    /// A dense table from safetensors.
    Dense(Tensor),
}

impl Embedding {
    fn forward(&self, ids: &[u32], device: &Device) -> Result<Tensor, BackendError> {
        match self {
            Self::Candle(table) => Ok(table.embedding(&Tensor::new(ids, device)?)?),
            Self::Dense(table) => {
                Ok(table.index_select(&Tensor::new(ids, table.device())?, 0)?.to_dtype(DType::F32)?)
            }
            Self::Host(_) => {
                let rows = self.forward_host(ids)?;
                Ok(Tensor::from_vec(rows, (ids.len(), self.width()), device)?)
            }
        }
    }

    fn forward_host(&self, ids: &[u32]) -> Result<Vec<f32>, BackendError> {
        match self {
            Self::Candle(_) | Self::Dense(_) => {
                Ok(self.forward(ids, &Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?)
            }
            Self::Host(table) => {
                let width = table.cols();
                let mut out = vec![0f32; ids.len() * width];
                for (&id, row) in ids.iter().zip(out.chunks_exact_mut(width)) {
                    if id as usize >= table.rows() {
                        return Err(BackendError::Unsupported(format!(
                            "token id {id} is outside the vocabulary of {}",
                            table.rows()
                        )));
                    }
                    table.dequantize_row(id as usize, row);
                }
                Ok(out)
            }
        }
    }

    fn width(&self) -> usize {
        match self {
            Self::Candle(table) => table.shape().dims().last().copied().unwrap_or(0),
            Self::Dense(table) => table.dims().last().copied().unwrap_or(0),
            Self::Host(table) => table.cols(),
        }
    }
}

struct RmsNorm {
    weight: Tensor,
    host: Vec<f32>,
    eps: f32,
}

impl RmsNorm {
    fn new(weight: Tensor, eps: f32) -> Result<Self, BackendError> {
        let host = weight.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
        Ok(Self { weight, host, eps })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        candle_nn::ops::rms_norm(x, &self.weight, self.eps)
    }

    /// ggml's `rms_norm` then `mul`: squares summed in f64, `1/sqrt(mean + eps)` in f32. Rows in
    /// parallel when there are many.
    fn forward_host(&self, x: &[f32]) -> Vec<f32> {
        let width = self.host.len();
        let mut out = vec![0f32; x.len()];
        let norm = |(row, out): (&[f32], &mut [f32])| {
            let sum: f64 = row.iter().map(|&v| f64::from(v * v)).sum();
            let mean = (sum / width as f64) as f32;
            let scale = 1.0 / (mean + self.eps).sqrt();
            for ((o, &v), &w) in out.iter_mut().zip(row).zip(&self.host) {
                *o = (v * scale) * w;
            }
        };
        if x.len() >= PARALLEL_FROM {
            x.par_chunks_exact(width).zip(out.par_chunks_exact_mut(width)).for_each(norm);
        } else {
            x.chunks_exact(width).zip(out.chunks_exact_mut(width)).for_each(norm);
        }
        out
    }
}

/// Values from which the host's elementwise steps (norms, the gate's activation) split their work
/// across the decoder's threads: below, a dispatch costs more than it saves.
const PARALLEL_FROM: usize = 4096;

/// The feed-forward gate's activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Activation {
    /// SiLU (llama, Qwen, Phi-3).
    Silu,
    /// GELU, tanh approximation (Gemma).
    GeluTanh,
}

impl Activation {
    /// `gate ← act(gate) · up`, elementwise (ggml's `swiglu` / `geglu`), in parallel chunks when
    /// there are many values (several sequences' rows).
    fn gate_host(self, gate: &mut [f32], up: &[f32]) {
        let apply = |(gate, up): (&mut [f32], &[f32])| match self {
            Self::Silu => gate.iter_mut().zip(up).for_each(|(g, &u)| *g = *g / (1.0 + (-*g).exp()) * u),
            Self::GeluTanh => gate.iter_mut().zip(up).for_each(|(g, &u)| *g = gelu_tanh(*g) * u),
        };
        if gate.len() >= PARALLEL_FROM {
            gate.par_chunks_mut(PARALLEL_FROM / 2).zip(up.par_chunks(PARALLEL_FROM / 2)).for_each(apply);
        } else {
            apply((gate, up));
        }
    }

    fn gate(self, gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
        let activated = match self {
            Self::Silu => candle_nn::ops::silu(gate)?,
            Self::GeluTanh => gate.gelu()?,
        };
        activated * up
    }
}

/// `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`.
fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * (1.0 + 0.044715 * x * x)).tanh())
}

fn add_assign(x: &mut [f32], y: &[f32]) {
    x.iter_mut().zip(y).for_each(|(x, &y)| *x += y);
}

struct Layer {
    attn_norm: RmsNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    /// Per-head RMS norms of queries and keys, before rotation (Qwen3, Gemma 3).
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    o: Linear,
    /// Normalises attention's output before the residual add (Gemma 3).
    post_attn_norm: Option<RmsNorm>,
    ffn_norm: RmsNorm,
    gate: Linear,
    up: Linear,
    down: Linear,
    /// Normalises the FFN's output before the residual add (Gemma 3).
    post_ffn_norm: Option<RmsNorm>,
    /// Sliding-window layer: its window and the index of its RoPE table.
    window: Option<usize>,
    rope: usize,
}

fn apply_norm(norm: &Option<RmsNorm>, x: Vec<f32>) -> Vec<f32> {
    match norm {
        Some(norm) => norm.forward_host(&x),
        None => x,
    }
}

fn apply_norm_tensor(norm: &Option<RmsNorm>, x: Tensor) -> candle_core::Result<Tensor> {
    match norm {
        Some(norm) => norm.forward(&x),
        None => Ok(x),
    }
}

/// Reads a model's tensors into the forward pass's types, counting them by type.
struct Tensors<'a> {
    source: &'a mut dyn TensorSource,
    counts: std::collections::BTreeMap<String, usize>,
    device: &'a Device,
    matmul: MatmulImplementation,
    eps: f32,
}

impl Tensors<'_> {
    fn tensor(&mut self, name: &str) -> Result<RawTensor, BackendError> {
        let t = self.source.get(name)?;
        *self.counts.entry(t.type_name()).or_default() += 1;
        Ok(t)
    }

    /// A weight and its bias `bias`, when the model has one.
    fn linear(&mut self, weight: RawTensor, bias: &str) -> Result<Linear, BackendError> {
        let bias = if self.source.has(bias) {
            let b = self.tensor(bias)?.to_f32(self.device)?;
            let host = b.to_device(&Device::Cpu)?.to_vec1::<f32>()?;
            Some((b, host))
        } else {
            None
        };
        Ok(Linear { weight: Weight::new(weight, self.matmul)?, bias })
    }

    fn norm(&mut self, name: &str) -> Result<RmsNorm, BackendError> {
        RmsNorm::new(self.tensor(name)?.to_f32(self.device)?, self.eps)
    }

    fn optional_norm(&mut self, name: &str) -> Result<Option<RmsNorm>, BackendError> {
        if self.source.has(name) {
            self.norm(name).map(Some)
        } else {
            Ok(None)
        }
    }

    /// A small tensor's values on the host, when the model has it.
    fn host_values(&mut self, name: &str) -> Result<Option<Vec<f32>>, BackendError> {
        if !self.source.has(name) {
            return Ok(None);
        }
        Ok(Some(self.source.get(name)?.to_f32(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?))
    }
}

/// What a loaded decoder reports about itself.
#[derive(Clone, Debug)]
pub struct LoadedDecoder {
    pub arch: DecoderArch,
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub context_length: usize,
    pub vocab_size: usize,
    pub device: hearth_engine::Device,
    /// Tensor types and how many tensors of each, e.g. `Q4_1 ×210`.
    pub tensor_types: String,
}

/// Where a decoder's weights are.
#[derive(Clone, Debug)]
pub enum DecoderFiles {
    /// One GGUF file.
    Gguf(PathBuf),
    /// A Hugging Face folder: `config.json` and the safetensors shards.
    Safetensors { config: PathBuf, shards: Vec<PathBuf> },
}

impl DecoderFiles {
    /// A `.gguf` file, or a folder holding `config.json` and `*.safetensors` (shards found by
    /// listing it; the server resolves them inside its models directory instead).
    pub fn from_path(path: &Path) -> Result<Self, BackendError> {
        if !path.is_dir() {
            return Ok(Self::Gguf(path.to_owned()));
        }
        let entries =
            std::fs::read_dir(path).map_err(|source| BackendError::Io { path: path.to_owned(), source })?;
        let mut shards: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        shards.sort();
        Ok(Self::Safetensors { config: path.join("config.json"), shards })
    }

    fn describe(&self) -> PathBuf {
        match self {
            Self::Gguf(path) => path.clone(),
            Self::Safetensors { config, .. } => config.parent().unwrap_or(config).to_owned(),
        }
    }
}

/// A decoder-only transformer with one KV cache per sequence.
pub struct Decoder {
    embed: Embedding,
    embedding_scale: Option<f32>,
    layers: Vec<Layer>,
    norm: RmsNorm,
    output: Weight,
    final_logit_softcap: Option<f32>,
    /// RoPE tables: `[global]`, or `[global, sliding]`.
    ropes: Vec<Rope>,
    attention_scale: f32,
    activation: Activation,
    kv: KvCaches,
    shape: AttentionShape,
    info: DecoderInfo,
    device: Device,
    /// The model's own thread pool: a step runs inside it, so the owner thread is one of its
    /// workers and each kernel's parallel loop costs a join, not a hand-off to another pool.
    pool: Arc<rayon::ThreadPool>,
}

/// How to load a decoder.
#[derive(Clone, Copy, Debug, Default)]
pub struct DecoderOptions {
    pub device: hearth_engine::Device,
    /// Fewer positions than the model's context (less KV memory per sequence).
    pub context_length: Option<usize>,
    pub kv: KvImplementation,
    pub matmul: MatmulImplementation,
    /// CPU threads for this model's kernels (its own pool; default: one per core).
    pub threads: Option<usize>,
    /// The element type of host KV caches (CPU).
    pub kv_precision: KvPrecision,
}

/// Which matmul kernels a decoder uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MatmulImplementation {
    /// Hearth's CPU kernel for Q4_1 weights on the CPU, candle's for the rest.
    #[default]
    Auto,
    /// candle's everywhere (the reference in tests).
    Candle,
}

/// Which KV-cache implementation a decoder uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvImplementation {
    /// The CPU kernel on the CPU, candle ops elsewhere.
    #[default]
    Auto,
    /// candle ops everywhere (the CPU kernel's reference in tests).
    CandleOps,
}

impl Decoder {
    /// Loads a `.gguf` file or a safetensors folder (see [`DecoderFiles::from_path`]).
    pub fn load(path: &Path, options: &DecoderOptions) -> Result<(Self, LoadedDecoder), BackendError> {
        Self::load_files(&DecoderFiles::from_path(path)?, options)
    }

    pub fn load_files(
        files: &DecoderFiles,
        options: &DecoderOptions,
    ) -> Result<(Self, LoadedDecoder), BackendError> {
        let device = select_device(options.device)?;
        match files {
            DecoderFiles::Gguf(path) => {
                let gguf = GgufFile::open(path)?;
                let hparams = gguf_hparams(&gguf)?;
                let mut source = GgufTensors::new(&gguf, &device)?;
                Self::build(&hparams, &mut source, device, options, path)
            }
            DecoderFiles::Safetensors { config, shards } => {
                let hparams = config_hparams(config)?;
                let dir = files.describe();
                let mut source = SafetensorsTensors::open(&dir, shards, hparams.arch, &device)?;
                Self::build(&hparams, &mut source, device, options, &dir)
            }
        }
    }

    fn build(
        h: &Hparams,
        source: &mut dyn TensorSource,
        device: Device,
        options: &DecoderOptions,
        path: &Path,
    ) -> Result<(Self, LoadedDecoder), BackendError> {
        let matmul = options.matmul;
        let context_length = options.context_length.map_or(h.context_length, |n| n.min(h.context_length));
        let mut ld = Tensors { source, counts: Default::default(), device: &device, matmul, eps: h.eps };
        let embed = ld.tensor("token_embd.weight")?;
        let vocab_size = embed.rows()?;
        let tied = h.tied.unwrap_or(false) || !ld.source.has("output.weight");
        // Tied embeddings (SmolLM2, small Qwen2.5, Gemma) have no `output.weight`: one table serves
        // both, as a host matrix for Hearth's kernels where one serves its type.
        let (embed, tied_output) = match embed {
            RawTensor::Dense(table) => {
                let output = tied.then(|| Weight::Dense(table.clone()));
                (Embedding::Dense(table), output)
            }
            RawTensor::Quant(table) => match host_matrix(&table, matmul)? {
                Some(host) if tied => {
                    let host = Arc::new(host);
                    (Embedding::Host(host.clone()), Some(Weight::Host(host)))
                }
                _ => (Embedding::Candle(table), None),
            },
        };
        let (q_rows, kv_rows) = (h.heads * h.head_dim, h.kv_heads * h.head_dim);
        let mut blocks = Vec::with_capacity(h.layers);
        for i in 0..h.layers {
            let name = |t: &str| format!("blk.{i}.{t}");
            let (q, k, v) = if ld.source.has(&name("attn_qkv.weight")) {
                // Phi-3: one matrix whose rows are Q, then K, then V.
                let fused = ld.tensor(&name("attn_qkv.weight"))?;
                let mut parts = fused.split_rows(&[q_rows, kv_rows, kv_rows], &device)?.into_iter();
                let mut next = || parts.next().expect("three parts");
                (
                    ld.linear(next(), &name("attn_q.bias"))?,
                    ld.linear(next(), &name("attn_k.bias"))?,
                    ld.linear(next(), &name("attn_v.bias"))?,
                )
            } else {
                let q = ld.tensor(&name("attn_q.weight"))?;
                let k = ld.tensor(&name("attn_k.weight"))?;
                let v = ld.tensor(&name("attn_v.weight"))?;
                (
                    ld.linear(q, &name("attn_q.bias"))?,
                    ld.linear(k, &name("attn_k.bias"))?,
                    ld.linear(v, &name("attn_v.bias"))?,
                )
            };
            let o = ld.tensor(&name("attn_output.weight"))?;
            let o = ld.linear(o, &name("attn_output.bias"))?;
            let (gate, up) = if ld.source.has(&name("ffn_gate.weight")) {
                let gate = ld.tensor(&name("ffn_gate.weight"))?;
                let up = ld.tensor(&name("ffn_up.weight"))?;
                (ld.linear(gate, &name("ffn_gate.bias"))?, ld.linear(up, &name("ffn_up.bias"))?)
            } else {
                // Phi-3: `ffn_up` holds the gate's rows, then the up projection's.
                let fused = ld.tensor(&name("ffn_up.weight"))?;
                let half = fused.rows()? / 2;
                let mut parts = fused.split_rows(&[half, half], &device)?.into_iter();
                let gate = parts.next().expect("two parts");
                let up = parts.next().expect("two parts");
                (ld.linear(gate, &name("ffn_gate.bias"))?, ld.linear(up, &name("ffn_up.bias"))?)
            };
            let down = ld.tensor(&name("ffn_down.weight"))?;
            let down = ld.linear(down, &name("ffn_down.bias"))?;
            let slides = h.slides(i);
            blocks.push(Layer {
                attn_norm: ld.norm(&name("attn_norm.weight"))?,
                q,
                k,
                v,
                q_norm: ld.optional_norm(&name("attn_q_norm.weight"))?,
                k_norm: ld.optional_norm(&name("attn_k_norm.weight"))?,
                o,
                post_attn_norm: ld.optional_norm(&name("post_attention_norm.weight"))?,
                ffn_norm: ld.norm(&name("ffn_norm.weight"))?,
                gate,
                up,
                down,
                post_ffn_norm: ld.optional_norm(&name("post_ffw_norm.weight"))?,
                window: if slides { h.sliding.map(|s| s.window) } else { None },
                rope: usize::from(slides),
            });
        }
        let final_norm = ld.norm("output_norm.weight")?;
        let output = match tied_output {
            Some(output) => output,
            // candle's kernels keep their own copy of a tied table.
            None if tied => Weight::new(ld.tensor("token_embd.weight")?, matmul)?,
            None => Weight::new(ld.tensor("output.weight")?, matmul)?,
        };
        let mut freq_factors = h.freq_factors.clone();
        if let Some(f) = ld.host_values("rope_freqs.weight")? {
            freq_factors.always = Some(f);
        }
        if let Some(f) = ld.host_values("rope_factors_short.weight")? {
            freq_factors.short = Some(f);
        }
        if let Some(f) = ld.host_values("rope_factors_long.weight")? {
            freq_factors.long = Some(f);
        }
        let tensor_types = ld.counts.iter().map(|(t, n)| format!("{t} ×{n}")).collect::<Vec<_>>().join(", ");
        let mut ropes = vec![Rope::new(&h.rope, context_length, freq_factors.pick(context_length))];
        if let Some(sliding) = &h.sliding {
            ropes.push(Rope::new(&sliding.rope, context_length, None));
        }
        let shape =
            AttentionShape { layers: h.layers, heads: h.heads, kv_heads: h.kv_heads, head_dim: h.head_dim };
        let kv = match options.kv {
            KvImplementation::Auto => KvCaches::for_device(shape, &device, options.kv_precision),
            KvImplementation::CandleOps => {
                KvCaches::Tensor(crate::attention::TensorKv::new(shape, device.clone()))
            }
        };
        let info = DecoderInfo { vocab_size, context_length, kv_bytes_per_token: kv.bytes_per_token() };
        let loaded = LoadedDecoder {
            arch: h.arch,
            layers: h.layers,
            hidden: h.hidden,
            heads: h.heads,
            kv_heads: h.kv_heads,
            context_length,
            vocab_size,
            device: resolved_device(&device),
            tensor_types,
        };
        let threads = options.threads.unwrap_or_else(candle_core::utils::get_num_threads).max(1);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("decoder-{i}"))
            .build()
            .map(Arc::new)
            .map_err(|e| BackendError::Unsupported(format!("cannot start the decoder's threads: {e}")))?;
        if embed.width() != h.hidden {
            return Err(BackendError::Unsupported(format!(
                "{}: embeddings are {} wide, the model says {}",
                path.display(),
                embed.width(),
                h.hidden
            )));
        }
        let model = Self {
            embed,
            embedding_scale: h.embedding_scale,
            layers: blocks,
            norm: final_norm,
            output,
            final_logit_softcap: h.final_logit_softcap,
            ropes,
            attention_scale: h.attention_scale,
            activation: if h.arch == DecoderArch::Gemma3 { Activation::GeluTanh } else { Activation::Silu },
            kv,
            shape,
            info,
            device,
            pool,
        };
        Ok((model, loaded))
    }

    fn forward(&mut self, chunks: &[Chunk]) -> Result<Vec<Vec<f32>>, BackendError> {
        let ids: Vec<u32> = chunks.iter().flat_map(|c| c.tokens.iter().copied()).collect();
        let rows: Vec<ChunkRows> =
            chunks.iter().map(|c| ChunkRows { seq: c.seq, start: c.start, len: c.tokens.len() }).collect();
        if let Some(c) = rows.iter().find(|c| c.start + c.len > self.info.context_length) {
            return Err(BackendError::Unsupported(format!(
                "sequence {} would pass the model's context of {} tokens",
                c.seq, self.info.context_length
            )));
        }
        // Logits only for the last token of chunks that ask for them.
        let mut last = Vec::new();
        let mut end = 0;
        for chunk in chunks {
            end += chunk.tokens.len();
            if chunk.logits {
                last.push(end - 1);
            }
        }
        let mut logits = if matches!(self.kv, KvCaches::Host(_)) {
            self.forward_host(&ids, &rows, &last)?
        } else {
            self.forward_tensors(&ids, &rows, &last)?
        };
        if let Some(cap) = self.final_logit_softcap {
            logits.iter_mut().flatten().for_each(|x| *x = cap * (*x / cap).tanh());
        }
        Ok(logits)
    }

    /// The forward pass in candle ops (every device).
    fn forward_tensors(
        &mut self,
        ids: &[u32],
        rows: &[ChunkRows],
        last: &[usize],
    ) -> Result<Vec<Vec<f32>>, BackendError> {
        let mut x = self.embed.forward(ids, &self.device)?;
        if let Some(scale) = self.embedding_scale {
            x = (x * f64::from(scale))?;
        }
        let t = ids.len();
        let head_dim = self.shape.head_dim;
        for (l, layer) in self.layers.iter().enumerate() {
            let h = layer.attn_norm.forward(&x)?;
            let (mut q, mut k, v) = (layer.q.forward(&h)?, layer.k.forward(&h)?, layer.v.forward(&h)?);
            if let Some(norm) = &layer.q_norm {
                q = norm.forward(&q.reshape((t * self.shape.heads, head_dim))?)?.reshape((t, ()))?;
            }
            if let Some(norm) = &layer.k_norm {
                k = norm.forward(&k.reshape((t * self.shape.kv_heads, head_dim))?)?.reshape((t, ()))?;
            }
            let attn = LayerAttention {
                rope: &self.ropes[layer.rope],
                window: layer.window,
                scale: self.attention_scale,
            };
            let attended = self.kv.attend(l, &attn, &q, &k, &v, rows)?;
            x = (x + apply_norm_tensor(&layer.post_attn_norm, layer.o.forward(&attended)?)?)?;
            let h = layer.ffn_norm.forward(&x)?;
            let gated = self.activation.gate(&layer.gate.forward(&h)?, &layer.up.forward(&h)?)?;
            x = (x + apply_norm_tensor(&layer.post_ffn_norm, layer.down.forward(&gated)?)?)?;
        }
        if last.is_empty() {
            return Ok(Vec::new());
        }
        let index: Vec<u32> = last.iter().map(|&i| i as u32).collect();
        let index = Tensor::from_vec(index, last.len(), &self.device)?;
        let x = self.norm.forward(&x.index_select(&index, 0)?)?;
        Ok(self.output.forward(&x)?.to_vec2::<f32>()?)
    }

    /// The same forward pass on the host, for the CPU: activations stay in plain buffers between
    /// Hearth's kernels (no tensor per op, no candle thread pool beside rayon's).
    fn forward_host(
        &mut self,
        ids: &[u32],
        rows: &[ChunkRows],
        last: &[usize],
    ) -> Result<Vec<Vec<f32>>, BackendError> {
        let attention: Vec<(Option<usize>, usize)> = self.layers.iter().map(|l| (l.window, l.rope)).collect();
        let Self {
            embed, layers, norm, output, ropes, kv, attention_scale, activation, embedding_scale, ..
        } = self;
        let KvCaches::Host(kv) = kv else {
            return Err(BackendError::Unsupported("the host forward pass needs host KV caches".into()));
        };
        let t = ids.len();
        let mut x = embed.forward_host(ids)?;
        if let Some(scale) = *embedding_scale {
            x.iter_mut().for_each(|v| *v *= scale);
        }
        let width = embed.width();
        for (l, layer) in layers.iter().enumerate() {
            let h = layer.attn_norm.forward_host(&x);
            let [q, k, v] = Linear::forward_host_many([&layer.q, &layer.k, &layer.v], &h, t)?;
            let (mut q, mut k) = (apply_norm(&layer.q_norm, q), apply_norm(&layer.k_norm, k));
            let (window, rope) = attention[l];
            let attn = LayerAttention { rope: &ropes[rope], window, scale: *attention_scale };
            let attended = kv.attend_host(l, &attn, &mut q, &mut k, &v, rows)?;
            add_assign(&mut x, &apply_norm(&layer.post_attn_norm, layer.o.forward_host(&attended, t)?));
            let h = layer.ffn_norm.forward_host(&x);
            let [mut gate, up] = Linear::forward_host_many([&layer.gate, &layer.up], &h, t)?;
            activation.gate_host(&mut gate, &up);
            add_assign(&mut x, &apply_norm(&layer.post_ffn_norm, layer.down.forward_host(&gate, t)?));
        }
        if last.is_empty() {
            return Ok(Vec::new());
        }
        let picked: Vec<f32> =
            last.iter().flat_map(|&i| x[i * width..(i + 1) * width].iter().copied()).collect();
        let logits = output.forward_host(&norm.forward_host(&picked), last.len())?;
        Ok(logits.chunks_exact(logits.len() / last.len()).map(<[f32]>::to_vec).collect())
    }

    /// Tokens cached for `seq` (tests).
    pub fn cached(&self, seq: SeqId) -> usize {
        self.kv.len(seq)
    }

    pub fn shape(&self) -> AttentionShape {
        self.shape
    }
}

impl DecoderModel for Decoder {
    fn info(&self) -> DecoderInfo {
        self.info.clone()
    }

    fn step(&mut self, chunks: &[Chunk]) -> Result<Vec<Vec<f32>>, BoxError> {
        let pool = Arc::clone(&self.pool);
        Ok(pool.install(|| self.forward(chunks))?)
    }

    fn release(&mut self, seq: SeqId) {
        self.kv.release(seq);
    }

    fn fork(&mut self, from: SeqId, to: SeqId, len: usize) -> Result<(), BoxError> {
        Ok(self.kv.fork(from, to, len)?)
    }

    fn default_kv_budget(&self) -> usize {
        default_activation_budget(&self.device)
    }
}
