#!/usr/bin/env python3
"""Failover: crashes, pauses, graceful stops and backend outages, on both coordination backends.

Timings are short (lease TTL 4 s, renew deadline 3 s, retry period 0.5 s, store timeout 2.5 s) and every
lease observation is read straight from the lease store (tdrain_leases, or the etcd keys), never from the
daemons.  Every part ends with the independent checker (tests/checker.py): derived state equals a
recomputation from the raw events, each insert_id counted once, the FIFO and tdrain_claims empty.

1. kill -9 mid-batch, partitioned (P=8, replicas r1 r2 r3), mongo and etcd.  r1 (the leader, 4
   partitions) is frozen while one of its claim records is in tdrain_claims, then SIGKILLed.  Its
   partitions are held by the survivors within TTL + 2 retry periods + 1.5 s (measured, reported); the
   orphaned claim is recovered (orphans_recovered with a non-zero count for its partition) and each of
   its events is dispatched again by a survivor; nothing is lost.
2. SIGSTOP the single-mode leader for longer than the TTL (replicas a, b), mongo and etcd: the other
   replica takes over at a newer epoch (gap measured); after SIGCONT the old leader logs lease_lost,
   writes no claim record under its old epoch, and dispatches nothing under its old epoch except the
   batch it had already claimed before the freeze (trace lines after the takeover); it never attempts
   an acknowledgement there.
2b. The same, deterministically at the worst moment (mongo backend; T05_PAUSE_BACKENDS): gdb stops the
   leader between its last tdr_coord_may_write() check and the claim insert, holds it past the TTL and
   lets it go after the standby took over: no claim record and no dispatch under the old epoch may follow.
3. Graceful stop (SIGTERM) of the now-leader: the standby takes over within one retry period (+ slack)
   of the release (gap measured from SIGTERM and from the release); exit status 0.
4. etcd stopped for 10 s and restarted (etcd backend, partitioned, a and b, events being inserted):
   both replicas stay alive, give their leases up (lease_lost) and dispatch nothing once the renew
   deadline (+ store timeout) has passed; after the restart ownership reconverges to balanced shares
   at newer epochs; nothing lost or duplicated.
5. The store stopped for 10 s and restarted (mongo backend, partitioned, a and b): the same checks.

Every part runs on each store of h.store_kinds() (FerretDB and DocumentDB by default, TDRAIN_TEST_STORES),
with an etcd of its own per store.  On DocumentDB (MongoDB semantics: conditional writes are atomic) 2b
also pauses the leader just before its acknowledgement: the deposed, {_id, owner, epoch}-fenced delete
must remove nothing once the new holder recovered the record.

Each part uses its own database (store.database) and etcd prefix.  The gaps are printed as a table.
T05_ONLY=kill,single,pause,etcd,store selects parts; T05_BACKENDS=mongo,etcd selects backends for 1-3.
"""
import base64
import collections
import json
import os
import re
import shutil
import signal
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
import harness  # noqa: E402
from harness import balanced, shares  # noqa: E402
import checker  # noqa: E402

P = 8
TTL, RENEW, RETRY, STORE_TIMEOUT = (int(x) for x in
                                    (os.environ.get('T05_TIMING') or '4000,3000,500,2500').split(','))
SLACK = 1500                              # FerretDB on a shared 2-core machine is slow
KILL_BOUND = TTL + 2 * RETRY + SLACK      # ms
GRACEFUL_BOUND = RETRY + SLACK            # ms, from the release
# Enough that work is left when the test tries to freeze a replica mid-batch: with 3,000 a faster drain
# (0330a9c: the fold yields the store to a busy drain) emptied the victim's partitions before it was caught.
N_KILL = int(os.environ.get('T05_KILL_EVENTS', '5000'))
N_SINGLE = int(os.environ.get('T05_SINGLE_EVENTS', '5000'))
N_STREAM = int(os.environ.get('T05_STREAM_EVENTS', '3000'))   # inserted over 15 s while r1 is caught
N_OUTAGE = int(os.environ.get('T05_OUTAGE_EVENTS', '2000'))
N_PAUSE = int(os.environ.get('T05_PAUSE_EVENTS', '2000'))
ONLY = set((os.environ.get('T05_ONLY') or 'kill,single,pause,etcd,store').split(','))
BACKENDS = [b for b in (os.environ.get('T05_BACKENDS') or 'mongo,etcd').split(',') if b]
PAUSE_BACKENDS = [b for b in (os.environ.get('T05_PAUSE_BACKENDS') or 'mongo').split(',') if b]

GAPS = {}   # (row, backend) -> text


# ------------------------------------------------------------------ helpers

def conf(m, e, backend, mode, db, trace, prefix):
    c = {
        'store.uri': m.uri,
        'store.database': db,
        'store.timeout_ms': STORE_TIMEOUT,
        'coord.backend': backend,
        'coord.mode': mode,
        'coord.partitions': P,
        'coord.lease_ttl_ms': TTL,
        'coord.renew_deadline_ms': RENEW,
        'coord.retry_period_ms': RETRY,
        'drain.batch_size': 500,
        'fold.interval_ms': 100,
        'test.trace_file': trace,
    }
    if backend == 'etcd':
        c['coord.etcd_endpoint'] = e.endpoint
        c['coord.etcd_prefix'] = prefix
    return c


