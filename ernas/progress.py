"""Progress that suits where the output goes. Elsewhere than a terminal (CI, nohup, a redirected
stderr) one plain status line every ``every_s`` seconds and one at the end, instead of thousands
of carriage-return updates; on a terminal a tqdm bar, cleared at the end and replaced by that
final line. The lines go to the ``ernas.progress`` logger when logging is configured (a Hydra
command: its console and ``<run dir>/<command>.log``), else to stderr."""
from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger(__name__)


class StatusLines:
    """The subset of tqdm's interface ernas uses, written as occasional whole lines to ``file``
    (default: the ``ernas.progress`` logger, or stderr when no logging is configured)."""

    def __init__(self, total=None, desc: str = "", initial: int = 0, unit: str = "it",
                 every_s: float = 30.0, file=None):
        self.total, self.desc, self.n, self.unit = total, desc, initial, unit
        self.every_s, self.file = every_s, file
        self.postfix = ""
        self.start = self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            self._line()

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def close(self) -> None:
        self._line()

    def text(self) -> str:
        """``desc: n/total unit (rate unit/s) [postfix]``."""
        of = f"/{self.total}" if self.total else ""
        rate = self.n / max(time.monotonic() - self.start, 1e-9)
        tail = f" [{self.postfix}]" if self.postfix else ""
        done = round(self.n, 2)  # fractional steps (profiling's rounds) add up to float noise
        return f"{self.desc}: {done:g}{of} {self.unit} ({rate:.2f} {self.unit}/s){tail}"

    def _line(self) -> None:
        if self.file is None and log.hasHandlers():
            log.info("%s", self.text())
        else:
            print(self.text(), file=self.file or sys.stderr, flush=True)


class _Silent(StatusLines):
    def update(self, n: int = 1) -> None:
        self.n += n

    def close(self) -> None:
        pass


class _Terminal(StatusLines):
    """A tqdm bar while it runs (``leave=False``), then the final status line."""

    def __init__(self, total=None, desc: str = "", initial: int = 0, unit: str = "it"):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=desc, initial=initial, unit=unit, dynamic_ncols=True,
                        leave=False)
        super().__init__(total, desc, initial, unit, every_s=float("inf"))

    @property
    def total(self):
        return self.bar.total

    @total.setter
    def total(self, value) -> None:
        self.bar.total = value

    def update(self, n: int = 1) -> None:
        self.n += n
        self.bar.update(n)

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        super().set_postfix(ordered_dict, **kwargs)
        self.bar.set_postfix(ordered_dict, refresh, **kwargs)

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        super().set_postfix_str(s)
        self.bar.set_postfix_str(s, refresh)

    def close(self) -> None:
        self.bar.close()
        self._line()


def progress(total=None, desc: str = "", initial: int = 0, unit: str = "it",
             enabled: bool = True, every_s: float = 30.0):
    """A tqdm bar when stderr is a terminal, :class:`StatusLines` otherwise, nothing when not
    ``enabled``."""
    if not enabled:
        return _Silent(total, desc, initial, unit)
    if sys.stderr.isatty():
        return _Terminal(total, desc, initial, unit)
    return StatusLines(total, desc, initial, unit, every_s)
