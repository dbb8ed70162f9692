"""Generate Hearth's tiny random-weight GGUF decoders and their reference logits.

Each model is written with gguf-py's GGUFWriter (llama.cpp's own GGUF writer) in the tensor types
Hearth supports, so the Rust tests load real GGUF files through the real loader. Float types and
Q4_0 / Q4_1 / Q8_0 are quantized from random weights by gguf-py; gguf-py cannot quantize K-quants,
so Q4_K / Q5_K / Q6_K tensors are random blocks (random quant bits and scales, block scales chosen so
the weights have a sane spread). Either way the reference reads the stored bits back and dequantizes
them with gguf-py, so it sees exactly the weights Hearth sees.

tests/fixtures/llm/reference.json holds, for each model, token sequences and the float64 logits after
every position, from the independent numpy forward pass in scripts/reference/llama_numpy.py.
Sequence `fork` shares its first FORK_PREFIX tokens with `a`, to test KV-cache forks.

Deterministic: rerunning it rewrites byte-identical files.
Usage (a venv with numpy and gguf==0.19.0): python scripts/gen_tiny_llms.py
"""

import json
import sys
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFWriter
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize, quantize

sys.path.insert(0, str(Path(__file__).resolve().parent / "reference"))
import llama_numpy  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "llm"

HIDDEN = 256  # K-quant rows need a multiple of 256
HEADS = 4
KV_HEADS = 2
FFN = 256
VOCAB = 128
CONTEXT = 64
WEIGHT_STD = 0.06
FORK_PREFIX = 5

# name, architecture, layers, type of the big matrices, type of attn_v/ffn_down/output (the "_M"
# mixes), tied output, RoPE frequency factors
MODELS = [
    ("tiny-llama-f16", "llama", 1, T.F16, T.F16, True, True),
    ("tiny-qwen2-bf16", "qwen2", 1, T.BF16, T.BF16, False, False),
    ("tiny-qwen2-q8_0", "qwen2", 2, T.Q8_0, T.Q8_0, False, False),
    ("tiny-llama-q4_0", "llama", 1, T.Q4_0, T.Q4_0, False, False),
    ("tiny-llama-q4_1", "llama", 1, T.Q4_1, T.Q4_1, True, False),
    ("tiny-llama-q4_k_m", "llama", 2, T.Q4_K, T.Q6_K, False, True),
    ("tiny-llama-q5_k_m", "llama", 1, T.Q5_K, T.Q6_K, False, False),
    ("tiny-qwen2-q6_k", "qwen2", 1, T.Q6_K, T.Q6_K, True, False),
]

# K-quants drawn as random blocks: the byte offset of the f16 super-block scale `d`, and for the
# types with a minimum (w = d·scale·q − dmin·min), the mean quant value: dmin = d × that mean
# centres the weights on zero, as real quantized weights are.
K_QUANTS = {T.Q4_K: (0, 7.5), T.Q5_K: (0, 15.5), T.Q6_K: (208, None)}


