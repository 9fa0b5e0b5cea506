# Shared set-up for the scripts run on the lent GPU machine (sourced, not run).
# Binaries are built on the CPU machine and travel gzip- or xz-compressed in .gpu/bin (64 MiB carry
# limit; xz is unpacked with Python's lzma, the device has no xz); the model travels as f16 safetensors in .gpu/minilm and is linked to the path that
# scripts/fetch-minilm.sh uses, so profiles written there name the same path as on a user's host.
B=/tmp/bt-bin
mkdir -p $B && for f in .gpu/bin/*.gz .gpu/bin/*.xz; do
  [ -e "$f" ] || continue
  n=$(basename "${f%.*}")
  [ -x "$B/$n" ] && continue
  case "$f" in
    *.gz) gunzip -c "$f" > "$B/$n" ;;
    *.xz) python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],'wb'))" "$f" "$B/$n" ;;
  esac
  chmod +x "$B/$n"
done
mkdir -p models && [ -e models/all-MiniLM-L6-v2 ] || ln -s ../.gpu/minilm models/all-MiniLM-L6-v2
M=models/all-MiniLM-L6-v2
# wait_up URL [PID]: until URL/health answers; with PID, gives up as soon as that process has exited
# (a server refusing its profile exits at once, and waiting out the loop cost a device call 500 s).
wait_up() { for _ in $(seq 1 600); do [ -z "${2:-}" ] || kill -0 "$2" 2>/dev/null || return 1; python3 -c "import urllib.request,sys; urllib.request.urlopen(sys.argv[1] + '/health', timeout=1)" "$1" 2>/dev/null && return 0; sleep 0.2; done; return 1; }
# A profile for this GPU from any profile: model, device and dtype replaced, rate limit off.
gpu_profile() { # src dst
  sed -n '/^\[provenance\]/q;p' "$1" | grep -v -E '^(model|devices|dtype|rate_limit) *=' > "$2"
  printf 'model = "%s"\ndevices = ["cuda:0"]\ndtype = "f16"\nrate_limit = 0.0\n' "$M" >> "$2"
}
