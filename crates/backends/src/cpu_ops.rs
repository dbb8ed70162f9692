//! Host versions of operations candle runs slowly on the CPU, for f32 tensors there:
//! - soft-max over the last dimension and the exact (erf) GELU, which candle computes through libm
//!   one scalar at a time: here with [`crate::attention`]'s vectorised exponential and an erf that
//!   needs no libm call, so the compiler vectorises it (candle custom ops);
//! - products with a few rows (a decoder's one new token): candle's matmul packs the whole weight
//!   matrix for every call, which costs more than the product; [`linear_rows`] and
//!   [`attend_rows`] read the weights and keys in place, rows in parallel.
//!
//! Elsewhere (GPUs, other dtypes, many rows) the callers use candle's own ops.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::attention::{exp_nonpositive, exp_shifted, kernels_available};

/// Whether `x` takes the host path: f32 on the CPU.
pub fn on_host(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == candle_core::DType::F32
}

/// Soft-max over the last dimension.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if on_host(x) {
        x.contiguous()?.apply_op1_no_bwd(&SoftmaxLastDim)
    } else {
        candle_nn::ops::softmax_last_dim(x)
    }
}

/// `x · Φ(x)`, Φ the standard normal CDF (GELU as BERT and Whisper define it, not the tanh form).
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if on_host(x) {
        x.contiguous()?.apply_op1_no_bwd(&GeluErf)
    } else {
        x.gelu_erf()
    }
}

/// At most this many rows take the host paths of [`linear_rows`] and [`attend_rows`].
pub const HOST_MAX_ROWS: usize = 4;

