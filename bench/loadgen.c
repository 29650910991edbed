/*
 * loadgen.c - tdrain-loadgen: fills the FIFO with realistic telemetry.
 *
 * Used by the demo, the integration tests and the benchmark.  It plays the
 * producer of docs/EVENTS.md: it knows nothing about tdrain except the event
 * contract and (optionally) the partition hash.
 *
 * The event stream models a fleet of devices running a CLI:
 *   - ~90% cli_invocation, ~8% daily_sign_in, the rest other well-formed names
 *     (extension_installed, config.changed, ui:open, web/page-view) so that
 *     "any well-formed name is counted" is exercised;
 *   - created_at advances through [base, base + days) roughly in insertion
 *     order, with +-2 min of jitter so "latest created_at" and "last inserted"
 *     disagree now and then, as they do in a real FIFO;
 *   - a fraction of devices sign in at some instant: their earlier events carry
 *     no username, later ones do ("device linked after it already sent
 *     events"); a few of those switch username once (re-link), and a few of
 *     the re-linkers end with two signed-in events at the same millisecond
 *     under both usernames (the identity tie-break);
 *   - --dup-ratio re-inserts some events later as a second document with a new
 *     _id and the same insert_id and content (producer retries).
 * Generation is streaming: memory is O(devices + batch + pending duplicates),
 * never O(count).
 *
 * --malformed-corpus inserts one document per malformed kind (table `corpus`
 * in corpus.c, with the reason prefix tdrain must give), plus a few valid
 * documents that sit exactly on the contract's limits, and writes a manifest
 * the checker (tests/checker.py) reads.  With --count as well, the corpus is
 * spread evenly through the normal events, so a test also sees that a bad
 * document never blocks the good ones behind it.
 */
#include "config.h"

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <mongoc/mongoc.h>

#include "bench/loadgen.h"
#include "lib/clock.h"
#include "lib/conf.h"
#include "lib/err.h"
#include "lib/hash.h"
#include "lib/store.h"

#define PROG "tdrain-loadgen"
#define DAY_MS 86400000LL
#define JITTER_MS 120000LL      /* created_at jitter around the stream's clock */
#define DUP_DELAY_MAX 2000      /* a duplicate follows its original within this many events */
#define RELINK_RATIO 0.05       /* of signed-in devices, those that switch username once */
#define TIE_RATIO 0.25          /* of re-linkers, those that end on a same-ms tie */

static volatile sig_atomic_t stop_flag;

static void on_signal(int sig)
{
	(void)sig;
	stop_flag = 1;
}

/* ------------------------------------------------------------------------ */
/* Options                                                                  */

struct opts {
	const char *uri;
	const char *db;
	const char *coll;
	const char *ndjson;
	const char *manifest;
	int64_t count;
	int64_t devices;
	int64_t users;
	double signed_ratio;
	double dup_ratio;
	int64_t partitions;   /* 0: do not write part */
	double rate;          /* 0: as fast as possible */
	int64_t burst;        /* with rate: the first burst documents as fast as possible */
	int64_t max_backlog;  /* 0: never wait for the FIFO */
	int64_t batch;
	uint64_t seed;
	int64_t start_ms;
	int start_given;
	int64_t days;
	int quiet;
	int corpus;
};

static void usage(FILE *out)
{
	fprintf(out,
		"usage: " PROG " --uri URI --count N [options]\n"
		"  --uri URI              MongoDB URI (required)\n"
		"  --db NAME              database (default tdrain)\n"
		"  --coll NAME            FIFO collection (default events)\n"
		"  --count N              unique events to generate (duplicates and corpus come on top)\n"
		"  --devices D            fleet size (default 5000)\n"
		"  --users U              distinct usernames (default 1500)\n"
		"  --signed-in-ratio R    fraction of devices that sign in at some point (default 0.3)\n"
		"  --dup-ratio X          fraction of events re-inserted with a new _id, same insert_id (default 0)\n"
		"  --partitions P         write part = fnv1a32(canonical _id) %% P (default: no part)\n"
		"  --rate EPS             steady insert rate in documents/s (default: as fast as possible)\n"
		"  --burst N              with --rate: insert the first N documents as fast as possible\n"
		"                         (a pre-loaded backlog), then keep to the rate\n"
		"  --batch N              documents per insert_many (default 1000)\n"
		"  --max-backlog N        before each insert, wait while the FIFO holds N documents or more\n"
		"                         (an ingest that answers 503 when the backlog is too deep)\n"
		"  --seed S               random seed for the fleet and the stream (default 1)\n"
		"  --ndjson FILE          append every inserted document as canonical Extended JSON v2\n"
		"  --start-ms MS          created_at base (default: UTC midnight of yesterday)\n"
		"  --days N               spread created_at over N days from the base (default 2)\n"
		"  --malformed-corpus     insert one document of each malformed kind (plus limit cases)\n"
		"  --manifest FILE        with --malformed-corpus: write {\"_id\",\"reason\"} per bad document\n"
		"  --quiet                no progress lines\n");
}

