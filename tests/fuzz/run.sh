#!/usr/bin/env bash
# tests/fuzz/run.sh - build the libFuzzer targets with clang and run each for a while.
#
#   FUZZ_SECONDS=60 bash tests/fuzz/run.sh      (from the repository root, or anywhere)
#
# Targets: tests/fuzz/fuzz_*.c.  Each is compiled directly with clang from the
# tree's sources (not through automake) with -fsanitize=fuzzer,address,undefined
# and run for FUZZ_SECONDS/3 seconds on a copy of its seed corpus
# (tests/fuzz/corpus/<target>/), so the tree is never written to.
#
# Environment:
#   FUZZ_SECONDS    total budget, split evenly over the targets (default 60)
#   BUILD_DIR, ASAN_BUILD_DIR
#                   configured build directories: the first with a config.h is
#                   used for -I; without one a minimal config.h is generated
#   CLANG           compiler (default: clang, else clang-14)
#   FUZZ_WORK_DIR   where to build and run (default: a new directory under
#                   ${TMPDIR:-/var/tmp}); removed on success, kept on failure
#   FUZZ_TARGETS    space-separated subset of targets to run
#
# Output: one line per target, "fuzz: <target> <executions> execs, corpus
# <seeds> -> <files> files, 0 crashes"; on a crash, the path of the crashing
# input and the end of the log.  Exit status 0 only if every target built and
# ran (more than 0 executions) without a crash.  Without a clang that can link
# libFuzzer: under CI=true a failure naming the missing package (a stage that
# cannot run is a failure there), elsewhere one skip line and exit 77.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
FUZZ_DIR=$ROOT/tests/fuzz
FUZZ_SECONDS=${FUZZ_SECONDS:-60}
TARGETS=${FUZZ_TARGETS:-fuzz_event fuzz_config fuzz_etcd_json}

case $FUZZ_SECONDS in
'' | *[!0-9]*)
	echo "fuzz: FUZZ_SECONDS must be a number of seconds, not '$FUZZ_SECONDS'" >&2
	exit 2
	;;
esac

# Sources each target needs besides its own file.
sources_for() {
	case $1 in
	fuzz_event) echo consumers/event.c lib/bsonx.c lib/hash.c lib/conf.c lib/hostport.c lib/log.c lib/err.c ;;
	fuzz_config) echo lib/conf.c lib/hostport.c lib/log.c lib/err.c ;;
	fuzz_etcd_json) echo coord/etcd_json.c lib/err.c ;;
	*) return 1 ;;
	esac
}

# ---- the compiler ----
CC=${CLANG:-}
if [ -z "$CC" ]; then
	for c in clang clang-14; do
		if command -v "$c" >/dev/null 2>&1; then
			CC=$c
			break
		fi
	done
fi
# Cannot run: a failure in CI, a skip (77, automake's code) elsewhere.
cannot_run() {
	if [ "${CI:-}" = true ]; then
		echo "fuzz: FAILED: cannot run: $*"
		exit 1
	fi
	echo "fuzz: skipped: $*"
	exit 77
}
if [ -z "$CC" ] || ! command -v "$CC" >/dev/null 2>&1; then
	cannot_run "no clang (apt-get install clang libclang-rt-14-dev; scripts/deps.sh does)"
fi

WORK=${FUZZ_WORK_DIR:-}
if [ -z "$WORK" ]; then
	WORK=$(mktemp -d "${TMPDIR:-/var/tmp}/tdrain-fuzz.XXXXXX") || exit 1
fi
mkdir -p "$WORK" || exit 1
KEEP=0
cleanup() {
	if [ "$KEEP" = 0 ] && [ -z "${FUZZ_WORK_DIR:-}" ]; then
		rm -rf "$WORK"
	fi
}
trap cleanup EXIT

# Does this clang link libFuzzer with the sanitizers?
printf 'int LLVMFuzzerTestOneInput(const char *d, unsigned long n);\nint LLVMFuzzerTestOneInput(const char *d, unsigned long n) { (void)d; (void)n; return 0; }\n' \
	>"$WORK/probe.c"
if ! "$CC" -fsanitize=fuzzer,address,undefined "$WORK/probe.c" -o "$WORK/probe" >"$WORK/probe.log" 2>&1; then
	cannot_run "$CC cannot link -fsanitize=fuzzer,address,undefined; the libFuzzer runtime is in the Debian package libclang-rt-14-dev (apt-get install libclang-rt-14-dev; scripts/deps.sh does): $(head -n 1 "$WORK/probe.log")"
fi

# ---- config.h ----
CONFIG_DIR=
for d in "${BUILD_DIR:-}" "${ASAN_BUILD_DIR:-}" "$ROOT/build" "$ROOT/build-asan"; do
	if [ -n "$d" ] && [ -f "$d/config.h" ]; then
		CONFIG_DIR=$d
		break
	fi
done
if [ -z "$CONFIG_DIR" ]; then
	# What the sources need from configure: the GNU/POSIX extensions.
	CONFIG_DIR=$WORK/include
	mkdir -p "$CONFIG_DIR"
	printf '#ifndef _GNU_SOURCE\n# define _GNU_SOURCE 1\n#endif\n#define PACKAGE "tdrain"\n' >"$CONFIG_DIR/config.h"
