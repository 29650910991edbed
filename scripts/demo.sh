#!/usr/bin/env bash
# scripts/demo.sh - tdrain end to end, on local servers it starts itself.
#
#   1. builds tdrain if $BUILD_DIR/tdrain is missing (scripts/deps.sh, autoreconf -fi,
#      configure and make in $BUILD_DIR, default ./build)
#   2. starts the store on free loopback ports (tests/harness.py serve): DocumentDB by default
#      (PostgreSQL 15 + DocumentDB + its gateway: real indexes and atomic updates, the store
#      closest to MongoDB; scripts/deps.sh builds it on first use), or FerretDB 1.24 with
#      DEMO_STORE=ferretdb; and, with DEMO_BACKEND=etcd, etcd
#   3. two producers (tdrain-loadgen) insert DEMO_EVENTS telemetry events: cli_invocation,
#      daily_sign_in and a few other names from DEMO_DEVICES devices, some signed in as one of
#      DEMO_USERS usernames; producer A writes `part` itself, producer B leaves it to the
#      replicas; B also sends a small corpus of malformed documents (dead letters)
#   4. three replicas alpha, bravo, charlie in partitioned mode (16 partitions; one of them
#      also holds the leader lease and folds), started once DEMO_PRELOAD events are in the FIFO
#   5. live progress every 2 s: backlog, events/s drained, fold lag, leader and partitions
#   6. when the FIFO is empty and folded: stops the replicas, runs tests/checker.py (an
#      independent recomputation of every derived document), prints a summary
#   7. stops exactly the processes it started, and exits 0 only if the FIFO drained to
#      zero and the checker found no mismatch
#
# On DocumentDB (and DEMO_URI) the producers pre-load DEMO_PRELOAD events (1,000,000) as fast as
# they can, the replicas start, and the producers keep inserting the rest at DEMO_RATE while the
# backlog drains.  FerretDB scans the whole collection for every keyed statement (docs/DESIGN.md,
# "Store access paths (measured)"), so on FerretDB the producers behave like an ingest that
# answers 503 when the backlog is too deep: they insert as fast as they can while the FIFO holds
# fewer than DEMO_MAX_BACKLOG events, and wait otherwise.
#
# Environment:
#   DEMO_STORE      documentdb (default) or ferretdb: the local store to start (not with DEMO_URI)
#   DEMO_EVENTS     events to insert, duplicates and malformed documents not included
#                   (DocumentDB: 1,200,000; FerretDB and DEMO_URI: 200,000)
#   DEMO_RATE       events/s after the pre-load, both producers together; 0 = as fast as
#                   possible (DocumentDB: 2000; FerretDB and DEMO_URI: 0)
#   DEMO_MAX_BACKLOG  producers wait while the FIFO holds this many events or more
#                   (FerretDB: 5000; DocumentDB and DEMO_URI: 0 = never)
#   DEMO_PRELOAD    events inserted before the replicas start (DocumentDB: 1,000,000;
#                   FerretDB: 20 s of production, at most 10000; DEMO_URI: DEMO_EVENTS)
#   DEMO_URI        use this MongoDB instead of starting FerretDB (a database DEMO_DB that
#                   must be empty or absent; dropped at the end unless DEMO_KEEP=1)
#   DEMO_DB         database (default tdrain; tdrain_demo with DEMO_URI)
#   DEMO_BACKEND    mongo (leases in the store, default) or etcd (starts a local etcd)
#   DEMO_DEVICES    devices in the fleet, split between the producers (5000)
#   DEMO_USERS      usernames (1500)
#   DEMO_DUP_RATIO  fraction of events a producer sends twice, same insert_id
#                   (FerretDB: 0; DEMO_URI: 0.01)
#   DEMO_MALFORMED  1: producer B sends the malformed corpus too (default 1)
#   DEMO_TIMEOUT    give up if the drain is not done after this many seconds
#                   (DEMO_EVENTS / DEMO_RATE + 900; without a rate DEMO_EVENTS / 100 + 900)
#   DEMO_FOLD_MAX_DELTAS  fold.max_deltas of the replicas (500)
#   DEMO_SET        extra "key=value ..." settings for every replica's configuration
#   DEMO_KEEP=1     keep the demo directory (logs, configs, metrics, NDJSON) and server data
#   BUILD_DIR       build tree (default ./build); JOBS (default 2) for make
#   NO_COLOR        no bold/colour even on a terminal (never any when stdout is not one)
set -euo pipefail

START=$(date +%s)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