static int parse_f(const char *s, double lo, double hi, double *ret)
{
	char *end;
	double v;

	errno = 0;
	v = strtod(s, &end);
	if (errno || end == s || *end || !(v >= lo && v <= hi))
		return -1;
	*ret = v;
	return 0;
}

static int parse_opts(int argc, char **argv, struct opts *o)
{
	enum { O_URI = 256, O_DB, O_COLL, O_COUNT, O_DEVICES, O_USERS, O_SIGNED, O_DUP, O_PARTS, O_RATE,
	       O_BATCH, O_SEED, O_NDJSON, O_START, O_DAYS, O_QUIET, O_CORPUS, O_MANIFEST, O_MAXBACKLOG, O_BURST,
	       O_HELP };
	static const struct option lo[] = {
		{ "uri", required_argument, NULL, O_URI },
		{ "db", required_argument, NULL, O_DB },
		{ "coll", required_argument, NULL, O_COLL },
		{ "count", required_argument, NULL, O_COUNT },
		{ "devices", required_argument, NULL, O_DEVICES },
		{ "users", required_argument, NULL, O_USERS },
		{ "signed-in-ratio", required_argument, NULL, O_SIGNED },
		{ "dup-ratio", required_argument, NULL, O_DUP },
		{ "partitions", required_argument, NULL, O_PARTS },
		{ "rate", required_argument, NULL, O_RATE },
		{ "burst", required_argument, NULL, O_BURST },
		{ "max-backlog", required_argument, NULL, O_MAXBACKLOG },
		{ "batch", required_argument, NULL, O_BATCH },
		{ "seed", required_argument, NULL, O_SEED },
		{ "ndjson", required_argument, NULL, O_NDJSON },
		{ "start-ms", required_argument, NULL, O_START },
		{ "days", required_argument, NULL, O_DAYS },
		{ "quiet", no_argument, NULL, O_QUIET },
		{ "malformed-corpus", no_argument, NULL, O_CORPUS },
		{ "manifest", required_argument, NULL, O_MANIFEST },
		{ "help", no_argument, NULL, O_HELP },
		{ NULL, 0, NULL, 0 },
	};
	int c, count_given = 0;
	int64_t v;

	memset(o, 0, sizeof(*o));
	o->db = "tdrain";
	o->coll = "events";
	o->devices = 5000;
	o->users = 1500;
	o->signed_ratio = 0.3;
	o->batch = 1000;
	o->seed = 1;
	o->days = 2;
	while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
		const char *bad = NULL;

		switch (c) {
		case O_URI: o->uri = optarg; break;
		case O_DB: o->db = optarg; break;
		case O_COLL: o->coll = optarg; break;
		case O_NDJSON: o->ndjson = optarg; break;
		case O_MANIFEST: o->manifest = optarg; break;
		case O_QUIET: o->quiet = 1; break;
		case O_CORPUS: o->corpus = 1; break;
		case O_COUNT:
			count_given = 1;
			if (tdr_parse_i64(optarg, 0, INT64_C(1) << 40, &o->count))
				bad = "--count";
			break;
		case O_DEVICES:
			if (tdr_parse_i64(optarg, 1, 50000000, &o->devices))
				bad = "--devices";
			break;
		case O_USERS:
			if (tdr_parse_i64(optarg, 1, 1000000000, &o->users))
				bad = "--users";
			break;
		case O_SIGNED:
			if (parse_f(optarg, 0, 1, &o->signed_ratio))
				bad = "--signed-in-ratio";
			break;
		case O_DUP:
			if (parse_f(optarg, 0, 1, &o->dup_ratio))
				bad = "--dup-ratio";
			break;
		case O_PARTS:
			if (tdr_parse_i64(optarg, 1, INT32_MAX, &o->partitions))
				bad = "--partitions";
			break;
		case O_RATE:
			if (parse_f(optarg, 0.001, 1e9, &o->rate))
				bad = "--rate";
			break;
		case O_BURST:
			if (tdr_parse_i64(optarg, 0, INT64_MAX, &o->burst))
				bad = "--burst";
			break;
		case O_MAXBACKLOG:
			if (tdr_parse_i64(optarg, 1, INT64_MAX, &o->max_backlog))
				bad = "--max-backlog";
			break;
		case O_BATCH:
			if (tdr_parse_i64(optarg, 1, 100000, &o->batch))
				bad = "--batch";
			break;
		case O_SEED:
			if (tdr_parse_i64(optarg, 0, INT64_MAX, &v))
				bad = "--seed";
			else
				o->seed = (uint64_t)v;
			break;
		case O_START:
			/* Year 1 .. 9999 keeps every created_at printable as YYYY-MM-DD. */
			if (tdr_parse_i64(optarg, INT64_C(-62135596800000), INT64_C(253402300799999) - 400 * DAY_MS,
					  &o->start_ms))
				bad = "--start-ms";
			o->start_given = 1;
			break;
		case O_DAYS:
			if (tdr_parse_i64(optarg, 1, 365, &o->days))
				bad = "--days";
			break;
		case O_HELP: usage(stdout); exit(0);
		default: usage(stderr); return -1;
		}
		if (bad) {
			fprintf(stderr, PROG ": bad value for %s: %s\n", bad, optarg);
			return -1;
		}
	}
	if (optind < argc) {
		fprintf(stderr, PROG ": unexpected argument: %s\n", argv[optind]);
		return -1;
	}
	if (o->uri == NULL) {
		fprintf(stderr, PROG ": --uri is required\n");
		return -1;
	}
	if (!count_given && !o->corpus) {
		fprintf(stderr, PROG ": --count is required (or --malformed-corpus)\n");
		return -1;
	}
	if (o->manifest && !o->corpus) {
		fprintf(stderr, PROG ": --manifest needs --malformed-corpus\n");
		return -1;
	}
	if (!o->start_given) {
		/* Midnight-aligned, so --days N touches exactly N UTC days. */
		int64_t y = tdr_wall_ms() - DAY_MS;

		o->start_ms = y - y % DAY_MS;
	}
	return 0;
}

