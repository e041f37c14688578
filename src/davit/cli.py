"""The ``davit`` command: argv -> one typed library call per subcommand. No logic lives here.

User errors (bad path, wrong checkpoint, bad config) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence

Handler = Callable[[argparse.Namespace], int | None]


# ---------------------------------------------------------------------------------------------------- model zoo (#2)
def _add_zoo(sub: argparse._SubParsersAction) -> None:
    p = _parser(sub, "models", "the model zoo: params, GMACs, reported top-1")
    _json(p)
    p.add_argument(
        "--img-size",
        type=_side,
        default=None,
        metavar="PX",
        help="count GMACs at this input size (default: each model's)",
    )
    p.set_defaults(func=_models)

    p = _parser(sub, "convert", "convert any DaViT checkpoint to a safetensors file with its config")
    p.add_argument("src", help="the checkpoint to convert (official, timm, mmpretrain, Florence-2, ours)")
    p.add_argument("dst", help="the .safetensors file to write")
    p.add_argument("--model", required=True, help="zoo name, e.g. davit_tiny")
    p.add_argument("--source", default="auto", help="checkpoint layout (auto: detect)")
    p.set_defaults(func=_convert)

    p = _parser(sub, "info", "describe a checkpoint: task, model, classes, preprocessing, params")
    p.add_argument("file", help="any checkpoint file (a davit train output, official, timm, mmpretrain ...)")
    _json(p)
    p.set_defaults(func=_info)


def _models(a: argparse.Namespace) -> None:
    from .models.flops import zoo_table

    rows = zoo_table(img_size=a.img_size)
    if a.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'name':<16}{'params':>15}{'GMACs':>10}{'img':>6}{'top1':>7}")
    for r in rows:
        top1 = f"{r['top1']:.1f}" if r["top1"] is not None else "-"
        print(f"{r['name']:<16}{r['params']:>15,}{r['gmacs']:>10.2f}{r['img_size']:>6}{top1:>7}")


def _convert(a: argparse.Namespace) -> None:
    from .weights.tools import convert_file

    out = convert_file(a.src, a.dst, a.model, source=a.source)
    print(f"wrote {out['path']} ({out['model']}, {out['params']:,} params, from {out['source']} layout)")


def _info(a: argparse.Namespace) -> None:
    from .weights.tools import describe_file

    info = describe_file(a.file)
    if a.json:
        print(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            print(f"{k:>12}: {v}")


# ------------------------------------------------------------------------------------------ one grammar, shared
# Every subcommand gives --device, --json, --out and --resume the same meaning:
#   --device  auto | cpu | cuda | cuda:N (default auto: CUDA when available)
#   --json    print the result as JSON instead of text
#   --out     where results are written (a run folder for train, a folder for predict, a file for eval/export)
#   --resume  [PATH]: continue the run in --out (or from PATH)
def _device(p: argparse.ArgumentParser, default: str | None = "auto") -> None:
    hint = "" if default else " (default: the recipe's train.device)"
    p.add_argument("--device", default=default, help=f"auto | cpu | cuda | cuda:N{hint}")


def _json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def _parser(sub: argparse._SubParsersAction, name: str, help: str, **kw: object) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=kw.pop("description", help), formatter_class=_Formatter, **kw)


def _img_size(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--img-size", type=_side, default=None, metavar="PX", help=help)


def _side(text: str) -> int:
    # argparse prints an ArgumentTypeError as "davit X: error: argument --img-size: MESSAGE" (one line, exit 2); the
    # bound is the library's own (davit.data.transforms.check_img_size), so the CLI and the API refuse the same sizes.
    from .data.transforms import check_img_size

    try:
        return check_img_size(int(text), name="")  # type: ignore[return-value]
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e) if text.lstrip("-").isdigit() else f"not a number: {text!r}") from None


def _unit(text: str) -> float:
    # A score threshold is a probability: NaN keeps nothing silently and 2 draws nothing, so both are mistakes.
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= v <= 1.0:  # False for NaN too
        raise argparse.ArgumentTypeError(f"must be a score between 0 and 1, not {text}")
    return v


def _check_json_out(a: argparse.Namespace) -> None:
    """Refuse a ``--out`` that cannot take the result as JSON before any work is done (not after a long eval)."""
    from pathlib import Path

    from .errors import UserError

    out = getattr(a, "out", None)
    if out is None:
        return
    if not str(out).endswith(".json"):
        raise UserError(f"--out {out}: this command writes its result as JSON; name the file NAME.json")
    if Path(out).exists() and not Path(out).is_file():
        raise UserError(f"--out {out} is a folder (or not a regular file), not a .json file: pick another name")


def _emit(a: argparse.Namespace, result: object, text: Callable[[], None]) -> None:
    """Write ``result`` as JSON to ``--out`` (when that names a .json file), then print JSON or text."""
    out = getattr(a, "out", None)
    if out and str(out).endswith(".json"):
        from pathlib import Path

        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2))
    if a.json:
        print(json.dumps(result, indent=2))
    else:
        text()


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Help with every option's default, and descriptions printed as written (they hold example commands)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        # "(default: None)" or "(default: False)" tells a newcomer nothing: show defaults that are values.
        if action.default in (None, False, argparse.SUPPRESS) or action.nargs in ("*", "+", argparse.REMAINDER):
            return action.help or ""
        return super()._get_help_string(action)


# ------------------------------------------------------------------------------------------------ training (#3)
_TRAIN_DESCRIPTION = """Train any task from a recipe; the task (cls, seg, det) comes from the recipe.

  davit train --config cls/digits --out runs/digits
  davit train --config seg/synthetic_demo data.root=data/shapes iters=200
  davit train --config /path/to/my_recipe.yaml optim.lr=5e-4 --resume
  torchrun --nproc_per_node 2 -m davit train --config cls/davit_tiny_in1k ...     (DDP / FSDP)

