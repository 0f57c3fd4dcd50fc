"""A small character-level GPT with a pluggable attention function, and the training loop of chapter 12.

The model is GPT-2's block (pre-LayerNorm, causal self-attention, 4x GELU MLP) at a few million parameters. Only
the attention call changes between runs, so with the same seed (same initial weights) and the same batches the
loss curves must agree up to rounding:

    naive     S = scale * Q K^T, mask, P = softmax(S), O = P V: S and P are materialised (B, H, N, N) tensors
    sdpa      torch.nn.functional.scaled_dot_product_attention (PyTorch picks flash, cuDNN, efficient or math)
    flashlib  flashlib.torch.scaled_dot_product_attention (our kernels: numba fp32, cupy fp16/bf16, or the host)

The text is the English documentation that ships inside Python (`pydoc_data.topics`, ~460 KB): nothing to
download.
"""
import dataclasses
import functools
import math
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import torch as flashlib_torch
from .torch import naive_attention  # noqa: F401 (gpt.naive_attention: chapter 12 shows its source)


# ---- data --------------------------------------------------------------------------------------------------------

def load_text():
    """Python's own help texts (pydoc_data.topics), in a fixed order: ~465 000 characters, ~100 distinct."""
    from pydoc_data import topics
    return "".join(topics.topics[key] for key in sorted(topics.topics))


class CharData:
    """Characters -> integer ids; a 90/10 train/validation split; batches in an order fixed by a seed."""

    def __init__(self, text=None):
        text = load_text() if text is None else text
        self.chars = sorted(set(text))
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        ids = torch.tensor([self.stoi[c] for c in text], dtype=torch.long)
        cut = int(0.9 * len(ids))
        self.train, self.val = ids[:cut], ids[cut:]

    @property
    def vocab_size(self):
        return len(self.chars)

    def encode(self, s):
        return [self.stoi[c] for c in s]

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)

    def batch_starts(self, steps, batch, block, seed=0, split="train"):
        """(steps, batch) start offsets: the data order, identical for every attention function."""
        n = len(self.train if split == "train" else self.val) - block - 1
        return np.random.default_rng(seed).integers(0, n, size=(steps, batch))

    def batch(self, starts, block, split="train", device="cpu"):
        """Inputs x and next-character targets y, both (batch, block) int64."""
        data = self.train if split == "train" else self.val
        idx = torch.as_tensor(starts)[:, None] + torch.arange(block + 1)
        chunk = data[idx]
        return chunk[:, :-1].to(device, non_blocking=True), chunk[:, 1:].to(device, non_blocking=True)


# ---- attention functions: fn(q, k, v, is_causal) with q, k, v (B, H, N, d) ---------------------------------------

def attention_fn(name, backend="auto"):
    """The attention function called `name`: 'naive', 'sdpa' or 'flashlib' (with a flashlib backend)."""
    if name == "naive":
        return naive_attention
    if name == "sdpa":
        return lambda q, k, v, is_causal=True: F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
    if name == "flashlib":
        return functools.partial(flashlib_torch.scaled_dot_product_attention, backend=backend)
    raise ValueError(f"unknown attention {name!r}; choose naive, sdpa or flashlib")


# ---- the model ---------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class GPTConfig:
    vocab_size: int = 103
    block_size: int = 256      # context length N
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256          # head dim d = n_embd / n_head


