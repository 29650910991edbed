/*
 * consumer.h - the consumer contract.
 *
 * tdrain has two kinds of consumer, because derived state must be exact
 * without transactions on a store whose updates are not atomic (FerretDB):
 *
 * 1. Batch consumers run on the partition holder, inside the batch cycle
 *    (worker/drain.c), before the batch is acknowledged.  They see the whole
 *    claimed batch and decide each event's outcome:
 *      done        -> the event's compact form goes into the batch delta;
 *      failed      -> dead letter, with "<field>: <problem>" (validation:
 *                     consumers/event.c);
 *      retry later -> the batch is not acknowledged (store or archive
 *                     unavailable: TDR_ETRANSIENT), and is claimed again.
 *    Built in: validation (event.c) and the archive (archive.c).
 *
 * 2. Projections run in the fold (consumers/fold.c), on the leader only: one
 *    writer per derived document.  A fold round reads committed deltas,
 *    deduplicates by insert_id once for every projection (tdrain_ledger),
 *    aggregates the new events in memory, and emits ONE lone-_id upsert per
 *    derived document it touches, per round: work proportional to the unique
 *    keys changed, never to history.  Built in (docs/EVENTS.md):
 *    event_counters, device_metrics, device_event_counts, identity_map,
 *    username_metrics, signin_days.
 *
 * A projection implements tdr_projection: add() is called once per new event
 * of the round, in order, with the device's resolved identity; emit()
 * appends {c: collection, k: _id, u: update} records, which the fold stores
 * in its redo record before applying them.
 */
#ifndef TDRAIN_CONSUMER_H
#define TDRAIN_CONSUMER_H

#include <bson/bson.h>
#include <stdint.h>

#include "consumers/event.h"
#include "lib/err.h"

struct tdr_round;

typedef struct tdr_projection {
	const char *name;
	const char *collection;
	void *(*create)(void);
	void (*destroy)(void *state);
	int (*add)(void *state, const tdr_cevent *ev, char day[11]);
	/* Append records to writes (array) starting at *idx; fold_seq goes in _f. */
	int (*emit)(void *state, bson_t *writes, uint32_t *idx, int64_t fold_seq);
} tdr_projection;

#endif
