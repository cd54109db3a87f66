"""Save and load deployed (folded) models: safetensors weights plus JSON metadata.

A deployed file is one ``.safetensors`` file. Its header carries, under the key
``"foldattn"``, a JSON document: the format version, the foldattn and torch versions,
the ``folded`` flag, which model to rebuild (``"builder"``: an allowlisted spec such as
``"torchvision.models:resnet18"``, with JSON ``"kwargs"``), a SHA-256 checksum of the
tensors and the names of tied tensors. Models built by :func:`foldattn.create_model` name
their builder themselves; for others (torchvision, timm, your own) pass ``builder=``, or
the file loads only into a ``model=``.

What :func:`load_deployed` trusts: the file is data. It may name a constructor from the
exact allowlist of :mod:`foldattn.builders` (this package's models, torchvision's and
timm's model names, built without pretrained weights, and specs the program registered
with :func:`register_builder`), with plain JSON keyword arguments that the constructor
declares. Nothing is imported by name, evaluated, unpickled, downloaded or written, and
no path in the file is followed. The architecture is first built on the ``meta`` device
and compared with the file's tensors, so a file cannot make it allocate more than it holds.
The embedded checksum detects corruption, not tampering: anyone who can edit the file
can recompute it. To detect tampering, publish :func:`file_sha256` of the file through a
channel you trust and pass it as ``load_deployed(path, sha256=...)``.

Neither function accepts weights that cannot compute anything: :func:`save_deployed` refuses NaN/Inf
in the metadata (JSON cannot hold them) and, like :func:`load_deployed`, NaN/Inf in a tensor and
impossible statistics (a negative ``running_var`` or ``num_batches_tracked``), unless
``allow_nonfinite=True``, so a file that is saved can be loaded.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ._budget import BudgetExceeded, DoesNotFit, build_for, match_float_dtype, state_mismatch
from ._files import MAX_DEPTH, check_depth, load_json_file, load_json_text
from ._utils import atomic_path, unwrap_model, write_json
from ._version import __version__
from .builders import (
    UntrustedBuilderError,
    builder_spec,
    check_kwargs,
    register_builder,
    resolve_builder,
    unregister_builder,
)
from .fold import asr_layers, fold, has_foldable

__all__ = [
    "save_deployed", "load_deployed", "read_metadata", "metadata_path", "file_sha256",
    "register_builder", "unregister_builder",
    "DeployedFileError", "ArchitectureMismatchError", "InvalidWeightsError", "UntrustedBuilderError", "FORMAT_VERSION",
]

FORMAT = "foldattn.deployed"
FORMAT_VERSION = 1
_META_KEY = "foldattn"
#: the largest metadata document read (the header of a real file is a few kB)
_MAX_META_BYTES = 1 << 20


class DeployedFileError(ValueError):
    """The file is not a readable foldattn deployed file (truncated, corrupted, foreign)."""


class ArchitectureMismatchError(ValueError):
    """The deployed weights do not fit the model they are loaded into."""


class InvalidWeightsError(ValueError):
    """Tensors with NaN/Inf or impossible statistics (a negative variance or batch count)."""


#: buffers that hold statistics which cannot be negative (BatchNorm and InstanceNorm, torch's and timm's)
_NON_NEGATIVE = {"running_var": "a variance", "num_batches_tracked": "a count of batches"}


def _invalid_tensors(tensors: Mapping[str, Tensor], skip: Any = ()) -> list[str]:
    """``"name: what is wrong"`` for every tensor with NaN/Inf or an impossible statistic."""
    found = []
    for name, t in tensors.items():
        if name in skip:
            continue
        what = []
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            for label, mask in (("NaN", torch.isnan(t)), ("+Inf", torch.isposinf(t.real)),
                                ("-Inf", torch.isneginf(t.real))):
                if int(mask.sum()):
                    what.append(f"{int(mask.sum())} {label}")
        stat = _NON_NEGATIVE.get(name.rpartition(".")[2])
        if stat is not None and not t.is_complex() and int((t < 0).sum()):
            what.append(f"{int((t < 0).sum())} negative value(s), impossible for {stat}")
        if what:
            found.append(f"{name}: {', '.join(what)}")
    return found


def _listed(found: list[str]) -> str:
    more = f" (and {len(found) - 4} more)" if len(found) > 4 else ""
    return "; ".join(found[:4]) + more


def _nonfinite_in(obj: Any, where: str, _open: frozenset[int] = frozenset()) -> str | None:
    """The first place in a JSON-like value that holds NaN or Inf (``where`` names the value), or None."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return f"{where} is {obj}"
    if id(obj) in _open:  # a container inside itself: json.dumps reports the cycle
        return None
    items = obj.items() if isinstance(obj, Mapping) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for key, value in items:
        found = _nonfinite_in(value, f"{where}[{key!r}]", _open | {id(obj)})
        if found:
            return found
    return None


