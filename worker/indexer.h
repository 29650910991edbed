/*
 * indexer.h - index builds that must not hold a replica back.
 *
 * The indexes of docs/EVENTS.md make claims and recovery fast; no
 * correctness rule depends on them.  A build over a populated FIFO can take
 * minutes (MongoDB builds online but reads the whole collection; DocumentDB
 * answers createIndexes at the next run of a once-a-minute job), so main()
 * tries once within store.timeout_ms and, if that fails, starts the replica
 * anyway and hands the missing indexes to this module: a thread of its own,
 * with its own connection pool whose socket timeout (TDR_INDEX_TIMEOUT_MS)
 * outlasts such a build, retries with exponential backoff
 * (TDR_INDEX_RETRY_FIRST_MS doubling to TDR_INDEX_RETRY_MAX_MS).  The drain
 * loop and the watchdog never wait for it, and a stop waits for it at most a
 * bound (tdr_indexer_stop_within).
 *
 * Every replica whose attempt failed retries; several building the same
 * index is harmless (same name and keys: the store builds it once, and
 * createIndexes of an existing index is a no-op).
 *
 * Each replica publishes its state as tdrain_state {_id: "indexes/<replica>",
 * pending, missing[], attempts, error, at}, the single writer of that
 * document, so that tdrainctl status can say who still waits for a build.
 */
#ifndef TDRAIN_INDEXER_H
#define TDRAIN_INDEXER_H

#include <stdint.h>

#include "lib/conf.h"
#include "lib/err.h"
#include "lib/store.h"

#define TDR_INDEX_TIMEOUT_MS 120000     /* one createIndexes: longer than DocumentDB's 60 s job period */
#define TDR_INDEX_RETRY_FIRST_MS 5000
#define TDR_INDEX_RETRY_MAX_MS 300000

struct tdr_indexer_state {
	unsigned missing;       /* bits of tdr_index_specs still to build; 0: ready */
	int64_t attempts;       /* attempts so far, the start-up one included */
	int64_t next_retry_ms;  /* monotonic time of the next attempt; 0 while one runs or when ready */
	int building;           /* an attempt is in progress */
	char error[256];        /* the last failure */
};

typedef struct tdr_indexer tdr_indexer;

/*
 * Start retrying the indexes in missing (bits of tdr_index_specs) after the
 * start-up attempt failed with first_error.  Opens its own pool from cfg.
 */
int tdr_indexer_start(tdr_indexer **ret, const tdr_config *cfg, const tdr_store *like, unsigned missing,
		      const char *first_error, tdr_err *err);

void tdr_indexer_get(tdr_indexer *ix, struct tdr_indexer_state *out);

/* Ask the thread to stop; wait at most ms for it.  -1: still in a store call, left running. */
int tdr_indexer_stop_within(tdr_indexer *ix, int64_t ms);

/*
 * Stops (waiting at most 1 s) and frees, unless the thread is still in a store
 * call: the process is exiting then.  Its connections are closed by
 * close_deadline_ms (tdr_store_close_by).  -1: something was left running.
 */
int tdr_indexer_free(tdr_indexer *ix, int64_t close_deadline_ms);

/* Write this replica's tdrain_state "indexes/<replica>" document (best effort is the caller's call). */
int tdr_indexes_publish(tdr_store *st, mongoc_client_t *c, const char *replica, unsigned missing,
			int64_t attempts, const char *error, tdr_err *err);

#endif
