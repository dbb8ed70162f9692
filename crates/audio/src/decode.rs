//! Container and codec detection and decoding with symphonia (libopus for Opus, which symphonia
//! does not decode), downmixed to mono `f32` at the file's own rate.
//!
//! Work is bounded by the limits, not by the file: a header that declares more audio than the
//! duration limit is refused before anything is decoded, and decoding stops as soon as the decoded
//! audio passes the limit.

use std::io::Cursor;

use symphonia::core::codecs::audio::well_known::CODEC_ID_OPUS;
use symphonia::core::codecs::audio::{AudioCodecParameters, AudioDecoderOptions};
use symphonia::core::errors::Error as SymphoniaError;
use symphonia::core::formats::probe::Hint;
use symphonia::core::formats::{FormatOptions, TrackType};
use symphonia::core::io::MediaSourceStream;
use symphonia::core::meta::MetadataOptions;
use symphonia::core::packet::Packet;

use crate::AudioError;

/// The loudest sample below which an upload counts as silence (-70 dBFS).
const SILENCE_PEAK: f32 = 3.162e-4;
/// More undecodable packets than this (and more than a tenth of all packets) make a file corrupt.
const MAX_BAD_PACKETS: usize = 8;

/// What decoding may cost.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DecodeLimits {
    /// The longest audio accepted, in seconds.
    pub max_duration_secs: f64,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits { max_duration_secs: 3600.0 }
    }
}

/// Decoded audio: mono samples in [-1, 1] at `sample_rate_hz`.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    pub samples: Vec<f32>,
    pub sample_rate_hz: u32,
    /// Channels in the file before the downmix.
    pub source_channels: usize,
}

impl Decoded {
    pub fn duration_secs(&self) -> f64 {
        self.samples.len() as f64 / f64::from(self.sample_rate_hz)
    }
}

/// Decodes an upload to mono samples at its own rate. Empty, unknown, corrupt, truncated, silent
/// and over-long input each get their own [`AudioError`].
pub fn decode(bytes: &[u8], limits: &DecodeLimits) -> Result<Decoded, AudioError> {
    // The demuxers and codecs parse untrusted bytes in third-party code; a panic there (the fuzz
    // test found an arithmetic overflow on a WAV header claiming 32,769 channels, in
    // symphonia-format-riff) is a corrupt file to the caller, never a crash of the request.
    std::panic::catch_unwind(|| decode_unguarded(bytes, limits)).unwrap_or_else(|panic| {
        let detail = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "no message".into());
        Err(AudioError::Corrupt(format!("the decoder failed on this input: {detail}")))
    })
}

