/*
 * fuzz_event.c - libFuzzer target for consumers/event.c.
 *
 * Two views of each input:
 *   1. the bytes as a whole BSON document: if it is structurally valid BSON
 *      it goes through tdr_event_validate() with the default configuration
 *      and, when valid, through the compact form (append, parse back, compare);
 *   2. the bytes as the value of one string field (explicit length, so NUL
 *      and invalid UTF-8 reach the validator) of an otherwise valid event,
 *      for each of _id, insert_id, event, distinct_id and username.  Here the
 *      verdict is checked against docs/EVENTS.md re-stated below (an oracle):
 *      a disagreement aborts, so the fuzzer reports it like a crash.
 *
 * Built and run by tests/fuzz/run.sh.
 */
#include "config.h"

#include <bson/bson.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "consumers/event.h"
#include "lib/conf.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static tdr_config cfg;

static void die(const char *what, const char *field, const char *reason)
{
	fprintf(stderr, "fuzz_event: %s (field %s, reason \"%s\")\n", what, field ? field : "-",
		reason ? reason : "");
	abort();
}

static int cevent_eq(const tdr_cevent *a, const tdr_cevent *b)
{
#define SEQ(f) (a->f##_len == b->f##_len && (a->f##_len == 0 || memcmp(a->f, b->f, a->f##_len) == 0))
	return SEQ(insert_id) && SEQ(event) && SEQ(distinct_id) && SEQ(username) &&
	       (a->username == NULL) == (b->username == NULL) && a->created_at_ms == b->created_at_ms;
#undef SEQ
}

/* A validated event must survive the compact form unchanged. */
static void check_compact(const tdr_cevent *ev)
{
	bson_t parent, child;
	bson_iter_t it;
	const uint8_t *d;
	uint32_t n;
	tdr_cevent back;

	bson_init(&parent);
	tdr_cevent_append(&parent, "0", ev);
	if (!bson_iter_init_find(&it, &parent, "0") || !BSON_ITER_HOLDS_DOCUMENT(&it))
		die("compact form not appended", NULL, NULL);
	bson_iter_document(&it, &n, &d);
	if (!bson_init_static(&child, d, n))
		die("compact form not a document", NULL, NULL);
	if (tdr_cevent_parse(&child, &back) != 0 || !cevent_eq(ev, &back))
		die("compact round trip lost a field", NULL, NULL);
	bson_destroy(&parent);
}

/* ---- the oracle: docs/EVENTS.md for one string field ---- */

static int charset_ok(const char *s, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		unsigned char c = (unsigned char)s[i];

		if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' ||
		      c == '.' || c == ':' || c == '/' || c == '-'))
			return 0;
	}
	return 1;
}

/*
 * Strict UTF-8 (RFC 3629), written out here rather than taken from libbson so
 * the oracle does not share the validator's quirks: no overlong forms (C0 80
 * included), no surrogates, nothing above U+10FFFF.  *cc is set if a code
 * point is in Unicode category Cc: U+0000-001F, U+007F-009F.
 */
static int strict_utf8(const unsigned char *s, size_t n, int *cc)
{
	*cc = 0;
	for (size_t i = 0; i < n;) {
		unsigned char c = s[i];
		uint32_t cp;
		size_t k;
		unsigned char lo = 0x80, hi = 0xbf;

		if (c < 0x80) {
			cp = c;
			k = 0;
		} else if (c >= 0xc2 && c <= 0xdf) {
			cp = c & 0x1f;
			k = 1;
		} else if (c >= 0xe0 && c <= 0xef) {
			cp = c & 0x0f;
			k = 2;
			if (c == 0xe0)
				lo = 0xa0;
			else if (c == 0xed)
				hi = 0x9f;
		} else if (c >= 0xf0 && c <= 0xf4) {
			cp = c & 0x07;
			k = 3;
			if (c == 0xf0)
				lo = 0x90;
			else if (c == 0xf4)
				hi = 0x8f;
		} else {
			return 0;
		}
		if (k >= n - i) /* truncated sequence */
			return 0;
		for (size_t j = 1; j <= k; j++) {
			unsigned char d = s[i + j];

			if (j == 1 ? (d < lo || d > hi) : (d < 0x80 || d > 0xbf))
				return 0;
			cp = cp << 6 | (d & 0x3f);
		}
		if (cp < 0x20 || (cp >= 0x7f && cp <= 0x9f))
			*cc = 1;
		i += k + 1;
	}
	return 1;
}

