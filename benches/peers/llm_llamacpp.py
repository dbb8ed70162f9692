#!/usr/bin/env python3
"""Peer for `cargo bench --bench llm`: llama.cpp (through llama-cpp-python) on the same GGUF, with the
same prompts and 2 threads. Prints one JSON line:

  decode_tok_s        greedy decode after "Once upon a time", 128 tokens, one stream (median of 3)
  ttft_512_s          time to evaluate a 512-token prompt and get its first token (median of 3)
  decode_at_context   decode tok/s over 32 tokens after a prompt of 128, 1024 and 4096 tokens

Set up: python3 -m venv ~/.cache/hearth/peers/llm-venv &&
        CMAKE_ARGS=-DGGML_NATIVE=ON ~/.cache/hearth/peers/llm-venv/bin/pip install llama-cpp-python==0.3.36
Usage: python llm_llamacpp.py MODEL.gguf
"""

import json
import statistics
import sys
import time

from llama_cpp import Llama

FILLER = "the quick brown fox jumps over the lazy dog "


def main():
    llm = Llama(model_path=sys.argv[1], n_ctx=4096 + 64, n_threads=2, n_threads_batch=2, n_batch=512, verbose=False)

    def decode_rate(tokens, n):
        """Tokens/s between the first and the last of `n` greedy tokens after `tokens`."""
        llm.reset()
        stamps = []
        for _ in llm.generate(tokens, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            stamps.append(time.perf_counter())
            if len(stamps) == n:
                break
        return (len(stamps) - 1) / (stamps[-1] - stamps[0])

    start = llm.tokenize(b"Once upon a time", add_bos=False)
    decode_rate(start, 16)  # warm up
    decode = statistics.median(decode_rate(start, 128) for _ in range(3))

    filler = llm.tokenize((FILLER * 1000).encode(), add_bos=False)

    def ttft(n):
        llm.reset()
        t = time.perf_counter()
        for _ in llm.generate(filler[:n], top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            return time.perf_counter() - t

    ttft(512)
    ttft_512 = statistics.median(ttft(512) for _ in range(3))
    at_context = {str(n): round(decode_rate(filler[:n], 32), 1) for n in (128, 1024, 4096)}
    print(json.dumps({
        "peer": "llama.cpp (llama-cpp-python 0.3.36)",
        "threads": 2,
        "decode_tok_s": round(decode, 1),
        "ttft_512_s": round(ttft_512, 3),
        "decode_at_context_tok_s": at_context,
    }))


if __name__ == "__main__":
    main()
