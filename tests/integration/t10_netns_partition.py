#!/usr/bin/env python3
"""t10: a network partition between real hosts (issue 7).

The test builds its own small network: a bridge in the root namespace holding
the service address (10.X.Y.1) on which the store and etcd listen, and one
network namespace per replica (a, b, c), each joined to the bridge by a veth
pair (10.X.Y.11-13).  Everything is created by the test and removed at exit,
even on failure or SIGTERM (stale leftovers of a killed run are removed at
start).

For each coordination backend (etcd, then mongo), three replicas drain in
partitioned mode (8 partitions) while a producer keeps inserting.  The replica
holding the leader lease (so it holds leader, member and partition leases) is
cut off by DROP rules inside its namespace (packets to and from the service
address vanish, as in a real partition: no reset, no error, only timeouts).
Checks:

  - it stops before its leases can expire at the others: its log shows
    lease_renew_failed, then lease_lost; no other replica takes any of its
    partitions (or leadership) before that lease's own deadline, after which
    the cut replica refuses to write: its last renewal (seen landing, for mongo
    leases; at the latest the cut) + coord.renew_deadline_ms (docs/DESIGN.md,
    "The safety rule");
  - the others take over all of its partitions and leadership;
  - the dispatch trace shows no dispatch by the cut replica under its old
    epoch after another replica dispatched in that partition, and per
    partition the epochs never go backwards; a monitor sampling the store
    every 0.25 s reports (as figures, not failures) any new claim record or
    delta of an epoch older than one already seen in its partition: a request
    the cut replica sent before its deadline can wait in its kernel's
    retransmission queue and reach the store when the link returns, so such a
    deposed write must be harmless, which the final checks verify (nothing
    left in tdrain_claims, derived state exact);
  - when the link returns it rejoins cleanly: it acquires a balanced share
    of partitions again under new (higher) epochs and drains in them;
  - at the end the checker finds derived state exact, the FIFO and
    tdrain_claims empty; every replica exits 0 on SIGTERM.

Then three deterministic "delayed delivery" scenarios (mongo leases, two
replicas, one of them talking to the store through a proxy that models what a
kernel does with a partitioned host's requests: it does not lose them, it
delivers them when the link returns).  The proxy holds one chosen request and
everything after it, lets the replica's leases expire and the other replica
take over, lets new connections through again (the replica rejoins), and only
then delivers the held requests:
  delayed-claim  a claim record insert, landing after the rejoined replica's
                 orphan recovery of that partition: it must not stay in
                 tdrain_claims for good;
  delayed-fold   the leader's first apply statement of a fold round (on FerretDB
                 delete_many of event_counters by _id; on DocumentDB the first
                 fenced replace_one upsert of an image), landing after the new
                 leader redid the round and folded more: derived state exact;
  delayed-state  the leader's update advancing tdrain_state.fold, landing after
                 the new leader advanced it further: the fold sequence never
                 goes backwards.

Everything runs on each store of h.store_kinds() (FerretDB, SQLite backend, and DocumentDB
by default, TDRAIN_TEST_STORES), with an etcd of its own per store.
If network namespaces cannot be created here, the test skips with the reason.
Prints "# FIGURES ..." lines that tests/fault_suite.sh sums up.
Environment: T10_BACKENDS (default "etcd,mongo,delayed-claim,delayed-fold,
delayed-state"), T10_EVENTS (default 600 initial + 1200 during each run).
"""
import atexit
import base64
import collections
import json
import os
import random
import re
import struct
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
import harness  # noqa: E402
from harness import EpochWatch, balanced, shares  # noqa: E402
import checker  # noqa: E402

P = 8
NAMES = ('n1', 'n2', 'n3')   # balanced shares: 3, 3 and 2 of the 8 partitions
TTL_MS, DEADLINE_MS, RETRY_MS, TIMEOUT_MS = 6000, 4500, 500, 2000
N0 = int(os.environ.get('T10_EVENTS', '600'))


def figures(h, scenario, **kv):
    h.diag('FIGURES scenario=%s %s' % (scenario, ' '.join('%s=%s' % (k, v) for k, v in kv.items())))


def b64(s):
    return base64.b64encode(s.encode()).decode()


# ------------------------------------------------------------------ the network

def sh(argv, check=True):
    r = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       timeout=30)
    if check and r.returncode != 0:
        raise RuntimeError('%s: exit %d: %s' % (' '.join(argv), r.returncode, r.stderr.strip()))
    return r


def pid_alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def remove_stale():
    """Namespaces and bridges a killed earlier run of this test left behind."""
    r = sh(['ip', 'netns', 'list'], check=False)
    for line in r.stdout.splitlines():
        mm = re.match(r'^(t10-(\d+)-\w+)', line.strip())
        if mm and not pid_alive(int(mm.group(2))):
            sh(['ip', 'netns', 'del', mm.group(1)], check=False)
    r = sh(['ip', '-o', 'link', 'show'], check=False)
    for line in r.stdout.splitlines():
        mm = re.match(r'^\d+:\s+(t10(?:br|v)(\d+)(?:x\d+)?)[@:]', line)
        if mm and not pid_alive(int(mm.group(2))):
            sh(['ip', 'link', 'del', mm.group(1)], check=False)


