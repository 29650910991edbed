#!/usr/bin/env python3
"""tests/checker.py - recompute tdrain's derived collections from the raw events and compare.

This is the independent oracle of the demo, the integration tests and the benchmark.  It
reads the raw events a producer inserted (the NDJSON files tdrain-loadgen --ndjson writes:
one canonical Extended JSON v2 document a line), applies docs/EVENTS.md with its own code
(nothing here is shared with tdrain), and compares the result with the store:

  - every valid event, deduplicated by insert_id, is folded into event_counters,
    device_metrics, device_event_counts, identity_map, username_metrics and signin_days;
    each expected document must be in the store with equal fields (`_f` and fields the
    contract does not name are ignored), and nothing else may be there;
  - every malformed event must be in tdrain_deadletter under its _id, with a reason starting
    with the expected prefix (the manifest's, when --manifest names that _id, else this
    checker's own classification); no other event may be dead-lettered;
  - the FIFO and tdrain_claims must be empty (everything drained and acknowledged).

Command line:
    checker.py --uri URI [--db tdrain] [--coll events] --ndjson FILE [--ndjson FILE ...]
               [--manifest FILE ...] [--allow-events a,b,c] [--max-event-bytes N] [--json]
    checker.py --selftest
Exit status 0 iff there is no mismatch (2 on a usage or input error).

As a library (integration tests):
    import checker
    n_checked, mismatches = checker.check(uri, db, ndjson_files, manifests=[...], allow=[...])

Interpretations of docs/EVENTS.md this checker makes (tdrain must agree):
  - rules are checked in this order and the first broken one is the reason: document size,
    _id, insert_id, event, distinct_id, username, created_at, properties, allow-list; within
    a string field: missing, not a string, empty, too long, invalid UTF-8, then the
    character rule.  Reasons are "<field>: <problem>" (see REASONS below).
  - `event` is checked byte by byte against A-Z a-z 0-9 _ . : / - ; any other byte,
    including invalid UTF-8 and non-ASCII, is "event: invalid character".
  - "control character" means Unicode category Cc: U+0000-U+001F and U+007F-U+009F.
  - _id must be an ObjectId or a 1-128 byte string; every other type is "_id: unsupported
    type" (integers included: the producer table lists only ObjectId and string).
  - a `username` or `properties` that is present but null breaks the type rule.
  - identity_map.linked_at is the created_at of the event that decided the link.
  - a username_metrics document with count 0 and devices 0 is the same as no document
    (all its devices were re-linked elsewhere).
  - duplicates (one insert_id) are expected to carry one content; if they differ, the
    first in file order counts here, the first to reach the fold counts in tdrain.
"""

import argparse
import calendar
import datetime
import json
import os
import sys
import unicodedata

try:
    import bson
    import pymongo
except ImportError:
    # The python3 first on PATH (e.g. a pyenv one) may lack pymongo while Debian's
    # /usr/bin/python3 has python3-pymongo.  Mixing the two interpreters' site-packages
    # breaks (pyOpenSSL vs cryptography), so run as a script under Debian's instead.
    if (__name__ == "__main__" and os.path.exists("/usr/bin/python3")
            and os.path.realpath(sys.executable) != os.path.realpath("/usr/bin/python3")
            and not os.environ.get("TDRAIN_CHECKER_REEXEC")):
        os.environ["TDRAIN_CHECKER_REEXEC"] = "1"
        os.execv("/usr/bin/python3", ["/usr/bin/python3", os.path.abspath(__file__)] + sys.argv[1:])
    raise

from bson import json_util
from bson.codec_options import CodecOptions
from bson.objectid import ObjectId

DEFAULT_MAX_EVENT_BYTES = 256 * 1024
EVENT_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.:/-")
RAW_KEY = "$tdrain_raw_hex"  # tdrain-loadgen's line form for documents EJSON cannot hold
DERIVED = ("event_counters", "device_metrics", "device_event_counts", "identity_map",
           "username_metrics", "signin_days")
DEADLETTER = "tdrain_deadletter"
CLAIMS = "tdrain_claims"

