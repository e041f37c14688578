"""Export a DaViT classifier or UperNet segmenter to ONNX (dynamic batch, height and width, checked against
onnxruntime) or to a ``torch.export`` program, with class names and preprocessing in the file's metadata.

ONNX uses the TorchScript-tracing exporter: its tracer records the model's size arithmetic (right/bottom padding to
the patch and window sizes, window counts), so one file serves every batch size and every image size. The reference
model has no shape-dependent branches (it always pads and crops, zero amounts included), so images smaller than one
window are exact too. Export always takes the reference modules: ``davit.accelerate`` is never traced.

``torch.export`` (:func:`export_program`) keeps the batch dynamic but fixes H and W to the example size. Why not
dynamic H/W (torch 2.14): the model pads right/bottom to the patch, downsampling and window sizes, so every stage's
size is a chain like ``(((H + (4 - H % 4) % 4) // 4 + p1) // 2 + p2) // 2 ...``; with free ``Dim``s the symbolic
shape solver raises "The inequality (((x/4)//4)) > 0 cannot be solved using solve_univariate_inequality", and with
H, W constrained to multiples of 32 (every pad provably zero) the export did not finish within 400 s on this machine.
The ONNX file (traced, not symbolically solved) is the dynamic-size artefact; export one program per resolution
otherwise.
"""

from __future__ import annotations

import copy
import json
import logging
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .accelerate import installed, uninstall
from .errors import UserError

__all__ = ["check_onnx", "export_model", "export_onnx", "export_openvino_ir", "export_program"]

log = logging.getLogger(__name__)

# Default round-trip check sizes: two different batches and two different, non-square, non-multiple-of-32 sizes.
CHECK_SIZES: tuple[tuple[int, int, int], ...] = ((1, 224, 224), (2, 250, 333))


def _classifier(model: nn.Module) -> nn.Module:
    if getattr(model, "features_only", False):
        raise ValueError("export takes a classifier or a segmenter; build the model with features_only=False")
    cfg = getattr(model, "cfg", None)
    if cfg is not None and getattr(cfg, "num_classes", None) == 0 and not hasattr(model, "decode_head"):
        # A backbone without a head (a features-only state dict, num_classes=0) would export pooled features under a
        # file that claims to be a classifier: refuse it, as predict and eval do.
        raise UserError(
            "the model has no classification head (num_classes=0: a backbone-only checkpoint); export a classifier "
            "checkpoint (one with head.fc weights, e.g. a davit train run's best.safetensors)"
        )
    if installed(model) is not None:  # export the portable reference, never the fused kernels
        model = copy.deepcopy(model)
        uninstall(model)
    return model.eval()


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    img_size: int | tuple[int, int] = 224,
    opset: int = 17,
    check_sizes: Sequence[tuple[int, int, int]] | None = CHECK_SIZES,
    atol: float = 1e-4,
    dynamic_hw: bool = True,
) -> dict[str, Any]:
    """Write ``model`` as an ONNX file with dynamic batch, height and width, then verify it with onnxruntime.

    Args:
        model: a DaViT classifier (any dtype; exported in float32 on the CPU, the model itself is left untouched).
        path: output ``.onnx`` file (parent directories are created).
        img_size: the size of the example image traced (any size works at run time).
        opset: ONNX opset.
        check_sizes: ``(batch, H, W)`` inputs compared against the eager model in onnxruntime; None skips the check.
        atol: largest allowed absolute difference of the logits.
        dynamic_hw: dynamic batch, height and width (False: one fixed ``(1, 3, H, W)`` input through the dynamo
            exporter; UperNet's pyramid pooling needs it, as the tracer cannot record adaptive pooling over a symbolic
            size).

    Returns:
        ``{"path", "opset", "seconds", "max_abs_err": {"BxHxW": err}}``.

    Raises:
        ValueError: a features_only model, or onnxruntime disagreeing with the model by more than ``atol``.
    """
    check_opset(opset, dynamo=not dynamic_hw)
    model = _classifier(model)
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    p0 = next(model.parameters())
    if p0.device.type != "cpu" or p0.dtype != torch.float32:
        model = copy.deepcopy(model).to("cpu", torch.float32)
    x = torch.randn(1, model.cfg.in_chans, h, w)
    t0 = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings():
        # The input-shape check compares static sizes (rank, channels); the tracer warns about it needlessly.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        if dynamic_hw:
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
        else:
            # A fixed-size graph through the dynamo exporter: it resolves the pyramid pooling's sizes statically.
            torch.onnx.export(
                model, (x,), str(path), input_names=["images"], output_names=["logits"], opset_version=opset,
                dynamo=True, verbose=False, external_data=False,
            )  # fmt: skip
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


