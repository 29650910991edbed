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
 *
 * Attached leases (acquire_many, partitioned mode) are documents of the same
 * shape carrying "sess" (the member lease they live by) and "sess_epoch".
 * They are never renewed: one is live exactly while that member lease is
 * live at that epoch, as judged above, so one renewal of the member document
 * keeps any number of them.  Bulk acquisition is one unordered insert_many
 * (each document wins or loses its own unique _id) and one read-back; bulk
 * release one unordered insert_many of the next epochs, released.  Older
 * epochs are deleted later, a bounded number per observation.
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
	/*
	 * Superseded documents whose name's newest document is ours (we acquired
	 * or released it): nobody writes them any more, so we delete them, a
	 * bounded number per observation (TIDY_MAX).  Filled by read_latest.
	 */
	char (*tidy)[TDR_LEASE_NAME_MAX + 32];
	size_t ntidy;
};

/* Per observation: a delete of a few ids is cheap on FerretDB too, whose $in delete scans the collection. */
#define TIDY_MAX 128

/* Latest-epoch document of one name, as read. */
struct lease_doc {
	char name[TDR_LEASE_NAME_MAX];
	char holder[TDR_HOLDER_MAX];
	char inst[20];
	char sess[TDR_LEASE_NAME_MAX];
	int64_t epoch, seq, ttl_ms, sess_epoch;
	int released;
};

static void lease_id(char *buf, size_t len, const char *name, int64_t epoch)
{
	/* Zero-padded so _id order is epoch order within a name. */
	snprintf(buf, len, "%s#%020" PRId64, name, epoch);
}

/*
 * The one shape of a lease document, written by every acquisition and
 * release: (name, epoch) under our holder and instance, attached to a
 * session (member lease) when session is not NULL.  A release is the next
 * epoch, released, with ttl 0.
 */
static void append_lease_doc(bson_t *doc, const struct mongo_backend *mb, const char *name, int64_t epoch,
			     int64_t ttl_ms, int released, const char *session, int64_t session_epoch, int64_t at_ms)
{
	char id[TDR_LEASE_NAME_MAX + 32];

	lease_id(id, sizeof(id), name, epoch);
	BSON_APPEND_UTF8(doc, "_id", id);
	BSON_APPEND_UTF8(doc, "name", name);
	BSON_APPEND_INT64(doc, "epoch", epoch);
	BSON_APPEND_UTF8(doc, "holder", mb->base.holder);
	BSON_APPEND_UTF8(doc, "inst", mb->inst);
	BSON_APPEND_INT64(doc, "seq", 0);
	BSON_APPEND_INT64(doc, "ttl_ms", ttl_ms);
	BSON_APPEND_BOOL(doc, "released", released ? true : false);
	if (session != NULL) {
		BSON_APPEND_UTF8(doc, "sess", session);
		BSON_APPEND_INT64(doc, "sess_epoch", session_epoch);
	}
	BSON_APPEND_DATE_TIME(doc, "at", at_ms);
}

/*
 * Partition leases live in their own collection (tdrain_parts): the
 * coordinator reads tdrain_leases (sessions and the leader, a few documents)
 * every tick, and the P partition documents only when something may have
 * changed there (docs/DESIGN.md, "Statements per retry period").
 */
static const char *coll_of(const char *name)
{
	return strncmp(name, "part/", 5) == 0 ? TDR_C_PARTS : TDR_C_LEASES;
}

/*
 * Record what a read showed; returns how long (ms) it has been unchanged.
 * The read was sent at sent_ms and answered at got_ms: what it shows is the
 * document at some instant between the two.  A change is dated got_ms (no
 * earlier than the renewal that made it was sent), and "unchanged" is
 * measured up to sent_ms (a renewal landing after the read's snapshot can
 * have been sent any time before got_ms).  Using the answer's time for both
 * would count a slow read's own duration as silence of the holder: under
 * load (reads of thousands of partition leases taking seconds, t18 with 8
 * replicas) observers judged live sessions expired and took their leases
 * while the holders still renewed.  With sent_ms, "expired" means: a read
 * sent ttl after the last change was first seen still showed no newer
 * change, so any later renewal was answered more than ttl after the one
 * seen was sent, which its holder does not count (coord.c, heartbeat_once).
 */