# Every reason prefix this checker (and tdrain) can give.
REASONS = (
    "document: too large",
    "_id: empty", "_id: too long", "_id: unsupported type",
    "insert_id: missing", "insert_id: not a string", "insert_id: empty", "insert_id: too long",
    "insert_id: invalid UTF-8",
    "event: missing", "event: not a string", "event: empty", "event: too long",
    "event: invalid character", "event: not in allow-list",
    "distinct_id: missing", "distinct_id: not a string", "distinct_id: empty",
    "distinct_id: too long", "distinct_id: invalid UTF-8", "distinct_id: control character",
    "username: not a string", "username: empty", "username: too long", "username: invalid UTF-8",
    "username: control character",
    "created_at: missing", "created_at: not a date",
    "properties: not a document",
)

# Strings that are not valid UTF-8 come back with lone surrogates instead of an exception.
CODEC = CodecOptions(tz_aware=True, unicode_decode_error_handler="surrogateescape")


# --------------------------------------------------------------------------------------------
# Reading raw events

def utf8_bytes(s):
    """The bytes a BSON string held (surrogate-escaped invalid bytes restored)."""
    return s.encode("utf-8", "surrogateescape")


def parse_line(line):
    """One NDJSON line -> (document, BSON size in bytes)."""
    line = line.strip()
    if line.startswith('{"' + RAW_KEY + '"'):
        raw = bytes.fromhex(json.loads(line)[RAW_KEY])
        return bson.decode(raw, codec_options=CODEC), len(raw)
    doc = json_util.loads(line, json_options=json_util.CANONICAL_JSON_OPTIONS)
    # Canonical EJSON keeps every BSON type, so re-encoding gives the producer's size.
    return doc, len(bson.encode(doc))


def read_ndjson(path):
    """Yield (document, size) for each line of one file, in file (= insertion) order."""
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield parse_line(line)
            except Exception as e:  # a broken line is an input error, not a mismatch
                raise ValueError("%s:%d: %s" % (path, n, e)) from e


def read_manifest(path):
    """{id_key: reason_prefix} from tdrain-loadgen --manifest."""
    out = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json_util.loads(line)
                out[id_key(rec["_id"])] = rec["reason"]
            except Exception as e:
                raise ValueError("%s:%d: %s" % (path, n, e)) from e
    return out


# --------------------------------------------------------------------------------------------
# Classification (docs/EVENTS.md, "What a producer writes")

def id_key(v):
    """A hashable, type-aware key for an _id value."""
    if isinstance(v, ObjectId):
        return ("oid", str(v))
    if type(v) is str:
        return ("str", v)
    return ("other", json_util.dumps(v, json_options=json_util.CANONICAL_JSON_OPTIONS))


def show_id(v, limit=60):
    s = str(v) if isinstance(v, (ObjectId, str)) else json_util.dumps(v)
    s = s.encode("unicode_escape", "backslashreplace").decode("ascii")
    return s if len(s) <= limit else s[:limit] + "..."


def is_valid_utf8(s):
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def has_control(s):
    return any(unicodedata.category(c) == "Cc" for c in s)


def check_string(doc, field, maxlen, required, charset=None, controls=True):
    """The reason a string field breaks the contract, or None."""
    if field not in doc:
        return (field + ": missing") if required else None
    v = doc[field]
    if type(v) is not str:  # bson's Code is a str subclass: not a BSON string
        return field + ": not a string"
    b = utf8_bytes(v)
    if not b:
        return field + ": empty"
    if len(b) > maxlen:
        return field + ": too long"
    if charset is not None:
        # The name rule is a byte set: it subsumes UTF-8 validity.
        if any(c not in charset for c in b):
            return field + ": invalid character"
        return None
    if not is_valid_utf8(v):
        return field + ": invalid UTF-8"
    if controls and has_control(v):
        return field + ": control character"
    return None


