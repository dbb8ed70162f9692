"""Generate Hearth's tiny random-weight decoders (GGUF files and Hugging Face safetensors folders)
and their reference logits.

Each model is written with gguf-py's GGUFWriter (llama.cpp's own GGUF writer) in the tensor types
Hearth supports, so the Rust tests load real GGUF files through the real loader. Float types and
Q4_0 / Q4_1 / Q8_0 are quantized from random weights by gguf-py; gguf-py cannot quantize K-quants,
so Q4_K / Q5_K / Q6_K tensors are random blocks (random quant bits and scales, block scales chosen so
the weights have a sane spread). Either way the reference reads the stored bits back and dequantizes
them with gguf-py, so it sees exactly the weights Hearth sees.

Safetensors folders (`config.json` + `model.safetensors`, f32 / f16 / bf16) are written in Hugging
Face's layout and names; the reference reads them back with its own parser and Hugging Face's
conventions (NeoX rotation, Gemma's `1 + w` norms, fused Phi-3 matrices, `rope_scaling`).

tests/fixtures/llm/reference.json holds, for each model, token sequences and the float64 logits after
every position, from the independent numpy forward pass in scripts/reference/llama_numpy.py.
Sequence `fork` shares its first FORK_PREFIX tokens with `a`, to test KV-cache forks.

Deterministic: rerunning it rewrites byte-identical files.
Usage (a venv with numpy and gguf==0.19.0): python scripts/gen_tiny_llms.py
"""

import json
import struct
import sys
from pathlib import Path

import math

import gguf
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

# Architectures beyond llama/qwen2 in GGUF: name, architecture, layers, tensor type, and the shape
# and options that set each one apart.
ARCH_MODELS = [
    # Qwen3: per-head Q/K norms, head width (32) not hidden / heads.
    dict(name="tiny-qwen3-q8_0", arch="qwen3", layers=2, qtype=T.Q8_0, head_dim=32),
    # Gemma 3: six layers (five sliding through a window of 4, one global with linear RoPE scaling),
    # GELU, post-attention/FFN norms, scaled tied embeddings, head width 48 over a width of 128.
    dict(name="tiny-gemma3-f16", arch="gemma3", layers=6, qtype=T.F16, hidden=128, ffn=128, kv_heads=1, head_dim=48),
    # Phi-3: fused QKV and gate/up (split at load, here in Q4_1 blocks), LongRoPE long factors (the
    # context 64 passes the original 32) with their attention factor.
    dict(name="tiny-phi3-q4_1", arch="phi3", layers=2, qtype=T.Q4_1),
]

# Hugging Face safetensors folders: name, model_type, layers, dtype, and options.
HF_MODELS = [
    dict(name="tiny-llama-st-f32", model_type="llama", layers=1, dtype="F32", tied=True, llama3=True),
    dict(name="tiny-qwen2-st-f16", model_type="qwen2", layers=1, dtype="F16"),
    dict(name="tiny-qwen3-st-bf16", model_type="qwen3", layers=2, dtype="BF16", head_dim=32),
    dict(name="tiny-gemma3-st-bf16", model_type="gemma3_text", layers=6, dtype="BF16", hidden=128, ffn=128,
         kv_heads=1, head_dim=48, tied=True),
    dict(name="tiny-phi3-st-f16", model_type="phi3", layers=2, dtype="F16"),
]

WINDOW = 4
PHI3_ORIGINAL = 32

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


