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
    p = sub.add_parser("models", help="the model zoo: params, GMACs, reported top-1")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--img-size", type=int, default=None, help="count GMACs at this input size (default: each model's)")
    p.set_defaults(func=_models)

    p = sub.add_parser("convert", help="convert any DaViT checkpoint to a safetensors file with its config")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--model", required=True, help="zoo name, e.g. davit_tiny")
    p.add_argument("--source", default="auto", help="checkpoint layout (default: detect)")
    p.set_defaults(func=_convert)

    p = sub.add_parser("info", help="describe a checkpoint: format, model, params")
    p.add_argument("file")
    p.add_argument("--json", action="store_true")
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


# ------------------------------------------------------------------------------------------------ training (#3)
def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train from a recipe (also under torchrun -m davit train ... for DDP/FSDP)",
        description="Train from a YAML recipe: davit train --config configs/cls/digits.yaml --out runs/digits",
    )
    p.add_argument("--config", required=True, help="recipe YAML, e.g. configs/cls/digits.yaml")
    p.add_argument("--out", default=None, help="run folder (default: the recipe's out)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt if it exists")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.epochs=4 or epochs=4, optim.lr=5e-4")
    p.set_defaults(func=_train)


def _train(a: argparse.Namespace) -> int:
    import os

    from .engine import NonFiniteLossError
    from .engine.run import train_from_config

    try:
        summary = train_from_config(a.config, a.overrides, out=a.out, resume=a.resume)
    except NonFiniteLossError as e:
        print(f"davit train: error: {e}", file=sys.stderr)
        return 3
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps({k: v for k, v in summary.items() if k != "examples"}, indent=2))
    return 130 if summary.get("interrupted") else 0


# -------------------------------------------------------------------------------------------- eval / predict (#3)
def _add_eval(sub: argparse._SubParsersAction) -> None:
    def model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", default=None, help="zoo name, e.g. davit_tiny (optional with --checkpoint)")
        p.add_argument("--weights", default=None, help="published tag (msft_in1k) or a checkpoint path")
        p.add_argument("--checkpoint", default=None, help="a davit train output, e.g. runs/x/best.safetensors")
        p.add_argument("--img-size", type=int, default=None, help="input side (default: the weights' own)")
        p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
        p.add_argument("--no-optimize", action="store_true", help="run the plain model, not davit.optimize's")
        p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("eval", help="top-1/top-5 on an ImageFolder with the weights' own preprocessing")
    model_args(p)
    p.add_argument("--data", required=True, help="folder with one sub-folder per class (or holding train/ and val/)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"))
    p.set_defaults(func=_eval)

    p = sub.add_parser("predict", help="class names and probabilities for image files")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    model_args(p)
    p.add_argument("--topk", type=int, default=5)
    p.set_defaults(func=_predict)


def _eval(a: argparse.Namespace) -> None:
    from .engine.evaluate import evaluate_imagefolder

    m = evaluate_imagefolder(
        a.model, a.data, weights=a.weights, checkpoint=a.checkpoint, batch_size=a.batch_size, img_size=a.img_size,
        workers=a.workers, device=a.device, amp=a.amp, optimize=not a.no_optimize,
    )  # fmt: skip
    if a.json:
        print(json.dumps(m, indent=2))
        return
    print(f"{m['model']} on {m['data']} ({m['images']} images at {m['img_size']}px, {m['skipped']} unreadable skipped)")
    print(f"top1 {m['top1']:.3f}  top5 {m['top5']:.3f}  loss {m['loss']:.4f}  {m['images_per_second']:.1f} images/s")


def _predict(a: argparse.Namespace) -> None:
    from .engine.predict import predict

    results = predict(
        a.images, a.model, weights=a.weights, checkpoint=a.checkpoint, topk=a.topk, img_size=a.img_size,
        device=a.device, optimize=not a.no_optimize,
    )  # fmt: skip
    if a.json:
        print(json.dumps(results, indent=2))
        return
    for r in results:
        print(r["image"])
        for q in r["predictions"]:
            print(f"  {q['rank']:>2}. {q['probability']:7.2%}  {q['label']}  ({q['index']})")


