"""Latency backends: a backend is a profiler (how to run a model) plus its metadata.

Adding a device means adding one small class with ``name``, ``measure`` and ``metadata``:

- ``OnnxRuntimeBackend``: export to ONNX, time ``InferenceSession.run`` on this host.
- ``TorchBackend``: PyTorch eager (or ``torch.compile``) on CPU or CUDA.
- ``CommandBackend``: export to ONNX and run an external benchmark command (adb, ssh, a local
  tool), parsing its output with a regex.

All of them share one stopping rule, ``run_with_budget`` (see ``MeasureBudget``).
"""
from __future__ import annotations

import abc

import dataclasses
import inspect
import os
import platform
import re
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ernas.errors import ErnasError
from ernas.latency.onnx_export import export_onnx

__all__ = ["BACKENDS", "COMMAND_PRESETS", "Backend", "CommandBackend", "MeasureBudget",
           "OnnxRuntimeBackend", "TorchBackend", "make_backend", "run_with_budget"]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}


# --------------------------------------------------------------------------- budget
@dataclass
class MeasureBudget:
    """How long to measure one op.

    Stopping rule: run ``warmup`` untimed calls, then timed calls. Once at least ``min_repeats``
    samples exist, stop as soon as the median of all samples and the median of the first half of
    them differ by less than ``rel_tol`` (relative to the overall median), i.e. the estimate has
    settled; stop anyway at ``max_repeats`` samples or when the timed runs have used ``time_cap_s``
    seconds (the time cap is only checked after ``min_repeats``, so every row has at least
    ``min(min_repeats, max_repeats)`` samples).
    """

    warmup: int = 3
    min_repeats: int = 10
    max_repeats: int = 200
    rel_tol: float = 0.02
    time_cap_s: float = 2.0

    def __post_init__(self):
        problems = []
        if self.warmup < 0:
            problems.append(f"warmup={self.warmup} (must be >= 0)")
        if self.min_repeats < 1:
            problems.append(f"min_repeats={self.min_repeats} (must be >= 1)")
        if self.max_repeats < max(self.min_repeats, 1):
            problems.append(f"max_repeats={self.max_repeats} (must be >= min_repeats)")
        if self.rel_tol < 0:
            problems.append(f"rel_tol={self.rel_tol} (must be >= 0)")
        if self.time_cap_s <= 0:
            problems.append(f"time_cap_s={self.time_cap_s} (must be > 0)")
        if problems:
            raise ErnasError("Invalid measurement budget: " + "; ".join(problems)
                             + ". Fix these fields of the latency budget config.")

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any] | None) -> MeasureBudget:
        """Build from a config mapping, with an ErnasError naming unknown fields."""
        cfg = _plain(cfg or {})
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(cfg) - set(valid))
        if unknown:
            raise ErnasError(f"Unknown measurement budget field(s) {unknown}; valid fields are "
                             f"{valid}. Fix the latency budget config.")
        return cls(**cfg)


