/*
 * lease_mongo.c - leases as documents in the store (tdrain_leases).
 *
 * One document per (name, epoch), _id "<name>#<epoch>".  Taking a lease is
 * inserting the next epoch's document: the unique _id makes exactly one
 * contender win, on MongoDB and on FerretDB alike (FerretDB's updates are not
 * atomic, its unique inserts are).  Only the holder ever updates its document
 * (renewals bump "seq"), so each document has one writer.
 *
 * Expiry is judged by the observer, Kubernetes-style: we remember when we
 * last saw a lease's (epoch, seq, released) change, on our own monotonic
 * clock, and call it expired once it has not changed for its ttl.  A newly
 * seen lease gets a full ttl.  The holder stops writing renew_deadline after
 * it SENT its last successful renewal, and we saw that renewal no earlier
 * than it was sent, so the holder always stops first (docs/DESIGN.md).
 */
#include "config.h"

#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <unistd.h>

#include "coord/lease.h"
#include "lib/bsonx.h"
#include "lib/clock.h"
#include "lib/log.h"
#include "lib/store.h"

#define MAX_OBS 8192

struct observation {
	char name[TDR_LEASE_NAME_MAX];
	int64_t epoch, seq;
	int released;
	int64_t changed_ms; /* monotonic time we last saw it change */
};

struct mongo_backend {
	tdr_lease_backend base;
	tdr_store *st;
	char inst[20]; /* this process's incarnation: tells our restarts from impostors */
	pthread_mutex_t lock;
	struct observation *obs;
	size_t nobs;
};

/* Latest-epoch document of one name, as read. */
struct lease_doc {
	char name[TDR_LEASE_NAME_MAX];
	char holder[TDR_HOLDER_MAX];
	char inst[20];
	int64_t epoch, seq, ttl_ms;
	int released;
};

static void lease_id(char *buf, size_t len, const char *name, int64_t epoch)
{
	/* Zero-padded so _id order is epoch order within a name. */
	snprintf(buf, len, "%s#%020" PRId64, name, epoch);
}

/* Record what we saw; returns how long (ms) it has been unchanged. */
static int64_t observe(struct mongo_backend *mb, const struct lease_doc *d, int64_t now)
{
	struct observation *o = NULL;

	for (size_t i = 0; i < mb->nobs; i++)
		if (strcmp(mb->obs[i].name, d->name) == 0) {
			o = &mb->obs[i];
			break;
		}
	if (o == NULL) {
		if (mb->nobs == MAX_OBS) /* bounded: forget the oldest observation */
			memmove(&mb->obs[0], &mb->obs[1], (MAX_OBS - 1) * sizeof(*o)), mb->nobs--;
		o = &mb->obs[mb->nobs++];
		snprintf(o->name, sizeof(o->name), "%s", d->name);
		o->epoch = d->epoch;
		o->seq = d->seq;
		o->released = d->released;
		o->changed_ms = now;
		return 0;
	}
	if (o->epoch != d->epoch || o->seq != d->seq || o->released != d->released) {
		o->epoch = d->epoch;
		o->seq = d->seq;
		o->released = d->released;
		o->changed_ms = now;
	}
	return now - o->changed_ms;
}

static void parse_doc(const bson_t *doc, struct lease_doc *d)
{
	const char *s;
	uint32_t len;

	memset(d, 0, sizeof(*d));
	if ((s = tdr_bson_str(doc, "name", &len)))
		snprintf(d->name, sizeof(d->name), "%.*s", (int)len, s);
	if ((s = tdr_bson_str(doc, "holder", &len)))
		snprintf(d->holder, sizeof(d->holder), "%.*s", (int)len, s);
	if ((s = tdr_bson_str(doc, "inst", &len)))
		snprintf(d->inst, sizeof(d->inst), "%.*s", (int)len, s);
	d->epoch = tdr_bson_i64(doc, "epoch", 0);
	d->seq = tdr_bson_i64(doc, "seq", 0);
	d->ttl_ms = tdr_bson_i64(doc, "ttl_ms", 15000);
	d->released = tdr_bson_bool(doc, "released", 0);
}

/*
 * Read the latest-epoch document of every name matching filter.  The leases
 * collection holds a few documents per name (old epochs are deleted by the
 * next holder), so reading it whole is cheap on every store.
 */