def date_ms(v):
    """Milliseconds since the epoch of a datetime (naive ones are UTC, as pymongo's are)."""
    if v.tzinfo is not None:
        v = v.astimezone(datetime.timezone.utc).replace(tzinfo=None)
    return calendar.timegm(v.timetuple()) * 1000 + v.microsecond // 1000


def utc_day(ms):
    d = datetime.datetime(1970, 1, 1) + datetime.timedelta(milliseconds=ms)
    return "%04d-%02d-%02d" % (d.year, d.month, d.day)


def classify(doc, size, max_event_bytes=DEFAULT_MAX_EVENT_BYTES, allow=None):
    """(None, event) for a valid document, (reason, None) for a malformed one.

    event = (insert_id, event, distinct_id, username or None, created_at ms)."""
    if size > max_event_bytes:
        return "document: too large", None
    if "_id" not in doc:
        return "_id: unsupported type", None
    i = doc["_id"]
    if type(i) is str:
        n = len(utf8_bytes(i))
        if n == 0:
            return "_id: empty", None
        if n > 128:
            return "_id: too long", None
    elif not isinstance(i, ObjectId):
        return "_id: unsupported type", None
    for field, maxlen, required, charset in (("insert_id", 128, True, None),
                                             ("event", 128, True, EVENT_CHARS),
                                             ("distinct_id", 256, True, None),
                                             ("username", 256, False, None)):
        r = check_string(doc, field, maxlen, required, charset,
                         controls=field in ("insert_id", "distinct_id", "username"))
        if r:
            return r, None
    if "created_at" not in doc:
        return "created_at: missing", None
    t = doc["created_at"]
    if not isinstance(t, datetime.datetime):
        return "created_at: not a date", None
    if "properties" in doc and not isinstance(doc["properties"], (dict, bson.dbref.DBRef)):
        return "properties: not a document", None
    if allow is not None and doc["event"] not in allow:
        return "event: not in allow-list", None
    return None, (doc["insert_id"], doc["event"], doc["distinct_id"], doc.get("username"),
                  date_ms(t))


# --------------------------------------------------------------------------------------------
# Recomputation (docs/EVENTS.md, "Derived-state rules")

class Expected:
    """What the store must hold once every event is drained and folded."""

    def __init__(self):
        self.derived = {c: {} for c in DERIVED}  # coll -> {_id: {field: value}}
        self.malformed = {}   # id_key -> (display id, expected reason prefix)
        self.events = 0       # documents read
        self.valid = 0        # valid documents (before dedup)
        self.unique = 0       # valid events after dedup
        self.notes = []       # inconsistencies found in the input itself

    def n_derived(self):
        return sum(len(v) for v in self.derived.values())


def recompute(docs, manifest=None, max_event_bytes=DEFAULT_MAX_EVENT_BYTES, allow=None):
    """docs: iterable of (document, size) in insertion order -> Expected."""
    manifest = manifest or {}
    ex = Expected()
    seen = set()
    counters, dev, dev_ev, ident, signin = {}, {}, {}, {}, {}
    for doc, size in docs:
        ex.events += 1
        reason, ev = classify(doc, size, max_event_bytes, allow)
        key = id_key(doc.get("_id"))
        want = manifest.get(key)
        if reason is not None:
            if want is not None and not reason.startswith(want):
                ex.notes.append("input %s: manifest says %r, checker classifies %r"
                                % (show_id(doc.get("_id")), want, reason))
            ex.malformed[key] = (doc.get("_id"), want if want is not None else reason)
            continue
        if want is not None:
            ex.notes.append("input %s: manifest says %r, checker finds it valid"
                            % (show_id(doc.get("_id")), want))
            ex.malformed[key] = (doc.get("_id"), want)
            continue
        ex.valid += 1
        iid, name, did, user, t = ev
        if iid in seen:  # one insert_id is one event, for every collection
            continue
        seen.add(iid)
        ex.unique += 1
        day = utc_day(t)
        counters[(name, day)] = counters.get((name, day), 0) + 1
        m = dev.get(did)
        if m is None:
            dev[did] = [1, t, t]
        else:
            m[0] += 1
            m[1] = min(m[1], t)
            m[2] = max(m[2], t)
        dev_ev[(did, name)] = dev_ev.get((did, name), 0) + 1
        if user is not None:
            # Latest created_at wins, ties go to the greater username (code point order is
            # UTF-8 byte order); events without a username never unlink.
            cur = ident.get(did)
            if cur is None or (t, user) > cur:
                ident[did] = (t, user)
            if name == "daily_sign_in":
                signin.setdefault(user, set()).add(day)
    users = {}
    for did, (t, user) in ident.items():
        u = users.setdefault(user, [0, 0])
        u[0] += dev[did][0]
        u[1] += 1
    d = ex.derived
    for (name, day), n in counters.items():
        d["event_counters"]["%s|%s" % (name, day)] = {"event": name, "day": day, "count": n}
    for did, (n, first, last) in dev.items():
        d["device_metrics"][did] = {"count": n, "first_seen": ("date", first), "last_seen": ("date", last)}
    for (did, name), n in dev_ev.items():
        d["device_event_counts"]["%s|%s" % (did, name)] = {"distinct_id": did, "event": name, "count": n}
    for did, (t, user) in ident.items():
        d["identity_map"][did] = {"username": user, "linked_at": ("date", t)}
    for user, (n, ndev) in users.items():
        d["username_metrics"][user] = {"count": n, "devices": ndev}
    for user, days in signin.items():
        d["signin_days"][user] = {"days": ("set", days)}
    return ex


