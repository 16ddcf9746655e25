"""DistiLLM (Ko et al., ICML 2024): skew KL or skew reverse KL, with an adaptive off-policy schedule fed by a replay
buffer of past student rollouts.

Schedule (our reading of jongwooko/distillm): at optimizer step t of T, with probability `threshold * (1 - t / T)`
the step trains on fresh student rollouts (which are pushed into the buffer); otherwise on a batch sampled uniformly
from the buffer when it holds at least one batch, else on the off-policy completions. After each evaluation the
threshold rises by `step` (capped at 1) when the eval loss improved by less than `eps` relative to the previous
evaluation. The buffer and the threshold are saved per process in each checkpoint (`distillm_state_rank<i>.pt`).
"""

from __future__ import annotations

import random
from collections import deque

from torch import Tensor

from .base import Data, Info, Metrics, Objective, Term
from .batch import Batch, Plan, Step
from .divergences import skew_forward_kl, skew_reverse_kl
from .functional import step_draw

__all__ = ["ReplayBuffer", "DistillmState", "next_threshold", "student_probability"]


class ReplayBuffer:
    """First-in first-out buffer of (prompt token ids, completion token ids) pairs, capacity `capacity`."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.items: deque[tuple[list[int], list[int]]] = deque(maxlen=capacity)

    def __len__(self) -> int:
        return len(self.items)

    def push(self, prompt_ids: list[int], completion_ids: list[int]) -> None:
        self.items.append((list(prompt_ids), list(completion_ids)))

    def sample(self, n: int, rng: random.Random) -> list[tuple[list[int], list[int]]]:
        """`n` items drawn uniformly without replacement (needs `len(self) >= n`)."""
        if n > len(self.items):
            raise ValueError(f"cannot sample {n} items from a buffer of {len(self.items)}")
        return [self.items[i] for i in rng.sample(range(len(self.items)), n)]

    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "items": [list(map(list, item)) for item in self.items]}

    def load_state_dict(self, state: dict) -> None:
        self.items = deque((tuple(item) for item in state["items"]), maxlen=self.capacity)


def next_threshold(threshold: float, previous_loss: float | None, loss: float, eps: float, step: float) -> float:
    """The threshold after an evaluation: + `step` (capped at 1) if the loss did not improve by `eps` relative."""
    if previous_loss is None:
        return threshold
    if previous_loss - loss < eps * abs(previous_loss):
        return min(1.0, threshold + step)
    return threshold


def student_probability(threshold: float, step: int, total_steps: int) -> float:
    """Probability of training on fresh student rollouts at `step`: threshold * (1 - step / total)."""
    if total_steps <= 0:
        return threshold
    return threshold * max(0.0, 1.0 - step / total_steps)


class DistillmState:
    """Everything of the schedule that must survive a checkpoint: buffer, threshold, last eval loss."""

    title, contents = "DistiLLM", "replay buffer and threshold"

    def __init__(self, capacity: int, threshold: float, eps: float = 0.1, step: float = 0.1):
        self.buffer = ReplayBuffer(capacity)
        self.threshold = float(threshold)
        self.previous_eval_loss: float | None = None
        self.eps, self.step = eps, step

    def update_on_eval(self, loss: float, eps: float, step: float) -> float:
        self.threshold = next_threshold(self.threshold, self.previous_eval_loss, loss, eps, step)
        self.previous_eval_loss = float(loss)
        return self.threshold

    def on_evaluate(self, loss: float, prefix: str) -> dict[str, float]:
        """Each evaluation's loss (the skew divergence on the eval off-policy completions, gathered over ranks, so
        every rank updates alike) drives the adaptive threshold."""
        return {f"{prefix}_distillm_threshold": self.update_on_eval(loss, self.eps, self.step)}

    def state_dict(self) -> dict:
        return {"buffer": self.buffer.state_dict(), "threshold": self.threshold,
                "previous_eval_loss": self.previous_eval_loss}

    def load_state_dict(self, state: dict) -> None:
        self.buffer.load_state_dict(state["buffer"])
        self.threshold = float(state["threshold"])
        self.previous_eval_loss = state["previous_eval_loss"]


class DistiLLM(Objective):
    name = "distillm"
    info = Info("DistiLLM (Ko et al., ICML 2024): skew KL (`distillm_loss: skl`) or skew reverse KL (`srkl`) with "
                "`skew_alpha`, on student rollouts with probability threshold * (1 - step/max_steps), otherwise on a "
                "replay buffer of past rollouts (`replay_buffer_size`) or the off-policy completions; the threshold "
                "rises by 0.1 when the eval loss stops improving (fixed without an eval set).",
                paper={"title": "DistiLLM: Towards Streamlined Distillation for Large Language Models",
                       "id": "2402.03898"})

    def __init__(self, args):
        super().__init__(args)
        self.state = DistillmState(args.replay_buffer_size, args.distillm_init_threshold, args.distillm_loss_eps,
                                   args.distillm_threshold_step)

    @property
    def data(self) -> Data:
        return Data(rollouts=self.args.distillm_init_threshold > 0.0 or self.args.eval_strategy != "no",
                    off_policy=True)

    def student_probability(self, step: Step) -> float:
        return student_probability(self.state.threshold, step.step, step.max_steps)

    def plan(self, n: int, step: Step) -> Plan:
        if not step.training:  # the eval loss (which drives the threshold) is on the off-policy data
            return Plan(rollouts=False, off_policy=True)
        on = step_draw(self.args.seed, step.step) < self.student_probability(step)
        replay = None
        # Not on student rollouts this step: past rollouts from the replay buffer once it holds a batch (the buffers
        # of all ranks grow alike, so all ranks take the same branch), else the off-policy completions.
        if not on and len(self.state.buffer) >= n:
            replay = self.state.buffer.sample(n, random.Random(f"{self.args.seed}-{step.step}-{step.rank}"))
        metrics = {"distillm/threshold": self.state.threshold,
                   "distillm/student_probability": self.student_probability(step),
                   "distillm/replay_size": float(len(self.state.buffer)),
                   "distillm/source": 2.0 if on else 1.0 if replay is not None else 0.0}  # 2 student 1 replay 0 ref
        return Plan(rollouts=on, off_policy=not on, replay=replay, metrics=metrics)

    def on_rollouts(self, batch: Batch, scores: dict[str, Tensor], step: Step) -> Metrics:
        """This step's student rollouts (unpadded prompt and completion ids) go into the replay buffer."""
        if step.training:
            rows = zip(batch["prompt_ids"].tolist(), batch["prompt_mask"].tolist(), batch["completion_ids"].tolist(),
                       batch["completion_mask"].tolist())
            for p_ids, p_mask, c_ids, c_mask in rows:
                self.state.buffer.push([t for t, m in zip(p_ids, p_mask) if m],
                                       [t for t, m in zip(c_ids, c_mask) if m])
        return {}

    def terms(self) -> dict[str, list[Term]]:
        divergence = skew_forward_kl if self.args.distillm_loss == "skl" else skew_reverse_kl
        term = Term(lambda t: (divergence(*t.pair(), self.args.skew_alpha), {}), self.name)
        return {"on": [term], "off": [term]}


OBJECTIVES = [DistiLLM]
