/*
 * status.c - tdrainctl status: members, leases, the partition map, backlog,
 * orphaned claims, dead letters, the fold and the drain rate, as text or as
 * JSON (the fields are documented in docs/OPERATIONS.md).  It only reads.
 */
#include "config.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sysexits.h>

#include "ctl/ctl.h"
#include "lib/bsonx.h"
#include "lib/clock.h"
#include "lib/store.h"

#define RATE_INTERVAL_DEFAULT 1000
#define UNTRIAGED_SCAN_MAX 10000 /* FerretDB: count untriaged events only in a FIFO this small */

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
	int fifo_capped, deadletters_capped, deltas_capped, fifo0_capped; /* count stopped at count_limit */
	int64_t count_limit;
	int64_t oldest_delta_ms; /* INT64_MIN: none or no date */
	unsigned idx_present;             /* bits of tdr_index_specs listed by listIndexes */
	unsigned idx_wanted;              /* bits of tdr_index_specs this store needs */
	struct idx_wait *idx_waits;       /* tdrain_state "indexes/<replica>" documents with pending: true */
	size_t nidx_waits;
	int has_fold;
	int64_t fold_seq, fold_epoch, fold_at_ms;
	char fold_holder[TDR_HOLDER_MAX];
	int has_rate;
	int64_t rate_ms, fifo0, fifo1, seq0, seq1;
	double rate;
};

/* A replica that reported a pending index build (tdrain_state "indexes/<replica>", worker/indexer.h). */
struct idx_wait {
	char replica[TDR_HOLDER_MAX];
	char missing[128];
	char error[256];
	int64_t attempts, at_ms;
	int live; /* it holds a live lease: it is running and still waiting */
};

#define IDX_WAITS_MAX 256

static void status_free(struct status *s)
{
	free(s->leases);
	free(s->claims);
	free(s->idx_waits);
}

static int read_index_waits(struct ctl *c, struct status *s, tdr_err *err)
{
	mongoc_collection_t *coll = tdr_store_coll(c->st, c->client, TDR_C_STATE);
	bson_t filter = BSON_INITIALIZER, opts;
	mongoc_cursor_t *cur;
	const bson_t *doc;
	bson_error_t be;
	int rc = 0;

	s->idx_waits = calloc(IDX_WAITS_MAX, sizeof(*s->idx_waits));
	if (s->idx_waits == NULL) {
		mongoc_collection_destroy(coll);
		return tdr_err_set(err, TDR_ENOMEM, "out of memory");
	}
	BSON_APPEND_REGEX(&filter, "_id", "^indexes/", "");
	BSON_APPEND_BOOL(&filter, "pending", true);
	tdr_store_read_opts(c->st, &opts);
	BSON_APPEND_INT64(&opts, "limit", IDX_WAITS_MAX);
	cur = mongoc_collection_find_with_opts(coll, &filter, &opts, NULL);
	while (mongoc_cursor_next(cur, &doc) && s->nidx_waits < IDX_WAITS_MAX) {
		struct idx_wait *w = &s->idx_waits[s->nidx_waits];
		bson_iter_t it, arr;
		const char *v;
		uint32_t l = 0;
		size_t off = 0;

		v = tdr_bson_str(doc, "replica", &l);
		clean_text(v ? v : "", v ? l : 0, w->replica, sizeof(w->replica));
		v = tdr_bson_str(doc, "error", &l);
		clean_text(v ? v : "", v ? l : 0, w->error, sizeof(w->error));
		w->attempts = tdr_bson_i64(doc, "attempts", 0);
		w->at_ms = bson_iter_init_find(&it, doc, "at") && BSON_ITER_HOLDS_DATE_TIME(&it) ? bson_iter_date_time(&it)
											     : INT64_MIN;
		if (bson_iter_init_find(&it, doc, "missing") && BSON_ITER_HOLDS_ARRAY(&it) && bson_iter_recurse(&it, &arr))
			while (bson_iter_next(&arr) && BSON_ITER_HOLDS_UTF8(&arr) && off + 1 < sizeof(w->missing)) {
				char name[64];
				int n;

				v = bson_iter_utf8(&arr, &l);
				clean_text(v, l, name, sizeof(name));
				n = snprintf(w->missing + off, sizeof(w->missing) - off, "%s%s", off ? "," : "", name);
				if (n < 0 || (size_t)n >= sizeof(w->missing) - off)
					break;
				off += (size_t)n;
			}
		for (size_t i = 0; i < s->nleases; i++)
			if (lease_live(&s->leases[i]) && strcmp(s->leases[i].holder, w->replica) == 0)
				w->live = 1;
		s->nidx_waits++;
	}
	if (mongoc_cursor_error(cur, &be))
		rc = tdr_store_error(&be, TDR_C_STATE, err);
	mongoc_cursor_destroy(cur);
	bson_destroy(&opts);
	bson_destroy(&filter);
	mongoc_collection_destroy(coll);
	return rc;
}