# --------------------------------------------------------------------------------------------
# Comparison with the store

def snapshot(uri, db, coll="events", timeout_ms=10000):
    """Everything the comparison needs from the store, as plain dicts."""
    client = pymongo.MongoClient(uri, serverSelectionTimeoutMS=timeout_ms)
    try:
        d = client.get_database(db, codec_options=CODEC)
        snap = {c: {} for c in DERIVED}
        for c in DERIVED:
            for doc in d[c].find({}):
                snap[c][doc["_id"] if type(doc["_id"]) is str else id_key(doc["_id"])] = doc
        snap[DEADLETTER] = {id_key(doc["_id"]): doc for doc in d[DEADLETTER].find({})}
        snap["fifo"] = d[coll].count_documents({})
        snap["claims"] = d[CLAIMS].count_documents({})
        return snap
    finally:
        client.close()


def _num(v):
    """An integer from a BSON number, or None."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return int(v)
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return None


def _field_mismatch(want, got):
    """None if the store's value got matches the expected want, else a description."""
    if isinstance(want, tuple) and want[0] == "date":
        if not isinstance(got, datetime.datetime):
            return "store=%r (not a date) expected=%s" % (got, _iso(want[1]))
        if date_ms(got) != want[1]:
            return "store=%s expected=%s" % (_iso(date_ms(got)), _iso(want[1]))
        return None
    if isinstance(want, tuple) and want[0] == "set":
        if not isinstance(got, list):
            return "store=%r (not an array) expected=%s" % (got, sorted(want[1]))
        if len(got) != len(set(map(repr, got))):
            return "store has repeated entries: %s" % sorted(map(str, got))
        if set(got) != want[1]:
            extra = sorted(set(map(str, got)) - want[1])
            missing = sorted(want[1] - set(map(str, got)))
            return "store extra=%s missing=%s" % (extra[:5], missing[:5])
        return None
    if isinstance(want, int):
        if _num(got) != want:
            return "store=%r expected=%d" % (got, want)
        return None
    if got != want or type(got) is not type(want):
        return "store=%r expected=%r" % (got, want)
    return None


def _iso(ms):
    d = datetime.datetime(1970, 1, 1) + datetime.timedelta(milliseconds=ms)
    return d.isoformat(timespec="milliseconds") + "Z"