/* ------------------------------------------------------------------------ */
/* Random numbers: splitmix64, deterministic per --seed                     */

static uint64_t rng_state;

static uint64_t rng_next(void)
{
	uint64_t z = (rng_state += 0x9e3779b97f4a7c15ULL);

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
	return z ^ (z >> 31);
}

static double rng_u01(void)
{
	return (double)(rng_next() >> 11) * (1.0 / 9007199254740992.0);
}

static uint64_t rng_below(uint64_t n)
{
	return n ? rng_next() % n : 0;
}

/* ------------------------------------------------------------------------ */
/* The fleet                                                                */

#define NEVER INT64_MAX

struct device {
	char id[24];        /* "dev-" + 16 hex */
	int64_t sign_at;    /* created_at from which events carry a username; NEVER if none */
	int64_t relink_at;  /* created_at from which they carry user2; NEVER if no re-link */
	int64_t last_t;     /* latest created_at emitted so far */
	int64_t user, user2;
	unsigned tie : 1;     /* ends with a same-ms pair (user, user2) */
	unsigned retired : 1; /* emitted its tie pair: no later events, so the tie decides */
};

static void user_name(int64_t k, char buf[32])
{
	snprintf(buf, 32, "user-%" PRId64, k);
}

static int fleet_init(struct gen *g)
{
	const struct opts *o = g->o;

	g->ndev = o->devices;
	g->dev = calloc((size_t)g->ndev, sizeof(*g->dev));
	if (g->dev == NULL)
		return -1;
	for (int64_t i = 0; i < g->ndev; i++) {
		struct device *d = &g->dev[i];

		/* 64 random bits: a collision would merge two devices, harmless but unlikely. */
		snprintf(d->id, sizeof(d->id), "dev-%016" PRIx64, rng_next());
		d->sign_at = d->relink_at = NEVER;
		d->last_t = INT64_MIN;
		if (rng_u01() >= o->signed_ratio)
			continue;
		/* Sign in somewhere in the first 5%..60% of the period: events before it are anonymous. */
		d->sign_at = g->base + (int64_t)((0.05 + 0.55 * rng_u01()) * (double)g->span);
		d->user = (int64_t)rng_below((uint64_t)o->users);
		if (o->users > 1 && rng_u01() < RELINK_RATIO) {
			int64_t rest = g->base + g->span - d->sign_at;

			d->relink_at = d->sign_at + (int64_t)((0.3 + 0.5 * rng_u01()) * (double)rest);
			d->user2 = (d->user + 1 + (int64_t)rng_below((uint64_t)o->users - 1)) % o->users;
			d->tie = rng_u01() < TIE_RATIO;
		}
	}
	return 0;
}

/* Skewed pick: a few devices are heavy users, as in any fleet. */
static struct device *pick_device(struct gen *g)
{
	double u = rng_u01();
	int64_t i = (int64_t)(u * u * (double)g->ndev);

	if (i >= g->ndev)
		i = g->ndev - 1;
	/* Retired devices are few (ties only); at least one device is never retired. */
	for (int64_t n = 0; g->dev[i].retired && n < g->ndev; n++)
		i = (i + 1) % g->ndev;
	return &g->dev[i];
}

