/*
 * drain.c - the batch cycle.  The contract and its steps are in drain.h; the
 * argument for why each crash point is safe is in docs/DESIGN.md.  Orphan
 * recovery, which runs orphaned events through this cycle, is in orphans.c.
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "consumers/event.h"
#include "lib/bsonx.h"
#include "lib/clock.h"
#include "lib/log.h"
#include "lib/map.h"
#include "worker/drain_internal.h"

/* A batch never holds more than this many bytes of documents in memory. */
#define BATCH_BYTES_MAX (64 * 1024 * 1024)
/* Dead-letter copies of larger documents keep only their head (16 MiB document limit). */
#define DL_HEAD_BYTES 4096
/* Acknowledged events whose FIFO delete is unconfirmed; past this we stop claiming. */
#define FORGET_CHUNK 1000

struct group {
	int32_t part;
	int64_t epoch;
	char id[64];
	size_t nitems, nvalid;
	int live; /* claim recorded and still ours */
};

const double tdr_hist_bounds[TDR_HIST_BUCKETS - 1] = { 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
							0.1,   0.25,   0.5,   1.0,  2.5 };

void tdr_hist_add(struct tdr_hist *h, int64_t usec)
{
	double s = (double)usec / 1e6;
	int i = 0;

	while (i < TDR_HIST_BUCKETS - 1 && s > tdr_hist_bounds[i])
		i++;
	h->bucket[i]++;
	h->count++;
	h->sum_s += s;
}

/* ------------------------------------------------------------ setup */

int tdr_drain_new(tdr_drain **ret, const tdr_config *cfg, tdr_store *st, tdr_coord *coord, tdr_archive *ar,
		  tdr_err *err)
{
	tdr_drain *d = calloc(1, sizeof(*d));

	if (d == NULL)
		return tdr_err_set(err, TDR_ENOMEM, "out of memory");
	d->cfg = *cfg;
	d->st = st;
	d->coord = coord;
	d->ar = ar;
	d->trace_fd = -1;
	if (cfg->trace_file[0]) {
		d->trace_fd = open(cfg->trace_file, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
		if (d->trace_fd < 0) {
			tdr_err_set(err, TDR_ECONFIG, "test.trace_file %s: %s", cfg->trace_file, strerror(errno));
			free(d);
			return TDR_ECONFIG;
		}
	}
	d->client = tdr_store_pop(st);
	d->events = tdr_store_coll(st, d->client, st->events);
	d->claims = tdr_store_coll(st, d->client, TDR_C_CLAIMS);
	d->deltas = tdr_store_coll(st, d->client, TDR_C_DELTAS);
	d->dead = tdr_store_coll(st, d->client, TDR_C_DEADLETTER);
	d->forget = tdr_map_new(4096);
	d->nrec = (size_t)cfg->partitions + 1;
	d->rec = calloc(d->nrec, sizeof(*d->rec));
	if (d->forget == NULL || d->rec == NULL) {
		tdr_drain_free(d);
		return tdr_err_set(err, TDR_ENOMEM, "out of memory");
	}
	pthread_mutex_init(&d->mu, NULL);
	d->rate_t0 = tdr_mono_ms();
	*ret = d;
	return 0;
}

static void value_free(void *p)
{
	if (p) {
		bson_value_destroy(p);
		free(p);
	}
}

void tdr_drain_free(tdr_drain *d)
{
	if (d == NULL)
		return;
	tdr_map_free(d->forget, value_free);
	mongoc_collection_destroy(d->events);
	mongoc_collection_destroy(d->claims);
	mongoc_collection_destroy(d->deltas);
	mongoc_collection_destroy(d->dead);
	tdr_store_push(d->st, d->client);
	if (d->trace_fd >= 0)
		close(d->trace_fd);
	pthread_mutex_destroy(&d->mu);
	free(d->rec);
	free(d);
}

void tdr_drain_reload(tdr_drain *d, const tdr_config *cfg)
{
	d->cfg.batch_size = cfg->batch_size;
	d->cfg.max_attempts = cfg->max_attempts;
	d->cfg.poll_max_ms = cfg->poll_max_ms;
	memcpy(d->cfg.allow_events, cfg->allow_events, sizeof(d->cfg.allow_events));
}

void tdr_drain_stats_get(tdr_drain *d, struct tdr_drain_stats *out)
{
	pthread_mutex_lock(&d->mu);
	*out = d->stats;
	pthread_mutex_unlock(&d->mu);
}

void drain_items_free(struct item *items, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		bson_destroy(items[i].doc);
		bson_value_destroy(&items[i].id);
	}
	free(items);
}

/* Take ownership of a copy of doc as the next item; -1 if its _id is unusable for a claim. */
int drain_item_add(struct item *items, size_t *n, const bson_t *doc, int32_t part, int64_t attempts)
{
	struct item *it = &items[*n];
	bson_iter_t iter;

	memset(it, 0, sizeof(*it));
	if (!bson_iter_init_find(&iter, doc, "_id"))
		return -1;
	it->doc = bson_copy(doc);
	if (it->doc == NULL)
		return -1;
	bson_value_copy(bson_iter_value(&iter), &it->id);
	it->part = part;
	it->attempts = attempts;
	(*n)++;
	return 0;
}

