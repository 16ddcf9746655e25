"""One-rank DeepSpeed ZeRO-3 (gloo, CPU): Q-heads built next to a `zero.Init` student; prints each head's
gathered |output-layer| sum and the partition sizes as JSON. Run by tests/test_qhead.py."""

import json
import os
import sys
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

if __name__ == "__main__":
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
    import deepspeed
    import torch
    from transformers.integrations import HfDeepSpeedConfig

    from transformers import LlamaConfig

    from amm_trl.objectives.amm import build_q_heads

    class Student(torch.nn.Module):  # what build_q_heads reads of a student: its config and a partitioned weight
        def __init__(self):
            super().__init__()
            self.config = LlamaConfig(vocab_size=72, hidden_size=32)  # padded rows; the tokenizer has 64
            self.lm_head = torch.nn.Linear(32, 72, bias=False)

    deepspeed.init_distributed(dist_backend="gloo")
    ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}, "bf16": {"enabled": False}}
    keep_alive = HfDeepSpeedConfig(ds)  # what `deepspeed_config()` reads, as transformers sets it up
    with deepspeed.zero.Init(config_dict_or_path=ds):
        student = Student()
    result = {}
    for head_type in ("low_rank", "linear"):
        args = SimpleNamespace(q_head_type=head_type, q_head_features="student", q_bound=1.0, q_head_shared=False)
        heads = build_q_heads(args, student, 48, vocab_size=64)
        out = heads.on.fc2 if head_type == "low_rank" else heads.on
        params = list(out.parameters())
        with deepspeed.zero.GatheredParameters(params):
            result[head_type] = {"abs_sum": sum(float(p.abs().sum()) for p in params),
                                 "shapes": [list(p.shape) for p in params],
                                 "partitioned": all(hasattr(p, "ds_id") for p in params)}
    print(json.dumps(result))
