#!/usr/bin/env bash
# scripts/test.sh - from a fresh Debian 12 machine to a tested build, in one command.
#
#   1. scripts/deps.sh        Debian packages, FerretDB (cached outside the tree)
#   2. autoreconf -fi
#   3. configure + make + make check in $BUILD_DIR (default ./build);
#      with CI=true configure gets --enable-werror
#   4. with CI=true or TDRAIN_SANITIZE=1: the same with --enable-sanitizers in
#      $ASAN_BUILD_DIR (default ./build-asan), ASan+UBSan over every test
#   5. tests/fuzz/run.sh for FUZZ_SECONDS (default 60) seconds
#   6. with CI=true or TDRAIN_DISTCHECK=1: make distcheck (unit tests + t01, t02 from the tarball)
#
# The last line printed is the total over every `make check` run (test points
# from each test-suite.log) plus one for each other stage that ran (fuzz, distcheck):
#     N passed, N failed[, N skipped]
# PASS and XFAIL count as passed; FAIL, XPASS and ERROR as failed; a stage that
# failed before its tests ran counts as one failure.  A stage or test point that
# could not run is never counted as passed: under CI=true it counts as failed,
# elsewhere as skipped.  Exit status: 0 only if
# nothing failed.
#
# Environment: BUILD_DIR, ASAN_BUILD_DIR, JOBS (default 2), CI, TDRAIN_SANITIZE,
# TDRAIN_TEST_TIMEOUT (seconds per test script, default 900), FUZZ_SECONDS,
# CONFIGURE_FLAGS (extra configure arguments), TDRAIN_SKIP_DEPS=1.
set -euo pipefail

START=$(date +%s)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

BUILD_DIR=${BUILD_DIR:-$ROOT/build}
ASAN_BUILD_DIR=${ASAN_BUILD_DIR:-$ROOT/build-asan}
JOBS=${JOBS:-2}
CI=${CI:-}
TEST_TIMEOUT=${TDRAIN_TEST_TIMEOUT:-900}
FUZZ_SECONDS=${FUZZ_SECONDS:-60}
# See tests/harness.py: no libmongoc shared-memory counters (stale files after SIGKILL).
export MONGOC_DISABLE_SHM=1
PYTHON3=/usr/bin/python3         # Debian's python3, which has python3-pymongo

PASSED=0 FAILED=0 SKIPPED=0
SUITES=()                        # "label<TAB>build dir" of every make check run
FAILED_STAGES=()
FINISHED=0

say() { printf '\n==> %s\n' "$*"; }
fail_stage() {
	FAILED=$((FAILED + 1))
	FAILED_STAGES+=("$1")
	printf 'test.sh: FAILED: %s\n' "$1"
}