/* Username a device's event at time t carries: -1 for none. */
static int64_t user_at(const struct device *d, int64_t t)
{
	if (t < d->sign_at)
		return -1;
	return t >= d->relink_at ? d->user2 : d->user;
}

/* ------------------------------------------------------------------------ */
/* Documents                                                                */

/* A uuid-like insert_id.  Its first 96 bits come from a fresh ObjectId, which is
 * unique per process and across processes, so two runs with one --seed never
 * share an insert_id (sharing one would make them "the same event"). */
void make_insert_id(char buf[37])
{
	bson_oid_t oid;
	uint32_t r = (uint32_t)rng_next();
	const uint8_t *b = oid.bytes;

	bson_oid_init(&oid, NULL);
	snprintf(buf, 37, "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%08" PRIx32, b[0], b[1], b[2],
		 b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], r);
}

static const char *const commands[] = { "run",  "build", "deploy", "login", "status",
					"logs", "init",  "test",   "config get", "version" };

static void append_properties(bson_t *body, const char *event)
{
	bson_t p;
	char ver[32];

	BSON_APPEND_DOCUMENT_BEGIN(body, "properties", &p);
	if (strcmp(event, "cli_invocation") == 0) {
		uint64_t r = rng_next();
		int32_t code = (r & 0xff) < 230 ? 0 : ((r & 0xff) < 245 ? 1 : ((r & 0xff) < 252 ? 2 : 130));
		int64_t scale = INT64_C(50) << ((r >> 8) % 8);

		snprintf(ver, sizeof(ver), "1.%u.%u", (unsigned)((r >> 16) % 12), (unsigned)((r >> 24) % 20));
		BSON_APPEND_UTF8(&p, "command", commands[(r >> 32) % (sizeof(commands) / sizeof(commands[0]))]);
		BSON_APPEND_UTF8(&p, "version", ver);
		BSON_APPEND_INT32(&p, "exit_code", code);
		BSON_APPEND_INT64(&p, "duration_ms", scale + (int64_t)((r >> 40) % (uint64_t)scale));
	} else if (strcmp(event, "daily_sign_in") == 0) {
		/* BSON_APPEND_UTF8 evaluates its value twice (strlen): pick it once. */
		const char *method = rng_below(4) ? "browser" : "token";

		BSON_APPEND_UTF8(&p, "method", method);
	} else if (strcmp(event, "extension_installed") == 0) {
		const char *ext = rng_below(2) ? "vscode" : "jetbrains";

		BSON_APPEND_UTF8(&p, "extension", ext);
	} else if (strcmp(event, "config.changed") == 0) {
		BSON_APPEND_UTF8(&p, "key", "telemetry.level");
	} else {
		BSON_APPEND_UTF8(&p, "panel", "history");
	}
	bson_append_document_end(body, &p);
}

/* Everything but _id and part: what an original and its duplicates share. */
static void make_body(bson_t *body, const char *event, const struct device *d, int64_t user, int64_t t)
{
	char iid[37], uname[32];

	make_insert_id(iid);
	BSON_APPEND_UTF8(body, "insert_id", iid);
	BSON_APPEND_UTF8(body, "event", event);
	BSON_APPEND_UTF8(body, "distinct_id", d->id);
	if (user >= 0) {
		user_name(user, uname);
		BSON_APPEND_UTF8(body, "username", uname);
	}
	BSON_APPEND_DATE_TIME(body, "created_at", t);
	append_properties(body, event);
}

/* Prefix a body with an _id (a fresh ObjectId when id is NULL) and append part. */
int finish_doc(const struct gen *g, bson_t *doc, const bson_t *body, const bson_value_t *id)
{
	char hex[25];
	const char *key = NULL;
	size_t keylen = 0;

	if (id == NULL) {
		bson_oid_t oid;

		bson_oid_init(&oid, NULL);
		BSON_APPEND_OID(doc, "_id", &oid);
		bson_oid_to_string(&oid, hex);
		key = hex;
		keylen = 24;
	} else {
		if (!BSON_APPEND_VALUE(doc, "_id", id))
			return -1;
		if (id->value_type == BSON_TYPE_UTF8) {
			key = id->value.v_utf8.str;
			keylen = id->value.v_utf8.len;
		}
	}
	if (!bson_concat(doc, body))
		return -1;
	/* The canonical key is defined for ObjectId and string _ids only; others get no part. */
	if (g->o->partitions > 0 && key != NULL &&
	    !BSON_APPEND_INT32(doc, "part", (int32_t)(tdr_fnv1a32(key, keylen) % (uint32_t)g->o->partitions)))
		return -1;
	return 0;
}