def run_with_budget(run_once: Callable[[], float], budget: MeasureBudget) -> np.ndarray:
    """Call ``run_once() -> ms`` under ``budget`` (see ``MeasureBudget``); return samples in ms."""
    for _ in range(budget.warmup):
        run_once()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < budget.max_repeats:
        samples.append(float(run_once()))
        n = len(samples)
        if n < budget.min_repeats:
            continue
        if time.perf_counter() - start >= budget.time_cap_s:
            break
        med = float(np.median(samples))
        half = float(np.median(samples[: max(n // 2, 1)]))
        if med > 0 and abs(med - half) / med < budget.rel_tol:
            break
    return np.asarray(samples, dtype=np.float64)


# --------------------------------------------------------------------------- metadata helpers
def cpu_name() -> str:
    """CPU model name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def machine_description() -> str:
    """One line for benchmark reports: CPU model, logical cores and torch's thread count."""
    return f"CPU {cpu_name()}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}"


def library_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"torch": torch.__version__, "numpy": np.__version__}
    for name in ("onnxruntime", "onnx"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    return out


def _plain(cfg: Any) -> dict:
    """A plain dict from a dict or an OmegaConf DictConfig."""
    if cfg is None:
        return {}
    try:
        from omegaconf import DictConfig, OmegaConf
    except ImportError:  # pragma: no cover
        DictConfig = None
    if DictConfig is not None and isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    if not isinstance(cfg, Mapping):
        raise ErnasError(f"Expected a mapping for the latency config, got {type(cfg).__name__}: "
                         f"{cfg!r}. Fix: write it as `name: onnxruntime, threads: 2, ...`.")
    return dict(cfg)


def _check_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ErnasError(f"Unknown dtype {dtype!r} for the latency backend; valid values are "
                         f"{sorted(DTYPES)}. Fix the backend's `dtype` field.")
    return DTYPES[dtype]


# --------------------------------------------------------------------------- base
class Backend(abc.ABC):
    """Base class: ``measure`` returns per-run latencies in ms; ``metadata`` describes the setup.

    ``measure`` may move/cast ``module`` in place (callers pass a freshly built module).
    """

    name: str = ""
    dtype: str = "float32"

    @abc.abstractmethod
    def measure(self, module: nn.Module, example_input: torch.Tensor,
                budget: MeasureBudget | None = None) -> np.ndarray:
        """Per-run latencies (ms) of ``module`` on ``example_input`` after warm-up."""

    def metadata(self) -> dict:
        return {
            "backend": self.name, "device": cpu_name(), "provider": None, "threads": None,
            "graph_optimization": None, "dtype": self.dtype, "versions": library_versions(),
            "platform": platform.platform(), "hostname": socket.gethostname(),
            "python": platform.python_version(),
        }

    def __repr__(self) -> str:
        meta = {k: v for k, v in self.metadata().items()
                if k in ("provider", "threads", "graph_optimization", "dtype") and v is not None}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in meta.items())})"

    def _prepare(self, module: nn.Module, example_input: torch.Tensor, device="cpu"):
        dt = DTYPES[self.dtype]
        module = module.eval().to(device=device, dtype=dt)
        x = example_input.to(device=device, dtype=dt) if example_input.is_floating_point() \
            else example_input.to(device)
        return module, x


class _ExportingBackend(Backend):
    """Shared by backends that export the module to an ONNX file first."""

    opset: int = 17
    workdir: str | None = None
    _count = 0

    def _export(self, module, example_input, tmpdir: str) -> Path:
        module, x = self._prepare(module, example_input)
        if self.workdir:
            _ExportingBackend._count += 1
            path = Path(self.workdir) / f"{self.name}_{os.getpid()}_{_ExportingBackend._count}.onnx"
        else:
            path = Path(tmpdir) / "model.onnx"
        return export_onnx(module, x, path, opset=self.opset)


# --------------------------------------------------------------------------- onnxruntime
GRAPH_OPTIMIZATION = ("all", "extended", "basic", "disable")


class OnnxRuntimeBackend(_ExportingBackend):
    """Export to ONNX and time ``InferenceSession.run`` on this host (perf_counter, fixed input).

    ``workdir``: keep the exported ONNX files there (default: a temporary directory, deleted).
    """

    name = "onnxruntime"

    def __init__(self, threads: int = 2, provider: str = "CPUExecutionProvider",
                 graph_optimization: str = "all", opset: int = 17, workdir: str | None = None,
                 dtype: str = "float32"):
        import onnxruntime as ort

        available = ort.get_available_providers()
        if provider not in available:
            raise ErnasError(f"onnxruntime execution provider {provider!r} is not available in "
                             f"this onnxruntime {ort.__version__} build; available providers: "
                             f"{available}. Fix the backend's `provider` field or install an "
                             f"onnxruntime build that ships it.")
        if graph_optimization not in GRAPH_OPTIMIZATION:
            raise ErnasError(f"Unknown onnxruntime graph_optimization {graph_optimization!r}; "
                             f"valid values are {list(GRAPH_OPTIMIZATION)}.")
        if int(threads) < 1:
            raise ErnasError(f"onnxruntime backend threads={threads} must be >= 1.")
        _check_dtype(dtype)
        self.threads, self.provider = int(threads), provider
        self.graph_optimization, self.opset = graph_optimization, int(opset)
        self.workdir, self.dtype = workdir, dtype

    def session(self, onnx_path: str | os.PathLike):
        """An ``InferenceSession`` configured like the measurements (threads, provider, level)."""
        import onnxruntime as ort

        level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                 "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                 "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                 "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}[self.graph_optimization]
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = level
        so.log_severity_level = 3
        return ort.InferenceSession(str(onnx_path), sess_options=so, providers=[self.provider])

    def measure(self, module, example_input, budget=None):
        budget = budget or MeasureBudget()
        with tempfile.TemporaryDirectory(prefix="ernas_ort_") as tmp:
            path = self._export(module, example_input, tmp)
            sess = self.session(path)
        rng = np.random.default_rng(0)
        feeds = {}
        for i, arg in enumerate(sess.get_inputs()):
            shape = tuple(example_input.shape) if i == 0 else tuple(
                d if isinstance(d, int) else 1 for d in arg.shape)
            np_dtype = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
                        "tensor(double)": np.float64}.get(arg.type, np.float32)
            feeds[arg.name] = rng.standard_normal(shape).astype(np_dtype)

        def run_once() -> float:
            t0 = time.perf_counter()
            sess.run(None, feeds)
            return (time.perf_counter() - t0) * 1e3

        return run_with_budget(run_once, budget)

    def metadata(self):
        meta = {**super().metadata(), "provider": self.provider, "threads": self.threads,
                "graph_optimization": self.graph_optimization, "opset": self.opset}
        if self.provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider") \
                and torch.cuda.is_available():
            meta["device"] = torch.cuda.get_device_name(0)
        return meta


