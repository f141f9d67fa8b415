"""Writing an export folder: every output is built in a temporary folder beside `--out` and renamed into place only
when complete, so a failed, interrupted (SIGINT, SIGTERM) or killed export leaves nothing at `--out`; bad output
paths are refused before any work starts, naming the path the user gave."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import tempfile
import threading
from pathlib import Path

import torch

from ..errors import ExportError


def versions(*modules: str) -> dict[str, str]:
    from importlib.metadata import version

    return {"dgemma": version("dgemma"), "torch": torch.__version__} | {m: version(m) for m in modules}


def output_folder(out, *, reading=(), within=()) -> Path:
    """`out` as a Path, refused with an ExportError naming it unless a new folder can be written there: not a path,
    empty, an existing file or non-empty folder, a folder the export reads (`reading`) or one inside an export it
    reads (`within`), below a file, or in a folder this user cannot write. Checked before any work starts."""
    if not isinstance(out, (str, os.PathLike)) or not isinstance(os.fspath(out), str):
        raise ExportError(f"the output folder must be a path, not {out!r}")
    if not os.fspath(out):
        raise ExportError("the output folder is an empty path: name a new folder (--out)")
    path = Path(out)
    resolved = path.resolve()
    for source in reading:
        if resolved == Path(source).resolve():
            raise ExportError(f"{out} is the folder the export reads: choose another --out")
    for source in within:
        if resolved == Path(source).resolve() or Path(source).resolve() in resolved.parents:
            raise ExportError(f"{out} is inside {source}, which the export reads: choose another --out")
    try:
        taken = path.exists() and (not path.is_dir() or any(path.iterdir()))
    except OSError as e:
        raise ExportError(f"cannot use {out} as the output folder: {e.strerror}") from e
    if taken:
        raise ExportError(f"{out} already exists and is not empty: remove it or choose another --out")
    ancestor = next(p for p in resolved.parents if p.exists())
    if not ancestor.is_dir():
        raise ExportError(f"cannot write {out}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ExportError(f"cannot write {out}: {ancestor} is not writable")
    return path


def running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def sweep(out: Path) -> None:
    """Removes the staging folders beside `out` of runs killed before their cleanup could run (SIGKILL, a power
    cut): those whose pid, in their name, no longer runs."""
    stale = re.compile(rf"\.{re.escape(out.name)}\.(\d+)\.\w+")  # staging's prefix, then mkdtemp's suffix
    for path in out.parent.iterdir():
        match = stale.fullmatch(path.name)
        if match and int(match[1]) > 0 and not running(int(match[1])) and not path.is_symlink() and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


class Interrupts:
    """While a block runs, SIGINT raises KeyboardInterrupt and SIGTERM SystemExit(143) (the status a shell reports
    for it), so the cleanup of `staging` runs before the process ends; either is also recorded in `received`, because
    a library in the block may catch the exception (torch.onnx's exporter has swallowed a Ctrl-C) and the export must
    not be moved into place after it. Only the main thread can set handlers, and a handler someone else installed
    (or SIG_IGN) is theirs to keep."""

    DEFAULTS = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}

    def __init__(self):
        self.received: int | None = None
        self.previous: dict = {}

    def __enter__(self) -> Interrupts:
        if threading.current_thread() is threading.main_thread():
            for signum, default in self.DEFAULTS.items():
                if signal.getsignal(signum) == default:
                    self.previous[signum] = signal.signal(signum, self.stop)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def stop(self, signum, frame):
        self.received = signum
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    def check(self) -> None:
        """Raises again for a signal that arrived during the block, if its exception was caught on the way."""
        if self.received is not None:
            self.stop(self.received, None)


@contextlib.contextmanager
def staging(out, **sources):
    """Yields a temporary folder beside `out` that becomes `out` only if the block succeeds, so a failed or
    interrupted (SIGINT, SIGTERM) export leaves no half-written folder, nor the parents it created. `out` is checked
    by output_folder (`sources` are its keywords); an existing empty folder is replaced. The temporary folder is
    named `.{out name}.{pid}.{random}`, so that a run killed outright leaves one that the next run on `out` removes."""
    out = output_folder(out, **sources)
    created = [p for p in reversed(out.absolute().parents) if not p.exists()]
    tmp = None
    with Interrupts() as interrupts:
        try:
            try:
                for parent in created:
                    parent.mkdir()
                sweep(out)
                tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", dir=out.parent))
                umask = os.umask(0)
                os.umask(umask)
                tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would outlive the rename
            except OSError as e:
                raise ExportError(f"cannot write {out}: {e.strerror} ({e.filename})") from e
            yield tmp
            interrupts.check()
            try:
                if out.exists():
                    out.rmdir()
                tmp.rename(out)
            except OSError as e:
                raise ExportError(f"cannot move the finished export to {out}: {e.strerror}") from e
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            if not out.exists():
                for parent in reversed(created):
                    with contextlib.suppress(OSError):
                        parent.rmdir()
