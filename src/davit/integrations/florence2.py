"""Florence-2 (transformers' ``Florence2ForConditionalGeneration``) with davit's vision tower.

    import davit.integrations.florence2 as fl2
    fl2.accelerate_florence2(model)                 # one line: the vision tower becomes ours, same image features
    fl2.export_image_encoder(model, "enc.xml")      # tower + projection (get_image_features) to OpenVINO / ONNX

The tower is rebuilt as a :class:`davit.DaViT` from the model's own ``vision_config`` and loaded with its weights
(transformers' ``Florence2VisionBackbone`` keys convert through :func:`davit.convert_state_dict`), so the swap needs
no download and works for any Florence-2 size. The swapped-in module returns what transformers' backbone returns
(``last_hidden_state``, the final NCHW map), so ``get_image_features``, ``forward`` and ``generate`` run unchanged.
By default it runs ``davit.optimize``'s path in float32 (image features equal to transformers' to float rounding);
``backend="openvino"`` / ``"onnxruntime"`` run the tower in those runtimes (:mod:`davit.runtime`), and
``dtype="bf16"`` computes in bfloat16 where the hardware has it.

transformers is an optional dependency here (``pip install transformers``); nothing is imported until called.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..models import DaViT, DaViTConfig
from ..weights import convert_state_dict, load_checkpoint

__all__ = [
    "DaViTVisionTower",
    "Florence2ImageEncoder",
    "accelerate_florence2",
    "davit_config_from_florence2",
    "davit_from_florence2",
    "export_image_encoder",
]

log = logging.getLogger(__name__)

# transformers' Florence2VisionConfig values that DaViT's Florence-2 layout (``davit_base_fl``) fixes: 7x7 stride-4
# stem with its norm after the conv, overlapped 3x3 stride-2 downsampling with the norm before.
_FIXED = {
    "patch_size": (7, 3, 3, 3),
    "patch_stride": (4, 2, 2, 2),
    "patch_padding": (3, 1, 1, 1),
    "patch_prenorm": (False, True, True, True),
}


def _vision_config(obj: Any) -> Any:
    """The ``Florence2VisionConfig`` of a Florence-2 model, its config, its vision tower, or the config itself."""
    cfg = getattr(obj, "config", obj)
    return getattr(cfg, "vision_config", cfg)


def davit_config_from_florence2(config: Any) -> DaViTConfig:
    """The :class:`davit.DaViTConfig` of a transformers Florence-2 vision tower (no head, no drop path).

    Args:
        config: a ``Florence2Config``, ``Florence2VisionConfig``, or a model holding either.

    Raises:
        ValueError: a layout DaViT does not build (naming the field).
    """
    vc = _vision_config(config)
    for name, want in _FIXED.items():
        got = tuple(getattr(vc, name, want))
        if got != want:
            raise ValueError(f"Florence-2 vision config {name}={got} is not DaViT's Florence-2 layout {want}")
    if tuple(vc.num_groups) != tuple(vc.num_heads):
        raise ValueError(f"Florence-2 vision config num_groups={vc.num_groups} differs from num_heads={vc.num_heads}")
    if getattr(vc, "activation_function", "gelu") != "gelu":
        raise ValueError(f"Florence-2 vision config activation_function={vc.activation_function!r}; DaViT uses gelu")
    return DaViTConfig(
        embed_dims=tuple(vc.embed_dim),
        depths=tuple(vc.depths),
        num_heads=tuple(vc.num_heads),
        window_size=int(vc.window_size),
        mlp_ratio=float(vc.mlp_ratio),
        qkv_bias=bool(vc.qkv_bias),
        in_chans=int(getattr(vc, "in_channels", 3)),
        num_classes=0,
        downsample_kernel=3,
        channel_attn_v2=True,
        drop_path_rate=0.0,
    )


def davit_from_florence2(model: Any) -> DaViT:
    """Our reference :class:`davit.DaViT` with the weights of a Florence-2 model's vision tower (float32, on the
    tower's device, eval mode).

    Args:
        model: a ``Florence2ForConditionalGeneration`` / ``Florence2Model``, or its ``Florence2VisionBackbone``.
    """
    tower = _hf_tower(model)
    p0 = next(tower.parameters())
    ours = DaViT(davit_config_from_florence2(tower.config)).to(p0.device)
    # The converter recognises transformers' layout by its full key path.
    state = {"model.vision_tower." + k: v.float() for k, v in tower.state_dict().items()}
    load_checkpoint(ours, convert_state_dict(state))
    return ours.eval()


def _hf_tower(model: Any) -> nn.Module:
    inner = getattr(model, "model", model)
    tower = getattr(inner, "vision_tower", model)
    if isinstance(tower, DaViTVisionTower):
        raise ValueError("this Florence-2 model's vision tower is already davit's; pass the original model")
    if not hasattr(tower, "convs") or not hasattr(tower, "blocks"):
        raise ValueError(f"expected a Florence-2 model or its vision tower, got {type(model).__name__}")
    return tower


class _FinalMap(nn.Module):
    """DaViT's last feature map (NCHW, no norm): what transformers' ``Florence2VisionBackbone`` returns."""

    def __init__(self, model: DaViT) -> None:
        super().__init__()
        self.model = model

    @property
    def cfg(self) -> DaViTConfig:
        return self.model.cfg

    def forward(self, x: Tensor) -> Tensor:
        return self.model.forward_features(x)


class DaViTVisionTower(nn.Module):
    """Drop-in for transformers' ``Florence2VisionBackbone``: ``forward(pixel_values)`` returns a
    ``BaseModelOutputWithPooling`` whose ``last_hidden_state`` is the final NCHW map, in ``out_dtype``.

    Attributes:
        reference: our reference DaViT tower (float32, the weights; for export and inspection).
        fast: the inference module that runs it (``davit.optimize``'s, or a :class:`davit.runtime.RuntimeModel`).
        out_dtype: the dtype transformers' projection expects (the replaced tower's).
    """

    def __init__(self, reference: DaViT, fast: nn.Module, out_dtype: torch.dtype, config: Any = None) -> None:
        super().__init__()
        self.reference = reference
        self.fast = fast
        self.out_dtype = out_dtype
        self.config = config

    def forward(self, pixel_values: Tensor, **kwargs: Any) -> Any:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        feats = self.fast(pixel_values)
        return BaseModelOutputWithPooling(last_hidden_state=feats.to(pixel_values.device, self.out_dtype))


def accelerate_florence2(
    model: Any, *, dtype: torch.dtype | str | None = None, backend: str = "torch", example_input: Tensor | None = None
) -> Any:
    """Swap a Florence-2 model's vision tower for davit's, in place, and return the model.

    Args:
        model: a transformers ``Florence2ForConditionalGeneration`` (or ``Florence2Model``).
        dtype: None / fp32 (image features equal to transformers' to float rounding) or bf16 (where native).
        backend: ``"torch"`` (``davit.optimize``), ``"openvino"`` or ``"onnxruntime"`` (:mod:`davit.runtime`).
        example_input: a representative ``pixel_values`` batch: pays one-time costs now and checks the new tower
            against ours in eager fp32.

    Returns:
        ``model``, whose ``vision_tower`` is now a :class:`DaViTVisionTower`.
    """
    from .. import optimize
    from ..runtime import BACKENDS, to_runtime

    if backend not in ("torch", *BACKENDS):
        raise ValueError(f"unknown backend {backend!r}; use 'torch', 'openvino' or 'onnxruntime'")
    inner = getattr(model, "model", model)
    tower = _hf_tower(model)
    out_dtype = next(tower.parameters()).dtype
    ours = davit_from_florence2(tower)
    head = _FinalMap(ours)
    if backend == "torch":
        fast: nn.Module = optimize(head, dtype=dtype, example_input=example_input)
    else:
        fast = to_runtime(head, backend, dtype=dtype, example_input=example_input, img_size=768)
    inner.vision_tower = DaViTVisionTower(ours, fast, out_dtype, config=tower.config)
    return model


class Florence2ImageEncoder(nn.Module):
    """Florence-2's image encoder as one traceable module: davit's reference tower + transformers' projection.

    ``forward(pixel_values)`` returns the image tokens ``(B, H/32 * W/32 + 1, projection_dim)``, what
    ``get_image_features(pixel_values).pooler_output`` returns.
    """

    def __init__(self, tower: DaViT, projector: nn.Module) -> None:
        super().__init__()
        self.tower = tower
        self.projector = projector

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.projector(self.tower.forward_features(pixel_values))


def image_encoder(model: Any) -> Florence2ImageEncoder:
    """A float32 :class:`Florence2ImageEncoder` from a Florence-2 model (swapped or not); the model is not changed."""
    import copy

    inner = getattr(model, "model", model)
    tower = inner.vision_tower
    ours = copy.deepcopy(tower.reference) if isinstance(tower, DaViTVisionTower) else davit_from_florence2(tower)
    projector = copy.deepcopy(inner.multi_modal_projector).float()
    return Florence2ImageEncoder(ours.float(), projector).eval()


def export_image_encoder(model: Any, path: str | Path, *, img_size: int = 768, check: bool = True) -> dict[str, Any]:
    """Export a Florence-2 model's image encoder (tower + projection) with a dynamic batch at ``img_size``.

    ``path`` ending in ``.onnx`` writes ONNX; ``.xml`` writes an OpenVINO IR (+ ``.bin``, float32 weights). The
    position embeddings of the projection are sized for the traced image, so the image size is fixed.

    Args:
        model: a Florence-2 model (swapped or not).
        path: the output file.
        img_size: the image side the encoder takes (768 for Florence-2).
        check: run the file at batch 2 in onnxruntime / OpenVINO (f32) and compare with the eager encoder.

    Returns:
        ``{"path", "seconds", "max_rel_err"}`` (the error only with ``check``).

    Raises:
        ValueError: an unknown file type, or the exported encoder disagreeing by more than 1e-4 relative.
    """
    from ..runtime import export_onnx_module

    path = Path(path)
    if path.suffix not in (".onnx", ".xml"):
        raise ValueError(f"export the image encoder to NAME.onnx or NAME.xml (OpenVINO IR); got {path.name!r}")
    enc = image_encoder(model)
    x = torch.randn(1, enc.tower.cfg.in_chans, img_size, img_size)
    t0 = time.perf_counter()
    if path.suffix == ".onnx":
        export_onnx_module(enc, x, path, input_name="pixel_values", output_names=["image_features"], dynamic_size=False)
    else:
        import openvino as ov

        with tempfile.TemporaryDirectory(prefix="davit-fl2-") as tmp:
            onnx = export_onnx_module(
                enc,
                x,
                Path(tmp) / "enc.onnx",
                input_name="pixel_values",
                output_names=["image_features"],
                dynamic_size=False,
            )
            path.parent.mkdir(parents=True, exist_ok=True)
            ov.save_model(ov.convert_model(str(onnx)), str(path), compress_to_fp16=False)
    out: dict[str, Any] = {"path": str(path), "seconds": round(time.perf_counter() - t0, 2)}
    if check:
        xb = torch.randn(2, enc.tower.cfg.in_chans, img_size, img_size)
        with torch.no_grad():
            ref = enc(xb)
        got = torch.from_numpy(run_exported(path, xb.numpy()))
        err = float((got - ref).abs().max() / ref.abs().max())
        if not err <= 1e-4:
            raise ValueError(f"the exported image encoder differs from the model by {err:.2e} relative (> 1e-4)")
        out["max_rel_err"] = err
    return out


def run_exported(path: str | Path, pixel_values: Any) -> Any:
    """Run an exported image encoder (``.onnx`` in onnxruntime, ``.xml`` in OpenVINO at f32) on a numpy batch."""
    path = Path(path)
    if path.suffix == ".onnx":
        import onnxruntime as ort

        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return sess.run(None, {sess.get_inputs()[0].name: pixel_values})[0]
    import openvino as ov

    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return compiled(pixel_values)[0]