static int64_t observe(struct mongo_backend *mb, const struct lease_doc *d, int64_t sent_ms, int64_t got_ms)
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
		o->changed_ms = got_ms;
		return 0;
	}
	if (o->epoch != d->epoch || o->seq != d->seq || o->released != d->released) {
		o->epoch = d->epoch;
		o->seq = d->seq;
		o->released = d->released;
		o->changed_ms = got_ms;
	}
	return sent_ms > o->changed_ms ? sent_ms - o->changed_ms : 0;
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
	if ((s = tdr_bson_str(doc, "sess", &len)))
		snprintf(d->sess, sizeof(d->sess), "%.*s", (int)len, s);
	d->sess_epoch = tdr_bson_i64(doc, "sess_epoch", 0);
}

static int cmp_doc(const void *a, const void *b)
{
	const struct lease_doc *x = a, *y = b;
	int c = strcmp(x->name, y->name);

	if (c)
		return c;
	return x->epoch < y->epoch ? -1 : x->epoch > y->epoch;
}

/*
 * Read the latest-epoch document of every name matching filter (sorted by name).  The leases
 * collection holds a few documents per name (old epochs are deleted by the
 * next holder), so reading it whole is cheap on every store.
 */
static int read_latest(struct mongo_backend *mb, const char *cname, const bson_t *filter, struct lease_doc **ret,
		       size_t *ret_n, tdr_err *err)
{
	mongoc_client_t *c = tdr_store_pop(mb->st);
	mongoc_collection_t *coll = tdr_store_coll(mb->st, c, cname);
	bson_t opts;
	const bson_t *doc;
	bson_error_t be;
	mongoc_cursor_t *cur;
	struct lease_doc *v = NULL;
	size_t n = 0, cap = 0;
	int rc = 0;

	tdr_store_read_opts(mb->st, &opts);
	/* Every lease in the first reply (a few hundred KiB at P = 4096): one round trip, no getMore. */
	BSON_APPEND_INT64(&opts, "batchSize", 1000000);
	tdr_lease_count(&mb->base, 1);
	cur = mongoc_collection_find_with_opts(coll, filter, &opts, NULL);
	while (mongoc_cursor_next(cur, &doc)) {
		struct lease_doc d;

		parse_doc(doc, &d);
		if (d.name[0] == '\0')
			continue;
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
	/* Newest epoch of each name: sort by (name, epoch), keep the last of each run (O(N log N) at any P). */
	if (n > 1) {
		size_t k = 0;

		qsort(v, n, sizeof(*v), cmp_doc);
		pthread_mutex_lock(&mb->lock);
		for (size_t i = 0; i < n; i++) {
			if (i + 1 < n && strcmp(v[i].name, v[i + 1].name) == 0) {
				size_t j = i + 1;

				while (j + 1 < n && strcmp(v[j].name, v[j + 1].name) == 0)
					j++;
				/* v[j] is the newest of this name: if we wrote it, its predecessors are ours to tidy. */
				if (mb->tidy && mb->ntidy < TIDY_MAX && strcmp(v[j].holder, mb->base.holder) == 0 &&
				    strcmp(v[j].inst, mb->inst) == 0)
					lease_id(mb->tidy[mb->ntidy++], sizeof(mb->tidy[0]), v[i].name, v[i].epoch);
				continue;
			}
			v[k++] = v[i];
		}
		pthread_mutex_unlock(&mb->lock);
		n = k;
	}
	*ret = v;
	*ret_n = n;
	return 0;
}

static int delete_older(struct mongo_backend *mb, const char *name, int64_t epoch)
{
	mongoc_client_t *c = tdr_store_pop(mb->st);
	mongoc_collection_t *coll = tdr_store_coll(mb->st, c, coll_of(name));
	bson_t filter = BSON_INITIALIZER, lt;
	bson_error_t be;
	int ok;

	/* Best effort tidying: a failure only leaves history behind. */
	BSON_APPEND_UTF8(&filter, "name", name);
	BSON_APPEND_DOCUMENT_BEGIN(&filter, "epoch", &lt);
	BSON_APPEND_INT64(&lt, "$lt", epoch);
	bson_append_document_end(&filter, &lt);
	tdr_lease_count(&mb->base, 1);
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
	int64_t next = 1, now, sent;
	int rc;

	BSON_APPEND_UTF8(&filter, "name", name);
	sent = tdr_mono_ms();
	rc = read_latest(mb, coll_of(name), &filter, &docs, &n, err);
	bson_destroy(&filter);
	if (rc < 0)
		return rc;
	now = tdr_mono_ms();
	if (n > 0) {
		struct lease_doc *d = &docs[0];
		int64_t unchanged;
		int ours_before;

		pthread_mutex_lock(&mb->lock);
		unchanged = observe(mb, d, sent, now);
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
	mongoc_collection_t *coll = tdr_store_coll(mb->st, c, coll_of(name));
	bson_t doc = BSON_INITIALIZER;
	bson_error_t bee;

	append_lease_doc(&doc, mb, name, next, ttl_ms, 0, NULL, 0, tdr_wall_ms());
	tdr_lease_count(be, 1);
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
	mongoc_collection_t *coll = tdr_store_coll(mb->st, c, coll_of(name));
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
	tdr_lease_count(&mb->base, 1);
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

/*
 * One statement: bump seq in our own document.  A deposed holder's document
 * is deleted by the next holder (matched 0: TDR_EFENCED); a newer epoch whose
 * tidying failed is caught by the coordinator's read of every lease each tick
 * ("superseded"), and in any case the holder stops at its deadline.
 */
static int m_renew(tdr_lease_backend *be, const char *name, int64_t epoch, int64_t ttl_ms, tdr_err *err)
{
	struct mongo_backend *mb = (struct mongo_backend *)be;
	bson_t update = BSON_INITIALIZER, inc, set;
	int rc;

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

/* docs as read_latest returns them: sorted by name, one per name. */
static const struct lease_doc *find_doc(const struct lease_doc *docs, size_t n, const char *name)
{
	size_t lo = 0, hi = n;

	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;
		int c = strcmp(docs[mid].name, name);

		if (c == 0)
			return &docs[mid];
		if (c < 0)
			lo = mid + 1;
		else
			hi = mid;
	}
	return NULL;
}

/*
 * How long this observer still considers docs[i] live, in ms (<= 0: free).
 * Plain leases: ttl minus the time its (epoch, seq, released) has not
 * changed.  Attached leases: their session's figure if the session is at
 * their session epoch; free if the session is released or at a newer epoch;
 * and if the session document is missing (or older, which a read racing with
 * its insert can show), a full ttl from when that was first seen, as for a
 * lease seen for the first time.  Called with mb->lock held, after every
 * session document of this read was observed (sess_left).
 */
static int64_t judge(struct mongo_backend *mb, const struct lease_doc *sessions, size_t n, const struct lease_doc *d,
		     const int64_t *left, int64_t sent, int64_t now)
{
	const struct lease_doc *s;

	if (d->released)
		return 0;
	if (d->sess[0] == '\0') {
		/* A plain lease: it is one of sessions[] (tdrain_leases). */
		return d >= sessions && d < sessions + n ? left[d - sessions] : 0;
	}
	s = find_doc(sessions, n, d->sess);
	if (s && s->epoch > d->sess_epoch)
		return 0;
	if (s && s->epoch == d->sess_epoch)
		return s->released ? 0 : left[s - sessions];
	{
		struct lease_doc absent;

		memset(&absent, 0, sizeof(absent));
		snprintf(absent.name, sizeof(absent.name), "%s", d->sess);
		absent.epoch = s ? s->epoch : 0;
		absent.seq = -1;
		return d->ttl_ms - observe(mb, &absent, sent, now);
	}
}

/*
 * Every lease whose name starts with prefix; partition leases (tdrain_parts)
 * only if with_parts.  The session documents attached leases are judged by
 * are always read (tdrain_leases), and first.
 */
static int list_docs(struct mongo_backend *mb, const char *prefix, int with_parts, tdr_lease_info **ret,
		     size_t *ret_n, tdr_err *err)
{
	struct lease_doc *docs = NULL, *pdocs = NULL;
	tdr_lease_info *out;
	int64_t *left;
	size_t n = 0, np = 0, k = 0, plen = strlen(prefix);
	bson_t filter = BSON_INITIALIZER;
	int64_t sent, now;
	int rc;

	/*
	 * The sessions are judged by this read alone: sent and answered are its
	 * times, not the partition read's after it (observe()).
	 */
	sent = tdr_mono_ms();
	rc = read_latest(mb, TDR_C_LEASES, &filter, &docs, &n, err);
	now = tdr_mono_ms();
	if (rc == 0 && with_parts)
		rc = read_latest(mb, TDR_C_PARTS, &filter, &pdocs, &np, err);
	bson_destroy(&filter);
	if (rc < 0) {
		free(docs);
		return rc;
	}
	out = calloc(n + np ? n + np : 1, sizeof(*out));
	left = calloc(n ? n : 1, sizeof(*left));
	if (out == NULL || left == NULL) {
		free(out);
		free(left);
		free(docs);
		free(pdocs);
		return tdr_err_set(err, TDR_ENOMEM, "out of memory");
	}
	pthread_mutex_lock(&mb->lock);
	/*
	 * Attached documents never change, and released ones are free whatever
	 * their age: only live plain leases (sessions among them) are observed,
	 * so the observation table holds members and leaders, not partitions.
	 */
	for (size_t i = 0; i < n; i++)
		left[i] = docs[i].sess[0] || docs[i].released ? 0 : docs[i].ttl_ms - observe(mb, &docs[i], sent, now);
	for (size_t i = 0; i < n + np; i++) {
		const struct lease_doc *d = i < n ? &docs[i] : &pdocs[i - n];

		if (strncmp(d->name, prefix, plen) != 0)
			continue;
		snprintf(out[k].name, sizeof(out[k].name), "%s", d->name);
		snprintf(out[k].holder, sizeof(out[k].holder), "%s", d->holder);
		out[k].epoch = d->epoch;
		out[k].ttl_ms = d->ttl_ms;
		out[k].released = d->released;
		out[k].expires_in_ms = judge(mb, docs, n, d, left, sent, now);
		snprintf(out[k].session, sizeof(out[k].session), "%s", d->sess);
		out[k].session_epoch = d->sess_epoch;
		out[k].mine = strcmp(d->holder, mb->base.holder) == 0 && strcmp(d->inst, mb->inst) == 0;
		k++;
	}
	pthread_mutex_unlock(&mb->lock);
	free(left);
	free(docs);
	free(pdocs);
	*ret = out;
	*ret_n = k;
	return 0;
}

static int m_list(tdr_lease_backend *be, const char *prefix, tdr_lease_info **ret, size_t *ret_n, tdr_err *err)
{
	size_t plen = strlen(prefix);
	/* Partition documents are read only when the prefix can match them. */
	int parts = plen == 0 || strncmp(prefix, "part/", plen < 5 ? plen : 5) == 0;

	return list_docs((struct mongo_backend *)be, prefix, parts, ret, ret_n, err);
}

static void tidy_superseded(struct mongo_backend *mb)
{
	static const char *const colls[2] = { TDR_C_LEASES, TDR_C_PARTS };
	bson_t filter[2], in[2], arr[2];
	bson_error_t be;
	size_t cnt[2] = { 0, 0 }, n;
	char key[16];

	for (int k = 0; k < 2; k++) {
		bson_init(&filter[k]);
		BSON_APPEND_DOCUMENT_BEGIN(&filter[k], "_id", &in[k]);
		BSON_APPEND_ARRAY_BEGIN(&in[k], "$in", &arr[k]);
	}
	pthread_mutex_lock(&mb->lock);
	n = mb->ntidy;
	for (size_t i = 0; i < n; i++) {
		int k = strcmp(coll_of(mb->tidy[i]), TDR_C_PARTS) == 0;

		snprintf(key, sizeof(key), "%zu", cnt[k]++);
		BSON_APPEND_UTF8(&arr[k], key, mb->tidy[i]);
	}
	/* Dedup: the same ids come back from every read until the delete lands. */
	mb->ntidy = 0;
	pthread_mutex_unlock(&mb->lock);
	for (int k = 0; k < 2; k++) {
		bson_append_array_end(&in[k], &arr[k]);
		bson_append_document_end(&filter[k], &in[k]);
		if (cnt[k] > 0) {
			mongoc_client_t *c = tdr_store_pop(mb->st);
			mongoc_collection_t *coll = tdr_store_coll(mb->st, c, colls[k]);

			tdr_lease_count(&mb->base, 1);
			/* Best effort: a failure leaves history behind, which the next read finds again. */
			(void)mongoc_collection_delete_many(coll, &filter[k], NULL, NULL, &be);
			mongoc_collection_destroy(coll);
			tdr_store_push(mb->st, c);
		}
		bson_destroy(&filter[k]);
	}
}

/* The coordinator's read: then at most one delete of superseded documents of ours. */
static int m_observe(tdr_lease_backend *be, int with_parts, tdr_lease_info **ret, size_t *ret_n, tdr_err *err)
{
	struct mongo_backend *mb = (struct mongo_backend *)be;
	int rc;

	pthread_mutex_lock(&mb->lock);
	mb->ntidy = 0;
	pthread_mutex_unlock(&mb->lock);
	rc = list_docs(mb, "", with_parts, ret, ret_n, err);
	if (rc == 0)
		tidy_superseded(mb);
	return rc;
}

/* Index of each failed insert of an unordered bulk, from its reply: dup[i] = 1 or 2 (other error). */
static void bulk_failures(const bson_t *reply, unsigned char *failed, size_t n)
{
	bson_iter_t it, arr;

	if (!bson_iter_init_find(&it, reply, "writeErrors") || !bson_iter_recurse(&it, &arr))
		return;
	while (bson_iter_next(&arr)) {
		bson_iter_t e;
		int64_t idx = -1, code = 0;

		if (!bson_iter_recurse(&arr, &e))
			continue;
		while (bson_iter_next(&e)) {
			if (strcmp(bson_iter_key(&e), "index") == 0)
				idx = bson_iter_as_int64(&e);
			else if (strcmp(bson_iter_key(&e), "code") == 0)
				code = bson_iter_as_int64(&e);
		}
		if (idx >= 0 && (size_t)idx < n)
			failed[idx] = (code == 11000 || code == 11001) ? 1 : 2;
	}
}

/*
 * Documents per bulk statement of acquire_many / release_many.  DocumentDB
 * (0.108) crashed a PostgreSQL backend (signal 11) on the one unordered insert
 * of 2,048 lease documents that P = 4096 with 2 replicas made, twice in two
 * runs (t18); 512 worked, and a bulk of 512 duplicate keys took 13.5 s there
 * (each failed insert is a subtransaction).  Chunks keep every statement
 * bounded: gaining or giving back k leases costs ceil(k / LEASE_CHUNK)
 * statements (2 per chunk to acquire: insert and read-back), at most 16 at
 * P = 4096, whatever the store.
 */
#define LEASE_CHUNK 256

static int acquire_chunk(struct mongo_backend *mb, const char *cname, const char *session, int64_t session_epoch,
			 int64_t ttl_ms, tdr_lease_req **reqs, size_t n, tdr_err *err)
{
	tdr_lease_backend *be = &mb->base;
	mongoc_client_t *c;
	mongoc_collection_t *coll;
	mongoc_bulk_operation_t *bulk;
	unsigned char *failed;
	struct lease_doc *docs = NULL;
	size_t ndocs = 0, nwon = 0;
	bson_t reply, filter = BSON_INITIALIZER, in;
	bson_error_t bee;
	int64_t now = tdr_wall_ms();
	int rc = 0, answered;

	if (n == 0)
		return 0;
	if ((failed = calloc(n, 1)) == NULL)
		return tdr_err_set(err, TDR_ENOMEM, "out of memory");
	c = tdr_store_pop(mb->st);
	coll = tdr_store_coll(mb->st, c, cname);
	bulk = tdr_bulk_new(coll, 0);
	for (size_t i = 0; i < n; i++) {
		bson_t doc = BSON_INITIALIZER;

		/* The next epoch after the newest the caller saw: the unique _id lets one contender win it. */
		append_lease_doc(&doc, mb, reqs[i]->name, reqs[i]->epoch + 1, ttl_ms, 0, session, session_epoch, now);
		tdr_bulk_insert_trusted(bulk, &doc);
		bson_destroy(&doc);
	}
	tdr_lease_count(be, 1);
	if (!mongoc_bulk_operation_execute(bulk, &reply, &bee)) {
		bson_iter_t it;

		/* Statement errors are per document; anything else leaves every outcome unknown. */
		answered = bson_iter_init_find(&it, &reply, "writeErrors") &&
			   !bson_iter_init_find(&it, &reply, "writeConcernErrors");
		if (answered)
			bulk_failures(&reply, failed, n);
		else
			rc = tdr_store_error(&bee, "lease insert_many", err), rc = TDR_ETRANSIENT;
	}
	bson_destroy(&reply);
	mongoc_bulk_operation_destroy(bulk);
	mongoc_collection_destroy(coll);
	tdr_store_push(mb->st, c);
	if (rc < 0) {
		free(failed);
		return rc;
	}
	for (size_t i = 0; i < n; i++) {
		reqs[i]->rc = failed[i] == 1 ? TDR_EDUP : failed[i] ? TDR_ETRANSIENT : 0;
		if (reqs[i]->rc == 0)
			nwon++;
	}
	free(failed);
	if (nwon == 0)
		return 0;

	/*
	 * Read back: our insert is the lease only if no newer epoch of the name
	 * exists.  (A view two takeovers old could insert an epoch its successors
	 * have already deleted; after this read, nobody can supersede a live
	 * attached lease without judging our session expired.)
	 */
	BSON_APPEND_DOCUMENT_BEGIN(&filter, "name", &in);
	{
		bson_t arr;
		char key[16];
		size_t k = 0;

		BSON_APPEND_ARRAY_BEGIN(&in, "$in", &arr);
		for (size_t i = 0; i < n; i++)
			if (reqs[i]->rc == 0) {
				snprintf(key, sizeof(key), "%zu", k++);
				BSON_APPEND_UTF8(&arr, key, reqs[i]->name);
			}
		bson_append_array_end(&in, &arr);
	}
	bson_append_document_end(&filter, &in);
	rc = read_latest(mb, cname, &filter, &docs, &ndocs, err);
	bson_destroy(&filter);
	for (size_t i = 0; i < n; i++) {
		const struct lease_doc *d;

		if (reqs[i]->rc != 0)
			continue;
		if (rc < 0) {
			/* Unknown: the caller must not write under it; its next observation adopts it if it is ours. */
			reqs[i]->rc = TDR_ETRANSIENT;
			continue;
		}
		d = find_doc(docs, ndocs, reqs[i]->name);
		if (d && d->epoch > reqs[i]->epoch + 1)
			reqs[i]->rc = TDR_EDUP;
		else
			reqs[i]->epoch = reqs[i]->epoch + 1;
	}
	free(docs);
	if (rc < 0)
		return rc;

	/* Older epochs of what we won are deleted by a later observation (tidy_superseded), in bounded numbers. */
	return 0;
}

/* Every req of the group, LEASE_CHUNK at a time; a chunk that fails leaves its reqs and the rest TDR_ETRANSIENT. */
static int acquire_group(struct mongo_backend *mb, const char *cname, const char *session, int64_t session_epoch,
			 int64_t ttl_ms, tdr_lease_req **reqs, size_t n, tdr_err *err)
{
	for (size_t off = 0; off < n; off += LEASE_CHUNK) {
		size_t k = n - off < LEASE_CHUNK ? n - off : LEASE_CHUNK;
		int rc = acquire_chunk(mb, cname, session, session_epoch, ttl_ms, reqs + off, k, err);

		/* The store did not answer: the next chunks would most likely wait out the timeout too. */
		if (rc < 0)
			return rc;
	}
	return 0;
}

/* Partition leases and the others live in two collections: one group each (the leader is rarely among them). */
static int split_reqs(tdr_lease_req *reqs, size_t n, tdr_lease_req ***ret, size_t *nparts)
{
	tdr_lease_req **v = calloc(n ? n : 1, sizeof(*v));
	size_t a = 0, b = n;

	if (v == NULL)
		return TDR_ENOMEM;
	for (size_t i = 0; i < n; i++) {
		if (strcmp(coll_of(reqs[i].name), TDR_C_PARTS) == 0)
			v[a++] = &reqs[i];
		else
			v[--b] = &reqs[i];
	}
	*ret = v;
	*nparts = a;
	return 0;
}

static int m_acquire_many(tdr_lease_backend *be, const char *session, int64_t session_epoch, int64_t ttl_ms,
			  tdr_lease_req *reqs, size_t n, tdr_err *err)
{
	struct mongo_backend *mb = (struct mongo_backend *)be;
	tdr_lease_req **v;
	size_t np;
	int rc, rc2;

	for (size_t i = 0; i < n; i++)
		reqs[i].rc = TDR_ETRANSIENT;
	if (split_reqs(reqs, n, &v, &np) < 0)
		return tdr_err_set(err, TDR_ENOMEM, "out of memory");
	rc = acquire_group(mb, TDR_C_PARTS, session, session_epoch, ttl_ms, v, np, err);
	rc2 = acquire_group(mb, TDR_C_LEASES, session, session_epoch, ttl_ms, v + np, n - np, rc < 0 ? NULL : err);
	free(v);
	return rc < 0 ? rc : rc2;
}

/*
 * Giving back is inserting the next epoch of each name as a released
 * document (an unordered insert_many: one statement, no update).  FerretDB
 * performs update_many {_id: {$in}} as one scan per document (docs/DESIGN.md,
 * "Store access paths"), which at hundreds of partitions held the store for
 * seconds and starved every renewal; an insert is one index probe.  A
 * duplicate key means that epoch is someone else's already: not ours to give.
 * Readers take the newest epoch, released: the name is free.
 */
static int release_chunk(struct mongo_backend *mb, const char *cname, tdr_lease_req **reqs, size_t n, tdr_err *err)
{
	tdr_lease_backend *be = &mb->base;
	mongoc_client_t *c;
	mongoc_collection_t *coll;
	mongoc_bulk_operation_t *bulk;
	bson_t reply;
	bson_error_t bee;
	int64_t now = tdr_wall_ms();
	int rc = 0;

	if (n == 0)
		return 0;
	c = tdr_store_pop(mb->st);
	coll = tdr_store_coll(mb->st, c, cname);
	bulk = tdr_bulk_new(coll, 0);
	for (size_t i = 0; i < n; i++) {
		bson_t doc = BSON_INITIALIZER;

		append_lease_doc(&doc, mb, reqs[i]->name, reqs[i]->epoch + 1, 0, 1, NULL, 0, now);
		tdr_bulk_insert_trusted(bulk, &doc);
		bson_destroy(&doc);
	}
	tdr_lease_count(be, 1);
	if (!mongoc_bulk_operation_execute(bulk, &reply, &bee)) {
		bson_iter_t it;

		/* Duplicate keys are per document (someone else's epoch): only a failure without them counts. */
		if (!bson_iter_init_find(&it, &reply, "writeErrors") || bson_iter_init_find(&it, &reply, "writeConcernErrors"))
			rc = tdr_store_error(&bee, "lease release_many", err), rc = TDR_ETRANSIENT;
	}
	bson_destroy(&reply);
	mongoc_bulk_operation_destroy(bulk);
	mongoc_collection_destroy(coll);
	tdr_store_push(mb->st, c);
	for (size_t i = 0; i < n; i++)
		reqs[i]->rc = rc;
	return rc;
}

/* LEASE_CHUNK at a time; after a failed chunk the rest is not tried (rc TDR_ETRANSIENT: they expire instead). */
static int release_group(struct mongo_backend *mb, const char *cname, tdr_lease_req **reqs, size_t n, tdr_err *err)
{
	for (size_t off = 0; off < n; off += LEASE_CHUNK) {
		size_t k = n - off < LEASE_CHUNK ? n - off : LEASE_CHUNK;
		int rc = release_chunk(mb, cname, reqs + off, k, err);

		if (rc < 0) {
			for (size_t i = off + k; i < n; i++)
				reqs[i]->rc = TDR_ETRANSIENT;
			return rc;
		}
	}
	return 0;
}

static int m_release_many(tdr_lease_backend *be, tdr_lease_req *reqs, size_t n, tdr_err *err)
{
	struct mongo_backend *mb = (struct mongo_backend *)be;
	tdr_lease_req **v;
	size_t np;
	int rc, rc2;

	if (split_reqs(reqs, n, &v, &np) < 0)
		return tdr_err_set(err, TDR_ENOMEM, "out of memory");
	rc = release_group(mb, TDR_C_PARTS, v, np, err);
	rc2 = release_group(mb, TDR_C_LEASES, v + np, n - np, rc < 0 ? NULL : err);
	free(v);
	return rc < 0 ? rc : rc2;
}

static void m_destroy(tdr_lease_backend *be)
{
	struct mongo_backend *mb = (struct mongo_backend *)be;

	pthread_mutex_destroy(&mb->lock);
	free(mb->obs);
	free(mb->tidy);
	free(mb);
}

static const struct tdr_lease_ops mongo_ops = {
	.acquire = m_acquire,
	.renew = m_renew,
	.release = m_release,
	.list = m_list,
	.acquire_many = m_acquire_many,
	.release_many = m_release_many,
	.observe = m_observe,
	.destroy = m_destroy,
};

int tdr_lease_mongo_new(tdr_lease_backend **ret, tdr_store *store, const char *holder, tdr_err *err)
{
	struct mongo_backend *mb = calloc(1, sizeof(*mb));
	uint64_t r = 0;

	if (mb == NULL)
		return tdr_err_set(err, TDR_ENOMEM, "out of memory");
	mb->obs = calloc(MAX_OBS, sizeof(*mb->obs));
	mb->tidy = calloc(TIDY_MAX, sizeof(*mb->tidy));
	if (mb->obs == NULL || mb->tidy == NULL) {
		free(mb->obs);
		free(mb->tidy);
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
