/*
 * tdrainctl.c - the operator's view of a deployment, and its repairs.
 *
 *   tdrainctl [-c FILE] [--set key=value]... [-N NAME] COMMAND ...
 *     status [--json] [--interval MS] [--no-rate]
 *     dlq list [--limit N] [--json]
 *     dlq requeue (--all | ID...) [--dry-run]
 *     recover (--partition P | --all)
 *     replay ...                       (ctl/replay.c)
 *
 * tdrainctl needs no running replica: it reads the same configuration as the
 * daemon and talks to the store and the coordination backend directly.  It
 * holds no lease and takes part in no election; the lease backend is created
 * only to list() leases (holder name "tdrainctl", never used to acquire).
 *
 * What it writes, and why that is safe next to live replicas, is argued at
 * each write below and in tdrainctl(8):
 *   dlq requeue  removes a dead letter, then re-inserts its document into the
 *                FIFO (that order: see requeue_one());
 *   recover      deletes claim records of deposed epochs, each fenced by its
 *                own {_id, epoch}.
 *
 * Exit status: 0 ok, 1 failure, 64 usage, 69 store or coordinator unreachable,
 * 78 bad configuration (sysexits.h).
 */
#include "config.h"

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sysexits.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>

#include "consumers/event.h"
#include "coord/coord.h"
#include "coord/lease.h"
#include "ctl/ctl.h"
#include "lib/bsonx.h"
#include "lib/clock.h"
#include "lib/conf.h"
#include "lib/log.h"
#include "lib/store.h"

#define PROG "tdrainctl"
#define EX_FAILURE 1
/* The unit's configuration (tdrain@.service passes the same path to the daemon). */
#define DEFAULT_CONF "/etc/tdrain/tdrain.conf"
#define HOLDER "tdrainctl"

#define ID_TEXT_MAX 160    /* an _id as shown: canonical key, or Extended JSON for other types */
#define DOC_START_MAX 96   /* the start of a dead-lettered document, as shown */
#define DLQ_LIMIT_DEFAULT 50
#define DLQ_LIMIT_MAX 100000
#define RATE_INTERVAL_DEFAULT 1000
#define CTL_OP_TIMEOUT_MS 15000 /* one store operation of tdrainctl: see widen_op_timeout() */
#define UNTRIAGED_SCAN_MAX 10000 /* FerretDB: count untriaged events only in a FIFO this small */
#define ID_SHOWN_MAX 64         /* dlq list's ID column; --json has the whole _id */
#define DOC_SHOWN_MAX 64        /* dlq list's DOCUMENT column */

static volatile sig_atomic_t got_stop;

static void on_stop(int sig)
{
	(void)sig;
	got_stop = 1;
}

static void usage(FILE *out)
{
	fprintf(out,
		"usage: " PROG " [-c FILE] [--set KEY=VALUE]... [-N NAME] COMMAND [ARGS]\n"
		"  -c FILE          configuration file (default " DEFAULT_CONF " if it exists)\n"
		"  --set KEY=VALUE  override one key (after the file and TDRAIN_* variables)\n"
		"  -N NAME          the name key (accepted for symmetry with tdrain; unused)\n"
		"commands:\n"
		"  status [--json] [--interval MS] [--no-rate]\n"
		"                   members, leases, partition map, backlog, dead letters, fold, drain rate\n"
		"  dlq list [--limit N] [--json]\n"
		"                   dead-lettered events (default limit %d)\n"
		"  dlq requeue (--all | ID...) [--dry-run]\n"
		"                   move dead-lettered documents back into the FIFO\n"
		"  recover (--partition P | --all)\n"
		"                   delete claim records of deposed epochs: their events become plain pending\n"
		"  replay --from TIME --to TIME [--shadow COLL] [--dir DIR] [--dry-run]\n"
		"                   re-insert archived events (tdrainctl replay --help)\n"
		"exit status: 0 ok, 1 failure, 64 usage, 69 store or coordinator unreachable, 78 configuration\n",
		DLQ_LIMIT_DEFAULT);
}

