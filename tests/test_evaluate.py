"""Evaluation: metrics against a hand-computed example, DDP all-reduce, ``davit eval`` on an ImageFolder."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn
from torchvision import transforms as T

import davit
from davit.cli import main
from davit.engine.evaluate import evaluate_classifier, evaluate_imagefolder, load_classifier
from davit.weights import save_safetensors

# 4 samples, 6 classes. Rows 0-2 rank the classes 0 > 1 > ... > 5, row 3 ranks them 5 > 4 > ... > 0.
LOGITS = torch.tensor([[5.0, 4, 3, 2, 1, 0]] * 3 + [[0.0, 1, 2, 3, 4, 5]])
TARGETS = torch.tensor([0, 4, 5, 5])
# top-1: rows 0 and 3 -> 50 %. top-5: row 1's class 4 is 5th, row 2's class 5 is 6th -> rows 0, 1, 3 -> 75 %.
# loss: logsumexp(0..5) minus the target logit (5, 1, 0, 5), averaged.
LSE = math.log(sum(math.exp(v) for v in range(6)))
HAND_LOSS = LSE - (5 + 1 + 0 + 5) / 4


class LookupNet(nn.Module):
    """Returns LOGITS[i] for an input holding the sample index i."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(LOGITS.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[x.view(-1).long()]  # (B, 6)


