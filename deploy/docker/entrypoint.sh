#!/bin/sh
# The images' entry point: `recur` from the image's virtual environment, as PID 1's child
# replaced by exec, so SIGTERM reaches the server directly and it drains.
# usage: entrypoint.sh COMMAND [ARGS]   e.g. entrypoint.sh serve --config /etc/recur/serve.toml
set -eu

venv=${RECUR_VENV:-/opt/recur/venv}
if [ ! -x "$venv/bin/recur" ]; then
    echo "entrypoint: no recur in $venv (set RECUR_VENV)" >&2
    exit 127
fi
# A read-only root filesystem: no bytecode caches, and temporary files under /tmp.
export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
exec "$venv/bin/recur" "$@"