# ----------------------------------------------------------------------------------------------- segmentation (#4)
def _add_seg(sub: argparse._SubParsersAction) -> None:
    seg = sub.add_parser("seg", help="semantic segmentation: UperNet on DaViT (ADE20K recipe)")
    ss = seg.add_subparsers(dest="seg_command", required=True)

    p = ss.add_parser("train", help="train with a recipe (configs/seg/*.yaml); key=value overrides")
    p.add_argument("--config", required=True, help="recipe YAML, e.g. configs/seg/upernet_davit_tiny_ade20k.yaml")
    p.add_argument("--out", default=None, help="run folder (default: the recipe's out)")
    p.add_argument("--resume", nargs="?", const="auto", default=None, help="resume from OUT/last.pt (or a path)")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. data.root=data/ade train.iters=1000")
    p.set_defaults(func=_seg_train)

    p = ss.add_parser("eval", help="mIoU / mAcc / aAcc / per-class IoU of a checkpoint on the validation split")
    p.add_argument("--config", required=True, help="the recipe the checkpoint was trained with")
    p.add_argument("--checkpoint", required=True, help="best.safetensors of a run, or an official mmseg checkpoint")
    p.add_argument("--aug-test", action="store_true", help="multi-scale (0.5..1.75) + flip")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. eval.mode=slide data.root=...")
    p.set_defaults(func=_seg_eval)

    p = ss.add_parser("predict", help="write the mask PNG and a colour overlay PNG per image")
    p.add_argument("images", nargs="+")
    p.add_argument("--checkpoint", required=True, help="best.safetensors; its run's config.yaml is read beside it")
    p.add_argument("--config", default=None, help="the training recipe, if the checkpoint left its run folder")
    p.add_argument("--out", default="predictions", help="output folder")
    p.add_argument("--aug-test", action="store_true", help="multi-scale + flip")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_seg_predict)

    p = ss.add_parser("make-synthetic", help="write a synthetic shapes dataset in the ADE20K layout")
    p.add_argument("root")
    p.add_argument("--n", type=int, default=64, help="training images")
    p.add_argument("--n-val", type=int, default=16, help="validation images")
    p.add_argument("--size", type=int, default=96, help="image side")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_seg_make_synthetic)


def _seg_train(a: argparse.Namespace) -> None:
    from .tasks.segmentation import load_seg_config, train_segmentation

    extra = ([f"out={a.out}"] if a.out else []) + ([f"resume={a.resume}"] if a.resume else [])
    summary = train_segmentation(load_seg_config(a.config, [*a.overrides, *extra]))
    print(f"mIoU {summary.get('miou', float('nan')):.2f} (best {summary.get('best_miou') or 0:.2f}) in "
          f"{summary['seconds']:.0f} s; outputs in {summary['out']}")  # fmt: skip


def _seg_eval(a: argparse.Namespace) -> None:
    from .tasks.segmentation import evaluate_segmentation, load_seg_config

    m = evaluate_segmentation(load_seg_config(a.config, a.overrides), a.checkpoint, aug=a.aug_test, device=a.device)
    if a.json:
        print(json.dumps(m, indent=2))
        return
    print(f"mIoU {m['miou']:.2f}  mAcc {m['macc']:.2f}  aAcc {m['aacc']:.2f}")
    for k, v in m.items():
        if k.startswith("iou."):
            print(f"  {k[4:]:<24}{v:6.2f}")


def _seg_predict(a: argparse.Namespace) -> None:
    from .tasks.segmentation import predict_segmentation

    results = predict_segmentation(
        a.images, a.checkpoint, config=a.config, out_dir=a.out, aug=a.aug_test, device=a.device
    )
    for r in results:
        top = ", ".join(f"{k} {v:.1f}%" for k, v in sorted(r["classes"].items(), key=lambda kv: -kv[1])[:5])
        print(f"{r['image']}: {r['mask']}, {r['overlay']} ({top})")


def _seg_make_synthetic(a: argparse.Namespace) -> None:
    from .data.synthetic_seg import make_synthetic_seg

    root = make_synthetic_seg(a.root, n_train=a.n, n_val=a.n_val, size=a.size, seed=a.seed)
    print(f"wrote {a.n} + {a.n_val} images to {root} (4 classes; use data.root={root} data.num_classes=4)")


# ------------------------------------------------------------------------------------------------- detection (#4)
def _add_det(sub: argparse._SubParsersAction) -> None:
    det = sub.add_parser("det", help="detection and instance segmentation: Mask R-CNN, RetinaNet (COCO format)")
    dsub = det.add_subparsers(dest="det_command", required=True)
    p = dsub.add_parser("train", help="train from a recipe, e.g. configs/det/maskrcnn_davit_tiny_1x_coco.yaml")
    p.add_argument("--config", required=True, help="recipe YAML")
    p.add_argument("--out", default=None, help="run folder (default: the recipe's out)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt if it exists")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.iters=1000 data.train_ann=...")
    p.set_defaults(func=_det_train)
    p = dsub.add_parser("eval", help="COCO box/mask AP of a trained detector on the config's data.val_ann")
    p.add_argument("--config", required=True, help="the recipe or the run's config.yaml")
    p.add_argument("--checkpoint", required=True, help="best.safetensors / last.safetensors / last.pt of a run")
    p.add_argument("--device", default="cpu")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=_det_eval)
    p = dsub.add_parser("predict", help="draw detected boxes, labels and masks on PNGs")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--checkpoint", required=True, help="a run's best.safetensors (its config.yaml is read beside it)")
    p.add_argument("--config", default=None, help="the run's config (default: config.yaml beside the checkpoint)")
    p.add_argument("--out", default=None, help="folder for the drawings (default: beside each image)")
    p.add_argument("--score-thr", type=float, default=0.5, help="draw detections scoring at least this")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_det_predict)
    p = dsub.add_parser("make-synthetic", help="write a COCO-format shapes dataset (squares, discs, triangles)")
    p.add_argument("dir")
    p.add_argument("--n", type=int, default=64, help="training images")
    p.add_argument("--n-val", type=int, default=16, help="validation images")
    p.add_argument("--size", type=int, default=160, help="image side")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_det_make_synthetic)