class Leases:
    """Lease state read straight from the backend: {name: (holder, epoch, released)}, latest epoch per name."""

    def __init__(self, m, e, backend, db, prefix):
        self.m, self.e, self.backend, self.db, self.prefix = m, e, backend, db, prefix

    def read(self):
        out = {}
        if self.backend == 'mongo':
            for d in harness.lease_docs(self.m.db(self.db), {}):
                n = d.get('name')
                if n and (n not in out or d['epoch'] > out[n][1]):
                    out[n] = (d['holder'], int(d['epoch']), bool(d.get('released')))
        else:
            pre = self.prefix + 'lease/'
            end = pre[:-1] + chr(ord(pre[-1]) + 1)
            r = self.e.post('/v3/kv/range', {'key': base64.b64encode(pre.encode()).decode(),
                                             'range_end': base64.b64encode(end.encode()).decode()}, timeout=2.0)
            for kv in r.get('kvs', []):
                k = base64.b64decode(kv['key']).decode()
                v = json.loads(base64.b64decode(kv['value']).decode())
                out[k[len(pre):]] = (v.get('holder'), int(kv['create_revision']), False)
        return out

    def owners(self):
        """{partition: (holder, epoch)} of live partition leases."""
        return {int(n.split('/')[1]): (v[0], v[1]) for n, v in self.read().items()
                if n.startswith('part/') and not v[2]}

    def leader(self):
        v = self.read().get('leader')
        return None if v is None or v[2] else v


def converged(L, members):
    """Every partition held by one of members, each with floor/ceil of P (docs/DESIGN.md, "Who owns what")."""
    return balanced({p: v[0] for p, v in L.owners().items()}, members, P)


def measure(pred, timeout, interval=0.05):
    """Poll pred; return the monotonic time at the end of the first read that found it true, or None."""
    end = time.monotonic() + timeout
    while True:
        try:
            ok = pred()
        except Exception:
            ok = False
        now = time.monotonic()
        if ok:
            return now
        if now >= end:
            return None
        time.sleep(interval)


def load(h, m, db, path, count, seed, partitions=None, rate=None, timeout=300):
    argv = [h.tool('tdrain-loadgen'), '--uri', m.uri, '--db', db, '--count', count, '--devices', 300,
            '--users', 100, '--dup-ratio', '0.02', '--seed', seed, '--ndjson', path, '--quiet']
    if partitions:
        argv += ['--partitions', partitions]
    if rate:
        argv += ['--rate', rate]
    return h.run(argv, timeout=timeout)


def trace_lines(path, offset=0):
    try:
        with open(path, 'rb') as f:
            f.seek(offset)
            data = f.read().decode('utf-8', 'replace')
    except FileNotFoundError:
        return []
    return [l.split('\t') for l in data.splitlines() if l.count('\t') == 4]


def trace_size(path):
    try:
        return os.path.getsize(path)
    except FileNotFoundError:
        return 0


def wait_standing_by(h, proc, tag, name):
    """Wait for a replica's 'started' event: it is logged once coordination runs, i.e. once the replica is a
    standby watching the leader's lease.  Before that, start-up may spend up to store.timeout_ms on its one
    synchronous index build (DocumentDB answers a createIndexes on a collection that exists, here created by
    the loadgen, only after its once-a-minute job: the call times out), and a freeze of the leader then would
    time that start-up, not the takeover the bound is about."""
    h.ok(h.wait_until(lambda: log_events(proc.log_text(), 'started'), 20, interval=0.05, desc=name + ' started'),
         '%s %s is standing by (logged started)' % (tag, name))


def log_events(text, event):
    """[(fields, line)] of the log lines carrying event=<event>."""
    out = []
    for line in text.splitlines():
        if ' event=%s' % event in line:
            out.append((dict(re.findall(r' (TDRAIN_\w+)=(\S*)', line)), line))
    return out


def epochs_backwards(lines, exempt=()):
    """Trace lines dispatched under an epoch older than one already dispatched in the same partition."""
    bad, last = [], {}
    for l in lines:
        p, ep = int(l[3]), int(l[4])
        if p in last and ep < last[p][0] and l[0] not in exempt:
            bad.append('%s part %d epoch %d after %s epoch %d' % (l[2], p, ep, last[p][1], last[p][0]))
        if p not in last or ep > last[p][0]:
            last[p] = (ep, l[2])
    return bad[:5] + (['... %d in all' % len(bad)] if len(bad) > 5 else [])


def id_key(v):
    return str(v)   # ObjectId -> 24 lowercase hex, as the trace writes it; strings as they are


def drained(db):
    """FIFO empty and every delta folded (tdrain_claims is left to the checker, which wants it empty)."""
    return db.events.count_documents({}) == 0 and db.tdrain_deltas.count_documents({}) == 0


def check_exact(h, m, db, files, tag):
    n, mism = checker.check(m.uri, db, files)
    for x in mism[:10]:
        h.diag('  ' + str(x))
    h.ok(n > 0 and not mism, '%s derived state exact: every insert_id counted once, FIFO and claims empty '
         '(%d documents, %d mismatches)' % (tag, n, len(mism)))


def stop_all(h, procs, tag):
    for name, p in procs.items():
        if p.popen is not None and p.popen.returncode is None:
            h.is_(p.stop(), 0, '%s %s exits 0 on SIGTERM' % (tag, name))


def no_errors(h, procs, tag):
    for name, p in procs.items():
        bad = [l for l in p.log_text().splitlines()
               if (': crit: ' in l or ': alert: ' in l or ': emerg: ' in l or 'Assertion' in l
                   or 'AddressSanitizer' in l)]
        h.ok(not bad, '%s %s: no crash or critical line in its log %s' % (tag, name, bad[:2]))


# ------------------------------------------------------------------ 1. kill -9 mid-batch, partitioned

