"""Peak inference memory of one network on one runtime, measured in fresh processes.

The method we follow reports a 1.5x smaller memory footprint beside its latency gain; this module
measures that figure for our networks. What is measured: the resident-set high-water mark of a
fresh child process (``ernas/memory_child.py``) while it loads the network file and runs
``inferences`` inferences, *above* the baseline of the same process with the runtime imported
and an empty session created (the high-water mark is reset to the resident set there, so import
peaks do not hide the network's allocations)::

    footprint = VmHWM(after the inferences) − VmRSS(empty session)      [MiB]

It holds the weights, the activations and workspaces the runtime keeps, and its session
structures: what a device must have free to run the network. ``runs`` fresh processes
(concurrently: memory does not depend on timing), reported as the median, with ``spread`` =
max − min over the runs (MiB).

Runtimes (``RUNTIMES``, named like the latency backends): ``onnxruntime`` (an ``.onnx`` file,
the latency backend's session options), ``torch`` (eager CPU: an arch YAML and its state dict)
and ``executorch_xnnpack`` (a ``.pte`` under ``executorch.runtime``). To add one, write a child
runner (a generator function, contract in ``ernas.memory_child``) in any Python file the child
can load by path, and add ``RUNTIMES[name] = ChildRunner(path, function)``.
"""
from __future__ import annotations

import copy
import json
import logging
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ernas.errors import ErnasError

log = logging.getLogger(__name__)

CHILD = Path(__file__).resolve().with_name("memory_child.py")
DEFAULT_RUNS = 3
DEFAULT_INFERENCES = 3


@dataclass(frozen=True)
class ChildRunner:
    """A runner the child loads by path: ``function`` (a generator, ``ernas.memory_child``) in
    the Python file ``script``."""

    script: Path
    function: str


RUNTIMES: dict[str, ChildRunner] = {
    "onnxruntime": ChildRunner(CHILD, "onnxruntime"),
    "torch": ChildRunner(CHILD, "torch_eager"),
    "executorch_xnnpack": ChildRunner(CHILD, "executorch"),
}


@dataclass(frozen=True)
class Memory:
    """One network's footprint on one runtime (MiB): median over ``runs`` fresh processes."""

    mib: float                # median of peak − baseline
    spread: float             # max − min of peak − baseline over the runs
    runs_mib: list[float]
    baseline_mib: float       # median resident set of the empty session
    peak_mib: float           # median high-water mark after the inferences
    runtime: str
    inferences: int
    method: str               # clear_refs (reset at the baseline) | hwm | ru_maxrss

    def to_dict(self) -> dict:
        return asdict(self)


def _child_command(runtime: str, path, input_shape, options, inferences, extra) -> list[str]:
    r = RUNTIMES[runtime]
    spec = {"script": str(r.script), "function": r.function, "path": str(path),
            "input_shape": [int(s) for s in input_shape], "options": dict(options or {}),
            "inferences": int(inferences), **{k: str(v) for k, v in extra.items()}}
    # the script's folder (ernas/, which holds an io.py) must not lead sys.path:
    # -P (3.11+) drops it; -I (older) drops it with the environment's paths
    isolate = "-P" if sys.version_info >= (3, 11) else "-I"
    return [sys.executable, isolate, str(CHILD), json.dumps(spec)]