--config takes a packaged recipe name (`davit recipes` lists them) or a YAML file (a run's config.yaml too)."""


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="recipe name (cls/digits) or YAML file")
    p.add_argument("--out", default=None, help="run folder (default: the recipe's out)")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="PATH",
                   help="continue from OUT/last.pt if it exists, or from PATH")  # fmt: skip
    # No default here: an unset --device must leave the recipe's (or an override's) train.device alone.
    _device(p, default=None)
    _json(p)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. epochs=4 optim.lr=5e-4 data.root=DIR")


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = _parser(sub, "train", "train from a recipe (any task)", description=_TRAIN_DESCRIPTION)
    _train_args(p)
    p.set_defaults(func=_train, task=None)

    p = _parser(sub, "recipes", "list the packaged recipes (names for davit train --config)")
    _json(p)
    p.set_defaults(func=_recipes)


def _train(a: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from .engine.run import train_from_config

    resume, overrides = a.resume, list(a.overrides)
    if isinstance(resume, str) and "=" in resume and not Path(resume).exists():
        # `--resume key=value`: argparse gave the optional PATH the first override; it is an override, not a path.
        resume, overrides = True, [resume, *overrides]
    summary = train_from_config(a.config, overrides, out=a.out, resume=resume, device=a.device, task=a.task)
    if os.environ.get("RANK", "0") == "0":
        if a.json:
            print(json.dumps({k: v for k, v in summary.items() if k != "examples"}, indent=2))
        else:
            primary = summary.get("primary_metric", "")
            best = summary.get(f"best_{primary}")
            shown = f"best {primary} {best:.4g}" if isinstance(best, (int, float)) else "no evaluation"
            if summary.get("interrupted"):  # not a finished run: say so, and how to go on
                by, steps = summary.get("stopped_by", "a signal"), f"{summary['steps']} of {summary['total_steps']}"
                print(f"stopped by {by} at step {steps} ({shown} so far); resume with: {summary['resume_command']}")
            else:
                print(f"{shown} after {summary['steps']} steps in {summary['seconds']:.0f} s; "
                      f"outputs in {summary['out']} (summary.json, best.safetensors)")  # fmt: skip
    return 130 if summary.get("interrupted") else 0


def _recipes(a: argparse.Namespace) -> None:
    from .engine.run import list_recipes

    rows = list_recipes()
    if a.json:
        print(json.dumps(rows, indent=2))
        return
    for r in rows:
        print(f"{r['name']:<36}{r['description']}")


# -------------------------------------------------------------------------------------------- eval / predict (#3)
def _add_eval(sub: argparse._SubParsersAction) -> None:
    def model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--checkpoint", default=None, help="a davit train output, e.g. runs/x/best.safetensors")
        p.add_argument("--model", default=None, help="zoo name, e.g. davit_tiny (not needed with --checkpoint)")
        p.add_argument("--weights", default=None, help="published tag (msft_in1k) or a checkpoint path")
        _img_size(p, "input side (default: the weights' own)")
        _device(p)
        p.add_argument("--no-optimize", action="store_true", help="run the plain model, not davit.optimize's")
        p.add_argument(
            "--backend", default="auto", choices=("auto", "torch", "aoti", "openvino", "onnxruntime"),
            help="inference runtime (default auto: what measured fastest for this job here; see docs/speed.md)",
        )  # fmt: skip
        _json(p)
        p.add_argument("--out", default=None, help="also write the result to this .json file")

    p = _parser(sub, "eval", "classification: top-1/top-5 on an ImageFolder with the weights' own preprocessing")
    model_args(p)
    p.add_argument("--data", required=True, help="folder with one sub-folder per class (or holding train/ and val/)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    p.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"), help="autocast precision")
    p.add_argument(
        "--report", default=None, metavar="DIR", help="also write per_class.csv and confusion_matrix.png here"
    )
    p.set_defaults(func=_eval, cpu_allocator="speed")

    p = _parser(sub, "predict", "classification: class names and probabilities for image files")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any format PIL reads)")
    model_args(p)
    p.add_argument("--topk", type=int, default=5, help="classes listed per image")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="compute precision (bf16 where native)")
    p.set_defaults(func=_predict, cpu_allocator="speed")


