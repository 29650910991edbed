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
} tdr_lease_info;

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
	void (*destroy)(tdr_lease_backend *be);
};

struct tdr_lease_backend {
	const struct tdr_lease_ops *ops;
	char holder[TDR_HOLDER_MAX];
};

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
