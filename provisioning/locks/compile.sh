#!/bin/sh
# Regenerate the locks from pyproject.toml (`make lock`). One source of truth per set:
#   runtime.txt  what the device runs and the signed stick carries: universal (x86_64 and aarch64,
#                CPython 3.10+; rows fork by marker where a package dropped an old Python)
#   dev.txt      build + dev extras for the build host and CI: x86_64 Linux, CPython 3.11, torch the
#                CPU wheel from /opt/wheels; runtime packages constrained to runtime.txt's versions
#   bench.txt    dev.txt plus the bench extra (onnxruntime-genai), constrained to dev.txt
#   pip.txt      the pip that installs the others
set -eu
cd "$(dirname "$0")/../.."
UV=${UV:-uv}
OUT=provisioning/locks
HOST="--python-version 3.11 --python-platform x86_64-manylinux_2_28 --find-links /opt/wheels"
$UV pip compile -q --generate-hashes --universal --python-version 3.10 pyproject.toml -o $OUT/runtime.txt
$UV pip compile -q --generate-hashes $HOST --extra build --extra dev -c $OUT/runtime.txt pyproject.toml -o $OUT/dev.txt
$UV pip compile -q --generate-hashes $HOST --extra build --extra dev --extra bench -c $OUT/dev.txt pyproject.toml \
    -o $OUT/bench.txt
printf 'pip==26.3\n' | $UV pip compile -q --generate-hashes - -o $OUT/pip.txt
