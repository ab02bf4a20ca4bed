"""Where a result came from: the machine and the git commit, named the same way everywhere.

Every results file (``streamml.report``, ``experiments/bench_*.py``) and every MLflow run
records them, so that a figure can be traced to its code and judged against the load of the
machine that produced it (the cores here are shared). One definition, so that two files
never describe the same machine or commit differently. Standard library only: the versions
come from the installed metadata, without importing torch or MLflow.
"""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path


def machine(packages: tuple[str, ...] = ("torch", "numpy", "mlflow")) -> str:
    """OS, cores, CPU model, Python and ``packages``' versions, and the load average now.

    >>> machine(packages=()).count("cores")
    1
    """
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = []
    for name in packages:
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    return ", ".join([f"{platform.system()} {platform.release()}", f"{os.cpu_count()} cores ({cpu})",
                      f"Python {platform.python_version()}", *versions]) + f"; load average (1/5/15 min) {load}"


def git_commit(short: bool = False, cwd: str | Path | None = None) -> str:
    """``HEAD``'s sha (``-dirty`` when tracked files have uncommitted changes), or ``unknown``
    outside a git checkout (an installed package, a copied folder)."""
    try:
        sha = subprocess.run(["git", "rev-parse", *(["--short"] if short else []), "HEAD"], cwd=cwd,
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
