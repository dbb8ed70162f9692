#!/usr/bin/env python3
"""Peer for `cargo bench --bench llm`: llama.cpp (through llama-cpp-python) on the same GGUF, with the
same prompts and 2 threads. Prints one JSON line:

  decode_tok_s        greedy decode after "Once upon a time", 128 tokens, one stream (median of 3)
  ttft_512_s          time to evaluate a 512-token prompt and get its first token (median of 3)
  decode_at_context   decode tok/s over 32 tokens after a prompt of 128, 1024 and 4096 tokens
  aggregate_tok_s_8_sequences
                      8 sequences decoded together in one context (llama.cpp's batched decoding, as
                      llama-server's parallel slots and llama-batched-bench run it): prompts
                      "Story number i: once upon a time" prefilled in one batch, then 128 greedy tokens
                      each, one batch per step; tokens over the wall time from the prefill on (as
                      Hearth's bench counts its 8 streams; median of 3)

Set up: python3 -m venv ~/.cache/hearth/peers/llm-venv &&
        CMAKE_ARGS=-DGGML_NATIVE=ON ~/.cache/hearth/peers/llm-venv/bin/pip install llama-cpp-python==0.3.36 numpy
On a CPU with AMX (Sapphire Rapids and later) a native build enables ggml's AMX kernels, which crash
in this llama.cpp (SIGSEGV in ggml_backend_amx_mul_mat at the first decode, seen 2026-12-07); build
for the same CPU without AMX instead:
        CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_AVX_VNNI=ON -DGGML_AVX512=ON
        -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_FMA=ON -DGGML_F16C=ON
        -DGGML_BMI2=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" .../pip install ...
Usage: python llm_llamacpp.py MODEL.gguf
"""

import ctypes
import json
import statistics
import sys
import time

import llama_cpp
import numpy as np
from llama_cpp import Llama

FILLER = "the quick brown fox jumps over the lazy dog "


def batched(llm, streams=8, tokens=128):
    """Aggregate tokens/s of `streams` sequences decoded together in one llama.cpp context."""
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = streams * 512
    params.n_batch = 512
    params.n_seq_max = streams
    params.n_threads = params.n_threads_batch = 2
    params.flash_attn_type = llm.context_params.flash_attn_type
    ctx = llama_cpp.llama_init_from_model(llm._model.model, params)
    n_vocab = llm.n_vocab()
    batch = llama_cpp.llama_batch_init(512, 0, 1)
    prompts = [llm.tokenize(f"Story number {i}: once upon a time".encode(), add_bos=False) for i in range(streams)]

    def submit(entries):
        """entries: (token, position, sequence, wants logits); returns the logits rows' indices."""
        batch.n_tokens = len(entries)
        for i, (token, pos, seq, logits) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
            batch.seq_id[i][0], batch.logits[i] = seq, logits
        assert llama_cpp.llama_decode(ctx, batch) == 0, "llama_decode failed"

    def argmax(i):
        row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, i), shape=(n_vocab,))
        return int(row.argmax())

    def run():
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        t = time.perf_counter()
        entries = [(tok, pos, s, pos == len(p) - 1) for s, p in enumerate(prompts) for pos, tok in enumerate(p)]
        submit(entries)
        last = [i for i, e in enumerate(entries) if e[3]]
        nxt = [argmax(i) for i in last]
        positions = [len(p) for p in prompts]
        generated = streams
        for _ in range(tokens - 1):
            submit([(nxt[s], positions[s], s, True) for s in range(streams)])
            nxt = [argmax(s) for s in range(streams)]
            positions = [p + 1 for p in positions]
            generated += streams
        return generated / (time.perf_counter() - t)

    run()  # warm up
    rate = statistics.median(run() for _ in range(3))
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_free(ctx)
    return rate


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
    aggregate = batched(llm)
    print(json.dumps({
        "peer": "llama.cpp (llama-cpp-python 0.3.36)",
        "threads": 2,
        "decode_tok_s": round(decode, 1),
        "ttft_512_s": round(ttft_512, 3),
        "decode_at_context_tok_s": at_context,
        "aggregate_tok_s_8_sequences": round(aggregate, 1),
        "aggregate_over_single": round(aggregate / decode, 2),
    }))


if __name__ == "__main__":
    main()
