"""AMMTrainer on CPU, one process: the AMM loss against a naive full-logits reference, the two players' gradients,
training, checkpoints, data kinds and the errors bad inputs get."""

import math
import os

import pytest
import torch
from safetensors.torch import load_file

from amm_trl import AMMConfig, AMMTrainer
from amm_trl.objectives import get_objective
from amm_trl.objectives.batch import Step
from amm_trl.trainer import HEADS_FILE


def make_config(tmp_path, **overrides):
    kwargs = dict(output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, max_steps=2,
                  per_device_train_batch_size=4, gradient_accumulation_steps=1, max_completion_length=6,
                  report_to="none", logging_steps=1, save_strategy="no", learning_rate=1e-3,
                  gradient_checkpointing=False, model_init_kwargs={"dtype": "float32"},
                  teacher_model_init_kwargs={"dtype": "float32"}, seed=3, off_policy_source="dataset")
    kwargs.update(overrides)
    return AMMConfig(**kwargs)


# The paper's reading of the critic (a learned tanh head alone, no anchor): the naive references below write it out.
PAPER_CRITIC = dict(q_prior_alpha=0.0, q_bound=1.0, q_head_l2=0.0, amm_anchor_weight=0.0)


def make_trainer(tiny, dataset, tmp_path, student=None, teacher=None, **overrides):
    return AMMTrainer(model=student or tiny["student"], teacher_model=teacher or tiny["teacher"],
                      args=make_config(tmp_path, **overrides), train_dataset=dataset)


def fixed_batch(trainer, dataset, n=4):
    trainer.model.train()
    return trainer._generate_and_score_completions([dataset[i] for i in range(n)])


def reference_amm_loss(trainer, inputs, on_weights=None):
    """AMM loss written naively: full logits, plain autograd, explicit stop-gradients. Returns (D, student-side
    surrogate, head-side surrogate) whose gradients are what each player should receive. `on_weights`: (B, T) token
    weights of the rollouts' terms (vLLM importance sampling); each kind is divided by its loss-token count of the
    generation batch (`num_items_in_batch` / `num_off_items`, as `_prepare_inputs` left them)."""
    model, teacher = trainer.model, trainer.teacher_model
    total_d, student_side, head_side = 0.0, 0.0, 0.0
    for kind, ids_key, mask_key, coef in (("on", "completion_ids", "completion_mask", 1 - trainer.args.amm_beta),
                                          ("off", "off_completion_ids", "off_completion_mask", trainer.args.amm_beta)):
        c_ids, c_mask = inputs[ids_key], inputs[mask_key]
        ids = torch.cat([inputs["prompt_ids"], c_ids], 1)
        att = torch.cat([inputs["prompt_mask"], c_mask], 1)
        width = c_ids.size(1)
        h_s = model.model(input_ids=ids, attention_mask=att).last_hidden_state[:, -width - 1:-1]
        with torch.no_grad():
            h_t = teacher.model(input_ids=ids, attention_mask=att).last_hidden_state[:, -width - 1:-1]
        valid = c_mask.bool()
        p_s = torch.softmax(model.lm_head(h_s[valid]).float(), -1)
        p_t = torch.softmax(teacher.lm_head(h_t[valid]).float(), -1)
        head = trainer.q_heads.head(kind)
        q = trainer.args.q_bound * torch.tanh(torch.nn.functional.linear(h_s[valid].detach(), head.weight, head.bias))
        n = inputs["num_items_in_batch" if kind == "on" else "num_off_items"]
        w = on_weights[valid][:, None] if kind == "on" and on_weights is not None else 1.0
        total_d = total_d + coef * (w * (p_t - p_s) * q).sum() / n
        student_side = student_side + coef * (w * (p_t - p_s) * q.detach()).sum() / n
        head_side = head_side - coef * (w * (p_t - p_s).detach() * q).sum() / n
    return total_d, student_side, head_side


def grads(module_params):
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in module_params]


