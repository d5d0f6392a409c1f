"""The child process of ``ernas.memory``: one network's peak memory on one runtime, measured once.

Run by path (``python -P ernas/memory_child.py '<json spec>'``; ``-P`` keeps ``ernas/`` off the
front of ``sys.path``) so that nothing but the runtime is imported: the ``ernas`` package (and
torch with it) is loaded only by runners that need it.

A runner is a generator function ``runner(spec)``: it imports its runtime and creates an *empty
session* (the runtime initialised, nothing of the network), yields once, then loads the network
file(s) named in ``spec`` and runs ``spec["inferences"]`` inferences on an input of
``spec["input_shape"]``. At the yield the harness resets the resident-set high-water mark
(``/proc/self/clear_refs`` ← 5) and reads the baseline; after the runner returns it reads the
high-water mark again (``VmHWM``) and prints one JSON line ``{"baseline_kib", "peak_kib",
"method"}``. Every import and allocation before the yield is in the baseline.
"""
from __future__ import annotations

import gc
import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _maxrss_kib() -> int:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r // 1024 if sys.platform == "darwin" else r   # bytes on macOS, KiB on Linux


def reset_peak() -> tuple[int, str]:
    """``(baseline KiB, method)``: the high-water mark reset to the current RSS where the kernel
    allows it (``clear_refs``), else the high-water mark as it stands (``hwm``/``ru_maxrss``)."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return _status_kib("VmHWM"), "clear_refs"
    except OSError:
        hwm = _status_kib("VmHWM")
        return (hwm, "hwm") if hwm is not None else (_maxrss_kib(), "ru_maxrss")


def peak_kib() -> int:
    hwm = _status_kib("VmHWM")
    return hwm if hwm is not None else _maxrss_kib()


def _load_file(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- runners
def onnxruntime(spec: dict):
    """An ONNX file (``spec["path"]``) in an ``InferenceSession`` made by
    ``ernas.latency.time_onnx.make_session`` (the latency backend's session options). The empty
    session runs a one-node Identity graph on an input of the same shape."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    timing = _load_file(HERE / "latency" / "time_onnx.py", "_ernas_time_onnx")
    o = spec.get("options") or {}

    def session(path):
        return timing.make_session(path, o.get("threads", 2),
                                   o.get("provider", "CPUExecutionProvider"),
                                   o.get("graph_optimization", "all"), o.get("spinning", False))

    shape = [int(s) for s in spec["input_shape"]]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["input"], ["output"])], "empty",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, shape)])
    with tempfile.TemporaryDirectory(prefix="ernas_mem_") as tmp:
        empty_path = Path(tmp) / "empty.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
                  str(empty_path))
        empty = session(empty_path)
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        empty.run(None, {"input": x})
    yield
    sess = session(spec["path"])
    feeds = timing.make_inputs(sess, 0, shape)
    for _ in range(int(spec["inferences"])):
        sess.run(None, feeds)


def torch_eager(spec: dict):
    """PyTorch eager: ``spec["path"]`` an arch YAML, ``spec["weights"]`` its state dict. The
    network is built on the meta device and the weights assigned from the memory-mapped file (one
    copy of the weights), folded for inference (``ernas.inference_model``) and run under
    ``torch.inference_mode``. The empty session: torch and ernas imported, the arch file parsed
    (its family's code loaded), an ``nn.Identity`` run on the input."""
    import torch

    from ernas import build_model, inference_model
    from ernas.space import load_arch

    torch.set_num_threads(int((spec.get("options") or {}).get("threads", 2)))
    arch = load_arch(spec["path"])   # imports the family's code (~70 MB of Python): baseline
    x = torch.rand([int(s) for s in spec["input_shape"]],
                   generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.nn.Identity()(x)
    yield
    state = torch.load(spec["weights"], map_location="cpu", weights_only=True, mmap=True)
    with torch.device("meta"):
        model = build_model(arch)
    model.load_state_dict(state, strict=True, assign=True)
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        model = build_model(arch)   # a tensor the state dict does not hold: build for real
        model.load_state_dict(state, strict=True)
    del state
    model = inference_model(model)
    with torch.inference_mode():
        for _ in range(int(spec["inferences"])):
            model(x)


def executorch(spec: dict):
    """An ExecuTorch program (``spec["path"]``, a ``.pte``) under ``executorch.runtime``:
    ``Runtime.get().load_program(path).load_method("forward").execute([x])``. The empty session:
    the runtime initialised (``Runtime.get()``) and the input allocated; no program loaded."""
    import torch
    from executorch.extension.pybindings import portable_lib
    from executorch.runtime import Runtime

    threads = (spec.get("options") or {}).get("threads")
    if threads:
        portable_lib._unsafe_reset_threadpool(int(threads))
    runtime = Runtime.get()
    x = torch.rand([int(s) for s in spec["input_shape"]],
                   generator=torch.Generator().manual_seed(0))
    yield
    method = runtime.load_program(spec["path"]).load_method("forward")
    for _ in range(int(spec["inferences"])):
        method.execute([x])


def main(argv: list[str]) -> int:
    spec = json.loads(argv[1])
    script = Path(spec.get("script") or __file__).resolve()
    module = (sys.modules[__name__] if script == Path(__file__).resolve()
              else _load_file(script, "_ernas_memory_runner"))
    steps = getattr(module, spec["function"])(spec)
    next(steps)
    baseline, method = reset_peak()
    for _ in steps:
        pass
    out = {"baseline_kib": baseline, "peak_kib": peak_kib(), "method": method,
           "pid": os.getpid()}
    sys.stdout.write("ERNAS_MEMORY " + json.dumps(out) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
