#!/usr/bin/env python3
"""t07: the archive, its HTTP sender, backpressure, and tdrainctl replay.

Against each store of h.store_kinds() (a real FerretDB and a real DocumentDB by default,
TDRAIN_TEST_STORES) and this test's own HTTP sink on 127.0.0.1; wherever a scenario drains,
derived state must equal an independent recomputation (tests/checker.py):

1. Delivery through failures.  The sink answers 500 to the first requests,
   then stalls longer than archive.http_timeout_ms on a few, then accepts
   (200) and records every line.  tdrain (single mode, small archive files)
   drains 2000 loadgen events (T07_EVENTS); once the FIFO is empty and no unsent archive
   file is left, every insert_id loadgen wrote must have reached the sink at
   least once, every line must have the archive line's field set, nothing is
   in failed/, and the URL's password never appears in tdrain's log.
2. Backpressure.  With archive.max_backlog_bytes tiny and the sink down, the
   drain stops (the FIFO stops shrinking) and tdrain says why; when the sink
   comes back, the drain resumes and everything arrives.
3. Replay.  tdrain archives without a URL (files stay on disk); then
   `tdrainctl -c CONF replay --from T1 --to T2 --shadow shadow_events`
   inserts exactly the archived events with T1 <= created_at < T2, byte for
   byte, into the shadow collection, says so in its summary line, leaves the
   FIFO untouched, is idempotent on a rerun, refuses live collections as
   shadows, and writes nothing with --dry-run.  Replaying into the FIFO
   (no --shadow) re-drains the events without changing derived counts.
"""

import datetime
import glob
import http.server
import json
import os
import re
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
import harness  # noqa: E402
import checker  # noqa: E402

EX_OK, EX_USAGE = 0, 64
SECRET = 'sinkpw-7c1e'
LINE_FIELDS = ['_id', '_id_type', 'insert_id', 'event', 'distinct_id', 'username', 'created_at',
               'created_at_ms', 'properties', 'doc']


# --------------------------------------------------------------------------
# The HTTP sink
# --------------------------------------------------------------------------

class Sink:
    """A local NDJSON endpoint whose behaviour the test scripts.

    mode 'script': the first reject_first requests get 400, the next
    fail_first get 500, the next stall_count sleep stall_s (longer than the
    client's timeout) and get 503, the rest 200.
    mode 'down': 503 at once.  mode 'up': 200.
    Lines of 200-answered requests are recorded (insert_id -> times received).
    """

    def __init__(self, fail_first=4, stall_count=2, stall_s=2.5, reject_first=0):
        self.lock = threading.Lock()
        self.mode = 'script'
        self.reject_first = reject_first
        self.fail_first, self.stall_count, self.stall_s = fail_first, stall_count, stall_s
        self.requests = 0
        self.status_counts = {}
        self.received = {}        # insert_id -> count
        self.lines = 0
        self.bad_lines = []       # (reason, first bytes)
        self.bad_requests = []    # wrong method / content type / auth
        self.accepted_bodies = 0
        sink = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = 'HTTP/1.1'

            def log_message(self, fmt, *args):
                pass

            def do_POST(self):
                n = int(self.headers.get('Content-Length') or 0)
                body = self.rfile.read(n) if n else b''
                status = sink.decide(self.headers, body)
                if status == 'stall':
                    time.sleep(sink.stall_s)
                    status = 503
                try:
                    self.send_response(status)
                    self.send_header('Content-Length', '0')
                    self.end_headers()
                except OSError:
                    pass          # the client gave up (its timeout): exactly what a stall tests

        self.server = http.server.ThreadingHTTPServer(('127.0.0.1', harness.free_port()), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path='/ingest'):
        return 'http://tdrain:%s@127.0.0.1:%d%s' % (SECRET, self.port, path)

    def decide(self, headers, body):
        with self.lock:
            i = self.requests
            self.requests += 1
            ctype = headers.get('Content-Type', '')
            if ctype != 'application/x-ndjson':
                self.bad_requests.append('Content-Type %r' % ctype)
            if self.mode == 'down':
                status = 503
            elif self.mode == 'script' and i < self.reject_first:
                status = 400
            elif self.mode == 'script' and i < self.reject_first + self.fail_first:
                status = 500
            elif self.mode == 'script' and i < self.reject_first + self.fail_first + self.stall_count:
                status = 'stall'
            else:
                status = 200
            self.status_counts[status] = self.status_counts.get(status, 0) + 1
            if status == 200:
                self.accepted_bodies += 1
                self.record(body)
            return status

    def record(self, body):
        if body and not body.endswith(b'\n'):
            self.bad_lines.append(('body does not end with a newline', body[-60:]))
        for raw in body.split(b'\n'):          # NDJSON: split on '\n' only
            if not raw:
                continue
            self.lines += 1
            try:
                obj = json.loads(raw.decode('utf-8'))
            except ValueError as e:
                self.bad_lines.append(('not JSON: %s' % e, raw[:60]))
                continue
            if list(obj.keys()) != LINE_FIELDS:
                self.bad_lines.append(('fields %s' % list(obj.keys()), raw[:60]))
                continue
            if not isinstance(obj['created_at_ms'], int) or not isinstance(obj['doc'], str) \
                    or not isinstance(obj['properties'], dict):
                self.bad_lines.append(('field types', raw[:60]))
                continue
            self.received[obj['insert_id']] = self.received.get(obj['insert_id'], 0) + 1

    def snapshot(self):
        with self.lock:
            return dict(self.received)

    def set_mode(self, mode):
        with self.lock:
            self.mode = mode

    def close(self):
        self.server.shutdown()
        self.server.server_close()


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------

