"""The Stripe Observation: measure how constant a model's channel-attention vectors are.

Zhong et al. (arXiv 2304.06345; ECCV 2024, "Stripe Observation Guided Inference
Cost-free Attention Mechanism") observe that the attention vector ``a(x)`` a channel
attention module produces becomes nearly the same for every input: drawn as an
images x channels matrix it shows vertical stripes. This package records, over a data
loader, the gate ``a(x)`` of every channel-attention module of a model and the module's input
descriptor, with streaming float64 statistics and a reservoir sample of vectors for pictures:

- :mod:`~foldattn.stripe.adapters`: which modules are attention and how to tap them
  (:class:`AttentionKind`, :func:`register_kind`, :func:`find_attention`);
- :mod:`~foldattn.stripe.statistics`: per-channel statistics, :func:`stripe_score`, :func:`constancy`;
- :mod:`~foldattn.stripe.results`: :class:`LayerStripes` and :class:`StripeResult` (JSON in and out);
- :mod:`~foldattn.stripe.recorder`: :func:`record_stripes` over a loader;
- :mod:`~foldattn.stripe.history`: statistics over epochs; :mod:`~foldattn.stripe.monitor`: the training monitor;
- :mod:`~foldattn.stripe.plots`: heat maps and curves (matplotlib, the ``train`` extra).

Command line: ``foldattn stripe CKPT_OR_MODEL --data digits -o out/stripes``. See ``docs/stripe.md``.

>>> result = record_stripes(model, loader, max_images=512)      # doctest: +SKIP
>>> print(result.table())                                        # doctest: +SKIP
"""

from .adapters import (
    KINDS,
    AttentionKind,
    AttentionSite,
    NoAttentionError,
    Tap,
    attention_kinds,
    find_attention,
    get_attention_kind,
    list_attention_kinds,
    register_attention_kind,
    register_kind,
    select_sites,
    unregister_attention_kind,
    unregister_kind,
)
from .history import StripeHistory
from .monitor import StripeMonitor
from .recorder import StripeRecorder, record_stripes

# Private and not in __all__: the recorder's batch handling, which foldattn.calibrate shares.
from .recorder import _device_of as _device_of
from .recorder import _images as _images
from .recorder import _to_model as _to_model
from .results import LayerStripes, StripeResult
from .statistics import ChannelStats, constancy, stripe_score

__all__ = [
    "AttentionKind", "AttentionSite", "Tap", "register_attention_kind", "unregister_attention_kind",
    "list_attention_kinds", "get_attention_kind", "register_kind", "unregister_kind", "attention_kinds",
    "find_attention",
    "select_sites", "stripe_score", "constancy", "ChannelStats", "LayerStripes", "StripeResult", "StripeRecorder",
    "record_stripes", "StripeHistory", "StripeMonitor", "NoAttentionError", "KINDS",
]

# the calibration app (imported last: it builds on the recorder and on foldattn.calibrate)
from .budget import BudgetPoint, BudgetResult, SiteCost, calibrate_within_budget, keep_order, search_budget, site_costs
from .calibration import CalibrationReport, calibrate, evaluate, finetune
from .distillation import DistillReport, deploy_student, distill, distillation_student, site_gaps

__all__ += ["CalibrationReport", "calibrate", "evaluate", "finetune", "DistillReport", "deploy_student", "distill",
            "distillation_student", "site_gaps", "calibrate_within_budget", "search_budget", "keep_order", "site_costs",
            "SiteCost", "BudgetPoint", "BudgetResult"]