class Net:
    """A bridge with the service address, and one namespace per host."""

    def __init__(self):
        self.pid = os.getpid()
        self.bridge = 't10br%d' % self.pid
        self.hosts = {}          # name -> (netns, host-side veth, address)
        self.cut_rules = {}
        self.up = False
        used = sh(['ip', '-4', '-o', 'addr', 'show'], check=False).stdout
        rng = random.SystemRandom()
        for _ in range(100):
            net = '10.%d.%d' % (rng.randrange(200, 250), rng.randrange(0, 256))
            if (' %s.' % net) not in used:
                break
        self.net = net
        self.svc = net + '.1'

    def setup(self):
        self.up = True
        sh(['ip', 'link', 'add', self.bridge, 'type', 'bridge'])
        sh(['ip', 'addr', 'add', self.svc + '/24', 'dev', self.bridge])
        sh(['ip', 'link', 'set', self.bridge, 'up'])

    def add_host(self, name, idx):
        ns = 't10-%d-%s' % (self.pid, name)
        veth = 't10v%dx%d' % (self.pid, idx)
        addr = '%s.%d' % (self.net, 10 + idx)
        self.hosts[name] = (ns, veth, addr)
        sh(['ip', 'netns', 'add', ns])
        sh(['ip', 'link', 'add', veth, 'type', 'veth', 'peer', 'name', 'eth0', 'netns', ns])
        sh(['ip', 'link', 'set', veth, 'master', self.bridge])
        sh(['ip', 'link', 'set', veth, 'up'])
        sh(['ip', '-n', ns, 'addr', 'add', addr + '/24', 'dev', 'eth0'])
        sh(['ip', '-n', ns, 'link', 'set', 'eth0', 'up'])
        sh(['ip', '-n', ns, 'link', 'set', 'lo', 'up'])
        return ns

    def reachable(self, name, port):
        ns = self.hosts[name][0]
        code = ('import socket,sys\ntry:\n socket.create_connection((%r,%d),timeout=2).close()\nexcept OSError:\n'
                ' sys.exit(1)\n' % (self.svc, port))
        return sh(['ip', 'netns', 'exec', ns, '/usr/bin/python3', '-c', code], check=False).returncode == 0

    def cut(self, name):
        ns = self.hosts[name][0]
        rules = [['OUTPUT', '-d', self.svc, '-j', 'DROP'], ['INPUT', '-s', self.svc, '-j', 'DROP']]
        for r in rules:
            sh(['ip', 'netns', 'exec', ns, 'iptables', '-I'] + r)
        self.cut_rules[name] = rules

    def heal(self, name):
        ns = self.hosts[name][0]
        for r in self.cut_rules.pop(name, []):
            sh(['ip', 'netns', 'exec', ns, 'iptables', '-D'] + r, check=False)

    def teardown(self):
        if not self.up:
            return
        self.up = False
        for name, (ns, veth, _) in self.hosts.items():
            sh(['ip', 'netns', 'del', ns], check=False)
            sh(['ip', 'link', 'del', veth], check=False)
        sh(['ip', 'link', 'del', self.bridge], check=False)


# ------------------------------------------------------------------ servers on the service address

class SvcStore(harness.Store):
    """FerretDB listening on the bridge's service address instead of 127.0.0.1."""

    def __init__(self, h, name, host):
        self.host = host
        super().__init__(h, name)

    @property
    def uri(self):
        return 'mongodb://%s:%d/' % (self.host, self.port)

    def _argv(self):
        return [a.replace('--listen-addr=127.0.0.1:', '--listen-addr=%s:' % self.host) for a in super()._argv()]

    def _ready(self):
        if not harness._tcp_open(self.port, host=self.host):
            return False
        return self.client().admin.command('ping').get('ok') == 1


class SvcDocumentDB(harness.DocumentDB):
    """DocumentDB whose gateway the replica namespaces reach on the bridge's service address.

    The gateway binds either 127.0.0.1 or every address ([::], UseLocalHost false): it listens on every
    address for the length of the test (password authentication as always), and clients use the service
    address."""

    def __init__(self, h, name, host):
        self.host = host
        super().__init__(h, name)
        with open(self.config) as f:
            cfg = json.load(f)
        cfg['UseLocalHost'] = False
        with open(self.config, 'w') as f:
            json.dump(cfg, f, indent=2)

    @property
    def uri(self):
        return self.uri_via(self.port, self.host)

    def _ready(self):
        if not harness._tcp_open(self.port, host=self.host):
            return False
        return self.client().admin.command('ping').get('ok') == 1


def start_svc_store(h, kind, host):
    """The store of the given kind (h.store_kinds()) on the service address."""
    if kind in ('ferretdb', 'ferretdb-sqlite'):
        return h._start_with_retry(lambda: SvcStore(h, h._next('ferretdb'), host))
    if kind == 'documentdb':
        return h._start_with_retry(lambda: SvcDocumentDB(h, h._next('documentdb'), host))
    raise ValueError('t10 runs on ferretdb (SQLite backend) and documentdb, not %r' % kind)


class SvcEtcd(harness.Etcd):
    """etcd whose client URL is on the service address (peer URL stays on loopback)."""

    def __init__(self, h, name, host):
        self.host = host
        super().__init__(h, name)

    @property
    def endpoint(self):
        return 'http://%s:%d' % (self.host, self.port)

    def _argv(self):
        c = self.endpoint
        p = 'http://127.0.0.1:%d' % self.peer_port
        return [self.binary, '--name', 'default', '--data-dir', self.dir,
                '--listen-client-urls', c, '--advertise-client-urls', c,
                '--listen-peer-urls', p, '--initial-advertise-peer-urls', p,
                '--initial-cluster', 'default=' + p, '--initial-cluster-state', 'new']


# ------------------------------------------------------------------ log watcher

class LogWatch:
    """Timestamps (monotonic) every line the replicas log, as it appears."""

    def __init__(self):
        self.files = {}      # name -> path
        self.off = {}
        self.lines = []      # (t, name, line)
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def add(self, name, path):
        with self.lock:
            self.files[name] = path
            self.off.setdefault(name, 0)

    def _run(self):
        while not self.stop.wait(0.05):
            self.poll()

    def poll(self):
        with self.lock:
            items = list(self.files.items())
        now = time.monotonic()
        for name, path in items:
            try:
                with open(path, 'rb') as f:
                    f.seek(self.off[name])
                    data = f.read()
            except OSError:
                continue
            end = data.rfind(b'\n')
            if end < 0:
                continue
            chunk = data[:end + 1]
            with self.lock:
                self.off[name] += len(chunk)
                for line in chunk.decode('utf-8', 'replace').splitlines():
                    self.lines.append((now, name, line))

    def find(self, name=None, pattern=None, after=0.0):
        with self.lock:
            return [(t, n, l) for t, n, l in self.lines
                    if t >= after and (name is None or n == name) and (pattern is None or re.search(pattern, l))]


# ------------------------------------------------------------------ one run

