"""`vllm_importance_sampling_correction` on CPU, through TRL's real colocated-vLLM code path with a stand-in engine.

vLLM cannot run here, so the smallest surface is replaced: TRL's `is_vllm_available` (checked by
`DistillationTrainer.__init__` and `VLLMGeneration._init_vllm`), and the engine classes `vllm.LLM` / `SamplingParams`
as `trl.generation.vllm_generation` uses them. Everything else is TRL's and ours: `VLLMGeneration.__init__`,
`sync_weights`, `generate` (sampling params with our `logprobs=0`, `extract_logprobs`), the rollout buffer's shuffle
and split over gradient accumulation, and the loss.

`StandInLLM` samples from the student (an fp32 HF copy kept in sync by TRL's `load_weights` calls) and reports each
sampled token's log-prob as the true one plus a known perturbation delta(token, position), NaN for the first token
of its first request (vLLM reports NaN log-probs as None). So the trainer's log-prob minus vLLM's is -delta: the logged
mismatch is the injected one, and the ratios are exp(-delta), clipped or masked by hand below.
"""

import math
import os
from types import SimpleNamespace

import pytest
import torch

from tests.test_trainer import PAPER_CRITIC, make_trainer, reference_amm_loss

DELTAS = (-1.5, -0.3, 0.0, 0.4, 1.0)  # ratios exp(1.5) = 4.5 (beyond clip_max 3), 1.35, 1, 0.67, 0.37


def delta(token, position):
    return DELTAS[(token + position) % len(DELTAS)]


class StandInLLM:
    records = {}  # (prompt ids, completion ids) -> (true log-probs, reported log-probs)
    requested_logprobs = []

    def __init__(self, model, **kwargs):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        params = dict(self.model.named_parameters())

        def load_weights(weights):  # what TRL's colocated sync calls, with HF names
            for name, tensor in weights:
                params[name].data.copy_(tensor)

        self.llm_engine = SimpleNamespace(model_executor=SimpleNamespace(driver_worker=SimpleNamespace(
            model_runner=SimpleNamespace(model=SimpleNamespace(load_weights=load_weights)))))
        self.generator = torch.Generator().manual_seed(0)

    def reset_prefix_cache(self):
        pass

    @torch.no_grad()
    def generate(self, prompts, sampling_params=None, use_tqdm=False):
        StandInLLM.requested_logprobs.append(sampling_params.logprobs)
        eos = set(self.model.generation_config.eos_token_id)
        outputs = []
        for index, prompt in enumerate(prompts):
            ids, true = list(prompt["prompt_token_ids"]), []
            while len(true) < sampling_params.max_tokens and (len(true) == 0 or ids[-1] not in eos):
                logits = self.model(torch.tensor([ids])).logits[0, -1].float() / sampling_params.temperature
                log_p = torch.log_softmax(logits, -1)
                token = int(torch.multinomial(log_p.exp(), 1, generator=self.generator))
                ids.append(token)
                true.append(float(log_p[token]))
            completion = ids[len(prompt["prompt_token_ids"]):]
            reported = [lp + delta(t, i) for i, (t, lp) in enumerate(zip(completion, true))]
            if index == 0:
                reported[0] = math.nan
            StandInLLM.records[(tuple(prompt["prompt_token_ids"]), tuple(completion))] = (true, reported)
            logprobs = None
            if sampling_params.logprobs is not None:
                logprobs = [{t: SimpleNamespace(logprob=lp, rank=1)} for t, lp in zip(completion, reported)]
            outputs.append(SimpleNamespace(prompt_token_ids=prompt["prompt_token_ids"],
                                           outputs=[SimpleNamespace(token_ids=completion, logprobs=logprobs)]))
        return outputs


@pytest.fixture
def standin_vllm(monkeypatch):
    import trl.generation.vllm_generation as vg
    import trl.trainer.distillation_trainer as dt

    for module in (dt, vg):
        monkeypatch.setattr(module, "is_vllm_available", lambda *a, **k: True)
    monkeypatch.setattr(vg, "LLM", StandInLLM, raising=False)
    monkeypatch.setattr(vg, "SamplingParams", lambda **kw: SimpleNamespace(**kw), raising=False)
    StandInLLM.records, StandInLLM.requested_logprobs = {}, []
    environ = dict(os.environ)  # TRL's colocate setup exports RANK / WORLD_SIZE / MASTER_PORT for vLLM
    yield StandInLLM
    os.environ.clear()
    os.environ.update(environ)