def loss_and_grads(trainer, inputs, params):
    """The trainer's loss on `inputs` and the gradients of `params`; the model's gradients are zero afterwards."""
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    got = grads(params)
    trainer.model.zero_grad()
    return loss, got


# Every reference test runs twice: the whole micro-batch in one loss chunk, and in chunks of 3 tokens (~10 chunks,
# the path every real run takes: Qwen's 152k vocabulary gives ~220-token chunks), where the chunked loss's custom
# backward recomputes and accumulates each chunk's gradient.
CHUNKS = pytest.mark.parametrize("chunk", [None, 3], ids=["one_chunk", "chunks_of_3"])


def check_chunks(trainer, inputs, chunk):
    """The batch really spans several chunks when `chunk` is set."""
    tokens = int(inputs["completion_mask"].sum()) if "completion_mask" in inputs else 0
    tokens += int(inputs["off_completion_mask"].sum()) if "off_completion_mask" in inputs else 0
    assert trainer.chunk_size == (chunk or trainer.chunk_size)
    assert tokens > (3 * chunk if chunk else 0) and (chunk or tokens <= trainer.chunk_size), (tokens, chunk)


@pytest.fixture(params=[None, 3], ids=["one_chunk", "chunks_of_3"])
def amm(tiny, tiny_dataset, tmp_path, request):
    trainer = make_trainer(tiny, tiny_dataset, tmp_path, loss_chunk_tokens=request.param, **PAPER_CRITIC)
    torch.manual_seed(0)
    for p in trainer.q_heads.parameters():  # a non-trivial adversary (zero-init would make D = 0)
        p.data.normal_(0, 0.5)
    return trainer


def test_loss_and_both_players_gradients_match_naive_reference(amm, tiny_dataset):
    inputs = fixed_batch(amm, tiny_dataset)
    check_chunks(amm, inputs, amm.args.loss_chunk_tokens)
    student_params = [p for n, p in amm.model.named_parameters() if "amm_q_heads" not in n]
    head_params = list(amm.q_heads.parameters())

    amm.model.zero_grad()
    loss = amm.compute_loss(amm.model, inputs)
    loss.backward()
    got_student, got_head = grads(student_params), grads(head_params)

    amm.model.zero_grad()
    d, student_side, head_side = reference_amm_loss(amm, inputs)
    assert loss.item() == pytest.approx(d.item(), rel=1e-5, abs=1e-7)  # logged loss = the distance D
    (student_side + head_side).backward()
    want_student, want_head = grads(student_params), grads(head_params)
    for got, want in zip(got_student + got_head, want_student + want_head):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    # Both players really get a gradient.
    assert any(g.abs().sum() > 0 for g in got_head) and any(g.abs().sum() > 0 for g in got_student)


def test_head_step_increases_and_student_step_decreases_the_distance(amm, tiny_dataset):
    inputs = fixed_batch(amm, tiny_dataset)
    student_params = [p for n, p in amm.model.named_parameters() if "amm_q_heads" not in n]
    head_params = list(amm.q_heads.parameters())

    def distance():
        with torch.no_grad():
            return amm.compute_loss(amm.model, inputs).item()

    amm.model.zero_grad()
    amm.compute_loss(amm.model, inputs).backward()
    before = distance()
    saved = [p.detach().clone() for p in amm.model.parameters()]
    with torch.no_grad():  # gradient DEscent on the trainer's loss is the head's ascent on D
        for p in head_params:
            p -= 0.05 * p.grad
    after_head = distance()
    with torch.no_grad():
        for p, s in zip(amm.model.parameters(), saved):
            p.copy_(s)
        for p in student_params:
            p -= 0.05 * p.grad
    after_student = distance()
    assert after_head > before > after_student


