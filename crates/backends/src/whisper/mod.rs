//! Whisper's encoder and decoder in candle, with a self-attention KV cache (each decoded token
//! costs one position, not the whole prefix) and the audio's cross-attention keys and values
//! computed once per window. Weights come from a CTranslate2 folder (faster-whisper's format,
//! [`ct2`]); the decoding rules (timestamps, fallback, language detection) live in the engine,
//! which drives this through [`SpeechModel`].

#[cfg(feature = "whisper-cpp")]
pub mod cpp;
pub mod ct2;
pub mod hf;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{LayerNorm, Linear};
use hearth_engine::transcribe::{SpeechModel, WhisperConfig, WhisperVocab};

use crate::device::{resolved_device, select_device, select_dtype};
use crate::int8::Int8Matrix;
use crate::quant::QuantMatrix;
use crate::{BackendError, ModelsRoot};
use ct2::Ct2Model;

/// Whisper's tensors by CTranslate2's variable names (`encoder/layer_0/self_attention/linear_0/weight`,
/// the fused query/key/value), whatever the file holds them: [`ct2`] or [`hf`].
pub trait WeightSource {
    fn contains(&self, name: &str) -> bool;
    /// A float tensor in `dtype` on `device`.
    fn tensor(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor, BackendError>;
    /// Attention heads of `encoder` or `decoder`.
    fn heads(&self, side: &str) -> Result<usize, BackendError>;
    /// The file, for messages.
    fn describe(&self) -> String;
}

impl WeightSource for Ct2Model {
    fn contains(&self, name: &str) -> bool {
        Ct2Model::contains(self, name)
    }

    fn tensor(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor, BackendError> {
        Ct2Model::tensor(self, name, dtype, device)
    }

    fn heads(&self, side: &str) -> Result<usize, BackendError> {
        let heads = self.scalar(&format!("{side}/num_heads"))?;
        usize::try_from(heads).map_err(|_| BackendError::Unsupported(format!("{side}/num_heads is {heads}")))
    }

    fn describe(&self) -> String {
        "the CTranslate2 model".into()
    }
}

/// Frames of log-mel in one 30 s window, and encoder positions after the stride-2 convolution.
pub const WINDOW_FRAMES: usize = 3000;

/// Whisper's sizes, read from the weights themselves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WhisperDims {
    pub n_mels: usize,
    pub n_audio_ctx: usize,
    pub n_state: usize,
    pub n_audio_head: usize,
    pub n_audio_layer: usize,
    pub n_text_ctx: usize,
    pub n_text_head: usize,
    pub n_text_layer: usize,
    pub n_vocab: usize,
}

/// A projection's weights: candle's `Linear`, or Q8_0 blocks (the decoder on the CPU, whose
/// one-row steps are bound by reading the weights: Q8_0 reads a quarter of f32's bytes).
enum Proj {
    Float(Linear),
    Q8 {
        weight: QuantMatrix,
        bias: Option<Vec<f32>>,
    },
    /// Int8 per row for the encoder's 1500-row products (AVX-512 VNNI; [`crate::int8`]).
    Int8 {
        weight: Int8Matrix,
        bias: Option<Vec<f32>>,
    },
}

impl From<Linear> for Proj {
    fn from(linear: Linear) -> Self {
        Proj::Float(linear)
    }
}

impl Proj {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Proj::Float(linear) => project(linear, x),
            Proj::Q8 { weight, bias } => {
                host_product(x, weight.rows(), bias.as_deref(), |v, m| weight.matmul(v, m))
            }
            Proj::Int8 { weight, bias } => {
                host_product(x, weight.rows(), bias.as_deref(), |v, m| weight.matmul(v, m))
            }
        }
    }

    /// Replaces `self` in place by `convert(self)`.
    fn convert(&mut self, convert: fn(Proj) -> Result<Proj, BackendError>) -> Result<(), BackendError> {
        let taken = std::mem::replace(self, Proj::Q8 { weight: QuantMatrix::empty(), bias: None });
        *self = convert(taken)?;
        Ok(())
    }

    /// Float weights and bias as host f32 values.
    fn host_weights(linear: &Linear) -> Result<HostLinear, BackendError> {
        let (n, k) = linear.weight().dims2()?;
        let weights = linear.weight().to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let bias = match linear.bias() {
            Some(b) => Some(b.to_dtype(DType::F32)?.to_vec1::<f32>()?),
            None => None,
        };
        Ok((weights, n, k, bias))
    }

    /// The same projection with int8 weights, where the CPU has VNNI (else unchanged).
    fn int8(self) -> Result<Self, BackendError> {
        let Proj::Float(linear) = &self else { return Ok(self) };
        let (weights, n, k, bias) = Self::host_weights(linear)?;
        Ok(match Int8Matrix::from_f32(&weights, n, k)? {
            Some(weight) => Proj::Int8 { weight, bias },
            None => self,
        })
    }

    /// The same projection with Q8_0 weights (the bias stays f32).
    fn quantized(self) -> Result<Self, BackendError> {
        let Proj::Float(linear) = self else { return Ok(self) };
        let (weights, n, k, bias) = Self::host_weights(&linear)?;
        Ok(Proj::Q8 { weight: QuantMatrix::q8_0_from_f32(&weights, n, k, true)?, bias })
    }
}

