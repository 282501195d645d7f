#!/usr/bin/python3
"""Generate peer-conformance fixtures for mpopt from the real torch.optim (Debian python3-torch 1.13, CPU).

Run:  /usr/bin/python3 tests/conformance/make_torch_fixtures.py

Writes one JSON file per case into tests/conformance/fixtures/ (next to this script):

  {"name": ..., "generator": "torch <version> torch.optim.<Class>", "case": CASE,
   "expected": {"traj": [[...] per step], "master": [[...] per step]}}

plus, for the mixed-precision fixtures only, a top-level "ulp_tolerance".  CASE is exactly the input of
`mpopt-conformance optimizer CASE.json`.  The output is deterministic: inputs come from a seeded
random.Random using only random() (no libm transcendental functions), every input is a float32 value (so
the fp32 and fp64 fixtures of one case share the same inputs exactly), and torch's CPU kernels are pinned to
the AVX2 dispatch (see CPU_CAPABILITY below).  Numbers are written with Python's repr (shortest string that
round-trips the double exactly).
"""

import json
import os
import random
import struct
import sys

# torch 1.13's CPU kernels are dispatched per instruction set, and the fp32 results depend on it: the AVX2
# (and AVX512) kernels of add(alpha=)/addcmul use fused multiply-adds, the "default" kernels do not.  Pin the
# dispatch so that a re-run on another x86-64 host writes byte-identical files.  AVX2 is what this torch
# picks by itself (even on the AVX512 host the fixtures were made on), so these are the numbers users get;
# the AVX512 dispatch gives identical files, the "default" one differs in the last bits of fp32 values.
CPU_CAPABILITY = "avx2"


def _cpu_has(*flags):
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return all(fl in have for fl in flags)
    except OSError:
        pass
    return False


if "ATEN_CPU_CAPABILITY" not in os.environ and _cpu_has("avx2", "fma"):
    os.environ["ATEN_CPU_CAPABILITY"] = CPU_CAPABILITY

import torch  # noqa: E402  (after the environment is set)

SEED = 20240611
N = 24       # elements per case (keeps each full-precision fixture under ~40 KB)
STEPS = 25   # optimizer steps per case
OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


# --------------------------------------------------------------------------------------------------------
# Inputs.  Only rng.random() (exact multiples of 2**-53) and IEEE + - * with a final rounding to float32 are
# used, so the values do not depend on the platform's libm or on the Python/numpy version.