fn decode_unguarded(bytes: &[u8], limits: &DecodeLimits) -> Result<Decoded, AudioError> {
    if bytes.is_empty() {
        return Err(AudioError::Empty);
    }
    let stream = MediaSourceStream::new(Box::new(Cursor::new(bytes)), Default::default());
    let mut format = symphonia::default::get_probe()
        .probe(&Hint::new(), stream, FormatOptions::default(), MetadataOptions::default())
        .map_err(|error| match error {
            SymphoniaError::Unsupported(_) => AudioError::UnknownFormat,
            SymphoniaError::IoError(_) => AudioError::UnknownFormat,
            other => AudioError::Corrupt(other.to_string()),
        })?;
    let track = format.default_track(TrackType::Audio).ok_or(AudioError::NoAudioTrack)?;
    let track_id = track.id;
    let declared_frames = track.num_frames;
    let params = track
        .codec_params
        .as_ref()
        .and_then(|params| params.audio())
        .ok_or(AudioError::NoAudioTrack)?
        .clone();

    let mut decoder: Box<dyn PacketDecoder> = if params.codec == CODEC_ID_OPUS {
        Box::new(OpusPackets::new(&params)?)
    } else {
        Box::new(SymphoniaPackets::new(&params)?)
    };
    let declared_rate = params.sample_rate.or(decoder.sample_rate());
    if let (Some(frames), Some(rate)) = (declared_frames, declared_rate) {
        let declared_secs = frames as f64 / f64::from(rate.max(1));
        if declared_secs > limits.max_duration_secs {
            return Err(too_long(declared_secs, limits));
        }
    }

    let mut mono = Vec::new();
    let mut packets = 0usize;
    let mut bad_packets = 0usize;
    let mut ended_early = false;
    loop {
        let packet = match format.next_packet() {
            Ok(Some(packet)) => packet,
            Ok(None) => break,
            // A chained stream (a second logical stream): Hearth transcribes the first.
            Err(SymphoniaError::ResetRequired) => break,
            Err(SymphoniaError::IoError(error)) if error.kind() == std::io::ErrorKind::UnexpectedEof => {
                ended_early = true;
                break;
            }
            Err(SymphoniaError::IoError(error)) => return Err(AudioError::Corrupt(error.to_string())),
            Err(SymphoniaError::DecodeError(detail)) if mono.is_empty() => {
                return Err(AudioError::Corrupt(detail.to_string()));
            }
            Err(SymphoniaError::DecodeError(_)) => {
                ended_early = true;
                break;
            }
            Err(other) => return Err(AudioError::Corrupt(other.to_string())),
        };
        if packet.track_id != track_id {
            continue;
        }
        packets += 1;
        match decoder.decode_into(&packet, &mut mono) {
            Ok(()) => {}
            Err(PacketError::Bad(detail)) => {
                bad_packets += 1;
                if bad_packets > MAX_BAD_PACKETS && bad_packets * 10 > packets {
                    return Err(AudioError::Corrupt(detail));
                }
            }
            Err(PacketError::Fatal(error)) => return Err(error),
        }
        if let Some(rate) = decoder.sample_rate() {
            let secs = mono.len() as f64 / f64::from(rate.max(1));
            if secs > limits.max_duration_secs {
                return Err(too_long(secs, limits));
            }
        }
    }
    let rate = decoder
        .sample_rate()
        .or(declared_rate)
        .ok_or_else(|| AudioError::Corrupt("no sample rate".into()))?;
    if rate == 0 {
        return Err(AudioError::Corrupt("the sample rate is 0 Hz".into()));
    }
    if ended_early {
        if let Some(frames) = declared_frames {
            // Decoders may drop a final partial frame; a real truncation loses far more.
            let declared_secs = frames as f64 / f64::from(rate);
            let decoded_secs = mono.len() as f64 / f64::from(rate);
            if decoded_secs + 0.1 < declared_secs * 0.98 {
                return Err(AudioError::Truncated { decoded_secs, declared_secs });
            }
        }
    }
    if mono.is_empty() {
        return Err(if packets > 0 && bad_packets == packets {
            AudioError::Corrupt("no packet could be decoded".into())
        } else {
            AudioError::NoSamples
        });
    }
    let peak = mono.iter().fold(0f32, |peak, sample| peak.max(sample.abs()));
    if !peak.is_finite() {
        return Err(AudioError::Corrupt("the samples are not finite numbers".into()));
    }
    if peak < SILENCE_PEAK {
        return Err(AudioError::Silent);
    }
    if peak > 1.0 {
        // Float files may exceed full scale; keep the shape, bring it into range.
        mono.iter_mut().for_each(|sample| *sample /= peak);
    }
    Ok(Decoded { samples: mono, sample_rate_hz: rate, source_channels: decoder.channels() })
}

fn too_long(duration_secs: f64, limits: &DecodeLimits) -> AudioError {
    AudioError::TooLong { duration_secs, max_secs: limits.max_duration_secs }
}

enum PacketError {
    /// This packet is damaged; later ones may decode.
    Bad(String),
    /// Nothing more can be decoded.
    Fatal(AudioError),
}

/// One codec's packets to mono samples, appended.
trait PacketDecoder {
    fn decode_into(&mut self, packet: &Packet, mono: &mut Vec<f32>) -> Result<(), PacketError>;
    fn sample_rate(&self) -> Option<u32>;
    fn channels(&self) -> usize;
}

/// Appends the mean of each interleaved frame.
fn downmix_into(interleaved: &[f32], channels: usize, mono: &mut Vec<f32>) {
    if channels <= 1 {
        mono.extend_from_slice(interleaved);
        return;
    }
    let scale = 1.0 / channels as f32;
    mono.extend(interleaved.chunks_exact(channels).map(|frame| frame.iter().sum::<f32>() * scale));
}

struct SymphoniaPackets {
    decoder: Box<dyn symphonia::core::codecs::audio::AudioDecoder>,
    rate: Option<u32>,
    channels: usize,
    interleaved: Vec<f32>,
}

impl SymphoniaPackets {
    fn new(params: &AudioCodecParameters) -> Result<Self, AudioError> {
        let decoder = symphonia::default::get_codecs()
            .make_audio_decoder(params, &AudioDecoderOptions::default())
            .map_err(|error| match error {
                SymphoniaError::Unsupported(what) => AudioError::UnsupportedCodec(what.to_string()),
                other => AudioError::Corrupt(other.to_string()),
            })?;
        let channels = params.channels.as_ref().map(|channels| channels.count()).unwrap_or(1);
        if channels > 255 {
            return Err(AudioError::TooManyChannels(channels));
        }
        Ok(SymphoniaPackets { decoder, rate: params.sample_rate, channels, interleaved: Vec::new() })
    }
}

