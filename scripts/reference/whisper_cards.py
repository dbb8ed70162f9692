#!/usr/bin/env python3
"""faster-whisper's transcripts of Debian pocketsphinx-testdata's `cards` clips (short, 1-3.5 s,
card names), greedy, English, float32, for Hearth's parity test. Their reference transcripts spell
numbers as words and Whisper writes digits, so a WER against them measures the normaliser, not the
model; the test compares Hearth's text with faster-whisper's instead.

Writes tests/fixtures/whisper/faster-whisper-cards.json. Run from the repository root:
  ~/.cache/hearth/venv/bin/python scripts/reference/whisper_cards.py ~/.cache/hearth/models/whisper-base-ct2
"""
import json
import pathlib
import sys

import faster_whisper
from faster_whisper import WhisperModel

DATA = pathlib.Path("/usr/share/pocketsphinx/test/data/cards")
OUT = pathlib.Path("tests/fixtures/whisper/faster-whisper-cards.json")


def main() -> None:
    model = WhisperModel(sys.argv[1], device="cpu", compute_type="float32", cpu_threads=2)
    texts = {}
    for wav in sorted(DATA.glob("*.wav")):
        segments, _ = model.transcribe(str(wav), beam_size=1, language="en")
        texts[wav.stem] = " ".join(s.text.strip() for s in segments)
    OUT.write_text(json.dumps({
        "command": "~/.cache/hearth/venv/bin/python scripts/reference/whisper_cards.py <whisper-base-ct2> "
                   f"(faster-whisper {faster_whisper.__version__}, float32, beam_size=1, language=en)",
        "texts": texts,
    }, indent=1) + "\n")
    print(f"wrote {OUT}: {texts}")


if __name__ == "__main__":
    main()
