#!/usr/bin/env python3
"""tdrain integration-test harness.

One file, standard library only (pymongo, from Debian's python3-pymongo, is
imported lazily by Store.client()).  A test does:

    import os, sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
    import harness

    def main(h):
        m = h.start_ferretdb()                      # real FerretDB, SQLite backend
        e = h.start_etcd()                          # real etcd
        p = h.start_tdrain('a', {'store.uri': m.uri, 'coord.backend': 'etcd',
                                 'coord.etcd_endpoint': e.endpoint})
        h.ok(h.wait_until(lambda: m.db().events.count_documents({}) == 0, 20,
                          desc='backlog drained'), 'drained')
        h.ok(p.stop() == 0, 'clean exit')

    harness.Harness().main(main)

Output is TAP (automake's tap-driver.sh reads it): h.ok(), h.diag(),
h.skip_all(), h.done().  An uncaught exception becomes a "not ok" with the
traceback as diagnostics, and the test exits 1.

Every server or daemon a test starts runs in its own process group, on
127.0.0.1, on ports from free_port(), with its data under h.tmp.  At exit
(normal, exception, SIGTERM or SIGINT) the harness stops exactly the process
groups it started, by PID, and removes h.tmp (kept when the test failed and
KEEP_TMP=1).

Environment:
    TDRAIN_BUILDDIR   build tree holding tdrain, tdrainctl, ... (default: <repo>/build)
    TDRAIN_SRCDIR     source tree (default: the repository holding this file)
    FERRETDB          FerretDB binary (default: ${TDRAIN_CACHE:-~/.cache/tdrain}/bin/ferretdb)
    ETCD              etcd binary (default: etcd on PATH)
    PG_BINDIR         PostgreSQL binaries (default: /usr/lib/postgresql/15/bin)
    TDRAIN_VALGRIND=1 run tdrain under valgrind (--error-exitcode=99 --leak-check=full);
                      TDRAIN_VALGRIND_ARGS adds options
    KEEP_TMP=1        keep h.tmp of a failed test
    HARNESS_VERBOSE=1 print each started command as a diagnostic

Command-line use (scripts/demo.sh, bench/bench.sh):

    python3 tests/harness.py serve --ferretdb [--backend sqlite|postgresql] --etcd --json

starts the servers, prints one JSON line with their endpoints, and keeps them
running until standard input closes (or, with --no-stdin, until SIGTERM or
SIGINT); then stops them and removes their data.
"""

import atexit
import fcntl
import json
import os
import random
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request

# libmongoc keeps diagnostic counters in /dev/shm/mongoc-<pid>; a process killed with
# SIGKILL leaves its file behind, and a later process reusing that pid then prints
# "Falling back to malloc for counters" on stderr.  Tests kill replicas on purpose.
os.environ['MONGOC_DISABLE_SHM'] = '1'

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

__all__ = ['Harness', 'StoreRun', 'Store', 'Etcd', 'Postgres', 'Proc', 'SlowProxy', 'free_port', 'REPO',
           'balanced', 'min_moves', 'moved', 'shares', 'share_bounds', 'lease_docs']


# --------------------------------------------------------------------------
# Rendezvous assignment, written independently of coord/assign.c and lib/hash.c
# (docs/EVENTS.md gives the test vectors): the owner of partition p among
# members is the one with the highest mix64(fnv1a32(name) << 32 ^ p ^ golden).
# --------------------------------------------------------------------------

M64 = (1 << 64) - 1


def partition_holders(db):
    """The replicas holding a partition lease now: the holder of each part/* name's latest epoch in
    tdrain_parts (and tdrain_leases), unless that epoch is a release."""
    latest = {}
    for d in lease_docs(db, {'name': {'$regex': '^part/'}}, {'name': 1, 'epoch': 1, 'holder': 1, 'released': 1}):
        if d.get('name') not in latest or d.get('epoch', 0) > latest[d['name']].get('epoch', 0):
            latest[d['name']] = d
    return {d.get('holder') for d in latest.values() if not d.get('released')} - {None}


def fnv1a32(b):
    x = 2166136261
    for c in b:
        x = ((x ^ c) * 16777619) & 0xffffffff
    return x


def mix64(x):
    x ^= x >> 30
    x = (x * 0xbf58476d1ce4e5b9) & M64
    x ^= x >> 27
    x = (x * 0x94d049bb133111eb) & M64
    x ^= x >> 31
    return x


def hrw_owner(members, p):
    best = None
    for m in sorted(members):
        s = mix64(((fnv1a32(m.encode()) << 32) ^ p ^ 0x9e3779b97f4a7c15) & M64)
        if best is None or s > best[0]:
            best = (s, m)
    return best[1]


# --------------------------------------------------------------------------
# Balanced shares (coord/assign.c, docs/DESIGN.md "Who owns what"), written
# independently: who owns what depends on the history (sticky), so tests check
# the properties, never a precomputed owner.
# --------------------------------------------------------------------------

def share_bounds(n, P):
    """(floor, ceil) of P / n."""
    return P // n, -(-P // n)


def shares(owners, members):
    """{member: partitions owned} from {partition: holder} (members with none included)."""
    out = {m: 0 for m in members}
    for holder in owners.values():
        if holder in out:
            out[holder] += 1
    return out


def balanced(owners, members, P):
    """Every partition owned by one of members, and each member owns floor(P/n) or ceil(P/n)."""
    if len(owners) != P or any(owners.get(p) not in members for p in range(P)):
        return False
    f, c = share_bounds(len(members), P)
    return all(f <= k <= c for k in shares(owners, members).values())


def min_moves(before, members, P):
    """The fewest partitions that must change owner from `before` ({p: holder}; absent or a non-member: free)
    to any assignment of P over members where each owns floor or ceil: every member keeps at most its
    capacity, and the ceil capacities go to the members that own the most."""
    f, c = share_bounds(len(members), P)
    r = P % len(members)
    loads = sorted(shares({p: h for p, h in before.items() if h in members}, members).values(), reverse=True)
    keep = sum(min(l, c if i < r else f) for i, l in enumerate(loads))
    return P - keep


def lease_docs(db, *args, **kw):
    """Every lease document: tdrain_leases (sessions, leader) and tdrain_parts (partition leases), find(*args)."""
    return list(db.tdrain_leases.find(*args, **kw)) + list(db.tdrain_parts.find(*args, **kw))


def moved(before, after, P):
    return sum(1 for p in range(P) if before.get(p) != after.get(p))


class EpochWatch:
    """The fencing checks a store monitor makes on each sample of claim records, deltas and the fold state.

    late_writes: a claim record or delta that appeared under an epoch older than one already seen in its
    partition (a deposed writer's write reaching the store late).  state_findings: the fold state advanced
    under an older leader epoch than it had before."""

    PROJ = {'part': 1, 'epoch': 1, 'owner': 1}

    def __init__(self):
        self.seen, self.max_epoch, self.last_state = set(), {}, None
        self.late_writes, self.state_findings = [], []

    @classmethod
    def read(cls, db, state=True):
        """One sample: ([(kind, doc)], the fold state document or None).  May raise on a store error."""
        docs = [('claim', d) for d in db.tdrain_claims.find({}, cls.PROJ).batch_size(100000)]
        docs += [('delta', d) for d in db.tdrain_deltas.find({}, cls.PROJ).batch_size(100000)]
        return docs, db.tdrain_state.find_one({'_id': 'fold'}) if state else None

    def feed(self, docs, st=None):
        new_max = dict(self.max_epoch)
        for kind, d in docs:
            part, ep = d.get('part'), d.get('epoch')
            if part is None or ep is None:
                continue
            if (kind, d['_id']) not in self.seen:
                self.seen.add((kind, d['_id']))
                if ep < self.max_epoch.get(part, -1):
                    self.late_writes.append('%s %s (owner %s) appeared after epoch %s was seen in partition %s'
                                            % (kind, d['_id'], d.get('owner'), self.max_epoch[part], part))
            new_max[part] = max(new_max.get(part, -1), ep)
        self.max_epoch = new_max
        if st is not None:
            cur, last = (st.get('seq', 0), st.get('epoch', 0), st.get('holder')), self.last_state
            if last is not None and cur[0] > last[0] and cur[1] < last[1]:
                self.state_findings.append('fold state advanced to seq %s under leader epoch %s (%s) after epoch %s'
                                           % (cur[0], cur[1], cur[2], last[1]))
            if last is None or cur[0] >= last[0]:
                self.last_state = cur


