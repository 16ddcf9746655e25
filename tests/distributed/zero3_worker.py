"""2-rank DeepSpeed ZeRO-3 worker on CPU (gloo), launched by tests/test_distributed.py with torchrun.

    torchrun --nproc_per_node 2 tests/distributed/zero3_worker.py PHASE ASSETS_DIR OUT_DIR [objective ...]

Phases:
  train   AMM for 2 steps (checkpoint at step 2); asserts student and Q-heads are really partitioned, the vLLM
          weight-sync iterator yields every student weight gathered and no Q-head weight; dumps each rank's head
          weights (gathered) and optimizer partition to OUT_DIR for the resume phase.
  resume  loads checkpoint-2: heads and optimizer partition must equal the dumps exactly; trains 2 more steps.
  peft    LoRA student + Q-heads under ZeRO-3: one step; the sync iterator (merge/unmerge path) yields no head and
          no adapter weight, and the merged weights have full shapes.
  objectives  each objective named on the command line trains 2 steps: losses, logged metrics, lm_head change.
Rank 0 writes OUT_DIR/<phase>.json with what it measured; any failed assertion exits non-zero.
"""

import json
import math
import os
import sys

import torch
import torch.distributed as dist

PHASE, ASSETS, OUT = sys.argv[1], sys.argv[2], sys.argv[3]
EXTRA = sys.argv[4:]


def config(output_dir, **overrides):
    from amm_trl import AMMConfig

    ds = {
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                              "stage3_gather_16bit_weights_on_model_save": True},
        "bf16": {"enabled": False},
    }
    kwargs = dict(output_dir=output_dir, use_cpu=True, bf16=False, deepspeed=ds, gradient_checkpointing=False,
                  per_device_train_batch_size=2, gradient_accumulation_steps=2, max_completion_length=6,
                  learning_rate=1e-2, max_steps=2, save_steps=2, save_strategy="steps", logging_steps=1,
                  report_to="none", seed=7, objective="amm", model_init_kwargs={"dtype": "float32"},
                  teacher_model_init_kwargs={"dtype": "float32"}, lr_scheduler_type="constant",
                  q_head_lr_multiplier=5.0)  # the heads' group at its own rate
    kwargs.update(overrides)
    kwargs.update(json.loads(os.environ.get("AMM_TEST_OVERRIDES", "{}")))  # for debugging a single run
    return AMMConfig(**kwargs)


def trainer_for(args, peft_config=None):
    from datasets import load_dataset

    from amm_trl import AMMTrainer

    ds = load_dataset("json", data_files=os.path.join(ASSETS, "data.jsonl"), split="train")
    return AMMTrainer(model=os.path.join(ASSETS, "student"), teacher_model=os.path.join(ASSETS, "teacher"),
                      args=args, train_dataset=ds, peft_config=peft_config)


def sync_stream(trainer):
    """Runs the vLLM weight-sync iterator exactly as `VLLMGeneration.sync_weights` does (all ranks iterate)."""
    from trl.distributed import DistributedBackend

    from amm_trl.rollouts import HeadFreeVLLMGeneration

    generator = object.__new__(HeadFreeVLLMGeneration)  # no vLLM engine on CPU: only the iterator is exercised
    generator.model = trainer.accelerator.unwrap_model(trainer.model_wrapped)
    generator.accelerator = trainer.accelerator
    generator._dist = DistributedBackend(trainer.accelerator)
    return [(name, tuple(p.shape), float(p.float().abs().sum())) for name, p in generator._iter_named_params()]