fi

PKGS="libmongoc-1.0 jansson libsystemd"
if ! DEP_CFLAGS=$(pkg-config --cflags $PKGS 2>"$WORK/pkg.log") || ! DEP_LIBS=$(pkg-config --libs $PKGS 2>>"$WORK/pkg.log"); then
	echo "fuzz: FAILED: pkg-config $PKGS: $(head -n 1 "$WORK/pkg.log")"
	KEEP=1
	exit 1
fi

CFLAGS_FUZZ="-std=c11 -g -O1 -fno-omit-frame-pointer -Wall -Wextra -Wno-unused-parameter -Werror
	-DHAVE_CONFIG_H -I$ROOT -I$CONFIG_DIR $DEP_CFLAGS
	-fsanitize=fuzzer-no-link,address,undefined -fno-sanitize-recover=all"

PER=$((FUZZ_SECONDS / 3))
[ "$PER" -ge 1 ] || PER=1

export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1:symbolize=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}

failed=0
total_execs=0
summary=()
for t in $TARGETS; do
	srcs=$(sources_for "$t") || {
		echo "fuzz: $t: unknown target"
		failed=1
		continue
	}
	mkdir -p "$WORK/obj/$t" "$WORK/artifacts" "$WORK/corpus"
	objs=()
	ok=1
	for s in "tests/fuzz/$t.c" $srcs; do
		o=$WORK/obj/$t/$(echo "$s" | tr / _).o
		# shellcheck disable=SC2086
		if ! "$CC" $CFLAGS_FUZZ -c "$ROOT/$s" -o "$o" >>"$WORK/$t.build.log" 2>&1; then
			ok=0
			break
		fi
		objs+=("$o")
	done
	# shellcheck disable=SC2086
	if [ "$ok" = 1 ] && ! "$CC" -fsanitize=fuzzer,address,undefined "${objs[@]}" $DEP_LIBS -lpthread \
		-o "$WORK/$t" >>"$WORK/$t.build.log" 2>&1; then
		ok=0
	fi
	if [ "$ok" = 0 ]; then
		echo "fuzz: $t: build FAILED (log: $WORK/$t.build.log)"
		tail -n 30 "$WORK/$t.build.log"
		failed=1
		KEEP=1
		continue
	fi

	# A copy of the seeds: libFuzzer adds what it finds to its first corpus directory.
	rm -rf "$WORK/corpus/$t"
	mkdir -p "$WORK/corpus/$t"
	if [ -d "$FUZZ_DIR/corpus/$t" ]; then
		cp -R "$FUZZ_DIR/corpus/$t/." "$WORK/corpus/$t/"
	fi
	seeds=$(find "$WORK/corpus/$t" -type f | wc -l)
	dict=()
	[ -f "$FUZZ_DIR/$t.dict" ] && dict=("-dict=$FUZZ_DIR/$t.dict")
	log=$WORK/$t.log
	(cd "$WORK" && "./$t" -max_total_time="$PER" -max_len=65536 -timeout=25 -rss_limit_mb=2560 \
		-print_final_stats=1 ${dict[@]+"${dict[@]}"} -artifact_prefix="$WORK/artifacts/$t-" \
		"$WORK/corpus/$t" </dev/null >"$log" 2>&1)
	rc=$?
	execs=$(sed -n 's/^stat::number_of_executed_units: *\([0-9]*\).*/\1/p' "$log" | tail -n 1)
	[ -n "$execs" ] || execs=$(sed -n 's/^Done \([0-9]*\) runs.*/\1/p' "$log" | tail -n 1)
	execs=${execs:-0}
	total_execs=$((total_execs + execs))
	crashes=$(ls "$WORK/artifacts/$t-"* 2>/dev/null | wc -l)
	corpus=$(find "$WORK/corpus/$t" -type f | wc -l)
	if [ "$rc" -eq 0 ] && [ "$crashes" -eq 0 ] && [ "$execs" -eq 0 ]; then
		echo "fuzz: $t: FAILED: 0 executions (log: $log)"
		tail -n 20 "$log"
		failed=1
		KEEP=1
		summary+=("$t FAILED")
	elif [ "$rc" -ne 0 ] || [ "$crashes" -ne 0 ]; then
		[ "$crashes" -gt 0 ] || crashes=1
		echo "fuzz: $t $execs execs, $crashes crashes (exit $rc)"
		grep -E 'ERROR: |runtime error|fuzz_(event|config|etcd_json): |SUMMARY:' "$log" | head -n 10
		for f in "$WORK/artifacts/$t-"*; do
			[ -e "$f" ] && echo "fuzz: $t: crashing input: $f (reproduce: $WORK/$t $f)"
		done
		echo "fuzz: $t: log: $log (last lines below)"
		tail -n 40 "$log"
		failed=1
		KEEP=1
		summary+=("$t FAILED")
	else
		echo "fuzz: $t $execs execs, corpus $seeds -> $corpus files, 0 crashes"
		summary+=("$t ok")
	fi
done

if [ "$failed" = 0 ]; then
	echo "fuzz: all targets passed ($total_execs execs in total, ${PER}s each)"
	exit 0
fi
echo "fuzz: FAILED (${summary[*]}); work directory kept: $WORK"
exit 1
