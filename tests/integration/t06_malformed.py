#!/usr/bin/env python3
"""t06: the malformed-event corpus, the allow-list, and poison events (max_attempts).

On each store of h.store_kinds() (a real FerretDB and a real DocumentDB by default, TDRAIN_TEST_STORES;
a database per scenario):

1. single mode, one replica: tdrain-loadgen --count N --malformed-corpus --manifest M
   mixes every malformed kind it has (>= 25; FerretDB cannot hold the
   invalid-UTF-8 kinds) into normal events (2% duplicate insert_ids).  The FIFO
   drains, every malformed document is in tdrain_deadletter under its _id with
   the manifest's reason prefix and its original document (byte for byte; or
   doc_head + doc_bytes when it would not fit), the dead-letter count equals the
   corpus size, each good event was dispatched once, derived state is exact
   (tests/checker.py with the manifest), the daemon never crashed and exits 0;
2. the same with two replicas in partitioned mode (8 partitions; events carry
   no `part`, so the claimers compute it (on DocumentDB the leader also
   triages them), and the unhashable _ids go to partition 0's owner);
3. drain.allow_events = "cli_invocation,daily_sign_in": other well-formed names
   are dead-lettered with "event: not in allow-list" (malformed ones keep
   their own reasons) and the checker run with allow=[...] agrees;
3b. one document within 4 KiB of the 16 MiB BSON limit (too large to be copied
   whole into a dead letter) behind 200 events: dead-lettered as
   "document: too large" with doc_head (<= 4 KiB) + doc_bytes;
4. poison: drain.max_attempts = 2.  A TCP proxy between the only replica and
   the store holds the batch's delta insert (step 4 of the cycle), so the
   replica is killed with SIGKILL at a known point: right after its claim
   record is written, before anything is committed.  Restarted under the same
   name it recovers the orphaned claim (attempts + 1) and is killed at the
   same point again; after max_attempts such crashes the third claim must
   dead-letter the batch's events with reason "attempts: ..." (docs/DESIGN.md,
   "A poison event ... after drain.max_attempts it is dead-lettered"), and
   everything else drains exactly.

T06_EVENTS (default 3000) sizes the corpus runs; T06_SCENARIOS (default
"single,partitioned,allow,huge,poison") picks scenarios.
Prints "# FIGURES scenario=... events=... lost=... mismatches=..." lines that
tests/fault_suite.sh sums up.
"""
import collections
import os
import socket
import struct
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
import harness  # noqa: E402
import checker  # noqa: E402

N = int(os.environ.get('T06_EVENTS', '3000'))
P = 8
ALLOW = ['cli_invocation', 'daily_sign_in']
MIN_KINDS = 25


def figures(h, scenario, **kv):
    h.diag('FIGURES scenario=%s %s' % (scenario, ' '.join('%s=%s' % (k, v) for k, v in kv.items())))


def base_conf(h, m, dbname, name, mode='single', extra=None):
    c = {
        'store.uri': m.uri,
        'store.database': dbname,
        'coord.mode': mode,
        'coord.partitions': P,
        'coord.lease_ttl_ms': 6000,
        'coord.renew_deadline_ms': 4500,
        'coord.retry_period_ms': 500,
        'store.timeout_ms': 4000,
        'drain.batch_size': 500,
        'fold.interval_ms': 100,
        'test.trace_file': os.path.join(h.tmp, 'trace-' + dbname),
    }
    c.update(extra or {})
    return c


def trace_lines(h, dbname):
    try:
        with open(os.path.join(h.tmp, 'trace-' + dbname)) as f:
            return [l.rstrip('\n').split('\t') for l in f if l.strip()]
    except FileNotFoundError:
        return []


def loadgen(h, m, dbname, ndjson, count, seed, manifest=None, extra=None):
    argv = [h.tool('tdrain-loadgen'), '--uri', m.uri, '--db', dbname, '--count', str(count), '--devices', '300',
            '--users', '100', '--dup-ratio', '0.02', '--seed', str(seed), '--ndjson', ndjson, '--quiet']
    if manifest:
        argv += ['--malformed-corpus', '--manifest', manifest]
    r = h.run(argv + list(extra or []), timeout=300)
    if r.returncode != 0:
        h.diag('loadgen: %s %s' % (r.stdout, r.stderr))
    return r


