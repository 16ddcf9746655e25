"""amm-trl: Adversarial Moment-Matching distillation (and the usual KD baselines) as a TRL trainer."""

__version__ = "0.1.0"

from .config import AMMConfig  # noqa: E402

__all__ = ["AMMConfig", "AMMTrainer"]


def __getattr__(name):
    # The trainer pulls in TRL's trainer stack; import it on first use so `amm_trl.config`/`objectives` stay light.
    if name == "AMMTrainer":
        from .trainer import AMMTrainer

        return AMMTrainer
    raise AttributeError(name)
