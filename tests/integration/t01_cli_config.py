#!/usr/bin/env python3
"""t01: the daemon's command-line and configuration contract.

    tdrain -c FILE [-N NAME] [--set key=value]... [-n] [-V] [-h]

- -n checks the configuration, prints "configuration OK", exits 0, and
  connects to nothing.
- A bad configuration (bad value, unknown key, lease TTL not above the renew
  deadline, bad store.uri scheme, a bad TDRAIN_* variable, a bad --set, a bad
  -N, a missing file) exits 78 (EX_CONFIG) with exactly one line on stderr that
  names the key, and touches nothing: the store URI points at a socket this test
  listens on, and no connection may arrive.
- An unreachable store (closed port, small store.timeout_ms) gives one clear
  error line and exit status 69 (EX_UNAVAILABLE) within a few seconds.
- A password in store.uri never appears in any output.

No server is needed: every case is decided before tdrain reaches a store.
"""

import os
import re
import select
import socket
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
import harness  # noqa: E402

EX_OK, EX_UNAVAILABLE, EX_CONFIG = 0, 69, 78
SECRET = 's3cret'


def clean_env(extra=None):
    """The environment for tdrain: no TDRAIN_<KEY> variables from outside, no journal."""
    env = {k: None for k in os.environ if k.startswith('TDRAIN_')}
    env['JOURNAL_STREAM'] = None
    env.update(extra or {})
    return env


def lines(text):
    return [l for l in text.splitlines() if l.strip()]


class Listener:
    """A listening socket standing in for a store: did anyone connect?"""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(('127.0.0.1', harness.free_port()))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]

    def connections(self):
        n = 0
        while select.select([self.sock], [], [], 0)[0]:
            c, _ = self.sock.accept()
            c.close()
            n += 1
        return n


