#!/usr/bin/env python3
"""The Debian package under a real systemd (issue 16): build tdrain_<version>_amd64.deb with
dpkg-buildpackage from a copy of the source tree (or take TDRAIN_DEB=path/to/tdrain_*.deb), check it with
lintian, install it with "apt-get install ./tdrain_*.deb" inside a systemd booted as PID 1 of a private
PID + mount namespace (scripts/systemd-ns.sh, as t11_systemd does), run two replicas the way README
"Install" says, remove it, purge it, and check that nothing is left; once per store of h.store_kinds()
(FerretDB, DocumentDB), each in a namespace booted for it, with the package built once.

The package is installed on the HOST's file system (the namespace shares it): /usr/sbin/tdrain,
/lib/systemd/system/tdrain@.service, /etc/tdrain, the tdrain user in /etc/passwd, the catalog database.
So the test refuses to run (skip, or failure under CI=true) when the host already has a tdrain package,
/etc/tdrain or /var/lib/tdrain: purging would delete someone else's configuration.  It holds t11's lock
(/run/lock/tdrain-t11.lock): both use the unit name, /var/lib/tdrain and the catalog.  Inside the namespace
/usr/sbin/policy-rc.d (Docker's "exit 101", which forbids every service action) is hidden under one that
allows them, so the maintainer scripts act as on a real machine.

Checks:
  1. the .deb builds (DEB_BUILD_OPTIONS=nocheck: make check has run the unit tests already; the package
     build's own test step runs them too when nocheck is not given); lintian reports no error (E:);
  2. apt-get install: the tdrain user and group exist (sysusers.d); /etc/tdrain is 0750 root:tdrain and
     tdrain.conf 0640 root:tdrain, a conffile (tmpfiles.d); /var/lib/tdrain exists; tdrain@.service is
     loaded from /lib/systemd/system and nothing was enabled or started; the man pages are in place; the
     catalog database knows tdrain's MESSAGE_IDs (systemd's dpkg trigger ran journalctl --update-catalog);
  3. the administrator edits /etc/tdrain/tdrain.conf (partitioned mode, the test's store) and one
     environment file per replica (TDRAIN_METRICS_LISTEN), then "systemctl enable --now tdrain@a tdrain@b":
     both become active, the FIFO of N events drains and every delta is folded, both replicas processed
     events (their /metrics endpoints, served from inside the sandboxed unit), and
     "journalctl -u 'tdrain@*' TDRAIN_EVENT=lease_acquired" answers for both; journalctl -x shows the
     catalog's text;
  4. apt-get remove: both instances are stopped (exit status 0, lease_released logged) before the files go;
     the conffile stays (dpkg keeps configuration until purge);
  5. apt-get purge: dpkg knows no tdrain; no file the package listed is left, nor /etc/tdrain,
     /var/lib/tdrain, the enabled-instance links, the catalog entries; systemd no longer knows the unit.
     The tdrain user and group remain, as Debian policy has it (a package does not remove a system user:
     files may still belong to it); the test checks that, then deletes them itself when it created them.
Runs as root only.  Outside CI a missing tool (dpkg-buildpackage, apt-get, lintian, unshare, ...) skips the
test with the reason; under CI=true it is a failure.
"""
import atexit
import fcntl
import glob
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
import harness  # noqa: E402

N = 3000
P = 8
TTL, DEADLINE, RETRY, STORE_TIMEOUT = 6000, 4500, 1000, 3000
LOCK = '/run/lock/tdrain-t11.lock'       # shared with t11_systemd
STATE_FMT = '/run/tdrain-t14-%d.pid'     # systemd-ns.sh state file; %d = this test's PID
PRIV = '/run/tdrain-t14'                 # inside the namespace (its own /run)
MSGID_ACQUIRED = '724d891925b54df2b184781b9e84e662'


def dpkg_status(h):
    r = h.run(['dpkg-query', '-W', '-f=${db:Status-Abbrev}', 'tdrain'])
    return r.stdout.strip() if r.returncode == 0 else ''


def show(ns, unit, *props):
    r = ns.run('systemctl', 'show', '-p', ','.join(props), unit)
    return dict(line.split('=', 1) for line in r.stdout.splitlines() if '=' in line)


