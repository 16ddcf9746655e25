"""One-rank DeepSpeed (gloo, CPU): AMMTrainer with a DeepSpeed config file that has an 'optimizer' section, given as
`deepspeed=<path>` (mode `path`) or as accelerate's deepspeed_config_file (mode `accelerate`, the environment
`accelerate launch` sets). Prints the error AMMConfig / AMMTrainer raise, or "no error". Run by tests/test_qhead.py."""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

if __name__ == "__main__":
    mode, port, assets = sys.argv[1], sys.argv[2], sys.argv[3]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    config_file = os.path.join(assets, "ds_with_optimizer.json")
    with open(config_file, "w") as f:
        json.dump({"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                   "zero_optimization": {"stage": 3}, "bf16": {"enabled": False},
                   "optimizer": {"type": "AdamW", "params": {"lr": "auto"}}}, f)
    if mode == "accelerate":
        os.environ.update(ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_CONFIG_FILE=config_file,
                          ACCELERATE_USE_CPU="true")
    from datasets import load_dataset

    from amm_trl import AMMConfig, AMMTrainer

    try:
        args = AMMConfig(output_dir=os.path.join(assets, "out"), use_cpu=True, bf16=False, report_to="none",
                         deepspeed=config_file if mode == "path" else None, per_device_train_batch_size=2,
                         max_completion_length=4, max_steps=1, model_init_kwargs={"dtype": "float32"},
                         teacher_model_init_kwargs={"dtype": "float32"})
        dataset = load_dataset("json", data_files=os.path.join(assets, "data.jsonl"), split="train")
        AMMTrainer(model=os.path.join(assets, "student"), teacher_model=os.path.join(assets, "teacher"), args=args,
                   train_dataset=dataset)
        print(json.dumps({"error": None}))
    except ValueError as exc:
        print(json.dumps({"error": str(exc)}))
