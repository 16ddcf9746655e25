"""Reward-guided KD (our reading of Jia, arXiv 2505.18952): AMM's moment gap with one token-level reward head q, which
is also fit by a Bradley-Terry loss on pairs (off-policy completion preferred over the student rollout of the same
prompt), the confidence set written as a penalty."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..qhead import head_features
from .amm import AMM, critic_values
from .base import Data, Info, LossContext, Metrics, Part, Tokens, invalid
from .functional import as_dtype, compute_dtype

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
    dtype = compute_dtype(reward_chosen, reward_rejected)
    return -F.logsigmoid(as_dtype(reward_chosen, dtype) - as_dtype(reward_rejected, dtype))


class PbKD(AMM):
    name = "pbkd"
    info = Info("Reward-guided KD (our reading of Jia, arXiv 2505.18952): a token-level reward head q (the AMM "
                "Q-head) fit by a Bradley-Terry loss (weight `pbkd_bt_weight`) on pairs off-policy completion > "
                "student rollout, and pushed to maximize the moment gap <p_T - p_S, q>; the student minimizes that "
                "gap (maximizes E_{p_S} q).", paper={"title": "Online Knowledge Distillation with Reward Guidance",
                                                    "id": "2505.18952"}, off_policy_default="teacher")
    shared_head = True  # one reward head scores both data kinds
    gap_name = "pbkd_gap"
    data = Data(rollouts=True, off_policy=True)

    def __init__(self, args):
        super().__init__(args)
        if args.q_prior_alpha and args.q_bound is not None:
            raise invalid("q_prior_alpha", args.q_prior_alpha, "with a bounded critic (q_bound set) objective 'pbkd' "
                          "cannot fit the reward head by its Bradley-Terry pass, which scores the head without the "
                          "prior: use q_prior_alpha 0, or the unbounded critic (q_bound null), where the prior does "
                          "not change the head's gradient.")

    def gap(self, kind: str, tokens: Tokens) -> tuple[Tensor, dict[str, Tensor]]:
        values, metrics = super().gap(kind, tokens)
        reward = self.adversary.taken_values(kind, tokens).detach()  # r(s_t, y_t) = q(s_t)[y_t], the taken action's
        return values, {**metrics, "reward": reward}

    def sequence_loss(self, parts: dict[str, Part], ctx: LossContext) -> tuple[Tensor, Metrics] | None:
        """`pbkd_bt_weight` * BT(J(off-policy completion) > J(rollout)), J(y) = sum_t q(s_t)[y_t].

        BT is a function of whole-sequence sums, so it is linearized: its value comes from the rewards the per-token
        pass already computed (column `reward`), its gradient from a second chunked pass over sum_t g_i q(s_t)[y_t]
        with g_i = dBT/dJ_i (detached). The head gets exactly grad BT; the student none (features are detached)."""
        if set(parts) != {"on", "off"} or not self.args.pbkd_bt_weight > 0:
            return None
        totals = {}
        for kind, part in parts.items():
            rewards = torch.zeros(part.valid.shape, device=part.valid.device, dtype=torch.float32)
            rewards[part.valid] = part.metrics["reward"].float()
            totals[kind] = rewards.sum(1)
        chosen, rejected = totals["off"], totals["on"]
        bt = bradley_terry_loss(chosen, rejected)
        scale = self.args.pbkd_bt_weight / ctx.pairs_per_step
        g = torch.sigmoid(rejected - chosen) * scale  # dBT/dJ(rejected) = -dBT/dJ(chosen)
        row_weights = {"on": g, "off": -g}  # the rollout is the rejected answer, the off-policy one the chosen
        surrogate = sum(self._reward_surrogate(parts[kind], w, ctx) for kind, w in row_weights.items())
        metrics = {"pbkd/bt_loss": (bt.sum(), bt.numel()), "pbkd/reward_chosen": (chosen.sum(), chosen.numel()),
                   "pbkd/reward_rejected": (rejected.sum(), rejected.numel()),
                   "pbkd/bt_accuracy": ((chosen > rejected).float().sum(), chosen.numel())}
        return (bt.sum() * scale).detach() + surrogate - surrogate.detach(), metrics

    def _reward_surrogate(self, part: Part, row_weights: Tensor, ctx: LossContext) -> Tensor:
        """sum over the part's tokens of row_weight * q(s_t)[y_t], through the chunked engine (gradient: head only)."""
        valid = part.valid
        hidden = head_features(self.args.q_head_features, part.student_hidden, part.teacher_hidden)
        head, projection = self.adversary.heads.head(part.kind), ctx.projection

        def fn(chunk, params):
            # The prior is a constant per token: with an unbounded critic dq/dg = 1 with or without it (`__init__`)
            head_params = {name[len("head."):]: p for name, p in params.items() if name.startswith("head.")}
            scores = head.scores(chunk["features"], head_params, projection.embedding(params))
            values = critic_values(scores, self.args.q_bound).gather(-1, chunk["target_ids"][:, None]).squeeze(-1)
            return values, {}

        weights = row_weights[:, None].expand(valid.shape)[valid]
        params = {**projection.student, **{f"head.{n}": p for n, p in head.named_parameters()}}
        token_inputs = {"features": hidden[valid], "target_ids": part.completion_ids[valid]}
        surrogate, _ = ctx.chunked(token_inputs, weights, fn, params)
        return surrogate


OBJECTIVES = [PbKD]
