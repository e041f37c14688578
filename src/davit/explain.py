"""Look inside a DaViT: raw attention tensors, attention pictures and class-activation maps.

The reference model passes every softmax through a hook point, an ``nn.Identity`` named ``attn_probs`` inside each
``WindowAttention`` and ``ChannelAttention``. :func:`capture_attention` puts forward hooks on those modules for the
length of a ``with`` block, so the tensors come from the very forward pass that makes the prediction (no second copy
of the model, no change to its outputs):

- spatial (window) attention: ``(B * num_windows, heads, ws * ws, ws * ws)``, windows in row-major order over the
  stage's map zero-padded on the right/bottom to a multiple of ``ws``; each row (a query token) sums to one;
- channel (group) attention: ``(B, groups, Cg, Cg)`` with ``Cg = C / groups`` (32 in every variant); row ``i`` of
  group ``g`` says how channel ``i`` mixes the group's channels (official roles: the mixed values are the ``q``
  slice of ``qkv``; Florence-2's v2 form: the ``v`` slice).

:func:`explain_image` draws them for an image (``davit explain``): the spatial attention of chosen blocks for a query
point or averaged over each window's queries, the channel-group attention matrix with the spatial response of the
channels a query channel attends to most, and a Grad-CAM for the predicted class.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "AttentionMap",
    "attention_maps",
    "capture_attention",
    "channel_attention_summary",
    "explain_image",
    "grad_cam",
    "spatial_attention_for_point",
    "spatial_attention_received",
]

_STAGE = re.compile(r"(?:^|\.)stages\.(\d+)\.")


@dataclass
class AttentionMap:
    """The softmax probabilities of one attention module for one forward pass.

    Attributes:
        name: the module's name in the model (``stages.2.blocks.0.0.attn``).
        kind: ``"spatial"`` or ``"channel"``.
        stage: stage index (0..3).
        index: order of this module among the captured ones of its kind (0 = first block).
        probs: the raw tensor, as it left the softmax (detached).
        grid: ``(H, W)`` of the stage's token map (before window padding).
        window_size: the window side (spatial attention only).
        values: ``(B, N, C)`` the tokens the channel attention mixes (channel attention only; see module docs).
    """

    name: str
    kind: str
    stage: int
    index: int
    probs: Tensor
    grid: tuple[int, int] = (0, 0)
    window_size: int | None = None
    values: Tensor | None = field(default=None, repr=False)


def _hook_points(model: nn.Module) -> list[tuple[str, nn.Module, nn.Module]]:
    """``(attention module name, attention module, its attn_probs module)`` in forward order."""
    modules = dict(model.named_modules())
    out = []
    for name, mod in modules.items():
        if name == "attn_probs" or name.endswith(".attn_probs"):
            parent_name = name.rpartition(".")[0]
            out.append((parent_name, modules[parent_name], mod))
    return out


def _kind(module: nn.Module) -> str:
    cls = type(module).__name__.lower()
    if "window" in cls or "spatial" in cls:
        return "spatial"
    if "channel" in cls:
        return "channel"
    raise ValueError(f"cannot tell whether {type(module).__name__} is spatial or channel attention")


def _stage_grids(model: nn.Module, h: int, w: int) -> list[tuple[int, int]]:
    """Token-map size per stage for an ``h x w`` input: stride-4 stem, then stride-2 steps (right/bottom padded)."""
    sizes = [(math.ceil(h / 4), math.ceil(w / 4))]
    stages = len(getattr(getattr(model, "cfg", None), "embed_dims", (0, 0, 0, 0)))
    for _ in range(stages - 1):
        a, b = sizes[-1]
        sizes.append((math.ceil(a / 2), math.ceil(b / 2)))
    return sizes


@contextlib.contextmanager
def capture_attention(model: nn.Module, values: bool = False) -> Iterator[list[dict[str, Any]]]:
    """Record every attention softmax of the forward passes run inside the ``with`` block.

    Args:
        model: a DaViT (the reference model: each attention has an ``attn_probs`` hook point).
        values: also record ``qkv(x)`` of channel attentions (for :func:`channel_attention_summary`).

    Yields:
        A list that fills with one dict per attention call: ``name``, ``kind``, ``module`` and ``probs`` (detached),
        plus ``qkv`` for channel attention when ``values``.

    Raises:
        ValueError: the model has no ``attn_probs`` hook points (an accelerated copy, or another network).
    """
    points = _hook_points(model)
    if not points:
        raise ValueError(
            "this model has no attn_probs hook points: explain needs the reference DaViT (davit.create_model), "
            "not a davit.optimize()d or exported copy"
        )
    records: list[dict[str, Any]] = []
    handles = []
    pending_qkv: dict[str, Tensor] = {}

    def on_probs(name: str, parent: nn.Module):
        kind = _kind(parent)

        def hook(_m: nn.Module, _inp: Any, out: Tensor) -> None:
            rec = {"name": name, "kind": kind, "module": parent, "probs": out.detach()}
            if kind == "channel" and name in pending_qkv:
                rec["qkv"] = pending_qkv.pop(name)
            records.append(rec)

        return hook

    def on_input(name: str, parent: nn.Module):
        # The mixed tokens are a slice of qkv(x): recomputed from the attention's input with its own weights, which
        # works however the module calls its Linear (the hook on ``attn_probs`` then finds them).
        def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach()
            with torch.no_grad():
                pending_qkv[name] = F.linear(x, parent.qkv.weight, parent.qkv.bias)

        return hook

    try:
        for name, parent, probs in points:
            handles.append(probs.register_forward_hook(on_probs(name, parent)))
            if values and _kind(parent) == "channel" and isinstance(getattr(parent, "qkv", None), nn.Linear):
                handles.append(parent.register_forward_pre_hook(on_input(name, parent)))
        yield records
    finally:
        for h in handles:
            h.remove()


def attention_maps(model: nn.Module, images: Tensor, values: bool = False) -> tuple[Tensor, list[AttentionMap]]:
    """Run ``model`` on ``images`` and return its output with every attention softmax of that pass.

    Args:
        model: a reference DaViT (classifier or ``features_only``); put it in eval mode yourself.
        images: ``(B, C, H, W)`` normalised images.
        values: also return, for channel attention, the tokens each group mixes (:attr:`AttentionMap.values`).

    Returns:
        ``(output, maps)``: the model's usual output and one :class:`AttentionMap` per attention call, in forward
        order.
    """
    with capture_attention(model, values=values) as records:
        out = model(images)
    grids = _stage_grids(model, images.shape[-2], images.shape[-1])
    counts = {"spatial": 0, "channel": 0}
    maps = []
    for rec in records:
        m = _STAGE.search("." + rec["name"] + ".")
        stage = int(m.group(1)) if m else 0
        kind = rec["kind"]
        ws = None
        if kind == "spatial":
            ws = int(round(math.sqrt(rec["probs"].shape[-1])))
        vals = None
        if "qkv" in rec:
            qkv = rec["qkv"]  # (B, N, 3C) or (B, H, W, 3C)
            qkv = qkv.reshape(qkv.shape[0], -1, qkv.shape[-1])
            c = qkv.shape[-1] // 3
            v2 = bool(getattr(rec["module"], "v2", False))
            # official roles: A = softmax(k^T v) mixes the q slice; Florence-2 v2 mixes the v slice
            vals = qkv[..., 2 * c :] if v2 else qkv[..., :c]
        grid = grids[stage] if stage < len(grids) else (0, 0)
        maps.append(AttentionMap(rec["name"], kind, stage, counts[kind], rec["probs"], grid, ws, vals))
        counts[kind] += 1
    return out, maps


# ------------------------------------------------------------------------------------------------ turning into maps
def _windows(a: AttentionMap, batch: int) -> tuple[int, int, int]:
    h, w = a.grid
    ws = int(a.window_size or 0)
    nh, nw = math.ceil(h / ws), math.ceil(w / ws)
    if a.probs.shape[0] != batch * nh * nw:
        raise ValueError(
            f"{a.name}: {a.probs.shape[0]} windows for batch {batch} do not tile a {h}x{w} map in {ws}x{ws} windows"
        )
    return ws, nh, nw


def spatial_attention_for_point(
    a: AttentionMap, point: tuple[float, float], image: int = 0, batch: int = 1, head: int | None = None
) -> Tensor:
    """Where a query token attends: an ``(H, W)`` map on the stage grid (zero outside its window).

    Args:
        a: a spatial :class:`AttentionMap`.
        point: the query as ``(y, x)`` fractions of the image height and width (0..1).
        image: which image of the batch.
        batch: the batch size of the pass.
        head: one head, or None for the mean over heads.
    """
    ws, nh, nw = _windows(a, batch)
    h, w = a.grid
    gy = min(int(point[0] * h), h - 1)
    gx = min(int(point[1] * w), w - 1)
    win = image * nh * nw + (gy // ws) * nw + gx // ws
    row = a.probs[win, :, (gy % ws) * ws + gx % ws, :]  # (heads, ws*ws)
    row = row.mean(0) if head is None else row[head]
    full = torch.zeros(nh * ws, nw * ws, dtype=row.dtype, device=row.device)
    y0, x0 = (gy // ws) * ws, (gx // ws) * ws
    full[y0 : y0 + ws, x0 : x0 + ws] = row.view(ws, ws)
    return full[:h, :w]


def spatial_attention_received(a: AttentionMap, image: int = 0, batch: int = 1, head: int | None = None) -> Tensor:
    """How much attention each token receives, averaged over the queries of its window: ``(H, W)``.

    A uniform attention gives ``1 / ws**2`` everywhere; a token that every query of its window looks at gets more.
    """
    ws, nh, nw = _windows(a, batch)
    p = a.probs[image * nh * nw : (image + 1) * nh * nw]  # (nW, heads, ws*ws, ws*ws)
    p = p.mean(1) if head is None else p[:, head]
    received = p.mean(1)  # (nW, ws*ws): mean over queries
    full = received.view(nh, nw, ws, ws).permute(0, 2, 1, 3).reshape(nh * ws, nw * ws)
    h, w = a.grid
    return full[:h, :w]


def channel_attention_summary(
    a: AttentionMap, channel: int, image: int = 0, top: int = 4
) -> tuple[Tensor, list[int], list[float], Tensor | None]:
    """The group attention of one query channel and what its most attended channels respond to.

    Args:
        a: a channel :class:`AttentionMap` (captured with ``values=True`` for the spatial responses).
        channel: query channel index in the block (0..C-1).
        image: which image of the batch.
        top: how many attended channels to return.

    Returns:
        ``(matrix, channels, weights, responses)``: the ``(Cg, Cg)`` attention matrix of the channel's group, the
        ``top`` channels (block indices) it attends to most with their weights, and their ``(top, H, W)`` spatial
        responses (None without values).
    """
    groups, cg = a.probs.shape[1], a.probs.shape[-1]
    if not 0 <= channel < groups * cg:
        raise ValueError(f"{a.name} has {groups * cg} channels; channel {channel} is out of range")
    g, i = divmod(channel, cg)
    matrix = a.probs[image, g]  # (Cg, Cg)
    w, j = matrix[i].topk(min(top, cg))
    chans = [g * cg + int(k) for k in j]
    responses = None
    if a.values is not None:
        h, wd = a.grid
        v = a.values[image]  # (N, C)
        responses = v[:, chans].T.reshape(len(chans), h, wd)
    return matrix, chans, [float(x) for x in w], responses


# ----------------------------------------------------------------------------------------------------- Grad-CAM
def grad_cam(
    model: nn.Module, images: Tensor, target: int | None = None, stage: int = -1
) -> tuple[Tensor, int, Tensor]:
    """Grad-CAM (Selvaraju et al. 2017) on a stage's output map: where the evidence for a class lies.

    The gradient of the class's log-probability with respect to the stage's map, averaged over positions, weighs the
    map's channels; the weighted sum, clipped at zero, is the map. The log-probability rather than the raw logit
    (Grad-CAM's original score) because it is the evidence for the class against the others: with two classes the
    logits share a component that says nothing about the choice (on the bright-square test the raw logit's map
    peaked on the object in 5 of 16 images, the log-probability's in 13).

    Args:
        model: a DaViT classifier (``stages``, ``forward_features`` and ``forward_head``).
        images: ``(1, C, H, W)`` normalised image.
        target: the class to explain; None = the predicted class.
        stage: whose output map (default the last: 1/32 of the input; earlier stages are finer).

    Returns:
        ``(cam, class, probabilities)``: cam ``(h, w)`` on the stage's grid scaled to [0, 1] (all zeros if no
        position has positive evidence), the explained class and the softmax over classes.
    """
    stages = model.stages
    captured: list[Tensor] = []
    # the stage module's own output is on the path to the logits (a returned view of it may not be)
    handle = stages[stage].register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        with torch.enable_grad():
            logits = model.forward_head(model.forward_features(images))  # (1, K)
            cls = int(logits[0].argmax()) if target is None else int(target)
            (grads,) = torch.autograd.grad(logits[0].float().log_softmax(-1)[cls], captured[0])
    finally:
        handle.remove()
    fmap = _nchw(captured[0].detach(), model, stage, images.shape[-2:])
    grads = _nchw(grads, model, stage, images.shape[-2:])
    weights = grads.mean(dim=(2, 3), keepdim=True)  # (1, C, 1, 1)
    cam = F.relu((weights * fmap).sum(1))[0]  # (h, w)
    peak = cam.max()
    cam = cam / peak if peak > 0 else cam
    return cam, cls, logits.detach().float().softmax(-1)[0]


def _nchw(t: Tensor, model: nn.Module, stage: int, size: Sequence[int]) -> Tensor:
    """A stage output in whichever layout the model keeps it ((B, H, W, C), (B, C, H, W) or (B, N, C)) as NCHW."""
    c = int(model.cfg.embed_dims[stage])
    h, w = _stage_grids(model, int(size[0]), int(size[1]))[stage]
    if t.ndim == 3:  # (B, N, C)
        return t.transpose(1, 2).reshape(t.shape[0], c, h, w)
    if t.shape[-1] == c and t.shape[1:3] == (h, w):  # (B, H, W, C)
        return t.permute(0, 3, 1, 2)
    return t


# ------------------------------------------------------------------------------------------------------ pictures
def _heat_overlay(image: np.ndarray, heat: Tensor, alpha: float = 0.5) -> np.ndarray:
    """An RGB uint8 image with ``heat`` (any size, values >= 0) stretched to its size and drawn in 'jet'."""
    from matplotlib import colormaps

    h, w = image.shape[:2]
    m = heat.detach().float()[None, None]
    m = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    m = m - m.min()
    m = (m / m.max()) if m.max() > 0 else m
    rgb = (colormaps["jet"](m.cpu().numpy())[..., :3] * 255).astype(np.float32)
    return ((1 - alpha) * image.astype(np.float32) + alpha * rgb).clip(0, 255).astype(np.uint8)


def _figure(n: int, size: float = 3.2):
    import matplotlib

    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt

    cols = min(n, 5)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows + 0.8), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    return fig, list(axes.flat), plt


def _save(fig: Any, plt: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def explain_image(
    image: str | os.PathLike[str],
    *,
    model: str | nn.Module | None = None,
    weights: str | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    out_dir: str | os.PathLike[str] = "explain",
    blocks: Sequence[int] | None = None,
    point: tuple[float, float] | None = None,
    channel: int = 0,
    cam_stage: int = -1,
    target: str | int | None = None,
    img_size: int | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Write the attention and class-activation pictures of one image.

    Args:
        image: an image file.
        model, weights, checkpoint: the classifier, as for ``davit predict``
            (:func:`davit.engine.evaluate.load_classifier`).
        out_dir: where the PNGs go.
        blocks: spatial-attention blocks to draw (indices among the model's spatial blocks; negative counts from the
            end); default: the last block of every stage.
        point: the query as ``(y, x)`` fractions of the image; default: each window's attention averaged over its
            queries (what each token receives).
        channel: query channel of the channel-attention picture (in the last channel block).
        cam_stage: the stage whose map the Grad-CAM uses (default the last, stride 32; 2 is finer, stride 16).
        target: the class the Grad-CAM explains, by name or index (default: the predicted class).
        img_size: input side (default: the weights' own); the image is resized and centre-cropped as for prediction.
        device: where to run.

    Returns:
        ``{"image", "class", "index", "probability", "cam_class", "files": {"spatial", "channel", "cam": PNG paths}}``.
    """
    from .data.image import load_rgb
    from .engine.evaluate import load_classifier

    loaded = load_classifier(model, weights=weights, checkpoint=checkpoint, device=device)
    net = loaded.model.eval()
    tf = loaded.transform(img_size)
    pil = load_rgb(image)
    x = tf(pil)[None].to(next(net.parameters()).device)  # (1, 3, S, S)
    # the picture the model sees, before normalisation, for the overlays
    mean = torch.tensor(loaded.preprocessing["mean"]).view(3, 1, 1)
    std = torch.tensor(loaded.preprocessing["std"]).view(3, 1, 1)
    shown = ((x[0].cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)

    with torch.no_grad():
        logits, maps = attention_maps(net, x, values=True)
    probs = logits.float().softmax(-1)[0]
    cls = int(probs.argmax())
    name = loaded.class_names[cls]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = Path(image).stem
    files: dict[str, str] = {}

    spatial = [m for m in maps if m.kind == "spatial"]
    if spatial:
        if blocks is None:
            last = {}
            for m in spatial:
                last[m.stage] = m
            chosen = list(last.values())
        else:
            chosen = [spatial[b] for b in blocks]
        fig, axes, plt = _figure(len(chosen) + 1)
        axes[0].imshow(shown)
        axes[0].set_title(f"{name} ({probs[cls]:.0%})", fontsize=9)
        if point is not None:
            axes[0].plot([point[1] * shown.shape[1]], [point[0] * shown.shape[0]], "w+", ms=14, mew=2)
        for ax, m in zip(axes[1:], chosen):
            heat = spatial_attention_for_point(m, point) if point is not None else spatial_attention_received(m)
            ax.imshow(_heat_overlay(shown, heat))
            what = "query +" if point is not None else "received, window mean"
            ax.set_title(f"spatial block {m.index} (stage {m.stage}, {m.grid[0]}x{m.grid[1]}, w{m.window_size})\n"
                         f"{what}", fontsize=8)  # fmt: skip
            if point is not None:
                ax.plot([point[1] * shown.shape[1]], [point[0] * shown.shape[0]], "w+", ms=14, mew=2)
        files["spatial"] = str(_save(fig, plt, out / f"{stem}_spatial_attention.png"))

    channels = [m for m in maps if m.kind == "channel"]
    if channels:
        m = channels[-1]
        matrix, chans, ws_, responses = channel_attention_summary(m, channel, top=3)
        fig, axes, plt = _figure(2 + (len(chans) if responses is not None else 0))
        axes[0].imshow(shown)
        axes[0].set_title(f"{name} ({probs[cls]:.0%})", fontsize=9)
        cg = matrix.shape[0]
        axes[1].imshow(matrix.float().cpu().numpy(), cmap="viridis")
        axes[1].axis("on")
        title = f"channel block {m.index} (stage {m.stage}): group {channel // cg}\n"
        title += f"attention {cg}x{cg}, query channel {channel} is row {channel % cg}"
        axes[1].set_title(title, fontsize=8)
        axes[1].set_xlabel("attended channel", fontsize=8)
        axes[1].set_ylabel("query channel", fontsize=8)
        axes[1].axhline(channel % cg, color="white", lw=0.8)
        if responses is not None:
            for ax, c, wgt, r in zip(axes[2:], chans, ws_, responses):
                ax.imshow(_heat_overlay(shown, r - r.min()))
                ax.set_title(f"channel {c}: weight {wgt:.2f}\nits spatial response", fontsize=8)
        files["channel"] = str(_save(fig, plt, out / f"{stem}_channel_attention.png"))

    if target is None:
        explained = cls
    elif str(target) in loaded.class_names:
        explained = loaded.class_names.index(str(target))
    elif str(target).lstrip("-").isdigit() and 0 <= int(target) < len(loaded.class_names):
        explained = int(target)
    else:
        raise ValueError(f"--target {target!r} is neither a class name nor an index of this model's classes")
    cam, _, _ = grad_cam(net, x, explained, stage=cam_stage)
    fig, axes, plt = _figure(2)
    axes[0].imshow(shown)
    axes[0].set_title(f"predicted: {name} ({probs[cls]:.0%})", fontsize=9)
    axes[1].imshow(_heat_overlay(shown, cam))
    cam_name = loaded.class_names[explained]
    title = f"Grad-CAM (stage {cam_stage % len(net.stages)}): {cam_name} ({probs[explained]:.0%})"
    axes[1].set_title(title, fontsize=9)
    files["cam"] = str(_save(fig, plt, out / f"{stem}_cam.png"))
    return {
        "image": str(image),
        "class": name,
        "index": cls,
        "probability": float(probs[cls]),
        "cam_class": loaded.class_names[explained],
        "files": files,
    }
