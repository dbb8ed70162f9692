//! Rotary position embeddings, per-sequence KV caches and causal attention for decoders, where each
//! step carries chunks of several sequences at different positions.
//!
//! Two implementations of the same thing:
//! - [`HostKv`], for the CPU: caches are plain buffers (one per sequence and layer, position-major,
//!   so appending is a copy), and attention is a hand-written kernel in three passes (scores,
//!   soft-max, weighted sum of values) per (query token, KV head), parallel over those pairs: the
//!   query heads that share a KV head (grouped-query attention) read its keys and values once. A
//!   step with too few pairs for the threads (one long sequence decoding) splits each pair's
//!   scores by blocks of keys and its sums by slices of dimensions, with the same arithmetic per
//!   value. Nothing is concatenated or copied per step, so a step costs what its attention reads.
//! - [`TensorKv`], for every device: caches are candle tensors and attention is candle ops (a matmul
//!   over the sequence's keys, a causal bias, a soft-max, a matmul over its values), so the same
//!   forward pass runs on CUDA and Metal. On the CPU it is the reference the kernel is tested
//!   against.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use half::f16;
use rayon::prelude::*;

use crate::error::BackendError;
use crate::quant::hsum_lanes;

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

/// How a model rotates: style, rotated dimensions and frequencies.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RopeConfig {
    pub style: RopeStyle,
    /// Rotated dimensions per head (the rest pass through).
    pub dims: usize,
    pub base: f32,
    /// Linear position scaling: angles are multiplied by it (`1 / rope.scaling.factor`).
    pub freq_scale: f32,
    /// Multiplies every cosine and sine (Phi-3's LongRoPE `rope.scaling.attn_factor`).
    pub attn_factor: f32,
}

