#!/usr/bin/env bash
# Steady-state A/B of Sluice gateway builds under wrk: for each round and
# each binary in turn, a fresh gateway (`sluice bench sluice-gateway`, the
# validator, a miner and the SQLite ledger in one process, as `sluice bench
# gateway` runs it) in front of `sluice bench mock-upstream`, a 2-s warm-up,
# then wrk for SECONDS at CONNS connections. One line per run:
#
#   ROUND BINARY p50=… p99=… p999=… (ms) rps=… non2xx=… wal=… (bytes)
#
# non2xx counts requests the gateway turned away (503 `overloaded` while
# the ledger writer is behind); wal is the size of the write-ahead log
# next to the ledger when the run ends. Interleaving the builds puts the
# VM's drift on both; `sluice bench gateway` runs windows of about half a
# second at c=1, and this runs long ones (the ledger's checkpoints every
# quarter of a second are inside them either way).
#
#   scripts/gateway-ab.sh [--busy] [--hold-lock S] ROUNDS SECONDS BINARY...
#
# Lines name each build by its file name: copy builds to names of their own
# (cp target/release/sluice /tmp/sluice-before).
#
# --busy runs two busy loops in the idle scheduling class beside the runs
# (`chrt -i 0`): they keep the vCPUs from ever halting without taking CPU
# from anything else, which on some VMs makes disk flushes, and so the
# ledger writer's checkpoints, slow (README, "Benchmarks").
# --hold-lock S: two seconds into each measured run, another connection
# (python3's sqlite3) holds the ledger's write lock for S seconds (BEGIN
# IMMEDIATE, then ROLLBACK), so that the writer's commit waits that long,
# as it waits for a slow disk flush; non2xx then counts the requests the
# gateway turned away meanwhile (needs python3).
# Env: CONNS (default 1). Needs wrk (Debian package).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/gateway-common.sh

busy=0
hold=""
while [ $# -gt 0 ]; do
  case "$1" in
    --busy) busy=1; shift ;;
    --hold-lock) hold="${2:?--hold-lock needs seconds}"; shift 2 ;;
    *) break ;;
  esac
done
if [ $# -lt 3 ]; then
  sed -n '2,31p' "$0" >&2
  exit 2
fi
rounds="$1"
seconds="$2"
shift 2
conns="${CONNS:-1}"
command -v wrk >/dev/null 2>&1 || {
  echo "error: wrk is not installed (Debian package: wrk)" >&2
  exit 1
}
for bin in "$@"; do
  [ -x "$bin" ] || { echo "error: no binary at $bin (cargo build --release)" >&2; exit 1; }
done

dir="$(mktemp -d)"
mock_port=18101
gw_port=18102
pids=()
loops=()
cleanup() {
  for p in "${pids[@]}" "${loops[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT

if [ "$busy" = 1 ]; then
  for _ in 1 2; do
    chrt -i 0 sh -c 'while :; do :; done' &
    loops+=($!)
  done
fi

url="http://127.0.0.1:$gw_port/v1/chat/completions"
for round in $(seq 1 "$rounds"); do
  for bin in "$@"; do
    run="$dir/run"
    rm -rf "$run"
    mkdir -p "$run"
    "$bin" bench mock-upstream --listen "127.0.0.1:$mock_port" >"$run/mock.log" 2>&1 &
    mock=$!
    "$bin" bench sluice-gateway --upstream "http://127.0.0.1:$mock_port" \
      --data-dir "$run/data" --listen "127.0.0.1:$gw_port" >"$run/gw.log" 2>&1 &
    gw=$!
    pids=("$mock" "$gw")
    key="$(gateway_key "$run/gw.log" "$gw" 300)"
    post_lua "$run/post.lua" "$key" \
      '  io.write(string.format("p50=%.3f p99=%.3f p999=%.3f rps=%.0f non2xx=%d\n",
    latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    latency:percentile(99.9) / 1000, summary.requests / (summary.duration / 1e6),
    summary.errors.status))'
    wrk -t1 -c"$conns" -d2s -s "$run/post.lua" "$url" >/dev/null
    if [ -n "$hold" ]; then
      python3 - "$run/data/sluice.db" "$hold" <<'PY' &
import sqlite3, sys, time
time.sleep(2)
db = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=10)
db.execute("BEGIN IMMEDIATE")
time.sleep(float(sys.argv[2]))
db.execute("ROLLBACK")
PY
      pids+=($!)
    fi
    result="$(wrk -t1 -c"$conns" -d"${seconds}s" -s "$run/post.lua" "$url" | tail -1)"
    wal="$(stat -c %s "$run"/data/*-wal 2>/dev/null | head -1 || true)"
    echo "$round $(basename "$bin") $result wal=${wal:-0}"
    kill "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
    pids=()
  done
done