static int read_latest(struct mongo_backend *mb, const bson_t *filter, struct lease_doc **ret, size_t *ret_n,
		       tdr_err *err)
{
	mongoc_client_t *c = tdr_store_pop(mb->st);
	mongoc_collection_t *coll = tdr_store_coll(mb->st, c, TDR_C_LEASES);
	bson_t opts;
	const bson_t *doc;
	bson_error_t be;
	mongoc_cursor_t *cur;
	struct lease_doc *v = NULL;
	size_t n = 0, cap = 0;
	int rc = 0;

	tdr_store_read_opts(mb->st, &opts);
	cur = mongoc_collection_find_with_opts(coll, filter, &opts, NULL);
	while (mongoc_cursor_next(cur, &doc)) {
		struct lease_doc d;
		size_t i;

		parse_doc(doc, &d);
		if (d.name[0] == '\0')
			continue;
		for (i = 0; i < n; i++)
			if (strcmp(v[i].name, d.name) == 0)
				break;
		if (i < n) {
			if (d.epoch > v[i].epoch)
				v[i] = d;
			continue;
		}
		if (n == cap) {
			size_t ncap = cap ? cap * 2 : 16;
			struct lease_doc *nv = realloc(v, ncap * sizeof(*nv));

			if (nv == NULL) {
				rc = tdr_err_set(err, TDR_ENOMEM, "out of memory");
				break;
			}
			v = nv;
			cap = ncap;
		}
		v[n++] = d;
	}
	if (rc == 0 && mongoc_cursor_error(cur, &be)) {
		rc = tdr_store_error(&be, "read leases", err);
		if (rc != TDR_ENOMEM)
			rc = TDR_ETRANSIENT;
	}
	mongoc_cursor_destroy(cur);
	bson_destroy(&opts);
	mongoc_collection_destroy(coll);
	tdr_store_push(mb->st, c);
	if (rc < 0) {
		free(v);
		return rc;
	}
	*ret = v;
	*ret_n = n;
	return 0;
}

static int delete_older(struct mongo_backend *mb, const char *name, int64_t epoch)
{
	mongoc_client_t *c = tdr_store_pop(mb->st);
	mongoc_collection_t *coll = tdr_store_coll(mb->st, c, TDR_C_LEASES);
	bson_t filter = BSON_INITIALIZER, lt;
	bson_error_t be;
	int ok;

	/* Best effort tidying: a failure only leaves history behind. */
	BSON_APPEND_UTF8(&filter, "name", name);
	BSON_APPEND_DOCUMENT_BEGIN(&filter, "epoch", &lt);
	BSON_APPEND_INT64(&lt, "$lt", epoch);
	bson_append_document_end(&filter, &lt);
	ok = mongoc_collection_delete_many(coll, &filter, NULL, NULL, &be);
	bson_destroy(&filter);
	mongoc_collection_destroy(coll);
	tdr_store_push(mb->st, c);
	return ok ? 0 : -1;
}

