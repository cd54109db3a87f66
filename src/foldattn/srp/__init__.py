"""Structural re-parameterization blocks (RepVGG, ACNet, DBB) that compose with ASR.

Each block trains as a sum of linear branches ending in BatchNorm and fuses, exactly,
into one ``Conv2d``. A block is an ASR host (its branches' last BatchNorm weights and
biases absorb ``v``), so ``ASR(block)`` trains with the attention vector inside the
block's own parameters and :func:`foldattn.fold` folds ``v`` and then fuses the
block: the deployed network is a plain conv network.

>>> from foldattn import srp, ASR, fold
>>> layer = ASR(srp.create("dbb", 16, 16), "se")
>>> conv = fold(layer)  # one nn.Conv2d
"""

from ._base import (
    Branch,
    RepBlock,
    centred_padding,
    create,
    create_block,
    get,
    get_block,
    list_blocks,
    names,
    register,
    register_block,
    rep_blocks,
    reparameterize,
    unregister,
    unregister_block,
)
from .blocks import ACBlock, ConvBNBlock, DBBlock, RepVGGBlock
from .branches import BNAndPad, ConvBN, IdentityBN, OneByOneThen

__all__ = [
    "RepBlock", "Branch", "register", "unregister", "create", "get", "names", "rep_blocks", "reparameterize",
    "register_block", "unregister_block", "list_blocks", "get_block", "create_block",
    "centred_padding",
    "ConvBNBlock", "RepVGGBlock", "ACBlock", "DBBlock", "ConvBN", "IdentityBN", "OneByOneThen", "BNAndPad",
]
