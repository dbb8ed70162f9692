//! The BERT-family transformer encoder (BERT, RoBERTa, XLM-RoBERTa), written from candle ops so that
//! it is correct in every dtype and its memory is bounded.
//!
//! Why not candle-transformers' models: their BERT builds the attention mask as
//! `(1 - mask) * f32::MIN` in the model dtype, which is `0 * -inf = NaN` in f16/bf16 (every GPU
//! default), and both compute all `heads × L × L` attention scores at once, so an 8,192-token input
//! asks for gigabytes. Here:
//! - the key mask is an additive f32 bias built on the host (0 or a large finite negative; nothing is
//!   multiplied by it), and scores are soft-maxed in f32 whatever the model dtype;
//! - attention runs over blocks of query rows sized so one block's scores stay under
//!   [`ATTENTION_BLOCK_BYTES`], which makes activation memory linear in the batch's tokens;
//! - [`BertEncoder::activation_bytes`] estimates a batch's peak activation memory from the same
//!   shapes, so the scheduler can budget batches by memory rather than by padded tokens alone.
//!
//! candle's CPU matmul has no bf16 kernel; on the CPU, bf16 products are computed in f32 and rounded
//! back to bf16, which is what GPU tensor cores do (bf16 inputs, f32 accumulation).

use candle_core::{DType, Device, IndexOp, Module, Tensor};
use candle_nn::{Activation, Embedding, LayerNorm, VarBuilder};
use serde::Deserialize;

use crate::int8::Int8Matrix;
use crate::model_dir::Architecture;

/// Added to the attention scores of padded keys. Finite, so no product or sum with it is NaN, and
/// far enough below any real score that `exp` of it is exactly 0 in f32.
const MASKED_SCORE: f32 = -1.0e9;

/// Upper bound on the bytes of one block of f32 attention scores (`n × heads × rows × L × 4`).
pub const ATTENTION_BLOCK_BYTES: usize = 64 << 20;

/// The fields of `config.json` this encoder reads.
#[derive(Clone, Debug, Deserialize)]
pub struct EncoderConfig {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_activation")]
    pub hidden_act: Activation,
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab_size")]
    pub type_vocab_size: usize,
    pub vocab_size: usize,
    #[serde(default = "default_position_embedding_type")]
    pub position_embedding_type: String,
}

fn default_activation() -> Activation {
    Activation::Gelu
}

fn default_layer_norm_eps() -> f64 {
    1e-12
}

fn default_type_vocab_size() -> usize {
    2
}

fn default_position_embedding_type() -> String {
    "absolute".into()
}

/// How position ids are assigned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Positions {
    /// BERT: 0, 1, 2, … for every row.
    FromZero,
    /// RoBERTa / XLM-R: real tokens count up from `pad + 1`; tokens equal to `pad` get `pad`.
    AfterPadding { pad: u32 },
}

/// A right-padded batch on the host, ready to become tensors.
#[derive(Clone, Debug)]
pub struct PaddedBatch {
    pub n: usize,
    pub longest: usize,
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
    /// Real tokens per row.
    pub lengths: Vec<usize>,
}

impl PaddedBatch {
    pub fn new<'a>(rows: impl IntoIterator<Item = (&'a [u32], &'a [u32])>, pad_id: u32) -> Self {
        let rows: Vec<_> = rows.into_iter().collect();
        let longest = rows.iter().map(|(ids, _)| ids.len()).max().unwrap_or(0);
        let n = rows.len();
        let mut ids = Vec::with_capacity(n * longest);
        let mut type_ids = Vec::with_capacity(n * longest);
        for (row_ids, row_types) in &rows {
            let pad = longest - row_ids.len();
            ids.extend_from_slice(row_ids);
            ids.extend(std::iter::repeat_n(pad_id, pad));
            type_ids.extend_from_slice(row_types);
            type_ids.extend(std::iter::repeat_n(0, pad));
        }
        let lengths = rows.iter().map(|(ids, _)| ids.len()).collect();
        Self { n, longest, ids, type_ids, lengths }
    }

    /// 1.0 for real tokens, 0.0 for padding, `[n, longest]`.
    pub fn mask(&self) -> Vec<f32> {
        let mut mask = Vec::with_capacity(self.n * self.longest);
        for &len in &self.lengths {
            mask.extend(std::iter::repeat_n(1.0f32, len));
            mask.extend(std::iter::repeat_n(0.0f32, self.longest - len));
        }
        mask
    }
}