def _eval(a: argparse.Namespace) -> None:
    _check_json_out(a)
    from .engine.evaluate import evaluate_imagefolder

    m = evaluate_imagefolder(
        a.model, a.data, weights=a.weights, checkpoint=a.checkpoint, batch_size=a.batch_size, img_size=a.img_size,
        workers=a.workers, device=a.device, amp=a.amp, optimize=not a.no_optimize, report_dir=a.report,
        backend=a.backend,
    )  # fmt: skip

    def text() -> None:
        print(f"{m['model']} on {m['data']} ({m['images']} images at {m['img_size']}px, {m['skipped']} unreadable "
              f"skipped)\ntop1 {m['top1']:.3f}  top5 {m['top5']:.3f}  loss {m['loss']:.4f}  "
              f"{m['images_per_second']:.1f} images/s")  # fmt: skip
        if a.report:
            from .engine.evaluate import format_per_class_table

            print(format_per_class_table(m["per_class"]))
            print(f"wrote {m['report']['per_class']} and {m['report']['confusion_matrix']}")

    _emit(a, m, text)


def _predict(a: argparse.Namespace) -> None:
    _check_json_out(a)
    from .engine.predict import predict

    results = predict(
        a.images, a.model, weights=a.weights, checkpoint=a.checkpoint, topk=a.topk, img_size=a.img_size,
        device=a.device, optimize=not a.no_optimize, backend=a.backend, dtype=a.dtype,
    )  # fmt: skip

    def text() -> None:
        for r in results:
            print(r["image"])
            for q in r["predictions"]:
                print(f"  {q['rank']:>2}. {q['probability']:7.2%}  {q['label']}  ({q['index']})")

    _emit(a, results, text)