# --------------------------------------------------------------------------- torch
class TorchBackend(Backend):
    """PyTorch eager (or ``torch.compile``) under ``torch.inference_mode``.

    CPU: perf_counter around each call, ``torch.set_num_threads(threads)`` while measuring.
    CUDA: CUDA events around each call, then ``torch.cuda.synchronize``.
    """

    name = "torch"

    def __init__(self, device: str = "cpu", threads: int = 2, compile: bool = False,
                 dtype: str = "float32"):
        if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
            raise ErnasError(f"Unknown torch backend device {device!r}; valid values are 'cpu', "
                             f"'cuda' or 'cuda:N'.")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ErnasError(f"The torch latency backend asks for device={device!r} but CUDA is "
                             f"not available here (torch {torch.__version__}, "
                             f"torch.version.cuda={torch.version.cuda}). Fix: set `device: cpu`, "
                             f"or run on a machine with a CUDA GPU and a CUDA build of torch.")
        if int(threads) < 1:
            raise ErnasError(f"torch backend threads={threads} must be >= 1.")
        _check_dtype(dtype)
        self.device, self.threads, self.dtype = device, int(threads), dtype
        self.compile = bool(compile)

    @property
    def _cuda(self) -> bool:
        return self.device.startswith("cuda")

    def measure(self, module, example_input, budget=None):
        budget = budget or MeasureBudget()
        module, x = self._prepare(module, example_input, self.device)
        fn = torch.compile(module) if self.compile else module
        old_threads = torch.get_num_threads()
        if not self._cuda:
            torch.set_num_threads(self.threads)
        try:
            with torch.inference_mode():
                if self._cuda:
                    start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))

                    def run_once() -> float:
                        start.record()
                        fn(x)
                        end.record()
                        torch.cuda.synchronize()
                        return start.elapsed_time(end)
                else:
                    def run_once() -> float:
                        t0 = time.perf_counter()
                        fn(x)
                        return (time.perf_counter() - t0) * 1e3

                return run_with_budget(run_once, budget)
        finally:
            torch.set_num_threads(old_threads)

    def metadata(self):
        meta = super().metadata()
        if self._cuda:
            meta["device"] = torch.cuda.get_device_name(torch.device(self.device))
            meta["cuda"] = torch.version.cuda
        meta.update(provider="inductor" if self.compile else "eager",
                    threads=None if self._cuda else self.threads)
        return meta


