"""Generate Hearth's tiny random-weight test models and their reference outputs.

Hearth's Rust tests need real-format models (HF config.json + safetensors +
tokenizer.json, sentence-transformers module files) that are small enough to
commit, plus outputs to compare against that the Rust code did not compute.
This script writes four such models under tests/fixtures/models/:

  tiny-bert-embed     BertModel, mean pooling + Normalize (all-MiniLM layout;
                      its tokenizer.json pads/truncates at 16 like the real one)
  tiny-xlmr-embed     XLMRobertaModel, CLS pooling, no Normalize (bge-m3 layout)
  tiny-bert-reranker  BertForSequenceClassification, 1 label (cross-encoder)
  tiny-xlmr-reranker  XLMRobertaForSequenceClassification, 1 label
                      (bge-reranker-v2-m3 layout)

Each gets a reference.json computed with the independent float64 numpy encoder
in scripts/reference/bert_numpy.py: every case is run in one right-padded batch
and alone, and the two must agree to 1e-9. Token ids come from the `tokenizers`
library with padding and truncation off.

Each model also gets an ONNX twin, `NAME-onnx/` (the same config and tokenizer files, no
safetensors, and `onnx/model.onnx` written by scripts/export-bert-onnx from the same weights) for
the ONNX Runtime backend's tests, which compare it with the same reference.json; the BERT
cross-encoder also gets `tiny-bert-reranker-int8/` (`onnx/model_quantized.onnx`, ONNX Runtime's
dynamic int8 quantization of that graph).

Deterministic: rerunning it rewrites byte-identical files.
Usage: ~/.cache/hearth/venv/bin/python scripts/gen_tiny_models.py
"""

import shutil
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

sys.path.insert(0, str(Path(__file__).resolve().parent / "reference"))
import bert_numpy  # noqa: E402

OUT_ROOT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "models"

HIDDEN = 32
LAYERS = 2
HEADS = 4
INTERMEDIATE = 64
WEIGHT_STD = 0.2
BIAS_STD = 0.1
LAYER_NORM_STD = 0.1

# ---------------------------------------------------------------- tokenizers

BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
BERT_WORDS = """
the a an is are was be to of and in on for with at by from it this that what how why who
where when i you he she we they my your not no yes do can will hello world cat dog fox
quick brown lazy jump over run play music guitar man woman people city river mountain
weather sun rain day night time good bad big small new old fast red blue green data
model server query text search document answer question password reset change open book
read write learn rust python code computer language paris france capital water bread
coffee tea house car tree park school work love like make find help every most sleep
""".split()
BERT_PIECES = ["##s", "##es", "##ing", "##ed", "##er", "##ly", "##est", "##ies", "##y"]
BERT_PUNCTUATION = list(".,!?'-:;()")

XLMR_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]
XLMR_WORDS = """
the a is are was to of and in on for with it this what how who you we they my not
hello world cat dog fox quick brown lazy over play music man city river weather day
night good new old fast data model server query text search document answer password
reset book read learn rust code language paris france capital water coffee house tree
park school love sleep do at most every jump near cold best word
""".split()
XLMR_CAPITALIZED = ["The", "What", "How", "Hello", "Paris", "France", "Rust"]
XLMR_SUFFIXES = ["s", "es", "ing", "ed", "er", "ly", "est"]
XLMR_PUNCTUATION = list(".,!?':-")


def bert_vocab():
    return BERT_SPECIALS + BERT_PUNCTUATION + BERT_WORDS + BERT_PIECES


def bert_tokenizer(pad_and_truncate_at=None):
    """WordPiece tokenizer shaped like bert-base-uncased's tokenizer.json."""
    vocab = {token: index for index, token in enumerate(bert_vocab())}
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
    )
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in BERT_SPECIALS])
    if pad_and_truncate_at is not None:
        tokenizer.enable_padding(pad_id=0, pad_type_id=0, pad_token="[PAD]", length=pad_and_truncate_at)
        tokenizer.enable_truncation(max_length=pad_and_truncate_at)
    return tokenizer


