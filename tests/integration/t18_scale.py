#!/usr/bin/env python3
"""t18: coordination at any partition count (issue 15), on both coordination backends and every store of
h.store_kinds() (FerretDB and DocumentDB by default, TDRAIN_TEST_STORES).

1. steady state.  For P in T18_PARTITIONS (default 1024,4096) and n in T18_REPLICAS (default 2 under
   make check; tests/fault_suite.sh: 1,2,8) replicas, with the mongo and the etcd backend
   (T18_BACKENDS): T18_EVENTS events (default 1000; fault suite 50,000) (half
   with `part`; above 10,000 the producers stream, waiting while the FIFO holds 10,000) are drained
   with the timings of the issue's report (lease TTL 6 s, renew deadline 4 s, retry 1 s, store timeout
   3 s).  Checks: shares converge to floor/ceil(P/n); the FIFO drains and folds; 0 lease_lost and 0
   lease_renew_failed in any replica's log from start to end; then for T18_QUIET_S seconds
   (steady state, no events): no partition changes owner (no partition_assigned / partition_revoked
   logged), and the coordination requests each replica makes per retry period
   (tdrain_coord_requests_total from its metrics file; on mongo also the statements on
   tdrain_leases counted by a SlowProxy in front of one replica) stay at most T18_MAX_REQ (default
   3) whatever P is: figures printed per (backend, P, n).
2. kill -9 (P = 1024, 8 replicas, each backend): one replica that is not the leader is killed; every
   partition it held has a new owner within lease TTL + 2 retry periods (measured from the kill);
   shares converge over the 7 survivors.
3. SIGTERM with the coordination backend gone (P = 1024, 2 replicas): the store (mongo backend) or
   etcd (etcd backend) is stopped, then both replicas get SIGTERM: each exits 0 within
   store.timeout_ms + 2 s.

Prints "# FIGURES scenario=<store>/t18-..." lines; tests/fault_suite.sh runs it with T18_EVENTS=50000,
T18_QUIET_S=300 and T18_REPLICAS=1,2,8 (the issue's "drains 50,000 events ... and stays quiet for 5
minutes"); make check runs the bounded defaults (1,000 events, 10 s quiet, 2 replicas in the steady
state) so that CI stays short.

Open as of the commit that updated this note (not verified to pass): on DocumentDB at P = 4096 a PostgreSQL
backend crashed (signal 11, "Failed process was running: SELECT * FROM documentdb_api.insert(...)") within
seconds of the start, with the acquisitions in one bulk (twice) and again in bulks of 256 (once); pymongo alone
inserting 4,096 lease documents 256 per bulk crashed it too (docs/DESIGN.md, "Bulk acquire and release"), so the
bulk size is not the cause.  Since tdrain_part_name_epoch is not unique, P = 4096 on DocumentDB passed in its one
run (2 replicas, both backends, no crash).  On FerretDB under load (shared 2 cores) the mongo backend's kill -9 failover took
8.7 s against the TTL + 2 retry periods bound of 8 s (12.2 s before a takeover read tdrain_leases once); with
little other load it passed: 7.0 s (etcd 6.7 s).
"""
import base64
import collections
import json
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
import harness  # noqa: E402
from harness import balanced, shares  # noqa: E402

TTL, RENEW, RETRY, TIMEOUT = 6000, 4000, 1000, 3000
EVENTS = int(os.environ.get('T18_EVENTS', '1000'))
QUIET_S = float(os.environ.get('T18_QUIET_S', '10'))
PARTS = [int(x) for x in (os.environ.get('T18_PARTITIONS') or '1024,4096').split(',') if x]
REPLICAS = [int(x) for x in (os.environ.get('T18_REPLICAS') or '2').split(',') if x]
BACKENDS = [b for b in (os.environ.get('T18_BACKENDS') or 'mongo,etcd').split(',') if b]
ONLY = set((os.environ.get('T18_ONLY') or 'steady,kill,stop').split(','))
# Steady state per retry period (docs/DESIGN.md): mongo 1 renewal + 1 read of the sessions; etcd 1 keepalive +
# 1 read of the member key + 1 range; plus a read of the partition leases every 10 periods.
MAX_REQ = {'mongo': 3.0, 'etcd': 4.0}
STREAM_ABOVE = 10000
ROWS = []