def loadgen(h, m, db, count, ndjson, seed):
    r = h.run([h.tool('tdrain-loadgen'), '--uri', m.uri, '--db', db, '--count', count, '--ndjson', ndjson,
               '--seed', seed, '--quiet'], timeout=300)
    if r.returncode != 0:
        h.diag('loadgen failed (%s): %s' % (r.returncode, r.stderr[-2000:]))
    return r.returncode == 0


def read_ndjson(path):
    """loadgen's NDJSON: canonical extended JSON documents, one per line."""
    from bson import json_util
    docs = []
    with open(path) as f:
        for line in f:
            if line.strip():
                docs.append(json_util.loads(line))
    return docs


# Events of the delivery scenario: enough for ~20 archive files of ~100 events.
N1 = int(os.environ.get('T07_EVENTS', '2000'))


def spooled(adir):
    """Archive files not yet delivered (closed or open), failed/ excluded."""
    return sorted(glob.glob(os.path.join(adir, '*.ndjson')) + glob.glob(os.path.join(adir, '*.ndjson.open')))


def base_config(m, db, adir):
    return {
        'store.uri': m.uri,
        'store.database': db,
        'store.timeout_ms': 5000,
        'coord.backend': 'mongo',
        'coord.mode': 'single',
        'coord.lease_ttl_ms': 12000,
        'coord.renew_deadline_ms': 8000,
        'coord.retry_period_ms': 1000,
        'archive.dir': adir,
        'archive.max_bytes': 65536,
        'archive.max_age_s': 1,
        'archive.http_timeout_ms': 1000,
        # Small batches: a batch is never split across files, so this is what makes
        # 65536-byte files (about 100 events each) and keeps store operations short.
        'drain.batch_size': 100,
        'log.level': 'info',
    }


def check_exact(h, m, db, files):
    """Every delta folded, then derived state equals an independent recomputation from the NDJSON files."""
    h.wait_until(lambda: m.db(db).tdrain_deltas.count_documents({}) == 0, 60, interval=0.5, desc='%s folded' % db)
    n, mism = checker.check(m.uri, db, files)
    for x in mism[:10]:
        h.diag('  ' + str(x))
    h.ok(n > 0 and not mism, 'derived state of %s equals an independent recomputation (%d documents, %d mismatches)'
         % (db, n, len(mism)))


def ms_of(dt):
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=datetime.timezone.utc)
    return int(round(dt.timestamp() * 1000))


def rfc3339(ms):
    t = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc) + datetime.timedelta(milliseconds=ms)
    return t.strftime('%Y-%m-%dT%H:%M:%S.') + '%03dZ' % (ms % 1000)


# --------------------------------------------------------------------------
# 1. Delivery through failures
# --------------------------------------------------------------------------

