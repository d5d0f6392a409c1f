"""Shared CLI plumbing: user errors as one paragraph with exit status 2, the start line every
command logs, run directories, repository paths."""
from __future__ import annotations

import functools
import logging
import os
import sys
import textwrap
import warnings
from pathlib import Path

from ernas.errors import ErnasError

log = logging.getLogger(__name__)


def _print_error(text: str) -> None:
    print("error: " + textwrap.fill(" ".join(text.split()), width=100, break_long_words=False,
                                    break_on_hyphens=False), file=sys.stderr)


def hydra_main(config_name: str, run, objective=None):
    """The console-script entry point of a Hydra command: compose ``experiments/<config_name>``
    with the command line and call ``run(cfg)``; the Hydra task returns ``objective(summary)``
    (the command's headline figure, higher is better) so a sweeper plugin can optimise it. A bad
    override (syntax, unknown key, wrong type) is reported like every other user error: one
    ``error:`` paragraph, exit status 2."""
    import hydra
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from ernas.paths import EXPERIMENTS

    @hydra.main(config_path=str(EXPERIMENTS), config_name=config_name, version_base="1.3")
    def _main(cfg):
        _COMPOSED[:] = [OmegaConf.to_yaml(cfg)]  # recorded once the run directory is claimed
        summary = run(cfg)
        return objective(summary) if objective and isinstance(summary, dict) else None

    def main() -> None:
        os.environ["HYDRA_FULL_ERROR"] = "1"  # let composition errors reach us, not sys.exit(1)
        try:
            _main()
        except (HydraException, OmegaConfBaseException) as e:
            cause = f" ({e.__cause__})" if e.__cause__ else ""
            _print_error(f"ernas-{config_name}: the command line does not fit the config: "
                         f"{e}{cause}. See `ernas-{config_name} --help` and the override syntax "
                         f"of https://hydra.cc/docs/advanced/override_grammar/basic/.")
            sys.exit(2)

    return main


