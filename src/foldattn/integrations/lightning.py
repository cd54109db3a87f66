"""A Lightning callback for ASR: attach when the trainer sets up, fold, verify and save after fitting.

:class:`ASRCallback` puts ASR layers (Attention-alike Structural Re-parameterization, Zhong et al.,
arXiv 2304.06345) into a ``LightningModule`` with :func:`foldattn.attach`, in the callback's ``setup``
hook. Lightning calls that hook before ``LightningModule.setup``, ``configure_model`` and the
strategy's setup, which moves the model to its device, wraps it (DDP) and calls
``configure_optimizers``: the ASR parameters exist when the optimizer is built, so
``self.parameters()`` in ``configure_optimizers`` includes them, and a checkpoint restored by
``trainer.fit(..., ckpt_path=...)`` finds them.

During training the callback never changes the module. Optionally it records the Stripe
statistics (:mod:`foldattn.stripe`) of the model's input-dependent attention on validation batches
and sends a few scalars per attention layer to the trainer's loggers. When fitting ends (on global
rank zero only), it folds a copy of the trained model (:func:`foldattn.fold`), checks it against
the trained model on a real batch (:func:`foldattn.verify`), writes the deployed file
(:func:`foldattn.save_deployed`) and, if asked, an ONNX export (:func:`foldattn.export_onnx`).

Needs the ``lightning`` package: ``pip install 'foldattn[lightning]'``. See ``docs/lightning.md``.
"""

from __future__ import annotations

import math
import os
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .._utils import check_output_folder, eval_mode, first_line, make_output_folder, require
from ..attach import AttachReport, Where, attach
from ..attention import ChannelAttention, PsiInit, check_psi_init
from ..attention import get as _attention_named
from ..deploy import save_deployed
from ..export import ExportReport, export_onnx
from ..fold import asr_layers, fold, has_foldable
from ..stripe import ChannelStats, NoAttentionError, StripeRecorder, StripeResult, find_attention, select_sites
from ..verify import EquivalenceError, VerifyReport, verify

try:
    import lightning.pytorch as pl
    from lightning.pytorch.utilities import rank_zero_warn
except ImportError:  # the optional extra is missing: say which one installs it
    require("lightning", "lightning")
    raise

__all__ = ["ASRCallback", "FoldVerificationError", "STRIPE_STATISTICS"]

#: every per-layer statistic that ``stripe_statistics`` may name (keys of ``LayerStripes.summary()``)
_KNOWN_STATISTICS = tuple(f"{part}_{key}" for part in ("gate", "descriptor")
                          for key in ChannelStats(0, [], []).summary())

#: the statistics logged per attention layer by default: how much each gate varies across images
#: (mean over channels of its std), how much of its variance is between channels (1: perfect stripes),
#: how constant it is against its [0, 1] ceiling, and the stripe score of the layer's input descriptor
STRIPE_STATISTICS: tuple[str, ...] = ("gate_mean_std", "gate_stripe_score", "gate_constancy",
                                      "descriptor_stripe_score")

_WHERE = ("block", "transformer", "norms", None)
_INPUT_KEYS = ("image", "images", "input", "inputs", "x", "pixel_values")

Inputs = tuple[Any, ...]


class FoldVerificationError(EquivalenceError):
    """The folded model does not compute what the trained model computes (nothing was saved)."""


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"ASRCallback: {name} must be an integer >= 1, got {value!r}")
    return value


def _flag(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"ASRCallback: {name} must be True or False, got {value!r}")
    return value


