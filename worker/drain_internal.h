/*
 * drain_internal.h - what drain.c (the batch cycle) and orphans.c (orphan
 * recovery) share, and nothing else sees; worker/drain.h stays the public
 * contract.
 */
#ifndef TDRAIN_DRAIN_INTERNAL_H
#define TDRAIN_DRAIN_INTERNAL_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#include "consumers/event.h"
#include "lib/map.h"
#include "worker/drain.h"

/* One claimed event. */
struct item {
	bson_t *doc;
	bson_value_t id;
	int32_t part;
	int64_t attempts;
	int group;
	int valid;
	tdr_cevent ev;
	char reason[TDR_REASON_MAX];
};

/* One slot per partition (and one for single mode's scope): O(1) at any partition count. */
struct recovered {
	int used;
	int64_t epoch;
	int64_t at; /* monotonic ms of the last recovery pass */
};

struct tdr_drain {
	tdr_config cfg;
	tdr_store *st;
	tdr_coord *coord;
	tdr_archive *ar;
	mongoc_client_t *client;
	mongoc_collection_t *events, *claims, *deltas, *dead;
	int64_t seq;
	struct recovered *rec;
	size_t nrec; /* coord.partitions + 1 slots */
	int trace_fd;
	/*
	 * Acknowledged events not yet confirmed deleted from the FIFO (a delete
	 * can time out on a slow store and still land, or not).  Claims skip
	 * them and the delete is retried first, so a slow delete never causes a
	 * second dispatch.  canonical _id key -> bson_value_t *.
	 */
	tdr_map *forget;
	pthread_mutex_t mu;
	struct tdr_drain_stats stats;
	int64_t rate_t0, rate_acked0;
	int stopping; /* tdr_drain_request_stop: skip best-effort clean-ups (__atomic) */
};

/* drain.c */
/* Take ownership of a copy of doc as the next item; -1 if its _id is unusable for a claim. */
int drain_item_add(struct item *items, size_t *n, const bson_t *doc, int32_t part, int64_t attempts);
void drain_items_free(struct item *items, size_t n);
/* Map key for any _id: its canonical key, or (unsupported types) its extended JSON. */
int drain_id_map_key(const bson_value_t *id, char *key, size_t keylen);
/* Steps 2-6 for items already read; *ret_acked counts events whose batch was acknowledged. */
int drain_process(tdr_drain *d, const tdr_coord_view *v, struct item *items, size_t n, int64_t *ret_acked,
		  tdr_err *err);

/* orphans.c */
/* Recovered (part, epoch) within the last lease TTL. */
int drain_was_recovered(tdr_drain *d, int32_t part, int64_t epoch);
/* Make the next drain step recover (part, epoch) again. */
void drain_forget_recovered(tdr_drain *d, int32_t part, int64_t epoch);
/* Note (part, epoch) as recovered now (a scope found to have no claim records at all). */
void drain_mark_recovered(tdr_drain *d, int32_t part, int64_t epoch);
/* The same for a scope known to have no claim record, logged as a recovery that found nothing. */
void drain_mark_recovered_empty(tdr_drain *d, const tdr_scope *s);
/*
 * [coord.partitions] flags, 1 where tdrain_claims holds any record of that
 * partition; NULL if the read failed or memory ran out (then ask per scope).
 */
unsigned char *drain_claimed_parts(tdr_drain *d);
/* Run the orphans of scope s through the cycle, then delete their claim records. */
int drain_recover_scope(tdr_drain *d, const tdr_coord_view *v, const tdr_scope *s, tdr_err *err);

#endif
