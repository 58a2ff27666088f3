"""What can be learnt about a flat JPEG/PNG from its bytes before and while decoding it.

Decoders are forgiving on purpose: libjpeg turns corrupt or missing data into warnings
(which Pillow and imagecodecs both drop) and fills what it could not decode with flat
grey, and Pillow never checks the CRCs of PNG image data. A slide read that way looks
fine and gives wrong predictions. So a flat image is checked in two steps:

* when it is opened, from its bytes alone (milliseconds): the header's size against
  the file (``budget.check_claim``), every chunk CRC of a PNG, and for a JPEG the
  marker structure of the compressed data (stray markers, restart markers missing or
  out of order, runs of zero bytes that no encoder writes with its Huffman tables);
* on its first decode (``verify_jpeg``, a 1/8-scale decode that costs about a tenth of
  the full one and also serves the overview level): whether the data ran out before
  the last block (libjpeg's "premature end": the blocks after it come out exactly
  grey) or ended well before the end-of-image marker ("extraneous bytes").
"""

from __future__ import annotations

import io
import math
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from napari_m2ort.errors import M2ORTError
from napari_m2ort.io.slides.budget import check_claim

__all__ = ["JpegInfo", "check_jpeg", "check_png", "verify_jpeg"]

# Markers that may legally follow a scan's compressed data.
_AFTER_SCAN = {0xC4, 0xCC, 0xD9, 0xDA, 0xDB, 0xDC, 0xDD, 0xDE, 0xDF, 0xFE} | set(range(0xE0, 0xF0))
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
# A run of zero bytes this long in Huffman-coded data means zero-filled damage unless
# the tables code an empty block as all zero bits (see _zero_runs); real images reach
# 3 bytes, 8 at quality 100.
_ZERO_RUN = 32
# The decode must still need data this close to the end-of-image marker.
_END_SLACK = 8


@dataclass
class JpegInfo:
    """The main image's frame and scans, from the file's markers."""

    width: int = 0
    height: int = 0
    ids: list[int] = field(default_factory=list)  # component ids, as scans name them
    sampling: list[tuple[int, int]] = field(default_factory=list)  # (h, v) per component
    baseline: bool = True  # one sequential Huffman scan (SOF0/SOF1)
    arithmetic: bool = False
    restart: int = 0  # MCUs per restart interval in the last scan, 0: none
    scans: list[tuple[int, int]] = field(default_factory=list)  # entropy data [start, stop)
    rst: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))  # last scan's RST offsets
    data_end: int = 0  # end of the last scan's data, fill bytes excluded

    @property
    def mcu(self) -> tuple[int, int]:
        """(rows, cols) of MCUs in an interleaved scan."""
        hmax = max(h for h, _ in self.sampling)
        vmax = max(v for _, v in self.sampling)
        return math.ceil(self.height / (8 * vmax)), math.ceil(self.width / (8 * hmax))


def _corrupt(path: Path, detail: str) -> M2ORTError:
    return M2ORTError(
        f"'{path}' is damaged: {detail}. Decoding it would give wrong pixels (flat grey or "
        "shifted blocks) without an error, so it is refused. Copy or download it again, or "
        "re-export it from the scanner software."
    )


# ------------------------------------------------------------------------------ JPEG


def check_jpeg(path: Path) -> JpegInfo:
    """Parse the markers of ``path``, check its size claim and its compressed data's
    structure; raise M2ORTError naming the file and the byte where it goes wrong."""
    buf = np.memmap(path, dtype=np.uint8, mode="r").view(np.ndarray)  # pages in only what is scanned
    info = JpegInfo()
    zero_codes: dict[int, int] = {}  # AC table id -> symbol of its all-zero code
    i, n = 2, len(buf)
    while True:
        while i < n - 1 and buf[i] == 0xFF and buf[i + 1] == 0xFF:
            i += 1  # fill bytes
        if i + 2 > n or buf[i] != 0xFF:
            raise _corrupt(path, f"the JPEG structure breaks at byte {i:,} (no marker where one must be)")
        marker = int(buf[i + 1])
        if marker == 0xD9:
            break
        if i + 4 > n:
            raise _corrupt(path, f"the JPEG ends inside a marker at byte {i:,}")
        length = int(buf[i + 2]) << 8 | int(buf[i + 3])
        body = buf[i + 4 : i + 2 + length].tobytes()
        if length < 2 or i + 2 + length > n:
            raise _corrupt(path, f"the JPEG segment at byte {i:,} runs past the end of the file")
        if marker in _SOF and not info.sampling:
            _read_frame(path, info, marker, body)
            _check_size(path, info, stored=n)  # before reading any image data
        elif marker == 0xC4:
            _read_huffman(body, zero_codes)
        elif marker == 0xDD and length >= 4:
            info.restart = int.from_bytes(body[:2], "big")
        elif marker == 0xDA:
            if not info.sampling:
                raise _corrupt(path, f"image data starts at byte {i:,} before the image size is given")
            start = i + 2 + length
            stop = _scan_end(buf, start)
            if stop >= n - 1 or int(buf[stop + 1]) not in _AFTER_SCAN:
                at = stop if stop < n - 1 else n
                raise _corrupt(
                    path, f"stray bytes in the compressed image data at byte {at:,} ({_percent(at, start, n)})"
                )
            info.scans.append((start, stop))
            _check_scan(path, info, buf, start, stop, body, zero_codes)
            i = stop
            continue
        i += 2 + length
    if not info.scans:
        raise _corrupt(path, "the JPEG holds no image data")
    _check_size(path, info, stored=sum(b - a for a, b in info.scans))
    end = info.scans[-1][1]
    while end > info.scans[-1][0] and buf[end - 1] == 0xFF:
        end -= 1  # fill bytes before the marker
    info.data_end = end
    return info


