/*
 * corpus.c - tdrain-loadgen's malformed corpus (--malformed-corpus): one
 * document per way an event can break docs/EVENTS.md, each with the reason
 * prefix tdrain must dead-letter it with, plus valid documents that sit
 * exactly on the contract's limits.  tests/checker.py reads the manifest
 * loadgen.c writes from it.  Apart from loadgen.c because it is a table of
 * cases, not part of the realistic stream.
 */
#include "config.h"

#include <stdlib.h>
#include <string.h>

#include "bench/loadgen.h"
#include "consumers/event.h"

#define MAX_EVENT_BYTES 262144  /* drain.max_event_bytes default (docs/EVENTS.md) */

/*
 * One entry per way a document can break docs/EVENTS.md.  Each bad document
 * has _id "bad-<kind>" unless the kind is about _id itself, and breaks exactly
 * one rule, so the reason is unambiguous whatever order a validator checks in.
 * Reasons are "<field>: <problem>"; the validator must emit them as prefixes.
 * Kinds marked "edge" are VALID documents sitting exactly on a limit: they
 * must be counted, never dead-lettered.
 */
const struct corpus_kind corpus[] = {
	{ "id-type", "_id: unsupported type", 0 },          /* _id {"bad": "id-type"} */
	{ "id-double", "_id: unsupported type", 0 },        /* _id 1.5 */
	{ "id-too-long", "_id: too long", 0 },              /* _id "bad-id-too-long-xxx…", 129 bytes */
	{ "insert-id-missing", "insert_id: missing", 0 },
	{ "insert-id-type", "insert_id: not a string", 0 },
	{ "insert-id-null", "insert_id: not a string", 0 },
	{ "insert-id-empty", "insert_id: empty", 0 },
	{ "insert-id-long", "insert_id: too long", 0 },     /* 129 bytes */
	{ "insert-id-utf8", "insert_id: invalid UTF-8", 1 },
	{ "event-missing", "event: missing", 0 },
	{ "event-type", "event: not a string", 0 },
	{ "event-empty", "event: empty", 0 },
	{ "event-long", "event: too long", 0 },             /* 129 bytes, all allowed characters */
	{ "event-space", "event: invalid character", 0 },
	{ "event-pipe", "event: invalid character", 0 },
	{ "event-dollar", "event: invalid character", 0 },
	{ "event-nonascii", "event: invalid character", 0 }, /* valid UTF-8 "é", outside the set */
	{ "event-utf8", "event: invalid character", 1 },     /* invalid UTF-8 is outside the set too */
	{ "distinct-id-missing", "distinct_id: missing", 0 },
	{ "distinct-id-type", "distinct_id: not a string", 0 },
	{ "distinct-id-empty", "distinct_id: empty", 0 },
	{ "distinct-id-long", "distinct_id: too long", 0 }, /* 257 bytes */
	{ "distinct-id-utf8", "distinct_id: invalid UTF-8", 1 },
	{ "distinct-id-control", "distinct_id: control character", 0 }, /* "\x07" */
	{ "distinct-id-nul", "distinct_id: control character", 0 },     /* embedded NUL */
	{ "distinct-id-c1", "distinct_id: control character", 0 },      /* U+0085 */
	{ "username-type", "username: not a string", 0 },
	{ "username-empty", "username: empty", 0 },
	{ "username-long", "username: too long", 0 },       /* 257 bytes */
	{ "username-utf8", "username: invalid UTF-8", 1 },
	{ "username-control", "username: control character", 0 }, /* "\n" */
	{ "created-at-missing", "created_at: missing", 0 },
	{ "created-at-string", "created_at: not a date", 0 },
	{ "created-at-int", "created_at: not a date", 0 },
	{ "created-at-timestamp", "created_at: not a date", 0 }, /* BSON Timestamp, not a date */
	{ "properties-array", "properties: not a document", 0 },
	{ "properties-string", "properties: not a document", 0 },
	{ "oversized", "document: too large", 0 },          /* MAX_EVENT_BYTES + 1 bytes */
	{ "edge-limits", NULL, 0 },   /* insert_id 128 B, event 128 B, distinct_id/username 256 B of UTF-8 */
	{ "edge-minimal", NULL, 0 },  /* no username, no properties: the optional fields are optional */
	{ "edge-size", NULL, 0 },     /* MAX_EVENT_BYTES bytes without part: the largest valid event */
	{ "edge-event-chars", NULL, 0 }, /* every allowed character class in one name */
};
const size_t ncorpus = sizeof(corpus) / sizeof(corpus[0]);

static char *repeat(char c, size_t n)
{
	char *s = malloc(n + 1);

	if (s) {
		memset(s, c, n);
		s[n] = '\0';
	}
	return s;
}

