#!/usr/bin/python3
"""Regenerate the seed corpora in tests/fuzz/corpus/ (needs python3-pymongo for bson).

The seeds are committed; run this only to change them:  /usr/bin/python3 tests/fuzz/make_corpus.py
"""
import datetime
import os

import bson
from bson import ObjectId, Int64

HERE = os.path.dirname(os.path.abspath(__file__))
UTC = datetime.timezone.utc


def write(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def ms(v):
    return datetime.datetime.fromtimestamp(v / 1000, UTC)


# ---- fuzz_event: BSON documents, and raw field values ----
T = ms(1795000000123)
events = {
    "golden.bson": {"_id": ObjectId("6745a1c0e4b0a1b2c3d4e5f6"), "insert_id": "ins-000001", "event": "page_view",
                    "distinct_id": "dev-42", "username": "alice", "created_at": T,
                    "properties": {"path": "/home", "n": 3, "ok": True}, "part": 5},
    "string_id.bson": {"_id": "\u00e9vt-\u20ac-000002", "insert_id": "ins-\U0001F600", "event": "app.open",
                       "distinct_id": "dev-\u4e2d\u6587", "created_at": ms(-1)},
    "signin.bson": {"_id": "evt-000001", "insert_id": "i", "event": "daily_sign_in", "distinct_id": "d",
                    "username": "b\u00f6b", "created_at": ms(0), "extra": "kept"},
    "int_id.bson": {"_id": 7, "insert_id": "ins-7", "event": "e", "distinct_id": "dev-7",
                    "created_at": T},
    "control.bson": {"_id": ObjectId("ffffffffffffffffffffffff"), "insert_id": "x", "event": "x:y/z-1.2_3",
                     "distinct_id": "dev\u0085", "username": "u\x01", "created_at": T},
    "not_date.bson": {"_id": "k", "insert_id": "x", "event": "e", "distinct_id": "d",
                      "created_at": Int64(1795000000123), "properties": [1, 2]},
    "compact.bson": {"i": "ins-000001", "e": "page_view", "d": "dev-42", "u": "alice", "t": T},
}
for name, doc in events.items():
    write("fuzz_event", name, bson.encode(doc))
write("fuzz_event", "value_ascii.txt", "dev-42")
write("fuzz_event", "value_event.txt", "daily_sign_in")
write("fuzz_event", "value_c1.bin", b"h\xc3\xa9llo\xc2\x85\x00\xff")

# ---- fuzz_config: configuration files ----
write("fuzz_config", "full.conf", """# tdrain.conf: every key
name = replica-a
store.uri = mongodb://tdrain:secret@db1:27017,db2:27017/tdrain?replicaSet=rs0&authSource=admin
store.database = tdrain
store.events = events
store.timeout_ms = 5000
coord.backend = mongo
coord.mode = partitioned
coord.partitions = 16
coord.lease_ttl_ms = 15000
coord.renew_deadline_ms = 10000
coord.retry_period_ms = 2000
coord.etcd_endpoint = http://127.0.0.1:2379
coord.etcd_prefix = /tdrain/
coord.etcd_auth = root:etcdpass
drain.batch_size = 1000
drain.poll_max_ms = 1000
drain.max_attempts = 5
drain.max_event_bytes = 262144
drain.allow_events = page_view, app.open ,daily_sign_in
fold.interval_ms = 200
fold.max_deltas = 16
archive.dir = /var/lib/tdrain/archive
archive.max_bytes = 67108864
archive.max_age_s = 3600
archive.http_url = https://user:pw@collector.example/ingest
archive.http_timeout_ms = 10000
archive.max_backlog_bytes = 1073741824
metrics.file = /var/lib/prometheus/node-exporter/tdrain.prom
metrics.interval_ms = 5000
metrics.backlog_alert = 100000
log.level = info
test.trace_file =
""")
write("fuzz_config", "etcd.conf", """# etcd backend, tight lease timings
coord.backend = etcd
coord.etcd_endpoint = https://etcd-1:2379
coord.etcd_auth = "tdrain:p@ss word"
coord.lease_ttl_ms = 3000
coord.renew_deadline_ms = 2000
coord.retry_period_ms = 500
store.timeout_ms = 1000
""")
write("fuzz_config", "quoted.conf", '\n   # indented comment\n\t\nlog.level = "debug"\r\n'
      'drain.allow_events = "  a , b  "\narchive.dir = ""\nname="n"\n')
write("fuzz_config", "sets.txt", "drain.batch_size=42\ncoord.mode=single\nstore.uri=mongodb+srv://c.example.net/\n"
      "bogus.key=1\ndrain.batch_size=abc\ncoord.partitions=4097\n")
write("fuzz_config", "bad.conf", "drain.batch_size 10\nstore.database = a.b\n")

# ---- fuzz_etcd_json: gateway responses (as in tests/unit/test_etcd_json.c) ----
HDR = ('"header":{"cluster_id":"15118495548433857066","member_id":"13668033151171901709",'
       '"revision":"7","raft_term":"2"}')
write("fuzz_etcd_json", "grant.json", '{%s,"ID":"4111120158370626309","TTL":"2"}' % HDR)
write("fuzz_etcd_json", "keepalive.json", '{"result":{%s,"ID":"4111120158370626313","TTL":"5"}}\n' % HDR)
write("fuzz_etcd_json", "keepalive_error.json",
      '{"error":{"grpc_code":14,"http_code":503,"message":"etcdserver: no leader","http_status":"Service Unavailable"}}')
write("fuzz_etcd_json", "timetolive.json", '{"ID":"1","TTL":"4","grantedTTL":"5"}')
write("fuzz_etcd_json", "txn_put.json",
      '{"header":{"cluster_id":"1","revision":"2"},"succeeded":true,"responses":[{"response_put":'
      '{"header":{"revision":"2"}}}]}')
write("fuzz_etcd_json", "txn_range.json",
      '{%s,"responses":[{"response_range":{"header":{"revision":"7"},"kvs":[{"key":"L3QvbGVhc2UveA==",'
      '"create_revision":"5","mod_revision":"5","version":"1","value":"eyJob2xkZXIiOiJiIn0=","lease":"6917"}],'
      '"count":"1"}}]}' % HDR)
write("fuzz_etcd_json", "range.json",
      '{%s,"kvs":[{"key":"L3QvbGVhc2UveA==","create_revision":"2","mod_revision":"2","version":"1",'
      '"value":"eyJob2xkZXIiOiJhIn0=","lease":"4111120158370626313"},{"key":"L3QvbGVhc2UveQ==",'
      '"create_revision":"3","mod_revision":"4","version":"2"}],"count":"2","more":true}' % HDR)
write("fuzz_etcd_json", "error.json",
      '{"error":"etcdserver: requested lease not found","message":"etcdserver: requested lease not found","code":5}')
write("fuzz_etcd_json", "auth.json", '{"header":{},"token":"SlsrqZgchHJKseke.8"}')
write("fuzz_etcd_json", "lease_value.json", '{"holder":"a","inst":"00ff","ttl_ms":2000}')
write("fuzz_etcd_json", "i64.txt", "-9223372036854775808")
