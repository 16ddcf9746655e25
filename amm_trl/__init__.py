"""amm-trl: Adversarial Moment-Matching distillation (and the usual KD baselines) as a TRL trainer."""

__version__ = "0.1.0"

__all__ = ["AMMConfig", "AMMTrainer"]


def __getattr__(name):
    # Imported on first use: the config pulls in TRL and the trainer TRL's trainer stack, while `amm_trl.checkpoints`
    # (run by the slurm templates before every job) and `amm_trl.objectives` need neither.
    if name == "AMMConfig":
        from .config import AMMConfig

        return AMMConfig
    if name == "AMMTrainer":
        from .trainer import AMMTrainer

        return AMMTrainer
    raise AttributeError(name)
