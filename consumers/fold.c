/*
 * fold.c - committed deltas -> derived collections, one writer (the leader).
 * The round is described in fold.h; why it is exactly-once is argued in
 * docs/DESIGN.md ("The fold").
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
#include "consumers/fold.h"
#include "consumers/projections.h"
#include "lib/bsonx.h"
#include "lib/clock.h"
#include "lib/log.h"
#include "lib/map.h"

/* A round folds at most this many events, so its redo record stays far below 16 MiB. */
#define ROUND_EVENTS_MAX 20000
#define IN_CHUNK 500
#define CACHE_MAX 262144
#define TRIAGE_BATCH 2000

/* What the fold knows of a device between rounds (it is the only writer). */
struct devcache {
	int64_t count;
	int count_known;
	int linked;
	int64_t linked_at;
	char username[TDR_USERNAME_MAX + 1];
};

/* A device's changes within one round. */
struct devround {
	int64_t inc;
	const char *best_u; /* latest signed-in username this round (points into a delta) */
	uint32_t best_ulen;
	int64_t best_t;
};

struct userdelta {
	int64_t count, devices;
};

struct tdr_fold {
	tdr_config cfg;
	tdr_store *st;
	tdr_coord *coord;
	pthread_t thread;
	pthread_mutex_t mu;
	pthread_cond_t cv;
	int stop, running;
	struct tdr_fold_stats stats;
	tdr_map *cache; /* distinct_id -> struct devcache */
	int64_t cache_epoch;
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

static const char *const derived_colls[] = { TDR_C_COUNTERS, TDR_C_DEVICES, TDR_C_DEVICE_EVENTS,
					     TDR_C_IDENTITIES, TDR_C_USERS, TDR_C_SIGNINS, NULL };

/* ------------------------------------------------------------ helpers */

static void round_free(struct round *r)
{
	for (size_t i = 0; i < r->ndeltas; i++)
		bson_destroy(r->deltas[i]);
	free(r->deltas);
	free(r->starts);
	free(r->ev);
	free(r->new_idx);
}

static int cmp_link(int64_t ta, const char *ua, size_t la, int64_t tb, const char *ub, size_t lb)
{
	/* Later created_at wins; ties go to the greater username (docs/EVENTS.md). */
	int c;

	if (ta != tb)
		return ta < tb ? -1 : 1;
	c = memcmp(ua, ub, la < lb ? la : lb);
	if (c)
		return c;
	return la < lb ? -1 : la > lb;
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
static int read_in(tdr_fold *f, mongoc_collection_t *coll, const char *const *keys, const size_t *lens, size_t n,
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

/* ------------------------------------------------------------ apply (normal and redo) */

struct applied_ctx {
	tdr_map *done;
	int64_t seq;
};

static void note_applied(void *vctx, const bson_t *doc)
{
	struct applied_ctx *ctx = vctx;
	uint32_t len;
	const char *id = tdr_bson_str(doc, "_id", &len);

	if (id && tdr_bson_i64(doc, "_f", 0) >= ctx->seq)
		(void)tdr_map_put(ctx->done, id, len, (void *)1);
}

/*
 * Apply the redo record's writes: per collection one bulk of lone-_id
 * upserts.  With redo set, first skip documents that already carry _f >= seq
 * (applied before the crash): each write lands exactly once.
 */
static int apply_writes(tdr_fold *f, mongoc_client_t *c, const bson_t *writes, int64_t seq, int redo,
			tdr_err *err)
{
	for (int ci = 0; derived_colls[ci]; ci++) {
		const char *cname = derived_colls[ci];
		mongoc_collection_t *coll = tdr_store_coll(f->st, c, cname);
		mongoc_bulk_operation_t *bulk = tdr_bulk_new(coll, 0);
		tdr_map *done = NULL;
		bson_iter_t it;
		size_t nops = 0;
		int rc = 0;

		if (redo) {
			const char **keys = NULL;
			size_t *lens = NULL, n = 0, cap = 0;

			done = tdr_map_new(256);
			bson_iter_init(&it, writes);
			while (done && bson_iter_next(&it)) {
				bson_t rec;
				const uint8_t *data;
				uint32_t dlen, klen;
				const char *cc, *k;

				if (!BSON_ITER_HOLDS_DOCUMENT(&it))
					continue;
				bson_iter_document(&it, &dlen, &data);
				if (!bson_init_static(&rec, data, dlen))
					continue;
				cc = tdr_bson_str(&rec, "c", NULL);
				k = tdr_bson_str(&rec, "k", &klen);
				if (!cc || !k || strcmp(cc, cname) != 0)
					continue;
				if (n == cap) {
					size_t ncap = cap ? cap * 2 : 64;
					const char **nk = realloc(keys, ncap * sizeof(*nk));
					size_t *nl;

					if (nk == NULL)
						break;
					keys = nk;
					nl = realloc(lens, ncap * sizeof(*nl));
					if (nl == NULL)
						break;
					lens = nl;
					cap = ncap;
				}
				keys[n] = k;
				lens[n++] = klen;
			}
			struct applied_ctx ctx = { done, seq };
			if (done == NULL)
				rc = tdr_err_set(err, TDR_ENOMEM, "out of memory");
			else
				rc = read_in(f, coll, keys, lens, n, note_applied, &ctx, err);
			free(keys);
			free(lens);
		}
		if (rc == 0) {
			bson_iter_init(&it, writes);
			while (bson_iter_next(&it)) {
				bson_t rec, upd, filter = BSON_INITIALIZER, opts = BSON_INITIALIZER;
				const uint8_t *data;
				uint32_t dlen, klen;
				const char *cc, *k;
				bson_iter_t u;

				if (!BSON_ITER_HOLDS_DOCUMENT(&it))
					continue;
				bson_iter_document(&it, &dlen, &data);
				if (!bson_init_static(&rec, data, dlen))
					continue;
				cc = tdr_bson_str(&rec, "c", NULL);
				k = tdr_bson_str(&rec, "k", &klen);
				if (!cc || !k || strcmp(cc, cname) != 0 || !bson_iter_init_find(&u, &rec, "u") ||
				    !BSON_ITER_HOLDS_DOCUMENT(&u))
					continue;
				if (done && tdr_map_get(done, k, klen))
					continue;
				bson_iter_document(&u, &dlen, &data);
				if (!bson_init_static(&upd, data, dlen))
					continue;
				bson_append_utf8(&filter, "_id", 3, k, (int)klen);
				BSON_APPEND_BOOL(&opts, "upsert", true);
				if (!mongoc_bulk_operation_update_one_with_opts(bulk, &filter, &upd, &opts, NULL))
					rc = tdr_err_set(err, TDR_EFAIL, "bad update for %s", cname);
				bson_destroy(&filter);
				bson_destroy(&opts);
				nops++;
			}
		}
		if (rc == 0 && nops)
			rc = tdr_bulk_run(bulk, cname, NULL, NULL, err);
		mongoc_bulk_operation_destroy(bulk);
		mongoc_collection_destroy(coll);
		tdr_map_free(done, NULL);
		if (rc < 0)
			return rc;
	}
	return 0;
}

/* Steps after apply: delete the folded deltas, advance the state, drop the record. */
static int finish_round(tdr_fold *f, mongoc_client_t *c, const bson_t *record, int64_t seq, int64_t epoch,
			tdr_err *err)
{
	mongoc_collection_t *deltas = tdr_store_coll(f->st, c, TDR_C_DELTAS);
	mongoc_collection_t *state = tdr_store_coll(f->st, c, TDR_C_STATE);
	mongoc_collection_t *folds = tdr_store_coll(f->st, c, TDR_C_FOLDS);
	mongoc_bulk_operation_t *bulk = tdr_bulk_new(deltas, 0);
	bson_iter_t it, arr;
	bson_error_t be;
	size_t n = 0;
	int rc = 0;

	if (bson_iter_init_find(&it, record, "deltas") && bson_iter_recurse(&it, &arr))
		while (bson_iter_next(&arr)) {
			bson_t fl = BSON_INITIALIZER;

			bson_append_value(&fl, "_id", 3, bson_iter_value(&arr));
			mongoc_bulk_operation_remove_one(bulk, &fl);
			bson_destroy(&fl);
			n++;
		}
	if (n)
		rc = tdr_bulk_run(bulk, "delete folded deltas", NULL, NULL, err);
	mongoc_bulk_operation_destroy(bulk);
	if (rc == 0) {
		bson_t sel = BSON_INITIALIZER, upd = BSON_INITIALIZER, set, opts = BSON_INITIALIZER;

		BSON_APPEND_UTF8(&sel, "_id", "fold");
		BSON_APPEND_DOCUMENT_BEGIN(&upd, "$set", &set);
		BSON_APPEND_INT64(&set, "seq", seq);
		BSON_APPEND_INT64(&set, "epoch", epoch);
		BSON_APPEND_UTF8(&set, "holder", f->cfg.name);
		BSON_APPEND_DATE_TIME(&set, "at", tdr_wall_ms());
		bson_append_document_end(&upd, &set);
		BSON_APPEND_BOOL(&opts, "upsert", true);
		if (!mongoc_collection_update_one(state, &sel, &upd, &opts, NULL, &be)) {
			tdr_store_error(&be, "advance fold state", err);
			rc = TDR_ETRANSIENT;
		}
		bson_destroy(&sel);
		bson_destroy(&upd);
		bson_destroy(&opts);
	}
	if (rc == 0) {
		bson_t sel = BSON_INITIALIZER;

		/* Best effort: a leftover record below the state's seq is never redone. */
		BSON_APPEND_INT64(&sel, "_id", seq);
		(void)mongoc_collection_delete_one(folds, &sel, NULL, NULL, &be);
		bson_destroy(&sel);
	}
	mongoc_collection_destroy(deltas);
	mongoc_collection_destroy(state);
	mongoc_collection_destroy(folds);
	return rc;
}

/* ------------------------------------------------------------ identity */

struct idread_ctx {
	tdr_fold *f;
};

static struct devcache *cache_get_or_add(tdr_fold *f, const char *d, size_t dlen)
{
	struct devcache *dc = tdr_map_get(f->cache, d, dlen);

	if (dc)
		return dc;
	if (tdr_map_count(f->cache) >= CACHE_MAX)
		tdr_map_clear(f->cache, free); /* bounded memory: re-read on demand */
	dc = calloc(1, sizeof(*dc));
	if (dc == NULL || tdr_map_put(f->cache, d, dlen, dc) < 0) {
		free(dc);
		return NULL;
	}
	return dc;
}

static void note_identity(void *vctx, const bson_t *doc)
{
	tdr_fold *f = vctx;
	uint32_t dlen, ulen;
	const char *d = tdr_bson_str(doc, "_id", &dlen), *u = tdr_bson_str(doc, "username", &ulen);
	struct devcache *dc;
	bson_iter_t it;

	if (d == NULL || u == NULL || ulen > TDR_USERNAME_MAX || (dc = tdr_map_get(f->cache, d, dlen)) == NULL)
		return;
	dc->linked = 1;
	memcpy(dc->username, u, ulen);
	dc->username[ulen] = '\0';
	dc->linked_at = bson_iter_init_find(&it, doc, "linked_at") && BSON_ITER_HOLDS_DATE_TIME(&it)
				? bson_iter_date_time(&it)
				: 0;
}

static void note_count(void *vctx, const bson_t *doc)
{
	tdr_fold *f = vctx;
	uint32_t dlen;
	const char *d = tdr_bson_str(doc, "_id", &dlen);
	struct devcache *dc;

	if (d && (dc = tdr_map_get(f->cache, d, dlen)) != NULL) {
		dc->count = tdr_bson_i64(doc, "count", 0);
		dc->count_known = 1;
	}
}

/*
 * Resolve links for every device of the round and append identity_map and
 * username_metrics writes.  username_metrics.count is kept equal to the sum
 * of device_metrics.count over the devices linked to it: a (re)link moves the
 * device's whole count (read once, or known) as one forward delta.
 */
static int resolve_identities(tdr_fold *f, mongoc_client_t *c, tdr_map *devs, bson_t *writes, uint32_t *idx,
			      int64_t seq, tdr_map *cache_updates, tdr_err *err)
{
	size_t pos = 0, klen, nmiss = 0, nneed = 0, n = tdr_map_count(devs);
	const char *key, **miss = calloc(n ? n : 1, sizeof(*miss)), **need = calloc(n ? n : 1, sizeof(*need));
	size_t *misslen = calloc(n ? n : 1, sizeof(*misslen)), *needlen = calloc(n ? n : 1, sizeof(*needlen));
	tdr_map *users = tdr_map_new(256);
	void *v;
	int rc = 0;

	if (!miss || !need || !misslen || !needlen || !users) {
		rc = tdr_err_set(err, TDR_ENOMEM, "out of memory");
		goto out;
	}
	/* Devices we know nothing about: read their links (one $in per 500). */
	while (tdr_map_next(devs, &pos, &key, &klen, &v))
		if (tdr_map_get(f->cache, key, klen) == NULL) {
			if (cache_get_or_add(f, key, klen) == NULL) {
				rc = tdr_err_set(err, TDR_ENOMEM, "out of memory");
				goto out;
			}
			miss[nmiss] = key;
			misslen[nmiss++] = klen;
		}
	if (nmiss) {
		mongoc_collection_t *ids = tdr_store_coll(f->st, c, TDR_C_IDENTITIES);

		rc = read_in(f, ids, miss, misslen, nmiss, note_identity, f, err);
		mongoc_collection_destroy(ids);
		if (rc < 0)
			goto out;
	}
	/* Devices whose link changes need their count before this round. */
	pos = 0;
	while (tdr_map_next(devs, &pos, &key, &klen, &v)) {
		struct devround *dr = v;
		struct devcache *dc = tdr_map_get(f->cache, key, klen);

		if (dc == NULL) {
			rc = tdr_err_set(err, TDR_ENOMEM, "device cache lost an entry");
			goto out;
		}
		if (dr->best_u &&
		    (!dc->linked || cmp_link(dr->best_t, dr->best_u, dr->best_ulen, dc->linked_at, dc->username,
					     strlen(dc->username)) > 0) &&
		    !(dc->linked && strlen(dc->username) == dr->best_ulen &&
		      memcmp(dc->username, dr->best_u, dr->best_ulen) == 0) &&
		    !dc->count_known) {
			need[nneed] = key;
			needlen[nneed++] = klen;
		}
	}
	if (nneed) {
		mongoc_collection_t *dm = tdr_store_coll(f->st, c, TDR_C_DEVICES);

		rc = read_in(f, dm, need, needlen, nneed, note_count, f, err);
		mongoc_collection_destroy(dm);
		if (rc < 0)
			goto out;
		for (size_t i = 0; i < nneed; i++) {
			struct devcache *dc = tdr_map_get(f->cache, need[i], needlen[i]);

			if (dc && !dc->count_known) { /* no document yet: a new device */
				dc->count = 0;
				dc->count_known = 1;
			}
		}
	}
	/* Now every decision is local. */
	pos = 0;
	while (tdr_map_next(devs, &pos, &key, &klen, &v)) {
		struct devround *dr = v;
		struct devcache *dc = tdr_map_get(f->cache, key, klen);
		struct devcache *next = calloc(1, sizeof(*next));
		int improves, changes_user;

		if (next == NULL) {
			rc = tdr_err_set(err, TDR_ENOMEM, "out of memory");
			goto out;
		}
		*next = *dc;
		improves = dr->best_u && (!dc->linked || cmp_link(dr->best_t, dr->best_u, dr->best_ulen, dc->linked_at,
								  dc->username, strlen(dc->username)) > 0);
		changes_user = improves && !(dc->linked && strlen(dc->username) == dr->best_ulen &&
					     memcmp(dc->username, dr->best_u, dr->best_ulen) == 0);
		if (changes_user) {
			struct userdelta *ud;

			if (dc->linked) {
				ud = tdr_map_get(users, dc->username, strlen(dc->username));
				if (ud == NULL && ((ud = calloc(1, sizeof(*ud))) == NULL ||
						   tdr_map_put(users, dc->username, strlen(dc->username), ud) < 0)) {
					free(next);
					rc = tdr_err_set(err, TDR_ENOMEM, "out of memory");
					goto out;
				}
				ud->count -= dc->count;
				ud->devices -= 1;
			}
			ud = tdr_map_get(users, dr->best_u, dr->best_ulen);
			if (ud == NULL &&
			    ((ud = calloc(1, sizeof(*ud))) == NULL || tdr_map_put(users, dr->best_u, dr->best_ulen, ud) < 0)) {
				free(next);
				rc = tdr_err_set(err, TDR_ENOMEM, "out of memory");
				goto out;
			}
			ud->count += dc->count + dr->inc;
			ud->devices += 1;
		} else if (dc->linked) {
			struct userdelta *ud = tdr_map_get(users, dc->username, strlen(dc->username));

			if (ud == NULL && ((ud = calloc(1, sizeof(*ud))) == NULL ||
					   tdr_map_put(users, dc->username, strlen(dc->username), ud) < 0)) {
				free(next);
				rc = tdr_err_set(err, TDR_ENOMEM, "out of memory");
				goto out;
			}
			ud->count += dr->inc;
		}
		if (improves) {
			bson_t u = BSON_INITIALIZER, set, rec;
			char buf[16];
			const char *kp;

			next->linked = 1;
			next->linked_at = dr->best_t;
			memcpy(next->username, dr->best_u, dr->best_ulen);
			next->username[dr->best_ulen] = '\0';
			BSON_APPEND_DOCUMENT_BEGIN(&u, "$set", &set);
			bson_append_utf8(&set, "username", -1, dr->best_u, (int)dr->best_ulen);
			BSON_APPEND_DATE_TIME(&set, "linked_at", dr->best_t);
			BSON_APPEND_INT64(&set, "_f", seq);
			bson_append_document_end(&u, &set);
			bson_uint32_to_string((*idx)++, &kp, buf, sizeof(buf));
			bson_append_document_begin(writes, kp, -1, &rec);
			BSON_APPEND_UTF8(&rec, "c", TDR_C_IDENTITIES);
			bson_append_utf8(&rec, "k", 1, key, (int)klen);
			BSON_APPEND_DOCUMENT(&rec, "u", &u);
			bson_append_document_end(writes, &rec);
			bson_destroy(&u);
		}
		if (next->count_known)
			next->count += dr->inc;
		if (tdr_map_put(cache_updates, key, klen, next) < 0) {
			free(next);
			rc = tdr_err_set(err, TDR_ENOMEM, "out of memory");
			goto out;
		}
	}
	/* One username_metrics write per username touched. */
	pos = 0;
	while (tdr_map_next(users, &pos, &key, &klen, &v)) {
		struct userdelta *ud = v;
		bson_t u = BSON_INITIALIZER, d, rec;
		char buf[16];
		const char *kp;

		if (ud->count == 0 && ud->devices == 0)
			continue;
		BSON_APPEND_DOCUMENT_BEGIN(&u, "$inc", &d);
		BSON_APPEND_INT64(&d, "count", ud->count);
		BSON_APPEND_INT64(&d, "devices", ud->devices);
		bson_append_document_end(&u, &d);
		BSON_APPEND_DOCUMENT_BEGIN(&u, "$set", &d);
		BSON_APPEND_INT64(&d, "_f", seq);
		bson_append_document_end(&u, &d);
		bson_uint32_to_string((*idx)++, &kp, buf, sizeof(buf));
		bson_append_document_begin(writes, kp, -1, &rec);
		BSON_APPEND_UTF8(&rec, "c", TDR_C_USERS);
		bson_append_utf8(&rec, "k", 1, key, (int)klen);
		BSON_APPEND_DOCUMENT(&rec, "u", &u);
		bson_append_document_end(writes, &rec);
		bson_destroy(&u);
	}
out:
	free(miss);
	free(need);
	free(misslen);
	free(needlen);
	tdr_map_free(users, free);
	return rc;
}

/* ------------------------------------------------------------ round */

static int read_state_seq(tdr_fold *f, mongoc_client_t *c, int64_t *ret, tdr_err *err)
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
static int read_record(tdr_fold *f, mongoc_client_t *c, int64_t seq, bson_t **ret, tdr_err *err)
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

static int redo(tdr_fold *f, mongoc_client_t *c, const bson_t *record, int64_t seq, int64_t epoch, tdr_err *err)
{
	bson_iter_t it;
	bson_t writes;
	const uint8_t *data;
	uint32_t len;
	int rc;

	if (!bson_iter_init_find(&it, record, "w") || !BSON_ITER_HOLDS_ARRAY(&it))
		return tdr_err_set(err, TDR_EFAIL, "fold record %" PRId64 " has no writes", seq);
	bson_iter_array(&it, &len, &data);
	if (!bson_init_static(&writes, data, len))
		return tdr_err_set(err, TDR_EFAIL, "fold record %" PRId64 " is corrupt", seq);
	if (!tdr_coord_may_lead(f->coord, epoch))
		return tdr_err_set(err, TDR_EFENCED, "no longer leader");
	log_info("fold: redoing round %" PRId64 " left by a previous leader", seq);
	if ((rc = apply_writes(f, c, &writes, seq, 1, err)) < 0)
		return rc;
	if ((rc = finish_round(f, c, record, seq, epoch, err)) < 0)
		return rc;
	pthread_mutex_lock(&f->mu);
	f->stats.redo_rounds++;
	pthread_mutex_unlock(&f->mu);
	return 0;
}

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
	BSON_APPEND_INT64(&opts, "maxTimeMS", f->st->timeout_ms);
	cur = mongoc_collection_find_with_opts(deltas, &filter, &opts, NULL);
	while (r->ndeltas < (size_t)f->cfg.fold_max_deltas && r->nev < ROUND_EVENTS_MAX &&
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

static const char *delta_id(const bson_t *delta, uint32_t *len)
{
	return tdr_bson_str(delta, "_id", len);
}

/* Which delta an event came from: deltas are consecutive in r->ev. */
static size_t delta_of(const struct round *r, size_t ev_index)
{
	size_t lo = 0, hi = r->ndeltas;

	while (hi - lo > 1) {
		size_t mid = (lo + hi) / 2;

		if (r->starts[mid] <= ev_index)
			lo = mid;
		else
			hi = mid;
	}
	return lo;
}

/* Step 2: the one dedup.  Fills r->new_idx with the events this round counts. */
static int dedup(tdr_fold *f, mongoc_client_t *c, struct round *r, int64_t *ret_dups, tdr_err *err)
{
	mongoc_collection_t *ledger = tdr_store_coll(f->st, c, TDR_C_LEDGER);
	mongoc_bulk_operation_t *bulk = tdr_bulk_new(ledger, 0);
	tdr_map *seen = tdr_map_new(r->nev);
	size_t *cand = calloc(r->nev ? r->nev : 1, sizeof(*cand)), ncand = 0;
	char *isdup = NULL;
	bson_t reply = BSON_INITIALIZER;
	int64_t dups = 0;
	int rc = 0;

	r->new_idx = calloc(r->nev ? r->nev : 1, sizeof(*r->new_idx));
	if (!seen || !cand || !r->new_idx) {
		rc = tdr_err_set(err, TDR_ENOMEM, "out of memory");
		goto out;
	}
	/* Within the round: first occurrence only. */
	for (size_t i = 0; i < r->nev; i++) {
		if (tdr_map_get(seen, r->ev[i].insert_id, r->ev[i].insert_id_len)) {
			dups++;
			continue;
		}
		if (tdr_map_put(seen, r->ev[i].insert_id, r->ev[i].insert_id_len, (void *)1) < 0) {
			rc = tdr_err_set(err, TDR_ENOMEM, "out of memory");
			goto out;
		}
		cand[ncand++] = i;
	}
	for (size_t j = 0; j < ncand; j++) {
		const tdr_cevent *e = &r->ev[cand[j]];
		uint32_t dlen;
		const char *did = delta_id(r->deltas[delta_of(r, cand[j])], &dlen);
		bson_t doc = BSON_INITIALIZER;

		bson_append_utf8(&doc, "_id", 3, e->insert_id, (int)e->insert_id_len);
		if (did)
			bson_append_utf8(&doc, "d", 1, did, (int)dlen);
		mongoc_bulk_operation_insert(bulk, &doc);
		bson_destroy(&doc);
	}
	if (ncand == 0)
		goto out;
	bson_destroy(&reply);
	if ((rc = tdr_bulk_run(bulk, "ledger", NULL, &reply, err)) < 0)
		goto out;
	isdup = calloc(ncand, 1);
	if (isdup == NULL) {
		rc = tdr_err_set(err, TDR_ENOMEM, "out of memory");
		goto out;
	}
	{
		bson_iter_t it, arr;

		if (bson_iter_init_find(&it, &reply, "writeErrors") && bson_iter_recurse(&it, &arr))
			while (bson_iter_next(&arr)) {
				bson_iter_t e;
				bson_t ed;
				const uint8_t *data;
				uint32_t len;

				if (!BSON_ITER_HOLDS_DOCUMENT(&arr))
					continue;
				bson_iter_document(&arr, &len, &data);
				if (!bson_init_static(&ed, data, len))
					continue;
				int64_t index = tdr_bson_i64(&ed, "index", -1), code = tdr_bson_i64(&ed, "code", 0);

				(void)e;
				if (index >= 0 && (size_t)index < ncand && (code == 11000 || code == 11001))
					isdup[index] = 1;
			}
	}
	/* A duplicate is ours if its ledger entry names one of this round's deltas. */
	for (size_t j = 0; j < ncand; j++) {
		const tdr_cevent *e;
		bson_t filter = BSON_INITIALIZER, opts;
		mongoc_cursor_t *cur;
		const bson_t *doc;
		bson_error_t be;
		int ours = 0;

		if (!isdup[j]) {
			r->new_idx[r->nnew++] = cand[j];
			continue;
		}
		e = &r->ev[cand[j]];
		bson_append_utf8(&filter, "_id", 3, e->insert_id, (int)e->insert_id_len);
		tdr_store_read_opts(f->st, &opts);
		cur = mongoc_collection_find_with_opts(ledger, &filter, &opts, NULL);
		if (mongoc_cursor_next(cur, &doc)) {
			uint32_t dl;
			const char *dv = tdr_bson_str(doc, "d", &dl);

			for (size_t k = 0; dv && k < r->ndeltas && !ours; k++) {
				uint32_t l2;
				const char *id2 = delta_id(r->deltas[k], &l2);

				ours = id2 && l2 == dl && memcmp(id2, dv, dl) == 0;
			}
		}
		if (mongoc_cursor_error(cur, &be)) {
			tdr_store_error(&be, "ledger lookup", err);
			rc = TDR_ETRANSIENT;
		}
		mongoc_cursor_destroy(cur);
		bson_destroy(&opts);
		bson_destroy(&filter);
		if (rc < 0)
			goto out;
		if (ours)
			r->new_idx[r->nnew++] = cand[j];
		else
			dups++;
	}
out:
	*ret_dups = dups;
	bson_destroy(&reply);
	mongoc_bulk_operation_destroy(bulk);
	mongoc_collection_destroy(ledger);
	tdr_map_free(seen, NULL);
	free(cand);
	free(isdup);
	return rc;
}

static void free_devcache(void *p)
{
	free(p);
}

int tdr_fold_round(tdr_fold *f, int64_t epoch, int64_t *ret_n, tdr_err *err)
{
	mongoc_client_t *c = tdr_store_pop(f->st);
	struct round r;
	void *states[8] = { 0 };
	tdr_map *devs = NULL, *cache_updates = NULL;
	bson_t *record = NULL, writes = BSON_INITIALIZER, rec = BSON_INITIALIZER;
	int64_t seq = 0, dups = 0, t0 = tdr_mono_us(), lag = 0;
	uint32_t idx = 0;
	int rc, np = 0;

	memset(&r, 0, sizeof(r));
	*ret_n = 0;
	if (epoch != f->cache_epoch) {
		/* Another leader may have written since we last led: start cold. */
		tdr_map_clear(f->cache, free_devcache);
		f->cache_epoch = epoch;
	}
	if ((rc = read_state_seq(f, c, &seq, err)) < 0)
		goto out;
	if ((rc = read_record(f, c, seq + 1, &record, err)) < 0)
		goto out;
	if (record) {
		rc = redo(f, c, record, seq + 1, epoch, err);
		tdr_map_clear(f->cache, free_devcache);
		*ret_n = 1;
		goto out;
	}
	if ((rc = read_deltas(f, c, &r, err)) < 0 || r.ndeltas == 0)
		goto out;
	{
		bson_iter_t it;

		if (bson_iter_init_find(&it, r.deltas[0], "at") && BSON_ITER_HOLDS_DATE_TIME(&it))
			lag = tdr_wall_ms() - bson_iter_date_time(&it);
	}
	if ((rc = dedup(f, c, &r, &dups, err)) < 0)
		goto out;

	/* Step 3: aggregate the new events. */
	devs = tdr_map_new(1024);
	cache_updates = tdr_map_new(1024);
	if (devs == NULL || cache_updates == NULL) {
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
		if (e->username && (dr->best_u == NULL || cmp_link(e->created_at_ms, e->username, e->username_len,
								     dr->best_t, dr->best_u, dr->best_ulen) > 0)) {
			dr->best_u = e->username;
			dr->best_ulen = e->username_len;
			dr->best_t = e->created_at_ms;
		}
	}
	BSON_APPEND_INT64(&rec, "_id", seq + 1);
	BSON_APPEND_INT64(&rec, "epoch", epoch);
	BSON_APPEND_UTF8(&rec, "holder", f->cfg.name);
	BSON_APPEND_DATE_TIME(&rec, "at", tdr_wall_ms());
	{
		bson_t arr;

		BSON_APPEND_ARRAY_BEGIN(&rec, "deltas", &arr);
		for (size_t i = 0; i < r.ndeltas; i++) {
			char buf[16];
			const char *kp;
			bson_iter_t it;

			bson_uint32_to_string((uint32_t)i, &kp, buf, sizeof(buf));
			if (bson_iter_init_find(&it, r.deltas[i], "_id"))
				bson_append_value(&arr, kp, -1, bson_iter_value(&it));
		}
		bson_append_array_end(&rec, &arr);
	}
	BSON_APPEND_ARRAY_BEGIN(&rec, "w", &writes);
	for (int p = 0; p < np; p++)
		tdr_projections[p].emit(states[p], &writes, &idx, seq + 1);
	rc = resolve_identities(f, c, devs, &writes, &idx, seq + 1, cache_updates, err);
	bson_append_array_end(&rec, &writes);
	if (rc < 0)
		goto out;

	/* Step 4: the commit point of the round. */
	if (!tdr_coord_may_lead(f->coord, epoch)) {
		rc = tdr_err_set(err, TDR_EFENCED, "no longer leader");
		goto out;
	}
	{
		mongoc_collection_t *folds = tdr_store_coll(f->st, c, TDR_C_FOLDS);
		bson_error_t be;

		if (!mongoc_collection_insert_one(folds, &rec, NULL, NULL, &be)) {
			rc = tdr_store_error(&be, "insert fold record", err);
			/* Someone else committed this round: redo it next time (or find we are deposed). */
			if (rc != TDR_EDUP)
				rc = TDR_ETRANSIENT;
		}
		mongoc_collection_destroy(folds);
		if (rc < 0)
			goto out;
	}
	/* Step 5-6. */
	{
		bson_iter_t it;
		bson_t w;
		const uint8_t *data;
		uint32_t len;

		bson_iter_init_find(&it, &rec, "w");
		bson_iter_array(&it, &len, &data);
		bson_init_static(&w, data, len);
		if ((rc = apply_writes(f, c, &w, seq + 1, 0, err)) < 0) {
			tdr_map_clear(f->cache, free_devcache);
			goto out;
		}
	}
	if ((rc = finish_round(f, c, &rec, seq + 1, epoch, err)) < 0)
		goto out;
	{
		/* The writes are durable: the cache may now believe them. */
		size_t pos = 0, klen;
		const char *key;
		void *v;

		while (tdr_map_next(cache_updates, &pos, &key, &klen, &v)) {
			struct devcache *dc = cache_get_or_add(f, key, klen);

			if (dc)
				*dc = *(struct devcache *)v;
		}
	}
	pthread_mutex_lock(&f->mu);
	f->stats.rounds++;
	f->stats.deltas += (int64_t)r.ndeltas;
	f->stats.events += (int64_t)r.nnew;
	f->stats.duplicates += dups;
	f->stats.lag_ms = lag;
	f->stats.round_us = tdr_mono_us() - t0;
	pthread_mutex_unlock(&f->mu);
	*ret_n = (int64_t)r.ndeltas;
out:
	for (int p = 0; p < np; p++)
		if (states[p])
			tdr_projections[p].destroy(states[p]);
	tdr_map_free(devs, free);
	tdr_map_free(cache_updates, free);
	bson_destroy(&rec);
	if (record)
		bson_destroy(record);
	round_free(&r);
	tdr_store_push(f->st, c);
	return rc;
}

/* ------------------------------------------------------------ triage */

/* Give a partition to events whose producer wrote none (or a bad one). */
static int triage(tdr_fold *f, int64_t epoch, int64_t *ret_n, tdr_err *err)
{
	mongoc_client_t *c = tdr_store_pop(f->st);
	mongoc_collection_t *events = tdr_store_coll(f->st, c, f->st->events);
	bson_t filter = BSON_INITIALIZER, notr, range, opts = BSON_INITIALIZER, proj;
	mongoc_bulk_operation_t *bulk = tdr_bulk_new(events, 0);
	mongoc_cursor_t *cur;
	const bson_t *doc;
	bson_error_t be;
	int64_t n = 0;
	int rc = 0;

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
		bson_t sel = BSON_INITIALIZER, upd = BSON_INITIALIZER, set;
		int32_t p;

		if (!bson_iter_init_find(&it, doc, "_id")) {
			bson_destroy(&sel);
			bson_destroy(&upd);
			continue;
		}
		p = tdr_event_partition(bson_iter_value(&it), (uint32_t)f->cfg.partitions);
		/* An _id we cannot hash still needs an owner, who will dead-letter it. */
		if (p < 0)
			p = 0;
		bson_append_value(&sel, "_id", 3, bson_iter_value(&it));
		BSON_APPEND_DOCUMENT_BEGIN(&upd, "$set", &set);
		BSON_APPEND_INT32(&set, "part", p);
		bson_append_document_end(&upd, &set);
		mongoc_bulk_operation_update_one_with_opts(bulk, &sel, &upd, NULL, NULL);
		bson_destroy(&sel);
		bson_destroy(&upd);
		n++;
	}
	if (mongoc_cursor_error(cur, &be)) {
		tdr_store_error(&be, "triage", err);
		rc = TDR_ETRANSIENT;
	}
	mongoc_cursor_destroy(cur);
	if (rc == 0 && n) {
		if (!tdr_coord_may_lead(f->coord, epoch))
			rc = tdr_err_set(err, TDR_EFENCED, "no longer leader");
		else
			rc = tdr_bulk_run(bulk, "triage", NULL, NULL, err);
	}
	mongoc_bulk_operation_destroy(bulk);
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
		int64_t n = 0, tn = 0, wait = f->cfg.fold_interval_ms;
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
			if (f->cfg.mode == TDR_MODE_PARTITIONED)
				rc = triage(f, epoch, &tn, &err);
			if (rc == 0)
				rc = tdr_fold_round(f, epoch, &n, &err);
			if (rc < 0) {
				log_warn("fold: %s", err.msg);
				backoff = backoff ? (backoff * 2 > 5000 ? 5000 : backoff * 2) : 100;
				wait = backoff;
			} else {
				backoff = 0;
				/* A full round or triage batch means there is more: go again at once. */
				if (n >= f->cfg.fold_max_deltas || tn >= TRIAGE_BATCH)
					wait = 0;
			}
		}
		pthread_mutex_lock(&f->mu);
		f->stats.active = leader;
		if (rc < 0)
			f->stats.errors++;
		if (wait > 0 && !f->stop) {
			struct timespec ts;

			clock_gettime(CLOCK_MONOTONIC, &ts);
			ts.tv_sec += wait / 1000;
			ts.tv_nsec += (wait % 1000) * 1000000;
			if (ts.tv_nsec >= 1000000000) {
				ts.tv_sec++;
				ts.tv_nsec -= 1000000000;
			}
			pthread_cond_timedwait(&f->cv, &f->mu, &ts);
		}
	}
	pthread_mutex_unlock(&f->mu);
	return NULL;
}

int tdr_fold_new(tdr_fold **ret, const tdr_config *cfg, tdr_store *st, tdr_coord *coord, tdr_err *err)
{
	tdr_fold *f = calloc(1, sizeof(*f));
	pthread_condattr_t ca;

	if (f == NULL || (f->cache = tdr_map_new(4096)) == NULL) {
		free(f);
		return tdr_err_set(err, TDR_ENOMEM, "out of memory");
	}
	f->cfg = *cfg;
	f->st = st;
	f->coord = coord;
	f->cache_epoch = -1;
	pthread_mutex_init(&f->mu, NULL);
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(&f->cv, &ca);
	pthread_condattr_destroy(&ca);
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

void tdr_fold_stop(tdr_fold *f)
{
	if (f == NULL || !f->running)
		return;
	pthread_mutex_lock(&f->mu);
	f->stop = 1;
	pthread_cond_broadcast(&f->cv);
	pthread_mutex_unlock(&f->mu);
	pthread_join(f->thread, NULL);
	f->running = 0;
}

void tdr_fold_free(tdr_fold *f)
{
	if (f == NULL)
		return;
	tdr_fold_stop(f);
	tdr_map_free(f->cache, free_devcache);
	pthread_mutex_destroy(&f->mu);
	pthread_cond_destroy(&f->cv);
	free(f);
}

void tdr_fold_reload(tdr_fold *f, const tdr_config *cfg)
{
	pthread_mutex_lock(&f->mu);
	f->cfg.fold_interval_ms = cfg->fold_interval_ms;
	f->cfg.fold_max_deltas = cfg->fold_max_deltas;
	pthread_mutex_unlock(&f->mu);
}

void tdr_fold_stats_get(tdr_fold *f, struct tdr_fold_stats *out)
{
	pthread_mutex_lock(&f->mu);
	*out = f->stats;
	pthread_mutex_unlock(&f->mu);
}