/// `x · Wᵀ + b` through a host kernel `product(x values, rows) -> rows × n values`.
fn host_product(
    x: &Tensor,
    n: usize,
    bias: Option<&[f32]>,
    product: impl FnOnce(&[f32], usize) -> Vec<f32>,
) -> candle_core::Result<Tensor> {
    let (rows, _) = x.dims2()?;
    let input = x.to_dtype(DType::F32)?.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    let mut y = product(&input, rows);
    if let Some(bias) = bias {
        for row in y.chunks_exact_mut(n) {
            row.iter_mut().zip(bias).for_each(|(v, b)| *v += b);
        }
    }
    Tensor::from_vec(y, (rows, n), x.device())?.to_dtype(x.dtype())
}

/// A projection's weights `[n, k]` row-major on the host, `n`, `k`, and its bias.
type HostLinear = (Vec<f32>, usize, usize, Option<Vec<f32>>);

/// The token embedding, which is also the output projection (tied).
enum TokenEmbedding {
    Float(Tensor),
    /// Row-major `[n_vocab, d]` in f16 (the decoder with Q8_0 layers: the logits are where
    /// Q8_0's rounding changed transcripts of marginal audio, f16's does not).
    F16 {
        rows: Vec<half::f16>,
        d: usize,
    },
}

impl TokenEmbedding {
    /// Rows of `tokens`, `[t, d]`.
    fn lookup(&self, tokens: &[u32], device: &Device, dtype: DType) -> candle_core::Result<Tensor> {
        match self {
            TokenEmbedding::Float(table) => table.index_select(&Tensor::new(tokens, device)?, 0),
            TokenEmbedding::F16 { rows, d } => {
                let mut out = Vec::with_capacity(tokens.len() * d);
                for &token in tokens {
                    let row = rows.get(token as usize * d..(token as usize + 1) * d);
                    let row = row.ok_or_else(|| {
                        candle_core::Error::Msg(format!("token {token} is outside the vocabulary"))
                    })?;
                    out.extend(row.iter().map(|v| v.to_f32()));
                }
                Tensor::from_vec(out, (tokens.len(), *d), device)?.to_dtype(dtype)
            }
        }
    }

    /// Logits of one row `[1, d]`.
    fn logits(&self, last: &Tensor) -> candle_core::Result<Vec<f32>> {
        let logits = match self {
            TokenEmbedding::Float(table) => match crate::cpu_ops::linear_rows(last, table, None)? {
                Some(logits) => logits,
                None => last.matmul(&table.t()?)?,
            },
            TokenEmbedding::F16 { rows, .. } => {
                let input = last.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                return Ok(crate::attention::dot_rows_f16(&input, rows));
            }
        };
        logits.to_dtype(DType::F32)?.flatten_all()?.to_vec1()
    }
}

struct SelfAttention {
    /// Fused query/key/value projection ([3d, d]; CTranslate2 keeps the key's zero bias).
    qkv: Proj,
    out: Proj,
}

struct CrossAttention {
    query: Proj,
    /// Fused key/value projection of the encoder output ([2d, d]), once per window.
    kv: Linear,
    out: Proj,
}

struct Mlp {
    fc1: Proj,
    fc2: Proj,
}

impl Mlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.fc2.forward(&crate::cpu_ops::gelu_erf(&self.fc1.forward(x)?)?)
    }
}

struct EncoderBlock {
    attn_ln: LayerNorm,
    attn: SelfAttention,
    mlp_ln: LayerNorm,
    mlp: Mlp,
}

struct DecoderBlock {
    attn_ln: LayerNorm,
    attn: SelfAttention,
    cross_ln: LayerNorm,
    cross: CrossAttention,
    mlp_ln: LayerNorm,
    mlp: Mlp,
}

/// The decoder's per-layer state for the current window.
struct LayerCache {
    /// Cross-attention keys and values of the encoded audio, `[heads, n_audio_ctx, d_head]`.
    audio_k: Tensor,
    audio_v: Tensor,
    /// Self-attention keys and values of the tokens so far, `[heads, n_past, d_head]`.
    self_kv: Option<(Tensor, Tensor)>,
}

pub struct CandleWhisper {
    dims: WhisperDims,
    device: Device,
    dtype: DType,
    conv1: (Tensor, Tensor),
    conv2: (Tensor, Tensor),
    audio_positions: Tensor,
    encoder: Vec<EncoderBlock>,
    encoder_ln: LayerNorm,
    token_embedding: TokenEmbedding,
    text_positions: Tensor,
    decoder: Vec<DecoderBlock>,
    decoder_ln: LayerNorm,
    cache: Vec<LayerCache>,
    n_past: usize,
}

fn split_heads(x: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (t, d) = x.dims2()?;
    x.reshape((t, heads, d / heads))?.transpose(0, 1)?.contiguous()
}

