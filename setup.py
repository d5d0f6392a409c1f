"""Build hook: the shipped folders (experiments/, search_spaces/, latency_tables/) stay at the top
of the repository and are copied into the wheel as ``ernas/_resources/<folder>``, so a regular
install finds them through ``importlib.resources`` from any directory (``ernas.paths``)."""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

SHIPPED = ("experiments", "search_spaces", "latency_tables")


class BuildWithResources(build_py):
    def run(self):
        super().run()
        here = Path(__file__).resolve().parent
        for name in SHIPPED:
            target = Path(self.build_lib) / "ernas" / "_resources" / name
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(here / name, target,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".*"))


setup(cmdclass={"build_py": BuildWithResources})