impl RopeConfig {
    /// Plain rotation: no scaling.
    pub fn plain(style: RopeStyle, dims: usize, base: f32) -> Self {
        Self { style, dims, base, freq_scale: 1.0, attn_factor: 1.0 }
    }
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
    /// `freq_factors` (Llama 3.x's `rope_freqs.weight`, Phi-3's LongRoPE factors) divide the
    /// frequencies, one per pair.
    ///
    /// Angles are computed as ggml computes them, in f32: `θ₀ = p`, each next pair's angle the
    /// previous one times `base^(-2/dims)`, divided by the pair's frequency factor, times the
    /// linear scale. The rounding of that running product is part of what llama.cpp's logits are,
    /// so Hearth repeats it.
    pub fn new(config: &RopeConfig, positions: usize, freq_factors: Option<&[f32]>) -> Self {
        let RopeConfig { style, dims, base, freq_scale, attn_factor } = *config;
        let half = dims / 2;
        let theta_scale = base.powf(-2.0 / dims as f32);
        let mut cos = Vec::with_capacity(positions * half);
        let mut sin = Vec::with_capacity(positions * half);
        for p in 0..positions {
            let mut theta = p as f32;
            for i in 0..half {
                let factor = freq_factors.and_then(|ff| ff.get(i)).copied().unwrap_or(1.0);
                let angle = freq_scale * (theta / factor);
                cos.push(angle.cos() * attn_factor);
                sin.push(angle.sin() * attn_factor);
                theta *= theta_scale;
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

/// How one layer attends: its rotation, its window and its score scale.
#[derive(Clone, Copy)]
pub struct LayerAttention<'a> {
    pub rope: &'a Rope,
    /// A sliding window (Gemma 3's local layers): a query at position `p` sees the keys at
    /// `p - window < j ≤ p`, as llama.cpp's standard window masks.
    pub window: Option<usize>,
    /// What `q·k` is multiplied by before the soft-max (`1/√head_dim` unless the model says otherwise).
    pub scale: f32,
}

impl<'a> LayerAttention<'a> {
    /// Full causal attention scaled by `1/√head_dim`.
    pub fn causal(rope: &'a Rope, head_dim: usize) -> Self {
        Self { rope, window: None, scale: 1.0 / (head_dim as f32).sqrt() }
    }

    /// The first key position a query at `position` sees.
    fn first_key(&self, position: usize) -> usize {
        self.window.map_or(0, |w| (position + 1).saturating_sub(w))
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

    /// KV bytes one cached token takes over all layers, for keys and values of `element` bytes.
    pub fn kv_bytes_per_token(&self, element: usize) -> usize {
        self.layers * 2 * self.kv_width() * element
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
    /// The CPU kernel on the CPU (caches of `precision`), candle ops elsewhere (f32 caches).
    pub fn for_device(shape: AttentionShape, device: &Device, precision: KvPrecision) -> Self {
        if device.is_cpu() {
            Self::Host(HostKv::new(shape, precision))
        } else {
            Self::Tensor(TensorKv::new(shape, device.clone()))
        }
    }

    /// KV bytes one cached token takes over all layers.
    pub fn bytes_per_token(&self) -> usize {
        match self {
            Self::Host(kv) => kv.shape.kv_bytes_per_token(kv.precision.bytes()),
            Self::Tensor(kv) => kv.shape.kv_bytes_per_token(4),
        }
    }

    /// One layer's attention for a step. `q` is `[T, heads × head_dim]`, `k` and `v`
    /// `[T, kv_heads × head_dim]`, rows in chunk order; positions are rotated here, keys and values
    /// appended to each chunk's cache, and the result is `[T, heads × head_dim]`.
    pub fn attend(
        &mut self,
        layer: usize,
        attn: &LayerAttention,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        chunks: &[ChunkRows],
    ) -> Result<Tensor, BackendError> {
        match self {
            Self::Host(kv) => kv.attend(layer, attn, q, k, v, chunks),
            Self::Tensor(kv) => kv.attend(layer, attn, q, k, v, chunks),
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
                let d = kv.shape.head_dim;
                let copy = HostSeq {
                    len,
                    k: source.k.iter().map(|head| head.prefix(len * d)).collect(),
                    v: source.v.iter().map(|head| head.prefix(len * d)).collect(),
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

/// A chunk must start where its sequence's cache ends.
fn continues(chunk: &ChunkRows, cached: usize, layer: usize) -> Result<(), BackendError> {
    if cached == chunk.start {
        return Ok(());
    }
    Err(BackendError::Unsupported(format!(
        "sequence {} has {cached} cached tokens at layer {layer}, but its chunk starts at {}",
        chunk.seq, chunk.start
    )))
}

fn positions(chunks: &[ChunkRows]) -> Vec<usize> {
    chunks.iter().flat_map(|c| c.start..c.start + c.len).collect()
}

/// The element type of host KV caches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvPrecision {
    /// Half the memory and bandwidth; llama.cpp's default cache type, with its arithmetic: queries
    /// and soft-max weights are rounded to f16 where they meet f16 keys and values, sums stay f32.
    #[default]
    F16,
    /// Full precision (the numpy reference's arithmetic).
    F32,
}

impl KvPrecision {
    pub fn bytes(self) -> usize {
        match self {
            Self::F16 => 2,
            Self::F32 => 4,
        }
    }
}

/// One layer's keys or values of one KV head for one sequence: `[position][head_dim]`, so a head's
/// keys are read front to back.
#[derive(Clone)]
enum HostBuf {
    F16(Vec<f16>),
    F32(Vec<f32>),
}

impl HostBuf {
    fn new(precision: KvPrecision) -> Self {
        match precision {
            KvPrecision::F16 => Self::F16(Vec::new()),
            KvPrecision::F32 => Self::F32(Vec::new()),
        }
    }

    fn len(&self) -> usize {
        match self {
            Self::F16(v) => v.len(),
            Self::F32(v) => v.len(),
        }
    }

    fn extend(&mut self, values: &[f32]) {
        match self {
            Self::F16(v) => {
                grow(v, values.len());
                v.extend(values.iter().map(|&x| f16::from_f32(x)));
            }
            Self::F32(v) => {
                grow(v, values.len());
                v.extend_from_slice(values);
            }
        }
    }

    fn prefix(&self, len: usize) -> Self {
        match self {
            Self::F16(v) => Self::F16(v[..len].to_vec()),
            Self::F32(v) => Self::F32(v[..len].to_vec()),
        }
    }
}

/// Makes room for `more` values: by half again what is needed, plus 1,024 values. Doubling from
/// powers of two made every buffer of a long sequence a power of two, which mimalloc (with
/// transparent huge pages) placed at the same offsets modulo 1 MiB, so a layer's heads competed for
/// the same cache sets: decode after a 4,096-token prompt ran at 0.65× the speed it has with
/// these sizes (measured on SmolLM2 with `decode_speed`, prompt prefilled in 512-token chunks).
fn grow<T>(buffer: &mut Vec<T>, more: usize) {
    let needed = buffer.len() + more;
    if needed > buffer.capacity() {
        buffer.reserve_exact(needed + needed / 2 + 1024 - buffer.len());
    }
}

/// One sequence's caches on the host, per layer and KV head (`[layer × kv_heads + head]`).
struct HostSeq {
    len: usize,
    k: Vec<HostBuf>,
    v: Vec<HostBuf>,
}

pub struct HostKv {
    shape: AttentionShape,
    precision: KvPrecision,
    seqs: HashMap<SeqId, HostSeq>,
    simd: bool,
    split: Split,
}

/// When a step's (token, KV head) items are split across threads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// When they are too few for the threads and see [`SPLIT_FROM_KEYS`] keys in all.
    Auto,
    /// Always, or never (tests compare the paths).
    Always,
    Never,
}

/// Keys a step's items see, in all, from which few items are split across threads.
const SPLIT_FROM_KEYS: usize = 512;

impl HostKv {
    pub fn new(shape: AttentionShape, precision: KvPrecision) -> Self {
        Self { shape, precision, seqs: HashMap::new(), simd: kernels_available(), split: Split::Auto }
    }

    /// The portable kernel only (tests compare the two).
    pub fn without_simd(mut self) -> Self {
        self.simd = false;
        self
    }

    /// When items are split across threads (tests compare the paths).
    pub fn with_split(mut self, split: Split) -> Self {
        self.split = split;
        self
    }

    fn attend(
        &mut self,
        layer: usize,
        attn: &LayerAttention,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        chunks: &[ChunkRows],
    ) -> Result<Tensor, BackendError> {
        let mut q = q.flatten_all()?.to_vec1::<f32>()?;
        let mut k = k.flatten_all()?.to_vec1::<f32>()?;
        let v = v.flatten_all()?.to_vec1::<f32>()?;
        let t = q.len() / (self.shape.heads * self.shape.head_dim);
        let out = self.attend_host(layer, attn, &mut q, &mut k, &v, chunks)?;
        Ok(Tensor::from_vec(out, (t, self.shape.heads * self.shape.head_dim), &Device::Cpu)?)
    }

    /// [`HostKv::attend`] on host buffers (rows in chunk order); `q` and `k` are rotated in place.
    pub fn attend_host(
        &mut self,
        layer: usize,
        attn: &LayerAttention,
        q: &mut [f32],
        k: &mut [f32],
        v: &[f32],
        chunks: &[ChunkRows],
    ) -> Result<Vec<f32>, BackendError> {
        let shape = self.shape;
        let (d, width, kv_width) = (shape.head_dim, shape.heads * shape.head_dim, shape.kv_width());
        let positions = positions(chunks);
        attn.rope.apply_rows(q, d, &positions);
        attn.rope.apply_rows(k, d, &positions);
        if self.precision == KvPrecision::F16 {
            // llama.cpp multiplies f16 keys by queries converted to f16.
            round_to_f16(q, self.simd);
        }

        // Append each chunk's keys and values to its sequence's cache.
        let mut row = 0;
        for chunk in chunks {
            let precision = self.precision;
            let seq = self.seqs.entry(chunk.seq).or_insert_with(|| HostSeq {
                len: 0,
                k: vec![HostBuf::new(precision); shape.layers * shape.kv_heads],
                v: vec![HostBuf::new(precision); shape.layers * shape.kv_heads],
            });
            let heads = layer * shape.kv_heads..(layer + 1) * shape.kv_heads;
            continues(chunk, seq.k[heads.start].len() / d, layer)?;
            for (g, (keys, values)) in seq.k[heads.clone()].iter_mut().zip(&mut seq.v[heads]).enumerate() {
                for r in row..row + chunk.len {
                    keys.extend(&k[r * kv_width + g * d..][..d]);
                    values.extend(&v[r * kv_width + g * d..][..d]);
                }
            }
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
        let (seqs, simd) = (&self.seqs, self.simd);
        // One item per (query token, KV head): the `group` query heads that share the KV head read
        // its keys and values once.
        let item = |i: usize| {
            let (t, g) = (i / shape.kv_heads, i % shape.kv_heads);
            let seq = seqs.get(&chunks[owner[t]].seq)?;
            let first = attn.first_key(positions[t]);
            let group = Group {
                queries: &q[t * width + g * group * d..][..group * d],
                d,
                keys: positions[t] + 1 - first,
                scale: attn.scale,
            };
            let head = layer * shape.kv_heads + g;
            Some((group, &seq.k[head], &seq.v[head], first * d))
        };
        let items = positions.len() * shape.kv_heads;
        let mut out = vec![0f32; positions.len() * width];
        let split = match self.split {
            Split::Always => true,
            Split::Never => false,
            Split::Auto => {
                items < 4 * rayon::current_num_threads()
                    && (0..items).filter_map(|i| item(i).map(|(g, ..)| g.keys)).sum::<usize>()
                        >= SPLIT_FROM_KEYS
            }
        };
        if split {
            // Few items with many keys (a long sequence's decode step): too few to keep every thread
            // busy, so each item's work is split (flash-decoding's layout, with the same arithmetic
            // per score and per output as one task would do).
            let items: Vec<_> = (0..items).map(item).collect();
            attend_split(&items, simd, self.precision == KvPrecision::F16, &mut out, group * d);
            return Ok(out);
        }
        out.par_chunks_mut(group * d).enumerate().for_each(|(i, out)| {
            let Some((group, keys, values, from)) = item(i) else { return };
            match (keys, values) {
                (HostBuf::F16(k), HostBuf::F16(v)) => {
                    attend_group(&group, &k[from..], &v[from..], out, simd, true)
                }
                (HostBuf::F32(k), HostBuf::F32(v)) => {
                    attend_group(&group, &k[from..], &v[from..], out, simd, false)
                }
                _ => unreachable!("one precision per cache"),
            }
        });
        Ok(out)
    }
}

/// Keys per task when an item's scores are split across threads.
const SPLIT_KEY_BLOCK: usize = 256;
/// Output values per task when an item's weighted sums are split across threads.
const SPLIT_DIMS: usize = 32;

/// The split path of [`HostKv::attend_host`], in three parallel passes over all items: scores by
/// blocks of keys, the soft-max per head, weighted sums by slices of the head's dimensions. Every
/// score and output is computed exactly as [`attend_group`] computes it.
fn attend_split(
    items: &[Option<(Group, &HostBuf, &HostBuf, usize)>],
    simd: bool,
    round_weights: bool,
    out: &mut [f32],
    item_width: usize,
) {
    // Scores: (item, block of keys) → [head][key in block].
    let tasks: Vec<(usize, usize)> = items
        .iter()
        .enumerate()
        .filter_map(|(i, item)| item.as_ref().map(|(g, ..)| (i, g.keys)))
        .flat_map(|(i, keys)| (0..keys).step_by(SPLIT_KEY_BLOCK).map(move |start| (i, start)))
        .collect();
    let blocks: Vec<Vec<f32>> = tasks
        .par_iter()
        .map(|&(i, start)| {
            let (group, k, _, from) = items[i].as_ref().expect("tasks are made for items");
            let keys = start..(start + SPLIT_KEY_BLOCK).min(group.keys);
            match k {
                HostBuf::F16(k) => group_scores(group, &k[*from..], keys, simd),
                HostBuf::F32(k) => group_scores(group, &k[*from..], keys, simd),
            }
        })
        .collect();
    // Soft-max: (item, head) → the head's weights over all its keys.
    let heads = items.iter().flatten().map(|(g, ..)| g.heads()).next().unwrap_or(0);
    let mut weights: Vec<Vec<f32>> = vec![Vec::new(); items.len() * heads];
    let mut next = 0;
    for (i, item) in items.iter().enumerate() {
        let Some((group, ..)) = item else { continue };
        for h in 0..heads {
            weights[i * heads + h].reserve_exact(group.keys);
        }
        while next < tasks.len() && tasks[next].0 == i {
            let block = &blocks[next];
            let n = block.len() / heads;
            for h in 0..heads {
                weights[i * heads + h].extend_from_slice(&block[h * n..][..n]);
            }
            next += 1;
        }
    }
    weights.par_iter_mut().for_each(|w| soft_max(w, simd, round_weights));
    // Weighted sums: (item, slice of dimensions) → [head][dimension in slice].
    let d = item_width / heads.max(1);
    let slices: Vec<(usize, usize)> = items
        .iter()
        .enumerate()
        .filter(|(_, item)| item.is_some())
        .flat_map(|(i, _)| (0..d).step_by(SPLIT_DIMS).map(move |start| (i, start)))
        .collect();
    let sums: Vec<Vec<f32>> = slices
        .par_iter()
        .map(|&(i, start)| {
            let (group, _, v, from) = items[i].as_ref().expect("slices are made for items");
            let w: Vec<&[f32]> = (0..heads).map(|h| &weights[i * heads + h][..]).collect();
            let dims = start..(start + SPLIT_DIMS).min(d);
            match v {
                HostBuf::F16(v) => group_weighted_sum(group, &v[*from..], &w, dims, simd),
                HostBuf::F32(v) => group_weighted_sum(group, &v[*from..], &w, dims, simd),
            }
        })
        .collect();
    for (&(i, start), sum) in slices.iter().zip(&sums) {
        let n = sum.len() / heads;
        for h in 0..heads {
            out[i * item_width + h * d + start..][..n].copy_from_slice(&sum[h * n..][..n]);
        }
    }
}

/// One (query token, KV head) of a step: the query heads that share the KV head.
struct Group<'a> {
    /// The heads' queries, `d` values each, one after the other.
    queries: &'a [f32],
    d: usize,
    /// Keys it sees: the first `keys` positions of the slices it is given (the window's start on).
    keys: usize,
    scale: f32,
}

impl Group<'_> {
    fn heads(&self) -> usize {
        self.queries.len() / self.d
    }

    fn query(&self, h: usize) -> &[f32] {
        &self.queries[h * self.d..][..self.d]
    }
}

/// A KV element type: dot products and weighted sums of f32 queries/weights with cached rows.
trait KvElem: Copy + Send + Sync {
    fn dot(query: &[f32], key: &[Self]) -> f32;
    fn axpy(out: &mut [f32], weight: f32, value: &[Self]);
    #[cfg(target_arch = "x86_64")]
    /// Eight elements widened to f32.
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl KvElem for f32 {
    fn dot(query: &[f32], key: &[f32]) -> f32 {
        dot(query, key)
    }

    fn axpy(out: &mut [f32], weight: f32, value: &[f32]) {
        out.iter_mut().zip(value).for_each(|(o, &x)| *o = weight.mul_add(x, *o));
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const f32) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }
}

impl KvElem for f16 {
    fn dot(query: &[f32], key: &[f16]) -> f32 {
        let mut sums = [0f32; 8];
        for (x, y) in query.chunks_exact(8).zip(key.chunks_exact(8)) {
            for i in 0..8 {
                sums[i] = x[i].mul_add(y[i].to_f32(), sums[i]);
            }
        }
        hsum_lanes(sums)
    }

    fn axpy(out: &mut [f32], weight: f32, value: &[f16]) {
        out.iter_mut().zip(value).for_each(|(o, &x)| *o = weight.mul_add(x.to_f32(), *o));
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const f16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }
}

/// `out[j] = x · row_j` over f16 rows (`rows` is `[n, x.len()]`): an output projection kept in f16
/// (Whisper's tied token embedding on the CPU), the rows split across rayon's pool. Each output
/// is summed the same way wherever its chunk falls.
pub(crate) fn dot_rows_f16(x: &[f32], rows: &[f16]) -> Vec<f32> {
    const CHUNK: usize = 512;
    let d = x.len();
    assert!(d > 0 && rows.len().is_multiple_of(d), "rows are not of {d} values");
    let simd = kernels_available() && d.is_multiple_of(8);
    let mut out = vec![0f32; rows.len() / d];
    out.par_chunks_mut(CHUNK).zip(rows.par_chunks(CHUNK * d)).for_each(|(out, rows)| {
        let group = Group { queries: x, d, keys: out.len(), scale: 1.0 };
        out.copy_from_slice(&group_scores::<f16>(&group, rows, 0..out.len(), simd));
    });
    out
}

pub(crate) fn kernels_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A group's attention in three passes: scores, soft-max, weighted sum of values; `out` is the
/// heads' outputs one after the other. With `round_weights` the soft-max weights are rounded to
/// f16 before they meet the values (llama.cpp converts them to the f16 cache's type).
fn attend_group<T: KvElem>(
    group: &Group,
    keys: &[T],
    values: &[T],
    out: &mut [f32],
    simd: bool,
    round_weights: bool,
) {
    let (heads, n) = (group.heads(), group.keys);
    let mut scores = group_scores(group, keys, 0..n, simd);
    for weights in scores.chunks_exact_mut(n) {
        soft_max(weights, simd, round_weights);
    }
    let weights: Vec<&[f32]> = scores.chunks_exact(n).collect();
    let sums = group_weighted_sum(group, values, &weights, 0..group.d, simd);
    debug_assert_eq!(sums.len(), heads * group.d);
    out.copy_from_slice(&sums);
}

/// `w ← soft-max(w)`: the largest score subtracted, [`exp_shifted`], the sum in f64 as ggml sums,
/// each weight times its inverse; rounded to f16 with `round_weights`.
fn soft_max(weights: &mut [f32], simd: bool, round_weights: bool) {
    let max = weights.iter().fold(f32::NEG_INFINITY, |m, &w| m.max(w));
    exp_shifted(weights, max, simd);
    let sum: f64 = weights.iter().map(|&w| f64::from(w)).sum();
    let inv = (1.0 / sum) as f32;
    weights.iter_mut().for_each(|w| *w *= inv);
    if round_weights {
        round_to_f16(weights, simd);
    }
}

/// Scores `q_h·k_j · scale` of the group's heads for keys `range`: `[head][key]`. Each score is an
/// eight-lane dot product over the dimensions in order, then `hsum_lanes`, whichever path runs.
fn group_scores<T: KvElem>(group: &Group, keys: &[T], range: std::ops::Range<usize>, simd: bool) -> Vec<f32> {
    let (heads, n, d) = (group.heads(), range.len(), group.d);
    let mut scores = vec![0f32; heads * n];
    if n == 0 {
        return scores;
    }
    assert!(range.end * d <= keys.len(), "keys past the cache");
    #[cfg(target_arch = "x86_64")]
    if simd && d.is_multiple_of(8) {
        let mut h = 0;
        while h < heads {
            let take = (heads - h).min(4);
            // SAFETY: `simd` is set only when AVX2, FMA and F16C are available; bounds checked above.
            unsafe {
                match take {
                    4 => scores_avx2::<4, T>(group, keys, range.clone(), h, &mut scores),
                    3 => scores_avx2::<3, T>(group, keys, range.clone(), h, &mut scores),
                    2 => scores_avx2::<2, T>(group, keys, range.clone(), h, &mut scores),
                    _ => scores_avx2::<1, T>(group, keys, range.clone(), h, &mut scores),
                }
            }
            h += take;
        }
        return scores;
    }
    let _ = simd;
    for h in 0..heads {
        for (s, j) in scores[h * n..][..n].iter_mut().zip(range.clone()) {
            *s = T::dot(group.query(h), &keys[j * d..][..d]) * group.scale;
        }
    }
    scores
}

/// `Σ_j w_hj · v_j` over the dimensions `dims` of the group's value head, for each head's weights:
/// `[head][dimension]`. Each output adds its keys in order, from zero, with one FMA each.
fn group_weighted_sum<T: KvElem>(
    group: &Group,
    values: &[T],
    weights: &[&[f32]],
    dims: std::ops::Range<usize>,
    simd: bool,
) -> Vec<f32> {
    let (heads, n, width) = (weights.len(), group.keys, dims.len());
    let mut out = vec![0f32; heads * width];
    if n == 0 {
        return out;
    }
    assert!((n - 1) * group.d + dims.end <= values.len(), "values past the cache");
    #[cfg(target_arch = "x86_64")]
    if simd && dims.start.is_multiple_of(8) && width.is_multiple_of(8) {
        let mut h = 0;
        while h < heads {
            let take = (heads - h).min(4);
            // SAFETY: as in `group_scores`.
            unsafe {
                match take {
                    4 => weighted_sum_avx2::<4, T>(group, values, weights, dims.clone(), h, &mut out),
                    3 => weighted_sum_avx2::<3, T>(group, values, weights, dims.clone(), h, &mut out),
                    2 => weighted_sum_avx2::<2, T>(group, values, weights, dims.clone(), h, &mut out),
                    _ => weighted_sum_avx2::<1, T>(group, values, weights, dims.clone(), h, &mut out),
                }
            }
            h += take;
        }
        return out;
    }
    let _ = simd;
    for (h, w) in weights.iter().enumerate() {
        let out = &mut out[h * width..][..width];
        for (j, &w) in w.iter().enumerate().take(n) {
            T::axpy(out, w, &values[j * group.d + dims.start..][..width]);
        }
    }
    out
}

/// `x ← e^(x − max)` for soft-max weights (arguments ≤ 0), eight at a time where AVX2 is there. Both
/// paths run [`exp_nonpositive`]'s steps, so they agree bit for bit.
pub(crate) fn exp_shifted(values: &mut [f32], max: f32, simd: bool) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` is set only when AVX2, FMA and F16C are available.
        unsafe { exp_shifted_avx2(values, max) };
        return;
    }
    let _ = simd;
    values.iter_mut().for_each(|x| *x = exp_nonpositive(*x - max));
}

const LOG2_E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split in two so `n · ln 2` is subtracted without rounding error for |n| ≤ 126.
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;
/// Below this, e^x is under f32's smallest normal: the weight is 0.
const EXP_MIN: f32 = -87.0;

/// e^x for x ≤ 0: x = n·ln 2 + r with |r| ≤ ln 2 / 2, e^r by its Taylor series to r⁶ (relative error
/// below 2e-7), times 2ⁿ built in the exponent bits.
#[inline(always)]
pub(crate) fn exp_nonpositive(x: f32) -> f32 {
    if x < EXP_MIN {
        return 0.0;
    }
    let n = (x * LOG2_E).round_ties_even();
    let r = (-n).mul_add(LN2_LO, (-n).mul_add(LN2_HI, x));
    let mut p: f32 = 1.0 / 720.0;
    for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = p.mul_add(r, c);
    }
    p * f32::from_bits(((n as i32 + 127) << 23) as u32)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn exp_shifted_avx2(values: &mut [f32], max: f32) {
    use std::arch::x86_64::*;
    let mut chunks = values.chunks_exact_mut(8);
    let (shift, floor) = (_mm256_set1_ps(max), _mm256_set1_ps(EXP_MIN));
    for chunk in &mut chunks {
        let x = _mm256_sub_ps(_mm256_loadu_ps(chunk.as_ptr()), shift);
        let under = _mm256_cmp_ps(x, floor, _CMP_LT_OQ);
        let x = _mm256_max_ps(x, floor);
        let n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(LOG2_E)), _MM_FROUND_TO_NEAREST_INT);
        let minus_n = _mm256_sub_ps(_mm256_setzero_ps(), n);
        let r = _mm256_fmadd_ps(
            minus_n,
            _mm256_set1_ps(LN2_LO),
            _mm256_fmadd_ps(minus_n, _mm256_set1_ps(LN2_HI), x),
        );
        let mut p = _mm256_set1_ps(1.0 / 720.0);
        for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
        let e = _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
        _mm256_storeu_ps(chunk.as_mut_ptr(), _mm256_andnot_ps(under, e));
    }
    chunks.into_remainder().iter_mut().for_each(|x| *x = exp_nonpositive(*x - max));
}

/// Rounds values to the nearest f16 (kept as f32).
pub(crate) fn round_to_f16(values: &mut [f32], simd: bool) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` is set only when AVX2, FMA and F16C are available.
        unsafe { round_to_f16_f16c(values) };
        return;
    }
    let _ = simd;
    values.iter_mut().for_each(|x| *x = f16::from_f32(*x).to_f32());
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn round_to_f16_f16c(values: &mut [f32]) {
    use std::arch::x86_64::*;
    let mut chunks = values.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let x = _mm256_loadu_ps(chunk.as_ptr());
        let rounded = _mm256_cvtph_ps(_mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
        _mm256_storeu_ps(chunk.as_mut_ptr(), rounded);
    }
    chunks.into_remainder().iter_mut().for_each(|x| *x = f16::from_f32(*x).to_f32());
}

/// How many positions ahead the kernels prefetch a head's keys and values: a head's slice of a
/// position is a few cache lines, one position apart (the whole KV width), which the hardware
/// prefetcher follows poorly.
const PREFETCH_KEYS: usize = 32;

/// Prefetches the cache lines of `n` elements from `p` (only a hint: never faults).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn prefetch_row<T>(p: *const T, n: usize) {
    use std::arch::x86_64::*;
    let bytes = n * std::mem::size_of::<T>();
    for line in (0..bytes).step_by(64) {
        _mm_prefetch::<_MM_HINT_T0>((p as *const i8).wrapping_add(line));
    }
}

/// [`group_scores`] for heads `h0..h0 + H`, two keys at a time: each key's eight values are loaded
/// (and widened) once for the `H` heads; every (head, key) has its own accumulator.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scores_avx2<const H: usize, T: KvElem>(
    group: &Group,
    keys: &[T],
    range: std::ops::Range<usize>,
    h0: usize,
    scores: &mut [f32],
) {
    use std::arch::x86_64::*;
    let (d, n) = (group.d, range.len());
    let q: [*const f32; H] = std::array::from_fn(|h| group.query(h0 + h).as_ptr());
    let key = |j: usize| keys.as_ptr().wrapping_add(j * d);
    let hsum = |acc: __m256| crate::quant::hsum_avx2(acc);
    let mut j = range.start;
    while j + 2 <= range.end {
        prefetch_row(key(j + PREFETCH_KEYS), d);
        prefetch_row(key(j + 1 + PREFETCH_KEYS), d);
        let mut acc = [[_mm256_setzero_ps(); 2]; H];
        for i in (0..d).step_by(8) {
            let k = [T::load8(key(j).add(i)), T::load8(key(j + 1).add(i))];
            for h in 0..H {
                let x = _mm256_loadu_ps(q[h].add(i));
                acc[h][0] = _mm256_fmadd_ps(x, k[0], acc[h][0]);
                acc[h][1] = _mm256_fmadd_ps(x, k[1], acc[h][1]);
            }
        }
        for (h, acc) in acc.iter().enumerate() {
            let row = (h0 + h) * n + j - range.start;
            scores[row] = hsum(acc[0]) * group.scale;
            scores[row + 1] = hsum(acc[1]) * group.scale;
        }
        j += 2;
    }
    if j < range.end {
        let mut acc = [_mm256_setzero_ps(); H];
        for i in (0..d).step_by(8) {
            let k = T::load8(key(j).add(i));
            for h in 0..H {
                acc[h] = _mm256_fmadd_ps(_mm256_loadu_ps(q[h].add(i)), k, acc[h]);
            }
        }
        for (h, &acc) in acc.iter().enumerate() {
            scores[(h0 + h) * n + j - range.start] = hsum(acc) * group.scale;
        }
    }
}

/// [`group_weighted_sum`] for heads `h0..h0 + H`, sixteen dimensions at a time: each value's
/// sixteen are loaded (and widened) once for the `H` heads.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn weighted_sum_avx2<const H: usize, T: KvElem>(
    group: &Group,
    values: &[T],
    weights: &[&[f32]],
    dims: std::ops::Range<usize>,
    h0: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let width = dims.len();
    let w: [*const f32; H] = std::array::from_fn(|h| weights[h0 + h].as_ptr());
    let mut start = dims.start;
    while start < dims.end {
        let lanes = ((dims.end - start) / 8).min(2);
        let mut acc = [[_mm256_setzero_ps(); 2]; H];
        for j in 0..group.keys {
            let value = values.as_ptr().add(j * group.d + start);
            prefetch_row(value.wrapping_add(PREFETCH_KEYS * group.d), 8 * lanes);
            let v = [T::load8(value), if lanes == 2 { T::load8(value.add(8)) } else { _mm256_setzero_ps() }];
            for h in 0..H {
                let weight = _mm256_broadcast_ss(&*w[h].add(j));
                for c in 0..lanes {
                    acc[h][c] = _mm256_fmadd_ps(weight, v[c], acc[h][c]);
                }
            }
        }
        for h in 0..H {
            for (c, acc) in acc[h].iter().enumerate().take(lanes) {
                _mm256_storeu_ps(out.as_mut_ptr().add((h0 + h) * width + start - dims.start + 8 * c), *acc);
            }
        }
        start += 8 * lanes;
    }
}

/// A dot product in eight lanes (element `i` into lane `i mod 8`), as the AVX2 kernel sums.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut sums = [0f32; 8];
    let (a_chunks, b_chunks) = (a.chunks_exact(8), b.chunks_exact(8));
    let (a_rest, b_rest) = (a_chunks.remainder(), b_chunks.remainder());
    for (x, y) in a_chunks.zip(b_chunks) {
        for i in 0..8 {
            sums[i] = x[i].mul_add(y[i], sums[i]);
        }
    }
    let tail: f32 = a_rest.iter().zip(b_rest).map(|(x, y)| x * y).sum();
    hsum_lanes(sums) + tail
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
        attn: &LayerAttention,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        chunks: &[ChunkRows],
    ) -> Result<Tensor, BackendError> {
        let shape = self.shape;
        let (d, heads, kv_heads) = (shape.head_dim, shape.heads, shape.kv_heads);
        let positions = positions(chunks);
        let t = positions.len();
        let rope = attn.rope;
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
            continues(chunk, seq.k[layer].as_ref().map_or(Ok(0), |t| t.dim(0))?, layer)?;
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
            let scores = (queries.matmul(&keys_t)? * f64::from(attn.scale))?;
            // Causal: query i (position start + i) sees keys first_key..=start + i.
            let bias: Vec<f32> = (0..group)
                .flat_map(|_| {
                    (0..chunk.len).flat_map(move |i| {
                        let (first, last) = (attn.first_key(chunk.start + i), chunk.start + i);
                        (0..total)
                            .map(move |j| if (first..=last).contains(&j) { 0.0 } else { f32::NEG_INFINITY })
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

    /// Against a float64 sum over the same f16 values, split across chunks or not.
    #[test]
    fn f16_row_products_match_a_float64_sum() {
        let d = 64;
        let x = random(d, 7);
        let rows: Vec<f16> = random(1300 * d, 8).into_iter().map(f16::from_f32).collect();
        let out = dot_rows_f16(&x, &rows);
        assert_eq!(out.len(), 1300);
        for (o, row) in out.iter().zip(rows.chunks_exact(d)) {
            let exact: f64 = x.iter().zip(row).map(|(a, b)| f64::from(*a) * f64::from(b.to_f32())).sum();
            assert!((f64::from(*o) - exact).abs() < 1e-5, "{o} vs {exact}");
        }
    }

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut state = seed;
        (0..n)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((state >> 33) as f32 / (1u64 << 31) as f32) - 0.5
            })
            .collect()
    }

    /// Runs the same steps (chunked prompts, decode steps, a fork) through two implementations and
    /// returns the largest difference between their outputs.
    fn compare(mut a: KvCaches, mut b: KvCaches, style: RopeStyle, window: Option<usize>) -> f32 {
        let shape = AttentionShape { layers: 2, heads: 4, kv_heads: 2, head_dim: 16 };
        let config = RopeConfig { style, dims: 16, base: 10_000.0, freq_scale: 0.5, attn_factor: 1.1 };
        let rope = Rope::new(&config, 64, None);
        let attn = LayerAttention { rope: &rope, window, scale: 0.3 };
        // Step 1: a 5-token prompt for seq 1 and a 3-token prompt for seq 2; then decode steps,
        // a second chunk of seq 2, and a fork of seq 1 into seq 3.
        let steps: Vec<Vec<ChunkRows>> = vec![
            vec![ChunkRows { seq: 1, start: 0, len: 5 }, ChunkRows { seq: 2, start: 0, len: 3 }],
            vec![ChunkRows { seq: 1, start: 5, len: 1 }, ChunkRows { seq: 2, start: 3, len: 4 }],
            vec![ChunkRows { seq: 3, start: 4, len: 2 }, ChunkRows { seq: 2, start: 7, len: 1 }],
        ];
        let mut worst = 0f32;
        for (s, chunks) in steps.iter().enumerate() {
            if s == 2 {
                a.fork(1, 3, 4).unwrap();
                b.fork(1, 3, 4).unwrap();
            }
            let t: usize = chunks.iter().map(|c| c.len).sum();
            for layer in 0..shape.layers {
                let seed = (s * 10 + layer) as u64;
                let q = Tensor::from_vec(random(t * 64, seed), (t, 64), &Device::Cpu).unwrap();
                let k = Tensor::from_vec(random(t * 32, seed + 100), (t, 32), &Device::Cpu).unwrap();
                let v = Tensor::from_vec(random(t * 32, seed + 200), (t, 32), &Device::Cpu).unwrap();
                let x = a.attend(layer, &attn, &q, &k, &v, chunks).unwrap().to_vec2::<f32>().unwrap();
                let y = b.attend(layer, &attn, &q, &k, &v, chunks).unwrap().to_vec2::<f32>().unwrap();
                for (rx, ry) in x.iter().zip(&y) {
                    for (x, y) in rx.iter().zip(ry) {
                        worst = worst.max((x - y).abs());
                    }
                }
            }
        }
        assert_eq!((a.len(2), b.len(2)), (8, 8));
        assert_eq!((a.len(3), b.len(3)), (6, 6));
        worst
    }

    const SHAPE: AttentionShape = AttentionShape { layers: 2, heads: 4, kv_heads: 2, head_dim: 16 };

    #[test]
    fn the_host_kernel_matches_candle_ops_over_chunked_steps_and_forks() {
        // A window of 3 makes later queries skip their first keys (sliding-window layers).
        for (style, window) in
            [(RopeStyle::Interleaved, None), (RopeStyle::Neox, None), (RopeStyle::Neox, Some(3))]
        {
            let tensor = || KvCaches::Tensor(TensorKv::new(SHAPE, Device::Cpu));
            let f32_host = KvCaches::Host(HostKv::new(SHAPE, KvPrecision::F32));
            let worst = compare(f32_host, tensor(), style, window);
            assert!(worst < 1e-5, "{style:?} {window:?}, f32 caches: {worst}");
            // f16 caches round keys, values, queries and weights (inputs here are within ±0.5).
            let f16_host = KvCaches::Host(HostKv::new(SHAPE, KvPrecision::F16));
            let worst = compare(f16_host, tensor(), style, window);
            assert!(worst < 2e-3, "{style:?} {window:?}, f16 caches: {worst}");
        }
    }

    #[test]
    fn the_simd_and_portable_kernels_agree() {
        for precision in [KvPrecision::F32, KvPrecision::F16] {
            let simd = KvCaches::Host(HostKv::new(SHAPE, precision));
            let portable = KvCaches::Host(HostKv::new(SHAPE, precision).without_simd());
            // The same operations in the same order: bit-identical.
            let worst = compare(simd, portable, RopeStyle::Neox, Some(3));
            assert_eq!(worst, 0.0, "{precision:?}");
        }
    }

    /// Long sequences and grouped query heads (3 and 7 per KV head): a decode step split across
    /// threads, the same step in one task per (token, KV head), and both in portable code give the
    /// same bits, and match candle ops.
    #[test]
    fn split_and_grouped_attention_give_the_same_bits_on_long_sequences() {
        for (heads, kv_heads) in [(9, 3), (14, 2)] {
            let shape = AttentionShape { layers: 2, heads, kv_heads, head_dim: 64 };
            let rope = Rope::new(&RopeConfig::plain(RopeStyle::Neox, 64, 10_000.0), 2048, None);
            for precision in [KvPrecision::F32, KvPrecision::F16] {
                for window in [None, Some(300)] {
                    let attn = LayerAttention { rope: &rope, window, scale: 0.125 };
                    let mut caches = [
                        KvCaches::Host(HostKv::new(shape, precision).with_split(Split::Always)),
                        KvCaches::Host(HostKv::new(shape, precision).with_split(Split::Never)),
                        KvCaches::Host(
                            HostKv::new(shape, precision).without_simd().with_split(Split::Always),
                        ),
                        KvCaches::Host(HostKv::new(shape, precision).without_simd().with_split(Split::Never)),
                        KvCaches::Tensor(TensorKv::new(shape, Device::Cpu)),
                    ];
                    // A 700-token prompt beside a 5-token one, then two decode steps of both.
                    let steps = [
                        vec![
                            ChunkRows { seq: 1, start: 0, len: 700 },
                            ChunkRows { seq: 2, start: 0, len: 5 },
                        ],
                        vec![
                            ChunkRows { seq: 1, start: 700, len: 1 },
                            ChunkRows { seq: 2, start: 5, len: 1 },
                        ],
                        vec![
                            ChunkRows { seq: 2, start: 6, len: 1 },
                            ChunkRows { seq: 1, start: 701, len: 1 },
                        ],
                    ];
                    for (s, chunks) in steps.iter().enumerate() {
                        let t: usize = chunks.iter().map(|c| c.len).sum();
                        for layer in 0..shape.layers {
                            let seed = (s * 10 + layer) as u64 + 1000;
                            let (qw, kw) = (heads * 64, kv_heads * 64);
                            let q = Tensor::from_vec(random(t * qw, seed), (t, qw), &Device::Cpu).unwrap();
                            let k =
                                Tensor::from_vec(random(t * kw, seed + 100), (t, kw), &Device::Cpu).unwrap();
                            let v =
                                Tensor::from_vec(random(t * kw, seed + 200), (t, kw), &Device::Cpu).unwrap();
                            let outs: Vec<Vec<f32>> = caches
                                .iter_mut()
                                .map(|c| {
                                    let out = c.attend(layer, &attn, &q, &k, &v, chunks).unwrap();
                                    out.flatten_all().unwrap().to_vec1::<f32>().unwrap()
                                })
                                .collect();
                            let case =
                                format!("{heads}/{kv_heads} {precision:?} {window:?} step {s} layer {layer}");
                            for (i, out) in outs[1..4].iter().enumerate() {
                                let same = out.iter().zip(&outs[0]).all(|(a, b)| a.to_bits() == b.to_bits());
                                assert!(
                                    same,
                                    "{case}: host variant {} differs from the split SIMD one",
                                    i + 1
                                );
                            }
                            let tolerance = if precision == KvPrecision::F32 { 1e-5 } else { 2e-3 };
                            let worst =
                                outs[0].iter().zip(&outs[4]).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                            assert!(worst < tolerance, "{case}: {worst} from candle ops");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn the_soft_max_exp_is_accurate_and_the_same_in_simd() {
        let xs: Vec<f32> =
            (0..20_000).map(|i| -(i as f32) * 0.0047).chain([0.0, -86.9, -87.5, -1e30]).collect();
        let (mut simd, mut portable) = (xs.clone(), xs.clone());
        exp_shifted(&mut simd, 0.0, kernels_available());
        exp_shifted(&mut portable, 0.0, false);
        for ((&x, &a), &b) in xs.iter().zip(&simd).zip(&portable) {
            assert_eq!(a.to_bits(), b.to_bits(), "e^{x}: {a} vs {b}");
            let exact = f64::from(x).exp();
            if x >= EXP_MIN {
                assert!((f64::from(a) - exact).abs() <= 3e-7 * exact, "e^{x}: {a} vs {exact}");
            } else {
                assert_eq!(a, 0.0);
            }
        }
    }

    #[test]
    fn f16_caches_take_half_the_bytes() {
        let host = |p| KvCaches::Host(HostKv::new(SHAPE, p)).bytes_per_token();
        assert_eq!(host(KvPrecision::F32), 2 * 2 * 32 * 4);
        assert_eq!(host(KvPrecision::F16), 2 * 2 * 32 * 2);
    }

    #[test]
    fn a_chunk_that_does_not_continue_its_cache_is_refused() {
        let shape = AttentionShape { layers: 1, heads: 1, kv_heads: 1, head_dim: 2 };
        let rope = Rope::new(&RopeConfig::plain(RopeStyle::Neox, 2, 10_000.0), 8, None);
        let mut kv = KvCaches::Host(HostKv::new(shape, KvPrecision::F16));
        let x = Tensor::zeros((1, 2), DType::F32, &Device::Cpu).unwrap();
        let err = kv
            .attend(
                0,
                &LayerAttention::causal(&rope, 2),
                &x,
                &x,
                &x,
                &[ChunkRows { seq: 1, start: 3, len: 1 }],
            )
            .err()
            .unwrap();
        assert!(err.to_string().contains("starts at 3"), "{err}");
    }
}
