/*
 * refs.c - tdrain-bench-refs: the benchmark's references and its stopwatch.
 *
 *   tdrain-bench-refs raw   --uri URI --db DB [--batch B] [--shape in|one]
 *       The RAW CEILING: claim and acknowledge with bulk statements and
 *       nothing else.  Per batch: find the FIFO head (limit B, the whole batch
 *       in the first reply; sorted by _id on MongoDB, insertion order on
 *       FerretDB and DocumentDB, as tdrain does), insert ONE claim document
 *       listing the ids, delete_many {_id: {$in: ids}} (--shape one: B
 *       DeleteOne in one unordered bulk instead; slower on DocumentDB, 118 ms
 *       against 12 ms per 1,000 at 100k, so `in` is the default).  No
 *       validation, no delta, no fold: what the store allows at best.  Prints
 *       the mean time per batch of each of the three phases.  --read after
 *       reads each batch as {_id: {$gt: previous batch's last _id}} instead of
 *       the head (read_after says when that is the same thing, and what it
 *       costs: more, on DocumentDB).
 *
 *   tdrain-bench-refs prepare --uri URI --db DB
 *       Create the FIFO's indexes as tdrain would (the same names and keys),
 *       and return when they are built (run_prepare says why bench.sh calls it
 *       after the load on DocumentDB).
 *
 *   tdrain-bench-refs rtt --uri URI [--total N]
 *       The round trip of N `ping` commands, p50 and p90: what a store (or
 *       tdrain-latproxy in front of it) really costs per statement.
 *
 *   tdrain-bench-refs old   --uri URI --db DB [--batch B]
 *       The OLD ALGORITHM of seed 000 (issue #819, services/telemetry
 *       consumers after #817): per batch, three separate dedup passes (one
 *       unordered bulk insert of {_id: insert_id} per consumer), the counter
 *       and per-device writes batched (one bulk of upserts each), the identity
 *       map batched, sign-in days one updateOne per user, and then, per
 *       affected username, SEQUENTIALLY: findOne(identity map by username),
 *       find(all the user's device documents, $in), re-sum the full history
 *       in memory, updateOne(username projection).  Then the batch is deleted
 *       from the FIFO with one delete_many, as tdrain does, so that only the
 *       processing differs.  Every document is keyed by _id (the cheapest
 *       key on every store), which favours the old algorithm.
 *
 *   tdrain-bench-refs watch --uri URI --db DB --total N [options] [-- PRODUCER ARGV...]
 *       Samples a run every --interval-ms and appends one line per sample to
 *       --dat: seconds, acknowledged (sum of tdrain_events_processed_total
 *       over --metrics files), backlog (total - acknowledged), visible (sum of
 *       event_counters.count: events folded into the projections; the
 *       collection holds one document per event name and day, so reading it is
 *       cheap on every store), and the drain rate of the last batch (events
 *       acknowledged since the previous change / its duration).  Stops
 *       when every event is visible (or --timeout).  With a producer command
 *       (tdrain-loadgen --rate R ...), it is started at t0 and the end-to-end
 *       latency of event k is (first sample with visible >= k) - (time batch
 *       containing k was due: t0 + ceil(k / b) * b / R, b = --producer-batch):
 *       the horizontal distance between the cumulative inserted and visible
 *       curves, exact for a FIFO.  p50/p99 over all events are printed.
 *
 * Each mode prints one line of key=value results on stdout.  Stores are
 * reached only through the URI given; nothing here knows tdrain's internals
 * beyond the event contract (docs/EVENTS.md) and the metrics file format.
 */
#include "config.h"

#include <errno.h>
#include <stdarg.h>
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <mongoc/mongoc.h>

#include "lib/clock.h"
#include "lib/store.h"

#define PROG "tdrain-bench-refs"

static volatile sig_atomic_t stop_flag;
/* Set by connect_store: DocumentDB's gateway (buildInfo without gitVersion, as lib/store.c tells it). */
static int documentdb;

static void on_signal(int sig)
{
	(void)sig;
	stop_flag = 1;
}

struct opts {
	const char *mode, *uri, *db, *coll, *dat, *metrics, *shape, *read;
	int64_t batch, total, interval_ms, timeout_s, producer_batch;
	double rate;
	char **producer;
};

/* BENCH_DEBUG=1: one stderr line per store statement group, with its duration. */
static int debug_on = -1;
static int64_t debug_t;

static void step(const char *what)
{
	int64_t now = tdr_mono_us();

	if (debug_on < 0)
		debug_on = getenv("BENCH_DEBUG") != NULL && getenv("BENCH_DEBUG")[0] == '1';
	if (debug_on)
		fprintf(stderr, PROG ": %.3f s, then %s\n", debug_t ? (double)(now - debug_t) / 1e6 : 0.0, what);
	debug_t = now;
}

static void die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void die(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	fprintf(stderr, PROG ": ");
	vfprintf(stderr, fmt, ap);
	fprintf(stderr, "\n");
	va_end(ap);
	exit(1);
}

static void usage(FILE *out)
{
	fprintf(out, "usage: " PROG " raw|old --uri URI --db DB [--batch B] [--coll events] [--timeout S] [--shape in|one] [--read head|after]\n"
		     "       " PROG " drop|prepare --uri URI --db DB\n"
		     "       " PROG " rtt --uri URI [--total N]\n"
		     "       " PROG " watch --uri URI --db DB --total N [--interval-ms MS] [--metrics F1,F2,...]\n"
		     "             [--dat FILE] [--timeout S] [--rate R --producer-batch B -- PRODUCER ARGV...]\n");
}

/* ------------------------------------------------------------ store helpers */

static mongoc_client_t *connect_store(const char *uri_s, int *is_ferretdb)
{
	bson_error_t be;
	mongoc_uri_t *uri = mongoc_uri_new_with_error(uri_s, &be);
	mongoc_client_t *c;
	bson_t cmd = BSON_INITIALIZER, reply;
	bson_iter_t it;

	if (uri == NULL)
		die("--uri: %s", be.message);
	if (!mongoc_uri_has_option(uri, MONGOC_URI_SOCKETTIMEOUTMS))
		mongoc_uri_set_option_as_int32(uri, MONGOC_URI_SOCKETTIMEOUTMS, 600000);
	mongoc_uri_set_appname(uri, PROG);
	c = mongoc_client_new_from_uri_with_error(uri, &be);
	mongoc_uri_destroy(uri);
	if (c == NULL)
		die("%s", be.message);
	mongoc_client_set_error_api(c, MONGOC_ERROR_API_VERSION_2);
	BSON_APPEND_INT32(&cmd, "buildInfo", 1);
	if (!mongoc_client_command_simple(c, "admin", &cmd, NULL, &reply, &be))
		die("buildInfo: %s", be.message);
	*is_ferretdb = bson_iter_init_find(&it, &reply, "ferretdbVersion");
	documentdb = !*is_ferretdb && !bson_iter_init_find(&it, &reply, "gitVersion");
	bson_destroy(&reply);
	bson_destroy(&cmd);
	return c;
}

static int64_t doc_i64(const bson_t *doc, const char *key, int64_t dflt)
{
	bson_iter_t it;

	if (bson_iter_init_find(&it, doc, key) && (BSON_ITER_HOLDS_INT32(&it) || BSON_ITER_HOLDS_INT64(&it) ||
						   BSON_ITER_HOLDS_DOUBLE(&it)))
		return bson_iter_as_int64(&it);
	return dflt;
}