def f32(x):
    """Round a double to the nearest float32 (ties to even), returned as a double."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def make_w0(rng):
    """N weights: 2 zeros, 3 of magnitude ~1e-3, 3 of magnitude ~10, the rest 0.05..2; mixed signs."""
    w = [0.0, 0.0]
    w += [(1 if k % 2 else -1) * (0.5 + rng.random()) * 1e-3 for k in range(3)]
    w += [(1 if k % 2 == 0 else -1) * (5.0 + 10.0 * rng.random()) for k in range(3)]
    w += [(1 if rng.random() < 0.5 else -1) * (0.05 + 1.95 * rng.random()) for _ in range(N - len(w))]
    rng.shuffle(w)
    return [f32(x) for x in w]


def make_grads(rng, scales):
    """STEPS lists of N grads: g = scale_i * (bias_i + uniform(-1, 1)), so they vary per step and change
    sign; element 0 additionally gets exact zeros on a few steps (Adam's first step with a zero grad gives
    exp_avg_sq == 0, i.e. denom == eps)."""
    bias = [rng.random() - 0.5 for _ in range(N)]
    grads = []
    for t in range(STEPS):
        g = [f32(scales[i] * (bias[i] + 2.0 * rng.random() - 1.0)) for i in range(N)]
        if t in (0, 5, 12):
            g[0] = 0.0
        grads.append(g)
    return grads


def make_inputs():
    rng = random.Random(SEED)
    w0 = make_w0(rng)
    # Full-precision cases: grad magnitudes from 1e-3 to ~5.
    scale_pool = [1e-3, 1e-2, 0.1, 0.5, 1.0, 2.0, 5.0]
    scales = [scale_pool[int(rng.random() * len(scale_pool))] for _ in range(N)]
    grads = make_grads(rng, scales)
    # Mixed-precision cases: modest grads, |g| ~ 1e-3 .. 1.
    mp_pool = [1e-3, 1e-2, 0.1, 0.3, 1.0]
    mp_scales = [mp_pool[int(rng.random() * len(mp_pool))] for _ in range(N)]
    mp_grads = make_grads(rng, mp_scales)
    return w0, grads, mp_grads


# --------------------------------------------------------------------------------------------------------
# Cases.  hparams use torch.optim keyword names and are written out in full (no reliance on defaults).

ADAM_HP = {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0, "amsgrad": False}
SGD_HP = {"lr": 1e-2, "momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0, "nesterov": False}
ADAGRAD_HP = {"lr": 1e-2, "lr_decay": 0.0, "weight_decay": 0.0, "initial_accumulator_value": 0.0, "eps": 1e-10}

CASES = [
    ("adam", "adam", ADAM_HP),
    ("adam_l2", "adam", dict(ADAM_HP, weight_decay=0.01)),
    ("adamw", "adamw", dict(ADAM_HP, weight_decay=0.01)),
    ("adamw_amsgrad", "adamw", dict(ADAM_HP, weight_decay=0.01, amsgrad=True)),
    ("adam_betas_eps_lr", "adam", dict(ADAM_HP, lr=0.01, betas=[0.8, 0.95], eps=1e-6)),
    ("sgd", "sgd", SGD_HP),
    ("sgd_momentum", "sgd", dict(SGD_HP, momentum=0.9)),
    ("sgd_nesterov", "sgd", dict(SGD_HP, momentum=0.9, dampening=0.0, nesterov=True)),
    ("sgd_momentum_dampening", "sgd", dict(SGD_HP, momentum=0.9, dampening=0.1)),
    ("sgd_wd_momentum", "sgd", dict(SGD_HP, momentum=0.9, weight_decay=0.001)),
    ("adagrad", "adagrad", ADAGRAD_HP),
    ("adagrad_decay_init_eps_wd", "adagrad",
     dict(ADAGRAD_HP, lr_decay=0.01, initial_accumulator_value=0.1, eps=1e-8, weight_decay=0.01)),
]

# Mixed precision: lr 1e-2 (not AdamW's default 1e-3) so that bf16/fp16 params and masters actually move;
# with lr 1e-3 a bf16 master near 1 (ulp 2**-7) would round every update away.
MP_CASES = [
    ("adamw_mixed", "adamw", dict(ADAM_HP, lr=1e-2, weight_decay=0.01)),
    ("sgd_momentum_mixed", "sgd", dict(SGD_HP, lr=1e-2, momentum=0.9)),
]
MP_POLICIES = [  # (param, master, grad, state)
    ("bf16", "fp32", "bf16", "fp32"),
    ("fp16", "fp32", "fp16", "fp32"),
    ("bf16", "bf16", "bf16", "fp32"),
    ("bf16", "bf16", "bf16", "bf16"),
    ("fp16", "fp16", "fp16", "fp32"),
]

# ulp_tolerance of the mixed fixtures: by how many units in the last place a correct implementation of the
# contract may differ from these values, for every value stored in bf16 or fp16 (the param copy in "traj",
# the master in "master" when the master is bf16/fp16).  ulp distance = how many representable values of that
# dtype lie between the two, i.e. |ord(a) - ord(b)| with ord the monotone integer image of the bit pattern.
# Values stored in fp32 (the master of the fp32-master policies) are not counted in ulps (near a zero crossing
# a harmless 1e-9 difference is hundreds of fp32 ulps); they take the fp32 bound of the full-precision
# fixtures (README).
# Why 1: the contract fixes every rounding to the storage dtypes but not the fp32 operation order inside a
# step (torch's AVX2 kernels fuse a + alpha*b and a + (v*t1)*t2 into FMAs; a C++ loop may or may not, and
# mpopt writes some products in another order).  Such differences are an fp32 ulp or two of the new master or
# state, i.e. ~2**-16 (bf16) or ~2**-13 (fp16) of the stored dtype's ulp, so they flip the single rounding
# only when the fp32 value lies that close to a rounding midpoint; one flip leaves the element one ulp off
# and later steps carry that along.  Measured: torch's own non-FMA ("default") dispatch, a numpy replay of
# mpopt's operation order and mpopt's rule code built with and without FMA contraction all reproduce every
# bf16/fp16 value here exactly (0 ulps), so 1 is a margin, not a fudge.  (A flip followed by the element
# falling below a power of two could show as 2; none occurs in these data.)  A wrong rounding mode, a missing
# state rounding or a grad not rounded to the grad dtype shows up as many ulps.
MP_ULP_TOLERANCE = 1

TORCH_DTYPE = {"fp64": torch.float64, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CLASS = {"adam": "Adam", "adamw": "AdamW", "sgd": "SGD", "adagrad": "Adagrad"}


def make_optimizer(optimizer, params, hp):
    kw = dict(hp)
    if "betas" in kw:
        kw["betas"] = tuple(kw["betas"])
    return getattr(torch.optim, CLASS[optimizer])(params, foreach=False, **kw)


def run_plain(optimizer, hp, dtype, w0, grads):
    """torch.optim on one tensor of `dtype`; returns the params after each step."""
    p = torch.nn.Parameter(torch.tensor(w0, dtype=TORCH_DTYPE[dtype]))
    opt = make_optimizer(optimizer, [p], hp)
    traj = []
    for g in grads:
        p.grad = torch.tensor(g, dtype=TORCH_DTYPE[dtype])
        opt.step()
        traj.append(p.detach().tolist())
    return traj


def round_to(t, dtype):
    """Round an fp32 tensor once to `dtype` (nearest-even), returned as fp32 holding the rounded values."""
    return t if dtype == "fp32" else t.to(TORCH_DTYPE[dtype]).float()


def run_mixed(optimizer, hp, policy, w0, grads):
    """mpopt's mixed-precision contract emulated around torch.optim in fp32; returns (traj, master)."""
    param_dt, master_dt, grad_dt, state_dt = policy
    # w0 is float32-representable, so rounding it via float32 is the single nearest-even rounding.
    p = torch.nn.Parameter(round_to(torch.tensor(w0, dtype=torch.float32), master_dt))
    opt = make_optimizer(optimizer, [p], hp)
    traj, master = [], []
    for g in grads:
        p.grad = round_to(torch.tensor(g, dtype=torch.float32), grad_dt)
        opt.step()
        with torch.no_grad():
            p.copy_(round_to(p, master_dt))
            for name, s in opt.state[p].items():
                if name != "step":  # exp_avg, exp_avg_sq, max_exp_avg_sq, momentum_buffer
                    s.copy_(round_to(s, state_dt))
        traj.append(round_to(p.detach(), param_dt).tolist())
        master.append(p.detach().tolist())
    return traj, master


