"""Bad slide files, each built from a real one: decompression bombs and lying headers,
corrupt compressed data, truncated files and an invalid pixel size.

Every case must fail before any large allocation, with an M2ORTError that names the file,
and ``convert`` must exit 2 leaving nothing behind. Healthy files that look odd (a grey
corner, optimised or progressive JPEG) must still open.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image, ImageFile

import napari_m2ort
from napari_m2ort.cli import main
from napari_m2ort.errors import M2ORTError
from napari_m2ort.io.slides import ENV_DECODE_BUDGET, ENV_MPP, flat_checks, napari_get_reader, open_slide
from napari_m2ort.slide import open_image

C2 = Path(napari_m2ort.__file__).parent / "data" / "her2st_C2" / "5714_HE_BT_C2.jpg"
HUGE = 60_000


# ------------------------------------------------------------------------ builders


def _jpeg_segments(data: bytes):
    """(marker, offset) of each JPEG segment up to the first scan."""
    i = 2
    while True:
        marker = data[i + 1]
        yield marker, i
        if marker == 0xDA:
            return
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")


def _claim_jpeg(data: bytes, width: int, height: int) -> bytes:
    """The JPEG with its frame header (SOF) saying width x height."""
    out = bytearray(data)
    for marker, i in _jpeg_segments(data):
        if marker in (0xC0, 0xC1, 0xC2):
            out[i + 5 : i + 9] = struct.pack(">HH", height, width)
            return bytes(out)
    raise AssertionError("no frame header")


def _claim_png(data: bytes, width: int, height: int) -> bytes:
    """The PNG with its IHDR saying width x height (and a valid CRC)."""
    out = bytearray(data)
    out[16:24] = struct.pack(">II", width, height)
    out[29:33] = struct.pack(">I", zlib.crc32(bytes(out[12:29])))
    return bytes(out)


def _tiff_tags(path: Path, **values) -> None:
    """Overwrite inline IFD values of the first page: name=int, or name=(num, den)."""
    data = bytearray(path.read_bytes())
    with tifffile.TiffFile(path) as tif:
        tags = tif.pages[0].tags
        for name, value in values.items():
            tag = tags[name]
            if isinstance(value, tuple):
                data[tag.valueoffset : tag.valueoffset + 8] = struct.pack("<II", *value)
            else:
                fmt = "<I" if tag.dtype == 4 else "<H"
                data[tag.valueoffset : tag.valueoffset + struct.calcsize(fmt)] = struct.pack(fmt, value)
    path.write_bytes(bytes(data))


def _strip_tiff(path: Path, pixels: np.ndarray) -> Path:
    """A deflate-compressed TIFF stored as one strip, 0.5 µm/px."""
    tifffile.imwrite(
        path,
        pixels,
        compression="zlib",
        rowsperstrip=pixels.shape[0],
        photometric="rgb",
        resolution=(2e4, 2e4),
        resolutionunit="CENTIMETER",
        metadata=None,
    )
    return path


def _jpeg(pixels: np.ndarray, **options) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=options.pop("quality", 85), **options)
    return buf.getvalue()


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _damaged(exc: pytest.ExceptionInfo, path: Path, *words: str) -> None:
    message = str(exc.value)
    assert exc.type is M2ORTError
    assert path.name in message, message
    for word in words:
        assert word in message, message


@pytest.fixture(scope="module")
def tissue() -> np.ndarray:
    """Real H&E pixels: C2 at 1/4 scale (2478 x 2319), a quarter-second decode."""
    with open_image(C2) as im:
        im.draft("RGB", (im.width // 4, im.height // 4))
        return np.asarray(im.convert("RGB"))


@pytest.fixture(scope="module")
def crop(tissue) -> np.ndarray:
    return np.ascontiguousarray(tissue[900:1924, 700:1724])  # 1024 x 1024, tissue and glass


# ------------------------------------------------------------- bombs, lying headers


@pytest.fixture(scope="module")
def bombs(tmp_path_factory, crop) -> list[Path]:
    """Small real files whose headers claim 60,000 x 60,000 px."""
    d = tmp_path_factory.mktemp("bombs")
    buf = io.BytesIO()
    Image.fromarray(crop[:64, :64]).save(buf, "PNG")
    tiff = _strip_tiff(d / "strip_bomb.tif", crop)
    _tiff_tags(tiff, ImageWidth=HUGE, ImageLength=HUGE, RowsPerStrip=HUGE)
    return [
        _write(d / "c2_bomb.jpg", _claim_jpeg(C2.read_bytes(), HUGE, HUGE)),
        _write(d / "tiny_bomb.png", _claim_png(buf.getvalue(), HUGE, HUGE)),
        tiff,
    ]


_LIMITED = r"""
import json, os, resource, sys
sys.argv[0] = "napari-m2ort"  # the package skips torch for its command-line tool
import napari_m2ort
napari_m2ort.load = lambda: None  # convert needs no torch
from napari_m2ort.cli import main
from napari_m2ort.errors import M2ORTError
from napari_m2ort.io.slides import open_slide

