/*
 * fold_ledger.c - step 2 of a round, the one dedup for every projection:
 * tdrain_ledger holds one entry per insert_id ever counted, naming the delta
 * it came from, so a duplicate key from an attempt at this very round that
 * never committed is told apart from an event counted before.
 */
#include "config.h"

#include <stdlib.h>
#include <string.h>

#include "consumers/fold_internal.h"
#include "lib/bsonx.h"

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
int fold_dedup(tdr_fold *f, mongoc_client_t *c, struct round *r, int64_t *ret_dups, tdr_err *err)
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

		if ((rc = fold_read_in(f, ledger, dkeys, dlens, ndup, note_ledger, &ctx, err)) < 0)
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
