#!/bin/bash
# Device session driver: bench, then a queue of CV / training jobs until the deadline.
# How the H200 runs of 2026-11-30 were made (benchmarks/results/gpu_cv.md). It ran in a
# copy of the repository on a machine without internet: .whl/ held wheels of the packages
# that machine lacked (anndata, dask, zarr and their needs), .gpu/extra/ the her2st files
# that are not in tests/data. OUT is the folder whose files came back.
set -u
T0=$(date +%s); DEADLINE=$((T0 + ${BUDGET:-530}))
PY=${PY:-python3}; DEV=${DEV:-cuda}; JOBS=${JOBS:-benchmarks/gpu/jobs.txt}; P=${P:-16}
if [ -z "${NOPIP:-}" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
  export PYTHONPATH=/tmp/site:$PWD/src
else
  export PYTHONPATH=$PWD/src
fi
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
D=/tmp/her2st; R=/tmp/R; rm -rf $D $R; mkdir -p $D/ST-cnts $D/ST-imgs/C/C2 $D/ST-imgs/C/C3 $D/ST-imgs/B $D/ST-spotfiles $R/logs
cp -r .gpu/extra/* $D/
cp tests/data/her2st/ST-cnts/B4.tsv.gz src/napari_m2ort/data/her2st_C2/C2.tsv.gz $D/ST-cnts/
cp -r tests/data/her2st/ST-imgs/B/B4 $D/ST-imgs/B/
cp tests/data/her2st/ST-imgs/C/C3/*.jpg $D/ST-imgs/C/C3/
cp src/napari_m2ort/data/her2st_C2/5714_HE_BT_C2.jpg $D/ST-imgs/C/C2/
cp tests/data/her2st/ST-spotfiles/B4_selection.tsv $D/ST-spotfiles/
find $D -type f | sort > $OUT/env.txt
nproc >> $OUT/env.txt; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> $OUT/env.txt 2>&1
$PY -c "import napari_m2ort,torch,timm,tifffile,anndata,dask,zarr,numpy;print('torch',torch.__version__,'timm',timm.__version__,'tifffile',tifffile.__version__,'anndata',anndata.__version__,'numpy',numpy.__version__, torch.cuda.is_available())" >> $OUT/env.txt 2>&1
$PY -c "import napari_m2ort; from napari_m2ort.io.st import read_her2st; s=read_her2st('$D','C4'); print('read ok', s.adata.shape)" >> $OUT/env.txt 2>&1 || { cat $OUT/env.txt; exit 4; }
cat $OUT/env.txt | tail -4
if [ "$DEV" = cuda ] && [ -z "${NOBENCH:-}" ]; then
  timeout 120 $PY benchmarks/bench_model.py --device cuda --no-compile --repeats 3 --out $OUT/model_cuda.md > $R/logs/bench_model.log 2>&1
  echo "bench rc $? at $(( $(date +%s) - T0 )) s"; tail -3 $R/logs/bench_model.log
fi
snap() { tar cf $OUT/r.tmp -C /tmp --exclude='*.safetensors' R 2>/dev/null && mv $OUT/r.tmp $OUT/results.tar; }
( while sleep 20; do snap; done ) & SNAP=$!
export D R DEV PY DEADLINE
# each line: name|python args; %DATA% %RES% %DEV% are substituted
grep -v '^#' $JOBS | grep -v '^\s*$' | xargs -P $P -d '\n' -n 1 bash -c '
  line="$1"; name=${line%%|*}; args=${line#*|}
  args=${args//%DATA%/$D}; args=${args//%RES%/$R}; args=${args//%DEV%/$DEV}
  left=$(( DEADLINE - $(date +%s) ))
  [ $left -lt 40 ] && { echo "skip $name"; exit 0; }
  s=$(date +%s); timeout $left $PY $args > $R/logs/$name.log 2>&1; rc=$?
  echo "$name rc=$rc $(( $(date +%s) - s )) s"
' _
kill $SNAP 2>/dev/null
echo "queue done at $(( $(date +%s) - T0 )) s"
for f in $R/bundled_*/model.safetensors; do
  [ -f "$f" ] || continue
  n=$(basename $(dirname $f))
  $PY -c "
import sys, torch, napari_m2ort
from napari_m2ort.model.weights import load_checkpoint, save_checkpoint
m, c = load_checkpoint(sys.argv[1]); save_checkpoint(m, c, sys.argv[2], dtype=torch.float16); print('fp16', sys.argv[2])
" "$f" "$OUT/$n.safetensors"
done
snap
ls -la $OUT
echo "total $(( $(date +%s) - T0 )) s"
