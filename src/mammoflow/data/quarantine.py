"""What every ingestion shares: the result, the error, and bad-file bookkeeping.

Ingestion collects every bad file before deciding. With ``on_bad_file="fail"`` it raises one
:class:`IngestError` listing them all and writes nothing; with ``"quarantine"`` it writes the
manifest of the good images plus ``quarantine.json`` naming each bad file and its reason. The
user's files are never moved or deleted. A run that would leave no image at all (every file bad
or unlabelled) is an error under either policy: an empty manifest is never written.

Hints name settings in the spelling of the interface in use (:data:`Interface`): the Python
argument (``on_bad_file='quarantine'``), the command-line option (``--on-bad-file quarantine``)
or the params key (``ingest.on_bad_file: quarantine``, for DVC and Prefect).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from mammoflow.config import Config
from mammoflow.paths import Layout

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pandas as pd

from mammoflow.data.manifest import (
    CLASSES,
    MANIFEST_NAME,
    ManifestRow,
    read_manifest,
    to_frame,
    write_manifest,
)
from mammoflow.files import atomic_write_json

OnBadFile = Literal["fail", "quarantine"]
Interface = Literal["python", "cli", "params"]
QUARANTINE_NAME = "quarantine.json"
UNLABELLED_NAME = "unlabelled.json"


class IngestError(ValueError):
    """Ingestion found bad input; the message lists every bad file and its reason."""


@dataclass(frozen=True)
class IngestResult:
    """What an ingestion wrote."""

    frame: pd.DataFrame
    manifest_path: Path
    bad: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    counts: dict[str, int] = field(default_factory=dict)  # label → images
    quarantine_path: Path | None = None
    unlabelled: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


@dataclass
class BadFiles:
    """Accumulates ``(path, reason)`` pairs in the order they are found."""

    items: list[tuple[str, str]] = field(default_factory=list)

    def add(self, path: str | Path, reason: str) -> None:
        """Record one bad file."""
        self.items.append((str(path), reason))

    def paths(self) -> set[str]:
        """The paths recorded so far."""
        return {p for p, _ in self.items}

    def __bool__(self) -> bool:
        return bool(self.items)

    def __len__(self) -> int:
        return len(self.items)


def check_policy(on_bad_file: str) -> OnBadFile:
    """Validate the ``on_bad_file`` argument."""
    if on_bad_file not in ("fail", "quarantine"):
        raise ValueError(f"on_bad_file must be 'fail' or 'quarantine', got {on_bad_file!r}")
    return on_bad_file  # type: ignore[return-value]


_SPELLINGS: dict[str, dict[Interface, str]] = {
    "quarantine": {
        "python": "rerun with on_bad_file='quarantine'",
        "cli": "rerun with --on-bad-file quarantine",
        "params": "set ingest.on_bad_file: quarantine in params.yaml",
    },
    "min_size": {
        "python": "pass a smaller min_size",
        "cli": "pass a smaller --min-size",
        "params": "lower ingest.min_size in params.yaml",
    },
    "accept_for_processing": {
        "python": "pass accept_for_processing=True",
        "cli": "pass --accept-for-processing",
        "params": "set ingest.accept_for_processing: true in params.yaml",
    },
    "accept_burned_in": {
        "python": "pass accept_burned_in=True",
        "cli": "pass --accept-burned-in",
        "params": "set ingest.accept_burned_in: true in params.yaml",
    },
}


def hint(setting: str, interface: Interface) -> str:
    """How to change ``setting`` (``quarantine``, ``min_size``, …) in ``interface``'s spelling."""
    try:
        return _SPELLINGS[setting][interface]
    except KeyError:
        raise ValueError(
            f"no hint for setting {setting!r} and interface {interface!r}; settings: "
            f"{sorted(_SPELLINGS)!r}, interfaces: ['python', 'cli', 'params']"
        ) from None


def _lines(items: Sequence[tuple[str, str]]) -> str:
    return "\n".join(f"  - {path}: {reason}" for path, reason in items)


def format_bad(
    kind: str,
    source: Path | str,
    bad: Sequence[tuple[str, str]],
    interface: Interface = "python",
) -> str:
    """One message listing every bad file, for :class:`IngestError`."""
    return (
        f"{kind} ingest of {source} found {len(bad)} bad file(s); nothing was written. "
        f"Fix or remove them, or {hint('quarantine', interface)} to ingest the rest:\n"
        f"{_lines(bad)}"
    )


def format_empty(
    kind: str,
    source: Path | str,
    bad: Sequence[tuple[str, str]],
    unlabelled: Sequence[tuple[str, str]] = (),
) -> str:
    """The message of a run that would ingest no image at all, for :class:`IngestError`."""
    parts = [f"{kind.upper()} ingest of {source}: 0 images ingested, {len(bad)} quarantined"]
    if unlabelled:
        parts.append(f", {len(unlabelled)} unlabelled")
    parts.append("; nothing was written. Every file was refused:\n")
    return "".join(parts) + _lines([*bad, *unlabelled])


def label_counts(kind: str, labels: Iterable[str]) -> dict[str, int]:
    """Images per label, every class of ``kind`` present (zero when absent)."""
    seen = Counter(labels)
    return {name: int(seen.get(name, 0)) for name in CLASSES[kind]}


def finish(
    *,
    kind: str,
    source: Path | str,
    rows: Sequence[ManifestRow],
    bad: BadFiles,
    out_dir: Path,
    on_bad_file: OnBadFile,
    unlabelled: Sequence[tuple[str, str]] | None = None,
    interface: Interface = "python",
) -> IngestResult:
    """Raise on bad files under "fail"; else write manifest.parquet and quarantine.json.

    ``quarantine.json`` is written on every successful run (an empty list when all files
    were good) so a stale one never outlives the data it described.

    Raises:
        IngestError: bad files under "fail", or no image left to ingest (under either policy).
    """
    if bad and on_bad_file == "fail":
        raise IngestError(format_bad(kind, source, bad.items, interface))
    if not rows:
        raise IngestError(format_empty(kind, source, bad.items, unlabelled or ()))
    frame = to_frame(rows)
    out_dir = Path(out_dir)
    manifest_path = out_dir / MANIFEST_NAME
    write_manifest(frame, manifest_path)
    quarantine_path = out_dir / QUARANTINE_NAME
    atomic_write_json(
        quarantine_path,
        {
            "dataset_kind": kind,
            "source": str(source),
            "bad": [{"path": p, "reason": r} for p, r in bad.items],
        },
    )
    if unlabelled is not None:  # kinds that can have unlabelled images always write the list
        atomic_write_json(
            out_dir / UNLABELLED_NAME,
            {
                "dataset_kind": kind,
                "source": str(source),
                "unlabelled": [{"path": p, "reason": r} for p, r in unlabelled],
            },
        )
    frame = read_manifest(manifest_path)  # exactly what is on disk, with the schema's dtypes
    return IngestResult(
        frame=frame,
        manifest_path=manifest_path,
        bad=list(bad.items),
        counts=label_counts(kind, frame["label"].tolist()),
        quarantine_path=quarantine_path,
        unlabelled=list(unlabelled or ()),
    )