def manifest_lines(path):
    with open(path) as f:
        return [l for l in f if l.strip()]


def raw_originals(files):
    """{id_key: (bson bytes, decoded document)} of every document in the NDJSON files."""
    import bson
    out = {}
    for path in files:
        with open(path, encoding='utf-8', errors='surrogateescape') as f:
            for line in f:
                if not line.strip():
                    continue
                line = line.strip()
                if line.startswith('{"' + checker.RAW_KEY + '"'):
                    import json
                    raw = bytes.fromhex(json.loads(line)[checker.RAW_KEY])
                    doc = bson.decode(raw, codec_options=checker.CODEC)
                else:
                    doc, _ = checker.parse_line(line)
                    raw = bson.encode(doc)
                out[checker.id_key(doc['_id'])] = (raw, doc)
    return out


def deadletters_raw(m, dbname):
    import bson
    from bson.codec_options import CodecOptions
    from bson.raw_bson import RawBSONDocument
    coll = m.client()[dbname].get_collection('tdrain_deadletter',
                                             codec_options=CodecOptions(document_class=RawBSONDocument))
    out = {}
    for raw in coll.find({}):
        d = bson.decode(raw.raw, codec_options=checker.CODEC)
        out[checker.id_key(d['_id'])] = (raw, d)
    return out


def with_part(raw, p):
    """raw (a BSON document) with an int32 part appended, as the leader's triage ($set) writes it."""
    body = raw[4:-1] + b'\x10part\x00' + struct.pack('<i', p)
    return struct.pack('<i', len(body) + 5) + body + b'\x00'


def triage_part(doc, partitions):
    """The part the leader's triage writes into a document without one (docs/EVENTS.md), or None."""
    from bson import ObjectId
    if not partitions or 'part' in doc:
        return None
    v = doc.get('_id')
    if isinstance(v, ObjectId):
        return harness.fnv1a32(str(v).encode()) % partitions
    if type(v) is str:
        return harness.fnv1a32(v.encode('utf-8', 'surrogateescape')) % partitions
    return 0 if '_id' in doc else None    # an _id that cannot be hashed goes to partition 0 (consumers/fold.c)


def check_deadletter_docs(h, m, dbname, files, label, partitions=None):
    """Every dead letter carries its original document (or its head and size).  partitions: partitioned
    mode on a store whose leader triages (atomic updates: DocumentDB, MongoDB), where a document that
    arrived without `part` is dead-lettered as the FIFO held it, with the part triage appended, and
    nothing else changed."""
    orig = raw_originals(files)
    dl = deadletters_raw(m, dbname)
    whole = exact = head = bad = triaged = 0
    for key, (raw, d) in dl.items():
        if key not in orig:
            bad += 1
            h.diag('[%s] dead letter %s: no such document was inserted' % (label, checker.show_id(d['_id'])))
            continue
        want_raw, want_doc = orig[key]
        tp = triage_part(want_doc, partitions)
        if 'doc' in d:
            got = raw['doc'].raw
            if got == want_raw or d['doc'] == want_doc:
                whole += 1
                exact += got == want_raw
            elif tp is not None and got == with_part(want_raw, tp):
                whole += 1
                exact += 1
                triaged += 1
            else:
                bad += 1
                h.diag('[%s] dead letter %s: doc differs from the original (%d vs %d bytes)'
                       % (label, checker.show_id(d['_id']), len(got), len(want_raw)))
        elif 'doc_head' in d:
            shown = checker.show_id(d['_id'])
            if d.get('doc_bytes') in (len(want_raw), len(want_raw) + 10 if tp is not None else None) \
                    and isinstance(d['doc_head'], str) \
                    and 0 < len(d['doc_head'].encode('utf-8', 'surrogateescape')) <= 4096 \
                    and shown in d['doc_head']:
                head += 1
            else:
                bad += 1
                h.diag('[%s] dead letter %s: doc_head/doc_bytes wrong (%r, original %d bytes)'
                       % (label, checker.show_id(d['_id']), d.get('doc_bytes'), len(want_raw)))
        else:
            bad += 1
            h.diag('[%s] dead letter %s: neither doc nor doc_head' % (label, checker.show_id(d['_id'])))
        for f in ('reason', 'at', 'owner'):
            if f not in d:
                bad += 1
                h.diag('[%s] dead letter %s: field %s missing' % (label, checker.show_id(d['_id']), f))
    h.ok(bad == 0 and whole + head == len(dl),
         '[%s] every dead letter holds its original document (%d whole, %d of them byte for byte, %d of '
         'those plus the part triage wrote; %d as doc_head + doc_bytes)' % (label, whole, exact, triaged, head))
    return dl, head