def _det_train(a: argparse.Namespace) -> int:
    import os

    from .engine.fit import fit
    from .engine.run import load_run_config
    from .tasks.detection.task import DetTask

    items = [*a.overrides, *([f"out={a.out}"] if a.out else []), *(["resume=auto"] if a.resume else [])]
    _, cfg = load_run_config(a.config, items, task="det")
    summary = fit(cfg, DetTask(cfg))
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(summary, indent=2))
    return 130 if summary.get("interrupted") else 0


def _det_eval(a: argparse.Namespace) -> None:
    from .tasks.detection.task import evaluate_checkpoint

    print(json.dumps(evaluate_checkpoint(a.config, a.checkpoint, a.overrides, device=a.device), indent=2))


def _det_predict(a: argparse.Namespace) -> None:
    from .tasks.detection.predict import predict_files

    kw = dict(config=a.config, out_dir=a.out, score_thr=a.score_thr, device=a.device)
    for r in predict_files(a.images, a.checkpoint, **kw):
        found = ", ".join(f"{d['class']} {d['score']:.2f}" for d in r["detections"]) or "nothing"
        print(f"{r['image']}: {found} -> {r['out']}")


def _det_make_synthetic(a: argparse.Namespace) -> None:
    from .data.synthetic_det import make_synthetic_det

    paths = make_synthetic_det(a.dir, n_train=a.n, n_val=a.n_val, img_size=a.size, seed=a.seed)
    print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))


# ------------------------------------------------------------------------------------ benchmark / export (#5)
def _add_perf(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "benchmark",
        help="speed and memory vs timm in one run (benchmarks/bench.py; extra options are passed through)",
        description="Runs benchmarks/bench.py from the source checkout; see `python benchmarks/bench.py --help`.",
    )
    p.add_argument("--quick", action="store_true", help="a few minutes instead of ~20")
    p.add_argument("--model", default="davit_tiny")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="more bench.py options, e.g. --skip train,hires")
    p.set_defaults(func=_benchmark)

    p = sub.add_parser("export", help="export a model to ONNX (dynamic batch/H/W, checked in onnxruntime)")
    p.add_argument("out", help="output file (.onnx, or .pt2 for --format torch_export)")
    p.add_argument("--model", required=True, help="zoo name, e.g. davit_tiny")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--weights", help="published weight tag, or 'true' for the default weights")
    src.add_argument("--checkpoint", help="a checkpoint file in any supported layout")
    p.add_argument("--format", default="onnx", choices=["onnx", "torch_export"])
    p.add_argument("--img-size", type=int, default=224, help="example image size traced (any size runs later)")
    p.set_defaults(func=_export)


def _benchmark(a: argparse.Namespace) -> int:
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "bench.py"
    if not script.is_file():
        raise FileNotFoundError(f"{script} not found: `davit benchmark` runs from a source checkout of davit")
    argv = ["--model", a.model, *(["--quick"] if a.quick else []), *a.bench_args]
    return subprocess.run([sys.executable, str(script), *argv]).returncode


def _export(a: argparse.Namespace) -> None:
    from .export import export_model

    out = export_model(a.model, a.out, weights=a.weights, checkpoint=a.checkpoint, fmt=a.format, img_size=a.img_size)
    print(json.dumps(out, indent=2))


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
    _add_seg,
    _add_det,
    _add_perf,
    _add_hub,
]


def build_parser() -> argparse.ArgumentParser:
    """The full ``davit`` argument parser."""
    parser = argparse.ArgumentParser(prog="davit", description="DaViT: models, weights, training, evaluation")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for register in _REGISTRARS:
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``davit`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    from .config import ConfigError
    from .weights import CheckpointError

    try:
        rc = args.func(args)
    # ImportError: an optional extra is missing; the message names the pip command.
    except (
        CheckpointError,
        ConfigError,
        FileNotFoundError,
        NotADirectoryError,
        KeyError,
        ValueError,
        ImportError,
    ) as e:
        if args.verbose:
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"davit {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"davit {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
