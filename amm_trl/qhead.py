"""The Q-heads whole: the modules (AMM's learned critic g(s, .), `objectives/amm.py`), their construction beside a
ZeRO-3 student, their place on the student (the submodule name the vLLM weight sync skips) and in checkpoints (a
file beside the saved student).
"""

import os

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

HEADS_ATTRIBUTE = "amm_q_heads"  # submodule name on the student; weight-sync and save paths filter on it
HEADS_FILE = "amm_q_heads.safetensors"  # beside the saved student, which stays a plain `from_pretrained` model


def is_head_parameter(name: str) -> bool:
    """A student parameter name that belongs to the heads (vLLM's copy of the student has no such weights)."""
    return name.startswith(HEADS_ATTRIBUTE + ".")


def head_features(features: str, student_hidden: Tensor, teacher_hidden: Tensor | None) -> Tensor:
    """What a head reads (`q_head_features`), detached: the student's hidden states, the teacher's, or both side by
    side ([h_S, h_T], the order `build_q_heads` sizes the head for)."""
    if features == "student":
        return student_hidden.detach()
    if features == "teacher":
        return teacher_hidden.detach()
    return torch.cat([student_hidden.detach(), teacher_hidden.detach().to(student_hidden.dtype)], dim=-1)


# ----------------------------------------------------------------------------------------------------------
# the critic's learned part: Q-heads g_phi(s, .) in R^V (raw scores; `critic_values` makes them the critic f)
# ----------------------------------------------------------------------------------------------------------
# A head reads detached hidden states (so it cannot shape the student's features) and returns one value per
# vocabulary entry, which makes E_{a~p}[f(s, a)] = <p, f(s, .)> exact for a white-box teacher. Heads are never called
# through `nn.Module.__call__` during the loss: the loss reads their parameters directly inside the vocabulary-chunked
# autograd function (`chunked.py`), which gathers them under ZeRO-3 like TRL gathers `lm_head`.
class LinearQHead(nn.Module):
    """g(s, .) = W h + b, W: (vocab, features). Zero-initialized, so the learned part of the critic starts at 0."""

    def __init__(self, features: int, vocab_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(vocab_size, features))
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def zero_output_(self) -> None:
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)

    def scores(self, h: Tensor, params: dict[str, Tensor], output_embedding: Tensor) -> Tensor:
        weight = params["weight"]
        return F.linear(h.to(weight.dtype), weight, params["bias"]).float()


