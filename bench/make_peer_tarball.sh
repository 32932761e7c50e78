#!/usr/bin/env bash
# Make bench/peer/llama.cpp.tar.gz (~8 MB, ignored by git): the llama.cpp tree
# vendored in the llama-cpp-python sdist, pruned to what llama-bench needs, small
# enough to travel to the GPU machine. Run on the development machine.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$tmp"
tar xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp" --wildcards '*/vendor/llama.cpp/*'
src=$(echo "$tmp"/llama_cpp_python-*/vendor)
( cd "$src/llama.cpp" && rm -rf models docs media tests examples pocs benches .github .devops \
    tools/ui tools/server tools/cli )
mkdir -p bench/peer
tar czf bench/peer/llama.cpp.tar.gz -C "$src" llama.cpp
ls -l bench/peer/llama.cpp.tar.gz