# ------------------------------------------------------------------------------------------------------ explain
def _add_explain(sub: argparse._SubParsersAction) -> None:
    p = _parser(sub, "explain", "attention maps and a class-activation map of an image, as PNGs")
    p.add_argument("image", help="an image file")
    p.add_argument("--model", default=None, help="zoo name, e.g. davit_tiny (optional with --checkpoint)")
    p.add_argument("--weights", default=None, help="published tag (msft_in1k) or a checkpoint path")
    p.add_argument("--checkpoint", default=None, help="a davit train output, e.g. runs/x/best.safetensors")
    p.add_argument("--out", default="explain", help="output folder (default: explain/)")
    p.add_argument(
        "--blocks", type=int, nargs="+", default=None, help="spatial blocks to draw (default: last per stage)"
    )
    p.add_argument("--point", type=float, nargs=2, default=None, metavar=("Y", "X"),
                   help="query point, fractions of the image (default: each window's mean attention)")  # fmt: skip
    p.add_argument("--channel", type=int, default=0, help="query channel of the channel-attention picture")
    p.add_argument("--cam-stage", type=int, default=-1, help="stage of the Grad-CAM map (default: the last)")
    p.add_argument("--target", default=None, help="class the Grad-CAM explains, name or index (default: predicted)")
    _img_size(p, "input side (default: the weights' own)")
    _device(p)
    _json(p)
    p.set_defaults(func=_explain)


def _explain(a: argparse.Namespace) -> None:
    from .explain import explain_image

    r = explain_image(
        a.image, model=a.model, weights=a.weights, checkpoint=a.checkpoint, out_dir=a.out, blocks=a.blocks,
        point=tuple(a.point) if a.point else None, channel=a.channel, cam_stage=a.cam_stage, target=a.target,
        img_size=a.img_size, device=a.device,
    )  # fmt: skip

    def text() -> None:
        print(f"{r['image']}: {r['class']} ({r['probability']:.1%})")
        for kind, path in r["files"].items():
            print(f"  {kind:>8}: {path}")

    _emit(a, r, text)


# ------------------------------------------------------------------------------- dense tasks: seg and det (#4)
def _dense_common(dsub: argparse._SubParsersAction, task: str, word: str) -> None:
    """``train`` (an alias of ``davit train`` that checks the recipe's task), ``eval`` and ``predict``."""
    p = _parser(dsub, "train", f"the same as davit train, for a {word} recipe",
                description=f"The same as `davit train`; refuses a recipe of another task.\n\n"
                f"  davit {task} train --config {'seg/synthetic_demo' if task == 'seg' else 'det/synthetic_demo'} "
                "--out runs/demo")  # fmt: skip
    _train_args(p)
    p.set_defaults(func=_train, task=task)

    p = _parser(dsub, "eval", f"{word} metrics of a checkpoint on its recipe's validation data")
    p.add_argument("--checkpoint", required=True, help="a run's best.safetensors (it records its config)")
    p.add_argument("--config", default=None, help="recipe name or YAML (default: the one recorded in the checkpoint)")
    if task == "seg":
        p.add_argument("--aug-test", action="store_true", help="multi-scale (0.5..1.75) + flip")
    _device(p)
    _json(p)
    p.add_argument("--out", default=None, help="also write the metrics to this .json file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. data.root=DIR eval.mode=slide")
    p.set_defaults(func=_seg_eval if task == "seg" else _det_eval)

    p = _parser(dsub, "predict", "write a drawing (and for seg a mask PNG) per image")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument("--checkpoint", required=True, help="a run's best.safetensors (it records its config)")
    p.add_argument("--config", default=None, help="recipe name or YAML (default: the one recorded in the checkpoint)")
    p.add_argument("--out", default="predictions", help="output folder")
    if task == "seg":
        p.add_argument("--aug-test", action="store_true", help="multi-scale + flip")
    else:
        p.add_argument("--score-thr", type=_unit, default=0.5, help="draw detections scoring at least this (0..1)")
    _device(p)
    _json(p)
    p.set_defaults(func=_seg_predict if task == "seg" else _det_predict)


