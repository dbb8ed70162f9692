"""An independent float64 numpy forward pass for the decoders Hearth runs, from GGUF or from a
Hugging Face safetensors folder.

It shares no code with Hearth. GGUF weights are read and dequantized by gguf-py (llama.cpp's own
Python package) and interpreted as llama.cpp's graphs do; safetensors are parsed here (a JSON header
and raw little-endian arrays) and interpreted as Hugging Face's modelling code does. Per block:

  h = rms_norm(x)                                   (Gemma: weights 1 + w in safetensors)
  q, k, v = h Wq, h Wk, h Wv  (+ biases: qwen2)     (Phi-3: one fused QKV matrix)
  q, k = rms_norm per head                          (qwen3, gemma3)
  q, k = rope(q), rope(k)
  a = soft-max(q kᵀ · scale + causal/window mask) v  (grouped-query: KV head h // (heads/kv_heads))
  a = a Wo; a = rms_norm(a)                         (gemma3: post-attention norm)
  x += a
  f = act(h2 Wgate) * (h2 Wup), h2 = rms_norm(x)    (SiLU; Gemma: GELU tanh; Phi-3: fused gate/up)
  f = f Wdown; f = rms_norm(f)                      (gemma3: post-FFN norm)
  x += f
  logits = rms_norm(x) Woutput                      (the embedding table when tied)

Rotation: `llama` GGUFs rotate adjacent pairs (GGML's normal mode, the converter permutes Q/K rows
for it); everything else, and every safetensors checkpoint, rotates the two halves (NeoX). Frequency
factors divide each pair's frequency (Llama 3.x `rope_freqs`, Phi-3's LongRoPE short/long factors,
chosen by the model's context as llama.cpp chooses them); linear scaling divides the positions;
LongRoPE's attention factor multiplies cosines and sines. Gemma 3: embeddings times √hidden, every
sixth layer global, the others attending through a sliding window (keys p - window < j <= p) with
their own RoPE base and no scaling.
"""

import json
import math
import struct
from pathlib import Path

import numpy as np


