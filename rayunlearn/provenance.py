"""What produced a result: the package version and the git commit of its source."""

from __future__ import annotations

import subprocess
from functools import lru_cache
from pathlib import Path

import rayunlearn


@lru_cache(maxsize=1)
def provenance() -> dict[str, str]:
    """``{"version", "git_commit"}``; the commit is that of the checkout the package is imported
    from, with ``-dirty`` when it has uncommitted changes, or ``unknown`` for an installed copy
    (no git checkout around it, or no git)."""
    src = Path(rayunlearn.__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "unknown", ""
    return {"version": rayunlearn.__version__, "git_commit": commit + ("-dirty" if dirty else "")}