static const char *doc_str(const bson_t *doc, const char *key, uint32_t *len)
{
	bson_iter_t it;

	if (bson_iter_init_find(&it, doc, key) && BSON_ITER_HOLDS_UTF8(&it))
		return bson_iter_utf8(&it, len);
	return NULL;
}

static void bulk_exec(mongoc_bulk_operation_t *bulk, const char *what, bson_t *reply_out)
{
	bson_t reply;
	bson_error_t be;
	bson_iter_t it, arr;

	if (!mongoc_bulk_operation_execute(bulk, &reply, &be)) {
		/* Duplicate keys are the expected outcome of a dedup insert; anything else is fatal. */
		int only_dups = bson_iter_init_find(&it, &reply, "writeErrors") && bson_iter_recurse(&it, &arr);

		while (only_dups && bson_iter_next(&arr)) {
			bson_iter_t e;

			if (!(bson_iter_recurse(&arr, &e) && bson_iter_find(&e, "code") &&
			      bson_iter_as_int64(&e) == 11000))
				only_dups = 0;
		}
		if (!only_dups)
			die("%s: %s", what, be.message);
	}
	if (reply_out)
		bson_copy_to(&reply, reply_out);
	bson_destroy(&reply);
}

/* Appends {"_id": {"$in": [ids...]}} to filter. */
static void in_filter(bson_t *filter, const char *field, const bson_value_t *ids, size_t n)
{
	bson_t in, arr;

	BSON_APPEND_DOCUMENT_BEGIN(filter, field, &in);
	BSON_APPEND_ARRAY_BEGIN(&in, "$in", &arr);
	for (size_t i = 0; i < n; i++) {
		char buf[16];
		const char *kp;

		bson_uint32_to_string((uint32_t)i, &kp, buf, sizeof(buf));
		bson_append_value(&arr, kp, -1, &ids[i]);
	}
	bson_append_array_end(&in, &arr);
	bson_append_document_end(filter, &in);
}

/* Read the FIFO head: up to limit documents, as tdrain's single-mode claim does. */
static size_t read_head(mongoc_collection_t *events, int64_t limit, int ferretdb, bson_t ***ret)
{
	bson_t filter = BSON_INITIALIZER, opts = BSON_INITIALIZER, sort;
	bson_t **docs = calloc((size_t)limit, sizeof(*docs));
	mongoc_cursor_t *cur;
	const bson_t *doc;
	bson_error_t be;
	size_t n = 0;

	if (docs == NULL)
		die("out of memory");
	BSON_APPEND_INT64(&opts, "limit", limit);
	BSON_APPEND_INT64(&opts, "batchSize", limit);
	/* Insertion order where an _id sort reads the whole FIFO (FerretDB, DocumentDB), as tdrain claims. */
	if (!ferretdb && !documentdb) {
		BSON_APPEND_DOCUMENT_BEGIN(&opts, "sort", &sort);
		BSON_APPEND_INT32(&sort, "_id", 1);
		bson_append_document_end(&opts, &sort);
	}
	cur = mongoc_collection_find_with_opts(events, &filter, &opts, NULL);
	while (n < (size_t)limit && mongoc_cursor_next(cur, &doc))
		docs[n++] = bson_copy(doc);
	if (mongoc_cursor_error(cur, &be))
		die("read head: %s", be.message);
	mongoc_cursor_destroy(cur);
	bson_destroy(&filter);
	bson_destroy(&opts);
	*ret = docs;
	return n;
}

/*
 * Read the next batch past the previous one's last _id, {_id: {$gt: last}}
 * with no sort (--read after): an index range instead of a heap scan from the
 * FIFO's start, which on DocumentDB wades through the rows deleted by earlier
 * batches until PostgreSQL prunes them.  The same FIFO head only where _id
 * grows with insertion order (one loadgen process's ObjectIds do), so it is a
 * reference shape, not one tdrain may use.  Measured on DocumentDB at 1M: 1.0-1.3 s
 * per read against 7-147 ms for the head (four runs) (its $gt on _id is not served by an
 * index either), so `head` stays the default; kept for re-measuring.
 */
static size_t read_after(mongoc_collection_t *events, int64_t limit, const bson_value_t *last, bson_t ***ret)
{
	bson_t filter = BSON_INITIALIZER, opts = BSON_INITIALIZER, gt;
	bson_t **docs = calloc((size_t)limit, sizeof(*docs));
	mongoc_cursor_t *cur;
	const bson_t *doc;
	bson_error_t be;
	size_t n = 0;

	if (docs == NULL)
		die("out of memory");
	BSON_APPEND_DOCUMENT_BEGIN(&filter, "_id", &gt);
	bson_append_value(&gt, "$gt", 3, last);
	bson_append_document_end(&filter, &gt);
	BSON_APPEND_INT64(&opts, "limit", limit);
	BSON_APPEND_INT64(&opts, "batchSize", limit);
	cur = mongoc_collection_find_with_opts(events, &filter, &opts, NULL);
	while (n < (size_t)limit && mongoc_cursor_next(cur, &doc))
		docs[n++] = bson_copy(doc);
	if (mongoc_cursor_error(cur, &be))
		die("read after: %s", be.message);
	mongoc_cursor_destroy(cur);
	bson_destroy(&filter);
	bson_destroy(&opts);
	*ret = docs;
	return n;
}

static void docs_free(bson_t **docs, size_t n)
{
	for (size_t i = 0; i < n; i++)
		bson_destroy(docs[i]);
	free(docs);
}

static void delete_ids(mongoc_collection_t *coll, const bson_value_t *ids, size_t n)
{
	bson_t f = BSON_INITIALIZER;
	bson_error_t be;

	in_filter(&f, "_id", ids, n);
	if (!mongoc_collection_delete_many(coll, &f, NULL, NULL, &be))
		die("delete acknowledged events: %s", be.message);
	bson_destroy(&f);
}

static void ids_of(bson_t **docs, size_t n, bson_value_t *ids)
{
	for (size_t i = 0; i < n; i++) {
		bson_iter_t it;

		if (!bson_iter_init_find(&it, docs[i], "_id"))
			die("document without _id");
		bson_value_copy(bson_iter_value(&it), &ids[i]);
	}
}

static void ids_free(bson_value_t *ids, size_t n)
{
	for (size_t i = 0; i < n; i++)
		bson_value_destroy(&ids[i]);
	free(ids);
}

static long peak_rss_kb(void)
{
	FILE *f = fopen("/proc/self/status", "re");
	char line[256];
	long kb = -1;

	if (f == NULL)
		return -1;
	while (fgets(line, sizeof(line), f))
		if (strncmp(line, "VmHWM:", 6) == 0)
			kb = strtol(line + 6, NULL, 10);
	fclose(f);
	return kb;
}

static double cpu_s(void)
{
	struct rusage ru;

	getrusage(RUSAGE_SELF, &ru);
	return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 + (double)ru.ru_stime.tv_sec +
	       (double)ru.ru_stime.tv_usec / 1e6;
}

