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
#define ROUND_EVENTS_MAX 10000
#define IN_CHUNK 500
#define TRIAGE_BATCH 2000

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

#define NCOLL 6 /* derived_colls[] */
#define FOLD_IDLE_FACTOR 2 /* after a round of T ms, wait at least 2T (fold_thread) */
#define FOLD_IDLE_MAX_MS 10000 /* ... but no more than this (or fold.interval_ms if larger) */

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

static int coll_index(const char *name)
{
	for (int i = 0; derived_colls[i]; i++)
		if (strcmp(derived_colls[i], name) == 0)
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

/* ------------------------------------------------------------ after-images */

/*
 * A derived document's next version is computed here, in memory, from its
 * current version and the round's recorded update {inc, min, max, set,
 * addToSet}.  The images, not the updates, go into the redo record: applying
 * an absolute image twice is harmless, so a redo needs no reads.
 */
/*
 * Fields borrow: a key and a value point into the current document, the
 * update or an array this image built (own[]), all of which outlive the
 * image's construction.  No per-field copies: this runs once per derived
 * document per round, the fold's hottest loop.
 */
struct field {
	const char *key;
	bson_value_t v;
};

#define FIELDS_INLINE 16

struct fields {
	struct field *f;
	size_t n, cap;
	struct field inl[FIELDS_INLINE];
	bson_t **own; /* addToSet results */
	size_t nown;
};

static void fields_init(struct fields *fs)
{
	fs->f = fs->inl;
	fs->n = 0;
	fs->cap = FIELDS_INLINE;
	fs->own = NULL;
	fs->nown = 0;
}

static void fields_free(struct fields *fs)
{
	for (size_t i = 0; i < fs->nown; i++)
		bson_destroy(fs->own[i]);
	free(fs->own);
	if (fs->f != fs->inl)
		free(fs->f);
}

static struct field *field_get(struct fields *fs, const char *key)
{
	for (size_t i = 0; i < fs->n; i++)
		if (strcmp(fs->f[i].key, key) == 0)
			return &fs->f[i];
	return NULL;
}

/* Set key to v (replacing); both are borrowed. */
static int field_put(struct fields *fs, const char *key, const bson_value_t *v)
{
	struct field *f = field_get(fs, key);

	if (f) {
		f->v = *v;
		return 0;
	}
	if (fs->n == fs->cap) {
		size_t ncap = fs->cap * 2;
		struct field *nf = malloc(ncap * sizeof(*nf));

		if (nf == NULL)
			return -1;
		memcpy(nf, fs->f, fs->n * sizeof(*nf));
		if (fs->f != fs->inl)
			free(fs->f);
		fs->f = nf;
		fs->cap = ncap;
	}
	fs->f[fs->n].key = key;
	fs->f[fs->n].v = *v;
	fs->n++;
	return 0;
}

/* Keep arr until the image is built. */
static int fields_own(struct fields *fs, bson_t *arr)
{
	bson_t **n = realloc(fs->own, (fs->nown + 1) * sizeof(*n));

	if (n == NULL)
		return -1;
	fs->own = n;
	fs->own[fs->nown++] = arr;
	return 0;
}

static int64_t value_i64(const bson_value_t *v)
{
	switch (v->value_type) {
	case BSON_TYPE_INT32:
		return v->value.v_int32;
	case BSON_TYPE_INT64:
		return v->value.v_int64;
	case BSON_TYPE_DOUBLE:
		return (int64_t)v->value.v_double;
	default:
		return 0;
	}
}

/* Union of string arrays, existing order first, into a new array fs keeps. */
static int add_to_set(struct fields *fs, const char *k, const struct field *cur, bson_iter_t *f)
{
	bson_t *arr, old, add;
	bson_iter_t a, b;
	uint32_t idx = 0, len;
	const uint8_t *data;
	bson_value_t v;

	if (!BSON_ITER_HOLDS_ARRAY(f) || (arr = bson_new()) == NULL)
		return -1;
	if (fields_own(fs, arr) < 0) {
		bson_destroy(arr);
		return -1;
	}
	if (cur && cur->v.value_type == BSON_TYPE_ARRAY &&
	    bson_init_static(&old, cur->v.value.v_doc.data, cur->v.value.v_doc.data_len) && bson_iter_init(&a, &old))
		while (bson_iter_next(&a)) {
			char buf[16];
			const char *kp;

			bson_uint32_to_string(idx++, &kp, buf, sizeof(buf));
			bson_append_value(arr, kp, -1, bson_iter_value(&a));
		}
	bson_iter_array(f, &len, &data);
	if (bson_init_static(&add, data, len) && bson_iter_init(&b, &add))
		while (bson_iter_next(&b)) {
			int dup = 0;
			bson_iter_t c;

			if (bson_iter_init(&c, arr))
				while (!dup && bson_iter_next(&c))
					dup = tdr_bson_value_eq(bson_iter_value(&c), bson_iter_value(&b));
			if (!dup) {
				char buf[16];
				const char *kp;

				bson_uint32_to_string(idx++, &kp, buf, sizeof(buf));
				bson_append_value(arr, kp, -1, bson_iter_value(&b));
			}
		}
	v.value_type = BSON_TYPE_ARRAY;
	v.value.v_doc.data = (uint8_t *)bson_get_data(arr);
	v.value.v_doc.data_len = arr->len;
	return field_put(fs, k, &v);
}

/* Apply one recorded update to fs. */
static int apply_update(struct fields *fs, const bson_t *u)
{
	bson_iter_t op, f;

	if (!bson_iter_init(&op, u))
		return -1;
	while (bson_iter_next(&op)) {
		const char *name = bson_iter_key(&op);
		enum { OP_INC, OP_MIN, OP_MAX, OP_SET, OP_ADD } kind;

		if (strcmp(name, "inc") == 0)
			kind = OP_INC;
		else if (strcmp(name, "min") == 0)
			kind = OP_MIN;
		else if (strcmp(name, "max") == 0)
			kind = OP_MAX;
		else if (strcmp(name, "set") == 0)
			kind = OP_SET;
		else if (strcmp(name, "addToSet") == 0)
			kind = OP_ADD;
		else
			return -1;
		if (!BSON_ITER_HOLDS_DOCUMENT(&op) || !bson_iter_recurse(&op, &f))
			return -1;
		while (bson_iter_next(&f)) {
			const char *k = bson_iter_key(&f);
			const bson_value_t *nv = bson_iter_value(&f);
			struct field *cur = field_get(fs, k);
			bson_value_t tmp;
			int replace;

			switch (kind) {
			case OP_INC:
				tmp.value_type = BSON_TYPE_INT64;
				tmp.value.v_int64 = (cur ? value_i64(&cur->v) : 0) + value_i64(nv);
				if (field_put(fs, k, &tmp) < 0)
					return -1;
				break;
			case OP_MIN:
			case OP_MAX:
				replace = cur == NULL || cur->v.value_type != BSON_TYPE_DATE_TIME ||
					  nv->value_type != BSON_TYPE_DATE_TIME ||
					  (kind == OP_MIN ? nv->value.v_datetime < cur->v.value.v_datetime
							  : nv->value.v_datetime > cur->v.value.v_datetime);
				if (replace && field_put(fs, k, nv) < 0)
					return -1;
				break;
			case OP_SET:
				if (field_put(fs, k, nv) < 0)
					return -1;
				break;
			case OP_ADD:
				if (add_to_set(fs, k, cur, &f) < 0)
					return -1;
				break;
			}
		}
	}
	return 0;
}

/*
 * The image of key: current (may be NULL) + update, with _id key and _f seq,
 * as raw BSON in a new heap block (NULL on failure).
 */
static uint8_t *make_image(const bson_t *current, const char *key, size_t klen, const bson_t *u, int64_t seq)
{
	struct fields fs;
	bson_iter_t it;
	bson_t image;
	uint8_t *raw = NULL;
	int rc = 0;

	fields_init(&fs);
	if (current && bson_iter_init(&it, current))
		while (rc == 0 && bson_iter_next(&it)) {
			const char *k = bson_iter_key(&it);

			if (strcmp(k, "_id") != 0 && strcmp(k, "_f") != 0)
				rc = field_put(&fs, k, bson_iter_value(&it));
		}
	if (rc == 0)
		rc = apply_update(&fs, u);
	if (rc == 0) {
		bson_init(&image);
		bson_append_utf8(&image, "_id", 3, key, (int)klen);
		for (size_t i = 0; i < fs.n; i++)
			bson_append_value(&image, fs.f[i].key, -1, &fs.f[i].v);
		BSON_APPEND_INT64(&image, "_f", seq);
		if ((raw = malloc(image.len)) != NULL)
			memcpy(raw, bson_get_data(&image), image.len);
		bson_destroy(&image);
	}
	fields_free(&fs);
	return raw;
}

/* ------------------------------------------------------------ the cache */

/*
 * Values are a document's raw bytes in one plain heap block (BSON starts with
 * its own length), not bson_t objects: libbson allocates those with
 * memalign, which cost more than building the image did.
 */

/* Marks a key known to have no document. */
static char absent;

/* What an entry costs, roughly: the document, the key and the map slot. */
#define ENTRY_OVERHEAD 64

static uint32_t raw_len(const void *raw)
{
	const uint8_t *p = raw;

	return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static size_t entry_bytes(size_t klen, const void *v)
{
	return klen + ENTRY_OVERHEAD + (v && v != &absent ? raw_len(v) : 0);
}

static void cache_value_free(void *p)
{
	if (p && p != &absent)
		free(p);
}

static void cache_clear(struct fold_cache *fc)
{
	for (int i = 0; i < NCOLL; i++) {
		tdr_map_free(fc->docs[i], cache_value_free);
		fc->docs[i] = NULL;
		fc->complete[i] = 0;
	}
	fc->bytes = 0;
	fc->valid = 0;
}

/* The current document (in *tmp, read-only), or NULL if there is none. */
static const bson_t *cache_doc(const struct fold_cache *fc, int ci, const char *key, size_t klen, bson_t *tmp)
{
	void *v = tdr_map_get(fc->docs[ci], key, klen);

	if (v == NULL || v == &absent || !bson_init_static(tmp, v, raw_len(v)))
		return NULL;
	return tmp;
}

/* Put doc (raw bytes from malloc, owned by the cache from now on; NULL: absent) under key. */
static int cache_put(struct fold_cache *fc, int ci, const char *key, size_t klen, uint8_t *doc)
{
	void *old = tdr_map_get(fc->docs[ci], key, klen), *v = doc ? (void *)doc : (void *)&absent;

	if (tdr_map_put(fc->docs[ci], key, klen, v) < 0) {
		cache_value_free(doc);
		return -1;
	}
	if (old) {
		fc->bytes -= entry_bytes(klen, old);
		cache_value_free(old);
	}
	fc->bytes += entry_bytes(klen, v);
	return 0;
}

static size_t cache_budget(const tdr_fold *f)
{
	return (size_t)f->cfg.fold_cache_mb << 20;
}

struct fill_ctx {
	struct fold_cache *fc;
	int ci;
	size_t limit; /* stop keeping documents beyond this many bytes (0: no limit) */
	int failed, over;
};

static void fill_one(void *vctx, const bson_t *doc)
{
	struct fill_ctx *ctx = vctx;
	uint32_t len;
	const char *id = tdr_bson_str(doc, "_id", &len);
	uint8_t *copy;

	if (id == NULL || ctx->failed || ctx->over)
		return;
	if (ctx->limit && ctx->fc->bytes + entry_bytes(len, doc) > ctx->limit) {
		ctx->over = 1;
		return;
	}
	if ((copy = malloc(doc->len)) != NULL)
		memcpy(copy, bson_get_data(doc), doc->len);
	if (copy == NULL || cache_put(ctx->fc, ctx->ci, id, len, copy) < 0)
		ctx->failed = 1;
}

/*
 * Start over at (epoch, seq).  On FerretDB read every derived collection whole:
 * one scan each, the price of a single keyed read there.  A collection that
 * does not fit in what is left of the budget stays incomplete (what was read
 * is kept and correct; misses are read by key).
 */
static int cache_reset(tdr_fold *f, mongoc_client_t *c, int64_t epoch, int64_t seq, tdr_err *err)
{
	struct fold_cache *fc = &f->cache;

	cache_clear(fc);
	for (int i = 0; i < NCOLL; i++)
		if ((fc->docs[i] = tdr_map_new(1024)) == NULL) {
			cache_clear(fc);
			return tdr_err_set(err, TDR_ENOMEM, "out of memory");
		}
	fc->epoch = epoch;
	fc->seq = seq;
	fc->loads++;
	if (f->st->is_ferretdb && f->cfg.fold_cache_mb > 0)
		for (int i = 0; i < NCOLL; i++) {
			mongoc_collection_t *coll = tdr_store_coll(f->st, c, derived_colls[i]);
			struct fill_ctx ctx = { fc, i, cache_budget(f), 0, 0 };
			bson_t filter = BSON_INITIALIZER, opts;
			mongoc_cursor_t *cur;
			const bson_t *doc;
			bson_error_t be;
			int failed;

			tdr_store_read_opts(f->st, &opts);
			cur = mongoc_collection_find_with_opts(coll, &filter, &opts, NULL);
			while (!ctx.failed && !ctx.over && mongoc_cursor_next(cur, &doc))
				fill_one(&ctx, doc);
			failed = mongoc_cursor_error(cur, &be);
			mongoc_cursor_destroy(cur);
			bson_destroy(&opts);
			bson_destroy(&filter);
			mongoc_collection_destroy(coll);
			if (failed) {
				cache_clear(fc);
				tdr_store_error(&be, "fold cache load", err);
				return TDR_ETRANSIENT;
			}
			if (ctx.failed) {
				cache_clear(fc);
				return tdr_err_set(err, TDR_ENOMEM, "out of memory");
			}
			fc->complete[i] = !ctx.over;
		}
	fc->valid = 1;
	return 0;
}

/*
 * Make sure the cache knows keys of collection ci: read the ones it has never
 * seen (one $in per 500 keys; none when the collection is complete), and
 * mark those the store does not have as absent.
 */
static int cache_fill(tdr_fold *f, mongoc_client_t *c, int ci, const char *const *keys, const size_t *lens,
		      size_t n, tdr_err *err)
{
	struct fold_cache *fc = &f->cache;
	const char **miss = NULL;
	size_t *mlens = NULL, nmiss = 0;
	int rc = 0;

	if (fc->complete[ci]) {
		fc->hits += (int64_t)n;
		return 0;
	}
	if (n == 0)
		return 0;
	miss = calloc(n, sizeof(*miss));
	mlens = calloc(n, sizeof(*mlens));
	if (miss == NULL || mlens == NULL) {
		rc = tdr_err_set(err, TDR_ENOMEM, "out of memory");
		goto out;
	}
	for (size_t i = 0; i < n; i++)
		if (tdr_map_get(fc->docs[ci], keys[i], lens[i]) == NULL) {
			miss[nmiss] = keys[i];
			mlens[nmiss++] = lens[i];
		}
	fc->hits += (int64_t)(n - nmiss);
	fc->misses += (int64_t)nmiss;
	if (nmiss) {
		mongoc_collection_t *coll = tdr_store_coll(f->st, c, derived_colls[ci]);
		struct fill_ctx ctx = { fc, ci, 0, 0, 0 };

		rc = read_in(f, coll, miss, mlens, nmiss, fill_one, &ctx, err);
		mongoc_collection_destroy(coll);
		if (rc == 0 && ctx.failed)
			rc = tdr_err_set(err, TDR_ENOMEM, "out of memory");
		for (size_t i = 0; rc == 0 && i < nmiss; i++)
			if (tdr_map_get(fc->docs[ci], miss[i], mlens[i]) == NULL &&
			    cache_put(fc, ci, miss[i], mlens[i], NULL) < 0)
				rc = tdr_err_set(err, TDR_ENOMEM, "out of memory");
	}
out:
	free(miss);
	free(mlens);
	return rc;
}

/* After a committed round: the cache now describes seq.  Over budget: forget, stay valid. */
static void cache_advance(tdr_fold *f, int64_t seq)
{
	struct fold_cache *fc = &f->cache;

	fc->seq = seq;
	if (fc->bytes > cache_budget(f)) {
		for (int i = 0; i < NCOLL; i++) {
			tdr_map_clear(fc->docs[i], cache_value_free);
			fc->complete[i] = 0;
		}
		fc->bytes = 0;
		log_info("fold: cache over fold.cache_mb (%" PRId64 " MiB), emptied; keys are read again as needed",
			 f->cfg.fold_cache_mb);
	}
}

/* ------------------------------------------------------------ applying images */

/* One element {c, d, n} of an images array, parsed once. */
struct irec {
	int ci;
	const uint8_t *img; /* in images (a bson_t cannot be copied: it points into itself) */
	uint32_t imglen;
	const char *k;
	uint32_t klen;
	bool isnew;
};

static int index_images(const bson_t *images, struct irec **ret, size_t *ret_n)
{
	struct irec *recs = calloc(bson_count_keys(images) + 1, sizeof(*recs));
	size_t n = 0;
	bson_iter_t it;

	if (recs == NULL)
		return -1;

	if (bson_iter_init(&it, images))
		while (bson_iter_next(&it)) {
			struct irec r = { .ci = -1 };
			bson_iter_t f, id;
			bson_t img;

			if (!BSON_ITER_HOLDS_DOCUMENT(&it) || !bson_iter_recurse(&it, &f))
				continue;
			while (bson_iter_next(&f)) {
				const char *key = bson_iter_key(&f);

				if (strcmp(key, "c") == 0 && BSON_ITER_HOLDS_UTF8(&f)) {
					r.ci = coll_index(bson_iter_utf8(&f, NULL));
				} else if (strcmp(key, "d") == 0 && BSON_ITER_HOLDS_DOCUMENT(&f)) {
					bson_iter_document(&f, &r.imglen, &r.img);
				} else if (strcmp(key, "n") == 0 && BSON_ITER_HOLDS_BOOL(&f)) {
					r.isnew = bson_iter_bool(&f);
				}
			}
			/* make_image writes _id first. */
			if (r.ci < 0 || r.img == NULL || !bson_init_static(&img, r.img, r.imglen) ||
			    !bson_iter_init(&id, &img) || !bson_iter_next(&id) ||
			    strcmp(bson_iter_key(&id), "_id") != 0 || !BSON_ITER_HOLDS_UTF8(&id))
				continue;
			r.k = bson_iter_utf8(&id, &r.klen);
			recs[n++] = r;
		}
	*ret = recs;
	*ret_n = n;
	return 0;
}

/*
 * Write a round's images (seq: the round's, every image's _f).  One
 * statement set per collection.  MongoDB: replace_one upserts fenced by
 * {_f: {$lt: seq}}, index-served and atomic per document; a duplicate key
 * means the image (or a newer one) is already there.  FerretDB: its keyed
 * statements each scan the collection, so delete_many {_id: {$in}} then
 * insert_many: two scans per round however many documents changed.  Readers
 * of a FerretDB store can see a document briefly absent between the two.
 */
static int apply_images(tdr_fold *f, mongoc_client_t *c, const bson_t *images, int64_t seq, int first,
			tdr_err *err)
{
	struct irec *recs = NULL;
	size_t nrecs = 0;
	int rc = 0;

	if (index_images(images, &recs, &nrecs) < 0)
		return tdr_err_set(err, TDR_ENOMEM, "out of memory");
	for (int ci = 0; ci < NCOLL && rc == 0; ci++) {
		const char *cname = derived_colls[ci];
		mongoc_collection_t *coll = tdr_store_coll(f->st, c, cname);
		mongoc_bulk_operation_t *bulk = tdr_bulk_new(coll, 0);
		bson_t del = BSON_INITIALIZER, in, arr, flt;
		uint32_t nk = 0, ndel = 0;
		int64_t dups = 0;

		BSON_APPEND_DOCUMENT_BEGIN(&del, "_id", &in);
		BSON_APPEND_ARRAY_BEGIN(&in, "$in", &arr);
		for (size_t i = 0; i < nrecs; i++) {
			const struct irec *r = &recs[i];
			bson_t img;

			if (r->ci != ci || !bson_init_static(&img, r->img, r->imglen))
				continue;
			if (f->st->is_ferretdb) {
				char buf[16];
				const char *kp;

				/*
				 * A key the store had no document for needs no delete.  Only on the
				 * round's first apply: a redo cannot know what the failed attempt wrote.
				 */
				if (!first || !r->isnew) {
					bson_uint32_to_string(ndel++, &kp, buf, sizeof(buf));
					bson_append_utf8(&arr, kp, -1, r->k, (int)r->klen);
				}
				tdr_bulk_insert_trusted(bulk, &img);
			} else {
				bson_t sel = BSON_INITIALIZER, lt, opts;

				bson_append_utf8(&sel, "_id", 3, r->k, (int)r->klen);
				BSON_APPEND_DOCUMENT_BEGIN(&sel, "_f", &lt);
				BSON_APPEND_INT64(&lt, "$lt", seq);
				bson_append_document_end(&sel, &lt);
				tdr_trusted_write_opts(&opts);
				BSON_APPEND_BOOL(&opts, "upsert", true);
				mongoc_bulk_operation_replace_one_with_opts(bulk, &sel, &img, &opts, NULL);
				bson_destroy(&sel);
				bson_destroy(&opts);
			}
			nk++;
		}
		bson_append_array_end(&in, &arr);
		bson_append_document_end(&del, &in);
		/*
		 * Only what is older than this round: a deposed leader's delete can reach the
		 * store late (held by a partition, retransmitted when it heals), and must not
		 * remove images a newer round already wrote.
		 */
		BSON_APPEND_DOCUMENT_BEGIN(&del, "_f", &flt);
		BSON_APPEND_INT64(&flt, "$lt", seq);
		bson_append_document_end(&del, &flt);
		if (ndel && f->st->is_ferretdb) {
			bson_error_t be;

			if (!mongoc_collection_delete_many(coll, &del, NULL, NULL, &be)) {
				tdr_store_error(&be, cname, err);
				rc = TDR_ETRANSIENT;
			}
		}
		if (rc == 0 && nk)
			rc = tdr_bulk_run(bulk, cname, &dups, NULL, err);
		/*
		 * A first apply on FerretDB deleted every key it replaces, so a duplicate
		 * means the store held a document the cache thought absent: fail the
		 * round; the redo that follows deletes before it inserts.
		 */
		if (rc == 0 && dups && first && f->st->is_ferretdb)
			rc = tdr_err_set(err, TDR_ETRANSIENT, "%s: %" PRId64 " documents the fold did not expect; redoing the round",
					 cname, dups);
		bson_destroy(&del);
		mongoc_bulk_operation_destroy(bulk);
		mongoc_collection_destroy(coll);
	}
	free(recs);
	return rc;
}

/* Steps after apply: delete the folded deltas, advance the state, drop the record. */
static int finish_round(tdr_fold *f, mongoc_client_t *c, const bson_t *record, int64_t seq, int64_t epoch,
			tdr_err *err)
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

/* ------------------------------------------------------------ identity */

static int add_record(bson_t *writes, uint32_t *idx, const char *coll, const char *key, size_t klen,
		      const bson_t *u)
{
	char buf[16];
	const char *kp;
	bson_t rec;

	bson_uint32_to_string((*idx)++, &kp, buf, sizeof(buf));
	bson_append_document_begin(writes, kp, -1, &rec);
	BSON_APPEND_UTF8(&rec, "c", coll);
	bson_append_utf8(&rec, "k", 1, key, (int)klen);
	BSON_APPEND_DOCUMENT(&rec, "u", u);
	bson_append_document_end(writes, &rec);
	return 0;
}

static struct userdelta *user_delta(tdr_map *users, const char *u, size_t ulen)
{
	struct userdelta *ud = tdr_map_get(users, u, ulen);

	if (ud == NULL) {
		ud = calloc(1, sizeof(*ud));
		if (ud == NULL || tdr_map_put(users, u, ulen, ud) < 0) {
			free(ud);
			return NULL;
		}
	}
	return ud;
}

/*
 * Resolve each touched device's link from its current identity_map and
 * device_metrics documents, and record identity_map and username_metrics
 * updates.  username_metrics.count stays the sum of device_metrics.count over
 * the devices linked to it: a (re)link moves the device's whole count as one
 * forward delta, and nothing re-reads history.
 */
static int resolve_identities(tdr_map *devs, const struct fold_cache *fc, bson_t *writes, uint32_t *idx,
			      tdr_err *err)
{
	tdr_map *users = tdr_map_new(256);
	size_t pos = 0, klen;
	const char *key;
	void *v;
	int rc = 0;

	if (users == NULL)
		return tdr_err_set(err, TDR_ENOMEM, "out of memory");
	while (tdr_map_next(devs, &pos, &key, &klen, &v)) {
		struct devround *dr = v;
		bson_t itmp, dtmp;
		const bson_t *idoc = cache_doc(fc, coll_index(TDR_C_IDENTITIES), key, klen, &itmp),
			     *ddoc = cache_doc(fc, coll_index(TDR_C_DEVICES), key, klen, &dtmp);
		const char *old_u = idoc ? tdr_bson_str(idoc, "username", NULL) : NULL;
		uint32_t old_ulen = 0;
		int64_t old_t = 0, before = ddoc ? tdr_bson_i64(ddoc, "count", 0) : 0;
		int improves, changes_user;
		bson_iter_t it;

		if (old_u) {
			old_u = tdr_bson_str(idoc, "username", &old_ulen);
			if (bson_iter_init_find(&it, idoc, "linked_at") && BSON_ITER_HOLDS_DATE_TIME(&it))
				old_t = bson_iter_date_time(&it);
		}
		improves = dr->best_u &&
			   (!old_u || cmp_link(dr->best_t, dr->best_u, dr->best_ulen, old_t, old_u, old_ulen) > 0);
		changes_user = improves && !(old_u && old_ulen == dr->best_ulen && memcmp(old_u, dr->best_u, old_ulen) == 0);
		if (changes_user) {
			struct userdelta *ud;

			if (old_u) {
				if ((ud = user_delta(users, old_u, old_ulen)) == NULL)
					goto oom;
				ud->count -= before;
				ud->devices -= 1;
			}
			if ((ud = user_delta(users, dr->best_u, dr->best_ulen)) == NULL)
				goto oom;
			ud->count += before + dr->inc;
			ud->devices += 1;
		} else if (old_u) {
			struct userdelta *ud = user_delta(users, old_u, old_ulen);

			if (ud == NULL)
				goto oom;
			ud->count += dr->inc;
		}
		if (improves) {
			bson_t u = BSON_INITIALIZER, set;

			BSON_APPEND_DOCUMENT_BEGIN(&u, "set", &set);
			bson_append_utf8(&set, "username", -1, dr->best_u, (int)dr->best_ulen);
			BSON_APPEND_DATE_TIME(&set, "linked_at", dr->best_t);
			bson_append_document_end(&u, &set);
			add_record(writes, idx, TDR_C_IDENTITIES, key, klen, &u);
			bson_destroy(&u);
		}
	}
	pos = 0;
	while (tdr_map_next(users, &pos, &key, &klen, &v)) {
		struct userdelta *ud = v;
		bson_t u = BSON_INITIALIZER, d;

		if (ud->count == 0 && ud->devices == 0)
			continue;
		BSON_APPEND_DOCUMENT_BEGIN(&u, "inc", &d);
		BSON_APPEND_INT64(&d, "count", ud->count);
		BSON_APPEND_INT64(&d, "devices", ud->devices);
		bson_append_document_end(&u, &d);
		add_record(writes, idx, TDR_C_USERS, key, klen, &u);
		bson_destroy(&u);
	}
	tdr_map_free(users, free);
	return rc;
oom:
	tdr_map_free(users, free);
	return tdr_err_set(err, TDR_ENOMEM, "out of memory");
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

static int redo(tdr_fold *f, mongoc_client_t *c, const bson_t *record, int64_t seq, int64_t epoch, tdr_err *err)
{
	bson_t images;
	int rc;

	if (record_images(record, &images) < 0)
		return tdr_err_set(err, TDR_EFAIL, "fold record %" PRId64 " is corrupt", seq);
	if (!tdr_coord_may_lead(f->coord, epoch))
		return tdr_err_set(err, TDR_EFENCED, "no longer leader");
	log_info("fold: redoing round %" PRId64 " left unfinished by a previous leader", seq);
	if ((rc = apply_images(f, c, &images, seq, 0, err)) < 0)
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
	/*
	 * A delta holds a whole batch (up to drain.batch_size events): a small
	 * first reply, so that a round that stops at ROUND_EVENTS_MAX fetches
	 * about what it folds, not fold.max_deltas batches.
	 */
	BSON_APPEND_INT64(&opts, "batchSize", f->cfg.fold_max_deltas < 16 ? f->cfg.fold_max_deltas : 16);
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

struct ledger_ctx {
	const struct round *r;
	tdr_map *ours; /* insert_id -> 1 when its ledger entry names one of this round's deltas */
};

static void note_ledger(void *vctx, const bson_t *doc)
{
	struct ledger_ctx *ctx = vctx;
	uint32_t il, dl;
	const char *id = tdr_bson_str(doc, "_id", &il), *dv = tdr_bson_str(doc, "d", &dl);

	if (id == NULL || dv == NULL)
		return;
	for (size_t k = 0; k < ctx->r->ndeltas; k++) {
		uint32_t l2;
		const char *id2 = delta_id(ctx->r->deltas[k], &l2);

		if (id2 && l2 == dl && memcmp(id2, dv, dl) == 0) {
			(void)tdr_map_put(ctx->ours, id, il, (void *)1);
			return;
		}
	}
}

/*
 * Step 2: the one dedup.  Fills r->new_idx with the events this round counts.
 * A duplicate key whose ledger entry names one of this round's deltas came
 * from an attempt at this round that never committed: it is ours.
 */
static int dedup(tdr_fold *f, mongoc_client_t *c, struct round *r, int64_t *ret_dups, tdr_err *err)
{
	mongoc_collection_t *ledger = tdr_store_coll(f->st, c, TDR_C_LEDGER);
	mongoc_bulk_operation_t *bulk = tdr_bulk_new(ledger, 0);
	tdr_map *seen = tdr_map_new(r->nev), *ours = tdr_map_new(64);
	size_t *cand = calloc(r->nev ? r->nev : 1, sizeof(*cand)), ncand = 0, ndup = 0;
	const char **dkeys = NULL;
	size_t *dlens = NULL;
	char *isdup = NULL;
	bson_t reply = BSON_INITIALIZER;
	int64_t dups = 0;
	int rc = 0;

	r->new_idx = calloc(r->nev ? r->nev : 1, sizeof(*r->new_idx));
	if (!seen || !ours || !cand || !r->new_idx) {
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
	if (ncand == 0)
		goto out;
	for (size_t j = 0; j < ncand; j++) {
		const tdr_cevent *e = &r->ev[cand[j]];
		uint32_t dlen;
		const char *did = delta_id(r->deltas[delta_of(r, cand[j])], &dlen);
		bson_t doc = BSON_INITIALIZER;

		bson_append_utf8(&doc, "_id", 3, e->insert_id, (int)e->insert_id_len);
		if (did)
			bson_append_utf8(&doc, "d", 1, did, (int)dlen);
		tdr_bulk_insert_trusted(bulk, &doc);
		bson_destroy(&doc);
	}
	bson_destroy(&reply);
	if ((rc = tdr_bulk_run(bulk, "ledger", NULL, &reply, err)) < 0)
		goto out;
	isdup = calloc(ncand, 1);
	dkeys = calloc(ncand, sizeof(*dkeys));
	dlens = calloc(ncand, sizeof(*dlens));
	if (isdup == NULL || dkeys == NULL || dlens == NULL) {
		rc = tdr_err_set(err, TDR_ENOMEM, "out of memory");
		goto out;
	}
	{
		bson_iter_t it, arr;

		if (bson_iter_init_find(&it, &reply, "writeErrors") && bson_iter_recurse(&it, &arr))
			while (bson_iter_next(&arr)) {
				bson_t ed;
				const uint8_t *data;
				uint32_t len;
				int64_t index, code;

				if (!BSON_ITER_HOLDS_DOCUMENT(&arr))
					continue;
				bson_iter_document(&arr, &len, &data);
				if (!bson_init_static(&ed, data, len))
					continue;
				index = tdr_bson_i64(&ed, "index", -1);
				code = tdr_bson_i64(&ed, "code", 0);
				if (index >= 0 && (size_t)index < ncand && (code == 11000 || code == 11001) && !isdup[index]) {
					isdup[index] = 1;
					dkeys[ndup] = r->ev[cand[index]].insert_id;
					dlens[ndup++] = r->ev[cand[index]].insert_id_len;
				}
			}
	}
	/* All duplicates' ledger entries in one $in read (keyed reads scan on FerretDB). */
	if (ndup) {
		struct ledger_ctx ctx = { r, ours };

		if ((rc = read_in(f, ledger, dkeys, dlens, ndup, note_ledger, &ctx, err)) < 0)
			goto out;
	}
	for (size_t j = 0; j < ncand; j++) {
		const tdr_cevent *e = &r->ev[cand[j]];

		if (!isdup[j] || tdr_map_get(ours, e->insert_id, e->insert_id_len))
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
	tdr_map_free(ours, NULL);
	free(cand);
	free(isdup);
	free(dkeys);
	free(dlens);
	return rc;
}

/* One record of a round's writes array {c, k, u}, parsed once. */
struct wrec {
	int ci;
	const char *k;
	uint32_t klen;
	const uint8_t *u; /* the update, in writes (a bson_t cannot be copied: it points into itself) */
	uint32_t ulen;
};

/* Parse writes into recs (records naming no derived collection are skipped). */
static int index_writes(const bson_t *writes, struct wrec **ret, size_t *ret_n)
{
	struct wrec *recs = calloc(bson_count_keys(writes) + 1, sizeof(*recs));
	size_t n = 0;
	bson_iter_t it;

	if (recs == NULL)
		return -1;

	if (bson_iter_init(&it, writes))
		while (bson_iter_next(&it)) {
			struct wrec w = { .ci = -1 };
			bson_iter_t f;

			if (!BSON_ITER_HOLDS_DOCUMENT(&it) || !bson_iter_recurse(&it, &f))
				continue;
			while (bson_iter_next(&f)) {
				const char *key = bson_iter_key(&f);

				if (strcmp(key, "c") == 0 && BSON_ITER_HOLDS_UTF8(&f)) {
					w.ci = coll_index(bson_iter_utf8(&f, NULL));
				} else if (strcmp(key, "k") == 0 && BSON_ITER_HOLDS_UTF8(&f)) {
					w.k = bson_iter_utf8(&f, &w.klen);
				} else if (strcmp(key, "u") == 0 && BSON_ITER_HOLDS_DOCUMENT(&f)) {
					bson_iter_document(&f, &w.ulen, &w.u);
				}
			}
			if (w.ci < 0 || w.k == NULL || w.u == NULL)
				continue;
			recs[n++] = w;
		}
	*ret = recs;
	*ret_n = n;
	return 0;
}

/*
 * Steps 3-4: make sure the cache holds the current version of every document
 * the writes touch (reading the keys it has never seen, one $in per
 * collection), compute after-images, and append them to images.  The cache
 * takes each image: two writes to one key in a round chain through it.
 */
static int build_images(tdr_fold *f, mongoc_client_t *c, const bson_t *writes, int64_t seq, bson_t *images,
			tdr_err *err)
{
	struct fold_cache *fc = &f->cache;
	struct wrec *recs = NULL;
	const char **keys = NULL;
	size_t *lens = NULL, nrecs = 0;
	uint32_t idx = 0;
	int rc = 0;

	if (index_writes(writes, &recs, &nrecs) < 0)
		return tdr_err_set(err, TDR_ENOMEM, "out of memory");
	keys = calloc(nrecs ? nrecs : 1, sizeof(*keys));
	lens = calloc(nrecs ? nrecs : 1, sizeof(*lens));
	if (keys == NULL || lens == NULL) {
		rc = tdr_err_set(err, TDR_ENOMEM, "out of memory");
		goto out;
	}
	for (int ci = 0; ci < NCOLL && rc == 0; ci++) {
		size_t n = 0;

		for (size_t i = 0; i < nrecs; i++)
			if (recs[i].ci == ci) {
				keys[n] = recs[i].k;
				lens[n++] = recs[i].klen;
			}
		if ((rc = cache_fill(f, c, ci, keys, lens, n, err)) < 0)
			break;
		for (size_t i = 0; i < nrecs && rc == 0; i++) {
			const struct wrec *w = &recs[i];
			const bson_t *current;
			bson_t ctmp, out, u, img;
			uint8_t *image = NULL;
			char buf[16];
			const char *kp;

			if (w->ci != ci)
				continue;
			current = cache_doc(fc, ci, w->k, w->klen, &ctmp);
			if (!bson_init_static(&u, w->u, w->ulen) ||
			    (image = make_image(current, w->k, w->klen, &u, seq)) == NULL ||
			    !bson_init_static(&img, image, raw_len(image))) {
				free(image);
				rc = tdr_err_set(err, TDR_EFAIL, "cannot apply recorded update to %s %.*s",
						 derived_colls[ci], (int)w->klen, w->k);
				break;
			}
			bson_uint32_to_string(idx++, &kp, buf, sizeof(buf));
			bson_append_document_begin(images, kp, -1, &out);
			BSON_APPEND_UTF8(&out, "c", derived_colls[ci]);
			BSON_APPEND_DOCUMENT(&out, "d", &img);
			/* New: the store has no document for this key (FerretDB skips its delete). */
			if (current == NULL)
				BSON_APPEND_BOOL(&out, "n", true);
			bson_append_document_end(images, &out);
			/* A round that fails after this point drops the cache (tdr_fold_round). */
			if (cache_put(fc, ci, w->k, w->klen, image) < 0)
				rc = tdr_err_set(err, TDR_ENOMEM, "out of memory");
		}
	}
out:
	free(recs);
	free(keys);
	free(lens);
	return rc;
}

int tdr_fold_round(tdr_fold *f, int64_t epoch, int64_t *ret_n, tdr_err *err)
{
	mongoc_client_t *c = tdr_store_pop(f->st);
	struct round r;
	void *states[8] = { 0 };
	tdr_map *devs = NULL;
	bson_t *record = NULL, writes = BSON_INITIALIZER, images, rec = BSON_INITIALIZER;
	int64_t seq = 0, dups = 0, t0 = tdr_mono_us(), lag = 0;
	uint32_t idx = 0;
	int rc, np = 0, cache_touched = 0;

	memset(&r, 0, sizeof(r));
	bson_init(&images);
	*ret_n = 0;
	/*
	 * Deltas first: with none there is nothing to fold, and nothing to redo
	 * either that cannot wait (a redo record's deltas are deleted only after
	 * its images are applied; the state advance it may still owe happens at
	 * the next round that has work).  An idle fold costs one read.
	 */
	if ((rc = read_deltas(f, c, &r, err)) < 0 || r.ndeltas == 0)
		goto out;
	if ((rc = read_state_seq(f, c, &seq, err)) < 0)
		goto out;
	if ((rc = read_record(f, c, seq + 1, &record, err)) < 0)
		goto out;
	if (record) {
		rc = redo(f, c, record, seq + 1, epoch, err);
		cache_clear(&f->cache);
		*ret_n = 1;
		goto out;
	}
	if (!f->cache.valid || f->cache.epoch != epoch || f->cache.seq != seq) {
		if ((rc = cache_reset(f, c, epoch, seq, err)) < 0)
			goto out;
	}
	{
		bson_iter_t it;

		if (bson_iter_init_find(&it, r.deltas[0], "at") && BSON_ITER_HOLDS_DATE_TIME(&it))
			lag = tdr_wall_ms() - bson_iter_date_time(&it);
	}
	if ((rc = dedup(f, c, &r, &dups, err)) < 0)
		goto out;

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
		if (e->username && (dr->best_u == NULL || cmp_link(e->created_at_ms, e->username, e->username_len,
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
		rc = cache_fill(f, c, coll_index(TDR_C_DEVICES), keys, lens, k, err);
		if (rc == 0)
			rc = cache_fill(f, c, coll_index(TDR_C_IDENTITIES), keys, lens, k, err);
		free(keys);
		free(lens);
		if (rc < 0)
			goto out;
	}
	for (int p = 0; p < np; p++)
		tdr_projections[p].emit(states[p], &writes, &idx, seq + 1);
	if ((rc = resolve_identities(devs, &f->cache, &writes, &idx, err)) < 0)
		goto out;
	cache_touched = 1;
	if ((rc = build_images(f, c, &writes, seq + 1, &images, err)) < 0)
		goto out;

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
	BSON_APPEND_ARRAY(&rec, "img", &images);

	/* Step 4: the commit point of the round. */
	if (!tdr_coord_may_lead(f->coord, epoch)) {
		rc = tdr_err_set(err, TDR_EFENCED, "no longer leader");
		goto out;
	}
	{
		mongoc_collection_t *folds = tdr_store_coll(f->st, c, TDR_C_FOLDS);
		bson_error_t be;
		bson_t opts;
		bool ok;

		tdr_trusted_write_opts(&opts);
		ok = mongoc_collection_insert_one(folds, &rec, &opts, NULL, &be);
		bson_destroy(&opts);
		if (!ok) {
			rc = tdr_store_error(&be, "insert fold record", err);
			/* On a duplicate, someone committed this round: the next round redoes it. */
			if (rc != TDR_EDUP)
				rc = TDR_ETRANSIENT;
		}
		mongoc_collection_destroy(folds);
		if (rc < 0)
			goto out;
	}
	/* Steps 5-6. */
	if ((rc = apply_images(f, c, &images, seq + 1, 1, err)) < 0)
		goto out;
	if ((rc = finish_round(f, c, &rec, seq + 1, epoch, err)) < 0)
		goto out;
	cache_advance(f, seq + 1);
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
	pthread_mutex_unlock(&f->mu);
	*ret_n = (int64_t)r.ndeltas;
out:
	/* The images are in the cache; whether they are in the store is not known. */
	if (rc < 0 && cache_touched)
		cache_clear(&f->cache);
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
				if (n >= f->cfg.fold_max_deltas || tn >= TRIAGE_BATCH)
					wait = 0;
				/*
				 * While the drain works through a backlog, an expensive round
				 * (FerretDB scans every derived collection it writes, whatever the
				 * number of events) waits twice its own time: the fold takes at
				 * most a third of the store, and the events that pile up meanwhile
				 * share the next round's scans.  Index-served rounds (MongoDB) are
				 * far below the interval and never wait longer.
				 */
				else if (n > 0)
					hold = took_ms * FOLD_IDLE_FACTOR;
				if (hold > FOLD_IDLE_MAX_MS)
					hold = FOLD_IDLE_MAX_MS;
			}
		}
		/* Not the leader: the next leadership starts from the store anyway. */
		if (!leader && f->cache.valid)
			cache_clear(&f->cache);
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
	pthread_condattr_t ca;

	if (f == NULL)
		return tdr_err_set(err, TDR_ENOMEM, "out of memory");
	f->cfg = *cfg;
	f->st = st;
	f->coord = coord;
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
	cache_clear(&f->cache);
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