def test_distance_is_zero_when_student_equals_teacher(tiny, tiny_dataset, tmp_path):
    trainer = make_trainer(tiny, tiny_dataset, tmp_path, student=tiny["teacher"], teacher=tiny["teacher"],
                           max_steps=1)
    for p in trainer.q_heads.parameters():
        p.data.normal_(0, 1.0)
    inputs = fixed_batch(trainer, tiny_dataset)
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, inputs)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    assert abs(loss.item()) < 1e-6
    for kind in ("on", "off"):
        assert abs(metrics[f"amm_gap/{kind}"]) < 1e-6 and metrics[f"tv/{kind}"] < 1e-6
        assert metrics[f"q_abs/{kind}"] > 0.1  # the head is not trivially zero


def test_training_changes_student_and_heads_and_logs_metrics(tiny, tiny_dataset, tmp_path):
    trainer = make_trainer(tiny, tiny_dataset, tmp_path, max_steps=3)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p)}
    assert {n for n in before if "amm_q_heads" in n} <= changed
    assert "lm_head.weight" in changed and "model.layers.0.self_attn.q_proj.weight" in changed
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3 and all(math.isfinite(h["loss"]) for h in logs)
    for key in ("amm_gap/on", "amm_gap/off", "tv/on", "tv/off", "logp_student/on", "logp_teacher/on",
                "q_abs/on", "rollout/tokens_per_second", "completions/mean_length", "step_time"):
        assert key in logs[-1], key
    # Heads have their own optimizer group at learning_rate * q_head_lr_multiplier.
    groups = trainer.optimizer.param_groups
    head_ids = {id(p) for p in trainer.q_heads.parameters()}
    head_group = [g for g in groups if {id(p) for p in g["params"]} == head_ids]
    assert len(head_group) == 1 and head_group[0]["weight_decay"] == 0.0
    assert head_group[0]["initial_lr"] == pytest.approx(1e-3 * 1.0)  # q_head_lr_multiplier default: the student's rate


def test_rkl_objective_reproduces_trl_reverse_kl_loss(tiny, tiny_dataset, tmp_path):
    """Same seed, same rollouts: our chunked reverse KL equals TRL's own JSD kernel at beta=1."""
    losses = {}
    for objective in ("rkl", "jsd"):
        trainer = make_trainer(tiny, tiny_dataset, tmp_path / objective, objective=objective, beta=1.0, max_steps=3)
        trainer.train()
        losses[objective] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses["rkl"] == pytest.approx(losses["jsd"], rel=1e-4)


def test_checkpoint_keeps_heads_out_of_the_student_and_resume_restores_them(tiny, tiny_dataset, tmp_path):
    from transformers import AutoModelForCausalLM

    trainer = make_trainer(tiny, tiny_dataset, tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    trainer.train()
    checkpoint = os.path.join(trainer.args.output_dir, "checkpoint-2")
    heads = load_file(os.path.join(checkpoint, HEADS_FILE))
    assert set(heads) == {"on.weight", "on.bias", "off.weight", "off.bias"}
    assert not any("amm_q_heads" in k for k in load_file(os.path.join(checkpoint, "model.safetensors")))
    AutoModelForCausalLM.from_pretrained(checkpoint)  # a plain student

    resumed = make_trainer(tiny, tiny_dataset, tmp_path, max_steps=2, save_strategy="no")
    resumed._load_from_checkpoint(checkpoint)
    for name, p in resumed.q_heads.state_dict().items():
        torch.testing.assert_close(p, heads[name], rtol=0, atol=0)


def test_policy_gradient_term_changes_gradient_not_loss(tiny, tiny_dataset, tmp_path):
    plain = make_trainer(tiny, tiny_dataset, tmp_path / "a", amm_beta=0.0)
    pg = make_trainer(tiny, tiny_dataset, tmp_path / "b", amm_beta=0.0, amm_policy_gradient=True, pg_clip=5.0)
    pg.model.load_state_dict(plain.model.state_dict())
    for p in list(plain.q_heads.parameters()):
        p.data.normal_(0, 0.5)
    pg.q_heads.load_state_dict(plain.q_heads.state_dict())
    inputs = fixed_batch(plain, tiny_dataset)
    results = []
    for trainer in (plain, pg):
        trainer.model.train()
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, inputs)
        loss.backward()
        results.append((loss.item(), trainer.model.lm_head.weight.grad.clone()))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    assert not torch.allclose(results[0][1], results[1][1])
    assert "pg/advantage_abs/on" not in pg._metrics["train"] and "pg/advantage_abs" in pg._metrics["train"]


