"""`mammoflow serve` end to end on a real `mlflow models serve` (127.0.0.1, stopped after).

A tiny champion is registered in a temporary SQLite store; the served probabilities for a
converted sample PNG and a DICOM of a sample film equal `mammoflow predict`'s for the same files
— through the file-serving wrapper (the default, the body of `serve-request`) and through the
Keras champion served as registered (`--format tensor`). Bad payloads get HTTP 400 naming the
problem, and the server keeps answering.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from mammoflow.cli import app
from mammoflow.config import load_config
from mammoflow.data.convert import encode_png, prepare_image
from mammoflow.data.readers import load_raw
from mammoflow.data.sample import make_sample
from mammoflow.serving import predict
from tests.helpers import (
    ROOT,
    delete_mlflow_models_and_experiments,
    dicom_bytes,
    free_port,
    stop_process_tree,
    tiny_champion,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CLASSES = ("normal", "benign", "malignant")
SERVE = [sys.executable, "-m", "mammoflow", "serve", "--dataset", "sample_mias"]
SIZE = 96  # the sample's films (and the DICOM acceptance minimum: the sample's own size)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A project folder: params (64 px canvas), a PNG, a DICOM, a CMMD DICOM, a champion."""
    root = tmp_path_factory.mktemp("serving")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["convert"]["size"] = 64
    raw["sample"]["size"] = SIZE
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.chdir(root)
        sample = make_sample(root / "sample", seed=5, mias_patients=2, cmmd_patients=2, size=SIZE)
        films = sorted(sample.mias_dir.glob("*.pgm"))
        (root / "film.png").write_bytes(encode_png(prepare_image(load_raw(films[0]), 64, 8, False)))
        (root / "film.dcm").write_bytes(dicom_bytes(load_raw(films[1])))
        small = sorted(sample.cmmd_dir.rglob("*.dcm"))[0]  # 96 x 80: below the minimum of 96
        (root / "small.dcm").write_bytes(small.read_bytes())
        tiny_champion(root)
        try:
            yield root
        finally:
            delete_mlflow_models_and_experiments(root)


def _serve(root: Path, fmt: str) -> tuple[subprocess.Popen[bytes], int]:
    """`mammoflow serve` of the champion in ``root`` (1 worker), once /ping answers."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    log = (root / f"serve-{fmt}.log").open("wb")
    proc = subprocess.Popen(
        [*SERVE, "--port", str(port), "--format", fmt, "--workers", "1"],
        cwd=root,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    deadline = time.monotonic() + 300
    while True:
        try:
            if _request(port, "GET", "/ping")[0] == 200:
                return proc, port
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_process_tree(proc)
            pytest.fail((root / f"serve-{fmt}.log").read_text())
        time.sleep(0.5)


def _request(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request(method, path, body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
    finally:
        conn.close()
    return resp.status, (json.loads(data) if data.strip() else None)


@pytest.fixture(scope="module")
def file_server(project: Path) -> Iterator[int]:
    proc, port = _serve(project, "file")
    try:
        yield port
    finally:
        stop_process_tree(proc)


def _expected(root: Path) -> np.ndarray:
    cfg = load_config(root / "params.yaml")
    rows = predict.predict_files(
        [root / "film.png", root / "film.dcm"], cfg, "sample_mias", progress=False
    ).rows
    return np.array([[r[f"p_{c}"] for c in CLASSES] for r in rows])


def _body(root: Path, fmt: str) -> bytes:
    """The body `mammoflow serve-request` writes for the PNG and the DICOM."""
    out = root / f"body-{fmt}.json"
    args = ["serve-request", "film.png", "film.dcm", "--out", str(out), "--format", fmt]
    result = CliRunner().invoke(app, [*args, "--dataset", "sample_mias"])
    assert result.exit_code == 0, result.output
    return out.read_bytes()


def test_served_files_score_as_predict_does(project: Path, file_server: int) -> None:
    body = _body(project, "file")
    assert len(body) < 40_000  # the files' bytes, not a JSON nested list of pixels
    status, answer = _request(file_server, "POST", "/invocations", body)
    assert status == 200, answer
    rows = answer["predictions"]
    served = np.array([[r[f"p_{c}"] for c in CLASSES] for r in rows])
    expected = _expected(project)
    assert served.shape == (2, 3)
    np.testing.assert_allclose(served, expected, atol=1e-5)
    assert [r["predicted"] for r in rows] == [CLASSES[i] for i in expected.argmax(axis=1)]
    assert {(r["model_name"], r["model_version"]) for r in rows} == {("mammoflow-sample_mias", "1")}


def _post_rows(port: int, rows: list[str]) -> tuple[int, Any]:
    body = {"dataframe_split": {"columns": ["image"], "data": [[r] for r in rows]}}
    return _request(port, "POST", "/invocations", json.dumps(body).encode())


def test_bad_payloads_get_a_clear_400_and_the_server_goes_on(
    project: Path, file_server: int
) -> None:
    png = base64.b64encode((project / "film.png").read_bytes()).decode()
    garbage = base64.b64encode(b"just some text, not an image").decode()
    small = base64.b64encode((project / "small.dcm").read_bytes()).decode()
    status, answer = _post_rows(file_server, [png, garbage, small])
    assert status == 400, answer
    message = answer["message"]
    assert "2 of 3 image(s) refused, none scored" in message
    assert "image row 1: not a DICOM (Part 10: 'DICM' at byte 128), PNG or binary PGM" in message
    assert "image row 2: image is 80x96 pixels, its short side below the minimum of 96" in message
    status, answer = _post_rows(file_server, ["%%% not base64 %%%"])
    assert status == 400 and "image" in answer["message"], answer
    status, answer = _request(file_server, "POST", "/invocations", b'{"dataframe_split": {')
    assert status == 400 and "valid JSON" in answer["message"], answer
    wrong = {"dataframe_split": {"columns": ["pixels"], "data": [[png]]}}
    status, answer = _request(file_server, "POST", "/invocations", json.dumps(wrong).encode())
    assert status == 400 and "image" in answer["message"], answer
    assert _request(file_server, "GET", "/ping")[0] == 200
    status, answer = _post_rows(file_server, [png])
    assert status == 200 and len(answer["predictions"]) == 1


def test_the_wrapper_is_cached_per_champion_version(project: Path) -> None:
    from mammoflow.serving.serve import ensure_wrapper
    from mammoflow.tracking import Tracker

    cfg = load_config(project / "params.yaml")
    uri = "models:/mammoflow-sample_mias@champion"
    tracker = Tracker(root=project)
    first, _ = ensure_wrapper(
        cfg, "sample_mias", uri, root=project / ".cache" / "serving", tracker=tracker
    )
    again, built = ensure_wrapper(
        cfg, "sample_mias", uri, root=project / ".cache" / "serving", tracker=tracker
    )
    assert (again, built) == (first, False)
    assert first.name.startswith("mammoflow-sample_mias-v1-")
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".")]  # no scratch left


def test_the_registered_champion_still_serves_tensors(project: Path) -> None:
    body = _body(project, "tensor")
    proc, port = _serve(project, "tensor")
    try:
        status, answer = _request(port, "POST", "/invocations", body)
    finally:
        stop_process_tree(proc)
    assert status == 200, answer
    np.testing.assert_allclose(np.array(answer["predictions"]), _expected(project), atol=1e-5)
