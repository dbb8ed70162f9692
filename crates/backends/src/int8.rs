//! Int8 matrix products for many-row inputs on CPUs with AVX-512 VNNI (Whisper's encoder: 1500
//! rows a window, bound by arithmetic, where f32 GEMM is half of the time).
//!
//! The arithmetic is CTranslate2's int8 mode with finer activation scales: weights quantized once
//! per output row (symmetric, `s_w = max|w| / 127`), activations on the fly per block of 128
//! inputs of a row (`s_x = max|x| / 127`, rounded to nearest-even; one outlier channel then
//! coarsens its own block, not the whole row), each block's integer products summed exactly in
//! i32 and scaled into an f32 sum, the weight scale applied at the end:
//! `y = s_w · Σ_blocks s_x · Σ q_x q_w`. `vpdpbusd` multiplies unsigned by signed bytes, so the
//! activations are shifted by 128 into `u8` and `128 · Σ q_w` (kept per weight row and block) is
//! subtracted again.
//!
//! Layout: the weights are packed in panels of 16 output rows, 4 inputs deep (`[n/16][k/4][16][4]`
//! bytes), so one 64-byte load feeds one `vpdpbusd` for 16 outputs; a tile of 3 input rows × 64
//! outputs keeps its integer and float accumulators in registers and is scaled and stored from
//! there. Rows are split across rayon's pool 30 at a time (each task quantizes its own rows and
//! writes its own outputs). Each output is computed the same way whatever the number of rows or
//! the tile it falls in.

use rayon::prelude::*;

use crate::error::BackendError;

/// Outputs per panel (one zmm of i32) and panels per tile.
const PANEL: usize = 16;
const TILE_PANELS: usize = 4;
const TILE_COLUMNS: usize = PANEL * TILE_PANELS;
/// Input rows per tile (3 rows × 4 panels: 12 integer and 12 float accumulators in registers),
/// and per rayon task.
const TILE_ROWS: usize = 3;
const ROWS_PER_TASK: usize = 30;
/// Inputs sharing one activation scale.
const BLOCK: usize = 128;

/// Whether this CPU has the instructions [`Int8Matrix`] needs (AVX-512 F/BW and VNNI).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A weight matrix `[n, k]` in int8 per output row, packed for the VNNI kernel.
pub struct Int8Matrix {
    n: usize,
    k: usize,
    /// `k` rounded up to a multiple of 4 (padding weights are zero).
    k4: usize,
    /// Activation blocks per row (`k4 / BLOCK`, rounded up).
    blocks: usize,
    /// Panels of the `n` outputs rounded up to a whole tile (padding rows are zero).
    packed: Vec<i8>,
    /// Per output row (padded to whole tiles with zeros).
    scales: Vec<f32>,
    /// `128 · Σ q_w` over each activation block, `[blocks][n padded]`.
    offsets: Vec<i32>,
}

impl Int8Matrix {
    /// Quantizes a row-major f32 `[n, k]` matrix; `None` where the CPU lacks VNNI.
    pub fn from_f32(weights: &[f32], n: usize, k: usize) -> Result<Option<Self>, BackendError> {
        if weights.len() != n * k || k == 0 {
            return Err(BackendError::Unsupported(format!(
                "{} values do not make a [{n}, {k}] matrix",
                weights.len()
            )));
        }
        if !available() {
            return Ok(None);
        }
        let k4 = k.div_ceil(4) * 4;
        let blocks = k4.div_ceil(BLOCK);
        let n_padded = n.div_ceil(TILE_COLUMNS) * TILE_COLUMNS;
        let mut packed = vec![0i8; n_padded * k4];
        let mut scales = vec![0f32; n_padded];
        let mut offsets = vec![0i32; blocks * n_padded];
        for (row, w) in weights.chunks_exact(k).enumerate() {
            let amax = w.iter().fold(0f32, |m, v| m.max(v.abs()));
            let inverse = if amax == 0.0 { 0.0 } else { 127.0 / amax };
            let (panel, lane) = (row / PANEL, row % PANEL);
            for (i, &v) in w.iter().enumerate() {
                let q = (v * inverse).round_ties_even().clamp(-127.0, 127.0) as i8;
                offsets[(i / BLOCK) * n_padded + row] += 128 * i32::from(q);
                packed[panel * k4 * PANEL + (i / 4) * PANEL * 4 + lane * 4 + i % 4] = q;
            }
            scales[row] = amax / 127.0;
        }
        Ok(Some(Self { n, k, k4, blocks, packed, scales, offsets }))
    }

    pub fn rows(&self) -> usize {
        self.n
    }

    pub fn cols(&self) -> usize {
        self.k
    }

