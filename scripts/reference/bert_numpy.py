"""Independent float64 numpy reference for BERT-family encoders.

Hearth runs BERT and XLM-RoBERTa encoders (and their sequence-classification
heads) through candle. The Rust tests need numbers to compare against that do
not come from the Rust code itself, and torch is not available here, so this
module re-implements the Hugging Face `transformers` forward passes in plain
float64 numpy, reading weights straight from an HF model directory
(`config.json` + `model.safetensors`).

Semantics follow HF `BertModel` / `XLMRobertaModel` (post-LN layers, exact erf
GELU, additive attention mask on padded keys) and the
`BertForSequenceClassification` / `XLMRobertaForSequenceClassification` heads.
Pooling follows sentence-transformers (mean over every real token including
[CLS]/[SEP], CLS token, last non-padding token).

Batches must be right-padded; `attention_mask` marks the real tokens.
"""

import json
import math
import re
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

# Added to attention scores of padded keys; HF uses finfo(dtype).min. In float64
# exp() of anything this negative is exactly 0, so padding never leaks in.
MASKED_SCORE = np.finfo(np.float64).min

_erf = np.vectorize(math.erf, otypes=[np.float64])

ARCHITECTURES = {
    # architecture -> (family, tensor-name prefix of the encoder, head)
    "BertModel": ("bert", "", None),
    "BertForSequenceClassification": ("bert", "bert.", "bert_classifier"),
    "XLMRobertaModel": ("xlm-roberta", "", None),
    "XLMRobertaForSequenceClassification": ("xlm-roberta", "roberta.", "roberta_classifier"),
}

POOLING_MODES = ("mean", "cls", "last_token")


def gelu(x):
    """Exact (erf) GELU, HF `hidden_act: "gelu"`."""
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def layer_norm(x, weight, bias, eps):
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


