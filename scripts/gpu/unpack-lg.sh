# Unpacks the load-generator binaries that travel xz-compressed in .gpu-lg/ into $BIN (sourced by
# the loadgen benchmarks run on the lent host; it has no xz, so Python's lzma unpacks them).
BIN=/tmp/lg-bin && mkdir -p $BIN
for f in .gpu-lg/*.xz; do
  python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],'wb'))" "$f" "$BIN/$(basename "$f" .xz)"
  chmod +x "$BIN/$(basename "$f" .xz)"
done