def no_bad_log_lines(h, procs, label):
    for p in procs:
        bad = [l for l in p.log_text().splitlines() if ': crit: ' in l or ': alert: ' in l or ': emerg: ' in l
               or 'AddressSanitizer' in l or 'Segmentation' in l]
        h.ok(not bad, '[%s] no crash or critical line in %s log %s' % (label, p.name, bad[:2]))


def lost_events(m, dbname, files, allow=None):
    """Valid events (unique insert_ids) that never reached the fold's ledger, plus
    malformed documents that are neither dead-lettered nor still in the FIFO."""
    want, bad = set(), set()
    for path in files:
        for doc, size in checker.read_ndjson(path):
            reason, ev = checker.classify(doc, size, allow=frozenset(allow) if allow else None)
            if reason is None:
                want.add(ev[0])
            else:
                bad.add(checker.id_key(doc['_id']))
    db = m.client()[dbname]
    ledger = set(d['_id'] for d in db.tdrain_ledger.find({}, {'_id': 1}))
    dead = set(checker.id_key(d['_id']) for d in deadletter(db).find({}, {'_id': 1}))
    return len(want - ledger) + len(bad - dead)


def deadletter(db):
    """tdrain_deadletter, decoded as the checker does: dead letters keep the original document, and on a
    store that holds invalid UTF-8 (DocumentDB; FerretDB refuses it) the strict default decoder fails."""
    return db.get_collection('tdrain_deadletter', codec_options=checker.CODEC)


def drained(db):
    return db.events.count_documents({}) == 0 and db.tdrain_deltas.count_documents({}) == 0 \
        and db.tdrain_claims.count_documents({}) == 0


# ------------------------------------------------------------------ corpus runs

def insert_huge(h, m, dbname):
    """One more oversized event, too large for a dead letter to hold whole (a document
    within 4 KiB of the 16 MiB BSON limit): its dead letter keeps doc_head + doc_bytes.
    Inserted behind everything else; written to its own NDJSON file for the checker."""
    import datetime
    from bson import json_util
    doc = {'_id': 'bad-huge', 'insert_id': 'huge-1', 'event': 'cli_invocation', 'distinct_id': 'dev-huge',
           'created_at': datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0),
           'properties': {'blob': 'x' * (16 * 1024 * 1024 - 3000)}}
    m.client()[dbname].events.insert_one(doc)
    path = os.path.join(h.tmp, dbname + '-huge.ndjson')
    with open(path, 'w') as f:
        f.write(json_util.dumps(doc, json_options=json_util.CANONICAL_JSON_OPTIONS) + '\n')
    return path


