//! Rotary position embeddings, per-sequence KV caches and causal attention for decoders, where each
//! step carries chunks of several sequences at different positions.
//!
//! Two implementations of the same thing:
//! - [`HostKv`], for the CPU: caches are plain buffers (one per sequence and layer, position-major,
//!   so appending is a copy), and attention is a hand-written kernel: one pass over a sequence's
//!   keys and values per (query token, head) with an online soft-max, parallel over those pairs.
//!   Nothing is concatenated or copied per step, so a step costs what its attention reads.
//! - [`TensorKv`], for every device: caches are candle tensors and attention is candle ops (a matmul
//!   over the sequence's keys, a causal bias, a soft-max, a matmul over its values), so the same
//!   forward pass runs on CUDA and Metal. On the CPU it is the reference the kernel is tested
//!   against.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use crate::error::BackendError;

pub type SeqId = hearth_engine::generate::model::SeqId;

/// How a model rotates query/key pairs (llama.cpp's rope types).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// Adjacent pairs `(x[2i], x[2i+1])`: llama.cpp's `NORM` (Llama, Mistral; their GGUF Q/K
    /// weights are permuted for it).
    Interleaved,
    /// Pairs `(x[i], x[i + d/2])`: llama.cpp's `NEOX` (Qwen, Phi, Gemma, Hugging Face's layout).
    Neox,
}

/// Cosines and sines of every position's rotation angles, computed once.
pub struct Rope {
    style: RopeStyle,
    /// Rotated dimensions per head (the rest pass through).
    dims: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
    positions: usize,
}

