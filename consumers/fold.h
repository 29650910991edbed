/*
 * fold.h - the fold: committed batch deltas -> derived collections.
 *
 * Runs in its own thread on the replica holding the "leader" lease, so
 * every derived document has exactly one writer, off the FIFO's critical
 * path.  A round (docs/DESIGN.md, "The fold"):
 *   0. if redo record f+1 exists (a predecessor crashed mid-apply): redo it;
 *   1. read up to fold.max_deltas deltas (at most 100,000 events, fewer
 *      when the images of step 3 would not fit in one redo record);
 *   2. insert {_id: insert_id, d: delta} into tdrain_ledger for every event;
 *      a duplicate key whose d is one of THIS round's deltas is ours (an
 *      attempt that never committed), any other duplicate was counted before;
 *   3. aggregate the new events; build one update per derived document;
 *   4. insert redo record f+1 {deltas, writes} (unique key: the commit point);
 *   5. apply the images, each with _f = f+1 (MongoDB: fenced lone-_id
 *      upserts; FerretDB, DocumentDB: delete_many + insert_many per
 *      collection, fenced by _f);
 *      the leader keeps what it wrote (the cache), so step 3 reads only
 *      keys it has not seen;
 *   6. delete the deltas, advance tdrain_state.fold to f+1, drop the record.
 * A redo reads the written documents and skips those with _f >= f+1, so a
 * replay applies each write once.  In partitioned mode the leader also
 * "triages": it sets `part` on events a producer wrote without it.
 */
#ifndef TDRAIN_FOLD_H
#define TDRAIN_FOLD_H

#include <stdint.h>

#include "coord/coord.h"
#include "lib/conf.h"
#include "lib/err.h"
#include "lib/store.h"

typedef struct tdr_fold tdr_fold;

/* The phases of a round, for tdr_fold_stats.phase_us (where a round's time goes). */
enum tdr_fold_phase {
	TDR_FOLD_READ,    /* step 1: the deltas, the fold state, a redo record */
	TDR_FOLD_LEDGER,  /* step 2: the ledger insert (and the duplicates' read) */
	TDR_FOLD_READS,   /* step 3: derived documents the cache does not hold (and a cache reset) */
	TDR_FOLD_BUILD,   /* step 3: aggregation and after-images, in memory */
	TDR_FOLD_RECORD,  /* step 4: the redo record */
	TDR_FOLD_APPLY,   /* step 5: the images' writes */
	TDR_FOLD_FINISH,  /* step 6: deltas' delete, state advance, record delete */
	TDR_FOLD_NPHASES
};
extern const char *const tdr_fold_phase_names[TDR_FOLD_NPHASES];

struct tdr_fold_stats {
	int active;            /* we are the leader and folding */
	int64_t rounds;
	int64_t redo_rounds;
	int64_t deltas;        /* deltas folded */
	int64_t events;        /* new events folded */
	int64_t duplicates;    /* events skipped as already counted */
	int64_t triaged;       /* events given a partition */
	int64_t lag_ms;        /* age of the oldest delta at the last round */
	int64_t round_us;      /* duration of the last round */
	int64_t errors;
	int64_t cache_bytes;   /* the leader's copy of derived documents */
	int64_t cache_loads;   /* times it started over from the store */
	int64_t cache_hits, cache_misses; /* keys found in it / read from the store */
	int64_t phase_us[TDR_FOLD_NPHASES]; /* time spent in each phase, committed rounds, cumulative */
	int64_t images;        /* derived documents written (one per touched key per round), cumulative */
	int64_t last_events, last_images, last_image_bytes; /* of the last committed round */
};

int tdr_fold_new(tdr_fold **ret, const tdr_config *cfg, tdr_store *st, tdr_coord *coord, tdr_err *err);
int tdr_fold_start(tdr_fold *f, tdr_err *err);
/*
 * The drain's latest step took a full batch (busy) or not.  While it is busy,
 * an expensive round holds the next one back (docs/DESIGN.md, "The fold's
 * pace"); the step that ends the backlog wakes the fold at once.
 */
void tdr_fold_drain_busy(tdr_fold *f, int busy);
/* Ask the thread to stop after its current statement (returns at once). */
void tdr_fold_request_stop(tdr_fold *f);
/* Stop and join the thread. */
void tdr_fold_stop(tdr_fold *f);
/*
 * Stop and join, waiting at most ms; -1 if the thread is still in a store
 * call then (it stays running; tdr_fold_free leaves it alone: call it only
 * on the way out of the process).
 */
int tdr_fold_stop_within(tdr_fold *f, int64_t ms);
void tdr_fold_free(tdr_fold *f);
void tdr_fold_reload(tdr_fold *f, const tdr_config *cfg);
void tdr_fold_stats_get(tdr_fold *f, struct tdr_fold_stats *out);

/* One round as leader at epoch (the thread calls this; exposed for tools). *ret_n = deltas folded. */
int tdr_fold_round(tdr_fold *f, int64_t epoch, int64_t *ret_n, tdr_err *err);

#endif