/* One usage error: a line naming it, then the summary; the caller exits 64. */
static int usage_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int usage_error(const char *fmt, ...)
{
	va_list ap;

	fputs(PROG ": ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	usage(stderr);
	return EX_USAGE;
}

/* ------------------------------------------------------------------ text */

/* Length of the valid UTF-8 sequence at s (n bytes available), 0 if invalid (jansson's rules). */
static size_t utf8_seq(const unsigned char *s, size_t n, uint32_t *cp)
{
	uint32_t c;
	size_t len;

	if (s[0] < 0x80) {
		*cp = s[0];
		return 1;
	}
	if (s[0] >= 0xc2 && s[0] <= 0xdf)
		len = 2, c = s[0] & 0x1f;
	else if (s[0] >= 0xe0 && s[0] <= 0xef)
		len = 3, c = s[0] & 0x0f;
	else if (s[0] >= 0xf0 && s[0] <= 0xf4)
		len = 4, c = s[0] & 0x07;
	else
		return 0;
	if (len > n)
		return 0;
	for (size_t i = 1; i < len; i++) {
		if ((s[i] & 0xc0) != 0x80)
			return 0;
		c = (c << 6) | (s[i] & 0x3f);
	}
	if ((len == 3 && c < 0x800) || (len == 4 && (c < 0x10000 || c > 0x10ffff)) || (c >= 0xd800 && c <= 0xdfff))
		return 0;
	*cp = c;
	return len;
}

/*
 * Copy s[0..n) into out as printable, valid UTF-8: invalid bytes and control
 * characters become '?', and a copy that does not fit ends in "...".  Every
 * string tdrainctl shows goes through here: ids, reasons and documents come
 * from producers, and neither a terminal nor jansson (which refuses invalid
 * UTF-8) should see them raw.
 */
static void clean_text(const char *s, size_t n, char *out, size_t outlen)
{
	const unsigned char *p = (const unsigned char *)s;
	size_t o = 0, i, need = 0, cap;

	if (outlen == 0)
		return;
	/* Two passes: the clean form's length decides between whole and cut. */
	for (int pass = 0; pass < 2; pass++) {
		if (pass == 1)
			cap = need <= outlen - 1 ? outlen - 1 : (outlen > 4 ? outlen - 4 : 0); /* room for "..." */
		for (i = 0; i < n;) {
			uint32_t cp = 0;
			size_t len = utf8_seq(p + i, n - i, &cp);
			int bad = len == 0 || cp < 0x20 || cp == 0x7f || (cp >= 0x80 && cp < 0xa0);
			size_t adv = len ? len : 1, take = bad ? 1 : len;

			if (pass == 0) {
				need += take;
			} else {
				if (o + take > cap)
					break;
				if (bad)
					out[o] = '?';
				else
					memcpy(out + o, p + i, len);
				o += take;
			}
			i += adv;
		}
	}
	if (i < n && o + 3 < outlen) {
		memcpy(out + o, "...", 3);
		o += 3;
	}
	out[o] = '\0';
}

/* "2026-11-22T10:00:00.123Z" */
static void fmt_time(int64_t ms, char *buf, size_t len)
{
	time_t t = (time_t)(ms >= 0 ? ms / 1000 : (ms - 999) / 1000);
	int frac = (int)(ms - (int64_t)t * 1000);
	struct tm tm;

	if (gmtime_r(&t, &tm) == NULL) {
		snprintf(buf, len, "?");
		return;
	}
	snprintf(buf, len, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday,
		 tm.tm_hour, tm.tm_min, tm.tm_sec, frac);
}

/* A duration for people: 850ms, 3.6s, 42s, 5m07s, 2h03m, 3d04h. */
static void fmt_dur(int64_t ms, char *buf, size_t len)
{
	int64_t s = ms / 1000;

	if (ms == INT64_MAX)
		snprintf(buf, len, "never");
	else if (ms < 0)
		snprintf(buf, len, "-%s", "");
	else if (ms < 1000)
		snprintf(buf, len, "%" PRId64 "ms", ms);
	else if (ms < 10000)
		snprintf(buf, len, "%.1fs", (double)ms / 1000.0);
	else if (s < 60)
		snprintf(buf, len, "%" PRId64 "s", s);
	else if (s < 3600)
		snprintf(buf, len, "%" PRId64 "m%02" PRId64 "s", s / 60, s % 60);
	else if (s < 86400)
		snprintf(buf, len, "%" PRId64 "h%02" PRId64 "m", s / 3600, (s % 3600) / 60);
	else
		snprintf(buf, len, "%" PRId64 "d%02" PRId64 "h", s / 86400, (s % 86400) / 3600);
}

/* An _id as text: its canonical key (docs/EVENTS.md), or relaxed Extended JSON for other types. */
static void id_text(const bson_value_t *v, char *buf, size_t len)
{
	char key[ID_TEXT_MAX];
	bson_t tmp = BSON_INITIALIZER;
	char *json;
	int n = tdr_id_key(v, key, sizeof(key));

	if (n >= 0) {
		clean_text(key, (size_t)n, buf, len);
		return;
	}
	bson_append_value(&tmp, "v", 1, v);
	json = bson_as_relaxed_extended_json(&tmp, NULL);
	bson_destroy(&tmp);
	if (json == NULL) {
		snprintf(buf, len, "?");
		return;
	}
	/* libbson writes { "v" : X }: keep X, i.e. drop the key and exactly one closing brace. */
	{
		const char *s = strchr(json, ':');
		size_t l;

		s = s ? s + 1 : json;
		while (*s == ' ')
			s++;
		l = strlen(s);
		while (l > 0 && s[l - 1] == ' ')
			l--;
		if (l > 0 && s[l - 1] == '}')
			l--;
		while (l > 0 && s[l - 1] == ' ')
			l--;
		clean_text(s, l, buf, len);
	}
	bson_free(json);
}

static const char *id_type(const bson_value_t *v)
{
	switch (v->value_type) {
	case BSON_TYPE_OID:
		return "objectId";
	case BSON_TYPE_UTF8:
		return "string";
	case BSON_TYPE_INT32:
		return "int32";
	case BSON_TYPE_INT64:
		return "int64";
	case BSON_TYPE_DOUBLE:
		return "double";
	case BSON_TYPE_DOCUMENT:
		return "document";
	default:
		return "other";
	}
}

/* ------------------------------------------------------------------ tables */

#define TCOLS 7
#define TCELL 100

struct table {
	size_t ncols, nrows, cap;
	char (*rows)[TCOLS][TCELL]; /* row 0 is the header */
};

static int table_init(struct table *t, size_t ncols, tdr_err *err)
{
	memset(t, 0, sizeof(*t));
	t->ncols = ncols;
	t->cap = 16;
	t->rows = calloc(t->cap, sizeof(*t->rows));
	if (t->rows == NULL)
		return tdr_err_set(err, TDR_ENOMEM, "out of memory");
	return 0;
}

static void table_free(struct table *t)
{
	free(t->rows);
	t->rows = NULL;
}

/* Append a row of ncols cells (already clean text). */
static int table_add(struct table *t, tdr_err *err, ...)
{
	va_list ap;

	if (t->nrows == t->cap) {
		size_t ncap = t->cap * 2;
		char(*nr)[TCOLS][TCELL] = realloc(t->rows, ncap * sizeof(*nr));

		if (nr == NULL)
			return tdr_err_set(err, TDR_ENOMEM, "out of memory");
		t->rows = nr;
		t->cap = ncap;
	}
	va_start(ap, err);
	for (size_t i = 0; i < t->ncols; i++) {
		const char *s = va_arg(ap, const char *);

		snprintf(t->rows[t->nrows][i], TCELL, "%s", s ? s : "");
	}
	va_end(ap);
	t->nrows++;
	return 0;
}

/* Display width of clean UTF-8 text: one column per character. */
static size_t text_width(const char *s)
{
	size_t w = 0;

	for (; *s; s++)
		w += ((unsigned char)*s & 0xc0) != 0x80;
	return w;
}

static void table_print(const struct table *t, FILE *out, const char *indent)
{
	size_t w[TCOLS] = { 0 };

	for (size_t r = 0; r < t->nrows; r++)
		for (size_t c = 0; c < t->ncols; c++)
			if (text_width(t->rows[r][c]) > w[c])
				w[c] = text_width(t->rows[r][c]);
	for (size_t r = 0; r < t->nrows; r++) {
		fputs(indent, out);
		for (size_t c = 0; c < t->ncols; c++) {
			const char *s = t->rows[r][c];

			if (c + 1 == t->ncols) {
				fputs(s, out);
				break;
			}
			fprintf(out, "%s%*s  ", s, (int)(w[c] - text_width(s)), "");
		}
		fputc('\n', out);
	}
}

/* ------------------------------------------------------------------ JSON */

/* Set o[k] = v, stealing v; remember a failure (NULL v is jansson's out-of-memory) in *oom. */
static void jput(json_t *o, const char *k, json_t *v, int *oom)
{
	if (v == NULL || json_object_set_new(o, k, v) != 0)
		*oom = 1;
}

static void jappend(json_t *a, json_t *v, int *oom)
{
	if (v == NULL || json_array_append_new(a, v) != 0)
		*oom = 1;
}

/* A string that is known to be clean UTF-8 (clean_text output or our own literals). */
static json_t *jstr(const char *s)
{
	return s ? json_string(s) : json_null();
}

static json_t *jint_or_null(int64_t v, int present)
{
	return present ? json_integer((json_int_t)v) : json_null();
}

static json_t *jtime(int64_t ms, int present)
{
	char buf[40];

	if (!present)
		return json_null();
	fmt_time(ms, buf, sizeof(buf));
	return json_string(buf);
}

static int json_emit(json_t *root, int oom, tdr_err *err)
{
	if (oom)
		return tdr_err_set(err, TDR_ENOMEM, "out of memory building JSON");
	if (json_dumpf(root, stdout, JSON_INDENT(2) | JSON_PRESERVE_ORDER) != 0 || fputc('\n', stdout) == EOF ||
	    fflush(stdout) != 0)
		return tdr_err_set(err, TDR_EFAIL, "writing JSON to standard output failed");
	return 0;
}

/* ------------------------------------------------------------------ connection */

struct ctl {
	tdr_config cfg;
	tdr_store *st;
	mongoc_client_t *client;
	tdr_lease_backend *be;
	char uri_safe[1100];
	char coord_safe[1100];
};

/* libmongoc's own diagnostics: warnings and worse go through our log, the rest is noise for an operator. */
static void on_mongoc_log(mongoc_log_level_t level, const char *domain, const char *message, void *data)
{
	(void)data;
	if (level > MONGOC_LOG_LEVEL_WARNING)
		return;
	tdr_log(level <= MONGOC_LOG_LEVEL_CRITICAL ? LOG_ERR : LOG_WARNING, "libmongoc %s: %s", domain, message);
}

static int exit_for(const tdr_err *err)
{
	return err->code == TDR_ETRANSIENT ? EX_UNAVAILABLE : EX_FAILURE;
}

/*
 * store.timeout_ms bounds every store operation of a replica because a lease
 * holder must finish (or give up) within its renew deadline.  tdrainctl holds
 * no lease, and it is run exactly when the store is busiest, so it lets an
 * operation (socketTimeoutMS, maxTimeMS) take up to CTL_OP_TIMEOUT_MS, while
 * server selection and connecting keep store.timeout_ms: an unreachable store
 * is still reported within it.  A socketTimeoutMS in the URI is respected.
 */
static void widen_op_timeout(tdr_config *cfg)
{
	char *uri = cfg->store_uri, *hosts = strstr(uri, "://"), *q, *slash;
	size_t len = strlen(uri);
	char add[64];

	if (cfg->store_timeout_ms >= CTL_OP_TIMEOUT_MS || hosts == NULL)
		return;
	for (q = hosts; *q; q++)
		if (strncasecmp(q, "sockettimeoutms=", 16) == 0)
			return;
	slash = strchr(hosts + 3, '/');
	q = strchr(hosts + 3, '?');
	if (q)
		snprintf(add, sizeof(add), "%ssocketTimeoutMS=%d", uri[len - 1] == '?' || uri[len - 1] == '&' ? "" : "&",
			 CTL_OP_TIMEOUT_MS + 2000);
	else
		snprintf(add, sizeof(add), "%s?socketTimeoutMS=%d", slash ? "" : "/", CTL_OP_TIMEOUT_MS + 2000);
	if (len + strlen(add) < sizeof(cfg->store_uri))
		memcpy(uri + len, add, strlen(add) + 1);
}

/* Open and ping the store; on failure print one line and return the exit status. */
static int connect_store(struct ctl *c, int ping)
{
	tdr_config scfg = c->cfg;
	tdr_err err;

	tdr_err_clear(&err);
	widen_op_timeout(&scfg);
	if (tdr_store_open(&c->st, &scfg, PROG, &err) < 0) {
		fprintf(stderr, PROG ": configuration error: %s\n", err.msg);
		return EX_CONFIG;
	}
	/* maxTimeMS of every read (tdr_store_read_opts), on the same budget. */
	if (c->st->timeout_ms < CTL_OP_TIMEOUT_MS)
		c->st->timeout_ms = CTL_OP_TIMEOUT_MS;
	if (ping && tdr_store_ping(c->st, &err) < 0) {
		const char *why = err.msg;

		/* tdr_store_ping already says "store unreachable: ": say it once, with the (redacted) URI. */
		if (strncmp(why, "store unreachable: ", 19) == 0)
			why += 19;
		fprintf(stderr, PROG ": store %s unreachable: %s\n", c->uri_safe, why);
		return EX_UNAVAILABLE;
	}
	if (ping)
		c->client = tdr_store_pop(c->st);
	return 0;
}

/* The lease backend, for list() only; its reachability shows at the first list. */
static int connect_coord(struct ctl *c)
{
	tdr_err err;
	int rc;

	tdr_err_clear(&err);
	if (c->cfg.backend == TDR_BACKEND_ETCD)
		rc = tdr_lease_etcd_new(&c->be, &c->cfg, HOLDER, &err);
	else
		rc = tdr_lease_mongo_new(&c->be, c->st, HOLDER, &err);
	if (rc < 0) {
		fprintf(stderr, PROG ": coordination backend %s: %s\n", tdr_backend_name(c->cfg.backend), err.msg);
		return rc == TDR_ECONFIG ? EX_CONFIG : EX_FAILURE;
	}
	return 0;
}

static void disconnect(struct ctl *c)
{
	tdr_lease_backend_free(c->be);
	c->be = NULL;
	if (c->client)
		tdr_store_push(c->st, c->client);
	c->client = NULL;
	tdr_store_close(c->st);
	c->st = NULL;
}

static int list_leases(struct ctl *c, tdr_lease_info **ret, size_t *ret_n, tdr_err *err)
{
	int rc = c->be->ops->list(c->be, "", ret, ret_n, err);

	if (rc < 0) {
		if (rc != TDR_ENOMEM)
			err->code = TDR_ETRANSIENT;
		return tdr_err_wrap(err, "coordination backend %s (%s) unreachable", tdr_backend_name(c->cfg.backend),
				    c->coord_safe);
	}
	return 0;
}

static const tdr_lease_info *find_lease(const tdr_lease_info *v, size_t n, const char *name)
{
	for (size_t i = 0; i < n; i++)
		if (strcmp(v[i].name, name) == 0)
			return &v[i];
	return NULL;
}

static int lease_live(const tdr_lease_info *li)
{
	return li && !li->released && li->expires_in_ms > 0;
}

static const char *lease_state(const tdr_lease_info *li)
{
	return li->released ? "released" : li->expires_in_ms > 0 ? "held" : "expired";
}

/* leader, member/..., part/N in numeric order, then anything else. */
static int lease_rank(const char *name, long *num)
{
	*num = 0;
	if (strcmp(name, "leader") == 0)
		return 0;
	if (strncmp(name, "member/", 7) == 0)
		return 1;
	if (strncmp(name, "part/", 5) == 0) {
		*num = strtol(name + 5, NULL, 10);
		return 2;
	}
	return 3;
}

static int cmp_lease(const void *x, const void *y)
{
	const tdr_lease_info *a = x, *b = y;
	long na, nb;
	int ra = lease_rank(a->name, &na), rb = lease_rank(b->name, &nb);

	if (ra != rb)
		return ra - rb;
	if (na != nb)
		return na < nb ? -1 : 1;
	return strcmp(a->name, b->name);
}

/* ------------------------------------------------------------------ store reads */

static int est_count(struct ctl *c, const char *coll, int64_t *ret, tdr_err *err)
{
	return tdr_store_count_estimate(c->st, c->client, coll, ret, err);
}

static int count_docs(struct ctl *c, const char *coll, const bson_t *filter, int64_t *ret, tdr_err *err)
{
	mongoc_collection_t *co = tdr_store_coll(c->st, c->client, coll);
	bson_t opts;
	bson_error_t be;
	int rc = 0;

	tdr_store_read_opts(c->st, &opts);
	*ret = mongoc_collection_count_documents(co, filter, &opts, NULL, NULL, &be);
	if (*ret < 0)
		rc = tdr_store_error(&be, coll, err);
	bson_destroy(&opts);
	mongoc_collection_destroy(co);
	return rc;
}

/*
 * The first document matching filter, in natural order unless sort is given
 * (a sort other than $natural makes FerretDB read and sort the whole match
 * set, so the callers that only need "some head" do not sort).
 * *found is 0 when there is none; out is initialised either way.
 */
static int find_first(struct ctl *c, const char *coll, const bson_t *filter, const bson_t *projection, bson_t *out,
		      int *found, tdr_err *err)
{
	mongoc_collection_t *co = tdr_store_coll(c->st, c->client, coll);
	bson_t opts;
	const bson_t *doc;
	mongoc_cursor_t *cur;
	bson_error_t be;
	int rc = 0;

	bson_init(out);
	*found = 0;
	tdr_store_read_opts(c->st, &opts);
	BSON_APPEND_INT64(&opts, "limit", 1);
	if (projection)
		BSON_APPEND_DOCUMENT(&opts, "projection", projection);
	cur = mongoc_collection_find_with_opts(co, filter, &opts, NULL);
	if (mongoc_cursor_next(cur, &doc)) {
		bson_destroy(out);
		bson_copy_to(doc, out);
		*found = 1;
	}
	if (mongoc_cursor_error(cur, &be))
		rc = tdr_store_error(&be, coll, err);
	mongoc_cursor_destroy(cur);
	bson_destroy(&opts);
	mongoc_collection_destroy(co);
	return rc;
}

/* One claim record, as much as tdrainctl needs of it. */
struct claimrec {
	char id[96];
	int32_t part;
	int64_t epoch;
	int64_t nids;
};

/*
 * Every claim record.  tdrain_claims holds only in-flight batches (at most a
 * few per partition), so reading it whole is cheap on every store.
 */
static int read_claims(struct ctl *c, struct claimrec **ret, size_t *ret_n, tdr_err *err)
{
	mongoc_collection_t *co = tdr_store_coll(c->st, c->client, TDR_C_CLAIMS);
	bson_t filter = BSON_INITIALIZER, opts, proj;
	const bson_t *doc;
	mongoc_cursor_t *cur;
	bson_error_t be;
	struct claimrec *v = NULL;
	size_t n = 0, cap = 0;
	int rc = 0;

	tdr_store_read_opts(c->st, &opts);
	BSON_APPEND_DOCUMENT_BEGIN(&opts, "projection", &proj);
	BSON_APPEND_INT32(&proj, "part", 1);
	BSON_APPEND_INT32(&proj, "epoch", 1);
	BSON_APPEND_INT32(&proj, "ids", 1);
	bson_append_document_end(&opts, &proj);
	cur = mongoc_collection_find_with_opts(co, &filter, &opts, NULL);
	while (mongoc_cursor_next(cur, &doc)) {
		uint32_t idlen = 0;
		const char *id = tdr_bson_str(doc, "_id", &idlen);
		bson_iter_t it, arr;
		struct claimrec *r;

		/* tdrain writes "<part>:<epoch>:<seq>"; anything else is not a claim of ours. */
		if (id == NULL || idlen >= sizeof(v->id))
			continue;
		if (n == cap) {
			size_t ncap = cap ? cap * 2 : 64;
			struct claimrec *nv = realloc(v, ncap * sizeof(*nv));

			if (nv == NULL) {
				rc = tdr_err_set(err, TDR_ENOMEM, "out of memory");
				break;
			}
			v = nv;
			cap = ncap;
		}
		r = &v[n++];
		memcpy(r->id, id, idlen);
		r->id[idlen] = '\0';
		r->part = (int32_t)tdr_bson_i64(doc, "part", INT32_MIN);
		r->epoch = tdr_bson_i64(doc, "epoch", 0);
		r->nids = 0;
		if (bson_iter_init_find(&it, doc, "ids") && BSON_ITER_HOLDS_ARRAY(&it) && bson_iter_recurse(&it, &arr))
			while (bson_iter_next(&arr))
				r->nids++;
	}
	if (rc == 0 && mongoc_cursor_error(cur, &be))
		rc = tdr_store_error(&be, "read " TDR_C_CLAIMS, err);
	mongoc_cursor_destroy(cur);
	bson_destroy(&opts);
	bson_destroy(&filter);
	mongoc_collection_destroy(co);
	if (rc < 0) {
		free(v);
		return rc;
	}
	*ret = v;
	*ret_n = n;
	return 0;
}

/* The lease that governs claim records of part: "part/<p>" partitioned, "leader" single. */
static void scope_lease_name(const tdr_config *cfg, int32_t part, char *buf, size_t len)
{
	if (cfg->mode == TDR_MODE_PARTITIONED)
		snprintf(buf, len, "part/%d", (int)part);
	else
		snprintf(buf, len, "leader");
}

static int part_in_mode(const tdr_config *cfg, int32_t part)
{
	if (cfg->mode == TDR_MODE_PARTITIONED)
		return part >= 0 && part < cfg->partitions;
	return part == TDR_SCOPE_ALL;
}

/*
 * A claim record is orphaned when its scope's lease has moved past its epoch,
 * or nobody holds the scope: no live writer will ever acknowledge it.  (The
 * next holder recovers it on acquisition; `recover` does it now.)
 */
static int claim_orphaned(const tdr_config *cfg, const struct claimrec *r, const tdr_lease_info *leases, size_t nl)
{
	char name[32];
	const tdr_lease_info *li;

	scope_lease_name(cfg, r->part, name, sizeof(name));
	li = find_lease(leases, nl, name);
	return !lease_live(li) || r->epoch < li->epoch;
}

/* ------------------------------------------------------------------ status */

struct status {
	int64_t now_ms;
	tdr_lease_info *leases;
	size_t nleases;
	struct claimrec *claims;
	size_t nclaims;
	int64_t fifo, claimed, pending, untriaged; /* untriaged -1: not applicable or not counted */
	int untriaged_skipped;                      /* FerretDB, FIFO above UNTRIAGED_SCAN_MAX */
	int64_t orphan_records, orphan_events, stray_records;
	int has_head;
	char head_id[ID_TEXT_MAX];
	const char *head_id_type;
	int64_t head_created_ms; /* INT64_MIN: no created_at date */
	int64_t deadletters, deltas;
	int64_t oldest_delta_ms; /* INT64_MIN: none or no date */
	int has_fold;
	int64_t fold_seq, fold_epoch, fold_at_ms;
	char fold_holder[TDR_HOLDER_MAX];
	int has_rate;
	int64_t rate_ms, fifo0, fifo1, seq0, seq1;
	double rate;
};

static void status_free(struct status *s)
{
	free(s->leases);
	free(s->claims);
}

static int read_fold_state(struct ctl *c, int *has, int64_t *seq, int64_t *epoch, int64_t *at, char *holder,
			   size_t hlen, tdr_err *err)
{
	bson_t filter = BSON_INITIALIZER, doc;
	bson_iter_t it;
	int found, rc;
	const char *h;
	uint32_t l = 0;

	BSON_APPEND_UTF8(&filter, "_id", "fold");
	rc = find_first(c, TDR_C_STATE, &filter, NULL, &doc, &found, err);
	bson_destroy(&filter);
	*has = rc == 0 && found;
	if (*has) {
		*seq = tdr_bson_i64(&doc, "seq", 0);
		*epoch = tdr_bson_i64(&doc, "epoch", 0);
		*at = bson_iter_init_find(&it, &doc, "at") && BSON_ITER_HOLDS_DATE_TIME(&it) ? bson_iter_date_time(&it)
											      : INT64_MIN;
		h = tdr_bson_str(&doc, "holder", &l);
		clean_text(h ? h : "", h ? l : 0, holder, hlen);
	}
	bson_destroy(&doc);
	return rc;
}

/* The date field of the first document in natural order (FerretDB: insertion order). */
static int head_date(struct ctl *c, const char *coll, const char *field, int *found, bson_t *doc, int64_t *ms,
		     tdr_err *err)
{
	bson_t filter = BSON_INITIALIZER, proj = BSON_INITIALIZER;
	bson_iter_t it;
	int rc;

	BSON_APPEND_INT32(&proj, "_id", 1);
	BSON_APPEND_INT32(&proj, field, 1);
	rc = find_first(c, coll, &filter, &proj, doc, found, err);
	*ms = INT64_MIN;
	if (rc == 0 && *found && bson_iter_init_find(&it, doc, field) && BSON_ITER_HOLDS_DATE_TIME(&it))
		*ms = bson_iter_date_time(&it);
	bson_destroy(&proj);
	bson_destroy(&filter);
	return rc;
}

/*
 * One status.  With a rate, the FIFO count and fold seq are sampled, then
 * again --interval later; everything else is read together right after the
 * second sample, so the numbers shown (fifo, claimed, head, deltas) describe
 * one moment rather than a spread of it.
 */
static int gather_status(struct ctl *c, struct status *s, int rate, int64_t interval_ms, tdr_err *err)
{
	const tdr_config *cfg = &c->cfg;
	int64_t t0 = 0, seq = 0, epoch = 0, at = 0;
	bson_t head;
	bson_iter_t it;
	int has = 0, found, rc;
	char holder[TDR_HOLDER_MAX];

	if (rate) {
		tdr_lease_info *first = NULL;
		size_t nfirst = 0;

		t0 = tdr_mono_ms();
		if ((rc = est_count(c, cfg->events_coll, &s->fifo0, err)) < 0)
			return rc;
		if ((rc = read_fold_state(c, &has, &seq, &epoch, &at, holder, sizeof(holder), err)) < 0)
			return rc;
		s->seq0 = has ? seq : 0;
		/*
		 * With the mongo backend an observer judges expiry by how long a
		 * lease has gone unrenewed on its own clock.  Listing now and again
		 * after the interval lets an unrenewed lease count down instead of
		 * looking freshly renewed to a process that just started.
		 */
		if ((rc = list_leases(c, &first, &nfirst, err)) < 0)
			return rc;
		free(first);
		tdr_sleep_ms(interval_ms - (tdr_mono_ms() - t0), NULL);
	}

	/* The second rate sample: the FIFO total shown, and the end of the interval. */
	if ((rc = est_count(c, cfg->events_coll, &s->fifo, err)) < 0)
		return rc;
	if (rate) {
		s->has_rate = 1;
		s->rate_ms = tdr_mono_ms() - t0;
		s->fifo1 = s->fifo;
	}

	/*
	 * Claims before leases: a claim record we see then existed before the
	 * lease listing, so "older than the listed epoch" is never a record that a
	 * holder acquiring after the listing has just written.
	 */
	if ((rc = read_claims(c, &s->claims, &s->nclaims, err)) < 0)
		return rc;
	for (size_t i = 0; i < s->nclaims; i++)
		s->claimed += s->claims[i].nids;
	if ((rc = list_leases(c, &s->leases, &s->nleases, err)) < 0)
		return rc;
	qsort(s->leases, s->nleases, sizeof(*s->leases), cmp_lease);

	{
		bson_t filter = BSON_INITIALIZER, proj = BSON_INITIALIZER;

		BSON_APPEND_INT32(&proj, "_id", 1);
		BSON_APPEND_INT32(&proj, "created_at", 1);
		rc = find_first(c, cfg->events_coll, &filter, &proj, &head, &found, err);
		bson_destroy(&proj);
		bson_destroy(&filter);
		if (rc < 0) {
			bson_destroy(&head);
			return rc;
		}
		s->has_head = found;
		s->head_created_ms = INT64_MIN;
		if (found && bson_iter_init_find(&it, &head, "_id")) {
			id_text(bson_iter_value(&it), s->head_id, sizeof(s->head_id));
			s->head_id_type = id_type(bson_iter_value(&it));
		}
		if (found && bson_iter_init_find(&it, &head, "created_at") && BSON_ITER_HOLDS_DATE_TIME(&it))
			s->head_created_ms = bson_iter_date_time(&it);
		bson_destroy(&head);
	}

	/*
	 * No valid part: missing, null, not a number, or outside [0, P).  MongoDB
	 * counts it from the {part, _id} index.  FerretDB reads the whole FIFO for
	 * it, and there it is informational only (claims compute a missing
	 * partition, nothing writes it), so a large FIFO is not read for it.
	 */
	s->untriaged = -1;
	if (cfg->mode == TDR_MODE_PARTITIONED && c->st->is_ferretdb && s->fifo > UNTRIAGED_SCAN_MAX)
		s->untriaged_skipped = 1;
	else if (cfg->mode == TDR_MODE_PARTITIONED) {
		bson_t f = BSON_INITIALIZER, part, not;

		BSON_APPEND_DOCUMENT_BEGIN(&f, "part", &part);
		BSON_APPEND_DOCUMENT_BEGIN(&part, "$not", &not);
		BSON_APPEND_INT32(&not, "$gte", 0);
		BSON_APPEND_INT64(&not, "$lt", cfg->partitions);
		bson_append_document_end(&part, &not);
		bson_append_document_end(&f, &part);
		rc = count_docs(c, cfg->events_coll, &f, &s->untriaged, err);
		bson_destroy(&f);
		if (rc < 0)
			return rc;
	}

	if ((rc = est_count(c, TDR_C_DEADLETTER, &s->deadletters, err)) < 0)
		return rc;
	if ((rc = est_count(c, TDR_C_DELTAS, &s->deltas, err)) < 0)
		return rc;
	{
		bson_t d;

		rc = head_date(c, TDR_C_DELTAS, "at", &found, &d, &s->oldest_delta_ms, err);
		bson_destroy(&d);
		if (rc < 0)
			return rc;
	}
	if ((rc = read_fold_state(c, &s->has_fold, &s->fold_seq, &s->fold_epoch, &s->fold_at_ms, s->fold_holder,
				  sizeof(s->fold_holder), err)) < 0)
		return rc;
	s->now_ms = tdr_wall_ms();
	if (rate) {
		s->seq1 = s->has_fold ? s->fold_seq : 0;
		s->rate = s->rate_ms > 0 ? (double)(s->fifo0 - s->fifo1) * 1000.0 / (double)s->rate_ms : 0.0;
	}
	s->pending = s->fifo - s->claimed > 0 ? s->fifo - s->claimed : 0;
	for (size_t i = 0; i < s->nclaims; i++) {
		if (!part_in_mode(cfg, s->claims[i].part)) {
			s->stray_records++;
		} else if (claim_orphaned(cfg, &s->claims[i], s->leases, s->nleases)) {
			s->orphan_records++;
			s->orphan_events += s->claims[i].nids;
		}
	}
	return 0;
}

/* Members: the live "member/<name>" leases (partitioned), or the live leader (single mode). */
struct member {
	const tdr_lease_info *li;
	const char *name;
	int64_t nparts;
};

static int list_members(const struct ctl *c, const struct status *s, struct member **ret, size_t *ret_n, tdr_err *err)
{
	struct member *m = calloc(s->nleases ? s->nleases : 1, sizeof(*m));
	size_t n = 0;

	if (m == NULL)
		return tdr_err_set(err, TDR_ENOMEM, "out of memory");
	for (size_t i = 0; i < s->nleases; i++) {
		const tdr_lease_info *li = &s->leases[i];

		if (!lease_live(li))
			continue;
		if (c->cfg.mode == TDR_MODE_PARTITIONED && strncmp(li->name, "member/", 7) == 0)
			m[n++] = (struct member){ li, li->name + 7, 0 };
		else if (c->cfg.mode == TDR_MODE_SINGLE && strcmp(li->name, "leader") == 0)
			m[n++] = (struct member){ li, li->holder, 0 };
	}
	for (size_t k = 0; k < n; k++)
		for (size_t i = 0; i < s->nleases; i++)
			if (strncmp(s->leases[i].name, "part/", 5) == 0 && lease_live(&s->leases[i]) &&
			    strcmp(s->leases[i].holder, m[k].name) == 0)
				m[k].nparts++;
	*ret = m;
	*ret_n = n;
	return 0;
}

/*
 * Shares (partitioned): fewest and most partitions a live member owns, and
 * what a balanced split gives (floor, ceil of P / members; docs/DESIGN.md,
 * "Who owns what").  imbalance = max - min: 0 or 1 once converged.
 */
struct shares {
	int64_t min, max, floor, ceil;
};

static struct shares member_shares(const struct ctl *c, const struct member *m, size_t n)
{
	struct shares sh = { 0, 0, 0, 0 };

	for (size_t i = 0; i < n; i++) {
		if (i == 0 || m[i].nparts < sh.min)
			sh.min = m[i].nparts;
		if (m[i].nparts > sh.max)
			sh.max = m[i].nparts;
	}
	if (n > 0) {
		sh.floor = c->cfg.partitions / (int64_t)n;
		sh.ceil = (c->cfg.partitions + (int64_t)n - 1) / (int64_t)n;
	}
	return sh;
}

static const tdr_lease_info *part_lease(const struct status *s, int64_t p)
{
	char name[32];

	snprintf(name, sizeof(name), "part/%" PRId64, p);
	return find_lease(s->leases, s->nleases, name);
}

static json_t *lease_expiry_json(const tdr_lease_info *li)
{
	/* INT64_MAX: written without an expiry (etcd key with no lease): null, never a huge number. */
	return li->expires_in_ms == INT64_MAX ? json_null() : json_integer(li->expires_in_ms > 0 ? li->expires_in_ms : 0);
}

static int status_json(const struct ctl *c, const struct status *s, tdr_err *err)
{
	const tdr_config *cfg = &c->cfg;
	json_t *root = json_object(), *o, *a;
	struct member *mem = NULL;
	size_t nmem = 0;
	const tdr_lease_info *leader = find_lease(s->leases, s->nleases, "leader");
	char buf[TDR_HOLDER_MAX * 2];
	int oom = root == NULL, rc;

	if ((rc = list_members(c, s, &mem, &nmem, err)) < 0) {
		json_decref(root);
		return rc;
	}
	if (oom)
		goto emit;
	jput(root, "version", json_integer(1), &oom);
	jput(root, "generated_at", jtime(s->now_ms, 1), &oom);
	jput(root, "mode", jstr(tdr_mode_name(cfg->mode)), &oom);
	jput(root, "backend", jstr(tdr_backend_name(cfg->backend)), &oom);
	jput(root, "partitions", jint_or_null(cfg->partitions, cfg->mode == TDR_MODE_PARTITIONED), &oom);

	o = json_object();
	jput(o, "uri", jstr(c->uri_safe), &oom);
	jput(o, "database", jstr(cfg->store_db), &oom);
	jput(o, "events", jstr(cfg->events_coll), &oom);
	jput(o, "ferretdb", json_boolean(c->st->is_ferretdb), &oom);
	jput(root, "store", o, &oom);

	if (lease_live(leader)) {
		o = json_object();
		clean_text(leader->holder, strlen(leader->holder), buf, sizeof(buf));
		jput(o, "holder", jstr(buf), &oom);
		jput(o, "epoch", json_integer(leader->epoch), &oom);
		jput(o, "expires_in_ms", lease_expiry_json(leader), &oom);
		jput(root, "leader", o, &oom);
	} else {
		jput(root, "leader", json_null(), &oom);
	}

	a = json_array();
	for (size_t i = 0; i < nmem && a; i++) {
		o = json_object();
		clean_text(mem[i].name, strlen(mem[i].name), buf, sizeof(buf));
		jput(o, "name", jstr(buf), &oom);
		jput(o, "epoch", json_integer(mem[i].li->epoch), &oom);
		jput(o, "expires_in_ms", lease_expiry_json(mem[i].li), &oom);
		jput(o, "partitions", json_integer(cfg->mode == TDR_MODE_PARTITIONED ? mem[i].nparts : 0), &oom);
		jappend(a, o, &oom);
	}
	jput(root, "members", a, &oom);
	if (cfg->mode == TDR_MODE_PARTITIONED && nmem > 0) {
		struct shares sh = member_shares(c, mem, nmem);

		o = json_object();
		jput(o, "min", json_integer(sh.min), &oom);
		jput(o, "max", json_integer(sh.max), &oom);
		jput(o, "imbalance", json_integer(sh.max - sh.min), &oom);
		jput(o, "balanced_floor", json_integer(sh.floor), &oom);
		jput(o, "balanced_ceil", json_integer(sh.ceil), &oom);
		jput(root, "shares", o, &oom);
	} else {
		jput(root, "shares", json_null(), &oom);
	}

	a = json_array();
	{
		json_t *un = json_array();

		for (int64_t p = 0; cfg->mode == TDR_MODE_PARTITIONED && p < cfg->partitions && a && un; p++) {
			const tdr_lease_info *li = part_lease(s, p);
			int live = lease_live(li);

			o = json_object();
			jput(o, "partition", json_integer(p), &oom);
			jput(o, "owned", json_boolean(live), &oom);
			if (live)
				clean_text(li->holder, strlen(li->holder), buf, sizeof(buf));
			jput(o, "holder", live ? jstr(buf) : json_null(), &oom);
			jput(o, "epoch", jint_or_null(li ? li->epoch : 0, li != NULL), &oom);
			jput(o, "expires_in_ms", live ? lease_expiry_json(li) : json_null(), &oom);
			jappend(a, o, &oom);
			if (!live)
				jappend(un, json_integer(p), &oom);
		}
		jput(root, "partition_map", a, &oom);
		jput(root, "unowned_partitions", un, &oom);
	}

	a = json_array();
	for (size_t i = 0; i < s->nleases && a; i++) {
		const tdr_lease_info *li = &s->leases[i];

		o = json_object();
		clean_text(li->name, strlen(li->name), buf, sizeof(buf));
		jput(o, "name", jstr(buf), &oom);
		clean_text(li->holder, strlen(li->holder), buf, sizeof(buf));
		jput(o, "holder", jstr(buf), &oom);
		jput(o, "epoch", json_integer(li->epoch), &oom);
		jput(o, "ttl_ms", json_integer(li->ttl_ms), &oom);
		jput(o, "expires_in_ms", lease_expiry_json(li), &oom);
		jput(o, "released", json_boolean(li->released), &oom);
		jput(o, "state", jstr(lease_state(li)), &oom);
		jappend(a, o, &oom);
	}
	jput(root, "leases", a, &oom);

	o = json_object();
	jput(o, "fifo", json_integer(s->fifo), &oom);
	jput(o, "claimed", json_integer(s->claimed), &oom);
	jput(o, "pending", json_integer(s->pending), &oom);
	jput(o, "untriaged", jint_or_null(s->untriaged, s->untriaged >= 0), &oom);
	jput(o, "claim_records", json_integer((json_int_t)s->nclaims), &oom);
	jput(o, "orphaned_claim_records", json_integer(s->orphan_records), &oom);
	jput(o, "orphaned_events", json_integer(s->orphan_events), &oom);
	jput(o, "stray_claim_records", json_integer(s->stray_records), &oom);
	jput(root, "backlog", o, &oom);

	if (s->has_head) {
		int dated = s->head_created_ms != INT64_MIN;

		o = json_object();
		jput(o, "id", jstr(s->head_id), &oom);
		jput(o, "id_type", jstr(s->head_id_type), &oom);
		jput(o, "created_at", jtime(s->head_created_ms, dated), &oom);
		jput(o, "age_ms", jint_or_null(s->now_ms - s->head_created_ms, dated), &oom);
		jput(o, "order", jstr("natural"), &oom);
		jput(root, "oldest_pending", o, &oom);
	} else {
		jput(root, "oldest_pending", json_null(), &oom);
	}

	jput(root, "deadletters", json_integer(s->deadletters), &oom);

	o = json_object();
	jput(o, "seq", jint_or_null(s->fold_seq, s->has_fold), &oom);
	jput(o, "holder", s->has_fold ? jstr(s->fold_holder) : json_null(), &oom);
	jput(o, "epoch", jint_or_null(s->fold_epoch, s->has_fold), &oom);
	jput(o, "at", jtime(s->fold_at_ms, s->has_fold && s->fold_at_ms != INT64_MIN), &oom);
	jput(o, "pending_deltas", json_integer(s->deltas), &oom);
	jput(o, "lag_ms", jint_or_null(s->now_ms - s->oldest_delta_ms, s->oldest_delta_ms != INT64_MIN), &oom);
	jput(root, "fold", o, &oom);

	if (s->has_rate) {
		o = json_object();
		jput(o, "interval_ms", json_integer(s->rate_ms), &oom);
		jput(o, "events_per_s", json_real(s->rate), &oom);
		jput(o, "fifo_before", json_integer(s->fifo0), &oom);
		jput(o, "fifo_after", json_integer(s->fifo1), &oom);
		jput(o, "fold_seq_before", json_integer(s->seq0), &oom);
		jput(o, "fold_seq_after", json_integer(s->seq1), &oom);
		jput(root, "rate", o, &oom);
	} else {
		jput(root, "rate", json_null(), &oom);
	}
emit:
	rc = json_emit(root, oom, err);
	json_decref(root);
	free(mem);
	return rc;
}

static int status_text(const struct ctl *c, const struct status *s, tdr_err *err)
{
	const tdr_config *cfg = &c->cfg;
	const tdr_lease_info *leader = find_lease(s->leases, s->nleases, "leader");
	struct member *mem = NULL;
	size_t nmem = 0;
	struct table t = { 0 };
	char a[TCELL], b[TCELL], d[TCELL], e[TCELL], f[TCELL];
	int rc;
	int64_t owned = 0;

	if ((rc = list_members(c, s, &mem, &nmem, err)) < 0)
		return rc;
	if (cfg->mode == TDR_MODE_PARTITIONED)
		printf("tdrain       partitioned mode, %lld partitions, %s coordination\n", (long long)cfg->partitions,
		       tdr_backend_name(cfg->backend));
	else
		printf("tdrain       single mode, %s coordination\n", tdr_backend_name(cfg->backend));
	printf("store        %s database %s, FIFO %s%s\n", c->uri_safe, cfg->store_db, cfg->events_coll,
	       c->st->is_ferretdb ? " (FerretDB)" : "");
	if (lease_live(leader)) {
		clean_text(leader->holder, strlen(leader->holder), a, sizeof(a));
		fmt_dur(leader->expires_in_ms, b, sizeof(b));
		printf("leader       %s (epoch %" PRId64 ", expires in %s)\n", a, leader->epoch, b);
	} else {
		printf("leader       none\n");
	}

	printf("members      %zu\n", nmem);
	if (nmem) {
		if ((rc = table_init(&t, cfg->mode == TDR_MODE_PARTITIONED ? 4 : 3, err)) < 0)
			goto out;
		rc = table_add(&t, err, "MEMBER", "EPOCH", "EXPIRES", "PARTITIONS");
		for (size_t i = 0; rc == 0 && i < nmem; i++) {
			clean_text(mem[i].name, strlen(mem[i].name), a, sizeof(a));
			snprintf(b, sizeof(b), "%" PRId64, mem[i].li->epoch);
			fmt_dur(mem[i].li->expires_in_ms, d, sizeof(d));
			snprintf(e, sizeof(e), "%" PRId64, mem[i].nparts);
			rc = table_add(&t, err, a, b, d, e);
		}
		if (rc < 0)
			goto out;
		table_print(&t, stdout, "  ");
		table_free(&t);
		if (cfg->mode == TDR_MODE_PARTITIONED) {
			struct shares sh = member_shares(c, mem, nmem);
			char want[64];

			if (sh.ceil > sh.floor)
				snprintf(want, sizeof(want), "%" PRId64 " or %" PRId64, sh.floor, sh.ceil);
			else
				snprintf(want, sizeof(want), "%" PRId64, sh.floor);
			printf("shares       min %" PRId64 ", max %" PRId64 ", imbalance %" PRId64 " (balanced: %s per member)\n",
			       sh.min, sh.max, sh.max - sh.min, want);
		}
	}

	if (cfg->mode == TDR_MODE_PARTITIONED) {
		char un[TCELL] = "";
		size_t unl = 0;

		if ((rc = table_init(&t, 4, err)) < 0 || (rc = table_add(&t, err, "PART", "HOLDER", "EPOCH", "EXPIRES")) < 0)
			goto out;
		for (int64_t p = 0; p < cfg->partitions && rc == 0; p++) {
			const tdr_lease_info *li = part_lease(s, p);

			snprintf(a, sizeof(a), "%" PRId64, p);
			if (lease_live(li)) {
				owned++;
				clean_text(li->holder, strlen(li->holder), b, sizeof(b));
				snprintf(d, sizeof(d), "%" PRId64, li->epoch);
				fmt_dur(li->expires_in_ms, e, sizeof(e));
				rc = table_add(&t, err, a, b, d, e);
			} else {
				snprintf(d, sizeof(d), "%s", li ? "" : "-");
				if (li)
					snprintf(d, sizeof(d), "%" PRId64, li->epoch);
				rc = table_add(&t, err, a, "(unowned)", d, li ? lease_state(li) : "-");
				if (unl < sizeof(un) - 8)
					unl += (size_t)snprintf(un + unl, sizeof(un) - unl, "%s%" PRId64, unl ? "," : "", p);
			}
		}
		if (rc < 0)
			goto out;
		printf("partitions   %" PRId64 " owned, %" PRId64 " unowned%s%s%s\n", owned, cfg->partitions - owned,
		       unl ? " [" : "", un, unl ? "]" : "");
		table_print(&t, stdout, "  ");
		table_free(&t);
	}

	printf("backlog      fifo %" PRId64 "  claimed %" PRId64 " (%zu claim records)  pending %" PRId64, s->fifo,
	       s->claimed, s->nclaims, s->pending);
	if (s->untriaged >= 0)
		printf("  untriaged %" PRId64, s->untriaged);
	else if (s->untriaged_skipped)
		printf("  untriaged not counted (FerretDB would read all %" PRId64 ")", s->fifo);
	printf("\n");
	if (s->orphan_records || s->stray_records)
		printf("             orphaned: %" PRId64 " claim records (%" PRId64 " events) of deposed epochs or unheld "
		       "scopes%s\n",
		       s->orphan_records, s->orphan_events,
		       s->stray_records ? "; plus claim records of partitions outside this mode" : "");
	if (s->has_head) {
		if (s->head_created_ms != INT64_MIN) {
			fmt_time(s->head_created_ms, a, sizeof(a));
			fmt_dur(s->now_ms - s->head_created_ms, b, sizeof(b));
			printf("oldest       age %s  created_at %s  _id %s  (FIFO head, natural order)\n", b, a, s->head_id);
		} else {
			printf("oldest       _id %s has no created_at date  (FIFO head, natural order)\n", s->head_id);
		}
	} else {
		printf("oldest       - (the FIFO is empty)\n");
	}
	printf("deadletters  %" PRId64 "\n", s->deadletters);
	if (s->oldest_delta_ms != INT64_MIN)
		fmt_dur(s->now_ms - s->oldest_delta_ms, b, sizeof(b));
	else
		snprintf(b, sizeof(b), "0s");
	if (s->has_fold) {
		if (s->fold_at_ms != INT64_MIN)
			fmt_time(s->fold_at_ms, f, sizeof(f));
		else
			snprintf(f, sizeof(f), "?");
		printf("fold         seq %" PRId64 " by %s (epoch %" PRId64 ", at %s)  deltas pending %" PRId64 "  lag %s\n",
		       s->fold_seq, s->fold_holder[0] ? s->fold_holder : "?", s->fold_epoch, f, s->deltas, b);
	} else {
		printf("fold         never ran  deltas pending %" PRId64 "  lag %s\n", s->deltas, b);
	}
	if (s->has_rate)
		printf("rate         %.1f events/s  (FIFO net drain over %.2f s: %" PRId64 " -> %" PRId64
		       "; fold seq +%" PRId64 ")\n",
		       s->rate, (double)s->rate_ms / 1000.0, s->fifo0, s->fifo1, s->seq1 - s->seq0);
	else
		printf("rate         not measured (--no-rate)\n");

	printf("leases       %zu\n", s->nleases);
	if (s->nleases) {
		if ((rc = table_init(&t, 6, err)) < 0 ||
		    (rc = table_add(&t, err, "NAME", "HOLDER", "EPOCH", "TTL", "EXPIRES", "STATE")) < 0)
			goto out;
		for (size_t i = 0; i < s->nleases && rc == 0; i++) {
			const tdr_lease_info *li = &s->leases[i];

			clean_text(li->name, strlen(li->name), a, sizeof(a));
			clean_text(li->holder, strlen(li->holder), b, sizeof(b));
			snprintf(d, sizeof(d), "%" PRId64, li->epoch);
			fmt_dur(li->ttl_ms, e, sizeof(e));
			if (lease_live(li))
				fmt_dur(li->expires_in_ms, f, sizeof(f));
			else
				snprintf(f, sizeof(f), "-");
			rc = table_add(&t, err, a, b, d, e, f, lease_state(li));
		}
		if (rc < 0)
			goto out;
		table_print(&t, stdout, "  ");
	}
	if (fflush(stdout) != 0)
		rc = tdr_err_set(err, TDR_EFAIL, "writing to standard output failed");
out:
	table_free(&t);
	free(mem);
	return rc;
}

/* Parse a non-negative integer option value; -1 if it is not one within [lo, hi]. */
static int parse_num(const char *s, int64_t lo, int64_t hi, int64_t *ret)
{
	char *end;
	long long v;

	errno = 0;
	v = strtoll(s, &end, 10);
	if (errno || end == s || *end || v < lo || v > hi)
		return -1;
	*ret = v;
	return 0;
}

/* --opt VALUE or --opt=VALUE; *i advanced past what was used.  1 matched, 0 not this option, -1 missing value. */
static int opt_value(int argc, char **argv, int *i, const char *name, const char **val)
{
	const char *a = argv[*i];
	size_t n = strlen(name);

	if (strncmp(a, name, n) != 0)
		return 0;
	if (a[n] == '=') {
		*val = a + n + 1;
		return 1;
	}
	if (a[n] != '\0')
		return 0;
	if (*i + 1 >= argc)
		return -1;
	*val = argv[++*i];
	return 1;
}

static int cmd_status(struct ctl *c, int argc, char **argv)
{
	int json = 0, rate = 1, rc;
	int64_t interval = RATE_INTERVAL_DEFAULT;
	struct status s;
	tdr_err err;

	for (int i = 1; i < argc; i++) {
		const char *v = NULL;
		int m;

		if (strcmp(argv[i], "--json") == 0) {
			json = 1;
		} else if (strcmp(argv[i], "--no-rate") == 0) {
			rate = 0;
		} else if ((m = opt_value(argc, argv, &i, "--interval", &v)) != 0) {
			if (m < 0 || parse_num(v, 1, 600000, &interval) < 0)
				return usage_error("status: --interval needs milliseconds in [1, 600000]");
		} else {
			return usage_error("status: unknown argument '%s'", argv[i]);
		}
	}
	if ((rc = connect_store(c, 1)) != 0 || (rc = connect_coord(c)) != 0)
		return rc;
	memset(&s, 0, sizeof(s));
	tdr_err_clear(&err);
	if (gather_status(c, &s, rate, interval, &err) < 0 ||
	    (json ? status_json(c, &s, &err) : status_text(c, &s, &err)) < 0) {
		fprintf(stderr, PROG ": status: %s\n", err.msg);
		status_free(&s);
		return exit_for(&err);
	}
	status_free(&s);
	return EX_OK;
}

/* ------------------------------------------------------------------ dlq list */

/* What `dlq list` shows of one dead letter. */
struct dl_view {
	char id[ID_TEXT_MAX];
	const char *id_type;
	char reason[TDR_REASON_MAX + 8];
	char owner[TDR_HOLDER_MAX + 8];
	int64_t at_ms; /* INT64_MIN: none */
	int64_t attempts, part, doc_bytes;
	int has_doc;
	char doc_start[DOC_START_MAX];
};

static void dl_view_fill(const bson_t *doc, struct dl_view *v)
{
	bson_iter_t it;
	const char *s;
	uint32_t l = 0;

	memset(v, 0, sizeof(*v));
	if (bson_iter_init_find(&it, doc, "_id")) {
		id_text(bson_iter_value(&it), v->id, sizeof(v->id));
		v->id_type = id_type(bson_iter_value(&it));
	} else {
		snprintf(v->id, sizeof(v->id), "?");
		v->id_type = "other";
	}
	s = tdr_bson_str(doc, "reason", &l);
	clean_text(s ? s : "", s ? l : 0, v->reason, sizeof(v->reason));
	s = tdr_bson_str(doc, "owner", &l);
	clean_text(s ? s : "", s ? l : 0, v->owner, sizeof(v->owner));
	v->at_ms = bson_iter_init_find(&it, doc, "at") && BSON_ITER_HOLDS_DATE_TIME(&it) ? bson_iter_date_time(&it)
											 : INT64_MIN;
	v->attempts = tdr_bson_i64(doc, "attempts", 0);
	v->part = tdr_bson_i64(doc, "part", -1);
	v->doc_bytes = tdr_bson_i64(doc, "doc_bytes", -1);
	if (bson_iter_init_find(&it, doc, "doc") && BSON_ITER_HOLDS_DOCUMENT(&it)) {
		const uint8_t *data;
		uint32_t len;
		bson_t sub;

		v->has_doc = 1;
		bson_iter_document(&it, &len, &data);
		if (bson_init_static(&sub, data, len)) {
			size_t jl = 0;
			char *json = bson_as_relaxed_extended_json(&sub, &jl);

			if (v->doc_bytes < 0)
				v->doc_bytes = len;
			if (json)
				clean_text(json, jl, v->doc_start, sizeof(v->doc_start));
			bson_free(json);
		}
	} else if ((s = tdr_bson_str(doc, "doc_head", &l)) != NULL) {
		clean_text(s, l, v->doc_start, sizeof(v->doc_start));
	}
}

static int cmd_dlq_list(struct ctl *c, int argc, char **argv)
{
	int json = 0, rc;
	int64_t limit = DLQ_LIMIT_DEFAULT, total = 0, shown = 0;
	mongoc_collection_t *co;
	mongoc_cursor_t *cur;
	bson_t filter = BSON_INITIALIZER, opts;
	const bson_t *doc;
	bson_error_t be;
	tdr_err err;
	struct table t = { 0 };
	json_t *root = NULL, *entries = NULL;
	int oom = 0;
	const char *order;

	for (int i = 2; i < argc; i++) {
		const char *v = NULL;
		int m;

		if (strcmp(argv[i], "--json") == 0) {
			json = 1;
		} else if ((m = opt_value(argc, argv, &i, "--limit", &v)) != 0) {
			if (m < 0 || parse_num(v, 1, DLQ_LIMIT_MAX, &limit) < 0)
				return usage_error("dlq list: --limit needs a number in [1, %d]", DLQ_LIMIT_MAX);
		} else {
			return usage_error("dlq list: unknown argument '%s'", argv[i]);
		}
	}
	if ((rc = connect_store(c, 1)) != 0)
		return rc;
	tdr_err_clear(&err);
	if (est_count(c, TDR_C_DEADLETTER, &total, &err) < 0) {
		fprintf(stderr, PROG ": dlq list: %s\n", err.msg);
		return exit_for(&err);
	}
	/*
	 * Newest first where the store can sort cheaply; FerretDB sorts by
	 * reading the whole collection, so there we read the first N in natural
	 * (insertion) order, oldest first, and say so.
	 */
	order = c->st->is_ferretdb ? "natural" : "newest_first";
	tdr_store_read_opts(c->st, &opts);
	BSON_APPEND_INT64(&opts, "limit", limit);
	if (!c->st->is_ferretdb) {
		bson_t sort;

		BSON_APPEND_DOCUMENT_BEGIN(&opts, "sort", &sort);
		BSON_APPEND_INT32(&sort, "at", -1);
		bson_append_document_end(&opts, &sort);
	}
	if (json) {
		root = json_object();
		entries = json_array();
		oom = root == NULL || entries == NULL;
	} else if (table_init(&t, 6, &err) < 0 ||
		   table_add(&t, &err, "ID", "DEAD-LETTERED AT", "OWNER", "ATTEMPTS", "REASON", "DOCUMENT") < 0) {
		oom = 1;
	}
	co = tdr_store_coll(c->st, c->client, TDR_C_DEADLETTER);
	cur = mongoc_collection_find_with_opts(co, &filter, &opts, NULL);
	while (!oom && mongoc_cursor_next(cur, &doc)) {
		struct dl_view *v = malloc(sizeof(*v));
		char at[40], att[24];

		if (v == NULL) {
			oom = 1;
			break;
		}
		dl_view_fill(doc, v);
		if (v->at_ms != INT64_MIN)
			fmt_time(v->at_ms, at, sizeof(at));
		else
			snprintf(at, sizeof(at), "?");
		snprintf(att, sizeof(att), "%" PRId64, v->attempts);
		if (json) {
			json_t *o = json_object();

			jput(o, "id", jstr(v->id), &oom);
			jput(o, "id_type", jstr(v->id_type), &oom);
			jput(o, "reason", jstr(v->reason), &oom);
			jput(o, "at", jtime(v->at_ms, v->at_ms != INT64_MIN), &oom);
			jput(o, "owner", jstr(v->owner), &oom);
			jput(o, "attempts", json_integer(v->attempts), &oom);
			jput(o, "part", jint_or_null(v->part, v->part >= 0), &oom);
			jput(o, "requeueable", json_boolean(v->has_doc), &oom);
			jput(o, "doc_bytes", jint_or_null(v->doc_bytes, v->doc_bytes >= 0), &oom);
			jput(o, "doc_start", jstr(v->doc_start), &oom);
			jappend(entries, o, &oom);
		} else {
			char dstart[TCELL], dshort[DOC_SHOWN_MAX], ishort[ID_SHOWN_MAX];

			/* Cut to keep a row on a line; --json (or requeue by ID) has the whole _id. */
			clean_text(v->id, strlen(v->id), ishort, sizeof(ishort));
			clean_text(v->doc_start, strlen(v->doc_start), dshort, sizeof(dshort));
			snprintf(dstart, sizeof(dstart), "%s%s", v->has_doc ? "" : "(head only) ", dshort);
			if (table_add(&t, &err, ishort, at, v->owner, att, v->reason, dstart) < 0)
				oom = 1;
		}
		free(v);
		shown++;
	}
	rc = 0;
	if (mongoc_cursor_error(cur, &be)) {
		tdr_store_error(&be, "read " TDR_C_DEADLETTER, &err);
		fprintf(stderr, PROG ": dlq list: %s\n", err.msg);
		rc = exit_for(&err);
	} else if (oom) {
		fprintf(stderr, PROG ": dlq list: out of memory\n");
		rc = EX_FAILURE;
	} else if (json) {
		jput(root, "order", jstr(order), &oom);
		jput(root, "total", json_integer(total), &oom);
		jput(root, "shown", json_integer(shown), &oom);
		jput(root, "limit", json_integer(limit), &oom);
		jput(root, "entries", entries, &oom);
		entries = NULL;
		if (json_emit(root, oom, &err) < 0) {
			fprintf(stderr, PROG ": dlq list: %s\n", err.msg);
			rc = EX_FAILURE;
		}
	} else {
		printf("%" PRId64 " dead letter%s; showing %" PRId64 " %s\n", total, total == 1 ? "" : "s", shown,
		       c->st->is_ferretdb ? "in natural order (FerretDB: insertion order, oldest first)"
					  : "newest first");
		if (shown)
			table_print(&t, stdout, "");
		if (fflush(stdout) != 0)
			rc = EX_FAILURE;
	}
	mongoc_cursor_destroy(cur);
	mongoc_collection_destroy(co);
	bson_destroy(&opts);
	bson_destroy(&filter);
	table_free(&t);
	json_decref(entries);
	json_decref(root);
	return rc;
}

/* ------------------------------------------------------------------ dlq requeue */

struct idlist {
	bson_value_t *v;
	size_t n, cap;
};

static int idlist_add(struct idlist *l, const bson_value_t *v)
{
	if (l->n == l->cap) {
		size_t ncap = l->cap ? l->cap * 2 : 64;
		bson_value_t *nv = realloc(l->v, ncap * sizeof(*nv));

		if (nv == NULL)
			return -1;
		l->v = nv;
		l->cap = ncap;
	}
	bson_value_copy(v, &l->v[l->n++]);
	return 0;
}

static void idlist_free(struct idlist *l)
{
	for (size_t i = 0; i < l->n; i++)
		bson_value_destroy(&l->v[i]);
	free(l->v);
	l->v = NULL;
	l->n = l->cap = 0;
}

/*
 * The _ids in the dead-letter collection now.  Taken before anything is
 * requeued, so documents that come back (still malformed) while we work are
 * not requeued again in the same run.
 */
static int dlq_snapshot(struct ctl *c, struct idlist *out, tdr_err *err)
{
	mongoc_collection_t *co = tdr_store_coll(c->st, c->client, TDR_C_DEADLETTER);
	bson_t filter = BSON_INITIALIZER, opts, proj;
	const bson_t *doc;
	mongoc_cursor_t *cur;
	bson_error_t be;
	bson_iter_t it;
	int rc = 0;

	tdr_store_read_opts(c->st, &opts);
	BSON_APPEND_DOCUMENT_BEGIN(&opts, "projection", &proj);
	BSON_APPEND_INT32(&proj, "_id", 1);
	bson_append_document_end(&opts, &proj);
	cur = mongoc_collection_find_with_opts(co, &filter, &opts, NULL);
	while (mongoc_cursor_next(cur, &doc))
		if (bson_iter_init_find(&it, doc, "_id") && idlist_add(out, bson_iter_value(&it)) < 0) {
			rc = tdr_err_set(err, TDR_ENOMEM, "out of memory");
			break;
		}
	if (rc == 0 && mongoc_cursor_error(cur, &be))
		rc = tdr_store_error(&be, "read " TDR_C_DEADLETTER, err);
	mongoc_cursor_destroy(cur);
	bson_destroy(&opts);
	bson_destroy(&filter);
	mongoc_collection_destroy(co);
	return rc;
}

static int is_hex24(const char *s)
{
	if (strlen(s) != 24)
		return 0;
	for (; *s; s++)
		if (!((*s >= '0' && *s <= '9') || (*s >= 'a' && *s <= 'f') || (*s >= 'A' && *s <= 'F')))
			return 0;
	return 1;
}

struct requeue_stats {
	int64_t requeued, duplicates, too_large, gone, failed, would_fail_again;
	int named_missed; /* an ID given on the command line was not requeued */
};

static int find_by_id(struct ctl *c, const char *coll, const bson_value_t *id, bson_t *out, int *found, tdr_err *err)
{
	bson_t filter = BSON_INITIALIZER;
	int rc;

	/* A lone {_id} filter: the one FerretDB pushes down to its storage. */
	bson_append_value(&filter, "_id", 3, id);
	rc = find_first(c, coll, &filter, NULL, out, found, err);
	bson_destroy(&filter);
	return rc;
}

/*
 * The document to put back: the original, minus `part`, so that its partition
 * is computed again under the current coord.partitions (by the replica that
 * claims it, or by the leader's triage on MongoDB).
 */
static int requeue_doc(const bson_t *entry, const bson_value_t *id, bson_t *out)
{
	bson_iter_t it;
	const uint8_t *data;
	uint32_t len;
	bson_t orig;

	if (!bson_iter_init_find(&it, entry, "doc") || !BSON_ITER_HOLDS_DOCUMENT(&it))
		return -1;
	bson_iter_document(&it, &len, &data);
	if (!bson_init_static(&orig, data, len))
		return -1;
	bson_init(out);
	/* A dead letter always carries the event's _id as its own; keep the pair consistent if doc lost it. */
	if (!bson_has_field(&orig, "_id"))
		bson_append_value(out, "_id", 3, id);
	bson_copy_to_excluding_noinit(&orig, out, "part", NULL);
	return 0;
}

/*
 * Requeue one dead letter.  Order matters, and it is the reverse of the
 * obvious one: while a dead letter with _id X exists, a replica that
 * dead-letters X again takes the existing entry for its own earlier,
 * interrupted attempt (dead-letter inserts are idempotent by _id) and then
 * deletes X from the FIFO.  Inserting into the FIFO first would let a replica
 * dead-letter the copy before we delete the old entry, and our delete would
 * then remove the only record of the event.  So: delete the entry (by its
 * lone _id), then insert the document.  If the insert fails for any reason
 * but "already in the FIFO", the entry is put back as it was; SIGINT and
 * SIGTERM wait for the pair to finish.  Only a crash between the two
 * statements loses the entry (tdrainctl(8) says so).
 */
static int requeue_one(struct ctl *c, const bson_value_t *id, int dry_run, int named, struct requeue_stats *rs,
		       tdr_err *err)
{
	bson_t entry, doc, filter = BSON_INITIALIZER, reply;
	mongoc_collection_t *dead = NULL, *fifo = NULL;
	bson_error_t be;
	char idt[ID_TEXT_MAX];
	int found, rc;

	id_text(id, idt, sizeof(idt));
	if ((rc = find_by_id(c, TDR_C_DEADLETTER, id, &entry, &found, err)) < 0) {
		bson_destroy(&entry);
		bson_destroy(&filter);
		return rc;
	}
	if (!found) {
		printf("%s: not in %s%s\n", idt, TDR_C_DEADLETTER, named ? "" : " any more (requeued by someone else)");
		rs->gone++;
		rs->named_missed |= named;
		bson_destroy(&entry);
		bson_destroy(&filter);
		return 0;
	}
	if (requeue_doc(&entry, id, &doc) < 0) {
		printf("%s: skipped: only the first bytes (doc_head) were kept of this %lld-byte document; it cannot "
		       "be requeued, re-send it from the producer\n",
		       idt, (long long)tdr_bson_i64(&entry, "doc_bytes", -1));
		rs->too_large++;
		rs->named_missed |= named;
		bson_destroy(&entry);
		bson_destroy(&filter);
		return 0;
	}
	if (dry_run) {
		bson_t present;
		int in_fifo = 0;
		char reason[TDR_REASON_MAX], why[TDR_REASON_MAX + 8];
		tdr_cevent ev;

		rc = find_by_id(c, c->cfg.events_coll, id, &present, &in_fifo, err);
		bson_destroy(&present);
		if (rc == 0) {
			/*
			 * The same rules the replicas apply, to the document as inserted:
			 * the claiming replica computes a missing partition without writing
			 * it.  (On MongoDB the leader's triage may write `part` first,
			 * which adds 10 bytes to a document at the size limit.)
			 */
			if (tdr_event_validate(&doc, &c->cfg, &ev, reason, sizeof(reason)) < 0) {
				clean_text(reason, strlen(reason), why, sizeof(why));
				rs->would_fail_again++;
			} else {
				why[0] = '\0';
			}
			printf("%s: would requeue%s%s%s\n", idt, in_fifo ? " (already in the FIFO: a duplicate)" : "",
			       why[0] ? "; still invalid, it would be dead-lettered again: " : "", why);
			if (in_fifo)
				rs->duplicates++;
			else
				rs->requeued++;
		}
		goto out;
	}

	dead = tdr_store_coll(c->st, c->client, TDR_C_DEADLETTER);
	fifo = tdr_store_coll(c->st, c->client, c->cfg.events_coll);
	bson_append_value(&filter, "_id", 3, id);
	if (!mongoc_collection_delete_one(dead, &filter, NULL, &reply, &be)) {
		bson_destroy(&reply);
		rc = tdr_store_error(&be, "delete dead letter", err);
		goto out;
	}
	found = tdr_bson_i64(&reply, "deletedCount", 0) > 0;
	bson_destroy(&reply);
	if (!found) {
		/* Someone else requeued it between our read and our delete: it is theirs to put back. */
		printf("%s: not in %s any more (requeued by someone else)\n", idt, TDR_C_DEADLETTER);
		rs->gone++;
		rs->named_missed |= named;
		goto out;
	}
	if (mongoc_collection_insert_one(fifo, &doc, NULL, NULL, &be)) {
		printf("%s: requeued\n", idt);
		rs->requeued++;
	} else if (tdr_store_is_dup(&be)) {
		/* The FIFO already holds this _id: it will be drained; the dead letter is not needed. */
		printf("%s: already in the FIFO (duplicate): dead letter removed\n", idt);
		rs->duplicates++;
	} else {
		bson_error_t be2;

		rc = tdr_store_error(&be, "insert into the FIFO", err);
		rs->failed++;
		if (mongoc_collection_insert_one(dead, &entry, NULL, NULL, &be2) || tdr_store_is_dup(&be2)) {
			printf("%s: not requeued (%s); dead letter kept\n", idt, err->msg);
		} else {
			/* Both failed: the entry must not vanish silently; the operator can insert it back. */
			char *json = bson_as_canonical_extended_json(&entry, NULL);

			fprintf(stderr,
				PROG ": %s: could not requeue it nor restore its dead letter (%s); the dead letter as "
				     "canonical Extended JSON:\n%s\n",
				idt, be2.message, json ? json : "(out of memory)");
			bson_free(json);
		}
	}
out:
	if (dead)
		mongoc_collection_destroy(dead);
	if (fifo)
		mongoc_collection_destroy(fifo);
	bson_destroy(&filter);
	bson_destroy(&doc);
	bson_destroy(&entry);
	return rc;
}

static int cmd_dlq_requeue(struct ctl *c, int argc, char **argv)
{
	int all = 0, dry_run = 0, rc = 0, nnamed = 0;
	struct idlist ids = { 0 };
	struct requeue_stats rs = { 0 };
	struct sigaction sa;
	tdr_err err;
	size_t i;

	for (int k = 2; k < argc; k++) {
		if (strcmp(argv[k], "--all") == 0)
			all = 1;
		else if (strcmp(argv[k], "--dry-run") == 0)
			dry_run = 1;
		else if (strcmp(argv[k], "--") == 0)
			nnamed += argc - k - 1, k = argc;
		else if (argv[k][0] == '-' && argv[k][1] == '-')
			return usage_error("dlq requeue: unknown option '%s'", argv[k]);
		else
			nnamed++;
	}
	if (all == (nnamed > 0))
		return usage_error("dlq requeue: give --all or one or more IDs (not both)");
	if ((rc = connect_store(c, 1)) != 0)
		return rc;
	tdr_err_clear(&err);

	/* Interruption only between entries: each delete + insert pair runs to its end. */
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_stop;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);

	if (all) {
		if ((rc = dlq_snapshot(c, &ids, &err)) < 0)
			goto fail;
		printf("%s %zu dead letter%s%s\n", dry_run ? "dry run: would requeue up to" : "requeueing", ids.n,
		       ids.n == 1 ? "" : "s", dry_run ? "; nothing is written" : "");
		for (i = 0; i < ids.n && !got_stop; i++)
			if ((rc = requeue_one(c, &ids.v[i], dry_run, 0, &rs, &err)) < 0)
				goto fail;
	} else {
		int past_dashes = 0;

		for (int k = 2; k < argc && !got_stop; k++) {
			bson_value_t v;
			bson_t probe;
			int found = 0;

			if (!past_dashes && strcmp(argv[k], "--") == 0) {
				past_dashes = 1;
				continue;
			}
			if (!past_dashes && argv[k][0] == '-' && argv[k][1] == '-')
				continue;
			memset(&v, 0, sizeof(v));
			/* 24 hex digits name an ObjectId, unless only a string of that text is dead-lettered. */
			if (is_hex24(argv[k])) {
				v.value_type = BSON_TYPE_OID;
				bson_oid_init_from_string(&v.value.v_oid, argv[k]);
				if ((rc = find_by_id(c, TDR_C_DEADLETTER, &v, &probe, &found, &err)) < 0) {
					bson_destroy(&probe);
					goto fail;
				}
				bson_destroy(&probe);
			}
			if (!found) {
				v.value_type = BSON_TYPE_UTF8;
				v.value.v_utf8.str = argv[k];
				v.value.v_utf8.len = (uint32_t)strlen(argv[k]);
			}
			if ((rc = requeue_one(c, &v, dry_run, 1, &rs, &err)) < 0)
				goto fail;
		}
	}
	if (got_stop)
		printf("interrupted: stopped between entries; what is left is still dead-lettered\n");
	if (dry_run)
		printf("dry run: would requeue %" PRId64 " (%" PRId64 " already in the FIFO); %" PRId64
		       " of them would be dead-lettered again as they are; %" PRId64 " too large to requeue; %" PRId64
		       " not found\n",
		       rs.requeued + rs.duplicates, rs.duplicates, rs.would_fail_again, rs.too_large, rs.gone);
	else
		printf("requeued %" PRId64 " (plus %" PRId64 " already in the FIFO, counted as duplicates); %" PRId64
		       " too large to requeue (doc_head only); %" PRId64 " not found; %" PRId64 " failed\n",
		       rs.requeued, rs.duplicates, rs.too_large, rs.gone, rs.failed);
	idlist_free(&ids);
	if (rs.failed)
		return exit_for(&err);
	return got_stop || rs.named_missed ? EX_FAILURE : EX_OK;
fail:
	fprintf(stderr, PROG ": dlq requeue: %s\n", err.msg);
	printf("stopped: requeued %" PRId64 " (plus %" PRId64 " duplicates) before the error; rerunning is safe\n",
	       rs.requeued, rs.duplicates);
	idlist_free(&ids);
	return exit_for(&err);
}

