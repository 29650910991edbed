/*
 * projections.c - the independent projections of docs/EVENTS.md:
 * event_counters, device_metrics, device_event_counts, signin_days.
 * (identity_map and username_metrics depend on each other and on the
 * device counts, so the fold resolves them itself: fold_identity.c.)
 *
 * Each aggregates a round in a hash map and emits one update per key (the
 * fold turns updates into after-images and stamps _f itself).
 * Updates are recorded in the fold's redo record, where FerretDB refuses
 * '$'-prefixed keys, so they are written as {inc, min, max, set, addToSet}
 * (arrays for addToSet), which fold_image.c applies to the current documents.
 */
#include "config.h"

#include <stdlib.h>
#include <string.h>

#include "consumers/consumer.h"
#include "consumers/projections.h"
#include "lib/map.h"
#include "lib/store.h"

static void *map_create(void)
{
	return tdr_map_new(1024);
}

static void map_destroy(void *state)
{
	tdr_map_free(state, free);
}

void tdr_projection_record(bson_t *writes, uint32_t *idx, const char *coll, const char *key, size_t klen,
			   const bson_t *update)
{
	char buf[16];
	const char *kp;
	bson_t rec;

	bson_uint32_to_string((*idx)++, &kp, buf, sizeof(buf));
	bson_append_document_begin(writes, kp, -1, &rec);
	BSON_APPEND_UTF8(&rec, "c", coll);
	bson_append_utf8(&rec, "k", 1, key, (int)klen);
	BSON_APPEND_DOCUMENT(&rec, "u", update);
	bson_append_document_end(writes, &rec);
}

/* ---------------------------------------------------------- event_counters */

struct count {
	int64_t n;
};

static int counters_add(void *state, const tdr_cevent *ev, char day[11])
{
	char key[TDR_EVENT_NAME_MAX + 16];
	size_t klen = 0;
	struct count *c;

	memcpy(key, ev->event, ev->event_len);
	klen = ev->event_len;
	key[klen++] = '|';
	memcpy(key + klen, day, 10);
	klen += 10;
	c = tdr_map_get(state, key, klen);
	if (c == NULL) {
		c = calloc(1, sizeof(*c));
		if (c == NULL || tdr_map_put(state, key, klen, c) < 0) {
			free(c);
			return -1;
		}
	}
	c->n++;
	return 0;
}

static int counters_emit(void *state, bson_t *writes, uint32_t *idx, int64_t fold_seq)
{
	(void)fold_seq;
	size_t pos = 0, klen;
	const char *key;
	void *v;

	while (tdr_map_next(state, &pos, &key, &klen, &v)) {
		const struct count *c = v;
		const char *bar = memchr(key, '|', klen);
		bson_t u = BSON_INITIALIZER, inc, set;

		BSON_APPEND_DOCUMENT_BEGIN(&u, "inc", &inc);
		BSON_APPEND_INT64(&inc, "count", c->n);
		bson_append_document_end(&u, &inc);
		BSON_APPEND_DOCUMENT_BEGIN(&u, "set", &set);
		bson_append_utf8(&set, "event", -1, key, (int)(bar - key));
		bson_append_utf8(&set, "day", -1, bar + 1, (int)(klen - (size_t)(bar - key) - 1));
		bson_append_document_end(&u, &set);
		tdr_projection_record(writes, idx, TDR_C_COUNTERS, key, klen, &u);
		bson_destroy(&u);
	}
	return 0;
}

/* ---------------------------------------------------------- device_metrics */

struct device {
	int64_t n, tmin, tmax;
};

static int devices_add(void *state, const tdr_cevent *ev, char day[11])
{
	struct device *dv = tdr_map_get(state, ev->distinct_id, ev->distinct_id_len);

	(void)day;
	if (dv == NULL) {
		dv = calloc(1, sizeof(*dv));
		if (dv == NULL || tdr_map_put(state, ev->distinct_id, ev->distinct_id_len, dv) < 0) {
			free(dv);
			return -1;
		}
		dv->tmin = dv->tmax = ev->created_at_ms;
	}
	dv->n++;
	if (ev->created_at_ms < dv->tmin)
		dv->tmin = ev->created_at_ms;
	if (ev->created_at_ms > dv->tmax)
		dv->tmax = ev->created_at_ms;
	return 0;
}

static int devices_emit(void *state, bson_t *writes, uint32_t *idx, int64_t fold_seq)
{
	(void)fold_seq;
	size_t pos = 0, klen;
	const char *key;
	void *v;

	while (tdr_map_next(state, &pos, &key, &klen, &v)) {
		const struct device *dv = v;
		bson_t u = BSON_INITIALIZER, d;

		BSON_APPEND_DOCUMENT_BEGIN(&u, "inc", &d);
		BSON_APPEND_INT64(&d, "count", dv->n);
		bson_append_document_end(&u, &d);
		/* $min/$max are idempotent; $inc is guarded by _f on redo. */
		BSON_APPEND_DOCUMENT_BEGIN(&u, "min", &d);
		BSON_APPEND_DATE_TIME(&d, "first_seen", dv->tmin);
		bson_append_document_end(&u, &d);
		BSON_APPEND_DOCUMENT_BEGIN(&u, "max", &d);
		BSON_APPEND_DATE_TIME(&d, "last_seen", dv->tmax);
		bson_append_document_end(&u, &d);
		tdr_projection_record(writes, idx, TDR_C_DEVICES, key, klen, &u);
		bson_destroy(&u);
	}
	return 0;
}