def test_policy_gradient_term_carries_the_rollout_terms_weight(tiny, tiny_dataset, tmp_path):
    """The score-function term belongs to the rollouts' moment gap, weighted 1 - amm_beta: on the same batch its
    gradient (with it minus without it) at amm_beta 0.5 is half the one at amm_beta 0."""
    trainer = make_trainer(tiny, tiny_dataset, tmp_path, amm_beta=0.5, amm_policy_gradient=True, pg_clip=5.0)
    for p in list(trainer.q_heads.parameters()):
        p.data.normal_(0, 0.5)
    inputs = fixed_batch(trainer, tiny_dataset)
    params = [trainer.model.lm_head.weight]

    def pg_gradient(beta):
        trainer.args.amm_beta = beta  # the objective reads its settings when it builds the step's terms
        trainer.args.amm_policy_gradient = True
        with_pg = loss_and_grads(trainer, inputs, params)[1][0]
        trainer.args.amm_policy_gradient = False
        return with_pg - loss_and_grads(trainer, inputs, params)[1][0]

    half, whole = pg_gradient(0.5), pg_gradient(0.0)
    assert whole.abs().max() > 1e-4
    torch.testing.assert_close(half, 0.5 * whole, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("objective", ["sft", "fkl", "rkl", "tvd", "gkd", "imitkd", "seqkd"])
def test_every_objective_trains_and_uses_its_data(tiny, tiny_dataset, tmp_path, objective):
    overrides = {"objective": objective, "lmbda": 0.5}
    if objective == "seqkd":
        overrides["off_policy_source"] = "teacher"
    trainer = make_trainer(tiny, tiny_dataset, tmp_path, max_steps=3, **overrides)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3 and all(math.isfinite(h["loss"]) for h in logs)
    kinds = {k.split("/")[-1] for h in logs for k in h if k.startswith(("ce/", "fkl/", "rkl/", "tvd/", "gkd/",
                                                                         "imitkd/"))}
    expected = {"sft": {"off"}, "seqkd": {"off"}, "fkl": {"off"}, "rkl": {"on"}, "tvd": {"on"}}
    if objective in expected:
        assert kinds == expected[objective]
    if objective == "sft":
        assert trainer.teacher_model is None


def test_lmbda_schedule_is_seeded_by_step(tmp_path):
    """GKD's data kind per optimizer step: rollouts with probability lmbda, else off-policy data; the same draw on
    every rank and in a fresh (resumed) run."""
    gkd = get_objective(make_config(tmp_path, objective="gkd", lmbda=0.5))
    draws = [gkd.plan(4, Step(step, 40, 0, True)) for step in range(40)]
    resumed = get_objective(make_config(tmp_path, objective="gkd", lmbda=0.5))
    assert resumed.plan(4, Step(7, 40, 1, True)) == draws[7]  # step 7 after a resume, on rank 1
    on = sum(d.rollouts for d in draws)
    assert all(d.rollouts != d.off_policy and d.replay is None for d in draws) and 10 < on < 30
    always = get_objective(make_config(tmp_path, objective="gkd", lmbda=1.0))
    assert all(always.plan(4, Step(step, 40, 0, True)).rollouts for step in range(40))


def test_padded_teacher_vocab_shares_tokenizer_rows(tmp_path, tiny_dataset):
    from tests.tiny import build_tiny_assets

    assets = build_tiny_assets(str(tmp_path / "padded"), teacher_vocab_pad=16)  # 64 vs 80, like 151936 vs 152064
    trainer = make_trainer(assets, tiny_dataset, tmp_path, max_steps=1)
    assert trainer.vocab_size == 64 and trainer.q_heads.on.weight.shape[0] == 64
    trainer.train()
    assert math.isfinite(trainer.state.log_history[0]["loss"])


def test_vocab_mismatch_is_refused(tmp_path, tiny_dataset, tiny):
    from tests.tiny import build_model

    teacher = build_model(48, hidden=16, layers=1)  # fewer rows than the 64-token tokenizer: not a shared vocab
    with pytest.raises(ValueError, match="vocab_size 64 and the teacher 48"):
        AMMTrainer(model=tiny["student"], teacher_model=teacher,
                   args=make_config(tmp_path, teacher_model_init_kwargs=None),
                   train_dataset=tiny_dataset)


def test_dataset_without_prompt_column_is_refused(tiny, tiny_dataset, tmp_path):
    with pytest.raises(ValueError, match="no 'prompt' column"):
        make_trainer(tiny, tiny_dataset.rename_column("prompt", "instruction"), tmp_path)
    with pytest.raises(ValueError, match="no 'answer' column.*off_policy_column"):
        make_trainer(tiny, tiny_dataset, tmp_path, off_policy_column="answer")


@pytest.mark.parametrize("field,value,message", [
    ("amm_beta", 1.5, r"AMMConfig.amm_beta=1.5 is invalid: it must lie in \[0, 1\]"),
    ("lmbda", -0.1, r"AMMConfig.lmbda=-0.1 is invalid"),
    ("q_bound", 0.0, r"AMMConfig.q_bound=0.0 is invalid: the Q-head bound c must be > 0"),
    ("objective", "ppo", r"AMMConfig.objective='ppo' is invalid: choose one of"),
    ("q_head_type", "mlp", r"AMMConfig.q_head_type='mlp' is invalid"),
    ("beta", 2.0, r"beta must be in \[0.0, 1.0\]"),
    ("skew_alpha", 1.5, r"AMMConfig.skew_alpha=1.5 is invalid: it must lie in \[0, 1\]"),
    ("distillm_loss", "kl", r"AMMConfig.distillm_loss='kl' is invalid: choose one of"),
    ("distillm_init_threshold", -0.1, r"AMMConfig.distillm_init_threshold=-0.1 is invalid"),
    ("replay_buffer_size", 0, r"AMMConfig.replay_buffer_size=0 is invalid: use an integer >= 1"),
    ("ppo_clip", 0.0, r"AMMConfig.ppo_clip=0.0 is invalid: it must be > 0"),
    ("ppo_epochs", 0, r"AMMConfig.ppo_epochs=0 is invalid"),
    ("minillm_gamma", 1.1, r"AMMConfig.minillm_gamma=1.1 is invalid"),
    ("minillm_kd_ratio", -1.0, r"AMMConfig.minillm_kd_ratio=-1.0 is invalid"),
    ("pbkd_bt_weight", -1.0, r"AMMConfig.pbkd_bt_weight=-1.0 is invalid"),
    ("minillm_teacher_mix", 1.5, r"AMMConfig.minillm_teacher_mix=1.5 is invalid"),
    ("vllm_importance_sampling_mode", "token", r"AMMConfig.vllm_importance_sampling_mode='token' is invalid: choose "
     r"one of \['token_truncate', 'token_mask', 'sequence_truncate', 'sequence_mask'\]"),
    ("vllm_importance_sampling_clip_min", 5.0,
     r"AMMConfig.vllm_importance_sampling_clip_min=5.0 is invalid: it must be < vllm_importance_sampling_clip_max"),
])
def test_invalid_fields_are_named(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        make_config(tmp_path, **{field: value})


def test_off_policy_objective_without_source_is_refused(tmp_path):
    with pytest.raises(ValueError, match="off_policy_source='none' is invalid.*use 'dataset' or 'teacher'"):
        make_config(tmp_path, objective="fkl", off_policy_source="none")


def test_low_rank_head_and_teacher_features_train(tiny, tiny_dataset, tmp_path):
    trainer = make_trainer(tiny, tiny_dataset, tmp_path, q_head_type="low_rank", q_head_features="teacher",
                           q_head_shared=True, max_steps=2)
    assert trainer.q_heads.on is trainer.q_heads.off
    assert trainer.q_heads.on.fc1.in_features == 48  # teacher hidden size
    trainer.train()
    assert all(math.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)


@pytest.mark.parametrize("extra", [{}, {"amm_beta": 0.0, "amm_policy_gradient": True}])  # + the score-function term
def test_head_warmup_trains_only_the_heads(tiny, tiny_dataset, tmp_path, extra):
    trainer = make_trainer(tiny, tiny_dataset, tmp_path, q_head_warmup_steps=3, **extra)
    for p in trainer.q_heads.parameters():
        p.data.normal_(0, 0.5)
    inputs = fixed_batch(trainer, tiny_dataset)
    student = [p for n, p in trainer.model.named_parameters() if "amm_q_heads" not in n]
    for step, student_learns in ((2, False), (3, True)):
        trainer.state.global_step = step
        trainer.model.zero_grad()
        trainer.compute_loss(trainer.model, inputs).backward()
        student_grad = sum(float(p.grad.abs().sum()) for p in student if p.grad is not None)
        assert (student_grad > 0) == student_learns, (step, student_grad)
        assert sum(float(p.grad.abs().sum()) for p in trainer.q_heads.parameters() if p.grad is not None) > 0


@pytest.mark.parametrize("attributes", [
    {}, {"logit_scale": 0.0}, {"logit_scale": None, "output_multiplier": 2.0}, {"lm_head_multiplier": 0.5},
    {"logits_scaling": 4.0}, {"logits_scaling": 4.0, "model_type": "hyperclovax"}, {"final_logit_softcapping": 30.0},
    {"logit_scale": 3.0, "lm_head_multiplier": 5.0, "logits_scaling": 2.0},
])
def test_logit_transform_is_the_one_trl_applies(tiny, tiny_dataset, tmp_path, monkeypatch, attributes):
    """The (scale, softcap) our projection applies equals what TRL's own `_compute_loss` passes to its kernel."""
    import trl.trainer.distillation_trainer as dt

    from amm_trl.projection import logit_transform

    trainer = make_trainer(tiny, tiny_dataset, tmp_path, objective="jsd", max_steps=1)
    inputs = fixed_batch(trainer, tiny_dataset)
    captured = {}

    def kernel(*args, **kwargs):
        captured.update(kwargs)
        raise StopIteration

    monkeypatch.setattr(dt, "_chunked_divergence_loss", kernel)
    for model in (trainer.model, trainer.teacher_model):
        for name, value in attributes.items():
            setattr(model.config.get_text_config(), name, value)
    with pytest.raises(StopIteration):
        dt.DistillationTrainer._compute_loss(trainer, trainer.model, inputs, None)
    for who, model in (("student", trainer.model), ("teacher", trainer.teacher_model)):
        want = (captured[f"{who}_logit_scale"], captured[f"{who}_final_logit_softcapping"])
        assert logit_transform(model.config.get_text_config()) == want


def test_gradient_clipping_is_the_objectives(tiny, tiny_dataset, tmp_path, monkeypatch):
    """Each optimizer step clips through the adversary's `clip`; the default is the Trainer's joint clip
    of the student and the heads, and the returned pre-clip norm is the logged one."""
    trainer = make_trainer(tiny, tiny_dataset, tmp_path, max_steps=2, max_grad_norm=1e-3)
    for p in trainer.q_heads.parameters():
        p.data.normal_(0, 0.5)
    norms = []

    def clip(model, default):
        before = float(default(model))
        after = sum(float(p.grad.norm()) ** 2 for p in model.parameters() if p.grad is not None) ** 0.5
        norms.append((before, after))
        return torch.tensor(before)

    monkeypatch.setattr(trainer.objective_unit.adversary, "clip", clip)
    trainer.train()
    logged = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    assert len(norms) == 2 and logged == pytest.approx([before for before, _ in norms])
    assert all(before > 1e-3 and after == pytest.approx(1e-3, rel=1e-3) for before, after in norms)