impl Rope {
    /// `freq_factors` (Llama 3.x's `rope_freqs.weight`) divide the frequencies, one per pair.
    pub fn new(
        style: RopeStyle,
        dims: usize,
        base: f32,
        positions: usize,
        freq_factors: Option<&[f32]>,
    ) -> Self {
        let half = dims / 2;
        let inv_freq: Vec<f64> = (0..half)
            .map(|i| {
                let f = f64::from(base).powf(-(2.0 * i as f64) / dims as f64);
                f / freq_factors.and_then(|ff| ff.get(i)).map_or(1.0, |&x| f64::from(x))
            })
            .collect();
        let mut cos = Vec::with_capacity(positions * half);
        let mut sin = Vec::with_capacity(positions * half);
        for p in 0..positions {
            for &f in &inv_freq {
                let angle = p as f64 * f;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        Self { style, dims, cos, sin, positions }
    }

    /// Rotates one head's vector `x` for `position`.
    fn apply(&self, x: &mut [f32], position: usize) {
        let half = self.dims / 2;
        let (cos, sin) = (&self.cos[position * half..][..half], &self.sin[position * half..][..half]);
        match self.style {
            RopeStyle::Interleaved => {
                for i in 0..half {
                    let (a, b) = (x[2 * i], x[2 * i + 1]);
                    x[2 * i] = a * cos[i] - b * sin[i];
                    x[2 * i + 1] = a * sin[i] + b * cos[i];
                }
            }
            RopeStyle::Neox => {
                for i in 0..half {
                    let (a, b) = (x[i], x[i + half]);
                    x[i] = a * cos[i] - b * sin[i];
                    x[i + half] = a * sin[i] + b * cos[i];
                }
            }
        }
    }

    /// Rotates every head of every row of `rows` (`[tokens, heads × head_dim]`).
    fn apply_rows(&self, rows: &mut [f32], head_dim: usize, positions: &[usize]) {
        let width = rows.len() / positions.len().max(1);
        for (row, &position) in rows.chunks_mut(width).zip(positions) {
            for head in row.chunks_mut(head_dim) {
                self.apply(head, position);
            }
        }
    }
}

/// The geometry of the attention of one model.
#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl AttentionShape {
    fn kv_width(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// KV bytes one cached token takes over all layers (f32 keys and values).
    pub fn kv_bytes_per_token(&self) -> usize {
        self.layers * 2 * self.kv_width() * 4
    }
}

/// Where one chunk's rows are in a step: its sequence, first position and token count.
#[derive(Clone, Copy, Debug)]
pub struct ChunkRows {
    pub seq: SeqId,
    pub start: usize,
    pub len: usize,
}

/// Per-sequence KV caches and attention over them.
pub enum KvCaches {
    Host(HostKv),
    Tensor(TensorKv),
}

impl KvCaches {
    /// The CPU kernel on the CPU, candle ops elsewhere.
    pub fn for_device(shape: AttentionShape, device: &Device) -> Self {
        if device.is_cpu() {
            Self::Host(HostKv::new(shape))
        } else {
            Self::Tensor(TensorKv::new(shape, device.clone()))
        }
    }

    /// One layer's attention for a step. `q` is `[T, heads × head_dim]`, `k` and `v`
    /// `[T, kv_heads × head_dim]`, rows in chunk order; positions are rotated here, keys and values
    /// appended to each chunk's cache, and the result is `[T, heads × head_dim]`.
    pub fn attend(
        &mut self,
        layer: usize,
        rope: &Rope,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        chunks: &[ChunkRows],
    ) -> Result<Tensor, BackendError> {
        match self {
            Self::Host(kv) => kv.attend(layer, rope, q, k, v, chunks),
            Self::Tensor(kv) => kv.attend(layer, rope, q, k, v, chunks),
        }
    }

    pub fn release(&mut self, seq: SeqId) {
        match self {
            Self::Host(kv) => drop(kv.seqs.remove(&seq)),
            Self::Tensor(kv) => drop(kv.seqs.remove(&seq)),
        }
    }

    pub fn fork(&mut self, from: SeqId, to: SeqId, len: usize) -> Result<(), BackendError> {
        let missing = || BackendError::Unsupported(format!("no cached sequence {from} to copy"));
        match self {
            Self::Host(kv) => {
                let source = kv.seqs.get(&from).ok_or_else(missing)?;
                if len > source.len {
                    return Err(BackendError::Unsupported(format!(
                        "sequence {from} has {} cached tokens, not {len}",
                        source.len
                    )));
                }
                let width = kv.shape.kv_width();
                let copy = HostSeq {
                    len,
                    k: source.k.iter().map(|layer| layer[..len * width].to_vec()).collect(),
                    v: source.v.iter().map(|layer| layer[..len * width].to_vec()).collect(),
                };
                kv.seqs.insert(to, copy);
            }
            Self::Tensor(kv) => {
                let source = kv.seqs.get(&from).ok_or_else(missing)?;
                let cut = |t: &Option<Tensor>| -> Result<Option<Tensor>, BackendError> {
                    Ok(match t {
                        Some(t) if len > 0 => Some(t.narrow(0, 0, len)?.contiguous()?),
                        _ => None,
                    })
                };
                let copy = TensorSeq {
                    k: source.k.iter().map(cut).collect::<Result<_, _>>()?,
                    v: source.v.iter().map(cut).collect::<Result<_, _>>()?,
                };
                kv.seqs.insert(to, copy);
            }
        }
        Ok(())
    }

    /// Tokens cached for `seq`.
    pub fn len(&self, seq: SeqId) -> usize {
        match self {
            Self::Host(kv) => kv.seqs.get(&seq).map_or(0, |s| s.len),
            Self::Tensor(kv) => {
                kv.seqs.get(&seq).and_then(|s| s.k[0].as_ref()).map_or(0, |t| t.dim(0).unwrap_or(0))
            }
        }
    }
}

fn positions(chunks: &[ChunkRows]) -> Vec<usize> {
    chunks.iter().flat_map(|c| c.start..c.start + c.len).collect()
}

/// One sequence's caches on the host: per layer, `[position][kv head][head_dim]`.
struct HostSeq {
    len: usize,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

pub struct HostKv {
    shape: AttentionShape,
    seqs: HashMap<SeqId, HostSeq>,
}

impl HostKv {
    pub fn new(shape: AttentionShape) -> Self {
        Self { shape, seqs: HashMap::new() }
    }

    fn attend(
        &mut self,
        layer: usize,
        rope: &Rope,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        chunks: &[ChunkRows],
    ) -> Result<Tensor, BackendError> {
        let shape = self.shape;
        let (d, width, kv_width) = (shape.head_dim, shape.heads * shape.head_dim, shape.kv_width());
        let positions = positions(chunks);
        let mut q = q.flatten_all()?.to_vec1::<f32>()?;
        let mut k = k.flatten_all()?.to_vec1::<f32>()?;
        let v = v.flatten_all()?.to_vec1::<f32>()?;
        rope.apply_rows(&mut q, d, &positions);
        rope.apply_rows(&mut k, d, &positions);

        // Append each chunk's keys and values to its sequence's cache.
        let mut row = 0;
        for chunk in chunks {
            let seq = self.seqs.entry(chunk.seq).or_insert_with(|| HostSeq {
                len: 0,
                k: vec![Vec::new(); shape.layers],
                v: vec![Vec::new(); shape.layers],
            });
            let have = seq.k[layer].len() / kv_width;
            if have != chunk.start {
                return Err(BackendError::Unsupported(format!(
                    "sequence {} has {have} cached tokens at layer {layer}, but its chunk starts at {}",
                    chunk.seq, chunk.start
                )));
            }
            let rows = row * kv_width..(row + chunk.len) * kv_width;
            seq.k[layer].extend_from_slice(&k[rows.clone()]);
            seq.v[layer].extend_from_slice(&v[rows]);
            if layer + 1 == shape.layers {
                seq.len = chunk.start + chunk.len;
            }
            row += chunk.len;
        }

        // Which chunk each row belongs to.
        let mut owner = Vec::with_capacity(positions.len());
        for (i, chunk) in chunks.iter().enumerate() {
            owner.extend(std::iter::repeat_n(i, chunk.len));
        }
        let group = shape.heads / shape.kv_heads;
        let scale = 1.0 / (d as f32).sqrt();
        let seqs = &self.seqs;
        let mut out = vec![0f32; positions.len() * width];
        out.par_chunks_mut(d).enumerate().for_each(|(item, out)| {
            let (t, h) = (item / shape.heads, item % shape.heads);
            let chunk = &chunks[owner[t]];
            let Some(seq) = seqs.get(&chunk.seq) else { return };
            let (keys, values) = (&seq.k[layer], &seq.v[layer]);
            let query = &q[t * width + h * d..][..d];
            let kv_offset = (h / group) * d;
            // Online soft-max over keys 0..=position (causal).
            let mut max = f32::NEG_INFINITY;
            let mut sum = 0f32;
            for j in 0..=positions[t] {
                let key = &keys[j * kv_width + kv_offset..][..d];
                let score = dot(query, key) * scale;
                let value = &values[j * kv_width + kv_offset..][..d];
                if score > max {
                    let rescale = (max - score).exp();
                    sum *= rescale;
                    out.iter_mut().for_each(|o| *o *= rescale);
                    max = score;
                }
                let weight = (score - max).exp();
                sum += weight;
                out.iter_mut().zip(value).for_each(|(o, &x)| *o += weight * x);
            }
            let inv = 1.0 / sum;
            out.iter_mut().for_each(|o| *o *= inv);
        });
        Ok(Tensor::from_vec(out, (positions.len(), width), &Device::Cpu)?)
    }
}

/// A dot product written so the compiler vectorises it (eight independent sums).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut sums = [0f32; 8];
    let (a_chunks, b_chunks) = (a.chunks_exact(8), b.chunks_exact(8));
    let (a_rest, b_rest) = (a_chunks.remainder(), b_chunks.remainder());
    for (x, y) in a_chunks.zip(b_chunks) {
        for i in 0..8 {
            sums[i] += x[i] * y[i];
        }
    }
    let tail: f32 = a_rest.iter().zip(b_rest).map(|(x, y)| x * y).sum();
    sums.iter().sum::<f32>() + tail
}

/// One sequence's caches as tensors: per layer, `[position, kv heads, head_dim]`.
struct TensorSeq {
    k: Vec<Option<Tensor>>,
    v: Vec<Option<Tensor>>,
}

pub struct TensorKv {
    shape: AttentionShape,
    device: Device,
    seqs: HashMap<SeqId, TensorSeq>,
}

impl TensorKv {
    pub fn new(shape: AttentionShape, device: Device) -> Self {
        Self { shape, device, seqs: HashMap::new() }
    }

    fn attend(
        &mut self,
        layer: usize,
        rope: &Rope,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        chunks: &[ChunkRows],
    ) -> Result<Tensor, BackendError> {
        let shape = self.shape;
        let (d, heads, kv_heads) = (shape.head_dim, shape.heads, shape.kv_heads);
        let positions = positions(chunks);
        let t = positions.len();
        let (q, k) = (self.rotate(rope, q, heads, &positions)?, self.rotate(rope, k, kv_heads, &positions)?);
        let v = v.reshape((t, kv_heads, d))?;
        let mut outputs = Vec::with_capacity(chunks.len());
        let mut row = 0;
        for chunk in chunks {
            let seq = self
                .seqs
                .entry(chunk.seq)
                .or_insert_with(|| TensorSeq { k: vec![None; shape.layers], v: vec![None; shape.layers] });
            let append = |cache: &mut Option<Tensor>, new: Tensor| -> Result<Tensor, BackendError> {
                let joined = match cache.take() {
                    Some(old) => Tensor::cat(&[old, new], 0)?,
                    None => new,
                };
                *cache = Some(joined.clone());
                Ok(joined)
            };
            let have = seq.k[layer].as_ref().map_or(Ok(0), |t| t.dim(0))?;
            if have != chunk.start {
                return Err(BackendError::Unsupported(format!(
                    "sequence {} has {have} cached tokens at layer {layer}, but its chunk starts at {}",
                    chunk.seq, chunk.start
                )));
            }
            let keys = append(&mut seq.k[layer], k.narrow(0, row, chunk.len)?.contiguous()?)?;
            let values = append(&mut seq.v[layer], v.narrow(0, row, chunk.len)?.contiguous()?)?;
            let total = chunk.start + chunk.len;
            // [kv_heads, group × len, d] so grouped heads share one matmul against their keys.
            let group = heads / kv_heads;
            let queries = q
                .narrow(0, row, chunk.len)?
                .reshape((chunk.len, kv_heads, group, d))?
                .permute((1, 2, 0, 3))?
                .reshape((kv_heads, group * chunk.len, d))?
                .contiguous()?;
            let keys_t = keys.permute((1, 2, 0))?.contiguous()?; // [kv_heads, d, total]
            let values = values.permute((1, 0, 2))?.contiguous()?; // [kv_heads, total, d]
            let scores = (queries.matmul(&keys_t)? * (1.0 / (d as f64).sqrt()))?;
            // Causal: query i (position start + i) sees keys 0..=start + i.
            let bias: Vec<f32> = (0..group)
                .flat_map(|_| {
                    (0..chunk.len).flat_map(move |i| {
                        (0..total).map(move |j| if j <= chunk.start + i { 0.0 } else { f32::NEG_INFINITY })
                    })
                })
                .collect();
            let bias = Tensor::from_vec(bias, (1, group * chunk.len, total), &self.device)?;
            let probs = candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&bias)?)?;
            let context = probs
                .matmul(&values)? // [kv_heads, group × len, d]
                .reshape((kv_heads, group, chunk.len, d))?
                .permute((2, 0, 1, 3))?
                .reshape((chunk.len, heads * d))?;
            outputs.push(context);
            row += chunk.len;
        }
        Ok(Tensor::cat(&outputs, 0)?.to_dtype(DType::F32)?)
    }

