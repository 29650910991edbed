/*
 * fold.c - committed deltas -> derived collections, one writer (the leader):
 * the round (tdr_fold_round: read the deltas, aggregate, and drive the other
 * steps), triage, the fold thread and its public API.  The round is described
 * in fold.h; why it is exactly-once is argued in docs/DESIGN.md ("The fold");
 * the steps it drives live in fold_ledger.c, fold_image.c, fold_cache.c,
 * fold_identity.c and fold_redo.c (fold_internal.h).
 */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "consumers/event.h"
#include "consumers/fold_internal.h"
#include "consumers/projections.h"
#include "lib/bsonx.h"
#include "lib/clock.h"
#include "lib/log.h"
#include "lib/map.h"

/*
 * A round folds at most this many events (the memory bound: its copies of the
 * deltas and its ledger bulk) and commits only if its images fit in
 * REDO_IMAGES_MAX, so that the redo record stays below 16 MiB with its delta
 * list (docs/DESIGN.md, "What bounds a fold round").
 */
#define ROUND_EVENTS_MAX 100000
#define REDO_IMAGES_MAX (12 << 20)
#define IN_CHUNK 500
#define TRIAGE_BATCH 2000
#define FOLD_IDLE_FACTOR 2 /* after a round of T ms, wait at least 2T (fold_thread) */
#define FOLD_IDLE_MAX_MS 10000 /* ... but no more than this (or fold.interval_ms if larger) */

const char *const tdr_fold_phase_names[TDR_FOLD_NPHASES] = { "read", "ledger", "reads", "build", "record", "apply",
								  "finish" };

const char *const fold_derived_colls[] = { TDR_C_COUNTERS, TDR_C_DEVICES, TDR_C_DEVICE_EVENTS,
					   TDR_C_IDENTITIES, TDR_C_USERS, TDR_C_SIGNINS, NULL };

/* ------------------------------------------------------------ helpers */

int fold_coll_index(const char *name)
{
	for (int i = 0; fold_derived_colls[i]; i++)
		if (strcmp(fold_derived_colls[i], name) == 0)
			return i;
	return -1;
}

static void round_free(struct round *r)
{
	for (size_t i = 0; i < r->ndeltas; i++)
		bson_destroy(r->deltas[i]);
	free(r->deltas);
	free(r->starts);
	free(r->ev);
	free(r->new_idx);
}

static void key_array(bson_t *arr, const char *const *keys, const size_t *lens, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		char buf[16];
		const char *kp;

		bson_uint32_to_string((uint32_t)i, &kp, buf, sizeof(buf));
		bson_append_utf8(arr, kp, -1, keys[i], (int)lens[i]);
	}
}

/* Read docs of coll whose _id is in keys, calling fn(doc) for each. */
int fold_read_in(tdr_fold *f, mongoc_collection_t *coll, const char *const *keys, const size_t *lens, size_t n,
		 void (*fn)(void *ctx, const bson_t *doc), void *ctx, tdr_err *err)
{
	for (size_t off = 0; off < n; off += IN_CHUNK) {
		size_t m = n - off < IN_CHUNK ? n - off : IN_CHUNK;
		bson_t filter = BSON_INITIALIZER, in, arr, opts;
		mongoc_cursor_t *cur;
		const bson_t *doc;
		bson_error_t be;
		int failed;

		BSON_APPEND_DOCUMENT_BEGIN(&filter, "_id", &in);
		BSON_APPEND_ARRAY_BEGIN(&in, "$in", &arr);
		key_array(&arr, keys + off, lens + off, m);
		bson_append_array_end(&in, &arr);
		bson_append_document_end(&filter, &in);
		tdr_store_read_opts(f->st, &opts);
		BSON_APPEND_INT64(&opts, "batchSize", IN_CHUNK); /* one reply, no getMore */
		cur = mongoc_collection_find_with_opts(coll, &filter, &opts, NULL);
		while (mongoc_cursor_next(cur, &doc))
			fn(ctx, doc);
		failed = mongoc_cursor_error(cur, &be);
		mongoc_cursor_destroy(cur);
		bson_destroy(&opts);
		bson_destroy(&filter);
		if (failed) {
			tdr_store_error(&be, "fold read", err);
			return TDR_ETRANSIENT;
		}
	}
	return 0;
}

