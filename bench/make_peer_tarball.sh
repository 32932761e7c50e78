#!/usr/bin/env bash
# Make bench/peer/llama.cpp.tar.gz (~8 MB, ignored by git): the llama.cpp tree
# vendored in the llama-cpp-python sdist, pruned to what llama-bench and
# llama-server need, small enough to travel to the GPU machine. Run on the
# development machine.
#
# llama-server (bench/load.py's peer) builds from tools/server, which links
# tools/ui's embedded web UI library; tools/cli is added with the server by
# tools/CMakeLists.txt. The UI is built without assets
# (-DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF, as bench/compare.py does:
# the GPU machine has no network), so of tools/ui only the CMake files and the
# two templates it generates ui.cpp / ui.h from are kept, not its web sources.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$tmp"
tar xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp" --wildcards '*/vendor/llama.cpp/*'
src=$(echo "$tmp"/llama_cpp_python-*/vendor)
( cd "$src/llama.cpp" && rm -rf models docs media tests examples pocs benches .github .devops \
    tools/server/tests tools/server/bench tools/server/README*.md \
    && cd tools/ui && find . -mindepth 1 -maxdepth 1 \
        ! -name CMakeLists.txt ! -name sources.cmake ! -name ui.cpp.in ! -name ui.h.in \
        -exec rm -rf {} + )
mkdir -p bench/peer
tar czf bench/peer/llama.cpp.tar.gz -C "$src" llama.cpp
ls -l bench/peer/llama.cpp.tar.gz
