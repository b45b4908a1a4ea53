"""Calibrate the audit's near-duplicate rule on real MIAS films; last line: one JSON object.

Known positives: each film re-encoded (JPEG q80), resized (0.6x), re-windowed (gamma 0.7) and
cropped (4 % a side), each converted like the convert stage (512 px, 8 bit) and compared with the
film's own conversion. Known negatives: every pair of films of different women (MIAS: films
2k-1 and 2k are one woman). Prints, per threshold, the true-positive rate and the false positives
of the breast-region dHash (the audit's) and of the whole-film dHash (the audit's before).

    .venv/bin/python benchmarks/near_duplicates.py [--mias ../shared/data/mias/all-mias.tar.gz]
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from mammoflow.data.convert import prepare_image
from mammoflow.data.pgm import parse_pgm
from mammoflow.evaluation.audit import breast_dhash_array, dhash_array, hamming

THRESHOLDS = (8, 12, 16, 20, 24, 28, 32)


def _convert(img: np.ndarray) -> np.ndarray:
    return prepare_image(img, 512, 8, False).astype(np.uint8)


def _variants(img: np.ndarray) -> list[np.ndarray]:
    h, w = img.shape
    buf = io.BytesIO()
    Image.fromarray(_convert(img)).save(buf, "JPEG", quality=80)
    small = Image.fromarray((img * 255).astype(np.uint8)).resize(
        (int(w * 0.6), int(h * 0.6)), Image.Resampling.BILINEAR
    )
    m = int(0.04 * h)
    return [
        np.asarray(Image.open(buf)),
        _convert(np.asarray(small, np.float32) / 255.0),
        _convert(np.clip(img, 0, 1) ** 0.7),
        _convert(img[m : h - m, m : w - m]),
    ]


def _films(archive: Path) -> list[tuple[str, np.ndarray]]:
    out = []
    with tarfile.open(archive) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            if member.name.endswith(".pgm"):
                pgm = parse_pgm(tar.extractfile(member).read(), member.name)  # type: ignore[union-attr]
                out.append((Path(member.name).stem, pgm.pixels.astype(np.float32) / pgm.maxval))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mias", type=Path, default=Path("../shared/data/mias/all-mias.tar.gz"))
    args = parser.parse_args()
    t0 = time.perf_counter()
    films = _films(args.mias)
    result: dict[str, object] = {"films": len(films)}
    for name, key in (("breast", breast_dhash_array), ("whole", dhash_array)):
        base, pos = [], []
        for _, img in films:
            conv = key(_convert(img))
            base.append(conv)
            pos += [int(hamming(conv[None], key(v)[None])[0, 0]) for v in _variants(img)]
        dist = hamming(np.stack(base), np.stack(base))
        woman = np.array([(int(n[3:]) - 1) // 2 for n, _ in films])
        neg = dist[(woman[:, None] != woman[None, :]) & np.triu(np.ones(dist.shape, bool), 1)]
        positives = np.array(pos)
        result[name] = {
            str(t): {
                "tpr": round(float((positives <= t).mean()), 4),
                "false_positives": int((neg <= t).sum()),
                "fpr": float((neg <= t).mean()),
            }
            for t in THRESHOLDS
        }
        result[f"{name}_positives"], result[f"{name}_negatives"] = (
            int(positives.size),
            int(neg.size),
        )
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