def _read_frame(path: Path, info: JpegInfo, marker: int, body: bytes) -> None:
    if len(body) < 6:
        raise _corrupt(path, "the JPEG frame header is cut short")
    info.height, info.width = struct.unpack(">HH", body[1:5])
    ncomp = body[5]
    comps = body[6 : 6 + 3 * ncomp]
    info.ids = [comps[3 * k] for k in range(len(comps) // 3)]
    info.sampling = [(comps[3 * k + 1] >> 4, comps[3 * k + 1] & 15) for k in range(len(comps) // 3)]
    if not info.sampling or any(h < 1 or v < 1 for h, v in info.sampling):
        raise _corrupt(path, "the JPEG frame header has invalid sampling factors")
    info.baseline = marker in (0xC0, 0xC1)
    info.arithmetic = marker >= 0xC9


def _read_huffman(body: bytes, zero_codes: dict[int, int]) -> None:
    k = 0
    while k + 17 <= len(body):
        tc_th = body[k]
        counts = body[k + 1 : k + 17]
        total = sum(counts)
        symbols = body[k + 17 : k + 17 + total]
        if tc_th >> 4 == 1 and symbols:
            # Canonical codes: the first symbol gets the all-zero code of its length.
            zero_codes[tc_th & 15] = symbols[0]
        k += 17 + total


def _scan_end(buf: np.ndarray, start: int) -> int:
    """Offset of the first marker after ``start`` that is not a stuffed 0xFF or an RST."""
    pos = start
    while True:
        chunk = buf[pos : pos + (1 << 22)]
        ff = np.flatnonzero(chunk[:-1] == 0xFF)
        following = chunk[ff + 1]
        real = ff[(following != 0) & ((following < 0xD0) | (following > 0xD7)) & (following != 0xFF)]
        if len(real):
            return pos + int(real[0])
        if pos + len(chunk) >= len(buf):
            return len(buf) - 1
        pos += len(chunk) - 1


def _check_scan(path, info, buf, start, stop, sos, zero_codes) -> None:
    seg = buf[start:stop]
    ff = np.flatnonzero(seg[:-1] == 0xFF)
    following = seg[ff + 1]
    is_rst = (following >= 0xD0) & (following <= 0xD7)
    rst = ff[is_rst]
    info.rst = rst + start
    order = following[is_rst] - 0xD0
    expected = np.arange(len(order)) % 8
    if len(order) and (order != expected).any():
        at = start + int(rst[np.flatnonzero(order != expected)[0]])
        raise _corrupt(path, f"restart markers are out of order at byte {at:,} ({_percent(at, start, len(buf))})")
    ns = sos[0] if sos else 0
    if info.restart and info.height and ns:
        units = _scan_units(info, sos)
        want = math.ceil(units / info.restart) - 1
        if len(rst) != want:
            raise _corrupt(
                path,
                f"the compressed data has {len(rst):,} restart markers where its size needs {want:,} "
                f"(about {abs(want - len(rst)) / max(want, 1):.0%} of the image is missing or misplaced)",
            )
    ac_tables = {sos[2 + 2 * k] & 15 for k in range(ns) if 2 + 2 * k < len(sos)}
    # Every MCU holds a block of each component of the scan, so one table that does not
    # code end-of-block as all zero bits makes long zero runs impossible.
    if info.baseline and any(zero_codes.get(t, 0) != 0 for t in ac_tables):
        run = _zero_runs(seg)
        if run is not None:
            at = start + run
            raise _corrupt(
                path, f"a run of zero bytes replaces the image data at byte {at:,} ({_percent(at, start, len(buf))})"
            )


def _scan_units(info: JpegInfo, sos: bytes) -> int:
    """MCUs in an interleaved scan, blocks of the component in a single-component one."""
    ns = sos[0]
    if ns > 1 or len(info.sampling) == 1:
        rows, cols = info.mcu
        return rows * cols
    hmax = max(h for h, _ in info.sampling)
    vmax = max(v for _, v in info.sampling)
    k = info.ids.index(sos[1]) if sos[1] in info.ids else 0
    h, v = info.sampling[k]
    return math.ceil(math.ceil(info.width * h / hmax) / 8) * math.ceil(math.ceil(info.height * v / vmax) / 8)


def _zero_runs(seg: np.ndarray) -> int | None:
    """Offset of the first run of ``_ZERO_RUN`` zero bytes, or None.

    Only called when some AC table codes a -1 coefficient, not end-of-block, as all zero
    bits: zero bits then decode as blocks full of -1 coefficients, which no image has.
    """
    # Any such run covers a multiple of _ZERO_RUN // 2: look only around those.
    step = _ZERO_RUN // 2
    for p in np.flatnonzero(seg[::step] == 0) * step:
        lo, hi = max(0, p - _ZERO_RUN), min(len(seg), p + _ZERO_RUN)
        zero = np.concatenate(([False], seg[lo:hi] == 0, [False]))
        edges = np.flatnonzero(np.diff(zero.astype(np.int8)))
        starts, stops = edges[0::2], edges[1::2]
        long = np.flatnonzero(stops - starts >= _ZERO_RUN)
        if len(long):
            return int(lo + starts[long[0]])
    return None


def _check_size(path: Path, info: JpegInfo, stored: int) -> None:
    ncomp = len(info.sampling)
    hmax = max(h for h, _ in info.sampling)
    vmax = max(v for _, v in info.sampling)
    blocks = sum(h * v for h, v in info.sampling)
    # Each block costs at least one bit (its DC code), so an MCU of 64*hmax*vmax px per
    # component takes at least `blocks` bits; arithmetic coding has no such floor.
    max_ratio = None if info.arithmetic else 1.1 * 512 * hmax * vmax * ncomp / blocks
    px = info.width * info.height
    check_claim(
        path,
        f"{ncomp}-channel JPEG",
        (info.height, info.width),
        stored_bytes=stored,
        raw_bytes=px * ncomp,
        max_ratio=max_ratio,
        peak_bytes=px * (ncomp + 3),
    )


def _percent(at: int, start: int, n: int) -> str:
    return f"{(at - start) / max(n - start, 1):.0%} into the image data"


class _CappedFile(io.FileIO):
    """Reads stop at ``cap`` once ``armed``, until the reader asks again: tells whether
    a decoder finished before it got there."""

    def __init__(self, path: Path, cap: int) -> None:
        super().__init__(path, "rb")
        self.cap = cap
        self.armed = False
        self.crossed = False

    def read(self, size: int = -1) -> bytes:  # type: ignore[override]
        pos = self.tell()
        if self.armed and pos < self.cap:
            size = self.cap - pos if size is None or size < 0 else min(size, self.cap - pos)
        elif self.armed:
            self.crossed = True
        return super().read(size)


def verify_jpeg(path: Path, info: JpegInfo) -> tuple[np.ndarray, str]:
    """Decode ``path`` at 1/8 scale and check that the compressed data ended where the
    image did; returns (pixels, Pillow mode)."""
    from PIL import Image

    from napari_m2ort.slide import pillow_unlimited

    with _CappedFile(path, max(info.scans[-1][0], info.data_end - _END_SLACK)) as fp:
        with pillow_unlimited():
            im = Image.open(fp)
        with im:
            target = "L" if im.mode == "L" else "RGB"
            im.draft(target, (max(1, info.width // 8), max(1, info.height // 8)))
            fp.armed = True
            im.load()
            mode = im.mode
            small = np.asarray(im)
        if not fp.crossed:
            raise _corrupt(path, "its compressed image data ends early, followed by bytes that are not image data")
    if info.baseline and len(info.scans) == 1:
        _check_grey_ends(path, info, small)
    return small, mode


def _check_grey_ends(path: Path, info: JpegInfo, small: np.ndarray) -> None:
    """libjpeg fills the blocks it had no data for with exact mid-grey (all coefficients
    zero). For each restart interval (or the whole scan) ending in such grey, put 1-bits
    where its data ends and decode again: if the grey run changes, the decoder did run
    out of data there; real grey image content stays as it was."""
    rows, cols = info.mcu
    total = rows * cols
    if not total:
        return  # height given later in the file (DNL): nothing to locate blocks by
    hmax = max(h for h, _ in info.sampling)
    vmax = max(v for _, v in info.sampling)
    ys = np.minimum(np.arange(rows) * vmax, small.shape[0] - 1)
    xs = np.minimum(np.arange(cols) * hmax, small.shape[1] - 1)
    grey = (small[ys][:, xs].reshape(total, -1) == 128).all(axis=1)  # one pixel per MCU
    every = info.restart or total
    ends = np.minimum(np.arange(every, total + every, every), total) - 1
    suspects = np.flatnonzero(grey[ends])
    if not len(suspects):
        return
    index = np.arange(total)
    run_start = np.maximum.accumulate(np.where(grey, -1, index)) + 1  # first MCU of each grey run
    firsts = np.maximum(run_start[ends[suspects]], suspects * every)
    other = _decode_padded(path, info, suspects, small.shape)
    if other is None:
        damaged = len(suspects)
    else:
        fy, fx = ys[firsts // cols], xs[firsts % cols]
        damaged = int((small[fy, fx] != other[fy, fx]).reshape(len(firsts), -1).any(axis=1).sum())
    if damaged:
        lost = int(np.minimum(ends[suspects] + 1 - firsts, every).sum()) / total
        raise _corrupt(
            path,
            f"its compressed data ends too early in {damaged:,} of {len(ends):,} place(s), and "
            f"libjpeg fills the rest with flat grey ('premature end of data'; about {lost:.0%} of the image)",
        )


def _decode_padded(path: Path, info: JpegInfo, suspects: np.ndarray, shape: tuple) -> np.ndarray | None:
    """The 1/8-scale decode with 1-bits inserted where the ``suspects`` intervals end."""
    from PIL import Image

    from napari_m2ort.slide import pillow_unlimited

    data = path.read_bytes()
    bounds = [int(b) for b in info.rst] + [info.data_end]
    pad = b"\xff\x00" * 8192  # stuffed 0xFF: one-bits, enough for hundreds of MCUs
    pieces, prev = [], 0
    for k in suspects:
        cut = bounds[min(int(k), len(bounds) - 1)]
        pieces += [data[prev:cut], pad]
        prev = cut
    pieces.append(data[prev:])
    try:
        with pillow_unlimited():
            im = Image.open(io.BytesIO(b"".join(pieces)))
        with im:
            im.draft("L" if im.mode == "L" else "RGB", (max(1, info.width // 8), max(1, info.height // 8)))
            other = np.asarray(im)
    except Exception:
        return None
    return other if other.shape == shape else None


# ------------------------------------------------------------------------------ PNG


def check_png(path: Path) -> None:
    """Check the size IHDR claims (first, from the header alone), then walk every chunk
    for truncation and CRC errors, reading the file once in pieces."""
    n = path.stat().st_size
    with open(path, "rb") as fh:
        fh.seek(8)
        i, ended = 8, False
        while i + 8 <= n:
            length, kind = struct.unpack(">I4s", fh.read(8))
            name = kind.decode("latin-1")
            if i + 12 + length > n:
                raise _corrupt(path, f"its {name} chunk at byte {i:,} runs past the end of the file")
            crc, left, head = zlib.crc32(kind), length, b""
            while left:
                piece = fh.read(min(left, 1 << 20))
                crc = zlib.crc32(piece, crc)
                head = head or piece[:13]
                left -= len(piece)
            if struct.unpack(">I", fh.read(4))[0] != crc:
                raise _corrupt(
                    path, f"the checksum of its {name} chunk at byte {i:,} does not match ({_percent(i, 8, n)})"
                )
            if i == 8:
                if kind != b"IHDR" or len(head) < 13:
                    raise _corrupt(path, "its PNG header chunk is missing")
                _check_png_size(path, head, n)
            if kind == b"IEND":
                ended = True
                break
            i += 12 + length
    if not ended:
        raise _corrupt(path, "its PNG chunks end without the IEND chunk")


def _check_png_size(path: Path, ihdr: bytes, file_size: int) -> None:
    width, height, depth, color = struct.unpack(">IIBB", ihdr[:10])
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}.get(color, 4)
    raw = height * (math.ceil(width * depth * channels / 8) + 1)
    # Pillow's buffer (up to 4 B/px), a numpy copy, RGB out and the pyramid; 16-bit and
    # alpha data also go through wider temporaries.
    extra = 12 if depth > 8 or channels in (2, 4) else 0
    check_claim(
        path,
        f"{channels}-channel {depth}-bit PNG",
        (height, width),
        stored_bytes=file_size,
        raw_bytes=raw,
        max_ratio=1100.0,  # deflate's limit is 1032:1
        peak_bytes=width * height * (4 + channels * max(depth, 8) // 8 + 3 + 1 + extra),
    )