/// `y = x Wᵀ + b` over the last dimension.
pub(crate) struct Dense {
    /// `[in, out]` (a transposed view of the checkpoint's `[out, in]`).
    weight_t: Tensor,
    bias: Tensor,
    out_dim: usize,
    /// The weights in int8 per output row with the bias on the host, when the encoder runs its
    /// products on [`crate::int8`] ([`BertEncoder::with_int8_products`]).
    int8: Option<(Int8Matrix, Vec<f32>)>,
}

impl Dense {
    pub(crate) fn load(vb: VarBuilder, in_dim: usize, out_dim: usize) -> candle_core::Result<Self> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = vb.get(out_dim, "bias")?;
        Self::from_parts(weight, bias)
    }

    fn from_parts(weight: Tensor, bias: Tensor) -> candle_core::Result<Self> {
        let out_dim = weight.dim(0)?;
        Ok(Self { weight_t: weight.t()?, bias, out_dim, int8: None })
    }

    /// Quantizes the weights for [`crate::int8`]; an error where the CPU lacks AVX-512 VNNI.
    fn quantize_int8(&mut self) -> candle_core::Result<()> {
        let weight = self.weight_t.t()?.to_dtype(DType::F32)?;
        let (n, k) = weight.dims2()?;
        let values = weight.flatten_all()?.to_vec1::<f32>()?;
        let matrix = Int8Matrix::from_f32(&values, n, k)
            .map_err(candle_core::Error::wrap)?
            .ok_or_else(|| candle_core::Error::Msg("int8 products need AVX-512 VNNI".into()))?;
        self.int8 = Some((matrix, self.bias.to_dtype(DType::F32)?.to_vec1::<f32>()?));
        Ok(())
    }

    pub(crate) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut dims = x.dims().to_vec();
        let in_dim = dims.last().copied().unwrap_or(1).max(1);
        let flat = x.reshape((x.elem_count() / in_dim, in_dim))?;
        let y = match &self.int8 {
            Some((matrix, bias)) => {
                let rows = flat.dim(0)?;
                let mut y = matrix.matmul(&flat.flatten_all()?.to_vec1::<f32>()?, rows);
                y.chunks_exact_mut(self.out_dim)
                    .for_each(|row| row.iter_mut().zip(bias).for_each(|(v, b)| *v += b));
                Tensor::from_vec(y, (rows, self.out_dim), x.device())?
            }
            None => matmul(&flat, &self.weight_t)?.broadcast_add(&self.bias)?,
        };
        if let Some(last) = dims.last_mut() {
            *last = self.out_dim;
        }
        y.reshape(dims)
    }
}

/// A matmul that also works for bf16 on the CPU (see the module docs).
fn matmul(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    if a.dtype() == DType::BF16 && a.device().is_cpu() {
        return a.to_dtype(DType::F32)?.matmul(&b.to_dtype(DType::F32)?)?.to_dtype(DType::BF16);
    }
    a.matmul(b)
}

struct Embeddings {
    word: Embedding,
    position: Embedding,
    token_type: Embedding,
    norm: LayerNorm,
}

struct Layer {
    /// Query, key and value projections fused into one `[3H, H]` matmul; the query part is
    /// pre-scaled by `1/√head_dim`.
    qkv: Dense,
    attention_out: Dense,
    attention_norm: LayerNorm,
    intermediate: Dense,
    output: Dense,
    output_norm: LayerNorm,
}

