"""The command backend: export each model to ONNX and time it with an external benchmark tool
(a phone over adb, a board over ssh, a local program), parsing latencies from its output."""
from __future__ import annotations

import math
import os
import re
import shlex
import signal
import subprocess
import sys
from typing import Any

from ernas.errors import ErnasError
from ernas.latency.backends import _check_dtype, _ExportingBackend
from ernas.latency.fingerprint import fingerprint

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
TEMPLATE_FIELDS = ("model", "repeats", "python")
# `{name}` placeholders; `${NAME}` (a shell variable) is left to the shell
_PLACEHOLDER = re.compile(r"(?<!\$)\{([A-Za-z_][A-Za-z0-9_]*)\}")


def fill_template(template: str, values: dict[str, str]) -> str:
    """``template`` with every ``{field}`` of ``values`` replaced in one pass: text substituted
    for one field (a path holding ``{python}``) is never substituted again."""
    return _PLACEHOLDER.sub(lambda m: values.get(m[1], m[0]), template)


def _check_template(template) -> None:
    if not isinstance(template, str) or not template.strip():
        raise ErnasError(f"Command backend template={template!r} must be a non-empty command "
                         f"line, e.g. 'ssh board ./bench {{model}}'. Fix latency.backend.template "
                         f"(or give a latency.backend.preset).")
    unknown = sorted(set(_PLACEHOLDER.findall(template)) - set(TEMPLATE_FIELDS))
    if unknown:
        raise ErnasError(f"Command backend template {template!r} uses unknown placeholder(s) "
                         f"{', '.join('{' + u + '}' for u in unknown)}; the placeholders are "
                         f"{', '.join('{' + f + '}' for f in TEMPLATE_FIELDS)} (a shell variable "
                         f"is written ${{NAME}}). Fix latency.backend.template.")


