"""DistiLLM's adaptive off-policy schedule: a replay buffer of past student rollouts and the adaptive threshold.

Pure Python (no trainer imports) so the pieces are testable alone; `AMMTrainer` owns one `DistillmState` per process
and saves it in each checkpoint (`distillm_state_rank<i>.pt`).

Schedule (Ko et al., ICML 2024, our reading of jongwooko/distillm): at optimizer step t of T, with probability
`threshold * (1 - t / T)` the step trains on fresh student rollouts (which are pushed into the buffer); otherwise on a
batch sampled uniformly from the buffer when it holds at least one batch, else on the off-policy completions.
After each evaluation the threshold rises by `step` (capped at 1) when the eval loss improved by less than `eps`
relative to the previous evaluation.
"""

from __future__ import annotations

import random
from collections import deque


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

    def __init__(self, capacity: int, threshold: float):
        self.buffer = ReplayBuffer(capacity)
        self.threshold = float(threshold)
        self.previous_eval_loss: float | None = None

    def update_on_eval(self, loss: float, eps: float, step: float) -> float:
        self.threshold = next_threshold(self.threshold, self.previous_eval_loss, loss, eps, step)
        self.previous_eval_loss = float(loss)
        return self.threshold

    def state_dict(self) -> dict:
        return {"buffer": self.buffer.state_dict(), "threshold": self.threshold,
                "previous_eval_loss": self.previous_eval_loss}

    def load_state_dict(self, state: dict) -> None:
        self.buffer.load_state_dict(state["buffer"])
        self.threshold = float(state["threshold"])
        self.previous_eval_loss = state["previous_eval_loss"]
