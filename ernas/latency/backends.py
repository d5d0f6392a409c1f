"""Latency backends: a backend is a way to run a model plus the metadata of how it ran.

Adding a device means adding one small class with ``name``, ``runner`` and ``fingerprint``:

- ``OnnxRuntimeBackend``: export to ONNX, time ``InferenceSession.run`` on this host.
- ``TorchBackend``: PyTorch eager (or ``torch.compile``) on CPU or CUDA.
- ``CommandBackend``: export to ONNX and run an external benchmark command (adb, ssh, a local
  tool), parsing its output with a regex.

``runner(module, example_input)`` prepares once (export, session, compilation) and returns a
callable giving one latency in ms per call; ``ernas.latency.measure`` turns runners into figures
(interleaved rounds, one statistic). ``make_backend`` (``ernas.latency.factory``) builds one
by name; the command backend lives in ``ernas.latency.command``.
"""
from __future__ import annotations

import abc
import os
import platform
import socket
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ernas.errors import ErnasError
from ernas.latency.fingerprint import cpu_name, fingerprint, host_hardware, machine_description
from ernas.latency.measure import Runner
from ernas.latency.onnx_export import export_onnx
from ernas.latency.qdq import CONV_RULE, OP_TYPES

__all__ = ["Backend", "OnnxRuntimeBackend", "TorchBackend", "cpu_name", "library_versions",
           "machine_description"]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}


def library_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"torch": torch.__version__, "numpy": np.__version__}
    for name in ("onnxruntime", "onnx"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    return out


def _check_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ErnasError(f"Unknown dtype {dtype!r} for the latency backend; valid values are "
                         f"{sorted(DTYPES)}. Fix the backend's `dtype` field.")
    return DTYPES[dtype]


# --------------------------------------------------------------------------- base
class Backend(abc.ABC):
    """Base class: ``runner`` prepares a model for timing; ``fingerprint`` and ``metadata``
    describe the setup. ``runner`` may move/cast ``module`` in place (pass a fresh module)."""

    name: str = ""
    dtype: str = "float32"

    @abc.abstractmethod
    def runner(self, module: nn.Module, example_input: torch.Tensor) -> Runner:
        """Prepare ``module`` once; each call of the result runs it once and returns ms."""

    @abc.abstractmethod
    def fingerprint(self) -> dict:
        """What the timings depend on (``ernas.latency.fingerprint``)."""

    def session_options(self) -> dict:
        """The runtime settings that shape a measurement (the fingerprint's runtime part)."""
        return dict(self.fingerprint()["runtime"])

    def metadata(self) -> dict:
        return {
            "backend": self.name, "device": cpu_name(), "provider": None, "threads": None,
            "graph_optimization": None, "dtype": self.dtype, "versions": library_versions(),
            "platform": platform.platform(), "hostname": socket.gethostname(),
            "python": platform.python_version(), "fingerprint": self.fingerprint(),
        }

    def __repr__(self) -> str:
        opts = {k: v for k, v in self.session_options().items()
                if k in ("provider", "threads", "spinning", "graph_optimization") and v is not None}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in opts.items())})"

    def _prepare(self, module: nn.Module, example_input: torch.Tensor, device="cpu"):
        dt = torch.float32 if self.dtype == "int8" else DTYPES[self.dtype]  # int8: quantised later
        module = module.eval().to(device=device, dtype=dt)
        x = example_input.to(device=device, dtype=dt) if example_input.is_floating_point() \
            else example_input.to(device)
        return module, x


class _ExportingBackend(Backend):
    """Shared by backends that run an ONNX file: ``runner`` exports, then ``onnx_runner``."""

    opset: int = 17
    workdir: str | None = None
    _count = 0

    @abc.abstractmethod
    def onnx_runner(self, path: str | os.PathLike, input_shape=None) -> Runner:
        """A runner for an already exported ONNX file (e.g. an int8 model); ``input_shape``
        fixes the first input's shape where the file leaves it symbolic."""

    def runner(self, module, example_input):
        module, x = self._prepare(module, example_input)
        tmp = None
        if self.workdir:
            _ExportingBackend._count += 1
            path = Path(self.workdir) / f"{self.name}_{os.getpid()}_{_ExportingBackend._count}.onnx"
        else:
            tmp = tempfile.TemporaryDirectory(prefix=f"ernas_{self.name}_")
            path = Path(tmp.name) / "model.onnx"
        export_onnx(module, x, path, opset=self.opset)
        path, notes = self._deployed(path, x)
        run = self.onnx_runner(path, tuple(example_input.shape))
        run.workdir = tmp  # the exported file lives as long as the runner
        if notes:
            run.notes = notes
        return run

    def _deployed(self, path: Path, x: torch.Tensor) -> tuple[Path, dict | None]:
        """The file that is timed for the exported ``path`` (input ``x``) and the table notes
        on it; the fp32 export itself here."""
        return path, None


# --------------------------------------------------------------------------- onnxruntime
GRAPH_OPTIMIZATION = ("all", "extended", "basic", "disable")
# dtype int8: the coverage of ernas-export's default int8 ONNX (experiments/export.yaml)
INT8 = {"op_types": OP_TYPES, "conv_rule": CONV_RULE, "reduce_range": True, "per_channel": True}