/* ------------------------------------------------------------ round */

static int read_deltas(tdr_fold *f, mongoc_client_t *c, struct round *r, tdr_err *err)
{
	mongoc_collection_t *deltas = tdr_store_coll(f->st, c, TDR_C_DELTAS);
	bson_t filter = BSON_INITIALIZER, opts = BSON_INITIALIZER;
	mongoc_cursor_t *cur;
	const bson_t *doc;
	bson_error_t be;
	int rc = 0;

	r->deltas = calloc((size_t)f->cfg.fold_max_deltas, sizeof(*r->deltas));
	r->starts = calloc((size_t)f->cfg.fold_max_deltas, sizeof(*r->starts));
	if (r->deltas == NULL || r->starts == NULL) {
		mongoc_collection_destroy(deltas);
		return tdr_err_set(err, TDR_ENOMEM, "out of memory");
	}
	BSON_APPEND_INT64(&opts, "limit", f->cfg.fold_max_deltas);
	/*
	 * A delta holds a whole batch (up to drain.batch_size events): a small
	 * first reply, so that a round that stops at its event bound fetches
	 * about what it folds, not fold.max_deltas batches.
	 */
	BSON_APPEND_INT64(&opts, "batchSize", f->cfg.fold_max_deltas < 16 ? f->cfg.fold_max_deltas : 16);
	BSON_APPEND_INT64(&opts, "maxTimeMS", f->st->timeout_ms);
	cur = mongoc_collection_find_with_opts(deltas, &filter, &opts, NULL);
	while (r->ndeltas < (size_t)f->cfg.fold_max_deltas && r->nev < (size_t)f->round_events &&
	       mongoc_cursor_next(cur, &doc)) {
		bson_t *copy = bson_copy(doc);
		bson_iter_t it, arr;

		if (copy == NULL) {
			rc = tdr_err_set(err, TDR_ENOMEM, "out of memory");
			break;
		}
		r->starts[r->ndeltas] = r->nev;
		r->deltas[r->ndeltas++] = copy;
		if (!bson_iter_init_find(&it, copy, "ev") || !bson_iter_recurse(&it, &arr))
			continue;
		while (bson_iter_next(&arr)) {
			bson_t ce;
			const uint8_t *data;
			uint32_t len;

			if (!BSON_ITER_HOLDS_DOCUMENT(&arr))
				continue;
			bson_iter_document(&arr, &len, &data);
			if (!bson_init_static(&ce, data, len))
				continue;
			if (r->nev == r->capev) {
				size_t ncap = r->capev ? r->capev * 2 : 1024;
				tdr_cevent *ne = realloc(r->ev, ncap * sizeof(*ne));

				if (ne == NULL) {
					rc = tdr_err_set(err, TDR_ENOMEM, "out of memory");
					break;
				}
				r->ev = ne;
				r->capev = ncap;
			}
			if (tdr_cevent_parse(&ce, &r->ev[r->nev]) == 0)
				r->nev++;
		}
	}
	if (rc == 0 && mongoc_cursor_error(cur, &be)) {
		tdr_store_error(&be, "read deltas", err);
		rc = TDR_ETRANSIENT;
	}
	mongoc_cursor_destroy(cur);
	bson_destroy(&filter);
	bson_destroy(&opts);
	mongoc_collection_destroy(deltas);
	return rc;
}

