"""Experiment tracking: the scalars of ``metrics.jsonl`` (plus lr and throughput per log interval) to TensorBoard,
Weights & Biases and MLflow.

``train.loggers`` picks them: ``[auto]`` (the default) is TensorBoard when the ``tensorboard`` package is installed and
nothing otherwise; ``[tensorboard, wandb, mlflow]`` asks for each by name (a missing package is then an error naming
the extra to install); ``[]`` or ``[none]`` turns tracking off. Only rank 0 logs. Everything works offline:

- TensorBoard writes event files to ``<out>/tensorboard`` (``tensorboard --logdir runs``).
- W&B runs in offline mode unless ``WANDB_MODE`` is set or an API key is configured (``WANDB_API_KEY`` or
  ``wandb login``); an offline run lives in ``<out>/wandb`` and ``wandb sync`` uploads it later.
- MLflow logs to ``MLFLOW_TRACKING_URI`` when set, else to a local file store in ``<out>/mlruns``
  (``mlflow ui --backend-store-uri <out>/mlruns``).

The W&B project and the MLflow experiment are ``train.project``; the run is named after the ``out`` folder.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["LOGGERS", "Loggers", "build_loggers"]

log = logging.getLogger(__name__)

LOGGERS = ("tensorboard", "wandb", "mlflow")
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def resolve_logger_names(names: Sequence[str]) -> list[str]:
    """``train.loggers`` -> the backends to start (``auto`` -> TensorBoard if installed)."""
    out: list[str] = []
    for name in names:
        name = name.strip().lower()
        if name in ("", "none"):
            continue
        if name == "auto":
            if importlib.util.find_spec("tensorboard") is not None:
                out.append("tensorboard")
            continue
        if name not in LOGGERS:
            raise ValueError(f"train.loggers: unknown logger {name!r}; choose from auto, none, {', '.join(LOGGERS)}")
        if importlib.util.find_spec(_PACKAGES[name]) is None:
            raise ImportError(f"train.loggers={name} needs the {name} package: pip install 'davit[loggers]'")
        out.append(name)
    return list(dict.fromkeys(out))


def _scalars(row: Mapping[str, Any]) -> dict[str, float]:
    skip = ("epoch", "step")
    return {k: float(v) for k, v in row.items() if k not in skip and isinstance(v, (int, float)) and v == v}


class _TensorBoard:
    def __init__(self, out: Path, config: Mapping[str, Any], run_name: str, project: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"))
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", 0)

    def log(self, scalars: Mapping[str, float], step: int) -> None:
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, out: Path, config: Mapping[str, Any], run_name: str, project: str) -> None:
        import wandb

        mode = os.environ.get("WANDB_MODE") or ("online" if _wandb_key_configured() else "offline")
        if mode == "offline":
            log.info("W&B in offline mode (no API key configured): upload later with `wandb sync %s/wandb`", out)
        # resume="allow" with a stable id: a resumed davit run continues the same W&B run.
        run_id = "davit-" + "".join(c if c.isalnum() else "-" for c in str(out.resolve()))[-48:].strip("-")
        self.run = wandb.init(
            project=project, name=run_name, dir=str(out), config=dict(config), mode=mode, id=run_id, resume="allow"
        )

    def log(self, scalars: Mapping[str, float], step: int) -> None:
        self.run.log(dict(scalars), step=step)

    def close(self) -> None:
        self.run.finish()


def _wandb_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


class _MLflow:
    def __init__(self, out: Path, config: Mapping[str, Any], run_name: str, project: str) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            # MLflow 3 keeps its local file store in maintenance mode behind this switch; a folder beside the run
            # is the offline store that needs no server and no database package.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (out / "mlruns").resolve().as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(project)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(project)
        self.run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id
        params = [Param(k, str(v)[:500]) for k, v in _flatten(config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def log(self, scalars: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in scalars.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


_BACKENDS = {"tensorboard": _TensorBoard, "wandb": _WandB, "mlflow": _MLflow}


class Loggers:
    """The run's trackers behind two calls the training loop makes (a no-op when none is on or off rank 0).

    Args:
        names: backends to start (see :func:`resolve_logger_names`).
        out: the run folder.
        config: the run's config as a dict (logged as hyper-parameters).
        project: the W&B project / MLflow experiment.
    """

    def __init__(self, names: Sequence[str], out: Path, config: Mapping[str, Any], project: str = "davit") -> None:
        self.names = list(names)
        self.backends = [_BACKENDS[n](out, config, out.name, project) for n in self.names]
        self._mark: tuple[float, int] | None = None
        if self.names:
            log.info("experiment tracking: %s", ", ".join(self.names))

    def log_interval(self, step: int, loss: float, lr: float, images: int) -> None:
        """Every ``train.log_every`` steps: the current loss, lr and the images/s since the previous interval."""
        if not self.backends:
            return
        now = time.perf_counter()
        scalars = {"train/loss": loss, "train/lr": lr}
        if self._mark is not None and now > self._mark[0] and images > self._mark[1]:
            scalars["train/images_per_second"] = (images - self._mark[1]) / (now - self._mark[0])
        self._mark = (now, images)
        self._log(scalars, step)

    def log_row(self, row: Mapping[str, Any]) -> None:
        """A ``metrics.jsonl`` row (an epoch or an evaluation): its scalars, at its step."""
        if not self.backends:
            return
        self._log({f"epoch/{k}": v for k, v in _scalars(row).items()} | {"epoch/epoch": float(row["epoch"])},
                  int(row["step"]))  # fmt: skip
        # Evaluation and saving take time that is not training throughput.
        self._mark = None

    def _log(self, scalars: Mapping[str, float], step: int) -> None:
        for b in self.backends:
            b.log(scalars, step)

    def close(self) -> None:
        """Flush and finish every backend."""
        for b in self.backends:
            try:
                b.close()
            except Exception as e:  # a tracker failing to finish must not hide the run's own result
                log.warning("closing the %s logger failed: %s", type(b).__name__.strip("_"), e)
        self.backends = []


def build_loggers(
    names: Sequence[str], out: Path, config: Mapping[str, Any], *, enabled: bool = True, project: str = "davit"
) -> Loggers:
    """The trackers ``train.loggers`` names; none when ``enabled`` is false (ranks other than 0)."""
    return Loggers(resolve_logger_names(names) if enabled else [], out, config, project)
