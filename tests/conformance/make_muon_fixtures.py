#!/usr/bin/python3
"""Generate the Muon peer-conformance fixture for mpopt (tests/host/test_muon.cpp replays it).

Run:  /usr/bin/python3 tests/conformance/make_muon_fixtures.py

torch.optim.Muon arrived in PyTorch 2.9; Debian's python3-torch is 1.13, which lacks it. This script therefore
re-implements the torch 2.9 algorithm (torch/optim/_muon.py, _single_tensor_muon) with torch tensor ops, operation
for operation, except that the Newton-Schulz iteration runs in fp32 where torch casts to bf16 (mpopt's fp32 GEMM
policy is what the fixture checks; bf16 is checked against an fp64 re-computation in the C++ test):

  buf.lerp_(grad, 1 - momentum)
  update = grad.lerp(buf, momentum) if nesterov else buf
  X = update (fp32), transposed when rows > cols;  X.div_(X.norm().clamp(min=eps))
  ns_steps times:  A = X @ X.T;  B = b * A + c * A @ A;  X = a * X + B @ X     (Python's precedence: (c * A) @ A)
  X transposed back;  adjusted_lr = lr * sqrt(max(1, rows / cols))  ("original")
                                    lr * 0.2 * sqrt(max(rows, cols))  ("match_rms_adamw")
  param.mul_(1 - lr * weight_decay);  param.add_(X, alpha=-adjusted_lr)

Writes tests/conformance/fixtures/muon/muon_torch.json (a subdirectory, so the torch.optim replay of
test_torch_conformance.cpp does not pick it up):

  {"generator": ..., "cases": [{"name", "hparams", "shapes": [[rows, cols], ...], "w0": [matrix, ...],
    "grads": [[matrix, ...] per step], "traj": [[matrix, ...] per step]}]}

with each matrix a flat row-major list of float32 values. Inputs come from a seeded random.Random (random() only,
rounded to float32), so they do not depend on the platform. The weights depend on the BLAS torch links (fp32
accumulation order), which is why the C++ test compares within a bound rather than bit for bit.
"""

import json
import math
import os
import random
import struct

# Elementwise fp32 kernels of torch 1.13 differ by instruction set (AVX2 fuses add(alpha=) into a multiply-add):
# pin the dispatch, as make_torch_fixtures.py does, so a re-run on another x86-64 host gives the same inputs' results.
if "ATEN_CPU_CAPABILITY" not in os.environ:
    os.environ["ATEN_CPU_CAPABILITY"] = "avx2"

import torch  # noqa: E402  (after the environment is set)

SEED = 20251109
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "muon", "muon_torch.json")

CASES = [
    {
        "name": "nesterov_original_wd",
        "hparams": {"lr": 0.02, "momentum": 0.95, "nesterov": True, "weight_decay": 0.1,
                    "ns_coefficients": [3.4445, -4.7750, 2.0315], "ns_steps": 5, "eps": 1e-7,
                    "adjust_lr": "original"},
        "shapes": [[8, 12], [14, 6], [9, 9]],
        "steps": 4,
    },
    {
        "name": "plain_match_rms_adamw",
        "hparams": {"lr": 0.01, "momentum": 0.9, "nesterov": False, "weight_decay": 0.05,
                    "ns_coefficients": [3.4445, -4.7750, 2.0315], "ns_steps": 3, "eps": 1e-7,
                    "adjust_lr": "match_rms_adamw"},
        "shapes": [[6, 16], [16, 5]],
        "steps": 4,
    },
]


def f32(x):
    """Round a double to the nearest float32, returned as a double."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def orthogonalise(update, coefficients, ns_steps, eps):
    a, b, c = coefficients
    x = update.clone()
    transposed = update.size(0) > update.size(1)
    if transposed:
        x = x.T
    x.div_(x.norm().clamp(min=eps))
    for _ in range(ns_steps):
        gram = x @ x.T
        gram_update = b * gram + c * gram @ gram
        x = a * x + gram_update @ x
    return x.T if transposed else x


def adjusted_lr(lr, adjust, rows, cols):
    if adjust == "original":
        return lr * math.sqrt(max(1, rows / cols))
    return lr * 0.2 * math.sqrt(max(rows, cols))


def run_case(case, rng):
    hp = case["hparams"]
    params, bufs = [], []
    for rows, cols in case["shapes"]:
        w = [f32((rng.random() - 0.5) * 0.2) for _ in range(rows * cols)]
        params.append(torch.tensor(w, dtype=torch.float32).reshape(rows, cols))
        bufs.append(torch.zeros(rows, cols, dtype=torch.float32))
    out = {"name": case["name"], "hparams": hp, "shapes": case["shapes"],
           "w0": [p.flatten().tolist() for p in params], "grads": [], "traj": []}
    for step in range(case["steps"]):
        grads = []
        for k, (rows, cols) in enumerate(case["shapes"]):
            # A rank-deficient drift plus noise, so the matrices are not all near-orthogonal to begin with.
            g = [f32((rng.random() - 0.5) + 0.3 * ((i % cols) / cols - 0.5) * (1 + step)) for i in range(rows * cols)]
            grads.append(torch.tensor(g, dtype=torch.float32).reshape(rows, cols))
        for p, grad, buf in zip(params, grads, bufs):
            buf.lerp_(grad, 1 - hp["momentum"])
            update = grad.lerp(buf, hp["momentum"]) if hp["nesterov"] else buf
            o = orthogonalise(update, hp["ns_coefficients"], hp["ns_steps"], hp["eps"])
            lr_adj = adjusted_lr(hp["lr"], hp["adjust_lr"], p.size(0), p.size(1))
            p.mul_(1 - hp["lr"] * hp["weight_decay"])
            p.add_(o, alpha=-lr_adj)
        out["grads"].append([g.flatten().tolist() for g in grads])
        out["traj"].append([p.flatten().tolist() for p in params])
    return out


def dump(value, indent=""):
    """JSON with one matrix per line; float32 values written with 9 significant digits (which round-trip them)."""
    if isinstance(value, dict):
        inner = indent + " "
        items = ",\n".join("%s%s: %s" % (inner, json.dumps(k), dump(v, inner)) for k, v in value.items())
        return "{\n%s\n%s}" % (items, indent)
    if isinstance(value, list) and value and all(isinstance(v, float) for v in value):
        return "[" + ",".join("%.9g" % v for v in value) + "]"
    if isinstance(value, list) and value and isinstance(value[0], (list, dict)):
        inner = indent + " "
        return "[\n%s\n%s]" % (",\n".join(inner + dump(v, inner) for v in value), indent)
    return json.dumps(value)


def main():
    torch.set_num_threads(1)  # one BLAS accumulation order
    rng = random.Random(SEED)
    fixture = {
        "generator": "torch %s, a re-implementation of torch.optim.Muon (PyTorch 2.9) with fp32 Newton-Schulz "
                     "(tests/conformance/make_muon_fixtures.py)" % torch.__version__,
        "cases": [run_case(c, rng) for c in CASES],
    }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        f.write(dump(fixture) + "\n")


if __name__ == "__main__":
    main()