static int m_acquire(tdr_lease_backend *be, const char *name, int64_t ttl_ms, int64_t *ret_epoch, tdr_err *err)
{
	struct mongo_backend *mb = (struct mongo_backend *)be;
	struct lease_doc *docs = NULL;
	size_t n = 0;
	bson_t filter = BSON_INITIALIZER;
	int64_t next = 1, now;
	int rc;

	BSON_APPEND_UTF8(&filter, "name", name);
	rc = read_latest(mb, &filter, &docs, &n, err);
	bson_destroy(&filter);
	if (rc < 0)
		return rc;
	now = tdr_mono_ms();
	if (n > 0) {
		struct lease_doc *d = &docs[0];
		int64_t unchanged;
		int ours_before;

		pthread_mutex_lock(&mb->lock);
		unchanged = observe(mb, d, now);
		pthread_mutex_unlock(&mb->lock);
		/* Our own previous incarnation (same replica name, another process) is dead: take over now. */
		ours_before = strcmp(d->holder, be->holder) == 0 && strcmp(d->inst, mb->inst) != 0;
		if (!d->released && !ours_before && unchanged < d->ttl_ms) {
			tdr_err_set(err, TDR_EDUP, "lease %s held by %s at epoch %" PRId64, name, d->holder, d->epoch);
			free(docs);
			return TDR_EDUP;
		}
		next = d->epoch + 1;
	}
	free(docs);

	mongoc_client_t *c = tdr_store_pop(mb->st);
	mongoc_collection_t *coll = tdr_store_coll(mb->st, c, TDR_C_LEASES);
	bson_t doc = BSON_INITIALIZER;
	bson_error_t bee;
	char id[TDR_LEASE_NAME_MAX + 32];

	lease_id(id, sizeof(id), name, next);
	BSON_APPEND_UTF8(&doc, "_id", id);
	BSON_APPEND_UTF8(&doc, "name", name);
	BSON_APPEND_INT64(&doc, "epoch", next);
	BSON_APPEND_UTF8(&doc, "holder", be->holder);
	BSON_APPEND_UTF8(&doc, "inst", mb->inst);
	BSON_APPEND_INT64(&doc, "seq", 0);
	BSON_APPEND_INT64(&doc, "ttl_ms", ttl_ms);
	BSON_APPEND_BOOL(&doc, "released", false);
	BSON_APPEND_DATE_TIME(&doc, "at", tdr_wall_ms());
	if (!mongoc_collection_insert_one(coll, &doc, NULL, NULL, &bee)) {
		rc = tdr_store_error(&bee, "lease insert", err);
		if (rc == TDR_EDUP)
			tdr_err_set(err, TDR_EDUP, "lease %s: another replica won epoch %" PRId64, name, next);
		else
			rc = TDR_ETRANSIENT;
	}
	bson_destroy(&doc);
	mongoc_collection_destroy(coll);
	tdr_store_push(mb->st, c);
	if (rc < 0)
		return rc;
	(void)delete_older(mb, name, next);
	*ret_epoch = next;
	return 0;
}

/* Update our own document of (name, epoch); TDR_EFENCED if it is not ours any more. */
static int update_own(struct mongo_backend *mb, const char *name, int64_t epoch, const bson_t *update,
		      const char *what, tdr_err *err)
{
	mongoc_client_t *c = tdr_store_pop(mb->st);
	mongoc_collection_t *coll = tdr_store_coll(mb->st, c, TDR_C_LEASES);
	bson_t filter = BSON_INITIALIZER, reply;
	bson_error_t be;
	char id[TDR_LEASE_NAME_MAX + 32];
	int rc = 0;

	lease_id(id, sizeof(id), name, epoch);
	/* Holder and incarnation in the filter: fencing where the store is atomic. */
	BSON_APPEND_UTF8(&filter, "_id", id);
	BSON_APPEND_UTF8(&filter, "holder", mb->base.holder);
	BSON_APPEND_UTF8(&filter, "inst", mb->inst);
	BSON_APPEND_BOOL(&filter, "released", false);
	if (!mongoc_collection_update_one(coll, &filter, update, NULL, &reply, &be)) {
		rc = tdr_store_error(&be, what, err);
		rc = TDR_ETRANSIENT;
	} else if (tdr_bson_i64(&reply, "matchedCount", 0) == 0) {
		rc = tdr_err_set(err, TDR_EFENCED, "%s: lease %s epoch %" PRId64 " is no longer ours", what, name,
				 epoch);
	}
	bson_destroy(&reply);
	bson_destroy(&filter);
	mongoc_collection_destroy(coll);
	tdr_store_push(mb->st, c);
	return rc;
}

static int m_renew(tdr_lease_backend *be, const char *name, int64_t epoch, int64_t ttl_ms, tdr_err *err)
{
	struct mongo_backend *mb = (struct mongo_backend *)be;
	struct lease_doc *docs = NULL;
	size_t n = 0;
	bson_t filter = BSON_INITIALIZER, update = BSON_INITIALIZER, inc, set;
	int rc;

	/* A newer epoch means someone judged us expired: we are deposed even if our document remains. */
	BSON_APPEND_UTF8(&filter, "name", name);
	rc = read_latest(mb, &filter, &docs, &n, err);
	bson_destroy(&filter);
	if (rc < 0)
		return rc;
	if (n == 0 || docs[0].epoch != epoch) {
		int64_t latest = n ? docs[0].epoch : 0;

		free(docs);
		return tdr_err_set(err, TDR_EFENCED, "lease %s: epoch %" PRId64 " superseded (latest %" PRId64 ")",
				   name, epoch, latest);
	}
	free(docs);
	BSON_APPEND_DOCUMENT_BEGIN(&update, "$inc", &inc);
	BSON_APPEND_INT64(&inc, "seq", 1);
	bson_append_document_end(&update, &inc);
	BSON_APPEND_DOCUMENT_BEGIN(&update, "$set", &set);
	BSON_APPEND_INT64(&set, "ttl_ms", ttl_ms);
	BSON_APPEND_DATE_TIME(&set, "at", tdr_wall_ms());
	bson_append_document_end(&update, &set);
	rc = update_own(mb, name, epoch, &update, "lease renew", err);
	bson_destroy(&update);
	return rc;
}

