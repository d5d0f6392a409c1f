"""Running a CLI as if an optional extra were not installed: a meta-path finder that makes its
packages absent (the case a user without the extra meets), then the module as ``__main__``."""
import subprocess
import sys
from pathlib import Path

from ernas.extras import Extra

_BLOCKED = ("import sys, runpy\n"
            "class Absent:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in {tops!r}:\n"
            "            raise ImportError('No module named ' + repr(name))\n"
            "sys.meta_path.insert(0, Absent())\n"
            "sys.argv = sys.argv[1:]\n"
            "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n")


def cli(module: str, *args, cwd, without: Extra | None = None) -> subprocess.CompletedProcess:
    """``python -m module args`` in ``cwd``; ``without``: that extra's packages are absent."""
    if without is None:
        head = [sys.executable, "-m", module]
    else:
        tops = sorted({p.split(".")[0] for p in without.packages})
        head = [sys.executable, "-c", _BLOCKED.format(tops=tops), module]
    return subprocess.run([*head, *args], capture_output=True, text=True, cwd=cwd)


def outputs(folder: Path) -> list[str]:
    """What a run wrote into ``folder`` besides Hydra's (empty) job log and dot files."""
    return sorted(p.name for p in folder.glob("*") if p.suffix != ".log"
                  and not p.name.startswith(".")) if folder.exists() else []
