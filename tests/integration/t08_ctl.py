#!/usr/bin/env python3
"""t08: tdrainctl, the operator CLI, against two live partitioned replicas.

On each store of h.store_kinds() (a real FerretDB and a real DocumentDB by
default, TDRAIN_TEST_STORES), for each coordination backend (mongo, then etcd;
a database per backend) with a real etcd:

- two replicas a and b in partitioned mode (8 partitions) converge, on an
  empty FIFO; listIndexes shows the indexes they created (tdrain_part_id on
  events, tdrain_part_epoch on tdrain_claims, tdrain_name_epoch, unique, on
  tdrain_leases); the loadgen inserts 2000 events plus the malformed corpus;
  they drain it;
- `status --json` parses and reports version 1, both members, 8 partitions
  each with exactly one holder, matching what the leases say when read
  directly (tdrain_leases, or etcd's keys), a leader, and numbers that agree
  with the collections (FIFO, dead letters, deltas, fold); the text form names
  both replicas;
- `dlq list` (text and --json) shows every malformed document of the
  manifest with its reason, in natural order on FerretDB (which sorts by
  reading everything) and newest first on DocumentDB (MongoDB semantics);
- `dlq requeue --all --dry-run` writes nothing and predicts, per dead letter,
  whether it would be dead-lettered again (with the recorded reason);
  `dlq requeue --all` puts the documents back into the FIFO and exactly the
  predicted ones come back to the dead-letter collection (with a later `at`),
  the others are drained (the size limit does not count an int32 `part`, so
  the oversized one stays oversized whether or not the leader's triage writes
  a `part` into the requeued copy, as it does on DocumentDB);
- `recover --all` deletes an injected claim record of a deposed epoch (fenced,
  reported), and keeps one of the current epoch; `recover --partition 0`
  with nobody holding partition 0 deletes even current-epoch records;
- stopping b makes status show a holding all 8 partitions within seconds;
- usage errors exit 64, a bad configuration 78, an unreachable store 69 with
  one line and no password.
"""

import base64
import datetime
import json
import os
import re
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
import harness  # noqa: E402

EX_OK, EX_FAIL, EX_USAGE, EX_UNAVAILABLE, EX_CONFIG = 0, 1, 64, 69, 78
P = 8
N = 2000
SECRET = 's3cret-t08'
MEMBERS = ('a', 'b')


def clean_env(extra=None):
    """No TDRAIN_<KEY> variables from outside, no journal."""
    env = {k: None for k in os.environ if k.startswith('TDRAIN_')}
    env['JOURNAL_STREAM'] = None
    env.update(extra or {})
    return env


def b64(s):
    return base64.b64encode(s.encode()).decode()


def show(h, r):
    h.diag('exit %s' % r.returncode)
    for label, text in (('stdout', r.stdout), ('stderr', r.stderr)):
        if text and text.strip():
            h.diag('%s:\n%s' % (label, text.rstrip()[-3000:]))


