"""DICOM → [0, 1] pixels: modality LUT, VOI (LUT, window, min–max), MONOCHROME1, codecs."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import apply_modality_lut, apply_windowing, get_encoder
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    generate_uid,
)

from mammoflow.data.dicom import (
    Acceptance,
    DicomError,
    acceptance_problem,
    normalise_laterality,
    normalise_view,
    qc_marker,
    read_dicom,
)
from mammoflow.data.readers import load_raw

MAMMO = UID("1.2.840.10008.5.1.4.1.1.1.2")
PHI = {
    "PatientName": "Secret^Alice",
    "PatientBirthDate": "19600203",
    "AccessionNumber": "ACC998877",
    "InstitutionName": "Hidden Hospital",
    "StudyDate": "20110304",
}


def _breast(h: int = 16, w: int = 12, top: int = 4095) -> np.ndarray:
    """Background 0 on the left columns, a ramp of 'breast' values elsewhere."""
    arr = np.zeros((h, w), dtype=np.uint16)
    arr[:, 3:] = np.linspace(top // 4, top, h * (w - 3)).reshape(h, w - 3).astype(np.uint16)
    return arr


def _dataset(arr: np.ndarray, bits_stored: int = 12, **tags: Any) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MAMMO
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["t", str(tags)])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = MAMMO
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "MG"
    ds.PatientID = "D1-0042"
    for key, value in PHI.items():
        setattr(ds, key, value)
    ds.ImageLaterality = "L"
    ds.ViewPosition = "CC"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = arr.shape
    ds.BitsAllocated = 8 if bits_stored <= 8 else 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    for key, value in tags.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    dtype = np.uint8 if ds.BitsAllocated == 8 else np.dtype("<u2")
    ds.PixelData = arr.astype(dtype).tobytes()
    return ds


def _write(tmp_path: Path, ds: Dataset, name: str = "x.dcm") -> Path:
    path = tmp_path / name
    if ds.file_meta.TransferSyntaxUID.is_private:
        pydicom.dcmwrite(path, ds, enforce_file_format=True, implicit_vr=False, little_endian=True)
    else:
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


# ------------------------------------------------------------------ read_dicom


def test_monochrome2_minmax_and_header_fields(tmp_path: Path) -> None:
    raw = _breast()
    image = read_dicom(_write(tmp_path, _dataset(raw)))
    assert image.pixels.dtype == np.float32 and image.pixels.shape == raw.shape
    assert image.pixels.min() == 0.0 and image.pixels.max() == 1.0
    assert image.voi == "minmax"
    assert (image.patient_id, image.laterality, image.view, image.modality) == (
        "D1-0042",
        "L",
        "CC",
        "MG",
    )
    assert (image.bits_stored, image.photometric, image.transfer_syntax) == (
        12,
        "MONOCHROME2",
        ExplicitVRLittleEndian,
    )
    # dense (high) values stay bright; background stays black
    assert image.pixels[0, 0] == 0.0 and image.pixels[-1, -1] == 1.0


def test_no_phi_in_result(tmp_path: Path) -> None:
    image = read_dicom(_write(tmp_path, _dataset(_breast())))
    fields = {f.name for f in dataclasses.fields(image)}
    assert fields == {
        "pixels",
        "bits_stored",
        "photometric",
        "transfer_syntax",
        "patient_id",
        "laterality",
        "view",
        "modality",
        "voi",
        "image_type",
    }
    text = repr({k: v for k, v in dataclasses.asdict(image).items() if k != "pixels"})
    for secret in PHI.values():
        assert secret not in text


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    raw = _breast()
    mono2 = read_dicom(_write(tmp_path, _dataset(raw), "m2.dcm")).pixels
    inverted = 4095 - raw
    mono1 = read_dicom(
        _write(tmp_path, _dataset(inverted, PhotometricInterpretation="MONOCHROME1"), "m1.dcm")
    )
    assert mono1.photometric == "MONOCHROME1"
    np.testing.assert_allclose(mono1.pixels, mono2, atol=1e-6)
    # windowed MONOCHROME1: window then invert
    windowed = read_dicom(
        _write(
            tmp_path,
            _dataset(
                inverted,
                PhotometricInterpretation="MONOCHROME1",
                WindowCenter=2048,
                WindowWidth=4096,
            ),
            "w1.dcm",
        )
    ).pixels
    expected = 1 - np.clip((inverted - 2047.5) / 4095 + 0.5, 0, 1)
    np.testing.assert_allclose(windowed, expected, atol=1e-6)


def test_first_window_is_used(tmp_path: Path) -> None:
    raw = _breast(top=65535)
    ds = _dataset(raw, bits_stored=16, WindowCenter=[30000, 10], WindowWidth=[20000, 5])
    image = read_dicom(_write(tmp_path, ds))
    assert image.voi == "window"
    expected = np.clip((raw.astype(float) - 29999.5) / 19999 + 0.5, 0, 1)
    np.testing.assert_allclose(image.pixels, expected, atol=1e-6)


def test_rescale_then_window(tmp_path: Path) -> None:
    raw = _breast(top=2000)
    ds = _dataset(
        raw, RescaleSlope="2", RescaleIntercept="-100", WindowCenter=1000, WindowWidth=2001
    )
    image = read_dicom(_write(tmp_path, ds))
    values = raw.astype(float) * 2 - 100
    expected = np.clip((values - 999.5) / 2000 + 0.5, 0, 1)
    np.testing.assert_allclose(image.pixels, expected, atol=1e-6)


def test_rescale_without_window_uses_minmax(tmp_path: Path) -> None:
    raw = _breast()
    plain = read_dicom(_write(tmp_path, _dataset(raw), "a.dcm")).pixels
    scaled = read_dicom(
        _write(tmp_path, _dataset(raw, RescaleSlope="0.5", RescaleIntercept="10"), "b.dcm")
    ).pixels
    np.testing.assert_allclose(plain, scaled, atol=1e-6)  # min–max is affine-invariant


@pytest.mark.parametrize("vr", ["US", "OW"])
def test_voi_lut_sequence_wins_over_window(tmp_path: Path, vr: str) -> None:
    raw = np.array([[0, 1, 2, 3]], dtype=np.uint8)
    item = Dataset()
    item.LUTDescriptor = [4, 0, 8]
    entries = [10, 60, 110, 210]
    if vr == "US":
        item.add_new("LUTData", "US", entries)
    else:
        item.add_new("LUTData", "OW", np.array(entries, dtype="<u2").tobytes())
    ds = _dataset(raw, bits_stored=8, WindowCenter=1, WindowWidth=2)
    ds.VOILUTSequence = [item]
    image = read_dicom(_write(tmp_path, ds))
    assert image.voi == "lut"
    np.testing.assert_allclose(image.pixels, [[0.0, 0.25, 0.5, 1.0]], atol=1e-6)
    assert image.bits_stored == 8


def test_invalid_window_width_is_an_error(tmp_path: Path) -> None:
    path = _write(tmp_path, _dataset(_breast(), WindowCenter=10, WindowWidth=0))
    with pytest.raises(DicomError) as err:
        read_dicom(path)
    assert str(err.value) == (
        f"{path}: invalid windowing (Window Center 10.0, Window Width 0.0, VOI LUT Function "
        "'LINEAR'): The (0028,1051) Window Width must be greater than or equal to 1 for a "
        "'LINEAR' windowing operation; fix or remove the window tags"
    )


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
@pytest.mark.parametrize("rescale", [False, True])
def test_windowing_equals_pydicom(tmp_path: Path, function: str, rescale: bool) -> None:
    """Window Center/Width is pydicom's apply_windowing, scaled from its output range to [0, 1]."""
    raw = _breast(top=4095)
    tags: dict[str, Any] = {"WindowCenter": 1800, "WindowWidth": 1500, "VOILUTFunction": function}
    if rescale:
        tags.update(RescaleSlope="0.5", RescaleIntercept="-20")
    path = _write(tmp_path, _dataset(raw, **tags))
    image = read_dicom(path)
    ds = pydicom.dcmread(path)
    reference = apply_windowing(apply_modality_lut(ds.pixel_array, ds), ds)
    slope, intercept = (0.5, -20.0) if rescale else (1.0, 0.0)
    y_min, y_max = intercept, 4095 * slope + intercept  # PS3.3 C.11.2.1.2: the output range
    expected = (reference - y_min) / (y_max - y_min)
    assert image.voi == "window"
    np.testing.assert_allclose(image.pixels, expected, atol=1e-6)
    assert image.pixels.min() >= 0.0 and image.pixels.max() <= 1.0


