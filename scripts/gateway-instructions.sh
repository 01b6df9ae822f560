#!/usr/bin/env bash
# Instructions per request through the Sluice gateway, counted by
# valgrind's callgrind: the same figure for the same binary and load
# whatever else the machine is doing, so a change to the hot path can be
# measured on a noisy VM where wall-clock A/B runs drift by more than the
# change. The gateway (validator + miner + ledger threads of
# `sluice bench sluice-gateway`) runs under callgrind in front of
# `sluice bench mock-upstream`; wrk drives chat completions for a warm-up,
# the counters are zeroed, then wrk runs again and the counters are dumped.
#
#   scripts/gateway-instructions.sh [BINARY]   (default: target/release/sluice)
#
# Env: CONNS (default 8), SECONDS_LOAD (default 20), OUT (callgrind file
# prefix, default a temp dir). Needs valgrind and wrk (Debian packages).
# Prints the instructions per request and the 25 costliest functions
# (exclusive); `callgrind_annotate --inclusive=yes FILE` shows the rest.
#
# Under valgrind SHA-256 runs in software (valgrind hides the SHA
# extensions), so sha2 weighs more here than on the real CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/gateway-common.sh

bin="${1:-${CARGO_TARGET_DIR:-target}/release/sluice}"
conns="${CONNS:-8}"
load_s="${SECONDS_LOAD:-20}"
for tool in valgrind callgrind_control callgrind_annotate wrk; do
  command -v "$tool" >/dev/null 2>&1 || {
    echo "error: $tool is not installed (Debian packages: valgrind, wrk)" >&2
    exit 1
  }
done
[ -x "$bin" ] || { echo "error: no binary at $bin (cargo build --release)" >&2; exit 1; }

dir="$(mktemp -d)"
out="${OUT:-$dir/callgrind.out}"
mock_port=18101
gw_port=18102
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

"$bin" bench mock-upstream --listen "127.0.0.1:$mock_port" >"$dir/mock.log" 2>&1 &
pids+=($!)
valgrind --tool=callgrind --callgrind-out-file="$out" --dump-instr=no \
  "$bin" bench sluice-gateway --upstream "http://127.0.0.1:$mock_port" \
  --data-dir "$dir/data" --listen "127.0.0.1:$gw_port" >"$dir/gw.log" 2>&1 &
gw=$!
pids+=("$gw")
echo "starting the gateway under callgrind (slow: up to a minute) ..." >&2
key="$(gateway_key "$dir/gw.log" "$gw" 900)"
post_lua "$dir/post.lua" "$key" \
  '  io.write(string.format("requests=%d non2xx=%d\n", summary.requests, summary.errors.status))'
url="http://127.0.0.1:$gw_port/v1/chat/completions"
echo "warm-up: 5 s at $conns connections" >&2
wrk -t1 -c"$conns" -d5s -s "$dir/post.lua" "$url" >/dev/null
callgrind_control -z "$gw" >/dev/null
echo "measuring: ${load_s} s at $conns connections" >&2
result="$(wrk -t1 -c"$conns" -d"${load_s}s" -s "$dir/post.lua" "$url" | tail -1)"
callgrind_control -d "$gw" >/dev/null
requests="$(sed 's/.*requests=\([0-9]*\).*/\1/' <<<"$result")"
bad="$(sed 's/.*non2xx=\([0-9]*\).*/\1/' <<<"$result")"
dump="$(ls -t "$out".* | head -1)"
total="$(callgrind_annotate "$dump" 2>/dev/null | awk '/PROGRAM TOTALS/{gsub(",","",$1); print $1; exit}')"
echo "callgrind file: $dump"
echo "requests: $requests (non-2xx: $bad)"
echo "instructions per request: $((total / requests))"
echo "costliest functions (instructions per request, exclusive):"
# The frames that were already running when the counters were zeroed
# (thread starts, the runtimes' loops) show their whole subtree as their
# own: leave out anything over half the total.
callgrind_annotate --threshold=100 "$dump" 2>/dev/null \
  | awk '/file:function/{p=1; next} p && /^ *[0-9]/' \
  | awk -v n="$requests" -v t="$total" '{c=$1; gsub(",","",c); if (c * 2 > t) next; f=$0; sub(/^ *[0-9,]+ *\([^)]*\) */, "", f); printf "%9d  %s\n", c/n, substr(f, 1, 150)}' \
  | head -25
