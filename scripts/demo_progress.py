#!/usr/bin/env python3
"""scripts/demo_progress.py - live progress and the final summary of scripts/demo.sh.

    demo_progress.py watch   --state DIR [options]   poll every --interval s until the FIFO is drained
    demo_progress.py summary --state DIR [options]   print the summary from what watch recorded

watch reads, every interval: the FIFO size and the in-flight collections from the store
(one count each), the leases (tdrain_leases with pymongo, or the etcd keys through etcd's
JSON gateway), the replicas' Prometheus files (fold lag, per-replica totals), and the
producers' NDJSON files (lines appended so far = events inserted).  It stops, status 0,
once the producers are done (DIR/producers.done) and the FIFO, the claim records and the
unfolded deltas are all empty; status 1 if a replica or a producer died, or on timeout.
It writes DIR/watch.json for summary.

Standard library plus pymongo (Debian's python3-pymongo: run it with /usr/bin/python3).
"""

import argparse
import base64
import datetime
import json
import os
import re
import subprocess
import sys
import time
import urllib.request

try:
    import pymongo
except ImportError:
    if os.path.exists("/usr/bin/python3") and os.path.realpath(sys.executable) != os.path.realpath(
            "/usr/bin/python3") and not os.environ.get("TDRAIN_DEMO_REEXEC"):
        os.environ["TDRAIN_DEMO_REEXEC"] = "1"
        os.execv("/usr/bin/python3", ["/usr/bin/python3", os.path.abspath(__file__)] + sys.argv[1:])
    raise


# --------------------------------------------------------------------------------------------
# Output

class Out:
    """Plain text when stdout is not a terminal; in-place redraw and a little bold when it is."""

    def __init__(self):
        self.tty = sys.stdout.isatty() and os.environ.get("TERM", "") != "dumb"
        self.color = self.tty and not os.environ.get("NO_COLOR")
        self.block = 0          # lines of the live block currently on screen

    def style(self, code, s):
        return "\033[%sm%s\033[0m" % (code, s) if self.color else s

    def bold(self, s):
        return self.style("1", s)

    def good(self, s):
        return self.style("32", s)

    def bad(self, s):
        return self.style("31;1", s)

    def dim(self, s):
        return self.style("2", s)

    def line(self, s=""):
        self.clear_block()
        sys.stdout.write(s + "\n")
        sys.stdout.flush()

    def clear_block(self):
        if self.block:
            # cursor up to the block's first line, then erase to the end of the screen
            sys.stdout.write("\r" + ("\033[%dA" % (self.block - 1) if self.block > 1 else "") + "\033[J")
            self.block = 0

    def live(self, lines):
        """Terminal only: redraw [(text, style), ...] in place, each cut to the terminal's
        width so that none wraps (a wrapped line would break the redraw)."""
        import shutil
        width = max(20, shutil.get_terminal_size((120, 24)).columns - 1)
        self.clear_block()
        sys.stdout.write("\n".join(style(text[:width]) for text, style in lines))
        sys.stdout.flush()
        self.block = len(lines)

    def end_live(self):
        if self.block:
            sys.stdout.write("\n")
            sys.stdout.flush()
            self.block = 0


def num(n):
    return "-" if n is None else "{:,}".format(int(round(n)))


def dur(s):
    if s is None:
        return "-"
    s = int(round(s))
    return "%dm%02ds" % (s // 60, s % 60) if s >= 60 else "%ds" % s


# --------------------------------------------------------------------------------------------
# Sources

class LineCounter:
    """Lines appended to a set of files, read incrementally."""

    def __init__(self, paths):
        self.paths = list(paths)
        self.pos = {p: 0 for p in self.paths}
        self.count = {p: 0 for p in self.paths}

    def total(self):
        for p in self.paths:
            try:
                with open(p, "rb") as f:
                    f.seek(self.pos[p])
                    while True:
                        chunk = f.read(1 << 20)
                        if not chunk:
                            break
                        # only whole lines count: a partly written last line is read next time
                        last = chunk.rfind(b"\n")
                        if last < 0:
                            break
                        self.count[p] += chunk.count(b"\n", 0, last + 1)
                        self.pos[p] += last + 1
                        f.seek(self.pos[p])
            except FileNotFoundError:
                pass
        return sum(self.count.values())


def read_prom(path):
    """{metric_name: value} of one replica's textfile (labels dropped); {} if absent."""
    out = {}
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("#") or not line.strip():
                    continue
                m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)", line)
                if m and "_bucket" not in m.group(1):
                    try:
                        out[m.group(1)] = float(m.group(3))
                    except ValueError:
                        pass
    except OSError:
        pass
    return out