int tdr_fold_round(tdr_fold *f, int64_t epoch, int64_t *ret_n, tdr_err *err)
{
	mongoc_client_t *c = tdr_store_pop(f->st);
	struct round r;
	void *states[8] = { 0 };
	tdr_map *devs = NULL;
	bson_t *record = NULL, writes = BSON_INITIALIZER, images, rec = BSON_INITIALIZER;
	int64_t seq = 0, dups = 0, t0 = tdr_mono_us(), lag = 0, ph[TDR_FOLD_NPHASES] = { 0 }, tp;
	uint32_t idx = 0;
	int rc, np = 0, cache_touched = 0;

	memset(&r, 0, sizeof(r));
	bson_init(&images);
	*ret_n = 0;
	f->reads_us = 0;
	f->more = 0;
	/*
	 * Deltas first: with none there is nothing to fold, and nothing to redo
	 * either that cannot wait (a redo record's deltas are deleted only after
	 * its images are applied; the state advance it may still owe happens at
	 * the next round that has work).  An idle fold costs one read.
	 */
	if ((rc = read_deltas(f, c, &r, err)) < 0 || r.ndeltas == 0)
		goto out;
	if ((rc = fold_read_state_seq(f, c, &seq, err)) < 0)
		goto out;
	if ((rc = fold_read_record(f, c, seq + 1, &record, err)) < 0)
		goto out;
	if (record) {
		rc = fold_redo(f, c, record, seq + 1, epoch, err);
		fold_cache_clear(&f->cache);
		*ret_n = 1;
		goto out;
	}
	ph[TDR_FOLD_READ] = tdr_mono_us() - t0;
	tp = tdr_mono_us();
	if (!f->cache.valid || f->cache.epoch != epoch || f->cache.seq != seq) {
		if ((rc = fold_cache_reset(f, c, epoch, seq, err)) < 0)
			goto out;
	}
	f->reads_us += tdr_mono_us() - tp;
	{
		bson_iter_t it;

		if (bson_iter_init_find(&it, r.deltas[0], "at") && BSON_ITER_HOLDS_DATE_TIME(&it))
			lag = tdr_wall_ms() - bson_iter_date_time(&it);
	}
	tp = tdr_mono_us();
	if ((rc = fold_dedup(f, c, &r, &dups, err)) < 0)
		goto out;
	ph[TDR_FOLD_LEDGER] = tdr_mono_us() - tp;
	tp = tdr_mono_us();
	ph[TDR_FOLD_READS] = f->reads_us; /* the reset's, if any; the build's reads are subtracted below */

	/* Step 3: aggregate the new events, in delta order. */
	if ((devs = tdr_map_new(1024)) == NULL) {
		rc = tdr_err_set(err, TDR_ENOMEM, "out of memory");
		goto out;
	}
	for (np = 0; tdr_projections[np].name; np++)
		if ((states[np] = tdr_projections[np].create()) == NULL) {
			rc = tdr_err_set(err, TDR_ENOMEM, "out of memory");
			goto out;
		}
	for (size_t j = 0; j < r.nnew; j++) {
		const tdr_cevent *e = &r.ev[r.new_idx[j]];
		struct devround *dr;
		char day[11];

		tdr_utc_day(e->created_at_ms, day);
		for (int p = 0; p < np; p++)
			if (tdr_projections[p].add(states[p], e, day) < 0) {
				rc = tdr_err_set(err, TDR_ENOMEM, "out of memory");
				goto out;
			}
		dr = tdr_map_get(devs, e->distinct_id, e->distinct_id_len);
		if (dr == NULL) {
			dr = calloc(1, sizeof(*dr));
			if (dr == NULL || tdr_map_put(devs, e->distinct_id, e->distinct_id_len, dr) < 0) {
				free(dr);
				rc = tdr_err_set(err, TDR_ENOMEM, "out of memory");
				goto out;
			}
		}
		dr->inc++;
		if (e->username && (dr->best_u == NULL || fold_cmp_link(e->created_at_ms, e->username, e->username_len,
									dr->best_t, dr->best_u, dr->best_ulen) > 0)) {
			dr->best_u = e->username;
			dr->best_ulen = e->username_len;
			dr->best_t = e->created_at_ms;
		}
	}
	/* Identity needs the touched devices' current links and counts. */
	{
		size_t n = tdr_map_count(devs), pos = 0, k = 0, klen;
		const char **keys = calloc(n ? n : 1, sizeof(*keys)), *key;
		size_t *lens = calloc(n ? n : 1, sizeof(*lens));
		void *v;

		if (keys == NULL || lens == NULL) {
			free(keys);
			free(lens);
			rc = tdr_err_set(err, TDR_ENOMEM, "out of memory");
			goto out;
		}
		while (tdr_map_next(devs, &pos, &key, &klen, &v)) {
			keys[k] = key;
			lens[k++] = klen;
		}
		rc = fold_cache_fill(f, c, fold_coll_index(TDR_C_DEVICES), keys, lens, k, err);
		if (rc == 0)
			rc = fold_cache_fill(f, c, fold_coll_index(TDR_C_IDENTITIES), keys, lens, k, err);
		free(keys);
		free(lens);
		if (rc < 0)
			goto out;
	}
	for (int p = 0; p < np; p++)
		tdr_projections[p].emit(states[p], &writes, &idx, seq + 1);
	if ((rc = fold_resolve_identities(devs, &f->cache, &writes, &idx, err)) < 0)
		goto out;
	cache_touched = 1;
	if ((rc = fold_build_images(f, c, &writes, seq + 1, &images, err)) < 0)
		goto out;
	/*
	 * Too large for one redo record: stop before the commit point, with only
	 * ledger entries naming our own deltas written (any later round that takes
	 * one of them recognises its entries), and take half the events next time.
	 */
	if (images.len > REDO_IMAGES_MAX) {
		/* A round takes at least one delta: one whose images do not fit cannot be folded by halving. */
		if (r.ndeltas <= 1) {
			rc = tdr_err_set(err, TDR_EFAIL, "fold: the images of one delta (%zu events) take %" PRIu32
					 " bytes, more than a redo record holds (%d)", r.nev, images.len, REDO_IMAGES_MAX);
			goto out;
		}
		log_info("fold: %zu events make %" PRIu32 " bytes of images, more than a redo record holds; folding %zu at a time",
			 r.nev, images.len, r.nev / 2);
		f->round_events = (int64_t)(r.nev / 2);
		fold_cache_clear(&f->cache);
		f->more = 1;
		goto out;
	}
	ph[TDR_FOLD_BUILD] = tdr_mono_us() - tp - (f->reads_us - ph[TDR_FOLD_READS]);
	ph[TDR_FOLD_READS] = f->reads_us;

	/* Step 4: the commit point of the round. */
	tp = tdr_mono_us();
	if ((rc = fold_record_insert(f, c, &r, &images, seq + 1, epoch, &rec, err)) < 0)
		goto out;
	ph[TDR_FOLD_RECORD] = tdr_mono_us() - tp;
	/* Steps 5-6. */
	tp = tdr_mono_us();
	if ((rc = fold_apply_images(f, c, &images, seq + 1, 1, err)) < 0)
		goto out;
	ph[TDR_FOLD_APPLY] = tdr_mono_us() - tp;
	tp = tdr_mono_us();
	if ((rc = fold_finish_round(f, c, &rec, seq + 1, epoch, err)) < 0)
		goto out;
	ph[TDR_FOLD_FINISH] = tdr_mono_us() - tp;
	fold_cache_advance(f, seq + 1);
	/* Stopped at the event bound: there is more, go again at once. */
	f->more = r.nev >= (size_t)f->round_events;
	if (f->round_events < ROUND_EVENTS_MAX)
		f->round_events = f->round_events * 2 < ROUND_EVENTS_MAX ? f->round_events * 2 : ROUND_EVENTS_MAX;
	pthread_mutex_lock(&f->mu);
	f->stats.rounds++;
	f->stats.deltas += (int64_t)r.ndeltas;
	f->stats.events += (int64_t)r.nnew;
	f->stats.duplicates += dups;
	f->stats.lag_ms = lag;
	f->stats.round_us = tdr_mono_us() - t0;
	f->stats.cache_bytes = (int64_t)f->cache.bytes;
	f->stats.cache_loads = f->cache.loads;
	f->stats.cache_hits = f->cache.hits;
	f->stats.cache_misses = f->cache.misses;
	for (int p = 0; p < TDR_FOLD_NPHASES; p++)
		f->stats.phase_us[p] += ph[p];
	f->stats.images += (int64_t)bson_count_keys(&images);
	f->stats.last_events = (int64_t)r.nnew;
	f->stats.last_images = (int64_t)bson_count_keys(&images);
	f->stats.last_image_bytes = (int64_t)images.len;
	pthread_mutex_unlock(&f->mu);
	log_debug("fold: round %" PRId64 ": %zu deltas, %zu events, %" PRIu32 " images (%" PRIu32
		  " bytes) in %" PRId64 " ms: read %" PRId64 ", ledger %" PRId64 ", reads %" PRId64 ", build %" PRId64
		  ", record %" PRId64 ", apply %" PRId64 ", finish %" PRId64 " ms",
		  seq + 1, r.ndeltas, r.nnew, bson_count_keys(&images), images.len, (tdr_mono_us() - t0) / 1000,
		  ph[0] / 1000, ph[1] / 1000, ph[2] / 1000, ph[3] / 1000, ph[4] / 1000, ph[5] / 1000, ph[6] / 1000);
	*ret_n = (int64_t)r.ndeltas;
out:
	/* The images are in the cache; whether they are in the store is not known. */
	if (rc < 0 && cache_touched)
		fold_cache_clear(&f->cache);
	for (int p = 0; p < np; p++)
		if (states[p])
			tdr_projections[p].destroy(states[p]);
	tdr_map_free(devs, free);
	bson_destroy(&rec);
	bson_destroy(&writes);
	bson_destroy(&images);
	if (record)
		bson_destroy(record);
	round_free(&r);
	tdr_store_push(f->st, c);
	return rc;
}