class Scenario:
    def __init__(self, h, m, backend, e=None):
        self.h, self.m, self.backend, self.e = h, m, backend, e
        self.ferretdb = not m.atomic_updates        # store.c: FerretDB is detected, anything else is MongoDB
        self.dbname = 'tdrain_' + backend
        self.db = m.db(self.dbname)
        self.cfg = {
            'store.uri': m.uri,
            'store.database': self.dbname,
            'coord.backend': backend,
            'coord.mode': 'partitioned',
            'coord.partitions': P,
            'coord.lease_ttl_ms': 4000,
            'coord.renew_deadline_ms': 3000,
            'coord.retry_period_ms': 500,
            'store.timeout_ms': 2000,
            'fold.interval_ms': 100,
        }
        if e is not None:
            self.cfg['coord.etcd_endpoint'] = e.endpoint
            self.cfg['coord.etcd_prefix'] = '/t08-%s-%s/' % (m.label, backend)
        self.conf = os.path.join(h.tmp, 'ctl-%s.conf' % backend)
        with open(self.conf, 'w') as f:
            f.write(h.config_text(self.cfg))
        self.ctl_bin = h.tool('tdrainctl')
        self.procs = {}

    def t(self, desc):
        return '[%s] %s' % (self.backend, desc)

    # ---- tdrainctl ----
    def ctl(self, *args, timeout=60, conf=None):
        argv = [self.ctl_bin, '-c', conf or self.conf] + [str(a) for a in args]
        if self.h.valgrind:
            # TDRAIN_VALGRIND=1: every tdrainctl run must be free of leaks and invalid accesses (exit 99).
            self.nvg = getattr(self, 'nvg', 0) + 1
            argv = ['valgrind', '-q', '--error-exitcode=99', '--leak-check=full',
                    '--errors-for-leak-kinds=definite,indirect,possible', '--num-callers=30',
                    '--log-file=%s/ctl-%s-%d.valgrind.log' % (self.h.tmp, self.backend, self.nvg)] + argv
            timeout *= 5
        return self.h.run(argv, timeout=timeout, env=clean_env())

    def status(self, *extra):
        r = self.ctl('status', '--json', *extra)
        if r.returncode != 0:
            raise RuntimeError('status --json exited %s: %s' % (r.returncode, r.stderr.strip()))
        return json.loads(r.stdout)

    # ---- independent view of the leases ----
    def lease_view(self):
        """name -> holder of every lease that is held (not released), read without tdrainctl."""
        out = {}
        if self.backend == 'mongo':
            latest = {}
            for d in harness.lease_docs(self.db, {}):
                if d['name'] not in latest or d['epoch'] > latest[d['name']]['epoch']:
                    latest[d['name']] = d
            for name, d in latest.items():
                if not d.get('released'):
                    out[name] = d['holder']
        else:
            prefix = self.cfg['coord.etcd_prefix'] + 'lease/'
            end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
            r = self.e.post('/v3/kv/range', {'key': b64(prefix), 'range_end': b64(end)})
            for kv in r.get('kvs', []):
                name = base64.b64decode(kv['key']).decode()[len(prefix):]
                out[name] = json.loads(base64.b64decode(kv['value']).decode())['holder']
        return out

    def converged(self, members):
        v = self.lease_view()
        return (all(v.get('member/%s' % n) == n for n in members)
                and not any(k.startswith('member/') and k[7:] not in members for k in v)
                and all(v.get('part/%d' % p) in members for p in range(P))
                and set(v.get('part/%d' % p) for p in range(P)) == set(members)
                and v.get('leader') in members)

    def stable(self, members):
        """Converged, and still the same map a moment later (no hand-over in flight)."""
        if not self.converged(members):
            return False
        before = self.lease_view()
        time.sleep(1.0)
        return self.converged(members) and self.lease_view() == before

    # ---- the scenario ----
    def run(self):
        h, db = self.h, self.db
        for n in MEMBERS:
            self.procs[n] = h.start_tdrain('%s-%s' % (self.backend, n), dict(self.cfg, name=n), args=['-N', n])
        h.ok(h.wait_until(lambda: self.stable(MEMBERS), 60, interval=0.5, desc='a and b converge'),
             self.t('a and b converged: every partition has a holder, both hold some'))
        self.check_indexes()

        manifest = os.path.join(h.tmp, 'manifest-%s.ndjson' % self.backend)
        r = h.run([h.tool('tdrain-loadgen'), '--uri', self.m.uri, '--db', self.dbname, '--count', N,
                   '--partitions', P, '--devices', 300, '--users', 100, '--malformed-corpus', '--manifest',
                   manifest, '--quiet'], timeout=300)
        h.ok(r.returncode == 0, self.t('loadgen inserted %d events and the malformed corpus' % N)) or show(h, r)
        with open(manifest) as f:
            bad = [json.loads(line) for line in f if line.strip()]
        bad_str = {b['_id']: b['reason'] for b in bad if isinstance(b['_id'], str)}
        h.diag(self.t('%d malformed documents (%d with string _id)' % (len(bad), len(bad_str))))

        drained = lambda: (db.events.count_documents({}) == 0 and db.tdrain_deltas.count_documents({}) == 0
                           and db.tdrain_deadletter.count_documents({}) == len(bad))
        h.ok(h.wait_until(drained, 300, interval=1, desc='drained'),
             self.t('the pair drained the FIFO, folded every delta, dead-lettered the corpus'))
        h.ok(h.wait_until(lambda: self.stable(MEMBERS), 30, interval=0.5, desc='still converged'),
             self.t('the pair is still converged'))

        self.check_status(bad)
        self.check_dlq_list(bad, bad_str)
        self.check_requeue(bad)
        self.check_recover()
        self.check_fifo_probe()
        self.check_failover()

    def check_indexes(self):
        """Started on an empty FIFO, the replicas created their indexes (lib/store.c, docs/EVENTS.md): the
        claim and triage index on events, the recovery index on tdrain_claims, the election's unique key
        on tdrain_leases and tdrain_parts.  DocumentDB serves keyed statements from them; FerretDB has them but scans."""
        h, db = self.h, self.db
        want = {'events': ('tdrain_part_id', [('part', 1), ('_id', 1)], False),
                'tdrain_claims': ('tdrain_part_epoch', [('part', 1), ('epoch', 1)], False),
                'tdrain_leases': ('tdrain_name_epoch', [('name', 1), ('epoch', 1)], True),
                'tdrain_parts': ('tdrain_part_name_epoch', [('name', 1), ('epoch', 1)], False)}
        want = [(c,) + v for c, v in want.items()]
        if not self.ferretdb:
            # DocumentDB only: its built-in _id index does not serve {_id: {$in}} deletes (lib/store.c).
            want += [('events', 'tdrain_id', [('_id', 1), ('part', 1)], False),
                     ('tdrain_deltas', 'tdrain_delta_id', [('_id', 1), ('part', 1)], False)]
        for coll, name, keys, unique in want:
            got = {ix['name']: ix for ix in db[coll].list_indexes()}
            ix = got.get(name)
            h.ok(ix is not None and [(k, int(v)) for k, v in ix['key'].items()] == keys
                 and bool(ix.get('unique')) == unique,
                 self.t('listIndexes: %s.%s on %s%s' % (coll, name, keys, ', unique' if unique else ''))) \
                or h.diag(repr(sorted(got)))

    def check_status(self, bad):
        h, db = self.h, self.db
        t0 = time.monotonic()
        r = self.ctl('status', '--json')
        elapsed = time.monotonic() - t0
        h.is_(r.returncode, EX_OK, self.t('status --json exits 0')) or show(h, r)
        try:
            s = json.loads(r.stdout)
        except ValueError as ex:
            h.ok(False, self.t('status --json is one JSON object: %s' % ex))
            show(h, r)
            return
        h.ok(isinstance(s, dict) and s.get('version') == 1, self.t('status --json parses, version 1'))
        present = (s.get('indexes') or {}).get('present') or [] if isinstance(s, dict) else []
        h.ok(len(present) == len(set(present)) and 'tdrain_part_name_epoch' in present,
             self.t('status --json: indexes.present names each index once, tdrain_parts\' among them: %s'
                    % present))
        h.ok(elapsed < 15, self.t('status with the 1 s rate interval took %.1f s' % elapsed))
        h.is_((s['mode'], s['backend'], s['partitions']), ('partitioned', self.backend, P),
              self.t('mode, backend and partition count'))
        h.is_((s.get('store') or {}).get('ferretdb'), self.ferretdb, self.t('the store is recognised as %s (hello/buildInfo)'
                                                       % ('FerretDB' if self.ferretdb else 'MongoDB')))
        h.is_(sorted(mb['name'] for mb in s['members']), sorted(MEMBERS), self.t('2 members: a and b'))
        h.ok(all(mb['epoch'] > 0 and (mb['expires_in_ms'] or 0) > 0 for mb in s['members']),
             self.t('each member has an epoch and a positive expires-in'))
        pm = s['partition_map']
        h.is_([e['partition'] for e in pm], list(range(P)), self.t('the map lists partitions 0..7 once each'))
        h.ok(all(e['owned'] and e['holder'] in MEMBERS and e['epoch'] > 0 for e in pm),
             self.t('each partition has exactly one holder, a member, at an epoch'))
        h.is_(s['unowned_partitions'], [], self.t('no unowned partitions'))
        view = self.lease_view()
        h.is_({e['partition']: e['holder'] for e in pm}, {p: view.get('part/%d' % p) for p in range(P)},
              self.t('the map equals the leases read directly'))
        h.ok(sum(mb['partitions'] for mb in s['members']) == P and all(mb['partitions'] > 0 for mb in s['members']),
             self.t('members\' partition counts add up to 8, both non-zero'))
        h.ok(s['leader'] is not None and s['leader']['holder'] in MEMBERS and s['leader']['holder'] == view.get('leader'),
             self.t('a leader, the one the leases name (%s)' % (s['leader'] or {}).get('holder')))
        names = sorted(l['name'] for l in s['leases'])
        h.ok({'leader', 'member/a', 'member/b'} | {'part/%d' % p for p in range(P)} <= set(names),
             self.t('every lease is listed (%d)' % len(names)))
        h.ok(all(set(l) >= {'name', 'holder', 'epoch', 'ttl_ms', 'expires_in_ms', 'released', 'state'}
                 for l in s['leases']), self.t('each lease has name, holder, epoch, ttl, expires-in, released'))

        bl = s['backlog']
        fifo = db.events.count_documents({})
        h.is_((bl['fifo'], bl['untriaged']), (fifo, 0), self.t('backlog: FIFO empty, nothing untriaged'))
        claimed = sum(len(c.get('ids', [])) for c in db.tdrain_claims.find({}))
        h.ok(bl['claimed'] == claimed and bl['pending'] == max(0, bl['fifo'] - bl['claimed'])
             and bl['claim_records'] >= 0, self.t('claimed = ids in claim records, pending = fifo - claimed'))
        h.is_(s['deadletters'], len(bad), self.t('dead-letter count = the corpus (%d)' % len(bad)))
        h.ok(s['oldest_pending'] is None, self.t('no oldest pending event in an empty FIFO'))
        st = db.tdrain_state.find_one({'_id': 'fold'})
        h.ok(s['fold']['seq'] is not None and s['fold']['seq'] == st['seq'] and s['fold']['holder'] == st['holder']
             and s['fold']['pending_deltas'] == 0, self.t('fold: seq and holder as in tdrain_state, no deltas pending'))
        rt = s['rate']
        h.ok(rt is not None and rt['interval_ms'] >= 950 and isinstance(rt['events_per_s'], (int, float))
             and abs(rt['events_per_s'] * rt['interval_ms'] / 1000.0 - (rt['fifo_before'] - rt['fifo_after'])) < 1,
             self.t('rate: measured over ~1 s, consistent with the two FIFO samples'))

        r = self.ctl('status', '--no-rate')
        h.is_(r.returncode, EX_OK, self.t('status (text) exits 0')) or show(h, r)
        member_rows = [l.split()[0] for l in r.stdout.splitlines() if re.match(r'^\s+[ab]\s+\d+\s', l)]
        h.ok(set(member_rows) >= set(MEMBERS) and re.search(r'^members\s+2\b', r.stdout, re.M),
             self.t('the text form lists members a and b')) or show(h, r)
        h.ok(re.search(r'^partitions\s+8 owned, 0 unowned', r.stdout, re.M) and 'deadletters' in r.stdout
             and 'not measured' in r.stdout, self.t('the text form has the partition map, dead letters, no rate'))

    def check_dlq_list(self, bad, bad_str):
        h = self.h
        r = self.ctl('dlq', 'list', '--limit', 1000, '--json')
        h.is_(r.returncode, EX_OK, self.t('dlq list --json exits 0')) or show(h, r)
        d = json.loads(r.stdout)
        order = 'natural' if self.ferretdb else 'newest_first'
        h.ok(d['total'] == len(bad) and d['shown'] == len(bad) and d['order'] == order,
             self.t('dlq list: all %d shown, order %s (%s)' % (len(bad), order, d.get('order'))))
        if not self.ferretdb:
            ats = [e['at'] for e in d['entries']]
            h.ok(ats == sorted(ats, reverse=True), self.t('dlq list: entries newest first by "at"'))
        got = {e['id']: e for e in d['entries'] if e['id_type'] == 'string'}
        h.is_(sorted(got), sorted(bad_str), self.t('dlq list: every malformed document of the manifest'))
        wrong = [(i, got[i]['reason'], why) for i, why in bad_str.items()
                 if i in got and not got[i]['reason'].startswith(why)]
        h.ok(not wrong, self.t('dlq list: each with the manifest\'s reason')) or h.diag(repr(wrong[:5]))
        h.ok(all(e['owner'] in MEMBERS and e['at'] and e['attempts'] >= 1 and e['requeueable'] for e in d['entries']),
             self.t('dlq list: owner, time, attempts; every one requeueable'))
        r = self.ctl('dlq', 'list', '--limit', 1000)
        h.is_(r.returncode, EX_OK, self.t('dlq list (text) exits 0'))
        shown = [i for i in bad_str if len(i) <= 60 and i in r.stdout]
        h.ok(len(shown) == len([i for i in bad_str if len(i) <= 60]) and 'insert_id: missing' in r.stdout
             and ('natural order' if self.ferretdb else 'newest first') in r.stdout,
             self.t('dlq list (text): ids, reasons, and the order it used')) \
            or show(h, r)
        r = self.ctl('dlq', 'list', '--limit', 3, '--json')
        h.ok(r.returncode == 0 and len(json.loads(r.stdout)['entries']) == 3, self.t('dlq list --limit 3: 3 entries'))

    def dlq_entries(self):
        r = self.ctl('dlq', 'list', '--limit', 1000, '--json')
        if r.returncode != 0:
            raise RuntimeError('dlq list --json exited %s: %s' % (r.returncode, r.stderr.strip()))
        return {e['id']: e for e in json.loads(r.stdout)['entries']}

    def check_requeue(self, bad):
        h, db = self.h, self.db
        before = self.dlq_entries()
        r = self.ctl('dlq', 'requeue', '--all', '--dry-run')
        h.ok(r.returncode == EX_OK and 'would requeue %d ' % len(bad) in r.stdout,
             self.t('dlq requeue --all --dry-run: would requeue %d' % len(bad))) or show(h, r)
        verdict = {}
        for line in r.stdout.splitlines():
            m = re.match(r'^(.*): would requeue( \(already in the FIFO: a duplicate\))?'
                         r'(; still invalid, it would be dead-lettered again: (.*))?$', line)
            if m:
                verdict[m.group(1)] = m.group(4)      # None: valid now
        h.is_(sorted(verdict), sorted(before), self.t('dry run: one verdict per dead letter'))
        again = {i for i, why in verdict.items() if why is not None}
        h.ok(all(verdict[i].split(' (')[0] == before[i]['reason'].split(' (')[0] for i in again),
             self.t('dry run: the predicted reasons are the recorded ones')) \
            or h.diag(repr([(i, verdict[i], before[i]['reason']) for i in again][:5]))
        h.diag(self.t('predicted valid once requeued: %s' % sorted(set(verdict) - again)))
        h.is_(db.tdrain_deadletter.count_documents({}), len(bad), self.t('dry run changed nothing'))

        r = self.ctl('dlq', 'requeue', '--all')
        h.ok(r.returncode == EX_OK and re.search(r'^requeued %d \(plus 0 ' % len(bad), r.stdout, re.M),
             self.t('dlq requeue --all: requeued %d' % len(bad))) or show(h, r)

        def settled():
            now = self.dlq_entries()
            return set(now) == again and all(now[i]['at'] > before[i]['at'] for i in now) \
                and db.events.count_documents({}) == 0 and db.tdrain_deltas.count_documents({}) == 0
        h.ok(h.wait_until(settled, 120, interval=1, desc='requeued documents drained or dead-lettered again'),
             self.t('as the dry run said: %d came back to the dead letters (newly dead-lettered), %d were counted'
                    % (len(again), len(verdict) - len(again))))

        r = self.ctl('dlq', 'requeue', 'no-such-dead-letter')
        h.ok(r.returncode == EX_FAIL and 'not in tdrain_deadletter' in r.stdout,
             self.t('dlq requeue of an unknown ID: reported, exit 1')) or show(h, r)

    def check_recover(self):
        h, db = self.h, self.db
        s = self.status('--no-rate')
        e3 = [e for e in s['partition_map'] if e['partition'] == 3][0]
        cur, holder = e3['epoch'], e3['holder']
        now = datetime.datetime.now(datetime.timezone.utc)
        orphan = {'_id': '3:%d:999001' % (cur - 1), 'part': 3, 'epoch': cur - 1, 'owner': 'ghost',
                  'ids': ['ghost-1', 'ghost-2'], 'att': [1, 1], 'at': now}
        current = {'_id': '3:%d:999002' % cur, 'part': 3, 'epoch': cur, 'owner': holder,
                   'ids': ['ghost-3'], 'att': [1], 'at': now}
        db.tdrain_claims.insert_many([orphan, current])
        s = self.status('--no-rate')
        h.ok(s['backlog']['orphaned_claim_records'] == 1 and s['backlog']['orphaned_events'] == 2,
             self.t('status counts the deposed-epoch claim record as orphaned (1 record, 2 events)')) \
            or h.diag(repr(s['backlog']))

        r = self.ctl('recover', '--all')
        h.ok(r.returncode == EX_OK and re.search(r'partition 3: held by %s at epoch %d: deleted 1 orphaned claim record'
                                                 % (re.escape(holder), cur), r.stdout)
             and re.search(r'^recovered 1 claim record holding 2 events', r.stdout, re.M),
             self.t('recover --all: deleted the one deposed-epoch record and says so')) or show(h, r)
        h.ok(db.tdrain_claims.find_one({'_id': orphan['_id']}) is None,
             self.t('the deposed-epoch record is gone'))
        h.ok(db.tdrain_claims.find_one({'_id': current['_id']}) is not None,
             self.t('the current epoch\'s record was left alone'))
        db.tdrain_claims.delete_one({'_id': current['_id']})

        r = self.ctl('recover', '--partition', 3)
        h.ok(r.returncode == EX_OK and 'no orphaned claim records' in r.stdout,
             self.t('recover --partition 3 again: nothing to do')) or show(h, r)

    def check_fifo_probe(self):
        """status's FIFO figures, made exact: tdrainctl pointed (store.events) at a collection nobody drains."""
        h, db = self.h, self.db
        probe_conf = os.path.join(h.tmp, 'probe-%s.conf' % self.backend)
        with open(probe_conf, 'w') as f:
            f.write(h.config_text(dict(self.cfg, **{'store.events': 'probe'})))
        gen = [h.tool('tdrain-loadgen'), '--uri', self.m.uri, '--db', self.dbname, '--coll', 'probe', '--quiet']
        r1 = h.run(gen + ['--count', 300, '--partitions', P, '--seed', 3], timeout=120)
        r2 = h.run(gen + ['--count', 20, '--seed', 4], timeout=120)      # no part: untriaged
        h.ok(r1.returncode == 0 and r2.returncode == 0, self.t('probe FIFO filled (300 with part, 20 without)'))
        head = next(db.probe.find({}, {'created_at': 1}).limit(1))
        r = self.ctl('status', '--json', '--no-rate', conf=probe_conf)
        s = json.loads(r.stdout)
        bl, op = s['backlog'], s['oldest_pending']
        h.ok(bl['fifo'] == 320 and bl['untriaged'] == 20 and bl['pending'] == max(0, 320 - bl['claimed']),
             self.t('status: fifo 320, untriaged 20, pending = fifo - claimed')) or h.diag(repr(bl))
        created = head['created_at'].replace(tzinfo=datetime.timezone.utc)
        gen_at = datetime.datetime.strptime(s['generated_at'], '%Y-%m-%dT%H:%M:%S.%fZ').replace(
            tzinfo=datetime.timezone.utc)
        h.ok(op is not None and op['id'] == str(head['_id']) and op['id_type'] == 'objectId'
             and op['created_at'] == created.strftime('%Y-%m-%dT%H:%M:%S.') + '%03dZ' % (created.microsecond // 1000)
             and op['age_ms'] == round((gen_at - created).total_seconds() * 1000),
             self.t('oldest pending: the head\'s _id, created_at and age')) or h.diag('%r vs %r' % (op, head))

        # While documents keep streaming in and nobody drains, the net rate must be negative.  The feeder
        # runs until the sampler has seen a sample, however slow tdrainctl is (valgrind).
        stop = threading.Event()
        fed = [0]

        def feed():
            coll = self.m.client()[self.dbname].probe
            while not stop.is_set():
                coll.insert_many([{'_id': 'feed-%d' % (fed[0] + j)} for j in range(25)])
                fed[0] += 25
                time.sleep(0.05)
        th = threading.Thread(target=feed)
        th.start()
        rates = []
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not any(rt['events_per_s'] < 0 for rt in rates):
                r = self.ctl('status', '--json', '--interval', 1000, conf=probe_conf)
                if not h.ok(r.returncode == EX_OK, self.t('status --json on the growing probe FIFO exits 0')):
                    show(h, r)
                    break
                rates.append(json.loads(r.stdout)['rate'])
        finally:
            stop.set()
            th.join()
        h.ok(any(rt['events_per_s'] < 0 and rt['fifo_after'] > rt['fifo_before'] for rt in rates),
             self.t('rate while the FIFO grows (%d fed): negative (%s events/s)'
                    % (fed[0], ['%.0f' % rt['events_per_s'] for rt in rates])))
        db.drop_collection('probe')

    def check_failover(self):
        h = self.h
        b = self.procs['b']
        h.is_(b.stop(), 0, self.t('b exits 0 on SIGTERM'))
        t0 = time.monotonic()

        def a_has_all():
            s = self.status('--no-rate')
            return ([m['name'] for m in s['members']] == ['a']
                    and all(e['owned'] and e['holder'] == 'a' for e in s['partition_map'])
                    and s['leader'] is not None and s['leader']['holder'] == 'a')
        ok = h.wait_until(a_has_all, 30, interval=0.5, desc='a takes every partition')
        took = time.monotonic() - t0
        h.ok(ok and took < 12, self.t('status shows a holding all 8 partitions %.1f s after b stopped' % took))

        # Nobody holds anything: recover deletes even current-epoch records of the scope.
        a = self.procs['a']
        h.is_(a.stop(), 0, self.t('a exits 0 on SIGTERM'))
        s = self.status('--no-rate')
        h.ok(s['members'] == [] and s['leader'] is None and len(s['unowned_partitions']) == P,
             self.t('with both stopped: no members, no leader, 8 unowned partitions'))
        e0 = [e for e in s['partition_map'] if e['partition'] == 0][0]
        ep = e0['epoch'] or 1
        rec = {'_id': '0:%d:999003' % ep, 'part': 0, 'epoch': ep, 'owner': 'a', 'ids': ['ghost-4'], 'att': [1],
               'at': datetime.datetime.now(datetime.timezone.utc)}
        self.db.tdrain_claims.insert_one(rec)
        r = self.ctl('recover', '--partition', 0)
        h.ok(r.returncode == EX_OK and 'partition 0: no holder' in r.stdout and 'deleted 1 orphaned' in r.stdout
             and self.db.tdrain_claims.find_one({'_id': rec['_id']}) is None,
             self.t('recover --partition 0 with no holder: deletes its records')) or show(h, r)


def check_cli_errors(h, m):
    ctl = h.tool('tdrainctl')
    closed = harness.free_port()
    conf = os.path.join(h.tmp, 'errors.conf')
    with open(conf, 'w') as f:
        f.write(h.config_text({'store.uri': m.uri, 'coord.lease_ttl_ms': 4000, 'coord.renew_deadline_ms': 3000,
                               'coord.retry_period_ms': 500, 'store.timeout_ms': 1000}))

    def run(*args):
        return h.run([ctl] + [str(a) for a in args], timeout=60, env=clean_env())

    for args, what in ((['-c', conf], 'no command'), (['-c', conf, 'frobnicate'], 'unknown command'),
                       (['-c', conf, 'status', '--bogus'], 'unknown status option'),
                       (['-c', conf, 'dlq'], 'dlq without subcommand'),
                       (['-c', conf, 'dlq', 'requeue'], 'requeue without --all or IDs'),
                       (['-c', conf, 'dlq', 'requeue', '--all', 'x'], 'requeue with --all and IDs'),
                       (['-c', conf, 'recover'], 'recover without scope'),
                       (['-c', conf, 'recover', '--partition', 99], 'recover --partition out of range'),
                       (['--bogus', 'status'], 'unknown global option')):
        r = run(*args)
        h.ok(r.returncode == EX_USAGE and 'usage:' in r.stderr and r.stdout == '',
             'usage error (%s): exit 64, usage on stderr' % what) or show(h, r)
    r = run('-h')
    h.ok(r.returncode == EX_OK and 'usage:' in r.stdout, '-h: usage on stdout, exit 0') or show(h, r)

    r = run('-c', conf, '--set', 'coord.lease_ttl_ms=abc', 'status')
    h.ok(r.returncode == EX_CONFIG and len(r.stderr.strip().splitlines()) == 1 and 'coord.lease_ttl_ms' in r.stderr,
         'bad configuration: exit 78, one line naming the key') or show(h, r)
    r = run('-c', os.path.join(h.tmp, 'missing.conf'), 'status')
    h.ok(r.returncode == EX_CONFIG and 'missing.conf' in r.stderr, 'missing configuration file: exit 78') or show(h, r)

    t0 = time.monotonic()
    r = run('-c', conf, '--set', 'store.uri=mongodb://tdrain:%s@127.0.0.1:%d/' % (SECRET, closed), 'status')
    took = time.monotonic() - t0
    lines = r.stderr.strip().splitlines()
    h.ok(r.returncode == EX_UNAVAILABLE and len(lines) == 1 and 'store' in lines[0] and 'unreachable' in lines[0],
         'unreachable store: exit 69, one line saying so (%.1f s)' % took) or show(h, r)
    h.ok(SECRET not in r.stdout + r.stderr and '***' in r.stderr, 'the store password is not shown')


def main(h):
    e = None
    for kind in h.store_kinds():
        m = h.start_store(kind)
        hs = h.for_store(m)          # points labelled [<store>], a tmp of the store's own
        check_cli_errors(hs, m)
        Scenario(hs, m, 'mongo').run()
        e = e or h.start_etcd()
        Scenario(hs, m, 'etcd', e).run()
        m.stop()


harness.Harness().main(main)