/* ------------------------------------------------------------ the cycle */

static void trace_batch(tdr_drain *d, struct item *items, size_t n, const struct group *groups)
{
	char *buf;
	size_t cap = n * 320 + 1, off = 0;

	if (d->trace_fd < 0 || n == 0)
		return;
	buf = malloc(cap);
	if (buf == NULL)
		return;
	for (size_t i = 0; i < n; i++) {
		char key[300];
		const struct group *g;
		int w;

		if (items[i].group < 0 || !items[i].valid)
			continue;
		g = &groups[items[i].group];
		if (tdr_id_key(&items[i].id, key, sizeof(key)) < 0)
			continue;
		w = snprintf(buf + off, cap - off, "%s\t%.*s\t%s\t%d\t%" PRId64 "\n", key, (int)items[i].ev.insert_id_len,
			     items[i].ev.insert_id, d->cfg.name, g->part, g->epoch);
		if (w < 0 || (size_t)w >= cap - off)
			break;
		off += (size_t)w;
	}
	/* One write per batch: O_APPEND keeps lines of concurrent replicas whole. */
	if (off && write(d->trace_fd, buf, off) < 0)
		log_warn("trace file: %s", strerror(errno));
	free(buf);
}

static void append_deadletter(mongoc_bulk_operation_t *bulk, const tdr_drain *d, const struct item *it,
			      const struct group *g)
{
	bson_t doc = BSON_INITIALIZER;

	bson_append_value(&doc, "_id", 3, &it->id);
	BSON_APPEND_UTF8(&doc, "reason", it->reason);
	BSON_APPEND_DATE_TIME(&doc, "at", tdr_wall_ms());
	BSON_APPEND_UTF8(&doc, "owner", d->cfg.name);
	BSON_APPEND_INT32(&doc, "part", g->part);
	BSON_APPEND_INT64(&doc, "attempts", it->attempts);
	if ((int64_t)it->doc->len + 4096 < d->st->max_bson) {
		BSON_APPEND_DOCUMENT(&doc, "doc", it->doc);
	} else {
		size_t len = 0;
		char *json = bson_as_canonical_extended_json(it->doc, &len);

		BSON_APPEND_INT64(&doc, "doc_bytes", it->doc->len);
		if (json) {
			bson_append_utf8(&doc, "doc_head", -1, json, (int)(len > DL_HEAD_BYTES ? DL_HEAD_BYTES : len));
			bson_free(json);
		}
	}
	mongoc_bulk_operation_insert(bulk, &doc);
	bson_destroy(&doc);
}

/* The scope of part we may claim in (not draining), or -1: O(1), once per event read (P up to 4096). */
static int find_scope(const tdr_coord_view *v, int32_t part)
{
	int s = tdr_coord_view_scope(v, part);

	return s >= 0 && !v->scopes[s].draining ? s : -1;
}

/*
 * Best effort: remove claim records of an abandoned batch, so they are not
 * orphans later.  A record this fails to remove is found by the next orphan
 * recovery of its scope, which is forced to run before the next claim
 * (read_orphans takes our own epoch's records too: between batches none of
 * them is in flight).
 */
static void unclaim(tdr_drain *d, struct group *groups, size_t ng)
{
	mongoc_bulk_operation_t *bulk;
	int any = 0;
	tdr_err err;

	/*
	 * Stopping (SIGTERM): the stop is bounded by store.timeout_ms, and this
	 * would be one more store call after the one that just failed; the
	 * records are left to orphan recovery, exactly as after a crash.
	 */
	if (__atomic_load_n(&d->stopping, __ATOMIC_RELAXED))
		return;
	bulk = tdr_bulk_new(d->claims, 0);
	for (size_t g = 0; g < ng; g++) {
		bson_t f = BSON_INITIALIZER;

		if (!groups[g].live)
			continue;
		BSON_APPEND_UTF8(&f, "_id", groups[g].id);
		BSON_APPEND_UTF8(&f, "owner", d->cfg.name);
		BSON_APPEND_INT64(&f, "epoch", groups[g].epoch);
		mongoc_bulk_operation_remove_one(bulk, &f);
		bson_destroy(&f);
		any = 1;
	}
	if (any && tdr_bulk_run(bulk, "unclaim", NULL, NULL, &err) < 0)
		for (size_t g = 0; g < ng; g++)
			if (groups[g].live)
				drain_forget_recovered(d, groups[g].part, groups[g].epoch);
	mongoc_bulk_operation_destroy(bulk);
}

