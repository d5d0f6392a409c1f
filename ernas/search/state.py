"""The state of one search run: supernet, α, both optimisers, the LR schedule, the logs so far and
every RNG state; its checkpoint (``checkpoint.pt``, saved and resumed exactly) and its log files
(``log.csv`` grown one row per log interval, ``alphas.csv`` at checkpoints, optional TensorBoard
scalars under ``tensorboard/``)."""
from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import torch

from ernas import distributed as D
from ernas.csvlog import CsvLog
from ernas.errors import ErnasError
from ernas.io import atomic_torch_save, atomic_write_text
from ernas.scalars import Scalars
from ernas.search.budget import check_budget
from ernas.search.config import RESUME_FREE, SearchConfig
from ernas.search.objective import LatencyLoss, SearchObjective
from ernas.space import Arch
from ernas.supernet import SuperNet

log = logging.getLogger(__name__)

ALPHA_COLUMNS = ["step", "position", "decision", "choice", "probability"]


def search_device(name: str) -> torch.device:
    """The torch device of ``search.device`` (auto: CUDA when available)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ErnasError("search config device='cuda' but no CUDA device is available; use "
                         "device='cpu' or 'auto'.")
    return torch.device(name)


def rng_state() -> dict:
    """Every RNG state a search step draws from (torch, Python, NumPy, CUDA), as tensors and
    plain values a ``weights_only`` checkpoint can hold."""
    st = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (st[0], torch.from_numpy(st[1].astype(np.int64)), *map(float, st[2:]))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _choice_str(v) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def log_columns(metric: str) -> list[str]:
    """The columns of a search's ``log.csv``."""
    return ["step", "alpha_updated", "total", "task", "latency", "entropy_weight",
            f"train_{metric}", f"val_{metric}", "expected_ms", "entropy", "decisiveness", "lr_w",
            "lr_alpha"]


