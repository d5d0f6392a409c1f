"""Progress that suits where the output goes: a tqdm bar on a terminal; elsewhere (CI, nohup,
Hydra's job log) one plain status line every ``every_s`` seconds and one at the end, instead of
thousands of carriage-return updates."""
from __future__ import annotations

import sys
import time


class StatusLines:
    """The subset of tqdm's interface ernas uses, printed as occasional whole lines."""

    def __init__(self, total=None, desc: str = "", initial: int = 0, unit: str = "it",
                 every_s: float = 30.0, file=None):
        self.total, self.desc, self.n, self.unit = total, desc, initial, unit
        self.every_s, self.file = every_s, file or sys.stderr
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

    def _line(self) -> None:
        of = f"/{self.total}" if self.total else ""
        rate = self.n / max(time.monotonic() - self.start, 1e-9)
        tail = f" [{self.postfix}]" if self.postfix else ""
        done = round(self.n, 2)  # fractional steps (profiling's rounds) add up to float noise
        print(f"{self.desc}: {done:g}{of} {self.unit} ({rate:.2f} {self.unit}/s){tail}",
              file=self.file, flush=True)


class _Silent(StatusLines):
    def update(self, n: int = 1) -> None:
        self.n += n

    def close(self) -> None:
        pass


def progress(total=None, desc: str = "", initial: int = 0, unit: str = "it",
             enabled: bool = True, every_s: float = 30.0):
    """A tqdm bar when stderr is a terminal, :class:`StatusLines` otherwise, nothing when not
    ``enabled``."""
    if not enabled:
        return _Silent(total, desc, initial, unit)
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, initial=initial, unit=unit, dynamic_ncols=True)
    return StatusLines(total, desc, initial, unit, every_s)