/* ------------------------------------------------------------ triage */

/*
 * Give a partition to events whose producer wrote none (or a bad one).
 * One update_many per partition present ({_id: {$in}}), not one statement
 * per event: on FerretDB every keyed statement is a scan.
 */
static int triage(tdr_fold *f, int64_t epoch, int64_t *ret_n, tdr_err *err)
{
	mongoc_client_t *c = tdr_store_pop(f->st);
	mongoc_collection_t *events = tdr_store_coll(f->st, c, f->st->events);
	uint32_t P = (uint32_t)f->cfg.partitions;
	bson_t filter = BSON_INITIALIZER, notr, range, opts = BSON_INITIALIZER, proj;
	bson_t *ids = calloc(P, sizeof(*ids));
	uint32_t *count = calloc(P, sizeof(*count));
	mongoc_cursor_t *cur;
	const bson_t *doc;
	bson_error_t be;
	int64_t n = 0;
	int rc = 0;

	if (ids == NULL || count == NULL) {
		free(ids);
		free(count);
		mongoc_collection_destroy(events);
		tdr_store_push(f->st, c);
		return tdr_err_set(err, TDR_ENOMEM, "out of memory");
	}
	for (uint32_t p = 0; p < P; p++)
		bson_init(&ids[p]);
	/* Missing, null, non-numeric or out of range: {part: {$not: {$gte: 0, $lt: P}}}. */
	BSON_APPEND_DOCUMENT_BEGIN(&filter, "part", &notr);
	BSON_APPEND_DOCUMENT_BEGIN(&notr, "$not", &range);
	BSON_APPEND_INT32(&range, "$gte", 0);
	BSON_APPEND_INT64(&range, "$lt", f->cfg.partitions);
	bson_append_document_end(&notr, &range);
	bson_append_document_end(&filter, &notr);
	BSON_APPEND_INT64(&opts, "limit", TRIAGE_BATCH);
	BSON_APPEND_INT64(&opts, "maxTimeMS", f->st->timeout_ms);
	BSON_APPEND_DOCUMENT_BEGIN(&opts, "projection", &proj);
	BSON_APPEND_INT32(&proj, "_id", 1);
	bson_append_document_end(&opts, &proj);
	cur = mongoc_collection_find_with_opts(events, &filter, &opts, NULL);
	while (mongoc_cursor_next(cur, &doc)) {
		bson_iter_t it;
		int32_t p;
		char buf[16];
		const char *kp;

		if (!bson_iter_init_find(&it, doc, "_id"))
			continue;
		p = tdr_event_partition(bson_iter_value(&it), P);
		/* An _id we cannot hash still needs an owner, who will dead-letter it. */
		if (p < 0)
			p = 0;
		bson_uint32_to_string(count[p]++, &kp, buf, sizeof(buf));
		bson_append_value(&ids[p], kp, -1, bson_iter_value(&it));
		n++;
	}
	if (mongoc_cursor_error(cur, &be)) {
		tdr_store_error(&be, "triage", err);
		rc = TDR_ETRANSIENT;
	}
	mongoc_cursor_destroy(cur);
	if (rc == 0 && n && !tdr_coord_may_lead(f->coord, epoch))
		rc = tdr_err_set(err, TDR_EFENCED, "no longer leader");
	for (uint32_t p = 0; p < P && rc == 0; p++) {
		bson_t sel = BSON_INITIALIZER, in, upd = BSON_INITIALIZER, set;

		if (count[p] == 0)
			continue;
		BSON_APPEND_DOCUMENT_BEGIN(&sel, "_id", &in);
		BSON_APPEND_ARRAY(&in, "$in", &ids[p]);
		bson_append_document_end(&sel, &in);
		BSON_APPEND_DOCUMENT_BEGIN(&upd, "$set", &set);
		BSON_APPEND_INT32(&set, "part", (int32_t)p);
		bson_append_document_end(&upd, &set);
		if (!mongoc_collection_update_many(events, &sel, &upd, NULL, NULL, &be)) {
			tdr_store_error(&be, "triage", err);
			rc = TDR_ETRANSIENT;
		}
		bson_destroy(&sel);
		bson_destroy(&upd);
	}
	for (uint32_t p = 0; p < P; p++)
		bson_destroy(&ids[p]);
	free(ids);
	free(count);
	bson_destroy(&filter);
	bson_destroy(&opts);
	mongoc_collection_destroy(events);
	tdr_store_push(f->st, c);
	if (rc == 0) {
		pthread_mutex_lock(&f->mu);
		f->stats.triaged += n;
		pthread_mutex_unlock(&f->mu);
		*ret_n = n;
	}
	return rc;
}