static int heap_push(struct gen *g, int64_t due, bson_t *body)
{
	size_t i;

	if (g->nheap == g->capheap) {
		size_t cap = g->capheap ? g->capheap * 2 : 64;
		struct dup *h = realloc(g->heap, cap * sizeof(*h));

		if (h == NULL)
			return -1;
		g->heap = h;
		g->capheap = cap;
	}
	i = g->nheap++;
	while (i > 0 && g->heap[(i - 1) / 2].due > due) {
		g->heap[i] = g->heap[(i - 1) / 2];
		i = (i - 1) / 2;
	}
	g->heap[i].due = due;
	g->heap[i].body = body;
	return 0;
}

static bson_t *heap_pop(struct gen *g)
{
	bson_t *top = g->heap[0].body;
	struct dup last = g->heap[--g->nheap];
	size_t i = 0;

	for (;;) {
		size_t c = 2 * i + 1;

		if (c >= g->nheap)
			break;
		if (c + 1 < g->nheap && g->heap[c + 1].due < g->heap[c].due)
			c++;
		if (g->heap[c].due >= last.due)
			break;
		g->heap[i] = g->heap[c];
		i = c;
	}
	if (g->nheap > 0)
		g->heap[i] = last;
	return top;
}

/* The stream's clock for event number i, with jitter, kept inside the period. */
static int64_t event_time(const struct gen *g, int64_t i)
{
	int64_t count = g->o->count > 0 ? g->o->count : 1;
	int64_t t = g->base + (int64_t)(((double)i + rng_u01()) * (double)g->span / (double)count);

	t += (int64_t)rng_below(2 * JITTER_MS + 1) - JITTER_MS;
	if (t < g->base)
		t = g->base;
	if (t >= g->base + g->span)
		t = g->base + g->span - 1;
	return t;
}

/* One original event into body (may also queue a tie partner in g->pending). */
static int gen_original(struct gen *g, bson_t *body)
{
	static const char *const others[] = { "extension_installed", "config.changed", "ui:open",
					      "web/page-view" };
	int64_t t = event_time(g, g->made);
	double r = rng_u01();
	const char *event;
	struct device *d = pick_device(g);
	int64_t user;

	if (r < 0.90) {
		event = "cli_invocation";
	} else if (r < 0.98) {
		event = "daily_sign_in";
		/* Sign-ins come from signed-in devices; a few tries, else an anonymous one. */
		for (int k = 0; k < 8 && user_at(d, t) < 0; k++)
			d = pick_device(g);
	} else {
		event = others[rng_below(sizeof(others) / sizeof(others[0]))];
	}
	user = user_at(d, t);
	if (d->tie && t >= d->relink_at && g->made + 2 <= g->o->count) {
		/* Two signed-in events at one millisecond, one per username, as the
		 * device's latest events: identity_map must pick the greater name. */
		bson_t *partner = bson_new();

		if (partner == NULL)
			return -1;
		if (t < d->last_t)
			t = d->last_t;
		make_body(partner, "daily_sign_in", d, d->user, t);
		g->pending = partner;
		d->retired = 1;
		user = d->user2;
	}
	if (t > d->last_t)
		d->last_t = t;
	make_body(body, event, d, user, t);
	g->made++;
	if (g->o->dup_ratio > 0 && rng_u01() < g->o->dup_ratio) {
		bson_t *copy = bson_copy(body);

		if (copy == NULL || heap_push(g, g->made + 1 + (int64_t)rng_below(DUP_DELAY_MAX), copy)) {
			bson_destroy(copy);
			return -1;
		}
	}
	return 0;
}

/* ------------------------------------------------------------------------ */
/* The generator: one document at a time, in the order it is inserted       */

enum doc_kind { D_EVENT, D_DUP, D_BAD, D_EDGE };

/* Next document into doc; returns 1, 0 when the stream is over, -1 on error. */
static int gen_next(struct gen *g, bson_t *doc, int *ret_kind)
{
	const struct opts *o = g->o;
	bson_t body;
	int rc;

	if (g->pending) {
		rc = finish_doc(g, doc, g->pending, NULL);
		bson_destroy(g->pending);
		g->pending = NULL;
		g->made++;
		*ret_kind = D_EVENT;
		return rc ? -1 : 1;
	}
	/* Corpus entries spread evenly over the normal events. */
	if (o->corpus && g->ci < ncorpus && (o->count == 0 || g->made >= (int64_t)g->ci * o->count / (int64_t)ncorpus)) {
		char idjson[200];
		size_t k = g->ci++;

		if (corpus[k].bad_utf8 && g->skip_bad_utf8)
			return gen_next(g, doc, ret_kind);
		if (corpus_doc(g, k, doc, idjson, sizeof(idjson)))
			return -1;
		if (corpus[k].reason) {
			g->bad++;
			*ret_kind = D_BAD;
			if (g->manifest)
				fprintf(g->manifest, "{\"_id\": %s, \"reason\": \"%s\"}\n", idjson, corpus[k].reason);
		} else {
			g->edge++;
			*ret_kind = D_EDGE;
		}
		return 1;
	}
	if (g->nheap > 0 && (g->heap[0].due <= g->made || g->made >= o->count)) {
		bson_t *b = heap_pop(g);

		rc = finish_doc(g, doc, b, NULL);
		bson_destroy(b);
		g->dups++;
		*ret_kind = D_DUP;
		return rc ? -1 : 1;
	}
	if (g->made >= o->count)
		return 0;
	bson_init(&body);
	rc = gen_original(g, &body);
	if (rc == 0)
		rc = finish_doc(g, doc, &body, NULL);
	bson_destroy(&body);
	*ret_kind = D_EVENT;
	return rc ? -1 : 1;
}

