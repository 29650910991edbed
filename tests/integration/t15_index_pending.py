#!/usr/bin/env python3
"""t15: replicas start while an index build is pending, and backlog figures are exact.

Indexes make claims fast but no correctness rule depends on them, so a replica
whose start-up createIndexes does not answer within store.timeout_ms must start,
drain, report the pending build (journal event indexes_pending, metric
tdrain_indexes_pending, STATUS=, tdrainctl status) and retry in the background
until it reports indexes_ready.  It must never exit for it (tdrain 0.1.0 exited
69 and every replica restarted into the same failure).

- DocumentDB, for real: the FIFO already holds 20,000 events when two
  partitioned replicas start, so DocumentDB queues createIndexes for its
  once-a-minute background job; the call returns only at its next run.
- FerretDB (builds at once): a SlowProxy holds every createIndexes reply for
  20 s, longer than store.timeout_ms, as a slow MongoDB build would.

On both: the FIFO drains completely while the build is pending, the replicas
stay up, a SIGTERM during the pending build exits promptly and cleanly, the
build is reported ready (DocumentDB: within ~70 s of the start, a test bound),
the listed indexes exist, and the backlog shown by tdrainctl status (text and
--json), the metrics file and STATUS= is exactly 0 for the empty FIFO and
exactly N with N events pending (DocumentDB's estimates say 85,000 for an
empty collection).
"""
import json
import os
import re
import socket
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
import harness  # noqa: E402

P = 4
INDEXES = ('tdrain_name_epoch', 'tdrain_part_epoch', 'tdrain_part_id')


def conf(h, uri, label, name):
    return {
        'store.uri': uri,
        'coord.mode': 'partitioned',
        'coord.partitions': P,
        'coord.lease_ttl_ms': 15000,
        'coord.renew_deadline_ms': 10000,
        'coord.retry_period_ms': 1000,
        'store.timeout_ms': 3000,
        'drain.batch_size': 1000,
        'fold.interval_ms': 100,
        'metrics.file': os.path.join(h.tmp, '%s-%s.prom' % (label, name)),
        'metrics.interval_ms': 500,
    }


class Notify:
    """A NOTIFY_SOCKET of our own: the last STATUS= a replica sent (sd_notify), as systemd would show it."""

    def __init__(self, h, name):
        self.path = os.path.join(h.tmp, 'notify-%s.sock' % name)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.status = ''
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        while True:
            try:
                msg = self.sock.recv(65536).decode('utf-8', 'replace')
            except OSError:
                return
            for line in msg.split('\n'):
                if line.startswith('STATUS='):
                    self.status = line[len('STATUS='):]

    def close(self):
        self.sock.close()


def metric(h, label, name, key):
    """The value of metric key in replica name's metrics file, or None."""
    try:
        with open(os.path.join(h.tmp, '%s-%s.prom' % (label, name))) as f:
            for line in f:
                mm = re.match(r'^%s\{[^}]*\} (\S+)$' % re.escape(key), line)
                if mm:
                    return float(mm.group(1))
    except OSError:
        pass
    return None


def ctl(h, uri, *args):
    cfg = os.path.join(h.tmp, 'ctl.conf')
    with open(cfg, 'w') as f:
        f.write(h.config_text({'store.uri': uri, 'coord.mode': 'partitioned', 'coord.partitions': P}))
    return h.run([h.tool('tdrainctl'), '-c', cfg] + list(args), timeout=120)


def ctl_json(h, uri):
    r = ctl(h, uri, 'status', '--json', '--no-rate')
    if r.returncode != 0:
        h.diag('tdrainctl status --json: rc %s: %s' % (r.returncode, r.stderr.strip()[-400:]))
        return None
    return json.loads(r.stdout)


def loadgen(h, m, n, seed):
    return h.run([h.tool('tdrain-loadgen'), '--uri', m.uri, '--count', str(n), '--devices', '300',
                  '--users', '100', '--seed', str(seed), '--quiet'], timeout=300)


