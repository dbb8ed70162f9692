//! Audio out: mono f32 samples to the files OpenAI's speech endpoint returns. Every encoder is a
//! library (LAME for mp3, libopus in an Ogg container, FFmpeg's libavcodec for AAC in ADTS with
//! the `aac` feature, flacenc for FLAC); WAV and raw PCM are written directly. An [`Encoder`] takes samples as they are synthesized and hands back the bytes
//! that are ready, so a response can stream sentence by sentence; [`Encoder::finish`] flushes the
//! rest.

use std::mem::MaybeUninit;

use flacenc::component::{BitRepr, Stream, StreamInfo};
use flacenc::error::Verify;
use flacenc::source::{Fill, FrameBuf};
use ogg::writing::{PacketWriteEndInfo, PacketWriter};

use crate::error::AudioError;

/// The formats `/v1/audio/speech` can return, in OpenAI's names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AudioFormat {
    Mp3,
    Opus,
    /// AAC-LC in ADTS frames; only a binary built with the `aac` feature writes it.
    Aac,
    Flac,
    Wav,
    /// Raw 16-bit little-endian mono samples, no header.
    Pcm,
}

impl AudioFormat {
    /// Every format this build can write, in OpenAI's order.
    #[cfg(feature = "aac")]
    pub const SUPPORTED: &'static [AudioFormat] =
        &[Self::Mp3, Self::Opus, Self::Aac, Self::Flac, Self::Wav, Self::Pcm];
    /// Every format this build can write, in OpenAI's order (`aac` needs the `aac` feature).
    #[cfg(not(feature = "aac"))]
    pub const SUPPORTED: &'static [AudioFormat] = &[Self::Mp3, Self::Opus, Self::Flac, Self::Wav, Self::Pcm];

    /// The format OpenAI calls `name`; `None` for one this build cannot write.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::SUPPORTED.iter().copied().find(|format| format.name() == name)
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Mp3 => "mp3",
            Self::Opus => "opus",
            Self::Aac => "aac",
            Self::Flac => "flac",
            Self::Wav => "wav",
            Self::Pcm => "pcm",
        }
    }

    /// The `Content-Type` OpenAI sends with it.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Mp3 => "audio/mpeg",
            Self::Opus => "audio/ogg; codecs=opus",
            Self::Aac => "audio/aac",
            Self::Flac => "audio/flac",
            Self::Wav => "audio/wav",
            Self::Pcm => "audio/pcm",
        }
    }
}

/// Samples per FLAC frame (the reference encoder's default).
const FLAC_BLOCK: usize = 4096;
/// One Opus frame: 20 ms.
const OPUS_FRAME_MS: u32 = 20;
/// Opus granule positions count 48 kHz samples whatever the input rate.
const OPUS_GRANULE_HZ: u32 = 48_000;
const OPUS_SERIAL: u32 = 0x4845_5254; // "HERT"

/// A format's encoder over one mono stream at one sample rate.
pub struct Encoder {
    sample_rate_hz: u32,
    inner: Inner,
}

enum Inner {
    Pcm,
    /// `streaming`: the header (sizes unknown) went out first; otherwise every sample is kept
    /// until `finish` writes a header with the exact sizes.
    Wav {
        streaming: bool,
        header_sent: bool,
        kept: Vec<i16>,
    },
    Mp3(Box<mp3lame_encoder::Encoder>),
    Opus(Box<OpusOgg>),
    #[cfg(feature = "aac")]
    Aac(Box<crate::aac::AacAdts>),
    Flac(Box<Flac>),
}