/* Ready: every index listed, and no running replica still waiting for a build (a store may list one while building). */
static int indexes_ready(const struct status *s)
{
	if (s->idx_present != s->idx_wanted)
		return 0;
	for (size_t i = 0; i < s->nidx_waits; i++)
		if (s->idx_waits[i].live)
			return 0;
	return 1;
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
		if ((rc = exact_count(c, cfg->events_coll, &s->fifo0, &s->fifo0_capped, err)) < 0)
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
	s->count_limit = tdr_count_limit(cfg);
	if ((rc = exact_count(c, cfg->events_coll, &s->fifo, &s->fifo_capped, err)) < 0)
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

	if ((rc = exact_count(c, TDR_C_DEADLETTER, &s->deadletters, &s->deadletters_capped, err)) < 0)
		return rc;
	if ((rc = exact_count(c, TDR_C_DELTAS, &s->deltas, &s->deltas_capped, err)) < 0)
		return rc;
	if ((rc = tdr_store_list_indexes(c->st, c->client, &s->idx_present, err)) < 0)
		return rc;
	s->idx_wanted = tdr_store_indexes_wanted(c->st);
	s->idx_present &= s->idx_wanted;
	if ((rc = read_index_waits(c, s, err)) < 0)
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
	jput(o, "fifo_capped", json_boolean(s->fifo_capped), &oom);
	jput(o, "count_limit", json_integer(s->count_limit), &oom);
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
	jput(root, "deadletters_capped", json_boolean(s->deadletters_capped), &oom);

	o = json_object();
	jput(o, "ready", json_boolean(indexes_ready(s)), &oom);
	a = json_array();
	for (int i = 0; i < TDR_NINDEXES; i++)
		if (s->idx_present & (1u << i))
			jappend(a, jstr(tdr_index_specs[i].name), &oom);
	jput(o, "present", a, &oom);
	a = json_array();
	for (int i = 0; i < TDR_NINDEXES; i++)
		if ((s->idx_wanted & ~s->idx_present) & (1u << i))
			jappend(a, jstr(tdr_index_specs[i].name), &oom);
	jput(o, "missing", a, &oom);
	a = json_array();
	for (size_t i = 0; i < s->nidx_waits; i++) {
		const struct idx_wait *w = &s->idx_waits[i];
		json_t *wo = json_object();

		jput(wo, "replica", jstr(w->replica), &oom);
		jput(wo, "live", json_boolean(w->live), &oom);
		jput(wo, "missing", jstr(w->missing), &oom);
		jput(wo, "attempts", json_integer(w->attempts), &oom);
		jput(wo, "error", jstr(w->error), &oom);
		jput(wo, "at", jtime(w->at_ms, w->at_ms != INT64_MIN), &oom);
		jappend(a, wo, &oom);
	}
	jput(o, "pending_replicas", a, &oom);
	jput(root, "indexes", o, &oom);

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
		/* A capped sample is a lower bound: a difference of two says nothing. */
		jput(o, "events_per_s", s->fifo0_capped || s->fifo_capped ? json_null() : json_real(s->rate), &oom);
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
			printf("shares       min %" PRId64 ", max %" PRId64 ", imbalance %" PRId64
			       " (balanced: %s per member)\n",
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

	printf("backlog      fifo %s%" PRId64 "  claimed %" PRId64 " (%zu claim records)  pending %s%" PRId64,
	       s->fifo_capped ? ">=" : "", s->fifo, s->claimed, s->nclaims, s->fifo_capped ? ">=" : "", s->pending);
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
	printf("deadletters  %s%" PRId64 "\n", s->deadletters_capped ? ">=" : "", s->deadletters);
	{
		char names[128];
		size_t live = 0;

		for (size_t i = 0; i < s->nidx_waits; i++)
			live += s->idx_waits[i].live != 0;
		if (indexes_ready(s)) {
			tdr_store_index_names(s->idx_wanted, names, sizeof(names));
			printf("indexes      ready (%s)\n", names);
		} else {
			tdr_store_index_names(s->idx_wanted & ~s->idx_present, names, sizeof(names));
			printf("indexes      build pending: %s%s; %zu running replica(s) waiting for it (claims scan "
			       "meanwhile)\n",
			       names[0] ? "missing " : "every index listed (a store may list one still building)",
			       names, live);
		}
		for (size_t i = 0; i < s->nidx_waits; i++) {
			const struct idx_wait *w = &s->idx_waits[i];

			if (!w->live)
				continue;
			printf("             %s waits for %s (%" PRId64 " attempts): %s\n", w->replica, w->missing,
			       w->attempts, w->error[0] ? w->error : "-");
		}
	}
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
	if (s->has_rate && (s->fifo0_capped || s->fifo_capped))
		printf("rate         not known: the FIFO holds more than metrics.count_limit %" PRId64 " (fold seq +%" PRId64
		       " over %.2f s)\n",
		       s->count_limit, s->seq1 - s->seq0, (double)s->rate_ms / 1000.0);
	else if (s->has_rate)
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

int cmd_status(struct ctl *c, int argc, char **argv)
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
			if (m < 0 || tdr_parse_i64(v, 1, 600000, &interval) < 0)
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
