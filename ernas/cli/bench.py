"""``ernas-bench``: a benchmark protocol (``experiment=protocol_denoise`` …), stated whole in
one config, run as Hydra multirun jobs, selected on validation, scored once on test
(``ernas.bench.run``). ``resume=<bench dir>`` continues a stopped protocol with its own
config; only the launcher settings, ``until`` and ``progress`` may change."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from ernas.cli.common import claim_run_dir, hydra_main, log_start, output_dir, user_errors
from ernas.errors import ErnasError

RESUME_FREE = ("resume", "launcher", "launcher_settings", "progress", "until")


def _resumed(cfg: DictConfig) -> DictConfig:
    """The stopped protocol's own config, with this command's launcher settings."""
    from ernas.bench.run import CONFIG

    d = Path(str(cfg.resume))
    saved = d / CONFIG
    if not saved.is_file():
        raise ErnasError(f"resume={d}: no {CONFIG} there, so it is not an ernas-bench directory "
                         f"that got past planning; start the protocol again in a new directory.")
    run_cfg = OmegaConf.load(saved)
    now = OmegaConf.to_container(cfg, resolve=True)
    was = OmegaConf.to_container(run_cfg, resolve=True)
    given = [o.split("=", 1)[0].lstrip("+~") for o in _given_overrides()]
    stated = [k for k in given if k.split(".")[0] not in RESUME_FREE]
    diffs = [k for k in sorted(set(now) | set(was)) if stated and k not in RESUME_FREE
             and now.get(k) != was.get(k)]
    if diffs:
        raise ErnasError(f"resume={d}: a protocol is stated before it runs, so it continues "
                         f"with its own config, but these settings differ from its "
                         f"{CONFIG}: {', '.join(diffs)}. Drop those overrides (give only "
                         f"resume= and launcher settings), or state a new protocol in a new "
                         f"directory.")
    with open_dict(run_cfg):
        for k in RESUME_FREE:
            run_cfg[k] = cfg[k]
    return run_cfg


def _given_overrides() -> list[str]:
    """The command line's overrides (none when called through the Python API)."""
    from hydra.core.hydra_config import HydraConfig

    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return []


def _check_networks(cfg: DictConfig) -> None:
    """Refuse, before a run directory is claimed, a space, reference or scaled network that
    cannot be built or does not fit the task's data."""
    from ernas.bench.plan import hand_made
    from ernas.cli.common import task_of
    from ernas.space import find_space

    reference, _ = hand_made(cfg, find_space(cfg.space))
    task_of(cfg).check_arch(reference)


@user_errors
def run(cfg: DictConfig, out: Path | None = None) -> dict:
    from ernas.bench.config import Protocol
    from ernas.bench.run import run_protocol
    from ernas.config import validated

    validated(cfg, Protocol, "bench config")
    if cfg.resume:
        cfg = _resumed(cfg)
        out = claim_run_dir(cfg.resume, resume=True)
    else:
        _check_networks(cfg)
        out = claim_run_dir(out) if out else output_dir()
    log_start("bench", out, protocol=cfg.protocol, launcher=cfg.launcher,
              threads_per_job=cfg.threads, resuming=cfg.resume or None, until=cfg.until)
    return run_protocol(cfg, Path(out))


main = hydra_main("bench", run)


if __name__ == "__main__":
    main()
