"""The channel-attention zoo: a registry of modules that work in the classic
(input-dependent) form and, fed a learnable input, in the ASR form.

>>> from foldattn import attention
>>> attention.list_attentions()
['cbam', 'dia', 'eca', 'ge', 'ie', 'scale', 'se', 'spa', 'srm']
>>> se = attention.create_attention("se", 64)

Every registry of the package follows torchvision's naming: ``register_X`` / ``unregister_X`` /
``list_Xs`` / ``get_X``. (``register``, ``unregister``, ``names``, ``get`` and ``create`` are the
same functions under the names of foldattn 0.1, kept so that existing code keeps working.)
"""

from ._base import ChannelAttention, PsiInit, check_psi_init
from ._factory import Factory
from ._known import (
    KNOWN,
    KnownAttention,
    get_known_attention,
    known_attention_of,
    list_known_attentions,
    register_known_attention,
    unregister_known_attention,
)
from ._registry import (
    create,
    create_attention,
    get,
    get_attention,
    list_attentions,
    names,
    register,
    register_attention,
    unregister,
    unregister_attention,
)
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
    "ChannelAttention", "Factory", "PsiInit", "check_psi_init",
    "register_attention", "unregister_attention", "list_attentions", "get_attention", "create_attention",
    "register", "unregister", "names", "get", "create",
    "KNOWN", "KnownAttention", "register_known_attention", "unregister_known_attention", "list_known_attentions",
    "get_known_attention", "known_attention_of",
    "CBAM", "DIA", "ECA", "GE", "IE", "Scale", "SE", "SPA", "SRM",
]
