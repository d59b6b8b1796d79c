#!/usr/bin/env bash
# Installs everything diffssl-plugin needs into ./.venv: the Fashion-MNIST data package (Debian/Ubuntu,
# via apt) and the Python package with its dependencies and the dev tools.
set -euo pipefail
cd "$(dirname "$0")"
SUDO=""
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
if command -v apt-get >/dev/null 2>&1; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist
else
  echo "install.sh: no apt-get here; Fashion-MNIST will be downloaded by torchvision on first use" \
       "(or pass --data-root DIR with its IDX files)" >&2
fi
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[dev]"
echo "installed: run .venv/bin/diffssl bench"
