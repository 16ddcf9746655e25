"""`AMMConfig`: TRL's `DistillationConfig` plus the fields of adversarial moment matching and the baselines."""

from dataclasses import dataclass, field

from trl import DistillationConfig

# objective -> (uses student rollouts, uses off-policy completions). "mix" = per step, with probability `lmbda`
# the batch is student rollouts, otherwise off-policy completions (GKD / ImitKD data schedule).
OBJECTIVES = {
    "amm": "Adversarial moment matching: on- and off-policy Q-head distances mixed by `amm_beta` (Jia, NeurIPS 2024).",
    "jsd": "TRL's own on-policy generalized JSD(`beta`) loss, unchanged (the reference trainer's objective).",
    "sft": "Cross-entropy on the off-policy completions (dataset references).",
    "seqkd": "Sequence-level KD: cross-entropy on teacher-generated completions (`off_policy_source: teacher`, or a "
    "dataset written by `amm-trl generate`).",
    "fkl": "Word-level KD: forward KL(p_T || p_S) on the off-policy completions.",
    "rkl": "Reverse KL(p_S || p_T) on student rollouts.",
    "tvd": "Total variation 0.5*sum|p_T - p_S| on student rollouts.",
    "gkd": "Generalized JSD(`beta`) on student rollouts with probability `lmbda`, else on off-policy completions.",
    "imitkd": "Forward KL on student rollouts with probability `lmbda`, else on off-policy completions.",
}
OFF_POLICY_SOURCES = ("dataset", "teacher", "none")
Q_HEAD_TYPES = ("linear", "low_rank")
Q_HEAD_FEATURES = ("student", "teacher")
PG_BASELINES = ("mean", "none")