/* ------------------------------------------------------------ thread */

static void *fold_thread(void *arg)
{
	tdr_fold *f = arg;
	int64_t backoff = 0;

	pthread_mutex_lock(&f->mu);
	while (!f->stop) {
		tdr_coord_view v;
		int64_t n = 0, tn = 0, wait = f->cfg.fold_interval_ms, hold = 0, t0 = tdr_mono_us();
		tdr_err err;
		int rc = 0, leader;
		int64_t epoch;

		pthread_mutex_unlock(&f->mu);
		if (tdr_coord_view_get(f->coord, &v) == 0) {
			leader = v.is_leader;
			epoch = v.leader_epoch;
			tdr_coord_view_free(&v);
		} else {
			leader = 0;
			epoch = 0;
		}
		if (leader) {
			/*
			 * Triage is an optimisation (claims compute missing partitions
			 * themselves), index-served on MongoDB; on FerretDB its keyed
			 * updates cost a scan per document, so it is not run there.
			 */
			if (f->cfg.mode == TDR_MODE_PARTITIONED && !f->st->is_ferretdb)
				rc = triage(f, epoch, &tn, &err);
			if (rc == 0)
				rc = tdr_fold_round(f, epoch, &n, &err);
			if (rc < 0) {
				log_warn("fold: %s", err.msg);
				backoff = backoff ? (backoff * 2 > 5000 ? 5000 : backoff * 2) : 100;
				wait = backoff;
			} else {
				int64_t took_ms = (tdr_mono_us() - t0) / 1000;

				backoff = 0;
				/* A full round or triage batch means there is more: go again at once. */
				if (n >= f->cfg.fold_max_deltas || f->more || tn >= TRIAGE_BATCH)
					wait = 0;
				/*
				 * While the drain works through a backlog, an expensive round
				 * (FerretDB scans every derived collection it writes, whatever the
				 * number of events) waits twice its own time: the fold takes at
				 * most a third of the store, and the events that pile up meanwhile
				 * share the next round's scans.  Index-served rounds (DocumentDB,
				 * MongoDB) cost what their events and keys cost, not scans: holding
				 * them back only lets the fold fall behind the drain.
				 */
				else if (n > 0 && f->st->is_ferretdb)
					hold = took_ms * FOLD_IDLE_FACTOR;
				if (hold > FOLD_IDLE_MAX_MS)
					hold = FOLD_IDLE_MAX_MS;
			}
		}
		/* Not the leader: the next leadership starts from the store anyway. */
		if (!leader && f->cache.valid)
			fold_cache_clear(&f->cache);
		pthread_mutex_lock(&f->mu);
		f->stats.active = leader;
		if (!leader)
			f->stats.cache_bytes = 0;
		if (rc < 0)
			f->stats.errors++;
		/* Under the lock: a drain that stopped being busy during the round must not be missed. */
		if (f->drain_busy && hold > wait)
			wait = hold;
		if (wait > 0 && !f->stop) {
			struct timespec ts;

			tdr_mono_deadline(&ts, wait);
			pthread_cond_timedwait(&f->cv, &f->mu, &ts);
		}
	}
	f->exited = 1;
	pthread_cond_broadcast(&f->cv);
	pthread_mutex_unlock(&f->mu);
	return NULL;
}

