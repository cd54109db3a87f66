"""The channel-attention zoo: a registry of modules that work in the classic
(input-dependent) form and, fed a learnable input, in the ASR form.

>>> from foldattn import attention
>>> attention.names()
['cbam', 'dia', 'eca', 'ge', 'ie', 'scale', 'se', 'spa', 'srm']
>>> se = attention.create("se", 64)
"""

from ._base import ChannelAttention, PsiInit, check_psi_init
from ._factory import Factory
from ._registry import create, get, names, register, unregister
from .cbam import CBAM
from .dia import DIA
from .eca import ECA
from .ge import GE
from .ie import IE
from .scale import Scale
from .se import SE
from .spa import SPA
from .srm import SRM

__all__ = [
    "ChannelAttention", "Factory", "PsiInit", "check_psi_init", "create", "get", "names", "register", "unregister",
    "CBAM", "DIA", "ECA", "GE", "IE", "Scale", "SE", "SPA", "SRM",
]