# --------------------------------------------------------------------------- command
COMMAND_PRESETS: dict[str, dict[str, Any]] = {
    # onnxruntime_perf_test pushed to /data/local/tmp on an Android phone. Prints one average per
    # call, so each call is one sample averaged over `runs_per_call` runs.
    "adb_onnxruntime_perf_test": {
        "template": "adb push {model} /data/local/tmp/m.onnx && adb shell "
                    "/data/local/tmp/onnxruntime_perf_test -I -m times -r {repeats} "
                    "/data/local/tmp/m.onnx",
        "pattern": r"Average inference time cost: (\S+) ms",
        "unit": "ms",
        "runs_per_call": 20,
    },
    # TFLite benchmark_model on an Android phone. It needs a .tflite model: converting the
    # exported ONNX file ({model}) to TFLite is the user's job (wrap the conversion in the
    # template, e.g. `my_convert {model} /tmp/m.tflite && adb push /tmp/m.tflite ...`).
    "adb_tflite_benchmark_model": {
        "template": "adb push {model} /data/local/tmp/m.tflite && adb shell "
                    "/data/local/tmp/benchmark_model --graph=/data/local/tmp/m.tflite "
                    "--num_runs={repeats} --num_threads=2",
        "pattern": r"avg=(\d+(?:\.\d+)?)",
        "unit": "us",
        "runs_per_call": 20,
    },
    # Local stand-in for a device tool (ernas.latency.time_onnx): one `latency_ms:` line per run.
    "local_onnx": {
        "template": "{python} -m ernas.latency.time_onnx {model} --repeats {repeats} --threads 2",
        "pattern": r"latency_ms: ([0-9.]+)",
        "unit": "ms",
        "runs_per_call": 50,
    },
}

UNITS = {"ms": 1.0, "us": 1e-3, "s": 1e3}


class CommandBackend(_ExportingBackend):
    """Export to ONNX and run an external benchmark command (a phone over adb, a board over ssh).

    ``template`` placeholders: ``{model}`` (the exported ONNX path, shell-quoted), ``{repeats}``
    (= ``runs_per_call``) and ``{python}`` (this Python interpreter). The filled template is split
    with ``shlex.split`` and run without a shell; a template containing ``&&`` is run as
    ``bash -c TEMPLATE`` instead (set ``shell`` to force either way). Every match of ``pattern``
    in stdout+stderr is one sample; its first group is the number, in ``unit`` (ms | us | s).
    A tool that prints one line per run yields ``runs_per_call`` samples per call; one that prints
    an average yields one. The command is called again until the budget's stopping rule is met;
    warm-up discards the first samples. The model is exported once per ``measure``.
    ``device``/``threads`` only label the metadata (the command decides what actually runs).
    """

    name = "command"

    def __init__(self, template: str, pattern: str, unit: str = "ms", runs_per_call: int = 1,
                 timeout_s: float = 600, opset: int = 17, workdir: str | None = None,
                 device: str | None = None, threads: int | None = None,
                 shell: bool | None = None, dtype: str = "float32"):
        if unit not in UNITS:
            raise ErnasError(f"Unknown command backend unit {unit!r}; valid values are "
                             f"{list(UNITS)}.")
        try:
            rx = re.compile(pattern)
        except re.error as e:
            raise ErnasError(f"Command backend pattern {pattern!r} is not a valid regex ({e}). "
                             f"Fix the backend's `pattern` field.") from None
        if rx.groups < 1:
            raise ErnasError(f"Command backend pattern {pattern!r} has no capture group; put the "
                             f"number in parentheses, e.g. 'latency_ms: ([0-9.]+)'.")
        if int(runs_per_call) < 1:
            raise ErnasError(f"Command backend runs_per_call={runs_per_call} must be >= 1.")
        _check_dtype(dtype)
        self.template, self.pattern, self.unit = template, pattern, unit
        self.runs_per_call, self.timeout_s, self.opset = int(runs_per_call), timeout_s, int(opset)
        self.workdir, self.device, self.threads, self.dtype = workdir, device, threads, dtype
        self.shell = ("&&" in template) if shell is None else bool(shell)
        self._rx = rx

    def command(self, model_path: str | os.PathLike) -> list[str]:
        """The argv that runs the benchmark for one model file."""
        filled = (self.template.replace("{model}", shlex.quote(str(model_path)))
                  .replace("{repeats}", str(self.runs_per_call))
                  .replace("{python}", shlex.quote(sys.executable)))
        return ["bash", "-c", filled] if self.shell else shlex.split(filled)

    def run_command(self, model_path: str | os.PathLike) -> list[float]:
        """Run the command once and return the parsed samples in ms."""
        argv = self.command(model_path)
        shown = shlex.join(argv)
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=self.timeout_s)
        except FileNotFoundError:
            raise ErnasError(f"Command backend: program {argv[0]!r} not found (command: {shown}). "
                             f"Fix the backend's `template` or install the tool.") from None
        except subprocess.TimeoutExpired:
            raise ErnasError(f"Command backend: `{shown}` ran longer than timeout_s="
                             f"{self.timeout_s}. Raise `timeout_s` or lower `runs_per_call`."
                             ) from None
        output = (proc.stdout or "") + "\n" + (proc.stderr or "")
        tail = "\n".join(output.strip().splitlines()[-20:])
        if proc.returncode != 0:
            raise ErnasError(f"Command backend: `{shown}` exited with status {proc.returncode}. "
                             f"Last lines of its output:\n{tail}\nFix the backend's `template` "
                             f"or the device connection.")
        values = []
        for m in self._rx.finditer(output):
            try:
                values.append(float(m.group(1)) * UNITS[self.unit])
            except ValueError:
                raise ErnasError(f"Command backend: pattern {self.pattern!r} matched "
                                 f"{m.group(0)!r} but {m.group(1)!r} is not a number. Fix the "
                                 f"backend's `pattern` so its first group captures the number."
                                 ) from None
        if not values:
            raise ErnasError(f"Command backend: pattern {self.pattern!r} matched nothing in the "
                             f"output of `{shown}`. Last 20 lines of its output:\n{tail}\nFix the "
                             f"backend's `pattern` (first group = the number) or its `template`.")
        return values

    def measure(self, module, example_input, budget=None):
        budget = budget or MeasureBudget()
        with tempfile.TemporaryDirectory(prefix="ernas_cmd_") as tmp:
            path = self._export(module, example_input, tmp)
            pending: list[float] = []

            def run_once() -> float:
                if not pending:
                    pending.extend(self.run_command(path))
                return pending.pop(0)

            return run_with_budget(run_once, budget)

    def metadata(self):
        return {**super().metadata(), "device": self.device or f"command: {self.template}",
                "provider": "command", "threads": self.threads, "opset": self.opset,
                "command": self.template, "pattern": self.pattern, "unit": self.unit,
                "runs_per_call": self.runs_per_call}