def head_state(trainer):
    import deepspeed

    params = dict(trainer.q_heads.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        return {n: p.detach().clone() for n, p in params.items()}


def optimizer_partition(trainer):
    opt = trainer.deepspeed.optimizer  # DeepSpeedZeroOptimizer_Stage3: this rank's fp32 master + Adam moments
    flat = [t.detach().clone() for t in opt.fp32_partitioned_groups_flat]
    moments = [{k: v.detach().clone() for k, v in opt.optimizer.state[p].items() if torch.is_tensor(v)}
               for p in opt.fp32_partitioned_groups_flat]
    return flat, moments


def gathered_lm_head(trainer):
    """The student's full `lm_head` weight (every rank takes part in the gather)."""
    import deepspeed

    weight = trainer.accelerator.unwrap_model(trainer.model_wrapped).get_output_embeddings().weight
    with deepspeed.zero.GatheredParameters([weight]):
        return weight.detach().float().clone()


def finite_losses(trainer):
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and all(math.isfinite(x) for x in losses), losses
    return losses


def main():
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    rank = int(os.environ.get("RANK", 0))
    result = {}
    if PHASE == "train":
        trainer = trainer_for(config(os.path.join(OUT, "run")))
        trainer.train()
        assert is_deepspeed_zero3_enabled()
        heads = dict(trainer.q_heads.named_parameters())
        student = {n: p for n, p in trainer.model.named_parameters() if "amm_q_heads" not in n}
        # Partitioned: the local tensor is empty, the full size lives in ds_numel.
        for name, p in list(heads.items()) + list(student.items()):
            assert hasattr(p, "ds_numel") and p.numel() == 0 and p.ds_numel > 0, (name, p.shape)
        result["partitioned"] = {n: [list(p.ds_shape), p.ds_tensor.numel()] for n, p in heads.items()}
        # Both ranks hold a slice of every head parameter, the two slices cover it.
        sizes = torch.tensor([p.ds_tensor.numel() for p in heads.values()])
        dist.all_reduce(sizes)
        assert all(int(s) >= p.ds_numel for s, p in zip(sizes, heads.values()))
        # Distinct optimizer groups: the heads' lr is learning_rate * q_head_lr_multiplier.
        result["lrs"] = [g["lr"] for g in trainer.optimizer.param_groups]
        stream = sync_stream(trainer)
        names = [n for n, _, _ in stream]
        assert not any("amm_q_heads" in n for n in names), names
        expected = {n: tuple(p.ds_shape) for n, p in student.items()}
        assert {n: s for n, s, _ in stream} == expected, "sync stream must be every student weight, gathered"
        result["stream"] = len(stream)
        result["losses"] = finite_losses(trainer)
        result["metrics"] = [h for h in trainer.state.log_history if "amm_gap/on" in h][-1]
        torch.save({"heads": head_state(trainer), "optimizer": optimizer_partition(trainer)},
                   os.path.join(OUT, f"state_rank{rank}.pt"))
        checkpoint = os.path.join(OUT, "run", "checkpoint-2")
        result["checkpoint_files"] = sorted(os.listdir(checkpoint))
    elif PHASE == "resume":
        from transformers import TrainerCallback

        saved = torch.load(os.path.join(OUT, f"state_rank{rank}.pt"))
        checkpoint = os.path.join(OUT, "run", "checkpoint-2")
        captured = {}

        class CaptureAfterLoad(TrainerCallback):
            # on_train_begin runs after the checkpoint is loaded and before the first resumed step.
            def on_train_begin(self, args, state, control, **kwargs):
                captured.update(step=state.global_step, heads=head_state(trainer),
                                optimizer=optimizer_partition(trainer))

        trainer = trainer_for(config(os.path.join(OUT, "run"), max_steps=4))
        trainer.add_callback(CaptureAfterLoad())
        trainer.train(resume_from_checkpoint=checkpoint)
        assert captured["step"] == 2, captured["step"]
        for name, tensor in saved["heads"].items():
            diff = (captured["heads"][name] - tensor).abs().max().item()
            assert torch.equal(captured["heads"][name], tensor), f"head {name} not restored (max diff {diff})"
        flat, moments = captured["optimizer"]
        for a, b in zip(flat, saved["optimizer"][0]):
            assert torch.equal(a, b), "fp32 master partition not restored"
        for a, b in zip(moments, saved["optimizer"][1]):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "Adam moments not restored"
        result["restored_heads"] = sorted(saved["heads"])
        result["optimizer_tensors_compared"] = len(flat) + sum(len(m) for m in moments)
        assert trainer.state.global_step == 4
        result["losses"] = finite_losses(trainer)
    elif PHASE == "peft":
        from peft import LoraConfig

        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
        trainer = trainer_for(config(os.path.join(OUT, "peft"), max_steps=1, save_strategy="no"), peft_config=lora)
        trainer.train()
        stream = sync_stream(trainer)
        names = [n for n, _, _ in stream]
        assert not any("amm_q_heads" in n or "lora_" in n for n in names), names
        assert all(len(s) > 0 and math.prod(s) > 0 for _, s, _ in stream), "merged weights must be gathered"
        base = {n.replace("base_model.model.", "").replace(".base_layer", "") for n, p in
                trainer.accelerator.unwrap_model(trainer.model_wrapped).named_parameters()
                if "lora_" not in n and "amm_q_heads" not in n}
        assert set(names) == base, (set(names) ^ base)
        result["stream"] = len(stream)
        result["losses"] = finite_losses(trainer)
    elif PHASE == "objectives":
        result.update(losses={}, logged={}, distillm_source={}, lm_head_change={})
        for objective in EXTRA:
            overrides = {"objective": objective, "save_strategy": "no"}
            if objective == "seqkd":
                overrides["off_policy_source"] = "teacher"
            if objective == "distillm":  # seed 9: step 0 on rollouts (p = 1), step 1 on the replay buffer
                overrides.update(distillm_init_threshold=1.0, seed=9)
            if objective == "minillm":  # step 1 replays step 0's rollouts (second PPO epoch)
                overrides["ppo_epochs"] = 2
            trainer = trainer_for(config(os.path.join(OUT, objective), **overrides))
            before = gathered_lm_head(trainer)
            trainer.train()
            logs = [h for h in trainer.state.log_history if "loss" in h]
            result["losses"][objective] = finite_losses(trainer)
            result["logged"][objective] = sorted({k for h in logs for k in h})
            result["distillm_source"][objective] = [h["distillm/source"] for h in logs if "distillm/source" in h]
            result["lm_head_change"][objective] = float((gathered_lm_head(trainer) - before).abs().sum())
            del trainer
    if rank == 0:
        with open(os.path.join(OUT, f"{PHASE}.json"), "w") as f:
            json.dump(result, f, indent=1, default=str)
    dist.barrier()


if __name__ == "__main__":
    main()