static void report(const char *mode, int64_t n, int64_t batches, int64_t t0_us, double cpu0, const char *extra)
{
	double s = (double)(tdr_mono_us() - t0_us) / 1e6, cpu = cpu_s() - cpu0;

	printf("mode=%s events=%" PRId64 " batches=%" PRId64 " seconds=%.3f rate=%.1f cpu_us_per_event=%.1f "
	       "peak_rss_kb=%ld%s%s\n",
	       mode, n, batches, s, s > 0 ? (double)n / s : 0.0, n ? cpu * 1e6 / (double)n : 0.0, peak_rss_kb(),
	       extra ? " " : "", extra ? extra : "");
	fflush(stdout);
}

/* --timeout S: stop after the batch in hand once S seconds have passed (the rate so far is reported). */
static int timed_out(const struct opts *o, int64_t t0_us)
{
	return o->timeout_s > 0 && tdr_mono_us() - t0_us > o->timeout_s * 1000000;
}

/* ------------------------------------------------------------ raw ceiling */

/*
 * Acknowledge a batch as 1,000 DeleteOne({_id}) in one unordered bulk: the
 * other shape a store may serve from its _id index (--shape one).  Measured on
 * DocumentDB it loses to one indexed $in (docs/PERFORMANCE.md), so `in` is the
 * default; the shape stays so the comparison can be run again.
 */
static void delete_ids_one_by_one(mongoc_collection_t *coll, const bson_value_t *ids, size_t n)
{
	bson_t opts = BSON_INITIALIZER;
	mongoc_bulk_operation_t *bulk;
	bson_error_t be;

	BSON_APPEND_BOOL(&opts, "ordered", false);
	bulk = mongoc_collection_create_bulk_operation_with_opts(coll, &opts);
	for (size_t i = 0; i < n; i++) {
		bson_t sel = BSON_INITIALIZER;

		bson_append_value(&sel, "_id", 3, &ids[i]);
		if (!mongoc_bulk_operation_remove_one_with_opts(bulk, &sel, NULL, &be))
			die("bulk delete: %s", be.message);
		bson_destroy(&sel);
	}
	bulk_exec(bulk, "delete acknowledged events", NULL);
	mongoc_bulk_operation_destroy(bulk);
	bson_destroy(&opts);
}

static int run_raw(const struct opts *o)
{
	int ferretdb;
	mongoc_client_t *c = connect_store(o->uri, &ferretdb);
	mongoc_collection_t *events = mongoc_client_get_collection(c, o->db, o->coll);
	mongoc_collection_t *claims = mongoc_client_get_collection(c, o->db, "bench_raw_claims");
	int64_t t0 = tdr_mono_us(), total = 0, batches = 0, seq = 0;
	/* Per phase, summed over batches: reading the head, inserting the claim, deleting the batch. */
	int64_t us_read = 0, us_claim = 0, us_ack = 0;
	int one_by_one = o->shape && strcmp(o->shape, "one") == 0;
	int after = o->read && strcmp(o->read, "after") == 0, have_last = 0;
	bson_value_t last;
	double cpu0 = cpu_s();
	char extra[256];

	if (o->shape && !one_by_one && strcmp(o->shape, "in") != 0)
		die("--shape: expected in or one");
	if (o->read && !after && strcmp(o->read, "head") != 0)
		die("--read: expected head or after");
	while (!stop_flag && !timed_out(o, t0)) {
		bson_t **docs;
		int64_t ta = tdr_mono_us(), tb, tc;
		size_t n = after && have_last ? read_after(events, o->batch, &last, &docs)
					      : read_head(events, o->batch, ferretdb, &docs);
		bson_value_t *ids;
		bson_t claim = BSON_INITIALIZER, arr;
		bson_error_t be;
		char id[64];

		if (n == 0) {
			free(docs);
			break;
		}
		ids = calloc(n, sizeof(*ids));
		if (ids == NULL)
			die("out of memory");
		ids_of(docs, n, ids);
		if (after) {
			if (have_last)
				bson_value_destroy(&last);
			bson_value_copy(&ids[n - 1], &last);
			have_last = 1;
		}
		tb = tdr_mono_us();
		us_read += tb - ta;
		/* One claim document per batch, as tdrain's claim record. */
		snprintf(id, sizeof(id), "raw:%" PRId64, ++seq);
		BSON_APPEND_UTF8(&claim, "_id", id);
		BSON_APPEND_DATE_TIME(&claim, "at", tdr_wall_ms());
		BSON_APPEND_ARRAY_BEGIN(&claim, "ids", &arr);
		for (size_t i = 0; i < n; i++) {
			char buf[16];
			const char *kp;

			bson_uint32_to_string((uint32_t)i, &kp, buf, sizeof(buf));
			bson_append_value(&arr, kp, -1, &ids[i]);
		}
		bson_append_array_end(&claim, &arr);
		if (!mongoc_collection_insert_one(claims, &claim, NULL, NULL, &be))
			die("claim: %s", be.message);
		bson_destroy(&claim);
		tc = tdr_mono_us();
		us_claim += tc - tb;
		if (one_by_one)
			delete_ids_one_by_one(events, ids, n);
		else
			delete_ids(events, ids, n);
		us_ack += tdr_mono_us() - tc;
		total += (int64_t)n;
		batches++;
		ids_free(ids, n);
		docs_free(docs, n);
	}
	/* Per batch: 3 statements (find the head, insert the claim, delete), or 2 + n with --shape one. */
	if (have_last)
		bson_value_destroy(&last);
	snprintf(extra, sizeof(extra), "read=%s shape=%s statements_per_batch=%s read_ms=%.1f claim_ms=%.1f ack_ms=%.1f%s",
		 after ? "after" : "head", one_by_one ? "one" : "in", one_by_one ? "2+n" : "3", batches ? (double)us_read / 1e3 / (double)batches : 0.0,
		 batches ? (double)us_claim / 1e3 / (double)batches : 0.0,
		 batches ? (double)us_ack / 1e3 / (double)batches : 0.0, timed_out(o, t0) ? " timeout=1" : "");
	report("raw", total, batches, t0, cpu0, extra);
	mongoc_collection_destroy(claims);
	mongoc_collection_destroy(events);
	mongoc_client_destroy(c);
	return 0;
}

/* ------------------------------------------------------------ prepare */

/*
 * Create the FIFO's indexes as tdrain would (lib/store.c tdr_index_specs: the
 * same names and keys, so tdrain's own createIndexes at start is a no-op), and
 * return once they are built.  bench.sh runs it right after the load: on
 * DocumentDB an index maintained by each insert costs ~10x the insert itself
 * (measured: 100,000 events load in 15 s with tdrain's two FIFO indexes, 1.5-2 s
 * without), while a build over the loaded collection is a sort, so loading
 * first and building after is the cheaper way to the same state.  DocumentDB
 * queues that build for a once-a-minute job; bench.sh starts the job at once
 * through psql, so this call returns when the build is done.  Without the
 * indexes in place before tdrain starts, its first minute would read the
 * whole FIFO for every acknowledgement.
 */