class OnnxRuntimeBackend(_ExportingBackend):
    """Export to ONNX and time ``InferenceSession.run`` on this host (perf_counter, fixed input).

    Sessions: sequential execution, ``threads`` intra-op threads, one inter-op thread and
    ``spinning`` (default off: idle workers sleep instead of busy-waiting, which on a shared
    2-core machine keeps whole-network timings close to the sum of their parts; see
    ``ernas.latency.time_onnx``). ``workdir``: keep the exported ONNX files there. ``dtype``:
    float32 (or float16/bfloat16/float64 exports) or int8, the QDQ model ``ernas-export`` ships
    (``_deployed``).
    """

    name = "onnxruntime"

    def __init__(self, threads: int = 2, provider: str = "CPUExecutionProvider",
                 graph_optimization: str = "all", opset: int = 17, workdir: str | None = None,
                 dtype: str = "float32", spinning: bool = False):
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
        if not isinstance(spinning, bool):
            raise ErnasError(f"onnxruntime backend spinning={spinning!r} must be true or false.")
        if dtype != "int8":
            _check_dtype(dtype)
        self.threads, self.provider, self.spinning = int(threads), provider, spinning
        self.graph_optimization, self.opset = graph_optimization, int(opset)
        self.workdir, self.dtype = workdir, dtype

    def _deployed(self, path, x):
        """With ``dtype: int8``, the QDQ int8 model of ``path`` with ``ernas-export``'s default
        coverage (``ernas.latency.qdq``), calibrated on seeded normal inputs (int8 kernels cost
        the same whatever the ranges); the ``int8`` note counts its quantised convs."""
        if self.dtype != "int8":
            return path, None
        from ernas.latency.pt2e import timing_calibration
        from ernas.latency.qdq import quantize_qdq

        out = path.with_name(path.stem + "_int8.onnx")
        q = quantize_qdq(path, out, [c.numpy() for c in timing_calibration(x)], **INT8)
        return out, {"int8": f"{q['convs'] - q['float_convs']} of {q['convs']} Conv"}

    def session(self, onnx_path: str | os.PathLike):
        """An ``InferenceSession`` configured like the measurements (threads, provider, level,
        spinning). Every onnxruntime session ernas times should come from here."""
        from ernas.latency.time_onnx import make_session

        return make_session(onnx_path, self.threads, self.provider, self.graph_optimization,
                            self.spinning)

    def onnx_runner(self, path, input_shape=None):
        from ernas.latency.time_onnx import make_inputs

        sess = self.session(path)
        feeds = make_inputs(sess, 0, input_shape)

        def run() -> float:
            t0 = time.perf_counter()
            sess.run(None, feeds)
            return (time.perf_counter() - t0) * 1e3

        return run

    def fingerprint(self):
        import onnxruntime as ort

        hardware = dict(host_hardware())
        if self.provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider") \
                and torch.cuda.is_available():
            hardware["gpu"] = torch.cuda.get_device_name(0)
        return fingerprint(hardware, {
            "runtime": "onnxruntime", "version": ort.__version__, "provider": self.provider,
            "graph_optimization": self.graph_optimization, "opset": self.opset,
            "execution_mode": "sequential", "threads": self.threads, "spinning": self.spinning})

    def metadata(self):
        meta = {**super().metadata(), "provider": self.provider, "threads": self.threads,
                "graph_optimization": self.graph_optimization, "opset": self.opset,
                "spinning": self.spinning, "execution_mode": "sequential"}
        if self.dtype == "int8":
            meta["int8"] = {**INT8, "op_types": list(INT8["op_types"]),
                            "calibration": "2 seeded standard-normal inputs"}
        if "gpu" in meta["fingerprint"]["hardware"]:
            meta["device"] = meta["fingerprint"]["hardware"]["gpu"]
        return meta


# --------------------------------------------------------------------------- torch
class TorchBackend(Backend):
    """PyTorch eager (or ``torch.compile``) under ``torch.inference_mode``.

    CPU: perf_counter around each call, ``torch.set_num_threads(threads)`` during each call
    (restored after it). CUDA: CUDA events around each call, then ``torch.cuda.synchronize``.
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

    def runner(self, module, example_input):
        module, x = self._prepare(module, example_input, self.device)
        fn = torch.compile(module) if self.compile else module
        if self._cuda:
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))

            def run() -> float:
                with torch.inference_mode():
                    start.record()
                    fn(x)
                    end.record()
                torch.cuda.synchronize()
                return start.elapsed_time(end)

            return run

        def run() -> float:
            old = torch.get_num_threads()
            if old != self.threads:
                torch.set_num_threads(self.threads)
            try:
                with torch.inference_mode():
                    t0 = time.perf_counter()
                    fn(x)
                    return (time.perf_counter() - t0) * 1e3
            finally:
                if old != self.threads:
                    torch.set_num_threads(old)

        return run

    def fingerprint(self):
        runtime = {"runtime": "torch", "version": torch.__version__,
                   "provider": "inductor" if self.compile else "eager"}
        if self._cuda:
            props = torch.cuda.get_device_properties(torch.device(self.device))
            return fingerprint({"gpu": props.name, "gpu_capability": f"{props.major}.{props.minor}",
                                "gpu_memory_mib": props.total_memory // 2 ** 20},
                               {**runtime, "cuda": torch.version.cuda})
        return fingerprint(host_hardware(), {**runtime, "threads": self.threads})

    def metadata(self):
        meta = super().metadata()
        if self._cuda:
            meta["device"] = torch.cuda.get_device_name(torch.device(self.device))
            meta["cuda"] = torch.version.cuda
        meta.update(provider="inductor" if self.compile else "eager",
                    threads=None if self._cuda else self.threads)
        return meta
