"""ExecuTorch with the XNNPACK delegate as a latency backend (``latency=executorch_xnnpack``).

Each model (an op key, a network) is lowered the way a phone app ships it:
``torch.export.export`` → ``executorch.exir.to_edge_transform_and_lower(...,
partitioner=[XnnpackPartitioner()])`` → ``.to_executorch()`` → a ``.pte`` buffer, loaded with
``executorch.runtime.Runtime`` and timed as ``method.execute([x])`` (perf_counter, fixed input)
under the interleaved protocol of ``ernas.latency.measure``, like onnxruntime.

int8 (``dtype: int8``): each model is PT2E-quantised for XNNPACK before it is lowered
(``ernas.latency.pt2e``: the quantizer ``ernas-export`` ships int8 ``.pte`` files with), so an
int8 table prices the int8 network a phone app runs; ops the quantizer leaves in float32 (e.g.
the channel LayerNorm's mean) keep their float kernels and the quantize/dequantize around them.

Threads: XNNPACK runs on ExecuTorch's process-wide threadpool (``torch.set_num_threads`` does
not reach it); ``threads`` resets it through the pybindings' ``_unsafe_reset_threadpool(n)``
before a runner is built and, if another backend changed it, before a timed call; the
fingerprint records the count the pool reports (``_threadpool_get_thread_count``).

Delegation: ops XNNPACK does not take run on ExecuTorch's portable kernels. Per model,
:func:`delegation` counts the lowered graph's nodes inside XNNPACK subgraphs and, by op type,
those left outside (``executorch.devtools.backend_debug.get_delegation_info``; the ``getitem``
nodes that unpack a delegate's outputs are not ops and are not counted). The profiler stores it
per key in the table's ``delegation`` column (:func:`delegation_text`).

ExecuTorch is an optional extra (``pip install "ernas[executorch]"``); this module imports it
only inside functions, so the rest of ernas runs without it.
"""
from __future__ import annotations

import logging
import time
import warnings
from collections import Counter

import torch
from torch import nn

from ernas.errors import ErnasError
from ernas.extras import EXECUTORCH
from ernas.latency.backends import Backend
from ernas.latency.fingerprint import fingerprint, host_hardware
from ernas.latency.measure import Runner
from ernas.latency.pt2e import quantize_pt2e, timing_calibration

__all__ = ["ExecutorchBackend", "delegation", "delegation_summary", "delegation_text", "lower"]

log = logging.getLogger(__name__)
NOT_OPS = ("getitem", "Total")
DTYPES = ("float32", "int8")


def executorch_version() -> str:
    from importlib.metadata import version

    return version("executorch")


def set_threads(n: int) -> int:
    """Resize ExecuTorch's threadpool to ``n`` threads if it has another size; returns the size
    it reports afterwards."""
    from executorch.extension.pybindings import portable_lib as pl

    if pl._threadpool_get_thread_count() != n:
        pl._unsafe_reset_threadpool(n)
    return int(pl._threadpool_get_thread_count())


