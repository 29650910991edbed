#!/usr/bin/env python3
"""Single-writer drain, end to end, on every store (FerretDB 1.24 and DocumentDB; TDRAIN_TEST_STORES).

Three replicas in single mode share one FIFO of 10,000 events (2% duplicate
insert_ids).  Exactly one holds the leader lease and drains; every event is
dispatched exactly once (test.trace_file), nothing is left pending, and every
derived collection equals an independent recomputation from the raw events
(tests/checker.py).  A graceful stop releases the lease.
"""
import collections
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
import harness  # noqa: E402
import checker  # noqa: E402

N = 10000


def conf(m, h, tag, name):
    return {
        'store.uri': m.uri,
        'coord.mode': 'single',
        'coord.lease_ttl_ms': 15000,
        'coord.renew_deadline_ms': 10000,
        'coord.retry_period_ms': 1000,
        'store.timeout_ms': 8000,
        'drain.batch_size': 1000,
        'fold.interval_ms': 100,
        'test.trace_file': os.path.join(h.tmp, 'trace-' + tag),
        'metrics.file': os.path.join(h.tmp, '%s-%s.prom' % (tag, name)),
        'metrics.interval_ms': 500,
    }


def trace_lines(h, tag):
    try:
        with open(os.path.join(h.tmp, 'trace-' + tag)) as f:
            return [line.rstrip('\n').split('\t') for line in f if line.strip()]
    except FileNotFoundError:
        return []


def main(h):
    for kind in h.store_kinds():
        run(h, kind)


def run(h, kind):
    m = h.start_store(kind)
    tag = m.label
    ok = lambda cond, desc: h.ok(cond, '[%s] %s' % (tag, desc))
    is_ = lambda got, exp, desc: h.is_(got, exp, '[%s] %s' % (tag, desc))
    ndjson = os.path.join(h.tmp, 'events-%s.ndjson' % tag)
    r = h.run([h.tool('tdrain-loadgen'), '--uri', m.uri, '--count', str(N), '--devices', '400',
               '--users', '150', '--dup-ratio', '0.02', '--ndjson', ndjson, '--quiet'], timeout=300)
    ok(r.returncode == 0, 'loadgen inserted the backlog')
    db = m.db()
    total = db.events.count_documents({})
    h.diag('[%s] FIFO holds %d documents' % (tag, total))

    procs = [h.start_tdrain('%s-%s' % (tag, n), conf(m, h, tag, n), args=['-N', n]) for n in ('a', 'b', 'c')]
    drained = h.wait_until(lambda: db.events.count_documents({}) == 0
                           and db.tdrain_deltas.count_documents({}) == 0, 600, interval=1,
                           desc='FIFO drained and folded')
    ok(drained, 'the FIFO drained and every delta was folded')
    ok(db.tdrain_claims.count_documents({}) == 0, 'no claim record left (nothing in flight)')

    lines = trace_lines(h, tag)
    per_id = collections.Counter(line[0] for line in lines)
    workers = collections.Counter(line[2] for line in lines)
    is_(len(per_id), total, 'every FIFO document was dispatched')
    ok(all(c == 1 for c in per_id.values()),
       'each was dispatched exactly once (max %d)' % max(per_id.values() or [0]))
    is_(len(workers), 1, 'a single replica did all the work (%s)' % dict(workers))

    n, mism = checker.check(m.uri, 'tdrain', [ndjson])
    h.diag('[%s] checker: %d derived documents compared, %d mismatches' % (tag, n, len(mism)))
    for x in mism[:10]:
        h.diag('  ' + str(x))
    ok(n > 0 and not mism, 'derived state equals an independent recomputation (%d documents)' % n)

    if not workers:
        ok(False, 'some replica drained (see the replicas\' logs below)')
        for p in procs:
            p.stop()
        m.stop()
        return
    leader = [p for p in procs if p.name.endswith('-' + next(iter(workers)))][0]
    prom_path = os.path.join(h.tmp, '%s-%s.prom' % (tag, workers.most_common(1)[0][0])) if workers else ''
    prom = open(prom_path).read() if prom_path and os.path.exists(prom_path) else ''
    replica = workers.most_common(1)[0][0] if workers else '?'
    ok('tdrain_events_processed_total' in prom and 'tdrain_is_leader{replica="%s"} 1' % replica in prom,
       'the leader writes Prometheus metrics')

    # A graceful stop gives the lease back: a standby takes over within a retry period or so.
    is_(leader.stop(), 0, 'leader exits 0 on SIGTERM')
    lease = lambda: [d for d in db.tdrain_leases.find({'name': 'leader'})]
    ok(h.wait_until(lambda: any(d['holder'] != replica and not d.get('released') for d in lease()), 5,
                    desc='standby takes over'), 'a standby took the released lease within 5 s (retry period 1 s)')
    for p in procs:
        if p is not leader:
            is_(p.stop(), 0, 'replica %s exits 0' % p.name)
    for p in procs:
        bad = [l for l in p.log_text().splitlines() if ': error: ' in l or ': crit: ' in l]
        ok(not bad, 'no error-level lines in %s log %s' % (p.name, bad[:2]))
    m.stop()


harness.Harness().main(main)
