/*
 * etcd_json.h - request bodies for, and responses from, etcd's v3 JSON gateway.
 *
 * Pure functions: no I/O, no logging, no global state, so every parser can be
 * unit-tested (tests/unit/test_etcd_json.c) and fuzzed with hostile input.
 *
 * What the gateway does that these functions absorb:
 *   - keys and values are bytes, carried as standard base64;
 *   - int64 fields (revisions, lease IDs, TTLs) come back as JSON strings;
 *   - fields holding their zero value are omitted ("succeeded": false, a TTL
 *     of 0, an empty range), so absent usually means 0 and is not an error;
 *   - errors are {"error": "...", "message": "...", "code": <grpc code>} with
 *     an HTTP status, or, inside a stream (keepalive), {"error": {...}}.
 *
 * Every parser takes (body, len) that need not be NUL-terminated, refuses
 * bodies longer than TDR_ETCD_MAX_BODY, and returns 0 or TDR_EFAIL with a
 * sentence in *err; outputs are written only on success.
 */
#ifndef TDRAIN_ETCD_JSON_H
#define TDRAIN_ETCD_JSON_H

#include <stddef.h>
#include <stdint.h>

#include "lib/err.h"

/* Bounds: anything larger is refused, never truncated. */
#define TDR_ETCD_MAX_BODY ((size_t)4 << 20) /* one response */
#define TDR_ETCD_MAX_KEY 1024               /* decoded key bytes */
#define TDR_ETCD_MAX_VALUE ((size_t)64 << 10) /* decoded value bytes */
#define TDR_ETCD_MAX_KVS 65536              /* entries in one range response */
#define TDR_ETCD_MAX_TOKEN 1024             /* auth token characters */

/* gRPC status codes the gateway reports in "code". */
enum tdr_grpc_code {
	TDR_GRPC_OK = 0,
	TDR_GRPC_CANCELLED = 1,
	TDR_GRPC_UNKNOWN = 2,
	TDR_GRPC_INVALID_ARGUMENT = 3,
	TDR_GRPC_DEADLINE_EXCEEDED = 4,
	TDR_GRPC_NOT_FOUND = 5,
	TDR_GRPC_PERMISSION_DENIED = 7,
	TDR_GRPC_RESOURCE_EXHAUSTED = 8,
	TDR_GRPC_FAILED_PRECONDITION = 9,
	TDR_GRPC_ABORTED = 10,
	TDR_GRPC_UNAVAILABLE = 14,
	TDR_GRPC_UNAUTHENTICATED = 16,
};

/* One key-value from a range response; key and value are decoded and NUL-terminated. */
typedef struct tdr_etcd_kv {
	char *key;
	size_t key_len;
	char *value;
	size_t value_len;
	int64_t create_revision;
	int64_t mod_revision;
	int64_t version;
	int64_t lease; /* 0: no lease attached */
} tdr_etcd_kv;

void tdr_etcd_kv_clear(tdr_etcd_kv *kv);
void tdr_etcd_kvs_free(tdr_etcd_kv *kvs, size_t n);

/* ---- base64 (RFC 4648 standard alphabet, as Go's encoding/json writes []byte) ---- */

/* Characters needed to encode n bytes, without the NUL; SIZE_MAX if n is absurd. */
size_t tdr_b64_encoded_len(size_t n);
/* Encode with '=' padding and NUL-terminate; -1 if outcap < encoded_len + 1. */
int tdr_b64_encode(const void *in, size_t n, char *out, size_t outcap);
/*
 * Decode n characters (padding optional, no whitespace) into out; -1 on any
 * invalid character, misplaced padding, impossible length or if the result
 * would not fit in outcap bytes.  Writes *outlen.
 */
int tdr_b64_decode(const char *in, size_t n, unsigned char *out, size_t outcap, size_t *outlen);

/* ---- int64 as the gateway writes it ---- */

/* Strict decimal: optional '-', 1..19 digits, no space, no '+', in range. -1 otherwise. */
int tdr_etcd_parse_i64(const char *s, size_t n, int64_t *out);

/* ---- request bodies: malloc'd NUL-terminated JSON, or NULL with *err set ---- */

char *tdr_etcd_req_grant(int64_t ttl_s, tdr_err *err);
/* {"ID": id}: the body of keepalive, revoke and timetolive. */
char *tdr_etcd_req_lease_id(int64_t id, tdr_err *err);
/* Range over [key, range_end); range_end NULL: the single key.  limit 0: no limit. */
char *tdr_etcd_req_range(const char *key, size_t key_len, const char *range_end, size_t range_end_len,
			 int64_t limit, tdr_err *err);
/*
 * Create key only if absent (create_revision == 0), attached to lease; on
 * failure read the key back so the caller can say who holds it.
 */
