"""Where a model comes from: a name, a run folder, a checkpoint (foldattn's, timm ``train.py``'s,
Lightning's, a state dict) or a deployed file, with its preprocessing and the choice of EMA weights.

Every command that takes a model gets it here: ``train`` builds by name (:func:`foldattn.builders.model_by_name`),
``fold``/``export``/``eval``/``quantize``/``stripe``/``calibrate`` read what they are given
(:func:`load_source`), ``bench`` builds timm and torchvision models by name. A name is checked against
its library's list (foldattn's registry, ``torchvision.models.list_models()``, ``timm.list_models()``)
and built without pretrained weights; files are read with every check :mod:`foldattn.train.checkpoint`
and :mod:`foldattn.deploy` apply.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from .config import TrainConfig

__all__ = ["Source", "load_source", "check_recorded_dataset", "MAX_LISTED"]

#: entries read from a recorded dataset folder before it is refused (a class tree has at most 2^20 classes)
MAX_LISTED = (1 << 20) + 16


@dataclass
class Source:
    """A model read from a file, and what the file says about it.

    ``kind``: ``"checkpoint"`` (foldattn), ``"foreign"`` (another trainer's, described by a config),
    ``"deployed"``; ``blob``: the checkpoint (or a checkpoint-like dict: ``run`` with ``classes``,
    ``image_size``, ``preprocessing``); ``weights``: ``"model"``, ``"ema"`` or ``"deployed"``.
    """

    model: nn.Module
    kind: str
    path: Path
    config: TrainConfig | None
    blob: dict[str, Any] = field(default_factory=dict)

    @property
    def weights(self) -> str:
        return str(self.blob.get("weights", "deployed" if self.kind == "deployed" else "model"))

    @property
    def preprocessing(self) -> dict[str, Any] | None:
        pre = (self.blob.get("run") or {}).get("preprocessing")
        return pre if isinstance(pre, dict) else None

    @property
    def classes(self) -> int | None:
        classes = (self.blob.get("run") or {}).get("classes")
        return int(classes) if isinstance(classes, int) else None


def load_source(path: str | os.PathLike[str], *, which: str = "last", ema: bool | None = None,
                foreign: TrainConfig | None = None, num_classes: int | None = None,
                image_size: int | None = None) -> Source:
    """The model in ``path``: a run folder (its ``which``.pt), a foldattn checkpoint, another trainer's
    checkpoint described by ``foreign`` (the architecture and attach options that built it), or a deployed
    ``.safetensors`` file. ``ema``: the EMA weights (None: a foldattn run's when present)."""
    from .checkpoint import CheckpointError, checkpoint_in
    from .model import load_foreign, load_trained

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist: no run folder, checkpoint or deployed file there")
    if p.suffix == ".safetensors" and foreign is None:
        from ..deploy import load_deployed, read_metadata

        meta = read_metadata(p)
        found = meta.get("user")
        user = found if isinstance(found, dict) else {}
        pre = user.get("preprocessing") if isinstance(user.get("preprocessing"), dict) else None
        run: dict[str, Any] = {"preprocessing": pre} if pre else {}
        size = pre.get("size") if pre else None
        if isinstance(size, list) and len(size) == 2 and all(isinstance(s, int) and 1 <= s <= 8192 for s in size):
            run["image_size"] = size  # the example batch's size (bounded again before it is made)
        return Source(load_deployed(p), "deployed", p, None, {"run": run, "weights": "deployed"})
    if foreign is not None:
        if p.is_dir():
            raise ValueError(f"{p} is a folder; with --model give the checkpoint file")
        model, cfg, blob = load_foreign(p, foreign, num_classes, image_size, bool(ema))
        return Source(model, "foreign", p, cfg, blob)
    try:
        file = checkpoint_in(p, which)
    except CheckpointError:
        raise
    model, cfg, blob = load_trained(file, ema)
    return Source(model, "checkpoint", file, cfg, blob)


def _folders(path: Path) -> set[str]:
    """The visible sub-folder names of ``path``: one listing, at most :data:`MAX_LISTED` entries read."""
    names: set[str] = set()
    with os.scandir(path) as it:
        for i, entry in enumerate(it):
            if i >= MAX_LISTED:
                raise ValueError(f"{path} holds more than {MAX_LISTED:,} entries: not an image-class tree")
            if not entry.name.startswith(".") and entry.is_dir():
                names.add(entry.name)
    return names


def check_recorded_dataset(spec: str, run: Mapping[str, Any] | None, where: str) -> None:
    """Refuse a dataset path a file recorded (a checkpoint's ``imagefolder:PATH``) unless that folder holds
    the run's classes, checked from one listing of it (two for a ``train/`` + ``val/`` layout) before
    any image is opened: a path read from a file is a record, not something to walk on its word.

    Registered names (``digits``, ``cifar10``, ...) read fixed file names under ``--data-dir`` and pass.
    Raises ``ValueError`` naming the path and telling the user to pass ``--dataset``.
    """
    name, _, arg = spec.partition(":")
    if name != "imagefolder" or not arg:
        return
    hint = "pass --dataset imagefolder:PATH (or another dataset) to name the data yourself"
    path = Path(arg)
    try:
        if not path.is_dir():
            raise ValueError(f"{where} records the dataset {spec}, which is not a folder on this machine; {hint}")
        top = _folders(path)
        split = "train" in top and top <= {"train", "val", "test"}
        classes = sorted(_folders(path / "train") if split else top)
    except OSError as e:
        raise ValueError(f"{where} records the dataset {spec}, which cannot be listed ({e.strerror or e}); "
                         f"{hint}") from None
    run = run or {}
    names, count = run.get("class_names"), run.get("classes")
    if isinstance(names, list):
        if classes != sorted(names):
            shown = ", ".join(classes[:5]) + (", ..." if len(classes) > 5 else "")
            raise ValueError(f"{where} records the dataset {spec}, whose {len(classes):,} sub-folders ({shown}) are "
                             f"not the run's {len(names)} classes; {hint}")
    elif isinstance(count, int):
        if len(classes) != count:
            raise ValueError(f"{where} records the dataset {spec}, which has {len(classes):,} class folders, not "
                             f"the run's {count}; {hint}")
    else:
        raise ValueError(f"{where} records the dataset {spec} but not its classes, so the folder cannot be checked; "
                         f"{hint}")