/* A valid string of exactly n bytes made of multi-byte UTF-8 ("é" then ASCII fill). */
static char *utf8_fill(const char *prefix, size_t n)
{
	size_t pl = strlen(prefix), i;
	char *s = malloc(n + 1);

	if (s == NULL)
		return NULL;
	memcpy(s, prefix, pl < n ? pl : n);
	for (i = pl; i + 2 <= n; i += 2)
		memcpy(s + i, "\xc3\xa9", 2); /* é */
	for (; i < n; i++)
		s[i] = 'x';
	s[n] = '\0';
	return s;
}

#define IS(k) (strcmp(kind, (k)) == 0)

/* Append the properties sub-document, padded with a string of pad bytes. */
static int append_props_pad(bson_t *doc, size_t pad)
{
	bson_t p;
	char *blob = repeat('p', pad);
	int ok;

	if (blob == NULL)
		return -1;
	ok = BSON_APPEND_DOCUMENT_BEGIN(doc, "properties", &p) && bson_append_utf8(&p, "blob", 4, blob, (int)pad) &&
	     bson_append_document_end(doc, &p);
	free(blob);
	return ok ? 0 : -1;
}

/* Build corpus entry k's body (no _id, no part) with the given properties padding. */
static int corpus_body(const struct gen *g, const char *kind, bson_t *b, size_t pad)
{
	char iid[37];
	char *s = NULL;
	int ok = 1;

	make_insert_id(iid);
	/* insert_id */
	if (IS("insert-id-missing"))
		;
	else if (IS("insert-id-type"))
		ok = BSON_APPEND_INT32(b, "insert_id", 12345);
	else if (IS("insert-id-null"))
		ok = BSON_APPEND_NULL(b, "insert_id");
	else if (IS("insert-id-empty"))
		ok = BSON_APPEND_UTF8(b, "insert_id", "");
	else if (IS("insert-id-long") || IS("edge-limits")) {
		size_t n = IS("edge-limits") ? 128 : 129;

		/* Keep it unique: the uuid first, then filler. */
		ok = (s = repeat('i', n)) != NULL;
		if (ok) {
			memcpy(s, iid, strlen(iid));
			ok = bson_append_utf8(b, "insert_id", 9, s, (int)n);
		}
		free(s);
		s = NULL;
	} else if (IS("insert-id-utf8")) {
		char v[64];

		snprintf(v, sizeof(v), "%s\xc3\x28", iid); /* 0xC3 then a non-continuation byte */
		ok = BSON_APPEND_UTF8(b, "insert_id", v);
	} else
		ok = BSON_APPEND_UTF8(b, "insert_id", iid);

	/* event */
	if (!ok || IS("event-missing"))
		;
	else if (IS("event-type"))
		ok = BSON_APPEND_BOOL(b, "event", true);
	else if (IS("event-empty"))
		ok = BSON_APPEND_UTF8(b, "event", "");
	else if (IS("event-long") || IS("edge-limits")) {
		size_t n = IS("edge-limits") ? 128 : 129;

		ok = (s = repeat('e', n)) != NULL;
		if (ok) {
			memcpy(s, "Ab0_.:/-", 8);
			ok = bson_append_utf8(b, "event", 5, s, (int)n);
		}
		free(s);
		s = NULL;
	} else if (IS("event-space"))
		ok = BSON_APPEND_UTF8(b, "event", "cli invocation");
	else if (IS("event-pipe"))
		ok = BSON_APPEND_UTF8(b, "event", "cli|invocation");
	else if (IS("event-dollar"))
		ok = BSON_APPEND_UTF8(b, "event", "$cli_invocation");
	else if (IS("event-nonascii"))
		ok = BSON_APPEND_UTF8(b, "event", "caf\xc3\xa9");
	else if (IS("event-utf8"))
		ok = BSON_APPEND_UTF8(b, "event", "cli\xff");
	else if (IS("edge-event-chars"))
		ok = BSON_APPEND_UTF8(b, "event", "Zz09_.:/-aZ");
	else
		ok = BSON_APPEND_UTF8(b, "event", "cli_invocation");

	/* distinct_id */
	if (!ok || IS("distinct-id-missing"))
		;
	else if (IS("distinct-id-type"))
		ok = BSON_APPEND_INT64(b, "distinct_id", 42);
	else if (IS("distinct-id-empty"))
		ok = BSON_APPEND_UTF8(b, "distinct_id", "");
	else if (IS("distinct-id-long") || IS("edge-limits")) {
		size_t n = IS("edge-limits") ? 256 : 257;

		ok = (s = utf8_fill("dev-edge-", n)) != NULL && bson_append_utf8(b, "distinct_id", 11, s, (int)n);
		free(s);
		s = NULL;
	} else if (IS("distinct-id-utf8"))
		ok = BSON_APPEND_UTF8(b, "distinct_id", "dev-\xe2\x82");  /* truncated 3-byte sequence */
	else if (IS("distinct-id-control"))
		ok = BSON_APPEND_UTF8(b, "distinct_id", "dev-\x07" "bell");
	else if (IS("distinct-id-nul"))
		ok = bson_append_utf8(b, "distinct_id", 11, "dev-\0nul", 8);
	else if (IS("distinct-id-c1"))
		ok = BSON_APPEND_UTF8(b, "distinct_id", "dev-\xc2\x85" "nel");
	else
		ok = BSON_APPEND_UTF8(b, "distinct_id", "dev-corpus");

	/* username: present and valid unless the kind is about it (or edge-minimal) */
	if (!ok || IS("edge-minimal"))
		;
	else if (IS("username-type"))
		ok = BSON_APPEND_INT32(b, "username", 7);
	else if (IS("username-empty"))
		ok = BSON_APPEND_UTF8(b, "username", "");
	else if (IS("username-long") || IS("edge-limits")) {
		size_t n = IS("edge-limits") ? 256 : 257;

		ok = (s = utf8_fill("user-edge-", n)) != NULL && bson_append_utf8(b, "username", 8, s, (int)n);
		free(s);
		s = NULL;
	} else if (IS("username-utf8"))
		ok = BSON_APPEND_UTF8(b, "username", "user-\xed\xa0\x80"); /* a UTF-16 surrogate: invalid */
	else if (IS("username-control"))
		ok = BSON_APPEND_UTF8(b, "username", "user-\nline");
	else
		ok = BSON_APPEND_UTF8(b, "username", "user-corpus");

	/* created_at */
	if (!ok || IS("created-at-missing"))
		;
	else if (IS("created-at-string"))
		ok = BSON_APPEND_UTF8(b, "created_at", "2026-06-25T17:56:51Z");
	else if (IS("created-at-int"))
		ok = BSON_APPEND_INT64(b, "created_at", g->base);
	else if (IS("created-at-timestamp"))
		ok = BSON_APPEND_TIMESTAMP(b, "created_at", (uint32_t)(g->base / 1000), 1);
	else
		ok = BSON_APPEND_DATE_TIME(b, "created_at", g->base + 1000);

	/* properties */
	if (!ok || IS("edge-minimal"))
		;
	else if (IS("properties-array")) {
		bson_t a;

		ok = BSON_APPEND_ARRAY_BEGIN(b, "properties", &a) && BSON_APPEND_UTF8(&a, "0", "x") &&
		     bson_append_array_end(b, &a);
	} else if (IS("properties-string"))
		ok = BSON_APPEND_UTF8(b, "properties", "{\"command\":\"run\"}");
	else
		ok = append_props_pad(b, pad) == 0;
	return ok ? 0 : -1;
}

