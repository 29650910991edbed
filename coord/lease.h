/*
 * lease.h - the lease-backend contract (coord/lease_mongo.c, coord/lease_etcd.c).
 *
 * A lease is a name ("leader", "part/7", "member/<replica>") held by at most
 * one holder at a time.  Every successful acquisition carries an epoch that is
 * strictly greater than every earlier epoch of that name: the fencing token.
 *
 * Safety rests on two store guarantees only (docs/DESIGN.md, "Leases"):
 *   - acquisition is a unique-key create (Mongo: insert of "<name>#<epoch>";
 *     etcd: txn create_revision == 0), so one contender wins each epoch;
 *   - a lease document is written by its holder only (renewals), so there is
 *     one writer per document.
 * Expiry is judged by each observer on its own monotonic clock (a lease is
 * expired when its renewal counter has not changed for ttl_ms), so no two
 * hosts need synchronised wall clocks.  The holder stops writing at
 * last_renew_sent + renew_deadline < ttl: it stops before anyone can take over.
 *
 * Every function returns 0 on success or a negative tdr_errcode:
 *   TDR_EDUP        acquire: held by someone else (or another contender won)
 *   TDR_EFENCED     renew/release: the lease is no longer ours at that epoch
 *   TDR_ETRANSIENT  the backend did not answer; nothing is known
 */
#ifndef TDRAIN_LEASE_H
#define TDRAIN_LEASE_H

#include <stddef.h>
#include <stdint.h>

#include "lib/err.h"

#define TDR_LEASE_NAME_MAX 64
#define TDR_HOLDER_MAX 64

typedef struct tdr_lease_info {
	char name[TDR_LEASE_NAME_MAX];
	char holder[TDR_HOLDER_MAX];
	int64_t epoch;
	int64_t ttl_ms;
	int64_t expires_in_ms; /* as this observer judges it; <= 0 means expired or released */
	int released;
	/* Attached leases (acquire_many): the session lease they live by, and its epoch; "" / 0 otherwise. */
	char session[TDR_LEASE_NAME_MAX];
	int64_t session_epoch;
	int mine; /* created by this very backend instance (this process), under its current session */
} tdr_lease_info;

/*
 * One lease of a bulk operation.  acquire_many: name and epoch (the newest
 * epoch of name the caller has seen, 0 if none) in; epoch (ours) and rc out.
 * release_many: name and epoch (ours) in; rc out.
 */
typedef struct tdr_lease_req {
	char name[TDR_LEASE_NAME_MAX];
	int64_t epoch;
	int rc; /* 0, TDR_EDUP (someone else holds it), TDR_ETRANSIENT (outcome unknown) */
} tdr_lease_req;

typedef struct tdr_lease_backend tdr_lease_backend;

struct tdr_lease_ops {
	/* Take name for holder (set at creation) if free, released or expired. */
	int (*acquire)(tdr_lease_backend *be, const char *name, int64_t ttl_ms, int64_t *ret_epoch, tdr_err *err);
	/* Extend our hold of name at epoch. */
	int (*renew)(tdr_lease_backend *be, const char *name, int64_t epoch, int64_t ttl_ms, tdr_err *err);
	/* Give up name at epoch so the next holder need not wait for expiry. */
	int (*release)(tdr_lease_backend *be, const char *name, int64_t epoch, tdr_err *err);
	/* Current (latest-epoch) lease of every name starting with prefix; caller frees *ret. */
	int (*list)(tdr_lease_backend *be, const char *prefix, tdr_lease_info **ret, size_t *ret_n, tdr_err *err);
	/*
	 * Attached leases (docs/DESIGN.md, "Sessions"): acquire every name of reqs
	 * that the caller judged free, attached to session (a lease this backend
	 * holds at session_epoch, e.g. "member/<replica>").  An attached lease is
	 * never renewed by itself: it is live exactly while its session is.  A
	 * bounded number of store requests for any n (Mongo: two per 256 names;
	 * etcd: one per 100 names).
	 * Returns 0 when every req has its rc, or a negative code with every rc set.
	 */
	int (*acquire_many)(tdr_lease_backend *be, const char *session, int64_t session_epoch, int64_t ttl_ms,
			    tdr_lease_req *reqs, size_t n, tdr_err *err);
	/* Give back attached leases we hold (Mongo: one request per 256 names; etcd: one per 100). */
	int (*release_many)(tdr_lease_backend *be, tdr_lease_req *reqs, size_t n, tdr_err *err);
	/*
	 * list("") for the coordinator, once per tick: the same answer, without
	 * what only tools need (etcd: the remaining TTL of each etcd lease).
	 * Partition leases ("part/<p>") only if with_parts: without them it is
	 * the sessions and the leader, a few leases whatever P (one request);
	 * with them one more request.
	 */
	int (*observe)(tdr_lease_backend *be, int with_parts, tdr_lease_info **ret, size_t *ret_n, tdr_err *err);
	void (*destroy)(tdr_lease_backend *be);
};

struct tdr_lease_backend {
	const struct tdr_lease_ops *ops;
	char holder[TDR_HOLDER_MAX];
	/* Store requests made so far (statements, or etcd HTTP calls): the coordination cost, for metrics. */
	int64_t requests; /* updated with __atomic builtins */
};

static inline void tdr_lease_count(tdr_lease_backend *be, int64_t n)
{
	__atomic_add_fetch(&be->requests, n, __ATOMIC_RELAXED);
}

static inline int64_t tdr_lease_requests(tdr_lease_backend *be)
{
	return __atomic_load_n(&be->requests, __ATOMIC_RELAXED);
}

struct tdr_store;
struct tdr_config;

/* Constructors.  holder is this replica's name. */
int tdr_lease_mongo_new(tdr_lease_backend **ret, struct tdr_store *store, const char *holder, tdr_err *err);
int tdr_lease_etcd_new(tdr_lease_backend **ret, const struct tdr_config *cfg, const char *holder, tdr_err *err);

static inline void tdr_lease_backend_free(tdr_lease_backend *be)
{
	if (be)
		be->ops->destroy(be);
}

#endif
