/*
 * store.h - tdrain's view of MongoDB (or FerretDB): a pooled client, the
 * collection names, error classification and index setup.
 *
 * Thread model: tdr_store is shared; each thread pops its own client for the
 * duration of a unit of work and pushes it back (mongoc_client_pool_t).
 * Every operation carries a server-side and socket timeout no longer than
 * store.timeout_ms, which configuration keeps below the lease renew deadline.
 */
#ifndef TDRAIN_STORE_H
#define TDRAIN_STORE_H

#include <mongoc/mongoc.h>

#include "lib/conf.h"
#include "lib/err.h"

/* Collections; the FIFO's name is configurable (store.events). */
#define TDR_C_CLAIMS "tdrain_claims"       /* in-flight batch claim records */
#define TDR_C_DELTAS "tdrain_deltas"       /* committed batch deltas, awaiting the fold */
#define TDR_C_LEDGER "tdrain_ledger"       /* insert_id -> first delta: the one dedup */
#define TDR_C_FOLDS "tdrain_folds"         /* fold intent records (redo log) */
#define TDR_C_DEADLETTER "tdrain_deadletter"
#define TDR_C_LEASES "tdrain_leases"
#define TDR_C_PARTS "tdrain_parts" /* partition leases (partitioned mode), same shape as tdrain_leases */
#define TDR_C_STATE "tdrain_state"         /* fold progress, member stats */
#define TDR_C_COUNTERS "event_counters"    /* event x UTC day */
#define TDR_C_DEVICES "device_metrics"     /* per distinct_id */
#define TDR_C_DEVICE_EVENTS "device_event_counts" /* per distinct_id x event */
#define TDR_C_IDENTITIES "identity_map"    /* distinct_id -> username */
#define TDR_C_USERS "username_metrics"     /* per username, incremental */
#define TDR_C_SIGNINS "signin_days"        /* per username: set of UTC days */

typedef struct tdr_store {
	mongoc_client_pool_t *pool;
	mongoc_uri_t *uri;
	char db[64];
	char events[64];
	int64_t timeout_ms;
	int is_ferretdb;   /* informational: decides nothing about correctness */
	int is_documentdb; /* statement shapes only (lib/keyed.h, the claim's order); never correctness */
	int32_t max_bson;  /* server's maxBsonObjectSize */
} tdr_store;

/* Parse the URI, set timeouts, create the pool; does not contact the server. */
int tdr_store_open(tdr_store **ret, const tdr_config *cfg, const char *appname, tdr_err *err);
void tdr_store_close(tdr_store *st);

/*
 * tdr_store_close within a time budget.  Closing is a store call: libmongoc
 * ends the pool's server sessions (endSessions), and with the store gone its
 * server selection waits store.timeout_ms.  The close runs on a helper thread;
 * if it has not finished at deadline_ms (monotonic, INT64_MAX: no limit) it is
 * left to the exiting process and TDR_ETRANSIENT is returned: st is gone
 * either way, and mongoc_cleanup() must not be called after a left close.
 */
int tdr_store_close_by(tdr_store *st, int64_t deadline_ms);

/* Round trip to the server (hello + buildInfo); fills is_ferretdb / max_bson. */
int tdr_store_ping(tdr_store *st, tdr_err *err);

/*
 * The indexes tdrain's queries need (docs/EVENTS.md lists them).  They make
 * claims and recovery fast; no correctness rule depends on them (every
 * election is a unique _id insert), so a replica runs without them.
 */
struct tdr_index_spec {
	const char *coll; /* NULL: the events collection (store.events) */
	const char *name;
	const char *k1, *k2;
	int unique;
	int documentdb_only; /* a statement shape DocumentDB serves only with it (lib/store.c) */
};
#define TDR_NINDEXES 6
extern const struct tdr_index_spec tdr_index_specs[TDR_NINDEXES];

/* The bits of tdr_index_specs this store needs (after tdr_store_ping: it depends on is_documentdb). */
unsigned tdr_store_indexes_wanted(const tdr_store *st);

/* Create every index tdrain's queries need. Idempotent. */
int tdr_store_ensure_indexes(tdr_store *st, tdr_err *err);