def _add_seg(sub: argparse._SubParsersAction) -> None:
    seg = _parser(sub, "seg", "semantic segmentation: UperNet on DaViT (ADE20K layout)")
    ss = seg.add_subparsers(dest="seg_command", required=True)
    _dense_common(ss, "seg", "segmentation")
    p = _parser(ss, "make-synthetic", "write a synthetic shapes dataset in the ADE20K layout")
    p.add_argument("root", help="the folder to write (ADE20K layout)")
    p.add_argument("--n", type=int, default=64, help="training images")
    p.add_argument("--n-val", type=int, default=16, help="validation images")
    p.add_argument("--size", type=int, default=96, help="image side")
    p.add_argument("--seed", type=int, default=0, help="random seed of the drawing")
    p.set_defaults(func=_seg_make_synthetic)


def _seg_eval(a: argparse.Namespace) -> None:
    _check_json_out(a)
    from .engine.run import config_for_checkpoint
    from .tasks.segmentation import evaluate_segmentation

    _, cfg = config_for_checkpoint(a.checkpoint, a.config, a.overrides, task="seg")
    m = evaluate_segmentation(cfg, a.checkpoint, aug=a.aug_test or None, device=a.device)

    def text() -> None:
        print(f"mIoU {m['miou']:.2f}  mAcc {m['macc']:.2f}  aAcc {m['aacc']:.2f}")
        for k, v in m.items():
            if k.startswith("iou."):
                print(f"  {k[4:]:<24}{v:6.2f}")

    _emit(a, m, text)


def _seg_predict(a: argparse.Namespace) -> None:
    from .tasks.segmentation import predict_segmentation

    results = predict_segmentation(
        a.images, a.checkpoint, config=a.config, out_dir=a.out, aug=a.aug_test, device=a.device
    )
    if a.json:
        print(json.dumps(results, indent=2))
        return
    for r in results:
        top = ", ".join(f"{k} {v:.1f}%" for k, v in sorted(r["classes"].items(), key=lambda kv: -kv[1])[:5])
        print(f"{r['image']}: {r['mask']}, {r['overlay']} ({top})")


def _seg_make_synthetic(a: argparse.Namespace) -> None:
    from .data.synthetic_seg import make_synthetic_seg

    root = make_synthetic_seg(a.root, n_train=a.n, n_val=a.n_val, size=a.size, seed=a.seed)
    print(f"wrote {a.n} + {a.n_val} images to {root} (4 classes; use data.root={root} data.num_classes=4)")


def _add_det(sub: argparse._SubParsersAction) -> None:
    det = _parser(sub, "det", "detection and instance segmentation: Mask R-CNN, Faster R-CNN, RetinaNet (COCO)")
    dsub = det.add_subparsers(dest="det_command", required=True)
    _dense_common(dsub, "det", "detection")
    p = _parser(dsub, "make-synthetic", "write a COCO-format shapes dataset (squares, discs, triangles)")
    p.add_argument("dir", help="the folder to write (COCO layout)")
    p.add_argument("--n", type=int, default=64, help="training images")
    p.add_argument("--n-val", type=int, default=16, help="validation images")
    p.add_argument("--size", type=int, default=160, help="image side")
    p.add_argument("--seed", type=int, default=0, help="random seed of the drawing")
    p.set_defaults(func=_det_make_synthetic)


def _det_eval(a: argparse.Namespace) -> None:
    _check_json_out(a)
    from .tasks.detection.task import evaluate_checkpoint

    m = evaluate_checkpoint(a.config, a.checkpoint, a.overrides, device=a.device)
    _emit(a, m, lambda: print("  ".join(f"{k} {v:.2f}" for k, v in m.items() if isinstance(v, (int, float)))))


def _det_predict(a: argparse.Namespace) -> None:
    from .tasks.detection.predict import predict_files

    results = predict_files(a.images, a.checkpoint, config=a.config, out_dir=a.out, score_thr=a.score_thr,
                            device=a.device)  # fmt: skip
    if a.json:
        print(json.dumps(results, indent=2))
        return
    for r in results:
        found = ", ".join(f"{d['class']} {d['score']:.2f}" for d in r["detections"]) or "nothing"
        print(f"{r['image']}: {found} -> {r['out']}")


def _det_make_synthetic(a: argparse.Namespace) -> None:
    from .data.synthetic_det import make_synthetic_det

    paths = make_synthetic_det(a.dir, n_train=a.n, n_val=a.n_val, img_size=a.size, seed=a.seed)
    print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))


