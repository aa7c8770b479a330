#!/usr/bin/env bash
# Set-up on a fresh machine: the Fashion-MNIST idx files (Debian package, when root and
# apt are available) and a virtual environment at .venv with byol_jax and its test tools.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

FMNIST_DIR=/usr/share/datasets/fashion-mnist
if [ ! -d "$FMNIST_DIR" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing dataset-fashion-mnist (Debian package)" >&2
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "setup: $FMNIST_DIR is missing; install Debian's dataset-fashion-mnist as root" >&2
  fi
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import byol_jax, pytest, xdist" 2>/dev/null \
   || [ requirements.txt -nt .venv/.installed ] || [ setup.py -nt .venv/.installed ]; then
  echo "setup: installing Python packages into .venv" >&2
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q -e '.[test]'
  touch .venv/.installed
fi
