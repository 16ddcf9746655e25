"""MiniLLM (Gu et al., ICLR 2024): sequence-level reverse KL by policy gradient on student rollouts, plus the exact
single-step reverse KL, plus a mixed LM / KD loss on the off-policy completions; rollouts sampled from the
teacher-student mixture with importance weights.

Our reading of the method: returns G_t = sum_{k>t} gamma^(k-t-1) r_k, r_k = log p_T(y_k) - log p_S(y_k) (computed once,
at rollout time, with the rollout-time student), divided by the number of future tokens and whitened; PPO clipping
against the rollout policy; `ppo_epochs` optimizer steps per rollout batch.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from transformers import LogitsProcessor

from .base import Data, Info, Metrics, Objective, Term, Tokens, invalid
from .batch import Batch, Plan, Step
from .divergences import forward_kl, reverse_kl
from .functional import (as_dtype, check_seq, check_unit, compute_dtype, cross_entropy, length_normalize, log_mixture,
                         reward_to_go, token_log_probs)

__all__ = ["whiten", "ppo_clipped_loss", "teacher_mix_weights", "TeacherMixProcessor"]


def whiten(values: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    r"""Masked whitening (mean / std over the valid entries of the whole tensor), as TRL's ``masked_whiten``.

    .. math:: \hat v = (v - \mu) / \sqrt{\sigma^2 + \epsilon} \; (+\mu \text{ if not shift\_mean})

    mu and sigma^2 (unbiased, Bessel-corrected) are taken over entries with mask = 1; masked entries return 0.
    """
    check_seq("values", values, mask)
    dtype = compute_dtype(values)
    m = as_dtype(mask, dtype)
    v = as_dtype(values, dtype)
    n = m.sum()
    if n.item() < 1:
        raise ValueError("whiten needs at least one valid (mask = 1) entry")
    mean = (v * m).sum() / n
    centered = (v - mean) * m
    var = (centered**2).sum() / (n - 1).clamp(min=1.0)
    out = (v - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m


def ppo_clipped_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, clip_eps: float = 0.2
) -> tuple[Tensor, Tensor]:
    r"""PPO clipped surrogate, per token (to be masked and reduced by the caller).

    .. math::
        \rho = \exp(\log\pi - \log\pi_{old}), \qquad
        \ell = -\min(\rho A, \operatorname{clip}(\rho, 1-\epsilon, 1+\epsilon) A)

    Returns ``(loss, clipped)``; ``clipped`` is a bool tensor, True where the clipped branch is selected and
    differs from the unclipped one (so the token gets no gradient).
    """
    if not clip_eps > 0:
        raise ValueError(f"clip_eps must be > 0, got {clip_eps}")
    if not (logp.shape == old_logp.shape == advantages.shape):
        raise ValueError(
            f"logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)} and advantages "
            f"{tuple(advantages.shape)} must have the same shape"
        )
    dtype = compute_dtype(logp, old_logp, advantages)
    ratio = torch.exp(as_dtype(logp, dtype) - as_dtype(old_logp, dtype))
    adv = as_dtype(advantages, dtype)
    unclipped = -ratio * adv
    clipped_loss = -ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * adv
    return torch.maximum(unclipped, clipped_loss), clipped_loss > unclipped


def teacher_mix_weights(student_token_logp: Tensor, teacher_token_logp: Tensor, mix: float = 0.2) -> Tensor:
    r"""Importance weight of tokens sampled from the teacher-student mixture (MiniLLM), in log space.

    .. math:: w = \frac{p_S(y)}{\lambda p_T(y) + (1-\lambda) p_S(y)}, \quad \lambda = \text{mix}

    Takes per-token log-probs of the sampled tokens. Gradients flow through the inputs; detach them if the
    weight is meant as a constant (as in MiniLLM).
    """
    check_unit("mix", mix)
    if student_token_logp.shape != teacher_token_logp.shape:
        raise ValueError(
            f"student_token_logp {tuple(student_token_logp.shape)} and teacher_token_logp "
            f"{tuple(teacher_token_logp.shape)} must have the same shape"
        )
    dtype = compute_dtype(student_token_logp, teacher_token_logp)
    ls = as_dtype(student_token_logp, dtype)
    lt = as_dtype(teacher_token_logp, dtype)
    return torch.exp(ls - log_mixture(lt, ls, float(mix)))


class TeacherMixProcessor(LogitsProcessor):
    """MiniLLM's teacher-mixed sampling inside HF `generate`: replaces the student's next-token scores by
    temperature * log(mix * p_T + (1 - mix) * p_S), p = softmax(logits / temperature), so that `generate`'s own
    temperature warper (which runs after custom processors) samples from the mixture. The teacher runs one token at a
    time with its KV cache; positions follow the left-padded prompt mask. Tokens the earlier processors suppressed
    (score -inf) stay suppressed. Vocabulary entries beyond the shared `vocab` are -inf."""

    def __init__(self, teacher, mix: float, temperature: float, vocab: int, prompt_mask: torch.Tensor):
        self.teacher, self.mix, self.temperature, self.vocab = teacher, mix, temperature, vocab
        self.mask, self.past = prompt_mask, None

    @torch.no_grad()
    def __call__(self, input_ids, scores):
        if self.past is None:
            ids, mask = input_ids, self.mask
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
        else:
            ids = input_ids[:, -1:]
            mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
            positions = mask.sum(-1, keepdim=True) - 1
        self.mask = mask
        out = self.teacher(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=self.past,
                           use_cache=True, logits_to_keep=1)
        self.past = out.past_key_values
        v = self.vocab
        log_p_t = torch.log_softmax(out.logits[:, -1, :v].float() / self.temperature, -1)
        student = scores[:, :v].float()
        log_p_s = torch.log_softmax(student / self.temperature, -1)
        log_mix = torch.logaddexp(log_p_t + math.log(self.mix), log_p_s + math.log1p(-self.mix))
        log_mix = torch.where(torch.isneginf(student), torch.full_like(log_mix, -math.inf), log_mix)
        mixed = torch.full_like(scores, -math.inf)
        mixed[:, :v] = (log_mix * self.temperature).to(scores.dtype)
        return mixed


ROLLOUT_KEYS = ("minillm_advantages", "minillm_old_logp", "minillm_is_weight")  # added to the batch at rollout time


class MiniLLM(Objective):
    name = "minillm"
    info = Info("MiniLLM (Gu et al., ICLR 2024): sequence-level reverse KL by policy gradient on student rollouts "
                "(discounted, length-normalized, whitened returns of log p_T - log p_S; PPO clipping `ppo_clip`, "
                "`ppo_epochs` optimizer steps per rollout batch) + the exact single-step reverse KL + a "
                "(1 - `minillm_kd_ratio`) CE + `minillm_kd_ratio` forward-KL loss on the off-policy completions; "
                "rollouts sampled from the teacher-student mixture `minillm_teacher_mix` * p_T + (1 - mix) * p_S "
                "with importance weights p_S / mix.",
                paper={"title": "MiniLLM: Knowledge Distillation of Large Language Models", "id": "2306.08543"},
                own_fields=("ppo_epochs",))

    def __init__(self, args):
        super().__init__(args)
        if args.minillm_teacher_mix > 0 and args.use_vllm:
            raise invalid("minillm_teacher_mix", args.minillm_teacher_mix, "teacher-mixed sampling runs the teacher "
                          "inside HF `generate`; with use_vllm set it to 0 (rollouts from the student alone).")
        if args.minillm_teacher_mix > 0 and args.teacher_placement != "local":
            raise invalid("minillm_teacher_mix", args.minillm_teacher_mix, "teacher-mixed sampling needs the "
                          "teacher's full next-token distribution at every sampled token, inside `generate`; a served "
                          "or cached teacher gives top-k log-probs of finished sequences: set it to 0, or "
                          "teacher_placement 'local'.")

    @property
    def data(self) -> Data:
        return Data(rollouts=True, off_policy=True, reuse=self.args.ppo_epochs,
                    scores=("logp_student", "logp_teacher"))

    def plan(self, n: int, step: Step) -> Plan:
        mix = self.args.minillm_teacher_mix

        def sampler(teacher, vocab, temperature, attention_mask):
            return TeacherMixProcessor(teacher, mix, temperature, vocab, attention_mask)

        return Plan(rollouts=True, off_policy=True, sampler=sampler if mix > 0 else None)

    @torch.no_grad()
    def on_rollouts(self, batch: Batch, scores: dict[str, Tensor], step: Step) -> Metrics:
        """At rollout time: the rollout policy's token log-probs (PPO's old log-probs) and the advantages.

        r_t = log p_T(y_t|s_t) - log p_S(y_t|s_t); A = whiten(length_normalize(G)), G_t = sum_{k>t} gamma^(k-t-1) r_k
        (the current token's reward is covered exactly by the single-step reverse KL term), whitened over this
        process's generation batch."""
        old_logp, teacher_logp = scores["logp_student"], scores["logp_teacher"]
        mask = batch["completion_mask"].float()
        is_weight, behaviour_logp = mask.clone(), old_logp
        mix = self.args.minillm_teacher_mix
        if mix > 0 and not self.args.use_vllm:
            # sampled from mix * p_T + (1 - mix) * p_S: PPO's old policy is the mixture; weight w = p_S / mixture
            behaviour_logp = torch.logaddexp(teacher_logp + math.log(mix), old_logp + math.log1p(-mix)) * mask
            is_weight = teacher_mix_weights(old_logp, teacher_logp, mix) * mask
        rewards = (teacher_logp - old_logp) * mask
        returns = reward_to_go(rewards, mask, gamma=self.args.minillm_gamma, include_current=False)
        returns = length_normalize(returns, mask, include_current=False)
        advantages = whiten(returns, mask) if mask.sum() > 1 else returns
        batch.update(minillm_old_logp=behaviour_logp, minillm_advantages=advantages, minillm_is_weight=is_weight)
        n = mask.sum()
        return {"minillm/reward": (rewards.sum(), n), "minillm/return": (returns.sum(), n),
                "minillm/is_weight": (is_weight.sum(), n)}

    def terms(self) -> dict[str, list[Term]]:
        return {"on": [Term(self.rollout_loss, "minillm", inputs=ROLLOUT_KEYS)],
                "off": [Term(self.reference_loss, "minillm_kd")]}

    def reference_loss(self, tokens: Tokens) -> tuple[Tensor, dict[str, Tensor]]:
        """MiniLLM's mixed LM / KD loss on the off-policy completions."""
        ratio = self.args.minillm_kd_ratio
        ce = cross_entropy(tokens.student_logits, tokens.target_ids)
        return (1.0 - ratio) * ce + ratio * forward_kl(*tokens.pair()), {}

    def rollout_loss(self, tokens: Tokens) -> tuple[Tensor, dict[str, Tensor]]:
        """The exact single-step reverse KL + the PPO-clipped policy gradient of the future return (with
        teacher-mixed sampling: old_logp is the mixture's, the single-step term weighted by p_S / mix)."""
        advantages, old_logp, is_weight = (tokens.inputs[key] for key in ROLLOUT_KEYS)
        logp = token_log_probs(tokens.student_logits, tokens.target_ids)
        pg, clipped = ppo_clipped_loss(logp, old_logp, advantages, self.args.ppo_clip)
        rkl = reverse_kl(*tokens.pair())
        return is_weight * rkl + pg, {"minillm_rkl": rkl, "minillm_pg": pg, "ppo_ratio": torch.exp(logp - old_logp),
                                      "ppo_clipped": clipped.float()}


OBJECTIVES = [MiniLLM]
