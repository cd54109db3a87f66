"""The one list of other libraries' channel-attention modules foldattn knows (by qualified class name).

Every entry is an attention module a model may already have: :func:`foldattn.attach` never hosts ASR on
it nor enters it (:mod:`foldattn.graph`), and, where ``recorded`` names how, ``foldattn stripe`` and
``foldattn calibrate`` record and replace its gate (:mod:`foldattn.stripe.adapters`). Qualified names
keep the optional packages unimported; :func:`register_known_attention` adds a class of your own.
"""

from __future__ import annotations

from dataclasses import dataclass

from .._registry import Registry

__all__ = ["KnownAttention", "KNOWN", "register_known_attention", "unregister_known_attention",
           "list_known_attentions", "get_known_attention", "known_attention_of"]


@dataclass(frozen=True)
class KnownAttention:
    """A third-party attention class.

    Args:
        qualname: ``"package.module.Class"``.
        recorded: how its gate is recorded: ``"timm-gate"`` (the output of its ``gate`` submodule; the
            descriptor is the mean of its input), ``"torchvision-se"`` (``scale_activation``'s output;
            the descriptor is ``avgpool``'s), or None (left alone, not recorded).
    """

    qualname: str
    recorded: str | None = None


KNOWN: Registry[KnownAttention] = Registry("known attention class", case_sensitive=True)


def register_known_attention(entry: KnownAttention | str) -> KnownAttention:
    """Declare an attention class (or ``"package.module.Class"``) models may already contain."""
    if isinstance(entry, str):
        entry = KnownAttention(entry)
    if "." not in entry.qualname:
        raise ValueError(f"expected a qualified class name 'package.module.Class', got {entry.qualname!r}")
    return KNOWN.register(entry.qualname, entry)


def unregister_known_attention(qualname: str) -> KnownAttention:
    """Remove an entry (tests, plug-ins)."""
    return KNOWN.unregister(qualname)


def list_known_attentions() -> list[str]:
    """Qualified names of the known attention classes."""
    return KNOWN.names()


def get_known_attention(qualname: str) -> KnownAttention | None:
    """The entry of a class (its exact qualified name), None for another class."""
    return KNOWN.get(qualname) if qualname in KNOWN else None


def known_attention_of(module: object) -> KnownAttention | None:
    """The entry of ``module``'s class or, failing that, of the nearest base class that has one."""
    for cls in type(module).__mro__:
        entry = get_known_attention(f"{cls.__module__}.{cls.__qualname__}")
        if entry is not None:
            return entry
    return None


for _entry in (
    KnownAttention("torchvision.ops.misc.SqueezeExcitation", "torchvision-se"),
    KnownAttention("timm.layers.squeeze_excite.SEModule", "timm-gate"),
    KnownAttention("timm.layers.squeeze_excite.EffectiveSEModule", "timm-gate"),
    KnownAttention("timm.layers.squeeze_excite.SqueezeExcite"),
    KnownAttention("timm.layers.squeeze_excite.SqueezeExciteCl"),
    KnownAttention("timm.layers.eca.EcaModule", "timm-gate"),
    KnownAttention("timm.layers.eca.CecaModule", "timm-gate"),
    KnownAttention("timm.layers.cbam.CbamModule"),  # its channel half is recorded (ChannelAttn)
    KnownAttention("timm.layers.cbam.LightCbamModule"),
    KnownAttention("timm.layers.cbam.ChannelAttn", "timm-gate"),
    KnownAttention("timm.layers.cbam.LightChannelAttn"),  # applies F.sigmoid, not its `gate`: not recorded
    KnownAttention("timm.layers.gather_excite.GatherExcite"),
    KnownAttention("timm.layers.global_context.GlobalContext"),
    KnownAttention("timm.models._efficientnet_blocks.SqueezeExcite", "timm-gate"),
):
    register_known_attention(_entry)
