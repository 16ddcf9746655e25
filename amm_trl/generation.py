"""Batched text generation for `amm-trl generate` (teacher completions) and `amm-trl eval`: vLLM when asked and
installed, else transformers `generate` with left padding."""

import os

import torch
from tqdm.auto import tqdm
from trl.data_utils import is_conversational


def render_prompts(tokenizer, prompts: list, chat_template_kwargs: dict | None = None) -> list[list[int]]:
    """Token ids of each prompt as the trainer renders it (chat template with generation prompt and the trainer's
    `chat_template_kwargs`, or plain text)."""
    ids = []
    for prompt in prompts:
        if is_conversational({"prompt": prompt}):
            encoded = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                                    **(chat_template_kwargs or {}))
            ids.append(list(encoded["input_ids"] if not isinstance(encoded, list) else encoded))
        else:
            ids.append(tokenizer(prompt)["input_ids"])
    return ids


def end_token_ids(tokenizer, model_config_eos) -> list[int]:
    eos = model_config_eos if isinstance(model_config_eos, list) else [model_config_eos] if model_config_eos else []
    return list(dict.fromkeys([tokenizer.eos_token_id, *eos]))


def generate_token_ids(model_path: str, prompt_ids: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                       top_p: float = 1.0, batch_size: int = 16, use_vllm: bool = False, dtype: str = "auto",
                       seed: int = 0, progress: bool = True) -> list[list[int]]:
    """Completion token ids (cut after the first end token) for each prompt. temperature 0 = greedy. Only ids the
    tokenizer has are generated: an embedding padded beyond it (Qwen2.5: 152064 rows for 151665 tokens) has rows
    that are no token, and that another model may not have."""
    if use_vllm:
        return _generate_vllm(model_path, prompt_ids, max_new_tokens, temperature, top_p, seed, dtype=dtype)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype).to(device).eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ends = end_token_ids(tokenizer, model.generation_config.eos_token_id)
    rows = model.get_output_embeddings().weight.shape[0]
    padded = list(range(len(tokenizer), rows)) or None
    torch.manual_seed(seed)
    # Longest prompts first: less padding per batch. Results are put back in the caller's order.
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
    results: list[list[int] | None] = [None] * len(prompt_ids)
    batches = range(0, len(order), batch_size)
    for start in tqdm(batches, desc="generate", disable=not progress):
        index = order[start:start + batch_size]
        width = max(len(prompt_ids[i]) for i in index)
        input_ids = torch.tensor([[pad_id] * (width - len(prompt_ids[i])) + prompt_ids[i] for i in index],
                                 device=device)
        attention = torch.tensor([[0] * (width - len(prompt_ids[i])) + [1] * len(prompt_ids[i]) for i in index],
                                 device=device)
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {
            "do_sample": False}
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new_tokens,
                                 pad_token_id=pad_id, eos_token_id=ends, suppress_tokens=padded, **sampling)
        for i, row in zip(index, out[:, width:].tolist()):
            cut = next((k + 1 for k, t in enumerate(row) if t in ends), len(row))
            results[i] = row[:cut]
    return results


def _generate_vllm(model_path, prompt_ids, max_new_tokens, temperature, top_p, seed, top_k=0, dtype="auto"):
    """Completion ids; with `top_k`, also each generated token's top-k log-probs from the same engine (vLLM's default
    `raw_logprobs`: the model's distribution before temperature and top-p, i.e. at temperature 1)."""
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")  # FlashInfer is optional; vLLM 0.26 imports it
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_path, seed=seed, dtype=dtype, **({"max_logprobs": max(top_k, 20)} if top_k else {}))
    tokens, rows = len(llm.get_tokenizer()), llm.llm_engine.model_config.get_vocab_size()
    allowed = list(range(tokens)) if tokens < rows else None  # no padded embedding row (see generate_token_ids)
    params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                            allowed_token_ids=allowed, logprobs=top_k or None)
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params)
    ids = [list(o.outputs[0].token_ids) for o in outputs]
    if not top_k:
        return ids
    results = []
    for o, c in zip(outputs, ids):
        entries = [sorted(position.items(), key=lambda item: item[1].rank)[:top_k]
                   for position in o.outputs[0].logprobs]
        results.append({"ids": [[int(t) for t, _ in e] for e in entries],
                        "log_probs": [[x.logprob for _, x in e] for e in entries],
                        "token_log_prob": [position[t].logprob for position, t in zip(o.outputs[0].logprobs, c)]})
    return ids, results


def generate_with_top_k(model_path: str, prompt_ids: list[list[int]], max_new_tokens: int, k: int,
                        temperature: float = 1.0, top_p: float = 1.0, batch_size: int = 16, use_vllm: bool = False,
                        dtype: str = "auto", seed: int = 0) -> tuple[list[list[int]], list[dict[str, list]]]:
    """Completions and, for each completion token, the model's top-k log-probs (see `top_k_log_probs`): with vLLM
    from the sampling engine itself (one engine), else HF `generate` then one forward per batch."""
    if use_vllm:
        return _generate_vllm(model_path, prompt_ids, max_new_tokens, temperature, top_p, seed, top_k=k, dtype=dtype)
    ids = generate_token_ids(model_path, prompt_ids, max_new_tokens, temperature, top_p, batch_size, False, dtype,
                             seed)
    return ids, top_k_log_probs(model_path, prompt_ids, ids, k, batch_size, dtype)


def decode_completions(tokenizer, completions: list[list[int]]) -> list[str]:
    return tokenizer.batch_decode(completions, skip_special_tokens=True)


def top_k_log_probs(model_path: str, prompt_ids: list[list[int]], completion_ids: list[list[int]], k: int,
                    batch_size: int = 16, dtype: str = "auto", progress: bool = True) -> list[dict[str, list]]:
    """For each completion token: the model's k most likely tokens at that position (after the prompt and the
    completion so far), their log-probs at temperature 1 sorted by rank, and the taken token's log-prob
    (`{"ids": [[k ids] per token], "log_probs": [[k floats]...], "token_log_prob": [floats]}` per completion)."""
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype).to(device).eval()
    results = []
    for start in tqdm(range(0, len(prompt_ids), batch_size), desc="teacher top-k", disable=not progress):
        rows = [p + c for p, c in zip(prompt_ids[start:start + batch_size], completion_ids[start:start + batch_size])]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows], device=device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
        for i, (p, c) in enumerate(zip(prompt_ids[start:start + batch_size],
                                       completion_ids[start:start + batch_size])):
            # the position before each completion token; one row's log-softmax at a time (not the batch's (B, T, V))
            at = torch.log_softmax(logits[i, len(p) - 1:len(p) + len(c) - 1].float(), -1)
            values, top = at.topk(min(k, at.size(-1)), -1)
            taken = at.gather(-1, torch.tensor(c, device=device, dtype=torch.long)[:, None]).squeeze(-1)
            results.append({"ids": top.tolist(), "log_probs": values.tolist(), "token_log_prob": taken.tolist()})
    return results
