"""The frozen teacher: loaded as TRL loads it, and the vocabulary it shares with the student.

`DistillationTrainer.__init__` loads the teacher inline and then refuses any vocabulary size that differs from the
student's, which rules out one tokenizer with differently padded embedding matrices (Qwen2.5 151936 vs 152064 rows).
So `AMMTrainer` loads it here, with TRL's `create_model_from_path` and TRL's kwargs handling, and hands TRL none.
"""

import math
import os

import torch
from trl.trainer.utils import create_model_from_path

from .checks import check_teacher_tokenizer


def needs_teacher(args, objective) -> bool:
    """The teacher model runs in the training processes: it is placed there (`teacher_placement: local`), and the
    objective reads its logits or it writes the off-policy completions online."""
    if args.teacher_placement != "local":
        return False
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


# ---------------------------------------------------------------------------------------------- a teacher elsewhere


POOLER_CONFIG = '{"pooling_type": "ALL", "use_activation": false, "task": "token_embed"}'


class TeacherServerError(RuntimeError):
    """The teacher's vLLM server stopped answering during training."""


def pad_top_k(ids: list, log_probs: list, token_log_prob: list, width: int, k: int, vocab: int,
              device) -> dict[str, torch.Tensor]:
    """Per-sequence top-k lists (rows of T_i positions x k entries; the actual token's log-prob per position) as
    right-padded tensors (B, width, k) and (B, width): the batch's `teacher_topk_ids`, `teacher_topk_logprobs` (-inf in
    empty slots) and `teacher_token_logprob` (0 at padding). Ids outside the shared vocabulary (a padded embedding
    row) leave the top-k: their mass counts in the tail."""
    batch = len(ids)
    out_ids = torch.zeros(batch, width, k, dtype=torch.long)
    out_lp = torch.full((batch, width, k), -math.inf, dtype=torch.float32)
    out_token = torch.zeros(batch, width, dtype=torch.float32)
    for row, (row_ids, row_lp, row_token) in enumerate(zip(ids, log_probs, token_log_prob, strict=True)):
        n = min(len(row_ids), width)
        if n:
            kk = min(k, len(row_ids[0]))
            out_ids[row, :n, :kk] = torch.as_tensor([r[:kk] for r in row_ids[:n]], dtype=torch.long)
            out_lp[row, :n, :kk] = torch.as_tensor([r[:kk] for r in row_lp[:n]], dtype=torch.float32)
            out_token[row, :n] = torch.as_tensor(row_token[:n], dtype=torch.float32)
    out_lp = out_lp.masked_fill(out_ids >= vocab, -math.inf)
    return {"teacher_topk_ids": out_ids.to(device), "teacher_topk_logprobs": out_lp.to(device),
            "teacher_token_logprob": out_token.to(device)}


