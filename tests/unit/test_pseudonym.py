"""Pseudonymous patient IDs and raw paths (pure)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mammoflow.data.pseudonym import (
    KEY_ENV,
    Pseudonymizer,
    is_date_shaped,
    locate_raw,
    pseudonymizer,
)

KEY = {KEY_ENV: "0123456789abcdef-unit"}
ROOT = Path("/src")
FILES = [
    ROOT / "CMMD/D1-0001/07-18-2010-NA-NA-79377/1.000000-NA-70244/1-1.dcm",
    ROOT / "CMMD/D1-0001/07-18-2010-NA-NA-79377/1.000000-NA-70244/1-2.dcm",
    ROOT / "CMMD/D1-0001/01-02-2012-NA-NA-11111/1.000000-NA-70245/1-1.dcm",
    ROOT / "CMMD/D1-0002/07-18-2010-NA-NA-12345/1.000000-NA-1/1-1.dcm",
]


@pytest.mark.parametrize(
    "name",
    ["07-18-2010-NA-NA-79377", "20100718", "2010-07-18", "18.07.2010", "MRN_19650412_x"],
)
def test_date_shaped(name: str) -> None:
    assert is_date_shaped(name)


@pytest.mark.parametrize(
    "name", ["1.000000-NA-70244", "D1-0001", "study-1", "1.2.840.113619.2.55.3.201011", "1-1.dcm"]
)
def test_not_date_shaped(name: str) -> None:
    assert not is_date_shaped(name)


def test_none_keeps_ids_and_replaces_dated_folders_by_rank() -> None:
    pz = Pseudonymizer()
    assert pz.mode == "none" and pz.patient("D1-0001") == "D1-0001"
    stored = pz.raw_paths(reversed(FILES), ROOT)
    assert [stored[f] for f in FILES] == [
        "CMMD/D1-0001/dated-2/1.000000-NA-70244/1-1.dcm",
        "CMMD/D1-0001/dated-2/1.000000-NA-70244/1-2.dcm",
        "CMMD/D1-0001/dated-1/1.000000-NA-70245/1-1.dcm",  # 01-02-2012 sorts first
        "CMMD/D1-0002/dated-1/1.000000-NA-1/1-1.dcm",
    ]
    assert locate_raw(FILES, ROOT, pz)["CMMD/D1-0002/dated-1/1.000000-NA-1/1-1.dcm"] == FILES[3]


def test_hmac_keys_every_segment_and_is_stable() -> None:
    pz = pseudonymizer("hmac", KEY)
    assert pz.mode == "hmac" and repr(pz) == "Pseudonymizer(mode='hmac')"
    assert re.fullmatch(r"p[0-9a-f]{16}", pz.patient("MRN0042"))
    assert pz.patient("MRN0042") == pseudonymizer("hmac", KEY).patient("MRN0042")
    assert pz.patient("MRN0042") != pz.patient("MRN0043")
    stored = pz.raw_paths(FILES, ROOT)
    for path, value in stored.items():
        assert re.fullmatch(r"(h[0-9a-f]{12}/){4}h[0-9a-f]{12}\.dcm", value)
        assert not any(part in value for part in path.parts[2:])
    assert locate_raw(FILES, ROOT, pz) == {v: k for k, v in stored.items()}
    other = pseudonymizer("hmac", {KEY_ENV: "another-key-of-16-chars"})
    assert other.raw_paths(FILES, ROOT) != stored


def test_files_outside_the_root_are_an_error() -> None:
    with pytest.raises(ValueError, match=r"/elsewhere/1-1.dcm is not under the source root /src"):
        Pseudonymizer().raw_paths([Path("/elsewhere/1-1.dcm")], ROOT)
