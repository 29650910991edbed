/*
 * fold_image.c - the fold's after-images: computing a derived document's next
 * version from its current one and a round's recorded update (step 3), and
 * writing a round's images to the store (step 5).  A round and a redo both
 * apply images through here, which is why a redo needs no reads.
 */
#include "config.h"

#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "consumers/fold_internal.h"
#include "lib/bsonx.h"

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
					w.ci = fold_coll_index(bson_iter_utf8(&f, NULL));
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
int fold_build_images(tdr_fold *f, mongoc_client_t *c, const bson_t *writes, int64_t seq, bson_t *images, tdr_err *err)
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
		if ((rc = fold_cache_fill(f, c, ci, keys, lens, n, err)) < 0)
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
			current = fold_cache_doc(fc, ci, w->k, w->klen, &ctmp);
			if (!bson_init_static(&u, w->u, w->ulen) ||
			    (image = make_image(current, w->k, w->klen, &u, seq)) == NULL ||
			    !bson_init_static(&img, image, fold_raw_len(image))) {
				free(image);
				rc = tdr_err_set(err, TDR_EFAIL, "cannot apply recorded update to %s %.*s",
						 fold_derived_colls[ci], (int)w->klen, w->k);
				break;
			}
			bson_uint32_to_string(idx++, &kp, buf, sizeof(buf));
			bson_append_document_begin(images, kp, -1, &out);
			BSON_APPEND_UTF8(&out, "c", fold_derived_colls[ci]);
			BSON_APPEND_DOCUMENT(&out, "d", &img);
			/* New: the store has no document for this key (FerretDB skips its delete). */
			if (current == NULL)
				BSON_APPEND_BOOL(&out, "n", true);
			bson_append_document_end(images, &out);
			/* A round that fails after this point drops the cache (tdr_fold_round). */
			if (fold_cache_put(fc, ci, w->k, w->klen, image) < 0)
				rc = tdr_err_set(err, TDR_ENOMEM, "out of memory");
		}
	}
out:
	free(recs);
	free(keys);
	free(lens);
	return rc;
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
					r.ci = fold_coll_index(bson_iter_utf8(&f, NULL));
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

/* A replace_one upsert of img fenced by {_f: {$lt: seq}}: atomic per document where the store is (MongoDB, DocumentDB). */
static void bulk_replace_fenced(mongoc_bulk_operation_t *bulk, const struct irec *r, const bson_t *img, int64_t seq)
{
	bson_t sel = BSON_INITIALIZER, lt, opts;

	bson_append_utf8(&sel, "_id", 3, r->k, (int)r->klen);
	BSON_APPEND_DOCUMENT_BEGIN(&sel, "_f", &lt);
	BSON_APPEND_INT64(&lt, "$lt", seq);
	bson_append_document_end(&sel, &lt);
	tdr_trusted_write_opts(&opts);
	BSON_APPEND_BOOL(&opts, "upsert", true);
	mongoc_bulk_operation_replace_one_with_opts(bulk, &sel, img, &opts, NULL);
	bson_destroy(&sel);
	bson_destroy(&opts);
}

/* Mark in dup[] the statements of reply's writeErrors that are duplicate keys. */
static void mark_dups(const bson_t *reply, char *dup, size_t n)
{
	bson_iter_t it, arr;

	if (!bson_iter_init_find(&it, reply, "writeErrors") || !bson_iter_recurse(&it, &arr))
		return;
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
		if (index >= 0 && (size_t)index < n && (code == 11000 || code == 11001))
			dup[index] = 1;
	}
}

/*
 * The images of one collection as two set-based statements (FerretDB,
 * DocumentDB): delete_many {_id: {$in}, _f: {$lt: seq}} then insert_many.
 * FerretDB: a duplicate on a first apply means the store held a document the
 * cache thought absent: fail the round, the redo deletes every key first.
 * DocumentDB (atomic per document): a duplicate key is a document the delete
 * did not remove (a newer image, or one written after it), so only those keys
 * are written again with the fenced replace_one upsert of MongoDB, whose own
 * duplicate means an image at least this new is there.
 */