def scenario_delivery(h, m):
    h.diag('scenario 1: delivery through 500s and stalls')
    sink = Sink(fail_first=4, stall_count=2, stall_s=2.5)
    adir = os.path.join(h.tmp, 'archive-a')
    nd = os.path.join(h.tmp, 'a.ndjson')
    if not h.ok(loadgen(h, m, 'tdrain', N1, nd, 1), 'loadgen inserted %d events' % N1):
        return
    want = {d['insert_id'] for d in read_ndjson(nd)}
    h.is_(len(want), N1, 'loadgen wrote %d distinct insert_ids' % N1)

    cfg = base_config(m, 'tdrain', adir)
    cfg['archive.http_url'] = sink.url('/ingest?query=INSERT%20INTO%20events%20FORMAT%20JSONEachRow')
    p = h.start_tdrain('t07a', cfg)
    fifo = m.db('tdrain').events
    h.ok(h.wait_until(lambda: fifo.count_documents({}) == 0, 300, interval=0.5, desc='FIFO empty'),
         'the FIFO drains while the sink fails')
    h.ok(h.wait_until(lambda: not spooled(adir), 120, interval=0.5, desc='archive spool empty'),
         'every archive file is delivered (none left in %s)' % adir)
    got = sink.snapshot()
    missing = want - set(got)
    h.ok(not missing, 'every insert_id reached the sink at least once (%d missing)' % len(missing))
    if missing:
        h.diag('missing e.g. %s' % sorted(missing)[:5])
    dups = sum(c - 1 for c in got.values() if c > 1)
    h.diag('sink: %d requests %s, %d lines, %d received twice or more' %
           (sink.requests, sink.status_counts, sink.lines, dups))
    h.ok(not sink.bad_lines, 'every line is one JSON object with the archive field set (%s)' % sink.bad_lines[:2])
    h.ok(not sink.bad_requests, 'every POST is application/x-ndjson (%s)' % sink.bad_requests[:2])
    h.is_(sink.status_counts.get(500, 0), 4, 'the four 500s were retried')
    h.is_(sink.status_counts.get('stall', 0), 2, 'the two stalls (timeouts) were retried')
    h.ok(sink.accepted_bodies >= 10, 'archive.max_bytes 65536 gives many files (%d delivered)' % sink.accepted_bodies)
    h.ok(not os.path.exists(os.path.join(adir, 'failed')) or not os.listdir(os.path.join(adir, 'failed')),
         'nothing was moved to failed/ (5xx and timeouts are not rejections)')
    log = p.log_text()
    h.ok(re.search(r'archive: sending .* failed', log) is not None, 'tdrain logged the failed sends')
    h.ok(SECRET not in log, 'the sink password never appears in the log')
    check_exact(h, m, 'tdrain', [nd])
    h.is_(p.stop(), 0, 'tdrain exits 0')
    sink.close()


def scenario_rejected(h, m):
    h.diag('scenario 1b: a 4xx rejection moves the file to failed/ and the rest still flows')
    adir = os.path.join(h.tmp, 'archive-r')
    nd = os.path.join(h.tmp, 'r.ndjson')
    sink = Sink(reject_first=1, fail_first=0, stall_count=0)
    if not h.ok(loadgen(h, m, 'rej', 500, nd, 5), 'loadgen inserted 500 events (database rej)'):
        return
    want = {d['insert_id'] for d in read_ndjson(nd)}
    cfg = base_config(m, 'rej', adir)
    cfg['archive.http_url'] = sink.url()
    p = h.start_tdrain('t07r', cfg)
    fifo = m.db('rej').events
    h.ok(h.wait_until(lambda: fifo.count_documents({}) == 0 and not spooled(adir), 120, interval=0.5,
                      desc='rej drained and delivered'), 'drained and delivered despite a 400')
    failed = glob.glob(os.path.join(adir, 'failed', '*.ndjson'))
    h.is_(len(failed), 1, 'the rejected file is in failed/')
    in_failed = set()
    for f in failed:
        with open(f, 'rb') as fh:
            for raw in fh:
                in_failed.add(json.loads(raw)['insert_id'])
    got = set(sink.snapshot())
    h.ok(want <= got | in_failed, 'every event was delivered or is kept in failed/ (%d delivered, %d in failed/)'
         % (len(got & want), len(in_failed)))
    h.ok(re.search(r'permanently rejected .*HTTP 400', p.log_text()) is not None, 'the rejection is logged as an error')
    check_exact(h, m, 'rej', [nd])
    h.is_(p.stop(), 0, 'tdrain exits 0')
    sink.close()


# --------------------------------------------------------------------------
# 2. Backpressure
# --------------------------------------------------------------------------

