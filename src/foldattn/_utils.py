"""Small helpers shared by the package (private)."""

from __future__ import annotations

import contextlib
import errno
import importlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import nn

__all__ = ["eval_mode", "unwrap_model", "set_submodule", "atomic_path", "require", "strict_json", "first_line",
           "TMP_MARK", "write_json", "make_output_folder", "check_output_folder"]

#: in the name of every temporary file foldattn writes (``.NAME.foldattn-XXXX.tmp``), so that a command
#: holding a folder's lock removes a killed write's leftovers, and only foldattn's
TMP_MARK = ".foldattn-"


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put ``module`` (and all submodules) in eval mode; restore every flag on exit."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, flag in flags:
            m.training = flag


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DataParallel / DistributedDataParallel (``module.``) and ``torch.compile`` (``_orig_mod.``)."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted path ``name`` (``""`` is not allowed)."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(path: str | os.PathLike[str], directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:  # some platforms cannot open folders; the file itself was synced
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The file is fsynced before the rename and the folder after it, so a crash leaves either the
    old file or the complete new one.
    """
    dest = Path(path)
    if not dest.parent.exists():
        raise FileNotFoundError(f"folder {dest.parent} does not exist; create it first or choose another path")
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}{TMP_MARK}", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        if not Path(tmp).is_dir():  # mkstemp makes 0600 files; give the usual umask-based mode
            os.chmod(tmp, 0o666 & ~_umask())
            _fsync(tmp)  # the data reaches the disk before the name does: no empty file after a crash
        os.replace(tmp, dest)
        _fsync(dest.parent, directory=True)  # ... and the rename itself is durable
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        failure = _write_failure(e, dest)
        if failure is not None:
            raise failure from None
        raise


# what writers say when a write fails: torch.save ("file write failed", "unexpected pos N vs M" when the
# disk filled before its end-of-file record, libstdc++'s "iostream error"), safetensors ("IoError")
_WRITE_MARKS = ("write", "unexpected pos", "iostream", "ioerror", "inline_container")


def _write_failure(error: BaseException, dest: Path) -> OSError | None:
    """A one-line ``OSError`` naming ``dest`` for a failed write (a full disk above all), or None for
    other errors. torch.save and safetensors report a full disk in their own words (a ``RuntimeError``
    from C++, an ``IoError`` text): none says which file or that the disk is full, so the disk is asked."""
    text = str(error)
    if isinstance(error, OSError):
        if error.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            return OSError(errno.ENOSPC, "No space left on device (free some space or write elsewhere)", str(dest))
        return None
    if not isinstance(error, Exception):  # Ctrl-C, SystemExit: not a write failure
        return None
    full = "No space left" in text or "code: 28" in text or "StorageFull" in text
    writer = isinstance(error, RuntimeError) or type(error) is Exception  # C++ and Rust writers' errors
    if not full and not (writer and any(m in text.lower() for m in _WRITE_MARKS)):
        return None
    with contextlib.suppress(OSError):
        full = full or shutil.disk_usage(dest.parent).free < 64 * 2**20
    if full:
        return OSError(errno.ENOSPC, "No space left on device (free some space or write elsewhere)", str(dest))
    return OSError(errno.EIO, f"writing failed ({text.splitlines()[0] if text else type(error).__name__})",
                   str(dest))


#: the pip package that provides an importable module, where the names differ
_PIP_NAMES = {"sklearn": "scikit-learn", "yaml": "pyyaml"}


def check_output_folder(path: str | os.PathLike[str], option: str) -> Path:
    """Refuse an output folder that could not be created or written, before any work, creating nothing.

    Long commands (a benchmark, a stripe recording) check their output first, so that a typo
    does not cost the run; the folder itself is made only when the first file is written.
    """
    out = Path(path)
    probe = out
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        where = "is a file" if probe == out else f"is under {probe}, which is a file"
        raise ValueError(f"{option} {out}: {where}; name a folder")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        raise PermissionError(f"{option} {out}: {probe} is not writable; choose another folder")
    return out


def require(module: str, extra: str) -> Any:
    """Import ``module`` or raise an ImportError saying which foldattn extra installs it.

    The library needs only torch, torchvision, numpy and safetensors; the apps' packages
    (matplotlib, tqdm, scikit-learn, timm, onnx, ...) come with extras.
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        package = _PIP_NAMES.get(module, module.split(".")[0])  # executorch.exir: pip install executorch
        raise ImportError(
            f"this needs {package}, which foldattn's library does not install: pip install 'foldattn[{extra}]' "
            f"(or pip install {package})"
        ) from None


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def strict_json(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` that writes valid JSON only: NaN and Inf become ``null`` (Python's default
    would write ``NaN``, which JSON parsers other than Python's reject)."""
    return json.dumps(_finite(obj), allow_nan=False, **kwargs)


def write_json(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 1, **kwargs: Any) -> Path:
    """``obj`` as strict JSON (:func:`strict_json`) at ``path``, atomically: every JSON file foldattn writes."""
    dest = Path(path)
    with atomic_path(dest) as tmp:
        tmp.write_text(strict_json(obj, indent=indent, **kwargs) + "\n")
    return dest


def make_output_folder(path: str | os.PathLike[str], option: str = "--output") -> Path:
    """Create the output folder ``path`` (and its parents), or fail in one line naming ``option`` and why.

    With :func:`check_output_folder` (which checks without creating, before long work) the one helper
    for output folders: commands check first and create when they write."""
    out = check_output_folder(path, option)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"{option} {out}: cannot write there ({e.strerror or e}); choose another folder") \
            from None
    return out


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty), for one-line errors."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def check_external_name(source: str, name: str) -> None:
    """``ValueError`` unless ``name`` is a model of ``source`` (``"timm"`` or ``"torchvision"``).

    The message offers the closest names. For timm a ``.tag`` suffix (pretrained weights) is
    allowed and checked by timm itself.
    """
    import difflib

    if source == "timm":
        known, base, listing = require("timm", "timm").list_models(), name.split(".")[0], "timm.list_models()"
    elif source == "torchvision":
        import torchvision

        known, base, listing = torchvision.models.list_models(), name, "torchvision.models.list_models()"
    else:
        raise ValueError(f"unknown model source {source!r}; use timm:NAME or torchvision:NAME")
    if base not in known:
        close = difflib.get_close_matches(name, known, n=3)
        raise ValueError(f"unknown model {source}:{name}"
                         + (f"; did you mean {', '.join(close)}?" if close else f"; see {listing}"))