static int apply_set_based(tdr_fold *f, mongoc_collection_t *coll, const char *cname, const struct irec *recs,
			   size_t nrecs, int ci, int64_t seq, int first, tdr_err *err)
{
	mongoc_bulk_operation_t *bulk = tdr_bulk_new(coll, 0), *again = NULL;
	const struct irec **sent = calloc(nrecs ? nrecs : 1, sizeof(*sent));
	char *dup = calloc(nrecs ? nrecs : 1, 1);
	bson_t del = BSON_INITIALIZER, in, arr, flt, reply;
	uint32_t ndel = 0;
	size_t nk = 0, nagain = 0;
	int64_t dups = 0;
	int rc = 0;

	bson_init(&reply);
	if (sent == NULL || dup == NULL) {
		rc = tdr_err_set(err, TDR_ENOMEM, "out of memory");
		goto out;
	}
	BSON_APPEND_DOCUMENT_BEGIN(&del, "_id", &in);
	BSON_APPEND_ARRAY_BEGIN(&in, "$in", &arr);
	for (size_t i = 0; i < nrecs; i++) {
		const struct irec *r = &recs[i];
		bson_t img;

		if (r->ci != ci || !bson_init_static(&img, r->img, r->imglen))
			continue;
		/*
		 * A key the store had no document for needs no delete.  Only on the
		 * round's first apply: a redo cannot know what the failed attempt wrote.
		 */
		if (!first || !r->isnew) {
			char buf[16];
			const char *kp;

			bson_uint32_to_string(ndel++, &kp, buf, sizeof(buf));
			bson_append_utf8(&arr, kp, -1, r->k, (int)r->klen);
		}
		tdr_bulk_insert_trusted(bulk, &img);
		sent[nk++] = r;
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
	if (nk == 0)
		goto out;
	if (ndel) {
		bson_error_t be;

		if (!mongoc_collection_delete_many(coll, &del, NULL, NULL, &be)) {
			tdr_store_error(&be, cname, err);
			rc = TDR_ETRANSIENT;
			goto out;
		}
	}
	bson_destroy(&reply);
	if ((rc = tdr_bulk_run(bulk, cname, &dups, &reply, err)) < 0 || dups == 0)
		goto out;
	if (f->st->is_ferretdb) {
		if (first)
			rc = tdr_err_set(err, TDR_ETRANSIENT,
					 "%s: %" PRId64 " documents the fold did not expect; redoing the round", cname, dups);
		goto out;
	}
	mark_dups(&reply, dup, nk);
	again = tdr_bulk_new(coll, 0);
	for (size_t j = 0; j < nk; j++) {
		bson_t img;

		if (!dup[j] || !bson_init_static(&img, sent[j]->img, sent[j]->imglen))
			continue;
		bulk_replace_fenced(again, sent[j], &img, seq);
		nagain++;
	}
	if (nagain)
		rc = tdr_bulk_run(again, cname, NULL, NULL, err);
out:
	bson_destroy(&reply);
	bson_destroy(&del);
	if (again)
		mongoc_bulk_operation_destroy(again);
	mongoc_bulk_operation_destroy(bulk);
	free(sent);
	free(dup);
	return rc;
}

/*
 * Write a round's images (seq: the round's, every image's _f).  One
 * statement set per collection.  MongoDB: replace_one upserts fenced by
 * {_f: {$lt: seq}}, index-served and atomic per document; a duplicate key
 * means the image (or a newer one) is already there.  FerretDB, whose keyed
 * statements each scan the collection, and DocumentDB, whose gateway costs
 * ~0.1 ms per statement (0.84 s for 10,000 upserts against 0.13 s for the
 * pair, measured): apply_set_based, two statements per collection however
 * many documents changed.  Readers of those stores can see a document
 * briefly absent between the two.
 */
int fold_apply_images(tdr_fold *f, mongoc_client_t *c, const bson_t *images, int64_t seq, int first, tdr_err *err)
{
	struct irec *recs = NULL;
	size_t nrecs = 0;
	int rc = 0;

	if (index_images(images, &recs, &nrecs) < 0)
		return tdr_err_set(err, TDR_ENOMEM, "out of memory");
	for (int ci = 0; ci < NCOLL && rc == 0; ci++) {
		const char *cname = fold_derived_colls[ci];
		mongoc_collection_t *coll = tdr_store_coll(f->st, c, cname);

		if (f->st->is_ferretdb || f->st->is_documentdb) {
			rc = apply_set_based(f, coll, cname, recs, nrecs, ci, seq, first, err);
		} else {
			mongoc_bulk_operation_t *bulk = tdr_bulk_new(coll, 0);
			size_t nk = 0;

			for (size_t i = 0; i < nrecs; i++) {
				bson_t img;

				if (recs[i].ci != ci || !bson_init_static(&img, recs[i].img, recs[i].imglen))
					continue;
				bulk_replace_fenced(bulk, &recs[i], &img, seq);
				nk++;
			}
			if (nk)
				rc = tdr_bulk_run(bulk, cname, NULL, NULL, err);
			mongoc_bulk_operation_destroy(bulk);
		}
		mongoc_collection_destroy(coll);
	}
	free(recs);
	return rc;
}
