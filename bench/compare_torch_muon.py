#!/usr/bin/env python3
"""mpopt's CUDA Muon step against torch.optim.Muon (PyTorch >= 2.9) on the same matrices, on a GPU machine.

Usage:  python3 bench/compare_torch_muon.py --bench build/bench/mpopt_bench_muon_cuda [--steps 20]

For each shape of bench/muon_step.cu (rows x cols x count) it times torch.optim.Muon's step with CUDA events
(fp32 params and grads; torch runs Newton-Schulz in bf16, one matrix at a time) and runs mpopt_bench_muon_cuda's
step/bf16 rows (bf16 params and grads, fp32 master and momentum, bf16 GEMM operands batched over equal shapes),
then prints both times, the ratio torch / mpopt, and each side's Newton-Schulz TFLOP/s over its whole step.
"""

import argparse
import json
import subprocess
import sys

SHAPES = [(4096, 4096, 4), (4096, 11008, 1), (11008, 4096, 1), (4096, 11008, 4)]
NS_STEPS = 5


def ns_flops(rows, cols, count):
    n, m = min(rows, cols), max(rows, cols)
    return 2.0 * NS_STEPS * count * (2.0 * n * n * m + n * n * n)


def time_torch(torch, rows, cols, count, steps):
    params = [torch.nn.Parameter(torch.randn(rows, cols, device="cuda") * 0.02) for _ in range(count)]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt = torch.optim.Muon(params, lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True, ns_steps=NS_STEPS)
    for _ in range(3):  # warm-up
        opt.step()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(steps):
        opt.step()
    stop.record()
    stop.synchronize()
    return start.elapsed_time(stop) / steps  # ms per step


def time_mpopt(bench):
    out = subprocess.run([bench, "--benchmark_filter=^step/bf16/", "--benchmark_format=json"],
                         check=True, capture_output=True, text=True).stdout
    times = {}
    for b in json.loads(out)["benchmarks"]:
        if b.get("error_occurred"):
            print("mpopt %s: %s" % (b["name"], b.get("error_message")), file=sys.stderr)
            continue
        unit = {"ms": 1.0, "us": 1e-3, "ns": 1e-6, "s": 1e3}[b["time_unit"]]
        times[b["name"].split("/")[2]] = b["real_time"] * unit
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench", required=True, help="path to mpopt_bench_muon_cuda")
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    import torch
    if not torch.cuda.is_available():
        sys.exit("no CUDA device")
    if not hasattr(torch.optim, "Muon"):
        sys.exit("torch %s has no torch.optim.Muon (PyTorch >= 2.9 needed)" % torch.__version__)
    mpopt_ms = time_mpopt(args.bench)
    print("device: %s, torch %s" % (torch.cuda.get_device_name(), torch.__version__))
    print("%-18s %12s %12s %8s %14s %14s" % ("shape", "torch ms", "mpopt ms", "ratio", "torch TFLOP/s",
                                            "mpopt TFLOP/s"))
    for rows, cols, count in SHAPES:
        key = "%dx%dx%d" % (rows, cols, count)
        t = time_torch(torch, rows, cols, count, args.steps)
        m = mpopt_ms.get(key)
        flops = ns_flops(rows, cols, count)
        if m is None:
            print("%-18s %12.3f %12s" % (key, t, "n/a"))
            continue
        print("%-18s %12.3f %12.3f %8.2f %14.1f %14.1f" % (key, t, m, t / m, flops / t * 1e-9, flops / m * 1e-9))


if __name__ == "__main__":
    main()
