"""Which layer-dropped copy of SmolLM2-135M-Instruct makes a usable quickstart student (CPU, offline assets).

    python bench/student_layers.py     # mean token log-prob of 16 alpaca eval answers, per kept-layer set

Printed 2026-11-23 (2-core CPU): 30 layers (teacher) -1.96; 26 layers -3.26; 24 layers without 10,13,...,25 -4.01
(the quickstart student); 24 layers without every 5th -5.71; 20 layers -7.48 / -11.33; 15 layers -13.69;
10 layers (every third) -14.28.
"""

import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from amm_trl.assets import drop_layers, resolve
from amm_trl.rollouts import completion_token_ids

LAYER_SETS = {
    "teacher (30)": None,
    "26: without 10,15,20,25": [i for i in range(30) if i not in (10, 15, 20, 25)],
    "24: without 10,13,...,25": [i for i in range(30) if i not in (10, 13, 16, 19, 22, 25)],
    "24: without every 5th": [i for i in range(30) if i % 5 != 4],
    "20: without 8,10,...,26": [i for i in range(30) if i not in range(8, 27, 2)],
    "20: without every 3rd": [i for i in range(30) if i % 3 != 2],
    "15: every other": list(range(0, 30, 2)),
    "10: every third": list(range(0, 30, 3)),
}


def mean_logprob(model, tokenizer, rows):
    total, count = 0.0, 0
    for row in rows:
        prompt = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True)
        prompt = list(prompt["input_ids"] if not isinstance(prompt, list) else prompt)
        completion = completion_token_ids(tokenizer, row["prompt"], row["completion"], [tokenizer.eos_token_id, 2], 48)
        with torch.no_grad():
            logits = model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1:-1]
        total += torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(completion)[:, None]).sum().item()
        count += len(completion)
    return total / count


def main():
    teacher = resolve("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    rows = [json.loads(line) for line in open(resolve("alpaca-demo-eval"))][:16]
    for name, keep in LAYER_SETS.items():
        model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32)
        if keep is not None:
            model = drop_layers(model, keep)
        print(json.dumps({"layers": name, "mean_logprob": round(mean_logprob(model, tokenizer, rows), 3),
                          "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1)}), flush=True)


if __name__ == "__main__":
    main()
