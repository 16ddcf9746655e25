"""Tiny offline models and data for tests: a word-level tokenizer with a chat template and a Llama pair.

Nothing is downloaded. `build_tiny_assets(dir)` writes `dir/student`, `dir/teacher` (each a full HF model folder
with the tokenizer) and `dir/data.jsonl` (prompt/completion rows), and returns their paths.
Runnable as a script too: `python tests/tiny.py OUT_DIR`.
"""

import json
import os
import sys

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
WORDS = ["user", "assistant", "system"] + [f"w{i}" for i in range(55)]  # 6 + 58 = 64 tokens
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)


def build_tokenizer(vocab_extra: int = 0, reverse_words: bool = False):
    """Word-level tokenizer (64 + vocab_extra tokens) with a ChatML-like template; pad/eos/bos set.
    `reverse_words`: the same tokens with the words' ids in reverse order (another tokenizer of the same size)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = WORDS[: 64 - len(SPECIALS)]
    vocab = {t: i for i, t in enumerate(SPECIALS + (words[::-1] if reverse_words else words))}
    for i in range(vocab_extra):
        vocab[f"x{i}"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        padding_side="left", truncation_side="left",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(vocab_size: int, hidden: int = 32, layers: int = 2, heads: int = 4, seed: int = 0,
                eos_token_id=(2, 5), head_dim: int | None = None):
    """A random Llama; `head_dim` (default hidden // heads) may differ from it: vLLM's CPU attention needs >= 32."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=heads, intermediate_size=2 * hidden, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=list(eos_token_id), pad_token_id=3, tie_word_embeddings=False,
        head_dim=head_dim,  # None: hidden // heads
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.generation_config.pad_token_id = 3
    model.generation_config.eos_token_id = list(eos_token_id)  # </s> and <|im_end|>
    return model


def make_rows(n: int = 32, seed: int = 0, conversational: bool = False):
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = " ".join(f"w{rng.randrange(50)}" for _ in range(rng.randrange(3, 8)))
        completion = " ".join(f"w{rng.randrange(50)}" for _ in range(rng.randrange(2, 6)))
        if conversational:
            rows.append({"prompt": [{"role": "user", "content": prompt}],
                         "completion": [{"role": "assistant", "content": completion}]})
        else:
            rows.append({"prompt": prompt, "completion": completion})
    return rows


def build_tiny_assets(out_dir: str, teacher_vocab_pad: int = 0, student_vocab_pad: int = 0,
                      conversational: bool = False, n_rows: int = 32, head_dim: int | None = None) -> dict:
    """Writes student/teacher model folders and a jsonl dataset. `*_vocab_pad` pads the model's embedding rows
    beyond the tokenizer (like Qwen's 151936 vs 152064). `head_dim`: attention head size of both models (default
    hidden // heads = 8 and 12; vLLM's CPU attention needs one of 32, 64, ...)."""
    tok = build_tokenizer()
    paths = {}
    for name, hidden, layers, seed, pad in (("student", 32, 2, 0, student_vocab_pad),
                                            ("teacher", 48, 3, 1, teacher_vocab_pad)):
        path = os.path.join(out_dir, name)
        model = build_model(len(tok) + pad, hidden=hidden, layers=layers, seed=seed, head_dim=head_dim)
        model.save_pretrained(path)
        tok.save_pretrained(path)
        paths[name] = path
    data = os.path.join(out_dir, "data.jsonl")
    with open(data, "w") as f:
        for row in make_rows(n_rows, conversational=conversational):
            f.write(json.dumps(row) + "\n")
    paths["data"] = data
    return paths


if __name__ == "__main__":
    print(json.dumps(build_tiny_assets(sys.argv[1]), indent=1))
