/*
 * fold_internal.h - what the files of the fold share, and nothing else sees.
 *
 * The fold is one writer's round (docs/DESIGN.md, "The fold"), cut along its
 * seams: fold.c the round and the thread, fold_ledger.c the dedup, fold_redo.c
 * the redo record and the fold state, fold_image.c the after-images and their
 * application, fold_cache.c the leader's copy of the derived documents, and
 * fold_identity.c the device -> username links.  consumers/fold.h stays the
 * public contract; this header is for those files only.
 */
#ifndef TDRAIN_FOLD_INTERNAL_H
#define TDRAIN_FOLD_INTERNAL_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#include "consumers/event.h"
#include "consumers/fold.h"
#include "lib/map.h"

/* A device's changes within one round. */
struct devround {
	int64_t inc;
	const char *best_u; /* latest signed-in username this round (points into a delta) */
	uint32_t best_ulen;
	int64_t best_t;
};

#define NCOLL 6 /* fold_derived_colls[] */

/*
 * The leader's copy of the derived documents (docs/DESIGN.md, "The fold's
 * cache").  The leader is their only writer, so what it last wrote is what
 * the store holds: a round reads only keys it has never seen.  The copy is
 * valid for one epoch and one fold seq: a round that starts at any other
 * (another leader folded, or our own round failed part-way) starts over
 * from the store.  On FerretDB, where a keyed read costs a scan of the
 * collection anyway, the whole collection is read once (complete: a miss
 * means absent).  Bounded by fold.cache_mb; beyond it the entries are
 * dropped and misses are read again.
 */
struct fold_cache {
	tdr_map *docs[NCOLL]; /* key -> bson_t * (current document) or &absent */
	int complete[NCOLL];
	int valid;
	int64_t epoch, seq;
	size_t bytes;
	int64_t hits, misses, loads;
};

struct tdr_fold {
	tdr_config cfg;
	tdr_store *st;
	tdr_coord *coord;
	pthread_t thread;
	pthread_mutex_t mu;
	pthread_cond_t cv;
	int stop, running, exited; /* exited: the thread is past its last store call */
	int drain_busy;		   /* tdr_fold_drain_busy */
	struct tdr_fold_stats stats;
	struct fold_cache cache; /* fold thread only */
	int64_t reads_us;	 /* this round's time in fold_cache_fill / fold_cache_reset (fold thread only) */
	int64_t round_events;	 /* a round's event bound: halved when its images did not fit (fold thread only) */
	int more;		 /* the last round left deltas it could have taken (fold thread only) */
};

struct round {
	bson_t **deltas;
	size_t *starts; /* index in ev[] of each delta's first event */
	size_t ndeltas;
	tdr_cevent *ev;
	size_t nev, capev;
	size_t *new_idx;
	size_t nnew;
};

/* The derived collections, in the order of the cache's docs[] and of every image pass. */
extern const char *const fold_derived_colls[];

/* fold.c: shared helpers. */
int fold_coll_index(const char *name);
/* Read docs of coll whose _id is in keys, calling fn(doc) for each. */
int fold_read_in(tdr_fold *f, mongoc_collection_t *coll, const char *const *keys, const size_t *lens, size_t n,
		 void (*fn)(void *ctx, const bson_t *doc), void *ctx, tdr_err *err);

/* fold_ledger.c: step 2, the one dedup.  Fills r->new_idx with the events this round counts. */
int fold_dedup(tdr_fold *f, mongoc_client_t *c, struct round *r, int64_t *ret_dups, tdr_err *err);

/* fold_identity.c: the identity tie-break, and the identity_map / username_metrics updates of a round. */
int fold_cmp_link(int64_t ta, const char *ua, size_t la, int64_t tb, const char *ub, size_t lb);
int fold_resolve_identities(tdr_map *devs, const struct fold_cache *fc, bson_t *writes, uint32_t *idx,
			    tdr_err *err);

/* fold_cache.c: the leader's copy of the derived documents. */
uint32_t fold_raw_len(const void *raw);
void fold_cache_clear(struct fold_cache *fc);
const bson_t *fold_cache_doc(const struct fold_cache *fc, int ci, const char *key, size_t klen, bson_t *tmp);
int fold_cache_put(struct fold_cache *fc, int ci, const char *key, size_t klen, uint8_t *doc);
int fold_cache_reset(tdr_fold *f, mongoc_client_t *c, int64_t epoch, int64_t seq, tdr_err *err);
int fold_cache_fill(tdr_fold *f, mongoc_client_t *c, int ci, const char *const *keys, const size_t *lens,
		    size_t n, tdr_err *err);
void fold_cache_advance(tdr_fold *f, int64_t seq);

/* fold_image.c: steps 3 (after-images of a round's writes) and 5 (writing them). */
int fold_build_images(tdr_fold *f, mongoc_client_t *c, const bson_t *writes, int64_t seq, bson_t *images,
		      tdr_err *err);
int fold_apply_images(tdr_fold *f, mongoc_client_t *c, const bson_t *images, int64_t seq, int first,
		      tdr_err *err);

/* fold_redo.c: the fold state, the redo record (step 4, step 0) and step 6. */
int fold_read_state_seq(tdr_fold *f, mongoc_client_t *c, int64_t *ret, tdr_err *err);
int fold_read_record(tdr_fold *f, mongoc_client_t *c, int64_t seq, bson_t **ret, tdr_err *err);
int fold_redo(tdr_fold *f, mongoc_client_t *c, const bson_t *record, int64_t seq, int64_t epoch, tdr_err *err);
int fold_record_insert(tdr_fold *f, mongoc_client_t *c, const struct round *r, const bson_t *images, int64_t seq,
		       int64_t epoch, bson_t *rec, tdr_err *err);
int fold_finish_round(tdr_fold *f, mongoc_client_t *c, const bson_t *record, int64_t seq, int64_t epoch,
		      tdr_err *err);

#endif
