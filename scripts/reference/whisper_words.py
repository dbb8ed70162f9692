#!/usr/bin/env python3
"""Reference word timestamps for Hearth's tests: faster-whisper's own (`word_timestamps=True`: the
cross-attention of the alignment heads through CTranslate2's `align`, then OpenAI's DTW and
punctuation rules) on two LibriVox clips, greedy, English, float32.

Writes tests/fixtures/whisper/faster-whisper-words.json. Run from the repository root with the
test venv:
  ~/.cache/hearth/venv/bin/python scripts/reference/whisper_words.py ~/.cache/hearth/models/whisper-base-ct2
"""
import json
import pathlib
import sys

import faster_whisper
from faster_whisper import WhisperModel

DATA = "/usr/share/pocketsphinx/test/data/librivox/"
CLIPS = ["sense_and_sensibility_01_austen_64kb-0870", "sense_and_sensibility_01_austen_64kb-0920"]
OUT = pathlib.Path("tests/fixtures/whisper/faster-whisper-words.json")


def main() -> None:
    model = WhisperModel(sys.argv[1], device="cpu", compute_type="float32", cpu_threads=2)
    clips = {}
    for clip in CLIPS:
        segments, _ = model.transcribe(DATA + clip + ".wav", beam_size=1, language="en", word_timestamps=True)
        clips[clip] = [
            {"word": w.word.strip(), "start": round(w.start, 2), "end": round(w.end, 2)}
            for s in segments for w in s.words
        ]
    OUT.write_text(json.dumps({
        "command": "~/.cache/hearth/venv/bin/python scripts/reference/whisper_words.py <whisper-base-ct2> "
                   f"(faster-whisper {faster_whisper.__version__}, float32, beam_size=1, language=en)",
        "clips": clips,
    }, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
