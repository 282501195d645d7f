#!/usr/bin/env python3
"""Times torch's AdamW on the CPU and mpopt's host AdamW on the same sizes and thread count, in one run.

    /usr/bin/python3 bench/compare_torch_cpu.py --mpopt-bench build/bench/mpopt_bench_host [--threads 2]
                                                [--size 16777216] [--iters 20] [--markdown]

Debian's python3-torch (1.13) lives under /usr/bin/python3. Pairs (torch -> the mpopt benchmark storing the same):
  fp32        torch.optim.AdamW, fp32 params/grads/states  -> host_adamw_step<fp32, unchecked>
  bf16        the same with bf16 params (torch keeps bf16  -> host_adamw_step<bf16_pure, unchecked>
              states: all-bf16)
mpopt also reports bf16 params with fp32 states (DeepSpeed's bf16 master + fp32 states offload mode), which torch
has no configuration for. Both sides run the update alone (no overflow check), with the same thread count; STREAM's
triad from the mpopt binary is the bandwidth ceiling. Speed-up = torch time / mpopt time.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def time_torch(torch, dtype, n, iters, warmup=3):
    p = torch.nn.Parameter(torch.full((n,), 0.5, dtype=dtype))
    p.grad = torch.full((n,), 1e-3, dtype=dtype)
    opt = torch.optim.AdamW([p], lr=1e-3, weight_decay=1e-2)
    for _ in range(warmup):
        opt.step()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        opt.step()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run_mpopt(binary, n, threads, reps):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    out = subprocess.run([binary, f"--benchmark_filter=(host_adamw_step<(fp32|bf16_pure|bf16_master_fp32_states), "
                                  f"unchecked>/{n}|stream_triad)", "--benchmark_format=json",
                          f"--benchmark_repetitions={reps}", "--benchmark_report_aggregates_only=true",
                          "--benchmark_min_time=0.3"],
                         env=env, check=True, capture_output=True, text=True).stdout
    res = {}
    for b in json.loads(out)["benchmarks"]:  # the median where there are repetitions, else the one run
        if b.get("aggregate_name") == "median" or b.get("run_type") == "iteration":
            res[b["run_name"]] = b
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mpopt-bench", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", type=int, default=16777216)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    try:
        import torch
    except ImportError:
        sys.exit("torch not importable: run with Debian's /usr/bin/python3 (apt-get install python3-torch)")
    torch.set_num_threads(args.threads)
    n = args.size
    mp = run_mpopt(args.mpopt_bench, n, args.threads, args.reps)
    rows = []
    for label, policy, dtype in (("fp32", "fp32", torch.float32), ("all-bf16", "bf16_pure", torch.bfloat16),
                                 ("bf16 master, fp32 states", "bf16_master_fp32_states", None)):
        b = mp[f"host_adamw_step<{policy}, unchecked>/{n}/real_time"]
        t_mp = b["real_time"]
        t_torch = time_torch(torch, dtype, n, args.iters) if dtype is not None else None
        rows.append((label, t_torch, t_mp, b["bytes_per_second"] / 1e9, b["bytes_per_param"]))
    triad = mp["stream_triad/16777216/real_time"]["bytes_per_second"] / 1e9
    head = f"torch {torch.__version__}, {args.threads} threads, {n} params; STREAM triad {triad:.1f} GB/s"
    if args.markdown:
        print(head + "\n")
        print("| variant | torch AdamW (ms) | mpopt (ms) | mpopt GB/s | bytes/param | speed-up |")
        print("|---|---|---|---|---|---|")
    else:
        print(head)
    for label, tt, tm, gbs, bpp in rows:
        ts = f"{tt:.1f}" if tt is not None else "-"
        sp = f"{tt / tm:.1f}x" if tt is not None else "-"
        if args.markdown:
            print(f"| {label} | {ts} | {tm:.2f} | {gbs:.1f} | {bpp:.0f} | {sp} |")
        else:
            print(f"{label:28s} torch {ts:>8s} ms   mpopt {tm:7.2f} ms  {gbs:6.1f} GB/s  {bpp:.0f} B/param  {sp}")


if __name__ == "__main__":
    main()