class ServedTeacher:
    """A teacher served by vLLM (`vllm serve TEACHER --max-logprobs K`, tensor-parallel as the user starts it): the
    top-k log-probs of every completion token through TRL's `VLLMClient.get_sequence_logprobs` (OpenAI
    `/v1/completions` with `prompt_logprobs`). Checked at start-up: the server answers, allows k log-probs, and
    returns log-probabilities (not logits)."""

    def __init__(self, base_url: str, top_k: int, timeout: float, output: str = "top_k",
                 hidden_size: int | None = None, request_timeout: float = 300.0):
        from trl.generation.vllm_client import VLLMClient

        from .rollouts import wait_for_health

        self.base_url, self.k = base_url.rstrip("/"), top_k
        problem = wait_for_health(self.base_url, timeout)  # TRL's own health check has no request timeout
        if problem is not None:
            raise ConnectionError(f"teacher_server_base_url={base_url!r}: no vLLM server answered within "
                                  f"teacher_server_timeout={timeout} s (last attempt: {problem}). Start the teacher "
                                  f"first, e.g. `vllm serve TEACHER --port PORT --max-logprobs {max(top_k, 20)}`, "
                                  f"and check the address; raise teacher_server_timeout if it is still loading.")
        self.client = VLLMClient(base_url=self.base_url)
        self.request_timeout = request_timeout
        bound_requests(self.client.session, request_timeout)
        self.output = output
        self.check() if output == "top_k" else self.check_hidden(hidden_size)

    def check_hidden(self, hidden_size: int | None) -> None:
        """A pooling server that returns every position's last hidden state, of the teacher's width."""
        try:
            (h,) = self.hidden_states([[0, 1]], [[2]])
        except TeacherServerError as exc:
            raise ValueError(f"teacher_server_output 'hidden_states': the server at {self.base_url} gives no token "
                             f"hidden states ({exc}). Start it as a pooling server: `vllm serve TEACHER --runner "
                             f"pooling --pooler-config '{POOLER_CONFIG}'`.") from exc
        if h.dim() != 2 or (hidden_size is not None and h.size(-1) != hidden_size):
            raise ValueError(f"teacher_server_output 'hidden_states': the server at {self.base_url} returns vectors "
                             f"of shape {tuple(h.shape)} per sequence, not one {hidden_size}-wide hidden state per "
                             f"token: start it with --pooler-config '{POOLER_CONFIG}' and serve the teacher named by "
                             f"teacher_model_name_or_path.")

    def check(self) -> None:
        probe = [[0, 1, 2]]
        try:
            out = self.client.get_sequence_logprobs(probe, [1], top_logprobs=self.k)
        except Exception as exc:
            if "logprobs" in str(exc).lower():
                raise ValueError(f"The teacher server at {self.base_url} refuses {self.k} log-probs per token "
                                 f"(teacher_top_k={self.k}): restart it with `--max-logprobs {self.k}` (vLLM's "
                                 f"default is 20), or lower teacher_top_k. The server said: {exc}") from exc
            raise self._stopped(exc) from exc
        covered = torch.logsumexp(torch.tensor(out["logprobs"][0][0], dtype=torch.float64), 0).item()
        if covered > 1e-3:
            raise ValueError(f"The teacher server at {self.base_url} returns scores whose top-{self.k} sums to "
                             f"exp({covered:.3g}) > 1: logits, not log-probabilities. Restart it without "
                             f"`--logprobs-mode raw_logits`/`processed_logits` (the default, raw_logprobs, is right).")

    def score(self, prompts: list[list[int]], completions: list[list[int]]) -> dict[str, list]:
        """For each completion token: the teacher's top-k ids and log-probs, and the taken token's log-prob."""
        try:
            out = self.client.get_sequence_logprobs([p + c for p, c in zip(prompts, completions, strict=True)],
                                                    [len(p) for p in prompts], top_logprobs=self.k)
        except Exception as exc:
            raise self._stopped(exc) from exc
        return {"ids": out["logprob_token_ids"], "log_probs": out["logprobs"],
                "token_log_prob": [[a[0] for a in row] for row in out["actual_logprobs"]]}

    def hidden_states(self, prompts: list[list[int]], completions: list[list[int]]) -> list[torch.Tensor]:
        """The teacher's last hidden states (after its final norm) at the position before each completion token,
        (T_i, H) per completion, from a pooling server (`vllm serve TEACHER --runner pooling --pooler-config
        '{"pooling_type": "ALL", "use_activation": false, "task": "token_embed"}'`)."""
        payload = {"model": self.client.model, "input": [p + c for p, c in zip(prompts, completions, strict=True)],
                   "encoding_format": "float"}
        try:
            response = self.client.session.post(f"{self.base_url}/pooling", json=payload)
        except Exception as exc:
            raise self._stopped(exc) from exc
        if response.status_code != 200:
            raise self._stopped(RuntimeError(f"POST /pooling answered {response.status_code}: {response.text[:300]}"))
        rows = [torch.tensor(item["data"], dtype=torch.float32) for item in response.json()["data"]]
        return [h[len(p) - 1:len(p) - 1 + len(c)] for h, p, c in zip(rows, prompts, completions, strict=True)]

    def generate(self, prompts: list[list[int]], max_tokens: int, temperature: float, top_p: float,
                 end_ids: list[int]) -> list[list[int]]:
        """The served teacher's sampled completions (online off-policy data), cut after the first end token."""
        try:
            out = self.client.generate(prompts, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                                       logprobs=None, generation_kwargs={"stop_token_ids": list(end_ids)})
        except Exception as exc:
            raise self._stopped(exc) from exc
        ends = set(end_ids)
        return [c[:next((i + 1 for i, t in enumerate(c) if t in ends), len(c))] for c in out["completion_ids"]]

    def _stopped(self, exc: Exception) -> TeacherServerError:
        if "timed out" in str(exc).lower():
            return TeacherServerError(
                f"The teacher server at {self.base_url} gave no answer within teacher_server_request_timeout="
                f"{self.request_timeout} s ({type(exc).__name__}: {str(exc)[:300]}): it hangs or is overloaded. "
                f"Checkpoints already in output_dir are complete: restart it (or raise the timeout for very large "
                f"batches) and resume with --resume_from_checkpoint latest.")
        if "Request failed: 4" in str(exc):  # TRL's client: the server answered, and refused this request
            return TeacherServerError(
                f"The teacher server at {self.base_url} refused a request ({str(exc)[:400]}): e.g. a prompt plus "
                f"completion longer than its --max-model-len; fix the cause (a shorter max_prompt_length or "
                f"max_completion_length, a larger --max-model-len) and resume with --resume_from_checkpoint latest.")
        return TeacherServerError(
            f"The teacher server at {self.base_url} stopped answering ({type(exc).__name__}: {str(exc)[:300]}). "
            f"Checkpoints already in output_dir are complete: restart the server and resume with "
            f"--resume_from_checkpoint latest.")


