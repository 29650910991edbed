#!/usr/bin/env bash
# bench/foldrate.sh - the fold's pace against the drain's (issue 14), one quick loop:
# pre-load N events, run one tdrain replica, and report the acknowledged rate
# (N / time until the FIFO is empty), the visible rate (N / time until
# event_counters counts all N), their ratio, the fold rounds and where the rounds'
# time went (tdrain_fold_phase_seconds_total).  Both clocks start when tdrain does.
#
#   URI=mongodb://... TDRAIN_BUILDDIR=build bash bench/foldrate.sh N [single|partitioned] [key=value ...]
#
# The store is not started here: `python3 tests/harness.py serve --documentdb` prints a URI.
# The extra key=value pairs go into tdrain's configuration (A/B runs).
set -euo pipefail

SRCDIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
B=${TDRAIN_BUILDDIR:-$SRCDIR/build}
TDRAIN=${TDRAIN:-$B/tdrain} # another build of tdrain (before/after runs)
N=${1:?usage: foldrate.sh N [single|partitioned] [key=value ...]}
MODE=${2:-single}
shift $(( $# >= 2 ? 2 : 1 ))
: "${URI:?set URI}"
OUT=${FOLDRATE_OUT:-/tmp/foldrate}
DB=foldrate
mkdir -p "$OUT"
rm -f "$OUT/r1.prom" "$OUT/r1.log"
parts=()
[ "$MODE" = partitioned ] && parts=(--partitions 16)

"$B/tdrain-bench-refs" drop --uri "$URI" --db "$DB" 2>/dev/null || true
{
	echo "store.uri = $URI"
	echo "store.database = $DB"
	echo "coord.mode = $MODE"
	echo "metrics.file = $OUT/r1.prom"
	echo "metrics.interval_ms = 2000" # the leader counts the FIFO each period (0.3 s at 1M on DocumentDB)
	echo "log.level = debug"
	for kv in "$@"; do echo "${kv%%=*} = ${kv#*=}"; done
} >"$OUT/r1.conf"
# Indexes first, on the empty collections: DocumentDB builds them at once there, while on a
# populated FIFO createIndexes waits for a once-a-minute job (docs/DESIGN.md, "Index builds").
# A loaded machine can take longer than the default 5 s for them: a longer timeout for this start.
sed 's/^store.timeout_ms = .*//' "$OUT/r1.conf" >"$OUT/r0.conf"
printf 'store.timeout_ms = 20000\ncoord.renew_deadline_ms = 25000\ncoord.lease_ttl_ms = 30000\n' >>"$OUT/r0.conf"
"$TDRAIN" -c "$OUT/r0.conf" -N r1 >"$OUT/r0.log" 2>&1 &
pid=$!
for _ in $(seq 1 100); do grep -q 'started:' "$OUT/r0.log" && break; sleep 0.1; done
sleep 1
kill -TERM $pid; wait $pid || true
# A createIndexes that timed out stays queued in DocumentDB (docs/DESIGN.md, "Index builds"): wait for it.
if grep -q 'indexes pending' "$OUT/r0.log"; then
	/usr/bin/python3 - "$URI" "$DB" <<'PY' || echo "foldrate: warning: tdrain_id still pending; the drain runs without it" >&2
import sys, time, pymongo
db = pymongo.MongoClient(sys.argv[1])[sys.argv[2]]
for _ in range(90):
    if 'tdrain_id' in db.events.index_information() and 'tdrain_delta_id' in db.tdrain_deltas.index_information():
        sys.exit(0)
    time.sleep(1)
sys.exit(1)
PY
fi
"$B/tdrain-loadgen" --uri "$URI" --db "$DB" --count "$N" --quiet "${parts[@]}" >"$OUT/loadgen.log" 2>&1
"$TDRAIN" -c "$OUT/r1.conf" -N r1 >"$OUT/r1.log" 2>&1 &
pid=$!
trap 'kill -TERM $pid 2>/dev/null || true' EXIT
res=$("$B/tdrain-bench-refs" watch --uri "$URI" --db "$DB" --total "$N" --interval-ms 100 --metrics "$OUT/r1.prom" \
	--dat "$OUT/watch.dat" --timeout $(( 120 + N / 500 )) || true)
sleep 2.5 # the metrics file's last refresh (metrics.interval_ms)
kill -TERM $pid 2>/dev/null || true
wait $pid 2>/dev/null || true
trap - EXIT
te=$(sed -n 's/.*t_empty=\([-0-9.]*\).*/\1/p' <<<"$res")
tv=$(sed -n 's/.*t_visible=\([-0-9.]*\).*/\1/p' <<<"$res")
awk -v n="$N" -v te="$te" -v tv="$tv" -v mode="$MODE" '
	/^tdrain_fold_rounds_total/ { r = $NF } /^tdrain_fold_images_total/ { im = $NF }
	/^tdrain_fold_phase_seconds_total/ { match($0, /phase="[a-z]+"/); p = substr($0, RSTART + 7, RLENGTH - 8); ph = ph sprintf(" %s=%.2f", p, $NF); tot += $NF }
	END {
		ack = te > 0 ? n / te : 0; vis = tv > 0 ? n / tv : 0
		ratio = ack > 0 ? vis / ack : 0
		printf "N=%d mode=%s t_empty=%.2f t_visible=%.2f acked_rate=%.0f visible_rate=%.0f ratio=%.2f rounds=%d images=%d phases_s:%s (sum %.2f)\n", n, mode, te, tv, ack, vis, ratio, r, im, ph, tot
	}' "$OUT/r1.prom"
"$B/tdrain-bench-refs" drop --uri "$URI" --db "$DB" 2>/dev/null || true
