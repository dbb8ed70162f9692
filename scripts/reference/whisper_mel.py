#!/usr/bin/env python3
"""Reference log-mel features for crates/audio's tests, computed by faster-whisper's own numpy
feature extractor (faster_whisper.feature_extractor.FeatureExtractor: its STFT, its port of
librosa's Slaney mel filters), which shares no code with Hearth.

Writes, under crates/audio/tests/fixtures/:
  speechlike.wav          1.5 s of deterministic speech-like audio (16 kHz, s16le, mono)
  speechlike.mel80.f32    its log-mel, 80 bins, padded with 1 s of zeros (little-endian f32, [80, frames])
  speechlike.mel128.f32   the same with 128 bins (large-v3)

Run from the repository root with the test venv: ~/.cache/hearth/venv/bin/python scripts/reference/whisper_mel.py
"""
import pathlib
import wave

import numpy as np
from faster_whisper.feature_extractor import FeatureExtractor

OUT = pathlib.Path("crates/audio/tests/fixtures")
RATE = 16000
PAD = RATE  # 1 s of zeros, as Hearth's test asks for


def speechlike() -> np.ndarray:
    rng = np.random.default_rng(7)
    t = np.arange(int(1.5 * RATE)) / RATE
    # A gliding "voice" with harmonics, amplitude-modulated like syllables, plus a little noise.
    f0 = 120 + 40 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / RATE
    voice = sum(np.sin(k * phase) / k for k in range(1, 12))
    envelope = 0.5 * (1 + np.sin(2 * np.pi * 3.1 * t)) ** 2
    signal = 0.2 * voice * envelope + 0.01 * rng.standard_normal(t.size)
    return np.clip(signal, -1, 1)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    pcm = np.round(speechlike() * 32767).astype("<i2")
    with wave.open(str(OUT / "speechlike.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(pcm.tobytes())
    audio = pcm.astype(np.float32) / 32768.0  # as Hearth decodes s16
    for n_mels in (80, 128):
        mel = FeatureExtractor(feature_size=n_mels)(audio, padding=PAD)
        mel.astype("<f4").tofile(OUT / f"speechlike.mel{n_mels}.f32")
        print(f"mel{n_mels}: {mel.shape}")


if __name__ == "__main__":
    main()
