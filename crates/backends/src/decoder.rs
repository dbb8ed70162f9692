//! Hearth's decoder forward pass for the llama family (Llama, SmolLM, Mistral, Qwen2) from GGUF,
//! on candle's quantized kernels.
//!
//! candle-transformers' decoders keep one KV cache inside the model and assume one sequence, so they
//! cannot batch sequences at different positions. Here one step serves every running sequence: the
//! weight matmuls run once over all chunks' new tokens stacked as `[tokens, hidden]` (`QMatMul`
//! treats leading dimensions as rows), and attention runs per sequence against that sequence's own
//! cache ([`crate::attention`]). Each row's arithmetic is independent of the others (quantized
//! matmuls quantize activations per row), so a sequence gets the same logits alone or in a batch.
//!
//! The architecture comes from the file's `general.architecture`, never from a name.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use hearth_engine::generate::model::{Chunk, DecoderInfo, DecoderModel, SeqId};
use hearth_engine::BoxError;

pub use crate::attention::KvPrecision;
use crate::attention::{AttentionShape, ChunkRows, KvCaches, Rope, RopeStyle};
use crate::device::{default_activation_budget, resolved_device, select_device};
use crate::error::BackendError;
use crate::quant::{QuantFormat, QuantMatrix};

/// Decoder architectures this module runs, from GGUF `general.architecture`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecoderArch {
    /// `llama` (Llama 2/3.x, SmolLM/SmolLM2, Mistral and others converted as `llama`).
    Llama,
    /// `qwen2` (Qwen2, Qwen2.5): biases on Q/K/V, NeoX rotation.
    Qwen2,
}

impl DecoderArch {
    pub const NAMES: &'static str = "`llama`, `qwen2`";

    fn from_gguf(name: &str) -> Option<Self> {
        match name {
            "llama" => Some(Self::Llama),
            "qwen2" => Some(Self::Qwen2),
            _ => None,
        }
    }

    fn key(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
        }
    }

    fn rope(self) -> RopeStyle {
        match self {
            Self::Llama => RopeStyle::Interleaved,
            Self::Qwen2 => RopeStyle::Neox,
        }
    }
}

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
}

impl Weight {
    fn new(tensor: QTensor, matmul: MatmulImplementation) -> Result<Self, BackendError> {
        match host_matrix(&tensor, matmul)? {
            Some(matrix) => Ok(Self::Host(Arc::new(matrix))),
            None => Ok(Self::Candle(QMatMul::from_qtensor(tensor)?)),
        }
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Candle(weight) => weight.forward(x),
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
            Self::Candle(weight) => {
                let x = Tensor::from_slice(x, (m, x.len() / m.max(1)), &Device::Cpu)?;
                weight.forward(&x)?.flatten_all()?.to_vec1::<f32>()
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
        let mut y = self.weight.forward_host(x, m)?;
        if let Some((_, b)) = &self.bias {
            for row in y.chunks_exact_mut(b.len()) {
                row.iter_mut().zip(b).for_each(|(y, b)| *y += b);
            }
        }
        Ok(y)
    }
}

/// The token embedding table.
enum Embedding {
    Candle(QTensor),
    /// A Q4_1/Q8_0 table on the host, shared with the output projection when the two are tied.
    Host(Arc<QuantMatrix>),
}

impl Embedding {
    fn forward(&self, ids: &[u32], device: &Device) -> Result<Tensor, BackendError> {
        match self {
            Self::Candle(table) => Ok(table.embedding(&Tensor::new(ids, device)?)?),
            Self::Host(_) => {
                let rows = self.forward_host(ids)?;
                Ok(Tensor::from_vec(rows, (ids.len(), self.width()), device)?)
            }
        }
    }

