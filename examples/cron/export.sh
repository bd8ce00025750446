#!/bin/sh
# Stand-in for the real export. `singleton run` hands it the lock's fencing token:
# pass it to whatever you write, so the store can refuse a writer whose lease ended.
set -eu
echo "exporting under '$SINGLETON_NAME' with fencing token $SINGLETON_FENCING_TOKEN"
sleep "${EXPORT_SECONDS:-2}"
echo "export done"