static void gen_free(struct gen *g)
{
	while (g->nheap > 0)
		bson_destroy(heap_pop(g));
	free(g->heap);
	bson_destroy(g->pending);
	free(g->dev);
}

/* ------------------------------------------------------------------------ */
/* Output                                                                   */

/* One NDJSON line.  Canonical Extended JSON cannot hold invalid UTF-8, so such
 * documents (corpus only) are written as {"$tdrain_raw_hex": "<BSON bytes>"},
 * which tests/checker.py decodes byte for byte. */
static int write_ndjson(FILE *f, const bson_t *doc)
{
	size_t len;
	char *json = bson_as_canonical_extended_json(doc, &len);
	int rc = 0;

	if (json) {
		if (fwrite(json, 1, len, f) != len || fputc('\n', f) == EOF)
			rc = -1;
		bson_free(json);
		return rc;
	}
	const uint8_t *p = bson_get_data(doc);

	if (fputs("{\"$tdrain_raw_hex\": \"", f) == EOF)
		return -1;
	for (uint32_t i = 0; i < doc->len; i++)
		if (fprintf(f, "%02x", p[i]) < 0)
			return -1;
	return fputs("\"}\n", f) == EOF ? -1 : 0;
}

/* ------------------------------------------------------------------------ */
/* Inserting                                                                */

struct batch {
	bson_t **docs;
	size_t n, cap;
	int validate; /* 0 once a corpus document is in: libmongoc would refuse invalid UTF-8 */
};

/* Insert the batch (unordered, acknowledged), then log it to the NDJSON file. */
static int flush_batch(mongoc_collection_t *coll, struct batch *b, FILE *nd)
{
	mongoc_bulk_operation_t *bulk;
	bson_t opts = BSON_INITIALIZER, iopts = BSON_INITIALIZER, reply = BSON_INITIALIZER;
	bson_error_t be;
	int rc = 0;

	if (b->n == 0)
		return 0;
	BSON_APPEND_BOOL(&opts, "ordered", false);
	bulk = mongoc_collection_create_bulk_operation_with_opts(coll, &opts);
	if (!b->validate)
		BSON_APPEND_BOOL(&iopts, "validate", false);
	for (size_t i = 0; i < b->n && rc == 0; i++)
		if (!mongoc_bulk_operation_insert_with_opts(bulk, b->docs[i], &iopts, &be)) {
			fprintf(stderr, PROG ": insert: %s\n", be.message);
			rc = -1;
		}
	if (rc == 0 && !mongoc_bulk_operation_execute(bulk, &reply, &be)) {
		char *r = bson_as_relaxed_extended_json(&reply, NULL);

		/* Partially inserted or not, the NDJSON would lie: stop here. */
		fprintf(stderr, PROG ": insert_many failed: %s\n" PROG ": reply: %.2000s\n", be.message,
			r ? r : "?");
		bson_free(r);
		rc = -1;
	}
	bson_destroy(&reply); /* execute re-initialises it; before execute it is the empty initializer */
	mongoc_bulk_operation_destroy(bulk);
	bson_destroy(&opts);
	bson_destroy(&iopts);
	for (size_t i = 0; i < b->n; i++) {
		if (rc == 0 && nd && write_ndjson(nd, b->docs[i])) {
			fprintf(stderr, PROG ": writing NDJSON: %s\n", strerror(errno));
			rc = -1;
		}
		bson_destroy(b->docs[i]);
	}
	b->n = 0;
	b->validate = 1;
	return rc;
}

/*
 * FerretDB stores strings as Go strings through JSON and replaces invalid
 * UTF-8 with U+FFFD on insert, so a document with invalid UTF-8 arrives at
 * tdrain already "repaired" (and then valid): those corpus kinds cannot be
 * tested against it.  MongoDB stores the bytes as sent.
 */
