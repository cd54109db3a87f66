"""The model of a training run: built from its config, or rebuilt from a checkpoint."""

from __future__ import annotations

import os
from typing import Any, cast

import torch
from torch import nn

from .. import attention as _attention
from .._budget import BudgetExceeded, DoesNotFit, build_for
from .._utils import check_external_name, unwrap_model
from ..builders import UntrustedBuilderError, check_kwargs, model_by_name, resolve_builder
from ..fold import fold, has_foldable
from .checkpoint import CheckpointError, load_checkpoint, load_model_state
from .config import TrainConfig

__all__ = ["build_model", "load_trained", "load_foreign", "example_input", "deployed_copy", "config_of"]


def build_model(cfg: TrainConfig, num_classes: int, in_channels: int = 3) -> nn.Module:
    """The model named by ``cfg.model`` with its attention / ASR options.

    ``torchvision:NAME`` and ``timm:NAME`` go through :func:`foldattn.attach`; other names
    are :func:`foldattn.models.create_model` names.
    """
    if cfg.attention is not None:
        _attention.get(cfg.attention)
    if (cfg.asr or cfg.both) and cfg.attention is None:
        raise ValueError("--asr/--both need --attention NAME (e.g. --attention se)")
    if cfg.every < 1:
        raise ValueError(f"--every must be >= 1, got {cfg.every}")
    if cfg.psi_init is not None and not (cfg.asr or cfg.both):
        raise ValueError(f"--psi-init {cfg.psi_init} sets ASR's learnable input, and this run has no ASR layer: "
                         "add --attention NAME --asr, or drop --psi-init")
    placement = [o for o, on in (("--every", cfg.every != 1), ("--where", cfg.where is not None),
                                 ("--include", bool(cfg.include)), ("--exclude", bool(cfg.exclude))) if on]
    if placement and cfg.attention is None:
        raise ValueError(f"{'/'.join(placement)} place attention, and this run adds none: "
                         "add --attention NAME (with --asr for ASR), or drop them")
    if cfg.preserve_outputs and not cfg.asr:
        raise ValueError("--preserve-outputs applies to ASR layers: add --attention NAME --asr")
    if cfg.preserve_outputs and cfg.both:
        raise ValueError("--preserve-outputs cannot keep ASR(X) + X exact (the classic X changes the outputs); "
                         "drop --both or --preserve-outputs")
    source, sep, name = cfg.model.partition(":")
    _check_model_kwargs(cfg.model, cfg.model_kwargs)
    if not sep and (cfg.where is not None or cfg.include or cfg.exclude):
        raise ValueError(f"--where/--include/--exclude place ASR on torchvision:/timm: models through attach; "
                         f"{cfg.model} places its attention itself (use --every)")
    if sep:
        model = _external_model(source, name, cfg, num_classes)
    else:
        from ..models import create_model

        kwargs: dict[str, Any] = {}
        if in_channels != 3:
            kwargs["in_channels"] = in_channels
        if cfg.every != 1:
            kwargs["every"] = cfg.every
        if cfg.drop_path is not None:
            if cfg.model not in _DROP_PATH_MODELS:
                raise ValueError(f"--drop-path: {cfg.model} has no stochastic depth; it is available for "
                                 f"{', '.join(_DROP_PATH_MODELS)} and torchvision:/timm: models that take it")
            kwargs["drop_path"] = cfg.drop_path
        clash = sorted(set(cfg.model_kwargs) & {"num_classes", "attention", "asr", "both", "psi_init", *kwargs})
        if clash:
            raise ValueError(f"--model-kwargs {', '.join(clash)}: set by their own options (--attention, --asr, "
                             "--every, --drop-path, the dataset's class count)")
        model = create_model(cfg.model, num_classes=num_classes, attention=cfg.attention, asr=cfg.asr,
                             both=cfg.both, psi_init=cfg.psi_init, **cfg.model_kwargs, **kwargs)
    return model


# foldattn models with a drop_path argument
_DROP_PATH_MODELS = ("cifar_vit_tiny",)


def _check_model_kwargs(model: str, kwargs: dict[str, Any]) -> None:
    """``--model-kwargs`` obey the deployed files' allowlist: parameters the constructor declares, plain
    values, nothing that opens a file, downloads or picks a device or dtype (a config may come from a file)."""
    if not kwargs:
        return
    source, sep, name = model.partition(":")
    if sep:
        check_external_name(source, name)
        spec = f"torchvision.models:{name}" if source == "torchvision" else f"timm:{name}"
    else:
        from ..models import get_builder

        get_builder(model)  # an unknown name fails here, listing the valid ones
        spec = f"foldattn.models:{model}"
    try:
        check_kwargs(resolve_builder(spec), kwargs)
    except UntrustedBuilderError as e:
        raise ValueError(f"--model-kwargs: {e}".replace("keyword argument", "option")) from None


def _external_model(source: str, name: str, cfg: TrainConfig, num_classes: int) -> nn.Module:
    from ..attach import Where, attach

    if source not in ("torchvision", "timm"):
        raise ValueError(f"unknown model source {source!r}; use torchvision:NAME, timm:NAME or a foldattn model name")
    kwargs = dict(cfg.model_kwargs)
    if cfg.drop_path is not None:
        kwargs["stochastic_depth_prob" if source == "torchvision" else "drop_path_rate"] = cfg.drop_path
    try:
        model = model_by_name(cfg.model, num_classes, kwargs=kwargs)
    except ValueError as e:
        hint = (" (--drop-path is stochastic_depth_prob, which this model does not take)"
                if cfg.drop_path is not None and source == "torchvision" else "")
        raise ValueError(f"{e}{hint}") from None
    if cfg.attention is None:
        return model
    if not cfg.asr:
        raise ValueError(f"{cfg.model}: attach inserts attention in ASR form only; add --asr (or --asr --both for "
                         "ASR(X) + X), or use a foldattn.models name for classic attention")
    # --where's choices are Where's values
    where = cast(Where, cfg.where) if cfg.where is not None else ("block" if not cfg.include else None)
    return attach(model, cfg.attention, where=where, both=cfg.both, psi_init=cfg.psi_init, every=cfg.every,
                  include=cfg.include or None, exclude=cfg.exclude or None)


