#!/usr/bin/env python3
"""Partitioned mode, three replicas, on both coordination backends.

Half the events carry a producer-written `part`, half none (the claimers
compute it; on DocumentDB the leader also triages them: with one replica
frozen, the events waiting for its partitions carry part = fnv1a32(_id) % P,
and on FerretDB, where triage is off, none).  Runs on every store of
h.store_kinds() (FerretDB and DocumentDB by default).  Checks: every partition
converges to exactly one owner and every replica owns floor(P/n) or ceil(P/n)
of them (docs/DESIGN.md, "Who owns what"); every event is dispatched exactly
once; per partition the epochs in the dispatch trace never go backwards (no
write from a deposed epoch); derived
state equals an independent recomputation.  Then a fourth replica joins and
one leaves: shares are balanced again and the number of partitions that moved
equals the minimum any balanced assignment needs from the one before
(computed here independently).
"""
import collections
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
import harness  # noqa: E402
from harness import balanced, fnv1a32, min_moves, moved as n_moved, shares  # noqa: E402
import checker  # noqa: E402

P = 8
N = int(os.environ.get('T04_EVENTS', '6000'))
STREAM_ABOVE = 10000


def conf(h, m, e, backend, name):
    c = {
        'store.uri': m.uri,
        'coord.mode': 'partitioned',
        'coord.partitions': P,
        'coord.backend': backend,
        'coord.lease_ttl_ms': 15000,
        'coord.renew_deadline_ms': 10000,
        'coord.retry_period_ms': 1000,
        'store.timeout_ms': 8000,
        'drain.batch_size': 500,
        'fold.interval_ms': 100,
        'test.trace_file': os.path.join(h.tmp, 'trace-' + backend),
    }
    if backend == 'etcd':
        c['coord.etcd_endpoint'] = e.endpoint
        c['coord.etcd_prefix'] = '/t04/'
    return c


def owners(h, backend):
    """partition -> holder, from tdrainctl-independent reads of the lease store."""
    tool = [h.tool('tdrainctl')] if False else None  # tdrainctl has its own test (t08)
    return None


def main(h):
    for kind in h.store_kinds():
        m = h.start_store(kind)
        e = h.start_etcd()
        hs = h.for_store(m)          # points labelled [<store>], a tmp of the store's own
        for backend in ('mongo', 'etcd'):
            run(hs, m, e, backend)
        e.stop()
        m.stop()


def lease_owners(m, e, backend):
    """{partition: holder} of live partition leases, read straight from the backend."""
    out = {}
    if backend == 'mongo':
        latest = {}
        for d in harness.lease_docs(m.db(), {'name': {'$regex': '^part/'}}):
            if d['name'] not in latest or d['epoch'] > latest[d['name']]['epoch']:
                latest[d['name']] = d
        for name, d in latest.items():
            if not d.get('released'):
                out[int(name.split('/')[1])] = d['holder']
    else:
        import base64
        import json
        pre = '/t04/lease/part/'
        r = e.post('/v3/kv/range', {'key': base64.b64encode(pre.encode()).decode(),
                                    'range_end': base64.b64encode((pre[:-1] + '0').encode()).decode()})
        for kv in r.get('kvs', []):
            k = base64.b64decode(kv['key']).decode()
            v = json.loads(base64.b64decode(kv['value']).decode())
            out[int(k[len(pre):])] = v['holder']
    return out


def unsteady(procs):
    """Lease losses or renew failures in the replicas' logs: outside steady state."""
    bad = []
    for p in procs.values():
        for line in p.log_text().splitlines():
            if 'event=lease_lost' in line or 'event=lease_renew_failed' in line:
                bad.append(line)
    return bad


def check_once(h, backend, per_id, procs, what):
    """Exactly-once dispatch is promised in steady state; an overloaded store that makes
    leases lapse legitimately causes redelivery (derived state stays exact regardless)."""
    dup = sum(1 for c in per_id.values() if c > 1)
    lost = unsteady(procs)
    if lost:
        h.diag('[%s] not steady state (%d lease losses/renew failures, e.g. %s): %d events redelivered'
               % (backend, len(lost), lost[0][:160], dup))
        h.ok(True, '[%s] %s: dispatch-once not promised after a lease lapse (%d redelivered)' % (backend, what, dup))
    else:
        h.ok(dup == 0, '[%s] %s: each exactly once (max %d)' % (backend, what, max(per_id.values() or [0])))


def leader_of(m, e, backend):
    """Holder of the leader lease, read straight from the backend (None if nobody holds it)."""
    if backend == 'mongo':
        docs = list(m.db().tdrain_leases.find({'name': 'leader'}))
        d = max(docs, key=lambda x: x['epoch']) if docs else None
        return None if d is None or d.get('released') else d.get('holder')
    import base64
    import json
    r = e.post('/v3/kv/range', {'key': base64.b64encode(b'/t04/lease/leader').decode()})
    for kv in r.get('kvs', []):
        return json.loads(base64.b64decode(kv['value']).decode()).get('holder')
    return None