def run_store(h, kind):
    label = kind
    m = h.start_store(kind)
    db = m.db()
    n0 = 20000 if kind == 'documentdb' else 3000
    r = loadgen(h, m, n0, 15)
    h.ok(r.returncode == 0 and db.events.count_documents({}) == n0,
         '[%s] the FIFO holds %d events before any replica starts' % (label, n0))

    proxy = None
    hold = {'on': False}
    uri = m.uri
    if kind != 'documentdb':
        # FerretDB builds at once: make it a slow build by holding its answers.
        proxy = harness.SlowProxy(m.port)
        hold['on'] = True
        proxy.set_latency(reply=lambda cmd: 20.0 if hold['on'] and cmd.startswith('createIndexes') else 0)
        uri = proxy.uri
    t0 = time.monotonic()
    names = ('a', 'b')
    notes = {n: Notify(h, '%s-%s' % (label, n)) for n in names}
    procs = {n: h.start_tdrain('%s-%s' % (label, n), conf(h, uri, label, n), args=['-N', n],
                               env={'NOTIFY_SOCKET': notes[n].path}) for n in names}
    try:
        pending_logged = h.wait_until(
            lambda: all('event=indexes_pending' in p.log_text() for p in procs.values()), 30,
            interval=0.25, desc='[%s] indexes_pending in both logs' % label)
        h.ok(pending_logged, '[%s] both replicas report the pending build (indexes_pending event)' % label)
        for n, p in procs.items():
            line = [x for x in p.log_text().splitlines() if 'indexes_pending' in x][:1]
            if line:
                h.diag('[%s] %s: %s' % (label, n, line[0][:300]))
        h.ok(h.wait_until(lambda: all('indexes pending' in notes[n].status for n in names)
                          or all('event=indexes_ready' in p.log_text() for p in procs.values()), 20,
                          interval=0.25),
             '[%s] STATUS= mentions the pending build (%r)' % (label, notes['a'].status))
        h.ok(h.wait_until(lambda: all(metric(h, label, n, 'tdrain_indexes_pending') == 1 for n in names)
                          or all('event=indexes_ready' in p.log_text() for p in procs.values()), 20,
                          interval=0.25),
             '[%s] tdrain_indexes_pending is 1 while the build is pending' % label)
        st = ctl_json(h, m.uri)
        idx = (st or {}).get('indexes') or {}
        pending_in_ctl = sorted(x.get('replica') for x in idx.get('pending_replicas', []))
        ready_early = all('event=indexes_ready' in p.log_text() for p in procs.values())
        h.ok(st is not None and (pending_in_ctl == sorted(names) or ready_early) and idx.get('ready') is False
             or ready_early,
             '[%s] tdrainctl status --json lists both replicas as waiting for the build (got %s)'
             % (label, pending_in_ctl))
        txt = ctl(h, m.uri, 'status', '--no-rate')
        h.ok(txt.returncode == 0 and (re.search(r'^indexes\s.*pending', txt.stdout, re.M) or ready_early),
             '[%s] tdrainctl status (text) shows the pending build' % label)

        drained = h.wait_until(lambda: db.events.count_documents({}) == 0
                               and db.tdrain_deltas.count_documents({}) == 0, 300, interval=0.5,
                               desc='[%s] FIFO drained' % label)
        h.ok(drained, '[%s] the FIFO drained (%.0f s after the start)' % (label, time.monotonic() - t0))
        h.ok(all(p.alive() for p in procs.values()), '[%s] no replica exited' % label)
        if proxy is not None:
            hold['on'] = False   # replies already held still take their 20 s

        # A SIGTERM while a createIndexes may still be held must not wait for it.
        if not all('event=indexes_ready' in p.log_text() for p in procs.values()):
            ts = time.monotonic()
            rc = procs['b'].stop(timeout=30)
            took = time.monotonic() - ts
            h.ok(rc == 0 and took < 3 * 3 + 2, '[%s] SIGTERM during the pending build: exit %s in %.1f s'
                 % (label, rc, took))
            procs['b'] = h.start_tdrain('%s-b' % label, conf(h, uri, label, 'b'), args=['-N', 'b'],
                                        env={'NOTIFY_SOCKET': notes['b'].path})
        else:
            h.skip('the build finished before the stop could be tried', '[%s] SIGTERM during the build' % label)

        # a reports indexes_ready; b (restarted, or not) shows tdrain_indexes_pending 0 from its current run.
        ready = h.wait_until(lambda: 'event=indexes_ready' in procs['a'].log_text()
                             and metric(h, label, 'b', 'tdrain_indexes_pending') == 0,
                             180, interval=0.5, desc='[%s] indexes ready' % label)
        took = time.monotonic() - t0
        h.ok(ready, '[%s] the build is reported ready (indexes_ready) %.0f s after the start' % (label, took))
        if kind == 'documentdb':
            # Two FIFO indexes are queued there (tdrain_part_id and tdrain_id, one createIndexes): the CI
            # rehearsal saw them ready after 115 s, two runs of the once-a-minute job, plus the backoff.
            h.ok(took < 160, '[%s] ready within the test bound (DocumentDB job period 60 s, two FIFO indexes): '
                 '%.0f s' % (label, took))
        have = {i['name'] for c in ('events', 'tdrain_claims', 'tdrain_leases')
                for i in db[c].list_indexes()}
        h.ok(all(i in have for i in INDEXES), '[%s] listIndexes has %s' % (label, ', '.join(INDEXES)))
        if kind == 'documentdb':
            # DocumentDB only (lib/store.c): the {_id: {$in}} deletes of the FIFO and the deltas use them.
            h.ok('tdrain_id' in have and 'tdrain_delta_id' in {i['name'] for i in db['tdrain_deltas'].list_indexes()},
                 '[%s] listIndexes has tdrain_id (events) and tdrain_delta_id (tdrain_deltas)' % label)
        h.ok(h.wait_until(lambda: all(metric(h, label, n, 'tdrain_indexes_pending') == 0 for n in names), 10,
                          interval=0.25), '[%s] tdrain_indexes_pending is 0 again' % label)
        st = ctl_json(h, m.uri)
        idx = (st or {}).get('indexes') or {}
        h.ok(idx.get('ready') is True and not idx.get('missing') and not idx.get('pending_replicas'),
             '[%s] tdrainctl status --json: indexes ready, none missing (%s)' % (label, idx))

        # Exact backlog: the empty FIFO is 0 everywhere it is shown.
        h.ok(h.wait_until(lambda: all(metric(h, label, n, 'tdrain_backlog_events') == 0 for n in names), 10,
                          interval=0.25),
             '[%s] tdrain_backlog_events is 0 on both replicas (leader counts, follower reads it)' % label)
        st = ctl_json(h, m.uri)
        bl = (st or {}).get('backlog') or {}
        h.is_(bl.get('fifo'), 0, '[%s] tdrainctl status --json: backlog.fifo of the empty FIFO' % label)
        h.is_(bl.get('fifo_capped'), False, '[%s] backlog.fifo_capped is false' % label)
        est = db.events.estimated_document_count()
        h.diag('[%s] the store\'s own estimate for the empty FIFO: %d' % (label, est))
        txt = ctl(h, m.uri, 'status', '--no-rate')
        h.ok(re.search(r'^backlog\s+fifo 0\b', txt.stdout, re.M) is not None,
             '[%s] tdrainctl status (text): backlog fifo 0' % label)
        h.ok(h.wait_until(lambda: all(', backlog 0,' in notes[n].status for n in names), 10, interval=0.25),
             '[%s] STATUS= says backlog 0 (%r)' % (label, notes['a'].status))

        # N events pending, nobody draining: the count is exactly N.
        for n, p in procs.items():
            h.ok(p.stop(timeout=30) == 0, '[%s] %s stops cleanly' % (label, n))
        n1 = 1234
        r = loadgen(h, m, n1, 16)
        true_n = db.events.count_documents({})
        st = ctl_json(h, m.uri)
        bl = (st or {}).get('backlog') or {}
        h.ok(r.returncode == 0 and true_n == n1 and bl.get('fifo') == n1,
             '[%s] with %d events pending, tdrainctl says backlog.fifo %s (true count %d, estimate %d)'
             % (label, n1, bl.get('fifo'), true_n, db.events.estimated_document_count()))
        txt = ctl(h, m.uri, 'status', '--no-rate')
        h.ok(re.search(r'^backlog\s+fifo %d\b' % n1, txt.stdout, re.M) is not None,
             '[%s] tdrainctl status (text): backlog fifo %d' % (label, n1))
    finally:
        for p in procs.values():
            p.stop(timeout=30)
        if proxy is not None:
            proxy.close()
        for x in notes.values():
            x.close()


def main(h):
    kinds = h.store_kinds() if hasattr(h, 'store_kinds') else ['ferretdb', 'documentdb']
    for kind in kinds:
        run_store(h, kind)
    h.diag('ran on: %s' % ', '.join(kinds))


harness.Harness().main(main)
