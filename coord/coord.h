/*
 * coord.h - what this replica may touch, and until when.
 *
 * A heartbeat thread renews one lease per coord.retry_period_ms, the
 * replica's session; the coordinator thread observes every lease once per
 * period and acquires or hands back leases in bulk so that:
 *   single mode:      one replica holds "leader" (its session) and drains
 *                     everything (scope TDR_SCOPE_ALL);
 *   partitioned mode: each live replica holds "member/<name>" (its session);
 *                     partitions "part/<p>" follow the sticky balanced
 *                     assignment (coord/assign.h) and are attached to the
 *                     session, as is "leader" (fold and triage) on one replica.
 * A scope is writable only until the session's valid_until: the monotonic
 * time its last successful renewal was SENT plus coord.renew_deadline_ms.  The worker asks
 * tdr_coord_may_write() before every claim and acknowledgement.
 */
#ifndef TDRAIN_COORD_H
#define TDRAIN_COORD_H

#include <stddef.h>
#include <stdint.h>

#include "coord/lease.h"
#include "lib/conf.h"
#include "lib/err.h"
#include "lib/store.h"

#define TDR_SCOPE_ALL (-1) /* single mode: the whole FIFO, under the leader lease */

typedef struct tdr_scope {
	int32_t part;     /* partition, or TDR_SCOPE_ALL */
	int64_t epoch;    /* fencing token of our lease on it */
	int draining;     /* coordinator wants it back: claim nothing new */
} tdr_scope;

typedef struct tdr_coord_view {
	int is_leader;
	int64_t leader_epoch;
	size_t nscopes;
	tdr_scope *scopes; /* owned by the view; tdr_coord_view_free() */
	size_t nmembers;   /* live members seen (partitioned), 1 in single mode when leader */
	int64_t failovers; /* leases this replica acquired from a previous holder */
	int64_t share_min, share_max; /* partitions per live member at the last tick (partitioned) */
	int64_t coord_requests;       /* coordination requests so far (statements / etcd calls) */
	/*
	 * Partitioned: scope_of[p] is the index in scopes of partition p, or -1
	 * (nparts = P entries), so the worker's per-event lookup is O(1) at any
	 * P; NULL in single mode.  Owned by the view.
	 */
	int32_t *scope_of;
	uint32_t nparts;
} tdr_coord_view;

/* Index in v->scopes of partition part (TDR_SCOPE_ALL in single mode), or -1 if not ours. O(1). */
static inline int tdr_coord_view_scope(const tdr_coord_view *v, int32_t part)
{
	if (v->scope_of != NULL)
		return part >= 0 && (uint32_t)part < v->nparts ? v->scope_of[part] : -1;
	for (size_t i = 0; i < v->nscopes; i++) /* single mode: at most one scope */
		if (v->scopes[i].part == part)
			return (int)i;
	return -1;
}

typedef struct tdr_coord tdr_coord;

int tdr_coord_new(tdr_coord **ret, const tdr_config *cfg, tdr_store *st, tdr_err *err);
void tdr_coord_free(tdr_coord *c);

/* One synchronous round (so startup knows its role), then the thread. */
int tdr_coord_start(tdr_coord *c, tdr_err *err);

/* Stop acquiring (SIGTERM): the session stays renewed until tdr_coord_stop*. */
void tdr_coord_request_stop(tdr_coord *c);
/*
 * Graceful stop once nothing is in flight: release every lease we hold (in
 * bulk) and end the threads, waiting until the monotonic deadline_ms at most.
 * TDR_ETRANSIENT if a thread is still in a store call then: the caller must
 * exit without freeing the coordinator or the store it uses (what was not
 * released expires as after a crash).
 */
int tdr_coord_stop_within(tdr_coord *c, int64_t deadline_ms);
/* The same without a deadline (every store call is bounded by store.timeout_ms). */
void tdr_coord_stop(tdr_coord *c);

/* Snapshot of scopes and role. */
int tdr_coord_view_get(tdr_coord *c, tdr_coord_view *out);
void tdr_coord_view_free(tdr_coord_view *v);

/* Still allowed to write in (part, epoch)?  (TDR_SCOPE_ALL for single mode.) */
int tdr_coord_may_write(tdr_coord *c, int32_t part, int64_t epoch);
/* Still the leader at epoch, and within the renew deadline? */
int tdr_coord_may_lead(tdr_coord *c, int64_t epoch);

/* Worker: nothing of (part, epoch) is in flight any more; the lease may be handed back. */
void tdr_coord_scope_idle(tdr_coord *c, int32_t part, int64_t epoch);

/*
 * The worker's wake-up flag: set to 1 (atomically) whenever the partitions
 * held change, so an idle worker claims in a gained partition at once.  Set
 * before tdr_coord_start; the flag must outlive the coordinator.
 */
void tdr_coord_set_wake(tdr_coord *c, volatile int *flag);
/* Bumped whenever the partitions held change: the worker republishes its status and metrics then. */
uint64_t tdr_coord_generation(tdr_coord *c);

/* Debug/ctl: the backend (for listing leases). */
tdr_lease_backend *tdr_coord_backend(tdr_coord *c);

/* "2,5,11" for log fields. */
void tdr_parts_format(const tdr_scope *s, size_t n, char *buf, size_t len);

#endif