def journal(ns, since, *args):
    r = ns.run('journalctl', '--no-pager', '-o', 'json', '--since', '@%.6f' % since, *args)
    out = []
    for line in r.stdout.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def msg(x):
    v = x.get('MESSAGE', '')
    if isinstance(v, list):
        v = bytes(v).decode('utf-8', 'replace')
    return v or ''


def metric(text, name, replica):
    m = re.search(r'^%s\{replica="%s"\} (\S+)$' % (re.escape(name), re.escape(replica)), text, re.M)
    return float(m.group(1)) if m else None


def scrape(port):
    with urllib.request.urlopen('http://127.0.0.1:%d/metrics' % port, timeout=3) as r:
        return r.read().decode()


def copy_source(h, dest):
    """The source tree as a fresh checkout would have it: git's tracked and untracked-but-not-ignored
    files when srcdir is a git work tree (uncommitted edits included), else everything but build
    products (a distribution tarball's tree)."""
    src = h.srcdir
    r = h.run(['git', '-C', src, 'ls-files', '-z', '--cached', '--others', '--exclude-standard'])
    if r.returncode == 0 and r.stdout:
        for rel in r.stdout.split('\0'):
            if not rel or not os.path.lexists(os.path.join(src, rel)):
                continue
            d = os.path.join(dest, rel)
            os.makedirs(os.path.dirname(d), exist_ok=True)
            shutil.copy2(os.path.join(src, rel), d, follow_symlinks=False)
        return 'git ls-files of %s' % src
    shutil.copytree(src, dest, symlinks=True, ignore=shutil.ignore_patterns(
        'build', 'build-*', '_build', 'autom4te.cache', '*.o', '*.a', '.deps', '*.log', '*.trs'))
    return 'a copy of %s' % src


def build_deb(h):
    given = os.environ.get('TDRAIN_DEB')
    if given:
        if not os.path.isfile(given):
            raise FileNotFoundError('TDRAIN_DEB=%s: no such file' % given)
        h.diag('using TDRAIN_DEB=%s' % given)
        return os.path.abspath(given), None
    work = os.path.join(h.tmp, 'pkg')
    src = os.path.join(work, 'tdrain')
    how = copy_source(h, src)
    t = time.monotonic()
    r = h.run(['dpkg-buildpackage', '-us', '-uc', '-b'], cwd=src, timeout=1200,
              env={'DEB_BUILD_OPTIONS': 'nocheck parallel=%d' % max(1, min(2, os.cpu_count() or 1))})
    debs = [d for d in glob.glob(os.path.join(work, 'tdrain_*_*.deb'))]
    h.ok(r.returncode == 0 and len(debs) == 1,
         'dpkg-buildpackage -us -uc -b built %s from %s in %.0f s'
         % ([os.path.basename(d) for d in debs], how, time.monotonic() - t))
    if r.returncode != 0 or len(debs) != 1:
        h.diag((r.stdout + r.stderr)[-3000:])
        raise RuntimeError('no package to test')
    changes = glob.glob(os.path.join(work, 'tdrain_*.changes'))
    return debs[0], (changes[0] if changes else None)


