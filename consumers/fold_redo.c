/*
 * fold_redo.c - the round's commit protocol: the fold state (tdrain_state
 * "fold"), the redo record whose unique insert is a round's commit point
 * (step 4), the redo of a record a predecessor left unfinished (step 0), and
 * the steps that retire a round (6).  Every crash point of the fold is
 * repaired by what is in this file (docs/DESIGN.md, "The fold").
 */
#include "config.h"

#include <inttypes.h>
#include <pthread.h>
#include <stdlib.h>

#include "consumers/fold_internal.h"
#include "lib/bsonx.h"
#include "lib/clock.h"
#include "lib/log.h"

int fold_read_state_seq(tdr_fold *f, mongoc_client_t *c, int64_t *ret, tdr_err *err)
{
	mongoc_collection_t *state = tdr_store_coll(f->st, c, TDR_C_STATE);
	bson_t filter = BSON_INITIALIZER, opts;
	mongoc_cursor_t *cur;
	const bson_t *doc;
	bson_error_t be;
	int rc = 0;

	*ret = 0;
	BSON_APPEND_UTF8(&filter, "_id", "fold");
	tdr_store_read_opts(f->st, &opts);
	cur = mongoc_collection_find_with_opts(state, &filter, &opts, NULL);
	if (mongoc_cursor_next(cur, &doc))
		*ret = tdr_bson_i64(doc, "seq", 0);
	if (mongoc_cursor_error(cur, &be)) {
		tdr_store_error(&be, "read fold state", err);
		rc = TDR_ETRANSIENT;
	}
	mongoc_cursor_destroy(cur);
	bson_destroy(&opts);
	bson_destroy(&filter);
	mongoc_collection_destroy(state);
	return rc;
}

/* The redo record for seq, if a predecessor left one; *ret NULL if none. */
int fold_read_record(tdr_fold *f, mongoc_client_t *c, int64_t seq, bson_t **ret, tdr_err *err)
{
	mongoc_collection_t *folds = tdr_store_coll(f->st, c, TDR_C_FOLDS);
	bson_t filter = BSON_INITIALIZER, opts;
	mongoc_cursor_t *cur;
	const bson_t *doc;
	bson_error_t be;
	int rc = 0;

	*ret = NULL;
	BSON_APPEND_INT64(&filter, "_id", seq);
	tdr_store_read_opts(f->st, &opts);
	cur = mongoc_collection_find_with_opts(folds, &filter, &opts, NULL);
	if (mongoc_cursor_next(cur, &doc))
		*ret = bson_copy(doc);
	if (mongoc_cursor_error(cur, &be)) {
		tdr_store_error(&be, "read fold record", err);
		rc = TDR_ETRANSIENT;
	}
	mongoc_cursor_destroy(cur);
	bson_destroy(&opts);
	bson_destroy(&filter);
	mongoc_collection_destroy(folds);
	return rc;
}

static int record_images(const bson_t *record, bson_t *images)
{
	bson_iter_t it;
	const uint8_t *data;
	uint32_t len;

	if (!bson_iter_init_find(&it, record, "img") || !BSON_ITER_HOLDS_ARRAY(&it))
		return -1;
	bson_iter_array(&it, &len, &data);
	return bson_init_static(images, data, len) ? 0 : -1;
}

int fold_redo(tdr_fold *f, mongoc_client_t *c, const bson_t *record, int64_t seq, int64_t epoch, tdr_err *err)
{
	bson_t images;
	int rc;

	if (record_images(record, &images) < 0)
		return tdr_err_set(err, TDR_EFAIL, "fold record %" PRId64 " is corrupt", seq);
	if (!tdr_coord_may_lead(f->coord, epoch))
		return tdr_err_set(err, TDR_EFENCED, "no longer leader");
	log_info("fold: redoing round %" PRId64 " left unfinished by a previous leader", seq);
	if ((rc = fold_apply_images(f, c, &images, seq, 0, err)) < 0)
		return rc;
	if ((rc = fold_finish_round(f, c, record, seq, epoch, err)) < 0)
		return rc;
	pthread_mutex_lock(&f->mu);
	f->stats.redo_rounds++;
	pthread_mutex_unlock(&f->mu);
	return 0;
}

/*
 * Step 4: build the redo record of round seq into rec (initialised by the
 * caller, who passes it on to fold_finish_round) and insert it.  Its unique
 * key is the round's commit point; TDR_EDUP: someone committed this round.
 */
