"""The distillation objectives, one `Objective` subclass each, and their pure loss functions.

Each module of this package lists the objectives it defines in `OBJECTIVES`; they are registered here under their
`name` (the values `AMMConfig.objective` accepts). Adding an objective is adding one module. The pure tensor functions
of the objectives below are exported by name; a newer module's (e.g. `distillm2.distillm2_token_loss`) are imported
from it.
"""

import importlib
import pkgutil

from .amm import amm_adversarial_gap, amm_moment_gap, critic_values, informed_prior
from .base import Objective
from .distillm import DistillmState, ReplayBuffer, next_threshold, student_probability
from .divergences import forward_kl, generalized_jsd, reverse_kl, skew_forward_kl, skew_reverse_kl
from .functional import (VLLM_IS_MODES, cross_entropy, length_normalize, reward_to_go, token_log_probs,
                         total_variation, vllm_importance_weights)
from .minillm import TeacherMixProcessor, ppo_clipped_loss, teacher_mix_weights, whiten
from .pbkd import bradley_terry_loss

OBJECTIVES: dict[str, type[Objective]] = {}
for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    for _cls in getattr(importlib.import_module(f"{__name__}.{_info.name}"), "OBJECTIVES", []):
        if _cls.name in OBJECTIVES:
            raise ValueError(f"objective {_cls.name!r} is defined twice ({OBJECTIVES[_cls.name]} and {_cls})")
        OBJECTIVES[_cls.name] = _cls

__all__ = ["OBJECTIVES", "Objective", "get_objective", "amm_adversarial_gap", "amm_moment_gap", "critic_values",
           "informed_prior", "DistillmState", "ReplayBuffer", "next_threshold", "student_probability", "forward_kl",
           "generalized_jsd", "reverse_kl", "skew_forward_kl", "skew_reverse_kl", "VLLM_IS_MODES", "cross_entropy",
           "length_normalize", "reward_to_go", "token_log_probs", "total_variation", "vllm_importance_weights",
           "TeacherMixProcessor", "ppo_clipped_loss", "teacher_mix_weights", "whiten", "bradley_terry_loss"]


def get_objective(args) -> Objective:
    """The objective `args.objective` names, reading its settings from `args` (an `AMMConfig`)."""
    return OBJECTIVES[args.objective](args)
