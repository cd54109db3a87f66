"""RepVGG, ACNet and DBB blocks, plus the trivial conv-BN block.

Each is a :class:`~foldattn.srp.RepBlock`: a sum of linear branches ending in BatchNorm,
fused exactly into one conv by :meth:`~foldattn.srp.RepBlock.fuse`. The geometry is
checked at construction: a configuration whose branches cannot be aligned (even
kernel with smaller branches, too little padding to centre them, an identity
branch across a stride or a channel change) raises ``ValueError``.
"""

from __future__ import annotations

from ._base import RepBlock, centred_padding, register
from .branches import ConvBN, IdentityBN, OneByOneThen

__all__ = ["ConvBNBlock", "RepVGGBlock", "ACBlock", "DBBlock"]


@register("conv_bn")
class ConvBNBlock(RepBlock):
    """A single ``conv -> BN`` branch (the plain layer, as a block: used for stems and shortcuts)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: int | None = None, groups: int = 1) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, groups)
        k, p = self.kernel_size, self.padding
        self.branches["dense"] = ConvBN(in_channels, out_channels, (k, k), stride, (p, p), groups)


def _multi_branch_kernel(block: RepBlock) -> None:
    if block.kernel_size < 3 or block.kernel_size % 2 == 0:
        raise ValueError(
            f"{type(block).__name__}: kernel_size must be odd and >= 3 so that the smaller branches can be "
            f"centred, got {block.kernel_size}"
        )


@register("repvgg")
class RepVGGBlock(RepBlock):
    """RepVGG block (Ding et al., "RepVGG: Making VGG-style ConvNets Great Again", CVPR 2021).

    Branches ``kxk conv-BN + 1x1 conv-BN + BN`` (the identity branch only when
    ``identity`` allows it). ``identity=None`` adds it when it fits (stride 1, equal
    channels, padding ``k // 2``); ``identity=True`` demands it and raises otherwise.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: int | None = None, groups: int = 1, identity: bool | None = None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, groups)
        _multi_branch_kernel(self)
        k, p, name = self.kernel_size, self.padding, type(self).__name__
        p1 = centred_padding(k, 1, p, f"{name} 1x1 branch")
        fits = stride == 1 and in_channels == out_channels and p == k // 2
        if identity and not fits:
            raise ValueError(
                f"{name}: an identity branch needs stride 1, in_channels == out_channels and padding "
                f"{k // 2}; got stride={stride}, {in_channels} -> {out_channels} channels, padding={p}. "
                "Pass identity=None (automatic) or False"
            )
        self.branches["dense"] = ConvBN(in_channels, out_channels, (k, k), stride, (p, p), groups)
        self.branches["one_by_one"] = ConvBN(in_channels, out_channels, (1, 1), stride, (p1, p1), groups)
        if fits and identity is not False:
            self.branches["identity"] = IdentityBN(out_channels, groups)


@register("acnet")
class ACBlock(RepBlock):
    """Asymmetric convolution block (Ding et al., "ACNet", ICCV 2019).

    Branches ``kxk + 1xk + kx1``, each conv-BN; the 1xk and kx1 kernels sit on the
    centre row and column of the kxk one.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: int | None = None, groups: int = 1) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, groups)
        _multi_branch_kernel(self)
        k, p, name = self.kernel_size, self.padding, type(self).__name__
        q = centred_padding(k, 1, p, f"{name} 1x{k} / {k}x1 branches")
        self.branches["square"] = ConvBN(in_channels, out_channels, (k, k), stride, (p, p), groups)
        self.branches["hor"] = ConvBN(in_channels, out_channels, (1, k), stride, (q, p), groups)
        self.branches["ver"] = ConvBN(in_channels, out_channels, (k, 1), stride, (p, q), groups)


@register("dbb")
class DBBlock(RepBlock):
    """Diverse Branch Block (Ding et al., "Diverse Branch Block", CVPR 2021).

    Branches ``kxk``, ``1x1``, ``1x1 -> kxk average pool`` and ``1x1 -> kxk``, each
    ending in BN (the two sequential ones with a BN-and-pad layer in the middle).
    ``mid_channels`` (default ``in_channels``) is the width inside the 1x1 -> kxk branch.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: int | None = None, groups: int = 1, mid_channels: int | None = None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, groups)
        _multi_branch_kernel(self)
        k, p, name = self.kernel_size, self.padding, type(self).__name__
        mid = in_channels if mid_channels is None else mid_channels
        if not isinstance(mid, int) or mid < 1 or mid % groups:
            raise ValueError(f"{name}: mid_channels must be a positive multiple of groups={groups}, got {mid!r}")
        p1 = centred_padding(k, 1, p, f"{name} 1x1 branch")
        self.branches["dense"] = ConvBN(in_channels, out_channels, (k, k), stride, (p, p), groups)
        self.branches["one_by_one"] = ConvBN(in_channels, out_channels, (1, 1), stride, (p1, p1), groups)
        self.branches["avg"] = OneByOneThen(in_channels, out_channels, out_channels, k, stride, p, groups, pool=True)
        self.branches["one_by_one_kxk"] = OneByOneThen(in_channels, mid, out_channels, k, stride, p, groups)
