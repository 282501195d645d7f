#!/usr/bin/env python3
"""Independent check of an mpopt checkpoint and of mpopt-consolidate's output, with the standard library only
(struct, json, zlib): every file is valid safetensors, index.json's sizes and CRC-32s match the files, the
consolidated tensors are the rank files' pieces concatenated in rank order and split by tensor_sizes, the bf16
output is the fp32 master rounded to nearest even, and the tool refuses a truncated file or a missing index.
For a Kahan checkpoint ("precision.master_rounding": "kahan") the rank files also hold "group<g>.master_compensation",
the default output is fp32, and each consolidated weight is master + compensation, summed exactly (fractions) and
rounded once to nearest even (fp32, and bf16 in the second file); the states are widened exactly.

usage: check_checkpoint.py TOOL CHECKPOINT_DIR FULL.safetensors FULL_BF16.safetensors
"""
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import zlib
from fractions import Fraction

SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}


def read_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    assert 8 + n <= len(data), f"{path}: header length {n} past the end"
    assert n % 8 == 0, f"{path}: header not padded to 8 bytes"
    header = json.loads(data[8:8 + n].decode("utf-8"))
    meta = header.pop("__metadata__", {})
    assert all(isinstance(v, str) for v in meta.values()), f"{path}: non-string metadata"
    body = data[8 + n:]
    at = 0
    tensors = {}
    for name, t in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"]):
        b, e = t["data_offsets"]
        assert b == at, f"{path}: {name} starts at {b}, expected {at}"
        count = 1
        for s in t["shape"]:
            count *= s
        assert e - b == count * SIZES[t["dtype"]], f"{path}: {name} size"
        tensors[name] = (t["dtype"], t["shape"], body[b:e])
        at = e
    assert at == len(body), f"{path}: {len(body) - at} stray bytes"
    return meta, tensors


def bf16_rne(f32_bytes):
    out = bytearray()
    for (u,) in struct.iter_unpack("<I", f32_bytes):
        assert (u & 0x7FFFFFFF) <= 0x7F800000, "NaN in the master"
        out += struct.pack("<H", ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF)
    return bytes(out)


def decode(dtype, raw):
    """The exact values of a little-endian tensor."""
    if dtype == "BF16":
        return [struct.unpack("<f", struct.pack("<I", h << 16))[0] for (h,) in struct.iter_unpack("<H", raw)]
    fmt = {"F64": "<d", "F32": "<f", "F16": "<e"}[dtype]
    return [v for (v,) in struct.iter_unpack(fmt, raw)]


def round_nearest_even(x, bits):
    """x (a Fraction) rounded to `bits` significant bits, ties to even; the normal range of fp32 and bf16."""
    if x == 0:
        return Fraction(0)
    a = abs(x)
    e = a.numerator.bit_length() - a.denominator.bit_length()
    while Fraction(2) ** e > a:
        e -= 1
    while Fraction(2) ** (e + 1) <= a:
        e += 1
    assert -126 <= e <= 127, f"{float(x)} is outside the normal range"
    quantum = Fraction(2) ** (e - bits + 1)
    n = a / quantum
    q = math.floor(n)
    if n - q > Fraction(1, 2) or (n - q == Fraction(1, 2) and q % 2 == 1):
        q += 1
    return (q * quantum) * (1 if x > 0 else -1)


def f32_bytes(values):
    return b"".join(struct.pack("<f", float(v)) for v in values)


def bf16_bytes(values):
    return b"".join(struct.pack("<f", float(v))[2:] for v in values)


