"""Checks at the door: model paths and the teacher's tokenizer, each failing with the field and the fix before any
model is loaded. (Prompt lengths are checked where prompts are tokenized: `AMMTrainer._tokenize_prompts`.)"""

import os
import re
import warnings

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def check_model_path(field: str, value) -> None:
    """`value` must be a local model folder, or a hub id that can be resolved (offline: one in the local cache).

    Without this, a wrong path reaches `from_pretrained`, which answers e.g. "Repo id must be in the form
    'repo_name' or 'namespace/repo_name'" without saying which field or that it was looked for locally."""
    if not isinstance(value, str):
        return  # an instantiated model
    if os.path.isdir(value):
        if not any(os.path.exists(os.path.join(value, f)) for f in ("config.json", "adapter_config.json")):
            raise ValueError(f"{field}={value!r} is a folder without config.json, so it holds no saved model. Pass "
                             f"the folder `save_pretrained` wrote (with config.json and the weights).")
        return
    if os.path.exists(value):
        raise ValueError(f"{field}={value!r} is a file; pass the model's folder (with config.json), not a file in it.")
    if not _HUB_ID.match(value):
        raise ValueError(f"{field}={value!r} is neither a local folder (no such path) nor a hub model id of the form "
                         f"'name' or 'namespace/name'. Pass the folder of a saved model (with config.json).")
    if _hub_offline():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(value, "config.json"), str):
            raise ValueError(f"{field}={value!r} is neither a local folder (no such path) nor reachable offline: "
                             f"HF_HUB_OFFLINE is set and the hub cache has no {value!r}. Pass a local model folder, "
                             f"or download it first where the hub is reachable (`hf download {value}`).")


def _tokenizer_of(model, processing_class=None):
    """(tokenizer or None, name) of a model path or instance; a processor's tokenizer if it has one."""
    from transformers import AutoTokenizer

    if processing_class is not None:
        tok = getattr(processing_class, "tokenizer", processing_class)
        return tok, getattr(tok, "name_or_path", "") or "processing_class"
    name = model if isinstance(model, str) else getattr(model, "name_or_path", "") or ""
    if not name:
        return None, type(model).__name__
    try:
        return AutoTokenizer.from_pretrained(name), name
    except (OSError, ValueError, TypeError, KeyError):
        return None, name


def check_teacher_tokenizer(student, teacher, processing_class=None) -> None:
    """Refuses a teacher whose tokenizer is not the student's: the losses compare the two next-token distributions
    id by id, which only means something when every id is the same token in both. Same tokenizer, embedding
    matrices padded to different sizes (Qwen 151936 vs 152064) passes; the padding rows are cut later.

    The comparison is token -> id over the whole vocabulary (added tokens included), so two different tokenizers of
    one size (Mistral-7B and Llama-2 at 32000) are refused too."""
    student_tok, student_name = _tokenizer_of(student, processing_class)
    teacher_tok, teacher_name = _tokenizer_of(teacher)
    if student_tok is None or teacher_tok is None:
        from accelerate import PartialState

        missing, name = ("teacher", teacher_name) if teacher_tok is None else ("student", student_name)
        if PartialState().is_main_process:  # once, not once per rank
            warnings.warn(f"The {missing}'s tokenizer could not be loaded from {name!r}: amm-trl cannot check that "
                          f"the teacher shares the student's tokenizer; only the vocabulary sizes are compared.")
        return
    s_vocab, t_vocab = student_tok.get_vocab(), teacher_tok.get_vocab()
    if s_vocab == t_vocab:
        return
    s_by_id = {i: t for t, i in s_vocab.items()}
    t_by_id = {i: t for t, i in t_vocab.items()}
    shared = sorted(set(s_by_id) & set(t_by_id))
    differing = [i for i in shared if s_by_id[i] != t_by_id[i]]
    only_teacher = sorted(set(t_vocab) - set(s_vocab), key=t_vocab.get)
    only_student = sorted(set(s_vocab) - set(t_vocab), key=s_vocab.get)
    facts = []
    if differing:
        i = differing[0]
        facts.append(f"{len(differing)} of the {len(shared)} ids both have map to different tokens (e.g. id {i}: "
                     f"{s_by_id[i]!r} for the student, {t_by_id[i]!r} for the teacher)")
    if only_teacher:
        facts.append(f"the teacher has {len(only_teacher)} tokens the student lacks (e.g. {only_teacher[:3]})")
    if only_student:
        facts.append(f"the student has {len(only_student)} tokens the teacher lacks (e.g. {only_student[:3]})")
    raise ValueError(
        f"The teacher's tokenizer ({teacher_name!r}, {len(t_vocab)} tokens) is not the student's ({student_name!r}, "
        f"{len(s_vocab)} tokens): " + "; ".join(facts) + ". Distillation compares the two models' next-token "
        f"distributions id by id, so both must use one tokenizer (embedding matrices padded to different sizes are "
        f"fine). Use a teacher of the student's model family, or TRL's GOLDTrainer for cross-tokenizer distillation."
    )