fn merge_heads(x: &Tensor) -> candle_core::Result<Tensor> {
    let (h, t, dh) = x.dims3()?;
    x.transpose(0, 1)?.contiguous()?.reshape((t, h * dh))
}

/// Which (layer, head) cross-attention scores a decoder pass keeps, and where it puts them.
type Capture<'a> = (&'a [(usize, usize)], &'a mut Vec<Vec<f32>>);

/// `x · wᵀ + b`, on the host for a decoder's few rows (no packing of the weights per call).
fn project(linear: &Linear, x: &Tensor) -> candle_core::Result<Tensor> {
    match crate::cpu_ops::linear_rows(x, linear.weight(), linear.bias())? {
        Some(y) => Ok(y),
        None => linear.forward(x),
    }
}

/// Query rows per block of attention scores: a block's f32 scores (`heads × rows × keys`) stay a
/// few MiB (8 heads × 128 rows × 1500 keys: 6 MiB), so the encoder's 1500-row attention neither
/// holds a 72 MiB score matrix nor page-faults a fresh one in per layer.
const ATTENTION_BLOCK_ROWS: usize = 128;

/// softmax(q kᵀ / √d_head + mask) v over `[heads, t, d_head]` tensors, the soft-max in f32, in
/// blocks of [`ATTENTION_BLOCK_ROWS`] query rows.
fn attend(q: &Tensor, k: &Tensor, v: &Tensor, causal_offset: Option<usize>) -> candle_core::Result<Tensor> {
    let d_head = q.dim(D::Minus1)?;
    let scale = 1.0 / (d_head as f64).sqrt();
    if let Some(out) = crate::cpu_ops::attend_rows(q, k, v, scale as f32, causal_offset)? {
        return Ok(out);
    }
    let dtype = q.dtype();
    // Scaling the queries costs t × d, scaling the scores t × s.
    let q = (q * scale)?;
    let k_t = k.t()?;
    let (t, s) = (q.dim(1)?, k.dim(1)?);
    let block = |start: usize, rows: usize| -> candle_core::Result<Tensor> {
        let scores = q.narrow(1, start, rows)?.matmul(&k_t)?.to_dtype(DType::F32)?;
        let scores = match causal_offset {
            Some(offset) if t > 1 => {
                // Query i sits at position offset + i and may see keys 0..=offset + i.
                let mask: Vec<f32> = (start..start + rows)
                    .flat_map(|i| (0..s).map(move |j| if j > offset + i { f32::NEG_INFINITY } else { 0.0 }))
                    .collect();
                scores.broadcast_add(&Tensor::from_vec(mask, (1, rows, s), scores.device())?)?
            }
            _ => scores,
        };
        crate::cpu_ops::softmax_last_dim(&scores)?.to_dtype(dtype)?.matmul(v)
    };
    if t <= ATTENTION_BLOCK_ROWS {
        return block(0, t);
    }
    let blocks = (0..t)
        .step_by(ATTENTION_BLOCK_ROWS)
        .map(|start| block(start, ATTENTION_BLOCK_ROWS.min(t - start)))
        .collect::<candle_core::Result<Vec<_>>>()?;
    Tensor::cat(&blocks, 1)
}

impl SelfAttention {
    /// Attention of `x` (`[t, d]`) over itself plus `past` keys/values; returns the output and
    /// the keys/values including `x`'s.
    fn forward(
        &self,
        x: &Tensor,
        heads: usize,
        past: Option<&(Tensor, Tensor)>,
        causal: bool,
    ) -> candle_core::Result<(Tensor, (Tensor, Tensor))> {
        let d = x.dim(1)?;
        let qkv = self.qkv.forward(x)?;
        let q = split_heads(&qkv.narrow(1, 0, d)?, heads)?;
        let k = split_heads(&qkv.narrow(1, d, d)?, heads)?;
        let v = split_heads(&qkv.narrow(1, 2 * d, d)?, heads)?;
        let (k, v, offset) = match past {
            Some((pk, pv)) => (Tensor::cat(&[pk, &k], 1)?, Tensor::cat(&[pv, &v], 1)?, pk.dim(1)?),
            None => (k, v, 0),
        };
        let out = attend(&q, &k, &v, causal.then_some(offset))?;
        Ok((self.out.forward(&merge_heads(&out)?)?, (k, v)))
    }
}

impl CandleWhisper {
    /// Loads a CTranslate2 Whisper folder (`model.bin` with spec `WhisperSpec`).
    pub fn load_ct2(dir: &Path, device: Device, dtype: DType) -> Result<Self, BackendError> {
        let model = Ct2Model::read(&dir.join("model.bin"))?;
        if model.spec != "WhisperSpec" {
            return Err(BackendError::Unsupported(format!(
                "{}: the CTranslate2 model is a {}, not a WhisperSpec",
                dir.display(),
                model.spec
            )));
        }
        Self::from_weights(&model, device, dtype)
    }

