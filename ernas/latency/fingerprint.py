"""Host fingerprints: what a latency table's numbers depend on, recorded with the table.

A table is only true where it was made (tables from another VM with the same "AMD EPYC" name were
1.4–2.4x off). A fingerprint has two parts, both compared field by field:

- ``hardware``: CPU vendor, model name, family/model/stepping, logical and physical cores, L2/L3
  cache sizes (KiB) and the ISA flags that select different kernels (AVX, AVX2, FMA, AVX-512
  F/BW/VL/VNNI, AVX-VNNI, AMX). A GPU backend adds the GPU; a command backend (a phone, a board)
  describes its device by its label instead, since this host's CPU does not run its models.
- ``runtime``: the runtime and its version (onnxruntime or torch), provider, graph-optimisation
  level, opset, execution mode, threads and spinning.

Not compared: hostname, date, Python, numpy (they do not change kernels). ``digest`` is a short
stable hash of both parts (sorted JSON), used in probe caches and reports.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import warnings
from pathlib import Path

from ernas.errors import ErnasError

__all__ = ["ISA_FLAGS", "check_fingerprint", "cpu_name", "describe", "digest", "fingerprint",
           "fingerprint_differences", "host_hardware", "machine_description"]

ISA_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
             "amx_bf16", "amx_int8", "amx_tile")
_CPUINFO = Path("/proc/cpuinfo")
_CACHE = Path("/sys/devices/system/cpu/cpu0/cache")


def _cpuinfo_blocks() -> list[dict[str, str]]:
    try:
        text = _CPUINFO.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    blocks = []
    for chunk in text.strip().split("\n\n"):
        fields = {}
        for line in chunk.splitlines():
            k, sep, v = line.partition(":")
            if sep:
                fields[k.strip().lower()] = v.strip()
        blocks.append(fields)
    return blocks


def cpu_name() -> str:
    """CPU model name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    for block in _cpuinfo_blocks():
        if block.get("model name"):
            return block["model name"]
    return platform.processor() or platform.machine() or "unknown-cpu"


def _cache_kib(level: int) -> int | None:
    """Size in KiB of the unified (or data) cache of ``level`` seen by cpu0, from sysfs."""
    if not _CACHE.is_dir():
        return None
    for index in sorted(_CACHE.glob("index*")):
        try:
            if int((index / "level").read_text()) != level:
                continue
            if (index / "type").read_text().strip() == "Instruction":
                continue
            size = (index / "size").read_text().strip().upper()
        except (OSError, ValueError):
            continue
        scale = {"K": 1, "M": 1024, "G": 1024 ** 2}.get(size[-1:], None)
        try:
            return int(size[:-1]) * scale if scale else int(size) // 1024
        except ValueError:
            return None
    return None


@functools.lru_cache(maxsize=1)
def host_hardware() -> dict:
    """This host's CPU as the fingerprint's ``hardware`` part (None where unknown)."""
    blocks = _cpuinfo_blocks()
    first = blocks[0] if blocks else {}
    flags = set(first.get("flags", "").split())
    cores = {(b.get("physical id"), b.get("core id")) for b in blocks if "core id" in b}
    return {
        "cpu_vendor": first.get("vendor_id"),
        "cpu_model": cpu_name(),
        "cpu_family": first.get("cpu family"),
        "cpu_model_number": first.get("model"),
        "cpu_stepping": first.get("stepping"),
        "logical_cores": len(blocks) or os.cpu_count(),
        "physical_cores": len(cores) or None,
        "l2_cache_kib": _cache_kib(2),
        "l3_cache_kib": _cache_kib(3),
        "isa": sorted(f for f in ISA_FLAGS if f in flags) if blocks else None,
        "machine": platform.machine(),
    }


def digest(fp: dict) -> str:
    """Short stable hash (12 hex digits) of a fingerprint's ``hardware`` and ``runtime`` parts."""
    body = {k: fp.get(k) for k in ("hardware", "runtime")}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:12]


def fingerprint(hardware: dict, runtime: dict) -> dict:
    """``{"hardware": ..., "runtime": ..., "digest": ...}`` (see the module docstring)."""
    fp = {"hardware": dict(hardware), "runtime": dict(runtime)}
    fp["digest"] = digest(fp)
    return fp


def fingerprint_differences(have: dict | None, want: dict) -> list[str]:
    """``part.field: table has X, this machine has Y`` for every differing field (an empty
    list when they agree); a missing fingerprint is one entry saying so."""
    if not isinstance(have, dict) or "hardware" not in have:
        return ["fingerprint: the table has none (unknown host: profiled before fingerprints "
                "were recorded)"]
    out = []
    for part in ("hardware", "runtime"):
        a, b = have.get(part) or {}, want.get(part) or {}
        for field in sorted(set(a) | set(b)):
            x, y = a.get(field, "<missing>"), b.get(field, "<missing>")
            if json.dumps(x, sort_keys=True, default=str) != json.dumps(y, sort_keys=True,
                                                                          default=str):
                out.append(f"{part}.{field}: table has {json.dumps(x, default=str)}, this "
                           f"machine has {json.dumps(y, default=str)}")
    return out


def check_fingerprint(metadata: dict, want: dict, where: str, trust: bool = False,
                      fix: str | None = None) -> list[str]:
    """Compare a table's ``metadata['fingerprint']`` with ``want``. Differences raise an
    ErnasError naming every differing field, or, with ``trust``, only warn. Returns them."""
    diffs = fingerprint_differences(metadata.get("fingerprint"), want)
    if not diffs:
        return diffs
    msg = (f"Latency table {where} was not made on this machine/runtime: " + "; ".join(diffs)
           + ". Its numbers need not hold here (tables from another host of the same CPU name "
             "were 1.4-2.4x off).")
    if trust:
        warnings.warn(msg + " Used anyway because latency.trust_table=true.", stacklevel=3)
        return diffs
    raise ErnasError(msg + " Fix: " + (fix or "use latency.table=auto (profiles a table for "
                                       "this machine into the cache), profile one with "
                                       "ernas-profile, or set latency.trust_table=true to use "
                                       "it anyway."))


def describe(fp: dict) -> str:
    """One line for reports: CPU, cores, caches, ISA and runtime settings."""
    h, r = fp.get("hardware", {}), fp.get("runtime", {})
    hw = ", ".join(f"{k}={v}" for k, v in h.items() if v not in (None, [], ""))
    rt = ", ".join(f"{k}={v}" for k, v in r.items() if v is not None)
    return f"{hw} | {rt} | digest {fp.get('digest')}"


def machine_description() -> str:
    """One line for benchmark reports: CPU model, logical cores and torch's thread count."""
    import torch

    return (f"CPU {cpu_name()}, {os.cpu_count()} logical cores, torch threads "
            f"{torch.get_num_threads()}")