static int run_prepare(const struct opts *o)
{
	int ferretdb;
	mongoc_client_t *c = connect_store(o->uri, &ferretdb);
	mongoc_collection_t *events = mongoc_client_get_collection(c, o->db, o->coll);
	int rc = 0, made = 0;

	for (size_t i = 0; i < TDR_NINDEXES; i++) {
		const struct tdr_index_spec *ix = &tdr_index_specs[i];
		bson_t cmd = BSON_INITIALIZER, arr, idx, keys, reply;
		bson_error_t be;

		if (ix->coll != NULL || (ix->documentdb_only && !documentdb))
			continue;
		BSON_APPEND_UTF8(&cmd, "createIndexes", o->coll);
		BSON_APPEND_ARRAY_BEGIN(&cmd, "indexes", &arr);
		BSON_APPEND_DOCUMENT_BEGIN(&arr, "0", &idx);
		BSON_APPEND_DOCUMENT_BEGIN(&idx, "key", &keys);
		BSON_APPEND_INT32(&keys, ix->k1, 1);
		if (ix->k2)
			BSON_APPEND_INT32(&keys, ix->k2, 1);
		bson_append_document_end(&idx, &keys);
		BSON_APPEND_UTF8(&idx, "name", ix->name);
		if (ix->unique)
			BSON_APPEND_BOOL(&idx, "unique", true);
		bson_append_document_end(&arr, &idx);
		bson_append_array_end(&cmd, &arr);
		if (!mongoc_collection_write_command_with_opts(events, &cmd, NULL, &reply, &be)) {
			fprintf(stderr, PROG ": createIndexes %s: %s\n", ix->name, be.message);
			rc = 1;
		} else {
			made++;
		}
		bson_destroy(&reply);
		bson_destroy(&cmd);
	}
	printf("mode=prepare indexes=%d store=%s\n", made, ferretdb ? "ferretdb" : documentdb ? "documentdb" : "mongodb");
	mongoc_collection_destroy(events);
	mongoc_client_destroy(c);
	return rc;
}

/* ------------------------------------------------------------ rtt */

static int cmp_i64(const void *a, const void *b)
{
	int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;

	return x < y ? -1 : x > y;
}

/* The round trip of a `ping` (--total times, 200 by default): what a proxy's delay really adds. */
static int run_rtt(const struct opts *o)
{
	int ferretdb;
	mongoc_client_t *c = connect_store(o->uri, &ferretdb);
	int64_t n = o->total > 0 ? o->total : 200, *t = calloc((size_t)n, sizeof(*t));
	bson_t cmd = BSON_INITIALIZER;

	if (t == NULL)
		die("out of memory");
	BSON_APPEND_INT32(&cmd, "ping", 1);
	for (int64_t i = 0; i < n; i++) {
		bson_error_t be;
		int64_t a = tdr_mono_us();

		if (!mongoc_client_command_simple(c, "admin", &cmd, NULL, NULL, &be))
			die("ping: %s", be.message);
		t[i] = tdr_mono_us() - a;
	}
	qsort(t, (size_t)n, sizeof(*t), cmp_i64);
	printf("mode=rtt n=%" PRId64 " p50_us=%" PRId64 " p90_us=%" PRId64 "\n", n, t[n / 2], t[n * 9 / 10]);
	free(t);
	bson_destroy(&cmd);
	mongoc_client_destroy(c);
	return 0;
}

/* ------------------------------------------------------------ old algorithm */

struct ev {
	const char *iid, *event, *did, *user;
	uint32_t iid_len, event_len, did_len, user_len;
	int64_t t;
	int fresh[3]; /* new for consumer k (its own dedup pass) */
};

/* A small string-keyed table (linear probing) for per-batch aggregation. */
struct slot {
	char *key;
	int64_t n, tmin, tmax;
	char **ids; /* username -> distinct_ids, for the affected-user loop's bookkeeping */
};

struct table {
	struct slot *s;
	size_t cap, n;
};

static uint64_t fnv(const char *k, size_t len)
{
	uint64_t h = 1469598103934665603ULL;

	for (size_t i = 0; i < len; i++)
		h = (h ^ (unsigned char)k[i]) * 1099511628211ULL;
	return h;
}

static struct slot *table_get(struct table *t, const char *k, size_t len)
{
	size_t i;

	if (t->n * 2 >= t->cap) {
		struct table nt = { calloc(t->cap ? t->cap * 2 : 256, sizeof(struct slot)), t->cap ? t->cap * 2 : 256, 0 };

		if (nt.s == NULL)
			die("out of memory");
		for (size_t j = 0; j < t->cap; j++)
			if (t->s[j].key) {
				size_t p = fnv(t->s[j].key, strlen(t->s[j].key)) & (nt.cap - 1);

				while (nt.s[p].key)
					p = (p + 1) & (nt.cap - 1);
				nt.s[p] = t->s[j];
				nt.n++;
			}
		free(t->s);
		*t = nt;
	}
	i = fnv(k, len) & (t->cap - 1);
	while (t->s[i].key) {
		if (strlen(t->s[i].key) == len && memcmp(t->s[i].key, k, len) == 0)
			return &t->s[i];
		i = (i + 1) & (t->cap - 1);
	}
	t->s[i].key = strndup(k, len);
	if (t->s[i].key == NULL)
		die("out of memory");
	t->s[i].tmin = INT64_MAX;
	t->s[i].tmax = INT64_MIN;
	t->n++;
	return &t->s[i];
}

static void table_free(struct table *t)
{
	for (size_t i = 0; i < t->cap; i++)
		free(t->s[i].key);
	free(t->s);
	memset(t, 0, sizeof(*t));
}

static void utc_day(int64_t ms, char day[11])
{
	tdr_utc_day(ms, day);
}

/* One consumer's dedup pass: insert {_id: insert_id}; a duplicate key means "seen before". */
static void dedup_pass(mongoc_collection_t *coll, struct ev *ev, size_t n, int k)
{
	mongoc_bulk_operation_t *bulk;
	bson_t opts = BSON_INITIALIZER, reply;
	bson_iter_t it, arr;
	size_t *map = calloc(n ? n : 1, sizeof(*map)), m = 0;

	if (map == NULL)
		die("out of memory");
	BSON_APPEND_BOOL(&opts, "ordered", false);
	bulk = mongoc_collection_create_bulk_operation_with_opts(coll, &opts);
	for (size_t i = 0; i < n; i++) {
		bson_t d = BSON_INITIALIZER;

		bson_append_utf8(&d, "_id", 3, ev[i].iid, (int)ev[i].iid_len);
		mongoc_bulk_operation_insert(bulk, &d);
		bson_destroy(&d);
		ev[i].fresh[k] = 1;
		map[m++] = i;
	}
	if (m) {
		bulk_exec(bulk, "dedup", &reply);
		if (bson_iter_init_find(&it, &reply, "writeErrors") && bson_iter_recurse(&it, &arr))
			while (bson_iter_next(&arr)) {
				bson_iter_t e;

				if (bson_iter_recurse(&arr, &e) && bson_iter_find(&e, "index")) {
					int64_t idx = bson_iter_as_int64(&e);

					if (idx >= 0 && (size_t)idx < m)
						ev[map[idx]].fresh[k] = 0;
				}
			}
		bson_destroy(&reply);
	}
	mongoc_bulk_operation_destroy(bulk);
	bson_destroy(&opts);
	free(map);
}

/*
 * A bulkWrite of upserts.  FerretDB 1.24 wedges (every later statement on the
 * database hangs) when one update command carries more statements matching
 * existing documents than its backend connection pool holds: each statement
 * keeps a query open while taking another connection.  Seen here at 64
 * statements (PostgreSQL backend) and 128 (SQLite).  So on FerretDB the
 * batch goes out in commands of UPSERT_CHUNK statements: more round trips
 * than MongoDB needs, the least that store allows.
 */
