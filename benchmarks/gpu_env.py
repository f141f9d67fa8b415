"""What a GPU window's scripts need before they can import dgemma on a machine that only has a copy of the repository:
the package made importable without installing it, the carried wheels installed, and a `git` that answers.

The GPU machine gets the working tree (no .git, no network) and its own python3 with torch and Triton. The repository
root is the package `dgemma`, so a link named dgemma to it, in a folder put first on the path, makes it importable;
missing Python packages (transformers 5.23.0, which the image predates) travel as wheels in `.whl/` and install into a
folder of their own, first on the path too. Only the standard library is imported here.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ROOT / ".whl"


def importable() -> Path | None:
    """Makes `import dgemma` load this checkout, in this process and in the children it starts (PYTHONPATH). -> the
    folder put on the path, or None when the installed dgemma already is this checkout (an editable install)."""
    spec = importlib.util.find_spec("dgemma")
    if spec is not None and spec.origin and Path(spec.origin).resolve().parent == ROOT:
        return None
    folder = Path(tempfile.mkdtemp(prefix="dgemma-path-"))
    (folder / "dgemma").symlink_to(ROOT, target_is_directory=True)
    prepend_path(folder)
    return folder


def prepend_path(folder: Path) -> None:
    sys.path.insert(0, str(folder))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))


def install_wheels(folder: Path) -> list[str]:
    """Installs every wheel in `folder` (no index, no dependencies: the folder holds exactly what the image lacks)
    into a folder of their own, put first on the path. -> the wheels' file names."""
    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        return []
    target = Path(tempfile.mkdtemp(prefix="dgemma-site-"))
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--upgrade", "--target", str(target), *map(str, wheels)]  # fmt: skip
    subprocess.run(cmd, check=True)
    prepend_path(target)
    return [w.name for w in wheels]


def answering_git() -> None:
    """The benchmarks' provenance asks git for the commit; where no git is installed, a stand-in that fails (so the
    commit reads "unknown") goes first on PATH for the children instead of a FileNotFoundError in each of them."""
    if shutil.which("git"):
        return
    folder = Path(tempfile.mkdtemp(prefix="dgemma-git-"))
    (folder / "git").write_text("#!/bin/sh\nexit 1\n")
    (folder / "git").chmod(0o755)
    os.environ["PATH"] = os.pathsep.join([str(folder), os.environ.get("PATH", "")])
