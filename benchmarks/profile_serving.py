"""Where one /invocations request's time goes, in-process, through the scoring server's own code.

For each request format — ``tensor`` (the Keras champion as registered, the body of
``serve-request --format tensor``: the converted canvas as a JSON nested list) and ``file`` (the
file-serving wrapper, the body of ``serve-request``: the image file's bytes, base64) — and each
payload (a converted sample PNG, a DICOM of a sample film; see bench_serving.py), the median over
``--repeats`` of:

* ``json_ms``: ``json.loads`` of the body;
* ``parse_ms``: ``infer_and_parse_data`` (the tensor from nested lists; the DataFrame and the
  base64 decoding of the binary column);
* ``enforce_ms``: MLflow's schema enforcement (``_enforce_schema``) of the parsed input;
* ``model_ms``: the model's own predict (Keras ``predict``; for the wrapper decoding,
  conversion and the Keras model's traced call, split into ``decode_convert_ms`` and
  ``network_ms``);
* ``invocations_ms``: the whole ``scoring_server.invocations`` call (all of the above, plus
  serializing the predictions), which is what a request costs the server minus HTTP.

Usage: ``.venv/bin/python benchmarks/profile_serving.py [--tracking URI] [--model URI]
[--repeats 5]``. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_serving import machine, payloads  # noqa: E402


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Median milliseconds of ``fn`` over ``repeats`` calls (after one warm-up) and its result."""
    result = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - t0) * 1000)
    return round(statistics.median(times), 2), result


def phases(model: Any, body: bytes, repeats: int) -> dict[str, float]:
    """The phases of one request through ``model`` (an ``mlflow.pyfunc`` model)."""
    from mlflow.models.utils import _enforce_schema
    from mlflow.pyfunc import scoring_server

    schema = model.metadata.get_input_schema()
    impl = model._model_impl  # the flavor's predict, without MLflow's schema enforcement
    json_ms, decoded = timed(lambda: json.loads(body), repeats)
    parse_ms, parsed = timed(lambda: scoring_server.infer_and_parse_data(decoded, schema), repeats)
    enforce_ms, enforced = timed(lambda: _enforce_schema(parsed, schema), repeats)
    model_ms, _ = timed(lambda: impl.predict(enforced), repeats)
    inner: dict[str, float] = {}
    wrapper = getattr(impl, "python_model", None)
    wrapper = getattr(wrapper, "scorer", wrapper)  # tracking.pyfunc.PyfuncScorer's scorer
    if hasattr(wrapper, "pixels"):  # the file wrapper: reading + conversion, then the network
        rows = list(enforced["image"])
        inner["decode_convert_ms"], pixels = timed(lambda: wrapper.pixels(rows), repeats)
        batch = np.stack(pixels)
        inner["network_ms"], _ = timed(lambda: wrapper.call(batch), repeats)
    total_ms, response = timed(
        lambda: scoring_server.invocations(body, "application/json", model, schema), repeats
    )
    if response.status != 200:
        raise SystemExit(f"invocations answered {response.status}: {response.response[:500]}")
    return {
        "body_bytes": len(body),
        "json_ms": json_ms,
        "parse_ms": parse_ms,
        "enforce_ms": enforce_ms,
        "model_ms": model_ms,
        **inner,
        "invocations_ms": total_ms,
    }


def main() -> None:
    """Profile both formats on both payloads; print one JSON object last."""
    import mlflow.pyfunc

    from mammoflow.config import load_config
    from mammoflow.serving.serve import ensure_wrapper
    from mammoflow.tracking import Tracker
    from mammoflow.tracking.store import _use_store

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tracking", default=None, help="MLflow tracking URI (default ./mlflow.db)")
    p.add_argument("--dataset", default="sample_mias")
    p.add_argument("--model", default=None, help="default the dataset's champion")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    os.chdir(ROOT)
    if args.tracking:
        os.environ["MLFLOW_TRACKING_URI"] = args.tracking
    uri = args.model or f"models:/mammoflow-{args.dataset}@champion"
    tracker = Tracker()
    cfg = load_config(ROOT / "params.yaml")
    wrapper, _ = ensure_wrapper(cfg, args.dataset, uri, tracker=tracker)
    with _use_store(tracker.uri):
        models = {"tensor": mlflow.pyfunc.load_model(uri)}
    models["file"] = mlflow.pyfunc.load_model(str(wrapper))
    report: dict[str, Any] = {"model": uri, "repeats": args.repeats, "machine": machine()}
    with tempfile.TemporaryDirectory(prefix="profile-serving-") as tmp:
        for fmt, model in models.items():
            bodies = payloads(fmt, args.dataset, Path(tmp) / fmt)
            for kind, body in bodies.items():
                report[f"{fmt}_{kind}"] = result = phases(model, body, args.repeats)
                print(f"{fmt:>6} {kind:>5}: {result}", flush=True)
    report["machine"]["load_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(report))


if __name__ == "__main__":
    main()
