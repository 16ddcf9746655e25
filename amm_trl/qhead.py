"""The Q-heads' place on the student and in checkpoints: the submodule name the weight-sync and save paths filter
on, and the heads file beside the saved student (the heads themselves are AMM's critic, `objectives/amm.py`).

"""

import os

from safetensors.torch import load_file, save_file
from torch import nn

HEADS_ATTRIBUTE = "amm_q_heads"  # submodule name on the student; weight-sync and save paths filter on it
HEADS_FILE = "amm_q_heads.safetensors"  # beside the saved student, which stays a plain `from_pretrained` model


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