def check_triage(h, m, e, backend, procs, files):
    """Events a producer wrote without `part` (docs/DESIGN.md, "Modes and partitions").  With MongoDB's
    semantics (DocumentDB) the leader triages them: it sets part = fnv1a32(canonical _id) % P.  On FerretDB
    triage is off (a keyed update scans the collection) and they keep no part.  Made observable by freezing
    a replica that does not lead (well within its renew deadline): the events of its partitions wait in the
    FIFO while the others drain theirs and the leader keeps folding and triaging."""
    db = m.db()
    lead = leader_of(m, e, backend)
    own = lease_owners(m, e, backend)
    victims = [n for n in sorted(procs) if n != lead and any(v == n for v in own.values())]
    if not h.ok(lead in procs and victims, '[%s] triage: a leader (%s) and a replica holding partitions that '
                'does not lead (%s)' % (backend, lead, victims)):
        return
    victim = victims[0]
    parts = sorted(p for p, v in own.items() if v == victim)
    f = os.path.join(h.tmp, 'ev-%s-triage.ndjson' % backend)
    procs[victim].sigstop()
    t0 = time.monotonic()
    try:
        r = h.run([h.tool('tdrain-loadgen'), '--uri', m.uri, '--count', '400', '--devices', '300', '--users', '100',
                   '--seed', '17', '--ndjson', f, '--quiet'], timeout=60)
        h.ok(r.returncode == 0, '[%s] triage: 400 events without part inserted while %s (partitions %s) is frozen'
             % (backend, victim, parts))
        files.append(f)
        expect = {}
        for line in open(f):
            if line.strip():
                _id = checker.parse_line(line)[0]['_id']
                expect[_id] = fnv1a32(str(_id).encode()) % P
        waiting = [k for k, p in expect.items() if p in parts]

        def settled():
            docs = list(db.events.find({'_id': {'$in': list(expect)}}, {'part': 1}))
            if {d['_id'] for d in docs} != set(waiting):
                return None                   # the live replicas are still draining theirs
            if m.atomic_updates and any('part' not in d for d in docs):
                return None                   # the leader has not triaged them all yet
            return docs
        seen = [None]

        def sample():
            seen[0] = settled()
            return seen[0] is not None
        # Within the renew deadline (10 s) of the frozen replica, loadgen included.
        h.wait_until(sample, max(1.0, 8.0 - (time.monotonic() - t0)), interval=0.2,
                     desc='[%s] triage settled' % backend)
        docs = seen[0] or list(db.events.find({'_id': {'$in': list(expect)}}, {'part': 1}))
        frozen_s = time.monotonic() - t0
    finally:
        procs[victim].sigcont()
    h.ok(waiting and {d['_id'] for d in docs} == set(waiting),
         '[%s] triage: exactly the %d events of %s\'s partitions wait in the FIFO (%d found, %d rows returned: '
         'a find can return a document twice while it is updated; frozen %.1f s)'
         % (backend, len(waiting), victim, len({d['_id'] for d in docs}), len(docs), frozen_s))
    wrong = [(str(d['_id']), d.get('part'), expect[d['_id']]) for d in docs if d.get('part') != expect[d['_id']]]
    if m.atomic_updates:
        h.ok(docs and not wrong, '[%s] triage (MongoDB semantics): the leader set part = fnv1a32(_id) %% %d on '
             'every waiting event (%d wrong, e.g. %s)' % (backend, P, len(wrong), wrong[:3]))
    else:
        h.ok(docs and all('part' not in d for d in docs), '[%s] triage is off on FerretDB: no waiting event got a '
             'part (%d did)' % (backend, sum(1 for d in docs if 'part' in d)))


def converged(m, e, backend, members):
    return balanced(lease_owners(m, e, backend), members, P)