    /// Rotates `[T, heads × d]` rows with candle's kernels (cos/sin gathered per row's position).
    fn rotate(
        &self,
        rope: &Rope,
        x: &Tensor,
        heads: usize,
        positions: &[usize],
    ) -> Result<Tensor, BackendError> {
        let (t, d) = (positions.len(), self.shape.head_dim);
        let half = rope.dims / 2;
        let gather = |table: &[f32]| -> Vec<f32> {
            positions.iter().flat_map(|&p| table[p * half..(p + 1) * half].iter().copied()).collect()
        };
        if positions.iter().any(|&p| p >= rope.positions) {
            return Err(BackendError::Unsupported(format!(
                "position beyond the model's {} positions",
                rope.positions
            )));
        }
        let cos = Tensor::from_vec(gather(&rope.cos), (t, half), &self.device)?;
        let sin = Tensor::from_vec(gather(&rope.sin), (t, half), &self.device)?;
        // [1, heads, T, d]: each position is one step of the "sequence" axis.
        let x = x.reshape((t, heads, d))?;
        let (rotated, rest) = if rope.dims < d {
            (x.narrow(2, 0, rope.dims)?, Some(x.narrow(2, rope.dims, d - rope.dims)?))
        } else {
            (x.clone(), None)
        };
        let bhtd = rotated.transpose(0, 1)?.unsqueeze(0)?.contiguous()?;
        let out = match rope.style {
            RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i(&bhtd, &cos, &sin)?,
            RopeStyle::Neox => candle_nn::rotary_emb::rope(&bhtd, &cos, &sin)?,
        };
        let out = out.squeeze(0)?.transpose(0, 1)?;
        let out = match rest {
            Some(rest) => Tensor::cat(&[out, rest], 2)?,
            None => out,
        };
        Ok(out.contiguous()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut state = seed;
        (0..n)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((state >> 33) as f32 / (1u64 << 31) as f32) - 0.5
            })
            .collect()
    }

    /// Runs the same steps through both implementations; their outputs must agree.
    #[test]
    fn the_host_kernel_matches_candle_ops_over_chunked_steps_and_forks() {
        for style in [RopeStyle::Interleaved, RopeStyle::Neox] {
            let shape = AttentionShape { layers: 2, heads: 4, kv_heads: 2, head_dim: 16 };
            let rope = Rope::new(style, 16, 10_000.0, 64, None);
            let mut host = KvCaches::Host(HostKv::new(shape));
            let mut tensor = KvCaches::Tensor(TensorKv::new(shape, Device::Cpu));
            // Step 1: a 5-token prompt for seq 1 and a 3-token prompt for seq 2; then decode steps,
            // a second chunk of seq 2, and a fork of seq 1 into seq 3.
            let steps: Vec<Vec<ChunkRows>> = vec![
                vec![ChunkRows { seq: 1, start: 0, len: 5 }, ChunkRows { seq: 2, start: 0, len: 3 }],
                vec![ChunkRows { seq: 1, start: 5, len: 1 }, ChunkRows { seq: 2, start: 3, len: 4 }],
                vec![ChunkRows { seq: 3, start: 4, len: 2 }, ChunkRows { seq: 2, start: 7, len: 1 }],
            ];
            for (s, chunks) in steps.iter().enumerate() {
                if s == 2 {
                    host.fork(1, 3, 4).unwrap();
                    tensor.fork(1, 3, 4).unwrap();
                }
                let t: usize = chunks.iter().map(|c| c.len).sum();
                for layer in 0..shape.layers {
                    let seed = (s * 10 + layer) as u64;
                    let q = Tensor::from_vec(random(t * 64, seed), (t, 64), &Device::Cpu).unwrap();
                    let k = Tensor::from_vec(random(t * 32, seed + 100), (t, 32), &Device::Cpu).unwrap();
                    let v = Tensor::from_vec(random(t * 32, seed + 200), (t, 32), &Device::Cpu).unwrap();
                    let a = host.attend(layer, &rope, &q, &k, &v, chunks).unwrap().to_vec2::<f32>().unwrap();
                    let b =
                        tensor.attend(layer, &rope, &q, &k, &v, chunks).unwrap().to_vec2::<f32>().unwrap();
                    for (ra, rb) in a.iter().zip(&b) {
                        for (x, y) in ra.iter().zip(rb) {
                            assert!((x - y).abs() < 1e-5, "{style:?} step {s} layer {layer}: {x} vs {y}");
                        }
                    }
                }
            }
            assert_eq!(host.len(2), 8);
            assert_eq!(tensor.len(2), 8);
            assert_eq!(host.len(3), 6);
        }
    }

    #[test]
    fn a_chunk_that_does_not_continue_its_cache_is_refused() {
        let shape = AttentionShape { layers: 1, heads: 1, kv_heads: 1, head_dim: 2 };
        let rope = Rope::new(RopeStyle::Neox, 2, 10_000.0, 8, None);
        let mut kv = KvCaches::Host(HostKv::new(shape));
        let x = Tensor::zeros((1, 2), DType::F32, &Device::Cpu).unwrap();
        let err = kv.attend(0, &rope, &x, &x, &x, &[ChunkRows { seq: 1, start: 3, len: 1 }]).err().unwrap();
        assert!(err.to_string().contains("starts at 3"), "{err}");
    }
}