#define UPSERT_CHUNK 25

struct upserts {
	mongoc_collection_t *coll;
	mongoc_bulk_operation_t *bulk;
	const char *what;
	size_t n, chunk;
};

static void upserts_flush(struct upserts *u)
{
	if (u->bulk && u->n)
		bulk_exec(u->bulk, u->what, NULL);
	if (u->bulk)
		mongoc_bulk_operation_destroy(u->bulk);
	u->bulk = NULL;
	u->n = 0;
}

static void upsert_one(struct upserts *u, const char *id, const bson_t *update)
{
	bson_t sel = BSON_INITIALIZER, uo = BSON_INITIALIZER;
	bson_error_t be;

	if (u->bulk == NULL) {
		bson_t opts = BSON_INITIALIZER;

		BSON_APPEND_BOOL(&opts, "ordered", false);
		u->bulk = mongoc_collection_create_bulk_operation_with_opts(u->coll, &opts);
		bson_destroy(&opts);
	}
	BSON_APPEND_UTF8(&sel, "_id", id);
	BSON_APPEND_BOOL(&uo, "upsert", true);
	if (!mongoc_bulk_operation_update_one_with_opts(u->bulk, &sel, update, &uo, &be))
		die("bulk update: %s", be.message);
	bson_destroy(&sel);
	bson_destroy(&uo);
	if (++u->n >= u->chunk)
		upserts_flush(u);
}

