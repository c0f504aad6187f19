#!/usr/bin/env bash
# Runs a command up to N times (default 4), waiting longer after each failure. The set-up steps
# download several GB of wheels (torch and its CUDA libraries); one dropped connection should not
# fail a fresh `make test`. Wheels that finished downloading stay in pip's cache, so a retry only
# fetches what is missing.
set -u
attempts=${RETRY_ATTEMPTS:-4}
for ((i = 1; i <= attempts; i++)); do
    "$@" && exit 0
    status=$?
    if ((i < attempts)); then
        echo "retry.sh: '$*' failed (exit $status), attempt $i of $attempts; retrying in $((30 * i)) s" >&2
        sleep $((30 * i))
    fi
done
echo "retry.sh: '$*' failed $attempts times" >&2
exit "$status"