class Block(nn.Module):
    def __init__(self, cfg, attend):
        super().__init__()
        self.n_head, self.attend = cfg.n_head, attend
        self.ln1, self.ln2 = nn.LayerNorm(cfg.n_embd), nn.LayerNorm(cfg.n_embd)
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, 4 * cfg.n_embd), nn.GELU(),
                                 nn.Linear(4 * cfg.n_embd, cfg.n_embd))

    def forward(self, x):                                   # x: (B, N, C)
        B, N, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, N, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        y = self.attend(q, k, v, is_causal=True)            # (B, H, N, d)
        x = x + self.proj(y.transpose(1, 2).reshape(B, N, C))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, cfg, attend=naive_attention):
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg, attend) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.head.weight = self.tok.weight                  # weight tying, as in GPT-2
        for name, p in self.named_parameters():             # GPT-2's initialisation
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * cfg.n_layer) if name.endswith(("proj.weight", "mlp.2.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def set_attention(self, attend):
        for b in self.blocks:
            b.attend = attend

    def forward(self, idx, targets=None):                   # idx: (B, N) int64
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for b in self.blocks:
            x = b(x)
        logits = self.head(self.ln_f(x))
        if targets is None:
            return logits
        return logits, F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))

    def n_params(self):
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def generate(self, idx, n_new, temperature=0.8, seed=0):
        g = torch.Generator(device=idx.device).manual_seed(seed)
        for _ in range(n_new):
            logits = self(idx[:, -self.cfg.block_size:])[:, -1].float() / temperature
            idx = torch.cat([idx, torch.multinomial(torch.softmax(logits, -1), 1, generator=g)], dim=1)
        return idx


# ---- training ----------------------------------------------------------------------------------------------------

def train(cfg, attention="naive", backend="auto", steps=200, batch=16, lr=1e-3, device="cpu", amp=None, seed=0,
          data=None, warmup=5, log_every=0):
    """Train a fresh GPT(cfg) with one attention function; return (a dict of what was measured, the model).

    Same seed -> same initial weights and the same batches for every attention. amp: None (float32),
    torch.float16 or torch.bfloat16 (autocast; fp16 uses a GradScaler). ms/step is the wall time per step after
    `warmup` steps (CUDA synchronised), peak memory the CUDA allocator's peak (None on the CPU).
    """
    data = data or CharData()
    cfg = dataclasses.replace(cfg, vocab_size=data.vocab_size)
    torch.manual_seed(seed)
    model = GPT(cfg, attention_fn(attention, backend)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    schedule = lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / steps))   # warm-up + cosine
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    starts = data.batch_starts(steps, batch, cfg.block_size, seed)
    cuda = torch.device(device).type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    losses, t0 = [], None
    for step in range(steps):
        if step == warmup:
            sync()
            t0 = time.perf_counter()
        x, y = data.batch(starts[step], cfg.block_size, device=device)
        for group in opt.param_groups:
            group["lr"] = lr * schedule(step)
        with torch.autocast(torch.device(device).type, dtype=amp or torch.float32, enabled=amp is not None):
            _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        losses.append(loss.detach())
        if log_every and step % log_every == 0:
            print(f"{attention:9s} step {step:4d}  loss {loss.item():.4f}")
    sync()
    seconds = time.perf_counter() - t0 if t0 is not None else float("nan")
    timed = steps - warmup
    probe = torch.empty(1, device=device, dtype=amp or torch.float32)     # the dtype attention sees
    resolved = flashlib_torch.resolve_backend(probe, backend) if attention == "flashlib" else None
    return {"attention": attention, "backend": resolved,
            "amp": str(amp).replace("torch.", "") if amp else "float32", "steps": steps, "batch": batch,
            "block_size": cfg.block_size, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd,
            "n_params": model.n_params(), "losses": torch.stack(losses).float().tolist(),
            "ms_per_step": 1e3 * seconds / timed if timed > 0 else None,
            "tokens_per_s": timed * batch * cfg.block_size / seconds if timed > 0 else None,
            "peak_memory_MB": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
            # Numba's allocations (the numba backend's O, lse and gradients) bypass PyTorch's allocator
            "peak_memory_complete": not (attention == "flashlib" and resolved == "numba"),
            "val_loss": evaluate(model, data, cfg, device, amp)}, model


@torch.no_grad()
def evaluate(model, data, cfg, device, amp=None, batches=4, batch=16, seed=1):
    """Mean cross-entropy on validation batches (fixed by seed)."""
    model.eval()
    starts = data.batch_starts(batches, batch, cfg.block_size, seed, split="val")
    total = 0.0
    for s in starts:
        x, y = data.batch(s, cfg.block_size, split="val", device=device)
        with torch.autocast(torch.device(device).type, dtype=amp or torch.float32, enabled=amp is not None):
            total += model(x, y)[1].item()
    model.train()
    return total / batches