int tdr_fold_new(tdr_fold **ret, const tdr_config *cfg, tdr_store *st, tdr_coord *coord, tdr_err *err)
{
	tdr_fold *f = calloc(1, sizeof(*f));

	if (f == NULL)
		return tdr_err_set(err, TDR_ENOMEM, "out of memory");
	f->cfg = *cfg;
	f->st = st;
	f->coord = coord;
	f->round_events = ROUND_EVENTS_MAX;
	pthread_mutex_init(&f->mu, NULL);
	tdr_cond_init_mono(&f->cv);
	*ret = f;
	return 0;
}

int tdr_fold_start(tdr_fold *f, tdr_err *err)
{
	if (pthread_create(&f->thread, NULL, fold_thread, f) != 0)
		return tdr_err_set(err, TDR_EFAIL, "cannot start fold thread: %s", strerror(errno));
	f->running = 1;
	return 0;
}

void tdr_fold_drain_busy(tdr_fold *f, int busy)
{
	if (f == NULL)
		return;
	pthread_mutex_lock(&f->mu);
	/* The backlog is done: fold what it left now, not after a hold. */
	if (f->drain_busy && !busy)
		pthread_cond_broadcast(&f->cv);
	f->drain_busy = busy;
	pthread_mutex_unlock(&f->mu);
}

