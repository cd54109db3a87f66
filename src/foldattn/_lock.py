"""An exclusive claim on an output folder, shared by every command that writes one (private).

``foldattn train`` holds it on its run folder, ``fold``/``export`` on the folder they write
into, ``sweep`` on the sweep's folder: two writers interleaving their files is refused, naming
the holder. Temporary files of foldattn's atomic writes (:func:`foldattn._utils.atomic_path`)
that a killed command left behind are removed once the lock is held.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from ._files import load_json_file
from ._utils import TMP_MARK

__all__ = ["RunLock", "RunLockedError"]


class RunLockedError(ValueError):
    """Another live run holds the run folder."""


class RunLock:
    """An exclusive claim on a folder (``FOLDER/.lock``, holding the owner's PID and host).

    Two runs writing one folder would interleave ``last.pt`` and ``best.pt`` of different models,
    so the second is refused, naming the holder. A lock whose process is gone (same host, PID not
    running) is stale, and so is a lock file that is not such a record: either is taken over with
    a warning. Temporary files left by foldattn's killed writes are removed once the lock is held.
    """

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / ".lock"
        self.held = False

    @staticmethod
    def _alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # exists, owned by someone else
            return True
        # a killed process whose parent died too stays a zombie until init reaps it (in a container, maybe
        # never): it holds nothing
        with contextlib.suppress(OSError, IndexError), open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
        return True

    def acquire(self) -> RunLock:
        host = socket.gethostname()
        record = json.dumps({"pid": os.getpid(), "host": host, "since": time.strftime("%Y-%m-%d %H:%M:%S")})
        for _ in range(2):
            if not self._create(record):
                holder = self._holder()
                if holder is None:  # not a lock this code wrote (or half-written): stale, with a warning
                    warnings.warn(f"{self.path}: an unreadable lock file; treating it as stale and taking it over",
                                  stacklevel=3)
                    self.path.unlink(missing_ok=True)
                    continue
                pid, where = holder["pid"], holder["host"]
                if where == host and pid == os.getpid():  # this process's own earlier setup
                    self.path.unlink(missing_ok=True)
                    continue
                if where == host and (pid <= 0 or not self._alive(pid)):
                    warnings.warn(f"{self.path}: taking over a stale lock of PID {pid} (no longer running)",
                                  stacklevel=3)
                    self.path.unlink(missing_ok=True)
                    continue
                raise RunLockedError(
                    f"folder {self.path.parent} is in use by PID {pid} on host {where} (since "
                    f"{holder.get('since', '?')}); choose another output, or wait for that command to end"
                ) from None
            self.held = True
            for tmp in self.path.parent.glob(f".*{TMP_MARK}*.tmp"):  # a killed write's: never renamed into place
                with contextlib.suppress(OSError):
                    if tmp.is_dir() and not tmp.is_symlink():  # a staged folder (export_openvino's)
                        shutil.rmtree(tmp)
                    else:
                        tmp.unlink()
            return self
        raise RunLockedError(f"could not lock {self.path.parent}")

    def _create(self, record: str) -> bool:
        """Create the lock holding ``record``; False if it exists. Written beside, then hard-linked into
        place, so the lock never appears half-written (where hard links fail, an exclusive create)."""
        mine = self.path.with_name(f".lock.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            mine.write_text(record)
            try:
                os.link(mine, self.path)
                return True
            except FileExistsError:
                return False
            except OSError:
                try:
                    fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    return False
                with os.fdopen(fd, "w") as f:
                    f.write(record)
                return True
        finally:
            mine.unlink(missing_ok=True)

    def _holder(self) -> dict[str, Any] | None:
        """The lock's ``{pid, host, since}``, or None when the file is not such a record."""
        try:
            holder = load_json_file(self.path, "lock file", max_bytes=4096)
        except ValueError:
            return None
        if not isinstance(holder, dict):
            return None
        pid, host = holder.get("pid"), holder.get("host")
        if isinstance(pid, bool) or not isinstance(pid, int) or not 0 < pid < 2**31 or not isinstance(host, str):
            return None
        return {"pid": pid, "host": host[:255], "since": str(holder.get("since", "?"))[:40]}

    def busy(self) -> str:
        """Who holds the folder now (``"PID n on host h since t"``), or "" when nobody live does."""
        if self.held or not self.path.is_file():
            return ""
        holder = self._holder()
        if holder is None:
            return ""
        pid, where = holder["pid"], holder["host"]
        if where == socket.gethostname() and (pid == os.getpid() or not self._alive(pid)):
            return ""
        return f"PID {pid} on host {where} since {holder['since']}"

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
