"""The fault-and-bad-input battery of issue 14: run the real ``davit`` CLI on kills, bad inputs and pickle payloads,
and print how each ended.

    python scripts/reliability_battery.py [--quick] [--jobs N] [--out battery.json] [--keep]

- **Kills**: a micro ``davit train`` is killed (SIGKILL at several points, some inside a checkpoint save; SIGINT;
  SIGTERM to the process; SIGTERM to its process group, as Slurm and Kubernetes send it), resumed with ``--resume``
  and its final ``last.safetensors`` compared bit for bit with an uninterrupted run's. A kill "inside a save" is
  placed exactly by a ``sitecustomize`` hook in the child that SIGKILLs the process when ``os.replace`` is about to
  rename the N-th temporary file onto ``last.pt``/``best.safetensors`` (optionally after cutting the temporary file in
  half, as a kill mid-write leaves it).
- **Bad inputs**: every kind of bad file (missing, empty, garbage, truncated PNG/JPEG/safetensors/pt, a directory, a
  FIFO, a dangling link, unreadable permissions, wrong suffix, non-UTF-8 name, decompression bomb, NaN/inf/int
  weights, a checkpoint of another task ...) in every slot of ``davit train/eval/predict/seg/det/info/convert/export``
  that takes a file, bad configs and overrides, and bad numbers. Each must end in one clear line
  (``davit ...: error: ...``, non-zero exit) or the documented skip-and-warn; a traceback, a hang (timeout) or a
  silently wrong result (exit 0 on a wrong input, or a wrong score) is a failure.
- **Payloads**: 4 pickles that would create a marker file if unpickled, through every path that loads a checkpoint.

Exit status 1 if any traceback, hang, silent wrong result, payload run or non-bit-exact resume.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import json
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
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
SEG_MICRO = ["train.iters=4", "train.eval_every=4", "train.batch_size=2", "sched.warmup=1", "head.channels=16",
             "head.aux_channels=8", "model.overrides.embed_dims=[8,16,32,64]",
             "model.overrides.num_heads=[1,2,2,4]"]  # fmt: skip
DET_MICRO = ["train.iters=4", "train.eval_every=4", "train.batch_size=2", "sched.warmup=1", "sched.milestones=[3]",
             "model.overrides.embed_dims=[8,16,32,64]", "model.overrides.num_heads=[1,2,2,4]",
             "detector.fpn_channels=16", "detector.representation_size=32", "detector.mask_channels=16"]  # fmt: skip

# Placed on the child's PYTHONPATH: BATTERY_KILL="NAME:N[:half]" SIGKILLs the process at the N-th os.replace onto a
# file called NAME (that is, inside its atomic save, after the temporary file is written and before the rename).
SITECUSTOMIZE = """
import os, signal
_spec = os.environ.get("BATTERY_KILL")
if _spec:
    _name, _n, *_how = _spec.split(":")
    _seen = [0]
    _replace = os.replace
    def _hooked(src, dst, *a, **k):
        if os.path.basename(str(dst)) == _name:
            _seen[0] += 1
            if _seen[0] == int(_n):
                if _how == ["half"]:
                    os.truncate(src, os.path.getsize(src) // 2)
                os.kill(os.getpid(), signal.SIGKILL)
        return _replace(src, dst, *a, **k)
    os.replace = _hooked
"""


def env(**extra: str) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k != "BATTERY_KILL"}
    return {**e, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src"), **extra}


# Starting Python and importing torch costs seconds a process; hundreds of bad-input cases would spend most of the
# battery there. The zygote imports davit once, then forks one child per case that runs the CLI's own entry point
# (``sys.exit(davit.cli.main(argv))``, as ``python -m davit`` does) with its own stdin/stdout/stderr and exit status.
ZYGOTE = r"""
import json, os, signal, sys, traceback
import torch, davit.cli, davit.engine.fit, davit.weights  # the expensive imports, once
signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel: each writes its own exit status
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.setsid()
        fd = os.open(os.devnull, os.O_RDONLY); os.dup2(fd, 0)
        for i, name in ((1, "stdout"), (2, "stderr")):
            os.dup2(os.open(job[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), i)
        sys.stdin = open(0, closefd=False)
        sys.stdout, sys.stderr = open(1, "w", closefd=False), open(2, "w", closefd=False)
        sys.argv = ["davit", *[os.fsdecode(os.fsencode(a)) for a in job["args"]]]
        try:
            rc = davit.cli.main(sys.argv[1:])
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if not isinstance(e.code, (int, type(None))):
                print(e.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            rc = 1
        sys.stdout.flush(); sys.stderr.flush()
        with open(job["rc"], "w") as f:
            f.write(str(rc or 0))
        os._exit(rc or 0)
    print(pid, flush=True)
"""


class Zygote:
    """One pre-imported ``davit`` process that forks a child per case (see ``ZYGOTE``)."""

    def __init__(self, work: Path) -> None:
        import threading

        self.work, self.n, self.lock = work, 0, threading.Lock()
        self.p = subprocess.Popen([sys.executable, "-c", ZYGOTE], env=env(), stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)  # fmt: skip

    def run(self, args: list, timeout: float) -> tuple[int | None, str, str]:
        with self.lock:
            self.n += 1
            base = self.work / f"case{self.n}"
            job = {"args": [os.fsencode(a).decode("utf-8", "surrogateescape") for a in args],
                   "stdout": f"{base}.out", "stderr": f"{base}.err", "rc": f"{base}.rc"}  # fmt: skip
            self.p.stdin.write(json.dumps(job) + "\n")
            self.p.stdin.flush()
            pid = int(self.p.stdout.readline())
        deadline, rc_file = time.monotonic() + timeout, Path(job["rc"])
        while not rc_file.exists():
            if not _alive(pid):
                time.sleep(0.2)  # the exit status may be in flight
                if not rc_file.exists():
                    return -9, *_read(base)  # killed (by the OOM killer, say) before it could write its status
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
                return None, *_read(base)
            time.sleep(0.05)
        while _alive(pid) and time.monotonic() < deadline:  # its loader workers and files closing
            time.sleep(0.02)
        return int(rc_file.read_text() or 1), *_read(base)

    def close(self) -> None:
        self.p.stdin.close()
        self.p.wait(timeout=30)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _read(base: Path) -> tuple[str, str]:
    return tuple(Path(f"{base}.{k}").read_bytes().decode(errors="replace") if Path(f"{base}.{k}").exists() else ""
                 for k in ("out", "err"))  # fmt: skip


def davit(args: list, timeout: float = 120, cwd: Path | None = None, **kw: str) -> tuple[int | None, str, str]:
    try:
        r = subprocess.run([sys.executable, "-m", "davit", *args], env=env(**kw), capture_output=True, timeout=timeout,
                           cwd=cwd, stdin=subprocess.DEVNULL)  # fmt: skip
    except subprocess.TimeoutExpired:
        return None, "", ""
    return r.returncode, r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")


# ---------------------------------------------------------------------------------------------------- the cases
@dataclass
class Case:
    name: str
    args: list
    expect: str = "error"  # error: a clear error; warn: skip-and-warn (exit 0 and a warning) or a clear error;
    # ok: a valid if unusual input (exit 0) or a clear refusal
    check: Callable[[str], str | None] | None = None  # stdout -> why the result is wrong, or None
    marker: Path | None = None  # a payload's marker file (created if the payload ran)
    timeout: float = 120
    quick: bool = False
    result: dict = field(default_factory=dict)


def classify(c: Case, rc: int | None, out: str, err: str) -> str:
    if c.marker is not None and c.marker.exists():
        return "ran"
    if rc is None:
        return "hang"
    if "Traceback (most recent call last)" in err + out:
        return "traceback"
    if rc == 0:
        why = c.check(out) if c.check else None
        if why:
            c.result["why"] = why
            return "silent"
        if c.expect == "ok":
            return "ok"
        if c.expect == "warn" and ("warn" in err.lower() or "skip" in err.lower()):
            return "warn"
        return "silent"
    errors = [ln for ln in err.splitlines() if ": error: " in ln]
    return "clear" if len(errors) == 1 and rc in (2, 3) else "unclear"


def make_files(d: Path, ck: dict[str, Path]) -> dict[str, tuple[Path, str]]:
    """The bad (and odd but valid) files: name -> (path, expect)."""
    import torch
    from PIL import Image
    from safetensors import safe_open
    from safetensors.torch import save_file

    f: dict[str, tuple[Path, str]] = {}
    bad = d / "bad"
    bad.mkdir()

    def put(name: str, data: bytes, expect: str = "error") -> Path:
        p = bad / name
        p.write_bytes(data)
        f[name] = (p, expect)
        return p

    buf = d / "ok.png"
    Image.new("RGB", (20, 20), (10, 200, 30)).save(buf)
    png = buf.read_bytes()
    Image.new("RGB", (40, 40), (200, 20, 30)).save(d / "ok.jpg", quality=90)
    jpg = (d / "ok.jpg").read_bytes()
    st, pt = ck["cls"].read_bytes(), ck["cls_pt"].read_bytes()
    for suffix in ("png", "jpg", "safetensors", "pth", "yaml", "json"):
        put(f"empty.{suffix}", b"")
        put(f"garbage.{suffix}", bytes(range(256)) * 4)
    put("truncated.png", png[: len(png) // 2])
    put("truncated.jpg", jpg[: len(jpg) // 2])
    put("png_header_only.png", png[:8])
    put("text.png", b"hello, I am text\n")
    put("html.pth", b"<!DOCTYPE html><html><body>404 Not Found</body></html>")
    put("json.pth", b'{"state_dict": {}}')
    put("truncated.safetensors", st[:1000])
    put("truncated_tail.safetensors", st[: len(st) - 100])
    put("truncated.pt", pt[: len(pt) // 2])
    put("png_named.safetensors", png)
    put("png_named.pth", png)
    put("safetensors_named.png", st, "error")
    put("yaml_named.png", b"a: 1\n")
    put("zip.pth", _zip(d))
    # A 30000x30000 PNG header (a decompression bomb: PIL refuses it from the header alone).
    put("bomb.png", _png_with_size(png, 30000, 30000))
    put("zero_size.png", _png_with_size(png, 0, 0))
    for name, mode, size in (("tiny_1x1.png", "RGB", (1, 1)), ("gray.png", "L", (20, 20)),
                             ("rgba.png", "RGBA", (20, 20)), ("palette.gif", "P", (20, 20)),
                             ("cmyk.jpg", "CMYK", (20, 20)), ("i16.png", "I;16", (20, 20)),
                             ("wide_4000x3.png", "RGB", (4000, 3))):  # fmt: skip
        Image.new(mode, size).save(bad / name)
        f[name] = (bad / name, "ok")
    nonutf8 = os.fsdecode(bytes(bad) + b"/caf\xe9_\xff.png")
    Path(nonutf8).write_bytes(png)
    f["non_utf8_name.png"] = (Path(nonutf8), "ok")
    (bad / "a_dir.png").mkdir()
    (bad / "a_dir.safetensors").mkdir()
    (bad / "a_dir.yaml").mkdir()
    f.update({k: (bad / k, "error") for k in ("a_dir.png", "a_dir.safetensors", "a_dir.yaml")})
    os.mkfifo(bad / "fifo.png")
    os.mkfifo(bad / "fifo.safetensors")
    f.update({k: (bad / k, "error") for k in ("fifo.png", "fifo.safetensors")})
    (bad / "dangling.png").symlink_to(bad / "nowhere.png")
    (bad / "dangling.safetensors").symlink_to(bad / "nowhere.safetensors")
    f.update({k: (bad / k, "error") for k in ("dangling.png", "dangling.safetensors")})
    f["missing.png"] = (bad / "missing.png", "error")
    f["missing.safetensors"] = (bad / "missing.safetensors", "error")
    if os.geteuid() != 0:  # root reads anything: the permission cases mean nothing there
        for name, data in (("unreadable.png", png), ("unreadable.safetensors", st)):
            put(name, data)
            (bad / name).chmod(0)
    # Weights of the right names and shapes but wrong values or dtypes, keeping the recorded config.
    with safe_open(ck["cls"], "pt") as h:
        meta, sd = h.metadata(), {k: h.get_tensor(k) for k in h.keys()}
    for name, fn in (("nan", lambda t: t * float("nan")), ("inf", lambda t: t + float("inf")),
                     ("int64", lambda t: t.long()), ("fp16", lambda t: t.half())):  # fmt: skip
        save_file({k: fn(v).contiguous() for k, v in sd.items()}, bad / f"{name}.safetensors", metadata=meta)
        f[f"{name}.safetensors"] = (bad / f"{name}.safetensors", "ok" if name == "fp16" else "error")
    save_file({**sd, "head.fc.weight": sd["head.fc.weight"].t().contiguous()}, bad / "transposed_head.safetensors",
              metadata=meta)  # fmt: skip
    f["transposed_head.safetensors"] = (bad / "transposed_head.safetensors", "error")
    save_file({k: v for k, v in sd.items() if not k.startswith("head")}, bad / "headless.safetensors", metadata=meta)
    f["headless.safetensors"] = (bad / "headless.safetensors", "error")
    save_file(sd, bad / "no_metadata.safetensors")
    f["no_metadata.safetensors"] = (bad / "no_metadata.safetensors", "error")
    save_file(sd, bad / "bad_metadata.safetensors", metadata={**meta, "davit_config": "{not json"})
    f["bad_metadata.safetensors"] = (bad / "bad_metadata.safetensors", "error")
    torch.save({"model": {"x": torch.zeros(2)}}, bad / "other_model.pth")
    f["other_model.pth"] = (bad / "other_model.pth", "error")
    torch.save([1, 2, 3], bad / "a_list.pth")
    f["a_list.pth"] = (bad / "a_list.pth", "error")
    return f


def _png_with_size(png: bytes, w: int, h: int) -> bytes:
    import struct
    import zlib

    ihdr = png[12:29]  # b"IHDR" + 13 bytes
    new = b"IHDR" + struct.pack(">II", w, h) + ihdr[12:]
    return png[:8] + png[8:12] + new + struct.pack(">I", zlib.crc32(new)) + png[33:]


def _zip(d: Path) -> bytes:
    with zipfile.ZipFile(d / "z.zip", "w") as z:
        z.writestr("hello.txt", "not a checkpoint")
    return (d / "z.zip").read_bytes()


def bad_input_cases(d: Path, ck: dict[str, Path], data: dict[str, Path], clean: dict[str, float]) -> list[Case]:
    files = make_files(d, ck)
    ok_png, cfg = str(d / "ok.png"), str(d / "m.yaml")
    cls, seg, det = str(ck["cls"]), str(ck["seg"]), str(ck["det"])
    o = d / "outs"
    n = iter(range(10**6))

    def out() -> str:
        return str(o / f"o{next(n)}")

    cases: list[Case] = []
    img_slots = {
        "predict": lambda p: ["predict", p, "--checkpoint", cls],
        "seg predict": lambda p: ["seg", "predict", p, "--checkpoint", seg, "--out", out()],
        "det predict": lambda p: ["det", "predict", p, "--checkpoint", det, "--out", out()],
    }
    ck_slots = {
        "info": lambda p: ["info", p],
        "predict": lambda p: ["predict", ok_png, "--checkpoint", p],
        "eval": lambda p: ["eval", "--checkpoint", p, "--data", str(data["eval_clean"]), "--workers", "0"],
        "convert": lambda p: ["convert", p, out() + ".safetensors", "--model", "davit_tiny"],
        "export": lambda p: ["export", p, "--out", out() + ".onnx"],
        "seg predict": lambda p: ["seg", "predict", ok_png, "--checkpoint", p, "--out", out()],
        "det predict": lambda p: ["det", "predict", ok_png, "--checkpoint", p, "--out", out()],
        "train --resume": lambda p: ["train", "--config", cfg, "--out", out(), "--resume", p],
    }
    img_files = [k for k, (p, _) in files.items() if not k.endswith((".safetensors", ".pth", ".pt", ".yaml", ".json"))]
    ck_files = [k for k in files if k.endswith((".safetensors", ".pth", ".pt")) or k.startswith(("empty.", "garbage."))]
    quick_img = {"garbage.png", "truncated.jpg", "bomb.png", "a_dir.png", "fifo.png", "non_utf8_name.png"}
    quick_ck = {"truncated.safetensors", "nan.safetensors", "int64.safetensors", "html.pth", "fifo.safetensors"}
    for k in img_files:
        p, expect = files[k]
        for slot, make in img_slots.items():
            cases.append(Case(f"{slot} image {k}", make(os.fsdecode(p)), expect, quick=k in quick_img))
    for k in ck_files:
        p, expect = files[k]
        for slot, make in ck_slots.items():
            if expect == "ok" and slot in ("seg predict", "det predict", "train --resume"):
                expect = "error"  # a classifier's weights (fp16 ones too) are not a seg/det checkpoint nor a last.pt
            if slot == "info" and k in ("nan.safetensors", "inf.safetensors", "int64.safetensors",
                                        "transposed_head.safetensors", "headless.safetensors"):  # fmt: skip
                continue  # info describes a file; these are well-formed files (predict/eval refuse their values)
            # Valid weights (as timm's are): info describes them and says they carry no davit metadata.
            want = "ok" if slot == "info" and k == "no_metadata.safetensors" else expect
            cases.append(Case(f"{slot} checkpoint {k}", make(str(p)), want, quick=k in quick_ck))
    # A checkpoint of another task, in every slot of the others.
    for task, path in (("seg", seg), ("det", det), ("cls", cls)):
        for slot, make in ck_slots.items():
            if slot in ("info", "convert", "export") or slot.startswith(task) or (task == "cls" and slot in (
                    "predict", "eval", "export", "train --resume")):  # fmt: skip
                continue
            cases.append(Case(f"{slot} checkpoint of a {task} run", make(path), quick=task == "seg"))
    for slot, make in (("predict", ck_slots["predict"]), ("train --resume", ck_slots["train --resume"])):
        cases.append(Case(f"{slot} a run's last.pt of another architecture", make(str(ck["big_pt"]))))

    # Folders of images: one bad file among good ones is skipped with a warning, and the score is the clean one's.
    def same_score(want: float) -> Callable[[str], str | None]:
        def check(stdout: str) -> str | None:
            try:
                got = json.loads(stdout)["top1"]
            except (ValueError, KeyError):
                return f"no top1 in the output: {stdout[-200:]!r}"
            return None if abs(got - want) < 1e-9 else f"top1 {got} != {want} on the readable images alone"

        return check

    for k in ("garbage.jpg", "truncated.png", "truncated.jpg", "empty.png", "text.png", "bomb.png", "zero_size.png",
              "safetensors_named.png", "a_dir.png", "dangling.png", "fifo.png"):  # fmt: skip
        folder = d / "evalsets" / k.replace(".", "_")
        _copy_tree(data["eval_clean"], folder)
        target = folder / "3" / f"broken_{k}"
        src, _ = files[k]
        if src.is_symlink():
            target.symlink_to(os.readlink(src))
        elif src.is_dir():
            target.mkdir()
        elif k.startswith("fifo"):
            os.mkfifo(target)
        else:
            target.write_bytes(src.read_bytes())
        cases.append(Case(f"eval a folder with one {k}", ["eval", "--checkpoint", cls, "--data", str(folder),
                                                          "--workers", "1", "--json"], "warn",
                          check=same_score(clean["top1"]), quick=k in ("garbage.jpg", "fifo.png")))  # fmt: skip
    loops = d / "loops"
    _copy_tree(data["eval_clean"], loops)
    for c in ("0", "1", "2"):
        (loops / c / "loop").symlink_to("..")
    (loops / "3" / "up").symlink_to(loops)
    cases.append(Case("eval symlink loops", ["eval", "--checkpoint", cls, "--data", str(loops), "--workers", "0",
                                             "--json"], "ok", check=same_score(clean["top1"]), quick=True))  # fmt: skip
    cases += [
        Case("eval --data a file", ["eval", "--checkpoint", cls, "--data", ok_png]),
        Case("eval --data missing", ["eval", "--checkpoint", cls, "--data", str(d / "nope")]),
        Case("eval --data empty folder", ["eval", "--checkpoint", cls, "--data", str(_mk(d / "emptydir"))]),
        Case("eval --data images without class folders", ["eval", "--checkpoint", cls, "--data", str(data["flat"])]),
        Case("eval --data other classes", ["eval", "--checkpoint", cls, "--data", str(data["other_classes"])]),
        Case(
            "eval --data all images broken",
            ["eval", "--checkpoint", cls, "--data", str(data["all_broken"]), "--workers", "0"],
        ),  # fmt: skip
    ]

    # Configs.
    yamls = {
        "garbage": b"::: [[[ {{{\n\t- :",
        "binary": bytes(range(256)),
        "a list": b"- 1\n- 2\n",
        "a scalar": b"42\n",
        "empty": b"",
        "tab indent": b"model:\n\tname: davit_tiny\n",
        "duplicate keys": (
            f"_base_: {ROOT / 'configs/cls/digits.yaml'}\ntrain: {{epochs: 1}}\ntrain: {{epochs: 2}}\n".encode()
        ),
        "unknown top key": f"_base_: {ROOT / 'configs/cls/digits.yaml'}\nbogus: 1\n".encode(),
        "unknown nested key": f"_base_: {ROOT / 'configs/cls/digits.yaml'}\ntrain: {{epoch: 3}}\n".encode(),
        "missing _base_": b"_base_: /nowhere/base.yaml\n",
        "_base_ is a folder": f"_base_: {d}\n".encode(),
        "wrong type": f"_base_: {ROOT / 'configs/cls/digits.yaml'}\ntrain: {{epochs: many}}\n".encode(),
        "section is a list": f"_base_: {ROOT / 'configs/cls/digits.yaml'}\ntrain: [1, 2]\n".encode(),
        "unknown task": f"_base_: {ROOT / 'configs/cls/digits.yaml'}\ntask: pose\n".encode(),
        "non-UTF-8 text": b"model:\n  name: davit_\xff\xfe\n",
    }
    cfgdir = _mk(d / "cfgs")
    (cfgdir / "a.yaml").write_text("_base_: b.yaml\n")
    (cfgdir / "b.yaml").write_text("_base_: a.yaml\n")
    (cfgdir / "self.yaml").write_text("_base_: self.yaml\n")
    cfg_files = {"_base_ cycle": cfgdir / "a.yaml", "_base_ is itself": cfgdir / "self.yaml",
                 "a folder": files["a_dir.yaml"][0], "missing": d / "nope.yaml", "a PNG": d / "ok.png",
                 "a FIFO": _fifo(cfgdir / "fifo.yaml")}  # fmt: skip
    for name, text in yamls.items():
        cfg_files[name] = cfgdir / f"{name.replace(' ', '_')}.yaml"
        cfg_files[name].write_bytes(text)
    for name, path in cfg_files.items():
        for cmd in (["train"], ["seg", "train"], ["det", "train"]):
            cases.append(Case(f"{' '.join(cmd)} config {name}", [*cmd, "--config", str(path), "--out", out()],
                              quick=name in ("garbage", "_base_ cycle") and cmd == ["train"]))  # fmt: skip
    for name, path in (("cls", cfg), ("seg", "seg/synthetic_demo"), ("det", "det/synthetic_demo")):
        for cmd in (["seg", "train"], ["det", "train"]):
            if cmd[0] != name:
                cases.append(Case(f"{' '.join(cmd)} with a {name} recipe", [*cmd, "--config", path, "--out", out()]))

    # Overrides and numbers: each must be refused before any training (a bad value must never train silently).
    overrides = ["train.bogus=1", "bogus=1", "model.overrides.bogus=1", "train.epochs=-1", "train.epochs=abc",
                 "train.batch_size=0", "train.batch_size=-8", "train.batch_size=1.5", "optim.lr=-1", "optim.lr=nan",
                 "optim.lr=inf", "optim.weight_decay=-0.1", "data.img_size=0", "data.img_size=-16",
                 "data.img_size=100000", "train.workers=-1", "train.iters=-5", "data.val_split=1.5",
                 "data.val_split=-0.1", "train.accum_steps=0", "sched.warmup=-1", "data.mean=[0.5]", "data.std=[0,0,0]",
                 "model.overrides.embed_dims=[8,16]", "model.overrides.window_size=0",
                 "model.overrides.depths=[-1,1,1,1]",
                 "model.overrides.num_heads=[3,3,3,3]", "model.name=bogus", "train.device=tpu", "train.amp=fp8",
                 "data.kind=bogus", "optim.name=bogus", "sched.name=bogus", "train.epochs=1e999", "train.threads=-2",
                 "data.label_smoothing=2", "data.mixup=-1", "train.ema=maybe", "=1", "novalue", "train..epochs=1",
                 "data.root=/nowhere", "data.kind=imagefolder", f"data.root={ok_png}",
                 f"model.pretrained={d / 'nope.pth'}",
                 f"model.pretrained={files['garbage.pth'][0]}", f"model.pretrained={files['nan.safetensors'][0]}",
                 f"out={ok_png}"]  # fmt: skip
    quick_ov = {"train.bogus=1", "train.batch_size=0", "optim.lr=nan", "data.img_size=0", "model.name=bogus"}
    for ov in overrides:
        # The micro recipe is data.kind=digits, which ignores data.root: it trains and warns that the root is ignored.
        expect = "warn" if ov.startswith("data.root=") else "error"
        cases.append(Case(f"train {ov}", ["train", "--config", cfg, "--out", out(), ov], expect,
                          quick=ov in quick_ov, timeout=60))  # fmt: skip
    seg_ov = ["data.root=/nowhere", f"data.root={data['flat']}", "data.num_classes=0", "data.crop_size=[0,0]",
              "train.iters=-1", "eval.mode=bogus", "head.channels=0", "data.reduce_zero_label=maybe"]  # fmt: skip
    for ov in seg_ov:
        cases.append(Case(f"seg train {ov}", ["seg", "train", "--config", "seg/synthetic_demo", "--out", out(), ov],
                          timeout=60))  # fmt: skip
    det_ov = ["data.train_ann=/nowhere.json", f"data.train_ann={files['garbage.json'][0]}",
              f"data.train_ann={files['empty.json'][0]}", "detector.arch=bogus", "data.test_size=0",
              "detector.fpn_channels=-1", f"data.train_images={ok_png}"]  # fmt: skip
    for ov in det_ov:
        cases.append(Case(f"det train {ov}", ["det", "train", "--config", "det/synthetic_demo", "--out", out(),
                                              f"data.train_images={data['det']}/train",
                                              f"data.train_ann={data['det']}/annotations/train.json", ov],
                          timeout=60))  # fmt: skip
    for name, coco in _bad_cocos(data["det"]).items():
        cases.append(Case(f"det train COCO {name}", ["det", "train", "--config", "det/synthetic_demo", "--out", out(),
                                                     f"data.train_images={data['det']}/train", f"data.train_ann={coco}",
                                                     *DET_MICRO], quick=name == "images is a dict"))  # fmt: skip
    # CLI numbers and choices.
    ev = ["eval", "--checkpoint", cls, "--data", str(data["eval_clean"])]
    args = [
        ("predict --img-size 0", ["predict", ok_png, "--checkpoint", cls, "--img-size", "0"]),
        ("predict --img-size -5", ["predict", ok_png, "--checkpoint", cls, "--img-size", "-5"]),
        ("predict --img-size 100000", ["predict", ok_png, "--checkpoint", cls, "--img-size", "100000"]),
        ("predict --img-size abc", ["predict", ok_png, "--checkpoint", cls, "--img-size", "abc"]),
        ("predict --topk 0", ["predict", ok_png, "--checkpoint", cls, "--topk", "0"]),
        ("predict --topk -1", ["predict", ok_png, "--checkpoint", cls, "--topk", "-1"]),
        ("predict --device bogus", ["predict", ok_png, "--checkpoint", cls, "--device", "bogus"]),
        ("predict --device cuda:7", ["predict", ok_png, "--checkpoint", cls, "--device", "cuda:7"]),
        ("predict --device cuda:-1", ["predict", ok_png, "--checkpoint", cls, "--device", "cuda:-1"]),
        ("predict --model bogus", ["predict", ok_png, "--model", "bogus"]),
        ("predict no weights", ["predict", ok_png, "--model", "davit_tiny"]),
        ("predict --weights bogus_tag", ["predict", ok_png, "--model", "davit_tiny", "--weights", "bogus_tag"]),
        ("predict --out a folder for json", ["predict", ok_png, "--checkpoint", cls, "--out", str(_mk(d / "x.json"))]),
        ("eval --batch-size 0", [*ev, "--batch-size", "0"]),
        ("eval --batch-size -4", [*ev, "--batch-size", "-4"]),
        ("eval --workers -1", [*ev, "--workers", "-1"]),
        ("eval --img-size 0", [*ev, "--img-size", "0"]),
        ("export --img-size 0", ["export", cls, "--out", out() + ".onnx", "--img-size", "0"]),
        ("export --img-size -3", ["export", cls, "--out", out() + ".onnx", "--img-size", "-3"]),
        ("export --opset 0", ["export", cls, "--out", out() + ".onnx", "--opset", "0"]),
        ("export --opset 999", ["export", cls, "--out", out() + ".onnx", "--opset", "999"]),
        ("export no checkpoint", ["export", "--out", out() + ".onnx"]),
        ("export --out a folder", ["export", cls, "--out", str(_mk(d / "exp.onnx"))]),
        ("convert --model bogus", ["convert", cls, out() + ".safetensors", "--model", "bogus"]),
        ("convert --source bogus", ["convert", cls, out() + ".safetensors", "--model", "davit_tiny", "--source", "x"]),
        ("convert onto a folder", ["convert", cls, str(_mk(d / "dst.safetensors")), "--model", "davit_tiny"]),
        (
            "convert onto itself",
            [
                "convert",
                str(_copy(ck["cls"], d / "self.safetensors")),
                str(d / "self.safetensors"),
                "--model",
                "davit_tiny",
            ],
        ),  # fmt: skip
        ("seg predict --device bogus", ["seg", "predict", ok_png, "--checkpoint", seg, "--device", "bogus"]),
        (
            "det predict --score-thr nan",
            ["det", "predict", ok_png, "--checkpoint", det, "--score-thr", "nan", "--out", out()],
        ),  # fmt: skip
        (
            "det predict --score-thr 2",
            ["det", "predict", ok_png, "--checkpoint", det, "--score-thr", "2", "--out", out()],
        ),  # fmt: skip
        ("seg eval data.root missing", ["seg", "eval", "--checkpoint", seg, "data.root=/nowhere"]),
        ("det eval data.val_ann missing", ["det", "eval", "--checkpoint", det, "data.val_ann=/nowhere.json"]),
        ("train --out is a file", ["train", "--config", cfg, "--out", ok_png]),
        ("train --out under a file", ["train", "--config", cfg, "--out", ok_png + "/run"]),
        ("train --resume a missing file", ["train", "--config", cfg, "--out", out(), "--resume", str(d / "no.pt")]),
        (
            "seg train --resume then an override",
            ["seg", "train", "--config", "seg/synthetic_demo", "--out", out(), "--resume", "data.root=/nowhere"],
        ),  # fmt: skip
        ("train --device bogus", ["train", "--config", cfg, "--out", out(), "--device", "bogus"]),
        ("unknown command", ["bogus"]),
        ("info a folder", ["info", str(d)]),
    ]
    quick_args = {"predict --img-size -5", "predict --device bogus", "export --img-size 0", "train --out is a file"}
    cases += [Case(name, a, quick=name in quick_args) for name, a in args]  # fmt: skip
    return cases


def _bad_cocos(det_root: Path) -> dict[str, Path]:
    good = json.loads((det_root / "annotations/train.json").read_text())
    a0 = good["annotations"][0]
    variants = {
        "images is a dict": {**good, "images": {}},
        "no images key": {k: v for k, v in good.items() if k != "images"},
        "annotation without id": {**good, "annotations": [{k: v for k, v in a0.items() if k != "id"}]},
        "string bbox": {**good, "annotations": [{**a0, "bbox": "1,2,3,4"}]},
        "NaN bbox": {**good, "annotations": [{**a0, "bbox": [float("nan"), 1, 2, 3]}]},
        "negative bbox": {**good, "annotations": [{**a0, "bbox": [1, 1, -5, -5]}]},
        "unknown category": {**good, "annotations": [{**a0, "category_id": 999}]},
        "unknown image_id": {**good, "annotations": [{**a0, "image_id": 999}]},
        "missing image file": {**good, "images": [{**good["images"][0], "file_name": "nope.png"}]},
        "no categories": {**good, "categories": []},
        "a list": [1, 2],
    }
    out = {}
    for name, v in variants.items():
        p = det_root / f"bad_{name.replace(' ', '_')}.json"
        p.write_text(json.dumps(v))
        out[name] = p
    return out


def _mk(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def _fifo(p: Path) -> Path:
    os.mkfifo(p)
    return p


def _copy(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes())
    return dst


def _copy_tree(src: Path, dst: Path) -> None:
    import shutil

    shutil.copytree(src, dst)


def payload_cases(d: Path, ck: dict[str, Path], data: dict[str, Path]) -> list[Case]:
    """4 pickles that would create a marker file if unpickled, through every load path."""
    marker = d / "PWNED"
    import torch

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    pay = d / "payloads"
    pay.mkdir()
    with open(pay / "raw_pickle.pth", "wb") as f:
        pickle.dump({"state_dict": {"x": Payload()}}, f)
    torch.save({"state_dict": {"x": Payload()}}, pay / "torch_save.pt")
    torch.save({"model": Payload(), "epoch": 1}, pay / "last.pt")  # a run's full state, as --resume reads it
    with open(pay / "pytorch_model.bin", "wb") as f:
        pickle.dump(Payload(), f, protocol=2)
    ok_png, cfg = str(d / "ok.png"), str(d / "m.yaml")
    cases = []
    for p in sorted(pay.iterdir()):
        s = str(p)
        for name, a in (
            ("info", ["info", s]),
            ("convert", ["convert", s, str(d / "pay_out.safetensors"), "--model", "davit_tiny"]),
            ("predict", ["predict", ok_png, "--checkpoint", s]),
            ("predict --weights", ["predict", ok_png, "--model", "davit_tiny", "--weights", s]),
            ("eval", ["eval", "--checkpoint", s, "--data", str(data["eval_clean"]), "--workers", "0"]),
            ("export", ["export", s, "--out", str(d / "pay.onnx")]),
            ("train --resume", ["train", "--config", cfg, "--out", str(d / "pay_run"), "--resume", s]),
            ("train model.pretrained", ["train", "--config", cfg, "--out", str(d / "pr2"), f"model.pretrained={s}"]),
            ("seg predict", ["seg", "predict", ok_png, "--checkpoint", s, "--out", str(d / "pay_seg")]),
            ("seg train model.pretrained", ["seg", "train", "--config", "seg/synthetic_demo", "--out", str(d / "ps"),
                                            f"model.pretrained={s}", f"data.root={data['seg']}", *SEG_MICRO]),
            ("det predict", ["det", "predict", ok_png, "--checkpoint", s, "--out", str(d / "pay_det")]),
            ("det train model.pretrained", ["det", "train", "--config", "det/synthetic_demo", "--out", str(d / "pd"),
                                            f"model.pretrained={s}", f"data.train_images={data['det']}/train",
                                            f"data.train_ann={data['det']}/annotations/train.json", *DET_MICRO]),
        ):  # fmt: skip
            cases.append(Case(f"payload {p.name} via {name}", a, marker=marker, quick=name in ("info", "predict")))
    return cases


# --------------------------------------------------------------------------------------------------------- kills
KILLS = [
    # (name, signal, to the group, how: "after:FILE[:seconds]" | "save:NAME:N[:half]" | "start:seconds", repeat)
    ("SIGKILL at start-up (before any save)", signal.SIGKILL, False, "start:1.5"),
    ("SIGKILL right after the first last.pt", signal.SIGKILL, False, "after:last.pt:0"),
    ("SIGKILL mid epoch 2", signal.SIGKILL, False, "after:last.pt:1.0"),
    ("SIGKILL inside the 1st last.pt save", signal.SIGKILL, False, "save:last.pt:1"),
    ("SIGKILL inside the 1st last.pt save, half written", signal.SIGKILL, False, "save:last.pt:1:half"),
    ("SIGKILL inside the 1st best.safetensors save", signal.SIGKILL, False, "save:best.safetensors:1"),
    ("SIGKILL inside the final last.pt save", signal.SIGKILL, False, "save:last.pt:2"),
    ("SIGKILL inside the final last.safetensors save", signal.SIGKILL, False, "save:last.safetensors:2:half"),
    ("SIGKILL twice (again inside the resumed run's save)", signal.SIGKILL, False, "save:last.pt:1+save:last.pt:1"),
    ("SIGINT after the first last.pt", signal.SIGINT, False, "after:last.pt:0.3"),
    ("SIGINT twice (abort at once)", signal.SIGINT, False, "after:last.pt:0.3:twice"),
    ("SIGTERM after the first last.pt", signal.SIGTERM, False, "after:last.pt:0.3"),
    ("SIGTERM to the process group", signal.SIGTERM, True, "after:last.pt:0.3"),
]
QUICK_KILLS = {0, 3, 9, 11, 12}


def one_kill(d: Path, i: int, name: str, sig: signal.Signals, group: bool, how: str, want: dict) -> dict:
    import torch

    from davit.weights import read_checkpoint

    run = d / f"kill{i}"
    notes = []
    for step in how.split("+"):
        parts = step.split(":")
        extra = {"BATTERY_KILL": ":".join(parts[1:])} if parts[0] == "save" else {}
        cmd = [sys.executable, "-m", "davit", "train", "--config", str(d / "m.yaml"), "--out", str(run), "--resume"]
        p = subprocess.Popen(cmd, env=env(PYTHONPATH=f"{d / 'hook'}{os.pathsep}{ROOT / 'src'}", **extra),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
        if parts[0] != "save":
            deadline = time.monotonic() + 300
            if parts[0] == "start":
                time.sleep(float(parts[1]))
            else:
                while not (run / parts[1]).exists() and p.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.01)
                time.sleep(float(parts[2]))
            if p.poll() is None:
                (os.killpg if group else os.kill)(p.pid, sig)
                if parts[-1] == "twice":
                    time.sleep(0.05)
                    os.kill(p.pid, sig)
            else:
                notes.append("finished before the signal")
        try:
            _, err = p.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            return {"name": name, "exact": False, "why": "hung after the signal"}
        err = err.decode(errors="replace")
        want_rc = -signal.SIGKILL if sig == signal.SIGKILL else 130
        if p.returncode != want_rc:
            notes.append(f"exit {p.returncode} (want {want_rc})")
        if "Traceback" in err:
            notes.append("traceback: " + err.strip().splitlines()[-1][:200])
    rc, _, err = davit(["train", "--config", str(d / "m.yaml"), "--out", str(run), "--resume"], timeout=600)
    if rc != 0:
        return {"name": name, "exact": False, "why": f"resume exit {rc}: {err.strip().splitlines()[-1:]!r}"}
    got = read_checkpoint(run / "last.safetensors")
    exact = got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    leftovers = sorted(x.name for x in run.glob(".*.tmp"))
    if leftovers:
        notes.append(f"temporary files left: {leftovers}")
    ok = exact and not notes
    return {"name": name, "exact": ok, "why": "; ".join(notes) if notes else ("" if exact else "weights differ")}


# ---------------------------------------------------------------------------------------------------------- setup
def setup(d: Path, pool: cf.Executor) -> tuple[dict[str, Path], dict[str, Path]]:
    """Train the reference runs (cls, seg, det: micro, in parallel) and write the good data sets."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    (d / "m.yaml").write_text(MICRO)
    (d / "hook").mkdir()
    (d / "hook" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    data = {"seg": d / "seg_data", "det": d / "det_data"}
    jobs = {
        "cls": pool.submit(davit, ["train", "--config", str(d / "m.yaml"), "--out", str(d / "ref")], 600),
        "seg": pool.submit(_chain, [["seg", "make-synthetic", str(data["seg"]), "--n", "8", "--n-val", "4", "--size",
                                     "64"], ["seg", "train", "--config", "seg/synthetic_demo", "--out", str(d / "seg"),
                                             f"data.root={data['seg']}", *SEG_MICRO]]),
        "det": pool.submit(_chain, [["det", "make-synthetic", str(data["det"]), "--n", "8", "--n-val", "4", "--size",
                                     "128"], ["det", "train", "--config", "det/synthetic_demo", "--out", str(d / "det"),
                                              f"data.train_images={data['det']}/train",
                                              f"data.train_ann={data['det']}/annotations/train.json",
                                              f"data.val_images={data['det']}/val",
                                              f"data.val_ann={data['det']}/annotations/val.json", *DET_MICRO]]),
        "big": pool.submit(davit, ["train", "--config", str(d / "m.yaml"), "--out", str(d / "big"), "train.epochs=0",
                                   "train.iters=2", "model.overrides.embed_dims=[16,32,48,64]"], 600),
    }  # fmt: skip
    x, y = load_digits(return_X_y=True)
    for name, n_per_class in (("eval_clean", 3),):
        for c in range(10):
            _mk(d / name / str(c))
        counts = [0] * 10
        for img, label in zip(x, y):
            if counts[label] < n_per_class:
                Image.fromarray((img.reshape(8, 8) * 16).clip(0, 255).astype(np.uint8)).resize((32, 32)).save(
                    d / name / str(label) / f"{counts[label]}.png"
                )
                counts[label] += 1
        data[name] = d / name
    data["flat"] = _mk(d / "flat")
    for i in range(3):
        Image.new("RGB", (16, 16)).save(data["flat"] / f"{i}.png")
    data["other_classes"] = _mk(d / "other_classes")
    for c in ("cat", "dog"):
        Image.new("RGB", (16, 16)).save(_mk(data["other_classes"] / c) / "a.png")
    data["all_broken"] = _mk(d / "all_broken")
    for c in range(10):
        (_mk(data["all_broken"] / str(c)) / "x.jpg").write_bytes(b"not an image")
    for k, j in jobs.items():
        rc, _, err = j.result()
        if rc != 0:
            raise SystemExit(f"the reference {k} run failed (exit {rc}):\n{err[-3000:]}")
    ck = {"cls": d / "ref/best.safetensors", "cls_pt": d / "ref/last.pt", "seg": d / "seg/best.safetensors",
          "det": d / "det/best.safetensors", "big_pt": d / "big/last.pt"}  # fmt: skip
    return ck, data


def _chain(cmds: list[list[str]]) -> tuple[int | None, str, str]:
    for c in cmds:
        rc, out, err = davit(c, timeout=600)
        if rc != 0:
            return rc, out, err
    return rc, out, err


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a subset (one of each kind): a few minutes")
    ap.add_argument("--jobs", type=int, default=max(2, min(4, os.cpu_count() or 2)), help="parallel subprocesses")
    ap.add_argument("--out", default=None, help="also write every case and the counts to this JSON file")
    ap.add_argument(
        "--no-fork",
        dest="fork",
        action="store_false",
        help="start every case as its own `python -m davit` (slower; default: fork a pre-imported one)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--only", default=None, help="run only the cases whose name contains this (debugging)")
    a = ap.parse_args()
    d = Path(tempfile.mkdtemp(prefix="davit-battery-"))
    t0 = time.monotonic()
    with cf.ThreadPoolExecutor(a.jobs) as pool:
        ck, data = setup(d, pool)
        rc, out, err = davit(["eval", "--checkpoint", str(ck["cls"]), "--data", str(data["eval_clean"]), "--workers",
                              "0", "--json"])  # fmt: skip
        assert rc == 0, err
        clean = json.loads(out)
        cases = bad_input_cases(d, ck, data, clean) + payload_cases(d, ck, data)
        if a.quick:
            cases = [c for c in cases if c.quick]
        if a.only:
            cases = [c for c in cases if a.only in c.name]
        from davit.weights import read_checkpoint

        want = read_checkpoint(d / "ref/last.safetensors")
        kills = [k for i, k in enumerate(KILLS) if not a.quick or i in QUICK_KILLS]
        if a.only:
            kills = [k for k in kills if a.only in k[0]]
        kill_jobs = [pool.submit(one_kill, d, i, *k, want) for i, k in enumerate(kills)]

        zygote = Zygote(_mk(d / "zygote")) if a.fork else None

        def run(c: Case) -> Case:
            t = time.monotonic()
            rc, out, err = zygote.run(c.args, c.timeout) if zygote else davit(c.args, timeout=c.timeout)
            print(f"[{time.monotonic() - t0:5.0f} s] {c.name}", file=sys.stderr, flush=True)
            c.result.update(rc=rc, seconds=round(time.monotonic() - t, 1))
            c.result["outcome"] = classify(c, rc, out, err)
            lines = [ln for ln in err.strip().splitlines() if ln.strip()]
            c.result["line"] = (lines[-1] if lines else "")[:300]
            return c

        done = list(pool.map(run, cases))
        killed = [j.result() for j in kill_jobs]
        if zygote:
            zygote.close()
    seconds = time.monotonic() - t0
    bad_rows = [c for c in done if c.marker is None]
    pay_rows = [c for c in done if c.marker is not None]
    for c in done:
        o = c.result["outcome"]
        flag = "" if o in ("clear", "warn", "ok") else "  <-- FAIL"
        why = f" ({c.result['why']})" if "why" in c.result else ""
        print(f"{o:<9} {c.name:<58} {c.result['line'][:160]}{flag}{why}")
    for k in killed:
        print(f"{'exact' if k['exact'] else 'FAILED':<9} kill: {k['name']:<52} {k['why']}")
    kinds = ("clear", "warn", "ok", "unclear", "traceback", "hang", "silent")
    counts = {k: sum(c.result["outcome"] == k for c in bad_rows) for k in kinds}
    table = {
        "kills tried": len(killed),
        "resumed bit-exact": sum(k["exact"] for k in killed),
        "bad inputs tried": len(bad_rows),
        "clear one-line errors": counts["clear"],
        "documented skip-and-warn": counts["warn"],
        "valid odd inputs accepted": counts["ok"],
        "unclear messages": counts["unclear"],
        "tracebacks": counts["traceback"],
        "hangs": counts["hang"],
        "silent wrong results": counts["silent"],
        "payloads tried": len(pay_rows),
        "payloads ran": sum(c.result["outcome"] == "ran" for c in pay_rows),
        "payload tracebacks/hangs": sum(c.result["outcome"] in ("traceback", "hang", "silent") for c in pay_rows),
    }
    print()
    print("| " + " | ".join(table) + " |")
    print("|" + "---|" * len(table))
    print("| " + " | ".join(str(v) for v in table.values()) + " |")
    print(f"\n{seconds:.0f} s with {a.jobs} parallel processes{' (--quick)' if a.quick else ''}; work folder {d}")
    if a.out:
        Path(a.out).write_text(json.dumps({
            "table": table, "seconds": round(seconds), "quick": a.quick, "jobs": a.jobs,
            "cases": [{"name": c.name, "args": [os.fsencode(x).decode(errors="replace") for x in c.args],
                       "expect": c.expect, **c.result} for c in done],
            "kills": killed,
        }, indent=1))  # fmt: skip
    if not a.keep:
        import shutil

        for p in d.rglob("*"):  # the unreadable files of a non-root run
            if not p.is_symlink():
                p.chmod(0o755)
        shutil.rmtree(d, ignore_errors=True)
    failed = (table["tracebacks"] + table["hangs"] + table["silent wrong results"] + table["payloads ran"]
              + table["payload tracebacks/hangs"] + (table["kills tried"] - table["resumed bit-exact"]))  # fmt: skip
    return int(failed > 0)


if __name__ == "__main__":
    sys.exit(main())
