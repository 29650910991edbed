#!/usr/bin/env bash
# bench/bench.sh - `make bench`: tdrain's drain rate, latency and cost, next to
# two references measured in the same run, on the same store and the same data.
#
#   TDRAIN_BUILDDIR=/path/to/build bash bench/bench.sh
#
# Stores.  By default it starts its own servers as the tests do (tests/harness.py
# serve): DocumentDB first (serve --documentdb: the issue-14 matrix at 100,000
# and 1,000,000 events, each at a store round trip of +0 ms and +1 ms, the
# second through tdrain-latproxy, bench/latproxy.c), then FerretDB 1.24 on its
# PostgreSQL backend and on SQLite (smaller backlogs: it scans the FIFO for
# every acknowledgement).  BENCH_URI=mongodb://host:port/ benchmarks that
# server instead (a real MongoDB: nothing is started, each scenario uses its
# own database bench_* which is dropped afterwards).
#
# Scenarios (docs/PERFORMANCE.md explains each and the method):
#   drain      a pre-loaded backlog at two sizes, single mode, 1 replica, so an
#              O(backlog) cost per batch shows as a falling rate;
#   raw        the RAW CEILING on the same data: find head / insert one claim
#              document / delete_many {_id: {$in}} per batch, nothing else
#              (tdrain-bench-refs raw);
#   old        the OLD ALGORITHM of seed 000 (per affected username: findOne,
#              find all devices, re-sum, updateOne; tdrain-bench-refs old) and
#              tdrain on the same, smaller, backlog;
#   part-N     partitioned mode with 1, 2 and 3 replicas;
#   steady     a producer at a fixed rate; end-to-end latency (insert ->
#              visible in the projections) p50/p99.
#   documentdb, ferretdb  which stores run (both by default).
# On DocumentDB every tdrain and reference run at +N ms gets its own
# tdrain-latproxy (adding N/2 ms each way), whose count of wire messages gives
# the statements per batch; the stopwatch always reads the store directly.
# After the matrix, the raw reference runs once more through the proxy at
# +0 ms: the proxy's own ceiling.
#
# Environment (defaults in brackets):
#   BENCH_URI          benchmark this MongoDB instead of starting FerretDB
#   BENCH_STORES       FerretDB backends to run ["postgresql sqlite"]; every scenario runs on
#                      the first, drain/raw/old at the first size only on the others
#   BENCH_SIZES        the two drain backlogs [FerretDB: "10000 20000"; MongoDB: "100000 1000000"]
#   BENCH_OLD_SIZE     backlog for the old-algorithm comparison [FerretDB 3000; MongoDB 100000]
#   BENCH_PART_SIZE    backlog of the partitioned runs [the first drain size]
#   BENCH_RATE         steady producer rate, events/s [FerretDB 100; MongoDB 5000]
#   BENCH_STEADY_S     steady run length in seconds [60]
#   BENCH_BATCH        drain.batch_size for tdrain and both references [1000, tdrain's default]
#   BENCH_SET          extra tdrain settings, "key=value key=value" (for A/B runs)
#   BENCH_FERRETDB_SET tdrain settings on FerretDB [timeouts sized to its scans, below]
#   BENCH_OUT          results directory [/var/tmp/tdrain-bench]
#   BENCH_SCENARIOS    subset to run, e.g. "drain raw" [all]
#   BENCH_PAIRS        runs of each drain / raw reference pair; the table keeps the best [FerretDB: 1 with the
#                      DocumentDB matrix, else 2; 1 with BENCH_URI]
#   BENCH_DDB_SIZES    DocumentDB backlogs ["100000 1000000"]
#   BENCH_RTTS         added store round trips in ms, DocumentDB ["0 1"]
#   BENCH_OLD_S        DocumentDB: the old algorithm runs at most this long, its rate so far is reported [60]
#   BENCH_DDB_OLD_SIZE, BENCH_DDB_PART_SIZE  DocumentDB backlogs of the old / partitioned runs [the first size]
#   BENCH_DDB_PAIRS    DocumentDB runs of each drain / raw pair [1]
#   BENCH_DDB_RATE     DocumentDB steady producer rate [2000]
#   BENCH_DOCUMENTDB_SET tdrain settings on DocumentDB [none: the defaults]
#   PG_BINDIR          PostgreSQL binaries (psql, for DocumentDB's index job) [/usr/lib/postgresql/15/bin]
# Output: the table on stdout and in $BENCH_OUT/table.txt; per-run samples
# ($BENCH_OUT/*.dat), logs, and $BENCH_OUT/perf-drain.png (gnuplot, when installed).
set -euo pipefail

SRCDIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILDDIR=${TDRAIN_BUILDDIR:-$SRCDIR/build}
BUILDDIR=$(cd "$BUILDDIR" && pwd)
PY=/usr/bin/python3
[ -x "$PY" ] || PY=python3
OUT=${BENCH_OUT:-/var/tmp/tdrain-bench}
BATCH=${BENCH_BATCH:-1000}
STEADY_S=${BENCH_STEADY_S:-60}
SCENARIOS=${BENCH_SCENARIOS:-drain raw old part steady documentdb ferretdb}
HZ=$(getconf CLK_TCK)
T_BEGIN=$(date +%s)