def main():
    tool, ckpt, full, full_bf16 = sys.argv[1:5]
    with open(os.path.join(ckpt, "index.json")) as f:
        index = json.load(f)
    meta = index["metadata"]
    assert meta["format"] == "mpopt-checkpoint" and meta["format_version"] == "1"
    world = int(meta["zero.world_size"])
    assert len(index["files"]) == world
    groups = int(meta["groups"])
    kahan = meta.get("precision.master_rounding") == "kahan"
    pieces = {}
    for q, entry in enumerate(index["files"]):
        path = os.path.join(ckpt, entry["file"])
        with open(path, "rb") as f:
            raw = f.read()
        assert len(raw) == entry["bytes"], f"{path}: size"
        assert "%08x" % zlib.crc32(raw) == entry["crc32"], f"{path}: crc32"
        fmeta, tensors = read_safetensors(path)
        assert fmeta["rank"] == str(q) and fmeta["save_id"] == meta["save_id"]
        for name, (dtype, shape, data) in tensors.items():
            pieces.setdefault(name, []).append((q, dtype, shape, data))
    _, out = read_safetensors(full)
    _, out16 = read_safetensors(full_bf16)
    checked = 0
    for g in range(groups):
        sizes = [int(s) for s in meta[f"group.{g}.tensor_sizes"].split(",")]
        states = meta[f"group.{g}.states"].split(",") if meta[f"group.{g}.states"] else []
        def flat(role):
            parts = sorted(pieces[f"group{g}.{role}"])
            assert [p[0] for p in parts] == list(range(world)), f"group{g}.{role}: not one piece per rank"
            data = b"".join(p[3] for p in parts)
            assert len(data) == sum(sizes) * SIZES[parts[0][1]], f"group{g}.{role}: size"
            return parts[0][1], data

        if kahan:  # every weight, master + compensation, exactly
            mdtype, mflat = flat("master")
            cdtype, cflat = flat("master_compensation")
            assert cdtype == mdtype, f"group{g}: compensation dtype {cdtype}, master {mdtype}"
            exact = [Fraction(m) + Fraction(c) for m, c in zip(decode(mdtype, mflat), decode(cdtype, cflat))]
            moved = sum(round_nearest_even(x, 24) != Fraction(m) for x, m in zip(exact, decode(mdtype, mflat)))
            assert moved > 0, f"group{g}: every compensation is zero, the fixture shows nothing"
        for role, suffix in [("master", "")] + [("state." + s, "." + s) for s in states]:
            dtype, data = flat(role)
            esize = SIZES[dtype]
            at = 0
            for t, n in enumerate(sizes):
                name = f"group{g}.tensor{t}{suffix}"
                want = data[at * esize:(at + n) * esize]
                if kahan:  # fp32 output: weights rounded once, states widened exactly
                    want = f32_bytes(round_nearest_even(x, 24) for x in exact[at:at + n]) if role == "master" \
                        else f32_bytes(decode(dtype, want))
                    assert out[name][0] == "F32" and out[name][1] == [n], name
                else:
                    assert out[name][0] == dtype and out[name][1] == [n], name
                assert out[name][2] == want, f"{name}: consolidated bytes differ from the rank files"
                if role == "master" and kahan:
                    want16 = bf16_bytes(round_nearest_even(x, 8) for x in exact[at:at + n])
                    assert out16[name][0] == "BF16" and out16[name][2] == want16, f"{name}: bf16"
                elif role == "master" and dtype == "F32":
                    assert out16[name][0] == "BF16" and out16[name][2] == bf16_rne(want), f"{name}: bf16"
                checked += n
                at += n
    # Damaged copies are refused with the reason.
    scratch = full + ".damaged"
    shutil.rmtree(scratch, ignore_errors=True)
    shutil.copytree(ckpt, scratch)
    victim = os.path.join(scratch, index["files"][0]["file"])
    os.truncate(victim, os.path.getsize(victim) - 1)
    r = subprocess.run([tool, scratch, scratch + "/out.safetensors"], capture_output=True, text=True)
    assert r.returncode == 1 and "(truncated)" in r.stderr, r.stderr
    os.remove(os.path.join(scratch, "index.json"))
    r = subprocess.run([tool, scratch, scratch + "/out.safetensors"], capture_output=True, text=True)
    assert r.returncode == 1 and "no readable index.json" in r.stderr, r.stderr
    shutil.rmtree(scratch)
    print(f"ok: {world} rank files, {groups} groups, {checked} elements checked" + (" (Kahan)" if kahan else ""))


if __name__ == "__main__":
    main()