def scenario_backpressure(h, m):
    h.diag('scenario 2: endpoint down, tiny archive.max_backlog_bytes')
    sink = Sink()
    sink.set_mode('down')
    adir = os.path.join(h.tmp, 'archive-b')
    nd = os.path.join(h.tmp, 'b.ndjson')
    if not h.ok(loadgen(h, m, 'bp', 1500, nd, 2), 'loadgen inserted 1500 events (database bp)'):
        return
    want = {d['insert_id'] for d in read_ndjson(nd)}
    cfg = base_config(m, 'bp', adir)
    cfg['archive.http_url'] = sink.url()
    cfg['archive.max_backlog_bytes'] = 4096
    p = h.start_tdrain('t07b', cfg)
    fifo = m.db('bp').events
    h.ok(h.wait_until(lambda: 'exceeds archive.max_backlog_bytes' in p.log_text(), 60, interval=0.5,
                      desc='backpressure logged'), 'tdrain logs the backpressure')
    c1 = fifo.count_documents({})
    time.sleep(4)
    c2 = fifo.count_documents({})
    h.ok(c1 == c2 and c2 > 0, 'the drain pauses while the endpoint is down (FIFO %d -> %d of 1500)' % (c1, c2))
    h.ok(sink.status_counts.get(503, 0) >= 2, 'the sender keeps retrying (%d attempts)' % sink.status_counts.get(503, 0))
    h.ok(spooled(adir), 'the unsent archive stays on disk')

    sink.set_mode('up')
    t0 = time.monotonic()
    h.ok(h.wait_until(lambda: fifo.count_documents({}) == 0, 180, interval=0.5, desc='FIFO empty after recovery'),
         'the drain resumes when the endpoint recovers')
    h.ok(h.wait_until(lambda: not spooled(adir), 120, interval=0.5, desc='spool empty'), 'the spool empties')
    h.diag('recovered in %.1f s' % (time.monotonic() - t0))
    missing = want - set(sink.snapshot())
    h.ok(not missing, 'every insert_id delivered after the outage (%d missing)' % len(missing))
    dead = m.db('bp').tdrain_deadletter.count_documents({})
    h.is_(dead, 0, 'backpressure dead-letters nothing')
    h.ok('draining resumes' in p.log_text(), 'tdrain logs the resumption')
    check_exact(h, m, 'bp', [nd])
    h.is_(p.stop(), 0, 'tdrain exits 0')
    sink.close()


# --------------------------------------------------------------------------
# 3. Replay
# --------------------------------------------------------------------------