def _result(proc: subprocess.Popen, runtime: str, path, timeout_s: float) -> dict:
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise RuntimeError(f"memory measurement of {path} on {runtime} ran past "
                           f"{timeout_s:.0f} s") from None
    line = next((ln for ln in out.splitlines() if ln.startswith("ERNAS_MEMORY ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"memory measurement of {path} on {runtime} failed (exit status "
                           f"{proc.returncode}):\n{err[-2000:]}")
    return json.loads(line.removeprefix("ERNAS_MEMORY "))


def peak_memory(runtime: str, path, input_shape, options: dict | None = None,
                runs: int = DEFAULT_RUNS, inferences: int = DEFAULT_INFERENCES,
                timeout_s: float = 600.0, **files) -> Memory:
    """The footprint of the network file ``path`` on ``runtime`` (module docstring). ``options``
    go to the runner (onnxruntime: threads, provider, graph_optimization, spinning; torch and
    executorch: threads); ``files``: further files the runner reads (torch: ``weights``)."""
    if runtime not in RUNTIMES:
        raise ErnasError(f"Unknown memory runtime {runtime!r}; valid runtimes are "
                         f"{sorted(RUNTIMES)}.")
    if int(runs) < 1 or int(inferences) < 1:
        raise ErnasError(f"memory runs={runs} and inferences={inferences} must be >= 1.")
    cmd = _child_command(runtime, path, input_shape, options, inferences, files)
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(int(runs))]
    try:
        res = [_result(p, runtime, path, timeout_s) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    foot = [(r["peak_kib"] - r["baseline_kib"]) / 1024 for r in res]
    return Memory(mib=statistics.median(foot), spread=max(foot) - min(foot), runs_mib=foot,
                  baseline_mib=statistics.median(r["baseline_kib"] / 1024 for r in res),
                  peak_mib=statistics.median(r["peak_kib"] / 1024 for r in res),
                  runtime=runtime, inferences=int(inferences), method=res[0]["method"])


def backend_runtime(backend) -> tuple[str | None, str]:
    """``(runtime, why)``: the ``RUNTIMES`` entry that measures a latency backend's models on
    this host, or None and the reason it cannot."""
    name = getattr(backend, "name", None)
    if getattr(backend, "dtype", "float32") != "float32":
        return None, f"dtype {backend.dtype}: only float32 networks are measured"
    if name == "onnxruntime":
        if backend.provider != "CPUExecutionProvider":
            return None, f"provider {backend.provider}: host memory says nothing of the device's"
        return "onnxruntime", ""
    if name == "torch":
        if backend.device != "cpu" or backend.compile:
            return None, "only torch eager on the CPU is measured (device=cpu, compile=false)"
        return "torch", ""
    if name == "executorch_xnnpack" and hasattr(backend, "to_pte"):
        return "executorch_xnnpack", ""
    return None, f"no memory runner takes a network of latency backend {name!r} yet"


def _options(backend) -> dict:
    """The runner options of a latency backend: its threads, and onnxruntime's session
    options."""
    opts = {"threads": backend.threads}
    if backend.name == "onnxruntime":
        opts.update(provider=backend.provider, graph_optimization=backend.graph_optimization,
                    spinning=backend.spinning)
    return opts


def _fused(model: nn.Module) -> nn.Module:
    from ernas import inference_model

    return inference_model(copy.deepcopy(model).cpu().float())


def network_memory(arch, model: nn.Module, backend, input_shape, runs: int = DEFAULT_RUNS,
                   inferences: int = DEFAULT_INFERENCES) -> Memory | None:
    """The footprint of ``model`` (of ``arch``) on the runtime of the latency ``backend``, with
    its settings: onnxruntime gets the fused model exported to ONNX and executorch_xnnpack its
    ``.pte`` (``backend.to_pte``), as the latency backend times them; torch gets the arch YAML
    and the state dict. None (logged) for a backend no runner measures here (a remote command,
    CUDA)."""
    runtime, why = backend_runtime(backend)
    if runtime is None:
        log.info("peak memory not measured: %s", why)
        return None
    shape, opts = [int(s) for s in input_shape], _options(backend)
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory(prefix="ernas_mem_") as tmp:
        if runtime == "onnxruntime":
            from ernas.latency.onnx_export import export_onnx

            path = Path(tmp) / "model.onnx"
            export_onnx(_fused(model), x, path, opset=backend.opset)
            return peak_memory(runtime, path, shape, opts, runs, inferences)
        if runtime == "executorch_xnnpack":
            path = Path(tmp) / "model.pte"
            path.write_bytes(backend.to_pte(_fused(model), x)[0])
            return peak_memory(runtime, path, shape, opts, runs, inferences)
        path, weights = Path(tmp) / "arch.yaml", Path(tmp) / "weights.pt"
        arch.save(path)
        torch.save(model.state_dict(), weights)
        return peak_memory(runtime, path, shape, opts, runs, inferences, weights=weights)


def network_memories(networks: dict, backend, input_shape, runs: int = DEFAULT_RUNS
                     ) -> dict[str, Memory | None]:
    """``{name: network_memory(arch, model, ...)}`` for ``networks = {name: (arch, model)}``,
    one network after another."""
    return {name: network_memory(arch, model, backend, input_shape, runs)
            for name, (arch, model) in networks.items()}


FILE_RUNTIMES = {".onnx": "onnxruntime", ".pte": "executorch_xnnpack"}


def file_memories(files: dict[str, str], backend, input_shape, runs: int = DEFAULT_RUNS
                  ) -> dict:
    """Summary entries ``peak_mem_mib_<kind>`` and ``peak_mem_spread_<kind>`` of exported files
    ``{kind: path}`` (``.onnx`` on onnxruntime, ``.pte`` on executorch_xnnpack) with the
    settings of the latency ``backend`` when it runs that runtime on this host; ``{}`` (logged)
    otherwise (e.g. a command backend timing a remote device), or with ``runs`` 0."""
    out: dict = {}
    for kind, path in files.items() if runs > 0 else ():
        runtime = FILE_RUNTIMES.get(Path(path).suffix)
        if runtime is None or backend_runtime(backend)[0] != runtime:
            log.info("peak memory of %s not measured: backend %s does not run it on this host",
                     path, getattr(backend, "name", backend))
            continue
        m = peak_memory(runtime, path, input_shape, _options(backend), runs)
        out.update({f"peak_mem_mib_{kind}": m.mib, f"peak_mem_spread_{kind}": m.spread})
    return out