size = int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmSize"))) * 1024
resource.setrlimit(resource.RLIMIT_AS, (size + 2**30, size + 2**30))  # 1 GB more than now
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
report = {}
for path in sys.argv[1:]:
    try:
        open_slide(path, mpp=0.5).read_region(0, 0, 256, 256)
        opened = "opened"
    except M2ORTError as exc:
        opened = str(exc)
    except MemoryError:
        opened = "MemoryError"
    out = path + ".ome.tif"
    rc = main(["convert", path, "--out", out, "--mpp", "0.5"])
    report[path] = {"open": opened, "rc": rc, "files": sorted(os.listdir(os.path.dirname(path)))}
report["grew_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
print(json.dumps(report))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="address-space limit via /proc")
def test_bombs_refused_before_allocating(bombs):
    """Opening or converting a 60,000 x 60,000 px claim in a small file is refused from
    its header; under a 1 GB address-space limit nothing near its 10 GB is allocated."""
    names = sorted(p.name for p in bombs)
    run = subprocess.run(
        [sys.executable, "-c", _LIMITED, *map(str, bombs)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report.pop("grew_mb") < 150
    for path in bombs:
        result = report[str(path)]
        message = result["open"]
        assert path.name in message and "60,000 x 60,000 px" in message, message
        assert "GB of memory" in message and "nothing was decoded" in message, message
        assert "napari-m2ort convert" in message, message
        assert "decompression bomb" in message, message
        assert result["rc"] == 2
        assert result["files"] == names  # no output, no temp file
        # the CLI's one line names the file too
        assert f"'{path}' claims to be 60,000 x 60,000 px" in run.stderr


def test_memory_budget_refuses_big_flat_image(monkeypatch):
    """A genuine image over the budget: refused with the estimate and the conversion
    hint; the budget comes from the argument, else the environment, and survives pickling."""
    with pytest.raises(M2ORTError) as exc:
        open_slide(C2, mpp=0.69, memory_budget=100 * 2**20)
    _damaged(exc, C2, "9,274 x 9,911 px", "memory budget of 0.1 GB", "napari-m2ort convert", ENV_DECODE_BUDGET)
    monkeypatch.setenv(ENV_DECODE_BUDGET, "0.1")
    with pytest.raises(M2ORTError, match="memory budget of 0.1 GB"):
        open_slide(C2, mpp=0.69)
    monkeypatch.setenv(ENV_DECODE_BUDGET, "lots")
    with pytest.raises(M2ORTError, match=ENV_DECODE_BUDGET):
        open_slide(C2, mpp=0.69)
    monkeypatch.delenv(ENV_DECODE_BUDGET)
    import pickle

    with open_slide(C2, mpp=0.69, memory_budget=2**30) as slide:
        assert pickle.loads(pickle.dumps(slide)).decode_budget == 2**30


# ------------------------------------------------------------------ corrupt JPEG data


def _c2_zeros(data: bytes) -> bytes:
    n = len(data) // 2
    return data[:n] + bytes(4096) + data[n + 4096 :]


def _c2_garbage(data: bytes) -> bytes:
    n = len(data) // 2
    noise = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    return data[:n] + noise + data[n + 4096 :]


def _c2_cut(data: bytes) -> bytes:
    return data[: len(data) * 6 // 10] + b"\xff\xd9"


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        (_c2_zeros, ("damaged", "into the image data")),
        (_c2_garbage, ("damaged", "stray bytes", "into the image data")),
        (_c2_cut, ("damaged", "restart markers", "of the image is missing")),
    ],
    ids=["zero-filled", "garbage", "cut-short"],
)
def test_corrupt_c2_refused_at_open(tmp_path, damage, words):
    """C2 damaged mid-file decodes with grey or shifted blocks and no error from libjpeg;
    its marker structure shows it when the file is opened, before any decode."""
    path = _write(tmp_path / "C2.jpg", damage(C2.read_bytes()))
    with pytest.raises(M2ORTError) as exc:
        open_slide(path, mpp=0.69)
    _damaged(exc, path, *words)
    with pytest.raises(M2ORTError, match="damaged"):
        napari_get_reader(str(path))(str(path))
    out = tmp_path / "C2.ome.tif"
    assert main(["convert", str(path), "--out", str(out), "--mpp", "0.69"]) == 2
    assert sorted(os.listdir(tmp_path)) == ["C2.jpg"]


def test_jpeg_cut_short_fails_on_first_read_and_in_napari(tmp_path, crop, monkeypatch):
    """A JPEG without restart markers, cut mid-file and closed with an end marker: libjpeg
    fills the rest with grey. The 1/8-scale check finds it on the first read (once: later
    reads raise the same error without decoding) and the napari reader at open."""
    data = _jpeg(crop)
    path = _write(tmp_path / "cut.jpg", data[: len(data) * 7 // 10] + b"\xff\xd9")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    calls = []
    real = flat_checks.verify_jpeg
    monkeypatch.setattr("napari_m2ort.io.slides.flat.verify_jpeg", lambda *a: calls.append(1) or real(*a))
    slide = open_slide(path, mpp=0.5)  # opening reads no pixels
    for _ in range(2):
        with pytest.raises(M2ORTError) as exc:
            slide.read_region(0, 0, 64, 64)
        _damaged(exc, path, "premature end of data", "of the image")
    assert len(calls) == 1
    monkeypatch.setenv(ENV_MPP, "0.5")
    with pytest.raises(M2ORTError, match="premature end"):
        napari_get_reader(str(path))(str(path))


def test_jpeg_trailing_junk_and_zero_fill(tmp_path, crop):
    """Bytes that are not image data before the end marker (libjpeg: 'extraneous bytes')
    and a zero-filled stretch are both refused."""
    data = _jpeg(crop)
    junk = _write(tmp_path / "junk.jpg", data[:-2] + b"\x55" * 300 + data[-2:])
    with pytest.raises(M2ORTError) as exc:
        open_slide(junk, mpp=0.5).read_region(0, 0, 64, 64)
    _damaged(exc, junk, "ends early")
    n = len(data) // 2
    zeros = _write(tmp_path / "zeros.jpg", data[:n] + bytes(256) + data[n + 256 :])
    with pytest.raises(M2ORTError) as exc:
        open_slide(zeros, mpp=0.5)
    _damaged(exc, zeros, "a run of zero bytes")


def test_healthy_unusual_jpegs_still_open(tmp_path, crop):
    """No false alarms: progressive, optimised, 4:4:4 and grey-cornered images decode."""
    grey = crop.copy()
    grey[-128:, -128:] = 128  # the last blocks decode as exact mid-grey, like lost data
    cases = {
        "progressive.jpg": _jpeg(crop, progressive=True),
        "optimized.jpg": _jpeg(crop, optimize=True),
        "q100_444.jpg": _jpeg(crop, quality=100, subsampling=0),
        "gray.jpg": _jpeg(np.ascontiguousarray(crop[..., 1])),
        "grey_corner.jpg": _jpeg(grey),
    }
    for name, data in cases.items():
        path = _write(tmp_path / name, data)
        with open_slide(path, mpp=0.5) as slide:
            slide.verify()
            assert slide.read_region(960, 960, 64, 64).shape == (64, 64, 3)
    corner = open_slide(tmp_path / "grey_corner.jpg", mpp=0.5).read_region(1016, 1016, 8, 8)
    assert (corner == 128).all()  # the case the padding re-decode had to clear


# ------------------------------------------------------------------ PNG and TIFF


def test_png_bad_checksum(tmp_path, crop):
    buf = io.BytesIO()
    Image.fromarray(crop).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[len(data) // 2] ^= 0x10  # one bit inside the image data
    path = _write(tmp_path / "flip.png", bytes(data))
    with pytest.raises(M2ORTError) as exc:
        open_slide(path, mpp=0.5)
    _damaged(exc, path, "checksum of its IDAT chunk")


def _pyramid(path: Path, tissue: np.ndarray) -> Path:
    """A 2048 px tiled deflate TIFF with one 1024 px reduced level."""
    level0 = np.ascontiguousarray(tissue[:2048, :2048])
    with tifffile.TiffWriter(path) as tw:
        options = dict(tile=(256, 256), compression="zlib", photometric="rgb", metadata=None)
        tw.write(level0, subifds=1, resolution=(2e4, 2e4), resolutionunit="CENTIMETER", **options)
        tw.write(level0[::2, ::2], subfiletype=1, **options)
    return path


def test_tiff_bad_tile_names_the_file(tmp_path, tissue):
    """A damaged tile of level 0 fails its read with the file and level named (opening
    samples only the first tile and the smallest level)."""
    path = _pyramid(tmp_path / "pyramid.tif", tissue)
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        offset, count = page.dataoffsets[10], page.databytecounts[10]
    data = bytearray(path.read_bytes())
    data[offset : offset + count] = np.random.default_rng(1).integers(0, 256, count, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    slide = open_slide(path)
    assert slide.read_region(0, 0, 256, 256).shape == (256, 256, 3)
    with pytest.raises(M2ORTError) as exc:
        slide.read_region(512, 256, 256, 256)  # tile 10: row 1, column 2
    _damaged(exc, path, "level 0", "damaged")


def test_tiff_truncated_fails_at_open(tmp_path, tissue):
    path = _pyramid(tmp_path / "pyramid.tif", tissue)
    with tifffile.TiffFile(path) as tif:
        cut = int(tif.pages[0].dataoffsets[40])  # IFDs come first: the tile table survives
    path.write_bytes(path.read_bytes()[:cut])
    with pytest.raises(M2ORTError) as exc:
        open_slide(path)
    _damaged(exc, path, "truncated", "beyond the end of the file")
    out = tmp_path / "pyramid.ome.tif"
    assert main(["convert", str(path), "--out", str(out), "--mpp", "0.5"]) == 2
    assert sorted(os.listdir(tmp_path)) == ["pyramid.tif"]


def test_tiff_zero_resolution_denominator(tmp_path, crop, monkeypatch):
    """XResolution n/0: a clear error asking for --mpp, and --mpp (mpp=, NAPARI_M2ORT_MPP)
    overrides it."""
    path = _strip_tiff(tmp_path / "zero_den.tif", crop[:256, :256])
    _tiff_tags(path, XResolution=(20000, 0))
    with pytest.raises(M2ORTError) as exc:
        open_slide(path)
    _damaged(exc, path, "pixel size stored in", "is invalid", "zero denominator", "--mpp", ENV_MPP)
    with open_slide(path, mpp=0.5) as slide:
        assert (slide.mpp, slide.mpp_source) == (0.5, "user")
        np.testing.assert_array_equal(slide.read_region(0, 0, 256, 256), crop[:256, :256])
    with pytest.raises(M2ORTError, match="--mpp"):
        napari_get_reader(str(path))(str(path))
    monkeypatch.setenv(ENV_MPP, "0.5")
    (data, meta, kind), *_ = napari_get_reader(str(path))(str(path))
    assert meta["scale"] == (0.5, 0.5)
