"""Reward-guided KD (our reading of Jia, arXiv 2505.18952): AMM's moment gap with one token-level reward head q, which
is also fit by a Bradley-Terry loss on pairs (off-policy completion preferred over the student rollout of the same
prompt), the confidence set written as a penalty."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .amm import AMM, critic_values
from .base import LossContext, Part, Tokens, _as, _compute_dtype

__all__ = ["bradley_terry_loss"]


def bradley_terry_loss(reward_chosen: Tensor, reward_rejected: Tensor) -> Tensor:
    r"""Bradley-Terry preference loss per pair (PbKD reward model: teacher response preferred).

    .. math:: \ell = -\log \sigma(r_c - r_r)
    """
    if reward_chosen.shape != reward_rejected.shape:
        raise ValueError(
            f"reward_chosen {tuple(reward_chosen.shape)} and reward_rejected {tuple(reward_rejected.shape)} "
            "must have the same shape"
        )
    dtype = _compute_dtype(reward_chosen, reward_rejected)
    return -F.logsigmoid(_as(reward_chosen, dtype) - _as(reward_rejected, dtype))


class PbKD(AMM):
    name = "pbkd"
    description = ("Reward-guided KD (our reading of Jia, arXiv 2505.18952): a token-level reward head q (the AMM "
                   "Q-head) fit by a Bradley-Terry loss (weight `pbkd_bt_weight`) on pairs off-policy completion > "
                   "student rollout, and pushed to maximize the moment gap <p_T - p_S, q>; the student minimizes that "
                   "gap (maximizes E_{p_S} q).")
    own_fields = ()
    shared_head = True  # one reward head scores both data kinds

    @property
    def uses_rollouts(self) -> bool:
        return True

    @property
    def uses_off_policy(self) -> bool:
        return True

    def loss_name(self, kind: str) -> str:
        return "pbkd_gap"

    def validate(self, fail) -> None:
        super().validate(fail)
        if self.args.q_prior_alpha and self.args.q_bound is not None:
            fail("q_prior_alpha", self.args.q_prior_alpha, "with a bounded critic (q_bound set) objective 'pbkd' "
                 "cannot fit the reward head by its Bradley-Terry pass, which scores the head without the prior: "
                 "use q_prior_alpha 0, or the unbounded critic (q_bound null), where the prior does not change the "
                 "head's gradient.")

    def metric_names(self, kind: str) -> list[str]:
        names = super().metric_names(kind)
        return names[:1] + ["reward"] + names[1:]

    def token_loss(self, tokens: Tokens, kind: str):
        values, extra = super().token_loss(tokens, kind)
        q = self.q_values(tokens, kind).detach()  # token reward r(s_t, y_t) = q(s_t)[y_t] of the taken action
        reward = q.gather(-1, tokens.target_ids[:, None]).squeeze(-1)
        return values, extra[:1] + [reward] + extra[1:]  # columns in `metric_names` order

    def extra_loss(self, parts: dict[str, Part], ctx: LossContext) -> Tensor | None:
        """`pbkd_bt_weight` * BT(J(off-policy completion) > J(rollout)), J(y) = sum_t q(s_t)[y_t].

        BT is a function of whole-sequence sums, so it is linearized: its value comes from the rewards the per-token
        pass already computed (column `reward`), its gradient from a second chunked pass over sum_t g_i q(s_t)[y_t]
        with g_i = dBT/dJ_i (detached). The head gets exactly grad BT; the student none (features are detached)."""
        if set(parts) != {"on", "off"} or not self.args.pbkd_bt_weight > 0:
            return None
        totals = {}
        for kind, part in parts.items():
            rewards = torch.zeros(part.valid.shape, device=part.metrics.device, dtype=torch.float32)
            rewards[part.valid] = part.column("reward").float()
            totals[kind] = rewards.sum(1)
        chosen, rejected = totals["off"], totals["on"]
        bt = bradley_terry_loss(chosen, rejected)
        scale = self.args.pbkd_bt_weight / ctx.pairs_per_step
        g = torch.sigmoid(rejected - chosen) * scale  # dBT/dJ(rejected) = -dBT/dJ(chosen)
        surrogate = sum(self._reward_surrogate(part, g if kind == "on" else -g, ctx) for kind, part in parts.items())
        for name, total, count in (("bt_loss", bt.sum(), bt.numel()), ("reward_chosen", chosen.sum(), chosen.numel()),
                                   ("reward_rejected", rejected.sum(), rejected.numel()),
                                   ("bt_accuracy", (chosen > rejected).float().sum(), chosen.numel())):
            ctx.add_metric(f"pbkd/{name}", total, count)
        return (bt.sum() * scale).detach() + surrogate - surrogate.detach()

    def _reward_surrogate(self, part: Part, row_weights: Tensor, ctx: LossContext) -> Tensor:
        """sum over the part's tokens of row_weight * q(s_t)[y_t], through the chunked runner (gradient: head only)."""
        valid = part.valid
        hidden = part.student_hidden if self.args.q_head_features == "student" else part.teacher_hidden
        head, vocab = self.heads.head(part.kind), ctx.projection.vocab

        def fn(f, y, *p):
            # The prior is a constant per token: with an unbounded critic dq/dg = 1 with or without it (`validate`)
            q = critic_values(head.scores(f, list(p[1:]), p[0][:vocab]), self.args.q_bound)
            values = q.gather(-1, y[:, None]).squeeze(-1)
            return values, values.detach()[:, None]

        weights = row_weights[:, None].expand(valid.shape)[valid]
        params = [ctx.projection.student[0]] + list(head.parameters())
        surrogate, _ = ctx.run([hidden.detach()[valid], part.completion_ids[valid]], weights, fn, params)
        return surrogate