    /// Builds the model from tensors named as CTranslate2 names them (any [`WeightSource`]).
    pub fn from_weights(
        model: &dyn WeightSource,
        device: Device,
        dtype: DType,
    ) -> Result<Self, BackendError> {
        let t = |name: &str| model.tensor(name, dtype, &device);
        let linear = |prefix: &str| -> Result<Linear, BackendError> {
            let bias = if model.contains(&format!("{prefix}/bias")) {
                Some(t(&format!("{prefix}/bias"))?)
            } else {
                None
            };
            Ok(Linear::new(t(&format!("{prefix}/weight"))?, bias))
        };
        let norm = |prefix: &str| -> Result<LayerNorm, BackendError> {
            Ok(LayerNorm::new(t(&format!("{prefix}/gamma"))?, t(&format!("{prefix}/beta"))?, 1e-5))
        };
        let count_layers = |side: &str| {
            (0..).take_while(|i| model.contains(&format!("{side}/layer_{i}/ffn/linear_0/weight"))).count()
        };
        let conv1_w = t("encoder/conv1/weight")?;
        let token_embedding = t("decoder/embeddings/weight")?;
        let audio_positions = t("encoder/position_encodings/encodings")?;
        let text_positions = t("decoder/position_encodings/encodings")?;
        let dims = WhisperDims {
            n_mels: conv1_w.dim(1)?,
            n_audio_ctx: audio_positions.dim(0)?,
            n_state: audio_positions.dim(1)?,
            n_audio_head: model.heads("encoder")?,
            n_audio_layer: count_layers("encoder"),
            n_text_ctx: text_positions.dim(0)?,
            n_text_head: model.heads("decoder")?,
            n_text_layer: count_layers("decoder"),
            n_vocab: token_embedding.dim(0)?,
        };
        if dims.n_audio_ctx * 2 != WINDOW_FRAMES || dims.n_audio_head == 0 || dims.n_text_head == 0 {
            return Err(BackendError::Unsupported(format!(
                "{}: unexpected Whisper sizes {dims:?}",
                model.describe()
            )));
        }
        let mlp = |prefix: &str| -> Result<Mlp, BackendError> {
            Ok(Mlp {
                fc1: linear(&format!("{prefix}/linear_0"))?.into(),
                fc2: linear(&format!("{prefix}/linear_1"))?.into(),
            })
        };
        let encoder = (0..dims.n_audio_layer)
            .map(|i| {
                let p = format!("encoder/layer_{i}");
                Ok(EncoderBlock {
                    attn_ln: norm(&format!("{p}/self_attention/layer_norm"))?,
                    attn: SelfAttention {
                        qkv: linear(&format!("{p}/self_attention/linear_0"))?.into(),
                        out: linear(&format!("{p}/self_attention/linear_1"))?.into(),
                    },
                    mlp_ln: norm(&format!("{p}/ffn/layer_norm"))?,
                    mlp: mlp(&format!("{p}/ffn"))?,
                })
            })
            .collect::<Result<Vec<_>, BackendError>>()?;
        let decoder = (0..dims.n_text_layer)
            .map(|i| {
                let p = format!("decoder/layer_{i}");
                Ok(DecoderBlock {
                    attn_ln: norm(&format!("{p}/self_attention/layer_norm"))?,
                    attn: SelfAttention {
                        qkv: linear(&format!("{p}/self_attention/linear_0"))?.into(),
                        out: linear(&format!("{p}/self_attention/linear_1"))?.into(),
                    },
                    cross_ln: norm(&format!("{p}/attention/layer_norm"))?,
                    cross: CrossAttention {
                        query: linear(&format!("{p}/attention/linear_0"))?.into(),
                        kv: linear(&format!("{p}/attention/linear_1"))?,
                        out: linear(&format!("{p}/attention/linear_2"))?.into(),
                    },
                    mlp_ln: norm(&format!("{p}/ffn/layer_norm"))?,
                    mlp: mlp(&format!("{p}/ffn"))?,
                })
            })
            .collect::<Result<Vec<_>, BackendError>>()?;
        Ok(CandleWhisper {
            dims,
            conv1: (conv1_w, t("encoder/conv1/bias")?),
            conv2: (t("encoder/conv2/weight")?, t("encoder/conv2/bias")?),
            audio_positions,
            encoder,
            encoder_ln: norm("encoder/layer_norm")?,
            token_embedding: TokenEmbedding::Float(token_embedding),
            text_positions,
            decoder,
            decoder_ln: norm("decoder/layer_norm")?,
            cache: Vec::new(),
            n_past: 0,
            device,
            dtype,
        })
    }

    pub fn dims(&self) -> WhisperDims {
        self.dims
    }

    /// Whether the decoder's matrices are Q8_0.
    pub fn decoder_q8(&self) -> bool {
        matches!(self.token_embedding, TokenEmbedding::F16 { .. })
    }