impl Encoder {
    /// An encoder for `format` at `sample_rate_hz`. `streaming`: the bytes will be sent as they
    /// come, so a container whose header holds the length writes "unknown" there (WAV) or leaves
    /// the totals out (FLAC); otherwise the file is exact.
    pub fn new(format: AudioFormat, sample_rate_hz: u32, streaming: bool) -> Result<Self, AudioError> {
        let inner = match format {
            AudioFormat::Pcm => Inner::Pcm,
            AudioFormat::Wav => Inner::Wav { streaming, header_sent: false, kept: Vec::new() },
            AudioFormat::Mp3 => {
                let mut builder = mp3lame_encoder::Builder::new()
                    .ok_or_else(|| encoder_error("mp3", "LAME could not allocate an encoder"))?;
                builder.set_num_channels(1).map_err(|e| encoder_error("mp3", e))?;
                builder.set_sample_rate(sample_rate_hz).map_err(|e| encoder_error("mp3", e))?;
                builder.set_brate(mp3lame_encoder::Bitrate::Kbps64).map_err(|e| encoder_error("mp3", e))?;
                builder.set_quality(mp3lame_encoder::Quality::Good).map_err(|e| encoder_error("mp3", e))?;
                Inner::Mp3(Box::new(builder.build().map_err(|e| encoder_error("mp3", e))?))
            }
            AudioFormat::Opus => Inner::Opus(Box::new(OpusOgg::new(sample_rate_hz)?)),
            #[cfg(feature = "aac")]
            AudioFormat::Aac => Inner::Aac(Box::new(crate::aac::AacAdts::new(sample_rate_hz)?)),
            #[cfg(not(feature = "aac"))]
            AudioFormat::Aac => {
                return Err(encoder_error("aac", "this binary was built without the `aac` feature"))
            }
            AudioFormat::Flac => Inner::Flac(Box::new(Flac::new(sample_rate_hz, streaming)?)),
        };
        Ok(Encoder { sample_rate_hz, inner })
    }

    pub fn sample_rate_hz(&self) -> u32 {
        self.sample_rate_hz
    }

    /// Encodes `samples` (in [-1, 1]; clipped) and returns the bytes that are complete.
    pub fn push(&mut self, samples: &[f32]) -> Result<Vec<u8>, AudioError> {
        match &mut self.inner {
            Inner::Pcm => Ok(pcm16_bytes(samples)),
            Inner::Wav { streaming: true, header_sent, .. } => {
                let mut out = Vec::new();
                if !*header_sent {
                    out = wav_header(self.sample_rate_hz, None);
                    *header_sent = true;
                }
                out.extend(pcm16_bytes(samples));
                Ok(out)
            }
            Inner::Wav { streaming: false, kept, .. } => {
                kept.extend(samples.iter().map(|&s| to_i16(s)));
                Ok(Vec::new())
            }
            Inner::Mp3(encoder) => {
                let pcm: Vec<i16> = samples.iter().map(|&s| to_i16(s)).collect();
                let mut out = Vec::with_capacity(mp3lame_encoder::max_required_buffer_size(pcm.len()));
                encoder
                    .encode_to_vec(mp3lame_encoder::MonoPcm(&pcm), &mut out)
                    .map_err(|e| encoder_error("mp3", e))?;
                Ok(out)
            }
            Inner::Opus(opus) => opus.push(samples),
            #[cfg(feature = "aac")]
            Inner::Aac(aac) => aac.push(samples),
            Inner::Flac(flac) => flac.push(samples),
        }
    }

    /// Flushes what the encoder holds back and ends the stream.
    pub fn finish(self) -> Result<Vec<u8>, AudioError> {
        match self.inner {
            Inner::Pcm => Ok(Vec::new()),
            Inner::Wav { streaming: true, header_sent, .. } => {
                Ok(if header_sent { Vec::new() } else { wav_header(self.sample_rate_hz, None) })
            }
            Inner::Wav { streaming: false, kept, .. } => {
                let mut out = wav_header(self.sample_rate_hz, Some(kept.len()));
                out.extend(kept.iter().flat_map(|s| s.to_le_bytes()));
                Ok(out)
            }
            Inner::Mp3(mut encoder) => {
                let mut out: Vec<u8> = Vec::with_capacity(7200);
                let spare: &mut [MaybeUninit<u8>] = out.spare_capacity_mut();
                let written = encoder
                    .flush::<mp3lame_encoder::FlushNoGap>(spare)
                    .map_err(|e| encoder_error("mp3", e))?;
                // SAFETY: LAME wrote `written` bytes at the start of the spare capacity.
                unsafe { out.set_len(written) };
                Ok(out)
            }
            Inner::Opus(opus) => opus.finish(),
            #[cfg(feature = "aac")]
            Inner::Aac(aac) => aac.finish(),
            Inner::Flac(flac) => flac.finish(),
        }
    }
}

