#!/usr/bin/env bash
# bench/foldsteady.sh - the fold's lag under a sustained input (issue 14): a producer at RATE events/s for
# SECONDS into an empty FIFO, one tdrain replica; prints the end-to-end latency (insert -> counted in
# event_counters) p50/p99 from tdrain-bench-refs watch, the acknowledgement latency, and the largest
# tdrain_fold_lag_seconds (age of the oldest delta at a round) seen in the metrics file, sampled each second.
#
#   URI=mongodb://... bash bench/foldsteady.sh RATE SECONDS [single|partitioned] [key=value ...]
set -euo pipefail

SRCDIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
B=${TDRAIN_BUILDDIR:-$SRCDIR/build}
TDRAIN=${TDRAIN:-$B/tdrain}
RATE=${1:?usage: foldsteady.sh RATE SECONDS [mode] [key=value ...]}
SECS=${2:?usage: foldsteady.sh RATE SECONDS [mode] [key=value ...]}
MODE=${3:-single}
shift $(( $# >= 3 ? 3 : 2 ))
: "${URI:?set URI}"
OUT=${FOLDRATE_OUT:-/tmp/foldsteady}
DB=foldsteady
N=$(( RATE * SECS ))
SUB=$(( RATE / 20 )); [ "$SUB" -lt 1 ] && SUB=1; [ "$SUB" -gt 1000 ] && SUB=1000
mkdir -p "$OUT"
rm -f "$OUT/r1.prom" "$OUT/r1.log" "$OUT/lag.txt"
"$B/tdrain-bench-refs" drop --uri "$URI" --db "$DB" 2>/dev/null || true
{
	echo "store.uri = $URI"
	echo "store.database = $DB"
	echo "coord.mode = $MODE"
	echo "metrics.file = $OUT/r1.prom"
	echo "metrics.interval_ms = 1000"
	echo "log.level = debug"
	for kv in "$@"; do echo "${kv%%=*} = ${kv#*=}"; done
} >"$OUT/r1.conf"
"$TDRAIN" -c "$OUT/r1.conf" -N r1 >"$OUT/r1.log" 2>&1 &
pid=$!
trap 'kill -TERM $pid $spid 2>/dev/null || true' EXIT
sleep 2 # the leader lease, the indexes (empty collections: built at once) and the first claim
( while sleep 1; do sed -n 's/^tdrain_fold_lag_seconds{[^}]*} //p' "$OUT/r1.prom" 2>/dev/null >>"$OUT/lag.txt" || true; done ) &
spid=$!
res=$("$B/tdrain-bench-refs" watch --uri "$URI" --db "$DB" --total "$N" --interval-ms 100 --metrics "$OUT/r1.prom" \
	--dat "$OUT/watch.dat" --timeout $(( SECS * 3 + 60 )) --rate "$RATE" --producer-batch "$SUB" \
	-- "$B/tdrain-loadgen" --uri "$URI" --db "$DB" --count "$N" --rate "$RATE" --quiet || true)
kill -TERM $spid 2>/dev/null || true
kill -TERM $pid 2>/dev/null || true
wait $pid 2>/dev/null || true
trap - EXIT
echo "rate=$RATE seconds=$SECS mode=$MODE $res max_fold_lag_s=$(sort -g "$OUT/lag.txt" | tail -1) fold_lag_samples=$(wc -l <"$OUT/lag.txt") rounds=$(grep -c 'fold: round' "$OUT/r1.log")"
"$B/tdrain-bench-refs" drop --uri "$URI" --db "$DB" 2>/dev/null || true
