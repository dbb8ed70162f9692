#!/usr/bin/env python3
"""Token ids for hard texts from an implementation Hearth does not share.

Hearth tokenizes with the Rust `tokenizers` crate; Python's `tokenizers` package wraps that same
crate, so ids from it cannot catch a mistake in how Hearth drives it. This script uses the *slow*
`BertTokenizer` of `transformers`, a pure-Python WordPiece implementation that reads only
`vocab.txt` and the lower-casing setting, and records its ids (special tokens included, no
truncation) for texts chosen to be hard: whitespace runs and control characters, accents,
CJK, emoji, punctuation and code, and words longer than WordPiece's 100-character limit.

Usage (transformers is not a test requirement; install it in any venv to regenerate):
    python -m venv /tmp/tf && /tmp/tf/bin/pip install transformers==4.57.1
    /tmp/tf/bin/python scripts/reference/gen_tokenizer_reference.py \
        ~/.cache/hearth/models/all-minilm-l6-v2 tests/fixtures/minilm-tokenizer-reference.json
"""

import json
import sys
from pathlib import Path

import transformers
from transformers import BertTokenizer

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "  leading,   inner\t\ttabs\n\nand newlines   trailing  ",
    "naïve café résumé — déjà vu! Ångström ÉCOLE",
    "東京都は日本の首都です。北京欢迎你",
    "emoji 🎉🎉 and ZWJ 👩‍💻 sequences 🇫🇷",
    "fn main() { println!(\"{}\", x.map(|y| y * 2)); } // done",
    "don't won't it's O'Neil's rock'n'roll",
    "e-mail: someone@example.com, URL: https://example.com/a?b=c&d=e#f",
    "numbers 3.14159 1,000,000 -42 1e-9 0x1F",
    "control\u0000chars\u0007and\u00adsoft\u200bhyphens",
    "x" * 120 + " short " + "ab" * 60,
    "Supercalifragilisticexpialidocious antidisestablishmentarianism",
    "ﬁ ligature, ｆｕｌｌｗｉｄｔｈ, ① circled, ² superscript",
    "Ελληνικά, русский, العربية, עברית, हिन्दी",
    "",
]


def main() -> None:
    model_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    tokenizer = BertTokenizer(
        str(model_dir / "vocab.txt"),
        do_lower_case=config.get("do_lower_case", True),
        tokenize_chinese_chars=config.get("tokenize_chinese_chars", True),
        strip_accents=config.get("strip_accents"),
    )
    cases = [
        {"text": text, "input_ids": tokenizer(text, add_special_tokens=True)["input_ids"]}
        for text in TEXTS
        if text
    ]
    reference = {
        "tokenizer": f"transformers {transformers.__version__} BertTokenizer (slow, pure Python)",
        "vocab": "all-minilm-l6-v2/vocab.txt",
        "command": "scripts/reference/gen_tokenizer_reference.py MODEL_DIR OUT_JSON",
        "cases": cases,
    }
    out.write_text(json.dumps(reference, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {len(cases)} cases to {out}")


if __name__ == "__main__":
    main()
