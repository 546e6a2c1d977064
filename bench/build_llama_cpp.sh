#!/bin/sh
# llama.cpp, the peer bench/quality.py measures against, built from the llama-cpp-python sdist's vendored copy
# (the registry's only source of it): llama-quantize, llama-perplexity, llama-bench, llama-tokenize and llama-server
# (bench/speculative.py's peer) into $1/bin.
# Pinned by version and sha256; ~10 min on 2 cores, once.
set -eu
OUT=${1:-build/llama.cpp}
VERSION=0.3.36
SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
PY=${PY:-.venv/bin/python}
if [ -x "$OUT/bin/llama-perplexity" ] && [ -x "$OUT/bin/llama-server" ]; then exit 0; fi
mkdir -p "$OUT/src"
[ -f "$OUT/src/llama_cpp_python-$VERSION.tar.gz" ] || "$PY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$OUT/src"
echo "$SHA256  $OUT/src/llama_cpp_python-$VERSION.tar.gz" | sha256sum -c -
tar xzf "$OUT/src/llama_cpp_python-$VERSION.tar.gz" -C "$OUT/src"
SRC="$OUT/src/llama_cpp_python-$VERSION/vendor/llama.cpp"
cmake -S "$SRC" -B "$OUT/cmake" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=ON -DCMAKE_RUNTIME_OUTPUT_DIRECTORY="$(pwd)/$OUT/bin" \
    -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$(pwd)/$OUT/bin" > "$OUT/cmake.log"
cmake --build "$OUT/cmake" -j"$(nproc)" --target llama-perplexity llama-quantize llama-bench llama-tokenize llama-server >> "$OUT/cmake.log"
# Newer vendored trees set their own output directory (cmake/bin): collect what was built into $OUT/bin.
mkdir -p "$OUT/bin"
for f in "$OUT"/cmake/bin/*; do [ -e "$OUT/bin/$(basename "$f")" ] || cp -a "$f" "$OUT/bin/"; done
