/*
 * orphans.c - orphan recovery (docs/DESIGN.md, "Orphan recovery"): when this
 * replica gains a scope at epoch E, the claim records of that scope older
 * than E belong to holders whose lease has ended.  Their events are run
 * through the batch cycle first (attempts + 1), then the records are
 * deleted, each fenced by its own epoch.  Apart from drain.c because it is
 * keyed on ownership, not on batches, and has its own bookkeeping.
 */
#include "config.h"

#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lib/bsonx.h"
#include "lib/clock.h"
#include "lib/log.h"
#include "lib/map.h"
#include "worker/drain_internal.h"

/*
 * Recovered in this scope recently.  The pass is repeated every lease TTL: a
 * deposed holder's claim insert, sent before its deadline, can still reach
 * the store after our first pass (retransmitted when a partition heals).
 */
static struct recovered *rec_slot(tdr_drain *d, int32_t part)
{
	size_t i = part < 0 ? d->nrec - 1 : (size_t)part;

	return i < d->nrec ? &d->rec[i] : NULL;
}

int drain_was_recovered(tdr_drain *d, int32_t part, int64_t epoch)
{
	struct recovered *r = rec_slot(d, part);

	return r && r->used && r->epoch == epoch && tdr_mono_ms() - r->at < d->cfg.lease_ttl_ms;
}

/* Make the next drain step recover (part, epoch) again. */
void drain_forget_recovered(tdr_drain *d, int32_t part, int64_t epoch)
{
	struct recovered *r = rec_slot(d, part);

	if (r && r->used && r->epoch == epoch)
		r->at = tdr_mono_ms() - d->cfg.lease_ttl_ms;
}

static int recovered_before(tdr_drain *d, int32_t part, int64_t epoch)
{
	struct recovered *r = rec_slot(d, part);

	return r && r->used && r->epoch == epoch;
}

void drain_mark_recovered(tdr_drain *d, int32_t part, int64_t epoch)
{
	struct recovered *r = rec_slot(d, part);

	/* A slot per partition: a newer epoch simply replaces what an older one left. */
	if (r)
		*r = (struct recovered){ 1, epoch, tdr_mono_ms() };
}

unsigned char *drain_claimed_parts(tdr_drain *d)
{
	unsigned char *has = calloc((size_t)d->cfg.partitions + 1, 1);
	bson_t filter = BSON_INITIALIZER, opts, proj;
	mongoc_cursor_t *cur;
	const bson_t *doc;
	bson_error_t be;

	if (has == NULL)
		return NULL;
	/*
	 * Every record, projected to its partition: the collection holds at most
	 * a few batches' records per live owner (each is deleted on
	 * acknowledgement), so this is one small read whatever P is.
	 */
	tdr_store_read_opts(d->st, &opts);
	BSON_APPEND_DOCUMENT_BEGIN(&opts, "projection", &proj);
	BSON_APPEND_INT32(&proj, "part", 1);
	bson_append_document_end(&opts, &proj);
	cur = mongoc_collection_find_with_opts(d->claims, &filter, &opts, NULL);
	while (mongoc_cursor_next(cur, &doc)) {
		int64_t p = tdr_bson_i64(doc, "part", -1);

		if (p >= 0 && p < d->cfg.partitions)
			has[p] = 1;
	}
	if (mongoc_cursor_error(cur, &be)) {
		free(has);
		has = NULL;
	}
	mongoc_cursor_destroy(cur);
	bson_destroy(&opts);
	bson_destroy(&filter);
	return has;
}

struct orphan_ids {
	bson_value_t *ids;
	int64_t *att;
	size_t n, cap;
	tdr_map *index; /* id key -> position + 1: one entry per event across records */
	char **recs;   /* claim record _ids to delete afterwards */
	int64_t *rec_epochs;
	size_t nrecs, caprecs;
};

static void orphans_free(struct orphan_ids *o)
{
	tdr_map_free(o->index, NULL);
	for (size_t i = 0; i < o->n; i++)
		bson_value_destroy(&o->ids[i]);
	for (size_t i = 0; i < o->nrecs; i++)
		free(o->recs[i]);
	free(o->ids);
	free(o->att);
	free(o->recs);
	free(o->rec_epochs);
}

/*
 * An event can sit in several orphaned records (a holder that died while
 * recovering left both its predecessor's record and its own): it is one
 * orphan, and its attempts are the most any record counted.
 */
