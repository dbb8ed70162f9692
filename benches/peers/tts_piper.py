#!/usr/bin/env python3
"""Peer for `cargo bench --bench tts`: piper-tts (PyPI) on the same Piper voice and the same text,
on the CPU (ONNX Runtime's default threads, as Hearth). Prints one JSON object:

  speed_x_realtime        seconds of audio per second for the 3-sentence text (median of 15)
  first_audio_s           time to the first sentence's audio for that text (median of 15)
  concurrent4_x_realtime  audio seconds per second with 4 requests in flight (4 threads, 12 requests)
  peak_rss_mib            the process's peak resident set

Installed by tests/e2e/requirements.txt (piper-tts==1.8.0) into ~/.cache/hearth/venv.
Usage: python tts_piper.py VOICE.onnx
"""

import json
import resource
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from piper import PiperVoice

TEXT = ("The backup job finished at half past two. All twelve snapshots were verified. "
        "The next run is scheduled for tomorrow night.")


def main() -> None:
    voice = PiperVoice.load(sys.argv[1])
    rate = voice.config.sample_rate
    list(voice.synthesize(TEXT))  # warm-up

    def speak() -> tuple[float, float, float]:
        started = time.perf_counter()
        first = None
        samples = 0
        for chunk in voice.synthesize(TEXT):
            if first is None:
                first = time.perf_counter() - started
            samples += len(chunk.audio_int16_bytes) // 2
        return time.perf_counter() - started, first, samples / rate

    runs = [speak() for _ in range(15)]
    speed = statistics.median(audio / total for total, _, audio in runs)
    first = statistics.median(first for _, first, _ in runs)
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=4) as pool:
        audio = sum(a for _, _, a in pool.map(lambda _: speak(), range(12)))
    concurrent = audio / (time.perf_counter() - started)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({
        "peer": "piper-tts",
        "speed_x_realtime": round(speed, 2),
        "first_audio_s": round(first, 4),
        "concurrent4_x_realtime": round(concurrent, 2),
        "peak_rss_mib": round(rss, 1),
    }))


if __name__ == "__main__":
    main()
