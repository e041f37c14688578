"""Stop signals, dead loader workers and diverged runs, through the real CLI in subprocesses (issue 14, items 5-6).

A scheduler's stop signals every process of the job, loader workers included (``os.killpg`` here): the run must save,
exit 130 and resume bit-exactly. A worker killed with SIGKILL (the OOM killer) must end the run with one line. No run
may hang at exit or leave a worker process behind, whatever ended it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest
import torch

from davit.engine.checkpoint import load_training_state
from davit.weights import read_checkpoint

ROOT = Path(__file__).resolve().parents[1]

# A micro DaViT on 16x16 digits, iteration-based with a small validation split: the first save comes a few steps in.
# One persistent loader worker for training and one for validation, as the recipes use them.
MICRO = f"""
_base_: {ROOT / "configs/cls/digits.yaml"}
model:
  overrides: {{embed_dims: [8, 16, 32, 64], depths: [1, 1, 1, 1], num_heads: [1, 2, 2, 4], window_size: 4,
              drop_path_rate: 0.1}}
data: {{img_size: 16, val_split: 0.1, mixup: 0.8}}
train: {{epochs: 0, iters: 400, eval_every: 5, batch_size: 32, workers: 1, threads: 1, log_every: 5}}
sched: {{warmup: 1}}
"""


def _env(tag: str) -> dict[str, str]:
    # The tag is inherited by every process the run starts (loader workers fork): it finds orphans afterwards.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src"), "DAVIT_TEST_TAG": tag}


def _tagged(tag: str) -> list[int]:
    """Pids of live processes started by the run tagged ``tag`` (zombies and the dead excluded)."""
    found = []
    for p in psutil.process_iter(["pid", "status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and p.environ().get("DAVIT_TEST_TAG") == tag:
                found.append(p.pid)
        except (psutil.Error, OSError):
            continue
    return found


def _no_orphans(tag: str, timeout: float = 10.0) -> None:
    # A dying run's workers notice their parent is gone within torch's 5 s status interval at worst.
    deadline = time.monotonic() + timeout
    while (left := _tagged(tag)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"processes left behind by the run: {left}"


def _start(args: list[str], tag: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "davit", *args], env=_env(tag), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,  # its own process group: killpg reaches the run and its workers only
    )  # fmt: skip


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {path.name}: {proc.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, f"no {path.name} after {timeout} s"
        time.sleep(0.05)


def _stop_group(proc: subprocess.Popen, sig: int, within: float = 60) -> tuple[str, str, float]:
    """Signal the whole process group (what Slurm, systemd and Kubernetes do); the output and seconds to exit."""
    t = time.monotonic()
    os.killpg(proc.pid, sig)
    try:
        out, err = proc.communicate(timeout=within)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"no exit within {within} s of {signal.Signals(sig).name}: {err[-3000:]}") from None
    return out, err, time.monotonic() - t


def _one_line_error(err: str) -> list[str]:
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1, err[-3000:]
    return lines


# ------------------------------------------------------------------------------------- SIGTERM to the process group
@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_signal_to_the_process_group_saves_and_exits_130(tmp_path: Path, sig: signal.Signals) -> None:
    cfg, out, tag = tmp_path / "m.yaml", tmp_path / "run", uuid.uuid4().hex
    cfg.write_text(MICRO)
    proc = _start(["train", "--config", str(cfg), "--out", str(out)], tag)
    try:
        _wait_for(out / "last.pt", proc)
        workers = psutil.Process(proc.pid).children(recursive=True)
        assert workers, "the run has no loader workers: nothing was tested"
        stdout, err, seconds = _stop_group(proc, sig)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "DataLoader" not in err, err[-3000:]
    state = load_training_state(out / "last.pt")
    assert state["progress"]["step"] > 5  # saved after the signal, not the file of the first evaluation
    log = (out / "log.txt").read_text()
    hint = f"resume with: davit train --config {out / 'config.yaml'} --out {out} --resume"
    assert f"{sig.name} received" in log and hint in log
    assert f"stopped by {sig.name}" in stdout and hint in stdout
    assert seconds < 30, f"{seconds:.1f} s from the signal to the exit"
    _no_orphans(tag)


@pytest.mark.slow
def test_sigterm_to_the_group_then_resume_is_bit_exact(tmp_path: Path) -> None:
    cfg = tmp_path / "m.yaml"
    cfg.write_text(MICRO.replace("iters: 400", "iters: 60"))
    ref_out, cut_out = tmp_path / "ref", tmp_path / "cut"
    ref = _start(["train", "--config", str(cfg), "--out", str(ref_out)], uuid.uuid4().hex)
    cut = _start(["train", "--config", str(cfg), "--out", str(cut_out)], uuid.uuid4().hex)
    try:
        _wait_for(cut_out / "last.pt", cut)
        time.sleep(0.5)
        _, err, _ = _stop_group(cut, signal.SIGTERM)
        assert cut.returncode == 130, err[-3000:]
        stopped_at = load_training_state(cut_out / "last.pt")["progress"]["step"]
        assert 5 <= stopped_at < 60, stopped_at
        resumed = subprocess.run(
            [sys.executable, "-m", "davit", "train", "--config", str(cut_out / "config.yaml"), "--out", str(cut_out),
             "--resume"], env=_env(uuid.uuid4().hex), capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        _, ref_err = ref.communicate(timeout=600)
        assert ref.returncode == 0, ref_err[-3000:]
    finally:
        for p in (ref, cut):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    a, b = read_checkpoint(ref_out / "last.safetensors"), read_checkpoint(cut_out / "last.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    sa, sb = load_training_state(ref_out / "last.pt"), load_training_state(cut_out / "last.pt")
    assert sa["progress"]["step"] == sb["progress"]["step"] == 60
    assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])


# -------------------------------------------------------------------------------------------- never hang at exit
@pytest.mark.slow  # every run with workers finishes through this path (test_train_resume.py: a hang would show)
def test_a_finished_run_exits_promptly_without_orphans(tmp_path: Path) -> None:
    cfg, out, tag = tmp_path / "m.yaml", tmp_path / "run", uuid.uuid4().hex
    cfg.write_text(MICRO.replace("iters: 400", "iters: 10"))
    proc = _start(["train", "--config", str(cfg), "--out", str(out)], tag)
    _wait_for(out / "summary.json", proc)
    t = time.monotonic()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    assert time.monotonic() - t < 30, "the run hung after writing its summary"
    _no_orphans(tag)


@pytest.mark.slow
def test_a_diverged_run_exits_3_in_one_line_without_orphans(tmp_path: Path) -> None:
    cfg, out, tag = tmp_path / "m.yaml", tmp_path / "run", uuid.uuid4().hex
    cfg.write_text(MICRO)
    proc = _start(["train", "--config", str(cfg), "--out", str(out), "optim.lr=1e30", "optim.grad_clip=0"], tag)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 3, err[-3000:]
    (line,) = _one_line_error(err)
    assert line.startswith("davit train: error: ") and ("loss" in line or "weight" in line), line
    if not (out / "last.pt").exists():  # a fresh run that diverged before its first save
        assert "last.pt" not in line and "No checkpoint was saved yet" in line, line
    _no_orphans(tag)


# ----------------------------------------------------------------------------------------------- a dead worker
def test_a_worker_killed_mid_run_ends_in_one_line_and_last_pt_survives(tmp_path: Path) -> None:
    cfg, out, tag = tmp_path / "m.yaml", tmp_path / "run", uuid.uuid4().hex
    cfg.write_text(MICRO)
    proc = _start(["train", "--config", str(cfg), "--out", str(out)], tag)
    try:
        _wait_for(out / "last.pt", proc)
        # The training loader's worker starts first (the validation loader's at the first evaluation).
        worker = min(psutil.Process(proc.pid).children(), key=lambda c: c.create_time())
        worker.kill()
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 2, err[-3000:]
    (line,) = _one_line_error(err)
    assert line.startswith("davit train: error: a data loader worker died"), line
    assert f"pid {worker.pid} killed by signal 9, SIGKILL" in line, line
    assert "train.workers" in line and f"resume with: davit train --config {out / 'config.yaml'}" in line, line
    state = load_training_state(out / "last.pt")  # the last save is whole (or a new one at the step boundary)
    assert state["progress"]["step"] >= 5
    _no_orphans(tag)


def test_worker_deaths_are_recognised_and_deferred_to_the_loop() -> None:
    """What torch 2.x raises for a SIGKILLed worker is a worker death, reported where the loop asks, not earlier."""
    from torch.utils.data import DataLoader, Dataset

    from davit.engine.workers import WorkerWatch, death_reason, is_worker_death, shutdown_workers, worker_init

    class Slow(Dataset):
        def __len__(self) -> int:
            return 1000

        def __getitem__(self, i: int) -> torch.Tensor:
            time.sleep(0.01)
            return torch.zeros(2)

    loader = DataLoader(Slow(), batch_size=2, num_workers=1, persistent_workers=True, worker_init_fn=worker_init)
    seen, caught = 0, None
    with WorkerWatch() as watch:
        try:
            for i, _ in enumerate(watch.batches(loader, loader)):
                seen = i
                if i == 2:
                    os.kill(loader._iterator._workers[0].pid, signal.SIGKILL)
                    time.sleep(0.5)  # SIGCHLD arrives here: the error must wait for the next batch
                assert i < 50, "the dead worker was never reported"
        except RuntimeError as e:
            caught = e
        finally:
            shutdown_workers(loader)
    assert caught is not None and is_worker_death(caught), caught
    assert death_reason(caught).endswith("killed by signal 9, SIGKILL"), caught
    assert seen == 2
    assert not is_worker_death(RuntimeError("CUDA out of memory")) and not is_worker_death(ValueError("DataLoader"))


def test_kill_leftover_workers_stops_workers_that_ignore_sigterm() -> None:
    from torch.utils.data import DataLoader

    from davit.engine.workers import kill_leftover_workers, worker_init

    loader = DataLoader(
        list(range(8)), batch_size=2, num_workers=1, persistent_workers=True, worker_init_fn=worker_init
    )
    next(iter(loader))
    (worker,) = loader._iterator._workers
    os.kill(worker.pid, signal.SIGTERM)  # ignored: what made multiprocessing's atexit join hang
    time.sleep(0.3)
    assert worker.is_alive()
    previous = signal.getsignal(signal.SIGCHLD)
    try:
        assert kill_leftover_workers() >= 1
    finally:
        signal.signal(signal.SIGCHLD, previous)
        loader._iterator = None
    assert not worker.is_alive() and worker.exitcode == -signal.SIGKILL


# ---------------------------------------------------------------------------------------- segmentation, detection
_BACKBONE = (
    "model.overrides={embed_dims: [8, 16, 32, 64], depths: [1, 1, 1, 1], num_heads: [1, 2, 2, 4], window_size: 4}"
)


def _dense_args(task: str, data: Path) -> list[str]:
    """``davit seg|det train`` on a micro model and a tiny synthetic set, one persistent loader worker."""
    common = [_BACKBONE, "train.workers=1", "train.iters=400", "train.eval_every=4", "train.log_every=2"]
    if task == "seg":
        from davit.data.synthetic_seg import make_synthetic_seg

        make_synthetic_seg(data, n_train=16, n_val=4, size=48, seed=0)
        return [f"data.root={data}", "head.channels=16", "head.aux_channels=8", *common]
    from davit.data.synthetic_det import make_synthetic_det

    make_synthetic_det(data, n_train=8, n_val=2, img_size=96, seed=0)
    return [
        f"data.train_images={data / 'train'}", f"data.train_ann={data / 'annotations' / 'train.json'}",
        f"data.val_images={data / 'val'}", f"data.val_ann={data / 'annotations' / 'val.json'}",
        "detector.fpn_channels=16", "detector.mask_channels=8", "data.train_sizes=[64]", "data.test_size=64",
        "data.max_size=100", "data.crop_scales=[64,80]", "data.crop_range=[48,64]", "train.batch_size=2", *common,
    ]  # fmt: skip


@pytest.mark.parametrize("task", ["seg", pytest.param("det", marks=pytest.mark.slow)])
def test_dense_run_stopped_by_sigterm_exits_130_with_its_own_resume_command(tmp_path: Path, task: str) -> None:
    out, tag = tmp_path / "run", uuid.uuid4().hex
    args = _dense_args(task, tmp_path / "data")
    proc = _start([task, "train", "--config", f"{task}/synthetic_demo", "--out", str(out), *args], tag)
    try:
        _wait_for(out / "last.pt", proc)
        stdout, err, _ = _stop_group(proc, signal.SIGTERM)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    hint = f"resume with: davit {task} train --config {out / 'config.yaml'} --out {out} --resume"
    assert hint in (out / "log.txt").read_text() and hint in stdout
    assert "stopped by SIGTERM" in stdout and "after" not in stdout.splitlines()[-1]  # not "best ... after N steps"
    assert load_training_state(out / "last.pt")["progress"]["step"] > 4
    _no_orphans(tag)


@pytest.mark.parametrize("task", ["seg", pytest.param("det", marks=pytest.mark.slow)])
def test_dense_run_that_diverges_exits_3_in_one_line(tmp_path: Path, task: str) -> None:
    out, tag = tmp_path / "run", uuid.uuid4().hex
    args = [*_dense_args(task, tmp_path / "data"), "optim.lr=1e30", "optim.grad_clip=0"]
    proc = _start([task, "train", "--config", f"{task}/synthetic_demo", "--out", str(out), *args], tag)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 3, err[-3000:]
    (line,) = _one_line_error(err)
    assert line.startswith(f"davit {task} train: error: "), line
    if not (out / "last.pt").exists():
        assert "last.pt" not in line and "No checkpoint was saved yet" in line, line
    else:
        assert f"resume with: davit {task} train" in line, line
    _no_orphans(tag)


# ------------------------------------------------------------------------------------------------------------ DDP
@pytest.mark.slow
def test_ddp_ranks_save_and_exit_on_sigterm_to_the_group(tmp_path: Path) -> None:
    """Both ranks agree on the stop at the same step (one collective carries it), save once and exit; torchrun itself
    then reports the signal in its own words (its SignalException, exit 1), which is not ours to change."""
    cfg, out, tag = tmp_path / "m.yaml", tmp_path / "run", uuid.uuid4().hex
    cfg.write_text(MICRO)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "davit",
           "train", "--config", str(cfg), "--out", str(out), "train.batch_size=16"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=_env(tag), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        _wait_for(out / "last.pt", proc)
        _, err, seconds = _stop_group(proc, signal.SIGTERM, within=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log = (out / "log.txt").read_text()
    assert "stopped at step" in log and "resume with: davit train" in log, err[-3000:]
    state = load_training_state(out / "last.pt")
    assert state["progress"]["step"] > 5 and len(state["ranks"]) == 2
    assert "DataLoader" not in err, err[-3000:]
    assert seconds < 60
    _no_orphans(tag)