class ConsoleFormatter(logging.Formatter):
    """The console side of the job log (``experiments/hydra/job_logging/ernas.yaml``): a record
    as its bare message; a warning or error as ``ernas: warning: <message>``."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.WARNING:
            return f"ernas: {record.levelname.lower()}: {text}"
        return text


class BelowWarning(logging.Filter):
    """Records below WARNING (the job log's stdout handler; warnings go to stderr)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.WARNING


def _show_warning(message, category, filename, lineno, file=None, line=None,
                  _default=warnings.showwarning):
    """ernas's own warnings into the job log when one is configured (console and
    ``<command>.log``), else as ``ernas: warning: <message>`` on stderr (no source line); other
    warnings as usual."""
    if f"{os.sep}ernas{os.sep}" not in str(filename):
        _default(message, category, filename, lineno, file, line)
    elif file is None and log.hasHandlers():
        logging.getLogger("ernas.warnings").warning("%s", message)
    else:
        print(f"ernas: warning: {message}", file=file or sys.stderr, flush=True)


def _backend_words(backend) -> str:
    """``onnxruntime 1.32.0 (CPUExecutionProvider, 2 threads)``: a latency backend in words
    (its dtype added when not float32)."""
    o = backend.session_options()
    threads = o.get("threads")
    dtype = getattr(backend, "dtype", "float32")
    parts = [o.get("provider"), f"{threads} thread{'s' * (threads != 1)}" if threads else None,
             f"command `{o['command']}`" if o.get("command") else None,
             dtype if dtype != "float32" else None]
    inner = ", ".join(p for p in parts if p)
    return " ".join(str(p) for p in (backend.name, o.get("version")) if p) + \
        (f" ({inner})" if inner else "")


def device_name(device) -> str:
    """``auto`` as the device it means here (CUDA when available, else the CPU)."""
    if str(device) != "auto":
        return str(device)
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def log_start(command: str, out, device=None, backend=None, **facts) -> None:
    """The line every command logs once its run folder is claimed: ``ernas-<command>: run
    folder <out>; device <d>; torch threads <n>; latency backend <b>; <fact> <value>; ...``.
    Torch's threads are named with a ``device`` (a command that computes here); ``backend`` is
    a latency ``Backend`` (named with its runtime, provider and threads); ``facts`` whose value
    is None are left out. The chosen latency table and why is logged where it is resolved
    (``ernas.latency.resolve``)."""
    import torch

    items = {"run folder": out, "device": device,
             "torch threads": torch.get_num_threads() if device is not None else None,
             "latency backend": _backend_words(backend) if backend is not None else None,
             **{k.replace("_", " "): v for k, v in facts.items()}}
    log.info("ernas-%s: %s", command,
             "; ".join(f"{k} {v}" for k, v in items.items() if v is not None))


def user_errors(fn):
    """Run ``fn``; an ErnasError becomes ``error: <paragraph>`` on stderr and exit status 2;
    ernas's warnings print as ``ernas: warning: ...``."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        warnings.showwarning = _show_warning
        try:
            return fn(*args, **kwargs)
        except ErnasError as e:
            _print_error(str(e))
            sys.exit(2)

    return wrapper


_ABSENT = object()
# the file a resumable run of each command holds
RUN_CHECKPOINTS = {"search": "checkpoint.pt", "retrain": "last.pt"}


def given_overrides() -> list[str]:
    """The task overrides of this Hydra command line (``key=value``; empty outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig

    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return []


def given_keys() -> set[str]:
    """The keys set on this command line (``lr`` of ``lr=0.5``, ``search.lam`` of
    ``+search.lam=1``)."""
    return {ov.split("=", 1)[0].lstrip("+~") for ov in given_overrides()}


def _run_command(d: Path) -> str | None:
    """The ernas command that made run directory ``d``: the job name Hydra recorded, else the
    checkpoint file it holds."""
    from omegaconf import OmegaConf

    recorded = d / ".hydra" / "hydra.yaml"
    if recorded.is_file():
        try:
            name = OmegaConf.select(OmegaConf.load(recorded), "hydra.job.name")
        except Exception:  # noqa: BLE001 - an unreadable record: judge by the files
            name = None
        if name in RUN_CHECKPOINTS:
            return name
    held = [c for c, f in RUN_CHECKPOINTS.items() if (d / f).is_file()]
    return held[0] if len(held) == 1 else None


def resumed_config(cfg, command: str, free: tuple[str, ...], every: str,
                   invocation: tuple[str, ...] = ("resume",)):
    """The config of the ``command`` run in ``cfg.resume`` (its ``.hydra/config.yaml``), so
    ``resume=DIR`` alone continues with the run's own settings. Overrides given with it must
    equal the run's values (except the ``free`` and ``invocation`` keys); differences are
    refused, listed. A ``free`` key keeps the run's value unless given on this command line;
    an ``invocation`` key (``resume``, ``stop_at``, ...) always takes this command line's.
    ``every`` is the key saying how often the checkpoint is written (for the message)."""
    from omegaconf import OmegaConf, open_dict

    d = Path(str(cfg.resume))
    checkpoint = RUN_CHECKPOINTS[command]
    if not d.is_dir():
        raise ErnasError(f"resume={d}: no such directory; give the run directory of an earlier "
                         f"run (it holds {checkpoint}).")
    other = _run_command(d)
    if other and other != command:
        raise ErnasError(f"resume={d}: this is a run of ernas-{other}, not of ernas-{command}; "
                         f"continue it with `ernas-{other} resume={d}`.")
    saved = d / ".hydra" / "config.yaml"
    run_cfg = OmegaConf.load(saved) if saved.is_file() else None
    if not (d / checkpoint).is_file():
        n = OmegaConf.select(run_cfg if run_cfg is not None else cfg, every)
        raise ErnasError(f"resume={d}: this run directory holds no {checkpoint}: the run stopped "
                         f"before its first checkpoint ({every}={n} steps), so there is nothing "
                         f"to resume; start it again (in a new run directory).")
    if run_cfg is None:
        return cfg  # made through the Python API: the checkpoint's own check applies
    _refuse_changed(d, cfg, run_cfg, (*free, *invocation))
    given = given_keys()
    with open_dict(run_cfg):
        for key in (*free, *invocation):
            if key in invocation or key in given \
                    or OmegaConf.select(run_cfg, key, default=_ABSENT) is _ABSENT:
                OmegaConf.update(run_cfg, key, OmegaConf.select(cfg, key), force_add=True)
        added = new_fields(run_cfg, cfg)
    if added:
        log.warning("resume=%s: settings added to ernas since this run take their current "
                    "values: %s.", d, ", ".join(added))
    return run_cfg


def _refuse_changed(d: Path, cfg, run_cfg, free: tuple[str, ...]) -> None:
    """An ErnasError listing every override of this command line (other than ``free`` and
    ``hydra.*`` keys) whose value differs from the run's."""
    from omegaconf import OmegaConf

    diffs = []
    for key in sorted(given_keys()):
        if key in free or key.startswith("hydra."):
            continue
        if OmegaConf.select(run_cfg, key, default=_ABSENT) is _ABSENT:
            continue  # a setting added since the run: it takes the value given (new_fields)
        now, was = (OmegaConf.select(c, key, default=None) for c in (cfg, run_cfg))
        now, was = (OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
                    for v in (now, was))
        if now != was:
            diffs.append(f"{key} (run: {was!r}, now: {now!r})")
    if diffs:
        raise ErnasError(f"resume={d}: a resumed run keeps its own settings, but these overrides "
                         f"differ from the run's: {'; '.join(diffs)}. Drop them to continue the "
                         f"run, or start a new run to change them.")


def new_fields(run_cfg, cfg, prefix: str = "") -> list[str]:
    """Copy into ``run_cfg`` (in place, open for new keys) every key of ``cfg`` it lacks: a
    setting added to ernas after the run was made (its saved config has no value for it);
    return them as ``key=value``. A group whose ``name`` differs (another backend or task) is
    the run's own and is not descended into."""
    from omegaconf import DictConfig, OmegaConf

    added = []
    for key in cfg:
        now = cfg[key]
        if key not in run_cfg:
            run_cfg[key] = now
            value = OmegaConf.to_container(now) if OmegaConf.is_config(now) else now
            added.append(f"{prefix}{key}={value}")
        elif isinstance(now, DictConfig) and isinstance(run_cfg[key], DictConfig) \
                and now.get("name") == run_cfg[key].get("name"):
            added += new_fields(run_cfg[key], now, f"{prefix}{key}.")
    return added


def task_of(cfg):
    """The task object of a command config's ``task`` group (``ernas.task.make_task``)."""
    from omegaconf import OmegaConf

    from ernas.task import make_task

    return make_task(OmegaConf.to_container(cfg.task, resolve=True), "task")


_HELD: list = []  # lock files of claimed run directories, held until the process ends


def claim_run_dir(out, resume: bool = False, main: bool = True, record: bool = True) -> Path:
    """Make ``out`` this process's run directory: create it and hold an exclusive lock on
    ``out/.ernas.lock`` (``fcntl.flock``, released when the process ends, even when killed), so
    a second run on the same directory is refused instead of overwriting it. A new run also
    refuses a directory that already holds an earlier run's outputs (anything but Hydra's
    ``.hydra/`` and ``*.log``); a resumed run removes the ``.*.tmp`` files an interrupted atomic
    write left behind. A new run records its config there (:func:`record_run_config`), unless
    ``record=False`` (a command that claims first and checks after records it itself). Ranks
    other than 0 (``main=False``) write nothing and claim nothing."""
    import fcntl

    out = Path(out)
    if not main:
        return out
    out.mkdir(parents=True, exist_ok=True)
    lock = open(out / ".ernas.lock", "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise ErnasError(f"{out}: another ernas command is writing to this run directory right "
                         f"now; wait for it to finish or choose another hydra.run.dir.") from None
    _HELD.append(lock)
    if resume:
        for tmp in out.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
        return out
    earlier = sorted(p.name for p in out.iterdir()
                     if not p.name.startswith(".") and p.suffix != ".log")
    if earlier:
        raise ErnasError(f"{out} already holds the outputs of an earlier run "
                         f"({', '.join(earlier[:5])}{', ...' if len(earlier) > 5 else ''}); "
                         f"choose another hydra.run.dir, or continue that run with "
                         f"resume={out}.")
    if record:
        record_run_config(out)
    return out


_COMPOSED: list[str] = []  # the YAML of the config Hydra composed for this command


def record_run_config(out: Path) -> None:
    """Write ``.hydra/config.yaml``, ``overrides.yaml`` and ``hydra.yaml`` (what Hydra writes
    itself when ``hydra.output_subdir`` is set) into ``out`` when it is this Hydra command's
    run directory. The command configs set ``hydra.output_subdir: null``, so this record is made
    by the run that claimed the directory (:func:`claim_run_dir`), never by a refused one."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from ernas.io import atomic_write_text

    try:
        hc = HydraConfig.get()
    except ValueError:
        return
    if not _COMPOSED or Path(hc.runtime.output_dir).resolve() != out.resolve():
        return
    d = out / ".hydra"
    d.mkdir(exist_ok=True)
    atomic_write_text(d / "config.yaml", _COMPOSED[0])
    atomic_write_text(d / "overrides.yaml", OmegaConf.to_yaml(list(hc.overrides.task)))
    atomic_write_text(d / "hydra.yaml", OmegaConf.to_yaml({"hydra": hc}))


def output_dir(resume: bool = False, main: bool = True, record: bool = True) -> Path:
    """The Hydra run directory (or the current directory outside Hydra), claimed for this run
    (:func:`claim_run_dir`)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        out = Path(HydraConfig.get().runtime.output_dir)
    except ValueError:
        out = Path.cwd()
    return claim_run_dir(out, resume, main, record)


def resolve_arch(ref):
    """An architecture from an arch YAML, a name in ``search_spaces/archs/``, a search or
    retrain run directory (its ``arch.yaml``), or ``reference:<space>`` (the reference network of
    a space, given by name or path). A file that still lists candidates is refused (it is a
    search space, not one network)."""
    from ernas.paths import SEARCH_SPACES
    from ernas.space import find_space, load_arch

    if ref is None or str(ref) == "":
        raise ErnasError("field 'arch' is empty; pass arch=<arch.yaml>, a shipped arch name "
                         "(e.g. nafnet_sidd_w16), a run directory holding arch.yaml, or "
                         "reference:<space> for a space's reference network.")
    ref = str(ref)
    if ref.startswith("reference:"):
        space = find_space(ref.removeprefix("reference:"))
        arch = space.reference()
        arch.name, arch.source = "reference", f"reference of {space.source}"
        return arch
    p = Path(ref)
    if p.is_dir() and (p / "arch.yaml").is_file():
        p = p / "arch.yaml"
    elif not p.exists() and not p.suffix:
        shipped = SEARCH_SPACES / "archs" / f"{ref}.yaml"
        if not shipped.is_file():
            names = sorted(f.stem for f in (SEARCH_SPACES / "archs").glob("*.yaml"))
            spaces = sorted(f.stem for f in SEARCH_SPACES.glob("*.yaml"))
            raise ErnasError(f"arch {ref!r} is neither a file nor a directory with arch.yaml nor "
                             f"a shipped arch; shipped archs: {', '.join(names)}; for a space's "
                             f"reference network write reference:<space> (spaces: "
                             f"{', '.join(spaces)}).")
        p = shipped
    return load_arch(p)


def arch_for(ref, checkpoint=None, default: str = "reference:nafnet_tiny"):
    """``resolve_arch(ref)``; without ``ref``, the ``arch.yaml`` beside ``checkpoint`` (a file in
    a run dir, or the run dir itself), else ``default``."""
    if ref:
        return resolve_arch(ref)
    if checkpoint:
        c = Path(str(checkpoint))
        d = c if c.is_dir() else c.parent
        if (d / "arch.yaml").is_file():
            return resolve_arch(d)
    return resolve_arch(default)
