//! Sample-rate conversion with a band-limited FFT resampler (rubato's `FftFixedInOut`): exact for
//! any pair of integer rates, with no aliasing from dropped samples.

use rubato::{FftFixedInOut, Resampler};

use crate::AudioError;

/// Input frames per FFT block; the resampler rounds it to a multiple its rate ratio needs.
const CHUNK_FRAMES: usize = 1024;

/// Resamples mono `samples` from `from_hz` to `to_hz`. The output has `len × to / from` samples
/// (rounded up), aligned with the input: the resampler's delay is removed.
pub fn resample(samples: &[f32], from_hz: u32, to_hz: u32) -> Result<Vec<f32>, AudioError> {
    if from_hz == to_hz || samples.is_empty() {
        return Ok(samples.to_vec());
    }
    let failed = |detail: String| AudioError::Resample { from_hz, to_hz, detail };
    // An even number of the ratio's smallest blocks keeps the resampler's delay a whole number
    // of output samples, so removing it leaves no fractional shift.
    let smallest_block = (from_hz / gcd(from_hz, to_hz)) as usize;
    let blocks = CHUNK_FRAMES.div_ceil(smallest_block).next_multiple_of(2);
    let mut resampler =
        FftFixedInOut::<f32>::new(from_hz as usize, to_hz as usize, blocks * smallest_block, 1)
            .map_err(|error| failed(error.to_string()))?;
    let wanted = (samples.len() as u128 * u128::from(to_hz)).div_ceil(u128::from(from_hz)) as usize;
    let delay = resampler.output_delay();
    let mut output = Vec::with_capacity(wanted + delay + resampler.output_frames_max());
    let mut block = vec![vec![0f32; resampler.output_frames_max()]];
    let mut position = 0;
    while output.len() < wanted + delay {
        let needed = resampler.input_frames_next();
        let (_, produced) = if position + needed <= samples.len() {
            let input = [&samples[position..position + needed]];
            position += needed;
            resampler.process_into_buffer(&input, &mut block, None)
        } else {
            // The tail, then zeros until the delayed output has caught up.
            let tail = &samples[position.min(samples.len())..];
            position = samples.len();
            // rubato treats an empty channel as inactive: pass no input, which it fills with zeros.
            let input = [tail];
            let input = if tail.is_empty() { None } else { Some(&input[..]) };
            resampler.process_partial_into_buffer(input, &mut block, None)
        }
        .map_err(|error| failed(error.to_string()))?;
        output.extend_from_slice(&block[0][..produced]);
    }
    output.drain(..delay);
    output.truncate(wanted);
    Ok(output)
}

fn gcd(mut a: u32, mut b: u32) -> u32 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sine(rate_hz: u32, freq_hz: f32, secs: f32) -> Vec<f32> {
        let n = (rate_hz as f32 * secs) as usize;
        (0..n)
            .map(|i| (2.0 * std::f32::consts::PI * freq_hz * i as f32 / rate_hz as f32).sin() * 0.5)
            .collect()
    }

    #[test]
    fn a_tone_keeps_its_frequency_phase_and_length() {
        for from in [8_000, 22_050, 44_100, 48_000] {
            let input = sine(from, 440.0, 1.0);
            let output = resample(&input, from, 16_000).unwrap();
            assert_eq!(output.len(), (input.len() * 16_000).div_ceil(from as usize), "{from} Hz");
            let expected = sine(16_000, 440.0, 1.0);
            // Away from the edges the resampled tone is the tone sampled at 16 kHz.
            let worst = (800..15_200).map(|i| (output[i] - expected[i]).abs()).fold(0f32, f32::max);
            assert!(worst < 2e-3, "{from} Hz: worst error {worst}");
        }
    }

    #[test]
    fn content_above_the_new_nyquist_is_removed_not_aliased() {
        // 7 kHz fits under 48 kHz's Nyquist and not under 8 kHz's: dropping samples would fold it
        // to 1 kHz at full strength.
        let output = resample(&sine(48_000, 7_000.0, 1.0), 48_000, 8_000).unwrap();
        let rms = (output[400..7_600].iter().map(|x| x * x).sum::<f32>() / 7_200.0).sqrt();
        assert!(rms < 0.01, "rms {rms}");
    }
}
