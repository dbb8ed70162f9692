#!/usr/bin/env python3
"""Peer for `cargo bench --bench stt`: faster-whisper (CTranslate2) on the same Whisper base
CTranslate2 folder and the same LibriVox clips, 2 CPU threads, greedy (beam_size=1), English.
Prints one JSON object for the compute type asked for (`float32` or `int8`; one process each, so
each peak RSS is its own):

  speed_x_realtime   seconds of audio per second, the five clips one after another
  wer                word error rate over the five clips (normalised as the bench does)
  latency_5s_s       one 5.3 s clip, median of 3
  concurrent4_x_realtime  audio seconds per second with 4 requests in flight (num_workers=4, 20 requests)
  peak_rss_mib       the process's peak resident set

Installed by tests/e2e/requirements.txt (faster-whisper==1.2.1) into ~/.cache/hearth/venv.
Usage: python stt_faster_whisper.py MODEL_DIR COMPUTE_TYPE
"""

import json
import re
import resource
import statistics
import sys
import time
import wave
from concurrent.futures import ThreadPoolExecutor

from faster_whisper import WhisperModel

DATA = "/usr/share/pocketsphinx/test/data/librivox/"
FIVE_SECONDS = DATA + "sense_and_sensibility_01_austen_64kb-0890.wav"


def references():
    refs = {}
    for line in open(DATA + "transcription"):
        m = re.match(r"<s>(.*)</s>\s*\((.*)\)", line.strip())
        if m:
            refs[m.group(2).strip()] = m.group(1).strip()
    return refs


def words(text):
    return re.sub(r"[^a-z' ]", " ", text.lower()).split()


def errors(ref, hyp):
    r, h = words(ref), words(hyp)
    d = list(range(len(h) + 1))
    for i in range(1, len(r) + 1):
        prev, d[0] = d[0], i
        for j in range(1, len(h) + 1):
            cur = min(d[j] + 1, d[j - 1] + 1, prev + (r[i - 1] != h[j - 1]))
            prev, d[j] = d[j], cur
    return d[len(h)], len(r)


def seconds(path):
    with wave.open(path) as w:
        return w.getnframes() / w.getframerate()


def main():
    model_dir = sys.argv[1]
    refs = references()
    clips = [DATA + rid + ".wav" for rid in sorted(refs)]
    for compute in sys.argv[2:3]:
        model = WhisperModel(model_dir, device="cpu", compute_type=compute, cpu_threads=2, num_workers=4)

        def transcribe(path):
            segments, _ = model.transcribe(path, beam_size=1, language="en")
            return " ".join(s.text for s in segments)

        transcribe(clips[0])  # warm up
        start = time.perf_counter()
        hyps = [transcribe(c) for c in clips]
        elapsed = time.perf_counter() - start
        audio = sum(seconds(c) for c in clips)
        e = n = 0
        for rid, hyp in zip(sorted(refs), hyps):
            de, dn = errors(refs[rid], hyp)
            e, n = e + de, n + dn
        latencies = []
        for _ in range(3):
            t = time.perf_counter()
            transcribe(FIVE_SECONDS)
            latencies.append(time.perf_counter() - t)
        jobs = [clips[i % len(clips)] for i in range(20)]
        t = time.perf_counter()
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(transcribe, jobs))
        concurrent = sum(seconds(c) for c in jobs) / (time.perf_counter() - t)
        print(json.dumps({
            "peer": "faster-whisper", "compute_type": compute,
            "speed_x_realtime": round(audio / elapsed, 2), "wer": round(e / n, 4),
            "latency_5s_s": round(statistics.median(latencies), 3),
            "concurrent4_x_realtime": round(concurrent, 2),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }))
        del model


if __name__ == "__main__":
    main()
