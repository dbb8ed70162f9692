//! crates/audio against independent references: log-mel features from faster-whisper's numpy
//! extractor (scripts/reference/whisper_mel.py), WAV files of every PCM layout written here by
//! hand, and every kind of bad input. A short proptest run feeds mutated and random bytes to the
//! decoders (regressions are kept in tests/fuzz-regressions/ by proptest).

use hearth_audio::mel::MelSpectrogram;
use hearth_audio::{decode, decode_to_rate, AudioError, DecodeLimits, MelConfig};
use proptest::prelude::*;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!("{FIXTURES}/{name}")).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

#[test]
fn log_mel_matches_faster_whispers_extractor() {
    let audio = decode(&fixture("speechlike.wav"), &DecodeLimits::default()).unwrap();
    assert_eq!(audio.sample_rate_hz, 16_000);
    for n_mels in [80, 128] {
        let expected = f32s(&fixture(&format!("speechlike.mel{n_mels}.f32")));
        let mel = MelSpectrogram::new(MelConfig::whisper(n_mels)).log_mel(&audio.samples, 16_000);
        assert_eq!((mel.n_mels, mel.n_frames), (n_mels, expected.len() / n_mels));
        let worst = mel.data.iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst < 2e-4, "{n_mels} mels: worst difference {worst}");
    }
}

/// A WAV file of `frames` (interleaved) in the given layout: format 1 = PCM, 3 = IEEE float.
fn wav(rate: u32, channels: u16, bits: u16, format: u16, samples: &[f64]) -> Vec<u8> {
    let mut data = Vec::new();
    for &x in samples {
        match (format, bits) {
            (1, 8) => data.push(((x * 127.0).round() as i16 + 128) as u8),
            (1, 16) => data.extend_from_slice(&((x * 32767.0).round() as i16).to_le_bytes()),
            (1, 24) => data.extend_from_slice(&((x * 8_388_607.0).round() as i32).to_le_bytes()[..3]),
            (1, 32) => data.extend_from_slice(&((x * 2_147_483_647.0).round() as i32).to_le_bytes()),
            (3, 32) => data.extend_from_slice(&(x as f32).to_le_bytes()),
            (3, 64) => data.extend_from_slice(&x.to_le_bytes()),
            other => panic!("layout {other:?}"),
        }
    }
    let block = channels * bits / 8;
    let mut out = Vec::new();
    out.extend_from_slice(b"RIFF");
    out.extend_from_slice(&(36 + data.len() as u32).to_le_bytes());
    out.extend_from_slice(b"WAVEfmt ");
    out.extend_from_slice(&16u32.to_le_bytes());
    out.extend_from_slice(&format.to_le_bytes());
    out.extend_from_slice(&channels.to_le_bytes());
    out.extend_from_slice(&rate.to_le_bytes());
    out.extend_from_slice(&(rate * u32::from(block)).to_le_bytes());
    out.extend_from_slice(&block.to_le_bytes());
    out.extend_from_slice(&bits.to_le_bytes());
    out.extend_from_slice(b"data");
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out.extend_from_slice(&data);
    out
}

fn tone(rate: u32, secs: f64) -> Vec<f64> {
    (0..(f64::from(rate) * secs) as usize)
        .map(|i| 0.5 * (2.0 * std::f64::consts::PI * 300.0 * i as f64 / f64::from(rate)).sin())
        .collect()
}

#[test]
fn every_pcm_layout_decodes_to_the_same_mono_signal() {
    let expected = tone(16_000, 0.5);
    for (bits, format, tolerance) in
        [(8, 1, 1e-2), (16, 1, 1e-4), (24, 1, 1e-6), (32, 1, 1e-6), (32, 3, 1e-6), (64, 3, 1e-6)]
    {
        let audio = decode(&wav(16_000, 1, bits, format, &expected), &DecodeLimits::default())
            .unwrap_or_else(|e| panic!("{bits}-bit format {format}: {e}"));
        assert_eq!(audio.samples.len(), expected.len(), "{bits}-bit");
        let worst =
            audio.samples.iter().zip(&expected).map(|(a, b)| (f64::from(*a) - b).abs()).fold(0.0, f64::max);
        assert!(worst < tolerance, "{bits}-bit format {format}: worst {worst}");
    }
}

