#!/usr/bin/env bash
# scripts/deps.sh - install everything tdrain needs to build, test and benchmark.
#
# Idempotent and quick when everything is already there: each dependency is
# checked first, `apt-get update` runs at most once and only when a Debian
# package is missing, and FerretDB is built only when the cached binary is
# absent or does not run.
#
#   Debian packages   the C toolchain and libraries, check, etcd, python3 with
#                     pymongo, clang/llvm, valgrind, gnuplot, iproute2,
#                     iptables, PostgreSQL 15 (FerretDB's second backend),
#                     libmicrohttpd, debhelper, lintian, prometheus, and
#                     golang-go only when no Go toolchain is present.
#   FerretDB v1.24.2  built from the Go module proxy into a cache OUTSIDE the
#                     work tree: ${TDRAIN_CACHE:-$HOME/.cache/tdrain}/bin/ferretdb
#   DocumentDB        built by scripts/documentdb.sh from ../shared/documentdb/
#                     (or TDRAIN_DOCUMENTDB_SRC) into the same cache: its two
#                     PostgreSQL extensions are installed into PostgreSQL 15,
#                     its gateway is .../documentdb/current/bin/documentdb_gateway
#
# Environment:
#   TDRAIN_CACHE            cache directory (default ~/.cache/tdrain)
#   TDRAIN_GO_TOOLCHAIN     toolchain to fall back to (default go1.24.3)
#   TDRAIN_FORCE_FERRETDB=1 rebuild FerretDB even if the cached binary works
#
# Prints "deps: ..." progress lines on stderr; the last stdout line is the
# FerretDB binary path.
set -euo pipefail

# go needs HOME for its caches; a CI environment may not set it.
HOME=${HOME:-$(getent passwd "$(id -u)" | cut -d: -f6)}
export HOME

FERRETDB_MODULE=github.com/FerretDB/FerretDB
FERRETDB_VERSION=v1.24.2
CACHE=${TDRAIN_CACHE:-$HOME/.cache/tdrain}
FALLBACK_TOOLCHAIN=${TDRAIN_GO_TOOLCHAIN:-go1.24.3}

APT_PACKAGES=(
	build-essential autoconf automake libtool pkg-config
	libmongoc-dev libbson-dev libjansson-dev libcurl4-openssl-dev libsystemd-dev check
	etcd-server etcd-client
	python3 python3-pymongo
	clang llvm libclang-rt-14-dev valgrind gnuplot-nox
	iproute2 iptables
	postgresql
	git ca-certificates
	# DocumentDB's build (scripts/documentdb.sh): PostgreSQL server headers and
	# the extensions it requires, its C libraries, and cargo for the gateway.
	postgresql-15 postgresql-server-dev-15 postgresql-15-rum postgresql-15-cron postgresql-15-postgis-3
	libintelrdfpmath-dev libpcre2-dev libkrb5-dev libssl-dev openssl xz-utils
	# metrics.listen (libmicrohttpd); the Debian package and its tests
	# (debian/, t14_deb, t17_rules, t16_prometheus): debhelper, lintian,
	# Prometheus and promtool (its service is kept from starting, as above).
	libmicrohttpd-dev debhelper dh-autoreconf fakeroot lintian prometheus
)

log() { printf 'deps: %s\n' "$*" >&2; }
die() { printf 'deps: error: %s\n' "$*" >&2; exit 1; }

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
	command -v sudo >/dev/null 2>&1 || die "not root and no sudo: cannot install packages"
	SUDO=(sudo)
fi

# --- Go toolchain -----------------------------------------------------------
# Find a Go on PATH or in the usual places; put its directory on PATH.
find_go() {
	local g
	for g in "$(command -v go 2>/dev/null || true)" /usr/local/go/bin/go /usr/lib/go/bin/go; do
		if [ -n "$g" ] && [ -x "$g" ]; then
			case ":$PATH:" in *":$(dirname "$g"):"*) ;; *) PATH="$(dirname "$g"):$PATH" ;; esac
			export PATH
			return 0
		fi
	done
	return 1
}

# --- Debian packages ----------------------------------------------------------
pkg_installed() {
	dpkg-query -W -f='${db:Status-Abbrev}' "$1" 2>/dev/null | grep -q '^ii'
}

