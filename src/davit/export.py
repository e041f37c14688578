"""Export a DaViT classifier to ONNX (dynamic batch, height and width, checked against onnxruntime) or to a
``torch.export`` program.

ONNX uses the TorchScript-tracing exporter: its tracer records the model's size arithmetic (right/bottom padding to
the patch and window sizes, window counts), so one file serves every batch size and every image size. The model takes
its branch-free path while tracing (see ``davit.models.davit._tracing``), so images smaller than one window are exact
too.

``torch.export`` (:func:`export_program`) keeps the batch dynamic but fixes H and W to the example size. Why not
dynamic H/W (torch 2.14): the model pads right/bottom to the patch, downsampling and window sizes, so every stage's
size is a chain like ``(((H + (4 - H % 4) % 4) // 4 + p1) // 2 + p2) // 2 ...``; with free ``Dim``s the symbolic
shape solver raises "The inequality (((x/4)//4)) > 0 cannot be solved using solve_univariate_inequality", and with
H, W constrained to multiples of 32 (every pad provably zero) the export did not finish within 400 s on this machine.
The ONNX file (traced, not symbolically solved) is the dynamic-size artefact; export one program per resolution
otherwise.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["check_onnx", "export_model", "export_onnx", "export_openvino_ir", "export_program"]

log = logging.getLogger(__name__)

# Default round-trip check sizes: two different batches and two different, non-square, non-multiple-of-32 sizes.
CHECK_SIZES: tuple[tuple[int, int, int], ...] = ((1, 224, 224), (2, 250, 333))


def _classifier(model: nn.Module) -> nn.Module:
    if getattr(model, "features_only", False):
        raise ValueError("export supports classifiers; build the model with features_only=False")
    return model.eval()


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    img_size: int | tuple[int, int] = 224,
    opset: int = 17,
    check_sizes: Sequence[tuple[int, int, int]] | None = CHECK_SIZES,
    atol: float = 1e-4,
) -> dict[str, Any]:
    """Write ``model`` as an ONNX file with dynamic batch, height and width, then verify it with onnxruntime.

    Args:
        model: a DaViT classifier (any dtype; exported in float32 on the CPU, the model itself is left untouched).
        path: output ``.onnx`` file (parent directories are created).
        img_size: the size of the example image traced (any size works at run time).
        opset: ONNX opset.
        check_sizes: ``(batch, H, W)`` inputs compared against the eager model in onnxruntime; None skips the check.
        atol: largest allowed absolute difference of the logits.

    Returns:
        ``{"path", "opset", "seconds", "max_abs_err": {"BxHxW": err}}``.

    Raises:
        ValueError: a features_only model, or onnxruntime disagreeing with the model by more than ``atol``.
    """
    model = _classifier(model)
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    p0 = next(model.parameters())
    if p0.device.type != "cpu" or p0.dtype != torch.float32:
        import copy

        model = copy.deepcopy(model).to("cpu", torch.float32)
    x = torch.randn(1, model.cfg.in_chans, h, w)
    t0 = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings():
        # The input-shape check compares static sizes (rank, channels); the tracer warns about it needlessly.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(
            model,
            (x,),
            str(path),
            input_names=["images"],
            output_names=["logits"],
            dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"}, "logits": {0: "batch"}},
            opset_version=opset,
            dynamo=False,
        )
    out: dict[str, Any] = {"path": str(path), "opset": opset, "seconds": round(time.perf_counter() - t0, 2)}
    if check_sizes:
        out["max_abs_err"] = check_onnx(path, model, check_sizes, atol=atol)
    return out


def check_onnx(
    path: str | Path,
    model: nn.Module,
    sizes: Sequence[tuple[int, int, int]] = CHECK_SIZES,
    *,
    atol: float = 1e-4,
    seed: int = 0,
) -> dict[str, float]:
    """Run the ONNX file in onnxruntime at each ``(batch, H, W)`` and compare with the eager float32 model.

    Returns:
        The largest absolute logit difference per size, keyed ``"BxHxW"``.

    Raises:
        ValueError: any difference above ``atol`` (the message names the size).
    """
    import numpy as np
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    gen = torch.Generator().manual_seed(seed)
    errs: dict[str, float] = {}
    for b, h, w in sizes:
        x = torch.randn(b, model.cfg.in_chans, h, w, generator=gen)
        with torch.no_grad():
            ref = model(x).float().numpy()
        got = sess.run(None, {name: x.numpy()})[0]
        err = float(np.abs(got - ref).max())
        errs[f"{b}x{h}x{w}"] = err
        if not err <= atol:
            raise ValueError(f"onnxruntime differs from the model by {err:.2e} (> {atol:.0e}) at input {b}x{h}x{w}")
    log.info("onnx check %s: %s", path, errs)
    return errs


def export_program(
    model: nn.Module, *, img_size: int | tuple[int, int] = 224, batch: int = 2
) -> torch.export.ExportedProgram:
    """``torch.export`` the classifier with a dynamic batch at a fixed image size (see the module notes for why).

    Args:
        model: a DaViT classifier.
        img_size: the image size the program accepts (side, or ``(H, W)``).
        batch: the example batch (>= 2 so the batch dimension stays symbolic).

    Returns:
        The exported program; ``program.module()(x)`` runs it for any batch size.
    """
    model = _classifier(model)
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    p0 = next(model.parameters())
    x = torch.randn(max(batch, 2), model.cfg.in_chans, h, w, device=p0.device, dtype=p0.dtype)
    return torch.export.export(model, (x,), dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=4096)}})


def export_model(
    name: str,
    out: str | Path,
    *,
    weights: str | None = None,
    checkpoint: str | None = None,
    fmt: str = "onnx",
    img_size: int = 224,
) -> dict[str, Any]:
    """Build a zoo model (optionally with published weights or a checkpoint file) and export it.

    Args:
        name: zoo name, e.g. ``"davit_tiny"``.
        out: output path (``.onnx`` for ONNX, ``.pt2`` for ``torch.export``, ``.xml`` (+ ``.bin``) for OpenVINO).
        weights: a published weight tag, or ``"true"`` for the default weights (see ``davit.list_weights``).
        checkpoint: a checkpoint file in any supported layout (loaded safely by ``davit.create_model``).
        fmt: ``"onnx"``, ``"torch_export"`` or ``"openvino"`` (an OpenVINO IR, see :func:`export_openvino_ir`).
        img_size: the example image size.

    Returns:
        What :func:`export_onnx` returns, or ``{"path", "seconds"}`` for ``torch_export``.
    """
    from .factory import create_model

    if fmt not in ("onnx", "torch_export", "openvino"):
        raise ValueError(f"unknown export format {fmt!r}; use 'onnx', 'torch_export' or 'openvino'")
    if weights and checkpoint:
        raise ValueError("give --weights or --checkpoint, not both")
    if checkpoint and not Path(checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
    pretrained: bool | str = checkpoint or False
    if weights:
        pretrained = True if weights.lower() == "true" else weights
    model = create_model(name, pretrained=pretrained).eval()
    if fmt == "onnx":
        return export_onnx(model, out, img_size=img_size)
    if fmt == "openvino":
        return export_openvino_ir(model, out, img_size=img_size)
    t0 = time.perf_counter()
    program = export_program(model, img_size=img_size)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, str(out))
    return {"path": str(out), "seconds": round(time.perf_counter() - t0, 2)}


def export_openvino_ir(model: nn.Module, out: str | Path, *, img_size: int = 224) -> dict[str, Any]:
    """Write ``model`` as an OpenVINO IR (``out`` must end in ``.xml``; dynamic batch, height and width), checked in
    OpenVINO against the eager model; see :func:`davit.runtime.export_openvino`."""
    from .runtime import export_openvino

    return export_openvino(_classifier(model), out, img_size=img_size)
