#!/usr/bin/env python3
"""A real Prometheus scrapes metrics.listen (issue 16).

Two replicas in partitioned mode drain N events from each store of h.store_kinds() (FerretDB and DocumentDB), each serving GET /metrics on its own
127.0.0.1 port.  Debian's prometheus runs on a free loopback port with a configuration, a data directory
and the shipped rules (contrib/prometheus/tdrain.rules.yml) of this test's own, scraping both every second;
it is stopped by PID at the end (the harness started it in its own process group).  Checks:
  1. both targets are "up" in /api/v1/targets;
  2. once the drain is over and the counters are steady, /api/v1/query returns tdrain_backlog_events and
     tdrain_events_processed_total for both replicas, equal to what each replica's /metrics says (and the
     processed totals add up to N);
  3. /api/v1/rules: the shipped rule group loads and evaluates without error, and TdrainLeaderless is not
     firing (a replica holds the leader lease);
  4. a hostile client holding idle connections to one replica's endpoint (more than its connection limit)
     neither stalls the drain (M more events drain meanwhile) nor grows the replica's memory beyond a
     bound; the endpoint closes them after its idle timeout and Prometheus scrapes it again.
Outside CI a missing prometheus (Debian package prometheus) skips the test; under CI=true it fails.
"""
import json
import os
import re
import shutil
import socket
import sys
import time
import urllib.parse
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
import harness  # noqa: E402

N = 2000
M = 500
P = 8
IDLE_TIMEOUT_S = 10      # TDR_METRICS_HTTP_TIMEOUT_S
HOSTILE_CONNS = 40       # above TDR_METRICS_HTTP_MAX_CONN (16)


class Prometheus(harness._Managed):
    kind = 'prometheus'
    ready_timeout = 60.0

    def __init__(self, h, binary, targets, rules):
        super().__init__(h, 'prometheus', os.path.join(h.tmp, 'prometheus.log'))
        self.binary = binary
        self.port = harness.free_port()
        self.data = os.path.join(h.tmp, 'prometheus-data')
        self.conf = os.path.join(h.tmp, 'prometheus.yml')
        with open(self.conf, 'w') as f:
            f.write('global:\n  scrape_interval: 1s\n  scrape_timeout: 800ms\n  evaluation_interval: 1s\n'
                    'rule_files:\n  - %s\n'
                    'scrape_configs:\n  - job_name: tdrain\n    static_configs:\n      - targets: [%s]\n'
                    % (json.dumps(rules), ', '.join("'%s'" % t for t in targets)))

    def _argv(self):
        return [self.binary, '--config.file=' + self.conf, '--storage.tsdb.path=' + self.data,
                '--web.listen-address=127.0.0.1:%d' % self.port, '--log.level=warn']

    def _ready(self):
        with urllib.request.urlopen('http://127.0.0.1:%d/-/ready' % self.port, timeout=1) as r:
            return r.status == 200

    def api(self, path, **params):
        url = 'http://127.0.0.1:%d/api/v1/%s' % (self.port, path)
        if params:
            url += '?' + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=5) as r:
            doc = json.loads(r.read().decode())
        if doc.get('status') != 'success':
            raise RuntimeError('%s: %s' % (url, doc))
        return doc['data']

    def query(self, q):
        """{replica: value} of an instant query."""
        return {x['metric'].get('replica'): float(x['value'][1]) for x in self.api('query', query=q)['result']}


def scrape(port, timeout=3):
    with urllib.request.urlopen('http://127.0.0.1:%d/metrics' % port, timeout=timeout) as r:
        return r.read().decode()


def metric(text, name, replica):
    m = re.search(r'^%s\{replica="%s"\} (\S+)$' % (re.escape(name), re.escape(replica)), text, re.M)
    return float(m.group(1)) if m else None


def rss_kib(pid):
    with open('/proc/%d/status' % pid) as f:
        return int(re.search(r'^VmRSS:\s+(\d+)', f.read(), re.M).group(1))


