"""The user's path end to end (issue 15): recipes by name, one loader and one CLI grammar, self-describing files,
preprocessing that travels with the weights, safe export, fine-tuning controls."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import davit
from davit.cli import build_parser, main
from davit.config import ConfigError, OptimConfig
from davit.engine.optim import default_param_groups, freeze, layer_id, scaled_lr
from davit.engine.run import config_for_checkpoint, find_recipe, list_recipes, load_run_config, train_from_config
from davit.weights import CheckpointError

MICRO = dict(embed_dims=(16, 32, 64, 128), depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), window_size=4)


# ---------------------------------------------------------------------------------------------- recipes, loader
def test_recipes_are_package_data_found_by_name() -> None:
    p = find_recipe("cls/digits")
    assert p.is_file() and "davit/recipes/cls" in p.as_posix()
    assert find_recipe("cls/digits.yaml") == p
    assert find_recipe("configs/cls/digits.yaml").resolve() == p.resolve()  # the checkout's old path still works
    names = {r["name"] for r in list_recipes()}
    assert {"cls/digits", "cls/linear_probe_imagefolder", "seg/synthetic_demo", "det/synthetic_demo"} <= names
    assert not any(n.split("/")[1].startswith("_") for n in names)  # bases are not runnable
    with pytest.raises(ConfigError, match="did you mean cls/digits"):
        find_recipe("cls/digit")


def test_one_loader_for_every_task_with_bare_overrides() -> None:
    task, cfg = load_run_config("seg/synthetic_demo", ["iters=7"])  # seg used to skip the override resolver
    assert task == "seg" and cfg.train.iters == 7
    task, cfg = load_run_config("det/synthetic_demo", ["iters=3"])
    assert task == "det" and cfg.train.iters == 3
    with pytest.raises(ConfigError, match="classification recipe.*davit train --config cls/digits"):
        load_run_config("cls/digits", task="seg")


def test_cli_grammar_is_the_same_in_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    for argv in (["train"], ["seg", "train"], ["det", "train"]):
        a = parser.parse_args([*argv, "--config", "cls/digits", "--resume"])
        # None: an unset --device leaves the recipe's train.device (itself auto by default) in force.
        assert a.resume is True and a.device is None and a.json is False
        a = parser.parse_args([*argv, "--config", "cls/digits", "--resume", "runs/x/last.pt", "epochs=1"])
        assert a.resume == "runs/x/last.pt" and a.overrides == ["epochs=1"]
    for argv in (["seg", "eval"], ["det", "eval"], ["seg", "predict", "x.png"], ["det", "predict", "x.png"]):
        a = parser.parse_args([*argv, "--checkpoint", "f.safetensors"])
        assert a.device == "auto" and a.config is None and hasattr(a, "json") and hasattr(a, "out")
    assert parser.parse_args(["seg", "predict", "x.png", "--checkpoint", "f"]).out == "predictions"
    assert parser.parse_args(["det", "predict", "x.png", "--checkpoint", "f"]).out == "predictions"
    assert main(["seg", "train", "--config", "cls/digits"]) == 2
    assert "davit train --config cls/digits" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "(default: the recipe's train.device)" in " ".join(capsys.readouterr().out.split())


# ------------------------------------------------------------------------------------------ a self-describing run
@pytest.fixture(scope="module")
def digits_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("digits")
    overrides = ["epochs=1", "model.overrides.embed_dims=[16,32,64,128]", "model.overrides.num_heads=[1,2,4,8]"]
    train_from_config("cls/digits", overrides, out=str(out / "run"))
    lonely = out / "lonely" / "digits.safetensors"  # no config.yaml beside it: the file alone must do
    lonely.parent.mkdir()
    shutil.copy(out / "run" / "best.safetensors", lonely)
    return lonely


def test_file_carries_task_config_and_preprocessing(digits_file: Path) -> None:
    task, cfg = config_for_checkpoint(digits_file)
    assert task == "cls" and cfg.data.img_size == 32 and cfg.model.overrides["embed_dims"] == [16, 32, 64, 128]
    m = davit.create_model("davit_tiny", pretrained=str(digits_file))
    pc = m.pretrained_cfg
    assert pc["input_size"] == (3, 32, 32) and pc["crop_pct"] == 1.0 and pc["mean"] == (0.5, 0.5, 0.5)
    assert pc["num_classes"] == 10 and pc["label_names"] == [str(i) for i in range(10)]
    timm_data = pytest.importorskip("timm.data")
    assert timm_data.resolve_data_config(model=m)["crop_pct"] == 1.0
    dc = davit.resolve_data_config(m)
    assert dc["input_size"] == (3, 32, 32)
    from PIL import Image

    x = davit.create_transform(**dc)(Image.new("RGB", (50, 40)))
    assert x.shape == (3, 32, 32)


def test_create_model_refuses_a_file_of_another_model(digits_file: Path) -> None:
    with pytest.raises(CheckpointError, match="holds a davit_tiny.*not a davit_small"):
        davit.create_model("davit_small", pretrained=str(digits_file))


def test_preprocessing_defaults_match_the_published_weights() -> None:
    m = davit.create_model("davit_tiny", **MICRO)
    assert davit.resolve_data_config(m)["crop_pct"] == 0.95
    from davit.data.transforms import build_eval_transform

    assert build_eval_transform().transforms[0].size == 235  # floor(224 / 0.95), the weights' resize


def test_cli_needs_only_the_file(digits_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    img = tmp_path / "x.png"
    Image.new("RGB", (32, 32), (200, 10, 10)).save(img)
    assert main(["predict", str(img), "--checkpoint", str(digits_file), "--json", "--no-optimize"]) == 0
    preds = json.loads(capsys.readouterr().out)
    assert preds[0]["predictions"][0]["label"] in [str(i) for i in range(10)]
    assert main(["info", str(digits_file), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["task"].startswith("cls") and info["class_names"][0] == "0"


def test_a_file_given_to_the_wrong_command_names_the_right_one(tmp_path: Path, capsys) -> None:
    det = tmp_path / "det.safetensors"
    save_file({"w": torch.zeros(1)}, str(det), metadata={"task": "det", "format": "davit"})
    assert main(["predict", "x.png", "--checkpoint", str(det)]) == 2
    assert "davit det eval / davit det predict" in capsys.readouterr().err
    assert main(["seg", "predict", "x.png", "--checkpoint", str(det)]) == 2
    assert "detection model" in capsys.readouterr().err
    assert main(["export", str(det), "--out", str(tmp_path / "d.onnx")]) == 2
    assert "detectors are not exported" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------- safe export
def test_export_refuses_what_would_be_wrong(digits_file: Path, tmp_path: Path, capsys) -> None:
    cases = [
        (["export", "--model", "davit_tiny", "--out", str(tmp_path / "a.onnx")], "random weights"),
        (
            ["export", str(digits_file), "--model", "davit_small", "--out", str(tmp_path / "a.onnx")],
            "not a davit_small",
        ),
        (["export", str(digits_file), "--out", str(tmp_path / "a.pt2")], "writes a .onnx file"),
        (["export", str(digits_file), "--out", str(tmp_path / "a.onnx"), "--img-size", "0"], "positive"),
    ]
    for argv, msg in cases:
        try:
            rc = main(argv)
        except SystemExit as e:  # a bad number is refused by argparse itself (same exit status, one error line)
            rc = e.code
        assert rc == 2, argv
        assert msg in capsys.readouterr().err
        assert not (tmp_path / "a.onnx").exists()


def test_export_embeds_class_names_and_preprocessing(digits_file: Path, tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "digits.onnx"
    assert main(["export", str(digits_file), "--out", str(out), "--opset", "18"]) == 0
    meta = ort.InferenceSession(str(out)).get_modelmeta().custom_metadata_map
    assert json.loads(meta["class_names"]) == [str(i) for i in range(10)]
    assert json.loads(meta["input_size"]) == [3, 32, 32] and json.loads(meta["mean"]) == [0.5, 0.5, 0.5]
    assert meta["task"] == "cls" and meta["model"] == "davit_tiny" and float(meta["crop_pct"]) == 1.0


# ------------------------------------------------------------------------------------------------- fine-tuning
def test_lr_scaling_warns_when_it_shrinks_the_lr(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert scaled_lr(OptimConfig(lr=1e-4, lr_base_batch=256), 8) == pytest.approx(1e-4 * 8 / 256)
    assert "lr_base_batch=0" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert scaled_lr(OptimConfig(lr=1e-4, lr_base_batch=0), 8) == 1e-4
    assert not caplog.text


def test_layer_decay_scales_lower_layers_less() -> None:
    depths = [1, 1, 3, 1]
    assert layer_id("stem.conv.weight", depths) == 0
    assert layer_id("stages.0.blocks.0.0.attn.qkv.weight", depths) == 1
    assert layer_id("stages.2.downsample.conv.weight", depths) == 3
    assert layer_id("backbone.stages.2.blocks.2.1.mlp.fc1.weight", depths) == 5
    assert layer_id("head.fc.weight", depths) == layer_id("decode_head.conv_seg.weight", depths) == 7
    model = davit.create_model("davit_tiny", num_classes=3, **MICRO)
    groups = default_param_groups(model, OptimConfig(layer_decay=0.5))
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    assert scale[id(model.head.fc.weight)] == 1.0
    assert scale[id(model.stem.conv.weight)] == 0.5**5  # 4 dual blocks + 1 above the stem
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_freeze_backbone_or_first_stages() -> None:
    model = davit.create_model("davit_tiny", num_classes=3, **MICRO)
    freeze(model, "backbone")
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(k.startswith("head.") for k in trainable)
    model = davit.create_model("davit_tiny", num_classes=3, **MICRO)
    freeze(model, "2")
    frozen = {k.split(".")[0] + "." + k.split(".")[1] for k, p in model.named_parameters() if not p.requires_grad}
    assert {"stem.conv", "stages.0", "stages.1"} <= frozen and not any(k.startswith("stages.2") for k in frozen)
    with pytest.raises(ConfigError, match="model.freeze"):
        load_run_config("cls/digits", ["model.freeze=7"])
    _, cfg = load_run_config("cls/linear_probe_imagefolder")
    assert cfg.model.freeze == "backbone" and cfg.optim.lr_base_batch == 0


def test_box_only_data_warns_mask_rcnn_and_trains_faster_rcnn(tmp_path: Path, caplog) -> None:
    from davit.data.synthetic_det import make_synthetic_det
    from davit.tasks.detection.task import DetTask

    paths = make_synthetic_det(tmp_path / "shapes", n_train=4, n_val=2, img_size=64)
    for key in ("train_ann", "val_ann"):  # box-only data: drop every segmentation
        ann = json.loads(paths[key].read_text())
        for a in ann["annotations"]:
            a.pop("segmentation", None)
        paths[key].write_text(json.dumps(ann))
    items = [f"data.{k}={v}" for k, v in paths.items()]
    _, cfg = load_run_config("det/synthetic_demo", items)
    with caplog.at_level(logging.WARNING):
        DetTask(cfg).build_datasets()
    assert "detector.arch=faster_rcnn" in caplog.text
    caplog.clear()
    _, cfg = load_run_config("det/synthetic_demo", [*items, "detector.arch=faster_rcnn"])
    model = DetTask(cfg).build_model()
    assert type(model).__name__ == "DaViTFasterRCNN" and not model.roi_heads.has_mask()
