"""Optional TensorBoard scalars beside the CSV logs every run writes.

``logger=tensorboard`` writes the same numbers the CSV gets (losses, expected latency, entropy,
per-decision probabilities for search; loss, validation metric, learning rate for retraining)
as TensorBoard event files under ``<run dir>/tensorboard`` (``tensorboard --logdir runs``).
``logger=csv`` (default) writes none.
"""
from __future__ import annotations

from pathlib import Path

from ernas.errors import ErnasError

LOGGERS = ("csv", "tensorboard")


class Scalars:
    """``add(step, {tag: value})``; a no-op unless TensorBoard logging was asked for."""

    def __init__(self, out_dir, logger: str = "csv", enabled: bool = True):
        if logger not in LOGGERS:
            raise ErnasError(f"logger={logger!r} is not known; use csv (CSV logs only) or "
                             f"tensorboard (CSV plus TensorBoard scalars).")
        self.writer = None
        if logger == "tensorboard" and enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ErnasError("logger=tensorboard needs the tensorboard package; install it "
                                 "(pip install tensorboard) or use logger=csv.") from None
            self.writer = SummaryWriter(str(Path(out_dir) / "tensorboard"))

    def add(self, step: int, values: dict) -> None:
        if self.writer is None:
            return
        for tag, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v:
                self.writer.add_scalar(tag, float(v), step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