def main(h):
    if os.geteuid() != 0:
        h.skip_all('needs root (installs a package, boots a systemd in a PID + mount namespace)')
    tools = ['apt-get', 'dpkg', 'dpkg-query', 'lintian', 'unshare', 'nsenter', 'setsid', 'userdel']
    if not os.environ.get('TDRAIN_DEB'):
        tools += ['dpkg-buildpackage', 'dh', 'fakeroot']
    for tool in tools:
        if shutil.which(tool) is None:
            h.skip_all('%s not found (scripts/deps.sh installs it)' % tool)
    if not os.access('/lib/systemd/systemd', os.X_OK):
        h.skip_all('/lib/systemd/systemd not found (apt-get install systemd)')

    os.makedirs(os.path.dirname(LOCK), exist_ok=True)
    lockfd = os.open(LOCK, os.O_CREAT | os.O_RDWR, 0o644)
    deadline = time.monotonic() + 300
    while True:
        try:
            fcntl.flock(lockfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError:
            if time.monotonic() > deadline:
                h.skip_all('another systemd test held %s for 300 s' % LOCK)
            time.sleep(1)
    for state in glob.glob(STATE_FMT.replace('%d', '*')):
        m = re.search(r'-(\d+)\.pid$', state)
        if m and not harness.pid_alive(int(m.group(1))):
            h.diag('stopping the namespace systemd of a dead run (%s)' % state)
            harness.SystemdNamespace(h, state).stop()
    st = dpkg_status(h)
    if st and not st.startswith('un') and not st.startswith('pn'):
        h.skip_all('the host has a tdrain package (dpkg status %r): this test would purge it' % st)
    for p in ('/etc/tdrain', '/var/lib/tdrain', '/lib/systemd/system/tdrain@.service'):
        if os.path.lexists(p):
            h.skip_all('the host has %s: purging the test package would delete it' % p)

    deb, changes = build_deb(h)
    r = h.run(['lintian', '--pedantic', '--show-overrides', changes or deb], timeout=600)
    tags = [l for l in (r.stdout + r.stderr).splitlines() if re.match(r'^[EWIPOX]: ', l)]
    errors = [l for l in tags if l.startswith('E: ')]
    h.ok(not errors, 'lintian --pedantic --show-overrides %s: no error (%d tags: %s)'
         % (os.path.basename(changes or deb), len(tags), tags[:8]))

    had_user = any(l.startswith('tdrain:') for l in open('/etc/passwd'))
    had_group = any(l.startswith('tdrain:') for l in open('/etc/group'))
    for kind in h.store_kinds():
        run_store(h, kind, deb, had_user, had_group)


def run_store(h, kind, deb, had_user, had_group):
    """Install, run against a store of this kind, remove and purge, in a namespace booted for it."""
    ns = harness.SystemdNamespace(h, STATE_FMT % os.getpid())
    state = {'torn_down': False}

    def teardown():
        if state['torn_down']:
            return
        state['torn_down'] = True
        try:
            if ns.pid is not None and harness.pid_alive(ns.pid):
                ns.run('systemctl', 'stop', 'tdrain@a.service', 'tdrain@b.service', timeout=60)
        except Exception:
            pass
        ns.stop()
        # A run that failed half-way must not leave the package on the host.
        s = dpkg_status(h)
        if s and not s.startswith('un') and not s.startswith('pn'):
            h.run(['dpkg', '--purge', 'tdrain'], timeout=120,
                  env={'DEBIAN_FRONTEND': 'noninteractive'})
        if not had_user and any(l.startswith('tdrain:') for l in open('/etc/passwd')):
            h.run(['userdel', 'tdrain'])
        if not had_group and any(l.startswith('tdrain:') for l in open('/etc/group')):
            h.run(['groupdel', 'tdrain'])

    orig_cleanup = h.cleanup

    def cleanup():
        try:
            teardown()
        finally:
            orig_cleanup()
    h.cleanup = cleanup
    atexit.register(teardown)

    crashed = False
    try:
        run_checks(h, ns, state, kind, deb, had_user)
    except Exception:
        crashed = True
        raise
    finally:
        if (crashed or h.failed) and ns.pid is not None and harness.pid_alive(ns.pid):
            r = ns.run('journalctl', '--no-pager', '-o', 'short-precise', '--since', '@%.6f' % state.get('t0', 0),
                       '-u', 'tdrain@*', '-n', '60')
            h.diag('---- journalctl -u tdrain@* (last 60 lines) ----\n' + r.stdout.rstrip())
        teardown()
        h.cleanup = orig_cleanup
        if state.get('store') is not None:
            state['store'].stop()
    h = state.get('h') or h
    h.ok(ns.pid is None or not harness.pid_alive(ns.pid), 'the namespace systemd (PID %s) is gone' % ns.pid)
    left = [p for p in ('/etc/tdrain', '/var/lib/tdrain', '/usr/sbin/tdrain', ns.state) if os.path.lexists(p)]
    h.ok(not left and (had_user or not any(l.startswith('tdrain:') for l in open('/etc/passwd'))),
         'the host is as before the test (nothing of %s left; the user deleted by the test)' % left)


def run_checks(h, ns, state, kind, deb, had_user):
    why = ns.start()
    if why:
        h.skip_all('cannot boot systemd in a PID + mount namespace here: ' + why)
    r = ns.run('findmnt', '-n', '-o', 'FSTYPE', '/run')
    if r.stdout.strip() != 'tmpfs':
        h.skip_all('the namespace has no private /run (findmnt: %r)' % r.stdout.strip())
    priv = ns.root + PRIV
    os.makedirs(priv, exist_ok=True)
    if os.path.exists('/usr/sbin/policy-rc.d'):
        with open(priv + '/policy-rc.d', 'w') as f:
            f.write('#!/bin/sh\n# t14_deb: service actions allowed inside the test namespace\nexit 0\n')
        os.chmod(priv + '/policy-rc.d', 0o755)
        r = ns.run('mount', '--bind', PRIV + '/policy-rc.d', '/usr/sbin/policy-rc.d')
        if r.returncode != 0:
            raise RuntimeError('bind mount over policy-rc.d: %s' % r.stderr)
        h.diag('policy-rc.d of the host hidden inside the namespace (it refuses every service action)')

    m = state['store'] = h.start_store(kind)
    h = state['h'] = h.for_store(m)       # points labelled [<store>] from here on
    db = m.db()

    # ---------------------------------------------------------------- install
    apt_env = {'DEBIAN_FRONTEND': 'noninteractive'}
    t = time.monotonic()
    r = ns.run('sh', '-c', 'cd "$1" && exec apt-get install -y -q --no-install-recommends '
               '-o DPkg::Lock::Timeout=600 ./"$2"', 'sh', os.path.dirname(deb), os.path.basename(deb),
               timeout=900, env=apt_env)
    h.ok(r.returncode == 0 and dpkg_status(h).startswith('ii'),
         'apt-get install ./%s (%.0f s): dpkg status %r' % (os.path.basename(deb), time.monotonic() - t,
                                                           dpkg_status(h)))
    if r.returncode != 0:
        h.diag((r.stdout + r.stderr)[-3000:])
        raise RuntimeError('the package did not install')
    files = [l for l in h.run(['dpkg-query', '-L', 'tdrain']).stdout.splitlines() if l.startswith('/')]
    h.diag('the package owns %d paths' % len(files))

    pw = [l.split(':') for l in open('/etc/passwd') if l.startswith('tdrain:')]
    gr = [l.split(':') for l in open('/etc/group') if l.startswith('tdrain:')]
    h.ok(pw and gr and int(pw[0][2]) < 1000 and pw[0][3] == gr[0][2],
         'sysusers.d created the system user and group tdrain: %s' % (':'.join(pw[0]).strip() if pw else None))
    gid = int(gr[0][2]) if gr else -1

    def mode_owner(p):
        s = os.stat(p)
        return stat.S_IMODE(s.st_mode), s.st_uid, s.st_gid
    h.is_(mode_owner('/etc/tdrain'), (0o750, 0, gid), '/etc/tdrain is 0750 root:tdrain')
    h.is_(mode_owner('/etc/tdrain/tdrain.conf'), (0o640, 0, gid), '/etc/tdrain/tdrain.conf is 0640 root:tdrain')
    conff = h.run(['dpkg-query', '-W', '-f=${Conffiles}', 'tdrain']).stdout
    h.ok('/etc/tdrain/tdrain.conf ' in conff, '/etc/tdrain/tdrain.conf is a conffile: %s' % conff.strip())
    h.ok(os.path.isdir('/var/lib/tdrain'), '/var/lib/tdrain exists (tmpfiles.d)')
    u = show(ns, 'tdrain@a.service', 'LoadState', 'FragmentPath', 'UnitFileState', 'ActiveState')
    h.ok(u.get('LoadState') == 'loaded' and u.get('FragmentPath') == '/lib/systemd/system/tdrain@.service'
         and u.get('UnitFileState') == 'disabled' and u.get('ActiveState') == 'inactive',
         'tdrain@.service is loaded from /lib/systemd/system, disabled and inactive: %s' % u)
    r = ns.run('systemctl', 'list-units', '--all', '--no-legend', '--plain', 'tdrain@*')
    wants = glob.glob('/etc/systemd/system/*/tdrain@*.service')
    h.ok(r.stdout.strip() == '' and not wants, 'installing enabled and started nothing (%r, %s)'
         % (r.stdout.strip(), wants))
    mans = ['/usr/share/man/man8/tdrain.8.gz', '/usr/share/man/man8/tdrainctl.8.gz',
            '/usr/share/man/man5/tdrain.conf.5.gz']
    h.ok(all(os.path.exists(x) for x in mans), 'man pages tdrain(8), tdrainctl(8), tdrain.conf(5) installed')
    r = ns.run('journalctl', '--no-pager', '--list-catalog', MSGID_ACQUIRED)
    h.ok('tdrain replica' in r.stdout, 'the catalog database knows tdrain (systemd trigger): %s'
         % r.stdout.strip()[:100])

    # ---------------------------------------------------------------- configure and start, as README says
    conf = {
        'store.uri': m.uri,
        'store.database': 'tdrain',
        'coord.mode': 'partitioned',
        'coord.partitions': P,
        'coord.lease_ttl_ms': TTL,
        'coord.renew_deadline_ms': DEADLINE,
        'coord.retry_period_ms': RETRY,
        'store.timeout_ms': STORE_TIMEOUT,
        'fold.interval_ms': 100,
    }
    with open('/etc/tdrain/tdrain.conf', 'a') as f:
        f.write('\n# t14_deb\n' + h.config_text(conf))
    ports = {}
    for name in ('a', 'b'):
        ports[name] = harness.free_port()
        with open('/etc/tdrain/%s.env' % name, 'w') as f:
            f.write('TDRAIN_METRICS_LISTEN=127.0.0.1:%d\nTDRAIN_METRICS_FILE=/var/lib/tdrain/%s/tdrain.prom\n'
                    % (ports[name], name))
        os.chmod('/etc/tdrain/%s.env' % name, 0o600)
    h.is_(mode_owner('/etc/tdrain/tdrain.conf'), (0o640, 0, gid), 'the edited file keeps 0640 root:tdrain')
    r = ns.run('runuser', '-u', 'tdrain', '--', '/usr/sbin/tdrain', '-c', '/etc/tdrain/tdrain.conf', '-N', 'a', '-n')
    h.ok(r.returncode == 0 and 'configuration OK' in r.stdout,
         'runuser -u tdrain -- tdrain -c /etc/tdrain/tdrain.conf -N a -n: %s' % (r.stdout + r.stderr).strip())

    t0 = time.time() - 1
    r = ns.run('systemctl', 'enable', '--now', 'tdrain@a', 'tdrain@b', timeout=120)
    s = {n: show(ns, 'tdrain@%s.service' % n, 'ActiveState', 'SubState', 'StatusText', 'InvocationID',
                 'UnitFileState') for n in ('a', 'b')}
    h.ok(r.returncode == 0 and all(x.get('ActiveState') == 'active' and x.get('UnitFileState') == 'enabled'
                                   for x in s.values()),
         'systemctl enable --now tdrain@a tdrain@b: both enabled and active %s'
         % {n: (x.get('ActiveState'), x.get('StatusText')) for n, x in s.items()})
    h.load_when_held(db, m.uri, ('a', 'b'), N)
    drained = h.wait_until(lambda: db.events.count_documents({}) == 0 and db.tdrain_deltas.count_documents({}) == 0,
                           180, interval=1, desc='FIFO drained and folded')
    h.ok(drained, 'the FIFO of %d events drained and every delta was folded' % N)
    got = {}

    def settled():
        for n in ('a', 'b'):
            got[n] = metric(scrape(ports[n]), 'tdrain_events_processed_total', n)
        return all(v is not None for v in got.values()) and sum(got.values()) >= N
    h.wait_until(settled, 15, desc='processed totals over /metrics')
    h.ok(all((v or 0) > 0 for v in got.values()) and sum(v or 0 for v in got.values()) >= N,
         'both replicas drained, as their metrics.listen endpoints say: %s (sum >= %d)' % (got, N))
    acq = []
    h.wait_until(lambda: acq.__setitem__(slice(None), journal(ns, t0, '-u', 'tdrain@*',
                                                               'TDRAIN_EVENT=lease_acquired'))
                 or {x.get('TDRAIN_REPLICA') for x in acq} >= {'a', 'b'}, 10)
    who = sorted({(x.get('TDRAIN_REPLICA'), x.get('TDRAIN_LEASE')) for x in acq})
    h.ok({x.get('TDRAIN_REPLICA') for x in acq} >= {'a', 'b'}
         and all(x.get('MESSAGE_ID') == MSGID_ACQUIRED and str(x.get('TDRAIN_EPOCH', '')).isdigit() for x in acq),
         "journalctl -u 'tdrain@*' TDRAIN_EVENT=lease_acquired answers for both replicas: %s" % who)
    r = ns.run('journalctl', '-x', '--no-pager', '-u', 'tdrain@a.service', 'TDRAIN_EVENT=lease_acquired', '-n', '1')
    h.ok('Subject: tdrain replica a acquired lease' in r.stdout and 'Defined-By: tdrain' in r.stdout,
         'journalctl -x shows the catalog entry the package installed')

    # ---------------------------------------------------------------- remove: instances stop first
    t_rm = time.time()
    r = ns.run('apt-get', 'remove', '-y', '-q', '-o', 'DPkg::Lock::Timeout=600', 'tdrain', timeout=300, env=apt_env)
    st = dpkg_status(h)
    after = {n: show(ns, 'tdrain@%s.service' % n, 'ActiveState', 'Result', 'ExecMainStatus', 'LoadState')
             for n in ('a', 'b')}
    h.ok(r.returncode == 0 and st.startswith('rc'), 'apt-get remove tdrain: dpkg status %r' % st)
    rel = [x for x in journal(ns, t_rm, '-u', 'tdrain@*') if x.get('TDRAIN_EVENT') in ('lease_released',
                                                                                        'partition_revoked')]
    ends = [x for x in journal(ns, t_rm, '-u', 'tdrain@*') if x.get('_PID') == '1'
            and re.search(r'Deactivated successfully|Stopped ', msg(x))]
    h.ok(all(x.get('ActiveState') in ('inactive', '') for x in after.values())
         and {x.get('TDRAIN_REPLICA') for x in rel} >= {'a', 'b'} and len(ends) >= 2,
         'removing stopped both instances, which released their leases: %s, %d releases, %d stops'
         % (after, len(rel), len(ends)))
    h.ok(all(x.get('Result') == 'success' and x.get('ExecMainStatus') == '0' for x in after.values()),
         'they exited with status 0 (Result=success, ExecMainStatus=0)')
    h.ok(os.path.exists('/etc/tdrain/tdrain.conf') and not os.path.exists('/usr/sbin/tdrain'),
         'after remove the configuration stays and the daemon is gone')

    # ---------------------------------------------------------------- purge: nothing left
    r = ns.run('apt-get', 'purge', '-y', '-q', '-o', 'DPkg::Lock::Timeout=600', 'tdrain', timeout=300, env=apt_env)
    st = dpkg_status(h)
    h.ok(r.returncode == 0 and (st == '' or st.startswith('un') or st.startswith('pn')),
         'apt-get purge tdrain: dpkg status %r' % st)
    # Directories such as /usr/share/man are shared with other packages: of the directories the
    # package lists, only its own (named after it) must be gone.
    left = [p for p in files if os.path.lexists(p) and (not os.path.isdir(p) or 'tdrain' in p)]
    left += [p for p in ('/etc/tdrain', '/var/lib/tdrain') if os.path.lexists(p)]
    left += glob.glob('/etc/systemd/system/*/tdrain@*.service')
    h.ok(not left, 'after purge no file of the package, no /etc/tdrain, /var/lib/tdrain or instance link is '
         'left %s' % left[:8])
    r = ns.run('journalctl', '--no-pager', '--list-catalog', MSGID_ACQUIRED)
    h.ok('tdrain' not in r.stdout, 'the catalog database was rebuilt without tdrain')
    u = show(ns, 'tdrain@a.service', 'LoadState')
    r2 = ns.run('systemctl', 'list-units', '--all', '--no-legend', '--plain', 'tdrain@*')
    h.ok(u.get('LoadState') == 'not-found' and r2.stdout.strip() == '',
         'systemd no longer knows tdrain@.service (%s; units: %r)' % (u, r2.stdout.strip()))
    user_left = any(l.startswith('tdrain:') for l in open('/etc/passwd'))
    h.ok(user_left, 'the tdrain user remains after purge, as Debian policy has it (the test deletes it%s)'
         % (' at the end' if not had_user else ': no, it was there before'))


harness.Harness().main(main)