    fn forward_host(&self, ids: &[u32]) -> Result<Vec<f32>, BackendError> {
        match self {
            Self::Candle(table) => {
                Ok(table.embedding(&Tensor::new(ids, &Device::Cpu)?)?.flatten_all()?.to_vec1::<f32>()?)
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

    /// ggml's `rms_norm` then `mul`: squares summed in f64, `1/sqrt(mean + eps)` in f32.
    fn forward_host(&self, x: &[f32]) -> Vec<f32> {
        let width = self.host.len();
        let mut out = vec![0f32; x.len()];
        for (row, out) in x.chunks_exact(width).zip(out.chunks_exact_mut(width)) {
            let sum: f64 = row.iter().map(|&v| f64::from(v * v)).sum();
            let mean = (sum / width as f64) as f32;
            let scale = 1.0 / (mean + self.eps).sqrt();
            for ((o, &v), &w) in out.iter_mut().zip(row).zip(&self.host) {
                *o = (v * scale) * w;
            }
        }
        out
    }
}

/// `gate ← silu(gate) · up`, elementwise (ggml's `swiglu`).
fn swiglu(gate: &mut [f32], up: &[f32]) {
    gate.iter_mut().zip(up).for_each(|(g, &u)| *g = *g / (1.0 + (-*g).exp()) * u);
}

fn add_assign(x: &mut [f32], y: &[f32]) {
    x.iter_mut().zip(y).for_each(|(x, &y)| *x += y);
}

struct Layer {
    attn_norm: RmsNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ffn_norm: RmsNorm,
    gate: Linear,
    up: Linear,
    down: Linear,
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

pub struct LlamaDecoder {
    embed: Embedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    output: Weight,
    rope: Rope,
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

impl LlamaDecoder {
    pub fn load(path: &Path, options: &DecoderOptions) -> Result<(Self, LoadedDecoder), BackendError> {
        let (device, kv, matmul) = (options.device, options.kv, options.matmul);
        let gguf = GgufFile::open(path)?;
        let md = gguf.metadata();
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
        if heads == 0 || kv_heads == 0 || hidden % heads != 0 || heads % kv_heads != 0 {
            return Err(BackendError::Unsupported(format!(
                "{}: {heads} heads, {kv_heads} KV heads and width {hidden} do not fit together",
                path.display()
            )));
        }
        let head_dim = md.usize(&key("attention.key_length")).unwrap_or(hidden / heads);
        let trained_context = md.usize(&key("context_length"))?;
        let context_length = options.context_length.map_or(trained_context, |n| n.min(trained_context));
        let eps = md.f32(&key("attention.layer_norm_rms_epsilon"))?;
        let rope_base = md.f32(&key("rope.freq_base")).unwrap_or(10_000.0);
        let rope_dims = md.usize(&key("rope.dimension_count")).unwrap_or(head_dim);

        let device = select_device(device)?;
        let mut file =
            File::open(path).map_err(|source| BackendError::Io { path: path.to_owned(), source })?;
        let mut counts = std::collections::BTreeMap::<String, usize>::new();
        let mut tensor = |name: &str| -> Result<QTensor, BackendError> {
            let t = gguf.content.tensor(&mut file, name, &device).map_err(|e| {
                BackendError::Unsupported(format!("{}: tensor `{name}`: {e}", path.display()))
            })?;
            *counts.entry(format!("{:?}", t.dtype())).or_default() += 1;
            Ok(t)
        };
        let has = |name: &str| gguf.content.tensor_infos.contains_key(name);
        let norm =
            |t: QTensor| -> Result<RmsNorm, BackendError> { RmsNorm::new(t.dequantize(&device)?, eps) };
        let embed = tensor("token_embd.weight")?;
        let vocab_size = embed.shape().dims2()?.0;
        let tied = !has("output.weight");
        // Tied embeddings (SmolLM2, small Qwen2.5) have no `output.weight`: one host table serves both.
        let (embed, tied_output) = match host_matrix(&embed, matmul)? {
            Some(table) if tied => {
                let table = Arc::new(table);
                (Embedding::Host(table.clone()), Some(Weight::Host(table)))
            }
            _ => (Embedding::Candle(embed), None),
        };
        let mut blocks = Vec::with_capacity(layers);
        for i in 0..layers {
            let mut linear = |name: &str, bias: bool| -> Result<Linear, BackendError> {
                let weight = Weight::new(tensor(&format!("blk.{i}.{name}.weight"))?, matmul)?;
                let bias_name = format!("blk.{i}.{name}.bias");
                let bias = if bias && has(&bias_name) {
                    let b = tensor(&bias_name)?.dequantize(&device)?;
                    let host = b.to_device(&Device::Cpu)?.to_vec1::<f32>()?;
                    Some((b, host))
                } else {
                    None
                };
                Ok(Linear { weight, bias })
            };
            let qkv_bias = arch == DecoderArch::Qwen2;
            let q = linear("attn_q", qkv_bias)?;
            let k = linear("attn_k", qkv_bias)?;
            let v = linear("attn_v", qkv_bias)?;
            let o = linear("attn_output", false)?;
            let gate = linear("ffn_gate", false)?;
            let up = linear("ffn_up", false)?;
            let down = linear("ffn_down", false)?;
            blocks.push(Layer {
                attn_norm: norm(tensor(&format!("blk.{i}.attn_norm.weight"))?)?,
                q,
                k,
                v,
                o,
                ffn_norm: norm(tensor(&format!("blk.{i}.ffn_norm.weight"))?)?,
                gate,
                up,
                down,
            });
        }
        let final_norm = norm(tensor("output_norm.weight")?)?;
        let output = match tied_output {
            Some(output) => output,
            None if tied => Weight::new(tensor("token_embd.weight")?, matmul)?,
            None => Weight::new(tensor("output.weight")?, matmul)?,
        };
        let freq_factors = if has("rope_freqs.weight") {
            Some(tensor("rope_freqs.weight")?.dequantize(&Device::Cpu)?.to_vec1::<f32>()?)
        } else {
            None
        };
        let rope = Rope::new(arch.rope(), rope_dims, rope_base, context_length, freq_factors.as_deref());
        let shape = AttentionShape { layers, heads, kv_heads, head_dim };
        let kv = match kv {
            KvImplementation::Auto => KvCaches::for_device(shape, &device, options.kv_precision),
            KvImplementation::CandleOps => {
                KvCaches::Tensor(crate::attention::TensorKv::new(shape, device.clone()))
            }
        };
        let info = DecoderInfo { vocab_size, context_length, kv_bytes_per_token: kv.bytes_per_token() };
        let tensor_types = counts.iter().map(|(t, n)| format!("{t} ×{n}")).collect::<Vec<_>>().join(", ");
        let loaded = LoadedDecoder {
            arch,
            layers,
            hidden,
            heads,
            kv_heads,
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
        let model =
            Self { embed, layers: blocks, norm: final_norm, output, rope, kv, shape, info, device, pool };
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
        if matches!(self.kv, KvCaches::Host(_)) {
            self.forward_host(&ids, &rows, &last)
        } else {
            self.forward_tensors(&ids, &rows, &last)
        }
    }

    /// The forward pass in candle ops (every device).
    fn forward_tensors(
        &mut self,
        ids: &[u32],
        rows: &[ChunkRows],
        last: &[usize],
    ) -> Result<Vec<Vec<f32>>, BackendError> {
        let mut x = self.embed.forward(ids, &self.device)?;
        for (l, layer) in self.layers.iter().enumerate() {
            let h = layer.attn_norm.forward(&x)?;
            let (q, k, v) = (layer.q.forward(&h)?, layer.k.forward(&h)?, layer.v.forward(&h)?);
            let attended = self.kv.attend(l, &self.rope, &q, &k, &v, rows)?;
            x = (x + layer.o.forward(&attended)?)?;
            let h = layer.ffn_norm.forward(&x)?;
            let gated = (candle_nn::ops::silu(&layer.gate.forward(&h)?)? * layer.up.forward(&h)?)?;
            x = (x + layer.down.forward(&gated)?)?;
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
        let Self { embed, layers, norm, output, rope, kv, .. } = self;
        let KvCaches::Host(kv) = kv else {
            return Err(BackendError::Unsupported("the host forward pass needs host KV caches".into()));
        };
        let t = ids.len();
        let mut x = embed.forward_host(ids)?;
        let width = embed.width();
        for (l, layer) in layers.iter().enumerate() {
            let h = layer.attn_norm.forward_host(&x);
            let mut q = layer.q.forward_host(&h, t)?;
            let mut k = layer.k.forward_host(&h, t)?;
            let v = layer.v.forward_host(&h, t)?;
            let attended = kv.attend_host(l, rope, &mut q, &mut k, &v, rows)?;
            add_assign(&mut x, &layer.o.forward_host(&attended, t)?);
            let h = layer.ffn_norm.forward_host(&x);
            let mut gate = layer.gate.forward_host(&h, t)?;
            swiglu(&mut gate, &layer.up.forward_host(&h, t)?);
            add_assign(&mut x, &layer.down.forward_host(&gate, t)?);
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

impl DecoderModel for LlamaDecoder {
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