/// `x · wᵀ + b` for `x` `[rows, in]` and `w` `[out, in]` (a Linear's layout); `None` when this is
/// not a host case (more than [`HOST_MAX_ROWS`] rows, or not f32 on the CPU).
pub fn linear_rows(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Option<Tensor>> {
    let (rows, inner) = x.dims2()?;
    if rows > HOST_MAX_ROWS || !on_host(x) || !on_host(w) || !w.is_contiguous() {
        return Ok(None);
    }
    let (out_dim, w_inner) = w.dims2()?;
    if w_inner != inner {
        candle_core::bail!("linear_rows: x has {inner} columns, w has {w_inner}");
    }
    let x = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    let bias = match b {
        Some(b) => Some(b.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?),
        None => None,
    };
    let (storage, layout) = w.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else { return Ok(None) };
    let weights = contiguous_f32(cpu, layout)?;
    let simd = kernels_available();
    // Output-major (`[out, rows]`): each weight row is read once, for every input row, and its
    // values are one contiguous chunk, so rows of the weights are split across threads as is.
    let mut by_output = vec![0f32; out_dim * rows];
    by_output.par_chunks_mut(rows).with_min_len(64).enumerate().for_each(|(o, values)| {
        let w_row = &weights[o * inner..][..inner];
        for (r, value) in values.iter_mut().enumerate() {
            *value = dot(&x[r * inner..][..inner], w_row, simd) + bias.as_ref().map_or(0.0, |b| b[o]);
        }
    });
    let out = match rows {
        1 => by_output,
        _ => (0..rows * out_dim).map(|k| by_output[(k % out_dim) * rows + k / out_dim]).collect(),
    };
    Ok(Some(Tensor::from_vec(out, (rows, out_dim), &candle_core::Device::Cpu)?))
}

/// softmax(q kᵀ · scale + causal mask) v for `q` `[heads, t, d]` with at most [`HOST_MAX_ROWS`]
/// rows, over `k`, `v` `[heads, s, d]`; query i sits at position `offset + i` when causal. `None`
/// when this is not a host case.
pub fn attend_rows(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    causal_offset: Option<usize>,
) -> Result<Option<Tensor>> {
    let (heads, t, d) = q.dims3()?;
    if t > HOST_MAX_ROWS {
        return Ok(None);
    }
    if ![q, k, v].iter().all(|x| on_host(x) && x.is_contiguous()) {
        return Ok(None);
    }
    // Read in place: the keys and values are the whole audio window's (1500 rows per head).
    let (qs, ql) = q.storage_and_layout();
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let (candle_core::Storage::Cpu(qc), candle_core::Storage::Cpu(kc), candle_core::Storage::Cpu(vc)) =
        (&*qs, &*ks, &*vs)
    else {
        return Ok(None);
    };
    let (q, k, v) = (contiguous_f32(qc, ql)?, contiguous_f32(kc, kl)?, contiguous_f32(vc, vl)?);
    let s = k.len() / (heads * d);
    let simd = kernels_available();
    let mut out = vec![0f32; heads * t * d];
    out.par_chunks_mut(d).enumerate().for_each(|(index, out)| {
        let (h, i) = (index / t, index % t);
        let visible = causal_offset.map_or(s, |offset| (offset + i + 1).min(s));
        let q_row = &q[(h * t + i) * d..][..d];
        let keys = &k[h * s * d..][..visible * d];
        let mut scores: Vec<f32> = keys.chunks_exact(d).map(|key| dot(q_row, key, simd) * scale).collect();
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        exp_shifted(&mut scores, max, simd);
        let norm = 1.0 / scores.iter().sum::<f32>();
        let values = &v[h * s * d..][..visible * d];
        for (w, value) in scores.iter().zip(values.chunks_exact(d)) {
            let w = w * norm;
            out.iter_mut().zip(value).for_each(|(o, x)| *o += w * x);
        }
    });
    Ok(Some(Tensor::from_vec(out, (heads, t, d), &candle_core::Device::Cpu)?))
}

#[inline(always)]
fn dot_lanes(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (mut ca, mut cb) = (a.chunks_exact(8), b.chunks_exact(8));
    for (x, y) in (&mut ca).zip(&mut cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

fn dot(a: &[f32], b: &[f32], simd: bool) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` is set only when AVX2 and FMA are available.
        return unsafe { dot_avx2(a, b) };
    }
    let _ = simd;
    dot_lanes(a, b)
}

/// [`dot_lanes`] compiled for AVX2: its eight lanes become one vector register.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_lanes(a, b)
}

fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("the host ops need contiguous tensors".into()))?;
    Ok(&storage.as_slice::<f32>()?[start..end])
}

/// Rows of this many values or more are worth a task each.
const PARALLEL_MIN_VALUES: usize = 1 << 14;

struct SoftmaxLastDim;

impl CustomOp1 for SoftmaxLastDim {
    fn name(&self) -> &'static str {
        "hearth-softmax-last-dim"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let src = contiguous_f32(storage, layout)?;
        let n = layout.dims().last().copied().unwrap_or(1).max(1);
        let mut dst = src.to_vec();
        let simd = kernels_available();
        let row = |values: &mut [f32]| {
            let max = values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            if max == f32::NEG_INFINITY {
                values.fill(0.0); // every key masked: no weight anywhere (the caller never does this)
                return;
            }
            exp_shifted(values, max, simd);
            let scale = 1.0 / values.iter().sum::<f32>();
            values.iter_mut().for_each(|v| *v *= scale);
        };
        if dst.len() >= PARALLEL_MIN_VALUES {
            dst.par_chunks_mut(n).for_each(row);
        } else {
            dst.chunks_mut(n).for_each(row);
        }
        Ok((CpuStorage::F32(dst), layout.shape().clone()))
    }
}

struct GeluErf;

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "hearth-gelu-erf"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let src = contiguous_f32(storage, layout)?;
        let mut dst = vec![0f32; src.len()];
        let simd = kernels_available();
        let chunk = PARALLEL_MIN_VALUES;
        dst.par_chunks_mut(chunk).zip(src.par_chunks(chunk)).for_each(|(out, x)| gelu_slice(x, out, simd));
        Ok((CpuStorage::F32(dst), layout.shape().clone()))
    }
}

fn gelu_slice(x: &[f32], out: &mut [f32], simd: bool) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` is set only when AVX2 and FMA are available.
        unsafe { gelu_slice_avx2(x, out) };
        return;
    }
    let _ = simd;
    x.iter().zip(out).for_each(|(&x, out)| *out = gelu(x));
}

/// The same loop compiled for AVX2 and FMA, which the compiler vectorises (no calls inside).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gelu_slice_avx2(x: &[f32], out: &mut [f32]) {
    x.iter().zip(out).for_each(|(&x, out)| *out = gelu(x));
}

