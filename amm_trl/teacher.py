"""The frozen teacher: loaded as TRL loads it, and the vocabulary it shares with the student.

`DistillationTrainer.__init__` loads the teacher inline and then refuses any vocabulary size that differs from the
student's, which rules out one tokenizer with differently padded embedding matrices (Qwen2.5 151936 vs 152064 rows).
So `AMMTrainer` loads it here, with TRL's `create_model_from_path` and TRL's kwargs handling, and hands TRL none.
"""

import torch
from trl.trainer.utils import create_model_from_path

from .checks import check_teacher_tokenizer


def needs_teacher(args, objective) -> bool:
    """The objective reads teacher logits, or the teacher writes the off-policy completions online."""
    return objective.info.reads_teacher or (args.off_policy_source == "teacher" and objective.data.off_policy)


def load_teacher(teacher_model, args, objective, student=None, processing_class=None):
    """The teacher model, or None if the objective never uses it (sft, seqkd on cached teacher data). Before it loads,
    its tokenizer is compared with the student's (`student`, a path or model, or `processing_class`; see
    `checks.check_teacher_tokenizer`). From a path it is loaded in the training precision unless
    `teacher_model_init_kwargs` says otherwise (TRL's fp32 default would double a frozen teacher's memory under
    bf16)."""
    if needs_teacher(args, objective) and teacher_model is None:
        raise ValueError(f"teacher_model is required for objective {args.objective!r}: pass "
                         f"AMMTrainer(teacher_model=...) (in a recipe or on the command line: "
                         f"teacher_model_name_or_path).")
    if teacher_model is None or not needs_teacher(args, objective):
        return None
    if student is not None:
        check_teacher_tokenizer(student, teacher_model, processing_class)
    if not isinstance(teacher_model, str):
        if args.teacher_model_init_kwargs is not None:
            raise ValueError("teacher_model_init_kwargs is set but teacher_model is already instantiated.")
        return teacher_model
    kwargs = dict(args.teacher_model_init_kwargs or {})
    dtype = kwargs.get("dtype") or ("bfloat16" if args.bf16 else "float16" if args.fp16 else "float32")
    kwargs["dtype"] = dtype if dtype == "auto" else getattr(torch, dtype)
    if args.teacher_model_revision is not None:
        kwargs.setdefault("revision", args.teacher_model_revision)
    if args.distributed_state.distributed_type in ["MULTI_GPU", "DEEPSPEED"]:
        kwargs["device_map"] = None  # as TRL: distributed training needs device_map=None
    kwargs.setdefault("trust_remote_code", args.trust_remote_code)
    return create_model_from_path(teacher_model, **kwargs)


def shared_vocab_size(student_vocab: int, teacher_vocab: int, tokenizer_vocab: int, objective) -> int:
    """The vocabulary rows both distributions are compared on: all of them when the sizes agree, else the
    tokenizer's (same tokenizer, embedding matrices padded differently: compare the real rows)."""
    if student_vocab == teacher_vocab:
        return student_vocab
    if tokenizer_vocab > min(student_vocab, teacher_vocab):
        raise ValueError(
            f"The student has vocab_size {student_vocab} and the teacher {teacher_vocab}, and the tokenizer has "
            f"{tokenizer_vocab} tokens: the two models do not share a vocabulary. Distillation compares full "
            f"next-token distributions; use a teacher with the student's tokenizer (or TRL's GOLD trainer for "
            f"cross-tokenizer distillation)."
        )
    if objective.info.trl_loss:
        raise ValueError(
            f"objective {objective.name!r} runs TRL's kernel, which needs equal vocab sizes ({student_vocab} vs "
            f"{teacher_vocab}); use objective 'gkd' with lmbda 1.0 (same loss, compares the {tokenizer_vocab} shared "
            f"tokenizer rows)."
        )
    return tokenizer_vocab


def suppress_padded_rows(generation_config, generation_kwargs: dict, vocab_size: int, rows: int) -> None:
    """Rollouts and teacher generations never sample an embedding row beyond the shared tokenizer: a padded row
    (Qwen2.5: 151936 or 152064 rows for 151665 tokens) is no token, and the other model may have no such row."""
    padded = list(range(vocab_size, rows))
    if padded:
        suppressed = list(generation_config.suppress_tokens or []) + padded
        generation_config.suppress_tokens = generation_kwargs["suppress_tokens"] = suppressed
