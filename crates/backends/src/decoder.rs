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

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use hearth_engine::generate::model::{Chunk, DecoderInfo, DecoderModel, SeqId};
use hearth_engine::BoxError;

use crate::attention::{AttentionShape, ChunkRows, KvCaches, Rope, RopeStyle};
use crate::device::{default_activation_budget, resolved_device, select_device};
use crate::error::BackendError;
use crate::q4_1::Q4_1Matrix;

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
    bias: Option<Tensor>,
}

/// A weight matrix and the kernel that multiplies by it.
enum Weight {
    /// candle's kernels (every type, every device).
    Candle(QMatMul),
    /// Hearth's CPU kernel for Q4_1 ([`crate::q4_1`]).
    Q4_1(Q4_1Matrix),
}

impl Weight {
    fn new(tensor: QTensor, matmul: MatmulImplementation) -> Result<Self, BackendError> {
        if matmul == MatmulImplementation::Auto
            && tensor.dtype() == GgmlDType::Q4_1
            && tensor.device().is_cpu()
        {
            let (n, k) = tensor.shape().dims2()?;
            return Ok(Self::Q4_1(Q4_1Matrix::from_ggml(&tensor.data()?, n, k, true)?));
        }
        Ok(Self::Candle(QMatMul::from_qtensor(tensor)?))
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Candle(weight) => weight.forward(x),
            Self::Q4_1(weight) => {
                let (m, _) = x.dims2()?;
                let y = weight.matmul(&x.flatten_all()?.to_vec1::<f32>()?, m);
                Tensor::from_vec(y, (m, weight.rows()), x.device())
            }
        }
    }
}

impl Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = self.weight.forward(x)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        candle_nn::ops::rms_norm(x, &self.weight, self.eps)
    }
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
    embed: QTensor,
    layers: Vec<Layer>,
    norm: RmsNorm,
    output: Weight,
    rope: Rope,
    kv: KvCaches,
    shape: AttentionShape,
    info: DecoderInfo,
    device: Device,
}

/// How to load a decoder.
#[derive(Clone, Copy, Debug, Default)]
pub struct DecoderOptions {
    pub device: hearth_engine::Device,
    /// Fewer positions than the model's context (less KV memory per sequence).
    pub context_length: Option<usize>,
    pub kv: KvImplementation,
    pub matmul: MatmulImplementation,
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
        let norm = |t: QTensor| -> Result<RmsNorm, BackendError> {
            Ok(RmsNorm { weight: t.dequantize(&device)?, eps })
        };
        let embed = tensor("token_embd.weight")?;
        let vocab_size = embed.shape().dims2()?.0;
        let mut blocks = Vec::with_capacity(layers);
        for i in 0..layers {
            let mut linear = |name: &str, bias: bool| -> Result<Linear, BackendError> {
                let weight = Weight::new(tensor(&format!("blk.{i}.{name}.weight"))?, matmul)?;
                let bias_name = format!("blk.{i}.{name}.bias");
                let bias = if bias && has(&bias_name) {
                    Some(tensor(&bias_name)?.dequantize(&device)?)
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
        // Tied embeddings (SmolLM2, small Qwen2.5) have no `output.weight`.
        let output = if has("output.weight") {
            Weight::new(tensor("output.weight")?, matmul)?
        } else {
            Weight::new(tensor("token_embd.weight")?, matmul)?
        };
        let freq_factors = if has("rope_freqs.weight") {
            Some(tensor("rope_freqs.weight")?.dequantize(&Device::Cpu)?.to_vec1::<f32>()?)
        } else {
            None
        };
        let rope = Rope::new(arch.rope(), rope_dims, rope_base, context_length, freq_factors.as_deref());
        let shape = AttentionShape { layers, heads, kv_heads, head_dim };
        let kv = match kv {
            KvImplementation::Auto => KvCaches::for_device(shape, &device),
            KvImplementation::CandleOps => {
                KvCaches::Tensor(crate::attention::TensorKv::new(shape, device.clone()))
            }
        };
        let info = DecoderInfo { vocab_size, context_length, kv_bytes_per_token: shape.kv_bytes_per_token() };
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
        let model = Self { embed, layers: blocks, norm: final_norm, output, rope, kv, shape, info, device };
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
        let ids = Tensor::from_vec(ids, rows.iter().map(|c| c.len).sum::<usize>(), &self.device)?;
        let mut x = self.embed.embedding(&ids)?;
        for (l, layer) in self.layers.iter().enumerate() {
            let h = layer.attn_norm.forward(&x)?;
            let (q, k, v) = (layer.q.forward(&h)?, layer.k.forward(&h)?, layer.v.forward(&h)?);
            let attended = self.kv.attend(l, &self.rope, &q, &k, &v, &rows)?;
            x = (x + layer.o.forward(&attended)?)?;
            let h = layer.ffn_norm.forward(&x)?;
            let gated = (candle_nn::ops::silu(&layer.gate.forward(&h)?)? * layer.up.forward(&h)?)?;
            x = (x + layer.down.forward(&gated)?)?;
        }
        // Logits only for the last token of chunks that ask for them.
        let mut last = Vec::new();
        let mut end = 0u32;
        for chunk in chunks {
            end += chunk.tokens.len() as u32;
            if chunk.logits {
                last.push(end - 1);
            }
        }
        if last.is_empty() {
            return Ok(Vec::new());
        }
        let n = last.len();
        let index = Tensor::from_vec(last, n, &self.device)?;
        let x = self.norm.forward(&x.index_select(&index, 0)?)?;
        Ok(self.output.forward(&x)?.to_vec2::<f32>()?)
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
        Ok(self.forward(chunks)?)
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