    /// Turns the decoder's layer matrices (self- and cross-attention query/output projections and
    /// MLP) into Q8_0 and its tied token embedding (the logits) into f16, for the CPU: one decoder
    /// step reads about a third of the bytes. The encoder (1500 rows a window, bound by arithmetic) and the once-a-window
    /// cross-attention keys and values stay float. CPU and f32 only.
    pub fn quantize_decoder(&mut self) -> Result<(), BackendError> {
        if !self.device.is_cpu() || self.dtype != DType::F32 {
            return Err(BackendError::Unsupported("Q8_0 decoder weights are for f32 on the CPU".into()));
        }
        let take = |proj: &mut Proj| proj.convert(Proj::quantized);
        for block in &mut self.decoder {
            take(&mut block.attn.qkv)?;
            take(&mut block.attn.out)?;
            take(&mut block.cross.query)?;
            take(&mut block.cross.out)?;
            take(&mut block.mlp.fc1)?;
            take(&mut block.mlp.fc2)?;
        }
        if let TokenEmbedding::Float(table) = &self.token_embedding {
            let d = table.dim(1)?;
            let rows = table.to_dtype(DType::F16)?.flatten_all()?.to_vec1::<half::f16>()?;
            self.token_embedding = TokenEmbedding::F16 { rows, d };
        }
        Ok(())
    }

    /// Turns the encoder's projections and MLP matrices into int8 (per output row; activations
    /// per 128-input block on the fly: [`crate::int8`]), where the CPU has AVX-512 VNNI;
    /// returns whether it did. The encoder's 1500-row products are bound by arithmetic, where
    /// VNNI's byte products are 4× f32's per instruction. CPU and f32 only.
    pub fn quantize_encoder(&mut self) -> Result<bool, BackendError> {
        if !self.device.is_cpu() || self.dtype != DType::F32 {
            return Err(BackendError::Unsupported("int8 encoder weights are for f32 on the CPU".into()));
        }
        if !crate::int8::available() {
            return Ok(false);
        }
        let take = |proj: &mut Proj| proj.convert(Proj::int8);
        for block in &mut self.encoder {
            take(&mut block.attn.qkv)?;
            take(&mut block.attn.out)?;
            take(&mut block.mlp.fc1)?;
            take(&mut block.mlp.fc2)?;
        }
        Ok(true)
    }

    /// Whether the encoder's matrices are int8.
    pub fn encoder_int8(&self) -> bool {
        self.encoder.first().is_some_and(|b| matches!(b.mlp.fc1, Proj::Int8 { .. }))
    }

    /// The encoder's output for one window of log-mel (`[n_mels × 3000]`), `[1500, d]`.
    pub fn encoder_output(&self, mel: &[f32]) -> candle_core::Result<Tensor> {
        let mel = Tensor::from_slice(mel, (1, self.dims.n_mels, WINDOW_FRAMES), &self.device)?
            .to_dtype(self.dtype)?;
        let x = mel.conv1d(&self.conv1.0, 1, 1, 1, 1)?.broadcast_add(&self.conv1.1.reshape((1, (), 1))?)?;
        let x = crate::cpu_ops::gelu_erf(&x)?;
        let x = x.conv1d(&self.conv2.0, 1, 2, 1, 1)?.broadcast_add(&self.conv2.1.reshape((1, (), 1))?)?;
        let x = crate::cpu_ops::gelu_erf(&x)?;
        let mut x = x.squeeze(0)?.t()?.broadcast_add(&self.audio_positions)?;
        for block in &self.encoder {
            let (attn, _) =
                block.attn.forward(&block.attn_ln.forward(&x)?, self.dims.n_audio_head, None, false)?;
            x = (x + attn)?;
            x = (&x + block.mlp.forward(&block.mlp_ln.forward(&x)?)?)?;
        }
        self.encoder_ln.forward(&x)
    }

    fn set_audio(&mut self, audio: &Tensor) -> candle_core::Result<()> {
        let d = self.dims.n_state;
        self.cache = self
            .decoder
            .iter()
            .map(|block| {
                let kv = block.cross.kv.forward(audio)?;
                Ok(LayerCache {
                    audio_k: split_heads(&kv.narrow(1, 0, d)?, self.dims.n_text_head)?,
                    audio_v: split_heads(&kv.narrow(1, d, d)?, self.dims.n_text_head)?,
                    self_kv: None,
                })
            })
            .collect::<candle_core::Result<_>>()?;
        self.n_past = 0;
        Ok(())
    }

    fn decoder_step(&mut self, tokens: &[u32]) -> candle_core::Result<Vec<f32>> {
        self.decoder_pass(tokens, None)
    }

