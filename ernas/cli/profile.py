"""``ernas-profile``: profile a latency table for a space on a backend, or validate one.

mode=profile: measure every op key (interleaved rounds, ``latency.measure``), then check
single-decision consistency and re-measure suspicious pairs (``ernas.latency.consistency``) and
record the probe baseline (``ernas.latency.resolve``); ``arch=`` profiles only its keys.
mode=validate: measure sampled networks end to end against the table (``output=`` or the table
``latency.table`` resolves to); the table is never modified, ``validate.write_corrected=true``
writes a corrected copy into the run directory.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from omegaconf import DictConfig

from ernas.cli.common import claim_run_dir, hydra_main, log_start, output_dir, user_errors
from ernas.cli.schema import Profile
from ernas.config import validated
from ernas.errors import ErnasError
from ernas.io import atomic_write_json
from ernas.latency.anchor import anchors_phrase
from ernas.latency.consistency import inconsistency
from ernas.latency.executorch import delegation_summary
from ernas.latency.factory import make_backend
from ernas.latency.measure import MeasureProtocol
from ernas.latency.resolve import profile_path, profile_table, resolve_from_config
from ernas.latency.settings import LatencySettings
from ernas.space import find_space, load_arch

log = logging.getLogger(__name__)


def _validate(cfg: DictConfig, settings: LatencySettings, space, shape, protocol, backend,
              out: Path) -> dict:
    from ernas.latency.validation import validate_table

    lat = cfg.latency
    # an explicit table is validated as it is (validation is the stronger test); `auto` resolves
    # the table a search would use, probe included; never anchored (validation fits and scores
    # the anchored line itself, in its own pass: `anchored`); the table is the one timed at
    # latency.key_threads, the networks are measured at latency.backend.threads
    explicit = cfg.output or (lat.table if lat.table not in (None, "auto") else None)
    table, path = resolve_from_config(space, shape, settings.key_settings().replace(
        anchor=False, **({"trust_table": True} if explicit else {})), cfg.progress, explicit)
    if settings.keys_elsewhere:
        print(f"keys timed at {settings.key_threads} thread(s), networks measured at "
              f"{lat.backend.threads}: only the anchored figures predict these networks")
    s = validate_table(space, table, backend, out, cfg.validate.n, cfg.validate.seed, protocol,
                       path, cfg.validate.write_corrected, cfg.progress, lat.anchor_samples)
    c, sp, an = s["corrected_loo"], s["speedup"], s["anchored"]
    print(f"validated {path} on {s['n']} networks: MAPE {100 * s['mape']:.2f}%, within ±10% "
          f"{100 * s['within_10pct']:.0f}%, Spearman {s['spearman']:.3f}, noise floor "
          f"{100 * s['noise_floor']:.1f}% per pass, {100 * s['measurement_noise']:.1f}% split-half"
          f" (leave-one-out corrected: MAPE {100 * c['mape']:.2f}%)\n"
          f"  speed-ups over the reference (paired per round): MAPE {100 * sp['mape']:.2f}%, "
          f"within ±10% {100 * sp['within_10pct']:.0f}%, noise floor "
          f"{100 * sp['noise_floor']:.1f}%"
          f" per pass, {100 * sp['measurement_noise']:.1f}% split-half")
    if an:
        print(f"  anchored at {anchors_phrase(len(an['anchors']) - 2, lat.anchor_samples)} "
              f"measured now (ms ≈ {an['scale']:.3f}"
              f"·sum {an['offset_ms']:+.2f}): MAPE {100 * an['mape']:.2f}%, within ±10% "
              f"{100 * an['within_10pct']:.0f}%; speed-ups within ±10% "
              f"{100 * an['speedup']['within_10pct']:.0f}% ({an['n']} other networks)")
    else:
        print(f"  anchored: not scored: {s['anchored_skipped']}")
    print(f"  wrote {out}/validation.csv, validation.png"
          + (f", {s['corrected_table']}" if s["corrected_table"] else ""))
    return s


def _delegation_line(d: dict) -> str:
    """What ran outside the accelerated delegate (ExecuTorch's portable kernels), per op type."""
    ops = ", ".join(f"{op} ({s['nodes']} nodes in {s['keys']} keys)"
                    for op, s in sorted(d["portable_ops"].items(),
                                        key=lambda kv: -kv[1]["nodes"]))
    return (f"delegation: {d['fully_delegated']} of {d['keys']} keys fully delegated to XNNPACK"
            + (f"; on portable kernels: {ops}" if ops else "")
            + " (per key: the table's `delegation` column)")


def _arch_keys(path, space, shape, granularity) -> list[str]:
    """The op keys of the architecture file ``path``, which must be of ``space``'s family (the
    table is labelled and cached under ``space``)."""
    arch = load_arch(path)
    if arch.family != space.family:
        raise ErnasError(f"arch={path} is a {arch.family} network but space={space.name} is a "
                         f"{space.family} space, and the table is labelled and cached under the "
                         f"space. Pass the space the architecture was derived from (space=NAME).")
    return list(dict.fromkeys(arch.op_keys(shape, granularity)))


@user_errors
def run(cfg: DictConfig, out=None) -> dict:
    validated(cfg, Profile, "profile config")
    space = find_space(cfg.space)
    lat = cfg.latency
    protocol = MeasureProtocol.from_mapping(lat.measure)
    shape = [int(s) for s in cfg.input_shape]
    # profiling times the keys at latency.key_threads (the backend's threads when null)
    settings = LatencySettings.from_config(lat)
    if settings.keys_elsewhere and cfg.mode == "validate" and cfg.validate.write_corrected:
        raise ErnasError(f"validate.write_corrected=true with latency.key_threads="
                         f"{settings.key_threads}: the corrected table would list keys timed at "
                         f"{settings.key_threads} thread(s) with a line fitted at "
                         f"{lat.backend.threads}. Fix: drop validate.write_corrected; a search "
                         f"with these settings anchors its own line.")
    # validation times whole networks at the backend's threads
    backend = make_backend(lat.backend if cfg.mode == "validate" else
                           settings.key_settings().backend)
    arch_keys = _arch_keys(cfg.arch, space, shape, lat.granularity) if cfg.arch else None
    out = claim_run_dir(out) if out else output_dir()
    log_start("profile", out, backend=backend, mode=cfg.mode,
              space=space.name, input_shape=shape, output=cfg.output)
    if cfg.mode == "validate":
        return _validate(cfg, settings, space, shape, protocol, backend, out)
    path = Path(cfg.output) if cfg.output else profile_path(
        space, backend, shape, lat.granularity, lat.cache_dir, arch_keys)
    t0 = time.perf_counter()
    table = profile_table(space, shape, backend, lat.granularity, path, protocol,
                          lat.consistency_tolerance, cfg.progress, arch_keys, lat.profile_group,
                          lat.recheck_rounds)
    keys = space.op_keys(shape, lat.granularity) if arch_keys is None else arch_keys
    consistency = table.metadata.get("consistency") if not cfg.arch else None
    summary = {"table": str(path), "keys": len(keys), "rows": len(table),
               "profile_seconds": time.perf_counter() - t0,
               "total_ms": float(table.lookup(keys).sum()),
               "statistic": table.metadata.get("statistic"),
               "device": table.metadata.get("device"), "backend": backend.name,
               "fingerprint": backend.fingerprint(), "session_options": backend.session_options(),
               "protocol": protocol.to_dict(), "consistency": consistency,
               "probe_baseline": table.metadata.get("probe_baseline"),
               "delegation": delegation_summary(table)}
    atomic_write_json(out / "summary.json", summary)
    print(f"latency table with {len(table)} keys for {space.name} at {shape} on {backend.name} "
          f"({table.metadata.get('device')}, {backend.session_options()}): {path}")
    if summary["delegation"]:
        print(_delegation_line(summary["delegation"]))
    if consistency:
        print(f"single-decision pairs: {consistency['pairs']}, cheaper choice >"
              f"{100 * consistency['tolerance']:.0f}% slower: {consistency['before']} before the "
              f"re-check, {consistency['after']} after")
        for q in consistency["inconsistent"][:10]:
            print(f"  still inconsistent: {q['decision']} {q['cheaper']} ({q['cheaper_ms']:.3f} ms)"
                  f" vs {q['costlier']} ({q['costlier_ms']:.3f} ms) at {q['positions'][0]} "
                  f"{q['choice']}")
        why = inconsistency(table, space, shape, lat.granularity, lat.max_inconsistency)
        if why:
            log.warning(f"this table {why}; latency.table=auto will not use it. Profile "
                        f"again while nothing else runs, into a new file (another output=, or "
                        f"none: the cache).")
    return summary


main = hydra_main("profile", run)


if __name__ == "__main__":
    main()
