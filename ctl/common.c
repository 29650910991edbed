/*
 * common.c - what every tdrainctl subcommand shares: the store and
 * coordination connections (with tdrainctl's own operation timeout), lease
 * listings, the store reads several subcommands make (counts, first
 * documents, claim records and whether they are orphaned), and option
 * parsing.  Declared in ctl.h.
 */
#include "config.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sysexits.h>

#include "coord/coord.h"
#include "ctl/ctl.h"
#include "lib/bsonx.h"
#include "lib/store.h"

#define HOLDER "tdrainctl"
#define CTL_OP_TIMEOUT_MS 15000 /* one store operation of tdrainctl: see widen_op_timeout() */

/* ------------------------------------------------------------------ connection */

int exit_for(const tdr_err *err)
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
int connect_store(struct ctl *c, int ping)
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
int connect_coord(struct ctl *c)
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

void disconnect(struct ctl *c)
{
	tdr_lease_backend_free(c->be);
	c->be = NULL;
	if (c->client)
		tdr_store_push(c->st, c->client);
	c->client = NULL;
	tdr_store_close(c->st);
	c->st = NULL;
}

/* ------------------------------------------------------------------ leases */

int list_leases(struct ctl *c, tdr_lease_info **ret, size_t *ret_n, tdr_err *err)
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

const tdr_lease_info *find_lease(const tdr_lease_info *v, size_t n, const char *name)
{
	for (size_t i = 0; i < n; i++)
		if (strcmp(v[i].name, name) == 0)
			return &v[i];
	return NULL;
}

int lease_live(const tdr_lease_info *li)
{
	return li && !li->released && li->expires_in_ms > 0;
}

const char *lease_state(const tdr_lease_info *li)
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

int cmp_lease(const void *x, const void *y)
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

/*
 * An exact count, bounded by metrics.count_limit (*capped, may be NULL: it
 * stopped there).  Never the store's estimate: DocumentDB's comes from
 * PostgreSQL statistics (85,000 for an empty FIFO).  Costs: docs/DESIGN.md,
 * "Counting documents".
 */
int exact_count(struct ctl *c, const char *coll, int64_t *ret, int *capped, tdr_err *err)
{
	return tdr_store_count(c->st, c->client, coll, tdr_count_limit(&c->cfg), ret, capped, err);
}

int count_docs(struct ctl *c, const char *coll, const bson_t *filter, int64_t *ret, tdr_err *err)
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
int find_first(struct ctl *c, const char *coll, const bson_t *filter, const bson_t *projection, bson_t *out, int *found,
	       tdr_err *err)
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

/*
 * Every claim record.  tdrain_claims holds only in-flight batches (at most a
 * few per partition), so reading it whole is cheap on every store.
 */
int read_claims(struct ctl *c, struct claimrec **ret, size_t *ret_n, tdr_err *err)
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
void scope_lease_name(const tdr_config *cfg, int32_t part, char *buf, size_t len)
{
	if (cfg->mode == TDR_MODE_PARTITIONED)
		snprintf(buf, len, "part/%d", (int)part);
	else
		snprintf(buf, len, "leader");
}

int part_in_mode(const tdr_config *cfg, int32_t part)
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
int claim_orphaned(const tdr_config *cfg, const struct claimrec *r, const tdr_lease_info *leases, size_t nl)
{
	char name[32];
	const tdr_lease_info *li;

	scope_lease_name(cfg, r->part, name, sizeof(name));
	li = find_lease(leases, nl, name);
	return !lease_live(li) || r->epoch < li->epoch;
}

/* ------------------------------------------------------------------ options */

/* --opt VALUE or --opt=VALUE; *i advanced past what was used.  1 matched, 0 not this option, -1 missing value. */
int opt_value(int argc, char **argv, int *i, const char *name, const char **val)
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
