"""Published DaViT weights, with the metadata needed to use them (preprocessing, reported accuracy, license).

Tags follow timm: ``<model>.<source>_<data>``. Files are fetched with huggingface_hub, so its cache, ``HF_HOME`` and
offline mode (``HF_HUB_OFFLINE=1``) apply. Only T/S/B ImageNet-1k weights and the two Florence-2 towers were ever
published; Large/Huge/Giant weights were not (dingmyu/davit issues #5, #8, #10).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .io import CheckpointError

__all__ = ["WEIGHTS", "WeightInfo", "list_weights", "resolve_pretrained"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class WeightInfo:
    """One published checkpoint.

    Attributes:
        tag: ``model.source_data``.
        hf_hub_id: the Hugging Face repository holding it.
        filenames: files to try in order within the repository.
        source: the key layout (see :data:`davit.weights.convert.SOURCES`).
        license: as published by the host.
        num_classes: classifier outputs (0: backbone only).
        img_size: evaluation input side.
        crop_pct: centre-crop fraction at evaluation (resize to img_size / crop_pct, then crop).
        interpolation: resize interpolation.
        mean, std: input normalisation.
        top1, top5: ImageNet-1k val accuracy reported for these exact weights (timm's re-evaluation), or None.
        params: parameter count of the model as loaded.
        cfg_overrides: DaViTConfig fields the weights need beyond the zoo default.
        local_path: a local file to use instead of the hub (tests, mirrors).
    """

    tag: str
    hf_hub_id: str
    filenames: tuple[str, ...] = ("model.safetensors",)
    source: str = "timm"
    license: str = "apache-2.0"
    num_classes: int = 1000
    img_size: int = 224
    crop_pct: float = 0.95
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    top1: float | None = None
    top5: float | None = None
    params: int | None = None
    cfg_overrides: dict[str, Any] = field(default_factory=dict)
    local_path: str | None = None

    @property
    def model(self) -> str:
        """The zoo name these weights belong to."""
        return self.tag.partition(".")[0]

    def metadata(self) -> dict[str, Any]:
        """Everything above as a plain dict (stored on the model as ``pretrained_cfg``)."""
        return asdict(self)

    def fetch(self) -> Path:
        """Local path of the checkpoint, downloading it through huggingface_hub if it is not cached.

        Raises:
            CheckpointError: offline / unreachable and not cached, with the ways to provide the file.
        """
        if self.local_path:
            return Path(self.local_path)
        from huggingface_hub import hf_hub_download

        for name in self.filenames:  # the cache first: instant, and all an offline machine can use
            try:
                return Path(hf_hub_download(self.hf_hub_id, name, local_files_only=True))
            except Exception:  # not cached under this name: try the next, then the network
                continue
        host = _hub_host()
        if not _reachable(host):
            # huggingface_hub would retry each file name for ~25 s before giving up; say it now
            why = f"{host} is not reachable from this machine (offline?)" if host else "HF_HUB_OFFLINE is set (offline)"
            raise CheckpointError(self._how_to(why + " and the file is not in the cache"))
        errors = []
        for name in self.filenames:
            try:
                return Path(hf_hub_download(self.hf_hub_id, name))
            except Exception as e:  # missing file, network: try the next name, then explain
                errors.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        raise CheckpointError(self._how_to("; ".join(errors)))

    def _how_to(self, why: str) -> str:
        return (
            f"could not get weights {self.tag} from the Hugging Face hub repo {self.hf_hub_id}: {why}. Download the "
            f"file where there is a connection (huggingface-cli download {self.hf_hub_id} {self.filenames[0]}) and "
            "pass its path: --weights /path/to/file (davit eval/predict/export), model.pretrained=/path/to/file (a "
            "recipe), create_model(name, pretrained='/path/to/file') (Python); or point HF_HOME at a cache that "
            "holds it"
        )


def _hub_host() -> str:
    import os
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return ""
    return urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"


def _reachable(host: str, timeout: float = 3.0) -> bool:
    """One TCP connection attempt to the hub (name resolution included), instead of minutes of HTTP retries."""
    import socket

    if not host:
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


_TIMM = dict(source="timm", license="apache-2.0", filenames=("model.safetensors", "pytorch_model.bin"))
_FLORENCE = dict(
    source="florence2",
    license="mit",
    filenames=("model.safetensors", "pytorch_model.bin"),
    num_classes=0,
    img_size=768,
    crop_pct=1.0,
)

WEIGHTS: dict[str, WeightInfo] = {
    w.tag: w
    for w in (
        WeightInfo(
            "davit_tiny.msft_in1k", "timm/davit_tiny.msft_in1k", top1=82.694, top5=96.264, params=28_360_168, **_TIMM
        ),
        WeightInfo(
            "davit_small.msft_in1k", "timm/davit_small.msft_in1k", top1=84.252, top5=96.942, params=49_745_896, **_TIMM
        ),
        WeightInfo(
            "davit_base.msft_in1k", "timm/davit_base.msft_in1k", top1=84.652, top5=97.020, params=87_954_408, **_TIMM
        ),
        WeightInfo("davit_base_fl.msft_florence2", "microsoft/Florence-2-base", **_FLORENCE),
        WeightInfo("davit_huge_fl.msft_florence2", "microsoft/Florence-2-large", **_FLORENCE),
    )
}

DEFAULT_TAGS = {w.model: w.tag for w in reversed(list(WEIGHTS.values()))}


def list_weights(model: str | None = None) -> list[str]:
    """Published weight tags, optionally only those of one zoo model."""
    return [t for t, w in WEIGHTS.items() if model is None or w.model == model]


def resolve_pretrained(model: str, pretrained: bool | str) -> WeightInfo:
    """Turn ``create_model``'s ``pretrained`` argument into a :class:`WeightInfo`.

    ``True`` means the model's default tag; a string is a tag (``"msft_in1k"`` or the full ``"davit_tiny.msft_in1k"``).
    Local paths are handled by the caller.
    """
    if pretrained is True:
        if model not in DEFAULT_TAGS:
            raise CheckpointError(
                f"no published weights for {model}: the authors released only davit_tiny/small/base (ImageNet-1k) "
                "and the Florence-2 towers (davit_base_fl, davit_huge_fl). Pass a local checkpoint path instead."
            )
        return WEIGHTS[DEFAULT_TAGS[model]]
    text = str(pretrained)
    tag = text if "." in text else f"{model}.{text}"
    if tag in WEIGHTS:
        if WEIGHTS[tag].model != model:
            raise CheckpointError(f"weights {tag} belong to {WEIGHTS[tag].model}, not {model}")
        return WEIGHTS[tag]
    if text.endswith((".pth", ".pt", ".bin", ".safetensors", ".tar")):
        raise FileNotFoundError(f"checkpoint not found: {text}")
    raise CheckpointError(
        f"unknown weights {text!r} for {model}; published: {', '.join(list_weights(model)) or 'none'}; "
        "or pass a local checkpoint path"
    )
