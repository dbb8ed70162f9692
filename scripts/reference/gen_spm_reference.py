#!/usr/bin/env python3
"""A tiny SentencePiece (BPE) vocabulary in a GGUF, and the ids llama.cpp and sentencepiece give
for hard texts, for Hearth's GGUF SentencePiece tokenizer (`tokenizer.ggml.model = "llama"`, the
tokenizer of Gemma, Phi-3, Llama 2 and Mistral GGUFs).

A BPE model is trained here with the `sentencepiece` package on this repository's Markdown and Rust
text (byte fallback on, digits split, two user-defined turn markers), then written as a vocab-only
GGUF the way llama.cpp's converter writes SentencePiece vocabularies: pieces, scores and token types
(normal 1, unknown 2, control 3, user-defined 4, byte 6), BOS/EOS/UNK ids, `add_space_prefix`:
once with it on (Llama 2, Phi-3) and once off (Gemma's GGUFs turn it off).
llama.cpp (llama-cpp-python 0.3.36, `vocab_only`) then tokenizes each text with special tokens
parsed; those ids are what Hearth must give. sentencepiece's own ids are recorded beside them.

Usage (the llm peer venv: llama-cpp-python==0.3.36, gguf==0.19.0, sentencepiece==0.2.3):
    python scripts/reference/gen_spm_reference.py
"""

import glob
import json
import tempfile
from pathlib import Path

import llama_cpp
import sentencepiece as spm
from gguf import GGUFWriter
from sentencepiece import sentencepiece_model_pb2 as model_pb2

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "llm"

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  leading,   inner\t\ttabs\n\nand newlines   trailing  ",
    "naïve café résumé — déjà vu! Ångström",
    "東京都は日本の首都です。",
    "emoji 🎉🎉 and ZWJ 👩‍💻",
    'fn main() { println!("{}", x.map(|y| y * 2)); } // done',
    "numbers 3.14159 1,000,000 -42 0x1F",
    "<start_of_turn>user\nWhat is Hearth?<end_of_turn>\n<start_of_turn>model\n",
    "cargo build --release && ./target/release/hearth serve --config config/offline.toml",
    "Supercalifragilisticexpialidocious antidisestablishmentarianism",
    "x" * 40,
]


def main():
    files = sorted(glob.glob(str(ROOT / "*.md")) + glob.glob(str(ROOT / "crates/*/src/*.rs")))
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("\n".join(Path(f).read_text(errors="ignore") for f in files))
        spm.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=f"{tmp}/tiny", vocab_size=1500, model_type="bpe",
            byte_fallback=True, character_coverage=0.9995, split_digits=True,
            user_defined_symbols=["<start_of_turn>", "<end_of_turn>"], add_dummy_prefix=True,
            remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
            normalization_rule_name="identity", num_threads=2, minloglevel=2,
        )
        proto = model_pb2.ModelProto()
        proto.ParseFromString(Path(f"{tmp}/tiny.model").read_bytes())
        sp = spm.SentencePieceProcessor(model_file=f"{tmp}/tiny.model")

    kinds = {proto.SentencePiece.NORMAL: 1, proto.SentencePiece.UNKNOWN: 2, proto.SentencePiece.CONTROL: 3,
             proto.SentencePiece.USER_DEFINED: 4, proto.SentencePiece.UNUSED: 5, proto.SentencePiece.BYTE: 6}
    files = {}
    for name, space_prefix in (("tiny-spm.gguf", True), ("tiny-spm-no-prefix.gguf", False)):
        path = OUT / name
        writer = GGUFWriter(str(path), "llama")
        writer.add_name(name)
        for add, value in ((writer.add_context_length, 64), (writer.add_embedding_length, 32),
                           (writer.add_block_count, 1), (writer.add_feed_forward_length, 32),
                           (writer.add_head_count, 1)):
            add(value)
        writer.add_layer_norm_rms_eps(1e-5)
        writer.add_tokenizer_model("llama")
        writer.add_token_list([p.piece.encode() for p in proto.pieces])
        writer.add_token_scores([p.score for p in proto.pieces])
        writer.add_token_types([kinds[p.type] for p in proto.pieces])
        writer.add_bos_token_id(sp.bos_id())
        writer.add_eos_token_id(sp.eos_id())
        writer.add_unk_token_id(sp.unk_id())
        writer.add_add_bos_token(True)
        writer.add_add_space_prefix(space_prefix)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

        llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
        cases = []
        for text in TEXTS:
            ids = llm.tokenize(text.encode(), add_bos=False, special=True)
            case = {"text": text, "llama_cpp": ids}
            if space_prefix:
                case["sentencepiece"] = sp.encode(text)
                same = "same" if ids == sp.encode(text) else "differs"
                print(f"{len(ids):3} ids ({same} in sentencepiece): {text[:40]!r}")
            cases.append(case)
        files[name] = {"add_space_prefix": space_prefix, "cases": cases}
        print(f"{path.name}: {path.stat().st_size} bytes")
    reference = {
        "generator": "scripts/reference/gen_spm_reference.py",
        "llama_cpp_python": llama_cpp.__version__,
        "sentencepiece": spm.__version__,
        "files": files,
    }
    (OUT / "spm-reference.json").write_text(json.dumps(reference, ensure_ascii=False, indent=1) + "\n")


if __name__ == "__main__":
    main()