/* ------------------------------------------------------------------ recover */

/*
 * Delete the orphaned claim records of one scope.  With a live holder at
 * epoch E, the orphans are the records of epochs < E: their writers were
 * deposed, and a deposed epoch never becomes current again, so nobody will
 * ever acknowledge them; the holder itself deletes exactly these on its next
 * acquisition.  With no live holder, every record of the scope is orphaned.
 * Each delete is fenced by {_id, epoch}.  The events named by a deleted
 * record are still in the FIFO (acknowledgement deletes the record before
 * the events), so they are plain pending events again and the holder claims
 * them with its next batch; the fold counts each insert_id once.
 */
static int recover_scope(struct ctl *c, int32_t part, const struct claimrec *recs, size_t nrecs,
			 const tdr_lease_info *leases, size_t nleases, int64_t *tot_recs, int64_t *tot_events,
			 tdr_err *err)
{
	char name[32], who[TDR_HOLDER_MAX + 64], scope[32], recids[128] = "";
	const tdr_lease_info *li;
	mongoc_collection_t *co;
	mongoc_bulk_operation_t *bulk;
	bson_t reply;
	int64_t nsel = 0, events = 0, removed;
	size_t el = 0;
	int live, rc, cut = 0;

	scope_lease_name(&c->cfg, part, name, sizeof(name));
	li = find_lease(leases, nleases, name);
	live = lease_live(li);
	if (c->cfg.mode == TDR_MODE_PARTITIONED)
		snprintf(scope, sizeof(scope), "partition %d", (int)part);
	else
		snprintf(scope, sizeof(scope), "single-mode scope");
	if (live) {
		char h[TDR_HOLDER_MAX];

		clean_text(li->holder, strlen(li->holder), h, sizeof(h));
		snprintf(who, sizeof(who), "held by %s at epoch %" PRId64, h, li->epoch);
	} else if (li) {
		snprintf(who, sizeof(who), "no holder (%s %s at epoch %" PRId64 ")", name, lease_state(li), li->epoch);
	} else {
		snprintf(who, sizeof(who), "no holder (no %s lease)", name);
	}

	co = tdr_store_coll(c->st, c->client, TDR_C_CLAIMS);
	bulk = tdr_bulk_new(co, 0);
	for (size_t i = 0; i < nrecs; i++) {
		bson_t f = BSON_INITIALIZER;

		if (recs[i].part != part || (live && recs[i].epoch >= li->epoch))
			continue;
		BSON_APPEND_UTF8(&f, "_id", recs[i].id);
		BSON_APPEND_INT64(&f, "epoch", recs[i].epoch);
		mongoc_bulk_operation_remove_one(bulk, &f);
		bson_destroy(&f);
		nsel++;
		events += recs[i].nids;
		/* The first few record ids, for the operator's log; "..." says there were more. */
		if (!cut && el + strlen(recs[i].id) + 5 < sizeof(recids)) {
			el += (size_t)snprintf(recids + el, sizeof(recids) - el, "%s%s", el ? " " : "", recs[i].id);
		} else if (!cut) {
			snprintf(recids + el, sizeof(recids) - el, " ...");
			cut = 1;
		}
	}
	if (nsel == 0) {
		mongoc_bulk_operation_destroy(bulk);
		mongoc_collection_destroy(co);
		printf("%s: %s: no orphaned claim records\n", scope, who);
		return 0;
	}
	/* tdr_bulk_run fills reply whether or not the bulk succeeded. */
	rc = tdr_bulk_run(bulk, "delete orphaned claim records", NULL, &reply, err);
	removed = rc == 0 ? tdr_bson_i64(&reply, "nRemoved", 0) : 0;
	bson_destroy(&reply);
	mongoc_bulk_operation_destroy(bulk);
	mongoc_collection_destroy(co);
	if (rc < 0)
		return rc;
	printf("%s: %s: deleted %" PRId64 " orphaned claim record%s (%" PRId64 " events pending again) [%s]",
	       scope, who, removed, removed == 1 ? "" : "s", events, recids);
	if (removed < nsel)
		printf("; %" PRId64 " already gone (acknowledged or recovered meanwhile)", nsel - removed);
	printf("\n");
	*tot_recs += removed;
	/* Events are counted per selected record: a record acknowledged meanwhile took its events with it. */
	*tot_events += removed == nsel ? events : events * removed / nsel;
	return 0;
}