#[inline(always)]
fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// erf(x) = 1 − erfc(|x|) with the sign of x; erfc(z) = t · e^(−z² + P(t)), t = 1 / (1 + z/2), the
/// Chebyshev fit of Numerical Recipes (§6.2, fractional error below 1.2e-7 for every z ≥ 0).
#[inline(always)]
#[allow(clippy::excessive_precision, reason = "the coefficients as published")]
fn erf(x: f32) -> f32 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let mut p: f32 = 0.170_872_77;
    for c in [
        -0.822_152_23,
        1.488_515_87,
        -1.135_203_98,
        0.278_868_07,
        -0.186_288_06,
        0.096_784_18,
        0.374_091_96,
        1.000_023_68,
    ] {
        p = p.mul_add(t, c);
    }
    let p = p.mul_add(t, -1.265_512_23);
    // The exponent is at most ~1e-8 above 0 (at z = 0): clamp so e^x's argument stays ≤ 0.
    let erfc = t * exp_nonpositive((p - z * z).min(0.0));
    let magnitude = 1.0 - erfc;
    if x < 0.0 {
        -magnitude
    } else {
        magnitude
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// erf against its Maclaurin series (|x| < 2, in f64) and its known values: an independent
    /// check of the fit's coefficients.
    #[test]
    fn erf_matches_its_series_to_f32_precision() {
        let series = |x: f64| {
            let (mut term, mut sum) = (x, x);
            for n in 1..80 {
                term *= -x * x / n as f64;
                sum += term / (2 * n + 1) as f64;
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        };
        for i in -400..=400 {
            let x = i as f64 / 200.0;
            let (ours, exact) = (erf(x as f32) as f64, series(x));
            assert!((ours - exact).abs() < 3e-7, "erf({x}) = {ours}, series {exact}");
        }
        assert!((erf(3.0) as f64 - 0.999_977_909_503_001_4).abs() < 1e-7);
        assert_eq!(erf(10.0), 1.0);
        assert_eq!(erf(-10.0), -1.0);
    }

    #[test]
    fn host_ops_agree_with_candles() {
        let values: Vec<f32> = (0..3 * 40_000).map(|i| ((i * 7919) % 2000) as f32 / 100.0 - 10.0).collect();
        let x = Tensor::from_vec(values, (3, 200, 200), &candle_core::Device::Cpu).unwrap();
        let close = |a: &Tensor, b: &Tensor, tolerance: f32| {
            let diff = (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
            let diff = diff.to_scalar::<f32>().unwrap();
            assert!(diff < tolerance, "{diff}");
        };
        close(&softmax_last_dim(&x).unwrap(), &candle_nn::ops::softmax_last_dim(&x).unwrap(), 1e-6);
        close(&gelu_erf(&x).unwrap(), &x.gelu_erf().unwrap(), 5e-6);
        let small = x.narrow(1, 0, 2).unwrap().contiguous().unwrap();
        close(&softmax_last_dim(&small).unwrap(), &candle_nn::ops::softmax_last_dim(&small).unwrap(), 1e-6);

        // A Linear with 3 rows, and attention of 2 rows over 7 keys, against candle's matmuls.
        let w = (x.narrow(0, 0, 1).unwrap().squeeze(0).unwrap() * 0.01).unwrap(); // [200, 200]
        let w = w.narrow(0, 0, 130).unwrap().contiguous().unwrap(); // [130 out, 200 in]
        let b = w.narrow(1, 0, 1).unwrap().squeeze(1).unwrap().contiguous().unwrap();
        let rows =
            x.narrow(0, 1, 1).unwrap().squeeze(0).unwrap().narrow(0, 0, 3).unwrap().contiguous().unwrap();
        let expected = rows.matmul(&w.t().unwrap()).unwrap().broadcast_add(&b).unwrap();
        close(&linear_rows(&rows, &w, Some(&b)).unwrap().unwrap(), &expected, 1e-4);
        assert!(linear_rows(&x.narrow(0, 0, 1).unwrap().squeeze(0).unwrap(), &w, None).unwrap().is_none());

        let heads = |t: usize, offset: usize| {
            let v = x.flatten_all().unwrap().narrow(0, offset, 4 * t * 16).unwrap();
            (v.reshape((4, t, 16)).unwrap() * 0.05).unwrap()
        };
        let (q, k, v) = (heads(2, 0), heads(7, 1000), heads(7, 5000));
        let scores = (q.matmul(&k.t().unwrap()).unwrap() * 0.25).unwrap();
        let mask: Vec<f32> = (0..2)
            .flat_map(|i| (0..7).map(move |j| if j > 5 + i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        let masked = scores
            .broadcast_add(&Tensor::from_vec(mask, (1, 2, 7), &candle_core::Device::Cpu).unwrap())
            .unwrap();
        let expected = candle_nn::ops::softmax_last_dim(&masked).unwrap().matmul(&v).unwrap();
        close(&attend_rows(&q, &k, &v, 0.25, Some(5)).unwrap().unwrap(), &expected, 1e-5);
        let expected = candle_nn::ops::softmax_last_dim(&scores).unwrap().matmul(&v).unwrap();
        close(&attend_rows(&q, &k, &v, 0.25, None).unwrap().unwrap(), &expected, 1e-5);
    }
}
