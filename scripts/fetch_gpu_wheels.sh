#!/usr/bin/env bash
# Download what scripts/gpu_check.sh installs on a GPU machine without a package registry: the transformers
# wheel pte pins (the machine has 5.17). Run here, where the registry is reachable; ./wheels/ is gitignored.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p wheels
python3 -m pip download --no-deps --only-binary=:all: --dest wheels "transformers==5.23.*"
ls -l wheels
