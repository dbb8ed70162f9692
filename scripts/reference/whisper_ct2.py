#!/usr/bin/env python3
"""Reference numbers for Hearth's Whisper backend, computed by CTranslate2 itself (the engine
faster-whisper runs) from the same CTranslate2 model folder, so Hearth's reading of `model.bin` and
its forward pass are checked against the format's own implementation.

For one LibriVox clip (16 kHz s16le, read with the `wave` module: no resampling on either side),
the log-mel comes from faster-whisper's numpy FeatureExtractor (Hearth's own log-mel matches it
to 2e-4, crates/audio/tests/audio.rs), padded to one 30 s window. Writes
tests/fixtures/whisper/ct2-reference.json:
  encoder_head      the encoder's output for the first 4 positions (4 x d_model floats)
  encoder_mean_abs  the mean |x| over all 1500 positions
  language_probs    detect_language's top 5 (token, probability)
  greedy_tokens     greedy decoding after <|startoftranscript|><|en|><|transcribe|>, timestamps on
  command           how this file was made

Run from the repository root with the test venv:
  ~/.cache/hearth/venv/bin/python scripts/reference/whisper_ct2.py ~/.cache/hearth/models/whisper-base-ct2
"""
import json
import pathlib
import sys
import wave

import ctranslate2
import numpy as np
from faster_whisper.feature_extractor import FeatureExtractor

CLIP = "/usr/share/pocketsphinx/test/data/librivox/sense_and_sensibility_01_austen_64kb-0880.wav"
OUT = pathlib.Path("tests/fixtures/whisper/ct2-reference.json")


def main() -> None:
    model_dir = sys.argv[1]
    with wave.open(CLIP) as w:
        assert w.getframerate() == 16000 and w.getnchannels() == 1 and w.getsampwidth() == 2
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    audio = pcm.astype(np.float32) / 32768.0
    extractor = FeatureExtractor(feature_size=80)
    mel = extractor(audio, padding=480000)[:, :3000]  # the first window, as transcribe() cuts it
    frames = audio.size // 160
    mel[:, frames:] = 0.0  # pad_or_trim of the audio's own frames: zeros after them
    features = ctranslate2.StorageView.from_array(np.ascontiguousarray(mel[None], dtype=np.float32))
    model = ctranslate2.models.Whisper(model_dir, device="cpu", compute_type="float32", intra_threads=2)
    encoded = np.array(model.encode(features, to_cpu=True))[0]
    languages = model.detect_language(encoded_features := model.encode(features, to_cpu=True))[0][:5]
    tokenizer = json.load(open(pathlib.Path(model_dir) / "tokenizer.json"))
    vocab = {**tokenizer["model"]["vocab"], **{t["content"]: t["id"] for t in tokenizer["added_tokens"]}}
    prompt = [vocab["<|startoftranscript|>"], vocab["<|en|>"], vocab["<|transcribe|>"]]
    result = model.generate(encoded_features, [prompt], beam_size=1, max_length=448, suppress_blank=True,
                            return_no_speech_prob=True)[0]
    reference = {
        "command": "~/.cache/hearth/venv/bin/python scripts/reference/whisper_ct2.py <whisper-base-ct2> "
                   f"(ctranslate2 {ctranslate2.__version__}, compute_type float32)",
        "clip": CLIP,
        "content_frames": int(frames),
        "encoder_head": [[round(float(x), 6) for x in row] for row in encoded[:4]],
        "encoder_mean_abs": float(np.abs(encoded).mean()),
        "language_probs": [[vocab[lang], round(p, 6)] for lang, p in languages],
        "greedy_tokens": result.sequences_ids[0],
        "no_speech_prob": result.no_speech_prob,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(reference, indent=1) + "\n")
    print(f"wrote {OUT}: {len(reference['greedy_tokens'])} tokens, languages {reference['language_probs'][:2]}")


if __name__ == "__main__":
    main()