def _loader(ids: list[int], batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    t = torch.tensor(ids, dtype=torch.float32).view(-1, 1)  # (N, 1) sample indices as "images"
    return [(t[i : i + batch], TARGETS[ids][i : i + batch]) for i in range(0, len(ids), batch)]


def test_metrics_match_the_hand_computed_example() -> None:
    net = LookupNet().train()
    m = evaluate_classifier(net, _loader([0, 1, 2, 3], batch=3), device="cpu")  # uneven batches: 3 + 1
    assert m["top1"] == pytest.approx(50.0) and m["top5"] == pytest.approx(75.0)
    assert m["loss"] == pytest.approx(HAND_LOSS, rel=1e-6)
    assert m["images"] == 4 and m["images_per_second"] > 0
    assert net.training  # the caller's mode is restored


def test_top5_with_fewer_than_five_classes_is_top_k_all() -> None:
    class Three(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x  # (B, 3)

    batch = [(torch.tensor([[3.0, 2, 1], [1.0, 2, 3]]), torch.tensor([1, 2]))]
    m = evaluate_classifier(Three(), batch, device="cpu", amp="bf16")
    assert m["top1"] == 50.0 and m["top5"] == 100.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DDP_WORKER = """
import json, torch
from davit.engine.evaluate import evaluate_classifier
torch.distributed.init_process_group("gloo")
rank = torch.distributed.get_rank()
logits = torch.tensor([[5.0, 4, 3, 2, 1, 0]] * 3 + [[0.0, 1, 2, 3, 4, 5]])
targets = torch.tensor([0, 4, 5, 5])
shard = [[0, 1, 2], [3]][rank]  # uneven shards: the counts, not the means, are summed
loader = [(logits[shard[i : i + 2]], targets[shard[i : i + 2]]) for i in range(0, len(shard), 2)]
m = evaluate_classifier(torch.nn.Identity(), loader, device="cpu")
torch.distributed.destroy_process_group()
print(json.dumps(m))
"""


def test_ddp_ranks_all_reduce_to_the_global_metrics() -> None:
    port = _free_port()
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        env.update(OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-c", DDP_WORKER], env=env, stdout=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    for out in outs:
        m = json.loads(out.strip().splitlines()[-1])
        assert m["top1"] == pytest.approx(50.0) and m["top5"] == pytest.approx(75.0)
        assert m["loss"] == pytest.approx(HAND_LOSS, rel=1e-6) and m["images"] == 4


# ------------------------------------------------------------------------------------------------ ImageFolder eval
class ColourNet(nn.Module):
    """Logits = 10 x the mean of each RGB channel: a red image is class 0, green 1, blue 2."""

    num_classes = 3
    class_names = ["red", "green", "blue"]
    pretrained_cfg = {"img_size": 8, "crop_pct": 1.0, "interpolation": "bilinear", "mean": (0, 0, 0), "std": (1, 1, 1)}

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(tuple(x.shape))
        return 10 * x.mean(dim=(2, 3))  # (B, 3)


COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


def _colour_folder(root: Path, layout: dict[str, list[str]]) -> Path:
    for folder, colours in layout.items():
        (root / folder).mkdir(parents=True)
        for i, c in enumerate(colours):
            Image.new("RGB", (20, 12), COLOURS[c]).save(root / folder / f"{i}.png")
    return root


def test_evaluate_imagefolder_maps_folders_by_name_and_scores(tmp_path: Path) -> None:
    # 6 images, one blue image filed under green: top-1 5/6
    layout = {"red": ["red", "red"], "green": ["green", "green", "blue"], "blue": ["blue"]}
    root = _colour_folder(tmp_path / "val", layout)
    net = ColourNet()
    m = evaluate_imagefolder(net, root, batch_size=4, workers=0, device="cpu", optimize=False)
    assert m["images"] == 6 and m["skipped"] == 0 and m["img_size"] == 8
    assert m["top1"] == pytest.approx(100 * 5 / 6) and m["top5"] == 100.0
    right = math.log(math.exp(10) + 2) - 10  # CE of [10, 0, 0] on its own class
    wrong = math.log(math.exp(10) + 2)  # ... on another class
    assert m["loss"] == pytest.approx((5 * right + wrong) / 6, rel=1e-5)
    assert all(s[1:] == (3, 8, 8) for s in net.seen)  # the module's own preprocessing (img_size 8)

    # a folder holding a subset of the classes, in another order, still maps by name
    sub = _colour_folder(tmp_path / "sub", {"blue": ["blue"], "green": ["green"]})
    assert evaluate_imagefolder(ColourNet(), sub, workers=0, device="cpu", optimize=False)["top1"] == 100.0


def _tiny_checkpoint(path: Path, names: list[str] | None, preprocessing: dict | None = None) -> davit.DaViT:
    model = davit.create_model(
        "davit_tiny",
        embed_dims=(16, 32, 64, 128),
        depths=(1, 1, 1, 1),
        num_heads=(1, 2, 4, 8),
        window_size=2,
        num_classes=len(names) if names else 1000,
    ).eval()
    meta = {"davit_config": model.cfg.to_dict(), "model_name": "davit_tiny"}
    if names:
        meta["class_names"] = names
    if preprocessing:
        meta["preprocessing"] = preprocessing
    save_safetensors(model.state_dict(), path, meta)
    return model


PP = {"img_size": 32, "crop_pct": 0.8, "interpolation": "bicubic", "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}


def test_davit_eval_cli_on_a_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ck = tmp_path / "best.safetensors"
    model = _tiny_checkpoint(ck, ["red", "green", "blue"], PP)
    data = _colour_folder(tmp_path / "ds" / "val", {"red": ["red", "blue"], "green": ["green"], "blue": ["blue"]})
    (tmp_path / "ds" / "train").mkdir()  # a dataset root holding train/ and val/ evaluates val/
    argv = ["eval", "--checkpoint", str(ck), "--data", str(tmp_path / "ds"), "--workers", "0", "--json"]
    assert main([*argv, "--device", "cpu", "--no-optimize"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["images"] == 4 and m["data"] == str(data) and m["img_size"] == 32

    # the same figures by hand: the checkpoint's preprocessing written out with torchvision, labels by folder name
    resize = T.Resize(40, T.InterpolationMode.BICUBIC)  # floor(32 / 0.8)
    tf = T.Compose([resize, T.CenterCrop(32), T.ToTensor(), T.Normalize(PP["mean"], PP["std"])])
    files = sorted(data.rglob("*.png"))
    x = torch.stack([tf(Image.open(f).convert("RGB")) for f in files])
    y = torch.tensor([["red", "green", "blue"].index(f.parent.name) for f in files])
    with torch.no_grad():
        logits = model(x)
    assert m["top1"] == pytest.approx(100 * (logits.argmax(1) == y).float().mean().item())
    assert m["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, y).item(), rel=1e-4)

    # the default path runs through davit.optimize (when present): the same figures
    assert main([*argv, "--device", "cpu"]) == 0
    fast = json.loads(capsys.readouterr().out)
    assert fast["top1"] == m["top1"] and fast["loss"] == pytest.approx(m["loss"], rel=1e-4)

    assert main(["eval", "--checkpoint", str(ck), "--data", str(data), "--workers", "0", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "top1" in out and "images/s" in out


def test_eval_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ck = tmp_path / "m.safetensors"
    _tiny_checkpoint(ck, ["a", "b"])
    assert main(["eval", "--checkpoint", str(ck), "--data", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "data folder not found" in err and "nope" in err and len(err.strip().splitlines()) == 1

    other = _colour_folder(tmp_path / "other", {"x": ["red"], "y": ["red"], "z": ["red"]})
    assert main(["eval", "--checkpoint", str(ck), "--data", str(other), "--workers", "0"]) == 2
    assert "3 class folders but the model has 2 outputs" in capsys.readouterr().err

    assert main(["eval", "--checkpoint", str(ck), "--weights", "msft_in1k", "--data", str(other)]) == 2
    assert "either --weights or --checkpoint" in capsys.readouterr().err


def test_load_classifier_reads_checkpoint_metadata(tmp_path: Path) -> None:
    ck = tmp_path / "w.safetensors"
    _tiny_checkpoint(ck, ["cat", "dog"], PP)
    loaded = load_classifier(checkpoint=ck, device="cpu")
    assert loaded.class_names == ["cat", "dog"] and not loaded.model.training
    assert loaded.preprocessing == {**PP, "mean": tuple(PP["mean"]), "std": tuple(PP["std"])}

    bare = tmp_path / "bare.safetensors"  # no metadata at all: the zoo name is needed, ImageNet names and preprocessing
    model = _tiny_checkpoint(bare, None)
    save_safetensors(model.state_dict(), bare)
    with pytest.raises(ValueError, match="pass --model"):
        load_classifier(checkpoint=bare)
    with pytest.raises(FileNotFoundError):
        load_classifier(checkpoint=tmp_path / "missing.safetensors")

    from davit.engine.checkpoint import save_training_state

    state = save_training_state(tmp_path / "last.pt", {"model": model.state_dict(), "config": "{}"})
    with pytest.raises(ValueError, match=r"training state .*best.safetensors"):
        load_classifier(checkpoint=state)