def expected_weights(d, mode, clip_max=3.0):
    """By hand: d = trainer log-prob - vLLM log-prob per token (NaN: vLLM could not score it, ratio 1)."""
    d = [0.0 if math.isnan(x) else x for x in d]
    if mode == "token_truncate":
        return [min(math.exp(x), clip_max) for x in d]
    ratio = math.exp(sum(d))  # sequence_mask
    return [ratio if ratio <= clip_max else 0.0] * len(d)


def check_buffered_weights(slices, records, mode):
    """Each buffered rollout's `vllm_is_weight` row against the hand weights of its own tokens (found by its prompt
    and completion ids: TRL shuffled the generation batch before splitting it). Returns the |d| of the scored tokens
    and the ratios as logged (per token, or one per rollout)."""
    all_d, all_units = [], []
    for s in slices:
        want = torch.zeros_like(s["vllm_is_weight"])
        for i in range(s["completion_ids"].size(0)):
            prompt = s["prompt_ids"][i][s["prompt_mask"][i].bool()].tolist()
            completion = s["completion_ids"][i][s["completion_mask"][i].bool()].tolist()
            _, reported = records[(tuple(prompt), tuple(completion))]
            d = [math.nan if math.isnan(r) else -delta(t, j) for j, (t, r) in enumerate(zip(completion, reported))]
            w = expected_weights(d, mode)
            want[i, :len(w)] = torch.tensor(w)
            all_d += [abs(x) for x in d if not math.isnan(x)]
            all_units += w if mode.startswith("token") else w[:1]
        torch.testing.assert_close(s["vllm_is_weight"], want, rtol=1e-4, atol=1e-5)
    return all_d, all_units


@pytest.mark.parametrize("mode, chunk", [("token_truncate", None), ("sequence_mask", 3), (None, None)])
def test_importance_weights_follow_the_rollouts_and_weight_only_their_loss(tiny, tiny_dataset, tmp_path,
                                                                          standin_vllm, mode, chunk):
    """AMM (rollouts and dataset completions), batch 2 x 2 accumulation steps: one generation of 4 rollouts, shuffled
    and split by TRL. Each buffered rollout carries the weights of its own tokens; the logged mismatch and ratios are
    the injected ones; the loss is the naive AMM loss with the rollout terms weighted (the dataset terms not). With
    the correction off (`None`), vLLM is asked for no log-probs and nothing is weighted or logged."""
    overrides = dict(use_vllm=True, vllm_mode="colocate", per_device_train_batch_size=2, gradient_accumulation_steps=2,
                     loss_chunk_tokens=chunk)
    if mode is not None:
        overrides.update(vllm_importance_sampling_correction=True, vllm_importance_sampling_mode=mode)
    trainer = make_trainer(tiny, tiny_dataset, tmp_path, **PAPER_CRITIC, **overrides)
    assert trainer.vllm_generation.logprobs == (0 if mode else None)
    torch.manual_seed(0)
    for p in trainer.q_heads.parameters():  # a non-trivial adversary
        p.data.normal_(0, 0.5)
    trainer.model.train()
    trainer._prepare_inputs([tiny_dataset[i] for i in range(4)])
    slices = trainer._buffered_inputs
    assert standin_vllm.requested_logprobs == [0 if mode else None] and len(standin_vllm.records) == 4
    metrics = trainer._metrics["train"]
    if mode is None:
        assert all("vllm_is_weight" not in s for s in slices) and not any(k.startswith("sampling/") for k in metrics)
        return

    all_d, all_units = check_buffered_weights(slices, standin_vllm.records, mode)
    assert metrics["sampling/sampling_logp_difference/mean"] == [pytest.approx(sum(all_d) / len(all_d), abs=1e-4)]
    assert metrics["sampling/sampling_logp_difference/max"] == [pytest.approx(max(all_d), abs=1e-4)]
    assert metrics["sampling/importance_sampling_ratio/min"] == [pytest.approx(min(all_units), abs=1e-4)]
    assert metrics["sampling/importance_sampling_ratio/mean"] == [
        pytest.approx(sum(all_units) / len(all_units), abs=1e-4)]
    assert metrics["sampling/importance_sampling_ratio/max"] == [pytest.approx(max(all_units), abs=1e-4)]
    assert any(abs(u - 1.0) > 0.05 for u in all_units)  # the weights matter

    for s in slices:
        with torch.no_grad():
            weighted = trainer.compute_loss(trainer.model, s).item()
            plain = trainer.compute_loss(trainer.model, {k: v for k, v in s.items() if k != "vllm_is_weight"}).item()
            want_weighted = reference_amm_loss(trainer, s, on_weights=s["vllm_is_weight"])[0].item()
            want_plain = reference_amm_loss(trainer, s)[0].item()
        assert weighted == pytest.approx(want_weighted, rel=1e-5, abs=1e-7)
        assert plain == pytest.approx(want_plain, rel=1e-5, abs=1e-7)
        assert abs(weighted - plain) > 1e-5


