#!/bin/sh
# Installs Recur with one extra into a fresh virtual environment. The images' RUN step is
# this script, and CI runs it too (tests/test_deploy_images.py), so what an image contains
# is tested without a docker engine.
#
# usage: deploy/docker/install.sh EXTRA VENV [SOURCE]
#   EXTRA   serve-cpu (plain onnxruntime), serve (onnxruntime-gpu) or train (torch)
#   VENV    where the virtual environment goes (the images use /opt/recur/venv)
#   SOURCE  the repository (default: the one this script is in)
set -eu

if [ $# -lt 2 ]; then
    echo "usage: $0 serve-cpu|serve|train VENV [SOURCE]" >&2
    exit 2
fi
extra=$1
venv=$2
source=${3:-$(cd "$(dirname "$0")/../.." && pwd)}
case $extra in
    serve-cpu | serve | train) ;;
    *) echo "$0: unknown extra '$extra' (serve-cpu, serve or train)" >&2; exit 2 ;;
esac

python3 -m venv "$venv"
"$venv/bin/pip" install --no-cache-dir --disable-pip-version-check --quiet "$source[$extra]"

# A serving environment never holds torch: it would add gigabytes and is never imported.
if [ "$extra" != train ] && "$venv/bin/python" -c "import torch" 2>/dev/null; then
    echo "$0: torch was installed into a serving environment" >&2
    exit 1
fi
"$venv/bin/recur" --help > /dev/null
echo "installed recur[$extra] into $venv"