# ------------------------------------------------------------------------------------ benchmark / export (#5)
def _add_perf(sub: argparse._SubParsersAction) -> None:
    p = _parser(
        sub, "benchmark", "speed and memory vs timm in one run (extra options go to the benchmark script)",
        description="Speed and memory of DaViT against timm, side by side (davit._bench; works from an installed "
        "package).\n\n  davit benchmark --quick --out bench/\n  davit benchmark --model davit_small -- --skip train",
    )  # fmt: skip
    p.add_argument("--quick", action="store_true", help="inference sections only at small batches (a few minutes)")
    p.add_argument("--model", default="davit_tiny", help="davit_tiny | davit_small | davit_base")
    p.add_argument("--out", default="runs/benchmark", help="folder for the JSON and PNG")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="more options, e.g. -- --skip train,hires")
    p.set_defaults(func=_benchmark)

    p = _parser(
        sub, "export", "export a classifier or segmenter to ONNX (checked in onnxruntime), OpenVINO IR or torch.export",
        description="Export a trained model; the file's own metadata gives the architecture, classes and "
        "preprocessing.\n\n  davit export runs/digits/best.safetensors --out digits.onnx\n"
        "  davit export --model davit_tiny --weights msft_in1k --out tiny.onnx",
    )  # fmt: skip
    p.add_argument("checkpoint", nargs="?", default=None, help="a checkpoint file (any supported layout)")
    p.add_argument(
        "--out",
        default=None,
        help="output file, not a folder: .onnx, .xml with --format openvino, .pt2 with --format torch_export",
    )
    p.add_argument("--model", default=None, help="zoo name (not needed when the checkpoint records it)")
    p.add_argument("--weights", default=None, help="published weight tag, or 'true' for the default weights")
    p.add_argument("--random-weights", action="store_true", help="export a randomly initialised model on purpose")
    p.add_argument("--format", default="onnx", choices=["onnx", "torch_export", "openvino"], help="file format")
    _img_size(p, "example image side traced (default: the weights')")
    p.add_argument(
        "--opset",
        type=int,
        default=None,
        help="ONNX opset (default: 17 for classifiers, 18 for segmenters; one torch cannot write is refused)",
    )
    _json(p)
    p.set_defaults(func=_export)


def _benchmark(a: argparse.Namespace) -> int:
    import subprocess

    extra = [x for x in a.bench_args if x != "--"]
    argv = ["--model", a.model, "--out", a.out, *(["--quick"] if a.quick else []), *extra]
    if a.quick and "--skip" not in extra:
        # The quick look a user wants in minutes: inference and its GEMM ceiling; training, scaling, the allocator
        # A/B and the 2048 px image each spawn processes and take minutes more (run without --quick for them).
        argv += ["--skip", "compile,train,scale,alloc,hires"]
    return subprocess.run([sys.executable, "-m", "davit._bench", *argv]).returncode


def _export(a: argparse.Namespace) -> None:
    from .export import export_model

    if a.out is None and a.checkpoint and a.checkpoint.endswith((".onnx", ".pt2", ".xml")):
        a.out, a.checkpoint = a.checkpoint, None  # the older `davit export OUT --model ...` form
    if a.out is None:
        raise ValueError("pass --out FILE.onnx (or FILE.pt2 with --format torch_export)")

    out = export_model(
        a.model, a.out, weights=a.weights, checkpoint=a.checkpoint, fmt=a.format, img_size=a.img_size,
        opset=a.opset, random_weights=a.random_weights,
    )  # fmt: skip
    if a.json:
        print(json.dumps(out, indent=2))
    else:
        print(
            f"wrote {out['path']} ({out.get('task', 'cls')}, {out.get('model', '')}) in {out['seconds']} s"
            + (f"; onnxruntime max |diff| {max(out['max_abs_err'].values()):.1e}" if out.get("max_abs_err") else "")
        )