static void process_old(mongoc_client_t *c, const char *db, int ferretdb, bson_t **docs, size_t n)
{
	struct ev *ev = calloc(n ? n : 1, sizeof(*ev));
	const char *dedup_names[3] = { "old_dedup_counter", "old_dedup_stats", "old_dedup_identity" };
	mongoc_collection_t *counters = mongoc_client_get_collection(c, db, "event_counters");
	mongoc_collection_t *devices = mongoc_client_get_collection(c, db, "user_metrics");
	mongoc_collection_t *idmap = mongoc_client_get_collection(c, db, "identity_map");
	mongoc_collection_t *users = mongoc_client_get_collection(c, db, "username_metrics");
	mongoc_collection_t *signins = mongoc_client_get_collection(c, db, "signin_days");
	struct table tc = { 0 }, td = { 0 }, tu = { 0 }, ts = { 0 }, tl = { 0 };
	size_t chunk = ferretdb ? UPSERT_CHUNK : SIZE_MAX, m = 0;

	if (ev == NULL)
		die("out of memory");
	for (size_t i = 0; i < n; i++) {
		struct ev *e = &ev[m];
		bson_iter_t it;

		e->iid = doc_str(docs[i], "insert_id", &e->iid_len);
		e->event = doc_str(docs[i], "event", &e->event_len);
		e->did = doc_str(docs[i], "distinct_id", &e->did_len);
		e->user = doc_str(docs[i], "username", &e->user_len);
		if (!e->iid || !e->event || !e->did || !bson_iter_init_find(&it, docs[i], "created_at") ||
		    !BSON_ITER_HOLDS_DATE_TIME(&it))
			continue; /* malformed: the old code dropped it */
		e->t = bson_iter_date_time(&it);
		m++;
	}
	/* #1 (done in #817): dedup by bulk insert; #2 (not done): one pass and collection per consumer. */
	step("dedup x3");
	for (int k = 0; k < 3; k++) {
		mongoc_collection_t *dc = mongoc_client_get_collection(c, db, dedup_names[k]);

		dedup_pass(dc, ev, m, k);
		mongoc_collection_destroy(dc);
	}

	/* Counter consumer: one upsert per (event, day), batched. */
	for (size_t i = 0; i < m; i++)
		if (ev[i].fresh[0]) {
			char key[160], day[11];

			utc_day(ev[i].t, day);
			snprintf(key, sizeof(key), "%.*s|%s", (int)ev[i].event_len, ev[i].event, day);
			table_get(&tc, key, strlen(key))->n++;
		}
	step("event counters");
	if (tc.n) {
		struct upserts bulk = { counters, NULL, "event counters", 0, chunk };

		for (size_t i = 0; i < tc.cap; i++)
			if (tc.s[i].key) {
				bson_t u = BSON_INITIALIZER, inc;

				BSON_APPEND_DOCUMENT_BEGIN(&u, "$inc", &inc);
				BSON_APPEND_INT64(&inc, "count", tc.s[i].n);
				bson_append_document_end(&u, &inc);
				upsert_one(&bulk, tc.s[i].key, &u);
				bson_destroy(&u);
			}
		upserts_flush(&bulk);
	}

	/* Stats consumer, #3 done: upsertPerDistinctId batched. */
	for (size_t i = 0; i < m; i++)
		if (ev[i].fresh[1]) {
			struct slot *s = table_get(&td, ev[i].did, ev[i].did_len);

			s->n++;
			s->tmin = ev[i].t < s->tmin ? ev[i].t : s->tmin;
			s->tmax = ev[i].t > s->tmax ? ev[i].t : s->tmax;
		}
	step("per-device upserts");
	if (td.n) {
		struct upserts bulk = { devices, NULL, "per-device metrics", 0, chunk };

		for (size_t i = 0; i < td.cap; i++)
			if (td.s[i].key) {
				bson_t u = BSON_INITIALIZER, d;

				BSON_APPEND_DOCUMENT_BEGIN(&u, "$inc", &d);
				BSON_APPEND_INT64(&d, "count", td.s[i].n);
				bson_append_document_end(&u, &d);
				BSON_APPEND_DOCUMENT_BEGIN(&u, "$min", &d);
				BSON_APPEND_DATE_TIME(&d, "first_seen", td.s[i].tmin);
				bson_append_document_end(&u, &d);
				BSON_APPEND_DOCUMENT_BEGIN(&u, "$max", &d);
				BSON_APPEND_DATE_TIME(&d, "last_seen", td.s[i].tmax);
				bson_append_document_end(&u, &d);
				upsert_one(&bulk, td.s[i].key, &u);
				bson_destroy(&u);
			}
		upserts_flush(&bulk);
	}

	/* Identity consumer, #3 done: updateIdentityMap batched (username -> its devices). */
	for (size_t i = 0; i < m; i++)
		if (ev[i].fresh[2] && ev[i].user) {
			char key[600];

			snprintf(key, sizeof(key), "%.*s\x1f%.*s", (int)ev[i].user_len, ev[i].user, (int)ev[i].did_len,
				 ev[i].did);
			table_get(&tl, key, strlen(key))->n++;
			table_get(&tu, ev[i].user, ev[i].user_len)->n++;
		}
	step("identity map");
	if (tl.n) {
		struct upserts bulk = { idmap, NULL, "identity map", 0, chunk };

		for (size_t i = 0; i < tl.cap; i++)
			if (tl.s[i].key) {
				char *sep = strchr(tl.s[i].key, '\x1f');
				bson_t u = BSON_INITIALIZER, d;

				*sep = '\0';
				BSON_APPEND_DOCUMENT_BEGIN(&u, "$addToSet", &d);
				BSON_APPEND_UTF8(&d, "ids", sep + 1);
				bson_append_document_end(&u, &d);
				upsert_one(&bulk, tl.s[i].key, &u);
				bson_destroy(&u);
				*sep = '\x1f';
			}
		upserts_flush(&bulk);
	}

	/* upsertSignInDates: still a sequential updateOne per user (minor, daily_sign_in only). */
	for (size_t i = 0; i < m; i++)
		if (ev[i].fresh[1] && ev[i].user && ev[i].event_len == 13 && memcmp(ev[i].event, "daily_sign_in", 13) == 0) {
			char key[600], day[11];

			utc_day(ev[i].t, day);
			snprintf(key, sizeof(key), "%.*s\x1f%s", (int)ev[i].user_len, ev[i].user, day);
			table_get(&ts, key, strlen(key))->n++;
		}
	step("sign-in days (sequential)");
	for (size_t i = 0; i < ts.cap; i++)
		if (ts.s[i].key) {
			char *sep = strchr(ts.s[i].key, '\x1f');
			bson_t sel = BSON_INITIALIZER, u = BSON_INITIALIZER, d, uo = BSON_INITIALIZER;
			bson_error_t be;

			*sep = '\0';
			BSON_APPEND_UTF8(&sel, "_id", ts.s[i].key);
			BSON_APPEND_DOCUMENT_BEGIN(&u, "$addToSet", &d);
			BSON_APPEND_UTF8(&d, "days", sep + 1);
			bson_append_document_end(&u, &d);
			BSON_APPEND_BOOL(&uo, "upsert", true);
			if (!mongoc_collection_update_one(signins, &sel, &u, &uo, NULL, &be))
				die("sign-in days: %s", be.message);
			bson_destroy(&sel);
			bson_destroy(&u);
			bson_destroy(&uo);
		}

	/*
	 * #4 (NOT done, the bottleneck of issue #819): recomputeUsernameMetricsProjection.
	 * For each affected username, sequentially: 3 round trips + a full re-aggregation.
	 */
	step("per-username recompute (sequential)");
	for (size_t i = 0; i < tu.cap && !stop_flag; i++) {
		const char *u = tu.s[i].key;
		bson_t q = BSON_INITIALIZER, *found = NULL, f = BSON_INITIALIZER, opts = BSON_INITIALIZER;
		const bson_t *doc;
		mongoc_cursor_t *cur;
		bson_error_t be;
		bson_value_t *ids = NULL;
		size_t nids = 0;
		int64_t count = 0, tmin = INT64_MAX, tmax = INT64_MIN;

		if (u == NULL)
			continue;
		/* 1. identityMap.findOne({username}) */
		BSON_APPEND_UTF8(&q, "_id", u);
		BSON_APPEND_INT64(&opts, "limit", 1);
		cur = mongoc_collection_find_with_opts(idmap, &q, &opts, NULL);
		if (mongoc_cursor_next(cur, &doc))
			found = bson_copy(doc);
		if (mongoc_cursor_error(cur, &be))
			die("identity findOne: %s", be.message);
		mongoc_cursor_destroy(cur);
		bson_destroy(&q);
		bson_destroy(&opts);
		if (found) {
			bson_iter_t it, arr;

			if (bson_iter_init_find(&it, found, "ids") && bson_iter_recurse(&it, &arr)) {
				size_t cap = 0;

				while (bson_iter_next(&arr)) {
					if (nids == cap) {
						cap = cap ? cap * 2 : 8;
						ids = realloc(ids, cap * sizeof(*ids));
						if (ids == NULL)
							die("out of memory");
					}
					bson_value_copy(bson_iter_value(&arr), &ids[nids++]);
				}
			}
			bson_destroy(found);
		}
		/* 2. userMetrics.find({distinct_id: {$in: ids}}): every device document of the user. */
		if (nids) {
			in_filter(&f, "_id", ids, nids);
			cur = mongoc_collection_find_with_opts(devices, &f, NULL, NULL);
			/* 3. aggregateUserMetrics: re-sum the user's full history. */
			while (mongoc_cursor_next(cur, &doc)) {
				bson_iter_t it;

				count += doc_i64(doc, "count", 0);
				if (bson_iter_init_find(&it, doc, "first_seen") && BSON_ITER_HOLDS_DATE_TIME(&it) &&
				    bson_iter_date_time(&it) < tmin)
					tmin = bson_iter_date_time(&it);
				if (bson_iter_init_find(&it, doc, "last_seen") && BSON_ITER_HOLDS_DATE_TIME(&it) &&
				    bson_iter_date_time(&it) > tmax)
					tmax = bson_iter_date_time(&it);
			}
			if (mongoc_cursor_error(cur, &be))
				die("user devices: %s", be.message);
			mongoc_cursor_destroy(cur);
		}
		/* 4. usernameMetrics.updateOne(...) */
		{
			bson_t sel = BSON_INITIALIZER, upd = BSON_INITIALIZER, set, uo = BSON_INITIALIZER;

			BSON_APPEND_UTF8(&sel, "_id", u);
			BSON_APPEND_DOCUMENT_BEGIN(&upd, "$set", &set);
			BSON_APPEND_INT64(&set, "count", count);
			BSON_APPEND_INT64(&set, "devices", (int64_t)nids);
			if (nids) {
				BSON_APPEND_DATE_TIME(&set, "first_seen", tmin);
				BSON_APPEND_DATE_TIME(&set, "last_seen", tmax);
			}
			bson_append_document_end(&upd, &set);
			BSON_APPEND_BOOL(&uo, "upsert", true);
			if (!mongoc_collection_update_one(users, &sel, &upd, &uo, NULL, &be))
				die("username metrics: %s", be.message);
			bson_destroy(&sel);
			bson_destroy(&upd);
			bson_destroy(&uo);
		}
		bson_destroy(&f);
		for (size_t j = 0; j < nids; j++)
			bson_value_destroy(&ids[j]);
		free(ids);
	}

	table_free(&tc);
	table_free(&td);
	table_free(&tu);
	table_free(&ts);
	table_free(&tl);
	mongoc_collection_destroy(counters);
	mongoc_collection_destroy(devices);
	mongoc_collection_destroy(idmap);
	mongoc_collection_destroy(users);
	mongoc_collection_destroy(signins);
	free(ev);
}

static int run_old(const struct opts *o)
{
	int ferretdb;
	mongoc_client_t *c = connect_store(o->uri, &ferretdb);
	mongoc_collection_t *events = mongoc_client_get_collection(c, o->db, o->coll);
	int64_t t0 = tdr_mono_us(), total = 0, batches = 0;
	double cpu0 = cpu_s();

	while (!stop_flag && !timed_out(o, t0)) {
		bson_t **docs;
		size_t n;
		bson_value_t *ids;

		step("read head");
		n = read_head(events, o->batch, ferretdb, &docs);
		if (n == 0) {
			free(docs);
			break;
		}
		process_old(c, o->db, ferretdb, docs, n);
		step("delete batch");
		ids = calloc(n, sizeof(*ids));
		if (ids == NULL)
			die("out of memory");
		ids_of(docs, n, ids);
		delete_ids(events, ids, n);
		total += (int64_t)n;
		batches++;
		ids_free(ids, n);
		docs_free(docs, n);
	}
	report("old", total, batches, t0, cpu0, timed_out(o, t0) ? "timeout=1" : NULL);
	mongoc_collection_destroy(events);
	mongoc_client_destroy(c);
	return 0;
}

