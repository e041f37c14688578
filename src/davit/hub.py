"""The Hugging Face Hub both ways: publish a run's weights with a model card, and build a model from a hub repo.

``push_to_hub(run_dir, "user/repo")`` uploads, through ``huggingface_hub``'s upload API:

- ``model.safetensors``: the run's weights (EMA when it trained with EMA), their header carrying the model config,
  class names and preprocessing, as every davit weights file does;
- ``config.json``: the architecture name, the model config, the class names and the evaluation preprocessing;
- ``README.md``: a model card generated from the run (architecture, data, recipe, metrics, preprocessing, license);
- ``davit_recipe.yaml`` and ``metrics.jsonl``: the run's resolved recipe and its per-epoch metrics.

``davit.create_model("hf-hub:user/repo")`` reads such a repo back (``local-dir:/path`` reads the same layout from a
folder). The endpoint is ``HF_ENDPOINT`` (or the ``endpoint`` argument); the token is ``HF_TOKEN`` or the login of
``hf auth login``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .weights import read_safetensors_metadata

__all__ = ["load_hub_files", "push_to_hub", "save_for_hub"]

log = logging.getLogger(__name__)

HUB_PREFIXES = ("hf-hub:", "local-dir:")


def _run_files(run: Path, weights: str) -> tuple[Path, Path | None]:
    """``(weights file, run folder or None)`` of a run folder or a single ``.safetensors`` file."""
    run = run.expanduser()
    if run.is_file():
        return run, run.parent if (run.parent / "config.yaml").is_file() else None
    if not run.is_dir():
        raise FileNotFoundError(f"{run} not found: pass a run folder (holding best.safetensors) or a .safetensors file")
    for name in (f"{weights}.safetensors", "best.safetensors", "last.safetensors"):
        if (run / name).is_file():
            return run / name, run
    raise FileNotFoundError(f"{run} holds no {weights}.safetensors: train first, or pass the weights file")


def save_for_hub(
    run: str | os.PathLike[str],
    folder: str | os.PathLike[str],
    *,
    weights: str = "best",
    license: str = "mit",
    repo_id: str | None = None,
) -> Path:
    """Write the files :func:`push_to_hub` uploads into ``folder`` (which :func:`load_hub_files` reads back).

    Args:
        run: a ``davit train`` run folder, or a davit ``.safetensors`` weights file.
        folder: the output folder (created).
        weights: ``best`` or ``last``: which of the run's weights.
        license: the license named in the model card (an SPDX id or a Hub license tag).
        repo_id: the repo the card shows in its usage example.

    Returns:
        ``folder``.

    Raises:
        FileNotFoundError: no run folder or weights file there.
        ValueError: the weights file is not a davit classification checkpoint (no model config in its header).
    """
    src, run_dir = _run_files(Path(run), weights)
    meta = read_safetensors_metadata(src)
    if "davit_config" not in meta:
        raise ValueError(f"{src} has no davit model config in its header: publish weights that davit train wrote")
    model_cfg = json.loads(meta["davit_config"])
    config = {
        "library_name": "davit",
        "architecture": meta.get("model_name") or "davit",
        "num_classes": model_cfg.get("num_classes"),
        "davit_config": model_cfg,
        "class_names": json.loads(meta["class_names"]) if "class_names" in meta else None,
        "preprocessing": json.loads(meta["preprocessing"]) if "preprocessing" in meta else None,
    }
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    recipe, summary, rows = "", {}, []
    if run_dir is not None:
        if (run_dir / "config.yaml").is_file():
            recipe = (run_dir / "config.yaml").read_text()
            (out / "davit_recipe.yaml").write_text(recipe)
        if (run_dir / "summary.json").is_file():
            summary = json.loads((run_dir / "summary.json").read_text())
        if (run_dir / "metrics.jsonl").is_file():
            shutil.copyfile(run_dir / "metrics.jsonl", out / "metrics.jsonl")
            rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    (out / "README.md").write_text(_model_card(config, recipe, summary, rows, license, repo_id, meta))
    return out


def _model_card(
    config: dict[str, Any],
    recipe: str,
    summary: dict[str, Any],
    rows: list[dict[str, Any]],
    license: str,
    repo_id: str | None,
    meta: dict[str, str],
) -> str:
    import yaml

    run_cfg = yaml.safe_load(recipe) if recipe else {}
    data = run_cfg.get("data", {}) if isinstance(run_cfg, dict) else {}
    arch = config["architecture"]
    mc = config["davit_config"]
    n_cls = config["num_classes"]
    names = config["class_names"] or []
    pre = config["preprocessing"] or {}
    name = repo_id or "user/repo"
    lines = [
        "---",
        "library_name: davit",
        f"license: {license}",
        "pipeline_tag: image-classification",
        "tags: [image-classification, davit, vision-transformer]",
        "---",
        "",
        f"# {arch} trained with davit",
        "",
        "## Model",
        "",
        f"DaViT (Dual Attention Vision Transformer), `{arch}`: embed dims {mc.get('embed_dims')}, depths "
        f"{mc.get('depths')}, heads {mc.get('num_heads')}, window {mc.get('window_size')}; a {n_cls}-class head.",
        "",
        "## Data",
        "",
    ]
    if data:
        where = data.get("root") or "(built in)"
        lines.append(f"`data.kind={data.get('kind')}`, `data.root={where}`, {n_cls} classes")
    else:
        lines.append(f"{n_cls} classes")
    if names:
        lines[-1] += ": " + ", ".join(names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "")
    lines += ["", "## Recipe", ""]
    if run_cfg:
        optim, sched, train = (run_cfg.get(k, {}) for k in ("optim", "sched", "train"))
        lines.append(
            f"{optim.get('name', '')} lr {optim.get('lr')} (per {optim.get('lr_base_batch')} images), weight decay "
            f"{optim.get('weight_decay')}; {sched.get('name', '')} schedule, warmup {sched.get('warmup')}; "
            f"{train.get('epochs') or train.get('iters')} {'epochs' if train.get('epochs') else 'iterations'}, "
            f"batch {train.get('batch_size')} per process, amp {train.get('amp')}."
        )
        lines.append("The full resolved recipe is `davit_recipe.yaml`; re-run it with `davit train --config`.")
    else:
        lines.append("Not recorded (the weights were published without their run folder).")
    lines += ["", "## Metrics", ""]
    shown = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    keep = ("top1", "top5", "val_loss", "best_top1", "epochs", "steps", "seconds", "global_batch", "world_size")
    if shown:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {shown[k]:.4g} |" for k in keep if k in shown]
        if rows:
            lines += ["", "Per-epoch values: `metrics.jsonl`."]
    else:
        lines.append("Not recorded.")
    if "epoch" in meta:
        lines += ["", f"Weights saved at epoch {meta['epoch']}, step {meta.get('step')}."]
    lines += ["", "## Preprocessing", ""]
    if pre:
        size, crop = pre.get("img_size"), pre.get("crop_pct", 1.0)
        lines.append(
            f"RGB; resize the short side to {round(size / crop) if size else '?'} ({pre.get('interpolation')}), "
            f"centre-crop {size}x{size}, scale to [0, 1], normalise with mean {pre.get('mean')} and std "
            f"{pre.get('std')}. `davit predict` and `davit eval` apply it from the weights' header."
        )
    else:
        lines.append("Not recorded.")
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "import davit",
        "",
        f'model = davit.create_model("hf-hub:{name}").eval()',
        "```",
        "",
        "## License",
        "",
        f"{license}. The DaViT architecture: Ding et al., *DaViT: Dual Attention Vision Transformers*, ECCV 2022.",
        "",
    ]
    return "\n".join(lines)


def push_to_hub(
    run: str | os.PathLike[str],
    repo_id: str,
    *,
    weights: str = "best",
    private: bool = False,
    license: str = "mit",
    token: str | None = None,
    endpoint: str | None = None,
    commit_message: str = "Upload davit model",
) -> str:
    """Publish a run's weights, config and generated model card to a Hub model repo (created if missing).

    Args:
        run: a ``davit train`` run folder, or a davit ``.safetensors`` weights file.
        repo_id: ``user/name`` (or ``org/name``).
        weights: ``best`` or ``last``.
        private: create the repo private.
        license: the model card's license.
        token: a Hub token (default: ``HF_TOKEN`` or the stored login).
        endpoint: the Hub URL (default: ``HF_ENDPOINT`` or huggingface.co).
        commit_message: the commit's message.

    Returns:
        The URL of the commit.
    """
    from huggingface_hub import HfApi

    with tempfile.TemporaryDirectory() as tmp:
        # Everything local is checked before the first request.
        folder = save_for_hub(run, tmp, weights=weights, license=license, repo_id=repo_id)
        api = HfApi(endpoint=endpoint, token=token)
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model", commit_message=commit_message)
    log.info("pushed %s to %s", run, info.commit_url)
    return str(info.commit_url)


def load_hub_files(name: str, revision: str | None = None) -> tuple[Path, dict[str, Any]]:
    """``hf-hub:user/repo`` or ``local-dir:/folder`` -> (the ``model.safetensors`` path, the parsed ``config.json``).

    Raises:
        FileNotFoundError: the local folder or its files are missing.
        ValueError: not a davit repo (no ``config.json`` with a ``davit_config``).
    """
    prefix, _, where = name.partition(":")
    if prefix == "local-dir":
        folder = Path(where).expanduser()
        cfg_path, weights = folder / "config.json", folder / "model.safetensors"
        for p in (cfg_path, weights):
            if not p.is_file():
                raise FileNotFoundError(f"{p} not found: a davit hub folder holds config.json and model.safetensors")
    else:
        from huggingface_hub import hf_hub_download

        repo, _, rev = where.partition("@")
        cfg_path = Path(hf_hub_download(repo, "config.json", revision=rev or revision))
        weights = Path(hf_hub_download(repo, "model.safetensors", revision=rev or revision))
    config = json.loads(cfg_path.read_text())
    if "davit_config" not in config:
        raise ValueError(f"{name} is not a davit model repo: its config.json has no davit_config")
    return weights, config