class LowRankQHead(nn.Module):
    """g(s, .) = E m(h), E = the detached student output embedding (vocab, hidden), m a two-layer MLP
    features -> hidden -> hidden. The last layer is zero-initialized, so g starts at 0. Costs ~2 hidden^2."""

    def __init__(self, features: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(features, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.zero_output_()

    def zero_output_(self) -> None:
        """f starts at 0. Under `deepspeed.zero.Init` the caller must gather the parameters first: `nn.Linear` is
        partitioned as soon as it is built, so zeroing it in `__init__` writes into empty shards."""
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def scores(self, h: Tensor, params: dict[str, Tensor], output_embedding: Tensor) -> Tensor:
        w1 = params["fc1.weight"]
        m = F.gelu(F.linear(h.to(w1.dtype), w1, params["fc1.bias"]))
        m = F.linear(m, params["fc2.weight"], params["fc2.bias"])
        return F.linear(m.to(output_embedding.dtype), output_embedding.detach()).float()


class QHeads(nn.Module):
    """The adversary: `on` and `off` heads (or one shared head, registered once and used for both)."""

    def __init__(self, head_type: str, features: int, vocab_size: int, hidden: int, shared: bool):
        super().__init__()

        def make():
            if head_type == "linear":
                return LinearQHead(features, vocab_size)
            return LowRankQHead(features, hidden)

        self.on = make()
        self.off = self.on if shared else make()

    def head(self, kind: str) -> nn.Module:
        return {"on": self.on, "off": self.off}[kind]


def build_q_heads(args, student: nn.Module, teacher_hidden_size: int, vocab_size: int) -> QHeads:
    """Builds the heads like the student was built: partitioned under `deepspeed.zero.Init` when the student's own
    parameters are (ZeRO-3 with `zero3_init_flag`), else as plain modules in the student's dtype and device.

    A head created outside zero.Init next to a zero.Init student keeps its own dtype, and DeepSpeed's stage-3
    optimizer then refuses the mixed dtypes. zero.Init takes its dtype from the DeepSpeed config (as transformers'
    `from_pretrained` does): an explicit `dtype=` is ignored on accelerators without fp16 (DeepSpeed 0.19.8,
    `Init._set_dtype` operator precedence), so we check the outcome instead.

    `vocab_size` is the vocabulary the loss compares (the shared tokenizer rows), not the student's embedding rows,
    which may be padded (Qwen2.5: 151936 rows for 151665 tokens).
    """
    text_config = student.config.get_text_config()
    student_hidden = text_config.hidden_size
    features = {"student": student_hidden, "teacher": teacher_hidden_size,
                "both": student_hidden + teacher_hidden_size}[args.q_head_features]
    param = next(p for p in student.parameters() if p.is_floating_point())

    def make():
        return QHeads(args.q_head_type, features, vocab_size, student_hidden, args.q_head_shared)

    if not hasattr(param, "ds_id"):
        return make().to(device=param.device, dtype=param.dtype)
    import deepspeed
    from transformers.integrations.deepspeed import deepspeed_config

    with deepspeed.zero.Init(config_dict_or_path=deepspeed_config()):
        heads = make()
    for head in dict.fromkeys((heads.on, heads.off)):  # a shared head once
        with deepspeed.zero.GatheredParameters(list(head.parameters()), modifier_rank=0):
            head.zero_output_()
    head_dtype = next(heads.parameters()).dtype
    if head_dtype != param.dtype:
        raise ValueError(
            f"The student was loaded partitioned in {param.dtype} but the DeepSpeed config builds parameters in "
            f"{head_dtype}; ZeRO-3 needs one dtype. Set the student dtype (recipe `dtype:` / "
            f"`model_init_kwargs.dtype`) to match the bf16/fp16 setting."
        )
    return heads


def split_heads(state_dict: dict, heads: nn.Module) -> tuple[dict, dict]:
    """(the student's own entries, the heads' entries without the attribute prefix) of a student state dict. One
    shared head (pbkd, `q_head_shared`) is stored once, as `on.*`."""
    prefix = HEADS_ATTRIBUTE + "."
    head_state = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if heads.off is heads.on:
        head_state = {k: v for k, v in head_state.items() if not k.startswith("off.")}
    return {k: v for k, v in state_dict.items() if not k.startswith(prefix)}, head_state


def save_heads(head_state: dict, output_dir: str) -> None:
    os.makedirs(output_dir, exist_ok=True)
    tmp = os.path.join(output_dir, HEADS_FILE + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in head_state.items()}, tmp)
    os.replace(tmp, os.path.join(output_dir, HEADS_FILE))


def save_master_heads(heads: nn.Module, output_dir: str, should_save: bool) -> None:
    """Rewrites the heads file in `output_dir` from DeepSpeed's fp32 master copy of the heads, so that a resume without
    DeepSpeed restores them exactly rather than their 16-bit training copy. Every process must call it (ZeRO gathers
    the partitions); parameters without a master copy (fp32 training) are left as the file already has them."""
    from deepspeed.utils import safe_get_full_fp32_param

    master = {}
    for name, param in heads.named_parameters():  # a shared head once, as `on.*` (as `split_heads` stores it)
        full = safe_get_full_fp32_param(param)
        if full is not None:
            master[name] = full.detach().float().cpu().contiguous()
    if not should_save or not master:
        return
    path = os.path.join(output_dir, HEADS_FILE)
    save_heads({**(load_file(path) if os.path.exists(path) else {}), **master}, output_dir)


def load_heads(heads: nn.Module, directory: str, device: str) -> bool:
    """Loads `save_heads`' file from `directory` into `heads`; False if there is none."""
    path = os.path.join(directory, HEADS_FILE)
    if not os.path.exists(path):
        return False
    state = load_file(path, device=device)
    if heads.off is heads.on:
        state.update({"off." + k[3:]: v for k, v in state.items() if k.startswith("on.")})
    heads.load_state_dict(state)
    return True