/* 1 valid, 0 invalid, -1 the contract does not say (not checked). */
static int expected(const char *field, const char *s, size_t n)
{
	int cc;

	if (strcmp(field, "_id") == 0)
		return n >= 1 && n <= TDR_ID_MAX;
	if (strcmp(field, "event") == 0)
		return n >= 1 && n <= TDR_EVENT_NAME_MAX && charset_ok(s, n);
	/* insert_id, distinct_id, username: valid UTF-8 without control characters (NUL included) */
	{
		size_t max = strcmp(field, "insert_id") == 0 ? TDR_INSERT_ID_MAX
			     : strcmp(field, "username") == 0 ? TDR_USERNAME_MAX
								: TDR_DISTINCT_ID_MAX;

		return n >= 1 && n <= max && strict_utf8((const unsigned char *)s, n, &cc) && !cc;
	}
}

/* The rest of a valid event, with field set to (s, n). */
static void one_field(const char *field, const char *s, size_t n)
{
	bson_t doc;
	bson_oid_t oid;
	tdr_cevent ev;
	char reason[TDR_REASON_MAX];
	size_t flen = strlen(field);
	int rc, want;

	bson_init(&doc);
	if (strcmp(field, "_id") == 0) {
		bson_append_utf8(&doc, "_id", 3, s, (int)n);
	} else {
		bson_oid_init_from_string(&oid, "6745a1c0e4b0a1b2c3d4e5f6");
		BSON_APPEND_OID(&doc, "_id", &oid);
	}
#define FIELD(k, v) (strcmp(field, k) == 0 ? bson_append_utf8(&doc, k, -1, s, (int)n) : BSON_APPEND_UTF8(&doc, k, v))
	FIELD("insert_id", "ins-000001");
	FIELD("event", "page_view");
	FIELD("distinct_id", "dev-42");
	FIELD("username", "alice");
#undef FIELD
	BSON_APPEND_DATE_TIME(&doc, "created_at", 1795000000123);

	rc = tdr_event_validate(&doc, &cfg, &ev, reason, sizeof(reason));
	want = expected(field, s, n);
	if (rc == 0) {
		if (want == 0)
			die("accepted a value docs/EVENTS.md forbids", field, NULL);
		check_compact(&ev);
	} else {
		if (memchr(reason, '\0', sizeof(reason)) == NULL)
			die("reason not NUL-terminated", field, NULL);
		if (want == 1)
			die("rejected a value docs/EVENTS.md allows", field, reason);
		if (strncmp(reason, field, flen) != 0 || reason[flen] != ':')
			die("the reason names another field", field, reason);
	}
	bson_destroy(&doc);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static int ready;
	bson_t doc;

	if (!ready) {
		tdr_config_defaults(&cfg);
		ready = 1;
	}

	/* 1. The bytes as a BSON document, when they are one. */
	if (size >= 5 && size <= UINT32_MAX && bson_init_static(&doc, data, size)) {
		size_t off;

		/* Structure only: a server hands over well-formed BSON, not necessarily valid UTF-8. */
		if (bson_validate(&doc, BSON_VALIDATE_NONE, &off)) {
			tdr_cevent ev;
			char reason[TDR_REASON_MAX];
			bson_iter_t it;

			if (tdr_event_validate(&doc, &cfg, &ev, reason, sizeof(reason)) == 0) {
				check_compact(&ev);
				if (!bson_iter_init_find(&it, &doc, "_id") ||
				    tdr_event_partition(bson_iter_value(&it), 16) < 0)
					die("a valid event has no partition", "_id", NULL);
			} else if (memchr(reason, '\0', sizeof(reason)) == NULL || strchr(reason, ':') == NULL) {
				die("reason is not \"<field>: <problem>\"", NULL, reason);
			}
			/* The compact parser must also cope with any document. */
			(void)tdr_cevent_parse(&doc, &ev);
			if (bson_iter_init_find(&it, &doc, "_id")) {
				int32_t p = tdr_event_partition(bson_iter_value(&it), 7);

				if (p < -1 || p >= 7)
					die("partition out of range", "_id", NULL);
			}
		}
	}

	/* 2. The bytes as one string field of an otherwise valid event. */
	if (size <= 1024) {
		static const char *const fields[] = { "_id", "insert_id", "event", "distinct_id", "username" };

		for (size_t i = 0; i < sizeof(fields) / sizeof(fields[0]); i++)
			one_field(fields[i], (const char *)data, size);
	}
	return 0;
}