/*
 * Create the indexes whose bit (1 << position in tdr_index_specs) is set in
 * want, on client c (the caller chooses its timeouts: a build over a populated
 * collection can take minutes): one createIndexes per collection.  After a
 * refused one (a conflicting spec, a missing privilege) the next collections
 * are still attempted; after a timeout or a network error they are not (they
 * would wait as long) and count as missing.
 * *ret_missing gets the bits of those not created, and the first failure is
 * returned.  createIndexes of an existing index is a no-op.
 */
int tdr_store_create_indexes(tdr_store *st, mongoc_client_t *c, unsigned want, unsigned *ret_missing, tdr_err *err);

/*
 * listIndexes of every collection of tdr_index_specs: *ret_present gets the
 * bits of the indexes that exist by name.  A store may list an index while it
 * is still being built (DocumentDB does), so "present" is not "ready".
 */
int tdr_store_list_indexes(tdr_store *st, mongoc_client_t *c, unsigned *ret_present, tdr_err *err);

/* "a,b": the names of the indexes whose bits are set in mask. */
void tdr_store_index_names(unsigned mask, char *buf, size_t len);

mongoc_client_t *tdr_store_pop(tdr_store *st);
void tdr_store_push(tdr_store *st, mongoc_client_t *c);
mongoc_collection_t *tdr_store_coll(tdr_store *st, mongoc_client_t *c, const char *name);

/*
 * Map a libmongoc error to a tdr_errcode: network / timeout / not-primary /
 * shutdown -> TDR_ETRANSIENT, duplicate key -> TDR_EDUP, else TDR_EFAIL; and
 * fill err with "what: message".
 */
int tdr_store_error(const bson_error_t *e, const char *what, tdr_err *err);
int tdr_store_is_dup(const bson_error_t *e);

/*
 * Bulk write helpers: unordered, write concern majority-acknowledged.
 * Duplicate-key failures of inserts are reported through *ret_dups (may be
 * NULL) and are not errors: unique-key inserts are how tdrain records facts.
 */
int tdr_bulk_run(mongoc_bulk_operation_t *bulk, const char *what, int64_t *ret_dups, bson_t *ret_reply,
		 tdr_err *err);
mongoc_bulk_operation_t *tdr_bulk_new(mongoc_collection_t *coll, int ordered);

/*
 * Writes (inserts, replacements) of documents tdrain composed itself from
 * values it has already validated: deltas, ledger entries, fold records,
 * after-images.  libmongoc otherwise walks every such document again (UTF-8
 * and key checks): ~9% of the worker's CPU in a drain.  Documents that carry
 * producer bytes verbatim (dead letters, claim records listing raw _ids) keep
 * the checks.  tdr_trusted_write_opts() initialises *opts ({validate: false},
 * to add to); bson_destroy() it.
 */
void tdr_trusted_write_opts(bson_t *opts);
void tdr_bulk_insert_trusted(mongoc_bulk_operation_t *bulk, const bson_t *doc);

/*
 * There is deliberately no estimated count: estimatedDocumentCount,
 * unfiltered count and collStats answer from statistics on DocumentDB
 * (PostgreSQL's: 85,000 for an empty collection), and operators page on
 * backlog figures.
 *
 * The exact number of documents in coll, counted up to limit (> 0):
 * *ret = min(count, limit), and *ret_capped = 1 when the count reached limit
 * (then *ret is a lower bound).  The cost is bounded by limit
 * (docs/DESIGN.md, "Counting documents"): FerretDB is asked collStats, whose
 * count it computes with SQL COUNT(*) (exact, ~1 us per document); every other
 * store is asked aggregate [{$limit}, {$count}], which counts real documents
 * (DocumentDB: ~0.3 us per document) where count and estimatedDocumentCount
 * may answer from statistics.
 */
int tdr_store_count(tdr_store *st, mongoc_client_t *c, const char *coll, int64_t limit, int64_t *ret,
		    int *ret_capped, tdr_err *err);

/* Options document carrying maxTimeMS for reads. */
void tdr_store_read_opts(const tdr_store *st, bson_t *opts);

#endif
