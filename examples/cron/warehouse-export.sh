#!/bin/sh
# At most 3 exports into the warehouse at once, from every host whose crontab starts one.
#
#   crontab:  */5 * * * *  SINGLETON_URL=redis://locks.internal:6379/0 /opt/jobs/warehouse-export.sh
#
# Each run takes one of the 3 holds of 'warehouse-export'; a fourth exits 75, naming the
# three holders, and is skipped quietly. The Airflow DAG and the Prefect flow in examples/
# that pass limit=3 on the same name count against the same 3.
set -u

here=$(cd "$(dirname "$0")" && pwd)

singleton run warehouse-export --limit 3 --ttl 60 --metadata source=cron -- "$here/export.sh" "$@"
status=$?

case $status in
    0) ;;
    75) echo "warehouse-export: 3 exports are running already; nothing to do here" ;;
    *) echo "warehouse-export: failed with exit code $status" >&2 ;;
esac
[ "$status" -eq 75 ] && exit 0
exit "$status"
