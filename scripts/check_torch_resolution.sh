#!/usr/bin/env bash
# CI check: the CPU set-up must not pull CUDA. Asks pip, in a dry run that installs nothing
# and ignores what is installed, which torch and torchvision the CPU branch of setup.sh
# would install (same index choice, via _torch.sh, same constraints.txt), and fails if
# that build would bring any nvidia-*, cuda-* or triton package onto this platform.
#
# Resolving torch and torchvision is enough: the CUDA packages arrive only as torch's
# dependencies, and setup.sh installs the rest of the package with that torch already in
# place and pinned by constraints.txt, so the rest cannot swap the build. Their
# dependencies are read from the chosen wheels' metadata (--no-deps keeps it to a few
# seconds). Exit status: 0 fine, 1 CUDA packages would be installed, 2 pip failed.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_torch.sh

PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3

m2ort_torch_plan "$PY" cpu || exit 2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if ! "$PY" -m pip install --dry-run --ignore-installed --no-deps --quiet --report "$tmp/report.json" \
  $FIND_LINKS ${TORCH_PIP_ARGS[@]+"${TORCH_PIP_ARGS[@]}"} -c constraints.txt "${TORCH_REQS[@]}" \
  >"$tmp/pip.log" 2>&1; then
  grep -v "is ignored: it is neither a file nor a directory" "$tmp/pip.log" >&2
  echo "FAIL: pip could not resolve ${TORCH_REQS[*]} from $TORCH_SOURCE (log above)." >&2
  exit 2
fi

"$PY" - "$tmp/report.json" "$TORCH_SOURCE" <<'EOF'
import json
import sys

try:
    from packaging.requirements import Requirement
except ImportError:  # a bare interpreter: pip carries its own copy
    from pip._vendor.packaging.requirements import Requirement

CUDA_PREFIXES = ("nvidia-", "cuda-")  # nvidia-cudnn-cu13, cuda-toolkit, cuda-bindings, ...
report, source = json.load(open(sys.argv[1])), sys.argv[2]
chosen, cuda = [], []
for item in report["install"]:
    meta = item["metadata"]
    name, version = meta["name"], meta["version"]
    chosen.append(f"{name} {version}")
    if "+cu" in version or "+rocm" in version:
        cuda.append(f"{name} {version} itself")
    for text in meta.get("requires_dist") or []:
        req = Requirement(text)
        if (req.name.lower().startswith(CUDA_PREFIXES) or req.name.lower() == "triton") and (
            req.marker is None or req.marker.evaluate({"extra": ""})
        ):
            cuda.append(f"{req.name} (for {name})")
if cuda:
    print(
        f"FAIL: on a CPU machine setup.sh would install the CUDA build of torch ({', '.join(chosen)} "
        f"from {source}), which brings {len(cuda)} CUDA packages: {', '.join(cuda)}.\n"
        "Make https://download.pytorch.org/whl/cpu reachable, set M2ORT_TORCH_INDEX to a mirror of "
        "it, or put the CPU wheel of torch in a pip --find-links folder.",
        file=sys.stderr,
    )
    sys.exit(1)
print(f"OK: the CPU set-up resolves {', '.join(chosen)} from {source}; no nvidia-*, cuda-* or triton package.")
EOF
