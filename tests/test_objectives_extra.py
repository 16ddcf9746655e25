"""DistiLLM, MiniLLM and reward-guided KD (PbKD) in AMMTrainer on CPU: losses and gradients against naive full-logit
references, the data schedules, the replay buffer / threshold checkpointing, and the recipes."""

import math
import os
import random

import pytest
import torch
import torch.nn.functional as F

from amm_trl import AMMTrainer
from amm_trl import objectives as O
from amm_trl.checkpoints import STATE_FILE
from amm_trl.objectives.distillm import DistillmState, ReplayBuffer, next_threshold, student_probability
from tests.test_trainer import (CHUNKS, PAPER_CRITIC, check_chunks, fixed_batch, grads, loss_and_grads, make_config,
                                make_trainer)


# --------------------------------------------------------------------------------------------------- helpers
def naive_logits(trainer, inputs, ids_key, mask_key):
    """Full student / teacher logits (valid completion tokens) and the student's detached hidden states."""
    model, teacher = trainer.model, trainer.teacher_model
    c_ids, c_mask = inputs[ids_key], inputs[mask_key]
    ids = torch.cat([inputs["prompt_ids"], c_ids], 1)
    att = torch.cat([inputs["prompt_mask"], c_mask], 1)
    width = c_ids.size(1)
    h_s = model.model(input_ids=ids, attention_mask=att).last_hidden_state[:, -width - 1:-1]
    with torch.no_grad():
        h_t = teacher.model(input_ids=ids, attention_mask=att).last_hidden_state[:, -width - 1:-1]
    valid = c_mask.bool()
    z_s = model.lm_head(h_s[valid]).float() / trainer.temperature
    z_t = teacher.lm_head(h_t[valid]).float() / trainer.temperature
    return z_s, z_t, c_ids[valid], valid, h_s


def student_params(trainer):
    return [p for n, p in trainer.model.named_parameters() if "amm_q_heads" not in n]


def metric(trainer, name):
    return trainer._metrics["train"][name][-1]


# ------------------------------------------------------------------------------------------------- DistiLLM
def test_replay_buffer_and_threshold_pieces():
    buf = ReplayBuffer(3)
    for i in range(5):
        buf.push([i], [i, i])
    assert len(buf) == 3 and [p for p, _ in buf.items] == [[2], [3], [4]]  # first in, first out
    assert len(buf.sample(3, random.Random(0))) == 3
    with pytest.raises(ValueError, match="cannot sample 4"):
        buf.sample(4, random.Random(0))
    assert next_threshold(0.2, None, 1.0, 0.1, 0.1) == 0.2  # first evaluation: nothing to compare with
    assert next_threshold(0.2, 1.0, 0.8, 0.1, 0.1) == 0.2  # improved by 20% >= 10%: keep
    assert next_threshold(0.2, 1.0, 0.95, 0.1, 0.1) == pytest.approx(0.3)  # improved by 5% < 10%: rise
    assert next_threshold(0.95, 1.0, 1.2, 0.1, 0.1) == 1.0  # capped
    assert student_probability(0.8, 25, 100) == pytest.approx(0.6)
    state = DistillmState(4, 0.5)
    state.buffer.push([1, 2], [3])
    state.update_on_eval(2.0, 0.1, 0.1)
    clone = DistillmState(4, 0.0)
    clone.load_state_dict(state.state_dict())
    assert clone.state_dict() == state.state_dict()


