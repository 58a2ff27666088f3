# Which torch build to install and where pip gets it: sourced by setup.sh and
# check_torch_resolution.sh, so both decide the same way. Run from the repository root.
#
# M2ORT_TORCH        auto (default): the CUDA build where nvidia-smi sees a GPU, else CPU;
#                    cpu | cuda: that build; skip: leave torch alone (install it yourself).
# M2ORT_TORCH_INDEX  the index to take torch from, e.g. https://download.pytorch.org/whl/cu128
#                    for one CUDA version, or a mirror of the CPU index. Default: PyTorch's
#                    CPU index for the CPU build (PyPI's Linux wheels are CUDA builds that
#                    pull ~3 GB of nvidia-* packages), pip's configured indexes for CUDA.
#
# Where the default CPU index cannot be reached (a machine that sees only its own package
# index), pip's configured indexes are used instead; they are fine when they offer a CPU
# wheel (e.g. in a --find-links folder), and check_torch_resolution.sh says if they do not.

M2ORT_CPU_INDEX=https://download.pytorch.org/whl/cpu

# Machines that ship wheels in /opt/wheels (this project's build machines) read them too.
FIND_LINKS=""
if [ -d /opt/wheels ] && [[ "${PIP_FIND_LINKS:-}" != *"/opt/wheels"* ]]; then
  FIND_LINKS="--find-links /opt/wheels"
fi

# The version constraints.txt pins for package $1.
m2ort_pin() {
  sed -n "s/^$1==\([^ ;#]*\).*/\1/p" constraints.txt | head -n 1
}

# cpu | cuda | skip, from M2ORT_TORCH.
m2ort_torch_mode() {
  case "${M2ORT_TORCH:-auto}" in
    cpu | cuda | skip) echo "$M2ORT_TORCH" ;;
    auto)
      if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        echo cuda
      else
        echo cpu
      fi
      ;;
    *)
      echo "M2ORT_TORCH=$M2ORT_TORCH: use auto, cpu, cuda or skip." >&2
      return 2
      ;;
  esac
}

# Whether python $1 can reach package index $2 (a few seconds at most).
m2ort_index_reachable() {
  "$1" - "$2" <<'EOF'
import sys
import urllib.request

url = sys.argv[1].rstrip("/") + "/torch/"
try:
    urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=5)
except Exception:
    sys.exit(1)
EOF
}

# Sets TORCH_REQS (requirements), TORCH_PIP_ARGS (index options) and TORCH_SOURCE (words)
# for build $2 (cpu | cuda), probing indexes with python $1. Returns 1 when an index
# given in M2ORT_TORCH_INDEX cannot be reached.
m2ort_torch_plan() {
  local py=$1 mode=$2 idx=${M2ORT_TORCH_INDEX:-}
  TORCH_REQS=("torch==$(m2ort_pin torch)" "torchvision==$(m2ort_pin torchvision)")
  TORCH_PIP_ARGS=()
  TORCH_SOURCE="pip's configured indexes"
  if [ -n "$idx" ]; then
    if ! m2ort_index_reachable "$py" "$idx"; then
      echo "M2ORT_TORCH_INDEX=$idx cannot be reached from this machine." >&2
      return 1
    fi
    TORCH_PIP_ARGS=(--index-url "$idx")
    TORCH_SOURCE=$idx
  elif [ "$mode" = cpu ] && [ "$(uname -s)" != Darwin ]; then # macOS wheels are CPU builds anyway
    if m2ort_index_reachable "$py" "$M2ORT_CPU_INDEX"; then
      TORCH_PIP_ARGS=(--index-url "$M2ORT_CPU_INDEX")
      TORCH_SOURCE=$M2ORT_CPU_INDEX
    else
      TORCH_SOURCE="pip's configured indexes ($M2ORT_CPU_INDEX cannot be reached from here)"
    fi
  fi
}

# "VERSION BUILD" of the torch installed for python $1 (BUILD: cpu, cuda or rocm), or
# nothing; read from the package metadata, without importing torch.
m2ort_installed_torch() {
  "$1" - <<'EOF' 2>/dev/null || true
from importlib import metadata

try:
    version = metadata.version("torch")
except metadata.PackageNotFoundError:
    raise SystemExit(0)
needs = [r.lower() for r in (metadata.requires("torch") or [])]
if "+rocm" in version:
    build = "rocm"
elif "+cu" in version or any(r.startswith("nvidia-") for r in needs):
    build = "cuda"
else:
    build = "cpu"
print(version, build)
EOF
}