def write_arch_model(rng, spec):
    """A qwen3 / gemma3 / phi3 GGUF with the tensors and keys llama.cpp's converter writes."""
    arch, qtype, layers = spec["arch"], spec["qtype"], spec["layers"]
    hidden, ffn = spec.get("hidden", HIDDEN), spec.get("ffn", FFN)
    kv_heads, head_dim = spec.get("kv_heads", KV_HEADS), spec.get("head_dim", hidden // HEADS)
    path = OUT / f"{spec['name']}.gguf"
    writer = GGUFWriter(str(path), arch)
    writer.add_name(spec["name"])
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_dimension_count(head_dim)
    if arch == "gemma3":
        writer.add_rope_freq_base(1_000_000.0)
        writer.add_sliding_window(WINDOW)
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(8.0)
    else:
        writer.add_rope_freq_base(10000.0)
    if arch == "phi3":
        writer.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(CONTEXT / PHI3_ORIGINAL) / math.log(PHI3_ORIGINAL)))
        writer.add_rope_scaling_orig_ctx_len(PHI3_ORIGINAL)

    def add(tensor_name, rows, cols):
        data = weight(rng, qtype, rows, cols)
        writer.add_tensor(tensor_name, data, raw_dtype=None if qtype in (T.F16, T.F32) else qtype)

    def add_f32(tensor_name, values):
        writer.add_tensor(tensor_name, values.astype(np.float32))

    norm = lambda n: 1.0 + rng.normal(0.0, 0.1, n)  # noqa: E731
    q_rows, kv_rows = HEADS * head_dim, kv_heads * head_dim
    add("token_embd.weight", VOCAB, hidden)
    for i in range(layers):
        p = f"blk.{i}"
        add_f32(f"{p}.attn_norm.weight", norm(hidden))
        if arch == "phi3":
            add(f"{p}.attn_qkv.weight", q_rows + 2 * kv_rows, hidden)
        else:
            add(f"{p}.attn_q.weight", q_rows, hidden)
            add(f"{p}.attn_k.weight", kv_rows, hidden)
            add(f"{p}.attn_v.weight", kv_rows, hidden)
        if arch in ("qwen3", "gemma3"):
            add_f32(f"{p}.attn_q_norm.weight", norm(head_dim))
            add_f32(f"{p}.attn_k_norm.weight", norm(head_dim))
        add(f"{p}.attn_output.weight", hidden, q_rows)
        if arch == "gemma3":
            add_f32(f"{p}.post_attention_norm.weight", norm(hidden))
        add_f32(f"{p}.ffn_norm.weight", norm(hidden))
        if arch == "phi3":
            add(f"{p}.ffn_up.weight", 2 * ffn, hidden)
        else:
            add(f"{p}.ffn_gate.weight", ffn, hidden)
            add(f"{p}.ffn_up.weight", ffn, hidden)
        add(f"{p}.ffn_down.weight", hidden, ffn)
        if arch == "gemma3":
            add_f32(f"{p}.post_ffw_norm.weight", norm(hidden))
    add_f32("output_norm.weight", norm(hidden))
    if arch != "gemma3":
        add("output.weight", VOCAB, hidden)
    if arch == "phi3":
        add_f32("rope_factors_short.weight", rng.uniform(1.0, 1.5, head_dim // 2))
        add_f32("rope_factors_long.weight", rng.uniform(1.0, 6.0, head_dim // 2))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, [qtype.name]


def write_safetensors(path, tensors, dtype):
    """A safetensors file (header + raw little-endian data), every tensor stored as `dtype`."""
    header, chunks, offset = {}, [], 0
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name], dtype=np.float32)
        if dtype == "F32":
            raw = a.astype("<f4").tobytes()
        elif dtype == "F16":
            raw = a.astype("<f2").tobytes()
        else:  # BF16, rounded to nearest even
            bits = a.view(np.uint32).astype(np.uint64)
            raw = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2").tobytes()
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + b"".join(chunks))


def write_hf_model(rng, spec):
    """A Hugging Face checkpoint folder: config.json and model.safetensors."""
    model_type, layers, dtype = spec["model_type"], spec["layers"], spec["dtype"]
    hidden, ffn = spec.get("hidden", HIDDEN), spec.get("ffn", FFN)
    kv_heads, head_dim = spec.get("kv_heads", KV_HEADS), spec.get("head_dim", hidden // HEADS)
    gemma, phi3 = model_type.startswith("gemma3"), model_type == "phi3"
    config = {
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": HEADS,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": CONTEXT,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1_000_000.0 if gemma else 10000.0,
        "vocab_size": VOCAB,
        "tie_word_embeddings": spec.get("tied", False),
    }
    if spec.get("llama3"):
        config["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    if gemma:
        config.update(query_pre_attn_scalar=40, sliding_window=WINDOW, sliding_window_pattern=6,
                      rope_local_base_freq=10000.0, rope_scaling={"rope_type": "linear", "factor": 8.0})
    if phi3:
        config.update(original_max_position_embeddings=PHI3_ORIGINAL, rope_scaling={
            "type": "longrope",
            "short_factor": rng.uniform(1.0, 1.5, head_dim // 2).round(4).tolist(),
            "long_factor": rng.uniform(1.0, 6.0, head_dim // 2).round(4).tolist(),
        })
    w = lambda rows, cols: rng.normal(0.0, WEIGHT_STD, size=(rows, cols))  # noqa: E731
    # Gemma stores norms as w - 1 (it multiplies by 1 + w).
    norm = lambda n: rng.normal(0.0, 0.1, n) + (0.0 if gemma else 1.0)  # noqa: E731
    q_rows, kv_rows = HEADS * head_dim, kv_heads * head_dim
    t = {"model.embed_tokens.weight": w(VOCAB, hidden), "model.norm.weight": norm(hidden)}
    for i in range(layers):
        p = f"model.layers.{i}"
        t[f"{p}.input_layernorm.weight"] = norm(hidden)
        t[f"{p}.post_attention_layernorm.weight"] = norm(hidden)
        if phi3:
            t[f"{p}.self_attn.qkv_proj.weight"] = w(q_rows + 2 * kv_rows, hidden)
            t[f"{p}.mlp.gate_up_proj.weight"] = w(2 * ffn, hidden)
        else:
            t[f"{p}.self_attn.q_proj.weight"] = w(q_rows, hidden)
            t[f"{p}.self_attn.k_proj.weight"] = w(kv_rows, hidden)
            t[f"{p}.self_attn.v_proj.weight"] = w(kv_rows, hidden)
            t[f"{p}.mlp.gate_proj.weight"] = w(ffn, hidden)
            t[f"{p}.mlp.up_proj.weight"] = w(ffn, hidden)
        if model_type == "qwen2":
            for n, rows in (("q", q_rows), ("k", kv_rows), ("v", kv_rows)):
                t[f"{p}.self_attn.{n}_proj.bias"] = rng.normal(0.0, 0.1, rows)
        if model_type == "qwen3" or gemma:
            t[f"{p}.self_attn.q_norm.weight"] = norm(head_dim)
            t[f"{p}.self_attn.k_norm.weight"] = norm(head_dim)
        if gemma:
            t[f"{p}.pre_feedforward_layernorm.weight"] = norm(hidden)
            t[f"{p}.post_feedforward_layernorm.weight"] = norm(hidden)
        t[f"{p}.self_attn.o_proj.weight"] = w(hidden, q_rows)
        t[f"{p}.mlp.down_proj.weight"] = w(hidden, ffn)
    if not spec.get("tied", False):
        t["lm_head.weight"] = w(VOCAB, hidden)
    path = OUT / spec["name"]
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    write_safetensors(path / "model.safetensors", t, dtype)
    return path, [dtype]


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(20261122)
    reference = {"generator": "scripts/gen_tiny_llms.py", "reference": "scripts/reference/llama_numpy.py", "models": []}
    # Each model's weights, then its sequences, from one random stream (so models added at the end
    # leave the earlier files as they were).
    jobs = [("gguf", m) for m in MODELS] + [("arch", s) for s in ARCH_MODELS] + [("hf", s) for s in HF_MODELS]
    for kind, spec in jobs:
        if kind == "gguf":
            path, arch, types = write_model(rng, *spec), spec[1], [spec[3].name, spec[4].name]
        elif kind == "arch":
            (path, types), arch = write_arch_model(rng, spec), spec["arch"]
        else:
            (path, types), arch = write_hf_model(rng, spec), spec["model_type"]
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
                "types": types,
                "fork_prefix": FORK_PREFIX,
                "sequences": sequences,
            }
        )
        size = sum(f.stat().st_size for f in path.iterdir()) if path.is_dir() else path.stat().st_size
        print(f"{path.name}: {size} bytes")
    (OUT / "reference.json").write_text(json.dumps(reference, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    main()