fn encoder_error(format: &str, cause: impl std::fmt::Display) -> AudioError {
    AudioError::Encode { format: format.to_string(), message: cause.to_string() }
}

fn to_i16(sample: f32) -> i16 {
    (sample.clamp(-1.0, 1.0) * 32767.0).round() as i16
}

fn pcm16_bytes(samples: &[f32]) -> Vec<u8> {
    samples.iter().flat_map(|&s| to_i16(s).to_le_bytes()).collect()
}

/// A canonical 44-byte PCM WAV header; `samples: None` writes the "length unknown" sizes a
/// streamed file carries (0xFFFFFFFF, as OpenAI's streamed WAV does).
fn wav_header(sample_rate_hz: u32, samples: Option<usize>) -> Vec<u8> {
    let data_bytes = samples.map_or(u32::MAX, |n| u32::try_from(n * 2).unwrap_or(u32::MAX));
    let riff_bytes = data_bytes.saturating_add(36);
    let mut h = Vec::with_capacity(44);
    h.extend_from_slice(b"RIFF");
    h.extend_from_slice(&riff_bytes.to_le_bytes());
    h.extend_from_slice(b"WAVEfmt ");
    h.extend_from_slice(&16u32.to_le_bytes());
    h.extend_from_slice(&1u16.to_le_bytes()); // PCM
    h.extend_from_slice(&1u16.to_le_bytes()); // mono
    h.extend_from_slice(&sample_rate_hz.to_le_bytes());
    h.extend_from_slice(&(sample_rate_hz * 2).to_le_bytes()); // bytes per second
    h.extend_from_slice(&2u16.to_le_bytes()); // block align
    h.extend_from_slice(&16u16.to_le_bytes()); // bits per sample
    h.extend_from_slice(b"data");
    h.extend_from_slice(&data_bytes.to_le_bytes());
    h
}

/// Opus in Ogg (RFC 7845): `OpusHead` and `OpusTags`, then one 20 ms packet per frame; each push
/// ends its page so what was encoded goes out at once.
struct OpusOgg {
    encoder: opus::Encoder,
    writer: PacketWriter<'static, Vec<u8>>,
    frame: usize,
    /// Samples not yet a whole frame.
    pending: Vec<f32>,
    /// 48 kHz samples put into packets so far (the pre-skip included).
    granule: u64,
    pre_skip: u64,
    /// Input samples pushed, for the end trim.
    total_in: u64,
    scale: u64,
}

impl OpusOgg {
    fn new(sample_rate_hz: u32) -> Result<Self, AudioError> {
        if ![8_000, 12_000, 16_000, 24_000, 48_000].contains(&sample_rate_hz) {
            return Err(encoder_error("opus", format!("Opus cannot encode {sample_rate_hz} Hz")));
        }
        let mut encoder = opus::Encoder::new(sample_rate_hz, opus::Channels::Mono, opus::Application::Voip)
            .map_err(|e| encoder_error("opus", e))?;
        encoder.set_bitrate(opus::Bitrate::Bits(32_000)).map_err(|e| encoder_error("opus", e))?;
        let scale = u64::from(OPUS_GRANULE_HZ / sample_rate_hz);
        let pre_skip = u64::try_from(encoder.get_lookahead().map_err(|e| encoder_error("opus", e))?)
            .unwrap_or(0)
            * scale;
        let mut head = Vec::with_capacity(19);
        head.extend_from_slice(b"OpusHead");
        head.push(1); // version
        head.push(1); // channels
        head.extend_from_slice(&(pre_skip as u16).to_le_bytes());
        head.extend_from_slice(&sample_rate_hz.to_le_bytes()); // the input rate, informational
        head.extend_from_slice(&0i16.to_le_bytes()); // output gain
        head.push(0); // mapping family: mono/stereo
        let vendor = b"hearth";
        let mut tags = Vec::new();
        tags.extend_from_slice(b"OpusTags");
        tags.extend_from_slice(&(vendor.len() as u32).to_le_bytes());
        tags.extend_from_slice(vendor);
        tags.extend_from_slice(&0u32.to_le_bytes()); // no comments
        let mut writer = PacketWriter::new(Vec::new());
        let page = |e: std::io::Error| encoder_error("opus", e);
        writer.write_packet(head, OPUS_SERIAL, PacketWriteEndInfo::EndPage, 0).map_err(page)?;
        writer.write_packet(tags, OPUS_SERIAL, PacketWriteEndInfo::EndPage, 0).map_err(page)?;
        Ok(OpusOgg {
            encoder,
            writer,
            frame: (sample_rate_hz * OPUS_FRAME_MS / 1000) as usize,
            pending: Vec::new(),
            granule: pre_skip,
            pre_skip,
            total_in: 0,
            scale,
        })
    }