def lower(program):
    """The XNNPACK-lowered edge program of an ``ExportedProgram`` (``.to_executorch().buffer``
    is the ``.pte``)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    with warnings.catch_warnings():  # executorch's own pytree deprecation notices
        warnings.simplefilter("ignore", FutureWarning)
        return to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])


def delegation(edge) -> dict:
    """``{"delegated": nodes inside XNNPACK subgraphs, "subgraphs": n, "portable": {op type:
    nodes left to portable kernels}}`` of a lowered edge program."""
    from executorch.devtools.backend_debug import get_delegation_info

    info = get_delegation_info(edge.exported_program().graph_module)
    portable: Counter = Counter()
    delegated = 0
    for row in info.get_operator_delegation_dataframe().to_dict("records"):
        if row["op_type"] in NOT_OPS:
            continue
        delegated += int(row["occurrences_in_delegated_graphs"])
        if row["occurrences_in_non_delegated_graphs"]:
            portable[row["op_type"]] += int(row["occurrences_in_non_delegated_graphs"])
    return {"delegated": delegated, "subgraphs": int(info.num_delegated_subgraphs),
            "portable": dict(sorted(portable.items()))}


def delegation_text(d: dict) -> str:
    """One CSV cell: ``xnnpack=12;portable=aten_mean_dim:2,aten_split_with_sizes_copy_default:1``
    (``portable=`` empty when everything is delegated)."""
    return (f"xnnpack={d['delegated']};portable="
            + ",".join(f"{k}:{v}" for k, v in d["portable"].items()))


def parse_delegation(text: str) -> dict:
    """Inverse of :func:`delegation_text` (``subgraphs`` is not stored)."""
    head, _, tail = str(text).partition(";portable=")
    portable = dict(p.rsplit(":", 1) for p in tail.split(",") if p)
    return {"delegated": int(head.partition("=")[2]),
            "portable": {k: int(v) for k, v in portable.items()}}


def delegation_summary(table) -> dict | None:
    """Across a table's ``delegation`` column: keys with portable fallbacks and the portable
    nodes per op type (how many keys, how many nodes); None without the column."""
    frame = table.to_frame()
    if "delegation" not in frame.columns:
        return None
    cells = {k: parse_delegation(v) for k, v in frame["delegation"].items() if isinstance(v, str)}
    ops: dict[str, dict] = {}
    for d in cells.values():
        for op, n in d["portable"].items():
            s = ops.setdefault(op, {"keys": 0, "nodes": 0})
            s["keys"] += 1
            s["nodes"] += n
    fallback = sorted(k for k, d in cells.items() if d["portable"])
    return {"keys": len(cells), "fully_delegated": len(cells) - len(fallback),
            "with_fallback": len(fallback), "portable_ops": dict(sorted(ops.items())),
            "fallback_keys": fallback}


class PteMethod:
    """A loaded ``forward`` of a ``.pte`` (bytes or path) and the program that owns it."""

    def __init__(self, pte):
        from executorch.runtime import Runtime

        runtime = Runtime.get()
        self.program = runtime.load_program(pte if isinstance(pte, (bytes, bytearray))
                                            else str(pte))
        self.method = self.program.load_method("forward")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.execute([x.contiguous()])[0]

    def run(self, _names, feeds: dict):
        """onnxruntime's ``session.run`` shape, so ``ernas.export.onnx.run_tiled`` can use it."""
        return [self(torch.from_numpy(feeds["input"])).numpy()]


class ExecutorchBackend(Backend):
    """ExecuTorch + XNNPACK on this host (module docstring): ``threads`` of ExecuTorch's
    threadpool; ``dtype`` float32 or int8 (PT2E static quantisation, XNNPACK's int8 kernels)."""

    name = "executorch_xnnpack"

    def __init__(self, threads: int = 2, dtype: str = "float32"):
        EXECUTORCH.require("latency backend executorch_xnnpack")
        if isinstance(threads, bool) or int(threads) < 1:
            raise ErnasError(f"executorch_xnnpack backend threads={threads} must be >= 1.")
        if dtype not in DTYPES:
            raise ErnasError(f"executorch_xnnpack backend dtype={dtype!r}: valid values are "
                             f"{list(DTYPES)} (int8: PT2E-quantised models, the int8 network "
                             f"a phone app ships). Fix `latency.backend.dtype`.")
        self.threads, self.dtype = int(threads), dtype

    def to_pte(self, module: nn.Module, example_input: torch.Tensor) -> tuple[bytes, dict]:
        """The ``.pte`` bytes of ``module`` at ``example_input``'s shape and its delegation;
        with ``dtype: int8`` the module is PT2E-quantised first (``ernas.latency.pt2e``,
        calibrated on seeded normal inputs)."""
        module = module.eval().float()
        x = example_input.detach().to(torch.float32)
        if self.dtype == "int8":
            module = quantize_pt2e(module, x, timing_calibration(x))
        with torch.no_grad():
            edge = lower(torch.export.export(module, (x,)))
        info = delegation(edge)  # before to_executorch, whose memory planning adds alloc nodes
        return edge.to_executorch().buffer, info

    def pte_runner(self, pte, example_input: torch.Tensor) -> Runner:
        """A runner for a ``.pte`` (bytes or path) taking ``example_input``."""
        set_threads(self.threads)
        method = PteMethod(pte)
        x = example_input.detach().to(torch.float32).contiguous()
        method(x)  # load-time work (weight packing) is not timed

        def run() -> float:
            set_threads(self.threads)
            t0 = time.perf_counter()
            method.method.execute([x])
            return (time.perf_counter() - t0) * 1e3

        run.method = method
        return run

    def runner(self, module, example_input):
        pte, info = self.to_pte(module, example_input)
        run = self.pte_runner(pte, example_input)
        run.notes = {"delegation": delegation_text(info)}
        if info["portable"]:
            log.debug("portable kernels in %s: %s", type(module).__name__, info["portable"])
        return run

    def fingerprint(self):
        return fingerprint(host_hardware(), {
            "runtime": "executorch", "version": executorch_version(), "provider": "xnnpack",
            "threads": set_threads(self.threads)})

    def metadata(self):
        meta = super().metadata()
        meta["versions"]["executorch"] = executorch_version()
        meta.update(provider="xnnpack", threads=self.threads)
        return meta