static int store_is_ferretdb(mongoc_client_t *client, int *ret)
{
	bson_t cmd = BSON_INITIALIZER, reply;
	bson_error_t be;
	bson_iter_t it;
	int rc = 0;

	BSON_APPEND_INT32(&cmd, "buildInfo", 1);
	if (!mongoc_client_command_simple(client, "admin", &cmd, NULL, &reply, &be)) {
		fprintf(stderr, PROG ": buildInfo: %s\n", be.message);
		rc = -1;
	} else {
		*ret = bson_iter_init_find(&it, &reply, "ferretdbVersion");
	}
	bson_destroy(&reply);
	bson_destroy(&cmd);
	return rc;
}

/*
 * Wait while the FIFO holds max or more documents.  The count is exact and
 * stops at max (tdr_store_count: collStats on FerretDB, a $limit-ed count
 * elsewhere), so a check reads at most max documents; an estimate would not
 * do: DocumentDB's comes from PostgreSQL statistics, which can say 85,000
 * for an empty FIFO and keep producers waiting for ever.  Returns the
 * microseconds waited, or -1 on a store error or a stop signal.
 */
static void sleep_until_us(int64_t due_us);

static int64_t wait_backlog(tdr_store *fifo, mongoc_client_t *client, const char *coll, int64_t max)
{
	int64_t t0 = tdr_mono_us(), n = 0;

	for (;;) {
		tdr_err err;

		if (tdr_store_count(fifo, client, coll, max, &n, NULL, &err) < 0) {
			fprintf(stderr, PROG ": counting the FIFO: %s\n", err.msg);
			return -1;
		}
		if (n < max)
			return tdr_mono_us() - t0;
		if (stop_flag)
			return -1;
		sleep_until_us(tdr_mono_us() + 250000);
	}
}

/* libmongoc's own diagnostics, minus the one FerretDB always triggers at exit
 * (it has no endSessions command): that warning says nothing about the run. */
static void on_mongoc_log(mongoc_log_level_t level, const char *domain, const char *message, void *data)
{
	(void)data;
	if (level > MONGOC_LOG_LEVEL_WARNING || strstr(message, "endSessions"))
		return;
	fprintf(stderr, PROG ": %s: %s\n", domain, message);
}

static void sleep_until_us(int64_t due_us)
{
	int64_t now;

	while (!stop_flag && (now = tdr_mono_us()) < due_us) {
		int64_t d = due_us - now;
		struct timespec ts = { d / 1000000, (d % 1000000) * 1000 };

		nanosleep(&ts, NULL);
	}
}

