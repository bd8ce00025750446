#!/bin/sh
# At most 2 exports into the warehouse at once, from every host whose crontab starts one.
#
#   crontab:  */5 * * * *  SINGLETON_URL=redis://locks.internal:6379/0 /opt/jobs/warehouse-export.sh
#
# Each run takes one of the 2 holds of 'warehouse-export'; a third exits 75, naming the
# two holders, and is skipped quietly. The Airflow DAG and the Prefect flow in examples/
# that pass limit=2 on the same name count against the same 2.
set -u

here=$(cd "$(dirname "$0")" && pwd)

singleton run warehouse-export --limit 2 --ttl 60 --metadata source=cron -- "$here/export.sh" "$@"
status=$?

case $status in
    0) ;;
    75) echo "warehouse-export: 2 exports are running already; nothing to do here" ;;
    *) echo "warehouse-export: failed with exit code $status" >&2 ;;
esac
[ "$status" -eq 75 ] && exit 0
exit "$status"