@pytest.mark.parametrize("width", ["nan", "inf", "-5"])
def test_non_finite_or_negative_window_is_an_error(tmp_path: Path, width: str) -> None:
    path = _write(tmp_path, _dataset(_breast(), WindowCenter=10, WindowWidth=width))
    with pytest.raises(DicomError, match=r"invalid windowing .*fix or remove the window tags"):
        read_dicom(path)


def test_presentation_lut_shape_inverse(tmp_path: Path) -> None:
    raw = _breast()
    plain = read_dicom(_write(tmp_path, _dataset(raw), "a.dcm")).pixels
    inverse = read_dicom(
        _write(tmp_path, _dataset(raw, PresentationLUTShape="INVERSE"), "b.dcm")
    ).pixels
    np.testing.assert_allclose(inverse, 1.0 - plain, atol=1e-6)
    identity = read_dicom(
        _write(tmp_path, _dataset(raw, PresentationLUTShape="IDENTITY"), "c.dcm")
    ).pixels
    np.testing.assert_array_equal(identity, plain)
    # MONOCHROME1 is paired with INVERSE in DX/MG: one inversion, not two
    mono1 = _dataset(4095 - raw, PhotometricInterpretation="MONOCHROME1")
    both = _dataset(
        4095 - raw, PhotometricInterpretation="MONOCHROME1", PresentationLUTShape="INVERSE"
    )
    np.testing.assert_allclose(
        read_dicom(_write(tmp_path, both, "e.dcm")).pixels,
        read_dicom(_write(tmp_path, mono1, "d.dcm")).pixels,
    )
    bogus = _write(tmp_path, _dataset(raw, PresentationLUTShape="GAMMA"), "f.dcm")
    with pytest.raises(DicomError, match="Presentation LUT Shape 'GAMMA' is neither"):
        read_dicom(bogus)