@dataclass
class AMMConfig(DistillationConfig):
    r"""
    Configuration for [`AMMTrainer`]: every field of `trl.DistillationConfig` (rollouts, vLLM, teacher loading,
    `beta` of the generalized JSD, ...) plus the fields below.

    Parameters:
        > Objective

        objective (`str`, *optional*, defaults to `"amm"`):
            Distillation method; one of `amm_trl.config.OBJECTIVES`. Every method runs in the same trainer on the same
            rollout engine, so methods compare on identical data and models.
        lmbda (`float`, *optional*, defaults to `0.5`):
            Student-data fraction for the mixing objectives (`gkd`, `imitkd`): each optimizer step's batch is student
            rollouts with probability `lmbda`, otherwise off-policy completions. AMM always uses both kinds, weighted
            by `amm_beta`.

        > Adversarial moment matching

        amm_beta (`float`, *optional*, defaults to `0.5`):
            Weight of the off-policy distance; `1 - amm_beta` weighs the on-policy one (the paper's off-/on-policy
            combination factor). `0` = on-policy only (needs no off-policy data), `1` = off-policy only.
        q_bound (`float`, *optional*, defaults to `1.0`):
            Bound c of the Q-head, f = c * tanh(.). With the optimal head each distance is 2c * TV(p_T, p_S).
        q_head_lr_multiplier (`float`, *optional*, defaults to `10.0`):
            The Q-heads' learning rate is `learning_rate * q_head_lr_multiplier` (own optimizer parameter group, no
            weight decay, same schedule).
        q_head_shared (`bool`, *optional*, defaults to `False`):
            One head for both distances instead of separate on-policy and off-policy heads.
        q_head_type (`str`, *optional*, defaults to `"linear"`):
            `"linear"`: f = c*tanh(W h + b) with W of shape (vocab, hidden), zero-initialized (distances start at 0).
            `"low_rank"`: f = c*tanh(E g(h)), E the detached student output embedding and g a two-layer MLP
            (hidden^2 parameters instead of hidden*vocab).
        q_head_features (`str`, *optional*, defaults to `"student"`):
            Features the head reads, detached: the student's (`"student"`) or the teacher's (`"teacher"`) last hidden
            state.
        amm_policy_gradient (`bool`, *optional*, defaults to `False`):
            Add the score-function term of the on-policy gradient: sum_t grad log p_S(y_t|s_t) * A_t with
            A_t = sum_{t'>t} <p_T - p_S, f>(s_t') (the moment gap of the future states), minus a baseline.
        pg_baseline (`str`, *optional*, defaults to `"mean"`):
            Baseline subtracted from A_t: `"mean"` (batch mean over response tokens) or `"none"`.
        pg_length_normalization (`bool`, *optional*, defaults to `True`):
            Divide A_t by the number of remaining response tokens (as MiniLLM does).
        pg_clip (`float` or `None`, *optional*, defaults to `None`):
            Clip A_t to [-pg_clip, pg_clip].

        > Off-policy data

        off_policy_source (`str`, *optional*, defaults to `"dataset"`):
            Where off-policy completions come from: `"dataset"` (column `off_policy_column`: reference answers, or
            teacher generations cached with `amm-trl generate`), `"teacher"` (generated online by the teacher with
            `generate`, each step) or `"none"`.
        off_policy_column (`str`, *optional*, defaults to `"completion"`):
            Dataset column holding the off-policy completion: text for standard prompts, or a list of assistant
            messages for conversational prompts.

        > Memory

        loss_chunk_tokens (`int` or `None`, *optional*, defaults to `None`):
            Tokens projected to the vocabulary at once in the loss (logits are never materialized for the whole
            batch; each chunk is recomputed in the backward). `None` picks about 2^25 / vocab_size tokens.
    """

    objective: str = field(default="amm", metadata={"help": "Distillation method.", "choices": list(OBJECTIVES)})
    lmbda: float = field(default=0.5, metadata={"help": "Student-data fraction for `gkd` and `imitkd`."})
    amm_beta: float = field(default=0.5, metadata={"help": "AMM off-policy weight (1 - amm_beta = on-policy)."})
    q_bound: float = field(default=1.0, metadata={"help": "Q-head bound c: f = c * tanh(.)."})
    q_head_lr_multiplier: float = field(default=10.0, metadata={"help": "Q-head lr = learning_rate * multiplier."})
    q_head_shared: bool = field(default=False, metadata={"help": "One Q-head for on- and off-policy distances."})
    q_head_type: str = field(default="linear", metadata={"help": "Q-head kind.", "choices": list(Q_HEAD_TYPES)})
    q_head_features: str = field(
        default="student", metadata={"help": "Hidden states the Q-head reads.", "choices": list(Q_HEAD_FEATURES)}
    )
    amm_policy_gradient: bool = field(default=False, metadata={"help": "Add the on-policy score-function term."})
    pg_baseline: str = field(default="mean", metadata={"help": "Score-function baseline.", "choices": list(PG_BASELINES)})
    pg_length_normalization: bool = field(default=True, metadata={"help": "Divide returns by remaining length."})
    pg_clip: float | None = field(default=None, metadata={"help": "Clip score-function advantages to +-pg_clip."})
    off_policy_source: str = field(
        default="dataset", metadata={"help": "Off-policy completions source.", "choices": list(OFF_POLICY_SOURCES)}
    )
    off_policy_column: str = field(default="completion", metadata={"help": "Dataset column of off-policy completions."})
    loss_chunk_tokens: int | None = field(default=None, metadata={"help": "Tokens per vocabulary projection chunk."})

    def __post_init__(self):
        super().__post_init__()
        self._validate()

    def _validate(self):
        def fail(name, value, fix):
            raise ValueError(f"AMMConfig.{name}={value!r} is invalid: {fix}")

        if self.objective not in OBJECTIVES:
            fail("objective", self.objective, f"choose one of {sorted(OBJECTIVES)}.")
        for name in ("lmbda", "amm_beta"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                fail(name, value, "it must lie in [0, 1].")
        if not self.q_bound > 0:
            fail("q_bound", self.q_bound, "the Q-head bound c must be > 0 (f = c * tanh(.)).")
        if not self.q_head_lr_multiplier > 0:
            fail("q_head_lr_multiplier", self.q_head_lr_multiplier, "it must be > 0.")
        if self.q_head_type not in Q_HEAD_TYPES:
            fail("q_head_type", self.q_head_type, f"choose one of {list(Q_HEAD_TYPES)}.")
        if self.q_head_features not in Q_HEAD_FEATURES:
            fail("q_head_features", self.q_head_features, f"choose one of {list(Q_HEAD_FEATURES)}.")
        if self.pg_baseline not in PG_BASELINES:
            fail("pg_baseline", self.pg_baseline, f"choose one of {list(PG_BASELINES)}.")
        if self.pg_clip is not None and not self.pg_clip > 0:
            fail("pg_clip", self.pg_clip, "use a positive bound or null.")
        if self.off_policy_source not in OFF_POLICY_SOURCES:
            fail("off_policy_source", self.off_policy_source, f"choose one of {list(OFF_POLICY_SOURCES)}.")
        if self.loss_chunk_tokens is not None and self.loss_chunk_tokens < 1:
            fail("loss_chunk_tokens", self.loss_chunk_tokens, "use a positive number of tokens or null (auto).")
        if self.uses_off_policy and self.off_policy_source == "none":
            fail("off_policy_source", "none", f"objective {self.objective!r} (amm_beta={self.amm_beta}, "
                 f"lmbda={self.lmbda}) trains on off-policy completions: use 'dataset' or 'teacher'.")
        if self.amm_policy_gradient and self.objective != "amm":
            fail("amm_policy_gradient", True, f"it applies to objective 'amm' only, not {self.objective!r}.")
        ds = self.deepspeed if isinstance(self.deepspeed, dict) else None
        if ds is not None and "optimizer" in ds and self.objective == "amm":
            fail("deepspeed", "{'optimizer': ...}", "remove the 'optimizer' section: the Q-heads need their own "
                 "parameter group, which only the Trainer-built optimizer gives (DeepSpeed still wraps it).")

    # Data schedule of the objective: whether it needs student rollouts / off-policy completions at all.
    @property
    def uses_rollouts(self) -> bool:
        if self.objective == "amm":
            return self.amm_beta < 1.0
        if self.objective in ("gkd", "imitkd"):
            return self.lmbda > 0.0
        return self.objective in ("jsd", "rkl", "tvd")

    @property
    def uses_off_policy(self) -> bool:
        if self.objective == "amm":
            return self.amm_beta > 0.0
        if self.objective in ("gkd", "imitkd"):
            return self.lmbda < 1.0
        return self.objective in ("sft", "seqkd", "fkl")

    @property
    def uses_teacher_logits(self) -> bool:
        return self.objective not in ("sft", "seqkd")
