#!/usr/bin/env bash
# Set up a fresh checkout: the real Fashion-MNIST (Debian's dataset-fashion-mnist, where apt-get
# exists) and a virtual environment in .venv with this package and its test dependencies.
# Safe to run again: finished steps are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

# 1. Fashion-MNIST from the distribution, when it is not there yet.
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
    if command -v apt-get >/dev/null 2>&1; then
        sudo_cmd=""
        [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
        echo "setup: installing Debian package dataset-fashion-mnist" >&2
        $sudo_cmd apt-get update -qq
        $sudo_cmd apt-get install -y -qq dataset-fashion-mnist
    else
        echo "setup: no apt-get; put the Fashion-MNIST IDX files in a folder and pass --data-dir" >&2
    fi
fi

# 2. Virtual environment with the package (editable) and pytest.
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $($python --version)" >&2
    "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
echo "setup: done; the command is .venv/bin/collective" >&2