def part_kill(h, m, e, backend):
    tag = '[kill9 %s]' % backend
    dbn = 't05_kill_' + backend
    db = m.db(dbn)
    prefix = '/t05k/'
    trace = os.path.join(h.tmp, 'trace-kill-' + backend)
    L = Leases(m, e, backend, dbn, prefix)
    files = []
    for i, extra in enumerate((P, None)):
        f = os.path.join(h.tmp, 'kill-%s-%d.ndjson' % (backend, i))
        r = load(h, m, dbn, f, N_KILL // 2, 21 + i, partitions=extra)
        h.ok(r.returncode == 0, '%s loadgen batch %d inserted (%s)' % (tag, i, 'with part' if extra else 'no part'))
        files.append(f)
    total = db.events.count_documents({})
    h.diag('%s FIFO holds %d documents' % (tag, total))

    names = ['r1', 'r2', 'r3']
    victim, survivors = 'r1', ['r2', 'r3']
    procs = {}
    procs['r1'] = h.start_tdrain('kill-%s-r1' % backend, conf(m, e, backend, 'partitioned', dbn, trace, prefix),
                                 args=['-N', 'r1'])
    h.ok(h.wait_until(lambda: (L.leader() or ('',))[0] == 'r1', 20, desc='r1 leads'), '%s r1 leads' % tag)
    for n in survivors:
        procs[n] = h.start_tdrain('kill-%s-%s' % (backend, n),
                                  conf(m, e, backend, 'partitioned', dbn, trace, prefix), args=['-N', n])
    h.ok(h.wait_until(lambda: converged(L, names), 40, interval=0.25, desc='3-replica convergence'),
         '%s 3 replicas: every partition held, balanced shares %s'
         % (tag, shares({p: v[0] for p, v in L.owners().items()}, names)))
    h.ok(h.wait_until(lambda: sum(1 for l in trace_lines(trace) if l[2] == victim) >= 500, 120, interval=0.25,
                      desc='r1 dispatching'), '%s r1 is draining' % tag)
    # A producer keeps inserting while the test tries to catch r1 mid-batch: on DocumentDB the three
    # replicas empty the pre-loaded FIFO in about a second, and without new work r1 has no batch to be
    # caught in (CI: 0 tries before the FIFO was empty).
    stream = os.path.join(h.tmp, 'kill-%s-stream.ndjson' % backend)
    files.append(stream)
    streamed = {}
    producer = threading.Thread(target=lambda: streamed.setdefault(
        'r', load(h, m, dbn, stream, N_STREAM, 23, partitions=P, rate=N_STREAM // 15)), daemon=True)
    producer.start()

    # Catch r1 mid-batch: freeze it while one of its claim records is in tdrain_claims, let whatever it
    # had already sent reach the store, and kill it if a claim record is still there (a batch claimed but
    # not acknowledged: an orphan once r1 is dead).  Otherwise let it run on and try again.
    frozen_claims = []
    t_stop = None
    tries = 0
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if db.tdrain_claims.find_one({'owner': victim}, {'_id': 1}) is None:
            time.sleep(0.02)
            continue
        procs[victim].sigstop()
        t_stop = time.monotonic()
        time.sleep(1.0)
        frozen_claims = list(db.tdrain_claims.find({'owner': victim}))
        if frozen_claims:
            break
        procs[victim].sigcont()
        t_stop = None
        tries += 1
    h.ok(t_stop is not None, '%s r1 frozen mid-batch with %d claim record(s) in flight %s (after %d tries)'
         % (tag, len(frozen_claims), [c['_id'] for c in frozen_claims], tries))
    if t_stop is None:
        producer.join(120)
        stop_all(h, procs, tag)
        return
    before = L.owners()
    victim_parts = sorted(p for p, (hd, _) in before.items() if hd == victim)
    victim_epochs = {p: before[p][1] for p in victim_parts}
    trace_off = trace_size(trace)
    rc = procs[victim].kill9()
    t_kill = time.monotonic()
    h.is_(rc, -signal.SIGKILL, '%s r1 killed by SIGKILL (%.0f ms after the freeze)'
          % (tag, (t_kill - t_stop) * 1000))
    h.diag('%s r1 held partitions %s at the kill' % (tag, victim_parts))
    h.ok(victim_parts, '%s r1 held partitions at the kill' % tag)
    time.sleep(0.5)
    still = list(db.tdrain_claims.find({'owner': victim}))
    h.diag('%s claim records of r1 left after the kill (orphans): %s' % (tag, [c['_id'] for c in still]))

    def taken():
        o = L.owners()
        return all(o.get(p, ('', 0))[0] in survivors and o[p][1] > victim_epochs[p] for p in victim_parts)
    t_taken = measure(taken, 60)
    gap = None if t_taken is None else (t_taken - t_stop) * 1000
    if gap is not None:
        h.diag('%s failover gap: %.0f ms from the kill (SIGSTOP+SIGKILL) to all of %s held by survivors (%s)'
               % (tag, gap, victim_parts, {p: L.owners().get(p) for p in victim_parts}))
    GAPS[('kill -9 partitioned: kill -> partitions re-held', backend)] = '%.0f' % gap if gap is not None else 'none'
    h.ok(gap is not None and gap <= KILL_BOUND, '%s r1\'s partitions re-held by survivors in %s ms <= %d ms '
         '(TTL + 2 retry + %d)' % (tag, '%.0f' % gap if gap is not None else 'never', KILL_BOUND, SLACK))
    h.ok(h.wait_until(lambda: converged(L, survivors), 30, interval=0.25, desc='2-survivor convergence'),
         '%s ownership converged to balanced shares of {r2, r3}' % tag)

    producer.join(120)
    r = streamed.get('r')
    h.ok(r is not None and r.returncode == 0, '%s the producer streamed %d more events during the kill'
         % (tag, N_STREAM)) or h.diag('%s producer: %s' % (tag, r.stderr.strip()[-500:] if r is not None else 'did not finish in 120 s'))
    with open(stream) as f:
        total += sum(1 for line in f if line.strip())
    h.ok(h.wait_until(lambda: drained(db), 300, interval=1, desc='drained after the kill'),
         '%s the FIFO drained (%d documents) and every delta was folded' % (tag, total))

    # Orphan recovery: the partitions of r1's orphaned claim records were recovered with a non-zero
    # count, and every event of r1's in-flight claims was dispatched again by a survivor after the kill.
    orphan_parts = sorted({int(c['part']) for c in still})
    recovered = collections.Counter()
    for n in survivors:
        for f, _ in log_events(procs[n].log_text(), 'orphans_recovered'):
            if f.get('TDRAIN_PARTITIONS', '').lstrip('-').isdigit():
                recovered[int(f['TDRAIN_PARTITIONS'])] += int(f.get('TDRAIN_ORPHANS', '0') or 0)
    h.diag('%s orphaned events recovered per partition (survivors\' logs): %s' % (tag, dict(recovered)))
    if still:
        h.ok(all(recovered[p] > 0 for p in orphan_parts),
             '%s survivors logged orphans_recovered with a non-zero count for partitions %s'
             % (tag, orphan_parts))
    else:
        # Its acknowledgement landed after all: the claims were gone, so only its FIFO deletes were lost.
        h.ok(db.tdrain_claims.count_documents({}) == 0 and frozen_claims,
             '%s r1 had claims in flight and tdrain_claims is empty at the end' % tag)
    inflight = {id_key(x) for c in frozen_claims for x in c.get('ids', [])}
    after = trace_lines(trace, trace_off)
    redone = {l[0] for l in after if l[2] in survivors}
    lost = inflight - redone
    h.ok(inflight and not lost, '%s all %d events of r1\'s in-flight claims were dispatched again by a '
         'survivor (missing %d)' % (tag, len(inflight), len(lost)))
    lines = trace_lines(trace)
    last_epoch_lines = [l for l in lines[:] if l[2] == victim and int(l[3]) in victim_epochs
                        and int(l[4]) == victim_epochs[int(l[3])]]
    h.diag('%s r1 dispatched %d events in its last epochs; %d in the orphaned claims'
           % (tag, len(last_epoch_lines), len(inflight)))
    per_id = collections.Counter(l[0] for l in lines)
    h.is_(len(per_id), total, '%s every FIFO document was dispatched' % tag)
    again = {k for k, c in per_id.items() if c > 1}
    h.diag('%s %d events dispatched more than once (%d of them in r1\'s orphaned claims)'
           % (tag, len(again), len(again & inflight)))
    h.is_(epochs_backwards(lines), [], '%s no dispatch under an epoch older than one already '
          'dispatched in its partition' % tag)
    check_exact(h, m, dbn, files, tag)
    no_errors(h, {n: procs[n] for n in survivors}, tag)
    stop_all(h, {n: procs[n] for n in survivors}, tag)


# ------------------------------------------------------------------ 2 + 3. SIGSTOP and graceful stop, single mode

def part_single(h, m, e, backend):
    tag = '[single %s]' % backend
    dbn = 't05_single_' + backend
    db = m.db(dbn)
    prefix = '/t05s/'
    trace = os.path.join(h.tmp, 'trace-single-' + backend)
    L = Leases(m, e, backend, dbn, prefix)
    files = [os.path.join(h.tmp, 'single-%s.ndjson' % backend)]
    r = load(h, m, dbn, files[0], N_SINGLE, 31)
    h.ok(r.returncode == 0, '%s loadgen inserted the backlog' % tag)
    total = db.events.count_documents({})

    procs = {}
    procs['a'] = h.start_tdrain('single-%s-a' % backend, conf(m, e, backend, 'single', dbn, trace, prefix),
                                args=['-N', 'a'])
    h.ok(h.wait_until(lambda: (L.leader() or ('',))[0] == 'a', 20, desc='a leads'), '%s a leads' % tag)
    procs['b'] = h.start_tdrain('single-%s-b' % backend, conf(m, e, backend, 'single', dbn, trace, prefix),
                                args=['-N', 'b'])
    wait_standing_by(h, procs['b'], tag, 'b')
    old, new = 'a', 'b'
    h.ok(h.wait_until(lambda: sum(1 for l in trace_lines(trace) if l[2] == old) >= 500, 60, interval=0.2,
                      desc='a dispatching'), '%s the leader is draining' % tag)
    old_epoch = L.leader()[1]

    # 2. Freeze the leader past its TTL, preferably with a batch in hand (a claim record of its own in
    # tdrain_claims, still there once whatever it had sent has reached the store).
    frozen, t_stop, tries = [], None, 0
    deadline = time.monotonic() + 20
    while True:
        late = time.monotonic() > deadline
        if late or db.tdrain_claims.find_one({'owner': old}, {'_id': 1}) is not None:
            procs[old].sigstop()
            t_stop = time.monotonic()
            time.sleep(0.5)
            frozen = list(db.tdrain_claims.find({'owner': old}))
            if frozen or late:
                break
            procs[old].sigcont()
            tries += 1
        time.sleep(0.02)
    frozen_recs = {c['_id'] for c in frozen}
    frozen_ids = {id_key(x) for c in frozen for x in c.get('ids', [])}
    # A fast drain can empty the FIFO between the tries above (the leader runs again after each one).  Then the
    # standby would have nothing to dispatch after the takeover, and the point below could not be judged: give it
    # fresh events while the leader is still frozen.  This changes what is pending, not what is asserted.
    if db.events.count_documents({}) == 0:
        files.append(os.path.join(h.tmp, 'single-%s-topup.ndjson' % backend))
        r = load(h, m, dbn, files[-1], 500, 32)
        h.ok(r.returncode == 0, '%s the FIFO was empty at the freeze: 500 more events inserted for the standby' % tag)
        total = sum(1 for f in files for line in open(f) if line.strip())
        h.diag('%s FIFO empty at the freeze (drain outran the tries): topped up, %d documents in all' % (tag, total))

    def took_over():
        v = L.leader()
        return v is not None and v[0] == new and v[1] > old_epoch
    t_take = measure(took_over, TTL / 1000 + 20)
    trace_off = trace_size(trace)
    gap = None if t_take is None else (t_take - t_stop) * 1000
    GAPS[('SIGSTOP single: stop -> new epoch', backend)] = '%.0f' % gap if gap is not None else 'none'
    new_epoch = (L.leader() or (None, 0))[1]
    h.diag('%s failover gap: %s ms from SIGSTOP to b holding leader at epoch %s (old epoch %d; claim '
           'record(s) of a in flight at the freeze: %s, after %d tries)'
           % (tag, '%.0f' % gap if gap is not None else 'never', new_epoch, old_epoch, sorted(frozen_recs), tries))
    h.ok(gap is not None and gap <= KILL_BOUND, '%s b took over at a newer epoch within %d ms (%s ms)'
         % (tag, KILL_BOUND, '%.0f' % gap if gap is not None else 'never'))
    h.ok(h.wait_until(lambda: any(l[2] == new for l in trace_lines(trace, trace_off)), 30, interval=0.2),
         '%s b dispatches under the new epoch' % tag)

    log_off = len(procs[old].log_text())
    procs[old].sigcont()
    lost = lambda: [f for f, _ in log_events(procs[old].log_text()[log_off:], 'lease_lost')
                    if f.get('TDRAIN_LEASE') == 'leader' and f.get('TDRAIN_EPOCH') == str(old_epoch)]
    h.ok(h.wait_until(lambda: lost(), 15, interval=0.2, desc='lease_lost'),
         '%s after SIGCONT a logs lease_lost for leader epoch %d (steps down)' % (tag, old_epoch))
    # Watch for writes under the old epoch for a while (a few of its retry periods and a store timeout).
    stale = set()
    t_end = time.monotonic() + (4 * RETRY + STORE_TIMEOUT) / 1000
    while time.monotonic() < t_end:
        for c in db.tdrain_claims.find({'owner': old, 'epoch': old_epoch}, {'_id': 1}):
            if c['_id'] not in frozen_recs:
                stale.add(c['_id'])
        time.sleep(0.1)
    h.ok(not stale, '%s a made no claim under its old epoch after the takeover %s' % (tag, sorted(stale)[:5]))
    later = [l for l in trace_lines(trace, trace_off) if l[2] == old and l[4] == str(old_epoch)]
    unclaimed = [l for l in later if l[0] not in frozen_ids]
    h.diag('%s trace lines of a under epoch %d after the takeover: %d (all from the batch it had claimed '
           'before the freeze: %s)' % (tag, old_epoch, len(later), not unclaimed))
    h.is_(len(unclaimed), 0, '%s a dispatched nothing under its old epoch after the takeover, beyond the '
          'batch claimed before the freeze' % tag)
    ack_tries = [l for l in procs[old].log_text()[log_off:].splitlines() if 'claim records were ours' in l]
    h.ok(not ack_tries, '%s a attempted no acknowledgement under its old epoch after SIGCONT %s'
         % (tag, ack_tries[:1]))
    h.ok(procs[old].alive(), '%s a is alive (standing by)' % tag)

    # 3. Graceful stop of the current leader: the standby takes over within a retry period of the release.
    cur_epoch = L.leader()[1]
    procs[new].signal(signal.SIGTERM)
    t_term = time.monotonic()
    t_rel = [None]

    def handed_over():
        v = L.read().get('leader')
        if v is None or v[2] or v[1] > cur_epoch:       # gone (etcd), released (mongo) or already newer
            if t_rel[0] is None:
                t_rel[0] = time.monotonic()
        return v is not None and v[0] == old and v[1] > cur_epoch and not v[2]
    t_take2 = measure(handed_over, 40, interval=0.02)
    rc = procs[new].wait(30)
    h.is_(rc, 0, '%s b exits 0 on SIGTERM' % tag)
    g_term = None if t_take2 is None else (t_take2 - t_term) * 1000
    g_rel = None if t_take2 is None or t_rel[0] is None else (t_take2 - t_rel[0]) * 1000
    GAPS[('graceful single: release -> new epoch', backend)] = '%.0f' % g_rel if g_rel is not None else 'none'
    GAPS[('graceful single: SIGTERM -> new epoch', backend)] = '%.0f' % g_term if g_term is not None else 'none'
    h.diag('%s graceful handover: %s ms from SIGTERM, %s ms from the release seen in the lease store'
           % (tag, '%.0f' % g_term if g_term is not None else 'never', '%.0f' % g_rel if g_rel is not None
              else '?'))
    h.ok(g_rel is not None and g_rel <= GRACEFUL_BOUND, '%s a took over within %d ms of the release '
         '(retry period + %d): %s ms' % (tag, GRACEFUL_BOUND, SLACK, '%.0f' % g_rel if g_rel is not None else '?'))
    h.ok([f for f, _ in log_events(procs[new].log_text(), 'lease_released') if f.get('TDRAIN_LEASE') == 'leader'],
         '%s b logged lease_released' % tag)

    h.ok(h.wait_until(lambda: drained(db), 240, interval=1, desc='single drained'),
         '%s the FIFO drained (%d documents) and folded' % (tag, total))
    lines = trace_lines(trace)
    per_id = collections.Counter(l[0] for l in lines)
    h.is_(len(per_id), total, '%s every FIFO document was dispatched' % tag)
    h.diag('%s dispatches per replica: %s; %d events dispatched twice' % (
        tag, dict(collections.Counter(l[2] for l in lines)), sum(1 for c in per_id.values() if c > 1)))
    h.is_(epochs_backwards(lines, exempt=frozen_ids), [], '%s no dispatch under an older epoch than one '
          'already dispatched (beyond the batch claimed before the freeze)' % tag)
    check_exact(h, m, dbn, files, tag)
    no_errors(h, procs, tag)
    stop_all(h, procs, tag)


# ------------------------------------------------------------------ 2b. paused inside the claim step

def part_pause_in_claim(h, m, e, backend, step='claim'):
    """The SIGSTOP of part 2 lands wherever it lands.  Here the leader is paused (by gdb, which stops every
    thread as SIGSTOP does) exactly between its last tdr_coord_may_write() check and the claim insert
    (tdr_bulk_run(..., "claim", ...)), held past the TTL, and resumed once the standby has taken over.

    step='acknowledge': paused instead between the check and the acknowledgement (the claim-record delete
    filtered by {_id, owner, epoch}), resumed once the standby has recovered that claim record: the deposed
    acknowledgement must match nothing, so the deposed holder forgets nothing from the FIFO ("0 of N claim
    records were ours").  Asserted where the store applies the filter atomically (DocumentDB: MongoDB
    semantics); on FerretDB the outcome is reported and derived state must be exact regardless."""
    tag = '[%s pause %s]' % ('claim' if step == 'claim' else 'ack', backend)
    gdb = shutil.which('gdb')
    if gdb is None or h.valgrind or os.uname().machine != 'x86_64':
        h.diag('%s skipped: needs gdb on x86_64, without valgrind' % tag)
        return
    dbn = 't05_pause_' + backend + ('' if step == 'claim' else '_ack')
    db = m.db(dbn)
    prefix = '/t05p/' if step == 'claim' else '/t05pa/'
    trace = os.path.join(h.tmp, 'trace-pause-' + backend + ('' if step == 'claim' else '-ack'))
    L = Leases(m, e, backend, dbn, prefix)
    files = [os.path.join(h.tmp, 'pause-%s%s.ndjson' % (backend, '' if step == 'claim' else '-ack'))]
    r = load(h, m, dbn, files[0], N_PAUSE, 51)
    h.ok(r.returncode == 0, '%s loadgen inserted the backlog' % tag)
    procs = {}
    pname = 'pause-%s%s' % (backend, '' if step == 'claim' else '-ack')
    procs['a'] = h.start_tdrain(pname + '-a', conf(m, e, backend, 'single', dbn, trace, prefix),
                                args=['-N', 'a'])
    h.ok(h.wait_until(lambda: (L.leader() or ('',))[0] == 'a', 20, desc='a leads'), '%s a leads' % tag)
    procs['b'] = h.start_tdrain(pname + '-b', conf(m, e, backend, 'single', dbn, trace, prefix),
                                args=['-N', 'b'])
    wait_standing_by(h, procs['b'], tag, 'b')
    h.ok(h.wait_until(lambda: sum(1 for l in trace_lines(trace) if l[2] == 'a') >= 500, 60, interval=0.2,
                      desc='a dispatching'), '%s the leader is draining' % tag)
    # New work while gdb attaches: on DocumentDB the leader empties the pre-loaded FIFO before the
    # breakpoint is set, and without another batch it never reaches the claim or the acknowledgement.
    stream = os.path.join(h.tmp, pname + '-stream.ndjson')
    files.append(stream)
    streamed = {}
    producer = threading.Thread(target=lambda: streamed.setdefault(
        'r', load(h, m, dbn, stream, N_STREAM, 53, rate=N_STREAM // 15)), daemon=True)
    producer.start()
    old_epoch = L.leader()[1]
    hit, go = os.path.join(h.tmp, pname + '-gdb-hit'), os.path.join(h.tmp, pname + '-gdb-go')
    # x86-64: the second argument (what) is in %rsi at the breakpoint.
    argv = [gdb, '-nx', '-p', procs['a'].pid, '-batch', '-ex', 'set pagination off',
            '-ex', 'break tdr_bulk_run if $_streq((char *)$rsi, "%s")' % step, '-ex', 'continue',
            '-ex', 'printf "paused in %s\\n", (char *)$rsi', '-ex', 'shell touch ' + hit,
            '-ex', 'shell while [ ! -e %s ]; do sleep 0.05; done' % go, '-ex', 'detach', '-ex', 'quit']
    res = {}
    th = threading.Thread(target=lambda: res.setdefault('r', h.run(argv, timeout=120)), daemon=True)
    th.start()
    paused = h.wait_until(lambda: os.path.exists(hit), 60, interval=0.02, desc='gdb breakpoint')
    t_pause = time.monotonic()
    h.ok(paused, '%s a paused between its write check and the %s' % (tag, 'claim insert' if step == 'claim'
                                                                      else 'acknowledgement'))
    if not paused:
        open(go, 'w').close()
        th.join(130)
        producer.join(120)
        stop_all(h, procs, tag)
        return
    t_take = measure(lambda: (L.leader() or ('', 0))[0] == 'b' and L.leader()[1] > old_epoch, TTL / 1000 + 20)
    h.ok(t_take is not None, '%s b took over (%s ms after the pause)'
         % (tag, '%.0f' % ((t_take - t_pause) * 1000) if t_take else 'never'))
    # Let b recover the scope (it looks for orphaned claims as it starts) before a resumes.
    h.wait_until(lambda: any(l[2] == 'b' for l in trace_lines(trace)), 30, interval=0.2)
    if step != 'claim':
        # The record a's acknowledgement would delete: b recovered its events and removed it.
        h.ok(h.wait_until(lambda: db.tdrain_claims.count_documents({'owner': 'a', 'epoch': old_epoch}) == 0,
                          30, interval=0.2, desc='b recovers a\'s claim record'),
             '%s b recovered a\'s claim record of epoch %d before a resumes' % (tag, old_epoch))
    trace_off = trace_size(trace)
    log_off = len(procs['a'].log_text())
    open(go, 'w').close()
    th.join(130)
    out = res['r'].stdout if res.get('r') is not None else ''
    h.ok(('paused in %s' % step) in out and res['r'].returncode == 0,
         '%s gdb held a at tdr_bulk_run(..., "%s"), then detached' % (tag, step))
    h.ok(h.wait_until(lambda: log_events(procs['a'].log_text()[log_off:], 'lease_lost'), 15, interval=0.2),
         '%s a logs lease_lost after it resumes' % tag)
    if step != 'claim':
        acks = [l for l in procs['a'].log_text()[log_off:].splitlines() if 'claim records were ours' in l]
        removed = [int(x) for x in re.findall(r'acknowledge: (\d+) of \d+ claim records were ours', '\n'.join(acks))]
        h.diag('%s the deposed acknowledgement: %s' % (tag, acks[:1] or 'no "claim records were ours" line'))
        if m.atomic_updates:
            h.ok(removed and all(r == 0 for r in removed),
                 '%s the deposed acknowledgement, fenced by {_id, owner, epoch}, removed 0 claim records and a '
                 'forgot nothing from the FIFO: %s' % (tag, acks[:1]))
    time.sleep((4 * RETRY + STORE_TIMEOUT) / 1000)
    stale = [(c['_id'], len(c.get('ids', []))) for c in db.tdrain_claims.find({'owner': 'a', 'epoch': old_epoch})]
    later = [l for l in trace_lines(trace, trace_off) if l[2] == 'a' and l[4] == str(old_epoch)]
    h.is_(stale, [], '%s a left no claim record under its old epoch %d after the takeover' % (tag, old_epoch))
    h.is_(len(later), 0, '%s a dispatched nothing under its old epoch after the takeover' % tag)
    producer.join(120)
    r = streamed.get('r')
    h.ok(r is not None and r.returncode == 0, '%s the producer streamed %d more events during the pause'
         % (tag, N_STREAM))
    h.ok(h.wait_until(lambda: drained(db), 120, interval=1, desc='pause drained'),
         '%s the FIFO drained and folded' % tag)
    check_exact(h, m, dbn, files, tag)
    no_errors(h, procs, tag)
    stop_all(h, procs, tag)


# ------------------------------------------------------------------ 4 + 5. backend outages

def part_outage(h, m, e, which):
    backend = 'etcd' if which == 'etcd' else 'mongo'
    tag = '[%s outage]' % ('etcd' if which == 'etcd' else 'store')
    dbn = 't05_out_' + which
    db = m.db(dbn)
    prefix = '/t05o/'
    trace = os.path.join(h.tmp, 'trace-out-' + which)
    L = Leases(m, e, backend, dbn, prefix)
    files = [os.path.join(h.tmp, 'out-%s-0.ndjson' % which)]
    r = load(h, m, dbn, files[0], N_OUTAGE, 41, partitions=P)
    h.ok(r.returncode == 0, '%s loadgen inserted the backlog' % tag)
    names = ['a', 'b']
    procs = {n: h.start_tdrain('out-%s-%s' % (which, n), conf(m, e, backend, 'partitioned', dbn, trace, prefix),
                               args=['-N', n]) for n in names}
    h.ok(h.wait_until(lambda: converged(L, names), 40, interval=0.25, desc='convergence'),
         '%s 2 replicas: every partition held, balanced shares' % tag)
    h.ok(h.wait_until(lambda: len(trace_lines(trace)) >= 500, 60, interval=0.2, desc='draining'),
         '%s draining' % tag)
    before = L.owners()

    # Events keep arriving during an etcd outage (the store is up); none can during a store outage.
    feeder = None
    if which == 'etcd':
        f = os.path.join(h.tmp, 'out-%s-1.ndjson' % which)
        files.append(f)
        res = {}
        feeder = threading.Thread(target=lambda: res.setdefault(
            'r', load(h, m, dbn, f, 1000, 42, rate=100)), daemon=True)
        feeder.start()

    log_off = {n: len(p.log_text()) for n, p in procs.items()}
    server = e if which == 'etcd' else m
    server.stop()
    t0 = time.monotonic()
    quiet_from = t0 + (RENEW + STORE_TIMEOUT + 500) / 1000
    time.sleep(max(0.0, quiet_from - time.monotonic()))
    off1 = trace_size(trace)
    time.sleep(max(0.0, t0 + 10 - time.monotonic()))
    off2 = trace_size(trace)
    alive = {n: p.alive() for n, p in procs.items()}
    h.ok(all(alive.values()), '%s both replicas alive after 10 s without %s %s' % (tag, which, alive))
    stepped = {n: bool(log_events(p.log_text()[log_off[n]:], 'lease_lost')) for n, p in procs.items()}
    h.ok(all(stepped.values()), '%s both replicas stepped down (lease_lost) %s' % (tag, stepped))
    h.is_(off2 - off1, 0, '%s nothing dispatched once renew deadline + store timeout had passed '
          '(trace bytes during the outage)' % tag)
    server.start()
    t1 = time.monotonic()

    # Reconverged: every partition held, balanced, under a lease taken after the restart.
    # (Right after the restart the old keys/documents still show the old owners: they do not count.)
    def fresh():
        o = L.owners()
        return converged(L, names) and all(o[p][1] > before[p][1] for p in range(P))
    t_conv = measure(fresh, 40, interval=0.1)
    row = '%s down 10 s: restart -> reconverged' % ('etcd' if which == 'etcd' else 'store')
    g = None if t_conv is None else (t_conv - t1) * 1000
    GAPS[(row, backend)] = '%.0f' % g if g is not None else 'none'
    h.diag('%s ownership reconverged at newer epochs %s ms after the restart'
           % (tag, '%.0f' % g if g is not None else 'never'))
    # No lease could be renewed for 10 s, far past the renew deadline: every partition lease held before
    # the outage must have been given up, so each partition is held at a newer epoch now.
    h.ok(g is not None, '%s every partition re-acquired at a newer epoch, balanced (no '
         'pre-outage lease survived the outage: before %s, after %s)'
         % (tag, {p: before[p] for p in range(P)}, L.owners()))
    if g is None:
        h.ok(h.wait_until(lambda: converged(L, names), 30, interval=0.1),
             '%s ownership reconverged to balanced shares (some at pre-outage epochs)' % tag)
    h.ok(all(p.alive() for p in procs.values()), '%s both replicas alive after the restart' % tag)

    if feeder is not None:
        feeder.join(120)
        h.ok(res.get('r') is not None and res['r'].returncode == 0, '%s events inserted during the outage' % tag)
    else:
        f = os.path.join(h.tmp, 'out-%s-1.ndjson' % which)
        files.append(f)
        r = load(h, m, dbn, f, 500, 42, partitions=P)
        h.ok(r.returncode == 0, '%s more events inserted after the restart' % tag)
    h.ok(h.wait_until(lambda: drained(db), 300, interval=1, desc='drained after the outage'),
         '%s the FIFO drained and folded after the outage' % tag)
    h.diag('%s drained %.0f s after the restart' % (tag, time.monotonic() - t1))
    lines = trace_lines(trace)
    per_id = collections.Counter(l[0] for l in lines)
    h.diag('%s %d events dispatched, %d of them more than once' % (tag, len(per_id),
                                                                    sum(1 for c in per_id.values() if c > 1)))
    h.is_(epochs_backwards(lines), [], '%s no dispatch under an epoch older than one already dispatched in its '
          'partition (one holder at a time)' % tag)
    check_exact(h, m, dbn, files, tag)
    no_errors(h, procs, tag)
    stop_all(h, procs, tag)


def main(h):
    for kind in h.store_kinds():
        m = h.start_store(kind)
        e = h.start_etcd()
        run(h.for_store(m), m, e)     # points labelled [<store>], a tmp of the store's own
        e.stop()
        m.stop()


def run(h, m, e):
    t0 = time.monotonic()
    GAPS.clear()
    parts = []
    if 'kill' in ONLY:
        parts += [('kill -9', b, lambda b=b: part_kill(h, m, e, b)) for b in BACKENDS]
    if 'single' in ONLY:
        parts += [('single', b, lambda b=b: part_single(h, m, e, b)) for b in BACKENDS]
    if 'pause' in ONLY:
        parts += [('claim pause', b, lambda b=b: part_pause_in_claim(h, m, e, b)) for b in PAUSE_BACKENDS]
        parts += [('ack pause', b, lambda b=b: part_pause_in_claim(h, m, e, b, 'acknowledge'))
                  for b in PAUSE_BACKENDS]
    if 'etcd' in ONLY:
        parts.append(('etcd outage', 'etcd', lambda: part_outage(h, m, e, 'etcd')))
    if 'store' in ONLY:
        parts.append(('store outage', 'mongo', lambda: part_outage(h, m, e, 'store')))
    for what, b, fn in parts:
        t = time.monotonic()
        fn()
        h.diag('%s %s: %.0f s' % (what, b, time.monotonic() - t))

    rows = []
    for (row, b) in GAPS:
        if row not in rows:
            rows.append(row)
    h.diag('failover gaps in ms (TTL %d, renew deadline %d, retry %d, store timeout %d):'
           % (TTL, RENEW, RETRY, STORE_TIMEOUT))
    h.diag('  %-46s %8s %8s' % ('', 'mongo', 'etcd'))
    for row in rows:
        h.diag('  %-46s %8s %8s' % (row, GAPS.get((row, 'mongo'), '-'), GAPS.get((row, 'etcd'), '-')))
    h.diag('total %.0f s' % (time.monotonic() - t0))


harness.Harness().main(main)