class SearchRun:
    """State of one search run (model, optimisers, logs) and its file outputs."""

    def __init__(self, space, expected_latency, cfg: SearchConfig, out_dir: Path, baseline: Arch,
                 task):
        self.space, self.cfg, self.out, self.task = space, cfg, out_dir, task
        self.device = search_device(cfg.device)
        self.expected = expected_latency.to(self.device)
        torch.manual_seed(cfg.seed)
        self.net = SuperNet(space, cfg.mode, cfg.temperature, cfg.gumbel).to(self.device)
        D.sync_parameters(self.net.parameters())  # every rank starts from rank 0's w and α
        self.opt_w = torch.optim.AdamW(self.net.weight_parameters(), lr=cfg.lr_w,
                                       weight_decay=cfg.weight_decay)
        self.opt_a = torch.optim.Adam(self.net.arch_parameters(), lr=cfg.lr_alpha,
                                      betas=(0.5, 0.999))
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.opt_w, T_max=max(1, cfg.steps), eta_min=cfg.lr_min)
        self.baseline = baseline
        self.baseline_ms = (expected_latency.of_arch(baseline) if space.contains(baseline)
                            else None)
        self.target_ms = self._target_ms()
        if cfg.derive == "budget":  # refused here, before the search, not after it
            check_budget(space, expected_latency, self.target_ms, "search.derive=budget")
        self.objective = SearchObjective(task.loss, LatencyLoss(cfg.latency_form, cfg.lam,
                                                               self.target_ms, cfg.beta),
                                         cfg.entropy_schedule(), task.loss_log_scale)
        self.step = 0
        self.log_rows: list[dict] = []
        self.alpha_rows: list[dict] = []
        self.elapsed = 0.0
        self.ckpt = out_dir / "checkpoint.pt"
        self.csv = CsvLog(out_dir / "log.csv", log_columns(task.metric), enabled=D.is_main())
        self.scalars = None

    def _target_ms(self) -> float:
        """T: ``target_ms``, else the baseline's predicted latency, else the supernet's
        expected latency at initialisation."""
        with torch.no_grad():
            target = self.cfg.target_ms or self.baseline_ms or float(self.expected(
                self.net.probs(False)))
        return float(target)

    def open_logs(self) -> None:
        """Start ``log.csv`` over from the rows held now (none for a new run, the checkpoint's
        on resume: rows logged after it are dropped) and open the TensorBoard writer."""
        self.csv.rewrite(self.log_rows)
        self.scalars = Scalars(self.out, self.cfg.logger, enabled=D.is_main())

    def close_logs(self) -> None:
        if self.scalars is not None:
            self.scalars.close()

    # -------------------------------------------------------------- checkpoint
    def save(self) -> None:
        """Write ``checkpoint.pt`` atomically (rank 0); refuse non-finite parameters."""
        if not D.is_main():
            return
        bad = [n for n, p in self.net.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise ErnasError(f"search step {self.step}: parameters {bad[:3]} are not finite; the "
                             f"checkpoint {self.ckpt} was not overwritten. Lower lr_w/lr_alpha.")
        atomic_torch_save({"model": self.net.state_dict(), "opt_w": self.opt_w.state_dict(),
                           "opt_a": self.opt_a.state_dict(), "sched": self.sched.state_dict(),
                           "step": self.step, "log_rows": self.log_rows,
                           "space": self.space.to_dict(),
                           "alpha_rows": self.alpha_rows, "config": self.cfg.to_dict(),
                           "elapsed": self.elapsed, "rng": rng_state()}, self.ckpt)
        log.info("search step %d/%d: checkpoint %s", self.step, self.cfg.steps, self.ckpt)

    def _read_checkpoint(self) -> dict:
        if not self.ckpt.is_file():
            raise ErnasError(f"resume=True but {self.ckpt} does not exist; start the search "
                             f"without resume, or point out_dir at the interrupted run.")
        try:
            ck = torch.load(self.ckpt, map_location=self.device, weights_only=True)
            if "config" not in ck:
                raise KeyError("config")
        except Exception as e:  # noqa: BLE001 - truncated, not a zip, not ours: all one answer
            raise ErnasError(f"{self.ckpt}: cannot read this search checkpoint ({type(e).__name__}"
                             f": {str(e).splitlines()[0][:200] if str(e) else ''}); it is damaged "
                             f"or not a search checkpoint. Start a new search (without resume=), "
                             f"or restore the file from a copy.") from None
        return ck

    def _check_same_config(self, old: dict) -> None:
        default = SearchConfig().to_dict()  # a field added since: the run had its default
        diff = sorted(k for k, v in self.cfg.to_dict().items()
                      if k not in RESUME_FREE and old.get(k, default[k]) != v)
        if diff:
            raise ErnasError(f"{self.ckpt}: cannot resume with a different configuration; "
                             f"changed field(s): " + ", ".join(f"{k} ({old.get(k)!r} -> "
                             f"{getattr(self.cfg, k)!r})" for k in diff)
                             + ". Use the original values or start a new out_dir.")

    def load(self) -> None:
        """Resume from ``checkpoint.pt``: same configuration (but ``RESUME_FREE``), same space."""
        ck = self._read_checkpoint()
        self._check_same_config(ck["config"])
        try:
            self.net.load_state_dict(ck["model"])
        except RuntimeError as e:
            raise ErnasError(f"{self.ckpt}: the supernet in this checkpoint does not fit space "
                             f"{self.space.name!r} ({' '.join(str(e).split())[:240]}...); resume "
                             f"with the space the run was started with.") from None
        self.opt_w.load_state_dict(ck["opt_w"])
        self.opt_a.load_state_dict(ck["opt_a"])
        self.sched.load_state_dict(ck["sched"])
        self.step, self.elapsed = ck["step"], ck["elapsed"]
        self.log_rows, self.alpha_rows = ck["log_rows"], ck["alpha_rows"]
        set_rng_state(ck["rng"])
        log.info("search: resumed from %s at step %d", self.ckpt, self.step)

    # -------------------------------------------------------------- logging
    def log(self, step: int, parts: dict, train_metric: float, val_metric: float | None,
            alpha_updated: bool) -> dict:
        """One row of log.csv (loss parts of the α step, or of the objective on the training
        batch when α was not updated), appended to the file at once, with the current
        probabilities for alphas.csv and the same numbers as TensorBoard scalars."""
        with torch.no_grad():
            probs = self.net.probs(sample=False)
            expected_ms = float(self.expected(probs))
        m = self.task.metric
        row = {"step": step, "alpha_updated": int(alpha_updated),
               **{k: parts[k] for k in ("total", "task", "latency", "entropy_weight")},
               f"train_{m}": train_metric, f"val_{m}": val_metric,
               "expected_ms": expected_ms, "entropy": self.net.entropy(),
               "decisiveness": self.net.decisiveness(),
               "lr_w": self.opt_w.param_groups[0]["lr"],
               "lr_alpha": self.opt_a.param_groups[0]["lr"]}
        self.log_rows.append(row)
        self.csv.append(row)
        alphas = [{"step": step, "position": pos, "decision": d, "choice": _choice_str(c),
                   "probability": v}
                  for pos, dec in probs.items() for d, p in dec.items() if p.numel() > 1
                  for c, v in zip(self.space.choices[pos][d], p.tolist())]
        self.alpha_rows += alphas
        self._scalars(row, parts["entropy"], alphas)
        return row

    def _scalars(self, row: dict, entropy_term: float, alphas: list[dict]) -> None:
        if self.scalars is None or self.scalars.writer is None:
            return
        m = self.task.metric
        self.scalars.add(row["step"], {
            "search/loss": row["total"], "search/task_loss": row["task"],
            "search/latency_loss": row["latency"], "search/entropy_term": entropy_term,
            "search/entropy_weight": row["entropy_weight"], f"train/{m}": row[f"train_{m}"],
            f"val/{m}": row[f"val_{m}"], "arch/expected_ms": row["expected_ms"],
            "arch/entropy": row["entropy"], "arch/decisiveness": row["decisiveness"],
            "search/lr_w": row["lr_w"], "search/lr_alpha": row["lr_alpha"],
            **{f"alpha/{a['position']}/{a['decision']}/{a['choice']}": a["probability"]
               for a in alphas}})

    def write_logs(self) -> None:
        """Rewrite log.csv and alphas.csv from the rows held now (rank 0)."""
        if not D.is_main():
            return
        import pandas as pd

        self.csv.rewrite(self.log_rows)
        atomic_write_text(self.out / "alphas.csv", pd.DataFrame(
            self.alpha_rows, columns=ALPHA_COLUMNS).to_csv(index=False))