def counter(client, db):
    """A cheap exact document count.  FerretDB 1.24 answers count and
    estimatedDocumentCount by reading and decoding every document (seconds for a
    10,000-event FIFO, time the replicas need), but collStats from SQLite's own
    count, which is exact.  Elsewhere countDocuments: estimatedDocumentCount is
    PostgreSQL's statistics on DocumentDB (85,000 for an empty collection, and a
    drained FIFO that kept its old figure for 26 s in a demo run), and metadata
    that can lag on MongoDB; an exact count walks the _id index (DocumentDB: a
    fraction of a second at 1,000,000 events, every --interval seconds)."""
    try:
        ferret = "ferretdbVersion" in client.admin.command("buildInfo")
    except pymongo.errors.PyMongoError:
        ferret = False
    if ferret:
        return lambda coll: int(db.command("collStats", coll)["count"])
    return lambda coll: db[coll].count_documents({})


class MongoLeases:
    """Leases from tdrain_leases, with expiry judged as a tdrain observer does: a lease whose
    (epoch, seq, released) has not changed for its TTL on our clock has expired."""

    def __init__(self, db):
        self.coll = db["tdrain_leases"]
        self.seen = {}   # name -> ((epoch, seq, released), monotonic time of last change)

    def snapshot(self):
        latest = {}
        for d in self.coll.find({}, {"name": 1, "epoch": 1, "holder": 1, "seq": 1, "released": 1, "ttl_ms": 1}):
            n = d.get("name")
            if n is None:
                continue
            if n not in latest or d.get("epoch", 0) > latest[n].get("epoch", 0):
                latest[n] = d
        now = time.monotonic()
        held = {}
        for n, d in latest.items():
            key = (d.get("epoch"), d.get("seq"), bool(d.get("released")))
            prev = self.seen.get(n)
            if prev is None or prev[0] != key:
                self.seen[n] = (key, now)
            if d.get("released"):
                continue
            if now - self.seen[n][1] > d.get("ttl_ms", 15000) / 1000.0:
                continue
            held[n] = (d.get("holder"), d.get("epoch"))
        return held


class EtcdLeases:
    """Leases as etcd keys <prefix>lease/<name>; etcd expires them itself."""

    def __init__(self, endpoint, prefix):
        self.url = endpoint.rstrip("/") + "/v3/kv/range"
        self.base = prefix + "lease/"

    def snapshot(self):
        end = self.base[:-1] + chr(ord(self.base[-1]) + 1)
        body = json.dumps({"key": base64.b64encode(self.base.encode()).decode(),
                           "range_end": base64.b64encode(end.encode()).decode()}).encode()
        req = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=3) as r:
            reply = json.loads(r.read().decode() or "{}")
        held = {}
        for kv in reply.get("kvs", []):
            name = base64.b64decode(kv["key"]).decode()[len(self.base):]
            try:
                holder = json.loads(base64.b64decode(kv.get("value", "")).decode()).get("holder")
            except ValueError:
                holder = "?"
            held[name] = (holder, int(kv.get("create_revision", 0)))
        return held


def partition_map(held, partitions):
    """-> (leader or None, [holder or None for each partition])"""
    leader = held.get("leader", (None, None))[0]
    return leader, [held.get("part/%d" % p, (None, None))[0] for p in range(partitions)]


def map_text(replicas, pmap, sep="   "):
    parts = []
    for r in replicas:
        mine = [str(p) for p, h in enumerate(pmap) if h == r]
        parts.append("%s: %s" % (r, " ".join(mine) if mine else "-"))
    nobody = [str(p) for p, h in enumerate(pmap) if h is None]
    if nobody:
        parts.append("unowned: " + " ".join(nobody))
    return sep.join(parts)