def compare(ex, snap):
    """Mismatches between an Expected and a store snapshot, as sentences."""
    out = list(ex.notes)
    # Store-wide findings first: they explain the per-document ones that follow.
    if snap.get("fifo", 0):
        out.append("FIFO not empty: %d documents left" % snap["fifo"])
    if snap.get("claims", 0):
        out.append("%s not empty: %d claim records left" % (CLAIMS, snap["claims"]))
    for c in DERIVED:
        want_all, got_all = ex.derived[c], snap.get(c, {})
        for _id, want in want_all.items():
            got = got_all.get(_id)
            if got is None:
                out.append("%s %s: missing" % (c, show_id(_id)))
                continue
            for field, w in want.items():
                if field not in got:
                    out.append("%s %s: field %s missing" % (c, show_id(_id), field))
                    continue
                why = _field_mismatch(w, got[field])
                if why:
                    out.append("%s %s: %s %s" % (c, show_id(_id), field, why))
        for _id, got in got_all.items():
            if _id in want_all:
                continue
            if c == "username_metrics" and _num(got.get("count")) == 0 and _num(got.get("devices")) == 0:
                continue  # every device re-linked away: same as absent
            out.append("%s %s: unexpected document %s" % (c, show_id(_id), _brief(got)))
    dead = snap.get(DEADLETTER, {})
    for key, (shown, prefix) in ex.malformed.items():
        got = dead.get(key)
        if got is None:
            out.append("%s %s: missing (expected reason %r)" % (DEADLETTER, show_id(shown), prefix))
        elif type(got.get("reason")) is not str or not got["reason"].startswith(prefix):
            out.append("%s %s: reason %r does not start with %r"
                       % (DEADLETTER, show_id(shown), got.get("reason"), prefix))
    for key, got in dead.items():
        if key not in ex.malformed:
            out.append("%s %s: unexpected (reason %r)" % (DEADLETTER, show_id(got.get("_id")), got.get("reason")))
    return out


def _brief(doc):
    d = {k: v for k, v in doc.items() if k not in ("_id", "_f")}
    s = json_util.dumps(d)
    return s if len(s) <= 120 else s[:120] + "..."


# --------------------------------------------------------------------------------------------
# Entry points

def expect(ndjson_files, manifests=(), allow=None, max_event_bytes=DEFAULT_MAX_EVENT_BYTES):
    """Recompute from files: -> Expected."""
    manifest = {}
    for m in manifests or ():
        manifest.update(read_manifest(m))

    def docs():
        for path in ndjson_files:
            yield from read_ndjson(path)

    allow_set = frozenset(allow) if allow else None
    ex = recompute(docs(), manifest, max_event_bytes, allow_set)
    # A manifest entry with no document in the files is an input error too.
    for key, prefix in manifest.items():
        if key not in ex.malformed:
            ex.notes.append("input: manifest names %s (%r) but no NDJSON line has it" % (key[1][:60], prefix))
    return ex


def check(uri, db, ndjson_files, manifests=(), allow=None, coll="events",
          max_event_bytes=DEFAULT_MAX_EVENT_BYTES):
    """-> (n_checked, mismatches): n_checked counts derived documents plus deadletters."""
    n, _, mism = check_full(uri, db, ndjson_files, manifests, allow, coll, max_event_bytes)
    return n, mism


def check_full(uri, db, ndjson_files, manifests=(), allow=None, coll="events",
               max_event_bytes=DEFAULT_MAX_EVENT_BYTES):
    """-> (n_checked, Expected, mismatches)."""
    ex = expect(ndjson_files, manifests, allow, max_event_bytes)
    mism = compare(ex, snapshot(uri, db, coll))
    return ex.n_derived() + len(ex.malformed), ex, mism


# --------------------------------------------------------------------------------------------
# Self-test: the recomputation logic on a dataset small enough to verify by hand