def scenario_replay(h, m):
    from bson import BSON
    from bson.codec_options import CodecOptions
    from bson.raw_bson import RawBSONDocument

    h.diag('scenario 3: tdrainctl replay')
    adir = os.path.join(h.tmp, 'archive-c')
    nd = os.path.join(h.tmp, 'c.ndjson')
    n = 1000
    if not h.ok(loadgen(h, m, 'rp', n, nd, 3), 'loadgen inserted %d events (database rp)' % n):
        return
    docs = read_ndjson(nd)
    cfg = base_config(m, 'rp', adir)           # no URL: the files stay where replay reads them
    p = h.start_tdrain('t07c', cfg)
    db = m.db('rp')
    h.ok(h.wait_until(lambda: db.events.count_documents({}) == 0, 120, interval=0.5, desc='rp drained'),
         'rp drained')
    h.ok(h.wait_until(lambda: db.tdrain_deltas.count_documents({}) == 0, 60, interval=0.5, desc='rp folded'),
         'rp folded')
    h.is_(p.stop(), 0, 'tdrain exits 0 (closing its open archive file)')
    h.ok(not glob.glob(os.path.join(adir, '*.open')), 'no open archive file after a clean stop')

    # A window holding the middle half of the events, bounds in both accepted forms.
    times = sorted(ms_of(d['created_at']) for d in docs)
    t1, t2 = times[n // 4], times[3 * n // 4]
    expect = {str(d['_id']) for d in docs if t1 <= ms_of(d['created_at']) < t2}
    # The archive is at-least-once (a batch whose commit failed is archived again
    # when it is retried), so the counts to expect come from the archive's lines.
    files = sorted(glob.glob(os.path.join(adir, '*.ndjson')))
    in_lines = out_lines = 0
    archived = set()
    for f in files:
        with open(f, 'rb') as fh:
            for raw in fh:
                line = json.loads(raw)
                archived.add(line['insert_id'])
                if t1 <= line['created_at_ms'] < t2:
                    in_lines += 1
                else:
                    out_lines += 1
    h.is_(archived, {d['insert_id'] for d in docs}, 'every drained event is in the archive files')
    h.diag('archive: %d files, %d lines (%d in the window, %d distinct events in it)'
           % (len(files), in_lines + out_lines, in_lines, len(expect)))
    ctl = h.tool('tdrainctl')
    argv = [ctl, '-c', p.conf, 'replay', '--from', rfc3339(t1), '--to', str(t2)]

    r = h.run(argv + ['--shadow', 'shadow_events', '--dry-run'], timeout=120)
    h.is_(r.returncode, EX_OK, 'dry run exits 0')
    h.ok('would replay %d archived events' % in_lines in r.stdout, 'dry run counts the %d archived lines in the window'
         % in_lines)
    h.is_(db.shadow_events.count_documents({}), 0, 'dry run writes nothing')

    r = h.run(argv + ['--shadow', 'shadow_events'], timeout=300)
    h.is_(r.returncode, EX_OK, 'replay into a shadow collection exits 0')
    out = r.stdout.splitlines()
    h.diag('\n'.join(out[:4] + ['...'] + out[-2:]))
    h.ok(out and 'window' in out[0] and rfc3339(t1) in out[0] and rfc3339(t2) in out[0],
         'the window is printed first, in RFC 3339, before anything is read')
    h.ok(all(any(f in l for l in out) for f in files), 'every archive file read is listed (%d)' % len(files))
    summary = re.search(r'^replayed (\d+) events from (\d+) files into rp\.shadow_events '
                        r'\((\d+) already present, (\d+) skipped outside window\)$', r.stdout, re.M)
    h.ok(summary is not None, 'one-line summary')
    if summary:
        h.is_(int(summary.group(1)), len(expect), 'summary: replayed count')
        h.is_(int(summary.group(2)), len(files), 'summary: files read')
        h.is_(int(summary.group(3)), in_lines - len(expect), 'summary: already present = archived twice')
        h.is_(int(summary.group(4)), out_lines, 'summary: skipped outside window')
    shadow = db.shadow_events.with_options(codec_options=CodecOptions(document_class=RawBSONDocument))
    got = {}
    for raw in shadow.find():
        got[str(raw['_id'])] = raw.raw
    h.is_(set(got), expect, 'the shadow collection holds exactly the events in the window')
    same = 0
    for d in docs:
        k = str(d['_id'])
        if k in got:
            mine = dict(RawBSONDocument(got[k]).items())
            mine.pop('part', None)
            want = dict(RawBSONDocument(BSON.encode(d)).items())
            if mine == want:
                same += 1
    h.is_(same, len(expect), 'every replayed document equals the original loadgen document')
    h.is_(db.events.count_documents({}), 0, 'the FIFO is untouched by a shadow replay')

    r = h.run(argv + ['--shadow', 'shadow_events'], timeout=300)
    h.ok(r.returncode == EX_OK and re.search(r'^replayed 0 events .*\(%d already present' % in_lines, r.stdout, re.M),
         'a rerun inserts nothing and counts all %d lines already present' % in_lines)

    for bad in ('events', 'tdrain_ledger', 'event_counters', 'identity_map'):
        r = h.run(argv + ['--shadow', bad], timeout=60)
        h.ok(r.returncode == EX_USAGE and 'refusing' in r.stderr, 'refuses --shadow %s (exit %s)' % (bad, r.returncode))
    r = h.run([ctl, '-c', p.conf, 'replay', '--from', rfc3339(t2), '--to', rfc3339(t1)], timeout=60)
    h.is_(r.returncode, EX_USAGE, 'an empty window is a usage error')

    # Into the FIFO: drained again, derived counts unchanged (the fold dedups by insert_id).
    def counts():
        return sorted((c['_id'], c['count']) for c in db.event_counters.find({}, {'count': 1}))
    before = counts()
    h.ok(sum(c for _, c in before) == n, 'event_counters count the %d events before the replay' % n)
    r = h.run(argv, timeout=300)
    h.ok(r.returncode == EX_OK and re.search(r'^replayed %d events .* into rp\.events ' % len(expect), r.stdout, re.M),
         'replay into the FIFO inserts the %d events again' % len(expect))
    h.is_(db.events.count_documents({}), len(expect), 'they are in the FIFO')
    p2 = h.start_tdrain('t07c', cfg)
    h.ok(h.wait_until(lambda: db.events.count_documents({}) == 0, 120, interval=0.5, desc='re-drained'),
         'the replayed events are drained again')
    h.ok(h.wait_until(lambda: db.tdrain_deltas.count_documents({}) == 0, 60, interval=0.5, desc='re-folded'),
         'and folded')
    h.is_(counts(), before, 'event_counters unchanged: a replay never double counts')
    check_exact(h, m, 'rp', [nd])
    h.is_(p2.stop(), 0, 'tdrain exits 0')


def main(h):
    # T07_ONLY=delivery,replay runs a subset (while debugging one scenario).
    only = [s for s in os.environ.get('T07_ONLY', '').split(',') if s]
    for kind in h.store_kinds():
        m = h.start_store(kind)
        hs = h.for_store(m)          # points labelled [<store>], a tmp of the store's own
        for name, fn in (('delivery', scenario_delivery), ('rejected', scenario_rejected),
                         ('backpressure', scenario_backpressure), ('replay', scenario_replay)):
            if not only or name in only:
                fn(hs, m)
        m.stop()


if __name__ == '__main__':
    harness.Harness().main(main)