class Encoder:
    """A BERT or XLM-RoBERTa model (optionally with its classification head)."""

    def __init__(self, model_dir):
        model_dir = Path(model_dir)
        self.config = json.loads((model_dir / "config.json").read_text())
        architecture = self.config["architectures"][0]
        if architecture not in ARCHITECTURES:
            raise ValueError(f"unsupported architecture {architecture!r}")
        self.family, self.prefix, self.head = ARCHITECTURES[architecture]
        self.weights = {
            name: tensor.astype(np.float64)
            for name, tensor in load_file(str(model_dir / "model.safetensors")).items()
            if tensor.dtype.kind == "f"  # skips int buffers such as embeddings.position_ids
        }
        self.num_heads = self.config["num_attention_heads"]
        self.eps = self.config["layer_norm_eps"]
        self.pad_token_id = self.config["pad_token_id"]
        if self.config.get("hidden_act", "gelu") != "gelu":
            raise ValueError("only exact gelu is implemented")
        if self.config.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only absolute position embeddings are implemented")

    def _w(self, name):
        return self.weights[name]

    def _linear(self, x, name):
        return x @ self._w(f"{name}.weight").T + self._w(f"{name}.bias")

    def _layer_norm(self, x, name):
        return layer_norm(x, self._w(f"{name}.weight"), self._w(f"{name}.bias"), self.eps)

    def _position_ids(self, input_ids):
        batch, length = input_ids.shape
        if self.family == "bert":
            return np.broadcast_to(np.arange(length), (batch, length))
        # XLM-R: positions count real tokens starting after pad_token_id;
        # padding positions get pad_token_id itself.
        is_token = (input_ids != self.pad_token_id).astype(np.int64)
        return np.cumsum(is_token, axis=1) * is_token + self.pad_token_id

    def _embeddings(self, input_ids, token_type_ids):
        p = self.prefix + "embeddings."
        x = (
            self._w(p + "word_embeddings.weight")[input_ids]
            + self._w(p + "position_embeddings.weight")[self._position_ids(input_ids)]
            + self._w(p + "token_type_embeddings.weight")[token_type_ids]
        )
        return self._layer_norm(x, p + "LayerNorm")

    def _attention(self, x, key_bias, p):
        batch, length, hidden = x.shape
        head_dim = hidden // self.num_heads

        def heads(t):
            return t.reshape(batch, length, self.num_heads, head_dim).transpose(0, 2, 1, 3)

        q = heads(self._linear(x, p + "self.query"))
        k = heads(self._linear(x, p + "self.key"))
        v = heads(self._linear(x, p + "self.value"))
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(head_dim) + key_bias
        scores = scores - scores.max(axis=-1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(axis=-1, keepdims=True)
        context = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, length, hidden)
        return self._layer_norm(self._linear(context, p + "output.dense") + x, p + "output.LayerNorm")

    def _layer(self, x, key_bias, index):
        p = f"{self.prefix}encoder.layer.{index}."
        x = self._attention(x, key_bias, p + "attention.")
        intermediate = gelu(self._linear(x, p + "intermediate.dense"))
        return self._layer_norm(self._linear(intermediate, p + "output.dense") + x, p + "output.LayerNorm")

    def hidden_states(self, input_ids, attention_mask, token_type_ids=None):
        """Last hidden state, shape [batch, length, hidden]."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        attention_mask = np.asarray(attention_mask, dtype=np.int64)
        if token_type_ids is None:
            token_type_ids = np.zeros_like(input_ids)
        token_type_ids = np.asarray(token_type_ids, dtype=np.int64)
        # [batch, 1 (heads), 1 (queries), length (keys)]
        key_bias = np.where(attention_mask[:, None, None, :] == 1, 0.0, MASKED_SCORE)
        x = self._embeddings(input_ids, token_type_ids)
        for index in range(self.config["num_hidden_layers"]):
            x = self._layer(x, key_bias, index)
        return x

    def classify(self, input_ids, attention_mask, token_type_ids=None):
        """Sequence-classification logits, shape [batch, num_labels]."""
        first_token = self.hidden_states(input_ids, attention_mask, token_type_ids)[:, 0]
        if self.head == "bert_classifier":
            pooled = np.tanh(self._linear(first_token, "bert.pooler.dense"))
            return self._linear(pooled, "classifier")
        if self.head == "roberta_classifier":
            return self._linear(np.tanh(self._linear(first_token, "classifier.dense")), "classifier.out_proj")
        raise ValueError("this model has no classification head")


def pool(hidden, attention_mask, mode):
    """sentence-transformers style pooling of [batch, length, hidden] states."""
    mask = np.asarray(attention_mask, dtype=np.float64)
    if mode == "mean":
        summed = (hidden * mask[:, :, None]).sum(axis=1)
        return summed / np.maximum(mask.sum(axis=1, keepdims=True), 1e-9)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "last_token":
        last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)
        return hidden[np.arange(hidden.shape[0]), last]
    raise ValueError(f"unknown pooling mode {mode!r}")


def l2_normalize(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def right_pad(sequences, pad_value):
    """Stack ragged int lists into [batch, max_len], padding on the right."""
    length = max(len(s) for s in sequences)
    out = np.full((len(sequences), length), pad_value, dtype=np.int64)
    for row, seq in enumerate(sequences):
        out[row, : len(seq)] = seq
    return out


def batched_and_single(run, encodings, pad_token_id, tolerance=1e-9):
    """Run `run(input_ids, attention_mask, token_type_ids) -> [batch, ...]` once on
    all encodings as one right-padded batch and once per encoding; assert the
    rows agree within `tolerance` and return the batched rows.

    `encodings` is a list of (input_ids, token_type_ids) pairs of int lists.
    """
    ids = right_pad([e[0] for e in encodings], pad_token_id)
    types = right_pad([e[1] for e in encodings], 0)
    mask = right_pad([[1] * len(e[0]) for e in encodings], 0)
    batched = run(ids, mask, types)
    for row, (seq_ids, seq_types) in enumerate(encodings):
        single = run(np.array([seq_ids]), np.ones((1, len(seq_ids)), dtype=np.int64), np.array([seq_types]))[0]
        diff = np.max(np.abs(single - batched[row]))
        if not diff <= tolerance:
            raise AssertionError(f"row {row}: batched and single runs differ by {diff}")
    return batched


_NUMBER_LIST = re.compile(r"\[\s+([-+.,0-9eE\s]+?)\s+\]")


def to_json(value):
    """Indented JSON with numeric lists kept on one line; floats at full precision."""
    text = json.dumps(value, indent=1, ensure_ascii=False)
    return _NUMBER_LIST.sub(lambda m: "[" + re.sub(r",\s+", ", ", m.group(1)) + "]", text) + "\n"