BUILD_DIR=${BUILD_DIR:-$ROOT/build}
case $BUILD_DIR in /*) ;; *) BUILD_DIR=$ROOT/$BUILD_DIR ;; esac
JOBS=${JOBS:-2}
PYTHON3=/usr/bin/python3           # Debian's python3, which has python3-pymongo
[ -x "$PYTHON3" ] || PYTHON3=$(command -v python3)

URI=${DEMO_URI:-}
STORE=${DEMO_STORE:-documentdb}
case $STORE in documentdb | ferretdb) ;; *) printf 'demo: DEMO_STORE must be documentdb or ferretdb\n' >&2; exit 1 ;; esac
[ -n "$URI" ] && STORE=external
if [ "$STORE" = documentdb ]; then
	EVENTS=${DEMO_EVENTS:-1200000}
else
	EVENTS=${DEMO_EVENTS:-200000}
fi
BACKEND=${DEMO_BACKEND:-mongo}
DEVICES=${DEMO_DEVICES:-5000}
USERS=${DEMO_USERS:-1500}
MALFORMED=${DEMO_MALFORMED:-1}
KEEP=${DEMO_KEEP:-0}
EXTRA_SET=${DEMO_SET:-}
FOLD_MAX_DELTAS=${DEMO_FOLD_MAX_DELTAS:-500}
if [ -n "$URI" ]; then
	RATE=${DEMO_RATE:-0}
	PRELOAD=${DEMO_PRELOAD:-$EVENTS}
	DB=${DEMO_DB:-tdrain_demo}
	DUP_RATIO=${DEMO_DUP_RATIO:-0.01}
	MAX_BACKLOG=${DEMO_MAX_BACKLOG:-0}
elif [ "$STORE" = documentdb ]; then
	# Every statement is index-served: a deep pre-loaded backlog, then a steady stream on top.
	RATE=${DEMO_RATE:-2000}
	PRELOAD=${DEMO_PRELOAD:-1000000}
	DB=${DEMO_DB:-tdrain}
	DUP_RATIO=${DEMO_DUP_RATIO:-0.01}
	MAX_BACKLOG=${DEMO_MAX_BACKLOG:-0}
else
	# As fast as the replicas drain: the producers wait while the FIFO is deep (an
	# acknowledgement scans the FIFO on FerretDB, so its depth sets the drain rate).
	RATE=${DEMO_RATE:-0}
	MAX_BACKLOG=${DEMO_MAX_BACKLOG:-5000}
	PRELOAD=${DEMO_PRELOAD:-}
	DB=${DEMO_DB:-tdrain}
	# No re-sent events by default: on FerretDB a fold round that meets a duplicate
	# insert_id reads the whole ledger (one entry per event so far) to tell its own.
	DUP_RATIO=${DEMO_DUP_RATIO:-0}
fi
[[ $RATE =~ ^[0-9]+(\.[0-9]+)?$ ]] || { printf 'demo: DEMO_RATE must be a number (0: as fast as possible)\n' >&2; exit 1; }
RATE_INT=$(awk -v r="$RATE" 'BEGIN { printf "%d", r }')
# FerretDB: the initial backlog is what the producers insert in their first 20 s (at most 10,000).
if [ -z "$PRELOAD" ]; then
	PRELOAD=$((RATE_INT * 20))
	{ [ "$RATE_INT" = 0 ] || [ "$PRELOAD" -gt 10000 ]; } && PRELOAD=10000
fi
if [ "$RATE_INT" -gt 0 ]; then
	TIMEOUT=${DEMO_TIMEOUT:-$(((EVENTS - PRELOAD) / RATE_INT + PRELOAD / 1000 + 900))}
else
	TIMEOUT=${DEMO_TIMEOUT:-$((EVENTS / 100 + 900))}
fi
PARTITIONS=16
# Rendezvous hashing gives these names 5/6/5 of the 16 partitions (a, b, c would get 3/11/2).
REPLICAS=(alpha bravo charlie)
INTERVAL=2

# ---- output ------------------------------------------------------------------
if [ -t 1 ] && [ -z "${NO_COLOR:-}" ] && [ "${TERM:-}" != dumb ]; then
	B=$'\033[1m' G=$'\033[32m' R=$'\033[31;1m' D=$'\033[2m' N=$'\033[0m'
else
	B='' G='' R='' D='' N=''
fi
say() { printf '\n%s==> %s%s\n' "$B" "$*" "$N"; }
info() { printf '    %s\n' "$*"; }
die() { printf '%sdemo: %s%s\n' "$R" "$*" "$N" >&2; exit 1; }
fmt() { printf '%d' "$1" | sed -e ':a' -e 's/\([0-9]\)\([0-9]\{3\}\)\($\|,\)/\1,\2\3/' -e 'ta'; }
isint() { [[ $1 =~ ^[0-9]+$ ]]; }
dur() { if [ "$1" -ge 60 ]; then printf '%dm%02ds' $(($1 / 60)) $(($1 % 60)); else printf '%ds' "$1"; fi; }

isint "$EVENTS" && [ "$EVENTS" -ge 2 ] || die "DEMO_EVENTS must be an integer >= 2"
isint "$PRELOAD" || die "DEMO_PRELOAD must be a non-negative integer"
isint "$MAX_BACKLOG" || die "DEMO_MAX_BACKLOG must be a non-negative integer"
[ "$PRELOAD" -le "$EVENTS" ] || PRELOAD=$EVENTS
# The replicas start once the initial backlog is in; producers that wait for the FIFO to
# shrink below DEMO_MAX_BACKLOG must be able to insert all of it first.
if [ "$MAX_BACKLOG" -gt 0 ] && [ "$PRELOAD" -ge "$MAX_BACKLOG" ]; then PRELOAD=$((MAX_BACKLOG / 2)); fi
isint "$DEVICES" && [ "$DEVICES" -ge 2 ] || die "DEMO_DEVICES must be an integer >= 2"
isint "$USERS" && [ "$USERS" -ge 1 ] || die "DEMO_USERS must be a positive integer"
isint "$TIMEOUT" || die "DEMO_TIMEOUT must be a number of seconds"
case $BACKEND in mongo | etcd) ;; *) die "DEMO_BACKEND must be mongo or etcd" ;; esac
if [ -n "$URI" ]; then
	case $URI in mongodb://* | mongodb+srv://*) ;; *) die "DEMO_URI must start with mongodb://" ;; esac
fi
[[ $DB =~ ^[A-Za-z0-9_-]+$ ]] || die "DEMO_DB: letters, digits, '-' and '_' only"

# ---- everything this script starts, and its teardown ---------------------------
DIR=''
SERVE_PID='' WATCH_PID=''
declare -A PROD_PID=() REPL_PID=()
FAILED=1
CLEANED=0

# A process we started that has not exited (a zombie not yet reaped has).
alive() {
	kill -0 "$1" 2>/dev/null && [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]
}
producers_running() {
	local n
	for n in "${!PROD_PID[@]}"; do alive "${PROD_PID[$n]}" && return 0; done
	return 1
}

# Stop one process we started: SIGTERM (and SIGCONT), wait up to $2 s, then SIGKILL.
stop_pid() {
	local pid=$1 grace=${2:-20} i
	[ -n "$pid" ] || return 0
	kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null; return 0; }
	kill -TERM "$pid" 2>/dev/null
	kill -CONT "$pid" 2>/dev/null
	for ((i = 0; i < grace * 10; i++)); do
		alive "$pid" || break
		sleep 0.1
	done
	if alive "$pid"; then
		printf 'demo: pid %s (%s, state %s) did not stop after %ss: SIGKILL\n' "$pid" \
			"$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | cut -c1-60)" \
			"$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" "$grace" >&2
		kill -KILL "$pid" 2>/dev/null
	fi
	wait "$pid" 2>/dev/null
}

cleanup() {
	local rc=$? n i
	[ "$CLEANED" = 1 ] && return
	CLEANED=1
	set +e
	trap '' INT TERM
	[ -n "$WATCH_PID" ] && stop_pid "$WATCH_PID" 5
	if producers_running; then
		printf '\ndemo: stopping the producers\n'
		for n in "${!PROD_PID[@]}"; do stop_pid "${PROD_PID[$n]}" 10; done
	fi
	if [ "${#REPL_PID[@]}" -gt 0 ]; then
		printf 'demo: stopping the replicas (pids %s; up to 60 s for an in-flight batch)\n' "${REPL_PID[*]}"
		for n in "${!REPL_PID[@]}"; do kill -TERM "${REPL_PID[$n]}" 2>/dev/null; done
		for n in "${!REPL_PID[@]}"; do stop_pid "${REPL_PID[$n]}" 60; done
	fi
	if [ -n "$SERVE_PID" ]; then
		printf 'demo: stopping the servers (harness pid %s)\n' "$SERVE_PID"
		# End of its stdin: the harness stops its servers and removes their data.  Let it
		# finish: a SIGTERM in the middle of that makes it exit at once, leaving a server.
		exec 7>&- 2>/dev/null
		for ((i = 0; i < 600; i++)); do alive "$SERVE_PID" || break; sleep 0.1; done
		stop_pid "$SERVE_PID" 30
		[ "$KEEP" = 1 ] && [ -s "$DIR/serve.json" ] &&
			printf 'demo: server data kept in %s\n' "$("$PYTHON3" -c 'import json,sys; print(json.load(open(sys.argv[1]))["tmp"])' "$DIR/serve.json" 2>/dev/null)"
	fi
	if [ -n "$URI" ] && [ "$KEEP" != 1 ] && [ -n "$DIR" ] && [ -f "$DIR/.db-created" ]; then
		"$PYTHON3" -c 'import sys, pymongo; pymongo.MongoClient(sys.argv[1], serverSelectionTimeoutMS=5000).drop_database(sys.argv[2])' \
			"$URI" "$DB" 2>/dev/null || printf 'demo: could not drop database %s\n' "$DB" >&2
	fi
	if [ -n "$DIR" ] && [ -d "$DIR" ]; then
		if [ "$KEEP" = 1 ] || [ "$FAILED" = 1 ]; then
			printf '\nThe demo directory is kept: %s\n' "$DIR"
		else
			rm -rf "$DIR"
		fi
	fi
	local t=$(($(date +%s) - START))
	if [ "$FAILED" = 0 ] && [ "$rc" = 0 ]; then
		printf '\n%sdemo: OK%s in %dm%02ds\n' "$G$B" "$N" $((t / 60)) $((t % 60))
	else
		[ "$rc" = 0 ] && rc=1
		printf '\n%sdemo: FAILED%s after %dm%02ds (status %d)\n' "$R" "$N" $((t / 60)) $((t % 60)) "$rc"
	fi
	exit "$rc"
}
trap cleanup EXIT
trap 'printf "\ndemo: interrupted\n"; exit 130' INT
trap 'exit 143' TERM

# ---- 1. build --------------------------------------------------------------------
ferretdb_bin() {
	printf '%s\n' "${FERRETDB:-${TDRAIN_CACHE:-$HOME/.cache/tdrain}/bin/ferretdb}"
}
need_deps=0
[ -x "$BUILD_DIR/tdrain" ] || need_deps=1
[ "$STORE" = ferretdb ] && ! "$(ferretdb_bin)" --version >/dev/null 2>&1 && need_deps=1
[ "$STORE" = documentdb ] && [ ! -x "${DOCUMENTDB_GATEWAY:-${TDRAIN_CACHE:-$HOME/.cache/tdrain}/documentdb/current/bin/documentdb_gateway}" ] &&
	need_deps=1
[ "$BACKEND" = etcd ] && ! command -v etcd >/dev/null 2>&1 && need_deps=1
"$PYTHON3" -c 'import pymongo' 2>/dev/null || need_deps=1
if [ "$need_deps" = 1 ] && [ "${TDRAIN_SKIP_DEPS:-0}" != 1 ]; then
	say "dependencies (scripts/deps.sh; a first DocumentDB build takes about 5-7 minutes)"
	FERRETDB=$(bash "$ROOT/scripts/deps.sh" | tail -n 1)
	export FERRETDB
	PYTHON3=/usr/bin/python3
fi
if [ ! -x "$BUILD_DIR/tdrain" ]; then
	if [ ! -f "$BUILD_DIR/Makefile" ]; then
		say "autoreconf -fi; configure in $BUILD_DIR"
		mkdir -p m4                  # git keeps no empty directory; aclocal wants it
		autoreconf -fi
		mkdir -p "$BUILD_DIR"
		(cd "$BUILD_DIR" && "$ROOT/configure" -q PYTHON3="$PYTHON3")
	fi
	say "make -j$JOBS (in $BUILD_DIR)"
	make -C "$BUILD_DIR" -j"$JOBS" >"$BUILD_DIR/demo-make.log" 2>&1 || {
		tail -n 40 "$BUILD_DIR/demo-make.log"
		die "make failed (log: $BUILD_DIR/demo-make.log)"
	}
fi
# tdrain-loadgen is a check program: built on demand
for prog in tdrain-loadgen tdrainctl; do
	if [ ! -x "$BUILD_DIR/$prog" ]; then
		make -C "$BUILD_DIR" -j"$JOBS" "$prog" >/dev/null || die "could not build $prog in $BUILD_DIR"
	fi
done
TDRAIN=$BUILD_DIR/tdrain
LOADGEN=$BUILD_DIR/tdrain-loadgen
TDRAINCTL=$BUILD_DIR/tdrainctl

# ---- the plan ---------------------------------------------------------------------
RATE_TXT=$(awk -v r="$RATE" 'BEGIN { if (r + 0 == 0) print "as fast as they can"; else printf "%d events/s", r }')
say "tdrain demo: 3 replicas, partitioned mode ($PARTITIONS partitions), $(fmt "$EVENTS") events"
if [ "$STORE" = documentdb ]; then
	cat <<EOF
    The store is DocumentDB (PostgreSQL 15 + the DocumentDB extensions + its MongoDB-wire
    gateway), started here on free loopback ports: real indexes and atomic updates, the store
    closest to MongoDB.  Two producers pre-load $(fmt "$PRELOAD") events as fast as they can; then
    the replicas start and the producers keep inserting the other $(fmt $((EVENTS - PRELOAD))) at $RATE_TXT
    (DEMO_RATE) while the backlog drains.  DEMO_STORE=ferretdb runs the FerretDB demo.
EOF
elif [ "$STORE" = ferretdb ]; then
	cat <<EOF
    The store is FerretDB 1.24 (SQLite backend), started here on a free loopback port.
    FerretDB scans the whole collection for every keyed statement, so acknowledging a batch
    costs O(backlog) there (docs/DESIGN.md, "Store access paths (measured)"): a pre-loaded
    backlog of $(fmt "$EVENTS") events would take well over half an hour to drain.  So two producers
    insert $RATE_TXT (DEMO_RATE) after an initial backlog of $(fmt "$PRELOAD"), and wait
    while the FIFO holds $(fmt "$MAX_BACKLOG") events or more (DEMO_MAX_BACKLOG), as an ingest that
    answers 503 would: the replicas' drain rate sets the pace.
EOF
	if [ "$RATE_INT" -gt 0 ]; then
		info "Streaming $(fmt "$EVENTS") events at that rate takes $(dur $((EVENTS / RATE_INT))); the fold's tail comes on top."
	fi
	cat <<EOF
    Against MongoDB set DEMO_URI=mongodb://... to use a real server and a pre-loaded backlog
    (DEMO_PRELOAD=$(fmt "$EVENTS"), the default there).
EOF
else
	info "The store is the MongoDB at DEMO_URI (database $DB)."
	if [ "$PRELOAD" -ge "$EVENTS" ]; then
		info "All $(fmt "$EVENTS") events are loaded before the replicas start (DEMO_PRELOAD), $RATE_TXT."
	else
		info "$(fmt "$PRELOAD") events are loaded before the replicas start; the rest stream in at $RATE_TXT."
	fi
fi
info "Leases: $([ "$BACKEND" = etcd ] && echo "etcd (started here)" || echo "in the store (tdrain_leases)"); DEMO_BACKEND=etcd|mongo chooses."

# ---- 2. servers -----------------------------------------------------------------
DIR=$(mktemp -d "${TMPDIR:-/var/tmp}/tdrain-demo.XXXXXX")
ETCD=''
STORE_NAME=$([ "$STORE" = documentdb ] && echo DocumentDB || echo FerretDB)
if [ -z "$URI" ] || [ "$BACKEND" = etcd ]; then
	say "starting $([ -z "$URI" ] && printf '%s' "$STORE_NAME")$([ -z "$URI" ] && [ "$BACKEND" = etcd ] && printf ' and ')$([ "$BACKEND" = etcd ] && printf 'etcd') (tests/harness.py serve)"
	SERVE_ARGS=(--json)
	[ "$STORE" = ferretdb ] && SERVE_ARGS+=(--ferretdb --backend sqlite)
	[ "$STORE" = documentdb ] && SERVE_ARGS+=(--documentdb)
	[ "$BACKEND" = etcd ] && SERVE_ARGS+=(--etcd)
	[ "$KEEP" = 1 ] && SERVE_ARGS+=(--keep)
	mkfifo "$DIR/serve.in"
	# Its own session: a Ctrl-C reaches only this script, which stops things in order.
	# It runs until its stdin closes: when this script ends, however it ends.
	setsid "$PYTHON3" "$ROOT/tests/harness.py" serve "${SERVE_ARGS[@]}" \
		<"$DIR/serve.in" >"$DIR/serve.json" 2>"$DIR/serve.log" &
	SERVE_PID=$!
	exec 7>"$DIR/serve.in"
	for ((i = 0; i < 600; i++)); do
		[ -s "$DIR/serve.json" ] && break
		kill -0 "$SERVE_PID" 2>/dev/null || { cat "$DIR/serve.log" >&2; die "the servers did not start"; }
		sleep 0.1
	done
	[ -s "$DIR/serve.json" ] || die "the servers did not start within 60 s (log: $DIR/serve.log)"
	if [ -z "$URI" ]; then
		key=$([ "$STORE" = documentdb ] && echo documentdb || echo ferretdb)
		URI=$("$PYTHON3" -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]]["uri"])' "$DIR/serve.json" "$key")
		# The URI carries the test user's password: show it redacted, as tdrain logs it.
		info "$STORE_NAME  $(printf '%s' "$URI" | sed 's|//\([^:/@]*\):[^@]*@|//\1:***@|')   log $("$PYTHON3" -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]]["log"])' "$DIR/serve.json" "$key")"
		LOCAL_STORE=1
	fi
	if [ "$BACKEND" = etcd ]; then
		ETCD=$("$PYTHON3" -c 'import json,sys; print(json.load(open(sys.argv[1]))["etcd"]["endpoint"])' "$DIR/serve.json")
		info "etcd      $ETCD   log $("$PYTHON3" -c 'import json,sys; print(json.load(open(sys.argv[1]))["etcd"]["log"])' "$DIR/serve.json")"
	fi
fi
LOCAL_STORE=${LOCAL_STORE:-0}
DIRECT=()
[ "$LOCAL_STORE" = 1 ] && DIRECT=(--direct)

if [ "$LOCAL_STORE" = 0 ]; then
	# An existing MongoDB: never touch a database that holds something.
	n=$("$PYTHON3" -c 'import sys, pymongo
c = pymongo.MongoClient(sys.argv[1], serverSelectionTimeoutMS=8000)
print(len(c[sys.argv[2]].list_collection_names()))' "$URI" "$DB") || die "cannot reach DEMO_URI"
	[ "$n" = 0 ] || die "database $DB at DEMO_URI is not empty: set DEMO_DB to a new name, or drop it"
	touch "$DIR/.db-created"
fi

# ---- 3. configuration -------------------------------------------------------------
for r in "${REPLICAS[@]}"; do
	{
		printf '# tdrain demo, replica %s (generated by scripts/demo.sh)\n' "$r"
		printf 'store.uri = %s\n' "$URI"
		printf 'store.database = %s\n' "$DB"
		printf 'store.timeout_ms = 8000\n'
		printf 'coord.backend = %s\n' "$BACKEND"
		[ "$BACKEND" = etcd ] && printf 'coord.etcd_endpoint = %s\n' "$ETCD"
		printf 'coord.mode = partitioned\n'
		printf 'coord.partitions = %d\n' "$PARTITIONS"
		printf 'coord.lease_ttl_ms = 15000\n'
		printf 'coord.renew_deadline_ms = 10000\n'
		printf 'coord.retry_period_ms = 1000\n'
		printf 'drain.batch_size = 1000\n'
		printf 'metrics.file = %s/%s.prom\n' "$DIR" "$r"
		# The file is rewritten every second; this is how often the replica also
		# counts the FIFO for it, which FerretDB does by reading every document.
		printf 'metrics.interval_ms = %d\n' "$([ "$STORE" = ferretdb ] && echo 60000 || echo 5000)"
		# Deltas are small while the backlog is (a batch is split by partition), and a
		# round costs about the same however many it folds: let a round take more.
		printf 'fold.max_deltas = %d\n' "$FOLD_MAX_DELTAS"
		for kv in $EXTRA_SET; do printf '%s = %s\n' "${kv%%=*}" "${kv#*=}"; done
	} >"$DIR/$r.conf"
	"$TDRAIN" -c "$DIR/$r.conf" -N "$r" -n >/dev/null || die "tdrain refuses $DIR/$r.conf"
done

# ---- 3b. indexes ---------------------------------------------------------------------
# As docs/EVENTS.md ("Indexes MongoDB needs") tells a DBA: create them while the FIFO is empty.
# On a collection that already holds a backlog, DocumentDB queues the build for a job that runs
# once a minute and MongoDB takes minutes at millions of documents; tdrain drains meanwhile and
# retries the build (docs/OPERATIONS.md), but a demo that pre-loads 1,000,000 events first shows
# the steady state instead.
if [ "$STORE" != ferretdb ]; then
	"$PYTHON3" - "$URI" "$DB" "$LOCAL_STORE" "$STORE" <<'PY' || die "could not create the indexes"
import sys, pymongo
from pymongo import IndexModel
db = pymongo.MongoClient(sys.argv[1], serverSelectionTimeoutMS=8000, directConnection=sys.argv[3] == "1")[sys.argv[2]]
# One createIndexes per collection, as tdrain sends them (lib/store.c): DocumentDB builds at once
# only the indexes of the command that creates the collection, and queues any later one.
fifo = [IndexModel([("part", 1), ("_id", 1)], name="tdrain_part_id")]
if sys.argv[4] == "documentdb":
    # DocumentDB only (lib/store.c): its _id index does not serve {_id: {$in}} deletes.
    fifo.append(IndexModel([("_id", 1), ("part", 1)], name="tdrain_id"))
    db.tdrain_deltas.create_indexes([IndexModel([("_id", 1), ("part", 1)], name="tdrain_delta_id")])
db.events.create_indexes(fifo)
db.tdrain_claims.create_indexes([IndexModel([("part", 1), ("epoch", 1)], name="tdrain_part_epoch")])
db.tdrain_leases.create_indexes([IndexModel([("name", 1), ("epoch", 1)], name="tdrain_name_epoch", unique=True)])
PY
	info "indexes created on the empty collections (docs/EVENTS.md)"
fi

# ---- 4. producers ------------------------------------------------------------------
say "producers: $(fmt "$EVENTS") events from $(fmt "$DEVICES") devices and $(fmt "$USERS") usernames, $RATE_TXT"
HALF=$((EVENTS / 2))
DEV_A=$((DEVICES / 2))
start_producer() {   # name seed count devices rate extra-args...
	local name=$1 seed=$2 count=$3 devices=$4 rate=$5
	shift 5
	local args=(--uri "$URI" --db "$DB" --count "$count" --devices "$devices" --users "$USERS"
		--dup-ratio "$DUP_RATIO" --seed "$seed" --ndjson "$DIR/$name.ndjson" "$@")
	awk -v r="$rate" 'BEGIN { exit !(r + 0 > 0) }' && args+=(--rate "$rate")
	# A pre-load at full speed, then the rate (DocumentDB and DEMO_URI; FerretDB waits on the backlog).
	[ "$MAX_BACKLOG" = 0 ] && [ "$PRELOAD" -gt 0 ] && args+=(--burst $(((PRELOAD + 1) / 2)))
	[ "$MAX_BACKLOG" -gt 0 ] && args+=(--max-backlog "$MAX_BACKLOG")
	printf '%s\n' "${args[*]}" >"$DIR/$name.cmd"
	setsid "$LOADGEN" "${args[@]}" </dev/null >"$DIR/$name.out" 2>"$DIR/$name.err" &
	PROD_PID[$name]=$!
}
HALF_RATE=$(awk -v r="$RATE" 'BEGIN { printf "%g", r / 2 }')
CORPUS=()
[ "$MALFORMED" = 1 ] && CORPUS=(--malformed-corpus --manifest "$DIR/B.manifest")
start_producer A 101 "$HALF" "$DEV_A" "$HALF_RATE" --partitions "$PARTITIONS"
start_producer B 202 $((EVENTS - HALF)) $((DEVICES - DEV_A)) "$HALF_RATE" "${CORPUS[@]}"
info "A: $(fmt "$HALF") events, $(fmt "$DEV_A") devices, writes part     ($DIR/A.cmd)"
info "B: $(fmt $((EVENTS - HALF))) events, $(fmt $((DEVICES - DEV_A))) devices, no part$([ "$MALFORMED" = 1 ] && printf ', plus the malformed corpus')   ($DIR/B.cmd)"

inserted() {   # lines in the producers' NDJSON files: events the store acknowledged
	local f n=0 c
	for f in "$DIR"/A.ndjson "$DIR"/B.ndjson; do
		[ -f "$f" ] && c=$(wc -l <"$f") && n=$((n + c))
	done
	printf '%d\n' "$n"
}

if [ "$PRELOAD" -gt 0 ]; then
	say "initial backlog: $(fmt "$PRELOAD") events before the replicas start"
	last=0
	while :; do
		n=$(inserted)
		[ "$n" -ge "$PRELOAD" ] && break
		producers_running || break
		if [ -t 1 ]; then
			printf '\r    inserted %s of %s' "$(fmt "$n")" "$(fmt "$PRELOAD")"
		elif [ $(($(date +%s) - last)) -ge 10 ]; then
			printf '    inserted %s of %s\n' "$(fmt "$n")" "$(fmt "$PRELOAD")"
			last=$(date +%s)
		fi
		sleep 0.25
	done
	[ -t 1 ] && printf '\r\033[K'
	info "$(fmt "$(inserted)") events in the FIFO"
fi

# ---- 5. replicas --------------------------------------------------------------------
say "replicas ${REPLICAS[*]} (tdrain -c DIR/NAME.conf -N NAME)"
for r in "${REPLICAS[@]}"; do
	setsid "$TDRAIN" -c "$DIR/$r.conf" -N "$r" </dev/null >>"$DIR/$r.log" 2>&1 &
	REPL_PID[$r]=$!
	info "$r: pid ${REPL_PID[$r]}, log $DIR/$r.log"
done

# ---- 6. progress until drained -------------------------------------------------------
say "draining (a row every ${INTERVAL} s; drained = inserted - fifo)"
COMMON=(--state "$DIR" --uri "$URI" "${DIRECT[@]}" --db "$DB" --backend "$BACKEND"
	--partitions "$PARTITIONS" --interval "$INTERVAL" --rate "$RATE")
[ "$BACKEND" = etcd ] && COMMON+=(--etcd-endpoint "$ETCD")
WATCH_ARGS=("${COMMON[@]}" --timeout "$TIMEOUT" --ndjson "$DIR/A.ndjson" --ndjson "$DIR/B.ndjson")
for r in "${REPLICAS[@]}"; do WATCH_ARGS+=(--replica "$r=${REPL_PID[$r]}"); done
"$PYTHON3" "$ROOT/scripts/demo_progress.py" watch "${WATCH_ARGS[@]}" &
WATCH_PID=$!

# Wait for the producers (recording their status for the watcher) or for the
# watcher, whichever ends first: a watcher that stops early means a failure.
declare -A PROD_RC=()
watch_rc=''
while [ "${#PROD_RC[@]}" -lt "${#PROD_PID[@]}" ]; do
	pending=("$WATCH_PID")
	for n in "${!PROD_PID[@]}"; do [ -n "${PROD_RC[$n]:-}" ] || pending+=("${PROD_PID[$n]}"); done
	rc=0
	done_pid=''
	wait -n -p done_pid "${pending[@]}" || rc=$?
	if [ "$done_pid" = "$WATCH_PID" ]; then
		watch_rc=$rc
		WATCH_PID=''
		break
	fi
	for n in "${!PROD_PID[@]}"; do
		[ "${PROD_PID[$n]}" = "$done_pid" ] && PROD_RC[$n]=$rc
	done
done
if [ -z "$watch_rc" ]; then
	printf '%s %s\n' "${PROD_RC[A]}" "${PROD_RC[B]}" >"$DIR/producers.done"
	rc=0
	wait "$WATCH_PID" || rc=$?
	watch_rc=$rc
	WATCH_PID=''
fi
for n in A B; do
	if [ -n "${PROD_RC[$n]:-}" ] && [ "${PROD_RC[$n]}" != 0 ]; then
		printf '%sproducer %s exited with status %s:%s\n' "$R" "$n" "${PROD_RC[$n]}" "$N"
		tail -n 5 "$DIR/$n.err"
	fi
done

# ---- 7. stop, check, summarise -------------------------------------------------------
WATCH_OK=0
[ "$watch_rc" = 0 ] && WATCH_OK=1
if [ "$WATCH_OK" = 1 ]; then
	"$PYTHON3" "$ROOT/scripts/demo_progress.py" snapshot "${COMMON[@]}" --ctl "$TDRAINCTL" --conf "$DIR/${REPLICAS[0]}.conf" ||
		printf 'demo: could not read the partition map\n' >&2
fi

say "stopping the replicas (SIGTERM: finish the batch, release the leases)"
for r in "${REPLICAS[@]}"; do kill -TERM "${REPL_PID[$r]}" 2>/dev/null || true; done
STOP_OK=1
for r in "${REPLICAS[@]}"; do
	t0=$(date +%s.%N)
	rc=0
	pid=${REPL_PID[$r]}
	for ((i = 0; i < 600; i++)); do    # 60 s, the unit's TimeoutStopSec
		alive "$pid" || break
		sleep 0.1
	done
	if alive "$pid"; then
		kill -KILL "$pid" 2>/dev/null || true
		info "$r did not stop within 60 s: killed"
		STOP_OK=0
	fi
	wait "$pid" || rc=$?
	unset "REPL_PID[$r]"
	info "$r exited with status $rc after $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }') s"
	[ "$rc" = 0 ] || STOP_OK=0
done

if [ "$WATCH_OK" = 1 ]; then
	say "tests/checker.py: recomputing every derived document from the producers' NDJSON"
	CHECK_ARGS=(--uri "$URI" --db "$DB" --ndjson "$DIR/A.ndjson" --ndjson "$DIR/B.ndjson" --json)
	[ -s "$DIR/B.manifest" ] && CHECK_ARGS+=(--manifest "$DIR/B.manifest")
	t0=$(date +%s)
	rc=0
	"$PYTHON3" "$ROOT/tests/checker.py" "${CHECK_ARGS[@]}" >"$DIR/checker.json" 2>"$DIR/checker.log" || rc=$?
	info "done in $(($(date +%s) - t0)) s (status $rc)"
	[ -s "$DIR/checker.json" ] || { cat "$DIR/checker.log"; rm -f "$DIR/checker.json"; }
fi

SUM_ARGS=(--state "$DIR" --rate "$RATE" --interval "$INTERVAL" --producer A=1 --producer B=0)
SUMMARY_RC=0
"$PYTHON3" "$ROOT/scripts/demo_progress.py" summary "${SUM_ARGS[@]}" || SUMMARY_RC=$?
printf '  %-20s' "logs"
first=1
for f in "${REPLICAS[@]/#/$DIR/}" "$DIR"/checker "$DIR"/serve; do
	f=$f.log
	[ -s "$f" ] || continue
	[ "$first" = 1 ] || printf '  %-20s' ""
	printf '%s\n' "$f"
	first=0
done
if [ "$KEEP" != 1 ] && [ "$WATCH_OK" = 1 ] && [ "$SUMMARY_RC" = 0 ] && [ "$STOP_OK" = 1 ]; then
	printf '  %-20s%s\n' "" "(removed at exit: DEMO_KEEP=1 keeps them, with the configs, metrics and NDJSON)"
fi

[ "$WATCH_OK" = 1 ] && [ "$SUMMARY_RC" = 0 ] && [ "$STOP_OK" = 1 ] && FAILED=0
[ "$FAILED" = 0 ] || exit 1
exit 0