/* Map key for any _id: its canonical key, or (unsupported types) its extended JSON. */
int drain_id_map_key(const bson_value_t *id, char *key, size_t keylen)
{
	int len = tdr_id_key(id, key, keylen);

	if (len < 0) {
		bson_t tmp = BSON_INITIALIZER;
		char *json;

		bson_append_value(&tmp, "v", 1, id);
		json = bson_as_canonical_extended_json(&tmp, NULL);
		bson_destroy(&tmp);
		if (json == NULL)
			return -1;
		snprintf(key, keylen, "\x01%s", json);
		bson_free(json);
		len = (int)strlen(key);
	}
	return len;
}

static int forget_add(tdr_drain *d, const bson_value_t *id)
{
	char key[512];
	int len = drain_id_map_key(id, key, sizeof(key));
	bson_value_t *copy;

	if (len < 0)
		return -1;
	if (tdr_map_get(d->forget, key, (size_t)len))
		return 0;
	copy = malloc(sizeof(*copy));
	if (copy == NULL)
		return -1;
	bson_value_copy(id, copy);
	if (tdr_map_put(d->forget, key, (size_t)len, copy) < 0) {
		value_free(copy);
		return -1;
	}
	return 0;
}

static int forgotten(tdr_drain *d, const bson_value_t *id)
{
	char key[512];
	int len = drain_id_map_key(id, key, sizeof(key));

	return len >= 0 && tdr_map_get(d->forget, key, (size_t)len) != NULL;
}

/*
 * Delete every acknowledged-but-unconfirmed event from the FIFO in ONE
 * statement.  MongoDB serves {_id: {$in}} from the _id index.  DocumentDB
 * serves it only from an index of its own kind whose first key is _id
 * ("tdrain_id", created on DocumentDB only: lib/store.c); its built-in _id
 * index serves single-_id writes, and a bulk of 1,000 of those costs 0.2-0.5 s
 * against 60 ms.  FerretDB 1.24 scans the collection for any keyed statement
 * (docs/DESIGN.md), so one scan per batch is the least it allows.
 */
struct forget_entry {
	const char *key;
	size_t klen;
	void *value;
};

/*
 * Delete the acknowledged-but-unconfirmed ids from the FIFO, FORGET_CHUNK per
 * statement: a statement's cost on a store that scans grows with its $in
 * list, and one that times out must not make the next attempt bigger.  The
 * chunks that succeeded leave the set; the first failure stops the flush.
 */
static int forget_flush(tdr_drain *d, tdr_err *err)
{
	size_t n = tdr_map_count(d->forget), pos = 0, done = 0, i = 0;
	struct forget_entry *e;
	tdr_map *left;
	int rc = 0;

	if (n == 0)
		return 0;
	if ((e = calloc(n, sizeof(*e))) == NULL)
		return tdr_err_set(err, TDR_ENOMEM, "out of memory");
	while (i < n && tdr_map_next(d->forget, &pos, &e[i].key, &e[i].klen, &e[i].value))
		i++;
	n = i;
	while (done < n) {
		size_t m = n - done < FORGET_CHUNK ? n - done : FORGET_CHUNK;
		bson_t f = BSON_INITIALIZER, in, arr;
		bson_error_t be;

		BSON_APPEND_DOCUMENT_BEGIN(&f, "_id", &in);
		BSON_APPEND_ARRAY_BEGIN(&in, "$in", &arr);
		for (size_t k = 0; k < m; k++) {
			char buf[16];
			const char *kp;

			bson_uint32_to_string((uint32_t)k, &kp, buf, sizeof(buf));
			bson_append_value(&arr, kp, -1, e[done + k].value);
		}
		bson_append_array_end(&in, &arr);
		bson_append_document_end(&f, &in);
		if (!mongoc_collection_delete_many(d->events, &f, NULL, NULL, &be)) {
			/* The effects are committed; only the FIFO copy lingers.  Retried before the next claim. */
			tdr_store_error(&be, "delete acknowledged events", err);
			rc = TDR_ETRANSIENT;
			pthread_mutex_lock(&d->mu);
			d->stats.store_errors++;
			pthread_mutex_unlock(&d->mu);
		}
		bson_destroy(&f);
		if (rc < 0)
			break;
		done += m;
	}
	if (done == n) {
		tdr_map_clear(d->forget, value_free);
	} else if (done > 0 && (left = tdr_map_new(n - done)) != NULL) {
		/* Keep the rest; on allocation failure keep everything (deleting twice is harmless). */
		size_t k;

		for (k = done; k < n; k++)
			if (tdr_map_put(left, e[k].key, e[k].klen, e[k].value) < 0)
				break;
		if (k == n) {
			for (k = 0; k < done; k++)
				value_free(e[k].value);
			tdr_map_free(d->forget, NULL);
			d->forget = left;
		} else {
			tdr_map_free(left, NULL);
		}
	}
	free(e);
	return rc;
}

/*
 * One batch between find and forget: the items read (step 1, by the caller)
 * and their groups, one per partition and so one claim record each.
 */
struct batch {
	struct item *items;
	size_t n;
	struct group *groups; /* room for one per scope of the view */
	size_t ng;
	const bson_t **valid_docs;
	size_t nvalid, ndead;
};