def main(h):
    tdrain = h.tool('tdrain')
    listener = Listener()
    closed_port = harness.free_port()       # reserved by us, nothing listens there

    good = {
        'store.uri': 'mongodb://127.0.0.1:%d/' % listener.port,
        'store.timeout_ms': 1000,
        'coord.lease_ttl_ms': 15000,
        'coord.renew_deadline_ms': 10000,
        'coord.retry_period_ms': 2000,
    }

    def write_conf(name, cfg):
        path = os.path.join(h.tmp, name + '.conf')
        with open(path, 'w') as f:
            f.write(h.config_text(cfg))
        return path

    def tdrain_run(conf, *args, env=None, timeout=30):
        t0 = time.monotonic()
        r = h.run([tdrain, '-c', conf] + list(args), timeout=timeout, env=clean_env(env))
        r.elapsed = time.monotonic() - t0
        return r

    def show(r):
        h.diag('exit %s after %.1f s' % (r.returncode, getattr(r, 'elapsed', 0.0)))
        for label, text in (('stdout', r.stdout), ('stderr', r.stderr)):
            if text.strip():
                h.diag('%s:\n%s' % (label, text.rstrip()[-2000:]))

    # ---- -h, -V ----
    r = h.run([tdrain, '-h'], timeout=10, env=clean_env())
    out = r.stdout + r.stderr
    h.is_(r.returncode, EX_OK, '-h exits 0')
    h.ok('-c' in out and '--set' in out and '-n' in out, '-h shows usage with -c, --set, -n') or h.diag(out)

    version = None
    with open(os.path.join(h.srcdir, 'configure.ac')) as f:
        m = re.search(r'AC_INIT\(\[tdrain\],\s*\[([^\]]+)\]', f.read())
        version = m.group(1) if m else None
    r = h.run([tdrain, '-V'], timeout=10, env=clean_env())
    h.is_(r.returncode, EX_OK, '-V exits 0')
    h.ok(version is not None and version in r.stdout + r.stderr, '-V prints the version %s' % version) \
        or h.diag(r.stdout + r.stderr)

    r = h.run([tdrain, '--no-such-option'], timeout=10, env=clean_env())
    h.ok(r.returncode not in (0, None) and lines(r.stderr), 'an unknown option fails with a message') or show(r)

    # ---- -n: configuration OK, no connection ----
    conf_ok = write_conf('good', good)
    r = tdrain_run(conf_ok, '-n')
    h.ok(r.returncode == EX_OK and 'configuration OK' in r.stdout + r.stderr, '-n: "configuration OK", exit 0') \
        or show(r)
    h.is_(listener.connections(), 0, '-n connects to nothing')

    r = tdrain_run(conf_ok, '-N', 'replica-a.1', '--set', 'drain.batch_size=50', '--set', 'coord.mode=partitioned', '-n')
    h.ok(r.returncode == EX_OK and 'configuration OK' in r.stdout + r.stderr, '-n with -N and --set: OK') or show(r)

    # Sources are merged before the cross-field checks: --set can repair the file.
    conf_fixable = write_conf('fixable', dict(good, **{'coord.lease_ttl_ms': 5000, 'coord.renew_deadline_ms': 5000,
                                                       'coord.retry_period_ms': 1000}))
    r = tdrain_run(conf_fixable, '--set', 'coord.lease_ttl_ms=8000', '-n')
    h.ok(r.returncode == EX_OK, '--set overrides the file before validation') or show(r)

    # ---- bad configurations: 78, one stderr line naming the key, nothing touched ----
    bad_cases = [
        ('non-integer value in the file', dict(good, **{'coord.lease_ttl_ms': 'abc'}), [], {},
         ['coord.lease_ttl_ms']),
        ('unknown key in the file', dict(good, **{'drain.no_such_key': '1'}), [], {},
         ['drain.no_such_key']),
        ('lease TTL equal to the renew deadline', dict(good, **{'coord.lease_ttl_ms': 10000}), [], {},
         ['coord.lease_ttl_ms']),
        ('lease TTL below the renew deadline', dict(good, **{'coord.lease_ttl_ms': 4000, 'coord.renew_deadline_ms': 5000}),
         [], {}, ['coord.lease_ttl_ms']),
        ('store.uri with an http:// scheme', dict(good, **{'store.uri': 'http://127.0.0.1:%d/' % listener.port}), [], {},
         ['store.uri']),
        ('TDRAIN_DRAIN_BATCH_SIZE=0 in the environment', good, [], {'TDRAIN_DRAIN_BATCH_SIZE': '0'},
         ['drain.batch_size', 'TDRAIN_DRAIN_BATCH_SIZE']),
        ('--set with an out-of-range value', good, ['--set', 'drain.batch_size=-5'], {},
         ['drain.batch_size']),
        ('--set of an unknown key', good, ['--set', 'no.such=1'], {}, ['no.such']),
        ('enum value not allowed', dict(good, **{'coord.backend': 'zookeeper'}), [], {}, ['coord.backend']),
        ('-N with a forbidden character', good, ['-N', 'bad name!'], {}, ['name']),
    ]
    for i, (what, cfg, args, env, names) in enumerate(bad_cases):
        conf = write_conf('bad%d' % i, cfg)
        r = tdrain_run(conf, *args, env=env)
        err = lines(r.stderr)
        good_status = h.is_(r.returncode, EX_CONFIG, '%s: exit 78' % what)
        one_line = h.ok(len(err) == 1, '%s: exactly one line on stderr' % what)
        named = h.ok(err and any(n in err[0] for n in names), '%s: the line names %s' % (what, names[0]))
        h.ok(r.elapsed < 5, '%s: fails at once (%.1f s)' % (what, r.elapsed))
        h.is_(listener.connections(), 0, '%s: no connection to the store' % what)
        if not (good_status and one_line and named):
            show(r)

    r = tdrain_run(os.path.join(h.tmp, 'missing.conf'))
    h.is_(r.returncode, EX_CONFIG, 'missing config file: exit 78')
    h.ok(len(lines(r.stderr)) == 1 and 'missing.conf' in r.stderr, 'missing config file: one line naming the file') \
        or show(r)

    # The same bad value with -n is also 78.
    r = tdrain_run(write_conf('bad-n', dict(good, **{'coord.lease_ttl_ms': 'abc'})), '-n')
    h.ok(r.returncode == EX_CONFIG and 'configuration OK' not in r.stdout + r.stderr,
         '-n on a bad configuration: exit 78, not "OK"') or show(r)

    # ---- unreachable store: 69, one clear error line, within a few seconds ----
    unreachable = dict(good, **{'store.uri': 'mongodb://127.0.0.1:%d/' % closed_port})
    r = tdrain_run(write_conf('unreachable', unreachable), '-N', 'u1', timeout=60)
    err_lines = [l for l in lines(r.stderr) if re.search(r'\berr(or)?\b', l, re.I)]
    h.is_(r.returncode, EX_UNAVAILABLE, 'unreachable store: exit 69') or show(r)
    h.ok(len(err_lines) == 1, 'unreachable store: exactly one error line') or show(r)
    h.ok(err_lines and ('store' in err_lines[0].lower() or str(closed_port) in err_lines[0]),
         'unreachable store: the error line says it is the store')
    h.ok(r.elapsed < 10, 'unreachable store: gives up within a few seconds (%.1f s)' % r.elapsed)

    # ---- a password in store.uri never appears ----
    secret_uri = 'mongodb://tdrain:%s@127.0.0.1:%d/?authSource=admin' % (SECRET, closed_port)
    secret_cases = [
        ('-n', write_conf('s-n', dict(good, **{'store.uri': secret_uri})), ['-n'], {}),
        ('unreachable store', write_conf('s-unreach', dict(good, **{'store.uri': secret_uri})), [], {}),
        ('bad value elsewhere', write_conf('s-bad', dict(good, **{'store.uri': secret_uri, 'drain.batch_size': 0})),
         [], {}),
        ('bad lease timings', write_conf('s-lease', dict(good, **{'store.uri': secret_uri, 'coord.lease_ttl_ms': 1000,
                                                                   'coord.renew_deadline_ms': 900,
                                                                   'coord.retry_period_ms': 100})), [], {}),
        ('URI from --set', conf_ok, ['--set', 'store.uri=' + secret_uri], {}),
        ('URI from TDRAIN_STORE_URI', conf_ok, [], {'TDRAIN_STORE_URI': secret_uri}),
        ('URI with an invalid port', write_conf('s-port', dict(good, **{
            'store.uri': 'mongodb://tdrain:%s@127.0.0.1:99999/' % SECRET})), [], {}),
        ('log.level debug', write_conf('s-debug', dict(good, **{'store.uri': secret_uri, 'log.level': 'debug'})),
         [], {}),
    ]
    for what, conf, args, env in secret_cases:
        r = tdrain_run(conf, *args, env=env, timeout=60)
        leaked = SECRET in (r.stdout or '') or SECRET in (r.stderr or '')
        h.ok(not leaked and r.returncode is not None, 'password not shown: %s (exit %s)' % (what, r.returncode)) \
            or show(r)


harness.Harness().main(main)