static int cmd_recover(struct ctl *c, int argc, char **argv)
{
	int all = 0, have_part = 0, rc;
	int64_t part = 0, recs_done = 0, events_done = 0, stray = 0;
	struct claimrec *recs = NULL;
	tdr_lease_info *leases = NULL;
	size_t nrecs = 0, nleases = 0;
	tdr_err err;

	for (int i = 1; i < argc; i++) {
		const char *v = NULL;
		int m;

		if (strcmp(argv[i], "--all") == 0) {
			all = 1;
		} else if ((m = opt_value(argc, argv, &i, "--partition", &v)) != 0) {
			if (m < 0 || parse_num(v, 0, INT32_MAX, &part) < 0)
				return usage_error("recover: --partition needs a partition number");
			have_part = 1;
		} else {
			return usage_error("recover: unknown argument '%s'", argv[i]);
		}
	}
	if (all == have_part)
		return usage_error("recover: give --partition P or --all (not both)");
	if (have_part && c->cfg.mode != TDR_MODE_PARTITIONED)
		return usage_error("recover: single mode has one scope and no partitions: use --all");
	if (have_part && part >= c->cfg.partitions)
		return usage_error("recover: partition %lld is outside [0, %lld) (coord.partitions)", (long long)part,
				   (long long)c->cfg.partitions);
	if ((rc = connect_store(c, 1)) != 0 || (rc = connect_coord(c)) != 0)
		return rc;
	tdr_err_clear(&err);
	/* Claim records first, then leases: see gather_status() for why this order is the safe one. */
	if (read_claims(c, &recs, &nrecs, &err) < 0 || list_leases(c, &leases, &nleases, &err) < 0)
		goto fail;
	if (c->cfg.mode == TDR_MODE_SINGLE) {
		if (recover_scope(c, TDR_SCOPE_ALL, recs, nrecs, leases, nleases, &recs_done, &events_done, &err) < 0)
			goto fail;
	} else {
		int64_t lo = all ? 0 : part, hi = all ? c->cfg.partitions : part + 1;

		for (int64_t p = lo; p < hi; p++)
			if (recover_scope(c, (int32_t)p, recs, nrecs, leases, nleases, &recs_done, &events_done, &err) < 0)
				goto fail;
	}
	for (size_t i = 0; i < nrecs; i++)
		stray += !part_in_mode(&c->cfg, recs[i].part);
	printf("recovered %" PRId64 " claim record%s holding %" PRId64 " events: they are pending again and the "
	       "current holders claim them next\n",
	       recs_done, recs_done == 1 ? "" : "s", events_done);
	if (stray)
		printf("left alone: %" PRId64 " claim record%s of partitions that do not exist in %s mode with %lld "
		       "partitions: check coord.mode and coord.partitions against the replicas'\n",
		       stray, stray == 1 ? "" : "s", tdr_mode_name(c->cfg.mode), (long long)c->cfg.partitions);
	free(recs);
	free(leases);
	return EX_OK;
fail:
	fprintf(stderr, PROG ": recover: %s\n", err.msg);
	free(recs);
	free(leases);
	return exit_for(&err);
}