def test_burned_in_annotation_is_refused_unless_accepted(tmp_path: Path) -> None:
    path = _write(tmp_path, _dataset(_breast(), BurnedInAnnotation="YES"))
    rules = Acceptance(min_size=1)
    with pytest.raises(DicomError) as err:
        read_dicom(path, rules)
    message = str(err.value)
    assert message.startswith(f"{path}: BurnedInAnnotation YES")
    assert "set ingest.accept_burned_in: true" in message
    assert read_dicom(path, dataclasses.replace(rules, accept_burned_in=True)).voi == "minmax"
    no = _write(tmp_path, _dataset(_breast(), BurnedInAnnotation="NO"), "no.dcm")
    assert read_dicom(no, rules).voi == "minmax"


@pytest.mark.parametrize(
    ("rows", "columns", "frames"), [(60000, 60000, None), (8193, 8192, None), (4096, 4096, "5")]
)
def test_declared_size_above_the_pixel_limit_is_refused_before_decoding(
    tmp_path: Path, rows: int, columns: int, frames: str | None
) -> None:
    ds = _dataset(_breast())
    ds.Rows, ds.Columns = rows, columns
    if frames:
        ds.NumberOfFrames = frames
    path = _write(tmp_path, ds)
    with pytest.raises(DicomError, match=r"above the limit of 67,108,864 \(images.MAX_PIXELS\)"):
        read_dicom(path)


