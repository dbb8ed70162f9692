#!/usr/bin/env python3
"""Peer for `cargo bench --bench rerank`: a cross-encoder's ONNX export on ONNX Runtime from Python.

What a user scoring (query, document) pairs with ONNX Runtime directly would run (fastembed's and
text-embeddings-inference's CPU route): the model's tokenizer on pairs, padding to the longest pair
of each batch, one session with two intra-op threads, the logits of each batch read back.

Usage: rerank_ort.py MODEL.onnx TOKENIZER.json
Prints one JSON line: pairs/s at batch 1 and 32 on the bench's 1,000 pairs (median of 3 after a
warm-up), the tokens per pair, and this process's peak RSS.
"""
import json
import sys
import time

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

# The bench's pairs (benches/rerank.rs builds the same ones): four questions, each document two
# sentences from a small homelab corpus and an item number.
QUERIES = [
    "How often does the backup job run?",
    "Which dashboards show memory usage?",
    "How does the laptop reach the home network?",
    "What does the GPU node serve?",
]
SENTENCES = [
    "The backup job runs every night and keeps thirty days of snapshots on the NAS.",
    "WireGuard tunnels connect the laptop to the home network from anywhere.",
    "The GPU node serves language models, speech recognition and text to speech.",
    "Grafana dashboards show memory, CPU and disk usage for every machine.",
    "The media server transcodes films for the television in the living room.",
]
PAIRS = [(QUERIES[i % 4], f"{SENTENCES[i % 5]} {SENTENCES[(i + 2) % 5]} Item {i}.") for i in range(1000)]


def main():
    onnx_path, tok_path = sys.argv[1], sys.argv[2]
    tok = Tokenizer.from_file(tok_path)
    tok.enable_padding()
    tok.enable_truncation(512)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]

    def run(bs):
        t = time.perf_counter()
        for i in range(0, len(PAIRS), bs):
            enc = tok.encode_batch(PAIRS[i : i + bs])
            feeds = {
                "input_ids": np.array([e.ids for e in enc], dtype=np.int64),
                "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
            }
            if "token_type_ids" in names:
                feeds["token_type_ids"] = np.array([e.type_ids for e in enc], dtype=np.int64)
            logits = sess.run(["logits"], feeds)[0]
            assert logits.shape == (len(enc), 1), logits.shape
        return len(PAIRS) / (time.perf_counter() - t)

    run(32)
    rates = {bs: round(sorted(run(bs) for _ in range(3))[1], 1) for bs in (1, 32)}
    tok.no_padding()
    tokens = sum(len(e.ids) for e in tok.encode_batch(PAIRS)) / len(PAIRS)
    with open("/proc/self/status") as status:
        peak_kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    print(json.dumps({
        "peer": "onnxruntime",
        "onnxruntime_version": ort.__version__,
        "model": onnx_path,
        "pairs_per_s_batch1": rates[1],
        "pairs_per_s_batch32": rates[32],
        "tokens_per_pair": round(tokens, 2),
        "peak_rss_mib": round(peak_kib / 1024, 1),
    }))


if __name__ == "__main__":
    main()
