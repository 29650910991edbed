#!/usr/bin/env bash
# scripts/documentdb.sh - build DocumentDB (MongoDB-compatible store on PostgreSQL 15) into the cache.
#
# DocumentDB is two PostgreSQL extensions (pg_documentdb_core, pg_documentdb) and a Rust gateway that
# speaks the MongoDB wire protocol.  No package registry reachable here has it, so it is built from source:
#
#   TDRAIN_DOCUMENTDB_SRC   a source directory or a .tar.xz / .tar.gz of it; default: the snapshot in
#                           ../shared/documentdb/ beside the repository (upstream: the DocumentDB project's
#                           repository at the commit named in that README)
#   TDRAIN_CACHE            cache directory (default ~/.cache/tdrain); the build goes under documentdb/
#   TDRAIN_FORCE_DOCUMENTDB=1  rebuild even if the cached build matches the source
#
# What it does, after ../shared/documentdb/recipe.sh (every workaround there was needed on Debian 12):
#   1. extracts the source into the cache and applies no-pgvector.patch (pgvector is not packaged for bookworm)
#   2. builds both extensions with PGXS into a staging directory in the cache, then installs the staged
#      files into PostgreSQL 15's extension and library directories (CREATE EXTENSION reads them only there)
#   3. builds the gateway with cargo (--locked, crates.io) into the cache
# The build is keyed by the SHA-256 of the source, the patch and this script: a second run with the same key
# only checks that the installed files are the staged ones (seconds).  The Debian packages it needs are
# installed by scripts/deps.sh, which calls this script.
#
# Prints "documentdb: ..." progress on stderr; the last stdout line is the gateway binary's path.
set -euo pipefail

HOME=${HOME:-$(getent passwd "$(id -u)" | cut -d: -f6)}
export HOME
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${TDRAIN_CACHE:-$HOME/.cache/tdrain}
SHARED=${TDRAIN_SHARED:-$ROOT/../shared}/documentdb
SRC_IN=${TDRAIN_DOCUMENTDB_SRC:-$SHARED/documentdb-b2e220c4.tar.xz}
PATCH=$SHARED/no-pgvector.patch
PGBIN=/usr/lib/postgresql/15/bin
# Bump when the build steps below change what is built (the source and the patch are hashed anyway).
BUILD_REV=1
PG_CONFIG=$PGBIN/pg_config

log() { printf 'documentdb: %s\n' "$*" >&2; }
die() { printf 'documentdb: error: %s\n' "$*" >&2; exit 1; }

[ -x "$PG_CONFIG" ] || die "$PG_CONFIG missing: install postgresql-server-dev-15 (scripts/deps.sh does)"
[ -e "$SRC_IN" ] || die "no DocumentDB source at $SRC_IN (set TDRAIN_DOCUMENTDB_SRC to a directory or tarball)"
[ -f "$PATCH" ] || die "no $PATCH"

find_cargo() {
	local c
	for c in "$(command -v cargo 2>/dev/null || true)" "$HOME/.cargo/bin/cargo" /usr/local/cargo/bin/cargo; do
		if [ -n "$c" ] && [ -x "$c" ]; then
			printf '%s\n' "$c"
			return 0
		fi
	done
	return 1
}

# The cache key: what was built from what, and how.
key() {
	{
		if [ -d "$SRC_IN" ]; then
			(cd "$SRC_IN" && find . -type f ! -path './.git/*' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum)
		else
			sha256sum <"$SRC_IN"
		fi
		sha256sum <"$PATCH"
		echo "build $BUILD_REV"
		"$PG_CONFIG" --version
	} | sha256sum | cut -c1-16
}

KEY=$(key)
BASE=$CACHE/documentdb
OUT=$BASE/$KEY
GW=$OUT/bin/documentdb_gateway
STAGE=$OUT/stage
mkdir -p "$BASE"

# Staged extension files are installed into the system PostgreSQL; check they are there and the same.
installed_ok() {
	[ -f "$OUT/stamp" ] && [ -x "$GW" ] || return 1
	local f
	while IFS= read -r f; do
		cmp -s "$STAGE/$f" "/$f" || return 1
	done <"$OUT/files"
}

install_staged() {
	local f
	while IFS= read -r f; do
		install -D -m 0644 "$STAGE/$f" "/$f"
	done <"$OUT/files"
	# shared libraries are loaded by the server: keep them executable as PGXS does
	while IFS= read -r f; do
		case "$f" in *.so) chmod 0755 "/$f" ;; esac
	done <"$OUT/files"
}

# A long step with a heartbeat, so a 5-minute cargo build is not silent.
with_progress() {
	local what=$1 logf=$2 start pid rc
	shift 2
	start=$(date +%s)
	"$@" >"$logf" 2>&1 &
	pid=$!
	while kill -0 "$pid" 2>/dev/null; do
		sleep 5
		if kill -0 "$pid" 2>/dev/null && [ $((($(date +%s) - start) % 30)) -lt 5 ]; then
			log "$what: $(($(date +%s) - start)) s ... ($(tail -n 1 "$logf" 2>/dev/null | cut -c1-100))"
		fi
	done
	rc=0
	wait "$pid" || rc=$?
	if [ "$rc" -ne 0 ]; then
		tail -n 40 "$logf" >&2 || true
		die "$what failed (status $rc; log $logf)"
	fi
	log "$what: done in $(($(date +%s) - start)) s"
}

