"""An independent float64 numpy forward pass for llama-family decoders stored as GGUF.

It shares no code with Hearth: weights are read and dequantized by gguf-py (llama.cpp's own Python
package), and the arithmetic follows llama.cpp's graph for `llama` and `qwen2`:

  x = token_embd[ids]
  per block: x += attn_output(attention(rope(q), rope(k), v))      with q/k/v from rms_norm(x)
             x += ffn_down(silu(ffn_gate(h)) * ffn_up(h))           with h = rms_norm(x)
  logits = output(rms_norm(x))                                     (token_embd when output is tied)

Rotation: `llama` GGUFs rotate adjacent pairs (GGML's normal mode, the converter permutes Q/K rows
for it), `qwen2` rotates the two halves (NeoX mode). `rope_freqs.weight`, when present, divides each
pair's angle (Llama 3.1/3.2 long-context scaling). Grouped-query attention shares KV head
`h // (heads / kv_heads)` with query head `h`, as ggml's broadcasting matmul does.
"""

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize


class Decoder:
    def __init__(self, path):
        reader = GGUFReader(path)
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
        self.head_dim = self.hidden // self.heads
        self.eps = key("attention.layer_norm_rms_epsilon")
        self.rope_base = key("rope.freq_base", 10000.0)
        self.rope_dims = key("rope.dimension_count", self.head_dim)

        self.tensors = {}
        for t in reader.tensors:
            shape = tuple(int(n) for n in reversed(t.shape.tolist()))  # numpy order: [rows, cols]
            w = dequantize(t.data, t.tensor_type).astype(np.float64).reshape(shape)
            self.tensors[t.name] = w
        self.output = self.tensors.get("output.weight", self.tensors["token_embd.weight"])
        freqs = self.tensors.get("rope_freqs.weight")
        self.freq_factors = None if freqs is None else freqs.reshape(-1)

    def _rms_norm(self, x, weight):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * weight.reshape(-1)

    def _rope(self, x, positions):
        # x: [T, heads, head_dim]
        half = self.rope_dims // 2
        inv = self.rope_base ** (-np.arange(half, dtype=np.float64) * 2.0 / self.rope_dims)
        if self.freq_factors is not None:
            inv = inv / self.freq_factors[:half]
        theta = np.asarray(positions, dtype=np.float64)[:, None] * inv[None, :]
        cos, sin = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
        out = x.copy()
        if self.arch == "qwen2":
            a, b = x[..., :half], x[..., half : 2 * half]
            out[..., :half] = a * cos - b * sin
            out[..., half : 2 * half] = a * sin + b * cos
        else:
            a, b = x[..., 0 : 2 * half : 2], x[..., 1 : 2 * half : 2]
            out[..., 0 : 2 * half : 2] = a * cos - b * sin
            out[..., 1 : 2 * half : 2] = a * sin + b * cos
        return out

    def _linear(self, x, name):
        y = x @ self.tensors[f"{name}.weight"].T
        bias = self.tensors.get(f"{name}.bias")
        return y if bias is None else y + bias.reshape(-1)

    def logits(self, ids):
        """Logits after every position of `ids`, shape [len(ids), vocab]."""
        t = len(ids)
        x = self.tensors["token_embd.weight"][np.asarray(ids)]
        positions = np.arange(t)
        group = self.heads // self.kv_heads
        causal = np.triu(np.full((t, t), -np.inf), k=1)
        for i in range(self.layers):
            p = f"blk.{i}"
            h = self._rms_norm(x, self.tensors[f"{p}.attn_norm.weight"])
            q = self._linear(h, f"{p}.attn_q").reshape(t, self.heads, self.head_dim)
            k = self._linear(h, f"{p}.attn_k").reshape(t, self.kv_heads, self.head_dim)
            v = self._linear(h, f"{p}.attn_v").reshape(t, self.kv_heads, self.head_dim)
            q, k = self._rope(q, positions), self._rope(k, positions)
            out = np.empty((t, self.heads, self.head_dim))
            for head in range(self.heads):
                kv = head // group
                scores = q[:, head, :] @ k[:, kv, :].T / np.sqrt(self.head_dim) + causal
                scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
                scores /= scores.sum(axis=-1, keepdims=True)
                out[:, head, :] = scores @ v[:, kv, :]
            x = x + self._linear(out.reshape(t, -1), f"{p}.attn_output")
            h = self._rms_norm(x, self.tensors[f"{p}.ffn_norm.weight"])
            gate = self._linear(h, f"{p}.ffn_gate")
            x = x + self._linear(gate / (1.0 + np.exp(-gate)) * self._linear(h, f"{p}.ffn_up"), f"{p}.ffn_down")
        x = self._rms_norm(x, self.tensors["output_norm.weight"])
        return x @ self.output.T
