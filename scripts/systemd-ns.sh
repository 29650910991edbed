#!/bin/sh
# systemd-ns.sh - a real systemd (PID 1) booted in a private PID + mount
# namespace, for testing tdrain@.service on a machine where systemd is not the
# init (containers, CI).  It runs units, Type=notify, watchdogs and journald
# normally.  The file system is the host's: units written to
# /etc/systemd/system are visible inside, and whatever a test installs there
# must be removed by that test.  Networking is the host's too.
#
#   scripts/systemd-ns.sh start          boot it (if not already up), wait until
#                                        "systemctl is-system-running" says
#                                        running or degraded, print its PID
#   scripts/systemd-ns.sh exec CMD...    run CMD in its namespaces, e.g.
#                                        exec systemctl start tdrain@a
#   scripts/systemd-ns.sh pid            print its PID (exit 1 if not running)
#   scripts/systemd-ns.sh stop           power it off; kill what is left
#
# Several can run at once: each is known by its state file,
# $SYSTEMD_NS_STATE (default /run/tdrain-systemd-ns.pid), which holds the PIDs
# of the namespace's systemd and of the unshare process above it.
# Only those PIDs are ever signalled.
#
# --unit=basic.target keeps it from starting the services the host has
# enabled (etcd, postgresql, ...).  Its journal goes to /var/log/journal with
# the host's: filter by "journalctl -b" inside, or by unit and time.
#
# PROTECT: the file system is shared, and at boot systemd-tmpfiles-setup
# runs "systemd-tmpfiles --create --remove --boot", which with Debian's
# tmpfiles.d would empty the HOST's /tmp ("D /tmp"), delete every other
# systemd's PrivateTmp directories ("R! /tmp/systemd-private-*") and remove
# /etc/*.lock files.  Inside the namespace, before systemd starts, every
# tmpfiles.d file with a D, R or r line for a path outside /run and /dev is
# hidden under a bind mount of /dev/null.  Never boot a systemd in a mount
# namespace that shares / without doing the same.
#
# Needs root, util-linux (unshare, nsenter, setsid) and systemd >= 245.

set -u

STATE=${SYSTEMD_NS_STATE:-/run/tdrain-systemd-ns.pid}
BOOT_TIMEOUT=${SYSTEMD_NS_BOOT_TIMEOUT:-60}
SYSTEMD=${SYSTEMD_NS_BINARY:-/lib/systemd/systemd}

die() {
	echo "systemd-ns: $*" >&2
	exit 1
}

# alive PID: true if PID exists and is not a zombie.
alive() {
	[ -n "$1" ] && [ -r "/proc/$1/stat" ] || return 1
	state=$(sed -n 's/^[0-9]* (.*) \([A-Z]\) .*/\1/p' "/proc/$1/stat" 2>/dev/null)
	[ -n "$state" ] && [ "$state" != Z ]
}

# is_ours PID: PID is a systemd running as --system --unit=basic.target.
is_ours() {
	alive "$1" || return 1
	tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null | grep -q -- "--system --unit=basic.target"
}

# read_state: set SD and UNSHARE from the state file, if its systemd is alive.
read_state() {
	SD=
	UNSHARE=
	[ -r "$STATE" ] || return 1
	read -r SD UNSHARE <"$STATE" || return 1
	is_ours "$SD"
}