def xlmr_pieces():
    """(piece, log-prob) list: specials, whole words, suffixes, single characters, <mask>."""
    pieces = [(token, 0.0) for token in XLMR_SPECIALS]
    pieces.append(("▁", -6.0))
    pieces += [("▁" + word, -7.0 - 0.01 * rank) for rank, word in enumerate(XLMR_WORDS)]
    pieces += [("▁" + word, -8.0 - 0.01 * rank) for rank, word in enumerate(XLMR_CAPITALIZED)]
    pieces += [(suffix, -9.0 - 0.01 * rank) for rank, suffix in enumerate(XLMR_SUFFIXES)]
    characters = XLMR_PUNCTUATION + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    characters += [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    pieces += [(character, -11.0 - 0.01 * rank) for rank, character in enumerate(characters)]
    pieces.append(("<mask>", 0.0))
    return pieces


def xlmr_tokenizer():
    """Unigram tokenizer shaped like xlm-roberta-base's / bge-m3's tokenizer.json."""
    pieces = xlmr_pieces()
    ids = {piece: index for index, (piece, _) in enumerate(pieces)}
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=ids["<unk>"], byte_fallback=False))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0 </s>:0",
        pair="<s>:0 $A:0 </s>:0 </s>:0 $B:0 </s>:0",
        special_tokens=[("<s>", ids["<s>"]), ("</s>", ids["</s>"])],
    )
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in XLMR_SPECIALS]
        + [AddedToken("<mask>", special=True, normalized=False, lstrip=True)]
    )
    return tokenizer


# ------------------------------------------------------------------- weights


def encoder_tensors(rng, vocab_size, max_positions, type_vocab_size, pad_token_id, position_padding_idx):
    """Random BertModel/XLMRobertaModel weights (HF names, no prefix), float32.

    As in HF (nn.Embedding padding_idx), the pad token's word embedding and, for
    XLM-R, the padding position's embedding are zero.
    """

    def normal(*shape, std=WEIGHT_STD):
        return rng.normal(0.0, std, size=shape)

    def linear(name, out_features, in_features):
        tensors[f"{name}.weight"] = normal(out_features, in_features)
        tensors[f"{name}.bias"] = normal(out_features, std=BIAS_STD)

    def layer_norm(name):
        tensors[f"{name}.weight"] = 1.0 + normal(HIDDEN, std=LAYER_NORM_STD)
        tensors[f"{name}.bias"] = normal(HIDDEN, std=LAYER_NORM_STD)

    tensors = {}
    tensors["embeddings.word_embeddings.weight"] = normal(vocab_size, HIDDEN)
    tensors["embeddings.word_embeddings.weight"][pad_token_id] = 0.0
    tensors["embeddings.position_embeddings.weight"] = normal(max_positions, HIDDEN)
    if position_padding_idx is not None:
        tensors["embeddings.position_embeddings.weight"][position_padding_idx] = 0.0
    tensors["embeddings.token_type_embeddings.weight"] = normal(type_vocab_size, HIDDEN)
    layer_norm("embeddings.LayerNorm")
    for index in range(LAYERS):
        p = f"encoder.layer.{index}."
        linear(p + "attention.self.query", HIDDEN, HIDDEN)
        linear(p + "attention.self.key", HIDDEN, HIDDEN)
        linear(p + "attention.self.value", HIDDEN, HIDDEN)
        linear(p + "attention.output.dense", HIDDEN, HIDDEN)
        layer_norm(p + "attention.output.LayerNorm")
        linear(p + "intermediate.dense", INTERMEDIATE, HIDDEN)
        linear(p + "output.dense", HIDDEN, INTERMEDIATE)
        layer_norm(p + "output.LayerNorm")
    return tensors


def linear_tensors(rng, name, out_features, in_features):
    return {
        f"{name}.weight": rng.normal(0.0, WEIGHT_STD, size=(out_features, in_features)),
        f"{name}.bias": rng.normal(0.0, BIAS_STD, size=(out_features,)),
    }