def main(h):
    binary = shutil.which('prometheus')
    if binary is None:
        reason = 'prometheus not found (Debian package prometheus; scripts/deps.sh installs it)'
        h.skip_all(reason)
    for kind in h.store_kinds():
        run(h, kind, binary)


def run(h, kind, binary):
    """Everything below against one store kind (a Prometheus, two replicas and a store of its own)."""
    m = h.start_store(kind)
    h = h.for_store(m)       # points labelled [<store>]
    db = m.db()

    ports = {n: harness.free_port() for n in ('a', 'b')}
    rules = os.path.join(h.srcdir, 'contrib', 'prometheus', 'tdrain.rules.yml')
    prom = Prometheus(h, binary, ['127.0.0.1:%d' % ports[n] for n in ('a', 'b')], rules).start()
    h.diag('prometheus on 127.0.0.1:%d (PID %d)' % (prom.port, prom.pid))

    def conf(name):
        return {
            'store.uri': m.uri,
            'coord.mode': 'partitioned',
            'coord.partitions': P,
            'coord.lease_ttl_ms': 6000,
            'coord.renew_deadline_ms': 4500,
            'coord.retry_period_ms': 1000,
            'store.timeout_ms': 3000,
            'fold.interval_ms': 100,
            'metrics.interval_ms': 500,
            'metrics.listen': '127.0.0.1:%d' % ports[name],
        }
    procs = {n: h.start_tdrain(n, conf(n)) for n in ('a', 'b')}

    def targets_up():
        act = prom.api('targets')['activeTargets']
        return len(act) == 2 and all(t['health'] == 'up' for t in act)
    h.ok(h.wait_until(targets_up, 60, interval=0.5, desc='both targets up'),
         'Prometheus scrapes both replicas (targets up): %s'
         % [(t['scrapeUrl'], t['health'], t.get('lastError')) for t in prom.api('targets')['activeTargets']])
    h.load_when_held(db, m.uri, ('a', 'b'), N)

    drained = h.wait_until(lambda: db.events.count_documents({}) == 0 and db.tdrain_deltas.count_documents({}) == 0,
                           180, interval=0.5, desc='FIFO drained')
    h.ok(drained, 'the replicas drained the %d events' % N)

    # Steady: both endpoints report backlog 0 and totals adding up to N twice in a row, 1.5 s apart.
    names = ('tdrain_backlog_events', 'tdrain_events_processed_total')
    seen = {}

    def snapshot():
        return {(n, k): metric(scrape(ports[n]), k, n) for n in ('a', 'b') for k in names}

    def steady():
        a = snapshot()
        time.sleep(1.5)
        b = snapshot()
        seen.update(b)
        return a == b and b[('a', names[0])] == 0 and b[('b', names[0])] == 0 and \
            b[('a', names[1])] + b[('b', names[1])] == N
    h.ok(h.wait_until(steady, 30, desc='steady metrics'), 'the replicas report steady values: %s' % seen)
    # Two more scrape intervals, so Prometheus has the steady values too.
    time.sleep(2.5)
    for k in names:
        got = prom.query(k)
        want = {n: seen[(n, k)] for n in ('a', 'b')}
        h.ok(got == want, 'query %s through the HTTP API: %s, as the replicas report %s' % (k, got, want))
    per = {n: seen[(n, names[1])] for n in ('a', 'b')}
    h.ok(all(v > 0 for v in per.values()), 'both replicas processed events: %s' % per)

    groups = prom.api('rules')['groups']
    g = [x for x in groups if x['name'] == 'tdrain']
    bad = [(x['name'], x.get('lastError')) for x in (g[0]['rules'] if g else []) if x.get('health') != 'ok']
    h.ok(g and len(g[0]['rules']) >= 10 and not bad,
         'the shipped rule group loads and evaluates (%d rules, unhealthy %s)' % (len(g[0]['rules']) if g else 0, bad))
    leaderless = [x for x in (g[0]['rules'] if g else []) if x['name'] == 'TdrainLeaderless']
    h.ok(leaderless and leaderless[0].get('state') == 'inactive',
         'TdrainLeaderless is inactive: %s' % (leaderless[0].get('state') if leaderless else None))

    # ---------------------------------------------------------------- a hostile client
    a = procs['a']
    rss0 = rss_kib(a.pid)
    socks = []
    for _ in range(HOSTILE_CONNS):
        s = socket.socket()
        s.settimeout(2)
        try:
            s.connect(('127.0.0.1', ports['a']))
            s.sendall(b'GET /metrics HTTP/1.1\r\nHost: x\r\n')   # never finished
            socks.append(s)
        except OSError:
            s.close()
    t_h = time.monotonic()
    r = h.run([h.tool('tdrain-loadgen'), '--uri', m.uri, '--count', str(M), '--devices', '100', '--users', '50',
               '--quiet'], timeout=300)
    drained = h.wait_until(lambda: db.events.count_documents({}) == 0, 60, interval=0.3, desc='second drain')
    t_d = time.monotonic() - t_h
    h.ok(r.returncode == 0 and drained and t_d < IDLE_TIMEOUT_S,
         '%d more events drained in %.1f s while %d idle connections were held against a (before its %d s '
         'idle timeout)' % (M, t_d, len(socks), IDLE_TIMEOUT_S))
    rss1 = rss_kib(a.pid)
    h.ok(rss1 - rss0 < 8 * 1024, "a's memory stayed bounded: RSS %d -> %d KiB" % (rss0, rss1))

    def all_closed():
        for s in socks:
            try:
                s.settimeout(0.05)
                if s.recv(4096) != b'':
                    continue
            except socket.timeout:
                return False
            except OSError:
                pass
        return True
    closed = h.wait_until(all_closed, IDLE_TIMEOUT_S + 10, interval=0.5)
    h.ok(closed, 'the endpoint closed the idle connections after %.0f s (idle timeout %d s)'
         % (time.monotonic() - t_h, IDLE_TIMEOUT_S))
    for s in socks:
        s.close()
    t_c = time.time()

    def scraped_again():
        for t in prom.api('targets')['activeTargets']:
            if t['scrapeUrl'].endswith(':%d/metrics' % ports['a']):
                return t['health'] == 'up' and t['lastScrape'] and \
                    _rfc3339(t['lastScrape']) > t_c
        return False
    h.ok(h.wait_until(scraped_again, 15, interval=0.5), 'Prometheus scrapes a again afterwards')
    log = a.log_text()
    h.ok('metrics.listen:' in log, 'the refused connections were logged (rate-limited): %s'
         % [l for l in log.splitlines() if 'metrics.listen:' in l][:2])

    for n, p in procs.items():
        h.is_(p.stop(), 0, 'tdrain %s stops with status 0' % n)
    rc = prom.stop()
    h.ok(rc is not None and not prom.alive(), 'prometheus (PID %d) stopped: status %s' % (prom.pid, rc))
    m.stop()


def _rfc3339(s):
    """Seconds since the epoch of Prometheus's lastScrape ("2026-12-03T08:00:00.123456789Z" or +00:00)."""
    import datetime
    m = re.match(r'(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)$', s)
    if not m:
        return 0.0
    base = datetime.datetime.strptime(m.group(1), '%Y-%m-%dT%H:%M:%S')
    tz = m.group(3)
    off = 0 if tz == 'Z' else (int(tz[1:3]) * 3600 + int(tz[4:6]) * 60) * (1 if tz[0] == '+' else -1)
    return base.replace(tzinfo=datetime.timezone.utc).timestamp() - off + float(m.group(2) or 0)


harness.Harness().main(main)
