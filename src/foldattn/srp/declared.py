"""Re-parameterization that a model's own modules declare (the protocol of timm's ``reparameterize_model``).

Many re-parameterizable models ship the conversion to their deploy form as methods of their
blocks: ``fuse()`` returns a replacement module (timm's ``ConvNorm``, RepViT, LeViT),
``reparameterize()`` or ``switch_to_deploy()`` convert a block in place (timm's RepVGG,
MobileOne, FastViT, RepGhost; the RepVGG/DBB/MobileOne reference code). :func:`reparameterize_declared`
applies whichever a module declares, parent before children, as timm does; foldattn's own
:class:`~foldattn.srp.RepBlock` declares ``fuse()`` too.
"""

from __future__ import annotations

from torch import nn

__all__ = ["reparameterize_declared", "DECLARED_METHODS"]

#: the methods, in the order they are looked for
DECLARED_METHODS = ("fuse", "reparameterize", "switch_to_deploy")


def _declared(module: nn.Module) -> str | None:
    for name in DECLARED_METHODS:
        if callable(getattr(module, name, None)):
            return name
    return None


def reparameterize_declared(model: nn.Module) -> tuple[nn.Module, list[tuple[str, str]]]:
    """Apply every module's declared re-parameterization, in place; returns ``(model, [(name, method)])``.

    ``fuse()`` must return the module that replaces it; ``reparameterize()`` and ``switch_to_deploy()``
    change the module itself. A replaced module is not descended into (it is already its deploy form).
    """
    done: list[tuple[str, str]] = []
    method = _declared(model)
    if method == "fuse":
        new = model.fuse()  # type: ignore[operator]
        if not isinstance(new, nn.Module):
            raise TypeError(f"{type(model).__name__}.fuse() returned a {type(new).__name__}, not a module")
        return new, [("", method)]
    if method is not None:
        getattr(model, method)()
        done.append(("", method))
    _walk(model, "", done)
    return model, done


def _walk(parent: nn.Module, prefix: str, done: list[tuple[str, str]]) -> None:
    for name, child in list(parent.named_children()):
        path = f"{prefix}{name}"
        method = _declared(child)
        if method == "fuse":
            new = child.fuse()  # type: ignore[operator]
            if not isinstance(new, nn.Module):
                raise TypeError(f"{path} ({type(child).__name__}).fuse() returned a {type(new).__name__}, not a module")
            setattr(parent, name, new)
            done.append((path, method))
            continue
        if method is not None:
            getattr(child, method)()
            done.append((path, method))
        _walk(child, f"{path}.", done)