class Run:
    def __init__(self, h, net, m, e, backend):
        self.h, self.net, self.m, self.e, self.backend = h, net, m, e, backend
        self.dbname = 't10_' + backend
        self.db = m.db(self.dbname)
        self.prefix = '/t10-%s/' % backend
        self.trace = os.path.join(h.tmp, 'trace-' + backend)
        self.files = []
        self.procs = {}
        self.watch = LogWatch()
        self.epochs = EpochWatch()
        self.monitor_findings = self.epochs.late_writes
        self.monitor_samples = 0
        self.member_resurrected = 0
        self._stop = threading.Event()

    def conf(self, name):
        c = {
            'store.uri': self.m.uri,
            'store.database': self.dbname,
            'coord.backend': self.backend,
            'coord.mode': 'partitioned',
            'coord.partitions': P,
            'coord.lease_ttl_ms': TTL_MS,
            'coord.renew_deadline_ms': DEADLINE_MS,
            'coord.retry_period_ms': RETRY_MS,
            'store.timeout_ms': TIMEOUT_MS,
            'drain.batch_size': 200,
            'fold.interval_ms': 100,
            'test.trace_file': self.trace,
        }
        if self.backend == 'etcd':
            c['coord.etcd_endpoint'] = self.e.endpoint
            c['coord.etcd_prefix'] = self.prefix
        return c

    def start(self, name):
        h = self.h
        pname = '%s-%s' % (self.backend, name)
        conf = os.path.join(h.tmp, pname + '.conf')
        with open(conf, 'w') as f:
            f.write(h.config_text(self.conf(name)))
        ns = self.net.hosts[name][0]
        argv = ['ip', 'netns', 'exec', ns, h.tool('tdrain'), '-c', conf, '-N', name]
        p = harness.Proc(h, pname, conf, argv, h._environ(None))
        p.start()
        self.procs[name] = p
        self.watch.add(name, p.log)
        return p

    def loadgen(self, count, seed, extra=()):
        f = os.path.join(self.h.tmp, '%s-%d.ndjson' % (self.backend, len(self.files)))
        self.files.append(f)
        return self.h.run([self.h.tool('tdrain-loadgen'), '--uri', self.m.uri, '--db', self.dbname, '--count',
                           str(count), '--devices', '200', '--users', '80', '--dup-ratio', '0.02', '--seed', str(seed),
                           '--ndjson', f, '--quiet'] + list(extra), timeout=600)

    # -------------------------------------------------------------- leases, read straight from the backend
    def leases(self):
        """{lease name: (holder, epoch)} of live leases."""
        out = {}
        if self.backend == 'mongo':
            latest = {}
            for d in harness.lease_docs(self.db, {}):
                if d['name'] not in latest or d['epoch'] > latest[d['name']]['epoch']:
                    latest[d['name']] = d
            for name, d in latest.items():
                if not d.get('released'):
                    out[name] = (d.get('holder'), int(d['epoch']))
        else:
            pre = self.prefix + 'lease/'
            r = self.e.post('/v3/kv/range', {'key': b64(pre), 'range_end': b64(pre[:-1] + '0')})
            for kv in r.get('kvs', []):
                k = base64.b64decode(kv['key']).decode()[len(pre):]
                v = json.loads(base64.b64decode(kv['value']).decode())
                out[k] = (v.get('holder'), int(kv['create_revision']))
        return out

    def part_owners(self):
        return {int(k.split('/')[1]): v for k, v in self.leases().items() if k.startswith('part/')}

    def converged(self, members):
        """Every partition held by one of members, floor/ceil shares (docs/DESIGN.md, "Who owns what")."""
        return balanced({p: v[0] for p, v in self.part_owners().items()}, members, P)

    # -------------------------------------------------------------- store monitor (as in t09)
    def _monitor(self):
        client = self.m.client(serverSelectionTimeoutMS=3000)
        db = client[self.dbname]
        try:
            while not self._stop.wait(0.25):
                try:
                    docs, _ = EpochWatch.read(db, state=False)
                except Exception:
                    continue
                self.monitor_samples += 1
                self.epochs.feed(docs)
        finally:
            client.close()

    # -------------------------------------------------------------- the scenario
    def run(self):
        h, net, label = self.h, self.net, self.backend
        t_start = time.monotonic()
        r = self.loadgen(N0, 101)
        h.ok(r.returncode == 0, '[%s] initial backlog of %d events inserted' % (label, N0))
        # The first replica started takes the leader lease: it is the one cut off later,
        # so that it holds leader, member and partition leases at once.
        self.start(NAMES[-1])
        h.wait_until(lambda: self.leases().get('leader', (None,))[0] == NAMES[-1], 15, interval=0.2)
        for n in NAMES[:-1]:
            self.start(n)
        mon = threading.Thread(target=self._monitor, daemon=True)
        mon.start()
        ok = h.wait_until(lambda: self.converged(NAMES), 40, interval=0.25, desc='[%s] convergence' % label)
        h.ok(ok, '[%s] three replicas in three namespaces: every partition held, balanced shares %s'
             % (label, shares({p: v[0] for p, v in self.part_owners().items()}, NAMES)))

        # Mongo leases: when each renewal was seen (seq changed), to bound each holder's deadline.
        renewed = {}
        attached = {}   # (lease, epoch) -> (session lease, session epoch): renewed only through its session
        stop_obs = threading.Event()

        def observe_renewals():
            client = self.m.client(serverSelectionTimeoutMS=3000)
            try:
                while not stop_obs.wait(0.05):
                    try:
                        docs = harness.lease_docs(client[self.dbname], {}, {'name': 1, 'epoch': 1, 'seq': 1,
                                                                           'sess': 1, 'sess_epoch': 1})
                    except Exception:
                        continue
                    now = time.monotonic()
                    for d in docs:
                        k = (d.get('name'), d.get('epoch'))
                        if d.get('sess'):
                            attached[k] = (d['sess'], d.get('sess_epoch'))
                        if renewed.get(k, (None,))[0] != d.get('seq'):
                            renewed[k] = (d.get('seq'), now)
            finally:
                client.close()
        obs = None
        if self.backend == 'mongo':
            obs = threading.Thread(target=observe_renewals, daemon=True)
            obs.start()

        # A producer keeps inserting through the partition (from the root namespace).
        prod = {}
        producer = threading.Thread(target=lambda: prod.setdefault(
            'r', self.loadgen(2 * N0, 102, ['--rate', '40', '--partitions', str(P)])), daemon=True)
        producer.start()
        time.sleep(3)

        leases = self.leases()
        victim = leases.get('leader', (None, 0))[0]
        nparts = collections.Counter(v[0] for k, v in leases.items() if k.startswith('part/'))
        if nparts.get(victim, 0) == 0 and nparts:
            victim = nparts.most_common(1)[0][0]
        h.ok(victim in NAMES, '[%s] the replica to cut off: %s (leader: %s)'
             % (label, victim, leases.get('leader', (None,))[0]))
        if victim not in NAMES:
            return
        others = [n for n in NAMES if n != victim]
        held_before = {k: v for k, v in leases.items() if v[0] == victim}
        parts_before = {int(k.split('/')[1]): v[1] for k, v in held_before.items() if k.startswith('part/')}
        h.diag('[%s] cutting %s off; it holds %s' % (label, victim, sorted(
            '%s@%d' % (k, v[1]) for k, v in held_before.items())))
        h.ok(len(parts_before) > 0, '[%s] %s holds %d partitions%s' % (
            label, victim, len(parts_before), ' and the leader lease' if 'leader' in held_before else ''))
        trace_mark = os.path.getsize(self.trace) if os.path.exists(self.trace) else 0
        net.cut(victim)
        t_cut = time.monotonic()
        h.ok(not net.reachable(victim, self.m.port), '[%s] %s cannot reach the store any more' % (label, victim))

        # The others take over every partition of the victim, and leadership.
        taken = {}

        def took_over():
            cur = self.leases()
            for p, ep in parts_before.items():
                o = cur.get('part/%d' % p)
                if p not in taken and o and o[0] != victim and o[1] > ep:
                    taken[p] = (time.monotonic(), o[0], o[1])
            lead = cur.get('leader')
            if 'leader' in held_before and 'leader' not in taken and lead and lead[0] != victim:
                taken['leader'] = (time.monotonic(), lead[0], lead[1])
            return len(taken) == len(parts_before) + ('leader' in held_before)
        ok = h.wait_until(took_over, TTL_MS / 1000.0 + 15, interval=0.05, desc='[%s] takeover' % label)
        h.ok(ok, '[%s] the others took over all %d partitions (and leadership if it held it): %s' % (
            label, len(parts_before), ', '.join('%s->%s@%d after %.2f s' % (k, v[1], v[2], v[0] - t_cut)
                                                for k, v in sorted(taken.items(), key=str))))
        # The lease store was polled every 50 ms (plus the read itself): take the earliest it can have been.
        earliest = min((v[0] for v in taken.values()), default=t_cut) - 0.1
        self.first_takeover = earliest - t_cut
        # The cut replica stops writing under a lease at (its last successful renewal SENT) +
        # renew_deadline.  That renewal was sent no later than we saw it land (mongo: seq
        # changed), and in any case before the cut: so each takeover must come after
        # min(seen, cut) + renew_deadline.
        if obs is not None:
            stop_obs.set()
            obs.join(5)
        margins = {}
        for k, v in taken.items():
            name = k if k == 'leader' else 'part/%d' % k
            key = (name, held_before[name][1])
            # An attached lease's holder stops at its session's last renewal + deadline (docs/DESIGN.md).
            seen = renewed.get(attached.get(key, key), (None, t_cut))[1]
            margins[name] = (v[0] - 0.1) - (min(seen, t_cut) + DEADLINE_MS / 1000.0)
        worst = min(margins.items(), key=lambda x: x[1]) if margins else ('-', 0.0)
        h.ok(margins and worst[1] >= 0,
             '[%s] no takeover before the cut replica\'s own deadline for that lease (smallest margin %.2f s, '
             '%s; first takeover %.2f s after the cut)' % (label, worst[1], worst[0], earliest - t_cut))
        conv = h.wait_until(lambda: self.converged(others), 20, interval=0.25)
        h.ok(conv, '[%s] ownership converged on the two survivors' % label)

        # The victim notices: renew failures, then lost leases (deadline passed or superseded).
        got = h.wait_until(lambda: self.watch.find(victim, r'lease_lost', t_cut), 30, interval=0.2,
                           desc='[%s] lease_lost in %s log' % (label, victim))
        rf = self.watch.find(victim, r'lease_renew_failed', t_cut)
        ll = self.watch.find(victim, r'lease_lost', t_cut)
        h.ok(got and rf and rf[0][0] <= ll[0][0],
             '[%s] %s logged lease_renew_failed (after %.2f s) then lease_lost (after %.2f s)'
             % (label, victim, (rf[0][0] - t_cut) if rf else -1, (ll[0][0] - t_cut) if ll else -1))
        self.lost_after = (ll[0][0] - t_cut) if ll else -1

        # Keep it cut a little longer: its retries must not get through.
        time.sleep(3)
        t_heal = time.monotonic()
        net.heal(victim)
        h.ok(net.reachable(victim, self.m.port), '[%s] link restored after %.1f s' % (label, t_heal - t_cut))
        ok = h.wait_until(lambda: self.converged(NAMES), 40, interval=0.25, desc='[%s] rejoin' % label)
        h.ok(ok, '[%s] %s rejoined: balanced shares over the three again %s (%.1f s after the link returned)'
             % (label, victim, shares({p: v[0] for p, v in self.part_owners().items()}, NAMES),
                time.monotonic() - t_heal))
        after = self.part_owners()
        mine = {p: v[1] for p, v in after.items() if v[0] == victim}
        h.ok(mine and all(ep > parts_before.get(p, 0) and ep > taken.get(p, (0, 0, 0))[2]
                          for p, ep in mine.items()),
             '[%s] %s holds %s again under new epochs %s (before the cut: %s)'
             % (label, victim, sorted(mine), mine, parts_before))
        # Every lease it held ended in its own log: lost (deadline passed) or revoked (superseded, fenced).
        self.watch.poll()
        timeline = self.watch.find(victim, r'lease_renew_failed|lease_lost|partition_revoked|renewed again|'
                                   r'partition_assigned|lease_acquired', t_cut)
        for t, n, l in timeline[:30]:
            h.diag('  %+6.2f s %s: %s' % (t - t_cut, n, re.sub(r' event=.*', '', l)[:200]))
        def ended(k, ep):
            return any(re.search(r'\b%s (lease_lost|partition_revoked) epoch %d\b' % (re.escape(k), ep), l)
                       for _, _, l in timeline)
        # The leases that allow writing (leader, partitions) were taken over, so each must end in its log.
        missing = [k for k, v in held_before.items() if k != 'member/' + victim and not ended(k, v[1])]
        h.ok(not missing, '[%s] %s logged the end (lease_lost or partition_revoked) of its leader and partition '
             'leases %s' % (label, victim, missing))
        # Nobody takes over a member lease: if its first renewal after the deadline is sent once the
        # link is back, it succeeds and the lease lives on (see the report of tests/fault_suite.sh).
        if not ended('member/' + victim, held_before['member/' + victim][1]):
            self.member_resurrected = 1
            h.diag('[%s] member/%s epoch %d was renewed after its deadline had passed (no lease_lost logged)'
                   % (label, victim, held_before['member/' + victim][1]))
        reacq = self.watch.find(victim, r'partition_assigned', t_heal)
        h.ok(len(reacq) >= len(mine), '[%s] %s logged partition_assigned for them after the link returned (%d)'
             % (label, victim, len(reacq)))

        producer.join(300)
        h.ok(prod.get('r') is not None and prod['r'].returncode == 0,
             '[%s] the producer inserted %d more events during the partition' % (label, 2 * N0))
        db = self.db
        ok = h.wait_until(lambda: db.events.count_documents({}) == 0 and db.tdrain_deltas.count_documents({}) == 0,
                          400, interval=0.5, desc='[%s] final drain' % label)
        h.ok(ok, '[%s] the FIFO drained and every delta was folded, %.1f s after the start'
             % (label, time.monotonic() - t_start))
        # Claim records: all acknowledged or recovered.  A leftover one means a claim
        # record of a deposed epoch that no recovery will ever look at again.
        ok = h.wait_until(lambda: db.tdrain_claims.count_documents({}) == 0, 3 * TTL_MS / 1000.0, interval=0.5)
        left = list(db.tdrain_claims.find({}, {'ids': 0}))
        for d in left[:5]:
            h.diag('  claim record left: %s' % d)
        h.ok(ok, '[%s] tdrain_claims empty (%d left)' % (label, len(left)))
        self._stop.set()
        mon.join(5)

        # The trace: no dispatch by the victim under an old epoch after another replica dispatched there.
        lines = [l.rstrip('\n').split('\t') for l in open(self.trace) if l.strip()]
        first_other = {}
        late = []
        for i, l in enumerate(lines):
            part, ep, who = int(l[3]), int(l[4]), l[2]
            if part in parts_before:
                if who != victim and ep > parts_before[part]:
                    first_other.setdefault(part, i)
                elif who == victim and ep <= parts_before[part] and part in first_other:
                    late.append('line %d: %s dispatched %s in partition %d under epoch %d after %s dispatched '
                                'there (line %d)' % (i + 1, who, l[0], part, ep, lines[first_other[part]][2],
                                                     first_other[part] + 1))
        for x in late[:5]:
            h.diag('  ' + x)
        h.is_(len(late), 0, '[%s] no dispatch by %s under its old epoch after the others took over' % (label, victim))
        back = []
        hi = {}
        for i, l in enumerate(lines):
            part, ep = l[3], int(l[4])
            if ep < hi.get(part, 0):
                back.append('line %d: %s partition %s epoch %d after %d' % (i + 1, l[2], part, ep, hi[part]))
            hi[part] = max(hi.get(part, 0), ep)
        for x in back[:5]:
            h.diag('  ' + x)
        h.is_(len(back), 0, '[%s] per partition, dispatch epochs never go backwards' % label)
        owners = collections.defaultdict(set)
        for l in lines:
            owners[(l[3], l[4])].add(l[2])
        double = {k: sorted(v) for k, v in owners.items() if len(v) > 1}
        h.ok(not double, '[%s] no (partition, epoch) dispatched by two replicas %s' % (label, list(double.items())[:3]))
        victim_after = [l for l in lines[self._line_index(trace_mark):] if l[2] == victim]
        h.ok(any(int(l[3]) in mine for l in victim_after),
             '[%s] %s drained in its partitions again after rejoining (%d dispatches)'
             % (label, victim, len(victim_after)))
        # Reported, not failed on: a request the cut replica sent before its deadline can sit in its
        # kernel's retransmission queue and reach the store when the link returns (docs/DESIGN.md
        # says such deposed writes must be harmless); what it must not do is leave anything behind
        # or change derived state, which the checks above and below verify.
        for x in self.monitor_findings[:5]:
            h.diag('  monitor: late write of a deposed epoch: ' + x)
        h.diag('[%s] store monitor: %d samples, %d late writes under a deposed epoch observed'
               % (label, self.monitor_samples, len(self.monitor_findings)))

        n, ex, mism = checker.check_full(self.m.uri, self.dbname, self.files)
        for x in mism[:15]:
            h.diag('  ' + str(x))
        h.ok(n > 0 and not mism, '[%s] checker: derived state exact (%d derived documents, %d mismatches)'
             % (label, ex.n_derived(), len(mism)))
        want = set()
        for path in self.files:
            for doc, size in checker.read_ndjson(path):
                reason, ev = checker.classify(doc, size)
                if reason is None:
                    want.add(ev[0])
        ledger = set(d['_id'] for d in self.db.tdrain_ledger.find({}, {'_id': 1}))
        lost = len(want - ledger) + self.db.events.count_documents({})
        h.is_(lost, 0, '[%s] no event lost' % label)
        for name, p in self.procs.items():
            h.is_(p.stop(), 0, '[%s] %s exits 0 on SIGTERM' % (label, name))
        self.watch.stop.set()
        figures(h, 't10-' + label, trials=1, events=ex.events, lost=lost, mismatches=len(mism),
                double_owners=len(double), deposed_writes=len(late) + len(back),
                derived=ex.n_derived(), late_deposed_writes=len(self.monitor_findings),
                renewed_after_deadline=self.member_resurrected, lease_lost_logged_after_s='%.2f' % self.lost_after,
                first_takeover_after_s='%.2f' % (self.first_takeover - 0.0))

    def _line_index(self, byte_mark):
        """Index of the first trace line at or after byte offset byte_mark."""
        n = 0
        with open(self.trace, 'rb') as f:
            data = f.read(byte_mark)
        n = data.count(b'\n')
        return n