class Decoder:
    """Build with `Decoder(path)`: a `.gguf` file or a safetensors folder."""

    def __init__(self, path):
        path = Path(path)
        if path.is_dir():
            self._load_hf(path)
        else:
            self._load_gguf(path)
        self.group = self.heads // self.kv_heads

    # ---- GGUF (llama.cpp's conventions) ----
    def _load_gguf(self, path):
        from gguf import GGUFReader
        from gguf.quants import dequantize

        reader = GGUFReader(str(path))
        fields = {f.name: f for f in reader.fields.values()}

        def value(name, default=None):
            field = fields.get(name)
            if field is None:
                if default is None:
                    raise KeyError(name)
                return default
            return field.contents()

        self.arch = value("general.architecture")
        key = lambda name, default=None: value(f"{self.arch}.{name}", default)  # noqa: E731
        self.hidden = key("embedding_length")
        self.layers = key("block_count")
        self.heads = key("attention.head_count")
        self.kv_heads = key("attention.head_count_kv", self.heads)
        self.head_dim = key("attention.key_length", self.hidden // self.heads)
        self.eps = key("attention.layer_norm_rms_epsilon")
        self.context = key("context_length")
        self.rope_base = key("rope.freq_base", 10000.0)
        self.rope_dims = key("rope.dimension_count", self.head_dim)
        self.neox = self.arch != "llama"
        scaling = key("rope.scaling.type", "none")
        self.position_scale = 1.0 / key("rope.scaling.factor", 1.0) if scaling == "linear" else 1.0
        self.attn_factor = key("rope.scaling.attn_factor", 1.0)

        t = {}
        for tensor in reader.tensors:
            shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))  # numpy order: [rows, cols]
            t[tensor.name] = dequantize(tensor.data, tensor.tensor_type).astype(np.float64).reshape(shape)
        self.freq_factors = None
        if "rope_freqs.weight" in t:
            self.freq_factors = t["rope_freqs.weight"].reshape(-1)
        elif "rope_factors_short.weight" in t:
            original = key("rope.scaling.original_context_length")
            which = "long" if self.context > original else "short"
            self.freq_factors = t[f"rope_factors_{which}.weight"].reshape(-1)

        self.embed = t["token_embd.weight"]
        self.output = t.get("output.weight", self.embed)
        self.final_norm = t["output_norm.weight"].reshape(-1)
        self.blocks = []
        q_rows, kv_rows = self.heads * self.head_dim, self.kv_heads * self.head_dim
        for i in range(self.layers):
            g = lambda name: t.get(f"blk.{i}.{name}")  # noqa: E731
            b = {"attn_norm": g("attn_norm.weight"), "ffn_norm": g("ffn_norm.weight")}
            if g("attn_qkv.weight") is not None:
                qkv = g("attn_qkv.weight")
                b["q"], b["k"], b["v"] = qkv[:q_rows], qkv[q_rows : q_rows + kv_rows], qkv[q_rows + kv_rows :]
            else:
                b["q"], b["k"], b["v"] = g("attn_q.weight"), g("attn_k.weight"), g("attn_v.weight")
            b["q_bias"], b["k_bias"], b["v_bias"] = g("attn_q.bias"), g("attn_k.bias"), g("attn_v.bias")
            b["o"] = g("attn_output.weight")
            b["q_norm"], b["k_norm"] = g("attn_q_norm.weight"), g("attn_k_norm.weight")
            b["post_attn_norm"], b["post_ffn_norm"] = g("post_attention_norm.weight"), g("post_ffw_norm.weight")
            if g("ffn_gate.weight") is not None:
                b["gate"], b["up"] = g("ffn_gate.weight"), g("ffn_up.weight")
            else:
                fused = g("ffn_up.weight")
                half = fused.shape[0] // 2
                b["gate"], b["up"] = fused[:half], fused[half:]
            b["down"] = g("ffn_down.weight")
            self.blocks.append(b)

        self.gelu = self.arch == "gemma3"
        self.embed_scale = math.sqrt(self.hidden) if self.arch == "gemma3" else 1.0
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.window, self.pattern, self.local_base = None, None, None
        if self.arch == "gemma3":
            self.window = key("attention.sliding_window")
            self.pattern = 6
            self.local_base = key("rope.freq_base_swa", 10000.0)
        self.softcap = key("final_logit_softcapping", 0.0) or None

    # ---- Hugging Face safetensors (Hugging Face's conventions) ----
    def _load_hf(self, path):
        config = json.loads((path / "config.json").read_text())
        self.arch = {"mistral": "llama", "gemma3_text": "gemma3"}.get(config["model_type"], config["model_type"])
        c = config.get("text_config", config)
        t = {}
        for shard in sorted(path.glob("*.safetensors")):
            t.update(read_safetensors(shard))
        prefix = next(p for p in ("model.", "language_model.model.", "model.language_model.") if f"{p}embed_tokens.weight" in t)
        self.hidden = c["hidden_size"]
        self.layers = c["num_hidden_layers"]
        self.heads = c["num_attention_heads"]
        self.kv_heads = c.get("num_key_value_heads", self.heads)
        self.head_dim = c.get("head_dim") or self.hidden // self.heads
        self.eps = c.get("rms_norm_eps", 1e-6)
        self.context = c.get("max_position_embeddings", 4096)
        self.rope_base = c.get("rope_theta", 1e6 if self.arch == "gemma3" else 10000.0)
        self.rope_dims = int(self.head_dim * c.get("partial_rotary_factor", 1.0))
        self.neox = True
        self.position_scale, self.attn_factor, self.freq_factors = 1.0, 1.0, None
        scaling = c.get("rope_scaling") or {}
        kind = scaling.get("rope_type", scaling.get("type"))
        half = self.rope_dims // 2
        inv = self.rope_base ** (-np.arange(half, dtype=np.float64) * 2.0 / self.rope_dims)
        if kind == "linear":
            self.position_scale = 1.0 / scaling["factor"]
        elif kind == "llama3":
            # Hugging Face's `_compute_llama3_parameters`, expressed as divisors of the frequencies.
            factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
            original = scaling["original_max_position_embeddings"]
            wavelen = 2 * math.pi / inv
            scaled = np.where(wavelen > original / low, inv / factor, inv)
            smooth = (original / wavelen - low) / (high - low)
            medium = ~(wavelen < original / high) & ~(wavelen > original / low)
            scaled = np.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
            self.freq_factors = inv / scaled
        elif kind in ("longrope", "su"):
            original = c["original_max_position_embeddings"]
            which = "long_factor" if self.context > original else "short_factor"
            self.freq_factors = np.asarray(scaling[which], dtype=np.float64)
            ratio = self.context / original
            self.attn_factor = math.sqrt(1 + math.log(ratio) / math.log(original)) if ratio > 1 else 1.0

        gemma = self.arch == "gemma3"
        norm = lambda w: (1.0 + w) if gemma else w  # noqa: E731
        self.embed = t[f"{prefix}embed_tokens.weight"]
        lm_head = "language_model.lm_head.weight" if prefix == "language_model.model." else "lm_head.weight"
        tied = c.get("tie_word_embeddings", config.get("tie_word_embeddings", False))
        self.output = self.embed if tied or lm_head not in t else t[lm_head]
        self.final_norm = norm(t[f"{prefix}norm.weight"])
        self.blocks = []
        q_rows, kv_rows = self.heads * self.head_dim, self.kv_heads * self.head_dim
        for i in range(self.layers):
            g = lambda name: t.get(f"{prefix}layers.{i}.{name}")  # noqa: E731
            b = {"attn_norm": norm(g("input_layernorm.weight"))}
            if gemma:
                b["post_attn_norm"] = norm(g("post_attention_layernorm.weight"))
                b["ffn_norm"] = norm(g("pre_feedforward_layernorm.weight"))
                b["post_ffn_norm"] = norm(g("post_feedforward_layernorm.weight"))
            else:
                b["ffn_norm"], b["post_attn_norm"], b["post_ffn_norm"] = g("post_attention_layernorm.weight"), None, None
            if g("self_attn.qkv_proj.weight") is not None:
                qkv = g("self_attn.qkv_proj.weight")
                b["q"], b["k"], b["v"] = qkv[:q_rows], qkv[q_rows : q_rows + kv_rows], qkv[q_rows + kv_rows :]
            else:
                b["q"], b["k"], b["v"] = (g(f"self_attn.{n}_proj.weight") for n in "qkv")
            b["q_bias"], b["k_bias"], b["v_bias"] = (g(f"self_attn.{n}_proj.bias") for n in "qkv")
            b["o"] = g("self_attn.o_proj.weight")
            qn, kn = g("self_attn.q_norm.weight"), g("self_attn.k_norm.weight")
            b["q_norm"] = None if qn is None else norm(qn)
            b["k_norm"] = None if kn is None else norm(kn)
            if g("mlp.gate_up_proj.weight") is not None:
                fused = g("mlp.gate_up_proj.weight")
                half_rows = fused.shape[0] // 2
                b["gate"], b["up"] = fused[:half_rows], fused[half_rows:]
            else:
                b["gate"], b["up"] = g("mlp.gate_proj.weight"), g("mlp.up_proj.weight")
            b["down"] = g("mlp.down_proj.weight")
            self.blocks.append(b)

        self.gelu = gemma
        self.embed_scale = math.sqrt(self.hidden) if gemma else 1.0
        self.scale = c.get("query_pre_attn_scalar", self.head_dim) ** -0.5 if gemma else 1.0 / math.sqrt(self.head_dim)
        self.window, self.pattern, self.local_base = None, None, None
        if gemma and c.get("sliding_window"):
            self.window = c["sliding_window"]
            self.pattern = c.get("sliding_window_pattern", 6)
            self.local_base = c.get("rope_local_base_freq", 10000.0)
        self.softcap = c.get("final_logit_softcapping")

    # ---- the forward pass ----
    def _rms_norm(self, x, weight):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * weight.reshape(-1)

    def _slides(self, layer):
        return self.window is not None and layer % self.pattern < self.pattern - 1

    def _rope(self, x, positions, local):
        # x: [T, heads, head_dim]
        half = self.rope_dims // 2
        base = self.local_base if local else self.rope_base
        inv = base ** (-np.arange(half, dtype=np.float64) * 2.0 / self.rope_dims)
        scale, attn_factor = 1.0, 1.0
        if not local:
            if self.freq_factors is not None:
                inv = inv / self.freq_factors[:half]
            scale, attn_factor = self.position_scale, self.attn_factor
        theta = np.asarray(positions, dtype=np.float64)[:, None] * scale * inv[None, :]
        cos, sin = attn_factor * np.cos(theta)[:, None, :], attn_factor * np.sin(theta)[:, None, :]
        out = x.copy()
        if self.neox:
            a, b = x[..., :half], x[..., half : 2 * half]
            out[..., :half] = a * cos - b * sin
            out[..., half : 2 * half] = a * sin + b * cos
        else:
            a, b = x[..., 0 : 2 * half : 2], x[..., 1 : 2 * half : 2]
            out[..., 0 : 2 * half : 2] = a * cos - b * sin
            out[..., 1 : 2 * half : 2] = a * sin + b * cos
        return out

    @staticmethod
    def _linear(x, weight, bias=None):
        y = x @ weight.T
        return y if bias is None else y + bias.reshape(-1)

    def logits(self, ids):
        """Logits after every position of `ids`, shape [len(ids), vocab]."""
        t = len(ids)
        x = self.embed[np.asarray(ids)] * self.embed_scale
        positions = np.arange(t)
        for i, b in enumerate(self.blocks):
            local = self._slides(i)
            visible = positions[None, :] <= positions[:, None]
            if local:
                visible &= positions[:, None] - positions[None, :] < self.window
            mask = np.where(visible, 0.0, -np.inf)
            h = self._rms_norm(x, b["attn_norm"])
            q = self._linear(h, b["q"], b["q_bias"]).reshape(t, self.heads, self.head_dim)
            k = self._linear(h, b["k"], b["k_bias"]).reshape(t, self.kv_heads, self.head_dim)
            v = self._linear(h, b["v"], b["v_bias"]).reshape(t, self.kv_heads, self.head_dim)
            if b["q_norm"] is not None:
                q, k = self._rms_norm(q, b["q_norm"]), self._rms_norm(k, b["k_norm"])
            q, k = self._rope(q, positions, local), self._rope(k, positions, local)
            out = np.empty((t, self.heads, self.head_dim))
            for head in range(self.heads):
                kv = head // self.group
                scores = q[:, head, :] @ k[:, kv, :].T * self.scale + mask
                scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
                scores /= scores.sum(axis=-1, keepdims=True)
                out[:, head, :] = scores @ v[:, kv, :]
            a = self._linear(out.reshape(t, -1), b["o"])
            if b["post_attn_norm"] is not None:
                a = self._rms_norm(a, b["post_attn_norm"])
            x = x + a
            h = self._rms_norm(x, b["ffn_norm"])
            gate = self._linear(h, b["gate"])
            if self.gelu:
                act = 0.5 * gate * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (gate + 0.044715 * gate**3)))
            else:
                act = gate / (1.0 + np.exp(-gate))
            f = self._linear(act * self._linear(h, b["up"]), b["down"])
            if b["post_ffn_norm"] is not None:
                f = self._rms_norm(f, b["post_ffn_norm"])
            x = x + f
        logits = self._rms_norm(x, self.final_norm) @ self.output.T
        if self.softcap:
            logits = self.softcap * np.tanh(logits / self.softcap)
        return logits


def read_safetensors(path):
    """A safetensors file's tensors as float64 arrays (F32, F16 and BF16)."""
    data = Path(path).read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    body = data[8 + header_len :]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        raw = body[start:end]
        if info["dtype"] == "F32":
            a = np.frombuffer(raw, dtype="<f4")
        elif info["dtype"] == "F16":
            a = np.frombuffer(raw, dtype="<f2")
        elif info["dtype"] == "BF16":
            a = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            raise ValueError(f"{path}: {name}: dtype {info['dtype']}")
        out[name] = a.astype(np.float64).reshape(info["shape"])
    return out
