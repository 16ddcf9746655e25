"""From-scratch training of the Tier A models on the task's reference answers (plain PyTorch: next-token
cross-entropy on the answer tokens), and greedy accuracy. Deterministic on CPU for a fixed seed and thread count."""

from __future__ import annotations

import math
import random
import time

import torch

from .task import is_correct


def encode(tokenizer, rows: list[dict]) -> list[tuple[list[int], list[int]]]:
    return [(tokenizer(r["prompt"])["input_ids"], tokenizer(r["completion"])["input_ids"] + [tokenizer.eos_token_id])
            for r in rows]


def _batch(pairs, pad_id):
    width = max(len(p) + len(c) for p, c in pairs)
    ids = torch.full((len(pairs), width), pad_id)
    labels = torch.full((len(pairs), width), -100)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for i, (p, c) in enumerate(pairs):  # right padding: positions match between training and left-padded generation
        seq = p + c
        ids[i, :len(seq)] = torch.tensor(seq)
        mask[i, :len(seq)] = 1
        labels[i, len(p):len(seq)] = torch.tensor(c)
    return ids, mask, labels


def train_lm(model, tokenizer, rows: list[dict], steps: int, batch_size: int, lr: float, seed: int,
             log_every: int = 0, eval_fn=None) -> list[dict]:
    """AdamW (weight decay 0.01), linear warm-up over 5% of the steps then cosine decay to 10% of `lr`."""
    pairs = encode(tokenizer, rows)
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    log, order, start = [], [], time.perf_counter()
    model.train()
    for step in range(1, steps + 1):
        if len(order) < batch_size:
            extra = list(range(len(pairs)))
            rng.shuffle(extra)
            order += extra
        batch, order = [pairs[i] for i in order[:batch_size]], order[batch_size:]
        ids, mask, labels = _batch(batch, tokenizer.pad_token_id)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if log_every and (step % log_every == 0 or step == steps):
            entry = {"step": step, "loss": loss.item(), "seconds": time.perf_counter() - start}
            if eval_fn is not None:
                entry["val_accuracy"] = eval_fn(model)
                model.train()
            log.append(entry)
            print(f"pretrain: {entry}", flush=True)
    model.eval()
    return log


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: list[str], max_new_tokens: int = 10, batch_size: int = 256,
                   temperature: float = 0.0) -> list[str]:
    """Answers to `prompts` (left-padded batches), greedy or sampled at `temperature`."""
    model.eval()
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    out_texts = []
    for i in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, **sampling,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        out_texts += tokenizer.batch_decode(out[:, enc["input_ids"].size(1):], skip_special_tokens=True)
    return out_texts


def accuracy(model, tokenizer, rows: list[dict]) -> float:
    prompts = [r["prompt"] for r in rows]
    answers = greedy_answers(model, tokenizer, prompts)
    return sum(is_correct(a, p) for a, p in zip(answers, prompts)) / len(rows)
