"""The training configuration: one declaration, from which every way of setting it is derived.

- :class:`TrainConfig` holds every choice that shapes a run (stored in the checkpoint, so that
  ``--resume`` refuses other settings). Its fields and :class:`~toptagger.images.ImageConfig`'s
  carry their help text; :func:`add_arguments` turns them into ``python -m toptagger.training``'s
  flags and :func:`from_arguments` back into a config; :func:`to_arguments` is the inverse (the
  flags of a config, e.g. for a TrainJob's ``torchrun -m toptagger.training`` command).
- :meth:`TrainConfig.from_pipeline` is the one mapping from the pipeline's training parameters
  (names a KFP user sees, e.g. ``learning_rate``) onto the config. Its keyword parameters are the
  list of those parameters (:data:`PIPELINE_PARAMETERS`): the train component and the pipeline
  declare them with the same names and types, which ``tests/toptagger/training/test_config.py``
  checks, and ``python -m pipelines.run`` takes its flags from the pipeline itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
from dataclasses import asdict, dataclass, field
from typing import Any

from toptagger.cli import positive_int
from toptagger.errors import ConfigError
from toptagger.images import ImageConfig
from toptagger.model import TaggerConfig

# The images the project trains on unless told otherwise: the landscape paper's preprocessing
# (centroid, rotation, flip, normalisation), which beats the paper's axis-centred images at these
# training sizes (docs/images_training.md), at ImageConfig's default size (toptagger.constants.IMAGE_SIZE).
DEFAULT_IMAGE = ImageConfig(center="centroid", rotate=True, flip=True, normalize=True)


# Autocast choices; "bf16" also runs on CPU, so the half-precision path is tested without a GPU.
AMP_MODES: tuple[str, ...] = ("auto", "bf16", "fp16", "off")


def _option(default: Any, help: str, **metadata: Any) -> Any:
    return field(default=default, metadata={"help": help, **metadata})


@dataclass(frozen=True)
class TrainConfig:
    """Every choice that shapes a training run; stored in the checkpoint to guard ``--resume``."""

    image: ImageConfig = field(default_factory=lambda: DEFAULT_IMAGE)
    in_channels: int = _option(3, "image channels the network takes (the paper's 3 copies, or 1)", choices=(1, 3))
    weights: str | None = _option(None, "initial weights: file, s3:// or models:/name@alias (default: from scratch)")
    epochs: int = _option(10, "maximum epochs (early stopping may end sooner)", type=positive_int)
    batch_size: int = _option(32, "jets per training step", type=positive_int)
    lr: float = _option(1e-3, "AdamW learning rate (cosine schedule)")
    weight_decay: float = _option(1e-4, "AdamW weight decay")
    patience: int = _option(3, "early-stopping patience in epochs", type=positive_int)
    seed: int = _option(0, "seeds the split, initialisation and batch order")
    val_fraction: float = _option(0.15, "share of --data used for validation")
    test_fraction: float = _option(0.15, "share of --data held out (untouched) for testing")
    max_steps_per_epoch: int | None = _option(None, "cap on batches per epoch (quick runs)", type=positive_int)
    amp: str = _option(
        "auto",
        "mixed precision: auto (bf16, else fp16 with a grad scaler, on CUDA; none on CPU), bf16 (also on CPU), "
        "fp16 (CUDA) or off",
        choices=AMP_MODES,
    )
    # A separate validation file (path or s3://), e.g. the reference dataset's val.h5: then all of
    # the training data trains and the fractions are not used. Kept here so --resume checks it.
    val_data: str | None = _option(
        None, "separate validation jets (path or s3://, e.g. the reference val.h5): all of --data trains"
    )

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "patience"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            raise ConfigError(f"max_steps_per_epoch must be >= 1, got {self.max_steps_per_epoch}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        check_fractions(self.val_fraction, self.test_fraction)
        if self.amp not in AMP_MODES:
            raise ConfigError(f"amp must be one of {AMP_MODES}, got {self.amp!r}")

    @property
    def tagger(self) -> TaggerConfig:
        return TaggerConfig(image=self.image, in_channels=self.in_channels)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_pipeline(
        cls,
        *,
        image_size: int,
        epochs: int,
        batch_size: int,
        learning_rate: float,
        seed: int,
        base_model_uri: str,
        val_fraction: float,
        test_fraction: float,
        max_steps_per_epoch: int,
        patience: int,
    ) -> TrainConfig:
        """The config of the pipeline's training parameters (the test jets were split off by preprocess).

        The pipeline's fractions are shares of the whole sample; the train step sees only the fit
        jets (train + validation), so its validation share is ``val_fraction / (1 - test_fraction)``.
        KFP parameters cannot be None: ``max_steps_per_epoch=0`` means whole epochs and an empty
        ``base_model_uri`` training from scratch.
        """
        if not 0 <= test_fraction < 1 or not 0 < val_fraction < 1 - test_fraction:
            raise ConfigError(f"need 0 < val_fraction < 1 - test_fraction, got {val_fraction} and {test_fraction}")
        if max_steps_per_epoch < 0:
            raise ConfigError(f"max_steps_per_epoch must be >= 0 (0: whole epochs), got {max_steps_per_epoch}")
        return cls(
            image=dataclasses.replace(DEFAULT_IMAGE, image_size=image_size),
            weights=base_model_uri or None,
            epochs=epochs,
            batch_size=batch_size,
            lr=learning_rate,
            patience=patience,
            seed=seed,
            val_fraction=val_fraction / (1 - test_fraction),
            test_fraction=0.0,
            max_steps_per_epoch=max_steps_per_epoch or None,
        )


# The pipeline's training parameters, in order: the keyword parameters of from_pipeline.
PIPELINE_PARAMETERS: tuple[str, ...] = tuple(inspect.signature(TrainConfig.from_pipeline).parameters)


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    if not (0 < val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ConfigError(
            f"need 0 < val_fraction, 0 <= test_fraction and val + test < 1, got {val_fraction} and {test_fraction}"
        )


# --------------------------------------------------------------------------------------------
# Command-line flags, derived from the fields

_TYPES: dict[str, type] = {"int": int, "float": float, "str": str, "int | None": int, "str | None": str}


def _add(group: argparse._ArgumentGroup, spec: dataclasses.Field, default: Any) -> None:
    flag = "--" + spec.name.replace("_", "-")
    meta = spec.metadata
    if spec.type == "bool":
        group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=meta["help"])
        return
    kind = meta.get("type") or _TYPES[str(spec.type)]
    group.add_argument(flag, type=kind, default=default, choices=meta.get("choices"), help=meta["help"])


def add_arguments(
    parser: argparse.ArgumentParser, defaults: TrainConfig | None = None, only: tuple[str, ...] | None = None
) -> None:
    """A flag per field of :class:`TrainConfig` and of its :class:`ImageConfig` (``--image-size``, ``--lr``).

    ``defaults`` sets other defaults (a benchmark's); ``only`` limits the flags to these field names.
    """
    defaults = defaults or TrainConfig()
    wanted = (lambda name: name in only) if only is not None else (lambda name: True)
    images = parser.add_argument_group("images")
    for spec in dataclasses.fields(ImageConfig):
        if wanted(spec.name):
            _add(images, spec, getattr(defaults.image, spec.name))
    training = parser.add_argument_group("training")
    for spec in dataclasses.fields(TrainConfig):
        if spec.name != "image" and wanted(spec.name):
            _add(images if spec.name == "in_channels" else training, spec, getattr(defaults, spec.name))


def from_arguments(args: argparse.Namespace, defaults: TrainConfig | None = None) -> TrainConfig:
    """The config of parsed :func:`add_arguments` flags; fields without a flag keep ``defaults``."""
    defaults = defaults or TrainConfig()
    given = vars(args)
    image = dataclasses.replace(
        defaults.image, **{f.name: given[f.name] for f in dataclasses.fields(ImageConfig) if f.name in given}
    )
    values = {f.name: given[f.name] for f in dataclasses.fields(TrainConfig) if f.name != "image" and f.name in given}
    return dataclasses.replace(defaults, image=image, **values)


def _flags(spec: dataclasses.Field, value: Any) -> list[str]:
    flag = "--" + spec.name.replace("_", "-")
    if spec.type == "bool":
        return [flag if value else "--no-" + flag[2:]]
    if value is None:
        if spec.default is not None:
            raise ConfigError(f"{spec.name}=None cannot be given as a flag (its default is {spec.default!r})")
        return []  # None is the flag's default
    return [flag, repr(value) if isinstance(value, float) else str(value)]


def to_arguments(config: TrainConfig) -> list[str]:
    """The ``python -m toptagger.training`` flags that reproduce ``config`` (the inverse of :func:`from_arguments`).

    Every setting is spelled out, so the command means the same if a default changes later;
    floats are written with ``repr``, which reads back exactly.
    """
    args: list[str] = []
    for spec in dataclasses.fields(ImageConfig):
        args += _flags(spec, getattr(config.image, spec.name))
    for spec in dataclasses.fields(TrainConfig):
        if spec.name != "image":
            args += _flags(spec, getattr(config, spec.name))
    return args
