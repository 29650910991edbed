/*
 * coord.h - what this replica may touch, and until when.
 *
 * The coordinator runs in its own thread.  Every coord.retry_period_ms it
 * renews the leases it holds, observes the others, and acquires or hands back
 * leases so that:
 *   single mode:      one replica holds "leader" and drains everything
 *                     (scope TDR_SCOPE_ALL);
 *   partitioned mode: each live replica holds "member/<name>"; partition p is
 *                     held by the rendezvous winner among live members
 *                     ("part/<p>"); one replica also holds "leader" for the
 *                     fold and triage.
 * A scope is writable only until valid_until: the monotonic time its last
 * successful renewal was SENT plus coord.renew_deadline_ms.  The worker asks
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
} tdr_coord_view;

typedef struct tdr_coord tdr_coord;

int tdr_coord_new(tdr_coord **ret, const tdr_config *cfg, tdr_store *st, tdr_err *err);
void tdr_coord_free(tdr_coord *c);

/* One synchronous round (so startup knows its role), then the thread. */
int tdr_coord_start(tdr_coord *c, tdr_err *err);

/* Graceful stop: end the thread, release every lease we hold. */
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

/* Debug/ctl: the backend (for listing leases). */
tdr_lease_backend *tdr_coord_backend(tdr_coord *c);

/* "2,5,11" for log fields. */
void tdr_parts_format(const tdr_scope *s, size_t n, char *buf, size_t len);

#endif
