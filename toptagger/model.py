"""ResNet-50 top tagger: architecture, weights from a URI, pickle-free saving, and scoring.

Architecture and weights are kept apart, as in torchvision: :func:`build_model` makes an
initialised network from a :class:`TaggerConfig`; :func:`load_weights` fills it from a weights URI:

- a local file or folder;
- ``s3://bucket/key`` (through :mod:`toptagger.storage`);
- an MLflow registry URI, ``models:/name@alias`` or ``models:/name/version``.

A file may be ``.safetensors`` or a torch state_dict (``.pt``/``.pth``, read with
``weights_only=True``: nothing is ever unpickled). A torchvision ImageNet ResNet-50 state_dict, as
used for transfer learning in Duarte et al. (2019), loads with its backbone; its 1000-class head
is skipped and re-initialised, and the log names every skipped tensor. For 1-channel input the
RGB filters of the first convolution are summed, which gives the same response to a grey image.

:func:`save_model` writes ``model.safetensors`` plus ``tagger.json`` (architecture and every
image option), so that serving rebuilds exactly the preprocessing the model was trained with.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

from toptagger import storage
from toptagger.errors import ConfigError, DataError, StorageError
from toptagger.images import ImageConfig
from toptagger.model_uri import fetch

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "tagger.json"
HEAD_PREFIX = "fc."
STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin")
FORMAT_VERSION = 1


@dataclass(frozen=True)
class TaggerConfig:
    """Everything needed to rebuild the network and its input images."""

    image: ImageConfig = field(default_factory=ImageConfig)
    in_channels: int = 3
    num_classes: int = 2
    arch: str = "resnet50"

    def __post_init__(self) -> None:
        if self.arch != "resnet50":
            raise ConfigError(f"unknown architecture {self.arch!r}; only 'resnet50' is implemented")
        if self.in_channels not in (1, 3):
            raise ConfigError(f"in_channels must be 1 or 3, got {self.in_channels!r}")
        if self.num_classes != 2:
            raise ConfigError(f"the tagger has 2 classes (QCD, top), got num_classes={self.num_classes!r}")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["format_version"] = FORMAT_VERSION
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TaggerConfig:
        data = dict(data)
        version = data.pop("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ConfigError(f"tagger config format {version} is not supported (this code reads {FORMAT_VERSION})")
        unknown = set(data) - {"image", "in_channels", "num_classes", "arch"}
        if unknown:
            raise ConfigError(f"unknown tagger config field(s) {sorted(unknown)}")
        image = ImageConfig.from_dict(data.pop("image", {}))
        return cls(image=image, **data)


class JetTagger(ResNet):
    """torchvision's ResNet-50 with a 2-class head; takes ``[N, 1, S, S]`` jet images.

    Subclassing (rather than wrapping) keeps torchvision's state_dict names, so ImageNet files
    load without renaming. Adaptive pooling makes any input size work; 32 pixels or more keep
    the last stage's feature map at least 1x1 without padding artefacts.
    """

    def __init__(self, config: TaggerConfig) -> None:
        super().__init__(Bottleneck, [3, 4, 6, 3], num_classes=config.num_classes)
        self.config = config
        if config.in_channels == 1:
            self.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
            nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 1:
            raise DataError(f"expected jet images of shape [N, 1, S, S], got {list(images.shape)}")
        if self.config.in_channels == 3:
            images = images.expand(-1, 3, -1, -1)  # the paper's 3 identical channels, as a view
        return super().forward(images)


def build_model(config: TaggerConfig) -> JetTagger:
    """A freshly initialised tagger (no weights loaded)."""
    return JetTagger(config)


def load_weights(model: JetTagger, uri: str | os.PathLike[str] | None) -> list[str]:
    """Fill ``model`` from the weights at ``uri``; returns the names of the skipped head tensors.

    ``None`` or ``""`` leaves the random initialisation (training from scratch) and says so.
    Raises :class:`StorageError` when nothing is at ``uri`` and :class:`DataError` when the file
    is not a state_dict or its backbone does not match the architecture.
    """
    if uri is None or str(uri) == "":
        log.info("no weights given: training %s from scratch (random initialisation)", model.config.arch)
        return []
    state = read_state_dict(_weights_file(fetch(uri), str(uri)), str(uri))
    return _load_matching(model, state, str(uri))


def _load_matching(model: JetTagger, state: Mapping[str, torch.Tensor], source: str) -> list[str]:
    own = model.state_dict()
    adapted = dict(state)
    conv = adapted.get("conv1.weight")
    if conv is not None and conv.ndim == 4 and conv.shape[1] == 3 and own["conv1.weight"].shape[1] == 1:
        adapted["conv1.weight"] = conv.sum(dim=1, keepdim=True)
        log.info("%s: summed conv1 weights over the 3 input channels for 1-channel images", source)
    skipped = sorted(
        k for k in own if k.startswith(HEAD_PREFIX) and (k not in adapted or adapted[k].shape != own[k].shape)
    )
    missing = sorted(k for k in own if not k.startswith(HEAD_PREFIX) and k not in adapted)
    unexpected = sorted(k for k in adapted if k not in own)
    mismatched = sorted(
        f"{k} {list(adapted[k].shape)} (model: {list(own[k].shape)})"
        for k in own
        if not k.startswith(HEAD_PREFIX) and k in adapted and adapted[k].shape != own[k].shape
    )
    if missing or unexpected or mismatched:
        parts = []
        for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
            if names:
                parts.append(f"{len(names)} {label} (e.g. {', '.join(names[:3])})")
        raise DataError(f"{source}: weights do not match the {model.config.arch} backbone: {'; '.join(parts)}")
    load = {k: v for k, v in adapted.items() if k not in skipped}
    model.load_state_dict(load, strict=False)
    if skipped:
        log.info(
            "%s: loaded the backbone; skipped and re-initialised the head: %s",
            source,
            ", ".join(f"{k} {list(state[k].shape) if k in state else '(absent)'}" for k in skipped),
        )
        model.fc.reset_parameters()
    else:
        log.info("%s: loaded all %d tensors", source, len(load))
    return skipped


def read_state_dict(path: Path, source: str) -> dict[str, torch.Tensor]:
    """A flat name -> tensor mapping from a safetensors or torch file, never unpickling objects."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise DataError(f"{source}: not a readable safetensors file ({exc})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types (UnpicklingError, RuntimeError, ...)
        raise DataError(f"{source}: not a torch state_dict readable with weights_only=True ({exc})") from None
    # Training checkpoints keep the state_dict under "model"; common exports use "state_dict".
    for key in ("model", "state_dict"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DataError(f"{source}: expected a mapping of tensor names to tensors (a state_dict)")
    return dict(state)


def _weights_file(path: Path, source: str) -> Path:
    if path.is_dir():
        candidates = [path / WEIGHTS_FILE, *sorted(p for p in path.iterdir() if p.suffix in STATE_DICT_SUFFIXES)]
        for candidate in candidates:
            if candidate.is_file():
                return candidate
        raise StorageError(f"{source}: folder holds no {WEIGHTS_FILE} or *.pt/*.pth weights file")
    if not path.is_file():
        raise StorageError(f"{source}: no such weights file")
    return path


def save_model(model: JetTagger, directory: str | os.PathLike[str]) -> Path:
    """Write ``model.safetensors`` and ``tagger.json`` into ``directory`` (created), atomically per file."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with storage.atomic_output(directory / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp), metadata={"arch": model.config.arch})
    with storage.atomic_output(directory / CONFIG_FILE) as tmp:
        tmp.write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
    return directory


def load_model(uri: str | os.PathLike[str]) -> JetTagger:
    """Rebuild a saved tagger (folder with ``tagger.json`` + weights; local, s3:// or models:/)."""
    source = str(uri)
    path = fetch(source)
    config = read_config(path if path.is_dir() else path.parent)
    state = read_state_dict(_weights_file(path, source), source)
    # Every weight is then overwritten: the initialisation must not consume the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        model = build_model(config)
    skipped = _load_matching(model, state, source)
    if skipped:
        raise DataError(f"{source}: a saved tagger must include its head, but {skipped} did not fit")
    return model.eval()


def read_config(directory: str | os.PathLike[str]) -> TaggerConfig:
    """The :class:`TaggerConfig` of a saved tagger folder, without loading its weights."""
    config_path = Path(directory) / CONFIG_FILE
    if not config_path.is_file():
        raise StorageError(f"{directory}: no {CONFIG_FILE} beside the weights; cannot rebuild the preprocessing")
    try:
        return TaggerConfig.from_dict(json.loads(config_path.read_text()))
    except (json.JSONDecodeError, TypeError) as exc:
        raise DataError(f"{config_path}: not a valid tagger config ({exc})") from None


@torch.no_grad()
def score_jets(
    model: JetTagger,
    constituents: np.ndarray,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    logits: bool = False,
) -> np.ndarray:
    """Top probability (or top-minus-QCD logit) of each jet, rendering images batch by batch."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    model.eval().to(device)
    out = np.empty(len(constituents), dtype=np.float64)
    for start in range(0, len(constituents), batch_size):
        chunk = torch.from_numpy(np.ascontiguousarray(constituents[start : start + batch_size])).to(device)
        result = model(model.config.image.render(chunk)).double()
        value = result[:, 1] - result[:, 0] if logits else torch.softmax(result, dim=1)[:, 1]
        out[start : start + len(chunk)] = value.cpu().numpy()
    return out