def pid_alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        return False


def tail(path, n=15):
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 32768))
            lines = f.read().decode("utf-8", "replace").splitlines()
        return lines[-n:]
    except OSError as e:
        return ["(cannot read %s: %s)" % (path, e)]


# --------------------------------------------------------------------------------------------
# watch

SAMPLED = ("tdrain_events_processed_total", "tdrain_batches_total", "tdrain_fold_rounds_total",
           "tdrain_fold_events_total", "tdrain_claim_seconds_sum", "tdrain_ack_seconds_sum",
           "tdrain_consume_seconds_sum", "tdrain_partitions_owned", "tdrain_store_errors_total")

HEADER = "%7s %10s %8s %10s %9s %9s %7s  %-8s %s" % (
    "time", "inserted", "fifo", "drained", "drain/s", "fold lag", "deltas", "leader", "partitions held")


def watch(a, out):
    client = pymongo.MongoClient(a.uri, serverSelectionTimeoutMS=5000, connectTimeoutMS=3000,
                                 socketTimeoutMS=20000, directConnection=a.direct, retryWrites=False)
    db = client[a.db]
    count = counter(client, db)
    leases = EtcdLeases(a.etcd_endpoint, a.etcd_prefix) if a.backend == "etcd" else MongoLeases(db)
    replicas = [r.split("=", 1)[0] for r in a.replica]
    pids = {r.split("=", 1)[0]: int(r.split("=", 1)[1]) for r in a.replica}
    lines = LineCounter(a.ndjson)
    done_file = os.path.join(a.state, "producers.done")
    t0 = time.monotonic()
    deadline = t0 + a.timeout
    prev = None            # (t, drained)
    rec = {"samples": [], "peak_fifo": 0, "peak_rate": 0.0, "producers_done_at": None, "map_changes": 0}
    last_map = None
    last_good = None       # last sample with a complete view (leader and every partition owned)
    status = 1
    reason = "?"
    if not out.tty:
        out.line(HEADER)
    while True:
        now = time.monotonic()
        elapsed = now - t0
        try:
            fifo = count(a.coll)
            claims = count("tdrain_claims")
            deltas = count("tdrain_deltas")
            store_err = None
        except pymongo.errors.PyMongoError as e:
            fifo = claims = deltas = None
            store_err = str(e).split(",")[0][:100]
        try:
            held = leases.snapshot()
        except Exception as e:   # a slow store or etcd: show the last map
            held = None
        inserted = lines.total()
        proms = {r: read_prom(os.path.join(a.state, r + ".prom")) for r in replicas}
        leader, pmap = partition_map(held, a.partitions) if held is not None else (None, None)
        if pmap is None and last_good is not None:
            leader, pmap = last_good["leader"], last_good["map"]
        # fold lag: age of the oldest unfolded delta (its `at`), as tdrainctl status shows it
        lag = None
        if deltas == 0:
            lag = 0.0
        elif deltas:
            try:
                head = db["tdrain_deltas"].find_one({}, {"at": 1})
                if head and isinstance(head.get("at"), datetime.datetime):
                    at = head["at"].replace(tzinfo=datetime.timezone.utc)
                    lag = max(0.0, (datetime.datetime.now(datetime.timezone.utc) - at).total_seconds())
            except pymongo.errors.PyMongoError:
                pass
        drained = None if fifo is None else max(0, inserted - fifo)
        rate = None
        if drained is not None:
            if prev is not None and now > prev[0]:
                rate = max(0.0, (drained - prev[1]) / (now - prev[0]))
            prev = (now, drained)
        producers_done = os.path.exists(done_file)
        if producers_done and rec["producers_done_at"] is None:
            rec["producers_done_at"] = elapsed
        # ---- display ----
        counts = "  ".join("%s:%d" % (r, sum(1 for h in pmap if h == r)) for r in replicas) if pmap else "-"
        row = "%7s %10s %8s %10s %9s %9s %7s  %-8s %s" % (
            dur(elapsed), num(inserted), num(fifo), num(drained), num(rate),
            "-" if lag is None else "%.1f s" % lag, num(deltas), leader or "-", counts)
        if store_err:
            row += "  (store: %s)" % store_err
        mtext = map_text(replicas, pmap) if pmap else "(no lease view yet)"
        if out.tty:
            out.live([(HEADER, out.bold), (row, str), ("  partition map  " + mtext, out.dim)])
        else:
            out.line(row)
            if pmap and pmap != last_map:
                out.line("        partition map  " + mtext)
        if pmap and pmap != last_map:
            if last_map is not None:
                rec["map_changes"] += 1
            last_map = list(pmap)
        if fifo is not None:
            rec["peak_fifo"] = max(rec["peak_fifo"], fifo)
        if rate is not None:
            rec["peak_rate"] = max(rec["peak_rate"], rate)
        sample = {"t": round(elapsed, 2), "inserted": inserted, "fifo": fifo, "claims": claims, "deltas": deltas,
                  "rate": rate, "lag": lag, "leader": leader, "map": pmap,
                  "m": {r: {k[7:]: v for k, v in proms[r].items() if k in SAMPLED} for r in replicas}}
        rec["samples"].append(sample)
        if leader and pmap and all(pmap):
            last_good = sample
            rec["replica_totals"] = {r: {k: proms[r].get(k) for k in (
                "tdrain_events_processed_total", "tdrain_events_claimed_total", "tdrain_batches_total",
                "tdrain_fold_rounds_total", "tdrain_fold_events_total", "tdrain_fold_duplicates_total",
                "tdrain_events_deadlettered_total", "tdrain_failovers_total", "tdrain_store_errors_total",
                "tdrain_batches_fenced_total")} for r in replicas}
        # ---- end conditions ----
        dead = [r for r in replicas if not pid_alive(pids[r])]
        if dead:
            out.end_live()
            reason = "replica %s exited during the drain" % ", ".join(dead)
            for r in dead:
                out.line(out.bad("replica %s is gone; last lines of %s:" % (r, os.path.join(a.state, r + ".log"))))
                for l in tail(os.path.join(a.state, r + ".log")):
                    out.line("    " + l)
            break
        if producers_done:
            with open(done_file) as f:
                codes = f.read().split()
            if any(c != "0" for c in codes):
                out.end_live()
                reason = "a producer failed (exit statuses %s)" % " ".join(codes)
                out.line(out.bad(reason))
                break
            if fifo == 0 and claims == 0 and deltas == 0 and store_err is None:
                # estimated counts are metadata on MongoDB: confirm with a real count
                if db[a.coll].count_documents({}) == 0 and db["tdrain_deltas"].count_documents({}) == 0:
                    out.end_live()
                    status = 0
                    reason = "drained"
                    break
        if now >= deadline:
            out.end_live()
            reason = "timed out after %s (DEMO_TIMEOUT)" % dur(a.timeout)
            out.line(out.bad(reason))
            break
        time.sleep(max(0.05, a.interval - (time.monotonic() - now)))
    t_end = time.monotonic() - t0
    rec.update({"status": status, "reason": reason, "duration": t_end, "inserted": lines.total(),
                "final": last_good, "replicas": replicas})
    # final metrics (the replicas are still running: one last read of their files)
    time.sleep(min(1.5, a.interval))
    rec["replica_final"] = {r: read_prom(os.path.join(a.state, r + ".prom")) for r in replicas}
    try:
        rec["deadletters"] = db["tdrain_deadletter"].count_documents({})
    except pymongo.errors.PyMongoError:
        rec["deadletters"] = None
    with open(os.path.join(a.state, "watch.json"), "w") as f:
        json.dump(rec, f)
    return status


