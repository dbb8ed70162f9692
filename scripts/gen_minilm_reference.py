"""Reference embeddings of the real all-MiniLM-L6-v2 for Hearth's Rust tests.

Hearth serves all-MiniLM-L6-v2 through candle. This script computes what the
sentence-transformers pipeline (Transformer -> mean Pooling -> Normalize) gives
for a fixed set of sentences, using the independent float64 numpy encoder in
scripts/reference/bert_numpy.py, so the Rust side can be checked against
numbers it did not produce.

Tokenization uses the model's tokenizer.json with padding turned off and
truncation at sentence_bert_config.json's max_seq_length (256). The packaged
tokenizer.json pads and truncates at 128; that setting must not be used.

Usage: gen_minilm_reference.py MODEL_DIR OUT_JSON
"""

import hashlib
import json
import sys
from pathlib import Path

from tokenizers import Tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent / "reference"))
import bert_numpy  # noqa: E402

LONG_TEXT = " ".join(
    f"Paragraph {i}: the river keeps flowing past the old mill while travellers "
    f"argue about maps, weather and the price of bread."
    for i in range(1, 31)
)

SENTENCES = [
    # paraphrase pair 1
    "A man is playing a guitar on the stage.",
    "Someone performs music with a guitar in front of an audience.",
    # paraphrase pair 2
    "How do I reset my password?",
    "What are the steps to change a forgotten password?",
    # unrelated
    "The stock market fell sharply after the announcement.",
    "Photosynthesis converts sunlight into chemical energy in plants.",
    "hello",
    "Rust's borrow checker prevents data races at compile time!",
    # non-ASCII
    "Café déjà vu: naïve façade, Zürich – 東京 😀",
    # longer than max_seq_length, must be truncated
    LONG_TEXT,
]


def main(model_dir, out_json):
    model_dir = Path(model_dir)
    max_seq_length = json.loads((model_dir / "sentence_bert_config.json").read_text())["max_seq_length"]
    pooling = json.loads((model_dir / "1_Pooling" / "config.json").read_text())
    if not pooling["pooling_mode_mean_tokens"]:
        raise ValueError("expected a mean-pooling model")

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    full_lengths = [len(e.ids) for e in tokenizer.encode_batch(SENTENCES)]
    tokenizer.enable_truncation(max_seq_length)
    encodings = tokenizer.encode_batch(SENTENCES)

    encoder = bert_numpy.Encoder(model_dir)

    def embed(input_ids, attention_mask, token_type_ids):
        hidden = encoder.hidden_states(input_ids, attention_mask, token_type_ids)
        return bert_numpy.l2_normalize(bert_numpy.pool(hidden, attention_mask, "mean"))

    embeddings = bert_numpy.batched_and_single(
        embed, [(e.ids, e.type_ids) for e in encodings], encoder.pad_token_id
    )

    cases = []
    for text, encoding, full_length, embedding in zip(SENTENCES, encodings, full_lengths, embeddings):
        cases.append(
            {
                "text": text,
                "input_ids": encoding.ids,
                "n_tokens": len(encoding.ids),
                "truncated": full_length > max_seq_length,
                "embedding": embedding.tolist(),
            }
        )
    reference = {
        "model": "all-MiniLM-L6-v2",
        "model_sha256": hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest(),
        "max_seq_length": max_seq_length,
        "cases": cases,
    }
    Path(out_json).write_text(bert_numpy.to_json(reference))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