/* Corpus entry k as a whole document; fills the manifest's _id JSON. */
int corpus_doc(struct gen *g, size_t k, bson_t *doc, char *idjson, size_t idlen)
{
	const char *kind = corpus[k].kind;
	bson_value_t id;
	bson_t body = BSON_INITIALIZER, sub = BSON_INITIALIZER;
	char sid[160];
	int rc = -1;

	memset(&id, 0, sizeof(id));
	if (IS("id-type")) {
		/* Not a string, so it cannot be "bad-…": the manifest carries the sub-document. */
		BSON_APPEND_UTF8(&sub, "bad", "id-type");
		id.value_type = BSON_TYPE_DOCUMENT;
		id.value.v_doc.data = (uint8_t *)bson_get_data(&sub);
		id.value.v_doc.data_len = sub.len;
		snprintf(idjson, idlen, "{\"bad\": \"id-type\"}");
	} else if (IS("id-double")) {
		id.value_type = BSON_TYPE_DOUBLE;
		id.value.v_double = 1.5;
		snprintf(idjson, idlen, "1.5");
	} else {
		if (IS("id-too-long")) {
			memset(sid, 'x', 129);
			memcpy(sid, "bad-id-too-long-", 16);
			sid[129] = '\0';
		} else if (corpus[k].reason) {
			snprintf(sid, sizeof(sid), "bad-%s", kind);
		} else {
			snprintf(sid, sizeof(sid), "%s", kind); /* the edge kinds already say "edge-" */
		}
		id.value_type = BSON_TYPE_UTF8;
		id.value.v_utf8.str = sid;
		id.value.v_utf8.len = (uint32_t)strlen(sid);
		snprintf(idjson, idlen, "\"%s\"", sid);
	}

	if (IS("oversized") || IS("edge-size")) {
		/* Size is linear in the padding: measure once with none, then aim. */
		bson_t probe = BSON_INITIALIZER;
		int64_t want = IS("oversized") ? MAX_EVENT_BYTES + 1 : MAX_EVENT_BYTES;

		if (corpus_body(g, kind, &body, 0) || finish_doc(g, &probe, &body, &id)) {
			bson_destroy(&probe);
			goto out;
		}
		want -= tdr_event_size(&probe); /* the size the limit applies to: without `part` */
		bson_destroy(&probe);
		bson_reinit(&body);
		if (want < 0 || corpus_body(g, kind, &body, (size_t)want))
			goto out;
	} else if (corpus_body(g, kind, &body, 0)) {
		goto out;
	}
	rc = finish_doc(g, doc, &body, &id);
out:
	bson_destroy(&body);
	bson_destroy(&sub);
	return rc;
}

#undef IS