# Add up one suite's results; 1 if its test-suite.log was missing.
count_suite() {
	local dir=$1 log=$1/test-suite.log
	local t p s xf f xp e
	if [ ! -f "$log" ]; then
		return 1
	fi
	# automake's header: "# TOTAL: n", "# PASS: n", ... (test points for TAP tests)
	read -r t p s xf f xp e < <(awk '
		/^# TOTAL:/ {t=$3} /^# PASS:/ {p=$3} /^# SKIP:/ {s=$3} /^# XFAIL:/ {xf=$3}
		/^# FAIL:/ {f=$3} /^# XPASS:/ {xp=$3} /^# ERROR:/ {e=$3}
		END {print t+0, p+0, s+0, xf+0, f+0, xp+0, e+0}' "$log")
	PASSED=$((PASSED + p + xf))
	FAILED=$((FAILED + f + xp + e))
	if [ "$CI" = true ] && [ "$s" -gt 0 ]; then
		# In CI a test that cannot run is a failure: it proves nothing.
		FAILED=$((FAILED + s))
		FAILED_STAGES+=("$(basename "$dir"): $s skipped test point(s) (CI=true counts them as failed)")
		grep -h -E '^(ok [0-9]+.*# SKIP|1\.\.0 # SKIP)' "$dir"/tests/*/*.log "$dir"/tests/*.log 2>/dev/null | head -n 20 || true
	else
		SKIPPED=$((SKIPPED + s))
	fi
	return 0
}

# Tail of the log of every test script that did not pass.
show_failures() {
	local dir=$1 trs log
	[ -d "$dir" ] || return 0
	while IFS= read -r trs; do
		if grep -qE '^:global-test-result: (FAIL|ERROR|XPASS)' "$trs"; then
			log=${trs%.trs}.log
			printf '\n---- %s (last 80 lines) ----\n' "${log#"$dir"/}"
			tail -n 80 "$log" 2>/dev/null || true
		fi
	done < <(find "$dir" -name '*.trs' -newer "$dir/config.status" 2>/dev/null | sort)
}

finish() {
	local rc=$? label dir
	[ "$FINISHED" = 1 ] && return
	FINISHED=1
	set +e
	if [ "$rc" -ne 0 ] && [ "${#FAILED_STAGES[@]}" -eq 0 ]; then
		fail_stage "test.sh stopped early (status $rc)"
	fi
	for entry in "${SUITES[@]}"; do
		label=${entry%%$'\t'*}
		dir=${entry#*$'\t'}
		if ! count_suite "$dir"; then
			fail_stage "$label: no test-suite.log (build or make check broke before the tests ran)"
		fi
	done
	if [ "$FAILED" -gt 0 ]; then
		for entry in "${SUITES[@]}"; do
			show_failures "${entry#*$'\t'}"
		done
		printf '\nFailed stages: %s\n' "${FAILED_STAGES[*]:-none (see test logs above)}"
	fi
	local t=$(($(date +%s) - START))
	printf '\ntest.sh: finished in %dm%02ds\n' $((t / 60)) $((t % 60))
	if [ "$SKIPPED" -gt 0 ]; then
		printf '%d passed, %d failed, %d skipped\n' "$PASSED" "$FAILED" "$SKIPPED"
	else
		printf '%d passed, %d failed\n' "$PASSED" "$FAILED"
	fi
	if [ "$FAILED" -gt 0 ]; then
		exit 1
	fi
	exit "$rc"
}
trap finish EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

ulimit -c 0 2>/dev/null || true

# ---- 1. dependencies ----
if [ "${TDRAIN_SKIP_DEPS:-0}" != 1 ]; then
	say "dependencies (scripts/deps.sh)"
	FERRETDB=$(bash "$ROOT/scripts/deps.sh" | tail -n 1)
	export FERRETDB
fi
[ -x "$PYTHON3" ] || PYTHON3=$(command -v python3)

# ---- 2. autotools ----
say "autoreconf -fi"
mkdir -p m4                      # git keeps no empty directory; aclocal wants it
autoreconf -fi
# configure.ac's AC_REQUIRE_AUX_FILE makes automake install the TAP driver.
[ -f build-aux/tap-driver.sh ] || { fail_stage "autoreconf did not install build-aux/tap-driver.sh"; exit 1; }

# configure + build + check in one directory; results counted at exit.
build_and_check() {
	local label=$1 dir=$2
	shift 2
	say "$label: configure $* (in $dir)"
	mkdir -p "$dir"
	rm -f "$dir/test-suite.log"
	if ! (cd "$dir" && "$ROOT/configure" -q PYTHON3="$PYTHON3" "$@" ${CONFIGURE_FLAGS:-}); then
		fail_stage "$label: configure"
		return 0
	fi
	say "$label: make -j$JOBS"
	if ! make -C "$dir" -j"$JOBS"; then
		fail_stage "$label: make"
		return 0
	fi
	say "$label: make -j$JOBS check"
	SUITES+=("$label"$'\t'"$dir")   # counted (or found missing) at exit
	# Each test script gets a time limit; on expiry it gets SIGTERM (the
	# harness then stops the servers it started) and counts as an error.
	local tests_override=()
	[ -n "${CHECK_TESTS:-}" ] && tests_override=(TESTS="$CHECK_TESTS")
	if ! make -C "$dir" -j"$JOBS" check "${tests_override[@]}" \
		LOG_COMPILER="timeout -k 15 $TEST_TIMEOUT" \
		PY_LOG_COMPILER="timeout -k 15 $TEST_TIMEOUT $PYTHON3"; then
		printf 'test.sh: %s: make check reported failures\n' "$label"
	fi
}

# ---- 3. the build ----
FLAGS=()
[ "$CI" = true ] && FLAGS+=(--enable-werror)
build_and_check "build" "$BUILD_DIR" "${FLAGS[@]}"

# ---- 4. sanitizers ----
if [ "$CI" = true ] || [ "${TDRAIN_SANITIZE:-0}" = 1 ]; then
	export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1}
	export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
	# Every unit test and the integration tests that exercise the daemon's core
	# code paths (CLI, drain, fold, partitions, both lease backends).  The
	# timing-bound ones (failover, kill trials, network partitions, systemd)
	# measure wall-clock behaviour that a 2-3x slower binary distorts; they run
	# in the plain build above.  ASAN_TESTS overrides the list.
	ASAN_TESTS=${ASAN_TESTS:-$(cd "$ROOT" && ls tests/unit/test_*.c | sed 's/\.c$//' | tr '\n' ' ') \
tests/integration/t01_cli_config.py tests/integration/t02_single_drain.py tests/integration/t03_lease_conformance.py \
tests/integration/t04_partitioned.py}
	CHECK_TESTS=$ASAN_TESTS build_and_check "asan" "$ASAN_BUILD_DIR" "${FLAGS[@]}" --enable-sanitizers
	unset ASAN_OPTIONS UBSAN_OPTIONS
fi

# ---- 5. fuzzing ----
if [ -f "$ROOT/tests/fuzz/run.sh" ]; then
	say "fuzz: tests/fuzz/run.sh (${FUZZ_SECONDS} s)"
	rc=0
	BUILD_DIR=$BUILD_DIR ASAN_BUILD_DIR=$ASAN_BUILD_DIR FUZZ_SECONDS=$FUZZ_SECONDS CI=$CI \
		timeout -k 15 $((FUZZ_SECONDS * 3 + 300)) bash "$ROOT/tests/fuzz/run.sh" </dev/null || rc=$?
	case $rc in
	0) PASSED=$((PASSED + 1)) ;;
	77) SKIPPED=$((SKIPPED + 1)); printf 'test.sh: fuzz stage skipped (see above)\n' ;;
	*) fail_stage "fuzz (tests/fuzz/run.sh, status $rc)" ;;
	esac
fi

# ---- 6. make distcheck ----
# The tarball builds, installs under its own prefix (unit directories too: systemd/local.mk), and passes
# the unit tests and the quick integration tests from the unpacked tree; the full suite ran above.
if [ "$CI" = true ] || [ "${TDRAIN_DISTCHECK:-0}" = 1 ]; then
	say "make distcheck (unit tests, t01, t02)"
	DISTCHECK_TESTS=${DISTCHECK_TESTS:-$(cd "$ROOT" && ls tests/unit/test_*.c | sed 's/\.c$//' | tr '\n' ' ') \
tests/integration/t01_cli_config.py tests/integration/t02_single_drain.py}
	if make -C "$BUILD_DIR" -j"$JOBS" distcheck TESTS="$DISTCHECK_TESTS" \
		LOG_COMPILER="timeout -k 15 $TEST_TIMEOUT" PY_LOG_COMPILER="timeout -k 15 $TEST_TIMEOUT $PYTHON3" \
		>"$BUILD_DIR/distcheck.log" 2>&1; then
		grep -E '^# (TOTAL|PASS|FAIL|ERROR):|archives ready for distribution|^tdrain-.*\.tar\.gz' \
			"$BUILD_DIR/distcheck.log" | tail -n 8 || true
		PASSED=$((PASSED + 1))
	else
		tail -n 60 "$BUILD_DIR/distcheck.log"
		fail_stage "make distcheck (log: $BUILD_DIR/distcheck.log)"
	fi
fi

exit 0