def random_kquant(rng, qtype, rows, cols):
    """Random K-quant blocks whose dequantized weights have mean ~0 and deviation WEIGHT_STD."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    offset, mean_q = K_QUANTS[qtype]
    blocks = rng.integers(0, 256, size=(rows * cols // block_size, type_size), dtype=np.uint8)
    d = rng.uniform(0.5, 1.5, size=blocks.shape[0]).astype(np.float32)

    def set_scales(d):
        blocks[:, offset : offset + 2] = d.astype(np.float16).reshape(-1, 1).view(np.uint8)
        if mean_q is not None:
            blocks[:, offset + 2 : offset + 4] = (d * mean_q).astype(np.float16).reshape(-1, 1).view(np.uint8)

    set_scales(d)
    # Weights are linear in the scales: measure the spread and rescale once.
    set_scales(d * (WEIGHT_STD / dequantize(blocks, qtype).std()))
    return blocks.reshape(rows, -1)


def weight(rng, qtype, rows, cols):
    if qtype in K_QUANTS:
        return random_kquant(rng, qtype, rows, cols)
    w = rng.normal(0.0, WEIGHT_STD, size=(rows, cols)).astype(np.float32)
    if qtype == T.F16:
        return w.astype(np.float16)
    return quantize(w, qtype)


def write_model(rng, name, arch, layers, big, mixed, tied, rope_factors):
    path = OUT / f"{name}.gguf"
    writer = GGUFWriter(str(path), arch)
    writer.add_name(name)
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(HIDDEN // HEADS)

    def add(tensor_name, qtype, rows, cols):
        data = weight(rng, qtype, rows, cols)
        writer.add_tensor(tensor_name, data, raw_dtype=None if qtype in (T.F16, T.F32) else qtype)

    def add_f32(tensor_name, values):
        writer.add_tensor(tensor_name, values.astype(np.float32))

    head_dim = HIDDEN // HEADS
    add("token_embd.weight", big, VOCAB, HIDDEN)
    for i in range(layers):
        p = f"blk.{i}"
        add_f32(f"{p}.attn_norm.weight", 1.0 + rng.normal(0.0, 0.1, HIDDEN))
        add(f"{p}.attn_q.weight", big, HIDDEN, HIDDEN)
        add(f"{p}.attn_k.weight", big, KV_HEADS * head_dim, HIDDEN)
        add(f"{p}.attn_v.weight", mixed, KV_HEADS * head_dim, HIDDEN)
        if arch == "qwen2":
            add_f32(f"{p}.attn_q.bias", rng.normal(0.0, 0.1, HIDDEN))
            add_f32(f"{p}.attn_k.bias", rng.normal(0.0, 0.1, KV_HEADS * head_dim))
            add_f32(f"{p}.attn_v.bias", rng.normal(0.0, 0.1, KV_HEADS * head_dim))
        add(f"{p}.attn_output.weight", big, HIDDEN, HIDDEN)
        add_f32(f"{p}.ffn_norm.weight", 1.0 + rng.normal(0.0, 0.1, HIDDEN))
        add(f"{p}.ffn_gate.weight", big, FFN, HIDDEN)
        add(f"{p}.ffn_up.weight", big, FFN, HIDDEN)
        add(f"{p}.ffn_down.weight", mixed, HIDDEN, FFN)
    add_f32("output_norm.weight", 1.0 + rng.normal(0.0, 0.1, HIDDEN))
    if not tied:
        add("output.weight", mixed, VOCAB, HIDDEN)
    if rope_factors:
        add_f32("rope_freqs.weight", rng.uniform(1.0, 4.0, head_dim // 2))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(20261122)
    reference = {"generator": "scripts/gen_tiny_llms.py", "reference": "scripts/reference/llama_numpy.py", "models": []}
    for name, arch, layers, big, mixed, tied, rope_factors in MODELS:
        path = write_model(rng, name, arch, layers, big, mixed, tied, rope_factors)
        model = llama_numpy.Decoder(str(path))
        a = rng.integers(0, VOCAB, size=11).tolist()
        b = rng.integers(0, VOCAB, size=7).tolist()
        fork = a[:FORK_PREFIX] + rng.integers(0, VOCAB, size=5).tolist()
        sequences = {}
        for key, ids in (("a", a), ("b", b), ("fork", fork)):
            logits = model.logits(ids)
            sequences[key] = {"ids": ids, "logits": [[float(f"{v:.7g}") for v in row] for row in logits]}
        # Causality: a prefix's logits do not depend on what follows it.
        assert np.allclose(model.logits(a[:FORK_PREFIX]), model.logits(fork)[:FORK_PREFIX], atol=1e-12)
        reference["models"].append(
            {
                "file": path.name,
                "arch": arch,
                "types": [big.name, mixed.name],
                "fork_prefix": FORK_PREFIX,
                "sequences": sequences,
            }
        )
        print(f"{path.name}: {path.stat().st_size} bytes")
    (OUT / "reference.json").write_text(json.dumps(reference, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    main()
