/*
 * dlq.c - tdrainctl dlq: `list` shows dead-lettered events, `requeue` moves
 * their documents back into the FIFO.  requeue is one of tdrainctl's two
 * writes; why its order (delete the entry, then insert) is the safe one next
 * to live replicas is argued at requeue_one().
 */
#include "config.h"

#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sysexits.h>

#include "consumers/event.h"
#include "ctl/ctl.h"
#include "lib/bsonx.h"
#include "lib/store.h"

#define DOC_START_MAX 96   /* the start of a dead-lettered document, as shown */
#define DLQ_LIMIT_MAX 100000
#define ID_SHOWN_MAX 64         /* dlq list's ID column; --json has the whole _id */
#define DOC_SHOWN_MAX 64        /* dlq list's DOCUMENT column */

static volatile sig_atomic_t got_stop;

static void on_stop(int sig)
{
	(void)sig;
	got_stop = 1;
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

int cmd_dlq_list(struct ctl *c, int argc, char **argv)
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
			if (m < 0 || tdr_parse_i64(v, 1, DLQ_LIMIT_MAX, &limit) < 0)
				return usage_error("dlq list: --limit needs a number in [1, %d]", DLQ_LIMIT_MAX);
		} else {
			return usage_error("dlq list: unknown argument '%s'", argv[i]);
		}
	}
	if ((rc = connect_store(c, 1)) != 0)
		return rc;
	tdr_err_clear(&err);
	if (exact_count(c, TDR_C_DEADLETTER, &total, NULL, &err) < 0) {
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
			 * The same rules the replicas apply, to the document as inserted.
			 * The leader's triage may write `part` into it first (stores with
			 * atomic updates); the size rule does not count that field
			 * (tdr_event_size), so the verdict is the same either way.
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

int cmd_dlq_requeue(struct ctl *c, int argc, char **argv)
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