# --------------------------------------------------------------------------------------------------------
# Output: keys in a fixed order, one line per step, numbers via repr (no spaces inside number lists).


def num(x):
    if isinstance(x, bool) or not isinstance(x, float):
        return json.dumps(x)
    return repr(x)


def dump(v, indent=0):
    pad = " " * indent
    if isinstance(v, dict):
        items = [f'{pad}  {json.dumps(k)}: {dump(x, indent + 2).lstrip()}' for k, x in v.items()]
        return pad + "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(v, list):
        if v and isinstance(v[0], list):
            rows = [pad + "  " + dump(r) for r in v]
            return pad + "[\n" + ",\n".join(rows) + "\n" + pad + "]"
        return pad + "[" + ",".join(num(x) for x in v) + "]"
    return pad + num(v)


def write_fixture(name, doc):
    path = os.path.join(OUT_DIR, name + ".json")
    with open(path, "w") as f:
        f.write(dump(doc) + "\n")
    return path


def rel_diffs(a, b, w0):
    """(max |a - b| / |b| over all steps and elements with b != 0,
        max |a - b| / S_i with S_i = max(|w0_i|, max_t |b_i(t)|), the bound the README recommends)."""
    scale = [max([abs(w0[i])] + [abs(r[i]) for r in b]) for i in range(len(w0))]
    elem = max((abs(x - y) / abs(y) for ra, rb in zip(a, b) for x, y in zip(ra, rb) if y != 0), default=0.0)
    sc = max((abs(x - y) / scale[i] for ra, rb in zip(a, b) for i, (x, y) in enumerate(zip(ra, rb))
              if scale[i] != 0), default=0.0)
    return elem, sc


