#!/usr/bin/env bash
# Usage: bash bench/quickstart_sweep.sh   (CPU; logs in /tmp/sweep/<recipe>.log)
# Each objective's quickstart recipe for 6 steps, logging every step; prints loss first->last and median step time.
mkdir -p /tmp/sweep
for r in quickstart quickstart_sft quickstart_seqkd quickstart_fkl quickstart_rkl quickstart_tvd quickstart_gkd quickstart_imitkd quickstart_jsd quickstart_distillm quickstart_minillm quickstart_pbkd; do
  rm -rf /tmp/sweep/$r; mkdir -p /tmp/sweep
  OMP_NUM_THREADS=2 timeout 400 amm-trl train --config $r --output_dir /tmp/sweep/$r --max_steps 6 --logging_steps 1 --use_cpu true --bf16 true --teacher_model_init_kwargs '{"dtype": "bfloat16"}' --eval_strategy no > /tmp/sweep/$r.log 2>&1
  python - "$r" <<'PY'
import ast, re, statistics, sys
r = sys.argv[1]
text = open(f"/tmp/sweep/{r}.log").read().replace("\r", "\n")
logs = []
for m in re.finditer(r"\{'loss': .*?\}", text):
    try:
        logs.append(ast.literal_eval(m.group(0)))
    except Exception:
        pass
logs = [l for l in logs if "step_time" in l]
if not logs:
    print(f"{r}: FAILED", text[-300:].replace("\n", " ")); sys.exit()
f = lambda v: float(v)
steps = [f(l["step_time"]) for l in logs]
print(f"{r}: loss {f(logs[0]['loss']):.4f} -> {f(logs[-1]['loss']):.4f} over {len(logs)} steps; "
      f"median step {statistics.median(steps[1:] or steps):.1f} s (first {steps[0]:.1f} s)", flush=True)
PY
done