impl PacketDecoder for SymphoniaPackets {
    fn decode_into(&mut self, packet: &Packet, mono: &mut Vec<f32>) -> Result<(), PacketError> {
        let buffer = match self.decoder.decode(packet) {
            Ok(buffer) => buffer,
            Err(SymphoniaError::DecodeError(detail)) => return Err(PacketError::Bad(detail.to_string())),
            Err(SymphoniaError::IoError(error)) => return Err(PacketError::Bad(error.to_string())),
            Err(SymphoniaError::Unsupported(what)) => {
                return Err(PacketError::Fatal(AudioError::UnsupportedCodec(what.to_string())))
            }
            Err(other) => return Err(PacketError::Fatal(AudioError::Corrupt(other.to_string()))),
        };
        let spec = buffer.spec();
        self.rate = Some(spec.rate());
        let channels = spec.channels().count().max(1);
        if channels > 255 {
            return Err(PacketError::Fatal(AudioError::TooManyChannels(channels)));
        }
        self.channels = channels;
        self.interleaved.resize(buffer.samples_interleaved(), 0.0);
        buffer.copy_to_slice_interleaved(&mut self.interleaved);
        downmix_into(&self.interleaved, channels, mono);
        Ok(())
    }

    fn sample_rate(&self) -> Option<u32> {
        self.rate
    }

    fn channels(&self) -> usize {
        self.channels
    }
}

/// Opus (in Ogg or Matroska/WebM) through libopus, at 48 kHz as Opus always decodes.
struct OpusPackets {
    decoder: opus::Decoder,
    channels: usize,
    /// Samples per channel still to drop from the start (the stream's pre-skip).
    pre_skip: usize,
    interleaved: Vec<f32>,
}

const OPUS_RATE_HZ: u32 = 48_000;
/// The longest Opus packet: 120 ms at 48 kHz.
const OPUS_MAX_FRAMES: usize = 5_760;

impl OpusPackets {
    fn new(params: &AudioCodecParameters) -> Result<Self, AudioError> {
        // The OpusHead packet (RFC 7845 §5.1) travels as the codec's extra data.
        let head = params.extra_data.as_deref().unwrap_or(&[]);
        let (channels, pre_skip) = if head.len() >= 19 && &head[..8] == b"OpusHead" {
            let mapping_family = head[18];
            if mapping_family != 0 {
                return Err(AudioError::UnsupportedCodec(format!(
                    "Opus channel mapping family {mapping_family} (only mono and stereo Opus is read)"
                )));
            }
            (usize::from(head[9]), usize::from(u16::from_le_bytes([head[10], head[11]])))
        } else {
            (params.channels.as_ref().map(|channels| channels.count()).unwrap_or(1), 0)
        };
        let layout = match channels {
            1 => opus::Channels::Mono,
            2 => opus::Channels::Stereo,
            other => {
                return Err(AudioError::UnsupportedCodec(format!(
                    "Opus with {other} channels (only mono and stereo)"
                )))
            }
        };
        let decoder = opus::Decoder::new(OPUS_RATE_HZ, layout)
            .map_err(|error| AudioError::Corrupt(format!("libopus: {error}")))?;
        Ok(OpusPackets { decoder, channels, pre_skip, interleaved: vec![0.0; OPUS_MAX_FRAMES * channels] })
    }
}

impl PacketDecoder for OpusPackets {
    fn decode_into(&mut self, packet: &Packet, mono: &mut Vec<f32>) -> Result<(), PacketError> {
        let frames = self
            .decoder
            .decode_float(&packet.data, &mut self.interleaved, false)
            .map_err(|error| PacketError::Bad(format!("libopus: {error}")))?;
        let skip = self.pre_skip.min(frames);
        self.pre_skip -= skip;
        downmix_into(&self.interleaved[skip * self.channels..frames * self.channels], self.channels, mono);
        Ok(())
    }

    fn sample_rate(&self) -> Option<u32> {
        Some(OPUS_RATE_HZ)
    }

    fn channels(&self) -> usize {
        self.channels
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn downmix_averages_each_frame() {
        let mut mono = Vec::new();
        downmix_into(&[1.0, 0.0, 0.5, 0.5, -1.0, 1.0], 2, &mut mono);
        assert_eq!(mono, vec![0.5, 0.5, 0.0]);
    }
}