/* ------------------------------------------------------------------ main */

struct args {
	const char *file;
	const char *name;
	char **sets;
	int nsets;
};

/* The daemon's precedence: default, file, TDRAIN_* environment, --set (then -N). */
static int load_config(const struct args *a, tdr_config *cfg, tdr_err *err)
{
	const char *file = a->file;

	tdr_config_defaults(cfg);
	/* The shared file by default, when there is one: the environment alone is a valid configuration too. */
	if (file == NULL && access(DEFAULT_CONF, F_OK) == 0)
		file = DEFAULT_CONF;
	if (file && tdr_config_load_file(cfg, file, err) < 0)
		return TDR_ECONFIG;
	if (tdr_config_load_env(cfg, err) < 0)
		return TDR_ECONFIG;
	for (int i = 0; i < a->nsets; i++)
		if (tdr_config_set(cfg, a->sets[i], err) < 0)
			return tdr_err_wrap(err, "--set");
	if (a->name) {
		if (strlen(a->name) >= sizeof(cfg->name))
			return tdr_err_set(err, TDR_ECONFIG, "-N: name longer than %zu bytes", sizeof(cfg->name) - 1);
		snprintf(cfg->name, sizeof(cfg->name), "%s", a->name);
	}
	return tdr_config_validate(cfg, err);
}