static int m_release(tdr_lease_backend *be, const char *name, int64_t epoch, tdr_err *err)
{
	struct mongo_backend *mb = (struct mongo_backend *)be;
	bson_t update = BSON_INITIALIZER, set;
	int rc;

	BSON_APPEND_DOCUMENT_BEGIN(&update, "$set", &set);
	BSON_APPEND_BOOL(&set, "released", true);
	BSON_APPEND_DATE_TIME(&set, "at", tdr_wall_ms());
	bson_append_document_end(&update, &set);
	rc = update_own(mb, name, epoch, &update, "lease release", err);
	bson_destroy(&update);
	return rc;
}

static int m_list(tdr_lease_backend *be, const char *prefix, tdr_lease_info **ret, size_t *ret_n, tdr_err *err)
{
	struct mongo_backend *mb = (struct mongo_backend *)be;
	struct lease_doc *docs = NULL;
	tdr_lease_info *out;
	size_t n = 0, k = 0, plen = strlen(prefix);
	bson_t filter = BSON_INITIALIZER;
	int64_t now;
	int rc;

	rc = read_latest(mb, &filter, &docs, &n, err);
	bson_destroy(&filter);
	if (rc < 0)
		return rc;
	out = calloc(n ? n : 1, sizeof(*out));
	if (out == NULL) {
		free(docs);
		return tdr_err_set(err, TDR_ENOMEM, "out of memory");
	}
	now = tdr_mono_ms();
	pthread_mutex_lock(&mb->lock);
	for (size_t i = 0; i < n; i++) {
		int64_t unchanged = observe(mb, &docs[i], now);

		if (strncmp(docs[i].name, prefix, plen) != 0)
			continue;
		snprintf(out[k].name, sizeof(out[k].name), "%s", docs[i].name);
		snprintf(out[k].holder, sizeof(out[k].holder), "%s", docs[i].holder);
		out[k].epoch = docs[i].epoch;
		out[k].ttl_ms = docs[i].ttl_ms;
		out[k].released = docs[i].released;
		out[k].expires_in_ms = docs[i].released ? 0 : docs[i].ttl_ms - unchanged;
		k++;
	}
	pthread_mutex_unlock(&mb->lock);
	free(docs);
	*ret = out;
	*ret_n = k;
	return 0;
}

static void m_destroy(tdr_lease_backend *be)
{
	struct mongo_backend *mb = (struct mongo_backend *)be;

	pthread_mutex_destroy(&mb->lock);
	free(mb->obs);
	free(mb);
}

static const struct tdr_lease_ops mongo_ops = {
	.acquire = m_acquire,
	.renew = m_renew,
	.release = m_release,
	.list = m_list,
	.destroy = m_destroy,
};

int tdr_lease_mongo_new(tdr_lease_backend **ret, tdr_store *store, const char *holder, tdr_err *err)
{
	struct mongo_backend *mb = calloc(1, sizeof(*mb));
	uint64_t r = 0;

	if (mb == NULL)
		return tdr_err_set(err, TDR_ENOMEM, "out of memory");
	mb->obs = calloc(MAX_OBS, sizeof(*mb->obs));
	if (mb->obs == NULL) {
		free(mb);
		return tdr_err_set(err, TDR_ENOMEM, "out of memory");
	}
	if (getrandom(&r, sizeof(r), 0) != sizeof(r))
		r = (uint64_t)tdr_wall_ms() ^ ((uint64_t)getpid() << 32) ^ (uint64_t)tdr_mono_us();
	snprintf(mb->inst, sizeof(mb->inst), "%016" PRIx64, r);
	mb->base.ops = &mongo_ops;
	snprintf(mb->base.holder, sizeof(mb->base.holder), "%s", holder);
	mb->st = store;
	pthread_mutex_init(&mb->lock, NULL);
	*ret = &mb->base;
	return 0;
}