def figures(h, scenario, **kv):
    h.diag('FIGURES scenario=%s %s' % (scenario, ' '.join('%s=%s' % (k, v) for k, v in kv.items())))


def conf(h, m, e, backend, P, db, prefix, name):
    c = {
        'store.uri': m.uri, 'store.database': db, 'coord.backend': backend, 'coord.mode': 'partitioned',
        'coord.partitions': P, 'coord.lease_ttl_ms': TTL, 'coord.renew_deadline_ms': RENEW,
        'coord.retry_period_ms': RETRY, 'store.timeout_ms': TIMEOUT, 'drain.batch_size': 500,
        'fold.interval_ms': 200, 'metrics.file': os.path.join(h.tmp, '%s-%s.prom' % (db, name)),
    }
    if backend == 'etcd':
        c['coord.etcd_endpoint'] = e.endpoint
        c['coord.etcd_prefix'] = prefix
    return c


class Leases:
    """Live partition owners read straight from the backend: {p: (holder, epoch)}.  Mongo: the newest
    document of each name, live while not released and its session (member lease) is at the epoch it
    names and not released (liveness in time is the daemons' to judge: a dead session's documents
    show until someone takes them over at a newer epoch)."""

    def __init__(self, m, e, backend, db, prefix):
        self.m, self.e, self.backend, self.db, self.prefix = m, e, backend, db, prefix

    def read(self):
        out = {}
        if self.backend == 'mongo':
            latest = {}
            for d in harness.lease_docs(self.m.db(self.db), {}, {'name': 1, 'epoch': 1, 'holder': 1, 'released': 1,
                                                                 'sess': 1, 'sess_epoch': 1}):
                n = d.get('name')
                if n and (n not in latest or d['epoch'] > latest[n]['epoch']):
                    latest[n] = d
            for n, d in latest.items():
                if d.get('released'):
                    continue
                s = d.get('sess')
                if s and (s not in latest or latest[s]['epoch'] != d.get('sess_epoch') or latest[s].get('released')):
                    continue
                out[n] = (d.get('holder'), int(d['epoch']))
        else:
            pre = self.prefix + 'lease/'
            end = pre[:-1] + chr(ord(pre[-1]) + 1)
            r = self.e.post('/v3/kv/range', {'key': base64.b64encode(pre.encode()).decode(),
                                             'range_end': base64.b64encode(end.encode()).decode()}, timeout=10.0)
            for kv in r.get('kvs', []):
                k = base64.b64decode(kv['key']).decode()
                v = json.loads(base64.b64decode(kv['value']).decode())
                out[k[len(pre):]] = (v.get('holder'), int(kv['create_revision']))
        return out

    def owners(self):
        return {int(n.split('/')[1]): v for n, v in self.read().items() if n.startswith('part/')}


def metric(path, name):
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(name + '{') or line.startswith(name + ' '):
                    return float(line.rsplit(' ', 1)[1])
    except (OSError, ValueError):
        pass
    return None


def count_events(text, ev):
    return len(re.findall(r'event=%s\b' % ev, text))