def _check_timeout(timeout_s) -> float:
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) \
            or not math.isfinite(timeout_s) or timeout_s <= 0:
        raise ErnasError(f"Command backend timeout_s={timeout_s!r} must be a finite number of "
                         f"seconds > 0. Fix latency.backend.timeout_s.")
    return float(timeout_s)


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill the command and every process it started (its own session's process group)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


def run_in_group(argv: list[str], timeout_s: float) -> tuple[int, str]:
    """Run ``argv`` in a new session and return (status, stdout + stderr). On a timeout (or an
    interrupt) the whole process group is killed, children of a shell included, and
    ``subprocess.TimeoutExpired`` (or the interrupt) is raised."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            errors="replace", start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except BaseException:
        _kill_group(proc)
        raise
    return proc.returncode, (out or "") + "\n" + (err or "")


class CommandBackend(_ExportingBackend):
    """Export to ONNX and run an external benchmark command (a phone over adb, a board over ssh).

    ``template`` placeholders: ``{model}`` (the exported ONNX path, shell-quoted), ``{repeats}``
    (= ``runs_per_call``) and ``{python}`` (this Python interpreter), filled in one pass
    (``fill_template``; another ``{name}`` is refused, ``${NAME}`` is left to the shell). The
    command runs in a session of its own: past ``timeout_s`` (> 0) it is killed with every process
    it started. Each parsed latency must be a finite number > 0. The filled template is split
    with ``shlex.split`` and run without a shell; a template containing ``&&`` is run as
    ``bash -c TEMPLATE`` instead (set ``shell`` to force either way). Every match of ``pattern``
    in stdout+stderr is one sample; its first group is the number, in ``unit`` (ms | us | s).
    A tool that prints one line per run yields ``runs_per_call`` samples per call; one that prints
    an average yields one. The command is called again until the budget's stopping rule is met;
    warm-up discards the first samples. The model is exported once per runner.
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
        except (re.error, TypeError) as e:
            raise ErnasError(f"Command backend pattern {pattern!r} is not a valid regex ({e}). "
                             f"Fix the backend's `pattern` field.") from None
        if rx.groups < 1:
            raise ErnasError(f"Command backend pattern {pattern!r} has no capture group; put the "
                             f"number in parentheses, e.g. 'latency_ms: ([0-9.]+)'.")
        if isinstance(runs_per_call, bool) or not isinstance(runs_per_call, int) \
                or runs_per_call < 1:
            raise ErnasError(f"Command backend runs_per_call={runs_per_call!r} must be an "
                             f"integer >= 1. Fix latency.backend.runs_per_call.")
        _check_template(template)
        timeout_s = _check_timeout(timeout_s)
        _check_dtype(dtype)
        self.template, self.pattern, self.unit = template, pattern, unit
        self.runs_per_call, self.timeout_s, self.opset = int(runs_per_call), timeout_s, int(opset)
        self.workdir, self.device, self.threads, self.dtype = workdir, device, threads, dtype
        self.shell = ("&&" in template) if shell is None else bool(shell)
        self._rx = rx

    def command(self, model_path: str | os.PathLike) -> list[str]:
        """The argv that runs the benchmark for one model file."""
        filled = fill_template(self.template, {"model": shlex.quote(str(model_path)),
                                               "repeats": str(self.runs_per_call),
                                               "python": shlex.quote(sys.executable)})
        return ["bash", "-c", filled] if self.shell else shlex.split(filled)

    def run_command(self, model_path: str | os.PathLike) -> list[float]:
        """Run the command once and return the parsed samples in ms."""
        argv = self.command(model_path)
        shown = shlex.join(argv)
        try:
            status, output = run_in_group(argv, self.timeout_s)
        except FileNotFoundError:
            raise ErnasError(f"Command backend: program {argv[0]!r} not found (command: {shown}). "
                             f"Fix the backend's `template` or install the tool.") from None
        except subprocess.TimeoutExpired:
            raise ErnasError(f"Command backend: `{shown}` ran longer than timeout_s="
                             f"{self.timeout_s:g}; it was stopped with every process it started. "
                             f"Raise `timeout_s` or lower `runs_per_call`.") from None
        tail = "\n".join(output.strip().splitlines()[-20:])
        if status != 0:
            raise ErnasError(f"Command backend: `{shown}` exited with status {status}. "
                             f"Last lines of its output:\n{tail}\nFix the backend's `template` "
                             f"or the device connection.")
        values = [self._latency(m, shown) for m in self._rx.finditer(output)]
        if not values:
            raise ErnasError(f"Command backend: pattern {self.pattern!r} matched nothing in the "
                             f"output of `{shown}`. Last 20 lines of its output:\n{tail}\nFix the "
                             f"backend's `pattern` (first group = the number) or its `template`.")
        return values

    def _latency(self, match: re.Match, shown: str) -> float:
        """One parsed sample in ms: a finite number > 0, else an ErnasError naming the command
        and what it printed (a table of zero, negative or infinite latencies is never made)."""
        text = match.group(1)
        try:
            value = float(text) * UNITS[self.unit]
        except (TypeError, ValueError):
            raise ErnasError(f"Command backend: pattern {self.pattern!r} matched "
                             f"{match.group(0)!r} but {text!r} is not a number. Fix the "
                             f"backend's `pattern` so its first group captures the number."
                             ) from None
        if not (math.isfinite(value) and value > 0):
            raise ErnasError(f"Command backend: `{shown}` (template {self.template!r}) printed "
                             f"{match.group(0).strip()!r}: a latency must be a finite number > 0 "
                             f"{self.unit}, so nothing is recorded from it. Fix the device command "
                             f"(or the backend's `pattern`/`unit`).")
        return value

    def onnx_runner(self, path, input_shape=None):
        pending: list[float] = []

        def run() -> float:
            if not pending:
                pending.extend(self.run_command(path))
            return pending.pop(0)

        return run

    def fingerprint(self):
        return fingerprint({"device": self.device or f"command: {self.template}"},
                           {"runtime": "command", "command": self.template,
                            "pattern": self.pattern, "unit": self.unit,
                            "runs_per_call": self.runs_per_call, "opset": self.opset,
                            "threads": self.threads})

    def metadata(self):
        return {**super().metadata(), "device": self.device or f"command: {self.template}",
                "provider": "command", "threads": self.threads, "opset": self.opset,
                "command": self.template, "pattern": self.pattern, "unit": self.unit,
                "runs_per_call": self.runs_per_call}
