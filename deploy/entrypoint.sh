#!/bin/sh
# The image's entrypoint: a Procfile process name (web, worker, beat, flower) runs that line of /app/Procfile,
# exec'd so that it is PID 1's child-free replacement and gets SIGTERM directly; anything else runs as given
# (`kling-relay config`, `python -m kling_relay.simulator ...`).
set -eu
procfile=${KLING_RELAY_PROCFILE:-/app/Procfile}
if [ "$#" -eq 1 ] && grep -q "^$1:" "$procfile"; then
    command=$(sed -n "s/^$1:[[:space:]]*//p" "$procfile")
    exec sh -c "exec $command"
fi
exec "$@"