@CHUNKS
@pytest.mark.parametrize("loss_name", ["skl", "srkl"])
def test_distillm_loss_matches_naive_skew_divergence(tiny, tiny_dataset, tmp_path, loss_name, chunk):
    trainer = make_trainer(tiny, tiny_dataset, tmp_path, objective="distillm", distillm_loss=loss_name,
                           skew_alpha=0.3, loss_chunk_tokens=chunk)
    inputs = fixed_batch(trainer, tiny_dataset)  # threshold 0: reference completions
    check_chunks(trainer, inputs, chunk)
    assert "completion_ids" not in inputs and "off_completion_ids" in inputs
    params = student_params(trainer)
    loss, got = loss_and_grads(trainer, inputs, params)
    z_s, z_t, _, _, _ = naive_logits(trainer, inputs, "off_completion_ids", "off_completion_mask")
    p_s, p_t = torch.softmax(z_s.double(), -1), torch.softmax(z_t.double(), -1)
    if loss_name == "skl":  # KL(p_T || a p_T + (1-a) p_S)
        m = 0.3 * p_t + 0.7 * p_s
        want = (p_t * (p_t.log() - m.log())).sum(-1).mean()
    else:  # KL(p_S || (1-a) p_T + a p_S)
        m = 0.7 * p_t + 0.3 * p_s
        want = (p_s * (p_s.log() - m.log())).sum(-1).mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-4, abs=1e-6)
    want.float().backward()
    for g, w in zip(got, grads(params)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_distillm_schedule_student_replay_reference(tiny, tiny_dataset, tmp_path):
    trainer = make_trainer(tiny, tiny_dataset, tmp_path, objective="distillm", distillm_init_threshold=0.8,
                           max_steps=20)
    trainer.model.train()
    batch = [tiny_dataset[i] for i in range(4)]
    sources = []
    for step in range(12):
        trainer.state.global_step = step
        size_before = len(trainer.objective_unit.state.buffer)
        out = trainer._generate_and_score_completions(batch)
        on = "completion_ids" in out
        # the draw is the step-seeded one, with probability threshold * (1 - step / max_steps)
        assert on == (random.Random(3 * 1_000_003 + step).random() < 0.8 * (1 - step / 20))
        source = metric(trainer, "distillm/source")
        sources.append(source)
        if on:
            assert source == 2.0 and "completion_ids" in out and "off_completion_ids" not in out
            assert len(trainer.objective_unit.state.buffer) == size_before + 4
        elif size_before >= 4:  # replayed past rollouts: prompts and completions from the buffer
            assert source == 1.0 and "off_completion_ids" in out
            items = {(tuple(p), tuple(c)) for p, c in trainer.objective_unit.state.buffer.items}
            for p, pm, c, cm in zip(out["prompt_ids"].tolist(), out["prompt_mask"].tolist(),
                                    out["off_completion_ids"].tolist(), out["off_completion_mask"].tolist()):
                item = (tuple(t for t, m in zip(p, pm) if m), tuple(t for t, m in zip(c, cm) if m))
                assert item in items
        else:
            assert source == 0.0 and "off_completion_ids" in out
    assert {0.0, 1.0, 2.0} <= set(sources) or (2.0 in sources and 1.0 in sources)
    # eval batches are always the reference completions and never touch the buffer
    size = len(trainer.objective_unit.state.buffer)
    trainer.model.eval()
    out = trainer._generate_and_score_completions(batch)
    assert "completion_ids" not in out and len(trainer.objective_unit.state.buffer) == size


def test_distillm_threshold_rises_when_eval_loss_plateaus(tiny, tiny_dataset, tmp_path):
    trainer = make_trainer(tiny, tiny_dataset, tmp_path, objective="distillm", distillm_init_threshold=0.2,
                           per_device_eval_batch_size=4)
    trainer.eval_dataset = tiny_dataset.select(range(8))
    first = trainer.evaluate()
    assert trainer.objective_unit.state.threshold == 0.2 and first["eval_distillm_threshold"] == 0.2
    second = trainer.evaluate()  # same model, same loss: no 10% improvement
    assert second["eval_loss"] == pytest.approx(first["eval_loss"], rel=1e-6)
    assert trainer.objective_unit.state.threshold == pytest.approx(0.3)
    assert second["eval_distillm_threshold"] == pytest.approx(0.3)


def test_distillm_replay_buffer_and_threshold_survive_checkpoint_resume(tiny, tiny_dataset, tmp_path):
    from transformers import TrainerCallback

    eval_set = tiny_dataset.select(range(4))
    kwargs = dict(objective="distillm", distillm_init_threshold=0.9, distillm_loss_eps=10.0,  # rises every eval
                  eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=4, save_strategy="steps",
                  save_steps=3)
    def build(max_steps):
        return AMMTrainer(model=tiny["student"], teacher_model=tiny["teacher"], train_dataset=tiny_dataset,
                          eval_dataset=eval_set, args=make_config(tmp_path, max_steps=max_steps, **kwargs))

    trainer = build(3)
    trainer.train()
    saved = trainer.objective_unit.state.state_dict()
    assert len(saved["buffer"]["items"]) > 0 and saved["threshold"] == pytest.approx(1.0)
    assert saved["previous_eval_loss"] is not None
    checkpoint = os.path.join(trainer.args.output_dir, "checkpoint-3")
    path = os.path.join(checkpoint, STATE_FILE.format(name="distillm", rank=0))
    assert torch.load(path, weights_only=False) == saved

    captured = {}

    class Capture(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            captured.update(step=state.global_step, state=resumed.objective_unit.state.state_dict())

    resumed = build(4)
    assert len(resumed.objective_unit.state.buffer) == 0 and resumed.objective_unit.state.threshold == 0.9
    resumed.add_callback(Capture())
    resumed.train(resume_from_checkpoint=checkpoint)
    assert captured["step"] == 3 and captured["state"] == saved


# -------------------------------------------------------------------------------------------------- MiniLLM
def test_minillm_advantages_and_old_logp_equal_objectives_computation(tiny, tiny_dataset, tmp_path):
    trainer = make_trainer(tiny, tiny_dataset, tmp_path, objective="minillm", minillm_gamma=0.9,
                           minillm_teacher_mix=0.0)
    inputs = fixed_batch(trainer, tiny_dataset)
    with torch.no_grad():
        z_s, z_t, y, valid, _ = naive_logits(trainer, inputs, "completion_ids", "completion_mask")
    logp_s = torch.zeros(valid.shape)
    logp_t = torch.zeros(valid.shape)
    logp_s[valid] = torch.log_softmax(z_s, -1).gather(-1, y[:, None]).squeeze(-1)
    logp_t[valid] = torch.log_softmax(z_t, -1).gather(-1, y[:, None]).squeeze(-1)
    mask = valid.float()
    # hand-written returns: G_t = sum_{k>t} 0.9^(k-t-1) r_k, divided by the number of future tokens, whitened
    rewards = (logp_t - logp_s) * mask
    returns = torch.zeros_like(rewards)
    for b in range(rewards.size(0)):
        n = int(mask[b].sum())
        for t in range(n):
            future = [0.9 ** (k - t - 1) * rewards[b, k] for k in range(t + 1, n)]
            returns[b, t] = sum(future) / max(1, len(future)) if future else 0.0
    mean = returns[valid].mean()
    std = returns[valid].std()
    want = (returns - mean) / torch.sqrt(std ** 2 + 1e-8) * mask
    torch.testing.assert_close(inputs["minillm_old_logp"], logp_s, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(inputs["minillm_advantages"], want, rtol=1e-4, atol=1e-5)
    # same as the objectives-level pipeline
    pipeline = O.whiten(O.length_normalize(O.reward_to_go(rewards, mask, 0.9, include_current=False), mask,
                                           include_current=False), mask)
    torch.testing.assert_close(inputs["minillm_advantages"], pipeline, rtol=1e-4, atol=1e-5)


def test_minillm_first_epoch_ratio_is_one_and_gradient_is_reinforce(tiny, tiny_dataset, tmp_path):
    trainer = make_trainer(tiny, tiny_dataset, tmp_path, objective="minillm", minillm_kd_ratio=0.3,
                           minillm_teacher_mix=0.0)
    inputs = fixed_batch(trainer, tiny_dataset)
    params = student_params(trainer)
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    got = grads(params)
    assert metric(trainer, "ppo_ratio/on") == pytest.approx(1.0, abs=1e-5)
    assert metric(trainer, "ppo_clipped/on") == 0.0

    trainer.model.zero_grad()
    z_s, z_t, y, valid, _ = naive_logits(trainer, inputs, "completion_ids", "completion_mask")
    adv = inputs["minillm_advantages"][valid]
    logp = torch.log_softmax(z_s, -1).gather(-1, y[:, None]).squeeze(-1)
    p_s, log_ps, log_pt = torch.softmax(z_s, -1), torch.log_softmax(z_s, -1), torch.log_softmax(z_t, -1)
    rkl = (p_s * (log_ps - log_pt)).sum(-1)
    # vanilla REINFORCE surrogate: -A_t log p_S(y_t) (value -A_t at ratio 1) + exact single-step reverse KL
    on = (rkl - adv * logp + adv * logp.detach() - adv).sum() / valid.sum()
    zo_s, zo_t, yo, valid_o, _ = naive_logits(trainer, inputs, "off_completion_ids", "off_completion_mask")
    ce = -torch.log_softmax(zo_s, -1).gather(-1, yo[:, None]).squeeze(-1)
    p_t = torch.softmax(zo_t, -1)
    fkl = (p_t * (torch.log_softmax(zo_t, -1) - torch.log_softmax(zo_s, -1))).sum(-1)
    off = (0.7 * ce + 0.3 * fkl).sum() / valid_o.sum()
    want = on + off
    assert loss.item() == pytest.approx(want.item(), rel=1e-4, abs=1e-6)
    want.backward()
    for g, w in zip(got, grads(params)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_minillm_clipping_engages_away_from_old_policy(tiny, tiny_dataset, tmp_path):
    trainer = make_trainer(tiny, tiny_dataset, tmp_path, objective="minillm", minillm_teacher_mix=0.0)
    inputs = fixed_batch(trainer, tiny_dataset)
    inputs["minillm_old_logp"] = inputs["minillm_old_logp"] - 1.0  # ratio e > 1 + clip: positive-A tokens clip
    with torch.no_grad():
        trainer.compute_loss(trainer.model, inputs)
    valid = inputs["completion_mask"].bool()
    positive = (inputs["minillm_advantages"][valid] > 0).float().mean().item()
    assert metric(trainer, "ppo_ratio/on") == pytest.approx(math.e, rel=1e-4)
    assert metric(trainer, "ppo_clipped/on") == pytest.approx(positive, abs=1e-6) and positive > 0


def test_teacher_mix_processor_scores_are_the_tempered_mixture(tiny):
    from transformers import AutoModelForCausalLM

    from amm_trl.objectives.minillm import TeacherMixProcessor

    teacher = AutoModelForCausalLM.from_pretrained(tiny["teacher"], dtype=torch.float32).eval()
    torch.manual_seed(0)
    ids = torch.tensor([[3, 3, 10, 11, 12], [13, 14, 15, 16, 17]])  # first row left-padded
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    processor = TeacherMixProcessor(teacher, 0.2, 0.7, 64, mask)
    for step in range(3):  # the first call runs the prompt, later ones one token each with the KV cache
        scores = torch.randn(2, 64)
        scores[0, 7] = -math.inf  # a token suppressed by an earlier processor
        mixed = processor(ids, scores)
        full_mask = torch.cat([mask, torch.ones(2, step, dtype=torch.long)], 1)
        with torch.no_grad():
            z_t = teacher(input_ids=ids, attention_mask=full_mask,
                          position_ids=(full_mask.cumsum(-1) - 1).clamp(min=0)).logits[:, -1]
        want = 0.2 * torch.softmax(z_t / 0.7, -1) + 0.8 * torch.softmax(scores / 0.7, -1)
        want[0, 7] = 0.0
        got = torch.softmax(mixed / 0.7, -1)  # generate's temperature warper runs after the processor
        torch.testing.assert_close(got, want / want.sum(-1, keepdim=True), rtol=1e-4, atol=1e-6)
        ids = torch.cat([ids, torch.multinomial(got, 1)], 1)


def test_minillm_teacher_mixed_rollouts_use_mixture_as_old_policy(tiny, tiny_dataset, tmp_path):
    trainer = make_trainer(tiny, tiny_dataset, tmp_path, objective="minillm", minillm_teacher_mix=0.2)
    inputs = fixed_batch(trainer, tiny_dataset)
    with torch.no_grad():
        z_s, z_t, y, valid, _ = naive_logits(trainer, inputs, "completion_ids", "completion_mask")
    p_s = torch.softmax(z_s, -1).gather(-1, y[:, None]).squeeze(-1)
    p_t = torch.softmax(z_t, -1).gather(-1, y[:, None]).squeeze(-1)
    mixture = 0.2 * p_t + 0.8 * p_s
    torch.testing.assert_close(inputs["minillm_old_logp"][valid], mixture.log(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(inputs["minillm_is_weight"][valid], p_s / mixture, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        trainer.compute_loss(trainer.model, inputs)
    # first epoch: the PPO ratio p_S / old policy is exactly the importance weight
    assert metric(trainer, "ppo_ratio/on") == pytest.approx((p_s / mixture).mean().item(), rel=1e-4)


def test_minillm_ppo_epochs_replay_the_rollout_batch(tiny, tiny_dataset, tmp_path, monkeypatch):
    trainer = make_trainer(tiny, tiny_dataset, tmp_path, objective="minillm", ppo_epochs=2, max_steps=4,
                           minillm_teacher_mix=0.0, gradient_accumulation_steps=2, per_device_train_batch_size=2)
    calls = []
    original = trainer._generate_and_score_completions
    monkeypatch.setattr(trainer, "_generate_and_score_completions", lambda b: calls.append(1) or original(b))
    trainer.train()
    assert len(calls) == 2  # 4 optimizer steps, 2 PPO epochs each rollout batch
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 4 and all(math.isfinite(h["loss"]) for h in logs)
    ratios = [h["ppo_ratio/on"] for h in logs]
    assert ratios[0] == pytest.approx(1.0, abs=1e-5) and ratios[2] == pytest.approx(1.0, abs=1e-5)
    assert abs(ratios[1] - 1.0) > 1e-6 and abs(ratios[3] - 1.0) > 1e-6  # second epoch: updated policy


# ----------------------------------------------------------------------------------------------------- PbKD
@pytest.fixture(params=[None, 3], ids=["one_chunk", "chunks_of_3"])
def pbkd(tiny, tiny_dataset, tmp_path, request):
    def build(**overrides):
        trainer = make_trainer(tiny, tiny_dataset, tmp_path, objective="pbkd", loss_chunk_tokens=request.param,
                               **{**PAPER_CRITIC, **overrides})
        torch.manual_seed(0)
        for p in trainer.q_heads.parameters():
            p.data.normal_(0, 0.5)
        return trainer

    return build


def naive_rewards(trainer, inputs):
    """(J(chosen = off-policy completion), J(rejected = rollout)) with J(y) = sum_t q(s_t)[y_t], and per-kind
    expected student reward sum over states of <p_S, q> (head fixed)."""
    head = trainer.q_heads.on
    totals, expected = {}, {}
    for kind, ids_key, mask_key in (("on", "completion_ids", "completion_mask"),
                                    ("off", "off_completion_ids", "off_completion_mask")):
        z_s, _, y, valid, h_s = naive_logits(trainer, inputs, ids_key, mask_key)
        q = trainer.args.q_bound * torch.tanh(F.linear(h_s[valid].detach(), head.weight, head.bias))
        per_token = q.gather(-1, y[:, None]).squeeze(-1)
        rows = valid.nonzero()[:, 0]
        totals[kind] = torch.zeros(valid.size(0)).index_add(0, rows, per_token)
        expected[kind] = (torch.softmax(z_s, -1) * q.detach()).sum()
    return totals["off"], totals["on"], expected


def test_pbkd_bt_gradient_matches_reference_and_pushes_chosen_reward_up(pbkd, tiny_dataset):
    with_bt, without_bt = pbkd(pbkd_bt_weight=2.0), pbkd(pbkd_bt_weight=0.0)
    without_bt.model.load_state_dict(with_bt.model.state_dict())
    inputs = fixed_batch(with_bt, tiny_dataset)
    check_chunks(with_bt, inputs, with_bt.args.loss_chunk_tokens)
    head_grads = []
    for trainer in (with_bt, without_bt):
        trainer.model.zero_grad()
        trainer.compute_loss(trainer.model, inputs).backward()
        head_grads.append(grads(list(trainer.q_heads.parameters())))
    bt_grad = [a - b for a, b in zip(*head_grads)]

    with_bt.model.zero_grad()
    chosen, rejected, _ = naive_rewards(with_bt, inputs)
    bt = O.bradley_terry_loss(chosen, rejected).mean() * 2.0
    bt.backward()
    for g, w in zip(bt_grad, grads(list(with_bt.q_heads.parameters()))):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    assert metric(with_bt, "pbkd/bt_loss") == pytest.approx(bt.item() / 2.0, rel=1e-5)

    margin = (chosen - rejected).mean().item()
    with torch.no_grad():
        for p, g in zip(with_bt.q_heads.parameters(), bt_grad):
            p -= 0.05 * g
        chosen2, rejected2, _ = naive_rewards(with_bt, inputs)
    assert (chosen2 - rejected2).mean().item() > margin
    assert chosen2.mean().item() > chosen.mean().item()  # r(chosen) goes up


def test_pbkd_student_gradient_increases_expected_reward(pbkd, tiny_dataset):
    trainer = pbkd()
    inputs = fixed_batch(trainer, tiny_dataset)
    trainer.model.zero_grad()
    trainer.compute_loss(trainer.model, inputs).backward()
    _, _, before = naive_rewards(trainer, inputs)
    beta = trainer.args.amm_beta
    with torch.no_grad():
        for p in student_params(trainer):
            if p.grad is not None:
                p -= 0.01 * p.grad
        _, _, after = naive_rewards(trainer, inputs)
    weighted = lambda e: (beta * e["off"] + (1 - beta) * e["on"]).item()  # noqa: E731
    assert weighted(after) > weighted(before)


def test_pbkd_trains_with_heads_in_their_own_group(tiny, tiny_dataset, tmp_path):
    trainer = make_trainer(tiny, tiny_dataset, tmp_path, objective="pbkd", max_steps=3)
    assert trainer.q_heads.on is trainer.q_heads.off  # one reward head
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p)}
    assert {n for n in before if "amm_q_heads" in n} <= changed and "lm_head.weight" in changed
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3 and all(math.isfinite(h["loss"]) for h in logs)
    for key in ("pbkd_gap/on", "pbkd_gap/off", "pbkd/bt_loss", "pbkd/bt_accuracy", "reward/on", "tv/on"):
        assert key in logs[-1], key
    head_ids = {id(p) for p in trainer.q_heads.parameters()}
    groups = [g for g in trainer.optimizer.param_groups if {id(p) for p in g["params"]} == head_ids]
    assert len(groups) == 1 and groups[0]["initial_lr"] == pytest.approx(1e-3 * trainer.args.q_head_lr_multiplier)


def test_pbkd_checkpoint_stores_the_shared_head_once_and_resume_restores_it(tiny, tiny_dataset, tmp_path):
    from safetensors.torch import load_file

    from amm_trl.trainer import HEADS_FILE

    trainer = make_trainer(tiny, tiny_dataset, tmp_path, objective="pbkd", max_steps=2, save_strategy="steps",
                           save_steps=2)
    trainer.train()
    checkpoint = os.path.join(trainer.args.output_dir, "checkpoint-2")
    heads = load_file(os.path.join(checkpoint, HEADS_FILE))
    assert set(heads) == {"on.weight", "on.bias"}
    trainer.save_model(str(tmp_path / "final"))  # the end-of-training save too
    resumed = make_trainer(tiny, tiny_dataset, tmp_path, objective="pbkd", max_steps=2)
    resumed._load_from_checkpoint(checkpoint)
    assert resumed.q_heads.on is resumed.q_heads.off
    for name, p in resumed.q_heads.on.state_dict().items():
        torch.testing.assert_close(p, heads[f"on.{name}"], rtol=0, atol=0)


# --------------------------------------------------------------------------------------- training, config
@pytest.mark.parametrize("objective,overrides", [
    ("distillm", {"distillm_init_threshold": 0.7}),
    ("distillm", {"distillm_loss": "srkl", "distillm_init_threshold": 0.0}),
    ("minillm", {}),
])
def test_new_objectives_train(tiny, tiny_dataset, tmp_path, objective, overrides):
    trainer = make_trainer(tiny, tiny_dataset, tmp_path, objective=objective, max_steps=3, **overrides)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3 and all(math.isfinite(h["loss"]) for h in logs)


def test_ppo_epochs_only_for_minillm(tmp_path):
    with pytest.raises(ValueError, match="AMMConfig.ppo_epochs=2 is invalid: it applies to objective 'minillm'"):
        make_config(tmp_path, objective="rkl", ppo_epochs=2)


# ------------------------------------------------------------------------ vLLM importance-sampling correction
def test_vllm_importance_weights_hand_computed_in_all_four_modes():
    """d = log p_trainer - log p_vLLM per token; rows: [ln2, -ln2, ln4], [-ln8, NaN (vLLM could not score), pad],
    [ln2, 0, pad]; bounds [0.2, 3]. Token ratios [2, .5, 4], [.125, 1], [2, 1]; sequence ratios 4, 1/8, 2."""
    ln = math.log
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 0]])
    d = torch.tensor([[ln(2), -ln(2), ln(4)], [-ln(8), 0.0, 0.0], [ln(2), 0.0, 0.0]], dtype=torch.float64)
    sampler = torch.full((3, 3), -1.5, dtype=torch.float64)
    sampler[1, 1] = math.nan
    sampler[1, 2] = sampler[2, 2] = 123.0  # padding: never read
    trainer = (sampler + d).masked_fill(mask == 0, 0.0)
    trainer[1, 1] = -0.7
    expected = {
        "token_truncate": [[2, .5, 3], [.2, 1, 0], [2, 1, 0]],
        "token_mask": [[2, .5, 0], [0, 1, 0], [2, 1, 0]],
        "sequence_truncate": [[3, 3, 3], [.2, .2, 0], [2, 2, 0]],
        "sequence_mask": [[0, 0, 0], [0, 0, 0], [2, 2, 0]],
    }
    for mode, want in expected.items():
        got = O.vllm_importance_weights(trainer.requires_grad_(), sampler, mask, mode, clip_min=0.2, clip_max=3.0)
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)
        assert not got.requires_grad, mode  # a constant weight
        trainer = trainer.detach()
    # One bound only: *_mask without a lower bound keeps small ratios; *_truncate without an upper one keeps big ones.
    torch.testing.assert_close(O.vllm_importance_weights(trainer, sampler, mask, "token_mask", None, 3.0)[1],
                               torch.tensor([.125, 1, 0], dtype=torch.float64))
    torch.testing.assert_close(O.vllm_importance_weights(trainer, sampler, mask, "sequence_truncate", 0.2, None)[0],
                               torch.tensor([4., 4., 4.], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"mode must be one of \['token_truncate', 'token_mask', 'sequence_trunc"):
        O.vllm_importance_weights(trainer, sampler, mask, "tokens")
    with pytest.raises(ValueError, match="needs clip_min or clip_max"):
        O.vllm_importance_weights(trainer, sampler, mask, "token_truncate", None, None)