    /// The decoder over `tokens` after the cached ones; with `capture`, also the cross-attention
    /// scores (before the soft-max) of the listed (layer, head) pairs, each `[t, n_audio_ctx]`,
    /// appended in the list's order.
    fn decoder_pass(
        &mut self,
        tokens: &[u32],
        mut capture: Option<Capture<'_>>,
    ) -> candle_core::Result<Vec<f32>> {
        let t = tokens.len();
        if self.n_past + t > self.dims.n_text_ctx {
            candle_core::bail!(
                "the decoder context holds {} tokens, asked for {}",
                self.dims.n_text_ctx,
                self.n_past + t
            );
        }
        let mut x = self
            .token_embedding
            .lookup(tokens, &self.device, self.dtype)?
            .broadcast_add(&self.text_positions.narrow(0, self.n_past, t)?)?;
        let heads = self.dims.n_text_head;
        let mut captured: Vec<(usize, Vec<f32>)> = Vec::new();
        for (layer, (block, cache)) in self.decoder.iter().zip(self.cache.iter_mut()).enumerate() {
            let (attn, kv) =
                block.attn.forward(&block.attn_ln.forward(&x)?, heads, cache.self_kv.as_ref(), true)?;
            cache.self_kv = Some(kv);
            x = (x + attn)?;
            let q = split_heads(&block.cross.query.forward(&block.cross_ln.forward(&x)?)?, heads)?;
            if let Some((wanted, _)) = &capture {
                let scale = 1.0 / ((self.dims.n_state / heads) as f64).sqrt();
                for (index, &(_, head)) in wanted.iter().enumerate().filter(|(_, (l, _))| *l == layer) {
                    let q_head = q.narrow(0, head, 1)?.squeeze(0)?;
                    let k_head = cache.audio_k.narrow(0, head, 1)?.squeeze(0)?;
                    let scores = (q_head * scale)?.matmul(&k_head.t()?)?.to_dtype(DType::F32)?;
                    captured.push((index, scores.flatten_all()?.to_vec1()?));
                }
            }
            let cross = attend(&q, &cache.audio_k, &cache.audio_v, None)?;
            x = (&x + block.cross.out.forward(&merge_heads(&cross)?)?)?;
            x = (&x + block.mlp.forward(&block.mlp_ln.forward(&x)?)?)?;
        }
        if let Some((_, out)) = capture.as_mut() {
            captured.sort_by_key(|(index, _)| *index);
            out.extend(captured.into_iter().map(|(_, scores)| scores));
        }
        self.n_past += t;
        let last = self.decoder_ln.forward(&x.narrow(0, t - 1, 1)?)?;
        self.token_embedding.logits(&last)
    }
}

/// Whether `name` is a ggml Whisper file's (`ggml*.bin`, as whisper.cpp's files are named).
pub fn is_ggml_file_name(name: &str) -> bool {
    name.starts_with("ggml") && name.ends_with(".bin")
}

/// Whether `dir` holds a ggml Whisper file.
pub fn has_ggml_file(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries.filter_map(Result::ok).any(|e| e.file_name().to_str().is_some_and(is_ggml_file_name))
    })
}

/// A Whisper config file of `dir`, when there is one.
fn read_config(dir: &Path, name: &str) -> Result<Option<WhisperConfig>, BackendError> {
    let path = dir.join(name);
    match std::fs::read(&path) {
        Ok(bytes) => {
            WhisperConfig::from_json(&bytes).map(Some).map_err(|source| BackendError::Json { path, source })
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(BackendError::Io { path, source }),
    }
}

/// The vocabulary of a Whisper folder: `tokenizer.json` and `config.json` (suppress lists,
/// language ids, alignment heads; defaults when there is none), completed from Transformers'
/// `generation_config.json` where that file is there.
pub fn read_vocab(dir: &Path) -> Result<WhisperVocab, BackendError> {
    let mut config = read_config(dir, "config.json")?.unwrap_or_default();
    if let Some(generation) = read_config(dir, "generation_config.json")? {
        config = config.or(generation);
    }
    let tokenizer_path = dir.join("tokenizer.json");
    if !tokenizer_path.is_file() {
        return Err(BackendError::Missing { dir: dir.into(), what: "tokenizer.json".into() });
    }
    let tokenizer = tokenizers::Tokenizer::from_file(&tokenizer_path)
        .map_err(|error| BackendError::Unsupported(format!("{}: {error}", tokenizer_path.display())))?;
    WhisperVocab::new(tokenizer, &config)
        .map_err(|why| BackendError::Unsupported(format!("{}: {why}", tokenizer_path.display())))
}

/// A CTranslate2 Whisper folder as faster-whisper reads it: `model.bin`, `config.json` (suppress
/// lists, language ids, alignment heads) and `tokenizer.json`.
pub fn load_ct2_folder(
    dir: &Path,
    device: Device,
    dtype: DType,
) -> Result<(CandleWhisper, WhisperVocab), BackendError> {
    let vocab = read_vocab(dir)?;
    let model = CandleWhisper::load_ct2(dir, device, dtype)?;
    Ok((model, vocab))
}

impl SpeechModel for CandleWhisper {
    fn n_mels(&self) -> usize {
        self.dims.n_mels
    }

    fn n_text_ctx(&self) -> usize {
        self.dims.n_text_ctx
    }

    fn encode(&mut self, mel: &[f32]) -> Result<(), hearth_engine::BoxError> {
        let audio = self.encoder_output(mel)?;
        self.set_audio(&audio)?;
        Ok(())
    }

    fn reset(&mut self) {
        for cache in &mut self.cache {
            cache.self_kv = None;
        }
        self.n_past = 0;
    }

    fn decode(&mut self, tokens: &[u32]) -> Result<Vec<f32>, hearth_engine::BoxError> {
        if self.cache.is_empty() {
            return Err("decode before encode".into());
        }
        if tokens.is_empty() {
            return Err("decode of no tokens".into());
        }
        Ok(self.decoder_step(tokens)?)
    }

    fn cross_attention(
        &mut self,
        tokens: &[u32],
        heads: &[(usize, usize)],
    ) -> Result<Vec<Vec<f32>>, hearth_engine::BoxError> {
        if self.cache.is_empty() {
            return Err("cross_attention before encode".into());
        }
        if let Some(&(layer, head)) =
            heads.iter().find(|&&(l, h)| l >= self.dims.n_text_layer || h >= self.dims.n_text_head)
        {
            return Err(format!("no decoder head ({layer}, {head}) in this model").into());
        }
        self.reset();
        let mut scores = Vec::new();
        self.decoder_pass(tokens, Some((heads, &mut scores)))?;
        self.reset();
        Ok(scores)
    }

    fn aligns_words(&self) -> bool {
        true
    }

    fn text_layers(&self) -> (usize, usize) {
        (self.dims.n_text_layer, self.dims.n_text_head)
    }
}

/// What the loader logs about a loaded Whisper.
#[derive(Debug, Clone)]
pub struct LoadedWhisper {
    pub dims: WhisperDims,
    pub device: hearth_engine::Device,
    pub dtype: DType,
    /// Whether the decoder's matrices are Q8_0.
    pub decoder_q8: bool,
    /// Whether the encoder's matrices are int8.
    pub encoder_int8: bool,
    /// The weights' format: `ctranslate2`, `safetensors` or `gguf`.
    pub format: &'static str,
}

/// How the decoder's matrices are kept.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecoderWeights {
    /// Q8_0 for f32 on the CPU (twice the decoding speed at the same transcripts:
    /// benches/README.md), the model's dtype elsewhere.
    #[default]
    Auto,
    /// The model's dtype.
    Float,
    /// Q8_0 (f32 on the CPU only).
    #[serde(rename = "q8_0")]
    Q8_0,
}