def corpus_run(h, m, label, dbname, mode, names, allow=None):
    db = m.db(dbname)
    extra = {}
    if allow:
        extra['drain.allow_events'] = ','.join(allow)
    procs = []
    if mode == 'partitioned':
        # Both replicas hold partitions before the first event arrives: on DocumentDB the first replica
        # to start drained the whole FIFO before the second had any partition (so 'both replicas drained'
        # proved nothing about the partitioned path).
        procs = [h.start_tdrain('%s-%s' % (dbname, n), base_conf(h, m, dbname, n, mode, extra), args=['-N', n])
                 for n in names]
        h.ok(h.wait_until(lambda: all('event=partition_assigned' in p.log_text() for p in procs), 60,
                          interval=0.25, desc='[%s] every replica holds partitions' % label),
             '[%s] every replica holds partitions before the load' % label)
    nd1 = os.path.join(h.tmp, '%s-1.ndjson' % dbname)
    nd2 = os.path.join(h.tmp, '%s-2.ndjson' % dbname)
    man = os.path.join(h.tmp, '%s.manifest' % dbname)
    r1 = loadgen(h, m, dbname, nd1, N * 2 // 3, 61, manifest=man)
    # A second stream behind the corpus: good events keep arriving after the bad ones.
    r2 = loadgen(h, m, dbname, nd2, N - N * 2 // 3, 62,
                 extra=(['--partitions', str(P)] if mode == 'partitioned' else []))
    h.ok(r1.returncode == 0 and r2.returncode == 0, '[%s] loadgen inserted events and the malformed corpus' % label)
    files = [nd1, nd2]
    kinds = manifest_lines(man)
    total = db.events.count_documents({})
    h.ok(len(kinds) >= MIN_KINDS, '[%s] the corpus has %d malformed kinds (at least %d)'
         % (label, len(kinds), MIN_KINDS))

    t0 = time.monotonic()
    if not procs:
        procs = [h.start_tdrain('%s-%s' % (dbname, n), base_conf(h, m, dbname, n, mode, extra), args=['-N', n])
                 for n in names]
    ok = h.wait_until(lambda: drained(db), 600, interval=0.5, desc='[%s] drained' % label)
    h.ok(ok, '[%s] the FIFO drained (%d documents), every delta folded, no claim left, in %.1f s'
         % (label, total, time.monotonic() - t0))
    h.ok(all(p.alive() for p in procs), '[%s] no replica exited while draining' % label)

    n, ex, mism = checker.check_full(m.uri, dbname, files, manifests=[man], allow=allow)
    for x in mism[:15]:
        h.diag('  ' + str(x))
    h.ok(n > 0 and not mism, '[%s] checker: derived state and dead letters exact (%d documents, %d mismatches)'
         % (label, n, len(mism)))
    ndead = db.tdrain_deadletter.count_documents({})
    if allow:
        allow_rejects = sum(1 for _, prefix in ex.malformed.values() if prefix == 'event: not in allow-list')
        h.ok(allow_rejects > 0, '[%s] %d well-formed events outside the allow-list were expected in dead letter'
             % (label, allow_rejects))
        got = db.tdrain_deadletter.count_documents({'reason': {'$regex': '^event: not in allow-list'}})
        h.is_(got, allow_rejects, '[%s] dead letters with "event: not in allow-list"' % label)
        leaked = [d['event'] for d in db.event_counters.find({}) if d.get('event') not in ALLOW]
        h.ok(not leaked, '[%s] event_counters hold only allowed names %s' % (label, sorted(set(leaked))[:5]))
        h.is_(ndead, len(ex.malformed), '[%s] dead-letter count = corpus + allow-list rejects (%d + %d)'
              % (label, len(kinds), allow_rejects))
    else:
        h.is_(ndead, len(kinds), '[%s] dead-letter count equals the corpus size (%d)' % (label, len(kinds)))
        # Every reason prefix the manifest names, by kind, is in the store.
        by_reason = collections.Counter(d['reason'].split(' (')[0] for d in deadletter(db).find({}, {'reason': 1}))
        h.diag('[%s] dead-letter reasons: %s' % (label, dict(sorted(by_reason.items()))))
    check_deadletter_docs(h, m, dbname, files, label,
                          P if mode == 'partitioned' and m.atomic_updates else None)

    lines = trace_lines(h, dbname)
    per_id = collections.Counter(l[0] for l in lines)
    valid_docs = ex.valid
    h.is_(len(per_id), valid_docs, '[%s] every valid document was dispatched (%d)' % (label, valid_docs))
    h.ok(all(c == 1 for c in per_id.values()), '[%s] each exactly once (max %d)'
         % (label, max(per_id.values() or [0])))
    if mode == 'partitioned':
        workers = collections.Counter(l[2] for l in lines)
        h.ok(len(workers) == len(names), '[%s] both replicas drained (%s)' % (label, dict(workers)))
    no_bad_log_lines(h, procs, label)
    for p in procs:
        h.is_(p.stop(), 0, '[%s] %s exits 0 on SIGTERM' % (label, p.name))
    lost = lost_events(m, dbname, files, allow)
    h.is_(lost, 0, '[%s] no event lost (every valid insert_id in the ledger, every bad one dead-lettered)' % label)
    figures(h, 't06-' + label, trials=1, events=ex.events, lost=lost, mismatches=len(mism),
            double_owners=0, deposed_writes=0)


# ------------------------------------------------------------------ a document too large to copy whole

def huge_run(h, m):
    """Kept apart from the corpus runs: on FerretDB every scan of the FIFO decodes the
    16 MiB document again, so it sits in a small FIFO of its own."""
    label, dbname = 'huge', 't06huge'
    db = m.db(dbname)
    nd = os.path.join(h.tmp, dbname + '.ndjson')
    r = loadgen(h, m, dbname, nd, 200, 64)
    files = [nd, insert_huge(h, m, dbname)]
    h.ok(r.returncode == 0, '[%s] 200 events and one document of %d bytes inserted'
         % (label, checker.parse_line(open(files[1]).readline())[1]))
    p = h.start_tdrain(dbname + '-a', base_conf(h, m, dbname, 'a'), args=['-N', 'a'])
    ok = h.wait_until(lambda: drained(db), 300, interval=1, desc='[%s] drained' % label)
    h.ok(ok and p.alive(), '[%s] drained, the replica still running' % label)
    n, ex, mism = checker.check_full(m.uri, dbname, files)
    for x in mism[:10]:
        h.diag('  ' + str(x))
    h.ok(not mism, '[%s] checker: derived state and dead letter exact (%d documents, %d mismatches)'
         % (label, n, len(mism)))
    h.is_(db.tdrain_deadletter.count_documents({}), 1, '[%s] one dead letter' % label)
    _, heads = check_deadletter_docs(h, m, dbname, files, label)
    h.is_(heads, 1, '[%s] the near-16-MiB document is kept as doc_head (at most 4 KiB) + doc_bytes' % label)
    h.is_(p.stop(), 0, '[%s] exits 0 on SIGTERM' % label)
    lost = lost_events(m, dbname, files)
    figures(h, 't06-' + label, trials=1, events=ex.events, lost=lost, mismatches=len(mism), double_owners=0,
            deposed_writes=0)


# ------------------------------------------------------------------ poison (max_attempts)

class HoldProxy:
    """A TCP proxy to a MongoDB-wire server that, while armed, holds the first
    `insert` into `coll` (does not forward it) and signals `held`.

    Messages are framed by their int32 length; the command name and collection
    are the first element of the OP_MSG body, read without a BSON library.
    """

    def __init__(self, h, target_port, coll):
        self.h = h
        self.target = ('127.0.0.1', target_port)
        self.coll = coll.encode()
        self.armed = False
        self.held = threading.Event()
        self.lock = threading.Lock()
        self.socks = []
        self.port = harness.free_port()
        self.ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.ls.bind(('127.0.0.1', self.port))
        self.ls.listen(64)
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def arm(self):
        with self.lock:
            self.held.clear()
            self.armed = True

    def disarm(self):
        with self.lock:
            self.armed = False

    def drop_all(self):
        """Close every proxied connection (the held one included)."""
        with self.lock:
            socks, self.socks = self.socks, []
        for s in socks:
            try:
                s.close()
            except OSError:
                pass

    def close(self):
        self.closed = True
        try:
            self.ls.close()
        except OSError:
            pass
        self.drop_all()

    def _accept(self):
        while not self.closed:
            try:
                c, _ = self.ls.accept()
            except OSError:
                return
            try:
                s = socket.create_connection(self.target, timeout=5)
                s.settimeout(None)
            except OSError:
                c.close()
                continue
            with self.lock:
                self.socks += [c, s]
            threading.Thread(target=self._up, args=(c, s), daemon=True).start()
            threading.Thread(target=self._down, args=(s, c), daemon=True).start()

    @staticmethod
    def _recvn(sock, n):
        buf = b''
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                return None
            buf += chunk
        return buf

    def _is_target(self, msg):
        # header(16) flags(4) kind(1)=0 then the body document: int32 len, type, key, value
        if len(msg) < 32 or struct.unpack('<i', msg[12:16])[0] != 2013 or msg[20] != 0:
            return False
        body = msg[21:21 + 64]
        return body[4:12] == b'\x02insert\x00' and body[16:16 + len(self.coll) + 1] == self.coll + b'\x00'

    def _up(self, c, s):
        try:
            while True:
                hdr = self._recvn(c, 4)
                if hdr is None:
                    break
                n = struct.unpack('<i', hdr)[0]
                rest = self._recvn(c, n - 4)
                if rest is None:
                    break
                msg = hdr + rest
                with self.lock:
                    hold = self.armed and self._is_target(msg)
                    if hold:
                        self.armed = False
                if hold:
                    self.held.set()
                    # Never forwarded: the client waits until it is killed.
                    while True:
                        if not c.recv(65536):
                            break
                    break
                s.sendall(msg)
        except OSError:
            pass
        for x in (c, s):
            try:
                x.close()
            except OSError:
                pass

    def _down(self, s, c):
        try:
            while True:
                data = s.recv(65536)
                if not data:
                    break
                c.sendall(data)
        except OSError:
            pass
        for x in (c, s):
            try:
                x.close()
            except OSError:
                pass


def poison_run(h, m):
    label = 'poison'
    dbname = 't06poison'
    max_attempts = 2
    db = m.db(dbname)
    nd = os.path.join(h.tmp, dbname + '.ndjson')
    r = h.run([h.tool('tdrain-loadgen'), '--uri', m.uri, '--db', dbname, '--count', '600', '--devices', '80',
               '--users', '30', '--seed', '63', '--ndjson', nd, '--quiet'], timeout=300)
    h.ok(r.returncode == 0, '[%s] loadgen inserted 600 events' % label)
    proxy = HoldProxy(h, m.port, 'tdrain_deltas')
    cfg = base_conf(h, m, dbname, 'p', 'single', {
        'store.uri': m.uri_via(proxy.port),
        'drain.batch_size': 40,
        'drain.max_attempts': max_attempts,
        'coord.lease_ttl_ms': 15000,
        'coord.renew_deadline_ms': 10000,
        'coord.retry_period_ms': 1000,
        'store.timeout_ms': 8000,
    })
    p = None
    crash_ids = None
    crashes = 0
    try:
        for k in range(1, max_attempts + 1):
            proxy.arm()
            if p is None:
                p = h.start_tdrain(dbname + '-p', cfg, args=['-N', 'p'])
            else:
                p.start()
            held = proxy.held.wait(60)
            h.ok(held, '[%s] crash %d: the replica reached the delta insert of a batch (held by the proxy)'
                 % (label, k))
            if not held:
                return
            recs = list(db.tdrain_claims.find({}))
            newest = max(recs, key=lambda d: d['epoch']) if recs else None
            ids = [checker.id_key(x) for x in newest['ids']] if newest else []
            att = set(int(a) for a in newest.get('att', [])) if newest else set()
            if crash_ids is None:
                crash_ids = ids
            h.ok(newest is not None and sorted(ids) == sorted(crash_ids) and att == {k},
                 '[%s] crash %d: claim record %s holds the same %d events with attempts %s (expected {%d})'
                 % (label, k, newest['_id'] if newest else None, len(ids), sorted(att), k))
            h.is_(p.kill9(), -9, '[%s] crash %d: SIGKILL mid-batch (after claim, before commit)' % (label, k))
            crashes += 1
            proxy.drop_all()
        proxy.disarm()
        p.start()
        ok = h.wait_until(lambda: drained(db), 300, interval=0.5, desc='[%s] drained' % label)
        h.ok(ok, '[%s] after %d crashes the restarted replica drained everything' % (label, crashes))
        log = p.log_text()
        h.is_(p.stop(), 0, '[%s] replica exits 0 on SIGTERM' % label)
    finally:
        if p is not None and p.alive():
            p.kill9()
        proxy.close()

    dead = {checker.id_key(d['_id']): d for d in deadletter(db).find({})}
    poisoned = set(crash_ids or [])
    att_dead = {k: d for k, d in dead.items() if str(d.get('reason', '')).startswith('attempts: ')}
    h.diag('[%s] %d events in the crashing batch; dead letters: %d, with "attempts:": %d'
           % (label, len(poisoned), len(dead), len(att_dead)))
    for k, d in list(dead.items())[:3]:
        h.diag('[%s]   %s: %r attempts=%r' % (label, checker.show_id(d['_id']), d.get('reason'), d.get('attempts')))
    disp = collections.Counter((l[0], l[4]) for l in trace_lines(h, dbname)
                               if ('oid', l[0]) in poisoned or ('str', l[0]) in poisoned)
    h.diag('[%s] dispatches of the crashing batch\'s events by epoch: %s'
           % (label, dict(collections.Counter(ep for (_, ep) in disp.elements()))))
    h.ok(poisoned and set(att_dead) == poisoned and set(dead) == poisoned,
         '[%s] exactly the %d events claimed %d times without completing are dead-lettered with "attempts: ..."'
         % (label, len(poisoned), max_attempts))
    h.ok(all(int(d.get('attempts', 0)) == max_attempts + 1 for d in att_dead.values()) and att_dead,
         '[%s] their dead letters record attempts = %d' % (label, max_attempts + 1))

    # Everything else exact: recompute without the poisoned documents, expect those as dead letters.
    keep = os.path.join(h.tmp, dbname + '-kept.ndjson')
    with open(nd, encoding='utf-8', errors='surrogateescape') as fin, \
            open(keep, 'w', encoding='utf-8', errors='surrogateescape') as fout:
        for line in fin:
            if line.strip() and checker.id_key(checker.parse_line(line)[0]['_id']) not in poisoned:
                fout.write(line)
    ex = checker.expect([keep])
    for key in poisoned:
        ex.malformed[key] = (key[1], 'attempts: ')
    mism = checker.compare(ex, checker.snapshot(m.uri, dbname))
    for x in mism[:15]:
        h.diag('  ' + str(x))
    h.ok(not mism, '[%s] derived state exact for every other event (%d documents, %d mismatches)'
         % (label, ex.n_derived(), len(mism)))
    if mism:
        _, full = checker.check(m.uri, dbname, [nd])
        if not full:
            h.diag('[%s] the store equals a recomputation that COUNTS the crashing batch: its events were '
                   'processed normally on their claim %d instead of being dead-lettered' % (label, max_attempts + 1))
    h.ok(log.count('orphaned events from') >= 1 and ' 0 orphaned events from 2 claim records' not in log,
         '[%s] the restarts recovered the orphaned claims (log)' % label)
    figures(h, 't06-poison', trials=crashes, events=ex.events + len(poisoned), lost=0, mismatches=len(mism),
            double_owners=0, deposed_writes=0)


def main(h):
    for kind in h.store_kinds():
        m = h.start_store(kind)
        run(h.for_store(m), m)
        m.stop()


def run(h, m):
    """Every scenario on one store: h labels every point with the store and has a tmp of its own."""
    t0 = time.monotonic()
    only = os.environ.get('T06_SCENARIOS', 'single,partitioned,allow,huge,poison').split(',')
    if 'single' in only:
        corpus_run(h, m, 'single', 't06single', 'single', ['a'])
    if 'partitioned' in only:
        corpus_run(h, m, 'partitioned', 't06part', 'partitioned', ['a', 'b'])
    if 'allow' in only:
        corpus_run(h, m, 'allow', 't06allow', 'single', ['a'], allow=ALLOW)
    if 'huge' in only:
        huge_run(h, m)
    if 'poison' in only:
        poison_run(h, m)
    h.diag('t06 total %.1f s' % (time.monotonic() - t0))


harness.Harness().main(main)
