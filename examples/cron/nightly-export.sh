#!/bin/sh
# Run the nightly export on every host "just in case"; `singleton run` lets one of them do it.
#
#   crontab:  0 2 * * *  SINGLETON_URL=redis://locks.internal:6379/0 /opt/jobs/nightly-export.sh
#
# The lock name is the one the Python worker, the Airflow DAG and the Prefect flow in
# examples/ use, so none of them runs while this job does. `singleton run` exits with
# the export's own code, 75 when another host holds the lock, 69 when the store is down.
set -u

here=$(cd "$(dirname "$0")" && pwd)

singleton run nightly-export --ttl 60 --metadata source=cron --metadata host="$(hostname)" -- \
    "$here/export.sh" "$@"
status=$?

case $status in
    0) ;;
    75) echo "nightly-export: another holder is running it; nothing to do here" ;;
    *) echo "nightly-export: failed with exit code $status" >&2 ;;
esac
# A skipped run is a success for cron: it should not mail anyone.
[ "$status" -eq 75 ] && exit 0
exit "$status"