int fold_record_insert(tdr_fold *f, mongoc_client_t *c, const struct round *r, const bson_t *images, int64_t seq,
		       int64_t epoch, bson_t *rec, tdr_err *err)
{
	mongoc_collection_t *folds;
	bson_error_t be;
	bson_t arr, opts;
	bool ok;
	int rc = 0;

	BSON_APPEND_INT64(rec, "_id", seq);
	BSON_APPEND_INT64(rec, "epoch", epoch);
	BSON_APPEND_UTF8(rec, "holder", f->cfg.name);
	BSON_APPEND_DATE_TIME(rec, "at", tdr_wall_ms());
	BSON_APPEND_ARRAY_BEGIN(rec, "deltas", &arr);
	for (size_t i = 0; i < r->ndeltas; i++) {
		char buf[16];
		const char *kp;
		bson_iter_t it;

		bson_uint32_to_string((uint32_t)i, &kp, buf, sizeof(buf));
		if (bson_iter_init_find(&it, r->deltas[i], "_id"))
			bson_append_value(&arr, kp, -1, bson_iter_value(&it));
	}
	bson_append_array_end(rec, &arr);
	BSON_APPEND_ARRAY(rec, "img", images);

	if (!tdr_coord_may_lead(f->coord, epoch))
		return tdr_err_set(err, TDR_EFENCED, "no longer leader");
	folds = tdr_store_coll(f->st, c, TDR_C_FOLDS);
	tdr_trusted_write_opts(&opts);
	ok = mongoc_collection_insert_one(folds, rec, &opts, NULL, &be);
	bson_destroy(&opts);
	if (!ok) {
		rc = tdr_store_error(&be, "insert fold record", err);
		/* On a duplicate, someone committed this round: the next round redoes it. */
		if (rc != TDR_EDUP)
			rc = TDR_ETRANSIENT;
	}
	mongoc_collection_destroy(folds);
	return rc;
}

/* Steps after apply: delete the folded deltas, advance the state, drop the record. */
int fold_finish_round(tdr_fold *f, mongoc_client_t *c, const bson_t *record, int64_t seq, int64_t epoch, tdr_err *err)
{
	mongoc_collection_t *deltas = tdr_store_coll(f->st, c, TDR_C_DELTAS);
	mongoc_collection_t *state = tdr_store_coll(f->st, c, TDR_C_STATE);
	mongoc_collection_t *folds = tdr_store_coll(f->st, c, TDR_C_FOLDS);
	bson_t del = BSON_INITIALIZER, in;
	bson_iter_t it;
	bson_error_t be;
	int rc = 0;

	/* One statement: {_id: {$in: deltas}}. */
	if (bson_iter_init_find(&it, record, "deltas") && BSON_ITER_HOLDS_ARRAY(&it)) {
		const uint8_t *data;
		uint32_t len;
		bson_t arr;

		bson_iter_array(&it, &len, &data);
		if (bson_init_static(&arr, data, len)) {
			BSON_APPEND_DOCUMENT_BEGIN(&del, "_id", &in);
			BSON_APPEND_ARRAY(&in, "$in", &arr);
			bson_append_document_end(&del, &in);
			if (!mongoc_collection_delete_many(deltas, &del, NULL, NULL, &be)) {
				tdr_store_error(&be, "delete folded deltas", err);
				rc = TDR_ETRANSIENT;
			}
		}
	}
	if (rc == 0) {
		bson_t sel = BSON_INITIALIZER, upd = BSON_INITIALIZER, set, opts = BSON_INITIALIZER, older;

		/* Forward only: a deposed leader's late update must not move the state back. */
		BSON_APPEND_UTF8(&sel, "_id", "fold");
		BSON_APPEND_DOCUMENT_BEGIN(&sel, "seq", &older);
		BSON_APPEND_INT64(&older, "$lt", seq);
		bson_append_document_end(&sel, &older);
		BSON_APPEND_DOCUMENT_BEGIN(&upd, "$set", &set);
		BSON_APPEND_INT64(&set, "seq", seq);
		BSON_APPEND_INT64(&set, "epoch", epoch);
		BSON_APPEND_UTF8(&set, "holder", f->cfg.name);
		BSON_APPEND_DATE_TIME(&set, "at", tdr_wall_ms());
		bson_append_document_end(&upd, &set);
		BSON_APPEND_BOOL(&opts, "upsert", true);
		if (!mongoc_collection_update_one(state, &sel, &upd, &opts, NULL, &be)) {
			/* A duplicate _id: the state is already at seq or beyond (a newer leader). */
			if (tdr_store_error(&be, "advance fold state", err) == TDR_EDUP)
				rc = tdr_err_set(err, TDR_EFENCED, "fold state already past %" PRId64, seq);
			else
				rc = TDR_ETRANSIENT;
		}
		bson_destroy(&sel);
		bson_destroy(&upd);
		bson_destroy(&opts);
	}
	if (rc == 0) {
		bson_t sel = BSON_INITIALIZER, lte;

		/* Best effort: records at or below the state's seq are never redone. */
		BSON_APPEND_DOCUMENT_BEGIN(&sel, "_id", &lte);
		BSON_APPEND_INT64(&lte, "$lte", seq);
		bson_append_document_end(&sel, &lte);
		(void)mongoc_collection_delete_many(folds, &sel, NULL, NULL, &be);
		bson_destroy(&sel);
	}
	bson_destroy(&del);
	mongoc_collection_destroy(deltas);
	mongoc_collection_destroy(state);
	mongoc_collection_destroy(folds);
	return rc;
}