int main(int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "set", required_argument, NULL, 's' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	struct args a = { 0 };
	struct ctl c;
	tdr_err err;
	const char *cmd;
	int opt, status;

	memset(&c, 0, sizeof(c));
	a.sets = calloc((size_t)argc + 1, sizeof(*a.sets));
	if (a.sets == NULL) {
		fprintf(stderr, PROG ": out of memory\n");
		return EX_OSERR;
	}
	/* '+': options end at the command, whose own options are its business. */
	opterr = 0;
	while ((opt = getopt_long(argc, argv, "+c:N:h", longopts, NULL)) != -1) {
		switch (opt) {
		case 'c':
			a.file = optarg;
			break;
		case 'N':
			a.name = optarg;
			break;
		case 's':
			a.sets[a.nsets++] = optarg;
			break;
		case 'h':
			usage(stdout);
			free(a.sets);
			return EX_OK;
		default:
			if (optopt && strchr("cN", optopt))
				status = usage_error("-%c needs a value", optopt);
			else if (optopt == 's' || (optopt == 0 && strncmp(argv[optind - 1], "--set", 5) == 0))
				status = usage_error("--set needs KEY=VALUE");
			else
				status = usage_error("unknown option '%s'", argv[optind - 1]);
			free(a.sets);
			return status;
		}
	}
	if (optind >= argc) {
		free(a.sets);
		return usage_error("no command given");
	}
	cmd = argv[optind];
	if (strcmp(cmd, "help") == 0) {
		usage(stdout);
		free(a.sets);
		return EX_OK;
	}
	if (strcmp(cmd, "status") != 0 && strcmp(cmd, "dlq") != 0 && strcmp(cmd, "recover") != 0 &&
	    strcmp(cmd, "replay") != 0) {
		status = usage_error("unknown command '%s'", cmd);
		free(a.sets);
		return status;
	}
	if (strcmp(cmd, "dlq") == 0 &&
	    (optind + 1 >= argc || (strcmp(argv[optind + 1], "list") != 0 && strcmp(argv[optind + 1], "requeue") != 0))) {
		status = usage_error("dlq needs a subcommand: list or requeue");
		free(a.sets);
		return status;
	}

	tdr_err_clear(&err);
	if (load_config(&a, &c.cfg, &err) < 0) {
		fprintf(stderr, PROG ": configuration error: %s\n", err.msg);
		free(a.sets);
		return EX_CONFIG;
	}
	free(a.sets);
	/* Warnings and errors only: an operator's terminal is not a debug log. */
	tdr_log_init(PROG, LOG_WARNING);
	mongoc_log_set_handler(on_mongoc_log, NULL);
	tdr_redact_uri(c.cfg.store_uri, c.uri_safe, sizeof(c.uri_safe));
	if (c.cfg.backend == TDR_BACKEND_ETCD)
		tdr_redact_uri(c.cfg.etcd_endpoint, c.coord_safe, sizeof(c.coord_safe));
	else
		snprintf(c.coord_safe, sizeof(c.coord_safe), "%s", c.uri_safe);

	argc -= optind;
	argv += optind;
	if (strcmp(cmd, "status") == 0) {
		status = cmd_status(&c, argc, argv);
	} else if (strcmp(cmd, "recover") == 0) {
		status = cmd_recover(&c, argc, argv);
	} else if (strcmp(cmd, "replay") == 0) {
		/* replay checks its arguments and pings the store itself, only when it will write. */
		status = connect_store(&c, 0);
		if (status == 0)
			status = ctl_replay(c.st, &c.cfg, argc, argv);
	} else if (strcmp(argv[1], "list") == 0) {
		status = cmd_dlq_list(&c, argc, argv);
	} else {
		status = cmd_dlq_requeue(&c, argc, argv);
	}
	disconnect(&c);
	mongoc_cleanup();
	return status;
}