install_apt() {
	local missing=() p
	for p in "${APT_PACKAGES[@]}"; do
		pkg_installed "$p" || missing+=("$p")
	done
	find_go || missing+=(golang-go)
	if [ "${#missing[@]}" -eq 0 ]; then
		log "Debian packages: all present"
		return 0
	fi
	log "Debian packages missing: ${missing[*]}"
	# Keep the packages' own services (etcd, postgresql, prometheus) from starting on the
	# host: tests start private instances on free ports.
	local policy_added=0
	if [ ! -e /usr/sbin/policy-rc.d ]; then
		printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee /usr/sbin/policy-rc.d >/dev/null
		"${SUDO[@]}" chmod 755 /usr/sbin/policy-rc.d
		policy_added=1
	fi
	local rc=0
	{
		"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq -o DPkg::Lock::Timeout=600 &&
			"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=600 \
				--no-install-recommends "${missing[@]}" </dev/null
	} || rc=$?
	[ "$policy_added" = 1 ] && "${SUDO[@]}" rm -f /usr/sbin/policy-rc.d
	[ "$rc" -eq 0 ] || die "apt-get install failed (status $rc)"
	for p in "${missing[@]}"; do
		[ "$p" = golang-go ] || pkg_installed "$p" || die "package $p did not install"
	done
	find_go || die "no Go toolchain after installing golang-go"
}

# --- FerretDB -----------------------------------------------------------------
ferretdb_ok() {
	# A binary built without build/version/version.txt panics at start-up, so
	# "exists" is not enough: it must run and report the pinned version.
	local out
	[ -x "$1" ] || return 1
	out=$("$1" --version 2>/dev/null) || return 1
	case "$out" in *"version: ${FERRETDB_VERSION}"*) return 0 ;; esac
	return 1
}

# Minor version of a go command ("go1.26.8" -> 26; 0 if unknown).
go_minor() {
	"$1" version 2>/dev/null | sed -n 's/^go version go1\.\([0-9][0-9]*\).*/\1/p' | head -n 1 | grep . || echo 0
}

# The pinned Go toolchain, fetched through the Go module proxy as the module
# golang.org/toolchain (what GOTOOLCHAIN=goX.Y.Z does by itself on Go >= 1.21,
# done by hand so that an older Go, e.g. Debian 12's 1.19, can use it too).
# Prints the path of its go command.
pinned_go() {
	local arch mod dir
	arch=$(go env GOARCH)
	mod="golang.org/toolchain@v0.0.1-${FALLBACK_TOOLCHAIN}.linux-${arch}"
	log "Go: fetching toolchain ${FALLBACK_TOOLCHAIN} (${mod})"
	dir=$(cd /tmp && GOTOOLCHAIN=local GOFLAGS= go mod download -json "$mod" |
		sed -n 's/^[[:space:]]*"Dir": "\(.*\)",*$/\1/p') || return 1
	[ -n "$dir" ] && [ -f "$dir/bin/go" ] || return 1
	# Module zips carry no file modes; the go command restores these itself.
	chmod +x "$dir"/bin/* "$dir"/pkg/tool/*/* 2>/dev/null || true
	"$dir/bin/go" version >&2 || return 1
	printf '%s\n' "$dir/bin/go"
}

# Put FerretDB's source into the module cache of the go command $1.
# `go mod download` does it; `go install ...@version` is the fallback, though it
# fails here once the proxy refuses the module's @v/list (its deprecation
# lookup) - by then the source is downloaded, which is all that is needed.
fetch_ferretdb_source() {
	local gocmd=$1 src=$2
	[ -d "$src/cmd/ferretdb" ] && return 0
	log "FerretDB: go mod download ${FERRETDB_MODULE}@${FERRETDB_VERSION}"
	(cd /tmp && GOTOOLCHAIN=local GOFLAGS= "$gocmd" mod download "${FERRETDB_MODULE}@${FERRETDB_VERSION}") >&2 || true
	[ -d "$src/cmd/ferretdb" ] && return 0
	log "FerretDB: go install ${FERRETDB_MODULE}/cmd/ferretdb@${FERRETDB_VERSION} (to fetch the source)"
	(cd /tmp && GOTOOLCHAIN=local GOFLAGS= GOBIN="$CACHE/tmp/gobin" \
		"$gocmd" install "${FERRETDB_MODULE}/cmd/ferretdb@${FERRETDB_VERSION}") >&2 || true
	[ -d "$src/cmd/ferretdb" ]
}

