#!/usr/bin/env python3
"""The llama.cpp side of the worker benchmark (inference-worker/benches/worker.rs), through
llama-cpp-python's low-level API so that batched decoding of several sequences is
llama.cpp's own (llama_batch with one seq_id per stream), not a Python loop.

Input (argv[1], JSON): model, threads, prompt (token ids), decode_tokens, streams,
stream_prompt (token ids), stream_tokens; optional extra_bufts (default true: llama.cpp's
own default, weights repacked into its AMX or CPU-repack buffers where it can; false runs
its plain CPU path, for hosts where the AMX path crashes, ggml-org/llama.cpp#20824).
Prints one JSON line of tokens/s figures.
"""
import ctypes
import json
import sys
import time

import llama_cpp as L
import numpy as np


def main():
    cfg = json.loads(sys.argv[1])
    L.llama_backend_init()
    mp = L.llama_model_default_params()
    mp.use_extra_bufts = bool(cfg.get("extra_bufts", True))
    model = L.llama_model_load_from_file(cfg["model"].encode(), mp)
    cp = L.llama_context_default_params()
    cp.n_ctx = 4096
    cp.n_batch = 512
    cp.n_ubatch = 512
    cp.n_seq_max = max(1, cfg["streams"])
    cp.n_threads = cfg["threads"]
    cp.n_threads_batch = cfg["threads"]
    ctx = L.llama_init_from_model(model, cp)
    vocab = L.llama_model_get_vocab(model)
    n_vocab = L.llama_vocab_n_tokens(vocab)
    batch = L.llama_batch_init(512, 0, cp.n_seq_max)

    def clear():
        L.llama_memory_clear(L.llama_get_memory(ctx), True)

    def decode(items):
        """items: (token, pos, seq, want_logits)."""
        batch.n_tokens = len(items)
        for i, (tok, pos, seq, want) in enumerate(items):
            batch.token[i] = tok
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = want
        rc = L.llama_decode(ctx, batch)
        assert rc == 0, f"llama_decode returned {rc}"

    def argmax(i):
        p = L.llama_get_logits_ith(ctx, i)
        return int(np.argmax(np.ctypeslib.as_array(p, shape=(n_vocab,))))

    prompt = cfg["prompt"]
    # Warm-up.
    decode([(t, i, 0, i == len(prompt) - 1) for i, t in enumerate(prompt[:8])])
    clear()

    # Prompt processing: the whole prompt in one batch.
    t0 = time.perf_counter()
    decode([(t, i, 0, i == len(prompt) - 1) for i, t in enumerate(prompt)])
    prompt_tps = len(prompt) / (time.perf_counter() - t0)
    clear()

    # Single-stream decode after a short prompt.
    short = prompt[:8]
    decode([(t, i, 0, i == len(short) - 1) for i, t in enumerate(short)])
    nxt = argmax(len(short) - 1)
    t0 = time.perf_counter()
    pos = len(short)
    for _ in range(cfg["decode_tokens"]):
        decode([(nxt, pos, 0, True)])
        nxt = argmax(0)
        pos += 1
    decode_tps = cfg["decode_tokens"] / (time.perf_counter() - t0)
    clear()

    # Aggregate throughput: `streams` sequences, prompts then decode, all batched.
    sp, n = cfg["stream_prompt"], cfg["streams"]
    t0 = time.perf_counter()
    items = [(t, i, s, i == len(sp) - 1) for s in range(n) for i, t in enumerate(sp)]
    decode(items)
    nxt = [argmax(s * len(sp) + len(sp) - 1) for s in range(n)]
    pos = len(sp)
    generated = n
    for _ in range(cfg["stream_tokens"] - 1):
        decode([(nxt[s], pos, s, True) for s in range(n)])
        nxt = [argmax(s) for s in range(n)]
        pos += 1
        generated += n
    agg_tps = generated / (time.perf_counter() - t0)
    print(json.dumps({"version": L.__version__, "prompt_tps": prompt_tps, "decode_tps": decode_tps, "aggregate_tps": agg_tps}))


if __name__ == "__main__":
    main()
