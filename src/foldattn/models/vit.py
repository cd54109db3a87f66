"""A small Vision Transformer for CIFAR (Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021).

Patch size 4 (a 32x32 image is an 8x8 grid of 64 tokens), learned position
embedding, pre-norm blocks ``x + attn(norm1(x))``, ``x + mlp(norm2(x))``, final
LayerNorm, mean over tokens, linear head (no class token, so the tokens always form
a grid and every attention module of the zoo applies).

ASR placement (default ``asr_sites=("proj", "fc2")``): the Linear that *ends* each
residual branch, the attention output projection ``attn.proj`` and the MLP's ``fc2``.
Scaling a Linear's output channels is exact to fold (rows of W and b times ``v``),
and the scale acts on the branch before the residual addition -- the place of SE in
SE-ResNet and of ``bn3`` in the paper's ResNet-164 (it is a LayerScale, CaiT, whose
per-channel scale is produced by ``T(psi)``). The LayerNorm affine that feeds a
branch (``"norm1"``, ``"norm2"``) folds exactly too and may be chosen instead or as
well. What does *not* fold is a scale after GELU or after the addition.

:func:`vit_asr_sites` applies the same rule to other ViTs (timm, torchvision) and
:func:`attach_vit_asr` wraps those sites in ASR.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attach import attach, find_sites
from ..attention import Factory, PsiInit
from ._registry import register_model
from ._srp_common import check_attention_args

__all__ = ["CifarViT", "ViTBlock", "LayerScale", "ASR_SITES", "vit_asr_sites", "attach_vit_asr"]

#: ASR sites of a block: name -> dotted path of the host inside :class:`ViTBlock`.
ASR_SITES: dict[str, str] = {"proj": "attn.proj", "fc2": "mlp.fc2", "norm1": "norm1", "norm2": "norm2"}


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` Linear and an output Linear ``proj``."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim={dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        n, length, dim = x.shape
        q, k, v = self.qkv(x).reshape(n, length, 3, self.num_heads, dim // self.num_heads).unbind(2)
        # (no name holds the attention output: it is freed before proj allocates its own)
        return self.proj(F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
                         .transpose(1, 2).reshape(n, length, dim))


class Mlp(nn.Module):
    """``fc2(GELU(fc1(x)))``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    """A learnable per-channel scale of a residual branch (Touvron et al., "Going deeper with Image
    Transformers", ICCV 2021: LayerScale, timm's ``init_values``): ``x * gamma`` over the last dim.

    A training-time layer: :func:`foldattn.fold` multiplies ``gamma`` into the rows of the Linear that
    produces its input and leaves an ``nn.Identity``, so the deployed ViT is the one built without it.
    """

    folds_away = True  # foldattn.fold removes it (foldattn.fuse.fold_scales)
    scale_dim = -1

    def __init__(self, dim: int, init_values: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma

    def extra_repr(self) -> str:
        return f"{self.gamma.numel()}"


class TokenAttention(nn.Module):
    """Apply a channel-attention module to tokens ``(N, L, C)`` laid out as a ``grid`` of ``(H, W)``."""

    def __init__(self, module: nn.Module, grid: tuple[int, int]) -> None:
        super().__init__()
        self.module, self.grid = module, grid

    def forward(self, x: Tensor) -> Tensor:
        n, length, c = x.shape
        y = self.module(x.transpose(1, 2).reshape(n, c, *self.grid))
        return y.reshape(n, c, length).transpose(1, 2)


class ViTBlock(nn.Module):
    """Pre-norm transformer block; ``gates`` holds classic attention modules per site."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float = 0.0,
                 layer_scale: float | None = None) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.gates = nn.ModuleDict()
        # LayerScale on each branch (training only: folded into attn.proj / mlp.fc2 when deployed)
        self.ls1 = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()
        self.ls2 = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()
        # stochastic depth (Huang et al. 2016) on each residual branch; the identity in eval mode,
        # so it never enters a fold. Imported here: torchvision.ops pulls in torch._dynamo (~1 s),
        # which every `import foldattn` would pay otherwise
        self.drop_path: nn.Module = nn.Identity()
        if drop_path > 0:
            from torchvision.ops import StochasticDepth

            self.drop_path = StochasticDepth(drop_path, "row")

    def _gate(self, site: str, x: Tensor) -> Tensor:
        return self.gates[site](x) if site in self.gates else x

    def forward(self, x: Tensor) -> Tensor:
        # one expression per branch: a named normed input would stay alive through the branch,
        # and that changes which freed buffers the allocator can hand out (measured ~5 % at batch 64)
        # LayerScale right after the branch's last Linear (before a classic gate), so it always folds into it
        x = x + self.drop_path(self._gate("proj", self.ls1(self.attn(self._gate("norm1", self.norm1(x))))))
        return x + self.drop_path(self._gate("fc2", self.ls2(self.mlp(self._gate("norm2", self.norm2(x))))))


class CifarViT(nn.Module):
    """ViT for small images with ASR on chosen per-block sites.

    Args:
        img_size: input side (square).
        patch_size: patch side; ``img_size`` must be a multiple.
        embed_dim, depth, num_heads, mlp_ratio: transformer size.
        num_classes: classifier outputs.
        attention: a registered attention name, or None.
        asr: wrap each block's ``asr_sites`` hosts in ASR with ``attention``.
        both: with ``asr=True``, also keep the classic module at the same sites ("ASR(X) + X").
        psi_init: initial value of every ``psi`` (a number, ``"random"``, or None: the attention's default).
        asr_sites: subset of :data:`ASR_SITES` (``"proj"``, ``"fc2"``, ``"norm1"``, ``"norm2"``);
            classic attention (``asr=False`` or ``both``) sits at the same sites.
        in_channels: image channels.
        every: attention (ASR and classic) in every ``every``-th block only (blocks 0, k, 2k, ...).
        drop_path: stochastic-depth rate of the last block, rising linearly from 0 at the first
            (the DeiT convention).
        layer_scale: LayerScale's initial value (timm's ``init_values``, e.g. ``1e-5``): a learnable
            per-channel scale on each residual branch, after the branch's last Linear; None: none.
            A training-time layer: :func:`foldattn.fold` folds it into that Linear, so the deployed
            model is the ViT built without it.
        **attention_kwargs: passed to the attention constructor.
    """

    def __init__(
        self,
        img_size: int = 32,
        patch_size: int = 4,
        embed_dim: int = 192,
        depth: int = 6,
        num_heads: int = 3,
        mlp_ratio: float = 2.0,
        num_classes: int = 10,
        attention: str | None = None,
        asr: bool = False,
        both: bool = False,
        psi_init: PsiInit = None,
        asr_sites: Sequence[str] = ("proj", "fc2"),
        in_channels: int = 3,
        every: int = 1,
        drop_path: float = 0.0,
        layer_scale: float | None = None,
        **attention_kwargs: Any,
    ) -> None:
        super().__init__()
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"drop_path={drop_path} must be in [0, 1)")
        if layer_scale is not None and (isinstance(layer_scale, bool) or not isinstance(layer_scale, (int, float))
                                        or not math.isfinite(layer_scale) or layer_scale <= 0):
            raise ValueError(f"layer_scale={layer_scale!r} must be a positive number (LayerScale's initial value, "
                             "e.g. 1e-5) or None")
        if img_size % patch_size:
            raise ValueError(f"img_size={img_size} must be a multiple of patch_size={patch_size}")
        unknown = [s for s in asr_sites if s not in ASR_SITES]
        if unknown or not asr_sites or len(set(asr_sites)) != len(asr_sites):
            raise ValueError(f"asr_sites must be distinct names from {sorted(ASR_SITES)}, got {list(asr_sites)}")
        check_attention_args(attention, asr, both, attention_kwargs, psi_init)
        self.default_input_size = (in_channels, img_size, img_size)
        grid = (img_size // patch_size, img_size // patch_size)
        self.patch_embed = nn.Conv2d(in_channels, embed_dim, patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1], embed_dim))
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.Sequential(*(ViTBlock(embed_dim, num_heads, mlp_ratio, rates[i], layer_scale)
                                      for i in range(depth)))
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)
        self._init_weights()
        for site in asr_sites:  # one attention chain per site (DIA shares its cell along the depth)
            path = ASR_SITES[site]
            if asr:  # the placement is an attach policy: these named hosts, every k-th block
                # attention is not None: check_attention_args refused asr=True without one
                attach(self, cast(str, attention), where=None, include=f"blocks.*.{path}", every=every,
                       psi_init=psi_init, inplace=True, **attention_kwargs)
            classic_f = Factory(attention if (both or not asr) else None, every=every, **attention_kwargs)
            for block in self.blocks:
                classic = classic_f(embed_dim)
                if classic is not None:
                    cast(ViTBlock, block).gates[site] = TokenAttention(classic, grid)

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        fan_in = self.patch_embed.weight[0].numel()
        nn.init.trunc_normal_(self.patch_embed.weight, std=math.sqrt(1.0 / fan_in))
        nn.init.zeros_(self.patch_embed.bias)  # type: ignore[arg-type]

    def forward(self, x: Tensor) -> Tensor:
        _check_size(x, self.default_input_size[-2:])
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x.mean(dim=1))


@torch.fx.wrap
def _check_size(x: Tensor, size: tuple[int, ...]) -> None:
    # a leaf of torch.fx traces (the graph engine traces the model to place ASR)
    if tuple(x.shape[-2:]) != tuple(size):
        raise ValueError(f"CifarViT was built for {tuple(size)} images, got {tuple(x.shape)}; "
                         "build it with img_size matching the data")


@register_model
def cifar_vit_tiny(num_classes: int = 10, attention: str | None = None, asr: bool = False, both: bool = False,
                   psi_init: PsiInit = None, **kwargs: Any) -> CifarViT:
    """ViT for CIFAR: patch 4, embed 192, depth 6, 3 heads, MLP ratio 2. See :class:`CifarViT`."""
    return CifarViT(num_classes=num_classes, attention=attention, asr=asr, both=both, psi_init=psi_init, **kwargs)


def vit_asr_sites(model: nn.Module) -> list[str]:
    """Dotted names of the layers that take ASR in a ViT, two per transformer block.

    The rule is :func:`foldattn.attach`'s ``where="transformer"`` (the one :class:`CifarViT`
    uses): the Linear that *ends* each residual branch -- the attention output projection and
    the MLP's last Linear -- so the scale acts on the branch before the addition and folds
    into that Linear's rows. Where the attention does not call its output projection as a
    module (``nn.MultiheadAttention``, as in torchvision's ViT) the LayerNorm that starts the
    branch takes the scale instead (its affine folds exactly too). Sites that already have
    ASR are reported as well.

    Raises:
        ValueError: no residual branch with a usable host.
    """
    return find_sites(model, "transformer", allow_existing=True).names


def attach_vit_asr(model: nn.Module, attention: str = "se", *, psi_init: PsiInit = None, inplace: bool = False,
                   **attention_kwargs: Any) -> nn.Module:
    """:func:`foldattn.attach` with ``where="transformer"``: ASR on every :func:`vit_asr_sites` layer.

    By default a deep copy is changed. ``foldattn.fold`` of the result loads strictly
    into the original model.

    Example:
        >>> model = attach_vit_asr(timm.create_model("vit_tiny_patch16_224"), "se")
    """
    return attach(model, attention, where="transformer", psi_init=psi_init, inplace=inplace, **attention_kwargs)