def _checksum(tensors: Mapping[str, Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()


def _split_aliases(state: Mapping[str, Any]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Own copies of the tensors, each tied tensor once; ``aliases`` maps the others to it."""
    tensors: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[Any, ...], str] = {}
    for name, value in state.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"state_dict entry {name!r} is a {type(value).__name__}, not a tensor; "
                            "safetensors stores tensors only")
        key = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), value.stride(),
               value.dtype, value.device)
        if value.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = value.detach().to("cpu", copy=True).contiguous()
    return tensors, aliases


def _recorded_builder(model: nn.Module, tensors: Mapping[str, Tensor]) -> tuple[str, dict[str, Any]] | None:
    """``(spec, kwargs)`` that :func:`foldattn.create_model` recorded on ``model``, if they build
    the architecture of ``tensors``; otherwise (e.g. after ``fold(fuse_bn=True)`` or a calibration
    that kept modules) None, and the file is saved without a builder, as for any model."""
    from .models import list_models
    from .models._registry import BUILDER_ATTR

    record = getattr(model, BUILDER_ATTR, None)
    if not isinstance(record, Mapping) or record.get("name") not in list_models():
        return None
    spec = f"foldattn.models:{record['name']}"
    try:
        kwargs = json.loads(json.dumps(dict(record.get("kwargs") or {})))  # what load_deployed will pass
        rebuilt = _build({"builder": spec, "kwargs": kwargs}, tensors)
    except (TypeError, ValueError):  # not JSON, or kwargs a file may not carry
        return None
    return None if state_mismatch(rebuilt, tensors) else (spec, kwargs)


def save_deployed(
    model: nn.Module,
    path: str | os.PathLike[str],
    builder: str | Callable[..., nn.Module] | None = None,
    kwargs: Mapping[str, Any] | None = None,
    *,
    metadata: Mapping[str, Any] | None = None,
    check_builder: bool = True,
    fuse_bn: bool = False,
    allow_nonfinite: bool = False,
) -> Path:
    """Write the deployed form of ``model`` to ``path`` (safetensors + JSON metadata).

    The metadata is stored in the safetensors header (what :func:`load_deployed` reads)
    and, for people and tools, as a JSON file beside it (:func:`metadata_path`).

    ASR layers (Zhong et al., arXiv 2304.06345) and re-parameterization blocks are folded
    first (:func:`foldattn.fold`, on a copy); wrappers (DataParallel/DDP ``module.``,
    ``torch.compile`` ``_orig_mod.``) are removed, so the file holds the plain backbone's
    ``state_dict``. The write is atomic.

    Args:
        model: the trained model (with or without ASR layers).
        path: the output file (its folder must exist).
        builder: which allowlisted constructor rebuilds the plain architecture:
            ``"foldattn.models:NAME"``, ``"torchvision.models:NAME"``, ``"timm:NAME"`` (see
            :mod:`foldattn.builders`), or the function itself. By default, the builder :func:`foldattn.create_model`
            recorded on the model (``foldattn.models:NAME`` and its deploy-time kwargs) when it
            builds the deployed tree; otherwise none, and loading needs ``model=``.
        kwargs: keyword arguments for the builder: parameters it declares, with plain JSON
            values (numbers, booleans, null, short words, flat lists).
        metadata: extra JSON-serialisable information stored under ``"user"``.
        check_builder: build ``builder(**kwargs)`` now and check the weights fit it, so a
            file that cannot be loaded is never written (a recorded builder is always checked).
        fuse_bn: fold with ``fuse_bn=True`` (norms fused into the convs); such a file no longer
            fits the plain builder, so load it with ``load_deployed(path, model=...)``.
        allow_nonfinite: write weights with NaN/Inf or impossible statistics (a negative
            ``running_var`` or ``num_batches_tracked``) all the same; by default they are refused,
            since :func:`load_deployed` refuses them too (it needs ``allow_nonfinite=True`` as well).
            NaN/Inf in ``kwargs`` or ``metadata`` are always refused: JSON cannot hold them.

    Returns:
        The path written.

    Raises:
        ValueError: NaN/Inf in ``kwargs`` or ``metadata`` (the place is named).
        InvalidWeightsError: NaN/Inf or impossible statistics in the weights (the tensors are named).

    Nothing is written when it raises.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"save_deployed expects an nn.Module, got {type(model).__name__}")
    if not isinstance(allow_nonfinite, bool):
        raise TypeError(f"save_deployed: allow_nonfinite must be True or False, got {allow_nonfinite!r}")
    for value, label in ((kwargs, "kwargs"), (metadata, "metadata")):
        # nesting first (iteratively): load_deployed reads at most MAX_DEPTH levels, and the walk below recurses
        try:
            check_depth(value, label, MAX_DEPTH - 2)
        except ValueError:
            raise ValueError(f"save_deployed: {label} is nested more than {MAX_DEPTH - 2} levels deep (or holds "
                             f"itself), past what load_deployed reads; flatten it (nothing was written)") from None
        bad = _nonfinite_in(value, label) if value is not None else None
        if bad:  # JSON has no NaN/Inf: a header holding one is a file load_deployed calls corrupted
            raise ValueError(f"save_deployed: {bad}, which JSON cannot hold; store null or a string there "
                             "(nothing was written)")
    model = unwrap_model(model)
    n_asr = len(asr_layers(model))
    if fuse_bn:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the norms left (if any) are the caller's to report
            deployed = fold(model, fuse_bn=True)
    else:
        deployed = fold(model) if has_foldable(model) else model
    state = deployed.state_dict()
    meta: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "foldattn_version": _version(),
        "torch_version": torch.__version__.split("+")[0],
        "folded": True,
        "fuse_bn": bool(fuse_bn),
        "asr_layers_folded": n_asr,
        "class": f"{type(deployed).__module__}.{type(deployed).__qualname__}",
        "builder": None,
        "kwargs": {},
    }
    if kwargs is not None and builder is None:
        raise ValueError("kwargs= only makes sense with builder=")
    if builder is not None:
        meta["builder"] = builder_spec(builder)
        meta["kwargs"] = dict(kwargs or {})
    if metadata is not None:
        meta["user"] = dict(metadata)
    tensors, aliases = _split_aliases(state)
    invalid = _invalid_tensors(tensors)
    if invalid and not allow_nonfinite:
        raise InvalidWeightsError(f"save_deployed: {len(invalid)} tensor(s) cannot be valid weights: "
                                  f"{_listed(invalid)}; nothing was written (fix the model, or pass "
                                  "allow_nonfinite=True)")
    if builder is None:
        recorded = _recorded_builder(model, state)  # the full state: aliases included
        if recorded is not None:
            meta["builder"], meta["kwargs"] = recorded
    meta["aliases"] = aliases
    meta["checksum"] = _checksum(tensors)
    try:
        header = json.dumps(meta, sort_keys=True, allow_nan=False)  # never NaN: load_deployed would refuse it
    except TypeError as e:
        raise TypeError(f"kwargs and metadata must be JSON-serialisable: {e}") from None
    except ValueError as e:  # a cycle (NaN/Inf were refused above)
        raise ValueError(f"save_deployed: kwargs and metadata cannot be written as JSON ({e}); nothing was "
                         "written") from None
    if len(header) > _MAX_META_BYTES:  # load_deployed reads at most that much metadata
        raise ValueError(f"save_deployed: the metadata takes {len(header):,} bytes as JSON, more than the "
                         f"{_MAX_META_BYTES:,} load_deployed reads; store large records beside the file (nothing was "
                         "written)")
    if builder is not None:  # a file that load_deployed would refuse is never written
        check_kwargs(resolve_builder(meta["builder"]), meta["kwargs"])
    if builder is not None and check_builder:
        full = {**tensors, **{a: tensors[t] for a, t in aliases.items()}}
        try:
            rebuilt = _build(meta, full)
            problem = state_mismatch(rebuilt, full)
        except ArchitectureMismatchError as e:
            problem = str(e)
        if problem:
            raise ArchitectureMismatchError(
                f"{meta['builder']}(**{meta['kwargs']}) does not build this model's architecture ({problem}); "
                "fix builder/kwargs, or pass check_builder=False"
            )
    from safetensors.torch import save_file

    dest = Path(path)
    if dest.suffix == ".json":
        raise ValueError(f"{dest}: the weights file needs another suffix (e.g. .safetensors); .json is the metadata's")
    with atomic_path(dest) as tmp:
        save_file(tensors, str(tmp), metadata={_META_KEY: header})
        digest = file_sha256(tmp)
    # a readable copy of the metadata beside the weights, bound to them by the weights file's hash: a pair
    # that was not written together (a kill between the two renames, two writers) is refused on load; the
    # header stays authoritative
    write_json(metadata_path(dest), {**meta, "file_sha256": digest}, indent=2, sort_keys=True)
    return dest


def metadata_path(path: str | os.PathLike[str]) -> Path:
    """Where :func:`save_deployed` writes the JSON copy of a deployed file's metadata."""
    return Path(path).with_suffix(".json")


def _version() -> str:
    return __version__


def _legacy(spec: Any, kwargs: Any) -> tuple[Any, Any]:
    """Files of foldattn 0.1 named timm models as ``timm:create_model`` with ``model_name=``."""
    if spec == "timm:create_model" and isinstance(kwargs, dict) and isinstance(kwargs.get("model_name"), str):
        kwargs = dict(kwargs)
        name = kwargs.pop("model_name")
        if kwargs.pop("pretrained", False) is not False:
            raise UntrustedBuilderError("builder 'timm:create_model' with pretrained weights is refused")
        return f"timm:{name}", kwargs
    return spec, kwargs


def _build(meta: Mapping[str, Any], tensors: Mapping[str, Tensor] | None = None) -> nn.Module:
    """The model the file's builder names (allowlisted, kwargs checked); with ``tensors``, the
    architecture is built on the meta device first and must fit them before any real allocation."""
    spec, kwargs = _legacy(meta.get("builder"), meta.get("kwargs") or {})
    builder = resolve_builder(spec)
    check_kwargs(builder, kwargs)
    what = f"{spec}(**{kwargs})"
    try:
        # with the file's tensors: sized on the meta device and bounded by them before any real memory
        model = builder.build(kwargs) if tensors is None else build_for(lambda: builder.build(kwargs), tensors, what)
    except UntrustedBuilderError:
        raise
    except (BudgetExceeded, DoesNotFit) as e:
        raise ArchitectureMismatchError(str(e)) from None
    except Exception as e:
        raise ValueError(f"{what} failed: {type(e).__name__}: {e}") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"{what} returned a {type(model).__name__}, not an nn.Module")
    return match_float_dtype(model, tensors) if tensors is not None else model