def run(h, m, e, backend):
    db = m.db()
    for c in ('events', 'tdrain_deltas', 'tdrain_claims'):
        db[c].delete_many({})
    files = []
    # Above STREAM_ABOVE events the producers stream while the replicas run, waiting while the FIFO holds
    # STREAM_ABOVE or more (tdrain-loadgen --max-backlog): on FerretDB an acknowledgement scans the FIFO, so a
    # pre-loaded backlog of 50,000 would cost O(N^2) (docs/DESIGN.md, "Store access paths").
    stream = N > STREAM_ABOVE
    producers = []
    for i, extra in enumerate((['--partitions', str(P)], [])):
        f = os.path.join(h.tmp, 'ev-%s-%d.ndjson' % (backend, i))
        argv = [h.tool('tdrain-loadgen'), '--uri', m.uri, '--count', str(N // 2), '--devices', '300',
                '--users', '100', '--dup-ratio', '0.02', '--seed', str(11 + i), '--ndjson', f, '--quiet'] + extra
        if stream:
            producers.append(subprocess.Popen(argv + ['--max-backlog', str(STREAM_ABOVE)],
                                              stdout=subprocess.DEVNULL))
        else:
            r = h.run(argv, timeout=300)
            h.ok(r.returncode == 0, '[%s] loadgen batch %d inserted' % (backend, i))
        files.append(f)
    names = ['a', 'b', 'c']
    procs = {n: h.start_tdrain('%s-%s' % (backend, n), conf(h, m, e, backend, n), args=['-N', n])
             for n in names}
    h.ok(h.wait_until(lambda: converged(m, e, backend, names), 60, interval=0.5),
         '[%s] 3 replicas: every partition has one owner, shares %s (floor/ceil of %d/3)'
         % (backend, shares(lease_owners(m, e, backend), names), P))
    for i, pr in enumerate(producers):
        h.is_(pr.wait(timeout=3600), 0, '[%s] streaming loadgen %d inserted its events' % (backend, i))
    # Every document the store acknowledged is a line of the producers' NDJSON.
    total = sum(1 for f in files for line in open(f) if line.strip())
    h.ok(h.wait_until(lambda: db.events.count_documents({}) == 0 and db.tdrain_deltas.count_documents({}) == 0,
                      600 + N // 50, interval=1), '[%s] the FIFO drained (%d documents) and folded' % (backend, total))

    trace = os.path.join(h.tmp, 'trace-' + backend)
    lines = [l.rstrip('\n').split('\t') for l in open(trace) if l.strip()]
    per_id = collections.Counter(l[0] for l in lines)
    h.is_(len(per_id), total, '[%s] every document was dispatched' % backend)
    check_once(h, backend, per_id, procs, 'first drain')
    workers = collections.Counter(l[2] for l in lines)
    h.diag('[%s] events dispatched per replica: %s' % (backend, dict(workers)))
    check_triage(h, m, e, backend, procs, files)

    # Join: d arrives; only the partitions d wins may move.
    before = lease_owners(m, e, backend)
    procs['d'] = h.start_tdrain('%s-d' % backend, conf(h, m, e, backend, 'd'), args=['-N', 'd'])
    t0 = time.time()
    names4 = names + ['d']
    ok = h.wait_until(lambda: converged(m, e, backend, names4), 60, interval=0.25)
    after = lease_owners(m, e, backend)
    moved = n_moved(before, after, P)
    minimum = min_moves(before, names4, P)
    h.ok(ok, '[%s] join converged in %.1f s: shares %s' % (backend, time.time() - t0, shares(after, names4)))
    h.ok(moved == minimum, '[%s] join moved %d partitions, minimum %d' % (backend, moved, minimum))

    # More events while membership changes, then a leave.
    f = os.path.join(h.tmp, 'ev-%s-2.ndjson' % backend)
    h.run([h.tool('tdrain-loadgen'), '--uri', m.uri, '--count', str(N // 4), '--devices', '300', '--users', '100',
           '--seed', '13', '--ndjson', f, '--quiet'], timeout=300)
    files.append(f)
    before = lease_owners(m, e, backend)
    h.is_(procs['b'].stop(), 0, '[%s] b stops cleanly' % backend)
    t0 = time.time()
    names3 = ['a', 'c', 'd']
    ok = h.wait_until(lambda: converged(m, e, backend, names3), 40, interval=0.25)
    after = lease_owners(m, e, backend)
    moved = n_moved(before, after, P)
    minimum = min_moves(before, names3, P)
    took = time.time() - t0
    h.ok(ok and took < 15, '[%s] leave converged in %.1f s, under the 15 s TTL (graceful release)' % (backend, took))
    h.ok(moved == minimum, '[%s] leave moved %d partitions, minimum %d' % (backend, moved, minimum))

    h.ok(h.wait_until(lambda: db.events.count_documents({}) == 0 and db.tdrain_deltas.count_documents({}) == 0,
                      600, interval=1), '[%s] the later events drained too' % backend)
    lines = [l.rstrip('\n').split('\t') for l in open(trace) if l.strip()]
    back = 0
    last = {}
    for l in lines:
        p, ep = int(l[3]), int(l[4])
        if p in last and ep < last[p]:
            back += 1
        last[p] = max(ep, last.get(p, 0))
    h.is_(back, 0, '[%s] no dispatch under an epoch older than one already seen in its partition' % backend)
    per_id = collections.Counter(l[0] for l in lines)
    check_once(h, backend, per_id, procs, 'across join/leave (%d events)' % len(per_id))
    n, mism = checker.check(m.uri, 'tdrain', files)
    for x in mism[:10]:
        h.diag('  ' + str(x))
    h.ok(n > 0 and not mism, '[%s] derived state exact (%d documents, %d mismatches)' % (backend, n, len(mism)))
    for name, p in procs.items():
        if name != 'b':
            h.is_(p.stop(), 0, '[%s] %s stops cleanly' % (backend, name))
    # Derived state is shared between the two runs: start the second run from a clean store.
    for c in db.list_collection_names():
        db[c].drop()


harness.Harness().main(main)
