#!/usr/bin/env python3
"""Check that safetensors files (e.g. written by the C++ writer) load in the reference stack.

    python3 tools/reference/check_safetensors_load.py FILE [FILE ...]

For each file: parses the raw header itself (8-byte little-endian length, JSON, string->string
__metadata__, dtypes, shapes, contiguous data offsets covering the whole buffer), loads the file
with safetensors.torch.load_file and with safetensors.safe_open, checks both agree with each other
and with the header, that every tensor is finite and that metadata "format" == "pt"; prints the
names, dtypes, shapes and the metadata. Exit status 1 if any check fails for any file.
Dependencies: torch, safetensors, Python standard library.
"""
from __future__ import annotations

import json
import os
import struct
import sys
import traceback
from typing import Dict

import torch

# safetensors dtype string -> torch dtype (float8 / unsigned types only where torch has them).
_DTYPES: Dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"),
                     ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        _DTYPES[_name] = getattr(torch, _attr)

_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
             "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


class CheckError(Exception):
    pass


def need(ok: bool, what: str) -> None:
    if not ok:
        raise CheckError(what)


def read_header(path: str):
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        need(len(raw) == 8, "file shorter than 8 bytes")
        (n,) = struct.unpack("<Q", raw)
        need(8 + n <= size, f"header length {n} runs past the file size {size}")
        hbytes = f.read(n)
    try:
        header = json.loads(hbytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckError(f"header is not UTF-8 JSON: {e}")
    need(isinstance(header, dict), "header is not a JSON object")
    meta = header.pop("__metadata__", None)
    if meta is not None:
        need(isinstance(meta, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()),
             "__metadata__ must be a string->string map")
    spans = []
    for name, info in header.items():
        need(isinstance(info, dict) and set(info) == {"dtype", "shape", "data_offsets"},
             f"{name}: entry must have exactly dtype, shape, data_offsets")
        dt, shape, (b, e) = info["dtype"], info["shape"], info["data_offsets"]
        need(dt in _ITEMSIZE, f"{name}: unknown dtype {dt}")
        need(all(isinstance(d, int) and d >= 0 for d in shape), f"{name}: bad shape {shape}")
        numel = 1
        for d in shape:
            numel *= d
        need(0 <= b <= e and e - b == numel * _ITEMSIZE[dt],
             f"{name}: data_offsets {[b, e]} do not match {dt} {shape}")
        spans.append((b, e, name))
    spans.sort()
    pos = 0
    for b, e, name in spans:
        need(b == pos, f"{name}: data starts at {b}, expected {pos} (gap or overlap)")
        pos = e
    need(8 + n + pos == size, f"8 + header {n} + data {pos} != file size {size}")
    return header, meta, n, size


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def check_file(path: str) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    header, raw_meta, n, size = read_header(path)
    print(f"{path}: {size} bytes, header {n} bytes, {len(header)} tensors")

    tensors = load_file(path)
    need(set(tensors) == set(header), "load_file names differ from the header")
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
        need(set(keys) == set(header), "safe_open names differ from the header")
        for k in keys:
            a, b = tensors[k], f.get_tensor(k)
            need(a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape), f"{k}: load_file vs safe_open dtype/shape")
            need(torch.equal(as_bytes(a), as_bytes(b)), f"{k}: load_file vs safe_open bytes differ")

    need(meta == raw_meta, "safe_open metadata differs from the raw header's")
    failures = []
    for k in sorted(header):
        t = tensors[k]
        info = header[k]
        want = _DTYPES.get(info["dtype"])
        if want is not None and t.dtype != want:
            failures.append(f"{k}: header says {info['dtype']}, loaded as {t.dtype}")
        if list(t.shape) != list(info["shape"]):
            failures.append(f"{k}: header shape {info['shape']}, loaded {list(t.shape)}")
        finite = True
        if t.is_floating_point() and t.numel() > 0:
            finite = bool(torch.isfinite(t.to(torch.float64)).all())
            if not finite:
                bad = int((~torch.isfinite(t.to(torch.float64))).sum())
                failures.append(f"{k}: {bad} non-finite values")
        line = f"  {k:56s} {info['dtype']:8s} {str(list(t.shape)):18s}"
        if t.numel() > 0 and (t.is_floating_point() or t.dtype in (torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8)):
            v = t.to(torch.float64)
            line += f" min {float(v.min()):+.4e} max {float(v.max()):+.4e}"
        print(line + ("" if finite else "  NON-FINITE"))

    print("  metadata:")
    if meta is None:
        failures.append('no __metadata__ (need {"format": "pt"})')
    else:
        for k in sorted(meta):
            v = meta[k]
            if k == "config":
                try:
                    cfg = json.loads(v)
                    v = json.dumps(cfg, sort_keys=False)
                except json.JSONDecodeError as e:
                    failures.append(f'metadata "config" is not JSON: {e}')
            print(f"    {k}: {v}")
        if meta.get("format") != "pt":
            failures.append(f'metadata "format" is {meta.get("format")!r}, expected "pt"')
    if failures:
        raise CheckError("; ".join(failures))


def main(argv=None) -> int:
    paths = sys.argv[1:] if argv is None else argv
    if not paths or any(p in ("-h", "--help") for p in paths):
        print(__doc__)
        return 0 if paths else 2
    bad = 0
    for p in paths:
        try:
            check_file(p)
            print(f"OK {p}")
        except CheckError as e:
            bad += 1
            print(f"FAIL {p}: {e}")
        except Exception as e:  # noqa: BLE001 - a loader exception is a failure of this file
            bad += 1
            traceback.print_exc()
            print(f"FAIL {p}: {type(e).__name__}: {e}")
    print(f"{len(paths) - bad} passed, {bad} failed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