log() { printf 'bench: %s\n' "$*" >&2; }
die() { printf 'bench: error: %s\n' "$*" >&2; exit 1; }
want() { case " $SCENARIOS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

mkdir -p "$OUT"
rm -f "$OUT"/*.dat "$OUT"/*.log "$OUT"/*.conf "$OUT"/*.prom "$OUT"/rows.tsv "$OUT"/loads.tsv "$OUT"/breakdown.txt "$OUT"/perf-drain.png
ROWS=$OUT/rows.tsv
: >"$ROWS"

# ---------------------------------------------------------------- programs
# All three are build products (Makefile.am: `make bench` builds them first).
for p in tdrain tdrain-loadgen tdrain-bench-refs tdrain-latproxy; do
	[ -x "$BUILDDIR/$p" ] || die "$BUILDDIR/$p is not built (make $p, or set TDRAIN_BUILDDIR)"
done
REFS=$BUILDDIR/tdrain-bench-refs
LOADGEN=$BUILDDIR/tdrain-loadgen
TDRAIN=$BUILDDIR/tdrain
LATPROXY=$BUILDDIR/tdrain-latproxy
PG_BINDIR=${PG_BINDIR:-/usr/lib/postgresql/15/bin}

# ---------------------------------------------------------------- cleanup
SERVE_PIDS=()
TDRAIN_PIDS=()
BG_PIDS=()
cleanup() {
	local p
	for p in "${TDRAIN_PIDS[@]}" "${BG_PIDS[@]}" ${BG_PROXY:-}; do
		kill -TERM "$p" 2>/dev/null || true
	done
	sleep 0.5
	for p in "${TDRAIN_PIDS[@]}" "${BG_PIDS[@]}"; do
		kill -KILL "$p" 2>/dev/null || true
	done
	# harness.py serve stops its servers and removes their data on SIGTERM.
	for p in "${SERVE_PIDS[@]}"; do
		kill -TERM "$p" 2>/dev/null || true
	done
	for p in "${SERVE_PIDS[@]}"; do
		wait "$p" 2>/dev/null || true
	done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- CPU and memory
# CPU seconds (user+sys) of a process and all its descendants, plus what its
# reaped children used (cutime+cstime): for FerretDB and PostgreSQL's backends.
tree_cpu() {
	local root=$1
	awk -v root="$root" -v hz="$HZ" '
		FNR == 1 {
			line = $0; sub(/^[0-9]+ \(.*\) /, "", line); n = split(line, f, " ")
			pid = FILENAME; sub(/^\/proc\//, "", pid); sub(/\/stat$/, "", pid)
			ppid[pid] = f[2]; cpu[pid] = f[12] + f[13]; child[pid] = f[14] + f[15]
		}
		END {
			if (!(root in cpu)) { print 0; exit }
			t = cpu[root] + child[root]
			for (p in cpu) { q = ppid[p]; d = 0
				while (q != "" && q != "0" && q != "1" && d < 20) { if (q == root) { t += cpu[p]; break } q = ppid[q]; d++ } }
			printf "%.2f\n", t / hz
		}' /proc/[0-9]*/stat 2>/dev/null
}
proc_cpu() { # user+sys seconds of one live process (all threads)
	awk -v hz="$HZ" '{ line = $0; sub(/^[0-9]+ \(.*\) /, "", line); split(line, f, " "); printf "%.3f\n", (f[12] + f[13]) / hz }' \
		"/proc/$1/stat" 2>/dev/null || echo 0
}
proc_hwm_kb() { awk '/^VmHWM:/ { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }
# A PostgreSQL backend or autovacuum worker that exits while tree_cpu reads
# /proc (after the postmaster's line, before its own) is missed by that scan:
# its time is in neither line.  So take the larger of two scans a moment apart
# (with one scan, a part-2 row once showed the store's CPU going down by 1.9 s).
store_cpu() {
	local t=0 p a b
	for p in $STORE_PIDS; do
		a=$(tree_cpu "$p")
		sleep 0.2
		b=$(tree_cpu "$p")
		t=$(awk -v t="$t" -v a="$a" -v b="$b" 'BEGIN { printf "%.2f", t + (a > b ? a : b) }')
	done
	echo "$t"
}
# Run a long child in the background and wait for it in this shell, so that
# SIGINT/SIGTERM reach the EXIT trap at once (which stops the child) instead of
# after the child.  Its stdout ends up in RES.
bg_run() {
	local out=$OUT/.bg.$$ rc=0
	"$@" >"$out" &
	BG_PIDS=($!)
	wait "${BG_PIDS[0]}" || rc=$?
	BG_PIDS=()
	RES=$(cat "$out")
	rm -f "$out"
	return $rc
}

kv() { # kv KEY "k=v k=v ..." -> v
	tr ' ' '\n' <<<"$2" | sed -n "s/^$1=//p" | head -1
}

# ---------------------------------------------------------------- runs
# row SCENARIO STORE BACKLOG ACKED_RATE E2E_RATE P50 P99 CPU_US RSS_KB STORE_CPU_US NOTE
row() { printf '%s\t' "$@" | sed 's/\t$//' >>"$ROWS"; printf '\n' >>"$ROWS"; }

load() { # load DB COUNT [loadgen args...]
	local db=$1 n=$2 t0 ipid
	shift 2
	t0=$(date +%s.%N)
	"$REFS" drop --uri "$URI" --db "$db" 2>/dev/null || true
	"$LOADGEN" --uri "$URI" --db "$db" --count "$n" --quiet "$@" >>"$OUT/loadgen.log" 2>&1 ||
		die "loadgen failed (see $OUT/loadgen.log)"
	if [ "$STORE_KIND" = documentdb ]; then
		# The FIFO's indexes, built over the loaded data (tdrain-bench-refs prepare
		# says why), with DocumentDB's once-a-minute build job started at once.
		"$REFS" prepare --uri "$URI" --db "$db" >>"$OUT/loadgen.log" 2>&1 &
		ipid=$!
		# Until the request is queued the job finds nothing to do: run it again until the build returns.
		while kill -0 "$ipid" 2>/dev/null; do
			sleep 0.5
			ddb_build_now
		done
		wait "$ipid" || die "index build failed (see $OUT/loadgen.log)"
	fi
	LOAD_S=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
	printf '%s\t%s\t%s\n' "$STORE_LABEL" "$n" "$LOAD_S" >>"$OUT/loads.tsv"
	log "$STORE_LABEL: loaded $n events in $LOAD_S s"
}

# DocumentDB builds an index requested on a populated collection from a pg_cron
# job that runs once a minute (Debian's pg_cron has no seconds schedules); run
# that job's statement now instead of waiting for the tick.
ddb_build_now() {
	"$PG_BINDIR/psql" -X -q -A -t -h "$DDB_PG_SOCK" -p "$DDB_PG_PORT" -U postgres -d postgres \
		-c 'CALL documentdb_api_internal.build_index_concurrently(1)' >>"$OUT/loadgen.log" 2>&1 || true
}

# ---------------------------------------------------------------- latency proxy
# RUN_URI is the URI tdrain and the references use: the store itself, or
# tdrain-latproxy in front of it adding RTT_US/2 each way.  The stopwatch
# (tdrain-bench-refs watch) always reads the store directly.
PROXY_PID=""
proxy_start() { # proxy_start ONE_WAY_US: sets RUN_URI, PROXY_PID
	local us=$1 hp port
	hp=$(sed -E 's|^mongodb://([^@/]*@)?([^/?]*).*|\2|' <<<"$URI")
	rm -f "$OUT/.proxy.port" "$OUT/.proxy.stats"
	"$LATPROXY" --target "$hp" --delay-us "$us" --stats "$OUT/.proxy.stats" >"$OUT/.proxy.port" 2>>"$OUT/latproxy.log" &
	PROXY_PID=$!
	BG_PROXY=$PROXY_PID
	for _ in $(seq 1 50); do [ -s "$OUT/.proxy.port" ] && break; sleep 0.1; done
	port=$(sed -n 's/^port=//p' "$OUT/.proxy.port")
	[ -n "$port" ] || die "tdrain-latproxy did not start (see $OUT/latproxy.log)"
	RUN_URI=$(sed -E "s|^(mongodb://([^@/]*@)?)[^/?]*|\1127.0.0.1:$port|" <<<"$URI")
}
proxy_stop() { # sets PROXY_MSGS (wire messages sent to the store through it) and stops it
	PROXY_MSGS=""
	[ -n "$PROXY_PID" ] || return 0
	kill -TERM "$PROXY_PID" 2>/dev/null || true
	wait "$PROXY_PID" 2>/dev/null || true
	PROXY_MSGS=$(sed -n 's/.*msgs_up=\([0-9]*\).*/\1/p' "$OUT/.proxy.stats" 2>/dev/null)
	cat "$OUT/.proxy.stats" >>"$OUT/latproxy.log" 2>/dev/null || true
	PROXY_PID="" BG_PROXY=""
}
# Every tdrain and reference run goes through this pair, so that a proxied run
# gets a proxy of its own and its message count.
run_begin() { if [ "$RTT_US" -gt 0 ] || [ "${FORCE_PROXY:-0}" = 1 ]; then proxy_start $(( RTT_US / 2 )); else RUN_URI=$URI; fi; }
run_end() { proxy_stop; }

tdrain_conf() { # tdrain_conf NAME DB MODE
	local name=$1 db=$2 mode=$3 kvp
	{
		echo "store.uri = $RUN_URI"
		echo "store.database = $db"
		echo "coord.mode = $mode"
		echo "drain.batch_size = $BATCH"
		echo "metrics.file = $OUT/$STORE_LABEL-$db-$name.prom"
		for kvp in $STORE_SET ${BENCH_SET:-}; do echo "${kvp%%=*} = ${kvp#*=}"; done
	} >"$OUT/$STORE_LABEL-$db-$name.conf"
}

start_replicas() { # start_replicas DB MODE COUNT
	local db=$1 mode=$2 k=$3 i
	TDRAIN_PIDS=()
	METRICS=""
	for i in $(seq 1 "$k"); do
		tdrain_conf "r$i" "$db" "$mode"
		"$TDRAIN" -c "$OUT/$STORE_LABEL-$db-r$i.conf" -N "r$i" >"$OUT/$STORE_LABEL-$db-r$i.log" 2>&1 &
		TDRAIN_PIDS+=($!)
		METRICS="${METRICS:+$METRICS,}$OUT/$STORE_LABEL-$db-r$i.prom"
	done
}

stop_replicas() { # sets REP_CPU (user+sys seconds, all replicas) and REP_HWM (largest VmHWM, KiB); stops them
	local p h
	REP_CPU=0
	REP_HWM=0
	for p in "${TDRAIN_PIDS[@]}"; do
		REP_CPU=$(awk -v a="$REP_CPU" -v b="$(proc_cpu "$p")" 'BEGIN { printf "%.3f", a + b }')
		h=$(proc_hwm_kb "$p")
		[ "${h:-0}" -gt "$REP_HWM" ] && REP_HWM=$h
	done
	for p in "${TDRAIN_PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
	for p in "${TDRAIN_PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
	TDRAIN_PIDS=()
}

# Where a drain's time went, from the replicas' own metrics (summed over replicas):
# seconds spent reading batches (tdrain_claim_seconds), inserting the claim record,
# validating and archiving (tdrain_consume_seconds: worker/drain.c stops that clock
# before the delta commit, whatever its help text says), committing the delta,
# removing the claim record and deleting the events (tdrain_ack_seconds), and fold
# rounds.  Appended to $OUT/breakdown.txt.
breakdown() { # breakdown STORE LABEL T_EMPTY T_VISIBLE
	local files=${METRICS//,/ }
	# shellcheck disable=SC2086
	awk -v st="$1" -v lb="$2" -v te="$3" -v tv="$4" '
		/^tdrain_claim_seconds_sum/ { c += $NF } /^tdrain_consume_seconds_sum/ { k += $NF }
		/^tdrain_ack_seconds_sum/ { a += $NF } /^tdrain_batches_total/ { b += $NF }
		/^tdrain_fold_rounds_total/ { r += $NF }
		END { printf "%-22s %-14s drained %7.1f s visible %7.1f s | read %6.1f s, claim record+validate %6.1f s, commit+ack+delete %6.1f s over %d batches; %d fold rounds\n",
			st, lb, te, tv, c, k, a, b, r }' $files 2>/dev/null >>"$OUT/breakdown.txt" || true
	# The same per batch, for the rows: batches, then ms per batch reading, claim record+validate, commit+ack+delete.
	# shellcheck disable=SC2086
	BD=$(awk '/^tdrain_claim_seconds_sum/ { c += $NF } /^tdrain_consume_seconds_sum/ { k += $NF }
		/^tdrain_ack_seconds_sum/ { a += $NF } /^tdrain_batches_total/ { b += $NF }
		END { if (b > 0) printf "%d %.1f %.1f %.1f", b, c * 1e3 / b, k * 1e3 / b, a * 1e3 / b; else print "0 - - -" }' $files 2>/dev/null || echo "0 - - -")
}

# Timeout for one drain: generous, so a slow store yields a (slow) figure, not a hang.
drain_timeout() { echo $(( 60 + $1 / 80 )); }
# The old algorithm is ~20x slower by design: give it room (measured ~45 events/s on FerretDB).
old_timeout() { if [ "$STORE_KIND" = documentdb ]; then echo "$OLD_S"; else echo $(( 60 + $1 / 10 )); fi; }

# run_tdrain LABEL STORE N MODE REPLICAS [PLOT]
run_tdrain() {
	local label=$1 store=$2 n=$3 mode=$4 k=$5 plot=${6:-}
	local db="bench_${label//-/_}" parts=() res s0 s1 cs ack e2e cpu rss
	[ "$mode" = partitioned ] && parts=(--partitions 16)
	log "$store: $label: loading $n events"
	load "$db" "$n" "${parts[@]}"
	s0=$(store_cpu)
	run_begin
	start_replicas "$db" "$mode" "$k"
	bg_run "$REFS" watch --uri "$URI" --db "$db" --total "$n" --interval-ms 100 --metrics "$METRICS" \
		--dat "$OUT/$store-$label.dat" --timeout "$(drain_timeout "$n")" || true
	res=$RES
	stop_replicas
	run_end
	cs=$REP_CPU rss=$REP_HWM
	s1=$(store_cpu)
	log "$store: $label: $res"
	breakdown "$store" "$label" "$(kv t_empty "$res")" "$(kv t_visible "$res")"
	local bd_b bd_r bd_k bd_a stm=- bms=-
	read -r bd_b bd_r bd_k bd_a <<<"$BD"
	bd_b=${bd_b:-0}
	# Statements per batch: every wire message tdrain sent through the proxy
	# (fold, leases, metrics and handshakes included) over the batches.
	if [ -n "$PROXY_MSGS" ] && [ "$bd_b" -gt 0 ]; then
		stm=$(awk -v m="$PROXY_MSGS" -v b="$bd_b" 'BEGIN { printf "%.1f", m / b }')
	fi
	if [ "$bd_b" -gt 0 ]; then
		bms=$(awk -v t="$(kv t_empty "$res")" -v b="$bd_b" 'BEGIN { if (t > 0) printf "%.1f", t * 1e3 / b; else print "-" }')
	fi
	# A run stopped at its timeout reports the rate so far, marked "*".
	ack=$(awk -v n="$n" -v t="$(kv t_empty "$res")" -v a="$(kv acked "$res")" -v to="$(drain_timeout "$n")" \
		'BEGIN { if (t > 0) printf "%.0f", n / t; else printf "%.0f*", a / to }')
	e2e=$(awk -v n="$n" -v t="$(kv t_visible "$res")" -v v="$(kv visible "$res")" -v to="$(drain_timeout "$n")" \
		'BEGIN { if (t > 0) printf "%.0f", n / t; else printf "%.0f*", v / to }')
	cpu=$(awk -v c="$cs" -v n="$n" 'BEGIN { printf "%.0f", c * 1e6 / n }')
	row "$label" "$store" "$n" "$ack" "$e2e" - - "$cpu" "$rss" \
		"$(awk -v a="$s0" -v b="$s1" -v n="$n" 'BEGIN { printf "%.0f", (b - a) * 1e6 / n }')" \
		"$mode x$k" "$bd_b" "$bd_r" "$bd_k" "$bd_a" "$stm" "$bms"
	if [ -n "$plot" ]; then
		cp "$OUT/$store-$label.dat" "$OUT/perf-drain.dat"
		PLOT_TITLE="$store, $n events pre-loaded, $mode mode, $k replica(s), drain.batch_size=$BATCH"
		# The drain rate as steps: one point per change of the acknowledged count
		# (t, events acknowledged since the previous change / its duration), drawn
		# over the interval it was measured on (gnuplot fsteps).
		awk '/^#/ { next } NR == 2 || $2 != a { print $1, $5; a = $2 }' "$OUT/perf-drain.dat" >"$OUT/perf-drain-rate.dat"
	fi
	"$REFS" drop --uri "$URI" --db "$db" 2>/dev/null || true
}

# run_ref KIND LABEL STORE N
run_ref() {
	local kind=$1 label=$2 store=$3 n=$4 db="bench_${2//-/_}" res s0 s1 rate
	log "$store: $label: loading $n events"
	load "$db" "$n"
	s0=$(store_cpu)
	local to stm=- bms=-
	to=$([ "$kind" = old ] && old_timeout "$n" || drain_timeout "$n")
	run_begin
	bg_run "$REFS" "$kind" --uri "$RUN_URI" --db "$db" --batch "$BATCH" --timeout "$to" || true
	res=$RES
	run_end
	s1=$(store_cpu)
	log "$store: $label: ${res:-timed out}"
	local nb
	nb=$(kv batches "$res")
	nb=${nb:-0}
	if [ -n "$PROXY_MSGS" ] && [ "$nb" -gt 0 ]; then
		stm=$(awk -v m="$PROXY_MSGS" -v b="$nb" 'BEGIN { printf "%.1f", m / b }')
	fi
	if [ "$nb" -gt 0 ]; then
		bms=$(awk -v t="$(kv seconds "$res")" -v b="$nb" 'BEGIN { printf "%.1f", t * 1e3 / b }')
	fi
	rate=$(awk -v r="$(kv rate "$res")" -v to="$(kv timeout "$res")" 'BEGIN { printf "%.0f%s", r, (to == 1 ? "*" : "") }')
	row "$label" "$store" "$n" "$rate" "$( [ "$kind" = old ] && echo "$rate" || echo - )" - - \
		"$(awk -v c="$(kv cpu_us_per_event "$res")" 'BEGIN { printf "%.0f", c }')" "$(kv peak_rss_kb "$res")" \
		"$(awk -v a="$s0" -v b="$s1" -v n="$n" 'BEGIN { printf "%.0f", (b - a) * 1e6 / n }')" \
		"$kind reference$( [ "$(kv timeout "$res")" = 1 ] && echo ", bounded to $to s: $(kv events "$res") events" )" \
		"$nb" "$(kv read_ms "$res")" "$(kv claim_ms "$res")" "$(kv ack_ms "$res")" "$stm" "$bms"
	"$REFS" drop --uri "$URI" --db "$db" 2>/dev/null || true
}

# run_steady STORE RATE SECONDS
run_steady() {
	local store=$1 rate=$2 secs=$3 n db=bench_steady res s0 s1 cs rss sub
	n=$(( rate * secs ))
	sub=$(( rate / 20 )); [ "$sub" -lt 1 ] && sub=1; [ "$sub" -gt 1000 ] && sub=1000
	log "$store: steady: $rate events/s for $secs s"
	"$REFS" drop --uri "$URI" --db "$db" 2>/dev/null || true
	RUN_URI=$URI
	start_replicas "$db" single 1
	sleep 2 # the leader lease and the first (empty) claim
	s0=$(store_cpu)
	bg_run "$REFS" watch --uri "$URI" --db "$db" --total "$n" --interval-ms 100 --metrics "$METRICS" \
		--dat "$OUT/$store-steady.dat" --timeout $(( secs * 3 + 60 )) --rate "$rate" --producer-batch "$sub" \
		-- "$LOADGEN" --uri "$URI" --db "$db" --count "$n" --rate "$rate" --quiet || true
	res=$RES
	stop_replicas
	cs=$REP_CPU rss=$REP_HWM
	s1=$(store_cpu)
	log "$store: steady: $res"
	local note="input $rate/s for ${secs}s; acknowledged p50/p99 $(kv ack_p50 "$res")/$(kv ack_p99 "$res") s (1 s resolution)"
	row steady "$store" "~0 (+$rate/s)" \
		"$(awk -v n="$n" -v t="$(kv producer_s "$res")" 'BEGIN { if (t > 0) printf "%.0f", n / t; else print "-" }')" \
		- "$(kv p50 "$res")" "$(kv p99 "$res")" "$(awk -v c="$cs" -v n="$n" 'BEGIN { printf "%.0f", c * 1e6 / n }')" \
		"$rss" "$(awk -v a="$s0" -v b="$s1" -v n="$n" 'BEGIN { printf "%.0f", (b - a) * 1e6 / n }')" "$note"
	"$REFS" drop --uri "$URI" --db "$db" 2>/dev/null || true
}

run_store() { # run_store STORE-LABEL [full|short]
	local store=$1 depth=${2:-full} n1 n2
	STORE_LABEL=$store # prefix of the per-run files (configuration, log, metrics)
	read -r n1 n2 <<<"$SIZES"
	# Each drain right before its raw reference, PAIRS times: this machine's speed
	# drifts by tens of percent from one minute to the next (a shared VM), so a
	# ratio compares neighbours, and the table keeps the best of each.
	local rep
	for rep in $(seq 1 "$PAIRS"); do
		if want drain; then run_tdrain "drain-$n1" "$store" "$n1" single 1; fi
		if want raw; then run_ref raw "raw-$n1" "$store" "$n1"; fi
		if [ "$depth" = full ] && [ -n "$n2" ]; then
			# The plot is DocumentDB's 1M drain when that ran; FerretDB's larger drain otherwise.
			if want drain; then run_tdrain "drain-$n2" "$store" "$n2" single 1 "$([ "$rep" = 1 ] && [ ! -s "$OUT/perf-drain.dat" ] && echo plot)"; fi
			if want raw; then run_ref raw "raw-$n2" "$store" "$n2"; fi
		fi
	done
	if want old; then
		if [ "$OLD_SIZE" != "$n1" ] || ! want drain; then
			run_tdrain "drain-$OLD_SIZE" "$store" "$OLD_SIZE" single 1
		fi
		run_ref old "old-$OLD_SIZE" "$store" "$OLD_SIZE"
	fi
	if want part && [ "$depth" = full ]; then
		local k
		for k in 1 2 3; do run_tdrain "part-$k" "$store" "$PART_SIZE" partitioned "$k"; done
	fi
	if want steady && [ "$depth" = full ]; then
		run_steady "$store" "$RATE" "$STEADY_S"
	fi
}

# ---------------------------------------------------------------- stores
start_ferretdb() { # start_ferretdb BACKEND: sets URI, STORE_PIDS
	local backend=$1 info out=$OUT/serve-$1.json
	"$PY" "$SRCDIR/tests/harness.py" serve --ferretdb --backend "$backend" --json --no-stdin \
		>"$out" 2>"$OUT/serve-$backend.log" &
	SERVE_PIDS+=($!)
	for _ in $(seq 1 600); do
		[ -s "$out" ] && break
		kill -0 "${SERVE_PIDS[-1]}" 2>/dev/null || die "harness serve failed: $(tail -3 "$OUT/serve-$backend.log")"
		sleep 0.1
	done
	info=$("$PY" -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d["ferretdb"]["uri"], d["ferretdb"]["pid"], d.get("postgresql", {}).get("pid", ""))' "$out")
	read -r URI fpid pgpid <<<"$info"
	STORE_PIDS="$fpid $pgpid"
}

stop_ferretdb() {
	local p=${SERVE_PIDS[-1]}
	kill -TERM "$p" 2>/dev/null || true
	wait "$p" 2>/dev/null || true
	unset 'SERVE_PIDS[-1]'
}

ferretdb_ready() {
	local f=${FERRETDB:-${TDRAIN_CACHE:-$HOME/.cache/tdrain}/bin/ferretdb}
	[ -x "$f" ] && [ -x "${PG_BINDIR:-/usr/lib/postgresql/15/bin}/postgres" ] &&
		"$PY" -c 'import pymongo' 2>/dev/null
}

machine() {
	printf 'machine: %s CPUs (%s), %s MiB RAM; %s\n' "$(nproc)" \
		"$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)" \
		"$(awk '/^MemTotal:/ { printf "%d", $2 / 1024 }' /proc/meminfo)" "$(uname -sr)"
}
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
PLOT_TITLE=""

# tdrain settings per store, before BENCH_SET.  MongoDB: the defaults.  FerretDB:
# its keyed statements scan the collection (docs/DESIGN.md), so at the larger
# backlog one acknowledgement takes longer than the default 5 s store.timeout_ms;
# tdrain then sends the timed-out delete again before its next claim, while
# FerretDB may still be running the first (measured, docs/PERFORMANCE.md:
# 15,000 events on PostgreSQL drained at 162 and 74 events/s in two runs with
# the defaults, 11 deletes timed out in the second, against 220 events/s with
# the settings below).  So the timeout is sized to the scans, and the lease
# timings with it, keeping timeout < renew deadline < ttl as the configuration
# requires.
FERRETDB_SET="store.timeout_ms=30000 coord.renew_deadline_ms=40000 coord.lease_ttl_ms=60000"
STORE_SET=""

start_documentdb() { # sets URI, STORE_PIDS, DDB_PG_SOCK, DDB_PG_PORT
	local info out=$OUT/serve-documentdb.json
	"$PY" "$SRCDIR/tests/harness.py" serve --documentdb --json --no-stdin >"$out" 2>"$OUT/serve-documentdb.log" &
	SERVE_PIDS+=($!)
	for _ in $(seq 1 1200); do
		[ -s "$out" ] && break
		kill -0 "${SERVE_PIDS[-1]}" 2>/dev/null || die "harness serve --documentdb failed: $(tail -3 "$OUT/serve-documentdb.log")"
		sleep 0.1
	done
	info=$("$PY" -c 'import json,sys; d=json.load(open(sys.argv[1]))["documentdb"]; print(d["uri"], d["pid"], d["pg_pid"], d["pg_socket_dir"], d["pg_port"])' "$out")
	read -r URI fpid pgpid DDB_PG_SOCK DDB_PG_PORT <<<"$info"
	STORE_PIDS="$fpid $pgpid"
}

# The DocumentDB matrix: single mode at two backlogs, the raw ceiling and the
# old algorithm, partitioned with 1-3 replicas, each at every round trip of
# BENCH_RTTS (0: direct; else through tdrain-latproxy); then the proxy's own
# ceiling (the raw reference through it at 0 ms added) and the steady run.
run_documentdb() {
	local rtt n1 n2 n k rep
	STORE_KIND=documentdb
	STORE_SET=${BENCH_DOCUMENTDB_SET:-}
	read -r n1 n2 <<<"$DDB_SIZES"
	for rtt in $RTTS; do
		RTT_US=$(( rtt * 1000 ))
		STORE_LABEL=documentdb
		[ "$rtt" != 0 ] && STORE_LABEL=documentdb+${rtt}ms
		# What the round trip really is (a ping's, p50), direct and through the proxy.
		run_begin
		RTT_NOTES="${RTT_NOTES:+$RTT_NOTES; }+$rtt ms: $("$REFS" rtt --uri "$RUN_URI" | sed -n 's/.*p50_us=\([0-9]*\).*/\1/p') us"
		run_end
		log "$STORE_LABEL: store round trip +$rtt ms (ping p50: $RTT_NOTES)"
		for rep in $(seq 1 "$DDB_PAIRS"); do
			for n in $n1 $n2; do
				if want drain; then
					run_tdrain "drain-$n" "$STORE_LABEL" "$n" single 1 \
						"$([ "$rep" = 1 ] && [ "$rtt" = 0 ] && [ "$n" = "$n2" ] && echo plot)"
				fi
				if want raw; then run_ref raw "raw-$n" "$STORE_LABEL" "$n"; fi
			done
		done
		if want old; then
			[ "$DDB_OLD_SIZE" = "$n1" ] && want drain || run_tdrain "drain-$DDB_OLD_SIZE" "$STORE_LABEL" "$DDB_OLD_SIZE" single 1
			run_ref old "old-$DDB_OLD_SIZE" "$STORE_LABEL" "$DDB_OLD_SIZE"
		fi
		if want part; then
			for k in 1 2 3; do run_tdrain "part-$k" "$STORE_LABEL" "$DDB_PART_SIZE" partitioned "$k"; done
		fi
	done
	RTT_US=0
	if want raw; then
		# The proxy's own ceiling: the raw reference through it, nothing added.
		STORE_LABEL=documentdb+proxy
		FORCE_PROXY=1 run_begin
		RTT_NOTES="${RTT_NOTES:+$RTT_NOTES; }proxy +0 ms: $("$REFS" rtt --uri "$RUN_URI" | sed -n 's/.*p50_us=\([0-9]*\).*/\1/p') us"
		run_end
		FORCE_PROXY=1 run_ref raw "raw-$n1" "$STORE_LABEL" "$n1"
	fi
	if want steady; then
		STORE_LABEL=documentdb
		run_steady "$STORE_LABEL" "$DDB_RATE" "$STEADY_S"
	fi
}

STORE_KIND=""
RTT_US=0
RUN_URI=""
RTTS=${BENCH_RTTS:-0 1}
OLD_S=${BENCH_OLD_S:-60}
if [ -n "${BENCH_URI:-}" ]; then
	URI=$BENCH_URI
	STORE_PIDS=""
	SIZES=${BENCH_SIZES:-100000 1000000}
	OLD_SIZE=${BENCH_OLD_SIZE:-100000}
	PAIRS=${BENCH_PAIRS:-1}
	RATE=${BENCH_RATE:-5000}
	read -r n1 _ <<<"$SIZES"
	PART_SIZE=${BENCH_PART_SIZE:-$n1}
	run_store mongodb full
else
	if ! ferretdb_ready; then
		log "FerretDB, PostgreSQL or pymongo missing: running scripts/deps.sh"
		bash "$SRCDIR/scripts/deps.sh" >&2
	fi
	if want documentdb; then
		# DocumentDB first: the issue-14 matrix (backlogs of 100,000 and 1,000,000).
		DDB_SIZES=${BENCH_DDB_SIZES:-100000 1000000}
		DDB_OLD_SIZE=${BENCH_DDB_OLD_SIZE:-${DDB_SIZES%% *}}
		DDB_PART_SIZE=${BENCH_DDB_PART_SIZE:-${DDB_SIZES%% *}}
		DDB_PAIRS=${BENCH_DDB_PAIRS:-1}
		DDB_RATE=${BENCH_DDB_RATE:-2000}
		start_documentdb
		log "DocumentDB at $URI"
		run_documentdb
		stop_ferretdb # the last harness serve: DocumentDB's
	fi
	STORE_KIND=ferretdb
	STORE_SET=${BENCH_FERRETDB_SET-$FERRETDB_SET}
	# FerretDB scans the FIFO for every acknowledgement, so a drain costs O(backlog^2)
	# there: 10,000 -> 20,000 keeps the whole run under 20 minutes on 2 cores and
	# still shows the rate falling with the backlog (docs/PERFORMANCE.md).
	SIZES=${BENCH_SIZES:-10000 20000}
	OLD_SIZE=${BENCH_OLD_SIZE:-3000}
	# One pair when the DocumentDB matrix runs too (it keeps make bench within ~35 minutes).
	PAIRS=${BENCH_PAIRS:-$(want documentdb && echo 1 || echo 2)}
	RATE=${BENCH_RATE:-100}
	read -r n1 _ <<<"$SIZES"
	PART_SIZE=${BENCH_PART_SIZE:-$n1}
	first=1
	want ferretdb || BENCH_STORES=" "
	for backend in ${BENCH_STORES:-postgresql sqlite}; do
		start_ferretdb "$backend"
		log "FerretDB ($backend) at $URI"
		if [ $first = 1 ]; then run_store "ferretdb-$backend" full; else run_store "ferretdb-$backend" short; fi
		first=0
		stop_ferretdb
	done
fi
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)

# ---------------------------------------------------------------- the table
{
	echo "tdrain benchmark, $(date -u '+%Y-%m-%d %H:%M UTC'), $(git -C "$SRCDIR" describe --always --dirty 2>/dev/null || echo unknown)"
	machine
	echo "load average (1/5/15 min): start $LOAD_START, end $LOAD_END; total run $(( $(date +%s) - T_BEGIN )) s"
	echo "tdrain settings: drain.batch_size=$BATCH${BENCH_SET:+ $BENCH_SET}; on FerretDB ${BENCH_FERRETDB_SET-$FERRETDB_SET}${BENCH_DOCUMENTDB_SET:+; on DocumentDB $BENCH_DOCUMENTDB_SET} (others: defaults)"
	[ -n "${RTT_NOTES:-}" ] && echo "DocumentDB ping round trip, p50 (direct, then through tdrain-latproxy adding half of it each way): $RTT_NOTES"
	echo
	# A scenario run more than once (BENCH_PAIRS) is one row: its fastest run, the others' rates in the notes.
	awk -F'\t' '
		function ratio(a, b) { return (a + 0 > 0 && b + 0 > 0) ? sprintf("%.2f", a / b) : "-" }
		{ k = $1 "|" $2 "|" $3
		  if (k in at) {
			i = at[k]
			if ($4 + 0 > ack[i] + 0) { other[i] = other[i] " " ack[i]; keep = 1 } else { other[i] = other[i] " " $4; keep = 0 }
			if (!keep) next
		  } else { i = ++NROWS; at[k] = i }
		  sc[i] = $1; st[i] = $2; n[i] = $3; ack[i] = $4; e2e[i] = $5; p50[i] = $6; p99[i] = $7
		  cpu[i] = $8; rss[i] = $9; scpu[i] = $10; note[i] = $11 }
		END {
			for (i = 1; i <= NROWS; i++) {
				if (sc[i] ~ /^raw-/) raw[st[i] "|" n[i]] = ack[i]
				if (sc[i] ~ /^old-/) old[st[i] "|" n[i]] = ack[i]
				if (other[i] != "") note[i] = note[i] "; best of " (split(other[i], o, " ") + 1) ", other run(s):" other[i] " acked/s"
			}
			fmt = "%-12s %-20s %9s %9s %9s %15s %9s %8s %11s %8s %8s  %s\n"
			printf fmt, "scenario", "store", "backlog", "acked/s", "visible/s", "p50/p99 s", "cpu us/ev", "RSS MiB",
				"store us/ev", "vs raw", "vs old", "notes"
			for (i = 1; i <= NROWS; i++) {
				lat = (p50[i] != "-" && p50[i] != "") ? sprintf("%.2f/%.2f", p50[i], p99[i]) : "-"
				vr = "-"; vo = "-"
				if (sc[i] ~ /^drain-/) { vr = ratio(ack[i], raw[st[i] "|" n[i]]); vo = ratio(e2e[i], old[st[i] "|" n[i]]) }
				printf fmt, sc[i], st[i], n[i], ack[i], e2e[i], lat, cpu[i], (rss[i] > 0 ? sprintf("%.1f", rss[i] / 1024) : "-"),
					scpu[i], vr, vo, note[i]
			}
		}' "$ROWS"
	if [ -s "$OUT/loads.tsv" ]; then
		echo
		echo "loads (loadgen, plus on DocumentDB the FIFO index build): $(awk -F'\t' '{ k = $1 " " $2; s[k] += $3; c[k]++ } END { for (k in s) printf "%s%s: %.1f s x%d", (i++ ? "; " : ""), k, s[k] / c[k], c[k] }' "$OUT/loads.tsv")"
	fi
	echo
	echo "per batch (tdrain: its own metrics, summed over replicas; references: their own clocks). ms per batch = drain time / batches."
	echo "statements per batch: every wire message sent to the store through the proxy / batches (only for proxied runs; tdrain's include the fold, leases and metrics)."
	awk -F'\t' '
		BEGIN { fmt = "%-12s %-20s %9s %8s %9s %9s %14s %18s %10s\n"
			printf fmt, "scenario", "store", "backlog", "batches", "ms/batch", "read ms", "claim/valid ms", "commit+ack+del ms", "stmts/bat" }
		NF >= 17 && $12 + 0 > 0 { k = $1 "|" $2 "|" $3; if (k in seen) next; seen[k] = 1
			printf fmt, $1, $2, $3, $12, $17, $13, $14, $15, $16 }' "$ROWS"
	if grep -q '^drain-.*documentdb' "$ROWS"; then
		echo
		echo "targets (issue 14; printed, never asserted):"
		awk -F'\t' -v n1="${DDB_SIZES%% *}" -v n2="${DDB_SIZES##* }" -v nold="${DDB_OLD_SIZE:-}" -v rtts="$RTTS" '
			function r(a, b) { return (a + 0 > 0 && b + 0 > 0) ? sprintf("%.2f", a / b) : "-" }
			function ok(v, op, t) { if (v == "-") return "n/a"; return (op == ">=" ? v + 0 >= t : v + 0 <= t) ? "met" : "NOT met" }
			{ k = $1 "|" $2 "|" $3; if (k in ack) next
			  ack[k] = $4; vis[k] = $5; cpu[k] = $8; rss[k] = $9; bms[k] = $17 }
			END {
				nr = split(rtts, R, " ")
				for (i = 1; i <= nr; i++) {
					st = R[i] == 0 ? "documentdb" : "documentdb+" R[i] "ms"
					for (j = 1; j <= 2; j++) { n = j == 1 ? n1 : n2
						v = r(ack["drain-" n "|" st "|" n], ack["raw-" n "|" st "|" n])
						printf "  %-44s %-16s %6s  (>= 0.9: %s)\n", "acknowledged / raw ceiling, " n, st, v, ok(v, ">=", 0.9)
						v = r(vis["drain-" n "|" st "|" n], ack["drain-" n "|" st "|" n])
						printf "  %-44s %-16s %6s  (>= 0.9: %s)\n", "visible / acknowledged, " n, st, v, ok(v, ">=", 0.9)
					}
					v = r(vis["drain-" nold "|" st "|" nold], ack["old-" nold "|" st "|" nold])
					printf "  %-44s %-16s %6s  (%s)\n", "visible / old algorithm, " nold, st, v, R[i] == 1 ? ">= 20: " ok(v, ">=", 20) : "target is at 1 ms"
					v = r(bms["drain-" n2 "|" st "|" n2], bms["drain-" n1 "|" st "|" n1])
					printf "  %-44s %-16s %6s  (<= 1.2: %s)\n", "per-batch time " n2 " / " n1, st, v, ok(v, "<=", 1.2)
					v = r(rss["drain-" n2 "|" st "|" n2], rss["drain-" n1 "|" st "|" n1])
					printf "  %-44s %-16s %6s  (<= 1.1: %s)\n", "peak RSS " n2 " / " n1, st, v, ok(v, "<=", 1.1)
					v = cpu["drain-" n2 "|" st "|" n2]; v = v == "" ? "-" : v
					printf "  %-44s %-16s %6s  (<= 10: %s)\n", "worker CPU us/event at " n2, st, v, ok(v, "<=", 10)
					printf "  %-44s %-16s %6s  (report; visible: %s)\n", "partitioned 2 / 1 replicas, acknowledged", st,
						r(ack["part-2|" st "|" n1], ack["part-1|" st "|" n1]), r(vis["part-2|" st "|" n1], vis["part-1|" st "|" n1])
				}
				printf "  %-44s %-16s %6s  (the proxy'"'"'s own ceiling: raw through it at +0 ms / raw direct)\n", "proxy ceiling, raw " n1, "documentdb+proxy",
					r(ack["raw-" n1 "|documentdb+proxy|" n1], ack["raw-" n1 "|documentdb|" n1])
			}' "$ROWS"
	fi
} | tee "$OUT/table.txt"

if command -v gnuplot >/dev/null 2>&1 && [ -s "$OUT/perf-drain.dat" ]; then
	gnuplot -e "datafile='$OUT/perf-drain.dat'; ratefile='$OUT/perf-drain-rate.dat'; outfile='$OUT/perf-drain.png'; subtitle='$PLOT_TITLE'; machine='$(machine | cut -c10-)'" \
		"$SRCDIR/bench/plot.gp" && log "plot: $OUT/perf-drain.png"
fi
log "done in $(( $(date +%s) - T_BEGIN )) s; results in $OUT"