def test_minillm_reuses_its_rollout_scoring_for_the_weights(tiny, tiny_dataset, tmp_path, standin_vllm, monkeypatch):
    """MiniLLM already scores its rollouts with the rollout-time student (PPO's old log-probs): the correction reuses
    them (one no-grad scoring pass, not two), and its weights multiply the rollout tokens' loss."""
    trainer = make_trainer(tiny, tiny_dataset, tmp_path, objective="minillm", minillm_teacher_mix=0.0, use_vllm=True,
                           vllm_mode="colocate", per_device_train_batch_size=2, gradient_accumulation_steps=2,
                           vllm_importance_sampling_correction=True, vllm_importance_sampling_mode="token_truncate")
    calls = []
    original = trainer._rollout_log_probs
    monkeypatch.setattr(trainer, "_rollout_log_probs", lambda *a, **k: calls.append(k) or original(*a, **k))
    trainer.model.train()
    trainer._prepare_inputs([tiny_dataset[i] for i in range(4)])
    assert calls == [{"teacher": True}]
    check_buffered_weights(trainer._buffered_inputs, standin_vllm.records, "token_truncate")
    s = trainer._buffered_inputs[0]
    with torch.no_grad():
        weighted = trainer.compute_loss(trainer.model, s).item()
        plain = trainer.compute_loss(trainer.model, {k: v for k, v in s.items() if k != "vllm_is_weight"}).item()
    assert math.isfinite(weighted) and abs(weighted - plain) > 1e-6


def test_weight_sync_sends_the_student_without_the_heads(tiny, tiny_dataset, tmp_path, standin_vllm):
    """TRL's colocated `sync_weights` through the trainer's generator: the engine receives exactly the weights of a
    plain student (names of a `from_pretrained` copy, values of the trained model), never a Q-head."""
    from transformers import AutoModelForCausalLM

    trainer = make_trainer(tiny, tiny_dataset, tmp_path, use_vllm=True, vllm_mode="colocate")
    for p in trainer.q_heads.parameters():
        p.data.normal_(0, 1.0)  # heads that differ from every student tensor
    engine = trainer.vllm_generation.llm.llm_engine.model_executor.driver_worker.model_runner.model
    received = []
    engine.load_weights = lambda weights: received.extend((n, t.detach().clone()) for n, t in weights)
    trainer.vllm_generation.sync_weights()
    plain = AutoModelForCausalLM.from_pretrained(tiny["student"])
    assert [n for n, _ in received] == [n for n, _ in plain.named_parameters()]
    model = dict(trainer.model.named_parameters())
    for name, tensor in received:
        torch.testing.assert_close(tensor, model[name], rtol=0, atol=0)
    assert len(list(trainer.q_heads.parameters())) > 0


def test_importance_sampling_correction_config_errors(tmp_path):
    from tests.test_trainer import make_config

    with pytest.raises(ValueError, match=r"AMMConfig.vllm_importance_sampling_correction=True is invalid: objective "
                                         r"'jsd' runs TRL's loss, which takes no token weights"):
        make_config(tmp_path, objective="jsd", vllm_importance_sampling_correction=True)
    with pytest.raises(ValueError, match=r"AMMConfig.vllm_importance_sampling_clip_max=None is invalid: a "
                                         r"'\*_truncate' mode needs a bound"):
        make_config(tmp_path, vllm_importance_sampling_mode="token_truncate", vllm_importance_sampling_clip_max=None)