class _SegLogits(nn.Module):
    """UperNet's ``{"out": logits}`` as a plain tensor output (the form ONNX and torch.export take)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.cfg = model.backbone.cfg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)["out"]


_DET_REFUSAL = (
    "detectors are not exported: torchvision's Mask R-CNN / Faster R-CNN / RetinaNet return a variable number of "
    "boxes after NMS and RoIAlign, which the ONNX tracer records for one image's box count only, so a file would be "
    "silently wrong on other images. Run it with `davit det predict`, or export the backbone alone for your own "
    "detector runtime: davit.create_model(NAME, features_only=True) + davit.export.export_program"
)


def export_model(
    name: str | None,
    out: str | Path,
    *,
    weights: str | None = None,
    checkpoint: str | None = None,
    fmt: str = "onnx",
    img_size: int | None = None,
    opset: int | None = None,
    random_weights: bool = False,
) -> dict[str, Any]:
    """Export a classifier (zoo weights or a checkpoint) or a segmentation checkpoint, with its metadata.

    The ONNX file carries ``task``, ``model``, ``class_names`` and the preprocessing (``input_size``, ``crop_pct``,
    ``interpolation``, ``mean``, ``std``) in its ``metadata_props``, so a runtime needs nothing else.

    Args:
        name: zoo name, e.g. ``"davit_tiny"``; optional with a checkpoint that records it, and it must agree.
        out: output path (``.onnx`` for ONNX, ``.pt2`` for ``torch_export``, ``.xml`` (+ ``.bin``) for ``openvino``).
        weights: a published weight tag, or ``"true"`` for the default weights (see ``davit.list_weights``).
        checkpoint: a checkpoint file: a classifier in any supported layout, or a ``davit train`` segmentation run.
        fmt: ``"onnx"``, ``"torch_export"`` or ``"openvino"`` (a classifier as an OpenVINO IR, see
            :func:`export_openvino_ir`).
        img_size: the example image side (default: the weights' own).
        opset: ONNX opset (default: 17 for a classifier, 18 for a segmenter, whose dynamo exporter writes 18 and up).
        random_weights: export a randomly initialised model (refused otherwise: a file that looks trained but is not).

    Returns:
        What :func:`export_onnx` returns (plus ``task``, ``model``), or ``{"path", "seconds", ...}`` for
        ``torch_export``.

    Raises:
        ValueError: random weights without ``random_weights``, a ``name`` that contradicts the file, a detector, a
            bad size, or an output name that does not fit the format.
    """
    from .data.transforms import check_img_size
    from .factory import create_model, file_metadata

    if fmt not in ("onnx", "torch_export", "openvino"):
        raise ValueError(f"unknown export format {fmt!r}; use 'onnx', 'torch_export' or 'openvino'")
    suffix = Path(out).suffix.lower()
    if fmt == "openvino" and suffix != ".xml":
        raise ValueError(f"{out}: the openvino format writes NAME.xml (+ NAME.bin); name it .xml")
    if fmt == "onnx" and suffix != ".onnx":
        raise ValueError(f"{out}: the onnx format writes a .onnx file; name it .onnx, or pass --format torch_export")
    if fmt == "torch_export" and suffix != ".pt2":
        raise ValueError(f"{out}: the torch_export format writes a .pt2 file; name it .pt2")
    check_img_size(img_size, name="--img-size")
    if Path(out).exists() and not Path(out).is_file():
        raise ValueError(
            f"--out {out} is a folder (or not a regular file): name the file to write, "
            f"e.g. {Path(out) / ('model' + suffix)}"
        )
    if weights and checkpoint:
        raise ValueError("give --weights or a checkpoint, not both")
    if not (weights or checkpoint or random_weights):
        raise ValueError(
            "nothing says which weights to export, and random weights are almost never wanted: pass a checkpoint, "
            "--weights msft_in1k (published), or --random-weights to export an untrained model on purpose"
        )
    if checkpoint and not Path(checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
    meta = file_metadata(checkpoint) if checkpoint else {}
    task = str(meta.get("task", "cls"))
    if task == "det":
        raise ValueError(f"{checkpoint}: {_DET_REFUSAL}")
    if opset is None:
        opset = 18 if task == "seg" else 17
    if fmt == "onnx":
        check_opset(opset, dynamo=task == "seg")  # before any model is built: a bad opset fails in a second
    if task == "seg":
        model, labels, pp, model_name = _seg_model(checkpoint, name)
    else:
        model_name = name or meta.get("model_name") or (_infer_name(checkpoint) if checkpoint else None)
        if not model_name:
            raise ValueError("pass --model NAME (e.g. davit_tiny): the checkpoint does not record its model")
        pretrained: bool | str = checkpoint or False
        if weights:
            pretrained = True if weights.lower() == "true" else weights
        model = create_model(model_name, pretrained=pretrained).eval()
        pcfg = model.pretrained_cfg
        labels = pcfg.get("label_names")
        pp = {k: pcfg[k] for k in ("img_size", "crop_pct", "interpolation", "mean", "std")}
    side = img_size or int(pp.get("img_size", 224))
    props = {
        "task": task,
        "model": str(model_name),
        "source": str(checkpoint or weights or "random init"),
        "input_size": json.dumps([3, side, side]),
        "crop_pct": json.dumps(pp.get("crop_pct")),
        "interpolation": str(pp.get("interpolation")),
        "mean": json.dumps(list(pp.get("mean", ()))),
        "std": json.dumps(list(pp.get("std", ()))),
        "class_names": json.dumps(list(labels) if labels else None),
        "pixel_range": str(pp.get("pixel_range", "0-1")),
    }
    if fmt == "openvino":
        if task != "cls":
            raise ValueError(
                f"{checkpoint}: --format openvino exports classifiers; use --format onnx for a {task} model"
            )
        return {**export_openvino_ir(model, out, img_size=side), "task": task, "model": str(model_name)}
    if fmt == "onnx":
        seg = task == "seg"
        checks = ((1, side, side),) if seg else _check_sizes(side)
        res = export_onnx(model, out, img_size=side, opset=opset, check_sizes=checks, dynamic_hw=not seg)
        _write_onnx_metadata(out, props)
        return {**res, "task": task, "model": str(model_name)}
    t0 = time.perf_counter()
    program = export_program(model, img_size=side)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, str(out), extra_files={"davit_metadata.json": json.dumps(props)})
    return {"path": str(out), "seconds": round(time.perf_counter() - t0, 2), "task": task, "model": str(model_name)}


def opset_range(*, dynamo: bool = False) -> tuple[int, int]:
    """The ONNX opsets this torch can write: ``(lowest, highest)`` for the TorchScript exporter (classifiers) or the
    dynamo exporter (``dynamo=True``: segmenters), as ``torch.onnx`` itself declares them."""
    from torch.onnx import _constants as c

    if dynamo:
        # The dynamo exporter writes opset 18 and up (onnxscript's own floor), to torch's newest.
        return max(18, c.ONNX_BASE_OPSET), c.ONNX_MAX_OPSET
    # torch's floor is 7, but DaViT's graph needs 11 (measured with torch 2.14: opsets 7 and 9 fail inside the
    # exporter with "(type 'List[int]')", 11..20 export and match onnxruntime).
    return max(11, c.ONNX_MIN_OPSET), getattr(c, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", c.ONNX_MAX_OPSET)


def check_opset(opset: Any, *, dynamo: bool = False) -> int:
    """``opset`` if this torch can export it, else a one-line :class:`~davit.errors.UserError` naming the range."""
    from .errors import UserError

    lo, hi = opset_range(dynamo=dynamo)
    if isinstance(opset, bool) or not isinstance(opset, int) or not lo <= opset <= hi:
        kind = "a segmenter (dynamo exporter)" if dynamo else "a classifier"
        raise UserError(
            f"--opset {opset} is not supported: torch {torch.__version__} exports {kind} at opsets {lo}..{hi}"
        )
    return opset


def _check_sizes(side: int) -> tuple[tuple[int, int, int], ...]:
    # The defaults check two batch sizes and an odd size; small models (a 32 px demo) check around their own side.
    return CHECK_SIZES if side >= 128 else ((1, side, side), (2, side + 5, side + 13))


def _infer_name(checkpoint: str) -> str | None:
    from .weights import load_state
    from .weights.inspect import infer_architecture

    try:
        return infer_architecture(load_state(checkpoint)).get("model")
    except Exception:  # unreadable files get their own error from create_model
        return None


def _seg_model(checkpoint: str, name: str | None) -> tuple[nn.Module, Any, dict[str, Any], str]:
    from .engine.run import config_for_checkpoint
    from .tasks.segmentation import load_seg_model

    _, cfg = config_for_checkpoint(checkpoint, task="seg")
    if name and name != cfg.model.name:
        raise ValueError(f"{checkpoint} holds a UperNet on {cfg.model.name}, not {name}; drop --model or fix it")
    model, labels = load_seg_model(checkpoint, cfg, device="cpu")
    d = cfg.data
    side = int(d.crop_size[0]) if getattr(d, "crop_size", None) else 512
    # mmseg's normalisation is in 0..255 pixel units: the metadata says so beside mean/std.
    pp = {"img_size": side, "crop_pct": 1.0, "interpolation": "bilinear", "mean": list(d.mean), "std": list(d.std),
          "pixel_range": "0-255"}  # fmt: skip
    return _SegLogits(model).eval(), labels, pp, f"upernet_{cfg.model.name}"


def _write_onnx_metadata(path: str | Path, props: dict[str, str]) -> None:
    """Store ``props`` in the file's ``metadata_props`` (what onnxruntime's ``get_modelmeta().custom_metadata_map``
    returns)."""
    import onnx

    m = onnx.load(str(path))
    del m.metadata_props[:]
    for k, v in props.items():
        entry = m.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.save(m, str(path))


def export_openvino_ir(model: nn.Module, out: str | Path, *, img_size: int = 224) -> dict[str, Any]:
    """Write a classifier as an OpenVINO IR (``out`` ends in ``.xml``; dynamic batch, height and width), checked in
    OpenVINO against the eager reference; see :func:`davit.runtime.export_openvino`."""
    from .runtime import export_openvino

    return export_openvino(_classifier(model), out, img_size=img_size)