# --------------------------------------------------------------------------
# Ports
# --------------------------------------------------------------------------

_PORT_LOCK_DIR = os.path.join(tempfile.gettempdir(), 'tdrain-ports')
_PORT_RANGE = (20000, 32000)   # below Linux's ephemeral range (32768-60999)
_port_locks = {}               # port -> fd holding its lock for this process's life
_rng = random.SystemRandom()


def _port_bindable(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(('127.0.0.1', port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def free_port():
    """Return a TCP port on 127.0.0.1 that nothing listens on.

    The port is taken below the kernel's ephemeral range, so outgoing client
    connections cannot grab it before the server binds it, and it is reserved
    with a lock file (held until this process exits) so that tests running in
    parallel (make -j) never pick the same port.  Falls back to binding
    127.0.0.1:0 if the range looks exhausted.
    """
    try:
        os.makedirs(_PORT_LOCK_DIR, exist_ok=True)
        os.chmod(_PORT_LOCK_DIR, 0o1777)
    except OSError:
        pass
    for _ in range(500):
        port = _rng.randrange(*_PORT_RANGE)
        if port in _port_locks:
            continue
        try:
            fd = os.open(os.path.join(_PORT_LOCK_DIR, '%d.lock' % port), os.O_CREAT | os.O_RDWR, 0o666)
        except OSError:
            break
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        if not _port_bindable(port):
            os.close(fd)
            continue
        _port_locks[port] = fd
        return port
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _tcp_open(port, host='127.0.0.1', timeout=0.5):
    """True if something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _wire_ping(port, timeout=2.0):
    """Send {ping: 1} as an OP_MSG to a MongoDB-wire server; True if it says ok.

    Needs no driver, so servers can be checked before (or without) pymongo.
    """
    def cstring(s):
        return s.encode() + b'\0'
    elems = b'\x10' + cstring('ping') + struct.pack('<i', 1) + b'\x02' + cstring('$db') + \
        struct.pack('<i', len('admin') + 1) + cstring('admin')
    doc = struct.pack('<i', 4 + len(elems) + 1) + elems + b'\0'
    body = struct.pack('<I', 0) + b'\x00' + doc           # flags, section kind 0, body
    msg = struct.pack('<iiii', 16 + len(body), 1, 0, 2013) + body
    try:
        with socket.create_connection(('127.0.0.1', port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(msg)
            hdr = b''
            while len(hdr) < 16:
                chunk = s.recv(16 - len(hdr))
                if not chunk:
                    return False
                hdr += chunk
            length = struct.unpack('<i', hdr[:4])[0]
            rest = b''
            while len(rest) < length - 16:
                chunk = s.recv(length - 16 - len(rest))
                if not chunk:
                    return False
                rest += chunk
    except OSError:
        return False
    # "ok" as a double 1.0 (FerretDB and MongoDB both answer that way).
    return b'\x01ok\x00' + struct.pack('<d', 1.0) in rest


def _http_post_json(url, obj, timeout=2.0):
    data = json.dumps(obj).encode()
    req = urllib.request.Request(url, data=data, headers={'Content-Type': 'application/json'})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read().decode() or '{}')


def _tail(path, lines=40):
    try:
        with open(path, 'rb') as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read().decode('utf-8', 'replace')
    except OSError as e:
        return '(cannot read %s: %s)' % (path, e)
    return '\n'.join(data.splitlines()[-lines:])


# --------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------

class _Managed:
    """A child process in its own process group, logged to a file.

    Subclasses define _argv() and _ready(); start() launches and waits for
    readiness; stop() sends SIGTERM and waits (SIGKILL after a grace period);
    kill() sends SIGKILL.  The harness kills the whole process group at exit.
    """

    kind = 'process'
    ready_timeout = 20.0
    stop_timeout = 15.0

    def __init__(self, h, name, log):
        self.h = h
        self.name = name
        self.log = log
        self.popen = None
        self._user = None          # (uid, gid) to run as, or None
        self._env = None
        self._cwd = None
        h._register(self)

    # -- to be defined by subclasses --
    def _argv(self):
        raise NotImplementedError

    def _ready(self):
        return True

    # -- common --
    @property
    def pid(self):
        """PID of the running process (None before the first start)."""
        return self.popen.pid if self.popen else None

    def alive(self):
        """True while the process has not exited (a stopped process is alive)."""
        return self.popen is not None and self.popen.poll() is None

    def _preexec(self):
        user = self._user

        def fn():
            if user is not None:
                os.setgroups([])
                os.setgid(user[1])
                os.setuid(user[0])
        return fn if user is not None else None

    def _launch(self):
        argv = self._argv()
        if os.environ.get('HARNESS_VERBOSE'):
            self.h.diag('start %s: %s' % (self.name, ' '.join(shlex.quote(a) for a in argv)))
        logf = open(self.log, 'ab')   # appended: a restart keeps the earlier output
        try:
            self.popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                          start_new_session=True, env=self._env, cwd=self._cwd,
                                          preexec_fn=self._preexec(), close_fds=True)
        finally:
            logf.close()

    def start(self, timeout=None):
        """Start the process (no-op if running) and wait until it is ready."""
        if self.alive():
            return self
        self._launch()
        timeout = self.ready_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError('%s %s exited with status %s during start-up; log %s:\n%s'
                                   % (self.kind, self.name, self.popen.returncode, self.log, _tail(self.log, 20)))
            try:
                if self._ready():
                    return self
            except Exception:       # not ready yet
                pass
            time.sleep(0.1)
        self.kill()
        raise RuntimeError('%s %s not ready within %.0f s; log %s:\n%s'
                           % (self.kind, self.name, timeout, self.log, _tail(self.log, 20)))

    def signal(self, sig):
        """Send sig to the process itself (not its group)."""
        if self.alive():
            os.kill(self.popen.pid, sig)

    def wait(self, timeout=None):
        """Wait for exit; return the exit status (negative: killed by that signal), or None on timeout."""
        if self.popen is None:
            return None
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout=None):
        """SIGTERM, wait up to timeout, then SIGKILL the group; return the exit status."""
        if self.popen is None:
            return None
        if self.alive():
            self.signal(signal.SIGTERM)
            self.signal(signal.SIGCONT)   # a SIGSTOPped process must run to exit
            rc = self.wait(self.stop_timeout if timeout is None else timeout)
            if rc is None:
                self.h.diag('%s %s did not exit after SIGTERM: SIGKILL' % (self.kind, self.name))
                self._killpg(signal.SIGKILL)
                rc = self.wait(10)
        self._reap_group()
        return self.popen.returncode

    def kill(self):
        """SIGKILL the process group; return the exit status."""
        if self.popen is None:
            return None
        self._killpg(signal.SIGKILL)
        self.wait(10)
        return self.popen.returncode

    def restart(self, timeout=None):
        """stop() then start() with the same ports and data directory."""
        self.stop()
        return self.start(timeout)

    def _killpg(self, sig):
        try:
            os.killpg(self.popen.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _reap_group(self):
        # Leftover members of the group (e.g. PostgreSQL backends) after the leader exited.
        self._killpg(signal.SIGKILL)

    def _cleanup(self):
        """Called by the harness at exit: end the whole group, politely first."""
        if self.popen is None:
            return
        if self.alive():
            self._killpg(signal.SIGTERM)
            self._killpg(signal.SIGCONT)
            if self.wait(5) is None:
                self._killpg(signal.SIGKILL)
                self.wait(5)
        self._reap_group()

    def log_text(self):
        """The whole log file (stdout and stderr of every start) as text."""
        try:
            with open(self.log, 'rb') as f:
                return f.read().decode('utf-8', 'replace')
        except OSError:
            return ''


class Postgres(_Managed):
    """A private PostgreSQL 15 cluster: initdb'd in h.tmp, run as user postgres.

    p.port, p.socket_dir, p.url (for FerretDB's --postgresql-url), p.dsn
    """

    kind = 'postgresql'
    ready_timeout = 30.0

    def __init__(self, h, name, settings=None):
        self.dir = os.path.join(h.tmp, name)
        super().__init__(h, name, os.path.join(h.tmp, name + '.log'))
        self.bindir = os.environ.get('PG_BINDIR', '/usr/lib/postgresql/15/bin')
        if not os.path.exists(os.path.join(self.bindir, 'postgres')):
            raise RuntimeError('PostgreSQL not found in %s (apt-get install postgresql)' % self.bindir)
        self.port = free_port()
        self.data = os.path.join(self.dir, 'data')
        self.socket_dir = os.path.join(self.dir, 'sock')
        self.settings = dict(settings or {})
        self.database = 'ferretdb'
        self._user = None
        if os.geteuid() == 0:
            import pwd
            pw = pwd.getpwnam('postgres')
            self._user = (pw.pw_uid, pw.pw_gid)
            os.chmod(h.tmp, 0o711)   # let postgres traverse to its directory
        os.makedirs(self.socket_dir)
        if self._user:
            for d in (self.dir, self.socket_dir):
                os.chown(d, *self._user)
        self._env = dict(os.environ, LC_ALL='C', LANG='C')
        self._cwd = self.dir
        self._initdb()

    def _initdb(self):
        argv = [os.path.join(self.bindir, 'initdb'), '-D', self.data, '-U', 'postgres', '--auth=trust',
                '-E', 'UTF8', '--locale=C', '--no-sync']
        with open(self.log, 'ab') as logf:
            r = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                               env=self._env, cwd=self.dir, preexec_fn=self._preexec(), timeout=120)
        if r.returncode != 0:
            raise RuntimeError('initdb failed (%d); log %s:\n%s' % (r.returncode, self.log, _tail(self.log, 20)))

    def _argv(self):
        argv = [os.path.join(self.bindir, 'postgres'), '-D', self.data, '-p', str(self.port),
                '-k', self.socket_dir, '-c', 'listen_addresses=127.0.0.1', '-c', 'max_connections=200']
        for k, v in sorted(self.settings.items()):
            argv += ['-c', '%s=%s' % (k, v)]
        return argv

    def _ready(self):
        r = subprocess.run([os.path.join(self.bindir, 'pg_isready'), '-q', '-h', self.socket_dir,
                            '-p', str(self.port), '-U', 'postgres'],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           timeout=10)
        return r.returncode == 0

    def start(self, timeout=None):
        super().start(timeout)
        if self.psql("SELECT count(*) FROM pg_database WHERE datname = '%s'" % self.database).strip() == '0':
            self.psql('CREATE DATABASE %s' % self.database)
        return self

    def stop(self, timeout=None):
        # SIGINT is PostgreSQL's "fast shutdown"; SIGTERM waits for clients.
        if self.alive():
            self.signal(signal.SIGINT)
        return super().stop(timeout)

    def psql(self, sql, db='postgres'):
        """Run one SQL statement with psql; return its unaligned output."""
        r = subprocess.run([os.path.join(self.bindir, 'psql'), '-X', '-q', '-A', '-t', '-v', 'ON_ERROR_STOP=1',
                            '-h', self.socket_dir, '-p', str(self.port), '-U', 'postgres', '-d', db, '-c', sql],
                           stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise RuntimeError('psql %r failed: %s' % (sql, r.stderr.strip()))
        return r.stdout

    @property
    def url(self):
        """postgres:// URL over the Unix socket, for FerretDB."""
        return 'postgres://postgres@127.0.0.1:%d/%s?host=%s&sslmode=disable' % (
            self.port, self.database, self.socket_dir)


class _MongoWire:
    """The client side of a MongoDB-wire store (Store, DocumentDB): a cached pymongo client, closed at cleanup."""

    def client(self, **kw):
        """A pymongo.MongoClient with short timeouts (cached unless kw are given)."""
        if self._client is not None and not kw:
            return self._client
        try:
            import pymongo
        except ImportError:
            raise RuntimeError('pymongo is missing: apt-get install python3-pymongo (and run /usr/bin/python3)')
        opts = dict(serverSelectionTimeoutMS=5000, connectTimeoutMS=3000, socketTimeoutMS=60000,
                    directConnection=True, retryWrites=False)
        opts.update(kw)
        c = pymongo.MongoClient(self.uri, **opts)
        if not kw:
            self._client = c
        return c

    def db(self, name='tdrain'):
        """client()[name]"""
        return self.client()[name]

    def _cleanup(self):
        if self._client is not None:
            try:
                self._client.close()
            except Exception:
                pass
            self._client = None
        super()._cleanup()


class Store(_MongoWire, _Managed):
    """A FerretDB 1.24 server (MongoDB wire protocol) on 127.0.0.1.

    m.uri, m.port, m.pid, m.dir, m.backend, m.pg (the Postgres, postgresql backend only);
    m.start(), m.stop(), m.kill(), m.restart() keep the port and data;
    m.client() is a cached pymongo.MongoClient; m.db(name) one of its databases.
    """

    kind = 'ferretdb'

    def __init__(self, h, name, backend='sqlite', pg_settings=None, extra_args=None):
        if backend not in ('sqlite', 'postgresql'):
            raise ValueError('backend must be sqlite or postgresql, not %r' % backend)
        self.dir = os.path.join(h.tmp, name)
        os.makedirs(self.dir)
        super().__init__(h, name, os.path.join(h.tmp, name + '.log'))
        self.binary = h.ferretdb_binary()
        self.backend = backend
        self.port = free_port()
        self.extra_args = list(extra_args or [])
        self._client = None
        self.pg = None
        if backend == 'postgresql':
            self.pg = Postgres(h, name + '-pg', pg_settings)
            self.pg.start()

    @property
    def label(self):
        """'ferretdb' (SQLite backend) or 'ferretdb-postgresql': the store kind as start_store() names it."""
        return 'ferretdb' if self.backend == 'sqlite' else 'ferretdb-postgresql'

    # FerretDB 1.24 applies no update atomically (ENVIRONMENT.md): tests assert fencing that needs it
    # only where this is True.
    atomic_updates = False

    @property
    def uri(self):
        """mongodb://127.0.0.1:PORT/"""
        return self.uri_via(self.port)

    def uri_via(self, port, host='127.0.0.1'):
        """The URI of this store reached at host:port instead (a proxy in front of it, another address):
        the same credentials and options as uri."""
        return 'mongodb://%s:%d/' % (host, port)

    def _argv(self):
        argv = [self.binary, '--listen-addr=127.0.0.1:%d' % self.port, '--state-dir=' + self.dir,
                '--debug-addr=-', '--telemetry=disable', '--log-level=info']
        if self.backend == 'sqlite':
            # synchronous(normal): WAL stays consistent, commits skip fsync.  FerretDB runs
            # each statement in its own transaction; a full fsync per statement would make
            # the test store, not tdrain, the thing measured.
            argv += ['--handler=sqlite', '--sqlite-url=file:%s/?_pragma=synchronous(normal)' % self.dir]
        else:
            argv += ['--handler=postgresql', '--postgresql-url=' + self.pg.url]
        return argv + self.extra_args

    def _ready(self):
        return _wire_ping(self.port)

    def start(self, timeout=None):
        if self.pg is not None and not self.pg.alive():
            self.pg.start()
        return super().start(timeout)



def documentdb_verifier(password, salt=None, iterations=4096):
    """A PostgreSQL SCRAM-SHA-256 verifier with a 28-byte salt.

    libmongoc 1.23 rejects a salt that is not 28 bytes ("invalid salt length of 16 in sasl step2") and
    PostgreSQL makes 16-byte ones, so DocumentDB users are created with a verifier computed here.
    """
    import base64
    import hashlib
    import hmac
    salt = salt or os.urandom(28)
    salted = hashlib.pbkdf2_hmac('sha256', password.encode(), salt, iterations)
    ck = hmac.new(salted, b'Client Key', hashlib.sha256).digest()
    sk = hmac.new(salted, b'Server Key', hashlib.sha256).digest()
    b = lambda x: base64.b64encode(x).decode()
    return 'SCRAM-SHA-256$%d:%s$%s:%s' % (iterations, b(salt), b(hashlib.sha256(ck).digest()), b(sk))


class DocumentDB(_MongoWire, _Managed):
    """A DocumentDB (PostgreSQL 15 + pg_documentdb + its Rust gateway, MongoDB wire protocol) on 127.0.0.1.

    Unlike FerretDB 1.24 it serves keyed statements from indexes, applies each update atomically and
    has transactions: the store closest to MongoDB (../shared/documentdb/README.md lists the differences).
    Same interface as Store: m.uri (with the test user's credentials), m.port, m.pid, m.dir, m.pg,
    m.start(), m.stop(), m.kill(), m.restart() (keep port and data), m.client(), m.db(name).
    m.kind == 'documentdb', m.backend == 'documentdb'.
    """

    kind = 'documentdb'
    backend = 'documentdb'
    label = 'documentdb'
    atomic_updates = True
    ready_timeout = 60.0
    USER = 'tdtest'
    PASSWORD = 'tdtest-pass'

    # Settings DocumentDB needs in the cluster (recipe.sh step 5).  Debian's pg_cron 1.4.2 has no seconds
    # schedules, so the index-build job runs once a minute: createIndexes on a collection that already holds
    # documents returns at the next minute tick.
    PG_SETTINGS = {
        'shared_preload_libraries': 'pg_cron,pg_documentdb_core,pg_documentdb',
        'cron.database_name': 'postgres',
        'documentdb.enableBackgroundWorker': 'true',
        'documentdb.enableBackgroundWorkerJobs': 'true',
        'documentdb.indexBuildScheduleInSec': '60',
        'ssl': 'off',
        'fsync': 'off',                   # a test store: the store's disk is not what is measured
        'synchronous_commit': 'off',
        'full_page_writes': 'off',
    }

    def __init__(self, h, name, pg_settings=None):
        self.dir = os.path.join(h.tmp, name)
        os.makedirs(self.dir)
        super().__init__(h, name, os.path.join(h.tmp, name + '.log'))
        self.binary = h.documentdb_gateway()
        self.port = free_port()
        self._client = None
        settings = dict(self.PG_SETTINGS)
        settings.update(pg_settings or {})
        self.pg = Postgres(h, name + '-pg', settings)
        self.pg.database = 'postgres'
        self.pg.start()
        self.pg.psql('CREATE EXTENSION IF NOT EXISTS documentdb CASCADE')
        self.pg.psql('CREATE ROLE "%s" WITH LOGIN INHERIT PASSWORD \'%s\' IN ROLE documentdb_admin_role'
                     % (self.USER, documentdb_verifier(self.PASSWORD)))
        self.pg.psql('ALTER ROLE "%s" CREATEROLE' % self.USER)
        self.pg.psql('GRANT "%s" TO postgres WITH ADMIN OPTION' % self.USER)
        self._write_config()
        self._cwd = self.dir

    def _write_config(self):
        # A release gateway panics without CertificateOptions even when TLS is not enforced.
        cert, key = os.path.join(self.dir, 'cert.pem'), os.path.join(self.dir, 'key.pem')
        r = subprocess.run(['openssl', 'req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', key,
                            '-out', cert, '-days', '3650', '-subj', '/CN=localhost'],
                           stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
        if r.returncode != 0:
            raise RuntimeError('openssl req failed: %s' % r.stderr.decode(errors='replace').strip())
        self.config = os.path.join(self.dir, 'SetupConfiguration.json')
        with open(self.config, 'w') as f:
            json.dump({
                'NodeHostName': 'localhost',
                'BlockedRolePrefixes': ['documentdb', 'citus', 'pg', 'internal_role'],
                'PostgresHostName': '127.0.0.1',
                'PostgresPort': self.pg.port,
                'PostgresSystemUser': 'postgres',
                'PostgresDatabase': 'postgres',
                'GatewayListenPort': self.port,
                'UseLocalHost': True,
                'TransactionTimeoutSecs': 30,
                'CursorTimeoutSecs': 600,
                'PostgresCommandTimeoutSecs': 120,
                'EnforceSslTcp': False,
                'CertificateOptions': {'CertType': 'pem_file', 'FilePath': cert, 'KeyFilePath': key},
            }, f, indent=2)

    @property
    def uri(self):
        """mongodb://USER:PASS@127.0.0.1:PORT/?authMechanism=SCRAM-SHA-256"""
        return self.uri_via(self.port)

    def uri_via(self, port, host='127.0.0.1'):
        """The URI of this store reached at host:port instead (a proxy in front of it, another address):
        the same credentials and options as uri."""
        return 'mongodb://%s:%s@%s:%d/?authMechanism=SCRAM-SHA-256' % (self.USER, self.PASSWORD, host, port)

    def _argv(self):
        return [self.binary, self.config]

    def _ready(self):
        return _wire_ping(self.port)

    def start(self, timeout=None):
        if not self.pg.alive():
            self.pg.start()
        return super().start(timeout)

    def stop(self, timeout=None):
        # The gateway ignores SIGINT when started in the background; _Managed.stop sends SIGTERM.
        return super().stop(timeout)



class Etcd(_Managed):
    """An etcd 3.4 member on 127.0.0.1 (client and peer ports from free_port()).

    e.endpoint ("http://127.0.0.1:PORT"), e.port, e.peer_port, e.pid, e.dir;
    e.start(), e.stop(), e.kill(), e.restart() keep ports and data;
    e.post(path, obj) calls the v3 JSON gateway.
    """

    kind = 'etcd'

    def __init__(self, h, name, extra_args=None):
        self.dir = os.path.join(h.tmp, name)
        super().__init__(h, name, os.path.join(h.tmp, name + '.log'))
        self.binary = os.environ.get('ETCD') or shutil.which('etcd') or '/usr/bin/etcd'
        if not os.access(self.binary, os.X_OK):
            raise RuntimeError('etcd not found (apt-get install etcd-server)')
        self.port = free_port()
        self.peer_port = free_port()
        self.extra_args = list(extra_args or [])
        self._env = {k: v for k, v in os.environ.items() if not k.startswith('ETCD')}

    @property
    def endpoint(self):
        """http://127.0.0.1:PORT"""
        return 'http://127.0.0.1:%d' % self.port

    def _argv(self):
        c = 'http://127.0.0.1:%d' % self.port
        p = 'http://127.0.0.1:%d' % self.peer_port
        return [self.binary, '--name', 'default', '--data-dir', self.dir,
                '--listen-client-urls', c, '--advertise-client-urls', c,
                '--listen-peer-urls', p, '--initial-advertise-peer-urls', p,
                '--initial-cluster', 'default=' + p, '--initial-cluster-state', 'new'] + self.extra_args

    def _ready(self):
        self.post('/v3/kv/range', {'key': 'AA=='}, timeout=1.0)
        return True

    def post(self, path, obj, timeout=5.0):
        """POST obj as JSON to the v3 gateway (path like '/v3/kv/range'); return the decoded reply."""
        return _http_post_json(self.endpoint + path, obj, timeout)


class Proc(_Managed):
    """A tdrain daemon started by Harness.start_tdrain().

    p.pid, p.name, p.conf (config file path), p.log;
    p.stop(timeout=20) -> exit status; p.kill9(); p.sigstop(); p.sigcont();
    p.wait(timeout) -> exit status or None; p.alive(); p.log_text(); p.start() relaunches.
    """

    kind = 'tdrain'
    stop_timeout = 20.0

    def __init__(self, h, name, conf, argv, env):
        super().__init__(h, name, os.path.join(h.tmp, name + '.log'))
        self.conf = conf
        self.argv = argv
        self._env = env

    def _argv(self):
        return list(self.argv)

    def start(self, timeout=None):
        """Launch (no readiness check: tdrain's own behaviour is what tests observe)."""
        if not self.alive():
            self._launch()
        return self

    def stop(self, timeout=20):
        """SIGTERM, wait up to timeout s, SIGKILL if still running; return the exit status."""
        if self.h.valgrind:
            timeout = timeout * 5
        return super().stop(timeout)

    def kill9(self):
        """SIGKILL the process; return its exit status (-9)."""
        if self.popen is None:
            return None
        if self.alive():
            os.kill(self.popen.pid, signal.SIGKILL)
        self.wait(10)
        self._reap_group()
        return self.popen.returncode

    def sigstop(self):
        """Freeze the process (SIGSTOP)."""
        self.signal(signal.SIGSTOP)

    def sigcont(self):
        """Resume a frozen process (SIGCONT)."""
        self.signal(signal.SIGCONT)

    def valgrind_logs(self):
        """Paths of valgrind's reports for this daemon (TDRAIN_VALGRIND=1), one per run."""
        import glob
        return sorted(glob.glob(os.path.join(self.h.tmp, self.name + '.valgrind.*.log')))


# --------------------------------------------------------------------------
# A store that answers slowly
# --------------------------------------------------------------------------

class SlowProxy:
    """A TCP proxy in front of a MongoDB-wire server, adding latency on demand.

        px = SlowProxy(store.port)           # listens on 127.0.0.1:px.port
        start a daemon with store.uri = px.uri
        px.set_latency(reply=lambda cmd: random.uniform(0.3, 1.5))   # seconds per reply
        px.set_latency(request=fn, reply=fn)                           # both directions
        px.set_latency()                                               # no latency again
        px.stats()  ->  {'connections', 'requests', 'replies', 'delayed', 'over', 'max_delay'}
        px.commands()  ->  Counter of requests by SlowProxy.describe() ("update tdrain_leases": 12, ...)
        px.close()

    Traffic is cut into whole wire-protocol messages (length header), and each
    message is held for the delay its direction's function returns (None or 0:
    none) before it is passed on.  The function gets the request's command as
    SlowProxy.describe() gives it ("insert tdrain_deltas", "hello", ...); for
    a reply, the command of the request it answers (the driver sends one
    request at a time per connection), so a test can slow down chosen
    statements.  Each direction of a connection is one thread, so a held
    message also holds the ones behind it, as a busy server does.  A reply
    delay means the store has done the work and the client may give up before
    hearing so; a request delay means the work is done late, possibly after
    the client gave up.  When the client closes its side (its timeout),
    requests already read are still delivered, then the store's side is closed
    once it has answered: nothing is dropped, only late.  stats()['over']
    counts delays of more than over_s seconds (set it to the client's timeout
    to count the replies it cannot have waited for).  Threads are daemons;
    close() stops accepting and closes every connection.
    """

    MAX_MSG = 48 * 1024 * 1024 + 16 * 1024

    def __init__(self, target_port, target_host='127.0.0.1', over_s=None):
        import threading
        self.target = (target_host, target_port)
        self.over_s = over_s
        self._lock = threading.Lock()
        self._request = None
        self._reply = None
        self._stats = {'connections': 0, 'requests': 0, 'replies': 0, 'delayed': 0, 'over': 0, 'max_delay': 0.0}
        self._by_cmd = {}
        self._conns = set()
        self._closed = False
        self.port = free_port()
        self._ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._ls.bind(('127.0.0.1', self.port))
        self._ls.listen(128)
        threading.Thread(target=self._accept, name='slowproxy-accept', daemon=True).start()

    @property
    def uri(self):
        """mongodb://127.0.0.1:PORT/ of the proxy."""
        return 'mongodb://127.0.0.1:%d/' % self.port

    def set_latency(self, reply=None, request=None):
        """Functions of the command returning the seconds to hold each reply / request (None: no latency)."""
        with self._lock:
            self._reply, self._request = reply, request

    def stats(self):
        with self._lock:
            return dict(self._stats)

    def commands(self):
        """{command description: requests seen} (counting statements per collection, e.g. coordination)."""
        import collections
        with self._lock:
            return collections.Counter(self._by_cmd)

    @staticmethod
    def describe(msg):
        """'<command> <collection>' of a request ('insert tdrain_claims', 'find events', 'hello', ...):
        the first key of an OP_MSG body and its string value; an OP_QUERY (the legacy handshake) is 'hello'."""
        if len(msg) < 21:
            return '?'
        op = struct.unpack('<i', msg[12:16])[0]
        if op == 2004:
            return 'hello'
        if op != 2013 or msg[20] != 0:
            return '?'
        body = msg[21:21 + 300]
        try:
            t = body[4]
            end = body.index(b'\0', 5)
            cmd = body[5:end].decode('utf-8', 'replace')
            if cmd.lower() == 'ismaster':
                return 'hello'
            if t == 2:
                n = struct.unpack('<i', body[end + 1:end + 5])[0]
                return '%s %s' % (cmd, body[end + 5:end + 4 + n].decode('utf-8', 'replace'))
            return cmd
        except (ValueError, IndexError, struct.error):
            return '?'

    def close(self):
        self._closed = True
        try:
            self._ls.close()
        except OSError:
            pass
        with self._lock:
            conns = list(self._conns)
        for pair in conns:
            for s in pair:
                try:
                    s.close()
                except OSError:
                    pass

    def _accept(self):
        import threading
        while not self._closed:
            try:
                c, _ = self._ls.accept()
            except OSError:
                return
            try:
                up = socket.create_connection(self.target, timeout=5)
                up.settimeout(None)
            except OSError:
                c.close()
                continue
            pair = (c, up)
            with self._lock:
                self._conns.add(pair)
                self._stats['connections'] += 1
            state = {'client_gone': False, 'asked': []}
            threading.Thread(target=self._requests, args=(pair, state), daemon=True).start()
            threading.Thread(target=self._replies, args=(pair, state), daemon=True).start()

    def _read_msg(self, s):
        """One whole wire message, or None at EOF / error / nonsense."""
        def exactly(n):
            buf = b''
            while len(buf) < n:
                chunk = s.recv(min(n - len(buf), 1 << 20))
                if not chunk:
                    return None
                buf += chunk
            return buf
        try:
            hdr = exactly(4)
            if hdr is None:
                return None
            n = struct.unpack('<i', hdr)[0]
            if n < 16 or n > self.MAX_MSG:
                return None
            rest = exactly(n - 4)
            return None if rest is None else hdr + rest
        except OSError:
            return None

    def _hold(self, kind, cmd):
        with self._lock:
            fn = self._reply if kind == 'replies' else self._request
            self._stats[kind] += 1
        d = fn(cmd) if fn is not None else 0
        if d and d > 0:
            with self._lock:
                self._stats['delayed'] += 1
                self._stats['max_delay'] = max(self._stats['max_delay'], d)
                if self.over_s is not None and d > self.over_s:
                    self._stats['over'] += 1
            time.sleep(d)

    def _requests(self, pair, state):
        c, up = pair
        while True:
            msg = self._read_msg(c)
            if msg is None:
                break
            cmd = self.describe(msg)
            with self._lock:
                self._by_cmd[cmd] = self._by_cmd.get(cmd, 0) + 1
            # OP_MSG with moreToCome (flag bit 1) gets no reply.
            if not (len(msg) >= 20 and struct.unpack('<i', msg[12:16])[0] == 2013
                    and struct.unpack('<I', msg[16:20])[0] & 2):
                state['asked'].append(cmd)
            self._hold('requests', cmd)
            try:
                up.sendall(msg)
            except OSError:
                break
        state['client_gone'] = True
        # The client is gone (or closed): the store answers what it got, then sees EOF.
        try:
            up.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def _replies(self, pair, state):
        c, up = pair
        while True:
            msg = self._read_msg(up)
            if msg is None:
                break
            cmd = state['asked'].pop(0) if state['asked'] else '?'
            if state['client_gone']:
                continue          # nobody waits for it any more: read and drop
            self._hold('replies', cmd)
            try:
                c.sendall(msg)
            except OSError:
                state['client_gone'] = True
        for s in pair:
            try:
                s.close()
            except OSError:
                pass
        with self._lock:
            self._conns.discard(pair)


# --------------------------------------------------------------------------
# The harness
# --------------------------------------------------------------------------

def pid_alive(pid):
    """True if pid exists and is not a zombie."""
    try:
        with open('/proc/%d/stat' % pid) as f:
            return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
    except (OSError, IndexError):
        return False


class SystemdNamespace:
    """A real systemd booted in a PID + mount namespace by scripts/systemd-ns.sh, known by its own state file
    (t11_systemd, t14_deb).  start() returns '' or the reason it failed; root is its / seen from the host
    (its /run differs from the host's); run() executes in it; stop() ends it and everything under it."""

    def __init__(self, h, state):
        self.h = h
        self.script = os.path.join(h.srcdir, 'scripts', 'systemd-ns.sh')
        self.state = state
        self.pid = None

    def _env(self):
        return {'SYSTEMD_NS_STATE': self.state}

    def start(self):
        r = self.h.run(['sh', self.script, 'start'], timeout=120, env=self._env())
        words = (r.stdout or '').split()
        if r.returncode != 0 or not words or not words[-1].isdigit():
            return ('scripts/systemd-ns.sh start failed (status %s): %s'
                    % (r.returncode, ' '.join(((r.stderr or '') + (r.stdout or '')).split())[:300]))
        self.pid = int(words[-1])
        return ''

    @property
    def root(self):
        return '/proc/%d/root' % self.pid

    def run(self, *argv, timeout=60, env=None):
        e = self._env()
        e.update(env or {})
        return self.h.run(['sh', self.script, 'exec'] + [str(a) for a in argv], timeout=timeout, env=e)

    def stop(self):
        if self.pid is None and not os.path.exists(self.state):
            return
        self.h.run(['sh', self.script, 'stop'], timeout=90, env=self._env())
        if self.pid is not None and pid_alive(self.pid):
            try:
                with open('/proc/%d/cmdline' % self.pid, 'rb') as f:
                    ours = b'--unit=basic.target' in f.read()
                if ours:
                    os.kill(self.pid, signal.SIGKILL)
            except OSError:
                pass


class SkipAll(SystemExit):
    pass


class StoreRun:
    """The harness as one store's run of a test sees it (h.for_store(store)).

    A test that runs its scenarios once per store kind (h.store_kinds()) passes this view instead of h:
    every test point (ok, is_, skip) and diagnostic starts with "[<store label>] ", and tmp is a directory
    of its own (h.tmp/<label>), so replica logs and configurations, trace files, NDJSON and metric files
    of one store's run never collide with another's.  "FIGURES scenario=S" diagnostics (summed by
    tests/fault_suite.sh) become "FIGURES scenario=<label>/S".  Everything else is the harness itself
    (the same TAP stream, the same cleanup)."""

    def __init__(self, h, store):
        self._h = h
        self.store = store
        self.label = store.label
        self.tmp = os.path.join(h.tmp, self.label)
        os.makedirs(self.tmp, exist_ok=True)

    def __getattr__(self, name):
        return getattr(self._h, name)

    def _desc(self, desc):
        return '[%s] %s' % (self.label, desc)

    def ok(self, cond, desc='', todo=None):
        return self._h.ok(cond, self._desc(desc), todo)

    def is_(self, got, expected, desc=''):
        return self._h.is_(got, expected, self._desc(desc))

    def skip(self, reason, desc=''):
        return self._h.skip(reason, self._desc(desc))

    def diag(self, msg):
        self._h.diag('\n'.join(self._diag_line(l) for l in (str(msg).splitlines() or [''])))

    def _diag_line(self, line):
        # tests/fault_suite.sh sums "# FIGURES scenario=S ..." lines: they keep their form, one row per store.
        if line.startswith('FIGURES scenario='):
            return line.replace('FIGURES scenario=', 'FIGURES scenario=%s/' % self.label, 1)
        return self._desc(line)

    # Defined on Harness in terms of self.tmp / self.diag: run them on this view.
    def start_tdrain(self, name, config, args=None, env=None):
        return Harness.start_tdrain(self, name, config, args, env)

    def wait_until(self, pred, timeout, interval=0.1, desc=''):
        return Harness.wait_until(self, pred, timeout, interval, desc)


class Harness:
    """One test: a temp dir, the processes it started, and the TAP stream.

    Attributes: tmp, builddir, srcdir, name, valgrind.
    """

    def __init__(self, name=None, tap=True):
        self.name = name or os.path.splitext(os.path.basename(sys.argv[0] or 'test'))[0] or 'test'
        self.srcdir = os.path.abspath(os.environ.get('TDRAIN_SRCDIR') or REPO)
        self.builddir = os.path.abspath(os.environ.get('TDRAIN_BUILDDIR') or os.path.join(REPO, 'build'))
        self.valgrind = os.environ.get('TDRAIN_VALGRIND', '') not in ('', '0')
        self.tmp = tempfile.mkdtemp(prefix='tdrain-%s-' % self.name, dir='/tmp')
        self.tap = tap
        self.count = 0
        self.failed = 0
        self._done = False
        self._cleaned = False
        self._managed = []
        self._running = set()     # Popen objects of h.run() in flight
        self._counter = {}
        self._t0 = time.monotonic()
        atexit.register(self.cleanup)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        self._prev_excepthook = sys.excepthook
        sys.excepthook = self._excepthook

    # ---- TAP ----
    def _out(self, line):
        sys.stdout.write(line + '\n')
        sys.stdout.flush()

    def ok(self, cond, desc='', todo=None):
        """Record one test point; return bool(cond).

        todo: the reason this point is expected to fail (a known bug): it is
        printed with a TAP "# TODO" directive, so its failure does not fail the
        test (automake reports XFAIL) and its passing is reported (XPASS)."""
        good = bool(cond)
        self.count += 1
        if not good and not todo:
            self.failed += 1
        desc = ' '.join(str(desc).split()).replace('#', '\\#')
        directive = ' # TODO %s' % ' '.join(str(todo).split()).replace('#', '') if todo else ''
        if self.tap:
            self._out('%s %d%s%s' % ('ok' if good else 'not ok', self.count, ' - ' + desc if desc else '', directive))
        if not good:
            here = os.path.abspath(__file__)
            for frame in reversed(traceback.extract_stack()[:-1]):
                if os.path.abspath(frame.filename) != here:
                    self.diag('  failed at %s:%d' % (os.path.basename(frame.filename), frame.lineno))
                    break
        return good

    def is_(self, got, expected, desc=''):
        """ok(got == expected), with both values as diagnostics on failure."""
        good = self.ok(got == expected, desc)
        if not good:
            self.diag('       got: %r' % (got,))
            self.diag('  expected: %r' % (expected,))
        return good

    def diag(self, msg):
        """Print msg as TAP diagnostics ('# ' before each line)."""
        text = str(msg)
        out = sys.stdout if self.tap else sys.stderr
        for line in text.splitlines() or ['']:
            out.write('# ' + line + '\n')
        out.flush()

    def skip(self, reason, desc=''):
        """Record one skipped test point ('ok N - desc # SKIP reason'); return True."""
        self.count += 1
        desc = ' '.join(str(desc).split()).replace('#', '\\#')
        reason = ' '.join(str(reason).split())
        if self.tap:
            self._out('ok %d%s # SKIP %s' % (self.count, ' - ' + desc if desc else '', reason))
        return True

    def skip_all(self, reason):
        """Skip the whole test: print '1..0 # SKIP reason' and exit 0.  Under CI=true a test that cannot run
        proves nothing, so it fails instead: one 'not ok' point naming the reason."""
        if os.environ.get('CI', '') == 'true':
            self.ok(False, 'CI=true, but this test cannot run here: %s' % reason)
            self.done()
        if self.count:
            self.diag('skip_all after %d test points: %s' % (self.count, reason))
            self.done()
        self._out('1..0 # SKIP %s' % reason)
        self._done = True
        raise SkipAll(0)

    def done(self):
        """Print the plan '1..N' and exit: 0 if every point passed, else 1."""
        if self.count == 0:
            self.ok(False, 'the test recorded no test points')
        self._done = True
        if self.failed:
            self.diag('%d of %d failed in %.1f s' % (self.failed, self.count, time.monotonic() - self._t0))
            self._dump_logs()
        self._out('1..%d' % self.count)
        sys.exit(0 if self.failed == 0 else 1)

    def main(self, fn):
        """Run fn(h); an exception becomes 'not ok' with its traceback; then done()."""
        try:
            fn(self)
        except SystemExit:
            raise
        except BaseException as e:
            self._record_exception(type(e), e, e.__traceback__)
        if not self._done:
            self.done()

    def _record_exception(self, etype, value, tb):
        self.ok(False, 'uncaught exception: %s' % (traceback.format_exception_only(etype, value)[-1].strip()))
        self.diag(''.join(traceback.format_exception(etype, value, tb)).rstrip())

    def _excepthook(self, etype, value, tb):
        if not self.tap or issubclass(etype, SystemExit):
            return self._prev_excepthook(etype, value, tb)
        self._record_exception(etype, value, tb)
        if not self._done:
            self._done = True
            if self.failed:
                self._dump_logs()
            self._out('1..%d' % self.count)
        # The interpreter exits with status 1 after the hook returns.

    def _dump_logs(self):
        for m in self._managed:
            logs = [m.log] + (m.valgrind_logs() if isinstance(m, Proc) else [])
            for log in logs:
                if log and os.path.exists(log):
                    self.diag('---- last lines of %s (%s) ----' % (os.path.relpath(log, self.tmp), m.kind))
                    self.diag(_tail(log, 25))

    # ---- lifecycle ----
    def _register(self, managed):
        self._managed.append(managed)

    def _next(self, prefix):
        n = self._counter.get(prefix, 0) + 1
        self._counter[prefix] = n
        return '%s%d' % (prefix, n)

    def _on_signal(self, signum, frame):
        try:
            self.diag('terminated by signal %d: stopping started processes' % signum)
        except Exception:
            pass
        self.cleanup()
        os._exit(128 + signum)

    def cleanup(self):
        """Stop every process this harness started (by process group); remove tmp."""
        if self._cleaned:
            return
        self._cleaned = True
        for p in list(self._running):
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except OSError:
                pass
        # Daemons first, then the stores they use, PostgreSQL last.
        order = {'tdrain': 0, 'ferretdb': 1, 'etcd': 1, 'postgresql': 2}
        for m in sorted(self._managed, key=lambda x: order.get(x.kind, 0)):
            try:
                m._cleanup()
            except Exception as e:
                sys.stderr.write('harness: cleanup of %s: %s\n' % (m.name, e))
        failed = self.failed or (self.tap and not self._done)
        if failed and os.environ.get('KEEP_TMP', '') not in ('', '0'):
            sys.stderr.write('harness: kept %s\n' % self.tmp)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

    # ---- paths ----
    def tool(self, name):
        """Path of a built program (tdrain, tdrainctl, tdrain-loadgen, tests/lease_conformance)."""
        path = os.path.join(self.builddir, name)
        if not os.access(path, os.X_OK):
            raise FileNotFoundError('%s is not built (TDRAIN_BUILDDIR=%s)' % (name, self.builddir))
        return path

    def ferretdb_binary(self):
        """FERRETDB, else ${TDRAIN_CACHE:-~/.cache/tdrain}/bin/ferretdb (scripts/deps.sh builds it)."""
        path = os.environ.get('FERRETDB')
        if not path:
            cache = os.environ.get('TDRAIN_CACHE') or os.path.join(os.path.expanduser('~'), '.cache', 'tdrain')
            path = os.path.join(cache, 'bin', 'ferretdb')
        if not os.access(path, os.X_OK):
            raise RuntimeError('FerretDB not found at %s: run scripts/deps.sh' % path)
        return path

    def documentdb_gateway(self):
        """DOCUMENTDB_GATEWAY, else ${TDRAIN_CACHE:-~/.cache/tdrain}/documentdb/current/bin/documentdb_gateway
        (scripts/documentdb.sh builds it and installs the extensions into PostgreSQL 15)."""
        path = os.environ.get('DOCUMENTDB_GATEWAY')
        if not path:
            cache = os.environ.get('TDRAIN_CACHE') or os.path.join(os.path.expanduser('~'), '.cache', 'tdrain')
            path = os.path.join(cache, 'documentdb', 'current', 'bin', 'documentdb_gateway')
        if not os.access(path, os.X_OK):
            raise RuntimeError('DocumentDB gateway not found at %s: run scripts/deps.sh' % path)
        return path

    # ---- servers and daemons ----
    STORE_KINDS = ('ferretdb', 'documentdb')

    def for_store(self, store):
        """A StoreRun: this harness with test points labelled by store.label and a tmp of that store's own."""
        return StoreRun(self, store)

    def store_kinds(self, default=None):
        """The stores a test runs against: TDRAIN_TEST_STORES (space- or comma-separated, from
        STORE_KINDS plus 'ferretdb-postgresql'), else default (else every kind in STORE_KINDS)."""
        env = os.environ.get('TDRAIN_TEST_STORES', '').replace(',', ' ').split()
        kinds = env or list(default or self.STORE_KINDS)
        for k in kinds:
            if k not in ('ferretdb', 'ferretdb-sqlite', 'ferretdb-postgresql', 'documentdb'):
                raise ValueError('unknown store kind %r in TDRAIN_TEST_STORES' % k)
        return kinds

    def start_store(self, kind='ferretdb', pg_settings=None, extra_args=None):
        """Start a store of the given kind: 'ferretdb' (SQLite backend), 'ferretdb-postgresql', or
        'documentdb'.  Returns a Store or a DocumentDB; both have .kind, .uri, .client(), .db()."""
        if kind in ('ferretdb', 'ferretdb-sqlite'):
            return self.start_ferretdb('sqlite', pg_settings, extra_args)
        if kind == 'ferretdb-postgresql':
            return self.start_ferretdb('postgresql', pg_settings, extra_args)
        if kind == 'documentdb':
            return self.start_documentdb(pg_settings)
        raise ValueError('unknown store kind %r' % kind)

    def start_documentdb(self, pg_settings=None):
        """Start DocumentDB (a private PostgreSQL 15 cluster with the extensions, and the gateway) and wait
        until the gateway answers a ping.  Returns a DocumentDB."""
        return self._start_with_retry(lambda: DocumentDB(self, self._next('documentdb'), pg_settings))

    def start_ferretdb(self, backend='sqlite', pg_settings=None, extra_args=None):
        """Start FerretDB (backend 'sqlite' or 'postgresql', the latter on a private PostgreSQL 15)
        and wait until it answers a ping.  Returns a Store."""
        return self._start_with_retry(lambda: Store(self, self._next('ferretdb'), backend, pg_settings, extra_args))

    def start_etcd(self, extra_args=None):
        """Start an etcd member and wait until its v3 gateway answers.  Returns an Etcd."""
        return self._start_with_retry(lambda: Etcd(self, self._next('etcd'), extra_args))

    def _start_with_retry(self, make):
        # A port can still be taken between free_port() and the server's bind by
        # something outside the harness: try fresh ports a few times.
        for attempt in range(3):
            s = make()
            try:
                return s.start()
            except RuntimeError as e:
                if attempt == 2 or 'address already in use' not in str(e).lower():
                    raise
                self.diag('%s: port taken, retrying on another' % s.name)
                s._cleanup()
                self._managed.remove(s)

    def start_tdrain(self, name, config, args=None, env=None):
        """Write h.tmp/<name>.conf from config ("key = value" lines) and launch
        tdrain -c CONF -N name [args...] with output to h.tmp/<name>.log.

        env adds to (None values remove from) the environment.  Under
        TDRAIN_VALGRIND=1 the daemon runs in valgrind (exit status 99 on errors).
        Returns a Proc (no readiness wait)."""
        conf = os.path.join(self.tmp, name + '.conf')
        with open(conf, 'w') as f:
            f.write(self.config_text(config))
        argv = [self.tool('tdrain'), '-c', conf, '-N', name] + [str(a) for a in (args or [])]
        if self.valgrind:
            # valgrind's report goes to its own file so the daemon's log stays as it is.
            vlog = os.path.join(self.tmp, name + '.valgrind.%p.log')
            argv = ['valgrind', '--error-exitcode=99', '--leak-check=full', '--errors-for-leak-kinds=definite',
                    '--show-leak-kinds=definite', '--num-callers=30', '--log-file=' + vlog] + \
                shlex.split(os.environ.get('TDRAIN_VALGRIND_ARGS', '')) + argv
        p = Proc(self, name, conf, argv, self._environ(env))
        return p.start()

    @staticmethod
    def config_text(config):
        """The "key = value" text of a config dict (bools as true/false)."""
        lines = []
        for k, v in config.items():
            if isinstance(v, bool):
                v = 'true' if v else 'false'
            lines.append('%s = %s\n' % (k, v))
        return ''.join(lines)

    @staticmethod
    def _environ(env):
        e = dict(os.environ)
        for k, v in (env or {}).items():
            if v is None:
                e.pop(k, None)
            else:
                e[k] = str(v)
        return e

    # ---- helpers ----
    def run(self, argv, timeout=120, check=False, env=None, input=None, cwd=None):
        """Run a command to completion; return subprocess.CompletedProcess (text stdout/stderr).

        env adds to (None values remove from) the environment.  On timeout the
        command's process group is killed and returncode is None.  check=True
        raises CalledProcessError on a non-zero status."""
        argv = [str(a) for a in argv]
        if os.environ.get('HARNESS_VERBOSE'):
            self.diag('run: ' + ' '.join(shlex.quote(a) for a in argv))
        p = subprocess.Popen(argv, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=self._environ(env), cwd=cwd, start_new_session=True)
        self._running.add(p)
        try:
            out, err = p.communicate(input=input, timeout=timeout)
            rc = p.returncode
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except OSError:
                pass
            out, err = p.communicate()
            rc = None
            self.diag('timed out after %s s: %s' % (timeout, ' '.join(argv)))
        finally:
            self._running.discard(p)
        r = subprocess.CompletedProcess(argv, rc, out, err)
        r.timed_out = rc is None
        if check and rc != 0:
            raise subprocess.CalledProcessError(rc if rc is not None else -9, argv, out, err)
        return r

    def wait_until(self, pred, timeout, interval=0.1, desc=''):
        """Poll pred() until it is true (True) or timeout seconds pass (False).

        An exception from pred counts as false; the last one is reported with
        desc when the wait times out."""
        deadline = time.monotonic() + timeout
        last_exc = None
        while True:
            try:
                if pred():
                    return True
            except Exception as e:
                last_exc = e
            if time.monotonic() >= deadline:
                if desc:
                    self.diag('timed out after %.1f s waiting for %s%s'
                              % (timeout, desc, ' (last error: %s)' % last_exc if last_exc else ''))
                return False
            time.sleep(interval)

    def load_when_held(self, db, uri, names, count, timeout=60):
        """Wait until every replica in names holds a partition lease, then put count events (100 devices,
        50 users) in the FIFO with tdrain-loadgen: two TAP points.  Loaded earlier, the first replica to
        start can drain every event before the others' partitions move to it (CI rehearsals: 3000 / 0 on
        DocumentDB, 2000 / 0 on FerretDB), and a test that needs every replica to report work fails."""
        want = set(names)
        self.ok(self.wait_until(lambda: partition_holders(db) >= want, timeout, interval=0.5,
                                desc='every replica holds partitions'),
                'replicas %s hold partitions before the events arrive (%s)'
                % (', '.join(sorted(want)), sorted(x for x in partition_holders(db) if x)))
        r = self.run([self.tool('tdrain-loadgen'), '--uri', uri, '--count', str(count), '--devices', '100',
                      '--users', '50', '--quiet'], timeout=300)
        self.ok(r.returncode == 0, 'loadgen put %d events in the FIFO' % count)


# --------------------------------------------------------------------------
# Command line: serve
# --------------------------------------------------------------------------

def _serve(argv):
    import argparse
    ap = argparse.ArgumentParser(prog='harness.py serve',
                                 description='Start FerretDB and/or etcd on free loopback ports; print their '
                                 'endpoints; keep them running until stdin closes or SIGTERM/SIGINT.')
    ap.add_argument('--ferretdb', action='store_true', help='start FerretDB')
    ap.add_argument('--backend', choices=('sqlite', 'postgresql'), default='sqlite', help='FerretDB backend')
    ap.add_argument('--pg-set', action='append', default=[], metavar='NAME=VALUE',
                    help='PostgreSQL setting (postgresql backend), repeatable')
    ap.add_argument('--documentdb', action='store_true', help='start DocumentDB (PostgreSQL + gateway)')
    ap.add_argument('--etcd', action='store_true', help='start etcd')
    ap.add_argument('--json', action='store_true', help='print one JSON line (default: shell assignments)')
    ap.add_argument('--no-stdin', action='store_true', help='ignore stdin; run until SIGTERM/SIGINT')
    ap.add_argument('--keep', action='store_true', help='keep the data directory at exit')
    a = ap.parse_args(argv)
    if not (a.ferretdb or a.documentdb or a.etcd):
        ap.error('nothing to serve: give --ferretdb, --documentdb and/or --etcd')

    h = Harness(name='serve', tap=False)
    info = {'tmp': h.tmp, 'pid': os.getpid()}
    try:
        if a.ferretdb:
            settings = dict(kv.split('=', 1) for kv in a.pg_set)
            m = h.start_ferretdb(backend=a.backend, pg_settings=settings)
            info['ferretdb'] = {'uri': m.uri, 'port': m.port, 'pid': m.pid, 'backend': m.backend,
                                'log': m.log, 'dir': m.dir}
            if m.pg is not None:
                info['postgresql'] = {'port': m.pg.port, 'pid': m.pg.pid, 'socket_dir': m.pg.socket_dir,
                                      'url': m.pg.url, 'log': m.pg.log}
        if a.documentdb:
            settings = dict(kv.split('=', 1) for kv in a.pg_set)
            d = h.start_documentdb(pg_settings=settings)
            info['documentdb'] = {'uri': d.uri, 'port': d.port, 'pid': d.pid, 'log': d.log, 'dir': d.dir,
                                  'pg_port': d.pg.port, 'pg_pid': d.pg.pid, 'pg_socket_dir': d.pg.socket_dir}
        if a.etcd:
            e = h.start_etcd()
            info['etcd'] = {'endpoint': e.endpoint, 'port': e.port, 'pid': e.pid, 'log': e.log, 'dir': e.dir}
    except Exception as e:
        sys.stderr.write('harness serve: %s\n' % e)
        h.failed = 1
        sys.exit(1)
    if a.keep:
        os.environ['KEEP_TMP'] = '1'
        h.failed = 1    # cleanup() keeps tmp only for a "failed" run
    if a.json:
        print(json.dumps(info, sort_keys=True), flush=True)
    else:
        lines = ['SERVE_TMP=%s' % shlex.quote(h.tmp), 'SERVE_PID=%d' % os.getpid()]
        if 'ferretdb' in info:
            lines.append('FERRETDB_URI=%s' % shlex.quote(info['ferretdb']['uri']))
        if 'documentdb' in info:
            lines.append('DOCUMENTDB_URI=%s' % shlex.quote(info['documentdb']['uri']))
        if 'etcd' in info:
            lines.append('ETCD_ENDPOINT=%s' % shlex.quote(info['etcd']['endpoint']))
        print('\n'.join(lines), flush=True)
    try:
        if a.no_stdin:
            while True:
                signal.pause()
        else:
            while sys.stdin.buffer.read1(65536) if hasattr(sys.stdin.buffer, 'read1') else sys.stdin.read(1):
                pass
    except (KeyboardInterrupt, OSError):
        pass
    h.cleanup()
    return 0


if __name__ == '__main__':
    if len(sys.argv) >= 2 and sys.argv[1] == 'serve':
        sys.exit(_serve(sys.argv[2:]))
    sys.stderr.write('usage: %s serve [--ferretdb [--backend sqlite|postgresql]] [--documentdb] [--etcd] [--json] '
                     '[--no-stdin]\n'
                     % sys.argv[0])
    sys.exit(64)