/* ---------------------------------------------------------- device_event_counts */

static int devev_add(void *state, const tdr_cevent *ev, char day[11])
{
	char key[TDR_DISTINCT_ID_MAX + TDR_EVENT_NAME_MAX + 2];
	size_t klen;
	struct count *c;

	(void)day;
	memcpy(key, ev->distinct_id, ev->distinct_id_len);
	klen = ev->distinct_id_len;
	key[klen++] = '|';
	memcpy(key + klen, ev->event, ev->event_len);
	klen += ev->event_len;
	c = tdr_map_get(state, key, klen);
	if (c == NULL) {
		c = calloc(1, sizeof(*c));
		if (c == NULL || tdr_map_put(state, key, klen, c) < 0) {
			free(c);
			return -1;
		}
	}
	c->n++;
	return 0;
}

static int devev_emit(void *state, bson_t *writes, uint32_t *idx, int64_t fold_seq)
{
	(void)fold_seq;
	size_t pos = 0, klen;
	const char *key;
	void *v;

	while (tdr_map_next(state, &pos, &key, &klen, &v)) {
		const struct count *c = v;
		/* Event names cannot contain '|', so the last one separates. */
		const char *bar = key + klen;
		bson_t u = BSON_INITIALIZER, d;

		while (bar > key && bar[-1] != '|')
			bar--;
		BSON_APPEND_DOCUMENT_BEGIN(&u, "inc", &d);
		BSON_APPEND_INT64(&d, "count", c->n);
		bson_append_document_end(&u, &d);
		BSON_APPEND_DOCUMENT_BEGIN(&u, "set", &d);
		bson_append_utf8(&d, "distinct_id", -1, key, (int)(bar - 1 - key));
		bson_append_utf8(&d, "event", -1, bar, (int)(key + klen - bar));
		bson_append_document_end(&u, &d);
		tdr_projection_record(writes, idx, TDR_C_DEVICE_EVENTS, key, klen, &u);
		bson_destroy(&u);
	}
	return 0;
}

/* ---------------------------------------------------------- signin_days */

struct days {
	size_t n, cap;
	char (*d)[11];
};

static void days_free(void *p)
{
	struct days *ds = p;

	if (ds)
		free(ds->d);
	free(ds);
}

static void signins_destroy(void *state)
{
	tdr_map_free(state, days_free);
}

static int signins_add(void *state, const tdr_cevent *ev, char day[11])
{
	struct days *ds;

	if (ev->username == NULL || ev->event_len != 13 || memcmp(ev->event, "daily_sign_in", 13) != 0)
		return 0;
	ds = tdr_map_get(state, ev->username, ev->username_len);
	if (ds == NULL) {
		ds = calloc(1, sizeof(*ds));
		if (ds == NULL || tdr_map_put(state, ev->username, ev->username_len, ds) < 0) {
			free(ds);
			return -1;
		}
	}
	for (size_t i = 0; i < ds->n; i++)
		if (memcmp(ds->d[i], day, 10) == 0)
			return 0;
	if (ds->n == ds->cap) {
		size_t ncap = ds->cap ? ds->cap * 2 : 4;
		char(*nd)[11] = realloc(ds->d, ncap * sizeof(*nd));

		if (nd == NULL)
			return -1;
		ds->d = nd;
		ds->cap = ncap;
	}
	memcpy(ds->d[ds->n++], day, 11);
	return 0;
}

static int signins_emit(void *state, bson_t *writes, uint32_t *idx, int64_t fold_seq)
{
	(void)fold_seq;
	size_t pos = 0, klen;
	const char *key;
	void *v;

	while (tdr_map_next(state, &pos, &key, &klen, &v)) {
		const struct days *ds = v;
		bson_t u = BSON_INITIALIZER, add, arr;

		BSON_APPEND_DOCUMENT_BEGIN(&u, "addToSet", &add);
		BSON_APPEND_ARRAY_BEGIN(&add, "days", &arr);
		for (size_t i = 0; i < ds->n; i++) {
			char buf[16];
			const char *kp;

			bson_uint32_to_string((uint32_t)i, &kp, buf, sizeof(buf));
			bson_append_utf8(&arr, kp, -1, ds->d[i], 10);
		}
		bson_append_array_end(&add, &arr);
		bson_append_document_end(&u, &add);
		tdr_projection_record(writes, idx, TDR_C_SIGNINS, key, klen, &u);
		bson_destroy(&u);
	}
	return 0;
}

const tdr_projection tdr_projections[] = {
	{ "event_counters", TDR_C_COUNTERS, map_create, map_destroy, counters_add, counters_emit },
	{ "device_metrics", TDR_C_DEVICES, map_create, map_destroy, devices_add, devices_emit },
	{ "device_event_counts", TDR_C_DEVICE_EVENTS, map_create, map_destroy, devev_add, devev_emit },
	{ "signin_days", TDR_C_SIGNINS, map_create, signins_destroy, signins_add, signins_emit },
	{ NULL, NULL, NULL, NULL, NULL, NULL },
};