def test_a_jpeg2000_codestream_larger_than_its_header_is_refused(tmp_path: Path) -> None:
    if not get_encoder(JPEG2000Lossless).is_available:
        pytest.skip("no JPEG 2000 encoder (pylibjpeg-openjpeg)")
    ds = _dataset(_breast(h=64, w=48))
    ds.compress(JPEG2000Lossless)
    ds.Rows, ds.Columns = 32, 24  # the codestream still says 64 rows x 48 columns
    with pytest.raises(DicomError, match="compressed pixel data declares 48x64 pixels"):
        read_dicom(_write(tmp_path, ds))


@pytest.mark.parametrize(
    ("descriptor", "data", "match"),
    [
        ([4], [1, 2, 3, 4], "needs 3 values"),
        ([4, 0, 32], [1, 2, 3, 4], "32 bits per entry"),
        ([4, 0, 16], [1, 2], "declares 4 entries but LUT Data holds 2"),
        ([0, 0, 16], b"\x01\x00" * 3, "declares 65536 entries but LUT Data holds 3"),
        ([4, 0, 16], None, "no LUT Data"),
    ],
)
def test_malformed_voi_lut_is_an_error(
    tmp_path: Path, descriptor: list[int], data: Any, match: str
) -> None:
    item = Dataset()
    item.add_new("LUTDescriptor", "US", descriptor)
    if isinstance(data, bytes):
        item.add_new("LUTData", "OW", data)
    elif data is not None:
        item.add_new("LUTData", "US", data)
    ds = _dataset(_breast())
    ds.VOILUTSequence = [item]
    with pytest.raises(DicomError, match=match):
        read_dicom(_write(tmp_path, ds))


def test_non_finite_rescale_is_an_error(tmp_path: Path) -> None:
    path = _write(tmp_path, _dataset(_breast(), RescaleSlope="1e308", RescaleIntercept="1e308"))
    with pytest.raises(DicomError, match="invalid Rescale Slope"):
        read_dicom(path)


def test_a_malformed_header_value_is_a_dicom_error(tmp_path: Path) -> None:
    path = _write(tmp_path, _dataset(_breast()))
    data = bytearray(path.read_bytes())
    at = data.index(b"CS", data.index(b"\x08\x00\x60\x00"))  # Modality's VR
    data[at : at + 2] = b"Co"  # an unknown VR, as a flipped byte leaves it
    path.write_bytes(bytes(data))
    with pytest.raises(DicomError, match=r"malformed DICOM header \(NotImplementedError"):
        read_dicom(path)


