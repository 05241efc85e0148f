#!/usr/bin/env bash
# Generates the Python stubs of every proto into libs/stubs (the `tokensend` package).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=libs/stubs
rm -rf "$OUT/tokensend"
mkdir -p "$OUT"
mapfile -t protos < <(find protos -name '*.proto' | sort)
# The descriptor set keeps the protos' comments for server reflection (libs/reflection.py).
"$PY" -m grpc_tools.protoc -I protos \
  --python_out="$OUT" --pyi_out="$OUT" --grpc_python_out="$OUT" \
  --descriptor_set_out="$OUT/tokensend/descriptors.binpb" --include_source_info --include_imports "${protos[@]}"
# Regular packages, so the editable install can map `tokensend` to this folder.
find "$OUT/tokensend" -type d -exec touch {}/__init__.py \;