def _file_name(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value or Path(value).name != value or value in (".", ".."):
        raise ValueError(f"ASRCallback: {name} must be a file name without folders, got {value!r} "
                         "(choose the folder with dirpath=)")
    return value


def _as_inputs(value: Any, what: str) -> Inputs:
    """``value`` as a tuple of positional inputs whose first is a tensor with a batch dimension."""
    args = (value,) if isinstance(value, Tensor) else tuple(value) if isinstance(value, (list, tuple)) else ()
    if not args or not isinstance(args[0], Tensor) or args[0].dim() == 0:
        raise TypeError(f"ASRCallback: {what} must be a tensor (batch first) or a tuple of positional inputs "
                        f"starting with one, got {type(value).__name__}")
    return args


def _default_input(batch: Any) -> Any:
    """The model's input in a batch: the batch itself if a tensor, the first item of a tuple or list,
    or the value of the first of ``image``, ``images``, ``input``, ``inputs``, ``x``, ``pixel_values``."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    if isinstance(batch, Mapping):
        key = next((k for k in _INPUT_KEYS if k in batch), None)
        if key is not None:
            return batch[key]
    raise TypeError(f"ASRCallback cannot tell the model's input in a batch of type {type(batch).__name__}; pass "
                    "input_from_batch=<a function batch -> input tensor> (or example_input=)")


def _detached(args: Inputs) -> Inputs:
    """A CPU copy of the tensors (kept until fitting ends, without holding accelerator memory)."""
    return tuple(a.detach().to("cpu", copy=True) if isinstance(a, Tensor) else a for a in args)


def _rows(args: Inputs, n: int) -> Inputs:
    """The first ``n`` samples of every batched tensor input."""
    return tuple(a[:n] if isinstance(a, Tensor) and a.dim() > 0 else a for a in args)


def _shapes(args: Inputs) -> str:
    return ", ".join(str(tuple(a.shape)) if isinstance(a, Tensor) else type(a).__name__ for a in args)


def _like_model(args: Inputs, model: nn.Module) -> Inputs:
    """The inputs on the device of ``model``'s parameters; floating ones also in their dtype."""
    p = next(model.parameters(), None)
    if p is None:
        return args
    return tuple(a.to(device=p.device, dtype=p.dtype) if isinstance(a, Tensor) and a.is_floating_point()
                 else a.to(p.device) if isinstance(a, Tensor) else a for a in args)


class ASRCallback(pl.Callback):
    """Train a ``LightningModule`` with ASR and deploy it folded: attach, (log stripes), fold, verify, save.

    - ``setup`` (every stage, before ``configure_optimizers``): :func:`foldattn.attach` puts ASR into the
      module (or the submodule named by ``module``), in place, with the options below; a module this
      callback already attached is left as it is (a second ``fit``, ``validate`` after ``fit``). For
      ``fit`` it also checks, before any training, that the output folder can be written, that ONNX
      export can run (``onnx=True``) and that there is attention to record (``log_stripes=True``).
    - validation (``log_stripes=True``, on rank zero, every ``stripe_every_n_epochs`` epochs, not during the
      sanity check): the first ``stripe_max_images`` validation images are run once more through the model
      (eval mode, ``no_grad``) with :class:`foldattn.stripe.StripeRecorder` hooks installed for that pass
      only, and ``stripe/<layer>/<statistic>`` scalars go to every logger of the trainer (``log_metrics``,
      at ``trainer.global_step``); the latest :class:`~foldattn.stripe.StripeResult` is ``self.stripes``.
    - ``on_fit_end`` (global rank zero only): fold a copy, verify it against the trained model on the
      first validation batch (else ``example_input``, if given, which takes precedence; else the first
      training batch), save it with :func:`foldattn.save_deployed` as ``dirpath/filename`` and, with
      ``onnx=True``, export ``dirpath/onnx_filename`` with :func:`foldattn.export_onnx`.

    The module is never changed while it runs: ASR is attached before fitting starts, stripes are
    recorded in a separate pass, and the fold works on a copy.

    Args:
        attention: the attention of :func:`foldattn.attach`: a registered name
            (``foldattn.attention.names()``) or a callable ``channels -> ChannelAttention``; ``None``
            attaches nothing (the module already has ASR layers, e.g. from
            ``foldattn.create_model(..., asr=True)``) and only folds, verifies and saves.
        module: the attribute (dotted path) of the LightningModule holding the network, e.g.
            ``"model"``; ``None``: the LightningModule itself. It must exist when callbacks' ``setup``
            runs (built in ``__init__``: ``LightningModule.setup`` and ``configure_model`` run later).
        where, every, include, exclude, both, psi_init, preserve_outputs: as in :func:`foldattn.attach`.
        attention_kwargs: keyword arguments of the attention constructor (e.g. ``{"reduction": 8}``).
        example_input: an input batch (a tensor, or a tuple of positional inputs) to verify and export on
            instead of the first validation batch; also what ``attach`` runs once when ``torch.fx``
            cannot trace the module.
        input_from_batch: ``batch -> input`` (a tensor or a tuple of positional inputs) for batches whose
            model input is not the batch itself, its first item, or one of the dict keys ``image``,
            ``images``, ``input``, ``inputs``, ``x``, ``pixel_values``.
        dirpath: the folder of the deployed files, created when they are written; default
            ``Path(trainer.default_root_dir) / "foldattn"``.
        filename: the deployed weights' file name (a ``.json`` copy of its metadata is written beside it).
        builder, builder_kwargs: how :func:`foldattn.load_deployed` rebuilds the plain architecture
            (see :func:`foldattn.save_deployed`); models from :func:`foldattn.create_model` record theirs,
            for others loading needs ``load_deployed(path, model=...)`` without them.
        metadata: JSON data stored in the deployed file (``user``); the callback adds a ``lightning``
            entry (epoch, global step, the verification's errors and inputs).
        onnx: also export ONNX (needs ``foldattn[onnx]``), checked with onnxruntime.
        onnx_filename: the ONNX file name in ``dirpath``.
        tolerance: the largest relative error ``verify`` accepts; default its per-dtype tolerance
            (``1e-5`` of the output scale in float32).
        log_stripes: record and log Stripe statistics on validation batches. They exist only for
            input-dependent attention: with ASR alone (``both=False``) the model needs attention of
            its own, otherwise ``fit`` stops at setup saying so.
        stripe_every_n_epochs: record at epochs ``n, 2n, ...`` (counted from 1).
        stripe_max_images: at most this many validation images per recording (one extra forward pass
            over them).
        stripe_layers: names or glob patterns of the attention layers to record (default all).
        stripe_statistics: which statistics of ``LayerStripes.summary()`` to log per layer (default
            :data:`STRIPE_STATISTICS`); non-finite values (``constancy`` of gates outside [0, 1]) are
            left out.

    Attributes:
        attach_report: the :class:`~foldattn.AttachReport` of the attach (None with ``attention=None``).
        deployed: the folded model, once fitting has ended (rank zero).
        verify_report: the :class:`~foldattn.VerifyReport` of the fold check.
        deployed_path: the deployed file written.
        onnx_report: the :class:`~foldattn.export.ExportReport` with ``onnx=True``.
        stripes: the latest recorded :class:`~foldattn.stripe.StripeResult`, ``stripe_metrics`` what was logged.

    Raises:
        FoldVerificationError: at the end of fitting, the folded model's outputs differ from the trained
            model's beyond the tolerance (or are not finite); the message gives the errors, and nothing
            is written.
        ValueError: bad options (here), or at setup a missing ``module``, no eligible ASR site, no
            attention to record, an output folder that cannot be written.
    """

    def __init__(
        self,
        attention: str | Callable[[int], ChannelAttention] | None = "se",
        *,
        module: str | None = None,
        where: Where = "block",
        every: int = 1,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        both: bool = False,
        psi_init: PsiInit = None,
        preserve_outputs: bool = False,
        attention_kwargs: Mapping[str, Any] | None = None,
        example_input: Tensor | Sequence[Tensor] | None = None,
        input_from_batch: Callable[[Any], Tensor | Sequence[Tensor]] | None = None,
        dirpath: str | os.PathLike[str] | None = None,
        filename: str = "model.safetensors",
        builder: str | Callable[..., nn.Module] | None = None,
        builder_kwargs: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
        onnx: bool = False,
        onnx_filename: str = "model.onnx",
        tolerance: float | None = None,
        log_stripes: bool = False,
        stripe_every_n_epochs: int = 1,
        stripe_max_images: int = 512,
        stripe_layers: Sequence[str] | None = None,
        stripe_statistics: Sequence[str] = STRIPE_STATISTICS,
    ) -> None:
        super().__init__()
        self.attention = self._checked_attention(attention)
        if module is not None and (not isinstance(module, str) or not module):
            raise ValueError(f"ASRCallback: module must be an attribute name such as 'model' (or None for the "
                             f"LightningModule itself), got {module!r}")
        if where not in _WHERE:
            raise ValueError(f"ASRCallback: where must be one of {_WHERE}, got {where!r}")
        self.module, self.where = module, where
        self.every = _positive_int(every, "every")
        self.include, self.exclude = include, exclude
        self.both, self.preserve_outputs = _flag(both, "both"), _flag(preserve_outputs, "preserve_outputs")
        self.psi_init = check_psi_init(psi_init)
        self.attention_kwargs = dict(attention_kwargs or {})
        self.example_input = None if example_input is None else _as_inputs(example_input, "example_input")
        if input_from_batch is not None and not callable(input_from_batch):
            raise TypeError("ASRCallback: input_from_batch must be a function batch -> model input")
        self.input_from_batch = input_from_batch
        self.dirpath = None if dirpath is None else Path(dirpath)
        self.filename, self.onnx_filename = _file_name(filename, "filename"), _file_name(onnx_filename, "onnx_filename")
        if builder_kwargs is not None and builder is None:
            raise ValueError("ASRCallback: builder_kwargs= needs builder= (the constructor they are passed to)")
        self.builder, self.builder_kwargs, self.metadata = builder, builder_kwargs, dict(metadata or {})
        self.onnx = _flag(onnx, "onnx")
        if tolerance is not None and (isinstance(tolerance, bool) or not isinstance(tolerance, (int, float))
                                      or not math.isfinite(tolerance) or tolerance < 0):
            raise ValueError(f"ASRCallback: tolerance must be a finite number >= 0 or None, got {tolerance!r}")
        self.tolerance = tolerance
        self.log_stripes = _flag(log_stripes, "log_stripes")
        self.stripe_every_n_epochs = _positive_int(stripe_every_n_epochs, "stripe_every_n_epochs")
        self.stripe_max_images = _positive_int(stripe_max_images, "stripe_max_images")
        self.stripe_layers = None if stripe_layers is None else [stripe_layers] if isinstance(stripe_layers, str) \
            else list(stripe_layers)
        self.stripe_statistics = self._checked_statistics(stripe_statistics)

        self.attach_report: AttachReport | None = None
        self.deployed: nn.Module | None = None
        self.verify_report: VerifyReport | None = None
        self.deployed_path: Path | None = None
        self.onnx_report: ExportReport | None = None
        self.stripes: StripeResult | None = None
        self.stripe_metrics: dict[str, float] = {}
        self._attached: weakref.ReferenceType[nn.Module] | None = None
        self._val_example: Inputs | None = None  # the first validation batch's inputs (CPU copies)
        self._train_example: Inputs | None = None  # the first training batch's, when no validation runs
        self._recorder: StripeRecorder | None = None

    # ------------------------------------------------------------------ options
    @staticmethod
    def _checked_attention(attention: Any) -> Any:
        if attention is None or callable(attention):
            return attention
        if isinstance(attention, str):
            _attention_named(attention)  # an unknown name fails here, listing the valid ones
            return attention
        raise TypeError(f"ASRCallback: attention must be a registered name, a callable channels -> "
                        f"ChannelAttention, or None, got {type(attention).__name__}")

    @staticmethod
    def _checked_statistics(statistics: Sequence[str]) -> tuple[str, ...]:
        chosen = (statistics,) if isinstance(statistics, str) else tuple(statistics)
        unknown = [s for s in chosen if s not in _KNOWN_STATISTICS]
        if unknown or not chosen:
            raise ValueError(f"ASRCallback: unknown stripe statistic(s) {unknown or '(none chosen)'}; "
                             f"choose from {', '.join(_KNOWN_STATISTICS)}")
        return chosen

    # ------------------------------------------------------------------ the network
    def _label(self, pl_module: pl.LightningModule) -> str:
        return type(pl_module).__name__ + (f".{self.module}" if self.module else "")

    def _target(self, pl_module: pl.LightningModule) -> nn.Module:
        """The network ASR goes into: ``pl_module`` or its submodule ``self.module``."""
        if self.module is None:
            return pl_module
        try:
            return pl_module.get_submodule(self.module)
        except AttributeError:
            children = ", ".join(name for name, _ in pl_module.named_children()) or "none"
            raise ValueError(
                f"ASRCallback(module={self.module!r}): {type(pl_module).__name__} has no submodule {self.module!r} "
                f"(its submodules: {children}). Name the attribute holding the network, built in __init__: "
                "callbacks' setup runs before LightningModule.setup and configure_model"
            ) from None

    def _owns(self, target: nn.Module) -> bool:
        return self._attached is not None and self._attached() is target

    def _attach(self, pl_module: pl.LightningModule, target: nn.Module) -> None:
        """Put ASR into ``target`` in place (or, with ``attention=None``, check it already has some)."""
        label = self._label(pl_module)
        if self.attention is None:
            if not has_foldable(target):
                raise ValueError(f"ASRCallback(attention=None): {label} has no ASR layer, so there is nothing to "
                                 "fold; pass an attention (e.g. 'se') to attach ASR")
        else:
            existing = asr_layers(target)
            if existing:
                raise ValueError(
                    f"ASRCallback: {label} already has {len(existing)} ASR layer(s) (e.g. {existing[0][0]!r}); "
                    "pass attention=None to fold, verify and save them without attaching more"
                )
            try:
                attached = attach(
                    target, self.attention, where=self.where, every=self.every, include=self.include,
                    exclude=self.exclude, both=self.both, psi_init=self.psi_init, inplace=True,
                    example_inputs=self.example_input, return_report=True, preserve_outputs=self.preserve_outputs,
                    **self.attention_kwargs,
                )
            except (ValueError, TypeError) as e:
                raise ValueError(f"ASRCallback could not attach ASR to {label}: {e}") from None
            self.attach_report = attached[1] if isinstance(attached, tuple) else None  # (model, report)
        self._attached = weakref.ref(target)

    def _dirpath(self, trainer: pl.Trainer) -> Path:
        return self.dirpath if self.dirpath is not None else Path(trainer.default_root_dir) / "foldattn"

    def _check_fit(self, trainer: pl.Trainer, pl_module: pl.LightningModule, target: nn.Module) -> None:
        """What would otherwise fail after training: the output folder, the ONNX packages, the stripe sites."""
        check_output_folder(self._dirpath(trainer), "ASRCallback dirpath")
        if self.onnx:
            require("onnx", "onnx")
            require("onnxruntime", "onnx")
        if self.log_stripes:
            self._check_stripes(pl_module, target)
            if not trainer.loggers:
                rank_zero_warn("ASRCallback(log_stripes=True): the trainer has no logger; the statistics are kept in "
                               "the callback's `stripes` and `stripe_metrics` only")

    def _check_stripes(self, pl_module: pl.LightningModule, target: nn.Module) -> None:
        try:
            sites = find_attention(target)
        except NoAttentionError:
            raise ValueError(
                f"ASRCallback(log_stripes=True): {self._label(pl_module)} has no input-dependent channel attention "
                "to record. ASR layers are constant by construction (their input is psi, not the data); pass "
                "both=True (ASR(X) + X: the classic X is recorded) or use a model with attention modules of its own"
            ) from None
        try:
            select_sites(sites, self.stripe_layers)
        except ValueError as e:
            raise ValueError(f"ASRCallback(stripe_layers={self.stripe_layers!r}): {e}") from None

    # ------------------------------------------------------------------ batches
    def _inputs(self, batch: Any) -> Inputs:
        value = self.input_from_batch(batch) if self.input_from_batch is not None else _default_input(batch)
        return _as_inputs(value, "the model input taken from a batch")

    def _example(self, label: str) -> tuple[Inputs, str]:
        """The inputs to verify and export on, and where they come from."""
        if self.example_input is not None:
            return self.example_input, "example_input"
        if self._val_example is not None:
            return self._val_example, "the first validation batch"
        if self._train_example is not None:
            return self._train_example, "the first training batch"
        raise ValueError(f"ASRCallback: no batch to verify the folded {label} on (no validation or training batch "
                         "ran); pass example_input=<an input batch>")

    # ------------------------------------------------------------------ stripes
    def _stripes_due(self, trainer: pl.Trainer) -> bool:
        return (self.log_stripes and trainer.is_global_zero and not trainer.sanity_checking
                and trainer.state.fn == "fit" and (trainer.current_epoch + 1) % self.stripe_every_n_epochs == 0)

    @torch.no_grad()
    def _record(self, pl_module: pl.LightningModule, args: Inputs) -> None:
        """One extra pass of the target over (the first of) ``args``, hooks installed for that pass only."""
        recorder = self._recorder
        assert recorder is not None
        room = self.stripe_max_images - recorder.num_images
        if room <= 0:
            return
        target = self._target(pl_module)
        args = _like_model(_rows(args, room), target)
        with eval_mode(target):
            recorder.attach()
            try:
                target(*args)
            except (RuntimeError, ValueError, TypeError) as e:
                recorder.discard()
                raise ValueError(f"ASRCallback: {self._label(pl_module)} cannot run on validation inputs of shape "
                                 f"{_shapes(args)} to record stripes: {first_line(e)} (pass input_from_batch=)") \
                    from None
            finally:
                recorder.detach()
        recorder.step(int(args[0].shape[0]))

    def _log_stripes(self, trainer: pl.Trainer, result: StripeResult) -> None:
        metrics: dict[str, float] = {}
        for layer in result.layers:
            summary = layer.summary()
            for statistic in self.stripe_statistics:
                value = float(summary[statistic])
                if math.isfinite(value):
                    metrics[f"stripe/{layer.name}/{statistic}"] = value
        for logger in trainer.loggers if metrics else ():
            logger.log_metrics(metrics, step=trainer.global_step)
            logger.save()  # as Lightning does after logging: buffered loggers (CSVLogger) write now
        self.stripes, self.stripe_metrics = result, metrics

    # ------------------------------------------------------------------ fold, verify, save
    def _verify(self, target: nn.Module, deployed: nn.Module, label: str) -> VerifyReport:
        example, source = self._example(label)
        try:
            return verify(target, deployed, _like_model(example, target), tolerance=self.tolerance)
        except EquivalenceError as e:
            raise FoldVerificationError(
                f"ASRCallback: the folded {label} does not compute what the trained one computes on {source} "
                f"(inputs {_shapes(example)}): {e}. Nothing was saved; the trained model is unchanged"
            ) from None

    def _save(self, trainer: pl.Trainer, target: nn.Module, report: VerifyReport) -> None:
        out = make_output_folder(self._dirpath(trainer), "ASRCallback dirpath")
        example, source = self._example("model")
        info = {"epoch": trainer.current_epoch, "global_step": trainer.global_step,
                "verify": {"max_abs": report.max_abs, "max_rel": report.max_rel, "tolerance": report.tolerance,
                           "dtype": str(report.dtype).removeprefix("torch."), "inputs": source}}
        self.deployed_path = save_deployed(target, out / self.filename, self.builder, self.builder_kwargs,
                                           metadata={**self.metadata, "lightning": info})
        if self.onnx:
            self.onnx_report = export_onnx(target, _like_model(example, target), out / self.onnx_filename)

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Attach ASR (before ``configure_optimizers``) unless this callback already did; check the options."""
        target = self._target(pl_module)
        if not self._owns(target):
            self._attach(pl_module, target)
        if stage == "fit":
            self._val_example = self._train_example = None
            self._check_fit(trainer, pl_module, target)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        """Keep the first training batch's inputs: what is verified on when no validation batch runs."""
        if self._train_example is None and self.example_input is None:
            self._train_example = _detached(self._inputs(batch))

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start a stripe recording when one is due."""
        self._recorder = StripeRecorder(self._target(pl_module), self.stripe_layers, max_samples=0) \
            if self._stripes_due(trainer) else None

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        """Keep the first validation batch's inputs (for the fold check); record stripes on them when due."""
        if self._val_example is None and self.example_input is None and trainer.state.fn == "fit":
            self._val_example = _detached(self._inputs(batch))
        if self._recorder is not None:
            self._record(pl_module, self._inputs(batch))

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log the recorded statistics."""
        recorder, self._recorder = self._recorder, None
        if recorder is not None and recorder.num_images:
            result = recorder.result({"epoch": trainer.current_epoch + 1, "global_step": trainer.global_step})
            self._log_stripes(trainer, result)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Fold a copy, verify it, save it (and ONNX); global rank zero only."""
        if not trainer.is_global_zero:
            return
        target, label = self._target(pl_module), self._label(pl_module)
        deployed = fold(target)
        self.verify_report = self._verify(target, deployed, label)
        self.deployed = deployed
        self._save(trainer, target, self.verify_report)
