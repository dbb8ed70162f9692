#!/usr/bin/env python3
"""References for Hearth's Piper voices, from tools independent of Hearth:

1. `espeak-ng -q --ipa -v en-us TEXT` (Debian's espeak-ng command line) on 20 varied sentences:
   one line per clause, which Hearth's phonemizer (libespeak-ng) must reproduce clause by clause.
2. piper-tts (PyPI) on the en_US-joe-medium voice with both noise scales at 0 (deterministic):
   its phoneme ids and its 16-bit samples for a few sentences, which Hearth must reproduce.

Writes tests/fixtures/piper/espeak-ipa.json and tests/fixtures/piper/piper-joe.json (+ .s16 sample
files). Run from the repository root:
  ~/.cache/hearth/venv/bin/python scripts/reference/piper_reference.py ~/.cache/hearth/models/piper-joe-medium
"""
import base64
import importlib.metadata
import json
import pathlib
import subprocess
import sys

from piper import PiperVoice, SynthesisConfig

OUT = pathlib.Path("tests/fixtures/piper")

SENTENCES = [
    "The backup job finished at half past two.",
    "All twelve snapshots were verified.",
    "The next run is scheduled for tomorrow night.",
    "Hello there, my friend. How are you today?",
    "I'm fine; thanks for asking!",
    "The value is 3.5 dollars, which is cheap.",
    "Dr. Smith lives on St. James Street.",
    "She said \"stop\" and then left.",
    "Wait... what did you say?",
    "Please call 555-0123 before 10:30 am.",
    "It costs $1,299.99 in the store.",
    "Our server runs Linux, not Windows.",
    "The quick brown fox jumps over the lazy dog.",
    "Do you prefer tea, coffee, or water?",
    "Read the README file first — it explains everything.",
    "The café serves naïve crème brûlée.",
    "On 2026-12-02 the cluster had 16 GPU nodes.",
    "Temperature: 21 degrees; humidity: 40 percent.",
    "Why not?! Because it is raining.",
    "Kubernetes schedules one pod per node.",
]

# piper-tts bundles its own espeak-ng (1.52); these sentences phonemize the same with Debian's 1.51.
PIPER_SENTENCES = [
    "The backup job finished at half past two.",
    "Hello there, my friend. How are you today?",
]


def main() -> None:
    version = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True).stdout.strip()
    ipa = []
    for text in SENTENCES:
        out = subprocess.run(["espeak-ng", "-q", "--ipa", "-v", "en-us", text], capture_output=True, text=True,
                             check=True).stdout
        ipa.append({"text": text, "clauses": [line.strip() for line in out.splitlines() if line.strip()]})
    (OUT / "espeak-ipa.json").write_text(json.dumps({
        "command": "espeak-ng -q --ipa -v en-us TEXT (scripts/reference/piper_reference.py)",
        "espeak_ng": version,
        "sentences": ipa,
    }, ensure_ascii=False, indent=1) + "\n")

    voice_dir = pathlib.Path(sys.argv[1])
    voice = PiperVoice.load(str(voice_dir / "en_US-joe-medium.onnx"))
    config = SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0)
    cases = []
    for i, text in enumerate(PIPER_SENTENCES):
        chunks = list(voice.synthesize(text, syn_config=config))
        name = f"piper-joe-{i}.s16"
        (OUT / name).write_bytes(b"".join(c.audio_int16_bytes for c in chunks))
        cases.append({
            "text": text,
            "phoneme_ids": [c.phoneme_ids for c in chunks],
            "samples_per_sentence": [len(c.audio_int16_bytes) // 2 for c in chunks],
            "samples_file": name,
        })
    (OUT / "piper-joe.json").write_text(json.dumps({
        "command": "scripts/reference/piper_reference.py <piper-joe-medium> (piper-tts "
                   f"{importlib.metadata.version('piper-tts')}, onnxruntime "
                   f"{importlib.metadata.version('onnxruntime')}, noise_scale=0, noise_w_scale=0)",
        "sample_rate": voice.config.sample_rate,
        "cases": cases,
    }, ensure_ascii=False, indent=1) + "\n")


if __name__ == "__main__":
    main()
