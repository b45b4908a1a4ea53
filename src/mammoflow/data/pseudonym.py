"""Pseudonymous patient IDs and raw paths for hospital data (``ingest.pseudonymize``).

``none`` keeps a dataset's own patient IDs (CMMD's ``D1-0001`` is already public and
pseudonymous). ``hmac`` replaces each PatientID by the first :data:`ID_HEX` hex digits of
HMAC-SHA256(key, PatientID), prefixed ``p``; the key comes from the environment variable
:data:`KEY_ENV` only and is never written anywhere. The same key gives the same IDs, so
re-ingests, DVC hashes and splits stay stable; without the key the IDs cannot be reversed.

Raw paths are stored relative to the source root. With ``none`` each folder whose name holds a
date (TCIA's ``07-18-2010-NA-NA-79377``) becomes ``dated-K``, K its rank among the date-bearing
folders of the same parent in sorted order. With ``hmac`` every folder and file stem is keyed
(``h`` + 12 hex digits; the suffix is kept), since a hospital export may name folders after the
medical record number, the patient or the accession number. :func:`locate_raw` walks the same
tree and inverts the mapping, so conversion finds each file again with the same key.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

Mode = Literal["none", "hmac"]

KEY_ENV = "MAMMOFLOW_PSEUDONYM_KEY"
MIN_KEY_CHARS = 16
ID_HEX = 16
SEGMENT_HEX = 12

# 07-18-2010, 2010-07-18, 18.07.2010, 20100718 (years 1900-2099), with any separator
_DATE = re.compile(
    r"(?<!\d)(?:"
    r"(?:19|20)\d{2}[-_./]?(?:0[1-9]|1[0-2])[-_./]?(?:0[1-9]|[12]\d|3[01])"
    r"|(?:0[1-9]|[12]\d|3[01])[-_./](?:0[1-9]|1[0-2])[-_./](?:19|20)\d{2}"
    r"|(?:0[1-9]|1[0-2])[-_./](?:0[1-9]|[12]\d|3[01])[-_./](?:19|20)\d{2}"
    r")(?!\d)"
)


class PseudonymKeyError(ValueError):
    """``ingest.pseudonymize: hmac`` without a usable key in the environment."""


def is_date_shaped(name: str) -> bool:
    """Whether a folder name holds a date (``07-18-2010-NA-NA-79377``, ``20100718``, …)."""
    return bool(_DATE.search(name))


def load_key(environ: Mapping[str, str] | None = None) -> bytes:
    """The HMAC key from :data:`KEY_ENV`.

    Raises:
        PseudonymKeyError: the variable is unset or shorter than :data:`MIN_KEY_CHARS`.
    """
    value = (os.environ if environ is None else environ).get(KEY_ENV, "")
    if not value:
        raise PseudonymKeyError(
            f"ingest.pseudonymize is 'hmac' but {KEY_ENV} is not set; export a secret of at "
            f"least {MIN_KEY_CHARS} characters (e.g. `export {KEY_ENV}=$(openssl rand -hex 32)`), "
            "keep it outside the project and use the same one for every re-ingest"
        )
    if len(value) < MIN_KEY_CHARS:
        raise PseudonymKeyError(
            f"{KEY_ENV} has {len(value)} characters; use at least {MIN_KEY_CHARS} "
            "(e.g. `openssl rand -hex 32`)"
        )
    return value.encode("utf-8")


def keyed_hex(key: bytes, value: str, digits: int) -> str:
    """The first ``digits`` hex digits of HMAC-SHA256(key, value)."""
    return hmac.new(key, value.encode("utf-8"), hashlib.sha256).hexdigest()[:digits]


@dataclass(frozen=True)
class Pseudonymizer:
    """Maps patient IDs and raw paths; ``key=None`` is mode ``none`` (IDs kept)."""

    key: bytes | None = None

    def __repr__(self) -> str:  # the key never reaches a log or a traceback
        return f"Pseudonymizer(mode={self.mode!r})"

    @property
    def mode(self) -> Mode:
        """``"hmac"`` with a key, else ``"none"``."""
        return "none" if self.key is None else "hmac"

    def patient(self, patient_id: str) -> str:
        """The pseudonymous patient ID (the ID itself in mode ``none``)."""
        if self.key is None:
            return patient_id
        return "p" + keyed_hex(self.key, f"patient:{patient_id}", ID_HEX)

    def raw_paths(self, files: Iterable[Path], root: Path) -> dict[Path, str]:
        """Each file → its stored ``raw_path``: POSIX, relative to ``root``, pseudonymous (pure).

        Raises:
            ValueError: a file outside ``root``, or two files mapped to one path.
        """
        files = sorted(Path(f) for f in files)
        rels = []
        for path in files:
            try:
                rels.append(PurePosixPath(path.relative_to(root).as_posix()))
            except ValueError:
                raise ValueError(f"{path} is not under the source root {root}") from None
        renamed: dict[tuple[str, ...], str] = {}
        if self.key is None:
            dated: dict[tuple[str, ...], list[str]] = {}
            for rel in rels:
                for depth, name in enumerate(rel.parts[:-1]):
                    if is_date_shaped(name):
                        siblings = dated.setdefault(rel.parts[:depth], [])
                        if name not in siblings:
                            siblings.append(name)
            for parent, names in dated.items():
                for rank, name in enumerate(sorted(names), start=1):
                    renamed[(*parent, name)] = f"dated-{rank}"
        out: dict[Path, str] = {}
        seen: dict[str, Path] = {}
        for path, rel in zip(files, rels, strict=True):
            parts = [
                self._segment(rel.parts[: i + 1], renamed, last=i == len(rel.parts) - 1)
                for i in range(len(rel.parts))
            ]
            stored = "/".join(parts)
            if stored in seen:
                raise ValueError(
                    f"{seen[stored]} and {path} map to the same raw path {stored!r}; rename one"
                )
            seen[stored] = path
            out[path] = stored
        return out

    def _segment(
        self, prefix: tuple[str, ...], renamed: Mapping[tuple[str, ...], str], last: bool
    ) -> str:
        name = prefix[-1]
        if self.key is None:
            return renamed.get(prefix, name)
        if last:
            file = PurePosixPath(name)
            return "h" + keyed_hex(self.key, f"file:{file.stem}", SEGMENT_HEX) + file.suffix.lower()
        return "h" + keyed_hex(self.key, f"folder:{name}", SEGMENT_HEX)


def pseudonymizer(mode: str, environ: Mapping[str, str] | None = None) -> Pseudonymizer:
    """The :class:`Pseudonymizer` of ``ingest.pseudonymize`` (reads the key for ``hmac``).

    Raises:
        ValueError: an unknown mode.
        PseudonymKeyError: ``hmac`` without a usable key.
    """
    if mode == "none":
        return Pseudonymizer()
    if mode == "hmac":
        return Pseudonymizer(load_key(environ))
    raise ValueError(f"pseudonymize must be 'none' or 'hmac', got {mode!r}")


def locate_raw(files: Iterable[Path], root: Path, pz: Pseudonymizer) -> dict[str, Path]:
    """Stored ``raw_path`` → the file on disk: the inverse of :meth:`Pseudonymizer.raw_paths`."""
    return {stored: path for path, stored in pz.raw_paths(files, root).items()}