# ------------------------------------------------------------------ delayed delivery (a deterministic variant)

class DelayProxy:
    """A TCP proxy to the store for one replica, modelling what a kernel does with the
    requests of a partitioned host: they are not lost, only delayed.

    armed: the first `insert` into tdrain_claims is not forwarded, and from then on
    nothing of any existing connection is (held, in order, with the upstream socket
    kept open, as a kernel keeps retransmitting an orphaned socket's data);
    heal_new(): connections opened from now on pass again;
    release(): deliver every held request in order, as the retransmissions do when
    the link returns, reading and discarding the replies.
    """

    def __init__(self, target_host, target_port):
        import socket as _socket
        self.target = (target_host, target_port)
        self.lock = threading.Lock()
        self.armed = False
        self.blackhole = False
        self.healed = False
        self.held_claim_id = None
        self.held = threading.Event()
        self.conns = []
        self.port = harness.free_port()
        self.ls = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
        self.ls.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
        self.ls.bind(('127.0.0.1', self.port))
        self.ls.listen(64)
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def uri(self):
        return self._uri or 'mongodb://127.0.0.1:%d/' % self.port

    @uri.setter
    def uri(self, value):
        self._uri = value

    _uri = None

    def arm(self, command='insert', coll='tdrain_claims'):
        with self.lock:
            self.trigger = (command.encode(), coll.encode())
            self.armed = True

    def heal_new(self):
        with self.lock:
            self.healed = True

    def _accept(self):
        import socket as _socket
        while not self.closed:
            try:
                c, _ = self.ls.accept()
            except OSError:
                return
            try:
                up = _socket.create_connection(self.target, timeout=5)
                up.settimeout(None)
            except OSError:
                c.close()
                continue
            conn = {'c': c, 's': up, 'held': [], 'mode': 'pass', 'buf': b''}
            with self.lock:
                if self.blackhole and not self.healed:
                    conn['mode'] = 'held'
                self.conns.append(conn)
            threading.Thread(target=self._pump, args=(conn,), daemon=True).start()

    def _trigger_id(self, msg):
        """None unless msg is the armed command on the armed collection; then the first
        "<part>:<epoch>:<seq>" _id it carries (a claim record), or the command."""
        import struct as _struct
        if len(msg) < 32 or _struct.unpack('<i', msg[12:16])[0] != 2013 or msg[20] != 0:
            return None
        cmd, coll = self.trigger
        body = msg[21:21 + 96]
        want = b'\x02' + cmd + b'\x00'
        if body[4:4 + len(want)] != want or \
                body[4 + len(want) + 4:4 + len(want) + 4 + len(coll) + 1] != coll + b'\x00':
            return None
        mm = re.search(rb'\x02_id\x00.{4}(-?\d+:\d+:\d+)\x00', msg, re.S)
        return mm.group(1).decode() if mm else '%s %s' % (cmd.decode(), coll.decode())

    def _pump(self, conn):
        import selectors
        import struct as _struct
        c, up = conn['c'], conn['s']
        sel = selectors.DefaultSelector()
        sel.register(c, selectors.EVENT_READ, 'c')
        sel.register(up, selectors.EVENT_READ, 's')
        try:
            while True:
                for key, _ in sel.select():
                    if key.data == 's':
                        data = up.recv(65536)
                        if not data:
                            raise EOFError
                        c.sendall(data)
                        continue
                    data = c.recv(65536)
                    if not data:
                        raise EOFError
                    conn['buf'] += data
                    while len(conn['buf']) >= 4:
                        n = _struct.unpack('<i', conn['buf'][:4])[0]
                        if len(conn['buf']) < n:
                            break
                        msg, conn['buf'] = conn['buf'][:n], conn['buf'][n:]
                        with self.lock:
                            if conn['mode'] == 'pass' and self.armed:
                                cid = self._trigger_id(msg)
                                if cid is not None:
                                    self.armed = False
                                    self.blackhole = True
                                    self.held_claim_id = cid
                                    for other in self.conns:
                                        other['mode'] = 'held'
                                    self.held.set()
                            mode = conn['mode']
                        if mode == 'held':
                            conn['held'].append(msg)
                            try:
                                sel.unregister(up)   # nothing comes back for held requests
                            except (KeyError, ValueError):
                                pass
                        else:
                            up.sendall(msg)
        except (EOFError, OSError):
            pass
        sel.close()
        try:
            c.close()
        except OSError:
            pass
        if conn['mode'] != 'held':
            try:
                up.close()
            except OSError:
                pass

    @staticmethod
    def describe(msg):
        """'<command> <collection>' of an OP_MSG request, for diagnostics."""
        if len(msg) >= 16 and struct.unpack('<i', msg[12:16])[0] == 2004:
            return 'OP_QUERY (connection handshake)'
        mm = re.match(rb'([\x01-\x13])([A-Za-z]+)\x00', msg[25:25 + 64], re.S)
        if not mm:
            return '?'
        out = mm.group(2).decode()
        if mm.group(1) == b'\x02':
            v = re.match(rb'.{4}([^\x00]*)\x00', msg[25 + mm.end():25 + mm.end() + 80], re.S)
            out += ' ' + (v.group(1).decode('utf-8', 'replace') if v else '')
        return out

    def held_summary(self):
        with self.lock:
            return [self.describe(m) for x in self.conns if x['mode'] == 'held' for m in x['held']]

    def release(self):
        """Deliver the held requests; returns how many the store answered."""
        import struct as _struct
        with self.lock:
            held = [x for x in self.conns if x['mode'] == 'held' and x['held']]
            self.blackhole = False
        answered = 0
        for conn in held:
            up = conn['s']
            up.settimeout(10)
            try:
                for msg in conn['held']:
                    up.sendall(msg)
                    hdr = b''
                    while len(hdr) < 4:
                        chunk = up.recv(4 - len(hdr))
                        if not chunk:
                            raise OSError('closed')
                        hdr += chunk
                    n = _struct.unpack('<i', hdr)[0] - 4
                    while n > 0:
                        chunk = up.recv(min(n, 65536))
                        if not chunk:
                            raise OSError('closed')
                        n -= len(chunk)
                    answered += 1
            except OSError:
                pass
            try:
                up.close()
            except OSError:
                pass
            conn['held'] = []
        return answered

    def close(self):
        self.closed = True
        try:
            self.ls.close()
        except OSError:
            pass
        with self.lock:
            conns = list(self.conns)
        for x in conns:
            for k in ('c', 's'):
                try:
                    x[k].close()
                except OSError:
                    pass