def _read(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no deployed file at {p}")
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise DeployedFileError(
            f"{p} is not a readable safetensors file: it is truncated or corrupted ({e}); save it again"
        ) from None
    if _META_KEY not in header:
        raise DeployedFileError(f"{p} is a safetensors file without foldattn metadata; write it with save_deployed")
    if len(header[_META_KEY]) > _MAX_META_BYTES:
        raise DeployedFileError(f"{p}: the foldattn metadata is {len(header[_META_KEY]):,} bytes (at most "
                                f"{_MAX_META_BYTES:,}); this is not a file save_deployed wrote")
    try:
        meta = load_json_text(header[_META_KEY], f"{p}: the foldattn metadata")
    except ValueError as e:
        raise DeployedFileError(f"{e}; the file is corrupted") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DeployedFileError(f"{p}: unknown format {meta.get('format') if isinstance(meta, dict) else meta!r}")
    if not isinstance(meta.get("format_version"), int) or meta["format_version"] > FORMAT_VERSION:
        raise DeployedFileError(
            f"{p} has format version {meta.get('format_version')!r}; this foldattn ({_version()}) reads up to "
            f"{FORMAT_VERSION}: upgrade foldattn"
        )
    if meta.get("checksum") != _checksum(tensors):
        raise DeployedFileError(f"{p}: the tensors do not match their checksum; the file is corrupted, save it again")
    _check_sidecar(p)
    aliases = meta.get("aliases") or {}
    if not isinstance(aliases, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()):
        raise DeployedFileError(f"{p}: 'aliases' must map tensor names to tensor names; the file is corrupted")
    for alias, target in aliases.items():
        if alias in tensors or target not in tensors:
            raise DeployedFileError(f"{p}: tied tensor {alias!r} points at missing {target!r}; the file is corrupted")
        tensors[alias] = tensors[target]
    return meta, tensors


def _check_sidecar(path: Path) -> None:
    """Refuse a weights file whose JSON copy beside it was written for another file."""
    side = metadata_path(path)
    if not side.is_file():
        return
    try:
        recorded = load_json_file(side, "deployed metadata", _MAX_META_BYTES).get("file_sha256")
    except (ValueError, AttributeError):
        raise DeployedFileError(f"{side}: not the JSON copy save_deployed writes beside {path.name}; delete it or "
                                "save the model again") from None
    if recorded is not None and recorded != file_sha256(path):
        raise DeployedFileError(
            f"{side} describes another weights file than {path} (the two were not written together: an "
            "interrupted save, or two saves into one place); save the model again, or delete the JSON copy to "
            "use the weights alone"
        )


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON metadata of a deployed file (validated, checksum included)."""
    return _read(path)[0]


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The SHA-256 of a whole file, ``"sha256:<hex>"``: publish it beside a deployed file so users can
    pass it to :func:`load_deployed` (``sha256=``) and detect tampering, which the embedded checksum cannot."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def load_deployed(path: str | os.PathLike[str], model: nn.Module | None = None, *,
                  sha256: str | None = None, allow_nonfinite: bool = False) -> nn.Module:
    """Rebuild (or fill ``model``) from a file written by :func:`save_deployed`.

    Args:
        path: the deployed ``.safetensors`` file.
        model: a fresh instance of the plain architecture to load into; by default the
            model is rebuilt from the file's ``builder``, which must be on the exact
            allowlist of :mod:`foldattn.builders` (see the module docstring for what is
            trusted).
        sha256: the expected :func:`file_sha256` of the file, obtained from a source you trust;
            the file is refused before it is parsed if it differs.
        allow_nonfinite: load tensors with NaN/Inf and impossible statistics (a negative
            ``running_var`` or ``num_batches_tracked``) all the same; by default the file is refused,
            naming the tensors, before any weight is copied (the ``model=`` you pass is left as it was).

    Returns:
        The model with the weights loaded strictly, in eval mode.

    Raises:
        DeployedFileError: truncated, corrupted or foreign file.
        ArchitectureMismatchError: the weights do not fit (missing/unexpected keys, shapes).
        UntrustedBuilderError: the file names a builder or keyword arguments outside the allowlist.
        InvalidWeightsError: NaN/Inf or impossible statistics (unless ``allow_nonfinite``).
    """
    if not isinstance(allow_nonfinite, bool):
        raise TypeError(f"load_deployed: allow_nonfinite must be True or False, got {allow_nonfinite!r}")
    if sha256 is not None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"no deployed file at {path}")
        actual = file_sha256(path)
        expected = sha256 if sha256.startswith("sha256:") else "sha256:" + sha256
        if actual != expected.lower():
            raise DeployedFileError(f"{path}: SHA-256 {actual} differs from the expected {expected}; the file was "
                                    "changed since that hash was published, do not load it")
    meta, tensors = _read(path)
    if meta.get("folded") is not True:
        raise DeployedFileError(f"{path} holds an unfolded model; deployed files hold folded weights")
    if model is None:
        if not meta.get("builder"):
            raise ValueError(
                f"{path} does not say how to rebuild its model: it was saved without builder= (only models from "
                f"foldattn.create_model record one themselves); pass model=<a fresh {meta.get('class', 'instance')}>, "
                "or save it again naming the builder, e.g. save_deployed(model, path, "
                'builder="torchvision.models:resnet18", kwargs={"num_classes": 10})'
            )
        target = _build(meta, tensors)
    else:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        target = unwrap_model(model)
        if asr_layers(target):
            raise ArchitectureMismatchError(
                "the model has ASR layers, but a deployed file holds the folded weights of the plain architecture; "
                "load into a model built without ASR"
            )
    problem = state_mismatch(target, tensors)
    if problem:
        built = meta.get("builder") or meta.get("class")
        raise ArchitectureMismatchError(
            f"{path} was saved from another architecture ({built}) than {type(target).__name__}: {problem}"
        )
    # after the architecture checks (a file of another architecture says that first), before any weight is copied
    invalid = [] if allow_nonfinite else _invalid_tensors(tensors, skip=meta.get("aliases") or {})
    if invalid:
        raise InvalidWeightsError(f"{path}: {len(invalid)} tensor(s) cannot be valid weights: {_listed(invalid)}; "
                                  "do not deploy it (or pass allow_nonfinite=True to load it anyway)")
    target.load_state_dict(tensors, strict=True)
    return target.eval()