/* Group by partition; an item outside our scopes is simply not claimed. */
static void group_items(tdr_drain *d, const tdr_coord_view *v, struct batch *b)
{
	struct item *items = b->items;
	struct group *groups = b->groups;
	/* The group of each scope, so grouping is O(1) per item however many partitions the batch spans. */
	int32_t *group_of = malloc((v->nscopes ? v->nscopes : 1) * sizeof(*group_of));
	size_t ng = 0;

	for (size_t s = 0; group_of && s < v->nscopes; s++)
		group_of[s] = -1;
	for (size_t i = 0; i < b->n; i++) {
		int s = find_scope(v, items[i].part);
		size_t g;

		items[i].group = -1;
		if (s < 0)
			continue;
		if (group_of != NULL) {
			g = group_of[s] >= 0 ? (size_t)group_of[s] : ng;
		} else {
			/* Out of memory for the index: the linear search gives the same groups. */
			for (g = 0; g < ng; g++)
				if (groups[g].part == items[i].part)
					break;
		}
		if (g == ng) {
			if (group_of != NULL)
				group_of[s] = (int32_t)g;
			groups[g].part = v->scopes[s].part;
			groups[g].epoch = v->scopes[s].epoch;
			snprintf(groups[g].id, sizeof(groups[g].id), "%d:%" PRId64 ":%" PRId64, groups[g].part,
				 groups[g].epoch, ++d->seq);
			ng++;
		}
		items[i].group = (int)g;
		groups[g].nitems++;
	}
	free(group_of);
	b->ng = ng;
}

/* 2. claim: one record {part, epoch, owner, ids, att} per group we may still write. */
static int step_claim(tdr_drain *d, struct batch *b, tdr_err *err)
{
	struct item *items = b->items;
	struct group *groups = b->groups;
	size_t n = b->n, ng = b->ng;
	mongoc_bulk_operation_t *bulk = tdr_bulk_new(d->claims, 0);
	int rc;

	for (size_t g = 0; g < ng; g++) {
		bson_t doc = BSON_INITIALIZER, ids, att;
		uint32_t k = 0;

		if (!tdr_coord_may_write(d->coord, groups[g].part, groups[g].epoch))
			continue;
		BSON_APPEND_UTF8(&doc, "_id", groups[g].id);
		BSON_APPEND_INT32(&doc, "part", groups[g].part);
		BSON_APPEND_INT64(&doc, "epoch", groups[g].epoch);
		BSON_APPEND_UTF8(&doc, "owner", d->cfg.name);
		BSON_APPEND_DATE_TIME(&doc, "at", tdr_wall_ms());
		BSON_APPEND_ARRAY_BEGIN(&doc, "ids", &ids);
		for (size_t i = 0; i < n; i++)
			if (items[i].group == (int)g) {
				char key[16];
				const char *kp;

				bson_uint32_to_string(k++, &kp, key, sizeof(key));
				bson_append_value(&ids, kp, -1, &items[i].id);
			}
		bson_append_array_end(&doc, &ids);
		k = 0;
		BSON_APPEND_ARRAY_BEGIN(&doc, "att", &att);
		for (size_t i = 0; i < n; i++)
			if (items[i].group == (int)g) {
				char key[16];
				const char *kp;

				bson_uint32_to_string(k++, &kp, key, sizeof(key));
				bson_append_int64(&att, kp, -1, items[i].attempts);
			}
		bson_append_array_end(&doc, &att);
		mongoc_bulk_operation_insert(bulk, &doc);
		bson_destroy(&doc);
		groups[g].live = 1;
	}
	rc = tdr_bulk_run(bulk, "claim", NULL, NULL, err);
	mongoc_bulk_operation_destroy(bulk);
	if (rc < 0)
		return rc;
	/*
	 * We may have paused between the check above and the insert.  A claim record that
	 * landed after our lease ended is one the next holder never sees (it recovers orphans
	 * once, when it gains the scope): take it back and leave its events to that holder.
	 * A record that landed before this check passed landed before any takeover, so the
	 * next holder recovers it.
	 */
	for (size_t g = 0; g < ng; g++) {
		if (!groups[g].live || tdr_coord_may_write(d->coord, groups[g].part, groups[g].epoch))
			continue;
		unclaim(d, &groups[g], 1);
		groups[g].live = 0;
		log_warn("partition %d epoch %" PRId64 ": lease ended while claiming; claim %s taken back",
			 groups[g].part, groups[g].epoch, groups[g].id);
		pthread_mutex_lock(&d->mu);
		d->stats.fenced++;
		pthread_mutex_unlock(&d->mu);
	}
	return 0;
}