    /// `y = x Wᵀ` for `x` of `m` rows of `k` values; returns `m` rows of `n` values.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        assert_eq!(x.len(), m * self.k, "input is not {m} rows of {}", self.k);
        let mut y = vec![0f32; m * self.n];
        if m == 0 {
            return y;
        }
        let (k, k4, n, blocks) = (self.k, self.k4, self.n, self.blocks);
        y.par_chunks_mut(ROWS_PER_TASK * n).zip(x.par_chunks(ROWS_PER_TASK * k)).for_each(|(y, x)| {
            let rows = x.len() / k;
            let mut activations = vec![128u8; rows * k4];
            let mut row_scales = vec![0f32; rows * blocks];
            for ((out, scales), x) in activations
                .chunks_exact_mut(k4)
                .zip(row_scales.chunks_exact_mut(blocks))
                .zip(x.chunks_exact(k))
            {
                for ((out, scale), x) in out.chunks_mut(BLOCK).zip(scales.iter_mut()).zip(x.chunks(BLOCK)) {
                    // SAFETY: `available()` held when the matrix was built (`from_f32` returns
                    // None otherwise); `out` holds at least `x.len()` bytes.
                    *scale = unsafe { quantize_block(x, out) };
                }
            }
            // SAFETY: as above; `activations` holds `rows` rows of `k4` bytes, `row_scales`
            // `rows × blocks` scales, `y` `rows` rows of `n` values, and `packed`, `scales` and
            // `offsets` cover whole tiles of outputs.
            unsafe { self.rows_product(&activations, &row_scales, rows, y) };
        });
        y
    }

    /// Every output of `rows` quantized rows, tile by tile.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn rows_product(&self, a: &[u8], row_scales: &[f32], rows: usize, y: &mut [f32]) {
        let tiles = self.packed.len() / (self.k4 * TILE_COLUMNS);
        for tile in 0..tiles {
            let mut row = 0;
            while row + TILE_ROWS <= rows {
                self.tile::<TILE_ROWS>(a, row_scales, row, tile, y);
                row += TILE_ROWS;
            }
            match rows - row {
                2 => self.tile::<2>(a, row_scales, row, tile, y),
                1 => self.tile::<1>(a, row_scales, row, tile, y),
                _ => {}
            }
        }
    }

    /// Outputs `64·tile ..` of rows `row .. row + R`:
    /// `s_w · Σ_blocks s_x · (Σ (q_x + 128) q_w − 128 Σ q_w)`, each block's integer sum exact.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    #[inline]
    #[allow(clippy::needless_range_loop)] // indices name registers (rows × panels)
    unsafe fn tile<const R: usize>(
        &self,
        a: &[u8],
        row_scales: &[f32],
        row: usize,
        tile: usize,
        y: &mut [f32],
    ) {
        use std::arch::x86_64::*;
        let (k4, blocks) = (self.k4, self.blocks);
        let n_padded = self.scales.len();
        let first = tile * TILE_COLUMNS;
        let mut sums = [[_mm512_setzero_ps(); TILE_PANELS]; R];
        let rows: [*const u8; R] = std::array::from_fn(|r| a.as_ptr().add((row + r) * k4));
        let w = self.packed.as_ptr().add(tile * k4 * TILE_COLUMNS);
        let panel_stride = k4 * PANEL;
        for block in 0..blocks {
            let mut acc = [[_mm512_setzero_si512(); TILE_PANELS]; R];
            for step in block * BLOCK / 4..((block + 1) * BLOCK / 4).min(k4 / 4) {
                let b: [__m512i; TILE_PANELS] = std::array::from_fn(|p| {
                    _mm512_loadu_si512(w.add(p * panel_stride + step * PANEL * 4) as *const _)
                });
                for r in 0..R {
                    let x = _mm512_set1_epi32((rows[r].add(step * 4) as *const i32).read_unaligned());
                    for p in 0..TILE_PANELS {
                        acc[r][p] = _mm512_dpbusd_epi32(acc[r][p], x, b[p]);
                    }
                }
            }
            let offsets = self.offsets.as_ptr().add(block * n_padded + first);
            for p in 0..TILE_PANELS {
                let offset = _mm512_loadu_si512(offsets.add(p * PANEL) as *const _);
                for r in 0..R {
                    let scale = _mm512_set1_ps(row_scales[(row + r) * blocks + block]);
                    let exact = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][p], offset));
                    sums[r][p] = _mm512_fmadd_ps(scale, exact, sums[r][p]);
                }
            }
        }
        for p in 0..TILE_PANELS {
            let column = first + p * PANEL;
            if column >= self.n {
                break;
            }
            let live = (self.n - column).min(PANEL);
            let mask: __mmask16 = if live == PANEL { 0xFFFF } else { (1u16 << live) - 1 };
            let scales = _mm512_loadu_ps(self.scales.as_ptr().add(column));
            for r in 0..R {
                let out = y.as_mut_ptr().add((row + r) * self.n + column);
                _mm512_mask_storeu_ps(out, mask, _mm512_mul_ps(scales, sums[r][p]));
            }
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn rows_product(&self, _: &[u8], _: &[f32], _: usize, _: &mut [f32]) {
        unreachable!("Int8Matrix is built only where AVX-512 VNNI is available")
    }
}

