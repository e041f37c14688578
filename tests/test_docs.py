"""The docs' newcomer path works as written: docs/imagenet.md's script makes a small datasets folder and its command
trains on it."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _blocks(page: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", (ROOT / "docs" / page).read_text(), re.S)


def _page_script_and_commands() -> tuple[str, str]:
    script = next(b for b in _blocks("imagenet.md", "python") if "save_to_disk" in b and "load_digits" in b)
    commands = next(b for b in _blocks("imagenet.md", "bash") if "data.kind=hf data.root=data/digits-hf" in b)
    return script, commands


def test_imagenet_page_script_makes_the_folder_its_command_reads(tmp_path: Path, monkeypatch) -> None:
    """Fast: the page's script, then the page's command's config (the run itself: the slow test below)."""
    pytest.importorskip("datasets")
    from davit.data import build_classification_datasets
    from davit.engine.run import load_run_config

    script, commands = _page_script_and_commands()
    monkeypatch.chdir(tmp_path)
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, timeout=300)
    argv = shlex.split(commands.strip().splitlines()[-1])
    assert argv[:3] == ["davit", "train", "--config"]
    overrides = [a for a in argv[4:] if "=" in a]
    _, cfg = load_run_config(argv[3], overrides)
    train, val, names = build_classification_datasets(cfg.data)
    assert (len(train), len(val), names) == (1437, 360, [str(i) for i in range(10)])
    assert train[0][0].shape == (3, 32, 32)


@pytest.mark.slow
def test_imagenet_page_small_datasets_folder_and_run(tmp_path: Path) -> None:
    """The page as a newcomer follows it: its script, then its command, in a fresh folder (about a minute)."""
    pytest.importorskip("datasets")
    script, commands = _page_script_and_commands()
    (tmp_path / "make_small_datasets_folder.py").write_text(script)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    for line in commands.strip().splitlines():
        argv = shlex.split(line)
        if argv[0] == "python":
            argv[0] = sys.executable
        elif argv[0] == "davit":
            argv = [sys.executable, "-m", "davit", *argv[1:]]
        done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{line}\n{done.stderr[-3000:]}"
    summary = json.loads((tmp_path / "runs" / "digits-hf" / "summary.json").read_text())
    assert summary["epochs"] == 3 and summary["top1"] > 80.0, summary  # chance: 10%
    assert (tmp_path / "runs" / "digits-hf" / "best.safetensors").is_file()