# ---------------------------------------------------------------------------------------------------- hub (#18)
def _add_hub(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "push",
        help="publish a run's weights, config and a generated model card to the Hugging Face Hub",
        description="davit push runs/t1 user/davit-tiny-pets; read back with create_model('hf-hub:user/...')",
    )
    p.add_argument("run", help="a davit train run folder (or a .safetensors file it wrote)")
    p.add_argument("repo_id", nargs="?", help="user/name on the Hub (not needed with --to-folder)")
    p.add_argument("--weights", default="best", choices=["best", "last"])
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--license", default="mit", help="the model card's license (default: mit)")
    p.add_argument("--endpoint", default=None, help="Hub URL (default: HF_ENDPOINT or huggingface.co)")
    p.add_argument("--to-folder", default=None, help="write the repo's files to this folder instead of uploading")
    p.set_defaults(func=_push)


def _push(a: argparse.Namespace) -> None:
    from .hub import push_to_hub, save_for_hub

    if a.to_folder:
        out = save_for_hub(a.run, a.to_folder, weights=a.weights, license=a.license, repo_id=a.repo_id)
        print(f"wrote {out}; read it with davit.create_model('local-dir:{out}')")
        return
    if not a.repo_id:
        raise ValueError("give the Hub repo to push to (user/name), or --to-folder DIR to write the files locally")
    url = push_to_hub(a.run, a.repo_id, weights=a.weights, private=a.private, license=a.license, endpoint=a.endpoint)
    print(f"pushed: {url}")


# ---------------------------------------------------------------------------------------------------------- main
_REGISTRARS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_zoo,
    _add_train,
    _add_eval,
    _add_explain,
    _add_seg,
    _add_det,
    _add_perf,
    _add_hub,
]


def build_parser() -> argparse.ArgumentParser:
    """The full ``davit`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="davit",
        description="DaViT: models, weights, training, evaluation, export.\n\n"
        "  davit models                                  the zoo\n"
        "  davit recipes                                 packaged training recipes\n"
        "  davit train --config cls/digits --out runs/digits\n"
        "  davit predict IMAGE --checkpoint runs/digits/best.safetensors\n"
        "  davit export runs/digits/best.safetensors --out digits.onnx",
        formatter_class=_Formatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for register in _REGISTRARS:
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``davit`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    from .engine.fit import NonFiniteLossError
    from .errors import UserError, user_message

    if getattr(args, "cpu_allocator", None):
        # The launcher's process-wide choice (inference keeps freed activations for reuse: batch-32 fp32 +40% here);
        # the library never sets it. DAVIT_MALLOC_TUNING=0 leaves glibc's defaults.
        from .allocator import tune_cpu_allocator

        tune_cpu_allocator(args.cpu_allocator)
    sub = getattr(args, "seg_command", None) or getattr(args, "det_command", None)
    name = f"davit {args.command}{' ' + sub if sub else ''}"
    try:
        rc = args.func(args)
    except NonFiniteLossError as e:  # a diverged run (any task): its own exit status, so schedulers can tell it apart
        if args.verbose:
            raise
        print(f"{name}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 3
    # ImportError: an optional extra is missing; the message names the pip command.
    except (UserError, FileNotFoundError, NotADirectoryError, KeyError, ValueError, ImportError) as e:
        if args.verbose:
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        # One line, whatever the raiser did (a DataLoader worker wraps its error in the worker's traceback).
        line = " ".join(user_message(str(msg)).split())
        print(f"{name}: error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    finally:
        _exit_hook()
    return int(rc or 0)


_exit_hook_set = False


def _exit_hook() -> None:
    """At interpreter exit, SIGKILL loader workers still alive, before multiprocessing's atexit hook would SIGTERM
    and join them without a timeout (training workers ignore SIGTERM: davit.engine.workers). atexit runs its hooks
    last-registered first, and multiprocessing registered its own when torch was imported, before this."""
    global _exit_hook_set
    if _exit_hook_set or "torch" not in sys.modules:  # no torch, no loader workers
        return
    import atexit

    from .engine.workers import kill_leftover_workers

    atexit.register(kill_leftover_workers)
    _exit_hook_set = True


if __name__ == "__main__":
    sys.exit(main())