    fn take(&mut self) -> Vec<u8> {
        std::mem::take(self.writer.inner_mut())
    }

    fn packet(&mut self, frame: &[f32], end: PacketWriteEndInfo, granule: u64) -> Result<(), AudioError> {
        let packet = self.encoder.encode_vec_float(frame, 4000).map_err(|e| encoder_error("opus", e))?;
        self.writer.write_packet(packet, OPUS_SERIAL, end, granule).map_err(|e| encoder_error("opus", e))
    }

    fn push(&mut self, samples: &[f32]) -> Result<Vec<u8>, AudioError> {
        self.total_in += samples.len() as u64;
        self.pending.extend(samples.iter().map(|s| s.clamp(-1.0, 1.0)));
        let whole = self.pending.len() / self.frame;
        for i in 0..whole {
            let frame: Vec<f32> = self.pending[i * self.frame..(i + 1) * self.frame].to_vec();
            self.granule += self.frame as u64 * self.scale;
            let end =
                if i + 1 == whole { PacketWriteEndInfo::EndPage } else { PacketWriteEndInfo::NormalPacket };
            self.packet(&frame, end, self.granule)?;
        }
        self.pending.drain(..whole * self.frame);
        Ok(self.take())
    }

    fn finish(mut self) -> Result<Vec<u8>, AudioError> {
        // The last frame is padded with silence (plus the encoder's lookahead, so the real end is
        // coded); the final granule position trims the padding off again.
        let end_granule = self.pre_skip + self.total_in * self.scale;
        let mut tail = std::mem::take(&mut self.pending);
        tail.resize(tail.len() + (self.pre_skip / self.scale) as usize, 0.0);
        let frames = tail.len().div_ceil(self.frame).max(1);
        tail.resize(frames * self.frame, 0.0);
        for i in 0..frames {
            let frame = tail[i * self.frame..(i + 1) * self.frame].to_vec();
            let last = i + 1 == frames;
            self.granule += self.frame as u64 * self.scale;
            let granule = if last { end_granule } else { self.granule.min(end_granule) };
            let end = if last { PacketWriteEndInfo::EndStream } else { PacketWriteEndInfo::NormalPacket };
            self.packet(&frame, end, granule)?;
        }
        Ok(self.take())
    }
}

/// FLAC, 16-bit mono: STREAMINFO, then frames of [`FLAC_BLOCK`] samples (as they fill when
/// streamed; all at the end otherwise, with the total length in the header).
struct Flac {
    config: flacenc::error::Verified<flacenc::config::Encoder>,
    sample_rate_hz: u32,
    streaming: bool,
    header_sent: bool,
    pending: Vec<i32>,
    frames: usize,
}

impl Flac {
    fn new(sample_rate_hz: u32, streaming: bool) -> Result<Self, AudioError> {
        let config = flacenc::config::Encoder::default()
            .into_verified()
            .map_err(|(_, e)| encoder_error("flac", format!("{e:?}")))?;
        Ok(Flac { config, sample_rate_hz, streaming, header_sent: false, pending: Vec::new(), frames: 0 })
    }