def selftest():
    fails = []
    n = [0]

    def ok(cond, what):
        n[0] += 1
        print("%s %d - %s" % ("ok" if cond else "not ok", n[0], what))
        if not cond:
            fails.append(what)

    day0 = datetime.datetime(2026, 6, 25, tzinfo=datetime.timezone.utc)

    def at(minutes, ms=0):
        return day0 + datetime.timedelta(minutes=minutes, milliseconds=ms)

    seq = [0]

    def ev(name, did, t, user=None, iid=None, **extra):
        seq[0] += 1
        d = {"_id": ObjectId(), "insert_id": iid or "iid-%d" % seq[0], "event": name,
             "distinct_id": did, "created_at": t, "properties": {"k": 1}}
        if user is not None:
            d["username"] = user
        d.update(extra)
        return d

    docs = [
        # dev-a: two anonymous events, signs in as alice, then re-links to bob.
        ev("cli_invocation", "dev-a", at(0)),
        ev("cli_invocation", "dev-a", at(1)),
        ev("daily_sign_in", "dev-a", at(10), "alice"),
        ev("cli_invocation", "dev-a", at(30), "bob"),
        # inserted later but created earlier: alice's again, must not win over bob's
        ev("cli_invocation", "dev-a", at(20), "alice"),
        # a later anonymous event does not unlink
        ev("cli_invocation", "dev-a", at(40)),
        # dev-b: tie at one millisecond; "user-9" > "user-10" as strings
        ev("daily_sign_in", "dev-b", at(5), "user-10"),
        ev("daily_sign_in", "dev-b", at(5), "user-9"),
        # dev-c: alice on another device; a duplicate (same insert_id, new _id) counts once
        ev("daily_sign_in", "dev-c", at(60 * 24 - 1, 59999), "alice", iid="dup-1"),
        ev("daily_sign_in", "dev-c", at(60 * 24 - 1, 59999), "alice", iid="dup-1"),
        ev("daily_sign_in", "dev-c", at(60 * 24), "alice"),
        # anonymous sign-in: no signin_days, no identity
        ev("daily_sign_in", "dev-d", at(3)),
        # well-formed unknown name
        ev("ui:open", "dev-d", at(4)),
    ]
    bad = [
        ({"_id": "bad-1", "event": "x", "distinct_id": "d", "created_at": at(0)}, "insert_id: missing"),
        ({"_id": "bad-2", "insert_id": 5, "event": "x", "distinct_id": "d", "created_at": at(0)},
         "insert_id: not a string"),
        ({"_id": "bad-3", "insert_id": "i" * 129, "event": "x", "distinct_id": "d", "created_at": at(0)},
         "insert_id: too long"),
        ({"_id": "bad-4", "insert_id": "i", "event": "a|b", "distinct_id": "d", "created_at": at(0)},
         "event: invalid character"),
        ({"_id": "bad-5", "insert_id": "i", "event": "caf\u00e9", "distinct_id": "d", "created_at": at(0)},
         "event: invalid character"),
        ({"_id": "bad-6", "insert_id": "i", "event": "x", "distinct_id": "d\u0085", "created_at": at(0)},
         "distinct_id: control character"),
        ({"_id": "bad-7", "insert_id": "i", "event": "x", "distinct_id": "d", "username": "",
          "created_at": at(0)}, "username: empty"),
        ({"_id": "bad-8", "insert_id": "i", "event": "x", "distinct_id": "d", "created_at": 5},
         "created_at: not a date"),
        ({"_id": "bad-9", "insert_id": "i", "event": "x", "distinct_id": "d", "created_at": at(0),
          "properties": [1]}, "properties: not a document"),
        ({"_id": {"a": 1}, "insert_id": "i", "event": "x", "distinct_id": "d", "created_at": at(0)},
         "_id: unsupported type"),
        ({"_id": "bad-10", "insert_id": "i", "event": "x", "distinct_id": "d", "username": None,
          "created_at": at(0)}, "username: not a string"),
    ]
    for d, want in bad:
        got, _ = classify(d, len(bson.encode(d)))
        ok(got == want, "classify %s -> %r (got %r)" % (show_id(d["_id"]), want, got))
    edge = {"_id": "e" * 128, "insert_id": "i" * 128, "event": "Ab0_.:/-" + "e" * 120,
            "distinct_id": "\u00e9" * 128, "username": "u" * 256, "created_at": at(0)}
    ok(classify(edge, len(bson.encode(edge)))[0] is None, "limits themselves are valid")
    ok(classify(edge, DEFAULT_MAX_EVENT_BYTES + 1)[0] == "document: too large", "size limit")
    ok(classify(edge, DEFAULT_MAX_EVENT_BYTES)[0] is None, "size limit is inclusive")
    ok(classify(docs[12], 100, allow=frozenset(["cli_invocation"]))[0] == "event: not in allow-list",
       "allow-list")

    # Invalid UTF-8 through the raw line form, as tdrain-loadgen writes it.
    raw = bson.encode({"_id": "bad-u", "insert_id": "abcX", "event": "x", "distinct_id": "d",
                       "created_at": at(0)}).replace(b"abcX", b"abc\xff")
    d, size = parse_line('{"%s": "%s"}' % (RAW_KEY, raw.hex()))
    ok(size == len(raw) and classify(d, size)[0] == "insert_id: invalid UTF-8", "raw line, invalid UTF-8")
    line = json_util.dumps(docs[0], json_options=json_util.CANONICAL_JSON_OPTIONS)
    d, size = parse_line(line)
    ok(d == docs[0] and size == len(bson.encode(docs[0])), "canonical EJSON line round-trips")

    allin = [(d, len(bson.encode(d))) for d in docs] + [(d, len(bson.encode(d))) for d, _ in bad]
    ex = recompute(allin)
    D = ex.derived
    ok(ex.unique == len(docs) - 1, "duplicate counted once (%d unique)" % ex.unique)
    ok(D["device_metrics"]["dev-c"]["count"] == 2, "device_metrics counts the duplicate once")
    ok(D["identity_map"]["dev-a"]["username"] == "bob", "re-link: latest created_at wins")
    ok(D["identity_map"]["dev-a"]["linked_at"] == ("date", date_ms(at(30))), "linked_at is the deciding event's time")
    ok(D["identity_map"]["dev-b"]["username"] == "user-9", "tie at one ms: greater username wins")
    ok("dev-d" not in D["identity_map"], "anonymous device is not linked")
    ok(D["username_metrics"]["bob"] == {"count": 6, "devices": 1}, "re-link moves the device's whole count")
    ok(D["username_metrics"]["alice"] == {"count": 2, "devices": 1}, "old username keeps only its other device")
    ok("user-10" not in D["username_metrics"], "tie loser has no username_metrics")
    ok(D["signin_days"]["alice"] == {"days": ("set", {"2026-06-25", "2026-06-26"})},
       "signin_days: UTC day boundary at 23:59:59.999 / 00:00")
    ok("bob" not in D["signin_days"], "no sign-in event as bob: no signin_days")
    ok(D["event_counters"]["daily_sign_in|2026-06-25"]["count"] == 5
       and D["event_counters"]["daily_sign_in|2026-06-26"]["count"] == 1, "event_counters per UTC day")
    ok(D["event_counters"]["ui:open|2026-06-25"]["count"] == 1, "unknown well-formed name counted")
    ok(D["device_metrics"]["dev-a"]["first_seen"] == ("date", date_ms(at(0)))
       and D["device_metrics"]["dev-a"]["last_seen"] == ("date", date_ms(at(40))), "first_seen / last_seen")
    ok(D["device_event_counts"]["dev-a|cli_invocation"]["count"] == 5, "device_event_counts")
    ok(len(ex.malformed) == len(bad), "every malformed document expected in the deadletter")

    # The comparison, against a fake store built from the expectation itself.
    def fake_store():
        snap = {c: {} for c in DERIVED}
        for c, docs_ in D.items():
            for _id, want in docs_.items():
                got = {"_id": _id, "_f": 7}
                for k, v in want.items():
                    if isinstance(v, tuple) and v[0] == "date":
                        v = datetime.datetime(1970, 1, 1) + datetime.timedelta(milliseconds=v[1])
                    elif isinstance(v, tuple):
                        v = sorted(v[1])
                    got[k] = v
                snap[c][_id] = got
        snap[DEADLETTER] = {k: {"_id": s, "reason": r + ": details"} for k, (s, r) in ex.malformed.items()}
        snap["fifo"] = snap["claims"] = 0
        return snap

    s = fake_store()
    ok(compare(ex, s) == [], "identical store: no mismatch")
    s["username_metrics"]["alice-gone"] = {"_id": "alice-gone", "count": 0, "devices": 0}
    s["device_metrics"]["dev-a"]["count"] = 6.0
    ok(compare(ex, s) == [], "zero username_metrics and a double count are accepted")
    s["device_metrics"]["dev-a"]["count"] = 7
    s["username_metrics"]["bob"]["count"] = 5
    s["signin_days"]["alice"]["days"].append("2026-06-25")
    del s["identity_map"]["dev-b"]
    s["event_counters"]["x|2026-06-25"] = {"_id": "x|2026-06-25", "event": "x", "day": "2026-06-25", "count": 1}
    k = id_key("bad-1")
    s[DEADLETTER][k]["reason"] = "event: missing"
    del s[DEADLETTER][id_key("bad-2")]
    s["fifo"], s["claims"] = 3, 1
    m = compare(ex, s)
    for what in ("device_metrics dev-a: count", "username_metrics bob: count", "signin_days alice: days",
                 "identity_map dev-b: missing", "event_counters x|2026-06-25: unexpected",
                 "tdrain_deadletter bad-1: reason", "tdrain_deadletter bad-2: missing", "FIFO not empty",
                 "tdrain_claims not empty"):
        ok(any(x.startswith(what) for x in m), "detects: " + what)
    ok(len(m) == 9, "exactly the injected mismatches (%d)" % len(m))

    # The manifest cross-check: a manifest that disagrees with the rules is reported.
    ex2 = recompute(allin, manifest={id_key("bad-1"): "event: missing", id_key(docs[0]["_id"]): "x: y"})
    ok(len(ex2.notes) == 2, "manifest disagreements are reported")

    print("1..%d" % n[0])
    return 0 if not fails else 1