def delayed_run(h, net, m, kind):
    """A request a replica sent just before it was cut off reaches the store only after
    the partition returned (delivered by the DelayProxy, deterministically):

    kind 'claim': a claim record insert, after the partition's orphan recovery already
    ran under a newer epoch; it must not stay in tdrain_claims for good;
    kind 'fold': the cut replica is the leader and the request is the first statement
    of a fold round's apply on FerretDB (delete_many of event_counters by _id), landing
    after the new leader redid that round and folded more; derived state must stay exact;
    kind 'state': the leader's update advancing tdrain_state.fold, landing after the new
    leader advanced it further; the fold sequence must never go backwards.
    In every case a sampler checks that tdrain_state.fold.seq never decreases.
    """
    label = 'delayed-' + kind
    dbname = 't10_delayed_' + kind
    db = m.db(dbname)
    X, Y = 'd1', 'd2'   # balanced: 4 partitions each
    nd = os.path.join(h.tmp, dbname + '.ndjson')
    r = h.run([h.tool('tdrain-loadgen'), '--uri', m.uri, '--db', dbname, '--count', '1500', '--devices', '200',
               '--users', '80', '--dup-ratio', '0.02', '--seed', '103', '--ndjson', nd, '--quiet'], timeout=300)
    h.ok(r.returncode == 0, '[%s] 1500 events inserted' % label)
    proxy = DelayProxy(net.svc, m.port)
    proxy.uri = m.uri_via(proxy.port)        # the store's credentials, through the proxy
    trace = os.path.join(h.tmp, 'trace-' + label)

    def conf(uri):
        return {'store.uri': uri, 'store.database': dbname, 'coord.backend': 'mongo', 'coord.mode': 'partitioned',
                'coord.partitions': P, 'coord.lease_ttl_ms': TTL_MS, 'coord.renew_deadline_ms': DEADLINE_MS,
                'coord.retry_period_ms': RETRY_MS, 'store.timeout_ms': TIMEOUT_MS, 'drain.batch_size': 100,
                'fold.interval_ms': 100, 'test.trace_file': trace}

    def owners():
        latest = {}
        for d in harness.lease_docs(db, {}):
            if d['name'] not in latest or d['epoch'] > latest[d['name']]['epoch']:
                latest[d['name']] = d
        return {k: (d['holder'], int(d['epoch'])) for k, d in latest.items() if not d.get('released')}

    def parts():
        return {int(k.split('/')[1]): v for k, v in owners().items() if k.startswith('part/')}

    procs = {}
    watch = LogWatch()
    backwards = []
    stop = threading.Event()
    more = []   # NDJSON files of the events inserted after the first 1500

    def load_more(count, seed):
        path = os.path.join(h.tmp, '%s-more-%d.ndjson' % (dbname, seed))
        r = h.run([h.tool('tdrain-loadgen'), '--uri', m.uri, '--db', dbname, '--count', count, '--devices', '200',
                   '--users', '80', '--dup-ratio', '0.02', '--seed', seed, '--ndjson', path, '--quiet'], timeout=300)
        h.ok(r.returncode == 0, '[%s] %d more events inserted' % (label, count))
        return path

    def sample_state():
        client = m.client(serverSelectionTimeoutMS=3000)
        last = 0
        try:
            while not stop.wait(0.1):
                try:
                    st = client[dbname].tdrain_state.find_one({'_id': 'fold'}) or {}
                except Exception:
                    continue
                seq = st.get('seq', 0)
                if seq < last:
                    backwards.append('fold state seq went back from %d to %d (holder %s, epoch %s)'
                                     % (last, seq, st.get('holder'), st.get('epoch')))
                last = seq
        finally:
            client.close()
    sampler = threading.Thread(target=sample_state, daemon=True)
    sampler.start()
    try:
        # Whoever starts first takes the leader lease: X for the fold case, Y otherwise.
        first, second = (X, Y) if kind in ('fold', 'state') else (Y, X)
        for n in (first, second):
            procs[n] = h.start_tdrain('%s-%s' % (label, n), conf(proxy.uri if n == X else m.uri), args=['-N', n])
            watch.add(n, procs[n].log)
            if n == first:
                h.wait_until(lambda: owners().get('leader', (None,))[0] == first, 15, interval=0.2)
        ok = h.wait_until(lambda: balanced({p: v[0] for p, v in parts().items()}, (X, Y), P), 30, interval=0.25)
        h.ok(ok, '[%s] %s and %s own balanced shares %s; %s leads'
             % (label, X, Y, shares({p: v[0] for p, v in parts().items()}, (X, Y)),
                owners().get('leader', ('?',))[0]))
        # The fold's first apply statement: FerretDB and DocumentDB delete the round's keys (on DocumentDB
        # fenced by {_f: {$lt: f+1}}), then insert the images; on MongoDB each image is a replace_one upsert
        # fenced by {_id, _f: {$lt: f+1}} (consumers/fold_image.c).
        proxy.arm(*{'claim': ('insert', 'tdrain_claims'),
                    'fold': ('delete' if not m.atomic_updates or m.kind == 'documentdb' else 'update',
                             'event_counters'),
                    'state': ('update', 'tdrain_state')}[kind])
        # Work for the armed request to catch: on DocumentDB the replicas drain and fold the first 1500
        # events before the proxy is armed, and nothing of that kind would be sent again.
        more.append(load_more(1500, 105))
        held = proxy.held.wait(60)
        cid = proxy.held_claim_id
        h.ok(held and cid, '[%s] %s sent %s, which the network holds; nothing of %s gets through from then on'
             % (label, X, cid, X))
        if not (held and cid):
            return
        t_cut = time.monotonic()
        ok = h.wait_until(lambda: all(v[0] == Y for k, v in owners().items() if k != 'member/' + X)
                          and len(parts()) == P, TTL_MS / 1000.0 + 15, interval=0.2)
        h.ok(ok, '[%s] %s took over every partition (and leadership) after %.1f s'
             % (label, Y, time.monotonic() - t_cut))
        if kind == 'claim':
            part, old_epoch = int(cid.split(':')[0]), int(cid.split(':')[1])
            h.ok(db.tdrain_claims.count_documents({'_id': cid}) == 0,
                 '[%s] claim record %s has not reached the store' % (label, cid))
        else:
            seq0 = (db.tdrain_state.find_one({'_id': 'fold'}) or {}).get('seq', 0)
            more.append(load_more(300, 106))    # something for the new leader to fold
            ok = h.wait_until(lambda: (db.tdrain_state.find_one({'_id': 'fold'}) or {}).get('holder') == Y
                              and db.tdrain_state.find_one({'_id': 'fold'}).get('seq', 0) > seq0, 30,
                              interval=0.2)
            st = db.tdrain_state.find_one({'_id': 'fold'}) or {}
            h.ok(ok, '[%s] %s leads and folds now (fold state seq %s by %s)' % (label, Y, st.get('seq'),
                                                                                 st.get('holder')))
        proxy.heal_new()
        t_heal = time.monotonic()
        if kind == 'claim':
            pat = r'partition %d epoch (\d+): .*recovered' % part

            # Sticky shares: partition `part` may stay with Y; whoever holds it under a newer epoch ran
            # its orphan recovery, before the held claim insert lands (below).
            def rejoined():
                return any(int(re.search(pat, l).group(1)) > old_epoch
                           for who in (X, Y) for _, _, l in watch.find(who, pat, t_cut)) \
                    and balanced({p: v[0] for p, v in parts().items()}, (X, Y), P)
            what = 'partition %d was recovered under a newer epoch' % part
        else:
            def rejoined():
                return balanced({p: v[0] for p, v in parts().items()}, (X, Y), P)
            what = 'took back its share (%s keeps leading)' % Y
        ok = h.wait_until(rejoined, 40, interval=0.25)
        h.ok(ok, '[%s] new connections pass again: %s rejoined and %s' % (label, X, what))
        h.diag('[%s] requests of %s held by the network: %s' % (label, X, proxy.held_summary()))
        n = proxy.release()
        h.ok(n > 0, '[%s] the held requests were delivered late (%d answered by the store)' % (label, n))
        landed = True
        if kind == 'claim':
            landed = db.tdrain_claims.find_one({'_id': cid}) is not None
            h.ok(landed, '[%s] the late claim record %s (epoch %d) is now in the store: a deposed write that '
                 'arrived after the recovery of partition %d' % (label, cid, old_epoch, part))
        # More events, so that later rounds fold on top of whatever the late request did.
        nd2 = os.path.join(h.tmp, dbname + '-2.ndjson')
        r = h.run([h.tool('tdrain-loadgen'), '--uri', m.uri, '--db', dbname, '--count', '300', '--devices', '200',
                   '--users', '80', '--seed', '104', '--ndjson', nd2, '--quiet'], timeout=300)
        ok = h.wait_until(lambda: db.events.count_documents({}) == 0 and db.tdrain_deltas.count_documents({}) == 0,
                          300, interval=0.5)
        h.ok(ok and r.returncode == 0, '[%s] the FIFO drained (and 300 more events after the late delivery)' % label)
        gone = h.wait_until(lambda: db.tdrain_claims.count_documents({}) == 0, 3 * TTL_MS / 1000.0, interval=0.5)
        left = [d['_id'] for d in db.tdrain_claims.find({}, {'_id': 1})]
        h.ok(gone, '[%s] no claim record stays in tdrain_claims for good (left after %.0f s: %s)'
             % (label, 3 * TTL_MS / 1000.0, left))
        stop.set()
        sampler.join(5)
        for x in backwards[:5]:
            h.diag('  ' + x)
        h.ok(not backwards, '[%s] tdrain_state.fold.seq never went backwards' % label)
        n_chk, ex, mism = checker.check_full(m.uri, dbname, [nd, nd2] + more)
        for x in mism[:10]:
            h.diag('  ' + str(x))
        h.ok(not mism, '[%s] checker: derived state exact (%d derived documents, %d mismatches)'
             % (label, ex.n_derived(), len(mism)))
        want = set()
        for path in [nd, nd2] + more:
            for doc, size in checker.read_ndjson(path):
                reason, ev = checker.classify(doc, size)
                if reason is None:
                    want.add(ev[0])
        ledger = set(d['_id'] for d in db.tdrain_ledger.find({}, {'_id': 1}))
        lost = len(want - ledger) + db.events.count_documents({})
        h.is_(lost, 0, '[%s] no event lost (every valid insert_id reached the ledger)' % label)
        for name, p in procs.items():
            h.is_(p.stop(), 0, '[%s] %s exits 0 on SIGTERM' % (label, name))
        figures(h, 't10-' + label, trials=1, events=ex.events, lost=lost, mismatches=len(mism), double_owners=0,
                deposed_writes=0, late_deposed_writes=1 if landed else 0, claims_left=len(left),
                state_rollbacks=len(backwards))
    finally:
        stop.set()
        watch.stop.set()
        for p in procs.values():
            if p.alive():
                p.kill9()
        proxy.close()

