#!/usr/bin/env bash
# Run orcd's CUDA tests on the GPU machine (docs/gpu-testing.md).
#
#   scripts/gpu-test.sh [extra pytest paths or options...]
#
# 1. Wheels the machine lacks, carried in .whl/ (gguf, pydantic, fastapi,
#    uvicorn, nvmath-python, ...), go into $ORCD_GPU_SITE (default /tmp/site),
#    prepended to PYTHONPATH. Wheels in .whl/opt/ are installed only where the
#    machine's own copy is missing or older (cuda-core, cuda-pathfinder).
# 2. The project and its plugins are installed editable, without deps and
#    without build isolation (the machine has no index to fetch from).
# 3. pytest runs the tests marked `cuda` under tests/cuda, plus any arguments.
set -euo pipefail
cd "$(dirname "$0")/.."
SITE=${ORCD_GPU_SITE:-/tmp/site}
PIP="python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir"

if compgen -G ".whl/*.whl" >/dev/null; then
  $PIP --upgrade --target "$SITE" .whl/*.whl
fi
if compgen -G ".whl/opt/*.whl" >/dev/null; then
  for whl in .whl/opt/*.whl; do
    if python3 - "$whl" <<'PY'
import sys
from importlib import metadata
from pathlib import Path
from packaging.version import Version
name, version = Path(sys.argv[1]).name.split("-")[:2]
try:
    have = Version(metadata.version(name.replace("_", "-")))
except metadata.PackageNotFoundError:
    sys.exit(0)
sys.exit(0 if have < Version(version) else 1)
PY
    then $PIP --upgrade --target "$SITE" "$whl"; fi
  done
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"

python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null
for p in plugins/*/; do
  [ -f "$p/pyproject.toml" ] && { python3 -m pip install -q --no-deps --no-build-isolation -e "$p" >/dev/null || echo "warning: could not install $p" >&2; }
done

python3 - <<'PY'
from importlib import metadata
for n in ("cuda-bindings", "cuda-core", "cuda-pathfinder", "nvmath-python", "cupy-cuda13x", "numpy"):
    try:
        print(f"{n} {metadata.version(n)}", end="; ")
    except metadata.PackageNotFoundError:
        print(f"{n} MISSING", end="; ")
print()
PY
exec python3 -m pytest -q -m cuda tests/cuda "$@"