def load_trained(path: str | os.PathLike[str],
                 ema: bool | None = None) -> tuple[nn.Module, TrainConfig, dict[str, Any]]:
    """Rebuild the (training-form) model of a checkpoint: ``(model in eval mode, config, checkpoint dict)``.

    ``ema``: the EMA weights of a ``--model-ema`` run (None: them if the checkpoint has them;
    ``blob["weights"]`` says which were loaded: ``"ema"`` or ``"model"``).

    Raises :class:`~foldattn.train.checkpoint.CheckpointError` for unreadable files or weights that
    do not fit the architecture recorded in the checkpoint's config.
    """
    blob = load_checkpoint(path)
    has_ema = blob.get("model_ema") is not None
    if ema and not has_ema:
        raise CheckpointError(f"--ema: {path} has no EMA weights (the run was trained without --model-ema)")
    use_ema = has_ema if ema is None else ema
    blob["weights"] = "ema" if use_ema else "model"
    cfg = config_of(blob, path)
    run = blob.get("run") or {}
    classes = run.get("classes")
    if classes is None:  # older checkpoints: the classifier's output size
        heads = [v for k, v in blob["model"].items() if k.endswith("weight") and v.dim() == 2]
        classes = int(heads[-1].shape[0]) if heads else 10
    weights = blob["model_ema" if use_ema else "model"]
    model = _build_checked(cfg, int(classes), weights, f"checkpoint {path}")
    load_model_state(model, weights, f"checkpoint {path}")
    return model.eval(), cfg, blob


def config_of(blob: dict[str, Any], path: str | os.PathLike[str]) -> TrainConfig:
    """The checkpoint's training config, typed and validated like a command line's (it is data)."""
    try:
        cfg = TrainConfig.from_dict(blob["config"])
        cfg.validate()
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: its recorded config is not usable: {e}") from None
    return cfg


def _build_checked(cfg: TrainConfig, classes: int, weights: dict[str, torch.Tensor], what: str) -> nn.Module:
    """``build_model(cfg, classes)``, sized against ``weights`` before any real allocation."""
    try:
        return build_for(lambda: build_model(cfg, classes), weights, f"{what}'s model {cfg.model}")
    except (BudgetExceeded, DoesNotFit) as e:
        raise CheckpointError(str(e)) from None
    except ValueError as e:
        raise CheckpointError(f"{what}: its model cannot be built: {e}") from None


def load_foreign(path: str | os.PathLike[str], cfg: TrainConfig, num_classes: int | None = None,
                 image_size: int | None = None, ema: bool = False) -> tuple[nn.Module, TrainConfig, dict[str, Any]]:
    """Rebuild a model trained by another trainer (timm's ``train.py``, Lightning, a plain loop).

    ``cfg`` names the architecture and the attach options that built it (``model``,
    ``attention``, ``asr``, ``both``, ``every``, ``where``, ``include``, ``exclude``); the weights
    (``state_dict``, or ``state_dict_ema`` with ``ema``; a ``module.``/``model.`` prefix removed)
    must fit it strictly. Returns ``(model in eval mode, cfg, a checkpoint-like dict)``.
    """
    from .pretrained import PretrainedError, _strip_prefix, read_state_dict

    state = read_state_dict(path, key="state_dict_ema" if ema else None, what="checkpoint")
    if num_classes is None:  # the classifier's size in the file
        probe = build_model(cfg, 10)
        head = [n for n, m in probe.named_modules() if isinstance(m, nn.Linear)]
        keys = set(probe.state_dict())
        state = _strip_prefix(state, keys)
        weight = state.get(f"{head[-1]}.weight") if head else None
        if weight is None:
            raise PretrainedError(f"{path}: cannot tell the number of classes; pass --num-classes")
        num_classes = int(weight.shape[0])
    with torch.device("meta"):
        keys = set(build_model(cfg, num_classes).state_dict())
    state = _strip_prefix(state, keys)
    model = _build_checked(cfg, num_classes, state, f"checkpoint {path}")
    load_model_state(model, state, f"checkpoint {path}")
    size = image_size or (32 if ":" not in cfg.model else 224)
    return model.eval(), cfg, {"config": cfg.to_dict(), "run": {"classes": num_classes, "image_size": (size, size)},
                               "epoch": None, "best": None}


def example_input(blob: dict[str, Any], batch: int = 2) -> torch.Tensor:
    """A random normalised input batch of the checkpoint's image size (32x32 if unknown)."""
    h, w = (blob.get("run") or {}).get("image_size", (32, 32))
    return torch.randn(batch, 3, int(h), int(w), generator=torch.Generator().manual_seed(0))


def deployed_copy(model: nn.Module) -> nn.Module:
    """The deployed form for evaluation: a folded copy if the model has ASR layers or
    re-parameterization blocks (a plain SRP network deploys fused too), else the model itself."""
    inner = unwrap_model(model)
    return fold(inner) if has_foldable(inner) else inner
