/*
 * fold_cache.c - the leader's copy of the derived documents (docs/DESIGN.md,
 * "The fold's cache"): its entries, when it starts over from the store, how
 * misses are read, and the fold.cache_mb bound.  Apart from the round because
 * its validity rules (one epoch, one fold seq) are what keep it exact.
 */
#include "config.h"

#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "consumers/fold_internal.h"
#include "lib/bsonx.h"
#include "lib/clock.h"
#include "lib/log.h"

/*
 * Values are a document's raw bytes in one plain heap block (BSON starts with
 * its own length), not bson_t objects: libbson allocates those with
 * memalign, which cost more than building the image did.
 */

/* Marks a key known to have no document. */
static char absent;

/* What an entry costs, roughly: the document, the key and the map slot. */
#define ENTRY_OVERHEAD 64

uint32_t fold_raw_len(const void *raw)
{
	const uint8_t *p = raw;

	return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static size_t entry_bytes(size_t klen, const void *v)
{
	return klen + ENTRY_OVERHEAD + (v && v != &absent ? fold_raw_len(v) : 0);
}

static void cache_value_free(void *p)
{
	if (p && p != &absent)
		free(p);
}

void fold_cache_clear(struct fold_cache *fc)
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
const bson_t *fold_cache_doc(const struct fold_cache *fc, int ci, const char *key, size_t klen, bson_t *tmp)
{
	void *v = tdr_map_get(fc->docs[ci], key, klen);

	if (v == NULL || v == &absent || !bson_init_static(tmp, v, fold_raw_len(v)))
		return NULL;
	return tmp;
}

/* Put doc (raw bytes from malloc, owned by the cache from now on; NULL: absent) under key. */
int fold_cache_put(struct fold_cache *fc, int ci, const char *key, size_t klen, uint8_t *doc)
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
	if (copy == NULL || fold_cache_put(ctx->fc, ctx->ci, id, len, copy) < 0)
		ctx->failed = 1;
}

/*
 * Start over at (epoch, seq).  On FerretDB read every derived collection whole:
 * one scan each, the price of a single keyed read there.  A collection that
 * does not fit in what is left of the budget stays incomplete (what was read
 * is kept and correct; misses are read by key).
 */
int fold_cache_reset(tdr_fold *f, mongoc_client_t *c, int64_t epoch, int64_t seq, tdr_err *err)
{
	struct fold_cache *fc = &f->cache;

	fold_cache_clear(fc);
	for (int i = 0; i < NCOLL; i++)
		if ((fc->docs[i] = tdr_map_new(1024)) == NULL) {
			fold_cache_clear(fc);
			return tdr_err_set(err, TDR_ENOMEM, "out of memory");
		}
	fc->epoch = epoch;
	fc->seq = seq;
	fc->loads++;
	if (f->st->is_ferretdb && f->cfg.fold_cache_mb > 0)
		for (int i = 0; i < NCOLL; i++) {
			mongoc_collection_t *coll = tdr_store_coll(f->st, c, fold_derived_colls[i]);
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
				fold_cache_clear(fc);
				tdr_store_error(&be, "fold cache load", err);
				return TDR_ETRANSIENT;
			}
			if (ctx.failed) {
				fold_cache_clear(fc);
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
static int cache_fill(tdr_fold *f, mongoc_client_t *c, int ci, const char *const *keys, const size_t *lens, size_t n,
		      tdr_err *err)
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
		mongoc_collection_t *coll = tdr_store_coll(f->st, c, fold_derived_colls[ci]);
		struct fill_ctx ctx = { fc, ci, 0, 0, 0 };

		rc = fold_read_in(f, coll, miss, mlens, nmiss, fill_one, &ctx, err);
		mongoc_collection_destroy(coll);
		if (rc == 0 && ctx.failed)
			rc = tdr_err_set(err, TDR_ENOMEM, "out of memory");
		for (size_t i = 0; rc == 0 && i < nmiss; i++)
			if (tdr_map_get(fc->docs[ci], miss[i], mlens[i]) == NULL &&
			    fold_cache_put(fc, ci, miss[i], mlens[i], NULL) < 0)
				rc = tdr_err_set(err, TDR_ENOMEM, "out of memory");
	}
out:
	free(miss);
	free(mlens);
	return rc;
}

int fold_cache_fill(tdr_fold *f, mongoc_client_t *c, int ci, const char *const *keys, const size_t *lens, size_t n,
		    tdr_err *err)
{
	int64_t t0 = tdr_mono_us();
	int rc = cache_fill(f, c, ci, keys, lens, n, err);

	f->reads_us += tdr_mono_us() - t0;
	return rc;
}

/* After a committed round: the cache now describes seq.  Over budget: forget, stay valid. */
void fold_cache_advance(tdr_fold *f, int64_t seq)
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
