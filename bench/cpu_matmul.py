"""fp32 vs bf16 matmul throughput on this CPU (why the CPU quickstart trains with bf16 autocast).

    OMP_NUM_THREADS=1 python bench/cpu_matmul.py

Printed 2026-11-23 on the quiet 2-core dev machine (AVX512-BF16), one thread, three runs: fp32 81.5-91.3,
bf16 198.0-207.6 GFLOP/s (~2.3x). Under heavy load an earlier run gave 25.6 vs 160.2: don't time on a busy machine.
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