# --------------------------------------------------------------------------- factory
BACKENDS: dict[str, type[Backend]] = {
    "onnxruntime": OnnxRuntimeBackend, "torch": TorchBackend, "command": CommandBackend}


def make_backend(cfg: Mapping[str, Any]) -> Backend:
    """Build a backend from ``{name: onnxruntime, threads: 2, ...}`` (dict or DictConfig).

    The command backend also takes ``preset: <COMMAND_PRESETS key>``; explicit fields override
    the preset's.
    """
    cfg = _plain(cfg)
    name = cfg.pop("name", None)
    if name not in BACKENDS:
        raise ErnasError(f"Unknown latency backend name {name!r}; valid names are "
                         f"{sorted(BACKENDS)}. Fix the `name` field of the latency backend config.")
    cls = BACKENDS[name]
    if name == "command" and "preset" in cfg:
        preset = cfg.pop("preset")
        if preset not in COMMAND_PRESETS:
            raise ErnasError(f"Unknown command backend preset {preset!r}; valid presets are "
                             f"{sorted(COMMAND_PRESETS)}.")
        cfg = {**COMMAND_PRESETS[preset], **cfg}
    params = inspect.signature(cls.__init__).parameters
    valid = [p for p in params if p != "self"]
    unknown = sorted(set(cfg) - set(valid))
    if unknown:
        extra = " (or `preset`)" if name == "command" else ""
        raise ErnasError(f"Unknown field(s) {unknown} for latency backend {name!r}; valid fields "
                         f"are {valid}{extra}. Fix the latency backend config.")
    missing = [p for p, v in params.items() if p != "self" and v.default is inspect.Parameter.empty
               and p not in cfg]
    if missing:
        raise ErnasError(f"Latency backend {name!r} needs field(s) {missing}"
                         + (f" or a `preset` (one of {sorted(COMMAND_PRESETS)})"
                            if name == "command" else "") + ".")
    return cls(**cfg)
