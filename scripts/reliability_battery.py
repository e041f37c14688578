"""The fault-and-bad-input battery of issue 14: run the real ``davit`` CLI on faults, bad inputs and pickle payloads,
and print how each ended.

    python scripts/reliability_battery.py [--quick]

Each bad input must end in one clear line (``davit ...: error: ...``, non-zero exit) or the documented skip-and-warn;
a Python traceback, a hang (timeout) or an exit 0 where the input was wrong (a silently wrong result) is a failure.
Each kill must resume to the same weights as an uninterrupted run (bit-exact, CPU). Exit status 1 if anything failed.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MICRO = f"""
_base_: {ROOT / "configs/cls/digits.yaml"}
model:
  overrides: {{embed_dims: [8, 16, 32, 64], depths: [1, 1, 1, 1], num_heads: [1, 2, 2, 4], window_size: 4}}
data: {{img_size: 16, val_split: 0.6}}
train: {{epochs: 2, batch_size: 32, workers: 1, threads: 1, log_every: 5}}
sched: {{warmup: 1}}
"""
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}


def davit(*args: str, timeout: float = 120) -> tuple[int | None, str]:
    try:
        r = subprocess.run([sys.executable, "-m", "davit", *args], env=ENV, capture_output=True, text=True,
                           timeout=timeout)  # fmt: skip
    except subprocess.TimeoutExpired:
        return None, ""
    return r.returncode, r.stderr


def classify(rc: int | None, err: str) -> str:
    if rc is None:
        return "hang"
    if "Traceback" in err:
        return "traceback"
    if rc == 0:
        return "silent"
    lines = [ln for ln in err.splitlines() if ": error: " in ln]
    return "clear" if len(lines) == 1 else "unclear"


def bad_inputs(d: Path, run: Path) -> list[tuple[str, list[str]]]:
    from PIL import Image

    img = d / "ok.png"
    Image.new("RGB", (20, 20), (10, 20, 30)).save(img)
    (d / "garbage.jpg").write_bytes(b"\x00garbage" * 10)
    (d / "json.pth").write_text('{"a": 1}')
    (d / "html.pth").write_text("<!DOCTYPE html><html>404</html>")
    (d / "empty.safetensors").write_bytes(b"")
    (d / "trunc.safetensors").write_bytes((run / "best.safetensors").read_bytes()[:1000])
    (d / "a.yaml").write_text("_base_: b.yaml\n")
    (d / "b.yaml").write_text("_base_: a.yaml\n")
    (d / "list.yaml").write_text("- 1\n- 2\n")
    (d / "afile").write_text("x")
    loop = d / "loops"
    for c in ("a", "b", "c"):
        (loop / c).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(loop / c / "x.png")
        if not (loop / c / "loop").exists():
            (loop / c / "loop").symlink_to("..")
    import torch

    from davit.weights import read_checkpoint, save_safetensors

    sd = read_checkpoint(run / "best.safetensors")
    save_safetensors({k: v * float("nan") for k, v in sd.items()}, d / "nan.safetensors")
    save_safetensors({k: v.long() for k, v in sd.items()}, d / "int.safetensors")
    ck, cfg = str(run / "best.safetensors"), str(d / "m.yaml")
    (d / "m.yaml").write_text(MICRO)
    coco_img = d / "coco"
    coco_img.mkdir(exist_ok=True)
    Image.new("RGB", (32, 32)).save(coco_img / "1.png")
    coco = {"images": {}, "annotations": [], "categories": [{"id": 1, "name": "x"}]}
    (d / "images_dict.json").write_text(json.dumps(coco))
    coco["images"] = [{"id": 1, "file_name": "1.png"}]
    coco["annotations"] = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": "1,2,3,4"}]
    (d / "string_bbox.json").write_text(json.dumps(coco))
    del torch
    det = ["det", "train", "--config", str(ROOT / "configs/det/maskrcnn_davit_tiny_1x_coco.yaml"), "--out",
           str(d / "det"), f"data.train_images={coco_img}"]  # fmt: skip
    return [
        ("predict garbage image", ["predict", str(d / "garbage.jpg"), "--checkpoint", ck]),
        ("predict missing image", ["predict", str(d / "nope.png"), "--checkpoint", ck]),
        ("predict --img-size 0", ["predict", str(img), "--checkpoint", ck, "--img-size", "0"]),
        ("predict --img-size -5", ["predict", str(img), "--checkpoint", ck, "--img-size", "-5"]),
        ("predict --device bogus", ["predict", str(img), "--checkpoint", ck, "--device", "bogus"]),
        ("predict --device cuda:7", ["predict", str(img), "--checkpoint", ck, "--device", "cuda:7"]),
        ("predict NaN weights", ["predict", str(img), "--checkpoint", str(d / "nan.safetensors")]),
        ("predict int64 weights", ["predict", str(img), "--checkpoint", str(d / "int.safetensors")]),
        (
            "predict JSON named .pth",
            ["predict", str(img), "--checkpoint", str(d / "json.pth"), "--model", "davit_tiny"],
        ),
        (
            "predict HTML named .pth",
            ["predict", str(img), "--checkpoint", str(d / "html.pth"), "--model", "davit_tiny"],
        ),
        ("info empty file", ["info", str(d / "empty.safetensors")]),
        ("info truncated safetensors", ["info", str(d / "trunc.safetensors")]),
        ("eval symlink loops", ["eval", "--checkpoint", ck, "--data", str(loop), "--workers", "0"]),
        ("train _base_ cycle", ["train", "--config", str(d / "a.yaml")]),
        ("train recipe is a list", ["train", "--config", str(d / "list.yaml")]),
        ("train --out is a file", ["train", "--config", cfg, "--out", str(d / "afile")]),
        ("train unknown key", ["train", "--config", cfg, "train.bogus=1"]),
        ("train model.overrides.bogus", ["train", "--config", cfg, "--out", str(d / "o1"), "model.overrides.bogus=1"]),
        ("train missing config", ["train", "--config", str(d / "nope.yaml")]),
        ("det COCO images {}", [*det, f"data.train_ann={d / 'images_dict.json'}"]),
        ("det COCO string bbox", [*det, f"data.train_ann={d / 'string_bbox.json'}"]),
    ]


def payloads(d: Path) -> list[tuple[str, list[str], Path]]:
    marker = d / "PWNED"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    for name in ("evil.pth", "evil.pt", "evil.bin"):
        with open(d / name, "wb") as f:
            pickle.dump({"state_dict": {"x": Payload()}}, f)
    img = d / "ok.png"
    return [
        (f"payload via {cmd[0]} {name}", cmd, marker)
        for name in ("evil.pth", "evil.pt", "evil.bin")
        for cmd in (
            ["info", str(d / name)],
            ["convert", str(d / name), str(d / "out.safetensors"), "--model", "davit_tiny"],
            ["predict", str(img), "--checkpoint", str(d / name), "--model", "davit_tiny"],
        )
    ]


def kills(d: Path, ref: Path) -> list[tuple[str, bool]]:
    """Kill a run with each signal right after its first save, resume, compare with the uninterrupted run."""
    import torch

    from davit.weights import read_checkpoint

    want = read_checkpoint(ref / "last.safetensors")
    out = []
    cases = [("SIGKILL", signal.SIGKILL, False), ("SIGTERM", signal.SIGTERM, False), ("SIGINT", signal.SIGINT, False),
             ("SIGTERM to the group", signal.SIGTERM, True)]  # fmt: skip
    for name, sig, group in cases:
        run = d / f"kill_{sig.name}_{int(group)}"
        cmd = [sys.executable, "-m", "davit", "train", "--config", str(d / "m.yaml"), "--out", str(run)]
        p = subprocess.Popen(cmd, env=ENV, stderr=subprocess.PIPE, text=True, start_new_session=True)
        deadline = time.monotonic() + 240
        while not (run / "last.pt").exists() and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        (os.killpg if group else os.kill)(p.pid, sig)
        try:
            _, err = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            p.kill()
            out.append((name, False))
            continue
        clean = sig == signal.SIGKILL or (p.returncode == 130 and "Traceback" not in err)
        rc, err = davit("train", "--config", str(d / "m.yaml"), "--out", str(run), "--resume", timeout=300)
        got = read_checkpoint(run / "last.safetensors") if rc == 0 else {}
        exact = rc == 0 and got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        out.append((name, clean and exact))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    a = ap.parse_args()
    d = Path(tempfile.mkdtemp(prefix="davit-battery-"))
    (d / "m.yaml").write_text(MICRO)
    t0 = time.monotonic()
    rc, err = davit("train", "--config", str(d / "m.yaml"), "--out", str(d / "ref"), timeout=600)
    assert rc == 0, err[-3000:]
    rows = []
    for name, args in bad_inputs(d, d / "ref"):
        rc, err = davit(*args)
        rows.append((name, classify(rc, err), err.strip().splitlines()[-1][:150] if err.strip() else ""))
    for name, args, marker in payloads(d):
        rc, err = davit(*args)
        res = "silent" if marker.exists() else classify(rc, err)  # a payload that ran is the worst silent result
        rows.append((name, res, err.strip().splitlines()[-1][:150] if err.strip() else ""))
    killed = kills(d, d / "ref")
    for name, res, line in rows:
        print(f"{res:<10} {name:<36} {line}")
    for name, ok in killed:
        print(f"{'exact' if ok else 'FAILED':<10} kill: {name}")
    counts = {k: sum(r[1] == k for r in rows) for k in ("clear", "unclear", "traceback", "hang", "silent")}
    print()
    print("| kills tried | resumed bit-exact | bad inputs tried | clear one-line errors | unclear | tracebacks | hangs "
          "| silent wrong |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {len(killed)} | {sum(ok for _, ok in killed)} | {len(rows)} | {counts['clear']} | {counts['unclear']} "
          f"| {counts['traceback']} | {counts['hang']} | {counts['silent']} |")  # fmt: skip
    print(f"\n{time.monotonic() - t0:.0f} s; work folder {d}")
    if not a.keep:
        import shutil

        shutil.rmtree(d, ignore_errors=True)
    bad = counts["traceback"] + counts["hang"] + counts["silent"] + counts["unclear"]
    return int(bad > 0 or not all(ok for _, ok in killed))


if __name__ == "__main__":
    sys.exit(main())
