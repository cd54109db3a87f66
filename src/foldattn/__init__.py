"""foldattn: ASR, Attention-alike Structural Re-parameterization, for PyTorch.

Channel attention that trains with a learnable input and folds into the
backbone's own weights, so the deployed network costs exactly the plain backbone.

>>> import torch, foldattn
>>> model = foldattn.models.create_model("cifar_resnet20", attention="se", asr=True)
>>> deployed = foldattn.fold(model)
>>> foldattn.verify(model, deployed, torch.randn(2, 3, 32, 32))
"""

from . import attention, models, transforms
from ._version import __version__
from .asr import ASR
from .attach import AttachReport, attach, find_sites, register_attention_type, register_transparent_type
from .deploy import load_deployed, save_deployed
from .export import export_onnx
from .fold import fold
from .models import create_model, list_models
from .runtimes import RuntimeReport, export_executorch, export_openvino
from .summary import Summary, summary
from .verify import TOLERANCES, EquivalenceError, VerifyReport, verify

__all__ = [
    "ASR", "attach", "find_sites", "AttachReport", "register_attention_type", "register_transparent_type",
    "save_deployed", "load_deployed",
    "export_onnx", "export_openvino", "export_executorch", "RuntimeReport",
    "fold", "verify", "summary", "Summary", "EquivalenceError", "VerifyReport", "TOLERANCES",
    "attention", "models", "transforms", "create_model", "list_models", "__version__",
]