def bound_requests(session, timeout: float) -> None:
    """Gives every request of a `requests` session (TRL's `VLLMClient.session`, which passes no timeout) a timeout,
    keeping its adapters' retries except on read errors: a request that got no answer in `timeout` seconds is not sent
    again (refused connections and 5xx answers are still retried, as TRL configures them)."""
    from requests.adapters import HTTPAdapter

    class TimeoutAdapter(HTTPAdapter):
        def send(self, request, timeout=None, **kwargs):
            return super().send(request, timeout=bound if timeout is None else timeout, **kwargs)

    bound = timeout
    for prefix, adapter in list(session.adapters.items()):
        session.mount(prefix, TimeoutAdapter(pool_connections=adapter._pool_connections,
                                             pool_maxsize=adapter._pool_maxsize,
                                             max_retries=adapter.max_retries.new(read=0)))


def check_cached_dataset(dataset, off_policy_column: str) -> None:
    """A dataset (or a dict of them) for `teacher_placement: cache` holds `amm-trl generate --teacher_top_k`
    columns."""
    if isinstance(dataset, dict):
        for part in dataset.values():
            check_cached_dataset(part, off_policy_column)
        return
    columns = getattr(dataset, "column_names", None)
    if columns is None:  # an iterable dataset of unknown features: its first row
        columns = list(next(iter(dataset), {}).keys())
    from .cache import FLOAT16_COLUMNS, LOG8_COLUMNS

    # either codec's top-k columns (`amm-trl generate --teacher_top_k_codec`); named: those of the nearer one
    missing = min(([c for c in ("prompt_ids", "completion_ids", *top, "teacher_token_logprob") if c not in columns]
                   for top in (FLOAT16_COLUMNS, LOG8_COLUMNS)), key=len)
    if missing:
        raise ValueError(f"teacher_placement 'cache': the training dataset has no column(s) {missing} (it has "
                         f"{columns}). Write it with `amm-trl generate --teacher_top_k K --output_file data.parquet "
                         f"--output_column {off_policy_column}` and train on that file.")


def served_head(teacher_model, args) -> tuple[torch.nn.Module, object] | None:
    """For `teacher_server_output: hidden_states`: the teacher's output layer and config (from a path, only that
    layer is read; from a model, its own layer); else None."""
    if args.teacher_placement != "server" or args.teacher_server_output != "hidden_states":
        return None
    if teacher_model is None:
        raise ValueError("teacher_server_output 'hidden_states' needs the teacher's output layer: pass "
                         "teacher_model (a path) or teacher_model_name_or_path.")
    if not isinstance(teacher_model, str):
        head = teacher_model.get_output_embeddings()
        return head.requires_grad_(False), teacher_model.config.get_text_config()
    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
    return load_output_layer(teacher_model, dtype)


def load_output_layer(path: str, dtype: torch.dtype) -> tuple[torch.nn.Linear, object]:
    """The teacher's output layer alone (its `lm_head`, or the input embedding it is tied to) and its config, read
    from the checkpoint's safetensors without loading the rest of the model: what a trainer needs to turn a served
    teacher's last hidden states into exact full-vocabulary logits."""
    import json as _json

    from safetensors import safe_open
    from transformers import AutoConfig
    from transformers.utils import cached_file

    config = AutoConfig.from_pretrained(path).get_text_config()
    index = cached_file(path, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False)
    if index is not None:
        with open(index) as f:
            files = _json.load(f)["weight_map"]
        folder = os.path.dirname(index)
    else:
        single = cached_file(path, "model.safetensors")
        with safe_open(single, "pt") as f:
            files = {key: os.path.basename(single) for key in f.keys()}
        folder = os.path.dirname(single)
    tied = getattr(config, "tie_word_embeddings", False)
    wanted = [k for k in files if k.endswith("lm_head.weight")] if not tied else []
    wanted = wanted or [k for k in files if k.endswith("embed_tokens.weight")]
    if not wanted:
        raise ValueError(f"teacher_model_name_or_path={path!r}: no lm_head.weight or embed_tokens.weight in its "
                         f"safetensors; teacher_server_output 'hidden_states' needs the teacher's output layer.")
    key = wanted[0]
    with safe_open(os.path.join(folder, files[key]), "pt") as f:
        weight = f.get_tensor(key)
        bias_key = key.replace(".weight", ".bias")
        bias = f.get_tensor(bias_key) if bias_key in files and files[bias_key] == files[key] else None
    head = torch.nn.Linear(weight.size(1), weight.size(0), bias=bias is not None, dtype=dtype, device="meta")
    head.weight = torch.nn.Parameter(weight.to(dtype), requires_grad=False)
    if bias is not None:
        head.bias = torch.nn.Parameter(bias.to(dtype), requires_grad=False)
    return head, config