exec 9>"$BASE/.lock"
flock 9
# $BASE/current names the build in use: tests/harness.py starts $BASE/current/bin/documentdb_gateway.
if [ "${TDRAIN_FORCE_DOCUMENTDB:-0}" != 1 ] && installed_ok; then
	ln -sfn "$KEY" "$BASE/current"
	log "present ($KEY): $GW"
	printf '%s\n' "$GW"
	exit 0
fi
if [ "${TDRAIN_FORCE_DOCUMENTDB:-0}" != 1 ] && [ -f "$OUT/stamp" ] && [ -x "$GW" ]; then
	log "cached build $KEY: installing its extension files into PostgreSQL 15"
	install_staged
	installed_ok || die "installed extension files differ from the staged ones"
	ln -sfn "$KEY" "$BASE/current"
	printf '%s\n' "$GW"
	exit 0
fi

T0=$(date +%s)
CARGO=$(find_cargo) || die "cargo not found (the gateway is Rust; install rustup's toolchain)"
log "building $KEY from $SRC_IN (cold: about 7 minutes on 2 cores, most of it cargo)"
rm -rf "$OUT"
mkdir -p "$OUT/src" "$OUT/bin" "$OUT/pkgconfig" "$STAGE"
if [ -d "$SRC_IN" ]; then
	cp -R "$SRC_IN/." "$OUT/src/"
else
	tar -xf "$SRC_IN" -C "$OUT/src"
fi
# A tarball may hold one top-level directory.
if [ ! -d "$OUT/src/pg_documentdb" ] && [ "$(find "$OUT/src" -mindepth 1 -maxdepth 1 | wc -l)" = 1 ]; then
	SRC=$(find "$OUT/src" -mindepth 1 -maxdepth 1)
else
	SRC=$OUT/src
fi
[ -d "$SRC/pg_documentdb" ] && [ -d "$SRC/pg_documentdb_gw" ] || die "$SRC_IN is not a DocumentDB source tree"
(cd "$SRC" && patch -s -p1 <"$PATCH") || die "no-pgvector.patch does not apply"

# Debian's Intel decimal math library ships no intelmathlib.pc; libbidgcc000.a (built -fPIC) is the variant
# DocumentDB's own build script produces (CALL_BY_REF=0 GLOBAL_RND=0 GLOBAL_FLAGS=0).
cat >"$OUT/pkgconfig/intelmathlib.pc" <<'EOF'
prefix=/usr
libdir=/usr/lib/x86_64-linux-gnu
includedir=/usr/include

Name: intelmathlib
Description: Intel Decimal Floating-Point Math Library (Debian libintelrdfpmath-dev)
Version: 2.0u2
Cflags: -I${includedir}
Libs: -L${libdir} -l:libbidgcc000.a
EOF
export PKG_CONFIG_PATH=$OUT/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}

# Debian's libbson is 1.23, DocumentDB pins 1.28: the only gap is BSON_SUBTYPE_SENSITIVE.  with_llvm=no
# because the bitcode step ignores COPT.
DD=(PG_CONFIG="$PG_CONFIG" with_llvm=no "COPT=-DBSON_SUBTYPE_SENSITIVE=0x08 -Wno-error=switch")
with_progress "pg_documentdb_core (1/3)" "$OUT/core.log" \
	make -C "$SRC/pg_documentdb_core" -j"${JOBS:-2}" "${DD[@]}"
make -s -C "$SRC/pg_documentdb_core" install DESTDIR="$STAGE" "${DD[@]}" >>"$OUT/core.log" 2>&1 ||
	die "pg_documentdb_core: make install failed (log $OUT/core.log)"
# pg_documentdb builds against the core's installed headers: install the core first.
make -s -C "$SRC/pg_documentdb_core" install "${DD[@]}" >>"$OUT/core.log" 2>&1 ||
	die "pg_documentdb_core: install into PostgreSQL failed (log $OUT/core.log)"
with_progress "pg_documentdb (2/3)" "$OUT/docdb.log" \
	make -C "$SRC/pg_documentdb" -j"${JOBS:-2}" "${DD[@]}"
make -s -C "$SRC/pg_documentdb" install DESTDIR="$STAGE" "${DD[@]}" >>"$OUT/docdb.log" 2>&1 ||
	die "pg_documentdb: make install failed (log $OUT/docdb.log)"
(cd "$STAGE" && find . -type f | sed 's|^\./||' | LC_ALL=C sort) >"$OUT/files"

# The gateway.  Its proc-macro crate bakes its own source path in (env!("CARGO_MANIFEST_DIR")) to read
# pg_documentdb_core's error-code CSV, so a target directory is never shared between source copies.
export CARGO_TARGET_DIR=$OUT/cargo-target
with_progress "gateway, cargo build --release (3/3)" "$OUT/gateway.log" \
	bash -c 'cd "$1" && exec "$2" build --release --locked' _ "$SRC/pg_documentdb_gw" "$CARGO"
install -m 0755 "$CARGO_TARGET_DIR/release/documentdb_gateway" "$GW"

install_staged
installed_ok_files() { local f; while IFS= read -r f; do cmp -s "$STAGE/$f" "/$f" || return 1; done <"$OUT/files"; }
installed_ok_files || die "installed extension files differ from the staged ones"
rm -rf "$CARGO_TARGET_DIR"   # 1.5 GiB; the staged files, the gateway and the source are kept
date -u +%FT%TZ >"$OUT/stamp"
ln -sfn "$KEY" "$BASE/current"
# Older keys' builds are of no use once this one works.
find "$BASE" -mindepth 1 -maxdepth 1 -type d ! -name "$KEY" -exec rm -rf {} +
log "built and installed in $(($(date +%s) - T0)) s: $GW"
flock -u 9
printf '%s\n' "$GW"