# protect_list: tmpfiles.d files that remove or empty something outside /run
# and /dev (lines of type D, R or r, with or without modifiers).
protect_list() {
	for f in /usr/lib/tmpfiles.d/*.conf /lib/tmpfiles.d/*.conf /etc/tmpfiles.d/*.conf \
		 /usr/local/lib/tmpfiles.d/*.conf; do
		[ -f "$f" ] && [ ! -L "$f" ] || continue
		if grep -Eq '^[[:space:]]*[DRr][-+!=~^]*[[:space:]]+/' "$f" &&
		   grep -E '^[[:space:]]*[DRr][-+!=~^]*[[:space:]]+/' "$f" | grep -Evq '^[[:space:]]*[DRr][-+!=~^]*[[:space:]]+/(run|dev)/'; then
			readlink -f "$f"
		fi
	done | sort -u
}

nsexec() {
	nsenter -t "$SD" -m -p -- "$@"
}

cmd_start() {
	if read_state; then
		echo "$SD"
		return 0
	fi
	[ "$(id -u)" = 0 ] || die "must run as root"
	[ -x "$SYSTEMD" ] || die "$SYSTEMD not found"
	command -v unshare >/dev/null && command -v nsenter >/dev/null || die "needs unshare and nsenter (util-linux)"
	rm -f "$STATE"

	# setsid detaches it from our session; unshare --fork makes the shell PID 1
	# of the new PID namespace, with its own mount namespace and /proc; it hides
	# the dangerous tmpfiles.d files (see PROTECT above) and execs systemd,
	# which stays PID 1.
	nohup setsid --wait unshare --pid --fork --mount --mount-proc \
		env container=unshare SYSTEMD_NS_PROTECT="$(protect_list)" SYSTEMD="$SYSTEMD" \
		sh -c 'for f in $SYSTEMD_NS_PROTECT; do mount --bind /dev/null "$f" || exit 1; done
		       sd=$SYSTEMD; unset SYSTEMD SYSTEMD_NS_PROTECT
		       exec "$sd" --system --unit=basic.target' \
		</dev/null >/dev/null 2>&1 &
	UNSHARE=$!

	# The namespace's PID 1 is unshare's child.  setsid does not fork here (a
	# background job of a non-interactive shell is not a group leader); if it
	# does, --wait keeps it alive as the parent, so look one level further down.
	SD=
	i=0
	while [ $i -lt 100 ]; do
		for p in $(pgrep -P "$UNSHARE" 2>/dev/null) \
			 $(for c in $(pgrep -P "$UNSHARE" 2>/dev/null); do pgrep -P "$c"; done); do
			if is_ours "$p"; then SD=$p; break 2; fi
		done
		alive "$UNSHARE" || break
		sleep 0.1
		i=$((i + 1))
	done
	[ -n "$SD" ] || { kill "$UNSHARE" 2>/dev/null; die "systemd did not start"; }
	echo "$SD $UNSHARE" >"$STATE"

	# Wait for the boot to finish.  "degraded" is fine: some host units may not
	# apply inside a namespace.
	deadline=$(( $(date +%s) + BOOT_TIMEOUT ))
	while :; do
		st=$(nsexec systemctl is-system-running 2>/dev/null)
		case "$st" in
		running | degraded) break ;;
		esac
		if [ "$(date +%s)" -ge "$deadline" ]; then
			echo "systemd-ns: not up after ${BOOT_TIMEOUT}s (state: ${st:-no answer})" >&2
			nsexec systemctl --failed --no-pager >&2 2>/dev/null
			cmd_stop
			exit 1
		fi
		alive "$SD" || die "systemd $SD exited while booting"
		sleep 0.2
	done
	echo "$SD"
}

cmd_stop() {
	read_state || {
		# Nothing (or only a dead systemd) recorded: clean up what remains.
		if [ -n "${UNSHARE:-}" ] && alive "$UNSHARE" &&
		   [ "$(cat "/proc/$UNSHARE/comm" 2>/dev/null)" = unshare ]; then
			kill -KILL "$UNSHARE" 2>/dev/null
		fi
		rm -f "$STATE"
		return 0
	}
	nsexec systemctl poweroff --no-block >/dev/null 2>&1
	i=0
	while alive "$SD" && [ $i -lt 300 ]; do
		sleep 0.1
		i=$((i + 1))
	done
	# Killing a PID namespace's init kills every process in that namespace.
	if alive "$SD"; then
		echo "systemd-ns: $SD still running after poweroff; killing it" >&2
		kill -KILL "$SD" 2>/dev/null
		sleep 0.5
	fi
	if [ -n "$UNSHARE" ] && alive "$UNSHARE" && [ "$(cat "/proc/$UNSHARE/comm" 2>/dev/null)" = unshare ]; then
		kill -KILL "$UNSHARE" 2>/dev/null
	fi
	rm -f "$STATE"
}

case "${1:-}" in
start)
	cmd_start
	;;
stop)
	cmd_stop
	;;
pid)
	read_state || exit 1
	echo "$SD"
	;;
exec)
	shift
	[ $# -gt 0 ] || die "usage: $0 exec CMD [ARG...]"
	read_state || die "not running (run: $0 start)"
	exec nsenter -t "$SD" -m -p -- "$@"
	;;
*)
	echo "usage: $0 start | stop | pid | exec CMD [ARG...]" >&2
	exit 64
	;;
esac