static int orphans_add_id(struct orphan_ids *o, const bson_value_t *id, int64_t att)
{
	char key[512];
	int klen = drain_id_map_key(id, key, sizeof(key));
	uintptr_t pos;

	if (klen < 0 || (o->index == NULL && (o->index = tdr_map_new(256)) == NULL))
		return -1;
	pos = (uintptr_t)tdr_map_get(o->index, key, (size_t)klen);
	if (pos) {
		if (att > o->att[pos - 1])
			o->att[pos - 1] = att;
		return 0;
	}
	if (o->n == o->cap) {
		size_t ncap = o->cap ? o->cap * 2 : 256;
		bson_value_t *ni = realloc(o->ids, ncap * sizeof(*ni));
		int64_t *na;

		if (ni == NULL)
			return -1;
		o->ids = ni;
		na = realloc(o->att, ncap * sizeof(*na));
		if (na == NULL)
			return -1;
		o->att = na;
		o->cap = ncap;
	}
	bson_value_copy(id, &o->ids[o->n]);
	o->att[o->n++] = att;
	if (tdr_map_put(o->index, key, (size_t)klen, (void *)(uintptr_t)o->n) < 0)
		return -1;
	return 0;
}

static int orphans_add_rec(struct orphan_ids *o, const char *id, int64_t epoch)
{
	if (o->nrecs == o->caprecs) {
		size_t ncap = o->caprecs ? o->caprecs * 2 : 16;
		char **nr = realloc(o->recs, ncap * sizeof(*nr));
		int64_t *ne;

		if (nr == NULL)
			return -1;
		o->recs = nr;
		ne = realloc(o->rec_epochs, ncap * sizeof(*ne));
		if (ne == NULL)
			return -1;
		o->rec_epochs = ne;
		o->caprecs = ncap;
	}
	o->recs[o->nrecs] = strdup(id);
	if (o->recs[o->nrecs] == NULL)
		return -1;
	o->rec_epochs[o->nrecs++] = epoch;
	return 0;
}

/* Read the claim records older than our epoch in scope s. */
static int read_orphans(tdr_drain *d, const tdr_scope *s, struct orphan_ids *o, tdr_err *err)
{
	bson_t filter = BSON_INITIALIZER, opts;
	const bson_t *doc;
	mongoc_cursor_t *cur;
	bson_error_t be;
	int rc = 0;

	BSON_APPEND_INT32(&filter, "part", s->part);
	tdr_store_read_opts(d->st, &opts);
	cur = mongoc_collection_find_with_opts(d->claims, &filter, &opts, NULL);
	while (rc == 0 && mongoc_cursor_next(cur, &doc)) {
		int64_t epoch = tdr_bson_i64(doc, "epoch", 0);
		const char *rid = tdr_bson_str(doc, "_id", NULL);
		bson_iter_t ids, att, it;

		/*
		 * A newer epoch means we are already deposed.  Our own epoch's records are
		 * stale: recovery runs between batches, when none of ours is in flight
		 * (one is left when a failed batch could not remove it, see unclaim).
		 */
		if (epoch > s->epoch || rid == NULL)
			continue;
		if (orphans_add_rec(o, rid, epoch) < 0) {
			rc = tdr_err_set(err, TDR_ENOMEM, "out of memory");
			break;
		}
		if (!bson_iter_init_find(&it, doc, "ids") || !bson_iter_recurse(&it, &ids))
			continue;
		int have_att = bson_iter_init_find(&it, doc, "att") && bson_iter_recurse(&it, &att);
		while (bson_iter_next(&ids)) {
			int64_t a = 1;

			if (have_att && bson_iter_next(&att))
				a = bson_iter_as_int64(&att);
			if (orphans_add_id(o, bson_iter_value(&ids), a + 1) < 0) {
				rc = tdr_err_set(err, TDR_ENOMEM, "out of memory");
				break;
			}
		}
	}
	if (rc == 0 && mongoc_cursor_error(cur, &be)) {
		rc = tdr_store_error(&be, "read orphaned claims", err);
		rc = TDR_ETRANSIENT;
	}
	mongoc_cursor_destroy(cur);
	bson_destroy(&opts);
	bson_destroy(&filter);
	return rc;
}

static void log_recovered(const tdr_scope *s, size_t found, size_t nrecs)
{
	char part[16], epoch[24], count[24];
	tdr_field f[3] = { { "TDRAIN_PARTITIONS", part }, { "TDRAIN_EPOCH", epoch }, { "TDRAIN_ORPHANS", count } };

	if (s->part == TDR_SCOPE_ALL)
		snprintf(part, sizeof(part), "all");
	else
		snprintf(part, sizeof(part), "%d", s->part);
	snprintf(epoch, sizeof(epoch), "%" PRId64, s->epoch);
	snprintf(count, sizeof(count), "%zu", found);
	tdr_log_event(nrecs ? LOG_NOTICE : LOG_INFO, TDR_EV_ORPHANS_RECOVERED, f, 3,
		      "partition %s epoch %" PRId64 ": %zu orphaned events from %zu claim records recovered", part,
		      s->epoch, found, nrecs);
}