/// One block of activations as `u8` (`q + 128`, `q = round(x / s)` to nearest-even,
/// `s = max|x| / 127`) into `out`; returns `s`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn quantize_block(x: &[f32], out: &mut [u8]) -> f32 {
    use std::arch::x86_64::*;
    let chunks = x.len().div_ceil(16);
    let mask = |i: usize| -> __mmask16 {
        let live = (x.len() - i * 16).min(16);
        if live == 16 {
            0xFFFF
        } else {
            (1u16 << live) - 1
        }
    };
    let mut max = _mm512_setzero_ps();
    for i in 0..chunks {
        max = _mm512_max_ps(max, _mm512_abs_ps(_mm512_maskz_loadu_ps(mask(i), x.as_ptr().add(i * 16))));
    }
    let amax = _mm512_reduce_max_ps(max);
    let inverse = _mm512_set1_ps(if amax == 0.0 { 0.0 } else { 127.0 / amax });
    let shift = _mm512_set1_epi32(128);
    for i in 0..chunks {
        let v = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask(i), x.as_ptr().add(i * 16)), inverse);
        // Default rounding: to nearest-even; |v| ≤ 127, so q + 128 is in 1..=255.
        let q = _mm512_add_epi32(_mm512_cvtps_epi32(v), shift);
        _mm512_mask_cvtepi32_storeu_epi8(out.as_mut_ptr().add(i * 16) as *mut _, mask(i), q);
    }
    amax / 127.0
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn quantize_block(_: &[f32], _: &mut [u8]) -> f32 {
    unreachable!("Int8Matrix is built only where AVX-512 VNNI is available")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn xorshift(seed: u64) -> impl FnMut() -> f32 {
        let mut s = seed;
        move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        }
    }

    /// The kernel's sums are the exact integer products of the quantized values (computed here
    /// in i64 from the same quantization), for shapes with partial tiles, padded `k` and a row
    /// of zeros; and the product is close to the f32 one.
    #[test]
    fn int8_products_are_the_exact_sums_of_the_quantized_values() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX-512 VNNI (Int8Matrix is never built here)");
            return;
        }
        for (m, n, k) in [(1, 16, 4), (7, 70, 30), (13, 130, 512), (5, 64, 2048), (70, 40, 36), (4, 20, 300)]
        {
            let mut rand = xorshift(m as u64 * 1000 + n as u64);
            let w: Vec<f32> = (0..n * k).map(|_| rand()).collect();
            let mut x: Vec<f32> = (0..m * k).map(|_| rand() * 3.0).collect();
            x[..k].fill(0.0);
            let matrix = Int8Matrix::from_f32(&w, n, k).unwrap().unwrap();
            let y = matrix.matmul(&x, m);
            let quantize = |v: &[f32]| {
                let amax = v.iter().fold(0f32, |a, x| a.max(x.abs()));
                let inv = if amax == 0.0 { 0.0 } else { 127.0 / amax };
                (amax / 127.0, v.iter().map(|x| (x * inv).round_ties_even() as i64).collect::<Vec<_>>())
            };
            let mut worst = 0f32;
            for i in 0..m {
                let xi = &x[i * k..(i + 1) * k];
                let blocks: Vec<(f32, Vec<i64>)> = xi.chunks(BLOCK).map(quantize).collect();
                for j in 0..n {
                    let (sw, qw) = quantize(&w[j * k..(j + 1) * k]);
                    let mut sum = 0f32;
                    for (b, (sx, qx)) in blocks.iter().enumerate() {
                        let exact: i64 = qx.iter().zip(&qw[b * BLOCK..]).map(|(a, b)| a * b).sum();
                        sum = sx.mul_add(exact as f32, sum);
                    }
                    assert_eq!(y[i * n + j], sw * sum, "[{m}x{k}]·[{n}x{k}]ᵀ at ({i}, {j})");
                    let float: f32 = xi.iter().zip(&w[j * k..(j + 1) * k]).map(|(a, b)| a * b).sum();
                    worst = worst.max((y[i * n + j] - float).abs() / (k as f32).sqrt());
                }
            }
            assert!(worst < 0.05, "[{m}x{k}]: {worst}");
        }
    }
}
