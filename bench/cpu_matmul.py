"""fp32 vs bf16 matmul throughput on this CPU (whether `--bf16 true` pays on a CPU; the quickstart recipes use fp32).

    OMP_NUM_THREADS=1 python bench/cpu_matmul.py

2026-11-23, a quiet 2-core machine with AVX512-BF16, one thread, three runs: fp32 81.5-91.3, bf16 198.0-207.6 GFLOP/s
(~2.3x). 2026-12-01, a 2-core AMD EPYC with AVX2 only (no native bf16), one run: fp32 60.7, bf16 1.0 GFLOP/s. Under
heavy load an earlier run gave 25.6 vs 160.2: don't time on a busy machine.
"""

import json
import time

import torch

torch.set_num_threads(1)
for dtype in (torch.float32, torch.bfloat16):
    a, b = torch.randn(512, 576, dtype=dtype), torch.randn(576, 2304, dtype=dtype)  # SmolLM2 MLP-sized matmul
    for _ in range(3):
        a @ b
    n, start = 20, time.perf_counter()
    for _ in range(n):
        a @ b
    seconds = (time.perf_counter() - start) / n
    print(json.dumps({"dtype": str(dtype), "gflops": round(2 * 512 * 576 * 2304 / seconds / 1e9, 1)}))