int main(int argc, char **argv)
{
	struct opts o;
	struct gen g;
	struct batch b = { 0 };
	tdr_store fifo;
	mongoc_uri_t *uri = NULL;
	mongoc_client_t *client = NULL;
	mongoc_collection_t *coll = NULL;
	mongoc_write_concern_t *wc = NULL;
	bson_error_t be;
	FILE *nd = NULL;
	int64_t sub, t0, last_report, inserted = 0;
	int64_t pace_t0 = 0, pace_base = 0;
	int paced = 0;
	int rc = 1, more = 1;
	struct sigaction sa;

	if (parse_opts(argc, argv, &o))
		return 2;
	memset(&fifo, 0, sizeof(fifo));
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_signal;
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);

	memset(&g, 0, sizeof(g));
	g.o = &o;
	g.base = o.start_ms;
	g.span = o.days * DAY_MS;
	rng_state = o.seed;
	mongoc_init();
	mongoc_log_set_handler(on_mongoc_log, NULL);
	if (fleet_init(&g)) {
		fprintf(stderr, PROG ": out of memory for %" PRId64 " devices\n", o.devices);
		goto out;
	}
	/* With --rate, small batches (~20 a second) keep the flow steady. */
	sub = o.batch;
	if (o.rate > 0) {
		sub = (int64_t)(o.rate / 20);
		if (sub < 1)
			sub = 1;
		if (sub > o.batch)
			sub = o.batch;
	}
	/* A burst sends full batches; the paced part fills only sub of them. */
	b.cap = (size_t)(o.burst > 0 ? o.batch : sub);
	b.validate = 1;
	b.docs = calloc(b.cap, sizeof(*b.docs));
	if (b.docs == NULL) {
		fprintf(stderr, PROG ": out of memory\n");
		goto out;
	}
	if (o.ndjson && (nd = fopen(o.ndjson, "a")) == NULL) {
		fprintf(stderr, PROG ": %s: %s\n", o.ndjson, strerror(errno));
		goto out;
	}
	if (o.manifest && (g.manifest = fopen(o.manifest, "w")) == NULL) {
		fprintf(stderr, PROG ": %s: %s\n", o.manifest, strerror(errno));
		goto out;
	}

	uri = mongoc_uri_new_with_error(o.uri, &be);
	if (uri == NULL) {
		fprintf(stderr, PROG ": --uri: %s\n", be.message);
		goto out;
	}
	mongoc_uri_set_appname(uri, PROG);
	client = mongoc_client_new_from_uri_with_error(uri, &be);
	if (client == NULL) {
		fprintf(stderr, PROG ": %s\n", be.message);
		goto out;
	}
	mongoc_client_set_error_api(client, MONGOC_ERROR_API_VERSION_2);
	coll = mongoc_client_get_collection(client, o.db, o.coll);
	wc = mongoc_write_concern_new();
	mongoc_write_concern_set_w(wc, 1); /* acknowledged: the NDJSON only lists what the server took */
	mongoc_collection_set_write_concern(coll, wc);
	if (o.max_backlog > 0) {
		/* Only what tdr_store_count reads: the database, the timeout, the store's kind. */
		snprintf(fifo.db, sizeof(fifo.db), "%s", o.db);
		fifo.timeout_ms = 30000;
		if (store_is_ferretdb(client, &fifo.is_ferretdb))
			goto out;
	}
	if (o.corpus) {
		if (store_is_ferretdb(client, &g.skip_bad_utf8))
			goto out;
		if (g.skip_bad_utf8 && !o.quiet)
			fprintf(stderr, PROG ": FerretDB rewrites invalid UTF-8: skipping the 4 invalid-UTF-8 kinds\n");
	}

	t0 = last_report = tdr_mono_us();
	while (more && !stop_flag) {
		/* Fill a batch: a full one during a burst, sub documents when paced. */
		size_t fill = (o.rate > 0 && inserted >= o.burst) ? (size_t)sub : b.cap;

		while (b.n < fill) {
			bson_t *doc = bson_new();
			int kind, r;

			if (doc == NULL) {
				fprintf(stderr, PROG ": out of memory\n");
				goto out;
			}
			r = gen_next(&g, doc, &kind);
			if (r <= 0) {
				bson_destroy(doc);
				if (r < 0) {
					fprintf(stderr, PROG ": building a document failed\n");
					goto out;
				}
				more = 0;
				break;
			}
			if (kind == D_BAD || kind == D_EDGE)
				b.validate = 0;
			b.docs[b.n++] = doc;
		}
		if (o.max_backlog > 0) {
			int64_t waited = wait_backlog(&fifo, client, o.coll, o.max_backlog);

			if (waited < 0)
				goto out;
			t0 += waited; /* a pause is not a rate deficit to make up for */
			pace_t0 += waited;
		}
		if (o.rate > 0 && inserted >= o.burst) {
			/* Send a batch when its last document is due, so the average is the rate;
			 * the rate counts from the end of the burst. */
			if (!paced) {
				paced = 1;
				pace_t0 = tdr_mono_us();
				pace_base = inserted;
			}
			sleep_until_us(pace_t0 + (int64_t)((double)(inserted - pace_base + (int64_t)b.n) * 1e6 / o.rate));
		}
		inserted += (int64_t)b.n;
		if (flush_batch(coll, &b, nd))
			goto out;
		if (!o.quiet && tdr_mono_us() - last_report >= 5000000) {
			double s = (double)(tdr_mono_us() - t0) / 1e6;

			last_report = tdr_mono_us();
			fprintf(stderr, PROG ": %" PRId64 " documents in %.1f s (%.0f/s)\n", inserted, s,
				(double)inserted / s);
		}
	}
	{
		double s = (double)(tdr_mono_us() - t0) / 1e6;

		if (s <= 0)
			s = 1e-6;
		printf("inserted %" PRId64 " events (%" PRId64 " duplicates, %" PRId64 " malformed) in %.2f s: %.0f events/s\n",
		       inserted, g.dups, g.bad, s, (double)inserted / s);
		if (stop_flag)
			fprintf(stderr, PROG ": interrupted\n");
	}
	rc = stop_flag ? 1 : 0;
out:
	for (size_t i = 0; i < b.n; i++)
		bson_destroy(b.docs[i]);
	free(b.docs);
	if (nd && fclose(nd) != 0) {
		fprintf(stderr, PROG ": %s: %s\n", o.ndjson, strerror(errno));
		rc = 1;
	}
	if (g.manifest && fclose(g.manifest) != 0) {
		fprintf(stderr, PROG ": %s: %s\n", o.manifest, strerror(errno));
		rc = 1;
	}
	gen_free(&g);
	mongoc_write_concern_destroy(wc);
	mongoc_collection_destroy(coll);
	mongoc_client_destroy(client);
	mongoc_uri_destroy(uri);
	mongoc_cleanup();
	return rc;
}