/// A loaded BERT-family encoder: token ids in, last hidden states out.
pub struct BertEncoder {
    embeddings: Embeddings,
    layers: Vec<Layer>,
    activation: Activation,
    heads: usize,
    head_dim: usize,
    hidden: usize,
    intermediate: usize,
    positions: Positions,
    /// Bytes of f32 scores one attention block may hold ([`ATTENTION_BLOCK_BYTES`]).
    attention_block_bytes: usize,
    dtype: DType,
    device: Device,
}

impl BertEncoder {
    /// `vb` points at the encoder's root (the tensors named `embeddings.*` and `encoder.layer.*`).
    pub fn load(
        vb: VarBuilder,
        config: &EncoderConfig,
        architecture: Architecture,
        pad_token_id: u32,
    ) -> candle_core::Result<Self> {
        if config.position_embedding_type != "absolute" {
            candle_core::bail!(
                "position_embedding_type `{}` is not supported (only `absolute`)",
                config.position_embedding_type
            );
        }
        let hidden = config.hidden_size;
        let heads = config.num_attention_heads;
        if heads == 0 || !hidden.is_multiple_of(heads) {
            candle_core::bail!("hidden_size {hidden} is not divisible by num_attention_heads {heads}");
        }
        let head_dim = hidden / heads;
        let layer_norm = |vb: VarBuilder| candle_nn::layer_norm(hidden, config.layer_norm_eps, vb);
        let e = vb.pp("embeddings");
        let embeddings = Embeddings {
            word: candle_nn::embedding(config.vocab_size, hidden, e.pp("word_embeddings"))?,
            position: candle_nn::embedding(
                config.max_position_embeddings,
                hidden,
                e.pp("position_embeddings"),
            )?,
            token_type: candle_nn::embedding(config.type_vocab_size, hidden, e.pp("token_type_embeddings"))?,
            norm: layer_norm(e.pp("LayerNorm"))?,
        };
        let scale = 1.0 / (head_dim as f64).sqrt();
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let l = vb.pp(format!("encoder.layer.{i}"));
                let a = l.pp("attention");
                let part = |name: &str| -> candle_core::Result<(Tensor, Tensor)> {
                    let p = a.pp("self").pp(name);
                    Ok((p.get((hidden, hidden), "weight")?, p.get(hidden, "bias")?))
                };
                let (qw, qb) = part("query")?;
                let (kw, kb) = part("key")?;
                let (vw, vb_) = part("value")?;
                let qkv = Dense::from_parts(
                    Tensor::cat(&[(qw * scale)?, kw, vw], 0)?,
                    Tensor::cat(&[(qb * scale)?, kb, vb_], 0)?,
                )?;
                Ok(Layer {
                    qkv,
                    attention_out: Dense::load(a.pp("output.dense"), hidden, hidden)?,
                    attention_norm: layer_norm(a.pp("output.LayerNorm"))?,
                    intermediate: Dense::load(l.pp("intermediate.dense"), hidden, config.intermediate_size)?,
                    output: Dense::load(l.pp("output.dense"), config.intermediate_size, hidden)?,
                    output_norm: layer_norm(l.pp("output.LayerNorm"))?,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let positions = match architecture {
            Architecture::Bert => Positions::FromZero,
            Architecture::XlmRoberta => Positions::AfterPadding { pad: pad_token_id },
        };
        Ok(Self {
            embeddings,
            layers,
            activation: config.hidden_act,
            heads,
            head_dim,
            hidden,
            intermediate: config.intermediate_size,
            positions,
            attention_block_bytes: ATTENTION_BLOCK_BYTES,
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    /// Runs the layers' products on [`crate::int8`] (int8 weights per output row, activations per
    /// 128-input block, AVX-512 VNNI), the rest in f32: Whisper's int8 encoder arithmetic applied to
    /// BERT. Measured against f32 and ONNX Runtime's int8 in `benches/encoder_routes.rs`; not a
    /// served option (ONNX Runtime's int8 export is the faster CPU route there). An f32 encoder on
    /// the CPU only; an error where the CPU lacks AVX-512 VNNI.
    pub fn with_int8_products(mut self) -> candle_core::Result<Self> {
        if !self.device.is_cpu() || self.dtype != DType::F32 {
            candle_core::bail!("int8 products run f32 encoders on the CPU");
        }
        for layer in &mut self.layers {
            for dense in
                [&mut layer.qkv, &mut layer.attention_out, &mut layer.intermediate, &mut layer.output]
            {
                dense.quantize_int8()?;
            }
        }
        Ok(self)
    }

    /// Smaller attention blocks than [`ATTENTION_BLOCK_BYTES`]: lets tests run the blockwise path
    /// on small inputs.
    pub fn with_attention_block_bytes(mut self, bytes: usize) -> Self {
        self.attention_block_bytes = bytes;
        self
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Last hidden states `[n, longest, hidden]` in the model dtype.
    pub fn forward(&self, batch: &PaddedBatch) -> candle_core::Result<Tensor> {
        let (n, longest) = (batch.n, batch.longest);
        let ids = Tensor::from_slice(&batch.ids, (n, longest), &self.device)?;
        let type_ids = Tensor::from_slice(&batch.type_ids, (n, longest), &self.device)?;
        let position_ids = Tensor::from_vec(self.position_ids(batch), (n, longest), &self.device)?;
        let bias: Vec<f32> =
            batch.mask().into_iter().map(|m| if m > 0.0 { 0.0 } else { MASKED_SCORE }).collect();
        let key_bias = Tensor::from_vec(bias, (n, 1, 1, longest), &self.device)?;

        let e = &self.embeddings;
        let x = e.word.forward(&ids)?;
        let x = (x + e.position.forward(&position_ids)?)?;
        let x = (x + e.token_type.forward(&type_ids)?)?;
        let mut x = e.norm.forward(&x)?;
        for layer in &self.layers {
            x = self.layer(layer, &x, &key_bias)?;
        }
        Ok(x)
    }

    fn position_ids(&self, batch: &PaddedBatch) -> Vec<u32> {
        match self.positions {
            Positions::FromZero => (0..batch.n).flat_map(|_| 0..batch.longest as u32).collect(),
            // As Hugging Face does: count the tokens that are not the padding id.
            Positions::AfterPadding { pad } => batch
                .ids
                .chunks(batch.longest.max(1))
                .flat_map(|row| {
                    let mut count = 0;
                    row.iter().map(move |&id| {
                        if id == pad {
                            pad
                        } else {
                            count += 1;
                            pad + count
                        }
                    })
                })
                .collect(),
        }
    }

    fn layer(&self, layer: &Layer, x: &Tensor, key_bias: &Tensor) -> candle_core::Result<Tensor> {
        let context = self.attention(layer, x, key_bias)?;
        let attended = layer.attention_norm.forward(&(layer.attention_out.forward(&context)? + x)?)?;
        drop(context);
        let inner = self.activation.forward(&layer.intermediate.forward(&attended)?)?;
        let out = layer.output.forward(&inner)?;
        drop(inner);
        layer.output_norm.forward(&(out + &attended)?)
    }

    /// Multi-head self-attention over blocks of query rows; returns the context `[n, L, hidden]`.
    fn attention(&self, layer: &Layer, x: &Tensor, key_bias: &Tensor) -> candle_core::Result<Tensor> {
        let (n, longest, _) = x.dims3()?;
        let (q, k, v) = {
            let qkv = layer.qkv.forward(x)?.reshape((n, longest, 3, self.heads, self.head_dim))?;
            let part = |i: usize| qkv.i((.., .., i))?.transpose(1, 2)?.contiguous();
            (part(0)?, part(1)?, part(2)?)
        };
        let k_t = k.t()?;
        let rows = attention_block_rows(self.attention_block_bytes, n, self.heads, longest);
        let mut blocks = Vec::with_capacity(longest.div_ceil(rows));
        for start in (0..longest).step_by(rows) {
            let q_block = q.narrow(2, start, rows.min(longest - start))?;
            let scores = matmul(&q_block, &k_t)?.to_dtype(DType::F32)?.broadcast_add(key_bias)?;
            let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(self.dtype)?;
            drop(scores);
            blocks.push(matmul(&probs, &v)?);
        }
        let context = match blocks.len() {
            1 => blocks.remove(0),
            _ => Tensor::cat(&blocks, 2)?,
        };
        context.transpose(1, 2)?.contiguous()?.reshape((n, longest, self.hidden))
    }

    /// Estimated peak bytes of activations for a padded batch of `n` sequences of `longest` tokens,
    /// following the shapes [`forward`](Self::forward) allocates (weights not included).
    pub fn activation_bytes(&self, n: usize, longest: usize) -> usize {
        let shape = Shape { hidden: self.hidden, intermediate: self.intermediate, heads: self.heads };
        activation_bytes(shape, self.dtype.size_in_bytes(), self.attention_block_bytes, n, longest)
    }
}

/// The sizes the memory estimate depends on.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: usize,
}

/// Query rows per attention block so that one block of f32 scores fits `block_bytes` (at least one
/// row, at most all of them).
pub fn attention_block_rows(block_bytes: usize, n: usize, heads: usize, longest: usize) -> usize {
    let per_row = (n * heads * longest * 4).max(1);
    (block_bytes / per_row).clamp(1, longest.max(1))
}

/// See [`BertEncoder::activation_bytes`]. Live at the peak of a layer: its input, the fused QKV
/// output and the three per-head copies, the context blocks and their concatenation, or in the
/// feed-forward part two `intermediate`-wide tensors and three `hidden`-wide ones; and within one
/// attention block, the scores and their softmax in f32 (for f16/bf16 models, also the scores in the
/// model dtype, their f32 copy and the probabilities cast back).
pub fn activation_bytes(
    shape: Shape,
    dtype_bytes: usize,
    block_bytes: usize,
    n: usize,
    longest: usize,
) -> usize {
    let tokens = n * longest;
    let attention_side = 9 * shape.hidden;
    let feed_forward_side = 2 * shape.intermediate + 4 * shape.hidden;
    let per_token = attention_side.max(feed_forward_side);
    let rows = attention_block_rows(block_bytes, n, shape.heads, longest);
    let block = n * shape.heads * rows * longest;
    let block_copies = if dtype_bytes == 4 { 2 * 4 } else { 3 * 4 + 2 * dtype_bytes };
    tokens * per_token * dtype_bytes + block * block_copies
}

/// Mean of the real tokens' states, in f32: `[n, hidden]`.
pub fn mean_pool(states: &Tensor, batch: &PaddedBatch) -> candle_core::Result<Tensor> {
    let states = states.to_dtype(DType::F32)?;
    let mask = Tensor::from_vec(batch.mask(), (batch.n, batch.longest, 1), states.device())?;
    let summed = states.broadcast_mul(&mask)?.sum(1)?;
    let counts = mask.sum(1)?.clamp(1.0, f64::INFINITY)?;
    summed.broadcast_div(&counts)
}

/// The state of row `b`'s token at `index[b]`, in f32: `[n, hidden]`.
pub fn select_tokens(states: &Tensor, index: &[usize]) -> candle_core::Result<Tensor> {
    let (n, longest, hidden) = states.dims3()?;
    let rows: Vec<u32> = index.iter().enumerate().map(|(b, &i)| (b * longest + i) as u32).collect();
    let rows = Tensor::from_vec(rows, n, states.device())?;
    states.reshape((n * longest, hidden))?.index_select(&rows, 0)?.to_dtype(DType::F32)
}

/// The first token's states `[n, hidden]` in the model dtype.
pub fn first_token(states: &Tensor) -> candle_core::Result<Tensor> {
    states.i((.., 0))?.contiguous()
}
