#!/usr/bin/env bash
# Runs every test: installs what the build and the tests need (Debian
# packages for llama.cpp, a Python venv with the openai SDK, the default
# model in the per-user cache), then `cargo test --workspace`.
#
# PostgreSQL/Redis tests run when SLUICE_TEST_DATABASE_URL /
# SLUICE_TEST_REDIS_URL are set (.ci/run sets them); otherwise they print
# why they skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
command -v cmake >/dev/null 2>&1 || need_pkgs+=(cmake)
if command -v dpkg >/dev/null 2>&1; then
  dpkg -s libclang-dev >/dev/null 2>&1 || need_pkgs+=(libclang-dev)
else
  ls /usr/lib/llvm-*/lib/libclang.so >/dev/null 2>&1 || need_pkgs+=(libclang-dev)
fi
python3 -m venv --help >/dev/null 2>&1 || need_pkgs+=(python3-venv)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  echo "installing ${need_pkgs[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi

cache="${XDG_CACHE_HOME:-$HOME/.cache}/sluice"
venv="${SLUICE_VENV:-$cache/venv}"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import openai" >/dev/null 2>&1; then
  echo "creating a Python venv with the openai SDK in $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check openai
fi
export SLUICE_TEST_PYTHON="$venv/bin/python"

# Reuse a build directory outside the clone when there is one.
if [ -z "${CARGO_TARGET_DIR:-}" ] && [ -d /var/tmp/sluice-target ]; then
  export CARGO_TARGET_DIR=/var/tmp/sluice-target
fi

cargo build --workspace --tests --quiet
# Fetch the default model once into the per-user cache (with progress).
bin="${CARGO_TARGET_DIR:-target}/debug/sluice"
"$bin" models pull --data-dir "$cache/test-data" >/dev/null

log="$(mktemp)"
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line over every test binary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed;?$/) p += $(i-1); if ($i ~ /^failed;?$/) f += $(i-1); if ($i ~ /^ignored;?$/) s += $(i-1) } }
     END { printf "tests: %d passed, %d failed, %d skipped\n", p, f, s }' "$log"
exit "$status"
