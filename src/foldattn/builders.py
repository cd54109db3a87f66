"""What a deployed file may name to rebuild its model: an exact allowlist of constructors.

A deployed file (:mod:`foldattn.deploy`) is data. Its metadata may say *which* model to
build, never *how*: the builder is one of

- ``"foldattn.models:NAME"``: a model registered in :func:`foldattn.list_models`;
- ``"torchvision.models:NAME"``: a name in ``torchvision.models.list_models()``, built by
  ``torchvision.models.get_model(NAME, weights=None)`` (no weights, no download);
- ``"timm:NAME"``: a name in ``timm.list_models()``, built by
  ``timm.create_model(NAME, pretrained=False)``;
- a spec the program itself registered with :func:`register_builder` (code, not data).

Its keyword arguments are plain JSON values (numbers, booleans, null, short identifier-like
strings, flat lists of those) whose names the constructor's signature declares. Arguments
that fetch or open something (``weights``, ``pretrained``, ``checkpoint_path``, ...) are
refused. Nothing is imported by name, no function outside the allowlist can be reached,
no path is followed and nothing is downloaded or written.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from torch import nn

from ._registry import Registry
from ._utils import check_external_name, require

__all__ = ["register_builder", "unregister_builder", "list_builders", "resolve_builder", "builder_spec",
           "check_kwargs", "UntrustedBuilderError", "model_by_name"]

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,99}")
#: strings a file may pass: identifier-like words (an activation, a pooling type, an attention
#: name); no path separators, dots, colons or spaces, so no path or URL can be spelled
_SAFE_STR = re.compile(r"[A-Za-z0-9_\-]{0,64}")
_MAX_KWARGS = 32
_MAX_LIST = 64
_MAX_INT = 1 << 24
#: keyword arguments that load, fetch or write, or choose the device or dtype (a model built on ``meta`` would
#: load no weights), whatever the constructor: never from a file
_FORBIDDEN = frozenset({
    "weights", "weights_backbone", "progress", "pretrained", "pretrained_backbone", "pretrained_cfg",
    "pretrained_cfg_overlay", "pretrained_strict", "checkpoint_path", "cache_dir", "model_cfg", "feature_cfg",
    "kwargs_filter", "pretrained_filter_fn", "features_only", "scriptable", "exportable", "no_jit", "file",
    "url", "hf_hub_id", "path", "device", "dtype", "device_map", "torch_dtype",
})


class UntrustedBuilderError(ValueError):
    """A deployed file names a builder or keyword arguments outside the allowlist."""


@dataclass(frozen=True)
class Builder:
    """A resolved, allowlisted constructor: ``build(**kwargs)`` with ``kwargs`` checked first."""

    spec: str
    fn: Callable[..., nn.Module]
    allowed: frozenset[str]
    fixed: Mapping[str, Any] = field(default_factory=dict)

    def build(self, kwargs: Mapping[str, Any]) -> nn.Module:
        return self.fn(**{**check_kwargs(self, kwargs), **self.fixed})


_REGISTERED: Registry[Callable[..., nn.Module]] = Registry("registered builder", case_sensitive=True)


def register_builder(spec: str, fn: Callable[..., nn.Module]) -> None:
    """Let deployed files name ``spec`` (e.g. ``"mypackage:MyNet"``) to be rebuilt by ``fn``.

    This is code choosing to trust ``fn``: a file can only name ``spec``, and pass it the
    keyword arguments ``fn`` declares by name (plain JSON values). Register before
    :func:`foldattn.load_deployed` reads such a file.
    """
    if not isinstance(spec, str) or not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", spec):
        raise ValueError(f"spec must look like 'package.module:Name', got {spec!r}")
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    if spec.split(":")[0] in ("foldattn.models", "torchvision.models", "timm"):
        raise ValueError(f"{spec!r} is one of the built-in families; register under your own package name")
    if spec in _REGISTERED:
        _REGISTERED.unregister(spec)  # registering again replaces (a program's own choice)
    _REGISTERED.register(spec, fn)


def list_builders() -> list[str]:
    """The specs programs registered with :func:`register_builder` (the built-in families are not listed)."""
    return _REGISTERED.names()


def unregister_builder(spec: str) -> None:
    """Undo :func:`register_builder` (a no-op for a spec that is not registered)."""
    if spec in _REGISTERED:
        _REGISTERED.unregister(spec)


def _init_params(obj: Any) -> tuple[set[str], bool]:
    """Named keyword parameters of a function (or a class's ``__init__``), and whether it takes ``**kwargs``."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return set(), False
    named = {p.name for p in sig.parameters.values()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"}
    return named, any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())


def _returned_class(fn: Callable[..., Any]) -> type[Any] | None:
    try:
        ann = inspect.signature(fn, eval_str=True).return_annotation
    except Exception:  # an annotation that does not evaluate: no class to check against
        return None
    return ann if isinstance(ann, type) else None


def _keywords(fn: Callable[..., Any], extra: set[str] = frozenset()) -> frozenset[str]:  # type: ignore[assignment]
    """What a file may pass to ``fn``: its named parameters, and, where it forwards ``**kwargs`` to
    the class it returns, that class's named ``__init__`` parameters."""
    names, var = _init_params(fn)
    cls = _returned_class(fn)
    if var and cls is not None:
        names |= _init_params(cls.__init__)[0]
    return frozenset((names | set(extra)) - _FORBIDDEN)


def _foldattn(name: str, spec: str) -> Builder:
    from .attention import get as attention_class
    from .attention import names as attention_names
    from .models import create_model, get_builder

    def create(**kwargs: Any) -> nn.Module:  # through create_model, so the model records its builder again
        return create_model(name, **kwargs)

    # attention keyword arguments (reduction=8, ...) pass through to this package's own modules
    extra = set().union(*(_init_params(attention_class(a).__init__)[0] for a in attention_names()))
    return Builder(spec, create, _keywords(get_builder(name), extra - {"channels", "previous"}))


def _torchvision(name: str, spec: str) -> Builder:
    import torchvision

    fn = torchvision.models.get_model_builder(name)
    fixed = {"weights": None}
    if "weights_backbone" in inspect.signature(fn).parameters:
        fixed["weights_backbone"] = None
    return Builder(spec, fn, _keywords(fn), fixed)


def _timm(name: str, spec: str) -> Builder:
    timm = require("timm", "timm")
    from timm.models import get_arch_name, model_entrypoint

    entry = model_entrypoint(get_arch_name(name))

    def create(**kwargs: Any) -> nn.Module:
        return timm.create_model(name, **kwargs)

    return Builder(spec, create, _keywords(entry), {"pretrained": False})


def _allowed_specs() -> str:
    return ("'foldattn.models:NAME' (foldattn.list_models()), 'torchvision.models:NAME' "
            "(torchvision.models.list_models()), 'timm:NAME' (timm.list_models())"
            + (f", or one registered with foldattn.deploy.register_builder ({', '.join(_REGISTERED.names())})"
               if _REGISTERED else ", or one registered with foldattn.deploy.register_builder"))


def resolve_builder(spec: Any) -> Builder:
    """The allowlisted constructor a builder spec names; :class:`UntrustedBuilderError` otherwise."""
    if not isinstance(spec, str) or len(spec) > 200 or spec.count(":") != 1:
        raise UntrustedBuilderError(f"builder {str(spec)[:80]!r} is not a spec such as 'torchvision.models:resnet18'; "
                                    f"allowed: {_allowed_specs()}")
    if spec in _REGISTERED:
        fn = _REGISTERED.get(spec)
        return Builder(spec, fn, _keywords(fn if not isinstance(fn, type) else cast("type[Any]", fn).__init__))
    family, name = spec.split(":")
    refusal = UntrustedBuilderError(f"builder {spec!r} is not allowed: a deployed file may only name "
                                    f"{_allowed_specs()}")
    if not _NAME.fullmatch(name):
        raise refusal
    if family == "foldattn.models" or family.startswith("foldattn.models."):
        from .models import get_builder, list_models

        # the legacy spelling 'foldattn.models.cifar_resnet:cifar_resnet20' is the same exact entry
        if name in list_models() and family in ("foldattn.models", get_builder(name).__module__):
            return _foldattn(name, spec)
        raise refusal
    if family == "torchvision.models":
        import torchvision

        if name in torchvision.models.list_models():
            return _torchvision(name, spec)
        raise refusal
    if family == "timm":
        try:
            import timm
        except ImportError:
            raise UntrustedBuilderError(f"builder {spec!r} needs timm: pip install 'foldattn[timm]'") from None
        if name in timm.list_models():
            return _timm(name, spec)
        raise refusal
    raise refusal


def builder_spec(builder: str | Callable[..., nn.Module]) -> str:
    """The spec for a builder given by spec or by function (a foldattn, torchvision or timm
    builder, or one registered with :func:`register_builder`)."""
    if isinstance(builder, str):
        resolve_builder(builder)
        return builder
    if not callable(builder):
        raise TypeError(f"builder must be a spec such as 'torchvision.models:resnet18' or a function, "
                        f"got {type(builder).__name__}")
    from .models import get_builder, list_models

    name = getattr(builder, "__name__", "")
    if name in list_models() and get_builder(name) is builder:
        return f"foldattn.models:{name}"
    for spec, fn in _REGISTERED.items():
        if fn is builder:
            return spec
    module = getattr(builder, "__module__", "") or ""
    if module.startswith("torchvision.models"):
        import torchvision

        if name in torchvision.models.list_models() and torchvision.models.get_model_builder(name) is builder:
            return f"torchvision.models:{name}"
    if module.startswith("timm."):
        import timm
        from timm.models import model_entrypoint

        if name in timm.list_models() and model_entrypoint(name) is builder:
            return f"timm:{name}"
    raise UntrustedBuilderError(
        f"{module}:{name} is not an allowlisted builder; use a foldattn, torchvision or timm builder, "
        "or register yours with foldattn.deploy.register_builder('mypackage:Name', fn)"
    )


def _check_value(key: str, value: Any, spec: str, depth: int = 0) -> Any:
    bad = f"builder {spec!r}: keyword argument {key}={str(value)[:60]!r} is not allowed in a file"
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        if abs(value) > _MAX_INT:
            raise UntrustedBuilderError(f"{bad} (integers are limited to +-{_MAX_INT})")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise UntrustedBuilderError(f"{bad} (numbers must be finite)")
        return value
    if isinstance(value, str):
        if not _SAFE_STR.fullmatch(value):
            raise UntrustedBuilderError(f"{bad} (strings are at most 64 letters, digits, '_' or '-': no paths or URLs)")
        return value
    if isinstance(value, (list, tuple)) and depth == 0:
        if len(value) > _MAX_LIST:
            raise UntrustedBuilderError(f"{bad} (lists hold at most {_MAX_LIST} values)")
        return [_check_value(key, v, spec, depth + 1) for v in value]
    raise UntrustedBuilderError(f"{bad} (values are numbers, booleans, null, short words or a flat list of them; "
                                f"got a {type(value).__name__})")


def check_kwargs(builder: Builder, kwargs: Any) -> dict[str, Any]:
    """``kwargs`` if every name is a parameter of the builder and every value plain JSON; else
    :class:`UntrustedBuilderError` naming the argument and what is allowed."""
    if kwargs is None:
        return {}
    if not isinstance(kwargs, Mapping):
        raise UntrustedBuilderError(f"builder {builder.spec!r}: kwargs must be an object, got {type(kwargs).__name__}")
    if len(kwargs) > _MAX_KWARGS:
        raise UntrustedBuilderError(f"builder {builder.spec!r}: {len(kwargs)} keyword arguments "
                                    f"(at most {_MAX_KWARGS})")
    out = {}
    for key, value in kwargs.items():
        if not isinstance(key, str) or not _NAME.fullmatch(key) or key in _FORBIDDEN or key not in builder.allowed:
            why = ("it loads or fetches weights" if key in _FORBIDDEN
                   else "it is not a parameter of the constructor")
            shown = ", ".join(sorted(builder.allowed)[:40]) or "none"
            raise UntrustedBuilderError(f"builder {builder.spec!r}: keyword argument {str(key)[:60]!r} is refused "
                                        f"({why}); allowed: {shown}")
        out[key] = _check_value(key, value, builder.spec)
    return out


def model_by_name(name: str, num_classes: int, *, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """A randomly initialised model: a foldattn model name, ``torchvision:NAME`` or ``timm:NAME`` (built
    with ``weights=None`` / ``pretrained=False``; ``kwargs`` are the constructor's options)."""
    kwargs = dict(kwargs or {})
    source, sep, arch = name.partition(":")
    if not sep:
        from .models import create_model, get_builder

        get_builder(name)  # an unknown name fails here, listing the valid ones
        return create_model(name, num_classes=num_classes, **kwargs)
    check_external_name(source, arch)
    if source == "torchvision":
        import torchvision

        try:
            return torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
        except (TypeError, ValueError) as e:
            raise ValueError(f"torchvision:{arch} refused its arguments {sorted(kwargs)}: {e}") from None
    timm = require("timm", "timm")
    try:
        return timm.create_model(arch, pretrained=False, num_classes=num_classes, **kwargs)
    except (TypeError, RuntimeError) as e:
        raise ValueError(f"timm:{arch} refused its arguments {sorted(kwargs)}: {e}") from None