# Build with the go command $1; 0 and the binary in place on success.
try_build_ferretdb() {
	local gocmd=$1 bin=$CACHE/bin/ferretdb
	local modcache src work
	modcache=$("$gocmd" env GOMODCACHE)
	# The module cache escapes capital letters: FerretDB -> !ferret!d!b.
	src="$modcache/github.com/!ferret!d!b/!ferret!d!b@${FERRETDB_VERSION}"
	if ! fetch_ferretdb_source "$gocmd" "$src"; then
		log "FerretDB: could not download ${FERRETDB_MODULE}@${FERRETDB_VERSION} with $("$gocmd" version)"
		return 1
	fi
	# Build from a writable copy that carries build/version/version.txt: the
	# module zip lacks that generated file, and without it the binary panics
	# at start-up (build/version/version.go), whether built by `go install` or
	# by `go build` in the module cache.
	work="$CACHE/src/ferretdb-${FERRETDB_VERSION}"
	rm -rf "$work"
	mkdir -p "$(dirname "$work")"
	cp -R "$src" "$work"
	chmod -R u+w "$work"
	printf '%s\n' "$FERRETDB_VERSION" >"$work/build/version/version.txt"
	printf 'tdrain-deps\n' >"$work/build/version/package.txt"

	log "FerretDB: building ${FERRETDB_VERSION} with $("$gocmd" version) (minutes the first time)"
	rm -f "$bin.new"
	if ! (cd "$work" && GOTOOLCHAIN=local GOFLAGS="-mod=mod -buildvcs=false" CGO_ENABLED=0 \
		"$gocmd" build -trimpath -o "$bin.new" ./cmd/ferretdb) >&2; then
		log "FerretDB: build failed"
	elif ! ferretdb_ok "$bin.new"; then
		log "FerretDB: the built binary does not run: $("$bin.new" --version 2>&1 | head -n 3)"
	else
		mv -f "$bin.new" "$bin"
		rm -rf "$work" "$CACHE/tmp/gobin"
		log "FerretDB: installed $bin"
		return 0
	fi
	rm -rf "$bin.new" "$work"
	return 1
}

# Fallback order: the Go on this machine (if recent enough for FerretDB's
# go.mod, which says go 1.24), then the toolchain FerretDB 1.24.2 was
# released with, from the module proxy.
build_ferretdb() {
	local pinned
	mkdir -p "$CACHE/bin" "$CACHE/tmp"
	if [ "$(go_minor "$(command -v go)")" -ge 24 ]; then
		try_build_ferretdb "$(command -v go)" && return 0
	else
		log "Go: $(go version) is older than FerretDB needs (1.24)"
	fi
	pinned=$(pinned_go) || die "could not fetch Go toolchain ${FALLBACK_TOOLCHAIN} from the Go module proxy"
	try_build_ferretdb "$pinned" && return 0
	die "could not build FerretDB ${FERRETDB_VERSION} (tried $(go version) and ${FALLBACK_TOOLCHAIN})"
}

install_ferretdb() {
	local bin=$CACHE/bin/ferretdb
	if [ "${TDRAIN_FORCE_FERRETDB:-0}" != 1 ] && ferretdb_ok "$bin"; then
		log "FerretDB ${FERRETDB_VERSION}: present ($bin)"
		return 0
	fi
	find_go || die "no Go toolchain"
	mkdir -p "$CACHE"
	# One build at a time per cache, even if two runs start together.
	exec 9>"$CACHE/.lock"
	flock 9
	if [ "${TDRAIN_FORCE_FERRETDB:-0}" != 1 ] && ferretdb_ok "$bin"; then
		log "FerretDB ${FERRETDB_VERSION}: present ($bin)"
	else
		build_ferretdb
	fi
	flock -u 9
	exec 9>&-
}

# --- checks -------------------------------------------------------------------
check_python() {
	/usr/bin/python3 -c 'import pymongo' 2>/dev/null ||
		die "/usr/bin/python3 cannot import pymongo (python3-pymongo)"
}

start=$(date +%s)
install_apt
check_python
install_ferretdb
bash "$(dirname "${BASH_SOURCE[0]}")/documentdb.sh" >/dev/null || die "DocumentDB build failed (scripts/documentdb.sh)"
log "done in $(($(date +%s) - start)) s"
printf '%s\n' "$CACHE/bin/ferretdb"
