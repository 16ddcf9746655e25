"""Tier B measurements beyond ROUGE-L (the suite's `measures` and `callbacks` hooks), on the evaluated split:

- tv_teacher_greedy: exact total variation between student and teacher next-token distributions over the tokens of
  the teacher's greedy answers (`teacher_greedy`; fixed data, the same for every model);
- quality: the teacher's mean token log-probability of the student's temperature-1 samples (reverse-KL-like);
- coverage: the student's mean token log-probability of the teacher's temperature-1 samples (`teacher`;
  forward-KL-like). Means are over all tokens of all answers; answers are tokenized as the trainer does.
"""

from __future__ import annotations

import torch

from amm_trl.rollouts import completion_token_ids
from bench.tier_a.measure import EveryKSteps, token_log_probs


def _load(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _encoded(tokenizer, rows: list[dict], column: str, max_tokens: int) -> tuple[list[list[int]], list[list[int]]]:
    from amm_trl.generation import render_prompts

    eos = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id]
    prompts = render_prompts(tokenizer, [r["prompt"] for r in rows])
    answers = [completion_token_ids(tokenizer, r["prompt"], r[column], eos, max_tokens) for r in rows]
    return prompts, answers


def measure(model_path: str, suite: dict, out: str, seed: int, settings: dict) -> dict:
    """Suite hook: exact TV on the teacher's greedy answers, quality and coverage of `model_path` on `settings` (those
    named in `settings["only"]` when given)."""
    from transformers import AutoTokenizer

    from amm_trl.data import load_prompt_dataset
    from amm_trl.generation import generate_token_ids

    rows = [dict(r) for r in load_prompt_dataset(settings["dataset_name"])]
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    n = settings["max_new_tokens"]
    only = set(settings.get("only") or ("tv_teacher_greedy", "quality", "coverage"))
    prompts, greedy = _encoded(tokenizer, rows, "teacher_greedy", n)
    result = {}
    if "tv_teacher_greedy" in only:  # forward passes only; the teacher's side once per process
        result["tv_teacher_greedy"] = FixedAnswersTV(suite["teacher"], prompts, greedy).tv(_load(model_path))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if "quality" in only:  # the student samples (the costly part), the teacher scores them
        samples = generate_token_ids(model_path, prompts, n, temperature=1.0, batch_size=50, dtype="float32",
                                     seed=1000 + seed, progress=False)
        q_sum, q_n = token_log_probs(_load(suite["teacher"]), prompts, samples, pad, batch_size=25)
        result["quality"] = q_sum / q_n
    if "coverage" in only:
        _, teacher_samples = _encoded(tokenizer, rows, "teacher", n)
        c_sum, c_n = token_log_probs(_load(model_path), prompts, teacher_samples, pad, batch_size=25)
        result["coverage"] = c_sum / c_n
    return result


_TEACHER_LOGITS: dict[tuple, list[torch.Tensor]] = {}  # (teacher, answers) -> its logits at the scored positions


class FixedAnswersTV:
    """`amm_trl.evaluation.exact_tv` (mean exact TV between teacher and student over the tokens of fixed answers, the
    same batches of 16, the same vocabulary cut, fp32) with the teacher's logits computed once per process and kept
    (about 1 GB for 100 answers of 48 tokens at SmolLM2's vocabulary): every later model costs its own forward only."""

    def __init__(self, teacher_path: str, prompts: list[list[int]], answers: list[list[int]], batch_size: int = 16):
        self.teacher_path, self.batch_size = teacher_path, batch_size
        self.prompts, self.answers = prompts, answers
        self.key = (teacher_path, tuple(map(tuple, prompts)), tuple(map(tuple, answers)), batch_size)

    def _batches(self):
        from amm_trl.evaluation import answer_batches

        return answer_batches(self.prompts, self.answers, self.batch_size)  # exact_tv's batches

    def _teacher(self) -> list[torch.Tensor]:
        if self.key not in _TEACHER_LOGITS:
            teacher = _load(self.teacher_path)
            with torch.no_grad():
                _TEACHER_LOGITS[self.key] = [teacher(input_ids=ids, attention_mask=mask).logits.float()[scored]
                                             for ids, mask, scored in self._batches()]
        return _TEACHER_LOGITS[self.key]

    @torch.no_grad()
    def tv(self, model) -> float:
        from transformers import AutoTokenizer

        from amm_trl.objectives import total_variation

        vocab = min(len(AutoTokenizer.from_pretrained(self.teacher_path)),
                    model.get_output_embeddings().weight.size(0),
                    self._teacher()[0].size(-1))
        was_training, device = model.training, next(model.parameters()).device
        model.eval()
        total, count = 0.0, 0
        for (ids, mask, scored), z_t in zip(self._batches(), self._teacher()):
            z_s = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[..., :vocab].float()
            total += total_variation(z_s[scored.to(device)].cpu(), z_t[:, :vocab]).sum().item()
            count += int(scored.sum())
        model.train(was_training)
        return total / max(count, 1)


_STEP0: dict[tuple, float] = {}  # (initial student, validation split) -> its validation TV, per suite process


class ValidationCurve(EveryKSteps):
    """Exact TV on the validation split's teacher greedy answers at step 0 and every `every` optimizer steps, appended
    to the training log as `val/tv` (the suite's `train_log.json` holds the curves). No sampling: the RNG and hence
    training are the same with or without this callback."""

    def __init__(self, measure: FixedAnswersTV, every: int, start_key: tuple | None = None):
        self.measure, self.every = measure, every
        self.start_key = start_key  # step 0 is the same model for every run with this key: measured once per process

    def record(self, state, model):
        if state.global_step == 0 and self.start_key in _STEP0:
            state.log_history.append({"step": 0, "val/tv": _STEP0[self.start_key]})
            return
        value = self._tv(model)
        if state.global_step == 0 and self.start_key is not None:
            _STEP0[self.start_key] = value
        state.log_history.append({"step": state.global_step, "val/tv": value})

    def _tv(self, model) -> float:
        return self.measure.tv(model)


def validation_curve(suite: dict) -> ValidationCurve:
    """Suite hook (`callbacks: [bench.tier_b.measure:validation_curve]`), on `curve_eval`'s dataset, else
    `select.eval`'s (the validation split)."""
    from transformers import AutoTokenizer

    from amm_trl.data import load_prompt_dataset

    settings = suite.get("curve_eval") or suite["select"]["eval"]  # the validation split
    rows = [dict(r) for r in load_prompt_dataset(settings["dataset_name"])]
    tokenizer = AutoTokenizer.from_pretrained(suite["teacher"])
    prompts, answers = _encoded(tokenizer, rows, "teacher_greedy", settings["max_new_tokens"])
    # without a shared start every run begins at the initial student, whose step-0 value is then measured once
    start_key = None if suite.get("start") else (suite["initial_student"], settings["dataset_name"])
    return ValidationCurve(FixedAnswersTV(suite["teacher"], prompts, answers), suite["curve_every"], start_key)
