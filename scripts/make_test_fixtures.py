"""Regenerate tests/data from the full data folder (../shared/data by default).

Every file is copied byte for byte: the tests assert on whole sections (B4's 283 spots x
15,289 genes, spot pixels in the full image frame), so nothing can be cut, and re-encoding
the JPEGs saves under 10 %. Section C2 is not copied: it ships in the package
(src/napari_m2ort/data/her2st_C2) and tests/conftest.py links it into the her2st fixture.

    .venv/bin/python scripts/make_test_fixtures.py [SOURCE]          # copy
    .venv/bin/python scripts/make_test_fixtures.py [SOURCE] --check  # compare only
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parents[1] / "tests" / "data"  # where the fixtures live
DEFAULT_SOURCE = HERE.parents[2] / "shared" / "data"

FILES = [
    # openslide-python test slides (LGPL-2.1)
    "slide_fixtures/COPYING.LESSER",
    "slide_fixtures/boxes.tiff",
    "slide_fixtures/small.svs",
    "slide_fixtures/unopenable.tiff",
    "slide_fixtures/unreadable.svs",
    # scanpy's Visium test data (BSD-3)
    "visium_spaceranger/LICENSE-scanpy",
    "visium_spaceranger/filtered_feature_bc_matrix.h5",
    "visium_spaceranger/spatial/scalefactors_json.json",
    "visium_spaceranger/spatial/tissue_hires_image.png",
    "visium_spaceranger/spatial/tissue_lowres_image.png",
    "visium_spaceranger/spatial/tissue_positions_list.csv",
    # squidpy's test AnnData + image (BSD-3)
    "squidpy_mouse_brain/LICENSE-squidpy",
    "squidpy_mouse_brain/test_data.h5ad",
    "squidpy_mouse_brain/test_img.jpg",
    # HER2+ (Andersson et al. 2021, CC BY 4.0): B4 whole (test_st, test_targets), C3 image only
    # (crops in test_convert, test_distributed)
    "her2st/ST-cnts/B4.tsv.gz",
    "her2st/ST-spotfiles/B4_selection.tsv",
    "her2st/ST-imgs/B/B4/BT10737_D2_HE.jpg",
    "her2st/ST-imgs/C/C3/5714_HE_BT_D1.jpg",
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source", nargs="?", type=Path, default=DEFAULT_SOURCE)
    p.add_argument("--check", action="store_true", help="only report files that differ from SOURCE")
    args = p.parse_args(argv)
    differ = []
    for rel in FILES:
        src, dst = args.source / rel, HERE / rel
        if args.check:
            if not (dst.is_file() and filecmp.cmp(src, dst, shallow=False)):
                differ.append(rel)
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        print(f"{dst.stat().st_size:>10,d}  {rel}")
    for rel in differ:
        print(f"differs: {rel}", file=sys.stderr)
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