/* ------------------------------------------------------------ watch */

static int64_t metrics_sum(const char *files, const char *name)
{
	char *list = strdup(files), *save = NULL, *p;
	size_t nlen = strlen(name);
	int64_t sum = 0;

	if (list == NULL)
		die("out of memory");
	for (p = strtok_r(list, ",", &save); p; p = strtok_r(NULL, ",", &save)) {
		FILE *f = fopen(p, "re");
		char line[1024];

		if (f == NULL)
			continue; /* not written yet */
		while (fgets(line, sizeof(line), f))
			if (strncmp(line, name, nlen) == 0 && (line[nlen] == '{' || line[nlen] == ' ')) {
				char *sp = strrchr(line, ' ');

				if (sp)
					sum += (int64_t)strtod(sp + 1, NULL);
			}
		fclose(f);
	}
	free(list);
	return sum;
}

static int64_t visible_events(mongoc_collection_t *counters)
{
	bson_t filter = BSON_INITIALIZER, opts = BSON_INITIALIZER, proj;
	mongoc_cursor_t *cur;
	const bson_t *doc;
	bson_error_t be;
	int64_t sum = 0;

	BSON_APPEND_DOCUMENT_BEGIN(&opts, "projection", &proj);
	BSON_APPEND_INT32(&proj, "count", 1);
	bson_append_document_end(&opts, &proj);
	cur = mongoc_collection_find_with_opts(counters, &filter, &opts, NULL);
	while (mongoc_cursor_next(cur, &doc))
		sum += doc_i64(doc, "count", 0);
	if (mongoc_cursor_error(cur, &be))
		sum = -1;
	mongoc_cursor_destroy(cur);
	bson_destroy(&filter);
	bson_destroy(&opts);
	return sum;
}

static int fifo_empty(mongoc_collection_t *events)
{
	bson_t filter = BSON_INITIALIZER, opts = BSON_INITIALIZER, proj;
	mongoc_cursor_t *cur;
	const bson_t *doc;
	bson_error_t be;
	int empty;

	BSON_APPEND_INT64(&opts, "limit", 1);
	BSON_APPEND_DOCUMENT_BEGIN(&opts, "projection", &proj);
	BSON_APPEND_INT32(&proj, "_id", 1);
	bson_append_document_end(&opts, &proj);
	cur = mongoc_collection_find_with_opts(events, &filter, &opts, NULL);
	empty = !mongoc_cursor_next(cur, &doc);
	if (mongoc_cursor_error(cur, &be))
		empty = 0;
	mongoc_cursor_destroy(cur);
	bson_destroy(&filter);
	bson_destroy(&opts);
	return empty;
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return x < y ? -1 : x > y;
}

static int run_watch(const struct opts *o)
{
	int ferretdb;
	mongoc_client_t *c = connect_store(o->uri, &ferretdb);
	mongoc_collection_t *counters = mongoc_client_get_collection(c, o->db, "event_counters");
	mongoc_collection_t *events = mongoc_client_get_collection(c, o->db, o->coll);
	FILE *dat = NULL;
	int64_t t0 = tdr_mono_us(), vis = 0, acked = 0, t_empty = -1, t_visible = -1, t_prod_end = -1;
	pid_t prod = -1;
	int prod_status = 0;
	double *lat = NULL, *alat = NULL;
	int64_t nlat = 0, nalat = 0, acked_seen = 0;
	/* drain rate per batch: acknowledged since the previous change / time since it */
	int64_t chg_t = 0, chg_a = 0, rate = 0;

	if (o->dat && (dat = fopen(o->dat, "we")) == NULL)
		die("%s: %s", o->dat, strerror(errno));
	if (dat)
		fprintf(dat, "# seconds acknowledged backlog visible drain_rate(per batch: acknowledged since the previous change / its duration)\n");
	if (o->producer) {
		if (o->rate <= 0 || o->producer_batch <= 0)
			die("a producer needs --rate and --producer-batch");
		lat = calloc((size_t)o->total, sizeof(*lat));
		alat = calloc((size_t)o->total, sizeof(*alat));
		if (lat == NULL || alat == NULL)
			die("out of memory");
		t0 = tdr_mono_us();
		prod = fork();
		if (prod < 0)
			die("fork: %s", strerror(errno));
		if (prod == 0) {
			/* Our stdout is the one result line; the producer's own report goes to stderr. */
			if (dup2(STDERR_FILENO, STDOUT_FILENO) < 0)
				_exit(127);
			execv(o->producer[0], o->producer);
			fprintf(stderr, PROG ": exec %s: %s\n", o->producer[0], strerror(errno));
			_exit(127);
		}
	}
	while (!stop_flag) {
		int64_t now = tdr_mono_us(), t = now - t0, v;
		int empty;

		if (prod > 0 && t_prod_end < 0 && waitpid(prod, &prod_status, WNOHANG) == prod)
			t_prod_end = t;
		v = visible_events(counters);
		/* FerretDB applies an image as delete + insert: a read in between sees less. Keep the max. */
		if (v > vis) {
			if (lat) {
				for (int64_t k = vis + 1; k <= v && k <= o->total; k++) {
					int64_t b = (k + o->producer_batch - 1) / o->producer_batch;
					double due = (double)b * (double)o->producer_batch / o->rate;

					lat[nlat++] = (double)t / 1e6 - due;
				}
			}
			vis = v;
		}
		if (o->metrics)
			acked = metrics_sum(o->metrics, "tdrain_events_processed_total");
		/* The same for acknowledgement, from the replicas' metrics files (refreshed about every second). */
		if (alat && acked > acked_seen) {
			for (int64_t k = acked_seen + 1; k <= acked && k <= o->total; k++) {
				int64_t b = (k + o->producer_batch - 1) / o->producer_batch;

				alat[nalat++] = (double)t / 1e6 - (double)b * (double)o->producer_batch / o->rate;
			}
			acked_seen = acked;
		}
		/* The FIFO holds exactly the unacknowledged backlog: empty = every event acknowledged. */
		empty = !o->producer && t_empty < 0 && fifo_empty(events);
		if (empty)
			t_empty = t;
		if (vis >= o->total && t_visible < 0)
			t_visible = t;
		if (acked != chg_a) {
			rate = t > chg_t ? (acked - chg_a) * 1000000 / (t - chg_t) : 0;
			chg_a = acked;
			chg_t = t;
		}
		if (dat) {
			fprintf(dat, "%.3f %" PRId64 " %" PRId64 " %" PRId64 " %" PRId64 "\n", (double)t / 1e6, acked,
				o->total - acked, vis, rate);
			fflush(dat);
		}
		/* With a producer, also wait for the metrics to count every event acknowledged (their
		 * files are rewritten about once a second), so every event has an acknowledgement latency. */
		if (t_visible >= 0 &&
		    (o->producer ? t_prod_end >= 0 && (!o->metrics || acked >= o->total) : t_empty >= 0))
			break;
		if (o->timeout_s > 0 && t > o->timeout_s * 1000000)
			break;
		{
			int64_t next = now + o->interval_ms * 1000, left = next - tdr_mono_us();

			if (left > 0) {
				struct timespec ts = { left / 1000000, (left % 1000000) * 1000 };

				nanosleep(&ts, NULL);
			}
		}
	}
	if (prod > 0 && t_prod_end < 0) {
		kill(prod, SIGTERM);
		waitpid(prod, &prod_status, 0);
	}
	printf("mode=watch total=%" PRId64 " visible=%" PRId64 " acked=%" PRId64 " t_empty=%.3f t_visible=%.3f",
	       o->total, vis, acked, t_empty >= 0 ? (double)t_empty / 1e6 : -1.0,
	       t_visible >= 0 ? (double)t_visible / 1e6 : -1.0);
	if (lat) {
		double p50 = -1, p99 = -1, pmax = -1;

		if (nlat) {
			qsort(lat, (size_t)nlat, sizeof(*lat), cmp_double);
			p50 = lat[(size_t)((double)(nlat - 1) * 0.50)];
			p99 = lat[(size_t)((double)(nlat - 1) * 0.99)];
			pmax = lat[nlat - 1];
		}
		double a50 = -1, a99 = -1;

		if (nalat) {
			qsort(alat, (size_t)nalat, sizeof(*alat), cmp_double);
			a50 = alat[(size_t)((double)(nalat - 1) * 0.50)];
			a99 = alat[(size_t)((double)(nalat - 1) * 0.99)];
		}
		printf(" latency_n=%" PRId64 " p50=%.3f p99=%.3f max=%.3f ack_p50=%.3f ack_p99=%.3f producer_s=%.3f "
		       "producer_due_s=%.3f producer_rc=%d",
		       nlat, p50, p99, pmax, a50, a99, t_prod_end >= 0 ? (double)t_prod_end / 1e6 : -1.0,
		       (double)o->total / o->rate, WIFEXITED(prod_status) ? WEXITSTATUS(prod_status) : -1);
	}
	printf("\n");
	fflush(stdout);
	free(lat);
	free(alat);
	if (dat)
		fclose(dat);
	mongoc_collection_destroy(events);
	mongoc_collection_destroy(counters);
	mongoc_client_destroy(c);
	return t_visible >= 0 ? 0 : 2;
}

