"""`AMMConfig`: TRL's `DistillationConfig` plus the fields of adversarial moment matching and the baselines."""

from dataclasses import dataclass, field
from typing import Literal

from trl import DistillationConfig

from .objectives import OBJECTIVES as OBJECTIVE_UNITS
from .objectives import VLLM_IS_MODES, Objective, get_objective
from .objectives.amm import L2_WEIGHTS

# objective name -> what it trains (the `amm-trl` help text); each is an `Objective` in `amm_trl/objectives/`.
OBJECTIVES = {name: unit.info.description for name, unit in OBJECTIVE_UNITS.items()}
OBJECTIVE_NAMES = tuple(OBJECTIVES)
DISTILLM_LOSSES = ("skl", "srkl")
OFF_POLICY_SOURCES = ("auto", "dataset", "teacher", "none")
Q_HEAD_TYPES = ("linear", "low_rank")
Q_HEAD_FEATURES = ("student", "teacher", "both")
AMM_ANCHORS = ("fkl", "ce")
PG_BASELINES = ("mean", "none")
TEACHER_PLACEMENTS = ("local", "server", "cache")
TEACHER_SERVER_OUTPUTS = ("top_k", "hidden_states")


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
        q_bound (`float` or `None`, *optional*, defaults to `None`):
            Bound c of the critic, f = c * tanh(u). With the optimal critic each distance is 2c * TV(p_T, p_S).
            `None`: an unbounded critic f = u, kept finite by `q_head_l2` (required then).
        q_prior_alpha (`float`, *optional*, defaults to `1.0`):
            Informed critic: u = alpha * sg(log p_T - log p_S) + g(s), g the Q-head's output (zero at the start), so
            the critic sees both models from the first step; the head learns a residual. With a bound c it begins at
            c * tanh(alpha log(p_T / p_S)), a soft version of the best response c * sign(p_T - p_S). With the
            defaults (unbounded, `q_head_l2` 1) it begins at f = log(p_T / p_S), where the student's gradient at each
            state is exactly the reverse-KL gradient, and the regularized critic then moves f towards its best
            response (p_T - p_S) / q_head_l2 where the head can. `0`: u = g, the learned critic alone (with
            `q_bound: 1`, `q_head_l2: 0` the closest reading of the paper). A head on the student's features alone
            cannot represent sign(p_T - p_S), which depends on both models: on the Tier A benchmark it diverged.
        q_head_l2 (`float`, *optional*, defaults to `1.0`):
            L2 penalty of the critic: the heads ascend <sg(p_T - p_S), f> - q_head_l2 / 2 * sum_a f(a)^2 (the student
            still descends the plain gap), whose best response (p_T - p_S) / q_head_l2 is finite without a tanh; a
            saturated tanh head under Adam goes stale instead.
        q_head_l2_weight (`str`, *optional*, defaults to `"uniform"`):
            What the penalty weighs each f(a)^2 by, which sets the divergence the game plays (the regularized gap at
            the best response): `uniform` (1: the squared L2 distance, which barely sees a mode of small mass),
            `student` (sg(p_S): Pearson's chi^2(p_T || p_S); at the best response the student's logit gradient at
            each state is forward KL's, p_T - p_S, mass-covering) or `mixture` (sg(p_T + p_S) / 2: the triangular
            discrimination, a critic bounded by 2 / q_head_l2).
        q_head_max_grad_norm (`float` or `None`, *optional*, defaults to `None`):
            Clip the Q-heads' gradient norm on its own; the student is then clipped alone at `max_grad_norm` (by
            default the Trainer clips student and heads jointly, so a large head gradient shrinks the student's
            step). Not under DeepSpeed, whose engine clips all its parameters jointly.
        amm_anchor_weight (`float`, *optional*, defaults to `0.5`):
            Weight of a likelihood anchor on the off-policy completions, added to AMM's (or PbKD's) loss with this
            weight regardless of `amm_beta` (per off-policy token, reduced like the rest; none with `amm_beta` 0,
            which trains on no off-policy completions). Per-state moment matching
            weighs the student's gradient by p_S, so it barely lifts a teacher mode the student misses; the anchor
            does.
        amm_anchor (`str`, *optional*, defaults to `"fkl"`):
            The anchor: `"fkl"` (forward KL(p_T || p_S)) or `"ce"` (cross-entropy of the completion's tokens).
        q_head_lr_multiplier (`float`, *optional*, defaults to `1.0`):
            The Q-heads' learning rate is `learning_rate * q_head_lr_multiplier` (own optimizer parameter group, no
            weight decay, same schedule). 1: the critic at the student's rate won both Tier A selections that
            searched the critic's rate (against x0.3, x3, x5 and x20, at 800 and 3200 steps) and its Tier B ablation
            (against ~x3, two seeds); docs/results.md.
        q_head_learning_rate (`float` or `None`, *optional*, defaults to `None`):
            The Q-heads' own learning rate, replacing `learning_rate * q_head_lr_multiplier` (same schedule). LLM
            learning rates (1e-6 to 1e-5) leave a zero-initialized critic nearly still for many steps (in 16 Adam
            steps at 5 x 1e-5 no head weight moves more than ~8e-4); give the critic its own scale here.
        q_head_shared (`bool`, *optional*, defaults to `False`):
            One head for both distances instead of separate on-policy and off-policy heads.
        hub_push_q_heads (`bool`, *optional*, defaults to `False`):
            Whether `push_to_hub` uploads `amm_q_heads.safetensors` (the trained critic) beside the student. Off: the
            hub repository holds the student alone.
        q_head_type (`str`, *optional*, defaults to `"linear"`):
            The learned part g(s, .) of the critic's raw score u (see `q_prior_alpha`; f = u, or c * tanh(u) with a
            `q_bound`). `"linear"`: g = W h + b with W of shape (vocab, hidden), zero-initialized (g starts at 0).
            `"low_rank"`: g = E m(h), E the detached student output embedding and m a two-layer MLP whose last layer
            starts at zero (~2 hidden^2 parameters instead of hidden * vocab).
        q_head_features (`str`, *optional*, defaults to `"student"`):
            Features the head reads, detached: the student's (`"student"`) or the teacher's (`"teacher"`) last hidden
            state, or both side by side (`"both"`: [h_S, h_T], so a linear head is W_S h_S + W_T h_T + b).
        q_head_warmup_steps (`int`, *optional*, defaults to `0`):
            Optimizer steps at the start during which only the Q-heads learn (the student's gradient from the moment
            gap is masked), so the student first meets an informed adversary rather than a near-zero one.
        amm_policy_gradient (`bool`, *optional*, defaults to `False`):
            Add the score-function term of the on-policy gradient: sum_t grad log p_S(y_t|s_t) * A_t with
            A_t = sum_{t'>t} <p_T - p_S, f>(s_t') (the moment gap of the future states), minus a baseline.
        pg_baseline (`str`, *optional*, defaults to `"mean"`):
            Baseline subtracted from A_t: `"mean"` (batch mean over response tokens) or `"none"`.
        pg_length_normalization (`bool`, *optional*, defaults to `True`):
            Divide A_t by the number of remaining response tokens (as MiniLLM does).
        pg_clip (`float` or `None`, *optional*, defaults to `None`):
            Clip A_t to [-pg_clip, pg_clip].

        > DistiLLM (`objective: distillm`)

        distillm_loss (`str`, *optional*, defaults to `"skl"`):
            `"skl"`: skew forward KL(p_T || a p_T + (1-a) p_S); `"srkl"`: skew reverse KL(p_S || (1-a) p_T + a p_S).
        skew_alpha (`float`, *optional*, defaults to `0.1`):
            Skew a of the mixture, in [0, 1]; `0` gives the plain forward / reverse KL. Also DistiLLM-2's
            (`objective: distillm2`: skew KL on the teacher's answers, skew reverse KL on the student's rollouts).
        distillm_init_threshold (`float`, *optional*, defaults to `0.0`):
            Initial threshold of the adaptive off-policy schedule (DistiLLM's `--init-threshold`). Each optimizer step
            trains on fresh student rollouts with probability threshold * (1 - global_step / max_steps), drawn from a
            generator seeded by the step (same on every rank and after a resume); otherwise on `per_device` items
            sampled from the replay buffer when it holds at least one generation batch, else on the off-policy
            completions.
        distillm_loss_eps (`float`, *optional*, defaults to `0.1`):
            After each evaluation (the Trainer's eval loop on `eval_dataset`, loss = the skew divergence on the eval
            off-policy completions), the threshold rises by `distillm_threshold_step` (capped at 1) when the eval
            loss improved by less than `distillm_loss_eps` relative to the previous evaluation. Without an eval set
            (or `eval_strategy: no`) the threshold stays at `distillm_init_threshold`.
        distillm_threshold_step (`float`, *optional*, defaults to `0.1`):
            Increment of the threshold.
        replay_buffer_size (`int`, *optional*, defaults to `1000`):
            Capacity (per process) of the replay buffer of past student rollouts (prompt + completion token ids),
            first in first out. The buffer and the threshold are saved in each checkpoint
            (`distillm_state_rank<i>.pt`) and restored on resume.

        > MiniLLM (`objective: minillm`)

        minillm_gamma (`float`, *optional*, defaults to `0.95`):
            Discount of the returns G_t = sum_{k>t} gamma^(k-t-1) r_k, r_k = log p_T(y_k) - log p_S(y_k) (computed
            once, at rollout time, with the rollout-time student), divided by the number of future tokens, whitened.
        ppo_clip (`float`, *optional*, defaults to `0.2`):
            PPO ratio clipping epsilon; the ratio is against the student log-probs stored at rollout time.
        ppo_epochs (`int`, *optional*, defaults to `1`):
            Optimizer steps per rollout batch: the buffered rollout batch (with its advantages and old log-probs) is
            replayed `ppo_epochs` times, one optimizer step each, before new rollouts are generated. The prompts
            the dataloader yields during the replayed steps are skipped.
        minillm_teacher_mix (`float`, *optional*, defaults to `0.2`):
            Teacher-mixed sampling: rollouts are sampled from mix * p_T + (1 - mix) * p_S (both at `temperature`; a
            logits processor runs the teacher, with its KV cache, inside HF `generate`; not available with vLLM: set
            0 there). The PPO ratio is then taken against the mixture's log-prob of the sampled token, so at the first
            epoch it equals the importance weight p_S / mix, clipped by `ppo_clip` as MiniLLM clips it; the
            single-step reverse-KL term is weighted by the same rollout-time weight. `0` samples from the student.
        minillm_kd_ratio (`float`, *optional*, defaults to `0.5`):
            Loss on the off-policy completions: (1 - ratio) * cross-entropy + ratio * forward KL (MiniLLM's mixed
            LM / KD loss); added with weight 1 to the policy-gradient and single-step terms.

        > Reward-guided KD (`objective: pbkd`)

        pbkd_bt_weight (`float`, *optional*, defaults to `1.0`):
            Weight of the Bradley-Terry loss of the reward head (the confidence set as a penalty): the head minimizes
            pbkd_bt_weight * BT(J(off-policy completion) > J(rollout)) - gap, with J(y) = sum_t q(s_t)[y_t]. The head
            is the AMM Q-head (one head shared by both data kinds, `q_head_type`, `q_bound`, `q_head_features`,
            `q_head_lr_multiplier` apply) and `amm_beta` weighs the off-policy vs on-policy gap.

        > Off-policy data

        off_policy_source (`str`, *optional*, defaults to `"auto"`):
            Where off-policy completions come from: `"dataset"` (column `off_policy_column`: reference answers, or
            teacher generations cached with `amm-trl generate`), `"teacher"` (generated online by the teacher with
            `generate`, each step) or `"none"`. `"auto"`: the objective's own choice, `"teacher"` for `amm` and
            `pbkd` (the AMM paper's off-policy data are teacher generations; on the Tier A benchmark they beat the
            reference answers, docs/results.md), `"dataset"` for the others. To avoid generating online, cache the
            teacher's answers once with `amm-trl generate` and point `off_policy_column` at them
            (`off_policy_source: dataset`).
        off_policy_column (`str`, *optional*, defaults to `"completion"`):
            Dataset column holding the off-policy completion: text for standard prompts, or a list of assistant
            messages for conversational prompts.

        > vLLM sampling correction (TRL GRPO's fields, same names and meaning; only with `use_vllm`)

        vllm_importance_sampling_correction (`bool`, *optional*, defaults to `False`):
            Weight the student-rollout part of the loss by the importance ratio exp(log p_trainer - log p_vLLM) of the
            sampled tokens, which corrects for vLLM's sampling log-probs differing from the trainer's (bf16 kernels,
            another attention implementation). vLLM then returns the sampled tokens' log-probs (`logprobs=0`) and the
            rollout-time student scores them in one extra no-grad forward per generation batch; logs
            `sampling/sampling_logp_difference/{mean,max}` and `sampling/importance_sampling_ratio/{min,mean,max}`.
            Off-policy completions are not weighted. Not with objective `jsd` (TRL's loss takes no token weights).
            Off by default (on in GRPO): the distillation losses are full-distribution divergences at each visited
            prefix, so the mismatch only shifts which prefixes are visited, a second-order effect, while the weights
            add variance and discard data (`*_mask`); GRPO's policy gradient instead reads the sampled tokens'
            probabilities directly. Turn it on for the policy-gradient terms (`minillm`, `amm_policy_gradient`), or
            when the logged difference is large.
        vllm_importance_sampling_mode (`str`, *optional*, defaults to `"sequence_mask"`):
            `"token_truncate"` / `"token_mask"`: per-token ratios, clipped to [C_min, C_max] / set to 0 outside it;
            `"sequence_truncate"` / `"sequence_mask"`: one ratio per rollout (the product over its tokens) for all its
            tokens, clipped / the rollout dropped outside [C_min, C_max]. For divergence losses the sequence modes are
            the principled ones (the probability of reaching a prefix is a product over the tokens before it); the
            token modes follow GRPO's per-token approximation.
        vllm_importance_sampling_clip_max (`float` or `None`, *optional*, defaults to `3.0`):
            Upper bound C_max of the ratio (`None`: none).
        vllm_importance_sampling_clip_min (`float` or `None`, *optional*, defaults to `None`):
            Lower bound C_min of the ratio (`None`: none).

        > Prompts

        max_prompt_length (`int` or `None`, *optional*, defaults to `None`):
            Longest prompt in tokens; longer ones are cut from the left (the end holds the question and the generation
            prompt), with a warning counting them. `None`: prompts are not cut, and one that leaves no room for
            `max_completion_length` tokens within the models' context (`max_position_embeddings`) is refused.

        > Teacher placement

        teacher_placement (`str`, *optional*, defaults to `"local"`):
            Where the teacher's distribution comes from. `local`: the teacher model runs in every training process
            (sharded by ZeRO-3), full-vocabulary logits. `server`: a vLLM server of the teacher
            (`vllm serve TEACHER --max-logprobs K`, started by you, tensor-parallel as you choose) returns the top-k
            log-probs of every completion token (`teacher_server_base_url`); the teacher's weights never enter the
            training processes. `cache`: the off-policy completions and their top-k log-probs are read from the
            training dataset, written beforehand by `amm-trl generate --teacher_top_k K`; rollouts (if the objective
            trains on them) are scored by the server at `teacher_server_base_url`. With `server` and `cache` every
            loss compares the two distributions on k + 1 buckets (the teacher's top-k tokens and the tail, see
            `amm_trl.objectives.teachers.TopKTeacher`), at temperature 1.
        teacher_server_base_url (`str` or `None`, *optional*, defaults to `None`):
            Address of the teacher's vLLM server, e.g. `http://teacher-node:8000`.
        teacher_server_timeout (`float`, *optional*, defaults to `240.0`):
            Seconds to wait for the teacher's server at start-up.
        teacher_server_request_timeout (`float`, *optional*, defaults to `300.0`):
            Seconds one request to the teacher's server may take. A request with no answer by then stops training
            with an error naming the server (TRL's client has no timeout: a server that hangs would stall the run for
            good); TRL's retries of refused connections and 5xx answers still apply.
        teacher_server_output (`str`, *optional*, defaults to `"top_k"`):
            What the server returns. `top_k`: log-probs (`vllm serve TEACHER --max-logprobs K`). `hidden_states`: the
            teacher's last hidden state at every position (a pooling server, `vllm serve TEACHER --runner pooling
            --pooler-config '{"pooling_type": "ALL", "use_activation": false, "task": "token_embed"}'`); the trainer
            applies the teacher's own output layer, read from `teacher_model_name_or_path` (that layer alone is
            loaded), so every loss sees the exact full-vocabulary distribution, at any temperature.
        teacher_top_k (`int`, *optional*, defaults to `20`):
            Teacher log-probs per token from the server (vLLM allows 20 unless started with `--max-logprobs`); a cache
            holding more is cut to this many.
        teacher_local_top_k (`int`, *optional*, defaults to `0`):
            With a teacher whose full distribution the trainer has (`local`, or a server's hidden states), `k > 0`
            shows every loss only its top-k + tail, as a server or cache at that k would: what a k keeps of the
            quality, measured before paying for the server (the rounding of served or cached log-probs aside).
            `0`: the full distribution.
        teacher_top_k_taken_bucket (`bool`, *optional*, defaults to `False`):
            With a top-k teacher (`server`, `cache` or `teacher_local_top_k`), the token taken at each position (the
            student's sample on a rollout, the answer's token off-policy) gets a bucket of its own when it is outside
            the teacher's top-k, from its log-prob that every server and cache returns: k + 2 buckets there instead
            of k + 1, a finer partition and so divergences closer to the full ones (the logged `tv` too). On a
            rollout the partition depends on the student's sample.

        > Memory

        loss_chunk_tokens (`int` or `None`, *optional*, defaults to `None`):
            Tokens projected to the vocabulary at once in the loss (logits are never materialized for the whole
            batch; each chunk is recomputed in the backward). `None` picks about 2^25 / vocab_size tokens.
    """

    # Parameters that control the objective
    objective: Literal[OBJECTIVE_NAMES] = field(default="amm", metadata={"help": "Distillation method."})
    lmbda: float = field(default=0.5, metadata={"help": "Student-data fraction for `gkd` and `imitkd`."})

    # Parameters that control adversarial moment matching (`amm`; the critic also serves `pbkd`)
    amm_beta: float = field(default=0.5, metadata={"help": "AMM off-policy weight (1 - amm_beta = on-policy)."})
    q_bound: float | None = field(default=None, metadata={"help": "Critic bound c: f = c * tanh(.); null: unbounded."})
    q_prior_alpha: float = field(default=1.0, metadata={
        "help": "Informed critic: u = alpha * (log p_T - log p_S) + head; f = u (unbounded, the default, with "
                "q_head_l2) or c * tanh(u) with q_bound c; 0 = the head alone."})
    q_head_l2: float = field(default=1.0, metadata={
        "help": "L2 penalty lambda/2 * sum_a f^2 in the critic's objective."})
    q_head_l2_weight: Literal[L2_WEIGHTS] = field(default="uniform", metadata={
        "help": "Weight of f(a)^2 in the penalty: uniform (squared L2), student (Pearson chi^2), mixture "
                "(triangular)."})
    q_head_max_grad_norm: float | None = field(default=None, metadata={
        "help": "Clip the Q-heads' gradient norm separately (the student keeps max_grad_norm)."})
    amm_anchor_weight: float = field(default=0.5, metadata={
        "help": "Weight of a likelihood anchor on the off-policy completions (AMM / PbKD)."})
    amm_anchor: Literal[AMM_ANCHORS] = field(default="fkl", metadata={"help": "Anchor loss."})
    q_head_lr_multiplier: float = field(default=1.0, metadata={"help": "Q-head lr = learning_rate * multiplier."})
    q_head_learning_rate: float | None = field(default=None, metadata={
        "help": "The Q-heads' own learning rate (replaces learning_rate * q_head_lr_multiplier)."})
    q_head_shared: bool = field(default=False, metadata={"help": "One Q-head for on- and off-policy distances."})
    hub_push_q_heads: bool = field(default=False, metadata={
        "help": "push_to_hub uploads the Q-heads file too (default: the student alone)."})
    q_head_type: Literal[Q_HEAD_TYPES] = field(default="linear", metadata={"help": "Q-head kind."})
    q_head_features: Literal[Q_HEAD_FEATURES] = field(
        default="student", metadata={"help": "Hidden states the Q-head reads."}
    )
    q_head_warmup_steps: int = field(default=0, metadata={"help": "Initial steps in which only the Q-heads learn."})
    amm_policy_gradient: bool = field(default=False, metadata={"help": "Add the on-policy score-function term."})
    pg_baseline: Literal[PG_BASELINES] = field(default="mean", metadata={"help": "Score-function baseline."})
    pg_length_normalization: bool = field(default=True, metadata={"help": "Divide returns by remaining length."})
    pg_clip: float | None = field(default=None, metadata={"help": "Clip score-function advantages to +-pg_clip."})

    # Parameters that control DistiLLM (`distillm`; `skew_alpha` also `distillm2`)
    distillm_loss: Literal[DISTILLM_LOSSES] = field(default="skl",
                               metadata={"help": "DistiLLM divergence."})
    skew_alpha: float = field(default=0.1, metadata={"help": "Skew alpha of the DistiLLM divergences."})
    distillm_init_threshold: float = field(default=0.0, metadata={"help": "Initial student-data threshold."})
    distillm_loss_eps: float = field(default=0.1, metadata={"help": "Relative eval-loss improvement threshold."})
    distillm_threshold_step: float = field(default=0.1, metadata={"help": "Threshold increment on a plateau."})
    replay_buffer_size: int = field(default=1000, metadata={"help": "Replay buffer capacity (per process)."})

    # Parameters that control MiniLLM (`minillm`)
    minillm_gamma: float = field(default=0.95, metadata={"help": "MiniLLM return discount."})
    ppo_clip: float = field(default=0.2, metadata={"help": "PPO ratio clip epsilon."})
    ppo_epochs: int = field(default=1, metadata={"help": "Optimizer steps per MiniLLM rollout batch."})
    minillm_teacher_mix: float = field(default=0.2, metadata={"help": "Teacher share of MiniLLM's sampling mixture."})
    minillm_kd_ratio: float = field(default=0.5, metadata={"help": "KD share of MiniLLM's reference-data loss."})

    # Parameters that control reward-guided KD (`pbkd`)
    pbkd_bt_weight: float = field(default=1.0, metadata={"help": "PbKD Bradley-Terry penalty weight."})

    # Parameters that control the off-policy data
    off_policy_source: Literal[OFF_POLICY_SOURCES] = field(
        default="auto", metadata={"help": "Off-policy completions source."}
    )
    off_policy_column: str = field(
        default="completion", metadata={"help": "Dataset column of off-policy completions."}
    )

    # Parameters that control vLLM's sampling correction (TRL GRPO's fields; only with `use_vllm`)
    vllm_importance_sampling_correction: bool = field(
        default=False, metadata={"help": "Weight rollout tokens by exp(logp_trainer - logp_vLLM) (clipped/masked)."})
    vllm_importance_sampling_mode: Literal[VLLM_IS_MODES] = field(
        default="sequence_mask", metadata={"help": "Per-token or per-sequence ratio, clipped or masked."})
    vllm_importance_sampling_clip_max: float | None = field(default=3.0, metadata={"help": "Ratio upper bound."})
    vllm_importance_sampling_clip_min: float | None = field(default=None, metadata={"help": "Ratio lower bound."})

    # Parameters that control where the teacher runs
    teacher_placement: Literal[TEACHER_PLACEMENTS] = field(default="local", metadata={
        "help": "local: the teacher model in the training processes; server: a vLLM server's top-k log-probs; cache: "
                "top-k log-probs stored in the dataset by `amm-trl generate --teacher_top_k`."})
    teacher_server_base_url: str | None = field(default=None, metadata={
        "help": "The teacher's vLLM server, e.g. http://teacher-node:8000."})
    teacher_server_timeout: float = field(default=240.0, metadata={"help": "Seconds to wait for it at start-up."})
    teacher_server_request_timeout: float = field(default=300.0, metadata={
        "help": "Seconds one request to it may take before training stops with an error."})
    teacher_server_output: Literal[TEACHER_SERVER_OUTPUTS] = field(default="top_k", metadata={
        "help": "top_k: the server's top-k log-probs; hidden_states: its last hidden states, projected here by the "
                "teacher's own output layer (exact)."})
    teacher_top_k: int = field(default=20, metadata={"help": "Teacher log-probs per token (server / cache)."})
    teacher_local_top_k: int = field(default=0, metadata={
        "help": "> 0: the losses see only the top-k + tail of a teacher whose full distribution is here (local, or "
                "served hidden states), as a server or cache at that k would give it; 0: the full distribution."})
    teacher_top_k_taken_bucket: bool = field(default=False, metadata={
        "help": "A top-k teacher gives the taken token (a rollout's sample, an answer's token) a bucket of its own "
                "when it is outside the top-k."})

    # Parameters that control prompts and memory
    max_prompt_length: int | None = field(default=None, metadata={
        "help": "Cut longer prompts from the left (None: refuse prompts that overflow the context)."})
    loss_chunk_tokens: int | None = field(default=None, metadata={"help": "Tokens per vocabulary projection chunk."})

    def __post_init__(self):
        super().__post_init__()
        if self.off_policy_source == "auto" and self.objective in OBJECTIVES:
            # a cache holds the teacher's samples; a pooling server (served hidden states) cannot generate
            no_generation = self.teacher_placement == "cache" or (self.teacher_placement == "server" and
                                                                 self.teacher_server_output == "hidden_states")
            self.off_policy_source = ("dataset" if no_generation
                                      else OBJECTIVE_UNITS[self.objective].info.off_policy_default)
        self._objective = None
        self._validate()

    def _validate(self):
        def fail(name, value, fix):
            raise ValueError(f"AMMConfig.{name}={value!r} is invalid: {fix}")

        if self.objective not in OBJECTIVES:
            fail("objective", self.objective, f"choose one of {sorted(OBJECTIVES)}.")
        self._validate_schedule(fail)
        for name in ("lmbda", "amm_beta", "skew_alpha", "distillm_init_threshold", "minillm_gamma",
                     "minillm_kd_ratio", "minillm_teacher_mix"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                fail(name, value, "it must lie in [0, 1].")
        self._validate_critic(fail)
        if not self.q_head_lr_multiplier > 0:
            fail("q_head_lr_multiplier", self.q_head_lr_multiplier, "it must be > 0.")
        if self.q_head_learning_rate is not None and not self.q_head_learning_rate > 0:
            fail("q_head_learning_rate", self.q_head_learning_rate, "use a positive learning rate, or null for "
                 "learning_rate * q_head_lr_multiplier.")
        if self.q_head_type not in Q_HEAD_TYPES:
            fail("q_head_type", self.q_head_type, f"choose one of {list(Q_HEAD_TYPES)}.")
        if self.q_head_features not in Q_HEAD_FEATURES:
            fail("q_head_features", self.q_head_features, f"choose one of {list(Q_HEAD_FEATURES)}.")
        if self.pg_baseline not in PG_BASELINES:
            fail("pg_baseline", self.pg_baseline, f"choose one of {list(PG_BASELINES)}.")
        self._validate_objective_fields(fail)
        self._validate_vllm_sampling(fail)
        self._objective = get_objective(self)  # refuses the settings this objective cannot run
        if self._objective.data.off_policy and self.off_policy_source == "none":
            fail("off_policy_source", "none", f"objective {self.objective!r} (amm_beta={self.amm_beta}, "
                 f"lmbda={self.lmbda}) trains on off-policy completions: use 'dataset' or 'teacher'.")
        self._validate_teacher_placement(fail)
        self._validate_deepspeed_optimizer()

    def _validate_teacher_placement(self, fail):
        """A teacher outside the training processes gives top-k log-probs at temperature 1 of finished sequences."""
        if self.teacher_placement not in TEACHER_PLACEMENTS:
            fail("teacher_placement", self.teacher_placement, f"choose one of {list(TEACHER_PLACEMENTS)}.")
        if not (isinstance(self.teacher_top_k, int) and self.teacher_top_k >= 1):
            fail("teacher_top_k", self.teacher_top_k, "use an integer >= 1 (vLLM serves 20 unless started with "
                 "--max-logprobs).")
        if not (isinstance(self.teacher_local_top_k, int) and self.teacher_local_top_k >= 0):
            fail("teacher_local_top_k", self.teacher_local_top_k, "use an integer >= 0 (0: the full distribution).")
        exact = self.teacher_placement == "local" or (self.teacher_placement == "server"
                                                      and self.teacher_server_output == "hidden_states")
        if self.teacher_local_top_k and not exact:
            fail("teacher_local_top_k", self.teacher_local_top_k, f"teacher_placement {self.teacher_placement!r} "
                 f"already gives a top-k teacher: set its k with teacher_top_k.")
        if self.teacher_top_k_taken_bucket and exact and not self.teacher_local_top_k:
            fail("teacher_top_k_taken_bucket", self.teacher_top_k_taken_bucket, "the teacher's full distribution is "
                 "here, with no top-k to refine: set teacher_local_top_k, or use teacher_placement 'server' (top_k) "
                 "or 'cache'.")
        if self.teacher_local_top_k and self._objective.info.trl_loss:
            fail("teacher_local_top_k", self.teacher_local_top_k, f"objective {self.objective!r} runs TRL's loss on "
                 f"the full logits: use 'gkd' with lmbda 1.0 (the same loss).")
        if self.teacher_server_output not in TEACHER_SERVER_OUTPUTS:
            fail("teacher_server_output", self.teacher_server_output, f"choose one of {list(TEACHER_SERVER_OUTPUTS)}.")
        for name in ("teacher_server_timeout", "teacher_server_request_timeout"):
            if not getattr(self, name) > 0:
                fail(name, getattr(self, name), "give a number of seconds > 0.")
        if self.teacher_placement == "local":
            return
        unit, where = self._objective, f"teacher_placement {self.teacher_placement!r}"
        hidden = self.teacher_placement == "server" and self.teacher_server_output == "hidden_states"
        if self.teacher_server_output == "hidden_states" and not hidden:
            fail("teacher_server_output", "hidden_states", "it applies to teacher_placement 'server' only (a cache "
                 "holds top-k log-probs).")
        if hidden and self.off_policy_source == "teacher" and unit.data.off_policy:
            fail("off_policy_source", "teacher", "a pooling server (teacher_server_output 'hidden_states') cannot "
                 "generate: use 'dataset' (e.g. the teacher's completions written by `amm-trl generate`).")
        if hidden and not self.teacher_model_name_or_path:
            fail("teacher_model_name_or_path", None, "teacher_server_output 'hidden_states' reads the teacher's "
                 "output layer from it (nothing else of the teacher is loaded).")
        if self.teacher_placement == "server" and not self.teacher_server_base_url:
            fail("teacher_server_base_url", self.teacher_server_base_url, "teacher_placement 'server' needs the "
                 "teacher's vLLM server address, e.g. http://teacher-node:8000.")
        if unit.info.trl_loss:
            fail("objective", self.objective, f"it runs TRL's loss, which calls a teacher model in the training "
                 f"process; with {where} there is none: use 'gkd' with lmbda 1.0 (the same loss).")
        if unit.adversary is not None and self.q_head_features != "student" and not hidden:
            fail("q_head_features", self.q_head_features,
                 f"with {where} the trainer has no teacher hidden states: use 'student'.")
        if self.temperature != 1.0 and not hidden:
            fail("temperature", self.temperature, f"with {where} the teacher's log-probs are at temperature 1 (vLLM's "
                 "prompt log-probs skip the sampling processors, whatever --logprobs-mode says): use temperature 1.0, "
                 "teacher_server_output 'hidden_states', or teacher_placement 'local'.")
        reads_rollouts = unit.info.reads_teacher and unit.data.rollouts
        if self.teacher_placement == "cache":
            if self.off_policy_source == "teacher" and unit.data.off_policy:
                fail("off_policy_source", "teacher", "with teacher_placement 'cache' the teacher's completions are "
                     "the cached ones: use 'dataset'.")
            if not unit.data.off_policy:
                fail("teacher_placement", "cache", f"objective {self.objective!r} trains on rollouts only, which no "
                     "cache holds: use 'server'.")
            if reads_rollouts and not self.teacher_server_base_url:
                fail("teacher_server_base_url", None, f"objective {self.objective!r} also trains on student "
                     "rollouts, which no cache holds: give a teacher server to score them, or teacher_placement "
                     "'local'.")

    def _validate_schedule(self, fail):
        """Sizes the Trainer accepts silently (max_steps -5 trains the epochs) or fails on after the models load."""
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            if not getattr(self, name) >= 1:
                fail(name, getattr(self, name), "it must be a whole number >= 1.")
        if self.max_steps == 0 or self.max_steps < -1:
            fail("max_steps", self.max_steps, "give a positive number of optimizer steps, or -1 (the default) to "
                 "train num_train_epochs epochs.")
        if self.max_steps == -1 and not self.num_train_epochs > 0:
            fail("num_train_epochs", self.num_train_epochs, "with max_steps -1 the run length is num_train_epochs: "
                 "give a positive number of epochs, or set max_steps.")

    def _validate_critic(self, fail):
        if self.q_bound is not None and not self.q_bound > 0:
            fail("q_bound", self.q_bound, "the Q-head bound c must be > 0 (f = c * tanh(.)), or null for an unbounded "
                 "critic with q_head_l2 > 0.")
        if self.q_head_l2_weight not in L2_WEIGHTS:
            fail("q_head_l2_weight", self.q_head_l2_weight, f"choose one of {list(L2_WEIGHTS)}.")
        for name in ("q_prior_alpha", "q_head_l2", "amm_anchor_weight"):
            if not getattr(self, name) >= 0:
                fail(name, getattr(self, name), "it must be >= 0.")
        if self.q_head_max_grad_norm is not None and not self.q_head_max_grad_norm > 0:
            fail("q_head_max_grad_norm", self.q_head_max_grad_norm, "use a positive norm or null.")
        if self.q_head_max_grad_norm is not None and getattr(self, "deepspeed_plugin", None) is not None:
            fail("q_head_max_grad_norm", self.q_head_max_grad_norm, "DeepSpeed clips all parameters of its engine "
                 "jointly (gradient_clipping); set it to null under DeepSpeed.")
        if self.amm_anchor not in AMM_ANCHORS:
            fail("amm_anchor", self.amm_anchor, f"choose one of {list(AMM_ANCHORS)}.")

    def _validate_deepspeed_optimizer(self):
        """A DeepSpeed 'optimizer' section (a dict, a JSON file or accelerate's deepspeed_config_file, all read into
        the plugin) makes DeepSpeed build one optimizer over every parameter: the Q-heads would lose their group."""
        plugin = getattr(self, "deepspeed_plugin", None)
        if (plugin is None or "optimizer" not in (plugin.deepspeed_config or {})
                or self.objective_unit.adversary is None):
            return
        source = (f"deepspeed={self.deepspeed!r}" if isinstance(self.deepspeed, str) else "deepspeed" if
                  self.deepspeed is not None else "the accelerate config's deepspeed_config_file")
        raise ValueError(
            f"The DeepSpeed config ({source}) has an 'optimizer' section: DeepSpeed would then build one optimizer "
            f"over all parameters and the Q-heads of objective {self.objective!r} would lose their own group "
            "(q_head_lr_multiplier, no weight decay). Remove the 'optimizer' section; the Trainer-built optimizer "
            "(optim / learning_rate / weight_decay) is still wrapped by DeepSpeed.")

    def _validate_objective_fields(self, fail):
        if self.pg_clip is not None and not self.pg_clip > 0:
            fail("pg_clip", self.pg_clip, "use a positive bound or null.")
        if self.distillm_loss not in DISTILLM_LOSSES:
            fail("distillm_loss", self.distillm_loss, f"choose one of {list(DISTILLM_LOSSES)}.")
        for name in ("distillm_loss_eps", "distillm_threshold_step", "ppo_clip"):
            if not getattr(self, name) > 0:
                fail(name, getattr(self, name), "it must be > 0.")
        for name in ("replay_buffer_size", "ppo_epochs"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                fail(name, getattr(self, name), "use an integer >= 1.")
        if not self.pbkd_bt_weight >= 0:
            fail("pbkd_bt_weight", self.pbkd_bt_weight, "it must be >= 0.")
        for name, default in (("ppo_epochs", 1), ("amm_policy_gradient", False)):  # fields of one objective only
            owners = [n for n, unit in OBJECTIVE_UNITS.items() if name in unit.info.own_fields]
            if getattr(self, name) != default and self.objective not in owners:
                fail(name, getattr(self, name), f"it applies to objective {' or '.join(map(repr, owners))} only, "
                     f"not {self.objective!r}.")
        if self.off_policy_source not in OFF_POLICY_SOURCES:
            fail("off_policy_source", self.off_policy_source, f"choose one of {list(OFF_POLICY_SOURCES)}.")
        if self.q_head_warmup_steps < 0:
            fail("q_head_warmup_steps", self.q_head_warmup_steps, "use 0 or a positive number of steps.")
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            fail("max_prompt_length", self.max_prompt_length, "use a positive number of tokens or null.")
        if self.loss_chunk_tokens is not None and self.loss_chunk_tokens < 1:
            fail("loss_chunk_tokens", self.loss_chunk_tokens, "use a positive number of tokens or null (auto).")

    def _validate_vllm_sampling(self, fail):
        if self.vllm_importance_sampling_mode not in VLLM_IS_MODES:
            fail("vllm_importance_sampling_mode", self.vllm_importance_sampling_mode,
                 f"choose one of {list(VLLM_IS_MODES)}.")
        low, high = self.vllm_importance_sampling_clip_min, self.vllm_importance_sampling_clip_max
        if low is not None and high is not None and not low < high:
            fail("vllm_importance_sampling_clip_min", low, f"it must be < vllm_importance_sampling_clip_max={high}.")
        if low is None and high is None and self.vllm_importance_sampling_mode.endswith("truncate"):
            fail("vllm_importance_sampling_clip_max", None, "a '*_truncate' mode needs a bound: set it or "
                 "vllm_importance_sampling_clip_min.")

    @property
    def objective_unit(self) -> Objective:
        """The objective these settings describe (built by `__post_init__`, again if `objective` changes); the trainer
        builds its own."""
        if getattr(self, "_objective", None) is None or self._objective.name != self.objective:
            self._objective = get_objective(self)
        return self._objective

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_objective", None)  # rebuilt on use: a pickled config (`training_args.bin`) holds settings only
        return state
