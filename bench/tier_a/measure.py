"""Tier A measurements beyond the greedy task score (the suite's `measures` and `callbacks` hooks).

- quality: the teacher's mean token log-probability of the student's samples (temperature 1, test prompts; the
  end-of-sequence token counts): how plausible what the student says is to the teacher (reverse-KL-like).
- coverage: the student's mean token log-probability of the teacher's samples (the `teacher` column): how much of
  the teacher's distribution the student covers (forward-KL-like; -coverage is the teacher-sample cross-entropy).
- score_sampled: task accuracy of the student's temperature-1 samples (greedy accuracy is `score`);
  `score_sampled_t<T>` the same at each of the settings' `sample_temperatures` (a run's `measure_args`).
Means are over all tokens of all answers (token-weighted).
"""

from __future__ import annotations

import torch
from transformers import TrainerCallback

from .pretrain import greedy_answers
from .task import is_correct


def _load(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def token_log_probs(model, prompt_ids: list[list[int]], completions: list[list[int]], pad: int,
                    batch_size: int = 500) -> tuple[float, int]:
    """(sum of log p(completion tokens | prompt, prefix), number of tokens) over all rows."""
    total, count = 0.0, 0
    for i in range(0, len(prompt_ids), batch_size):
        pairs = list(zip(prompt_ids[i:i + batch_size], completions[i:i + batch_size]))
        width = max(len(p) + len(c) for p, c in pairs)
        ids = torch.full((len(pairs), width), pad)
        mask, target = torch.zeros_like(ids), torch.zeros(len(pairs), width, dtype=torch.bool)
        for j, (p, c) in enumerate(pairs):
            ids[j, :len(p) + len(c)] = torch.tensor(p + c)
            mask[j, :len(p) + len(c)] = 1
            target[j, len(p):len(p) + len(c)] = True
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
        picked = logp.gather(-1, ids[:, 1:, None])[..., 0]
        total += picked[target[:, 1:]].sum().item()
        count += int(target[:, 1:].sum())
    return total, count


def measure(model_path: str, suite: dict, out: str, seed: int, settings: dict) -> dict:
    """Suite hook: quality, coverage and sampled accuracy of `model_path` on the eval split `settings`."""
    from amm_trl.data import load_prompt_dataset
    from amm_trl.generation import generate_token_ids, render_prompts
    from transformers import AutoTokenizer

    rows = [dict(r) for r in load_prompt_dataset(settings["dataset_name"])]
    prompts = [r["prompt"] for r in rows]
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    rendered = render_prompts(tokenizer, prompts)

    def sample(temperature: float) -> tuple[list, float]:
        """The student's samples at `temperature` (the same sampler seed at every temperature) and their accuracy."""
        ids = generate_token_ids(model_path, rendered, settings["max_new_tokens"], temperature=temperature,
                                 batch_size=500, dtype="float32", seed=1000 + seed, progress=False)
        texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
        return ids, sum(is_correct(t, p) for t, p in zip(texts, prompts)) / len(rows)

    samples, accuracy = sample(1.0)
    student, teacher = _load(model_path), _load(suite["teacher"])
    eos = tokenizer.eos_token_id
    teacher_answers = [tokenizer(r["teacher"])["input_ids"] + [eos] for r in rows]
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
    q_sum, q_n = token_log_probs(teacher, prompt_ids, samples, tokenizer.pad_token_id)
    c_sum, c_n = token_log_probs(student, prompt_ids, teacher_answers, tokenizer.pad_token_id)
    result = {"quality": q_sum / q_n, "coverage": c_sum / c_n, "score_sampled": accuracy}
    for temperature in settings.get("sample_temperatures", []):  # a sharper sampler: is an edge only sharpness?
        result[f"score_sampled_t{temperature:g}"] = sample(temperature)[1]
    return result


class EveryKSteps(TrainerCallback):
    """Calls `record(state, model)` at step 0 and every `every` optimizer steps (and at the last), for curves that the
    suite's `train_log.json` keeps (`record` appends to `state.log_history`)."""

    every = 1

    def record(self, state, model) -> None:
        raise NotImplementedError

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.record(state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self.record(state, model)


class ValidationCurve(EveryKSteps):
    """Task accuracy on validation prompts at step 0 and every `every` optimizer steps, greedy (`val/score`) and of
    temperature-1 samples (`val/score_sampled`), appended to the training log (so the suite's `train_log.json` holds
    the curves). The sampling uses its own seed and restores the global RNG: training is the same with or without
    this callback."""

    def __init__(self, rows: list[dict], tokenizer, every: int, max_new_tokens: int):
        self.prompts = [r["prompt"] for r in rows]
        self.tokenizer, self.every, self.max_new_tokens = tokenizer, every, max_new_tokens

    def record(self, state, model):
        was_training = model.training
        rng = torch.get_rng_state()
        torch.manual_seed(12345 + state.global_step)
        greedy = greedy_answers(model, self.tokenizer, self.prompts, self.max_new_tokens, batch_size=len(self.prompts))
        sampled = greedy_answers(model, self.tokenizer, self.prompts, self.max_new_tokens,
                                 batch_size=len(self.prompts), temperature=1.0)
        torch.set_rng_state(rng)
        model.train(was_training)
        n = len(self.prompts)
        state.log_history.append({
            "step": state.global_step, "val/score": sum(is_correct(a, p) for a, p in zip(greedy, self.prompts)) / n,
            "val/score_sampled": sum(is_correct(a, p) for a, p in zip(sampled, self.prompts)) / n})


def validation_curve(suite: dict) -> ValidationCurve:
    """Suite hook (`callbacks: [bench.tier_a.measure:validation_curve]`), on `select.eval`'s dataset."""
    from amm_trl.data import load_prompt_dataset
    from transformers import AutoTokenizer

    settings = suite["select"]["eval"]
    rows = [dict(r) for r in load_prompt_dataset(settings["dataset_name"])]
    return ValidationCurve(rows, AutoTokenizer.from_pretrained(suite["teacher"]), suite["curve_every"],
                           settings["max_new_tokens"])