/* 3. consume: validate, then archive what is valid. */
static int step_consume(tdr_drain *d, struct batch *b, tdr_err *err)
{
	struct item *items = b->items;
	struct group *groups = b->groups;
	size_t n = b->n;
	int rc;

	b->valid_docs = calloc(n ? n : 1, sizeof(*b->valid_docs));
	if (b->valid_docs == NULL)
		return tdr_err_set(err, TDR_ENOMEM, "out of memory");
	for (size_t i = 0; i < n; i++) {
		struct item *it = &items[i];

		if (it->group < 0 || !groups[it->group].live)
			continue;
		if (it->attempts > d->cfg.max_attempts) {
			snprintf(it->reason, sizeof(it->reason), "attempts: claimed %" PRId64 " times (drain.max_attempts %lld)",
				 it->attempts - 1, (long long)d->cfg.max_attempts);
			it->valid = 0;
		} else {
			it->valid = tdr_event_validate(it->doc, &d->cfg, &it->ev, it->reason, sizeof(it->reason)) == 0;
		}
		if (it->valid) {
			b->valid_docs[b->nvalid++] = it->doc;
			groups[it->group].nvalid++;
		} else {
			b->ndead++;
		}
	}
	if (d->ar && b->nvalid &&
	    (rc = tdr_archive_append(d->ar, (const bson_t *const *)b->valid_docs, b->nvalid, err)) < 0)
		return rc;
	trace_batch(d, items, n, groups);
	return 0;
}

/* 4. commit: the delta is the unique-key fact the fold counts from; then the dead letters. */
static int step_commit(tdr_drain *d, struct batch *b, tdr_err *err)
{
	struct item *items = b->items;
	struct group *groups = b->groups;
	size_t n = b->n, ng = b->ng;
	mongoc_bulk_operation_t *bulk = tdr_bulk_new(d->deltas, 0);
	int rc = 0;

	for (size_t g = 0; g < ng; g++) {
		bson_t doc = BSON_INITIALIZER, ev;
		uint32_t k = 0;

		if (!groups[g].live || groups[g].nvalid == 0)
			continue;
		BSON_APPEND_UTF8(&doc, "_id", groups[g].id);
		BSON_APPEND_INT32(&doc, "part", groups[g].part);
		BSON_APPEND_INT64(&doc, "epoch", groups[g].epoch);
		BSON_APPEND_UTF8(&doc, "owner", d->cfg.name);
		BSON_APPEND_DATE_TIME(&doc, "at", tdr_wall_ms());
		BSON_APPEND_ARRAY_BEGIN(&doc, "ev", &ev);
		for (size_t i = 0; i < n; i++)
			if (items[i].group == (int)g && items[i].valid) {
				char key[16];
				const char *kp;

				bson_uint32_to_string(k++, &kp, key, sizeof(key));
				tdr_cevent_append(&ev, kp, &items[i].ev);
			}
		bson_append_array_end(&doc, &ev);
		tdr_bulk_insert_trusted(bulk, &doc);
		bson_destroy(&doc);
	}
	if (b->nvalid)
		rc = tdr_bulk_run(bulk, "commit delta", NULL, NULL, err);
	mongoc_bulk_operation_destroy(bulk);
	if (rc < 0 || b->ndead == 0)
		return rc;
	bulk = tdr_bulk_new(d->dead, 0);
	for (size_t i = 0; i < n; i++)
		if (items[i].group >= 0 && groups[items[i].group].live && !items[i].valid)
			append_deadletter(bulk, d, &items[i], &groups[items[i].group]);
	rc = tdr_bulk_run(bulk, "dead letter", NULL, NULL, err);
	mongoc_bulk_operation_destroy(bulk);
	if (rc < 0)
		return rc;
	for (size_t i = 0; i < n; i++)
		if (items[i].group >= 0 && groups[items[i].group].live && !items[i].valid) {
			char key[160];
			tdr_field f[2] = { { "TDRAIN_EVENT_ID", key }, { "TDRAIN_REASON", items[i].reason } };

			if (tdr_id_key(&items[i].id, key, sizeof(key)) < 0)
				snprintf(key, sizeof(key), "(unprintable)");
			tdr_log_event(LOG_WARNING, TDR_EV_DEADLETTER, f, 2, "event %s dead-lettered: %s", key,
				      items[i].reason);
		}
	return 0;
}

/*
 * 5. acknowledge: one fenced statement per claim record.  A record a newer
 * owner took over leaves every group not live: the batch's events are its now.
 */