def test_8bit_image(tmp_path: Path) -> None:
    raw = (_breast() // 16).astype(np.uint8)
    image = read_dicom(_write(tmp_path, _dataset(raw, bits_stored=8)))
    assert image.bits_stored == 8 and image.pixels.max() == 1.0


def test_laterality_and_view_fallbacks(tmp_path: Path) -> None:
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = (
        "R-10226",
        "SRT",
        "medio-lateral oblique",
    )
    ds = _dataset(_breast(), ImageLaterality=None, ViewPosition=None, Laterality="R")
    ds.ViewCodeSequence = [code]
    image = read_dicom(_write(tmp_path, ds))
    assert (image.laterality, image.view) == ("R", "MLO")
    assert normalise_laterality(" left ") == "L" and normalise_laterality("B") is None
    cc = Dataset()
    cc.CodeValue, cc.CodeMeaning = "399162004", "cranio-caudal"
    assert normalise_view("", [cc]) == "CC" and normalise_view(None, None) is None


def test_no_pixel_data(tmp_path: Path) -> None:
    ds = _dataset(_breast())
    del ds.PixelData
    path = _write(tmp_path, ds)
    with pytest.raises(DicomError) as err:
        read_dicom(path)
    assert str(err.value) == (
        f"{path}: not an image (SOP class 1.2.840.10008.5.1.4.1.1.1.2 (Digital Mammography X-Ray "
        "Image Storage - For Presentation), Modality MG, no Pixel Data): remove it from the source"
    )
    assert "re-download" not in str(err.value)


def _compressed(ds: Dataset, syntax: UID, frame: bytes) -> Dataset:
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return ds


def test_undecodable_jpeg_ls_names_syntax_and_hint(tmp_path: Path) -> None:
    ds = _compressed(_dataset(_breast()), JPEGLSLossless, b"\xff\xd8 not really jpeg-ls \xff\xd9")
    path = _write(tmp_path, ds)
    with pytest.raises(DicomError) as err:
        read_dicom(path)
    text = str(err.value)
    prefix = (
        f"{path}: cannot decode the pixel data with transfer syntax 1.2.840.10008.1.2.4.80 "
        "(JPEG-LS Lossless Image Compression): "
    )
    assert text.startswith(prefix)
    assert text.endswith(
        "; hint: install pylibjpeg-libjpeg or pyjpegls (`uv add pylibjpeg pylibjpeg-libjpeg`)"
    )


def test_unknown_transfer_syntax(tmp_path: Path) -> None:
    ds = _compressed(_dataset(_breast()), UID("1.2.3.4.5.6.7"), b"\x00" * 16)
    path = _write(tmp_path, ds)
    with pytest.raises(DicomError) as err:
        read_dicom(path)
    text = str(err.value)
    assert text.startswith(
        f"{path}: cannot decode the pixel data with transfer syntax 1.2.3.4.5.6.7 "
        "(unrecognised transfer syntax): "
    )
    assert text.endswith(
        "; hint: convert the file to an uncompressed transfer syntax (e.g. `gdcmconv --raw "
        "in.dcm out.dcm` or `dcmdjpeg`) or install a decoder plugin for it"
    )


def test_not_dicom(tmp_path: Path) -> None:
    path = tmp_path / "fake.dcm"
    path.write_bytes(b"\x00" * 200)
    with pytest.raises(DicomError) as err:
        read_dicom(path)
    assert str(err.value) == (
        f"{path}: not a DICOM file (no 'DICM' marker after the 128-byte preamble); check the "
        "file or re-export it as DICOM Part 10"
    )


def test_colour_is_rejected(tmp_path: Path) -> None:
    path = _write(tmp_path, _dataset(_breast(), PhotometricInterpretation="PALETTE COLOR"))
    with pytest.raises(DicomError, match=r"photometric interpretation 'PALETTE COLOR' is not"):
        read_dicom(path)


# ------------------------------------------------------------------ compressed round trips


@pytest.mark.parametrize("bits", [12, 16])
def test_jpeg2000_lossless_roundtrip(tmp_path: Path, bits: int) -> None:
    encoder = get_encoder(JPEG2000Lossless)
    if not encoder.is_available:
        pytest.skip(f"no JPEG 2000 encoder: {encoder.missing_dependencies}")
    raw = _breast(64, 48, top=(1 << bits) - 1)
    plain = read_dicom(_write(tmp_path, _dataset(raw, bits_stored=bits), "u.dcm"))
    ds = _dataset(raw, bits_stored=bits)
    ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
    path = _write(tmp_path, ds, "j2k.dcm")
    image = read_dicom(path)
    assert image.transfer_syntax == JPEG2000Lossless
    np.testing.assert_array_equal(image.pixels, plain.pixels)
    np.testing.assert_array_equal(load_raw(path), plain.pixels)


def _jpeg_lossless_sv1(arr: np.ndarray, precision: int) -> bytes:
    """Minimal JPEG Process 14 SV1 encoder (predictor 1, one table, 5-bit codes for SSSS)."""
    x = arr.astype(np.int64)
    h, w = x.shape
    pred = np.empty_like(x)
    pred[0, 0] = 1 << (precision - 1)
    pred[0, 1:] = x[0, :-1]
    pred[1:, 0] = x[:-1, 0]
    pred[1:, 1:] = x[1:, :-1]
    diff = (x - pred) % 65536
    diff[diff > 32768] -= 65536
    bits: list[str] = []
    for d in diff.ravel().tolist():
        ssss = 0 if d == 0 else abs(d).bit_length()
        bits.append(format(ssss, "05b"))
        if 0 < ssss < 16:
            extra = d if d > 0 else d + (1 << ssss) - 1
            bits.append(format(extra, f"0{ssss}b"))
    stream = "".join(bits)
    stream += "1" * (-len(stream) % 8)
    entropy = bytearray()
    for i in range(0, len(stream), 8):
        byte = int(stream[i : i + 8], 2)
        entropy.append(byte)
        if byte == 0xFF:
            entropy.append(0x00)
    sof = bytes([0xFF, 0xC3, 0, 11, precision]) + h.to_bytes(2, "big") + w.to_bytes(2, "big")
    sof += bytes([1, 1, 0x11, 0])
    counts = [0] * 16
    counts[4] = 17
    dht = bytes([0xFF, 0xC4]) + (2 + 1 + 16 + 17).to_bytes(2, "big") + bytes([0x00])
    dht += bytes(counts) + bytes(range(17))
    sos = bytes([0xFF, 0xDA, 0, 8, 1, 1, 0x00, 1, 0, 0])
    return b"\xff\xd8" + sof + dht + sos + bytes(entropy) + b"\xff\xd9"


@pytest.mark.parametrize("bits", [12, 16])
def test_jpeg_lossless_sv1_roundtrip(tmp_path: Path, bits: int) -> None:
    rng = np.random.default_rng(bits)
    raw = _breast(top=(1 << bits) - 1)
    raw[5:9, 5:9] = rng.integers(0, 1 << bits, (4, 4))  # some large jumps
    plain = read_dicom(_write(tmp_path, _dataset(raw, bits_stored=bits), "u.dcm"))
    ds = _compressed(
        _dataset(raw, bits_stored=bits), JPEGLosslessSV1, _jpeg_lossless_sv1(raw, bits)
    )
    image = read_dicom(_write(tmp_path, ds, "jll.dcm"))
    assert image.transfer_syntax == JPEGLosslessSV1
    np.testing.assert_array_equal(image.pixels, plain.pixels)


def test_jpeg_ls_lossless_decodes_like_its_uncompressed_twin() -> None:
    """No JPEG-LS encoder is installed (pyjpegls), so the round trip uses pydicom's own pair."""
    from pydicom.data import get_testdata_file

    jls = read_dicom(str(get_testdata_file("MR_small_jpeg_ls_lossless.dcm")))
    plain = read_dicom(str(get_testdata_file("MR_small.dcm")))
    assert jls.transfer_syntax == JPEGLSLossless and jls.pixels.shape == (64, 64)
    assert float(jls.pixels.std()) > 0.05  # a real image, not a blank
    np.testing.assert_array_equal(jls.pixels, plain.pixels)


# ------------------------------------------------------------------ acceptance rules (headers)

SMALL = Acceptance(min_size=8)  # the synthetic images here are 16 x 12


def _header(**tags: Any) -> Dataset:
    return _dataset(_breast(), **tags)


def test_a_plain_mammogram_is_accepted(tmp_path: Path) -> None:
    assert acceptance_problem(_header(), SMALL) is None
    assert read_dicom(_write(tmp_path, _header()), SMALL).view == "CC"


@pytest.mark.parametrize(
    ("tags", "sop", "modality", "no_pixels"),
    [
        (  # an X-ray radiation dose report, as GE and Hologic write them
            {"SOPClassUID": "1.2.840.10008.5.1.4.1.1.88.67", "Modality": "SR"},
            "1.2.840.10008.5.1.4.1.1.88.67 (X-Ray Radiation Dose SR Storage)",
            "SR",
            False,
        ),
        (
            {"SOPClassUID": "1.2.840.10008.5.1.4.1.1.11.1", "Modality": "PR"},
            "1.2.840.10008.5.1.4.1.1.11.1 (Grayscale Softcopy Presentation State Storage)",
            "PR",
            False,
        ),
        (
            {"SOPClassUID": "1.2.840.10008.5.1.4.1.1.88.59", "Modality": "KO"},
            "1.2.840.10008.5.1.4.1.1.88.59 (Key Object Selection Document Storage)",
            "KO",
            False,
        ),
        (  # an image SOP class with Modality SR is still no image
            {"Modality": "SR"},
            "1.2.840.10008.5.1.4.1.1.1.2 (Digital Mammography X-Ray Image Storage - For "
            "Presentation)",
            "SR",
            False,
        ),
        (  # header only
            {"PixelData": None},
            "1.2.840.10008.5.1.4.1.1.1.2 (Digital Mammography X-Ray Image Storage - For "
            "Presentation)",
            "MG",
            True,
        ),
    ],
)
def test_not_an_image(
    tmp_path: Path, tags: dict[str, Any], sop: str, modality: str, no_pixels: bool
) -> None:
    ds = _header()
    for key, value in tags.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    expected = (
        f"not an image (SOP class {sop}, Modality {modality}"
        f"{', no Pixel Data' if no_pixels else ''}): remove it from the source"
    )
    assert acceptance_problem(ds, SMALL) == expected
    path = _write(tmp_path, ds)
    with pytest.raises(DicomError) as err:
        read_dicom(path, SMALL)
    assert str(err.value) == f"{path}: {expected}"
    with pytest.raises(DicomError, match="not an image"):  # conversion refuses it too
        read_dicom(path)


@pytest.mark.parametrize(
    ("tags", "marker"),
    [
        (  # a Hologic flat-field exposure: Secondary Capture with ViewPosition FLATFIELD
            {"ViewPosition": "FLATFIELD", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.7"},
            "ViewPosition 'FLATFIELD'",
        ),
        ({"ImageType": ["ORIGINAL", "PRIMARY", "QC"]}, "ImageType 'ORIGINAL/PRIMARY/QC'"),
        ({"ImageType": ["DERIVED", "FLAT_FIELD"]}, "ImageType 'DERIVED/FLAT_FIELD'"),
        ({"SeriesDescription": "ACR Phantom"}, "SeriesDescription 'ACR Phantom'"),
        ({"SeriesDescription": "Detector calibration"}, "SeriesDescription 'Detector calibration'"),
        ({"SeriesDescription": "flat-field"}, "SeriesDescription 'flat-field'"),
    ],
)
def test_quality_control_images_are_refused(
    tmp_path: Path, tags: dict[str, Any], marker: str
) -> None:
    ds = _header(**tags)
    expected = (
        f"quality-control or calibration image ({marker}), not a patient mammogram: remove it "
        "from the source"
    )
    assert acceptance_problem(ds, SMALL) == expected
    path = _write(tmp_path, ds)
    with pytest.raises(DicomError) as err:
        read_dicom(path, SMALL)
    assert str(err.value) == f"{path}: {expected}"


def test_qc_words_are_whole_words() -> None:
    for text in ("L CC", "R MLO TOMO", "Aquarius", "QCX", "FLATTENED"):
        assert qc_marker("CC", ["ORIGINAL", "PRIMARY"], text) is None, text
    assert qc_marker("MLO", "ORIGINAL\\PRIMARY", None) is None
    assert qc_marker("flat field") == "ViewPosition 'flat field'"


@pytest.mark.parametrize(
    ("tags", "marker"),
    [
        ({"PresentationIntentType": "FOR PROCESSING"}, "PresentationIntentType 'FOR PROCESSING'"),
        (
            {"ImageType": ["ORIGINAL", "PRIMARY", "", "FOR PROCESSING"]},
            "ImageType 'ORIGINAL/PRIMARY/FOR PROCESSING'",
        ),
        (
            {"SOPClassUID": "1.2.840.10008.5.1.4.1.1.1.2.1"},
            "SOP class 1.2.840.10008.5.1.4.1.1.1.2.1 (Digital Mammography X-Ray Image Storage - "
            "For Processing)",
        ),
    ],
)
def test_for_processing_is_refused_unless_accepted(
    tmp_path: Path, tags: dict[str, Any], marker: str
) -> None:
    ds = _header(PhotometricInterpretation="MONOCHROME1", **tags)  # GE raw: MONOCHROME1, no VOI
    expected = (
        f"FOR PROCESSING image ({marker}): raw detector data, not meant for reading; ingest the "
        "FOR PRESENTATION image of the same view instead, or set "
        "ingest.accept_for_processing: true to take raw images"
    )
    assert acceptance_problem(ds, SMALL) == expected
    path = _write(tmp_path, ds)
    with pytest.raises(DicomError) as err:
        read_dicom(path, SMALL)
    assert str(err.value) == f"{path}: {expected}"
    accepting = dataclasses.replace(SMALL, accept_for_processing=True)
    assert acceptance_problem(ds, accepting) is None
    assert read_dicom(path, accepting).photometric == "MONOCHROME1"


@pytest.mark.parametrize(("rows", "columns"), [(1, 2), (4, 4), (16, 7)])
def test_images_below_min_size_are_refused(tmp_path: Path, rows: int, columns: int) -> None:
    ds = _dataset(np.full((rows, columns), 100, dtype=np.uint16))
    expected = (
        f"image is {columns}x{rows} pixels, its short side below the minimum of 8: a thumbnail "
        "or test pattern, not a mammogram; remove it from the source, or lower ingest.min_size "
        "if such small images are intended"
    )
    assert acceptance_problem(ds, SMALL) == expected
    path = _write(tmp_path, ds)
    with pytest.raises(DicomError) as err:
        read_dicom(path, SMALL)
    assert str(err.value) == f"{path}: {expected}"
    assert read_dicom(path).pixels.shape == (rows, columns)  # conversion applies no size rule


def test_min_size_boundary_and_default() -> None:
    assert acceptance_problem(_dataset(np.ones((8, 9), dtype=np.uint16)), SMALL) is None
    assert Acceptance().min_size == 256
    assert "minimum of 256" in str(acceptance_problem(_header(), Acceptance()))
    with pytest.raises(ValueError, match="min_size must be at least 1 pixel, got 0"):
        Acceptance(min_size=0)


def test_rules_apply_in_order() -> None:
    """A flat-field SR is "not an image" first; a tiny QC image is QC before it is small."""
    ds = _header(ViewPosition="FLATFIELD", Modality="SR")
    assert str(acceptance_problem(ds, SMALL)).startswith("not an image")
    tiny_qc = _dataset(np.ones((2, 2), dtype=np.uint16), ViewPosition="FLATFIELD")
    assert str(acceptance_problem(tiny_qc, SMALL)).startswith("quality-control")


def test_multi_frame_is_still_refused(tmp_path: Path) -> None:
    frames = np.stack([_breast(), _breast()])
    ds = _dataset(_breast())
    ds.NumberOfFrames = 2
    ds.PixelData = frames.astype("<u2").tobytes()
    with pytest.raises(DicomError, match=r"pixel array has shape \(2, 16, 12\); expected one"):
        read_dicom(_write(tmp_path, ds), SMALL)


def test_a_real_structured_report_is_not_an_image() -> None:
    """pydicom's bundled test-SR.dcm, a real Comprehensive SR written by a vendor system."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file("test-SR.dcm")
    assert path is not None
    with pytest.raises(DicomError) as err:
        read_dicom(path, Acceptance())
    assert str(err.value) == (
        f"{path}: not an image (SOP class 1.2.840.10008.5.1.4.1.1.88.33 (Comprehensive SR "
        "Storage), Modality SR, no Pixel Data): remove it from the source"
    )