# --------------------------------------------------------------------------------------------
# summary

def ctl_status(a):
    """tdrainctl status --json --no-rate, if tdrainctl is built and answers in format version 1."""
    if not a.ctl or not os.access(a.ctl, os.X_OK):
        return None, "tdrainctl not built"
    try:
        r = subprocess.run([a.ctl, "-c", a.conf, "status", "--json", "--no-rate"], capture_output=True, text=True,
                           timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, "tdrainctl: %s" % e
    if r.returncode != 0:
        return None, "tdrainctl status exited %d: %s" % (r.returncode, (r.stderr.strip().splitlines() or [""])[-1])
    try:
        s = json.loads(r.stdout)
    except ValueError:
        return None, "tdrainctl status --json printed no JSON"
    if not isinstance(s, dict) or s.get("version") != 1 or not isinstance(s.get("partition_map"), list):
        return None, "tdrainctl status --json: unexpected format"
    return s, None


def snapshot(a):
    """Record the partition map now (replicas still running): from tdrainctl if it works, else the store."""
    s, why = ctl_status(a)
    rec = {}
    if s is not None:
        rec["source"] = "tdrainctl status --json"
        rec["leader"] = (s.get("leader") or {}).get("holder")
        rec["map"] = [e.get("holder") if e.get("owned") else None for e in
                      sorted(s["partition_map"], key=lambda e: e.get("partition", 0))]
        rec["members"] = [m.get("name") for m in s.get("members", [])]
        rec["ctl_deadletters"] = s.get("deadletters")
    else:
        client = pymongo.MongoClient(a.uri, serverSelectionTimeoutMS=5000, directConnection=a.direct)
        leases = EtcdLeases(a.etcd_endpoint, a.etcd_prefix) if a.backend == "etcd" else MongoLeases(client[a.db])
        leader, pmap = partition_map(leases.snapshot(), a.partitions)
        rec.update({"source": ("etcd keys" if a.backend == "etcd" else "tdrain_leases") + " (%s)" % why,
                    "leader": leader, "map": pmap})
    with open(os.path.join(a.state, "map.json"), "w") as f:
        json.dump(rec, f)
    return 0


def summary(a, out):
    st = a.state

    def load(name, default=None):
        try:
            with open(os.path.join(st, name)) as f:
                return json.load(f)
        except (OSError, ValueError):
            return default

    w = load("watch.json", {})
    mp = load("map.json", {})
    ck = load("checker.json")
    prods = []
    for spec in a.producer:
        name, part = spec.split("=", 1)
        p = {"name": name, "part": part == "1", "inserted": 0, "duplicates": 0, "malformed": 0}
        try:
            with open(os.path.join(st, name + ".out")) as f:
                m = re.search(r"inserted (\d+) events \((\d+) duplicates, (\d+) malformed\)", f.read())
            if m:
                p.update(inserted=int(m.group(1)), duplicates=int(m.group(2)), malformed=int(m.group(3)))
        except OSError:
            pass
        prods.append(p)
    replicas = w.get("replicas") or []
    ok = True

    def row(label, value):
        out.line("  %-20s %s" % (label, value))

    out.line()
    out.line(out.bold("Summary"))
    ins = sum(p.get("inserted", 0) for p in prods)
    dups = sum(p.get("duplicates", 0) for p in prods)
    bad = sum(p.get("malformed", 0) for p in prods)
    desc = ", ".join("%s %s%s" % (p["name"], num(p.get("inserted")), " (writes part)" if p.get("part") else "")
                     for p in prods)
    row("events inserted", "%s  (%s)" % (num(ins), desc))
    fin = w.get("replica_final") or {}
    skipped = sum(int(fin[r].get("tdrain_fold_duplicates_total", 0)) for r in fin)
    row("duplicates", "%s re-sent by producers (same insert_id); %s skipped by the fold" % (num(dups), num(skipped)))
    dl = w.get("deadletters")
    row("dead letters", "%s in tdrain_deadletter (%s malformed documents sent)" % (num(dl), num(bad)))
    d = w.get("duration")
    if d and w.get("status") != 0:
        row("drain", out.bad("not finished after %s: %s" % (dur(d), w.get("reason"))))
        last = (w.get("samples") or [{}])[-1]
        row("", "at the end: %s events in the FIFO, %s unfolded deltas" % (num(last.get("fifo")),
                                                                         num(last.get("deltas"))))
    elif d:
        drained = ins
        rate_in = a.rate
        txt = "%s from the replicas' start to an empty FIFO and fold: %s events/s average" % (dur(d), num(drained / d))
        row("drain", txt)
        extra = "peak %s events/s over %ss; largest backlog %s" % (num(w.get("peak_rate")), num(a.interval),
                                                                    num(w.get("peak_fifo")))
        if rate_in:
            extra = "producers streamed at %s events/s; " % num(rate_in) + extra
        if w.get("producers_done_at") is not None:
            extra += "; tail after the last insert %s" % dur(d - w["producers_done_at"])
        row("", extra)
    per = []
    for r in replicas:
        v = fin.get(r, {}).get("tdrain_events_processed_total")
        if v is not None:
            per.append("%s %s" % (r, num(v)))
    if per:
        row("drained per replica", ", ".join(per))
    rounds = sum(int(fin[r].get("tdrain_fold_rounds_total", 0)) for r in fin)
    folded = sum(int(fin[r].get("tdrain_fold_events_total", 0)) for r in fin)
    if rounds:
        row("fold", "%s rounds, %s new events folded" % (num(rounds), num(folded)))
    if ck is None:
        row("checker", out.bad("not run (the drain did not finish)" if w.get("status") != 0
                               else "no result (see checker.log)"))
        ok = False
    else:
        mm = ck.get("mismatch_count", -1)
        txt = "%s derived documents and %s dead letters checked by tests/checker.py: %s mismatches" % (
            num(ck.get("checked", 0) - ck.get("deadletters", 0)), num(ck.get("deadletters")), num(mm))
        row("checker", out.good(txt) if mm == 0 else out.bad(txt))
        if mm != 0:
            ok = False
            for m in (ck.get("mismatches") or [])[:10]:
                out.line("      " + str(m))
    if mp.get("map"):
        row("leader", "%s   (from %s)" % (mp.get("leader") or "none", mp.get("source")))
        row("partition map", map_text(replicas, mp["map"], sep="\n" + " " * 23))
    moves = ["%s %d" % (r, int(fin.get(r, {}).get("tdrain_failovers_total", 0))) for r in replicas]
    if moves:
        row("leases taken over", ", ".join(moves) + "  (from a replica that released or lost them;"
            " start-up rebalancing included)")
    for r in replicas:
        f = fin.get(r, {})
        fe, ff = int(f.get("tdrain_store_errors_total", 0)), int(f.get("tdrain_batches_fenced_total", 0))
        if fe or ff:
            row("replica %s" % r, "%d batches retried after a store error, %d abandoned when a lease ended"
                % (fe, ff))
    if w.get("status") != 0:
        ok = False
        row("result", out.bad("FAILED: %s" % w.get("reason")))
    return 0 if ok else 1


# --------------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("cmd", choices=("watch", "snapshot", "summary"))
    ap.add_argument("--state", required=True, help="the demo directory")
    ap.add_argument("--uri", default="")
    ap.add_argument("--direct", action="store_true", help="directConnection=true (a single local server)")
    ap.add_argument("--db", default="tdrain")
    ap.add_argument("--coll", default="events")
    ap.add_argument("--backend", choices=("mongo", "etcd"), default="mongo")
    ap.add_argument("--etcd-endpoint", default="")
    ap.add_argument("--etcd-prefix", default="/tdrain/")
    ap.add_argument("--partitions", type=int, default=16)
    ap.add_argument("--replica", action="append", default=[], help="NAME=PID (repeatable)")
    ap.add_argument("--ndjson", action="append", default=[])
    ap.add_argument("--producer", action="append", default=[], help="NAME=1|0 (writes part or not): DIR/NAME.out")
    ap.add_argument("--interval", type=float, default=2.0)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--rate", type=float, default=0)
    ap.add_argument("--ctl", default="")
    ap.add_argument("--conf", default="")
    a = ap.parse_args()
    out = Out()
    try:
        if a.cmd == "watch":
            return watch(a, out)
        if a.cmd == "snapshot":
            return snapshot(a)
        return summary(a, out)
    except KeyboardInterrupt:
        out.end_live()
        return 130


if __name__ == "__main__":
    sys.exit(main())
