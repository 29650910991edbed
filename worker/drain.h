/*
 * drain.h - claim a batch within this replica's scopes, hand it to the
 * consumers, and acknowledge it.  Called from the main loop; single-threaded.
 *
 * One batch, per partition group in it (docs/DESIGN.md, "The batch cycle"):
 *   1. find      events in owned, non-draining partitions (head of the FIFO)
 *   2. claim     insert claim record "<part>:<epoch>:<seq>" {ids, attempts}
 *   3. consume   validate -> dead-letter list; archive (durable) the valid ones
 *   4. commit    insert delta record (same _id) with the compact valid events,
 *                and the dead letters (unique by event _id)
 *   5. ack       delete the claim record, filter {_id, owner, epoch}: fenced
 *   6. forget    delete the events by _id (their effect is committed)
 * Every write is preceded by tdr_coord_may_write(part, epoch).
 * When a scope is gained, claim records of older epochs in it are orphans:
 * their events are processed first, with attempts + 1 (dead-lettered at
 * drain.max_attempts), then the old records are deleted.
 */
#ifndef TDRAIN_DRAIN_H
#define TDRAIN_DRAIN_H

#include <stdint.h>

#include "consumers/archive.h"
#include "coord/coord.h"
#include "lib/conf.h"
#include "lib/err.h"
#include "lib/store.h"

typedef struct tdr_drain tdr_drain;

/* Latency histogram; bucket upper bounds in tdr_hist_bounds (seconds), last is +Inf. */
#define TDR_HIST_BUCKETS 12
extern const double tdr_hist_bounds[TDR_HIST_BUCKETS - 1];
struct tdr_hist {
	uint64_t bucket[TDR_HIST_BUCKETS];
	uint64_t count;
	double sum_s;
};
void tdr_hist_add(struct tdr_hist *h, int64_t usec);

struct tdr_drain_stats {
	int64_t batches;
	int64_t claimed;        /* events claimed (including re-claims) */
	int64_t acked;          /* events whose batch was acknowledged */
	int64_t deadlettered;
	int64_t orphans;        /* events recovered from older epochs */
	int64_t fenced;         /* batches abandoned because our lease ended */
	int64_t store_errors;
	int64_t last_batch;     /* size of the last batch */
	int64_t claim_us, consume_us, ack_us; /* last batch's phase latencies */
	double rate;            /* acknowledged events/s, smoothed */
	struct tdr_hist h_claim, h_consume, h_ack;
};

int tdr_drain_new(tdr_drain **ret, const tdr_config *cfg, tdr_store *st, tdr_coord *coord, tdr_archive *ar,
		  tdr_err *err);
void tdr_drain_free(tdr_drain *d);

/*
 * One step: recover newly gained scopes, then one batch.  *ret_full is set
 * when the batch was full (call again at once); 0 with *ret_full == 0 and
 * *ret_n == 0 means idle.  Errors are TDR_ETRANSIENT (retry with backoff) or
 * TDR_EFAIL.
 */
int tdr_drain_step(tdr_drain *d, int *ret_full, int64_t *ret_n, tdr_err *err);

/*
 * From any thread (the signal thread on SIGTERM): the step in progress ends
 * without its best-effort clean-ups (a failed batch's unclaim), so a stop with
 * the store gone waits for at most the one store call in flight.
 */
void tdr_drain_request_stop(tdr_drain *d);

/* Reload what can change at run time (batch size, allow-list, max attempts). */
void tdr_drain_reload(tdr_drain *d, const tdr_config *cfg);

void tdr_drain_stats_get(tdr_drain *d, struct tdr_drain_stats *out);

#endif
