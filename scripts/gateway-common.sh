# Shell functions the gateway scripts share (sourced, not run):
# scripts/gateway-instructions.sh and scripts/gateway-ab.sh start
# `sluice bench sluice-gateway` and drive it with wrk.

# gateway_key LOG PID TRIES: waits (TRIES tenths of a second at most) for
# the gateway started as PID to print its "api key:" line to LOG, and
# prints the key. Fails, showing LOG, if the gateway exits or prints none.
gateway_key() {
  local log="$1" pid="$2" tries="$3" key
  for _ in $(seq 1 "$tries"); do
    grep -q "api key:" "$log" && break
    kill -0 "$pid" 2>/dev/null || { cat "$log" >&2; return 1; }
    sleep 0.1
  done
  key="$(awk '/api key:/{print $3; exit}' "$log")"
  [ -n "$key" ] || { echo "error: the gateway printed no api key" >&2; cat "$log" >&2; return 1; }
  echo "$key"
}

# post_lua FILE KEY DONE: writes to FILE a wrk script that posts a chat
# completion for the mock model with KEY, DONE being the body of its
# `done(summary, latency, requests)` function.
post_lua() {
  cat >"$1" <<LUA
wrk.method = "POST"
wrk.body = '{"model":"mock-model","messages":[{"role":"user","content":"hello"}],"max_tokens":16}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $2"
done = function(summary, latency, requests)
$3
end
LUA
}
