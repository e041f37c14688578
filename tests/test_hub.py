"""The Hub both ways: a run published with its model card and read back by ``create_model("hf-hub:...")``, against a
local folder and a mock Hub on 127.0.0.1 (never a real host)."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

import davit
from davit.cli import main
from davit.config import LoopConfig, ModelConfig, save_config
from davit.data import ClsDataConfig
from davit.engine.checkpoint import save_weights, weights_metadata
from davit.hub import push_to_hub, save_for_hub
from davit.tasks.classification import ClsConfig

TINY = {"embed_dims": (8, 16, 32, 64), "depths": (1, 1, 1, 1), "num_heads": (1, 2, 2, 4), "window_size": 2}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder as ``davit train`` leaves it: weights with their header, the recipe, the summary, the metrics."""
    out = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    model = davit.create_model("davit_tiny", num_classes=3, **TINY)
    data = ClsDataConfig(kind="hf", root="/data/pets", img_size=32, crop_pct=0.875)
    cfg = ClsConfig(model=ModelConfig(name="davit_tiny", overrides=TINY), data=data, train=LoopConfig(epochs=2))
    meta = weights_metadata(
        model, ["cat", "dog", "fox"], epoch=2, step=20, preprocessing=data.preprocessing(), model_name="davit_tiny"
    )
    save_weights(out / "best.safetensors", model.state_dict(), meta)
    save_config(cfg, out / "config.yaml")
    (out / "summary.json").write_text(json.dumps({"top1": 91.25, "top5": 100.0, "epochs": 2, "steps": 20}))
    (out / "metrics.jsonl").write_text(json.dumps({"epoch": 2, "step": 20, "top1": 91.25}) + "\n")
    return out


def _same_model(a: torch.nn.Module, b: torch.nn.Module) -> None:
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(a.eval()(x), b.eval()(x))


def test_folder_has_weights_config_and_a_model_card(run_dir: Path, tmp_path: Path) -> None:
    folder = save_for_hub(run_dir, tmp_path / "repo", repo_id="me/pets", license="apache-2.0")
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md", "config.json", "davit_recipe.yaml", "metrics.jsonl", "model.safetensors",
    ]  # fmt: skip
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "davit_tiny" and config["num_classes"] == 3
    assert config["class_names"] == ["cat", "dog", "fox"] and config["preprocessing"]["crop_pct"] == 0.875
    card = (folder / "README.md").read_text()
    for text in ("license: apache-2.0", "## Model", "embed dims [8, 16, 32, 64]", "## Data", "`data.kind=hf`",
                 "cat, dog, fox", "## Recipe", "adamw lr 0.001", "## Metrics", "| top1 | 91.25 |", "## Preprocessing",
                 "resize the short side to 37 (bicubic), centre-crop 32x32", 'create_model("hf-hub:me/pets")',
                 "## License"):  # fmt: skip
        assert text in card, text
    model = davit.create_model(f"local-dir:{folder}")
    _same_model(model, davit.create_model("davit_tiny", pretrained=str(run_dir / "best.safetensors")))
    assert model.pretrained_cfg["class_names"] == ["cat", "dog", "fox"] and model.cfg.num_classes == 3


class _MockHub(BaseHTTPRequestHandler):
    """Just enough of the Hub's HTTP API for create_repo, upload_folder (regular uploads) and hf_hub_download."""

    files: dict[str, dict[str, bytes]] = {}
    commits: list[str] = []

    def log_message(self, *args: object) -> None:
        pass

    def _send(self, code: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        for k, v in (headers or {"Content-Type": "application/json"}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def do_POST(self) -> None:  # noqa: N802
        body = self._body()
        parts = self.path.split("?")[0].strip("/").split("/")
        if parts[:3] == ["api", "repos", "create"]:
            req = json.loads(body)
            repo = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
            self.files.setdefault(repo, {})
            return self._send(200, json.dumps({"url": f"http://{self.headers['Host']}/{repo}"}).encode())
        if parts == ["api", "validate-yaml"]:
            assert json.loads(body)["content"].startswith("---\nlibrary_name: davit\n")
            return self._send(200, b'{"errors": [], "warnings": []}')
        if parts[:2] == ["api", "models"] and parts[4] == "preupload":
            asked = json.loads(body)["files"]
            files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in asked]
            return self._send(200, json.dumps({"files": files, "commitOid": "0" * 40}).encode())
        if parts[:2] == ["api", "models"] and parts[4] == "commit":
            repo = f"{parts[2]}/{parts[3]}"
            for line in body.splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    self.files[repo][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                elif item["key"] == "header":
                    self.commits.append(item["value"]["summary"])
            oid = hashlib.sha1(body).hexdigest()
            url = f"http://{self.headers['Host']}/{repo}/commit/{oid}"
            return self._send(200, json.dumps({"commitUrl": url, "commitOid": oid}).encode())
        self._send(404, b'{"error": "not mocked"}')

    def do_GET(self) -> None:  # noqa: N802
        parts = self.path.split("?")[0].strip("/").split("/")
        if len(parts) >= 5 and parts[2] == "resolve":
            repo, name = f"{parts[0]}/{parts[1]}", "/".join(parts[4:])
            data = self.files.get(repo, {}).get(name)
            if data is None:
                return self._send(404, b"", {"X-Error-Code": "EntryNotFound"})
            etag = hashlib.sha256(data).hexdigest()
            return self._send(200, data, {"ETag": f'"{etag}"', "X-Repo-Commit": "1" * 40})
        self._send(404, b'{"error": "not mocked"}')

    do_HEAD = do_GET


@pytest.fixture()
def mock_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from huggingface_hub import constants

    server = ThreadingHTTPServer(("127.0.0.1", 0), _MockHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token_not_real")
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    _MockHub.files, _MockHub.commits = {}, []
    try:
        yield url
    finally:
        server.shutdown()
        server.server_close()


def test_push_to_a_mock_hub_and_create_model_reads_it_back(run_dir: Path, mock_hub: str) -> None:
    url = push_to_hub(run_dir, "me/pets", endpoint=mock_hub, commit_message="first model")
    assert url.startswith(f"{mock_hub}/me/pets/commit/")
    stored = _MockHub.files["me/pets"]
    assert sorted(stored) == ["README.md", "config.json", "davit_recipe.yaml", "metrics.jsonl", "model.safetensors"]
    assert stored["model.safetensors"] == (run_dir / "best.safetensors").read_bytes()
    assert _MockHub.commits == ["first model"]
    model = davit.create_model("hf-hub:me/pets")
    _same_model(model, davit.create_model("davit_tiny", pretrained=str(run_dir / "best.safetensors")))
    assert model.pretrained_cfg["hub_id"] == "hf-hub:me/pets"
    features = davit.create_model("hf-hub:me/pets", features_only=True)
    assert len(features(torch.randn(1, 3, 32, 32))) == 4


def test_cli_push_to_folder_and_errors(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens: a request would fail loudly
    assert main(["push", str(run_dir), "--to-folder", str(tmp_path / "f")]) == 0
    assert (tmp_path / "f" / "model.safetensors").is_file() and "local-dir:" in capsys.readouterr().out
    assert main(["push", str(run_dir)]) == 2
    assert "give the Hub repo" in capsys.readouterr().err
    assert main(["push", str(tmp_path / "nothing"), "me/x"]) == 2
    assert "pass a run folder" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="config.json and model.safetensors"):
        davit.create_model(f"local-dir:{tmp_path}")