#[test]
fn stereo_is_averaged_and_44k1_is_resampled_to_16k() {
    let left = tone(44_100, 1.0);
    let interleaved: Vec<f64> = left.iter().flat_map(|&x| [x, x * 0.5]).collect();
    let audio =
        decode_to_rate(&wav(44_100, 2, 16, 1, &interleaved), &DecodeLimits::default(), 16_000).unwrap();
    assert_eq!(audio.source_channels, 2);
    assert_eq!((audio.sample_rate_hz, audio.samples.len()), (16_000, 16_000));
    let expected = tone(16_000, 1.0);
    let worst =
        (400..15_600).map(|i| (f64::from(audio.samples[i]) - 0.75 * expected[i]).abs()).fold(0.0, f64::max);
    assert!(worst < 2e-3, "worst {worst}");
}

fn check_error(bytes: &[u8], limits: DecodeLimits, expected: fn(&AudioError) -> bool) {
    match decode(bytes, &limits) {
        Err(error) => assert!(expected(&error), "unexpected error: {error:?}"),
        Ok(audio) => panic!("decoded {} samples from bad input", audio.samples.len()),
    }
}

#[test]
fn bad_input_of_each_kind_gets_its_own_error() {
    let limits = DecodeLimits::default();
    check_error(b"", limits, |e| *e == AudioError::Empty);
    check_error(b"this is not audio at all, just text that goes on for a while", limits, |e| {
        *e == AudioError::UnknownFormat
    });
    let good = wav(16_000, 1, 16, 1, &tone(16_000, 2.0));
    check_error(&good[..good.len() / 3], limits, |e| matches!(e, AudioError::Truncated { .. }));
    check_error(&wav(16_000, 1, 16, 1, &vec![0.0; 16_000]), limits, |e| *e == AudioError::Silent);
    check_error(&wav(16_000, 1, 16, 1, &[]), limits, |e| *e == AudioError::NoSamples);
    check_error(&good, DecodeLimits { max_duration_secs: 1.0 }, |e| matches!(e, AudioError::TooLong { .. }));
    // A header alone: the data chunk declares samples that are not there.
    check_error(&good[..44], limits, |e| matches!(e, AudioError::Truncated { .. } | AudioError::NoSamples));
}

#[test]
fn every_error_message_names_the_problem() {
    let silent = decode(&wav(16_000, 1, 16, 1, &vec![0.0; 1_600]), &DecodeLimits::default()).unwrap_err();
    assert!(silent.to_string().contains("silent"), "{silent}");
    assert_eq!(silent.code(), "silent_audio");
    let long = decode(&wav(16_000, 1, 16, 1, &tone(16_000, 3.0)), &DecodeLimits { max_duration_secs: 2.0 })
        .unwrap_err();
    assert!(long.to_string().contains("3.0 s") && long.to_string().contains("2.0 s"), "{long}");
}

#[test]
fn a_header_that_makes_the_demuxer_panic_is_a_corrupt_file() {
    // Found by `damaged_wav_never_panics` (kept in audio.proptest-regressions): a channel count of
    // 0x8001 overflows symphonia's block-align arithmetic (a panic in a debug build).
    let mut bytes = wav(8_000, 1, 16, 1, &tone(8_000, 0.2));
    bytes[23] = 128;
    bytes.truncate(36);
    let error = decode(&bytes, &DecodeLimits::default()).expect_err("no audio in 36 bytes");
    assert!(
        matches!(
            error,
            AudioError::Corrupt(_) | AudioError::Truncated { .. } | AudioError::TooManyChannels(_)
        ),
        "{error:?}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = decode(&bytes, &DecodeLimits { max_duration_secs: 5.0 });
    }

    #[test]
    fn damaged_wav_never_panics(position in 0usize..3_244, value in any::<u8>(), cut in 0usize..3_244) {
        let mut bytes = wav(8_000, 1, 16, 1, &tone(8_000, 0.2));
        bytes[position] = value;
        bytes.truncate(cut.max(1));
        let _ = decode(&bytes, &DecodeLimits { max_duration_secs: 5.0 });
    }
}
