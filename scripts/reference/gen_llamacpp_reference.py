#!/usr/bin/env python3
"""llama.cpp's tokens for SmolLM2-135M-Instruct (Q4_1 GGUF), recorded once as Hearth's reference.

Hearth builds its tokenizer from the GGUF's own vocabulary, renders the GGUF's chat template with
minijinja and runs its own decoder forward pass; llama.cpp does all three independently. This
script records, through llama-cpp-python (which compiles llama.cpp from source):

  tokenize   token ids for hard texts (code, Unicode, whitespace runs), without and with special
             tokens parsed
  chat       8 conversations: the prompt rendered from the GGUF's template (llama-cpp-python's
             Jinja2 formatter, add_generation_prompt), its ids, and the first 32 greedy tokens
  complete   3 raw prompts (no template): ids and the first 32 greedy tokens

Greedy means top_k=1, no repetition penalty. Decoding stops early at an end-of-generation token,
which is then recorded as the last id.

Two correct implementations of a quantized model do not produce bit-identical logits (llama.cpp
keeps its KV cache in f16, sums in other orders), so where the two best tokens are nearly tied
they may pick differently, and from there the texts part. To tell such a near-tie from a bug, each
case also records `exact_margins`: along llama.cpp's greedy path, the gap between the best and the
second-best logit from the float64 numpy forward pass (scripts/reference/llama_numpy.py, weights
dequantized by gguf-py), and `exact_top`, the best token there.

Usage (the command that wrote tests/fixtures/llm/smollm2-llamacpp.json):
    python3 -m venv /tmp/llm && CMAKE_ARGS=-DGGML_NATIVE=ON /tmp/llm/bin/pip install llama-cpp-python==0.3.36 gguf==0.19.0
    /tmp/llm/bin/python scripts/reference/gen_llamacpp_reference.py \\
        ~/.cache/hearth/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf \\
        tests/fixtures/llm/smollm2-llamacpp.json
"""

import hashlib
import json
import sys
from pathlib import Path

import llama_cpp
import numpy as np
from llama_cpp import Llama
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama_numpy  # noqa: E402

GREEDY_TOKENS = 32

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "  leading,   inner\t\ttabs\n\nand newlines   trailing  ",
    "naïve café résumé — déjà vu! Ångström ÉCOLE",
    "東京都は日本の首都です。北京欢迎你",
    "emoji 🎉🎉 and ZWJ 👩\u200d💻 sequences 🇫🇷",
    'fn main() {\n    println!("{}", x.map(|y| y * 2));\n}\n// done',
    "def f(x):\n\treturn [i**2 for i in range(x) if i % 3 == 0]  # squares\n",
    "don't won't it's O'Neil's rock'n'roll I'M YOU'LL we'Ve",
    "numbers 3.14159 1,000,000 -42 1e-9 0x1F 12345678901234",
    "e-mail: someone@example.com, URL: https://example.com/a?b=c&d=e#f",
    "Ελληνικά, русский, العربية, עברית, हिन्दी",
    "line one\r\nline two\n\n\n    indented\n\t\ttabbed   ",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "user", "content": "List three primary colors."}],
    [
        {"role": "system", "content": "You are a terse assistant. Answer in one sentence."},
        {"role": "user", "content": "Why is the sky blue?"},
    ],
    [{"role": "user", "content": "Translate 'good morning' into Spanish."}],
    [
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": "Nice to meet you, Ada!"},
        {"role": "user", "content": "What is my name?"},
    ],
    [{"role": "user", "content": "Write a Python function that adds two numbers."}],
    [{"role": "user", "content": "How many legs does a spider have?"}],
]

COMPLETIONS = [
    "Once upon a time",
    "The three laws of thermodynamics are",
    "def fibonacci(n):",
]


def greedy(llm, ids):
    out = []
    eog = {llm.token_eos()}
    for token in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(int(token))
        if token in eog or llama_cpp.llama_token_is_eog(llm._model.vocab, token) or len(out) == GREEDY_TOKENS:
            break
    return out


def main():
    gguf, out = Path(sys.argv[1]), Path(sys.argv[2])
    llm = Llama(model_path=str(gguf), n_ctx=2048, n_threads=2, n_batch=512, verbose=False, seed=0)
    template = llm.metadata["tokenizer.chat_template"]
    bos = llm._model.token_get_text(llm.token_bos())
    eos = llm._model.token_get_text(llm.token_eos())
    formatter = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos, add_generation_prompt=True)
    record = {
        "provenance": {
            "generator": "scripts/reference/gen_llamacpp_reference.py",
            "llama_cpp_python": llama_cpp.__version__,
            "gguf": gguf.name,
            "gguf_sha256": hashlib.sha256(gguf.read_bytes()).hexdigest(),
            "sampling": "greedy (top_k=1, repeat_penalty=1.0), n_batch=512, n_threads=2",
        },
        "tokenize": [],
        "chat": [],
        "complete": [],
    }
    for text in TEXTS:
        record["tokenize"].append(
            {
                "text": text,
                "ids": llm.tokenize(text.encode(), add_bos=False, special=False),
                "ids_special": llm.tokenize(text.encode(), add_bos=False, special=True),
            }
        )
    for messages in CONVERSATIONS:
        prompt = formatter(messages=messages).prompt
        ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
        record["chat"].append({"messages": messages, "prompt": prompt, "prompt_ids": ids, "greedy_ids": greedy(llm, ids)})
    for prompt in COMPLETIONS:
        ids = llm.tokenize(prompt.encode(), add_bos=False, special=False)
        record["complete"].append({"prompt": prompt, "prompt_ids": ids, "greedy_ids": greedy(llm, ids)})
    exact = llama_numpy.Decoder(str(gguf))
    for case in record["chat"] + record["complete"]:
        case["greedy_text"] = llm.detokenize(case["greedy_ids"]).decode("utf-8", errors="replace")
        path = case["prompt_ids"] + case["greedy_ids"]
        logits = exact.logits(path[:-1])[len(case["prompt_ids"]) - 1 :]
        top2 = np.sort(logits, axis=-1)[:, -2:]
        case["exact_top"] = [int(i) for i in logits.argmax(axis=-1)]
        case["exact_margins"] = [round(float(m), 4) for m in top2[:, 1] - top2[:, 0]]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, ensure_ascii=False, indent=1) + "\n")


if __name__ == "__main__":
    main()