def prefixed(prefix, tensors):
    return {prefix + name: tensor for name, tensor in tensors.items()}


# ------------------------------------------------------------------- configs

COMMON_CONFIG = {
    "hidden_size": HIDDEN,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS,
    "intermediate_size": INTERMEDIATE,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "initializer_range": 0.02,
    "position_embedding_type": "absolute",
}
CLASSIFIER_LABELS = {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}


def bert_config(architecture, vocab_size):
    return {
        "architectures": [architecture],
        "model_type": "bert",
        "vocab_size": vocab_size,
        **COMMON_CONFIG,
        "max_position_embeddings": 64,
        "type_vocab_size": 2,
        "layer_norm_eps": 1e-12,
        "pad_token_id": 0,
    }


def xlmr_config(architecture, vocab_size):
    return {
        "architectures": [architecture],
        "model_type": "xlm-roberta",
        "vocab_size": vocab_size,
        **COMMON_CONFIG,
        "max_position_embeddings": 66,
        "type_vocab_size": 1,
        "layer_norm_eps": 1e-5,
        "pad_token_id": 1,
        "bos_token_id": 0,
        "eos_token_id": 2,
    }


BERT_TOKENIZER_CONFIG = {
    "tokenizer_class": "BertTokenizer",
    "do_lower_case": True,
    "model_max_length": 64,
    "unk_token": "[UNK]",
    "sep_token": "[SEP]",
    "pad_token": "[PAD]",
    "cls_token": "[CLS]",
    "mask_token": "[MASK]",
}
XLMR_TOKENIZER_CONFIG = {
    "tokenizer_class": "XLMRobertaTokenizer",
    "model_max_length": 64,
    "bos_token": "<s>",
    "eos_token": "</s>",
    "sep_token": "</s>",
    "cls_token": "<s>",
    "unk_token": "<unk>",
    "pad_token": "<pad>",
    "mask_token": "<mask>",
}


def special_tokens_map(tokenizer_config):
    return {key: value for key, value in tokenizer_config.items() if key.endswith("_token")}


