"""How the H200's SM clock comes back after sustained load (the pacing of bench_cuda_attention
and torch_sdpa.py rests on it). After 3 s of bf16 8192^2 matmuls, then of SDPA decode (B=8,
N=32K, bf16) back to back, it probes the clock every ~11 ms for 1 s (torch_sdpa.sm_clock_mhz);
then, after 2 s of SDPA and a rest of 0, 0.05, 0.2 or 1 s, it prints the probe and an SDPA loop
of 60 calls with the clock after it. Usage (on the GPU machine): python3 bench/cuda/clock_ramp.py
"""
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_sdpa import sm_clock_mhz, time_ms  # noqa: E402

a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
q = torch.randn(8, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
ks = [torch.randn(8, 8, 32768, 128, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
vs = [torch.randn(8, 8, 32768, 128, device="cuda", dtype=torch.bfloat16) for _ in range(4)]


def sdpa(i):
    return F.scaled_dot_product_attention(q, ks[i], vs[i], enable_gqa=True)


def load(seconds, kind):
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(10):
            if kind == "mm":
                a @ a
            else:
                for i in range(4):
                    sdpa(i)
        torch.cuda.synchronize()


print("clock of the idle GPU:", sm_clock_mhz())
for kind in ("mm", "sdpa"):
    load(3, kind)
    line = []
    start = time.perf_counter()
    while time.perf_counter() - start < 1.0:
        line.append((round((time.perf_counter() - start) * 1e3), round(sm_clock_mhz() or 0)))
        time.sleep(0.01)
    print(kind, "after 3 s: clock timeline (ms, MHz):", line[:40])
for rest in (0, 0.05, 0.2, 1.0):
    load(2, "sdpa")
    time.sleep(rest)
    before = sm_clock_mhz()
    ms = time_ms(sdpa, 4, reps=60)
    print(f"sdpa 2 s, rest {rest:4.2f} s: probe {before:.0f} MHz, sdpa B8 N32K median "
          f"{ms[30]:.4f} ms min {ms[0]:.4f}, after {sm_clock_mhz():.0f} MHz")