/// Where a folder's weights for the candle backend are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WeightFiles {
    /// A CTranslate2 `model.bin`.
    Ct2(PathBuf),
    /// Transformers' safetensors (one file or a checkpoint's shards).
    Safetensors(Vec<PathBuf>),
    /// A GGUF file of Transformers' names.
    Gguf(PathBuf),
}

fn has_extension(name: &str, extension: &str) -> bool {
    Path::new(name).extension().is_some_and(|e| e == extension)
}

/// Whether `file` (a config's `file`) names weights the candle backend reads.
pub fn candle_reads_file(file: &str) -> bool {
    file == "model.bin" || has_extension(file, "gguf") || has_extension(file, "safetensors")
}

/// Files of `dir` (names only) ending in `.extension`, sorted.
fn files_with_extension(dir: &Path, extension: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|name| has_extension(name, extension))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Whether `dir` holds weights the candle backend reads (`model.bin`, safetensors or GGUF).
pub fn candle_reads(dir: &Path) -> bool {
    dir.join("model.bin").is_file()
        || !files_with_extension(dir, "safetensors").is_empty()
        || !files_with_extension(dir, "gguf").is_empty()
}

/// The candle backend's weights in `dir` (or `file` of it): `model.bin`, else Transformers'
/// `model.safetensors` (or the shards its index lists, or every `.safetensors`), else the one
/// `.gguf` file. Every path lies inside `root`.
pub fn weight_files(dir: &Path, file: Option<&str>, root: &ModelsRoot) -> Result<WeightFiles, BackendError> {
    let missing = |what: String| BackendError::Missing { dir: dir.to_owned(), what };
    let inside = |name: &str| -> Result<PathBuf, BackendError> {
        root.join(dir, name)?.filter(|p| p.is_file()).ok_or_else(|| missing(name.to_string()))
    };
    if let Some(file) = file {
        return if file == "model.bin" {
            Ok(WeightFiles::Ct2(inside(file)?))
        } else if has_extension(file, "gguf") {
            Ok(WeightFiles::Gguf(inside(file)?))
        } else if has_extension(file, "safetensors") {
            Ok(WeightFiles::Safetensors(vec![inside(file)?]))
        } else {
            Err(BackendError::Unsupported(format!(
                "{}: `{file}` is not a file the candle backend reads (model.bin, .safetensors or .gguf; \
                 a ggml file needs the whisper.cpp backend)",
                dir.display()
            )))
        };
    }
    if dir.join("model.bin").is_file() {
        return Ok(WeightFiles::Ct2(inside("model.bin")?));
    }
    if dir.join("model.safetensors").is_file() {
        return Ok(WeightFiles::Safetensors(vec![inside("model.safetensors")?]));
    }
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        #[derive(serde::Deserialize)]
        struct Index {
            weight_map: std::collections::BTreeMap<String, String>,
        }
        let bytes =
            std::fs::read(&index).map_err(|source| BackendError::Io { path: index.clone(), source })?;
        let parsed: Index =
            serde_json::from_slice(&bytes).map_err(|source| BackendError::Json { path: index, source })?;
        let mut shards: Vec<&String> = parsed.weight_map.values().collect();
        shards.sort();
        shards.dedup();
        return Ok(WeightFiles::Safetensors(
            shards.into_iter().map(|s| inside(s)).collect::<Result<_, _>>()?,
        ));
    }
    let shards = files_with_extension(dir, "safetensors");
    if !shards.is_empty() {
        return Ok(WeightFiles::Safetensors(shards.iter().map(|s| inside(s)).collect::<Result<_, _>>()?));
    }
    match files_with_extension(dir, "gguf").as_slice() {
        [one] => Ok(WeightFiles::Gguf(inside(one)?)),
        [] => Err(missing(
            "Whisper weights: model.bin (CTranslate2), model.safetensors (Transformers) or a .gguf file"
                .into(),
        )),
        several => Err(BackendError::Unsupported(format!(
            "{}: several GGUF files ({}); name one with `file`",
            dir.display(),
            several.join(", ")
        ))),
    }
}