/* ------------------------------------------------------------ drop */

static int run_drop(const struct opts *o)
{
	int ferretdb;
	mongoc_client_t *c = connect_store(o->uri, &ferretdb);
	mongoc_database_t *db = mongoc_client_get_database(c, o->db);
	bson_error_t be;
	int rc = 0;

	if (!mongoc_database_drop(db, &be) && be.code != 26 /* NamespaceNotFound */) {
		fprintf(stderr, PROG ": drop %s: %s\n", o->db, be.message);
		rc = 1;
	}
	mongoc_database_destroy(db);
	mongoc_client_destroy(c);
	return rc;
}

/* ------------------------------------------------------------ main */

/* libmongoc's warnings, minus FerretDB's "no such command: 'endSessions'" at every disconnect. */
static void quiet_log(mongoc_log_level_t level, const char *domain, const char *message, void *data)
{
	(void)data;
	if (level > MONGOC_LOG_LEVEL_WARNING || strstr(message, "endSessions"))
		return;
	fprintf(stderr, PROG ": libmongoc %s: %s\n", domain, message);
}

static int parse_i64(const char *s, int64_t *ret)
{
	char *end;

	errno = 0;
	*ret = strtoll(s, &end, 10);
	return errno || end == s || *end ? -1 : 0;
}

int main(int argc, char **argv)
{
	enum { O_URI = 256, O_DB, O_COLL, O_BATCH, O_TOTAL, O_INTERVAL, O_METRICS, O_DAT, O_TIMEOUT, O_RATE, O_PBATCH,
	       O_SHAPE, O_READ, O_HELP };
	static const struct option lo[] = {
		{ "uri", required_argument, NULL, O_URI },
		{ "db", required_argument, NULL, O_DB },
		{ "coll", required_argument, NULL, O_COLL },
		{ "batch", required_argument, NULL, O_BATCH },
		{ "total", required_argument, NULL, O_TOTAL },
		{ "interval-ms", required_argument, NULL, O_INTERVAL },
		{ "metrics", required_argument, NULL, O_METRICS },
		{ "dat", required_argument, NULL, O_DAT },
		{ "timeout", required_argument, NULL, O_TIMEOUT },
		{ "rate", required_argument, NULL, O_RATE },
		{ "producer-batch", required_argument, NULL, O_PBATCH },
		{ "shape", required_argument, NULL, O_SHAPE },
		{ "read", required_argument, NULL, O_READ },
		{ "help", no_argument, NULL, O_HELP },
		{ NULL, 0, NULL, 0 },
	};
	struct opts o;
	struct sigaction sa;
	int ch, rc;

	memset(&o, 0, sizeof(o));
	o.db = "tdrain";
	o.coll = "events";
	o.batch = 1000;
	o.interval_ms = 1000;
	if (argc < 2 || argv[1][0] == '-') {
		usage(argc >= 2 && strcmp(argv[1], "--help") == 0 ? stdout : stderr);
		return argc >= 2 && strcmp(argv[1], "--help") == 0 ? 0 : 64;
	}
	o.mode = argv[1];
	optind = 2;
	while ((ch = getopt_long(argc, argv, "+", lo, NULL)) != -1) {
		int bad = 0;

		switch (ch) {
		case O_URI: o.uri = optarg; break;
		case O_DB: o.db = optarg; break;
		case O_COLL: o.coll = optarg; break;
		case O_METRICS: o.metrics = optarg; break;
		case O_DAT: o.dat = optarg; break;
		case O_SHAPE: o.shape = optarg; break;
		case O_READ: o.read = optarg; break;
		case O_BATCH: bad = parse_i64(optarg, &o.batch) || o.batch < 1; break;
		case O_TOTAL: bad = parse_i64(optarg, &o.total) || o.total < 0; break;
		case O_INTERVAL: bad = parse_i64(optarg, &o.interval_ms) || o.interval_ms < 1; break;
		case O_TIMEOUT: bad = parse_i64(optarg, &o.timeout_s); break;
		case O_PBATCH: bad = parse_i64(optarg, &o.producer_batch) || o.producer_batch < 1; break;
		case O_RATE: o.rate = strtod(optarg, NULL); bad = !(o.rate > 0); break;
		case O_HELP: usage(stdout); return 0;
		default: usage(stderr); return 64;
		}
		if (bad) {
			fprintf(stderr, PROG ": bad value for %s\n", argv[optind - 1]);
			return 64;
		}
	}
	if (optind < argc)
		o.producer = &argv[optind];
	if (o.uri == NULL) {
		usage(stderr);
		return 64;
	}
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_signal;
	sa.sa_flags = SA_RESETHAND; /* a second signal kills, even inside a blocking store call */
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);
	mongoc_init();
	mongoc_log_set_handler(quiet_log, NULL);
	if (strcmp(o.mode, "raw") == 0)
		rc = run_raw(&o);
	else if (strcmp(o.mode, "old") == 0)
		rc = run_old(&o);
	else if (strcmp(o.mode, "watch") == 0)
		rc = run_watch(&o);
	else if (strcmp(o.mode, "drop") == 0)
		rc = run_drop(&o);
	else if (strcmp(o.mode, "prepare") == 0)
		rc = run_prepare(&o);
	else if (strcmp(o.mode, "rtt") == 0)
		rc = run_rtt(&o);
	else {
		usage(stderr);
		rc = 64;
	}
	mongoc_cleanup();
	return rc;
}