/*
 * A gained scope that the one read of drain_claimed_parts showed without any
 * claim record: recovered with no statement of its own, and logged as a
 * recovery that found nothing (the same line as drain_recover_scope's, so a
 * takeover's recovery shows in the log whichever way it ran: t10 relies on it).
 */
void drain_mark_recovered_empty(tdr_drain *d, const tdr_scope *s)
{
	if (!recovered_before(d, s->part, s->epoch))
		log_recovered(s, 0, 0);
	drain_mark_recovered(d, s->part, s->epoch);
}

int drain_recover_scope(tdr_drain *d, const tdr_coord_view *v, const tdr_scope *s, tdr_err *err)
{
	struct orphan_ids o;
	size_t found = 0;
	int rc, again = recovered_before(d, s->part, s->epoch);

	memset(&o, 0, sizeof(o));
	if ((rc = read_orphans(d, s, &o, err)) < 0)
		goto out;

	/* Fetch the orphans' documents in chunks and run them through the cycle first. */
	for (size_t off = 0; off < o.n; off += 256) {
		size_t end = off + 256 < o.n ? off + 256 : o.n, ni = 0;
		struct item *items = calloc(end - off, sizeof(*items));
		bson_t filter = BSON_INITIALIZER, in, arr, opts;
		mongoc_cursor_t *cur;
		const bson_t *doc;
		bson_error_t be;
		int64_t acked;

		if (items == NULL) {
			rc = tdr_err_set(err, TDR_ENOMEM, "out of memory");
			goto out;
		}
		BSON_APPEND_DOCUMENT_BEGIN(&filter, "_id", &in);
		BSON_APPEND_ARRAY_BEGIN(&in, "$in", &arr);
		for (size_t i = off; i < end; i++) {
			char key[16];
			const char *kp;

			bson_uint32_to_string((uint32_t)(i - off), &kp, key, sizeof(key));
			bson_append_value(&arr, kp, -1, &o.ids[i]);
		}
		bson_append_array_end(&in, &arr);
		bson_append_document_end(&filter, &in);
		tdr_store_read_opts(d->st, &opts);
		cur = mongoc_collection_find_with_opts(d->events, &filter, &opts, NULL);
		while (mongoc_cursor_next(cur, &doc) && ni < end - off) {
			bson_iter_t it;
			int64_t att = 1;

			if (!bson_iter_init_find(&it, doc, "_id"))
				continue;
			for (size_t i = off; i < end; i++)
				if (tdr_bson_value_eq(&o.ids[i], bson_iter_value(&it))) {
					att = o.att[i];
					break;
				}
			(void)drain_item_add(items, &ni, doc, s->part, att);
		}
		if (mongoc_cursor_error(cur, &be)) {
			rc = tdr_store_error(&be, "fetch orphaned events", err);
			rc = TDR_ETRANSIENT;
		}
		mongoc_cursor_destroy(cur);
		bson_destroy(&opts);
		bson_destroy(&filter);
		if (rc == 0 && ni)
			rc = drain_process(d, v, items, ni, &acked, err);
		found += ni;
		drain_items_free(items, ni);
		if (rc < 0)
			goto out;
	}

	/* The old records are spent: remove them, each fenced by its own epoch. */
	if (o.nrecs) {
		mongoc_bulk_operation_t *bulk = tdr_bulk_new(d->claims, 0);

		for (size_t i = 0; i < o.nrecs; i++) {
			bson_t f = BSON_INITIALIZER;

			BSON_APPEND_UTF8(&f, "_id", o.recs[i]);
			BSON_APPEND_INT64(&f, "epoch", o.rec_epochs[i]);
			mongoc_bulk_operation_remove_one(bulk, &f);
			bson_destroy(&f);
		}
		if (!tdr_coord_may_write(d->coord, s->part, s->epoch))
			rc = tdr_err_set(err, TDR_EFENCED, "lost partition %d during recovery", s->part);
		else
			rc = tdr_bulk_run(bulk, "remove orphaned claims", NULL, NULL, err);
		mongoc_bulk_operation_destroy(bulk);
		if (rc < 0)
			goto out;
	}
	if (!again || o.nrecs)
		log_recovered(s, found, o.nrecs);
	pthread_mutex_lock(&d->mu);
	d->stats.orphans += (int64_t)found;
	pthread_mutex_unlock(&d->mu);
	drain_mark_recovered(d, s->part, s->epoch);
out:
	orphans_free(&o);
	return rc;
}
