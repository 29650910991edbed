#!/usr/bin/env python3
"""t03: one lease contract, every backend.

Runs tests/lease_conformance (TAP) against
  - a fresh etcd (v3 JSON gateway),
  - a fresh etcd with authentication enabled and one-second tokens, so the
    backend must authenticate and re-authenticate when its token lapses,
  - the mongo backend on each store of h.store_kinds() (TDRAIN_TEST_STORES; by default a fresh
    FerretDB, SQLite backend, and a fresh DocumentDB, whose URI carries credentials),
and relays every test point, prefixed with the backend's label.  The suite
itself checks acquisition, fencing, release, expiry takeover timing, epoch
monotonicity, an 8-thread acquire race and an unreachable store
(see tests/lease_conformance.c).

Also checked here: the etcd password and the store password never appear in the suite's output.
Under TDRAIN_VALGRIND=1 the suite runs in valgrind and any memory error or
definite leak fails it.
"""

import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
import harness  # noqa: E402

PASSWORD = 'c0nf-s3cret-pw'
TTL_MS = 2000


def relay(h, label, r):
    """Re-emit the suite's TAP as our own points; return its summary diagnostic (or None)."""
    plan, points, summary = None, 0, None
    for line in (r.stdout or '').splitlines():
        m = re.match(r'^(ok|not ok) \d+(?: - (.*))?$', line)
        if m:
            points += 1
            h.ok(m.group(1) == 'ok', '%s: %s' % (label, m.group(2) or ''))
            continue
        m = re.match(r'^1\.\.(\d+)', line)
        if m:
            plan = int(m.group(1))
            continue
        if line.startswith('Bail out!'):
            h.ok(False, '%s: %s' % (label, line))
        elif line.startswith('#'):
            text = line[1:].strip()
            if text.startswith('summary:'):
                summary = text
            h.diag('%s: %s' % (label, text))
        elif line.strip():
            h.diag('%s: %s' % (label, line))
    complete = r.returncode == 0 and plan is not None and plan == points and points > 0
    h.ok(complete, '%s: suite exited 0 with its whole plan run (%d of %s points, exit %s)'
         % (label, points, plan, r.returncode))
    if not complete and r.stderr:
        h.diag('%s stderr (last lines):\n%s' % (label, '\n'.join(r.stderr.splitlines()[-30:])))
    return summary


def suite_argv(h, args):
    argv = [h.tool('tests/lease_conformance')] + args + ['--ttl', str(TTL_MS)]
    if h.valgrind:
        argv = ['valgrind', '--error-exitcode=99', '--leak-check=full', '--errors-for-leak-kinds=definite',
                '--show-leak-kinds=definite', '--num-callers=30'] + argv
    return argv


def enable_auth(e):
    """Create root with PASSWORD and turn authentication on, through the gateway."""
    e.post('/v3/auth/user/add', {'name': 'root', 'password': PASSWORD})
    e.post('/v3/auth/user/grant', {'user': 'root', 'role': 'root'})
    e.post('/v3/auth/enable', {})


def main(h):
    summaries = {}
    timeout = 600 if h.valgrind else 180

    e = h.start_etcd()
    r = h.run(suite_argv(h, ['--backend', 'etcd', '--endpoint', e.endpoint]), timeout=timeout)
    summaries['etcd'] = relay(h, 'etcd', r)
    e.stop()

    # Tokens that lapse after one idle second: the expiry case idles longer than that.
    ea = h.start_etcd(extra_args=['--auth-token-ttl', '1'])
    enable_auth(ea)
    r = h.run(suite_argv(h, ['--backend', 'etcd', '--endpoint', ea.endpoint, '--auth', 'root:' + PASSWORD,
                             '--prefix', '/auth-conformance/', '--log-level', 'debug']), timeout=timeout)
    summaries['etcd+auth'] = relay(h, 'etcd+auth', r)
    h.ok(PASSWORD not in (r.stdout or '') and PASSWORD not in (r.stderr or ''),
         'etcd+auth: the password appears nowhere in the output')
    h.ok('authenticating again' in (r.stderr or ''),
         'etcd+auth: a lapsed token was replaced by authenticating again')
    ea.stop()

    # The mongo backend on every store kind (TDRAIN_TEST_STORES): on FerretDB only unique-key inserts are
    # atomic; DocumentDB also applies the holder/epoch-filtered renewals and releases atomically.
    for kind in h.store_kinds():
        m = h.start_store(kind)
        label = '[%s] mongo' % m.label
        r = h.run(suite_argv(h, ['--backend', 'mongo', '--uri', m.uri, '--db', 'tdrain_conformance']),
                  timeout=timeout)
        summaries[label] = relay(h, label, r)
        # The suite prints the URI redacted (tdr_redact_uri): a store password must not reach the log.
        if '@' in m.uri:
            secret = m.uri.split('//', 1)[1].split('@', 1)[0].split(':', 1)[-1]
            h.ok(secret not in (r.stdout or '') and secret not in (r.stderr or ''),
                 '%s: the store password appears nowhere in the output' % label)
        m.stop()

    for label, s in summaries.items():
        h.diag('takeover timing, %s: %s' % (label, s or 'no summary (suite did not finish)'))


harness.Harness().main(main)
