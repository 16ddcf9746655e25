"""Checks at the door: model paths, the teacher's tokenizer and prompt lengths, each failing with the field and the
fix before any model is loaded or any step is run."""

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


def context_length(*configs) -> int | None:
    """The smallest `max_position_embeddings` of the given model configs (None if none declares one)."""
    lengths = [getattr(c.get_text_config(), "max_position_embeddings", None) for c in configs if c is not None]
    lengths = [n for n in lengths if isinstance(n, int) and n > 0]
    return min(lengths) if lengths else None


class PromptLengthMixin:
    """Trainer mixin: prompts never run past the models' context.

    With `max_prompt_length` set, longer prompts are cut from the left (the end holds the question and the generation
    prompt), and a warning counts the cut rows (`prompts/truncated` is logged too). Without it, a prompt that leaves no
    room for `max_completion_length` tokens within the context (`max_position_embeddings` of student and teacher)
    is refused, with the count and the fix. Map-style datasets are checked once at start; every batch is checked as
    it is tokenized (iterable datasets, eval sets)."""

    _prompt_warned = False

    def _prompt_context(self) -> int | None:
        teacher = getattr(self, "teacher_model", None)
        teacher_config = self.accelerator.unwrap_model(teacher).config if teacher is not None else None
        return context_length(self.model.config, teacher_config)

    def _prompt_limit(self) -> tuple[int | None, str]:
        """(longest allowed prompt in tokens, why)."""
        args, context = self.args, self._prompt_context()
        if args.max_prompt_length is not None:
            if context is not None and args.max_prompt_length + self.max_completion_length > context:
                raise ValueError(
                    f"AMMConfig.max_prompt_length={args.max_prompt_length} plus max_completion_length="
                    f"{self.max_completion_length} exceeds the models' context of {context} tokens "
                    f"(max_position_embeddings): set max_prompt_length <= {context - self.max_completion_length}.")
            return args.max_prompt_length, f"max_prompt_length={args.max_prompt_length}"
        if context is None:
            return None, ""
        return context - self.max_completion_length, (f"the models' context of {context} tokens "
                                                      f"(max_position_embeddings) minus max_completion_length="
                                                      f"{self.max_completion_length}")

    def _prompt_length_verdict(self, lengths: list[int], where: str) -> int:
        """Warns about or refuses the prompts longer than the limit; returns how many are cut."""
        limit, why = self._prompt_limit()
        if limit is None:
            return 0
        too_long = [n for n in lengths if n > limit]
        if not too_long:
            return 0
        if self.args.max_prompt_length is None:
            raise ValueError(
                f"{len(too_long)} of {len(lengths)} prompts of {where} are longer than {limit} tokens ({why}); the "
                f"longest has {max(too_long)}. The models cannot attend past their context. Set max_prompt_length "
                f"(prompts are then cut from the left, with a warning), lower max_completion_length, or filter them.")
        if not self._prompt_warned and self.accelerator.is_main_process:
            warnings.warn(f"{len(too_long)} of {len(lengths)} prompts of {where} are longer than {why} tokens "
                          f"(longest {max(too_long)}) and are cut from the left to {limit} tokens.")
        self._prompt_warned = True
        return len(too_long)

    def check_prompt_lengths(self, datasets: dict) -> None:
        """Checks every prompt of the map-style datasets once, before training starts."""
        flat = {}
        for name, dataset in datasets.items():  # an eval dict holds several named sets
            flat.update({f"{name}[{k!r}]": v for k, v in dataset.items()} if isinstance(dataset, dict)
                        else {name: dataset})
        for name, dataset in flat.items():
            if dataset is None or not hasattr(dataset, "__len__") or "prompt" not in (dataset.column_names or []):
                continue
            lengths = []
            for start in range(0, len(dataset), 1024):
                prompts = dataset[start:start + 1024]["prompt"]
                lengths += [len(ids) for ids in self._raw_prompt_ids(prompts)]
            self._prompt_length_verdict(lengths, name)

    def _raw_prompt_ids(self, prompts: list) -> list[list[int]]:
        return super()._tokenize_prompts(prompts)[0]

    def _tokenize_prompts(self, prompts: list):
        prompt_ids, images, multimodal_fields = super()._tokenize_prompts(prompts)
        cut = self._prompt_length_verdict([len(ids) for ids in prompt_ids], "this batch")
        if cut:
            limit = self.args.max_prompt_length
            prompt_ids = [ids[-limit:] for ids in prompt_ids]
        if self.args.max_prompt_length is not None:
            mode = "train" if self.model.training else "eval"
            self._metrics[mode]["prompts/truncated"].append(cut / max(len(prompt_ids), 1))
        return prompt_ids, images, multimodal_fields