static int step_acknowledge(tdr_drain *d, struct batch *b, tdr_err *err)
{
	struct group *groups = b->groups;
	size_t ng = b->ng, nlive = 0;
	mongoc_bulk_operation_t *bulk = tdr_bulk_new(d->claims, 0);
	int64_t removed;
	int rc;

	for (size_t g = 0; g < ng; g++) {
		bson_t f = BSON_INITIALIZER;

		if (!groups[g].live)
			continue;
		if (!tdr_coord_may_write(d->coord, groups[g].part, groups[g].epoch)) {
			groups[g].live = 0;
			continue;
		}
		BSON_APPEND_UTF8(&f, "_id", groups[g].id);
		BSON_APPEND_UTF8(&f, "owner", d->cfg.name);
		BSON_APPEND_INT64(&f, "epoch", groups[g].epoch);
		mongoc_bulk_operation_remove_one(bulk, &f);
		bson_destroy(&f);
		nlive++;
	}
	if (nlive) {
		bson_t reply;

		if ((rc = tdr_bulk_run(bulk, "acknowledge", NULL, &reply, err)) < 0) {
			mongoc_bulk_operation_destroy(bulk);
			return rc;
		}
		removed = tdr_bson_i64(&reply, "nRemoved", 0);
		bson_destroy(&reply);
		if (removed != (int64_t)nlive) {
			/* A newer owner took a claim record over: its events are its now. */
			log_warn("acknowledge: %" PRId64 " of %zu claim records were ours; leaving their events to the new owner",
				 removed, nlive);
			pthread_mutex_lock(&d->mu);
			d->stats.fenced++;
			pthread_mutex_unlock(&d->mu);
			for (size_t g = 0; g < ng; g++)
				groups[g].live = 0;
		}
	}
	mongoc_bulk_operation_destroy(bulk);
	return 0;
}

/*
 * 6. forget: delete the acknowledged events from the FIFO (see forget_flush).
 * Never fails the batch: what is not confirmed deleted is retried before the
 * next claim.  Returns how many events were acknowledged.
 */
static int64_t step_forget(tdr_drain *d, struct batch *b, tdr_err *err)
{
	struct item *items = b->items;
	struct group *groups = b->groups;
	int64_t acked = 0;
	int rc = 0;

	for (size_t i = 0; i < b->n; i++)
		if (items[i].group >= 0 && groups[items[i].group].live) {
			if (forget_add(d, &items[i].id) < 0) {
				rc = tdr_err_set(err, TDR_ENOMEM, "out of memory");
				break;
			}
			acked++;
		}
	if (rc == 0 && forget_flush(d, err) < 0)
		log_info("%s (%zu events; retried before the next claim)", err->msg, tdr_map_count(d->forget));
	return acked;
}

/*
 * Steps 2-6 for items already read.  Returns 0, TDR_ETRANSIENT or TDR_EFAIL;
 * *ret_acked counts events whose batch was acknowledged.  A failed step
 * abandons the batch: nothing acknowledged, claim records removed best-effort.
 */
int drain_process(tdr_drain *d, const tdr_coord_view *v, struct item *items, size_t n, int64_t *ret_acked, tdr_err *err)
{
	struct batch b = { .items = items, .n = n };
	int64_t t0, t1, t2, acked;
	int rc;

	*ret_acked = 0;
	b.groups = calloc(v->nscopes ? v->nscopes : 1, sizeof(*b.groups));
	t0 = tdr_mono_us();
	if (b.groups == NULL)
		return tdr_err_set(err, TDR_ENOMEM, "out of memory");
	group_items(d, v, &b);
	if ((rc = step_claim(d, &b, err)) < 0 || (rc = step_consume(d, &b, err)) < 0)
		goto abandon;
	t1 = tdr_mono_us();
	if ((rc = step_commit(d, &b, err)) < 0 || (rc = step_acknowledge(d, &b, err)) < 0)
		goto abandon;
	acked = step_forget(d, &b, err);
	t2 = tdr_mono_us();

	pthread_mutex_lock(&d->mu);
	d->stats.batches++;
	d->stats.acked += acked;
	d->stats.deadlettered += (int64_t)b.ndead;
	d->stats.last_batch = (int64_t)n;
	d->stats.consume_us = t1 - t0;
	d->stats.ack_us = t2 - t1;
	tdr_hist_add(&d->stats.h_consume, t1 - t0);
	tdr_hist_add(&d->stats.h_ack, t2 - t1);
	pthread_mutex_unlock(&d->mu);
	*ret_acked = acked;
	free(b.valid_docs);
	free(b.groups);
	return 0;

abandon:
	unclaim(d, b.groups, b.ng);
	pthread_mutex_lock(&d->mu);
	d->stats.store_errors++;
	pthread_mutex_unlock(&d->mu);
	free(b.valid_docs);
	free(b.groups);
	return rc;
}

/* ------------------------------------------------------------ step */

/* How far a partitioned claim reads past documents of other owners, in claim reads' worth. */
#define SCAN_BATCHES 50