def main(argv=None):
    p = argparse.ArgumentParser(description="Recompute tdrain's derived collections and compare with the store.")
    p.add_argument("--uri")
    p.add_argument("--db", default="tdrain")
    p.add_argument("--coll", default="events", help="the FIFO collection (default events)")
    p.add_argument("--ndjson", action="append", default=[], help="raw events, in insertion order (repeatable)")
    p.add_argument("--manifest", action="append", default=[], help="tdrain-loadgen --manifest output (repeatable)")
    p.add_argument("--allow-events", help="comma-separated allow-list (drain.allow_events)")
    p.add_argument("--max-event-bytes", type=int, default=DEFAULT_MAX_EVENT_BYTES)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--selftest", action="store_true", help="check the recomputation logic, without a store")
    a = p.parse_args(argv)
    if a.selftest:
        return selftest()
    if not a.uri or not a.ndjson:
        p.error("--uri and at least one --ndjson are required")
    allow = [x.strip() for x in a.allow_events.split(",") if x.strip()] if a.allow_events else None
    try:
        n, ex, mism = check_full(a.uri, a.db, a.ndjson, a.manifest, allow, a.coll, a.max_event_bytes)
    except (OSError, ValueError) as e:
        print("checker: %s" % e, file=sys.stderr)
        return 2
    except pymongo.errors.PyMongoError as e:
        print("checker: store: %s" % e, file=sys.stderr)
        return 2
    if a.json:
        print(json.dumps({"checked": ex.n_derived(), "deadletters": len(ex.malformed),
                          "events": ex.events, "unique_events": ex.unique, "mismatch_count": len(mism),
                          "mismatches": mism[:1000], "ok": not mism}))
    else:
        print("checked %d derived documents, %d deadletters: %d mismatches"
              % (ex.n_derived(), len(ex.malformed), len(mism)))
        for m in mism[:20]:
            print("  " + m)
        if len(mism) > 20:
            print("  ... and %d more" % (len(mism) - 20))
    return 0 if not mism else 1


if __name__ == "__main__":
    sys.exit(main())