void tdr_fold_request_stop(tdr_fold *f)
{
	if (f == NULL || !f->running)
		return;
	pthread_mutex_lock(&f->mu);
	f->stop = 1;
	pthread_cond_broadcast(&f->cv);
	pthread_mutex_unlock(&f->mu);
}

void tdr_fold_stop(tdr_fold *f)
{
	if (f == NULL || !f->running)
		return;
	tdr_fold_request_stop(f);
	pthread_join(f->thread, NULL);
	f->running = 0;
}

int tdr_fold_stop_within(tdr_fold *f, int64_t ms)
{
	struct timespec ts;
	int exited;

	if (f == NULL || !f->running)
		return 0;
	tdr_mono_deadline(&ts, ms);
	tdr_fold_request_stop(f);
	pthread_mutex_lock(&f->mu);
	while (!f->exited && pthread_cond_timedwait(&f->cv, &f->mu, &ts) == 0)
		;
	exited = f->exited;
	pthread_mutex_unlock(&f->mu);
	if (!exited)
		return -1;
	pthread_join(f->thread, NULL);
	f->running = 0;
	return 0;
}

void tdr_fold_free(tdr_fold *f)
{
	if (f == NULL)
		return;
	/* Still blocked in a store call (tdr_fold_stop_within gave up): the process is exiting, leave it. */
	if (f->running && f->stop)
		return;
	tdr_fold_stop(f);
	fold_cache_clear(&f->cache);
	pthread_mutex_destroy(&f->mu);
	pthread_cond_destroy(&f->cv);
	free(f);
}

void tdr_fold_reload(tdr_fold *f, const tdr_config *cfg)
{
	pthread_mutex_lock(&f->mu);
	f->cfg.fold_interval_ms = cfg->fold_interval_ms;
	f->cfg.fold_max_deltas = cfg->fold_max_deltas;
	f->cfg.fold_cache_mb = cfg->fold_cache_mb;
	pthread_mutex_unlock(&f->mu);
}

void tdr_fold_stats_get(tdr_fold *f, struct tdr_fold_stats *out)
{
	pthread_mutex_lock(&f->mu);
	*out = f->stats;
	pthread_mutex_unlock(&f->mu);
}
