#!/bin/sh
# What the official nginx image's entrypoint does before `nginx` starts: run the executable
# *.sh in /docker-entrypoint.d/ (and source the *.envsh) in version order, then exec the command.
set -e
if [ "$1" = "nginx" ] || [ "$1" = "nginx-debug" ]; then
    for f in $(find /docker-entrypoint.d/ -follow -type f | sort -V); do
        case "$f" in
            *.envsh) if [ -x "$f" ]; then echo "$0: Sourcing $f"; . "$f"; fi ;;
            *.sh) if [ -x "$f" ]; then echo "$0: Launching $f"; "$f"; fi ;;
        esac
    done
    echo "$0: Configuration complete; ready for start up"
fi
exec "$@"