/* 1. find: up to drain.batch_size events at the head of the FIFO in our scopes; then steps 2-6 (process). */
static int claim_and_process(tdr_drain *d, const tdr_coord_view *v, int *ret_full, int64_t *ret_n, tdr_err *err)
{
	bson_t filter = BSON_INITIALIZER, opts = BSON_INITIALIZER, in, arr, sort;
	int64_t limit = d->cfg.batch_size, bytes = 0, acked = 0, t0 = tdr_mono_us(), scanned = 0;
	size_t n = 0, nactive = 0;
	struct item *items;
	mongoc_cursor_t *cur;
	const bson_t *doc;
	bson_error_t be;
	int rc = 0, partitioned = d->cfg.mode == TDR_MODE_PARTITIONED;

	for (size_t i = 0; i < v->nscopes; i++)
		nactive += !v->scopes[i].draining;
	if (nactive == 0)
		return 0;
	/*
	 * Unconfirmed deletes first: claiming past them would dispatch them again,
	 * and a store that cannot delete them now gains nothing from more claims
	 * (each of which would have to read past them): back off instead.
	 */
	if (forget_flush(d, err) < 0)
		return err->code;
	items = calloc((size_t)limit * (partitioned ? 2 : 1), sizeof(*items));
	if (items == NULL)
		return tdr_err_set(err, TDR_ENOMEM, "out of memory");
	if (partitioned) {
		/*
		 * {$or: [{part: {$in: owned}}, {part: {$not: {$gte: 0, $lt: P}}}]}:
		 * our partitions, plus events no one has given a valid `part` yet,
		 * whose partition we compute here.  That way an event a producer wrote
		 * without `part` is claimable at once, with no write; the leader's
		 * triage (MongoDB only, where it is index-served) just narrows later reads.
		 */
		bson_t or, b0, b1, not, range;
		uint32_t k = 0;

		BSON_APPEND_ARRAY_BEGIN(&filter, "$or", &or);
		BSON_APPEND_DOCUMENT_BEGIN(&or, "0", &b0);
		BSON_APPEND_DOCUMENT_BEGIN(&b0, "part", &in);
		BSON_APPEND_ARRAY_BEGIN(&in, "$in", &arr);
		for (size_t i = 0; i < v->nscopes; i++)
			if (!v->scopes[i].draining) {
				char key[16];
				const char *kp;

				bson_uint32_to_string(k++, &kp, key, sizeof(key));
				bson_append_int32(&arr, kp, -1, v->scopes[i].part);
			}
		bson_append_array_end(&in, &arr);
		bson_append_document_end(&b0, &in);
		bson_append_document_end(&or, &b0);
		BSON_APPEND_DOCUMENT_BEGIN(&or, "1", &b1);
		BSON_APPEND_DOCUMENT_BEGIN(&b1, "part", &not);
		BSON_APPEND_DOCUMENT_BEGIN(&not, "$not", &range);
		BSON_APPEND_INT32(&range, "$gte", 0);
		BSON_APPEND_INT64(&range, "$lt", d->cfg.partitions);
		bson_append_document_end(&not, &range);
		bson_append_document_end(&b1, &not);
		bson_append_document_end(&or, &b1);
		bson_append_array_end(&filter, &or);
		/* Untriaged events of other partitions come back too: read further. */
		limit *= 2;
	}
	/*
	 * Partitioned: no limit, only the first reply's size.  Untriaged events
	 * of other owners come back too, and on FerretDB (no triage) the head of
	 * the FIFO can hold nothing but those of an owner that is stuck (t13:
	 * its archive disk full); reading on past them, up to SCAN_BATCHES
	 * batches' worth, lets every other replica take its own meanwhile.  In
	 * steady state the first reply already holds a batch.
	 */
	if (!partitioned)
		BSON_APPEND_INT64(&opts, "limit", limit + (int64_t)tdr_map_count(d->forget));
	/* The whole batch in the first reply: no getMore round trip. */
	BSON_APPEND_INT64(&opts, "batchSize", limit + (int64_t)tdr_map_count(d->forget));
	BSON_APPEND_INT64(&opts, "maxTimeMS", d->st->timeout_ms);
	/*
	 * FIFO order.  MongoDB serves {_id: 1} from an index.  FerretDB sorts
	 * anything but $natural by reading the whole match set, and DocumentDB
	 * does too (2 s per claim at 1M events, measured, against 10-25 ms
	 * unsorted), so there we rely on their insertion-order scan instead
	 * (docs/DESIGN.md, "Store access paths").
	 */
	if (!d->st->is_ferretdb && !d->st->is_documentdb) {
		BSON_APPEND_DOCUMENT_BEGIN(&opts, "sort", &sort);
		BSON_APPEND_INT32(&sort, "_id", 1);
		bson_append_document_end(&opts, &sort);
	}
	cur = mongoc_collection_find_with_opts(d->events, &filter, &opts, NULL);
	while (n < (size_t)d->cfg.batch_size && bytes < BATCH_BYTES_MAX &&
	       scanned < SCAN_BATCHES * limit + (int64_t)tdr_map_count(d->forget) && mongoc_cursor_next(cur, &doc)) {
		int32_t part = TDR_SCOPE_ALL;

		bson_iter_t idit;

		scanned++;
		if (bson_iter_init_find(&idit, doc, "_id") && forgotten(d, bson_iter_value(&idit)))
			continue;
		if (partitioned) {
			bson_iter_t pit;
			int64_t p = -1;

			if (bson_iter_init_find(&pit, doc, "part") &&
			    (BSON_ITER_HOLDS_INT32(&pit) || BSON_ITER_HOLDS_INT64(&pit) || BSON_ITER_HOLDS_DOUBLE(&pit)))
				p = bson_iter_as_int64(&pit);
			if (p < 0 || p >= d->cfg.partitions) {
				/* An _id that cannot be hashed goes to partition 0, whose owner dead-letters it. */
				p = bson_iter_init_find(&idit, doc, "_id")
					    ? tdr_event_partition(bson_iter_value(&idit), (uint32_t)d->cfg.partitions)
					    : 0;
				if (p < 0)
					p = 0;
			}
			if (find_scope(v, (int32_t)p) < 0)
				continue; /* someone else's */
			part = (int32_t)p;
		}
		if (n < (size_t)d->cfg.batch_size && drain_item_add(items, &n, doc, part, 1) == 0)
			bytes += doc->len;
	}
	if (mongoc_cursor_error(cur, &be)) {
		rc = tdr_store_error(&be, "claim", err);
		rc = TDR_ETRANSIENT;
		pthread_mutex_lock(&d->mu);
		d->stats.store_errors++;
		pthread_mutex_unlock(&d->mu);
	}
	mongoc_cursor_destroy(cur);
	bson_destroy(&filter);
	bson_destroy(&opts);
	pthread_mutex_lock(&d->mu);
	d->stats.claim_us = tdr_mono_us() - t0;
	if (n > 0)
		tdr_hist_add(&d->stats.h_claim, d->stats.claim_us);
	d->stats.claimed += (int64_t)n;
	pthread_mutex_unlock(&d->mu);
	if (rc == 0 && n > 0)
		rc = drain_process(d, v, items, n, &acked, err);
	*ret_full = rc == 0 && n == (size_t)d->cfg.batch_size;
	*ret_n = (int64_t)n;
	drain_items_free(items, n);
	return rc;
}