    /// STREAMINFO: fixed blocks (the spec's minimum block size leaves out the last, shorter
    /// one), and the total length when the whole file is written at once (0, "unknown", when
    /// streamed). The MD5 stays zero ("not computed"), which the format allows.
    fn stream_info(&self) -> Result<StreamInfo, AudioError> {
        let mut info = StreamInfo::new(self.sample_rate_hz as usize, 1, 16)
            .map_err(|e| encoder_error("flac", format!("{e:?}")))?;
        info.set_block_sizes(FLAC_BLOCK, FLAC_BLOCK).map_err(|e| encoder_error("flac", format!("{e:?}")))?;
        if !self.streaming {
            info.set_total_samples(self.pending.len());
        }
        Ok(info)
    }

    fn frames(&mut self, last: bool) -> Result<Vec<u8>, AudioError> {
        let info = self.stream_info()?;
        let mut out = Vec::new();
        if !self.header_sent {
            let header = Stream::with_stream_info(info.clone());
            out.extend(to_bytes(&header)?);
            self.header_sent = true;
        }
        let mut start = 0;
        while self.pending.len() - start >= FLAC_BLOCK || (last && start < self.pending.len()) {
            let end = (start + FLAC_BLOCK).min(self.pending.len());
            let block = &self.pending[start..end];
            let mut buffer =
                FrameBuf::with_size(1, FLAC_BLOCK).map_err(|e| encoder_error("flac", format!("{e:?}")))?;
            buffer.fill_interleaved(block).map_err(|e| encoder_error("flac", format!("{e:?}")))?;
            let frame = flacenc::encode_fixed_size_frame(&self.config, &buffer, self.frames, &info)
                .map_err(|e| encoder_error("flac", format!("{e:?}")))?;
            out.extend(to_bytes(&frame)?);
            self.frames += 1;
            start = end;
        }
        self.pending.drain(..start);
        Ok(out)
    }

    fn push(&mut self, samples: &[f32]) -> Result<Vec<u8>, AudioError> {
        self.pending.extend(samples.iter().map(|&s| i32::from(to_i16(s))));
        if self.streaming {
            self.frames(false)
        } else {
            Ok(Vec::new())
        }
    }

    fn finish(mut self) -> Result<Vec<u8>, AudioError> {
        self.frames(true)
    }
}

