"""Tier A task: sort symbols by a hidden key, ties in any order (several correct answers, checked exactly).

There are `NUM_SYMBOLS` symbols `s0 .. s23`; a fixed table (seeded) puts each symbol in one of `NUM_CLASSES` key
classes. A prompt lists 4-8 distinct symbols followed by `=`; a correct answer lists the same symbols once each, in
non-decreasing key class. Symbols of the same class may come in any order, so a prompt has prod_c (n_c!) correct
answers (6.1 on average): the reference answer is one of them drawn uniformly, and a teacher
that learned the task spreads its next-token probability uniformly over the symbols still allowed. That
distribution carries information a single reference does not (which other symbols were also correct), so
distribution-matching methods (FKL, GKD, AMM, ...) see more per example than SFT on the reference.

The training split's reference answers are noisy, as real datasets are: with probability `REFERENCE_NOISE` a
reference has two adjacent symbols of different classes swapped (so it is wrong). The teacher is trained on clean
answers (it knows the task, not the dataset's noise), so its distribution is the better target; SFT on the references
learns the noise too. Validation and test references are clean (they are not used for scoring: the checker is).

Splits are disjoint by the prompt's symbol *set* (a hash of the sorted set picks train / validation / test), so no
test prompt, nor any reordering of it, occurs in training. Everything derives from fixed seeds: no download.
"""

from __future__ import annotations

import hashlib
import json
import os
import random

NUM_SYMBOLS = 24
NUM_CLASSES = 6
MIN_ITEMS, MAX_ITEMS = 4, 8
TABLE_SEED = 1234
SEPARATOR = "="
SYMBOLS = [f"s{i}" for i in range(NUM_SYMBOLS)]
SPLIT_FRACTIONS = {"train": 0.8, "validation": 0.1, "test": 0.1}
REFERENCE_NOISE = 0.25


def key_table(seed: int = TABLE_SEED) -> dict[str, int]:
    """Symbol -> key class: each class holds NUM_SYMBOLS / NUM_CLASSES symbols, assigned by a seeded shuffle."""
    order = SYMBOLS[:]
    random.Random(seed).shuffle(order)
    per = NUM_SYMBOLS // NUM_CLASSES
    return {s: i // per for i, s in enumerate(order)}


KEY = key_table()


def split_of(symbols) -> str:
    """The split a prompt belongs to, from a hash of its symbol set (order-free, so reorderings stay together)."""
    digest = hashlib.sha256(" ".join(sorted(symbols)).encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2 ** 64
    if u < SPLIT_FRACTIONS["train"]:
        return "train"
    return "validation" if u < SPLIT_FRACTIONS["train"] + SPLIT_FRACTIONS["validation"] else "test"


def reference_answer(symbols: list[str], rng: random.Random) -> list[str]:
    """A correct answer drawn uniformly among all correct ones: sorted by class, each class shuffled."""
    shuffled = symbols[:]
    rng.shuffle(shuffled)
    return sorted(shuffled, key=KEY.__getitem__)  # stable sort keeps the random order within a class


def corrupt(answer: list[str], rng: random.Random) -> list[str]:
    """Swaps one random adjacent pair of symbols of different classes (the answer becomes wrong); unchanged if all
    symbols share a class."""
    pairs = [i for i in range(len(answer) - 1) if KEY[answer[i]] != KEY[answer[i + 1]]]
    if not pairs:
        return answer
    i = rng.choice(pairs)
    return answer[:i] + [answer[i + 1], answer[i]] + answer[i + 2:]


def num_correct_answers(symbols: list[str]) -> int:
    from collections import Counter
    from math import factorial, prod

    return prod(factorial(n) for n in Counter(KEY[s] for s in symbols).values())


def is_correct(prediction: str, prompt: str) -> bool:
    """The answer lists exactly the prompt's symbols, once each, in non-decreasing key class."""
    given = prompt.split()
    given = given[:-1] if given and given[-1] == SEPARATOR else given
    answer = prediction.split()
    if sorted(answer) != sorted(given):
        return False
    keys = [KEY[s] for s in answer]
    return all(a <= b for a, b in zip(keys, keys[1:]))


def score(prediction: str, reference: str, row: dict) -> float:
    """`amm-trl eval --scorer bench.tier_a.task:score`: 1.0 for a correct answer (any of them), else 0.0."""
    return float(is_correct(prediction, row["prompt"]))


def make_rows(split: str, n: int, seed: int, noise: float = 0.0) -> list[dict]:
    """`n` distinct prompts of `split` (distinct as ordered prompts), each with a uniformly drawn correct answer,
    corrupted (`corrupt`) with probability `noise`."""
    rng = random.Random(f"{split}-{seed}")
    rows, seen = [], set()
    while len(rows) < n:
        symbols = rng.sample(SYMBOLS, rng.randint(MIN_ITEMS, MAX_ITEMS))
        if split_of(symbols) != split or tuple(symbols) in seen:
            continue
        seen.add(tuple(symbols))
        answer = reference_answer(symbols, rng)
        if noise and rng.random() < noise:
            answer = corrupt(answer, rng)
        rows.append({"prompt": " ".join(symbols + [SEPARATOR]), "completion": " ".join(answer)})
    return rows


def build_tokenizer():
    """Word-level tokenizer over the task's symbols (no chat template: prompts are plain text ending in `=`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", "<pad>", SEPARATOR] + SYMBOLS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", padding_side="left", truncation_side="left")


def build_model(vocab_size: int, hidden: int, layers: int, heads: int, seed: int):
    """A small Llama (untied embeddings, RoPE) initialized with `seed`; eos `</s>` (id 2), pad id 3."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=heads, intermediate_size=4 * hidden, max_position_embeddings=64,
                      bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.generation_config.pad_token_id = 3
    model.generation_config.eos_token_id = 2
    return model


def write_jsonl(path: str, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(path + ".tmp", path)