void tdr_drain_request_stop(tdr_drain *d)
{
	if (d)
		__atomic_store_n(&d->stopping, 1, __ATOMIC_RELAXED);
}

int tdr_drain_step(tdr_drain *d, int *ret_full, int64_t *ret_n, tdr_err *err)
{
	tdr_coord_view v;
	int rc = 0;

	*ret_full = 0;
	*ret_n = 0;
	if (tdr_coord_view_get(d->coord, &v) < 0)
		return tdr_err_set(err, TDR_ENOMEM, "out of memory");
	/* Between batches nothing is in flight: hand back what the coordinator wants back. */
	for (size_t i = 0; i < v.nscopes; i++)
		if (v.scopes[i].draining)
			tdr_coord_scope_idle(d->coord, v.scopes[i].part, v.scopes[i].epoch);
	/* Orphans of a newly gained scope come before any new work in it. */
	{
		unsigned char *has = NULL;
		size_t pending = 0;

		for (size_t i = 0; i < v.nscopes; i++)
			pending += !v.scopes[i].draining && !drain_was_recovered(d, v.scopes[i].part, v.scopes[i].epoch);
		/*
		 * Many at once (a replica gaining hundreds of partitions, and again every
		 * lease TTL): one read of which partitions have claim records at all,
		 * so scopes without any cost no statement each.
		 */
		if (pending > 1)
			has = drain_claimed_parts(d);
		for (size_t i = 0; i < v.nscopes && rc == 0 && !__atomic_load_n(&d->stopping, __ATOMIC_RELAXED); i++) {
			const tdr_scope *sc = &v.scopes[i];

			if (sc->draining || drain_was_recovered(d, sc->part, sc->epoch))
				continue;
			if (has && sc->part >= 0 && sc->part < d->cfg.partitions && !has[sc->part])
				drain_mark_recovered_empty(d, sc);
			else
				rc = drain_recover_scope(d, &v, sc, err);
		}
		free(has);
	}
	/*
	 * Stopping: no new batch.  The stop's budget (store.timeout_ms + 2 s)
	 * covers the statement in flight when SIGTERM came, not a claim after it
	 * that, with the store gone, waits out server selection once more.
	 */
	if (rc == 0 && !__atomic_load_n(&d->stopping, __ATOMIC_RELAXED))
		rc = claim_and_process(d, &v, ret_full, ret_n, err);
	if (rc == TDR_EFENCED) {
		pthread_mutex_lock(&d->mu);
		d->stats.fenced++;
		pthread_mutex_unlock(&d->mu);
		log_warn("%s", err->msg);
		rc = 0;
	}
	tdr_coord_view_free(&v);

	/* Smoothed acknowledged rate, for STATUS and metrics. */
	int64_t now = tdr_mono_ms();
	pthread_mutex_lock(&d->mu);
	if (now - d->rate_t0 >= 1000) {
		double inst = (double)(d->stats.acked - d->rate_acked0) * 1000.0 / (double)(now - d->rate_t0);

		d->stats.rate = d->stats.rate == 0 ? inst : 0.5 * d->stats.rate + 0.5 * inst;
		d->rate_t0 = now;
		d->rate_acked0 = d->stats.acked;
	}
	pthread_mutex_unlock(&d->mu);
	return rc;
}