fn to_bytes(item: &impl BitRepr) -> Result<Vec<u8>, AudioError> {
    let mut sink = flacenc::bitsink::ByteSink::new();
    item.write(&mut sink).map_err(|e| encoder_error("flac", format!("{e:?}")))?;
    Ok(sink.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{decode, DecodeLimits};

    fn tone(rate: u32, secs: f32) -> Vec<f32> {
        let n = (rate as f32 * secs) as usize;
        (0..n).map(|i| 0.5 * (2.0 * std::f32::consts::PI * 440.0 * i as f32 / rate as f32).sin()).collect()
    }

    fn correlation(a: &[f32], b: &[f32]) -> f64 {
        let dot =
            |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(p, q)| f64::from(*p) * f64::from(*q)).sum::<f64>();
        dot(a, b) / (dot(a, a) * dot(b, b)).sqrt()
    }

    fn encode(format: AudioFormat, streaming: bool, samples: &[f32], chunk: usize) -> Vec<u8> {
        let mut encoder = Encoder::new(format, 24_000, streaming).unwrap();
        let mut out = Vec::new();
        for part in samples.chunks(chunk) {
            out.extend(encoder.push(part).unwrap());
        }
        out.extend(encoder.finish().unwrap());
        out
    }

    /// Every container decodes back (with Hearth's own decoders: symphonia, libopus) to the
    /// length that went in, whole or streamed in uneven pieces.
    #[test]
    fn every_format_decodes_back_to_its_length() {
        let samples = tone(24_000, 2.5);
        let lossy = [AudioFormat::Mp3, AudioFormat::Opus, AudioFormat::Aac];
        for &format in AudioFormat::SUPPORTED.iter().filter(|f| **f != AudioFormat::Pcm) {
            for streaming in [false, true] {
                if format == AudioFormat::Wav && streaming {
                    continue; // unknown sizes: checked below
                }
                let bytes = encode(format, streaming, &samples, 7_001);
                let decoded = decode(&bytes, &DecodeLimits::default())
                    .unwrap_or_else(|e| panic!("{format:?} streaming={streaming}: {e}"));
                let secs = decoded.samples.len() as f64 / f64::from(decoded.sample_rate_hz);
                // ADTS cannot mark the encoder's priming (1,024 samples) or the last frame's
                // padding for removal, so AAC decodes up to two frames (85 ms) long.
                let slack = if format == AudioFormat::Aac { 2048.0 / 24_000.0 } else { 0.0 };
                assert!(
                    secs >= 2.5 * 0.98 && secs <= 2.5 * 1.02 + slack,
                    "{format:?} streaming={streaming}: {secs} s"
                );
                let peak = decoded.samples.iter().fold(0f32, |m, s| m.max(s.abs()));
                assert!((0.4..0.6).contains(&peak), "{format:?}: peak {peak}");
                if lossy.contains(&format) {
                    // The tone itself comes back, not just something of the right length: the
                    // decoded signal's best alignment with the input (codec delays differ)
                    // correlates almost perfectly.
                    let back = crate::resample(&decoded.samples, decoded.sample_rate_hz, 24_000).unwrap();
                    let best = (0..3_000)
                        .map(|lag| correlation(&samples[..48_000], &back[lag..lag + 48_000]))
                        .fold(f64::MIN, f64::max);
                    assert!(best > 0.98, "{format:?} streaming={streaming}: correlation {best}");
                }
            }
        }
    }

    #[test]
    fn flac_and_wav_are_lossless_to_16_bits() {
        let samples = tone(24_000, 1.0);
        for (format, streaming) in
            [(AudioFormat::Flac, false), (AudioFormat::Flac, true), (AudioFormat::Wav, false)]
        {
            let decoded =
                decode(&encode(format, streaming, &samples, 5_000), &DecodeLimits::default()).unwrap();
            assert_eq!(decoded.samples.len(), samples.len(), "{format:?}");
            let worst = decoded.samples.iter().zip(&samples).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(worst < 1.0 / 32_000.0, "{format:?}: {worst}");
        }
    }

    #[test]
    fn pcm_is_raw_little_endian_16_bit() {
        let bytes = encode(AudioFormat::Pcm, true, &[0.0, 1.0, -1.0, 0.5, 2.0], 2);
        assert_eq!(bytes, [0, 0, 0xff, 0x7f, 0x01, 0x80, 0x00, 0x40, 0xff, 0x7f]);
    }

    #[test]
    fn streamed_wav_announces_unknown_sizes_then_samples() {
        let bytes = encode(AudioFormat::Wav, true, &tone(24_000, 0.1), 1000);
        assert_eq!(&bytes[..4], b"RIFF");
        assert_eq!(&bytes[40..44], &u32::MAX.to_le_bytes());
        assert_eq!(bytes.len(), 44 + 2 * 2400);
    }

    #[test]
    fn streamed_encoders_emit_bytes_before_the_end() {
        for &format in AudioFormat::SUPPORTED.iter().filter(|f| **f != AudioFormat::Wav) {
            let mut encoder = Encoder::new(format, 24_000, true).unwrap();
            let first = encoder.push(&tone(24_000, 1.0)).unwrap();
            assert!(!first.is_empty(), "{format:?} held back a whole second of audio");
        }
    }

    #[test]
    fn names_and_content_types() {
        assert_eq!(AudioFormat::from_name("opus"), Some(AudioFormat::Opus));
        assert_eq!(AudioFormat::from_name("aac").is_some(), cfg!(feature = "aac"));
        assert_eq!(AudioFormat::from_name("m4a"), None);
        assert_eq!(AudioFormat::Mp3.content_type(), "audio/mpeg");
        assert_eq!(AudioFormat::Aac.content_type(), "audio/aac");
        assert!(Encoder::new(AudioFormat::Opus, 22_050, false).is_err());
    }
}