def main(h):
    if os.geteuid() != 0:
        h.skip_all('network namespaces need root (euid %d)' % os.geteuid())
    for tool in ('ip', 'iptables'):
        if not any(os.access(os.path.join(d, tool), os.X_OK) for d in os.environ.get('PATH', '').split(':')
                   + ['/usr/sbin', '/sbin']):
            h.skip_all('%s is not installed' % tool)
    remove_stale()
    net = Net()
    # Removed however the test ends: normal exit, exception, or the harness's signal handler.
    orig_cleanup = h.cleanup

    def cleanup():
        try:
            # Lift any cut first: connections of the cut replica can then close, and the
            # servers stop at once instead of waiting for them.
            for name in list(net.cut_rules):
                net.heal(name)
            orig_cleanup()
        finally:
            net.teardown()
    h.cleanup = cleanup
    # atexit runs last-registered first: this wrapper stops the servers (closing their
    # clients while the service address still exists), then removes the network.
    atexit.register(cleanup)
    try:
        net.setup()
        for i, n in enumerate(NAMES):
            net.add_host(n, i + 1)
        # iptables inside a namespace (nf_tables) must work too.
        ns = net.hosts[NAMES[0]][0]
        sh(['ip', 'netns', 'exec', ns, 'iptables', '-L', 'OUTPUT', '-n'])
    except (RuntimeError, OSError, subprocess.SubprocessError) as ex:
        net.teardown()
        h.skip_all('cannot build the test network (ip netns / veth / bridge / iptables): %s' % ex)
    h.diag('network %s.0/24: service %s on bridge %s; namespaces %s'
           % (net.net, net.svc, net.bridge, ', '.join(v[0] for v in net.hosts.values())))

    for kind in h.store_kinds():
        m = start_svc_store(h, kind, net.svc)
        e = h._start_with_retry(lambda: SvcEtcd(h, h._next('etcd'), net.svc))
        hs = h.for_store(m)      # points labelled [<store>], a tmp of the store's own
        hs.ok(all(net.reachable(n, m.port) and net.reachable(n, e.port) for n in NAMES),
              'the store (%s:%d) and etcd (%s) are reachable from every replica namespace'
              % (net.svc, m.port, e.endpoint))
        t0 = time.monotonic()
        for backend in os.environ.get('T10_BACKENDS',
                                      'etcd,mongo,delayed-claim,delayed-fold,delayed-state').split(','):
            backend = backend.strip()
            if backend in ('etcd', 'mongo'):
                Run(hs, net, m, e, backend).run()
            elif backend in ('delayed-claim', 'delayed-fold', 'delayed-state'):
                delayed_run(hs, net, m, backend.split('-')[1])
        hs.diag('t10 total %.1f s' % (time.monotonic() - t0))
        e.stop()
        m.stop()


harness.Harness().main(main)