def load(h, m, db, files, n, seed, P, stream):
    procs = []
    for i, extra in enumerate((['--partitions', str(P)], [])):
        f = os.path.join(h.tmp, '%s-%d.ndjson' % (db, i))
        files.append(f)
        argv = [h.tool('tdrain-loadgen'), '--uri', m.uri, '--db', db, '--count', str(n // 2), '--devices', '300',
                '--users', '100', '--dup-ratio', '0.02', '--seed', str(seed + i), '--ndjson', f, '--quiet'] + extra
        if stream:
            procs.append(subprocess.Popen(argv + ['--max-backlog', str(STREAM_ABOVE)], stdout=subprocess.DEVNULL))
        else:
            r = h.run(argv, timeout=600)
            if r.returncode != 0:
                h.diag('loadgen: %s' % (r.stderr or '')[-500:])
    return procs


def steady(h, m, e, backend, P, n):
    tag = '[%s P=%d n=%d]' % (backend, P, n)
    db = 't18_%s_%d_%d' % (backend, P, n)
    prefix = '/t18/%s/%d/%d/' % (backend, P, n)
    L = Leases(m, e, backend, db, prefix)
    files = []
    stream = EVENTS > STREAM_ABOVE
    producers = load(h, m, db, files, EVENTS, 100 + P + n, P, stream)
    names = ['r%d' % i for i in range(1, n + 1)]
    proxy = harness.SlowProxy(m.port) if backend == 'mongo' else None
    procs = {}
    t0 = time.monotonic()
    for i, nm in enumerate(names):
        c = conf(h, m, e, backend, P, db, prefix, nm)
        if i == 0 and proxy is not None:
            c['store.uri'] = m.uri_via(proxy.port)   # counted: every statement r1 makes, by command and collection
        procs[nm] = h.start_tdrain('%s-%s' % (db, nm), c, args=['-N', nm])
    ok = h.wait_until(lambda: balanced({p: v[0] for p, v in L.owners().items()}, names, P), 120, interval=1,
                      desc='%s shares' % tag)
    t_conv = time.monotonic() - t0
    sh = shares({p: v[0] for p, v in L.owners().items()}, names)
    h.ok(ok, '%s every partition owned, shares floor/ceil(P/n) in %.1f s: min %d max %d'
         % (tag, t_conv, min(sh.values()), max(sh.values())))
    for pr in producers:
        pr.wait(timeout=7200)
    total = sum(1 for f in files for line in open(f) if line.strip())
    dbh = m.db(db)
    ok = h.wait_until(lambda: dbh.events.count_documents({}) == 0 and dbh.tdrain_deltas.count_documents({}) == 0,
                      300 + total // 20, interval=1, desc='%s drain' % tag)
    t_drain = time.monotonic() - t0
    h.ok(ok, '%s the FIFO drained (%d events) and folded in %.1f s' % (tag, total, t_drain))
    n_chk, mism = __import__('checker').check(m.uri, db, files)
    h.ok(n_chk > 0 and not mism, '%s derived state exact (%d documents, %d mismatches)' % (tag, n_chk, len(mism)))

    # Steady state: nothing moves, and coordination costs the same at any P.
    logs0 = {nm: len(p.log_text()) for nm, p in procs.items()}
    req0 = {nm: metric(os.path.join(h.tmp, '%s-%s.prom' % (db, nm)), 'tdrain_coord_requests_total') for nm in names}
    cmd0 = proxy.commands() if proxy else None
    owners0 = L.owners()
    tq = time.monotonic()
    time.sleep(QUIET_S)
    # The metrics file is rewritten every second: wait for a fresh one.
    time.sleep(1.2)
    elapsed = time.monotonic() - tq
    req1 = {nm: metric(os.path.join(h.tmp, '%s-%s.prom' % (db, nm)), 'tdrain_coord_requests_total') for nm in names}
    cmd1 = proxy.commands() if proxy else None
    owners1 = L.owners()
    periods = elapsed * 1000.0 / RETRY
    per = {nm: (req1[nm] - req0[nm]) / periods for nm in names if req0[nm] is not None and req1[nm] is not None}
    moved = sum(1 for p in range(P) if owners0.get(p) != owners1.get(p))
    changes = sum(count_events(p.log_text()[logs0[nm]:], 'partition_assigned') +
                  count_events(p.log_text()[logs0[nm]:], 'partition_revoked') for nm, p in procs.items())
    lost = sum(count_events(p.log_text(), 'lease_lost') for p in procs.values())
    renew_failed = sum(count_events(p.log_text(), 'lease_renew_failed') for p in procs.values())
    h.is_(lost, 0, '%s 0 lease_lost from start to end (%d lease_renew_failed)' % (tag, renew_failed))
    h.ok(moved == 0 and changes == 0, '%s quiet for %.0f s: %d partitions changed owner, %d assigned/revoked logged'
         % (tag, QUIET_S, moved, changes))
    worst = max(per.values()) if per else None
    h.ok(len(per) == n and worst is not None and worst <= MAX_REQ[backend],
         '%s coordination requests per retry period per replica: %s (at most %.1f, whatever P)'
         % (tag, ', '.join('%s %.2f' % kv for kv in sorted(per.items())), MAX_REQ[backend]))
    proxied = None
    if proxy is not None:
        d = {k: cmd1[k] - cmd0.get(k, 0) for k in cmd1 if k.endswith(' tdrain_leases') or k.endswith(' tdrain_parts')}
        proxied = sum(d.values()) / periods
        h.diag('%s r1 statements on tdrain_leases and tdrain_parts per retry period (counted by the proxy): %.2f %s'
               % (tag, proxied, {k: round(v / periods, 2) for k, v in sorted(d.items())}))
        h.ok(proxied <= MAX_REQ[backend], '%s r1 (through a counting proxy): %.2f lease statements per retry '
             'period' % (tag, proxied))
    stops = {}
    for nm, p in procs.items():
        t1 = time.monotonic()
        rc = p.stop()
        stops[nm] = (rc, time.monotonic() - t1)
    h.ok(all(v[0] == 0 for v in stops.values()), '%s every replica exits 0 on SIGTERM (slowest %.1f s)'
         % (tag, max(v[1] for v in stops.values())))
    if proxy is not None:
        proxy.close()
    ROWS.append((backend, P, n, t_conv, t_drain, total, lost, renew_failed, moved + changes,
                 worst if worst is not None else -1, proxied if proxied is not None else -1))
    figures(h, 't18-steady', trials=1, events=total, lost=0, mismatches=len(mism), double_owners=0,
            deposed_writes=0, backend=backend, partitions=P, replicas=n, lease_lost=lost,
            requests_per_period='%.2f' % (worst or 0), moved_quiet=moved + changes)
    for c in m.db(db).list_collection_names():
        m.db(db)[c].drop()


def kill(h, m, e, backend, P=1024, n=8):
    tag = '[%s kill P=%d n=%d]' % (backend, P, n)
    db = 't18k_%s' % backend
    prefix = '/t18k/%s/' % backend
    L = Leases(m, e, backend, db, prefix)
    names = ['k%d' % i for i in range(1, n + 1)]
    procs = {nm: h.start_tdrain('%s-%s' % (db, nm), conf(h, m, e, backend, P, db, prefix, nm), args=['-N', nm])
             for nm in names}
    ok = h.wait_until(lambda: balanced({p: v[0] for p, v in L.owners().items()}, names, P), 120, interval=0.5,
                      desc='%s shares' % tag)
    h.ok(ok, '%s %d replicas own balanced shares' % (tag, n))
    time.sleep(2 * RETRY / 1000.0)
    leader = L.read().get('leader', (None,))[0]
    victim = [nm for nm in names if nm != leader][-1]
    before = L.owners()
    vparts = {p: ep for p, (hd, ep) in before.items() if hd == victim}
    procs[victim].kill9()
    t_kill = time.monotonic()

    survivors = [nm for nm in names if nm != victim]
    # The survivors' own view, from their metrics files (rewritten about every second, so an upper bound): the
    # time at which they hold all P partitions between them.  Reading the lease collections from here costs
    # seconds per read on FerretDB with 8 replicas running (it was 0.7 s to 13 s per read in the runs recorded
    # while writing this), which would measure the test's read, not the takeover; the store is still read
    # below to confirm every partition of the victim has a new owner at a newer epoch.
    prom = {nm: os.path.join(h.tmp, '%s-%s.prom' % (db, nm)) for nm in survivors}

    def held_by_survivors():
        return sum(metric(prom[nm], 'tdrain_partitions_owned') or 0 for nm in survivors)
    h.wait_until(lambda: held_by_survivors() >= P, 60, interval=0.05)
    gap_view = (time.monotonic() - t_kill) * 1000
    progress = []   # (ms after the kill at the end of the read, partitions of the victim taken over)

    def taken():
        o = L.owners()
        k = sum(1 for p, ep in vparts.items() if o.get(p, ('', 0))[0] not in ('', victim) and o[p][1] > ep)
        if not progress or progress[-1][1] != k:
            progress.append(((time.monotonic() - t_kill) * 1000, k))
        return k == len(vparts)
    h.wait_until(taken, 60, interval=0.1)
    gap = (time.monotonic() - t_kill) * 1000
    h.diag('%s taken over, as read from the store (ms after the kill: partitions): %s'
           % (tag, ', '.join('%.0f: %d' % x for x in progress)))
    bound = TTL + 2 * RETRY
    h.ok(vparts and held_by_survivors() >= P and gap_view <= bound,
         '%s kill -9 of %s (%d partitions): the 7 survivors hold all %d partitions %.0f ms after the kill '
         '<= TTL + 2 retry periods (%d ms; their metrics files)' % (tag, victim, len(vparts), P, gap_view, bound))
    h.ok(vparts and taken(), '%s every partition of %s has a new owner at a newer epoch in the lease store '
         '(seen %.0f ms after the kill, a read from here taking seconds)' % (tag, victim, gap))
    ok = h.wait_until(lambda: balanced({p: v[0] for p, v in L.owners().items()}, survivors, P), 60, interval=0.5)
    h.ok(ok, '%s shares converge over the %d survivors: %s' % (tag, len(survivors), sorted(set(
        shares({p: v[0] for p, v in L.owners().items()}, survivors).values()))))
    for nm in survivors:
        h.is_(procs[nm].stop(), 0, '%s %s exits 0 on SIGTERM' % (tag, nm))
    figures(h, 't18-kill', trials=1, events=0, lost=0, mismatches=0, double_owners=0, deposed_writes=0,
            backend=backend, failover_ms='%.0f' % gap_view, failover_store_read_ms='%.0f' % gap,
            victim_partitions=len(vparts))
    return gap_view


def stop_gone(h, m, e, backend, P=1024, n=2):
    tag = '[%s stop, backend gone, P=%d]' % (backend, P)
    db = 't18s_%s' % backend
    prefix = '/t18s/%s/' % backend
    L = Leases(m, e, backend, db, prefix)
    names = ['s%d' % i for i in range(1, n + 1)]
    procs = {nm: h.start_tdrain('%s-%s' % (db, nm), conf(h, m, e, backend, P, db, prefix, nm), args=['-N', nm])
             for nm in names}
    ok = h.wait_until(lambda: balanced({p: v[0] for p, v in L.owners().items()}, names, P), 120, interval=0.5)
    h.ok(ok, '%s %d replicas own balanced shares' % (tag, n))
    server = m if backend == 'mongo' else e
    server.stop()
    time.sleep(0.5)
    t0 = time.monotonic()
    for p in procs.values():
        p.signal(15)
    took = {}
    for nm, p in procs.items():
        rc = p.wait(30)
        took[nm] = (rc, time.monotonic() - t0)
    bound = TIMEOUT / 1000.0 + 2
    h.ok(all(v[0] == 0 and v[1] <= bound for v in took.values()),
         '%s SIGTERM with the %s stopped: exits %s within %.1f s (store.timeout_ms + 2 s): %s'
         % (tag, 'store' if backend == 'mongo' else 'etcd', [v[0] for v in took.values()], bound,
            ', '.join('%s %.2f s' % (k, v[1]) for k, v in sorted(took.items()))))
    server.start()
    for p in procs.values():
        if p.alive():
            p.kill9()
    figures(h, 't18-stop', trials=1, events=0, lost=0, mismatches=0, double_owners=0, deposed_writes=0,
            backend=backend, exit_s='%.2f' % max(v[1] for v in took.values()))
    return max(v[1] for v in took.values())


def main(h):
    for kind in h.store_kinds():
        m = h.start_store(kind)
        e = h.start_etcd() if 'etcd' in BACKENDS else None
        run_store(h.for_store(m), m, e)
        if e is not None:
            e.stop()
        m.stop()


def run_store(h, m, e):
    del ROWS[:]
    if 'steady' in ONLY:
        for backend in BACKENDS:
            for P in PARTS:
                for n in REPLICAS:
                    steady(h, m, e, backend, P, n)
        h.diag('%-6s %5s %2s %8s %8s %7s %10s %13s %6s %13s %13s' % (
            'backend', 'P', 'n', 'conv s', 'drain s', 'events', 'lease_lost', 'renew_failed', 'moves',
            'req/period', 'proxy stmts'))
        for r in ROWS:
            h.diag('%-7s %5d %2d %8.1f %8.1f %7d %10d %13d %6d %13.2f %13.2f' % r)
        # Constant in P: the same backend and replica count costs the same at every P.
        by = collections.defaultdict(dict)
        for r in ROWS:
            by[(r[0], r[2])][r[1]] = r[9]
        spread = {k: max(v.values()) - min(v.values()) for k, v in by.items() if len(v) > 1}
        h.ok(all(x <= 0.5 for x in spread.values()),
             'requests per retry period per replica do not grow with P (largest spread between P values, same '
             'backend and n: %s)' % ', '.join('%s n=%d %.2f' % (k[0], k[1], v) for k, v in sorted(spread.items())))
    gaps = {}
    if 'kill' in ONLY:
        for backend in BACKENDS:
            gaps[backend] = kill(h, m, e, backend)
    if 'stop' in ONLY:
        for backend in BACKENDS:
            stop_gone(h, m, e, backend)


harness.Harness().main(main)