char *tdr_etcd_req_create_txn(const char *key, const char *value, int64_t lease, tdr_err *err);
/*
 * Delete key only if it is still the incarnation created at create_rev and,
 * when lease is not 0, still attached to lease.
 */
char *tdr_etcd_req_delete_txn(const char *key, int64_t create_rev, int64_t lease, tdr_err *err);
/*
 * Bulk: one txn of n nested txns, each the single-key create (without its
 * failure read) or delete above.  etcd refuses a txn of more than
 * --max-txn-ops operations (128 by default), nested ones included, so n is at
 * most TDR_ETCD_TXN_MAX; the caller chunks.
 */
#define TDR_ETCD_TXN_MAX 100
char *tdr_etcd_req_create_many_txn(const char *const *keys, const char *value, size_t n, int64_t lease,
				   tdr_err *err);
char *tdr_etcd_req_delete_many_txn(const char *const *keys, const int64_t *create_revs, size_t n, int64_t lease,
				   tdr_err *err);
/* The body carries the password: the caller wipes and frees it. */
char *tdr_etcd_req_auth(const char *user, const char *password, tdr_err *err);
/* The value stored under a lease key: {"holder":..., "inst":..., "ttl_ms":...}. */
char *tdr_etcd_lease_value(const char *holder, const char *inst, int64_t ttl_ms, tdr_err *err);

/*
 * The end of the range of keys that start with prefix: prefix with its last
 * byte below 0xff incremented and the rest dropped; "\0" (length 1, meaning
 * "to the end of the keyspace") when there is none.  -1 if it does not fit.
 */
int tdr_etcd_prefix_end(const char *prefix, size_t n, char *out, size_t outcap, size_t *outlen);

/* ---- responses ---- */

/*
 * Recognise an error body, top-level or streamed ({"error": {...}}): fills
 * *grpc_code (-1 if absent) and msg (always NUL-terminated, may be empty).
 * Returns 0 if body is an error, -1 if it is not (or is not JSON).
 */
int tdr_etcd_parse_error(const char *body, size_t len, int *grpc_code, char *msg, size_t msgcap);

/* 1 if a gRPC code means "the cluster could not answer now, try again". */
int tdr_etcd_grpc_transient(int grpc_code);

/* header.revision of any response that must carry one. */
int tdr_etcd_parse_revision(const char *body, size_t len, int64_t *revision, tdr_err *err);

/* LeaseGrant: ID (> 0) and TTL (> 0); a non-empty "error" field is a failure. */
int tdr_etcd_parse_grant(const char *body, size_t len, int64_t *id, int64_t *ttl, tdr_err *err);

/*
 * LeaseKeepAlive (first message of the stream).  *ttl is the lease's new TTL
 * in seconds; 0 when absent or when "result" itself is absent: the lease is
 * gone.  A streamed error is a failure (see tdr_etcd_parse_error).
 */
int tdr_etcd_parse_keepalive(const char *body, size_t len, int64_t *id, int64_t *ttl, tdr_err *err);

/* LeaseTimeToLive: *ttl seconds left (-1: no such lease), *granted (0 if absent). */
int tdr_etcd_parse_timetolive(const char *body, size_t len, int64_t *ttl, int64_t *granted, tdr_err *err);

/*
 * Txn: *succeeded (absent = false), *revision = header.revision (> 0).  If
 * first_kv is not NULL it receives the first kv of the first response_range
 * among the responses (zeroed if none); the caller clears it.
 */
int tdr_etcd_parse_txn(const char *body, size_t len, int *succeeded, int64_t *revision, tdr_etcd_kv *first_kv,
		       tdr_err *err);

/* Bulk txn: succeeded[0..n) of the nested txns (n must match), *revision = header.revision. */
int tdr_etcd_parse_txn_many(const char *body, size_t len, size_t n, int *succeeded, int64_t *revision, tdr_err *err);

/* Range: a malloc'd array of *n kvs (NULL when empty); *more = the "more" flag. */
int tdr_etcd_parse_range(const char *body, size_t len, tdr_etcd_kv **kvs, size_t *n, int *more, tdr_err *err);

/* Authenticate: the token, printable ASCII only (it goes into a header), < tokcap. */
int tdr_etcd_parse_auth(const char *body, size_t len, char *token, size_t tokcap, tdr_err *err);

/*
 * A lease key's value: holder (required, 1..holdercap-1 bytes, no control
 * characters), inst (optional, "" if absent) and ttl_ms (optional, 0 if absent).
 */
int tdr_etcd_parse_lease_value(const char *value, size_t len, char *holder, size_t holdercap, char *inst,
			       size_t instcap, int64_t *ttl_ms, tdr_err *err);

#endif
