#!/usr/bin/env python3
"""PyTorch eager peer for benches/cuda.rs: the same Llama decode on the same weights
(dequantised to f16 by the bench), batch B, contiguous KV cache. Prints decode tokens/s.

    python3 scripts/bench-torch.py DIR --batch 8 --prompt 32 --steps 64
"""
import argparse, json, time

import numpy as np
import torch

ap = argparse.ArgumentParser()
ap.add_argument("dir")
ap.add_argument("--batch", type=int, default=1)
ap.add_argument("--prompt", type=int, default=32)
ap.add_argument("--steps", type=int, default=64)
a = ap.parse_args()

cfg = json.load(open(f"{a.dir}/index.json"))
raw = np.fromfile(f"{a.dir}/weights.f16", dtype=np.float16)
dev = "cuda"
W = {}
for name, (off, (rows, cols)) in cfg["tensors"].items():
    t = torch.from_numpy(raw[off:off + rows * cols].reshape(rows, cols) if rows > 1 else raw[off:off + cols])
    W[name] = t.to(dev)
L, H, KH, HD = cfg["n_layers"], cfg["n_heads"], cfg["n_kv_heads"], cfg["head_dim"]
eps, B, T = cfg["norm_eps"], a.batch, a.prompt + a.steps
out_w = W.get("output.weight", W["token_embd.weight"])
inv = 1.0 / (cfg["rope_base"] ** (torch.arange(0, HD, 2, device=dev).float() / HD))
kc = torch.zeros(L, B, KH, T, HD, dtype=torch.float16, device=dev)
vc = torch.zeros_like(kc)


def norm(x, w):
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).half() * w


def rope(x, pos):
    # Adjacent pairs, as llama.cpp lays out Llama's Q and K.
    f = pos * inv
    c, s = torch.cos(f).half(), torch.sin(f).half()
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), -1).flatten(-2)


@torch.no_grad()
def step(tok, pos):
    x = W["token_embd.weight"][tok]  # [B, dim]
    for l in range(L):
        p = lambda n: W[f"blk.{l}.{n}.weight"]
        h = norm(x, p("attn_norm"))
        q = (h @ p("attn_q").T).view(B, H, HD)
        k = (h @ p("attn_k").T).view(B, KH, HD)
        v = (h @ p("attn_v").T).view(B, KH, HD)
        q, k = rope(q, pos), rope(k, pos)
        kc[l, :, :, pos], vc[l, :, :, pos] = k, v
        keys = kc[l, :, :, : pos + 1].repeat_interleave(H // KH, 1)
        vals = vc[l, :, :, : pos + 1].repeat_interleave(H // KH, 1)
        att = torch.softmax((q.unsqueeze(2) @ keys.transpose(-1, -2)).float() / HD ** 0.5, -1).half()
        o = (att @ vals).view(B, H * HD)
        x = x + o @ p("attn_output").T
        h = norm(x, p("ffn_norm"))
        x = x + (torch.nn.functional.silu(h @ p("ffn_gate").T) * (h @ p("ffn_up").T)) @ p("ffn_down").T
    return (norm(x, W["output_norm.weight"]) @ out_w.T).argmax(-1)


tok = torch.full((B,), 100, device=dev)
for pos in range(a.prompt):
    tok = step(tok, pos)
torch.cuda.synchronize()
t = time.perf_counter()
for pos in range(a.prompt, T):
    tok = step(tok, pos)
torch.cuda.synchronize()
print(B * a.steps / (time.perf_counter() - t))