def sentence_transformers_files(pooling_mode, max_seq_length, normalize):
    """modules.json, 1_Pooling/config.json and sentence_bert_config.json contents."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    pooling = {
        "word_embedding_dimension": HIDDEN,
        "pooling_mode_cls_token": pooling_mode == "cls",
        "pooling_mode_mean_tokens": pooling_mode == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    }
    return {
        "modules.json": modules,
        "1_Pooling/config.json": pooling,
        "sentence_bert_config.json": {"max_seq_length": max_seq_length, "do_lower_case": False},
    }


# --------------------------------------------------------------------- cases

BERT_EMBED_TEXTS = [
    "hello",
    "Hello, World!",
    "The quick brown fox jumped over the lazy dog.",
    "What is the capital of France?",
    "She was playing guitar quickly in the park",
    "Xylophones and zebras are strange words here.",
    "Every day we read books, write code and learn new languages at school; cats help!",
    "Servers answer queries (fast) - mostly.",
]
XLMR_EMBED_TEXTS = [
    "hello",
    "Hello world!",
    "The quick brown fox jumped over the lazy dog.",
    "What is the capital of France?",
    "how cats sleep",
    "Zebras drink water, café ü ß",
    "We read books and learn new languages at school every day, while the old city sleeps.",
    "Rust code: fast, good; Python?",
]
RERANK_PAIRS = [
    ("what is the capital of france?", "Paris is the capital of France."),
    ("what is the capital of france?", "The lazy dog sleeps in the park."),
    ("hello", "world"),
    ("How do cats sleep?", "Cats sleep most of the day, mostly at night."),
    ("What is Rust?", "Rust is a fast language for writing server code."),
    ("best coffee", "The weather was cold and rainy."),
    ("quick", "The quick brown fox jumped over the lazy dog near the old river at night."),
    ("Xylophone zebras", "Unknown words: xylophone, café!"),
]


# -------------------------------------------------------------------- output


def write_json(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(bert_numpy.to_json(value))


def write_model(name, config, tensors, tokenizer, tokenizer_config, extra_files=None):
    model_dir = OUT_ROOT / name
    if model_dir.exists():
        shutil.rmtree(model_dir)
    model_dir.mkdir(parents=True)
    write_json(model_dir / "config.json", config)
    save_file(
        {key: value.astype(np.float32) for key, value in tensors.items()},
        str(model_dir / "model.safetensors"),
        metadata={"format": "pt"},
    )
    tokenizer.save(str(model_dir / "tokenizer.json"))
    write_json(model_dir / "tokenizer_config.json", tokenizer_config)
    write_json(model_dir / "special_tokens_map.json", special_tokens_map(tokenizer_config))
    for relative, value in (extra_files or {}).items():
        write_json(model_dir / relative, value)
    return model_dir


def reference_tokenizer(model_dir):
    """The saved tokenizer.json with padding and truncation turned off."""
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def check_cases(name, encodings, max_tokens, unk_id):
    """Every case fits the model; at least one hits the unknown token."""
    lengths = [len(e.ids) for e in encodings]
    if max(lengths) > max_tokens:
        raise AssertionError(f"{name}: a case has {max(lengths)} tokens, over the limit {max_tokens}")
    if not any(unk_id in e.ids for e in encodings):
        raise AssertionError(f"{name}: no case exercises the unknown token")
    print(f"{name}: token counts {lengths}")


def embed_reference(name, model_dir, texts, max_tokens, unk_id):
    encoder = bert_numpy.Encoder(model_dir)
    encodings = reference_tokenizer(model_dir).encode_batch(texts)
    check_cases(name, encodings, max_tokens, unk_id)

    def pooled_all_modes(input_ids, attention_mask, token_type_ids):
        hidden = encoder.hidden_states(input_ids, attention_mask, token_type_ids)
        return np.stack([bert_numpy.pool(hidden, attention_mask, mode) for mode in bert_numpy.POOLING_MODES], axis=1)

    pooled = bert_numpy.batched_and_single(
        pooled_all_modes, [(e.ids, e.type_ids) for e in encodings], encoder.pad_token_id
    )
    cases = [
        {
            "text": text,
            "input_ids": encoding.ids,
            "token_type_ids": encoding.type_ids,
            "pooled": {mode: vector.tolist() for mode, vector in zip(bert_numpy.POOLING_MODES, rows)},
        }
        for text, encoding, rows in zip(texts, encodings, pooled)
    ]
    write_json(model_dir / "reference.json", {"model": name, "hidden_size": HIDDEN, "cases": cases})
    return encodings


def rerank_reference(name, model_dir, pairs, max_tokens, unk_id):
    encoder = bert_numpy.Encoder(model_dir)
    encodings = reference_tokenizer(model_dir).encode_batch(pairs)
    check_cases(name, encodings, max_tokens, unk_id)
    logits = bert_numpy.batched_and_single(
        encoder.classify, [(e.ids, e.type_ids) for e in encodings], encoder.pad_token_id
    )
    cases = [
        {
            "query": query,
            "document": document,
            "input_ids": encoding.ids,
            "token_type_ids": encoding.type_ids,
            "logit": float(logit[0]),
        }
        for (query, document), encoding, logit in zip(pairs, encodings, logits)
    ]
    write_json(model_dir / "reference.json", {"model": name, "cases": cases})


def main():
    bert_vocab_size = len(bert_vocab())
    xlmr_vocab_size = len(xlmr_pieces())

    rng = np.random.default_rng(1001)
    tensors = encoder_tensors(rng, bert_vocab_size, 64, 2, pad_token_id=0, position_padding_idx=None)
    tensors.update(linear_tensors(rng, "pooler.dense", HIDDEN, HIDDEN))
    model_dir = write_model(
        "tiny-bert-embed",
        bert_config("BertModel", bert_vocab_size),
        tensors,
        bert_tokenizer(pad_and_truncate_at=16),
        BERT_TOKENIZER_CONFIG,
        sentence_transformers_files("mean", max_seq_length=24, normalize=True),
    )
    encodings = embed_reference("tiny-bert-embed", model_dir, BERT_EMBED_TEXTS, max_tokens=24, unk_id=1)
    if max(len(e.ids) for e in encodings) <= 16:
        raise AssertionError("tiny-bert-embed: no case is longer than the packaged truncation at 16")

    rng = np.random.default_rng(1002)
    tensors = encoder_tensors(rng, xlmr_vocab_size, 66, 1, pad_token_id=1, position_padding_idx=1)
    tensors.update(linear_tensors(rng, "pooler.dense", HIDDEN, HIDDEN))
    model_dir = write_model(
        "tiny-xlmr-embed",
        xlmr_config("XLMRobertaModel", xlmr_vocab_size),
        tensors,
        xlmr_tokenizer(),
        XLMR_TOKENIZER_CONFIG,
        sentence_transformers_files("cls", max_seq_length=64, normalize=False),
    )
    embed_reference("tiny-xlmr-embed", model_dir, XLMR_EMBED_TEXTS, max_tokens=64, unk_id=3)

    rng = np.random.default_rng(1003)
    tensors = prefixed("bert.", encoder_tensors(rng, bert_vocab_size, 64, 2, pad_token_id=0, position_padding_idx=None))
    tensors.update(linear_tensors(rng, "bert.pooler.dense", HIDDEN, HIDDEN))
    tensors.update(linear_tensors(rng, "classifier", 1, HIDDEN))
    model_dir = write_model(
        "tiny-bert-reranker",
        {**bert_config("BertForSequenceClassification", bert_vocab_size), **CLASSIFIER_LABELS},
        tensors,
        bert_tokenizer(),
        BERT_TOKENIZER_CONFIG,
    )
    rerank_reference("tiny-bert-reranker", model_dir, RERANK_PAIRS, max_tokens=64, unk_id=1)

    rng = np.random.default_rng(1004)
    tensors = prefixed("roberta.", encoder_tensors(rng, xlmr_vocab_size, 66, 1, pad_token_id=1, position_padding_idx=1))
    tensors.update(linear_tensors(rng, "classifier.dense", HIDDEN, HIDDEN))
    tensors.update(linear_tensors(rng, "classifier.out_proj", 1, HIDDEN))
    model_dir = write_model(
        "tiny-xlmr-reranker",
        {**xlmr_config("XLMRobertaForSequenceClassification", xlmr_vocab_size), **CLASSIFIER_LABELS},
        tensors,
        xlmr_tokenizer(),
        XLMR_TOKENIZER_CONFIG,
    )
    rerank_reference("tiny-xlmr-reranker", model_dir, RERANK_PAIRS, max_tokens=64, unk_id=3)

    for name in ["tiny-bert-embed", "tiny-xlmr-embed", "tiny-bert-reranker", "tiny-xlmr-reranker"]:
        onnx_twin(name, f"{name}-onnx", int8=False)
    onnx_twin("tiny-bert-reranker", "tiny-bert-reranker-int8", int8=True)


def onnx_twin(name, twin, int8):
    """`twin/`: `name/`'s config and tokenizer files and its ONNX export (float, or int8 only)."""
    import importlib.machinery
    import importlib.util

    import onnx

    loader = importlib.machinery.SourceFileLoader("export_bert_onnx", str(Path(__file__).parent / "export-bert-onnx"))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    exporter = importlib.util.module_from_spec(spec)
    loader.exec_module(exporter)

    source, target = OUT_ROOT / name, OUT_ROOT / twin
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("model.safetensors", "reference.json"))
    (target / "onnx").mkdir()
    onnx.save(exporter.build(source), str(target / "onnx" / "model.onnx"))
    if int8:
        exporter.quantize(target / "onnx" / "model.onnx", target / "onnx" / "model_quantized.onnx")
        (target / "onnx" / "model.onnx").unlink()


if __name__ == "__main__":
    main()