def main():
    cap = [l for l in torch.__config__.show().splitlines() if "CPU capability" in l]
    print(f"torch {torch.__version__}; {cap[0].strip() if cap else 'CPU capability unknown'}")
    if not any(CPU_CAPABILITY.upper() in l for l in cap):
        print(f"warning: not the {CPU_CAPABILITY.upper()} dispatch; fp32 results may differ in the last bits "
              "from the committed fixtures", file=sys.stderr)
    os.makedirs(OUT_DIR, exist_ok=True)
    w0, grads, mp_grads = make_inputs()
    gen = f"torch {torch.__version__} torch.optim."
    written = []

    for name, optimizer, hp in CASES:
        trajs = {}
        for dtype in ("fp32", "fp64"):
            case = {"optimizer": optimizer, "dtype": dtype, "hparams": hp, "w0": w0, "grads": grads}
            traj = run_plain(optimizer, hp, dtype, w0, grads)
            trajs[dtype] = traj
            doc = {"name": f"{name}_{dtype}", "generator": gen + CLASS[optimizer], "case": case,
                   "expected": {"traj": traj, "master": traj}}
            written.append(write_fixture(doc["name"], doc))
        elem, sc = rel_diffs(trajs["fp32"], trajs["fp64"], w0)
        print(f"  {name:28s} fp32 vs fp64 trajectory: max |d|/|x| {elem:.2e}, max |d|/S_i {sc:.2e}")

    for name, optimizer, hp in MP_CASES:
        for policy in MP_POLICIES:
            pdt, mdt, gdt, sdt = policy
            case = {"optimizer": optimizer, "dtype": "fp32",
                    "precision": {"param": pdt, "master": mdt, "grad": gdt, "state": sdt},
                    "hparams": hp, "w0": w0, "grads": mp_grads}
            traj, master = run_mixed(optimizer, hp, policy, w0, mp_grads)
            fname = f"{name}_p{pdt}_m{mdt}_g{gdt}_s{sdt}"
            doc = {"name": fname,
                   "generator": gen + CLASS[optimizer] + " (fp32) + mpopt mixed-precision rounding emulation",
                   "case": case, "ulp_tolerance": MP_ULP_TOLERANCE,
                   "expected": {"traj": traj, "master": master}}
            written.append(write_fixture(fname, doc))
            start = round_to(round_to(torch.tensor(w0, dtype=torch.float32), mdt), pdt).tolist()
            moved = sum(1 for a, b in zip(traj[-1], start) if a != b)
            print(f"  {fname:45s} params changed: {moved}/{N}")

    print(f"wrote {len(written)} fixtures to {os.path.relpath(OUT_DIR)}")


if __name__ == "__main__":
    main()