/// How the encoder's matrices are kept.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EncoderWeights {
    /// int8 for f32 on a CPU with AVX-512 VNNI (faster encoder windows at the same test
    /// transcripts: benches/README.md), the model's dtype elsewhere.
    #[default]
    Auto,
    /// The model's dtype.
    Float,
    /// int8 (f32 on a CPU with AVX-512 VNNI only; an error elsewhere).
    Int8,
}

/// How the loaded model keeps its matrices.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WhisperWeights {
    pub encoder: EncoderWeights,
    pub decoder: DecoderWeights,
}

/// Loads the Whisper folder `dir` (CTranslate2, Transformers safetensors or GGUF, or the `file`
/// named), which must lie inside `root` (as must the files it reads), on the configured device
/// and dtype (`auto`: f32 on the CPU, f16 on GPUs). GGUF's quantized matrices are widened to
/// `dtype` when loading (the decoder on the CPU is then Q8_0 again, `decoder_weights = "auto"`).
pub fn load(
    dir: &Path,
    file: Option<&str>,
    root: &ModelsRoot,
    device: hearth_engine::Device,
    dtype: hearth_engine::DType,
    weights_kept: WhisperWeights,
) -> Result<(CandleWhisper, WhisperVocab, LoadedWhisper), BackendError> {
    let missing = |what: &str| BackendError::Missing { dir: dir.to_owned(), what: what.into() };
    let dir = root.existing(dir)?.ok_or_else(|| missing("anything (it does not exist)"))?;
    let weights = weight_files(&dir, file, root)?;
    root.join(&dir, "tokenizer.json")?.filter(|p| p.is_file()).ok_or_else(|| missing("tokenizer.json"))?;
    root.join(&dir, "config.json")?;
    root.join(&dir, "generation_config.json")?;
    let candle_device = select_device(device)?;
    let dtype = select_dtype(dtype, &candle_device);
    let vocab = read_vocab(&dir)?;
    let (mut model, format) = match &weights {
        WeightFiles::Ct2(path) => {
            let model = Ct2Model::read(path)?;
            if model.spec != "WhisperSpec" {
                return Err(BackendError::Unsupported(format!(
                    "{}: the CTranslate2 model is a {}, not a WhisperSpec",
                    path.display(),
                    model.spec
                )));
            }
            (CandleWhisper::from_weights(&model, candle_device, dtype)?, "ctranslate2")
        }
        WeightFiles::Safetensors(files) => {
            let source = hf::HfWeights::safetensors(&dir, files)?;
            (CandleWhisper::from_weights(&source, candle_device, dtype)?, "safetensors")
        }
        WeightFiles::Gguf(path) => {
            let source = hf::HfWeights::gguf(&dir, path)?;
            (CandleWhisper::from_weights(&source, candle_device, dtype)?, "gguf")
        }
    };
    let host_f32 = model.device.is_cpu() && dtype == DType::F32;
    let quantize = match weights_kept.decoder {
        DecoderWeights::Auto => host_f32,
        DecoderWeights::Float => false,
        DecoderWeights::Q8_0 => true,
    };
    if quantize {
        model.quantize_decoder()?;
    }
    match weights_kept.encoder {
        EncoderWeights::Auto if host_f32 => {
            model.quantize_encoder()?;
        }
        EncoderWeights::Auto | EncoderWeights::Float => {}
        EncoderWeights::Int8 => {
            if !model.quantize_encoder()? {
                return Err(BackendError::Unsupported(
                    "`encoder_weights = \"int8\"` needs a CPU with AVX-512 VNNI, which this one lacks".into(),
                ));
            }
        }
    }
    let loaded = LoadedWhisper {
        dims: model.dims,
        device: resolved_device(&model.device),
        dtype,
        decoder_q8: model.decoder_q8(),
        encoder_int8: model.encoder_int8(),
        format,
    };
    Ok((model, vocab, loaded))
}
