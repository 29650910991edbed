/*
 * test_event.c - the event contract (docs/EVENTS.md) as consumers/event.c applies it.
 *
 *   1. Every dead-letter reason, each from one crafted document that breaks
 *      exactly one rule: NUL bytes inside strings (explicit lengths), invalid
 *      UTF-8, C0/DEL/C1 controls, the length boundaries (128/129, 256/257) and
 *      drain.max_event_bytes.  A reason matches if it is the expected
 *      "<field>: <problem>" optionally followed by " <detail>".
 *   2. Valid documents and the tdr_cevent they produce (pointers into the
 *      document, exact lengths).
 *   3. drain.allow_events.
 *   4. The compact delta form: tdr_cevent_append -> tdr_cevent_parse.
 *   5. tdr_event_partition against the test vectors of docs/EVENTS.md.
 */
#include "config.h"

#include <bson/bson.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "consumers/event.h"
#include "lib/conf.h"
#include "lib/err.h"
#include "tests/unit/tap.h"

#define GOLDEN_OID "6745a1c0e4b0a1b2c3d4e5f6"
#define GOLDEN_MS INT64_C(1795000000123)

static tdr_config defcfg;

/* ------------------------------------------------------------------------ */
/* Building documents                                                       */
/* ------------------------------------------------------------------------ */

/* Append every field of a valid, signed-in event except the one named by omit (NULL: none). */
static void build(bson_t *doc, const char *omit)
{
	bson_oid_t oid;
	bson_t p;

#define WANT(f) (omit == NULL || strcmp(omit, (f)) != 0)
	if (WANT("_id")) {
		bson_oid_init_from_string(&oid, GOLDEN_OID);
		BSON_APPEND_OID(doc, "_id", &oid);
	}
	if (WANT("insert_id"))
		BSON_APPEND_UTF8(doc, "insert_id", "ins-000001");
	if (WANT("event"))
		BSON_APPEND_UTF8(doc, "event", "page_view");
	if (WANT("distinct_id"))
		BSON_APPEND_UTF8(doc, "distinct_id", "dev-42");
	if (WANT("username"))
		BSON_APPEND_UTF8(doc, "username", "alice");
	if (WANT("created_at"))
		BSON_APPEND_DATE_TIME(doc, "created_at", GOLDEN_MS);
	if (WANT("properties")) {
		BSON_APPEND_DOCUMENT_BEGIN(doc, "properties", &p);
		BSON_APPEND_UTF8(&p, "path", "/home");
		BSON_APPEND_INT32(&p, "n", 3);
		bson_append_document_end(doc, &p);
	}
#undef WANT
}

/* A string of n copies of c (malloc'd, NUL-terminated). */
static char *rep(char c, size_t n)
{
	char *s = malloc(n + 1);

	if (s == NULL) {
		fprintf(stderr, "out of memory\n");
		exit(99);
	}
	memset(s, c, n);
	s[n] = '\0';
	return s;
}

/* "<field>: <problem>" exactly, or followed by " <detail>". */
static int reason_is(const char *reason, const char *want)
{
	size_t n = strlen(want);

	return strncmp(reason, want, n) == 0 && (reason[n] == '\0' || reason[n] == ' ');
}

/* Validate doc with cfg and expect the reason want. */
static void expect_reason(const bson_t *doc, const tdr_config *cfg, const char *want, const char *what)
{
	tdr_cevent ev;
	char reason[TDR_REASON_MAX];
	int rc;

	snprintf(reason, sizeof(reason), "(no reason written)");
	rc = tdr_event_validate(doc, cfg, &ev, reason, sizeof(reason));
	ok(rc == -1 && reason_is(reason, want), "%s: \"%s\" (got %d, \"%s\")", what, want, rc,
	   rc == 0 ? "valid" : reason);
}

/* Validate doc and expect success; ev filled. */
static int expect_valid(const bson_t *doc, const tdr_config *cfg, tdr_cevent *ev, const char *what)
{
	char reason[TDR_REASON_MAX] = "";
	int rc = tdr_event_validate(doc, cfg, ev, reason, sizeof(reason));

	ok(rc == 0, "%s: valid%s%s", what, rc == 0 ? "" : " - got: ", rc == 0 ? "" : reason);
	return rc == 0;
}

/* The tdr_cevent field a document field fills. */
static const char *cev_field(const tdr_cevent *ev, const char *field, uint32_t *len)
{
	if (strcmp(field, "insert_id") == 0)
		return *len = ev->insert_id_len, ev->insert_id;
	if (strcmp(field, "event") == 0)
		return *len = ev->event_len, ev->event;
	if (strcmp(field, "distinct_id") == 0)
		return *len = ev->distinct_id_len, ev->distinct_id;
	if (strcmp(field, "username") == 0)
		return *len = ev->username_len, ev->username;
	*len = 0;
	return NULL;
}

/* The pointer lies inside the document's bytes (the cevent borrows from it). */
static int inside(const bson_t *doc, const char *p, uint32_t len)
{
	const char *d = (const char *)bson_get_data(doc);

	return p != NULL && p >= d && p + len <= d + doc->len;
}

/*
 * One string field replaced by (s, len) (len -1: strlen).  want NULL: the
 * document must be valid and the cevent must carry exactly those bytes.
 */
static void string_case(const char *field, const char *s, int len, const char *want, const char *what)
{
	bson_t doc;
	tdr_cevent ev;
	char label[200];

	bson_init(&doc);
	build(&doc, field);
	bson_append_utf8(&doc, field, -1, s, len);
	snprintf(label, sizeof(label), "%s %s", field, what);
	if (want) {
		expect_reason(&doc, &defcfg, want, label);
	} else if (expect_valid(&doc, &defcfg, &ev, label) && strcmp(field, "_id") != 0) {
		uint32_t n, wantlen = len < 0 ? (uint32_t)strlen(s) : (uint32_t)len;
		const char *p = cev_field(&ev, field, &n);

		ok(p && n == wantlen && memcmp(p, s, n) == 0 && inside(&doc, p, n),
		   "%s: the cevent carries the %u bytes, borrowed from the document", label, wantlen);
	}
	bson_destroy(&doc);
}

/* One field replaced by a value of another BSON type. */
static void type_case(const char *field, const bson_value_t *v, const char *want, const char *what)
{
	bson_t doc;
	char label[200];

	bson_init(&doc);
	build(&doc, field);
	bson_append_value(&doc, field, -1, v);
	snprintf(label, sizeof(label), "%s %s", field, what);
	expect_reason(&doc, &defcfg, want, label);
	bson_destroy(&doc);
}

/* ------------------------------------------------------------------------ */
/* 1. Dead-letter reasons                                                   */
/* ------------------------------------------------------------------------ */

static void test_missing(void)
{
	static const char *const required[] = { "_id", "insert_id", "event", "distinct_id", "created_at" };
	bson_t doc;
	tdr_cevent ev;

	for (size_t i = 0; i < sizeof(required) / sizeof(required[0]); i++) {
		char want[64];

		bson_init(&doc);
		build(&doc, required[i]);
		snprintf(want, sizeof(want), "%s: missing", required[i]);
		expect_reason(&doc, &defcfg, want, "required field absent");
		bson_destroy(&doc);
	}
	bson_init(&doc);
	ok(tdr_event_validate(&doc, &defcfg, &ev, (char[TDR_REASON_MAX]){ 0 }, TDR_REASON_MAX) == -1,
	   "empty document rejected");
	bson_destroy(&doc);
}

static void test_id(void)
{
	bson_value_t v;
	bson_t sub;
	char *s;
	static const uint8_t bin[] = { 1, 2, 3 };

	/* Only ObjectId and string _ids are supported. */
	memset(&v, 0, sizeof(v));
	v.value_type = BSON_TYPE_INT32;
	v.value.v_int32 = 7;
	type_case("_id", &v, "_id: unsupported type", "int32");
	v.value_type = BSON_TYPE_INT64;
	v.value.v_int64 = INT64_C(-9007199254740993);
	type_case("_id", &v, "_id: unsupported type", "int64");
	v.value_type = BSON_TYPE_DOUBLE;
	v.value.v_double = 1.5;
	type_case("_id", &v, "_id: unsupported type", "double");
	v.value_type = BSON_TYPE_BOOL;
	v.value.v_bool = true;
	type_case("_id", &v, "_id: unsupported type", "bool");
	v.value_type = BSON_TYPE_NULL;
	type_case("_id", &v, "_id: unsupported type", "null");
	v.value_type = BSON_TYPE_DATE_TIME;
	v.value.v_datetime = 1;
	type_case("_id", &v, "_id: unsupported type", "date");
	v.value_type = BSON_TYPE_BINARY;
	v.value.v_binary.subtype = BSON_SUBTYPE_UUID;
	v.value.v_binary.data = (uint8_t *)bin;
	v.value.v_binary.data_len = sizeof(bin);
	type_case("_id", &v, "_id: unsupported type", "binary");
	{
		bson_t doc;

		bson_init(&doc);
		build(&doc, "_id");
		BSON_APPEND_DOCUMENT_BEGIN(&doc, "_id", &sub);
		BSON_APPEND_UTF8(&sub, "k", "v");
		bson_append_document_end(&doc, &sub);
		expect_reason(&doc, &defcfg, "_id: unsupported type", "_id embedded document");
		bson_destroy(&doc);
		bson_init(&doc);
		build(&doc, "_id");
		BSON_APPEND_ARRAY_BEGIN(&doc, "_id", &sub);
		BSON_APPEND_UTF8(&sub, "0", "v");
		bson_append_array_end(&doc, &sub);
		expect_reason(&doc, &defcfg, "_id: unsupported type", "_id array");
		bson_destroy(&doc);
	}

	string_case("_id", "", 0, "_id: empty", "empty string");
	s = rep('k', 129);
	string_case("_id", s, 129, "_id: too long", "129 bytes");
	string_case("_id", s, 128, NULL, "128 bytes");
	free(s);
	string_case("_id", "evt-000001", -1, NULL, "string");
	string_case("_id", "\xc3\xa9vt-\xe2\x82\xac-000002", -1, NULL, "non-ASCII string");
}

static void test_insert_id(void)
{
	bson_value_t v;
	char *s;

	memset(&v, 0, sizeof(v));
	v.value_type = BSON_TYPE_INT32;
	v.value.v_int32 = 1;
	type_case("insert_id", &v, "insert_id: not a string", "int32");
	v.value_type = BSON_TYPE_NULL;
	type_case("insert_id", &v, "insert_id: not a string", "null");
	string_case("insert_id", "", 0, "insert_id: empty", "empty");
	s = rep('i', 129);
	string_case("insert_id", s, 129, "insert_id: too long", "129 bytes");
	string_case("insert_id", s, 128, NULL, "128 bytes");
	free(s);
	/* 64 x U+00E9 is 128 bytes (the bound is in bytes, not characters); one more ASCII byte is too many. */
	{
		char buf[130];

		for (int i = 0; i < 64; i++)
			memcpy(buf + 2 * i, "\xc3\xa9", 2);
		buf[128] = 'x';
		buf[129] = '\0';
		string_case("insert_id", buf, 128, NULL, "64 two-byte characters (128 bytes)");
		string_case("insert_id", buf, 129, "insert_id: too long", "129 bytes of UTF-8");
	}
	string_case("insert_id", "ins-\xff", -1, "insert_id: invalid UTF-8", "byte 0xff");
	string_case("insert_id", "\x80ins", -1, "insert_id: invalid UTF-8", "lone continuation byte");
	string_case("insert_id", "ins-\xe2\x82", -1, "insert_id: invalid UTF-8", "truncated 3-byte sequence");
	string_case("insert_id", "a\xc3(b", -1, "insert_id: invalid UTF-8", "bad continuation");
	/* C0 80 is "modified UTF-8" for NUL (libbson accepts it when NULs are allowed): overlong, invalid. */
	string_case("insert_id", "ins\xc0\x80", -1, "insert_id: invalid UTF-8", "overlong NUL C0 80");
	/* insert_id: valid UTF-8 without control characters (docs/EVENTS.md): quotes and emoji are fine, a tab is not. */
	string_case("insert_id", "ins\"7\"\\ \xf0\x9f\x98\x80", -1, NULL, "quotes, backslash, emoji");
	string_case("insert_id", "ins\t7", -1, "insert_id: control character", "tab");	{
		/* An embedded NUL is a control character (docs/EVENTS.md). */
		bson_t doc;
		tdr_cevent ev;
		char reason[TDR_REASON_MAX] = "";

		bson_init(&doc);
		build(&doc, "insert_id");
		bson_append_utf8(&doc, "insert_id", -1, "a\0b", 3);
		ok(tdr_event_validate(&doc, &defcfg, &ev, reason, sizeof(reason)) < 0 &&
			   strncmp(reason, "insert_id: control character", 28) == 0,
		   "insert_id with an embedded NUL: %s", reason);
		bson_destroy(&doc);
	}
}

static void test_event_name(void)
{
	static const char charset[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.:/-";
	bson_value_t v;
	char *s;

	memset(&v, 0, sizeof(v));
	v.value_type = BSON_TYPE_INT64;
	v.value.v_int64 = 5;
	type_case("event", &v, "event: not a string", "int64");
	v.value_type = BSON_TYPE_BOOL;
	v.value.v_bool = false;
	type_case("event", &v, "event: not a string", "bool");
	string_case("event", "", 0, "event: empty", "empty");
	s = rep('e', 129);
	string_case("event", s, 129, "event: too long", "129 bytes");
	string_case("event", s, 128, NULL, "128 bytes");
	free(s);
	string_case("event", charset, -1, NULL, "every allowed character");
	string_case("event", "x:y/z-1.2_3", -1, NULL, "punctuation from the charset");
	string_case("event", "page view", -1, "event: invalid character", "space");
	string_case("event", "page!", -1, "event: invalid character", "'!'");
	string_case("event", "a$b", -1, "event: invalid character", "'$'");
	string_case("event", "a\tb", -1, "event: invalid character", "tab");
	string_case("event", "a\0b", 3, "event: invalid character", "NUL inside (explicit length)");
	string_case("event", "caf\xc3\xa9", -1, "event: invalid character", "valid UTF-8 outside the charset");
	/* The charset is checked before UTF-8: invalid UTF-8 in a name is an invalid character. */
	string_case("event", "page\xff", -1, "event: invalid character", "invalid UTF-8 byte 0xff");
	string_case("event", "\xe2\x82", -1, "event: invalid character", "truncated UTF-8 sequence");
}

/* distinct_id and username share every string rule except that username is optional. */
static void test_person_field(const char *f, uint32_t max)
{
	char want[96], *s;
	bson_value_t v;

#define WANT(problem) (snprintf(want, sizeof(want), "%s: %s", f, problem), want)
	memset(&v, 0, sizeof(v));
	v.value_type = BSON_TYPE_INT32;
	v.value.v_int32 = 42;
	type_case(f, &v, WANT("not a string"), "int32");
	v.value_type = BSON_TYPE_NULL;
	type_case(f, &v, WANT("not a string"), "null");
	string_case(f, "", 0, WANT("empty"), "empty");
	s = rep('d', max + 1);
	string_case(f, s, (int)max + 1, WANT("too long"), max == 256 ? "257 bytes" : "max + 1 bytes");
	string_case(f, s, (int)max, NULL, max == 256 ? "256 bytes" : "max bytes");
	free(s);
	{
		/* 128 x U+00E9 = 256 bytes: at the bound. */
		char buf[258];

		for (int i = 0; i < 128; i++)
			memcpy(buf + 2 * i, "\xc3\xa9", 2);
		buf[256] = 'x';
		buf[257] = '\0';
		string_case(f, buf, 256, NULL, "128 two-byte characters (256 bytes)");
		string_case(f, buf, 257, WANT("too long"), "257 bytes of UTF-8");
	}
	string_case(f, "dev-\xff", -1, WANT("invalid UTF-8"), "byte 0xff");
	string_case(f, "dev-\xc0\xaf", -1, WANT("invalid UTF-8"), "overlong '/'");
	string_case(f, "dev\xc0\x80", -1, WANT("invalid UTF-8"), "overlong NUL C0 80");
	string_case(f, "dev-\xed\xa0\x80", -1, WANT("invalid UTF-8"), "UTF-16 surrogate U+D800");
	string_case(f, "dev-\xf4\x90\x80\x80", -1, WANT("invalid UTF-8"), "above U+10FFFF");
	string_case(f, "dev-\xe2\x82", -1, WANT("invalid UTF-8"), "truncated sequence");
	string_case(f, "\x80", -1, WANT("invalid UTF-8"), "lone continuation byte");
	/* C0 controls, DEL, and NUL inside the string (explicit length). */
	string_case(f, "dev\0x", 5, WANT("control character"), "NUL inside (explicit length)");
	string_case(f, "\0", 1, WANT("control character"), "a lone NUL");
	string_case(f, "dev\x01", -1, WANT("control character"), "U+0001");
	string_case(f, "dev\tx", -1, WANT("control character"), "tab");
	string_case(f, "dev\nx", -1, WANT("control character"), "newline");
	string_case(f, "dev\x1f", -1, WANT("control character"), "U+001F");
	string_case(f, "dev\x7f", -1, WANT("control character"), "DEL");
	/* C1 controls U+0080..U+009F are two-byte sequences C2 80..C2 9F. */
	string_case(f, "dev\xc2\x80", -1, WANT("control character"), "U+0080 (C1)");
	string_case(f, "dev\xc2\x85", -1, WANT("control character"), "U+0085 NEL (C1)");
	string_case(f, "\xc2\x9f-dev", -1, WANT("control character"), "U+009F (C1)");
	/* Bytes 0x80..0x9f as continuation bytes of other characters are not C1 controls. */
	string_case(f, "\xc2\xa0", -1, NULL, "U+00A0 (first code point after C1)");
	string_case(f, "dev-\xe2\x82\xac", -1, NULL, "U+20AC (continuation byte 0x82)");
	string_case(f, "dev-\xe4\xb8\xad\xe6\x96\x87", -1, NULL, "CJK (continuation byte 0x96)");
	string_case(f, "\xf0\x9f\x98\x80", -1, NULL, "emoji (4 bytes, continuation 0x9f 0x98 0x80)");
	string_case(f, "~ !\"#$%&'()*+,-./", -1, NULL, "printable ASCII punctuation and space");
#undef WANT
}

static void test_created_at(void)
{
	bson_value_t v;

	memset(&v, 0, sizeof(v));
	v.value_type = BSON_TYPE_INT64;
	v.value.v_int64 = GOLDEN_MS;
	type_case("created_at", &v, "created_at: not a date", "int64 milliseconds");
	v.value_type = BSON_TYPE_DOUBLE;
	v.value.v_double = 1.7e12;
	type_case("created_at", &v, "created_at: not a date", "double");
	v.value_type = BSON_TYPE_TIMESTAMP;
	v.value.v_timestamp.timestamp = 1700000000;
	v.value.v_timestamp.increment = 1;
	type_case("created_at", &v, "created_at: not a date", "BSON timestamp");
	v.value_type = BSON_TYPE_NULL;
	type_case("created_at", &v, "created_at: not a date", "null");
	string_case("created_at", "2024-05-01T00:00:00Z", -1, "created_at: not a date", "ISO-8601 string");
}

static void test_properties(void)
{
	bson_t doc, sub;
	tdr_cevent ev;

	string_case("properties", "{}", -1, "properties: not a document", "string");
	{
		bson_value_t v;

		memset(&v, 0, sizeof(v));
		v.value_type = BSON_TYPE_INT32;
		type_case("properties", &v, "properties: not a document", "int32");
	}
	bson_init(&doc);
	build(&doc, "properties");
	BSON_APPEND_ARRAY_BEGIN(&doc, "properties", &sub);
	BSON_APPEND_INT32(&sub, "0", 1);
	bson_append_array_end(&doc, &sub);
	expect_reason(&doc, &defcfg, "properties: not a document", "properties array");
	bson_destroy(&doc);

	bson_init(&doc);
	build(&doc, "properties");
	BSON_APPEND_DOCUMENT_BEGIN(&doc, "properties", &sub);
	bson_append_document_end(&doc, &sub);
	expect_valid(&doc, &defcfg, &ev, "properties empty document");
	bson_destroy(&doc);
}

/* A valid event padded with a string field to exactly total bytes. */
static bson_t *doc_of_size(uint32_t total, const char *omit)
{
	bson_t *doc = bson_new();
	uint32_t padlen;
	char *pad;

	build(doc, omit);
	/* "pad": type byte + "pad\0" + int32 length + bytes + NUL = len + 10 */
	padlen = total - doc->len - 10;
	pad = rep('p', padlen);
	bson_append_utf8(doc, "pad", 3, pad, (int)padlen);
	free(pad);
	return doc;
}

static void test_size(void)
{
	tdr_config small;
	tdr_err err;
	tdr_cevent ev;
	bson_t *doc;
	uint32_t max = (uint32_t)defcfg.max_event_bytes;

	ok(defcfg.max_event_bytes == 262144, "drain.max_event_bytes defaults to 256 KiB");
	doc = doc_of_size(max, NULL);
	ok(doc->len == max, "padded document is exactly %u bytes", max);
	expect_valid(doc, &defcfg, &ev, "document of exactly drain.max_event_bytes");
	bson_destroy(doc);
	doc = doc_of_size(max + 1, NULL);
	expect_reason(doc, &defcfg, "document: too large", "document one byte over drain.max_event_bytes");
	bson_destroy(doc);
	/* tdrain's own int32 part is not counted: triage adds it, a requeue removes it. */
	doc = doc_of_size(max, NULL);
	BSON_APPEND_INT32(doc, "part", 3);
	ok(tdr_event_size(doc) == (int64_t)max && doc->len == max + 10, "an int32 part is not counted (%u bytes, size %lld)",
	   doc->len, (long long)tdr_event_size(doc));
	expect_valid(doc, &defcfg, &ev, "document of drain.max_event_bytes plus an int32 part");
	bson_destroy(doc);
	doc = doc_of_size(max + 1, NULL);
	BSON_APPEND_INT32(doc, "part", 3);
	expect_reason(doc, &defcfg, "document: too large", "one byte over drain.max_event_bytes plus an int32 part");
	bson_destroy(doc);
	doc = doc_of_size(max, NULL);
	BSON_APPEND_INT64(doc, "part", 3);
	expect_reason(doc, &defcfg, "document: too large", "a part that is not int32 is counted like any field");
	bson_destroy(doc);

	tdr_config_defaults(&small);
	ok(tdr_config_set(&small, "drain.max_event_bytes=1024", &err) == 0, "drain.max_event_bytes=1024 accepted");
	doc = doc_of_size(1024, NULL);
	expect_valid(doc, &small, &ev, "1024-byte document under a 1024-byte limit");
	bson_destroy(doc);
	doc = doc_of_size(1025, NULL);
	expect_reason(doc, &small, "document: too large", "1025-byte document under a 1024-byte limit");
	bson_destroy(doc);
	/* Size is judged first: an oversized document is not parsed field by field. */
	doc = doc_of_size(1025, "_id");
	expect_reason(doc, &small, "document: too large", "oversized document without _id");
	bson_destroy(doc);
}

/* ------------------------------------------------------------------------ */
/* 2. Valid documents                                                       */
/* ------------------------------------------------------------------------ */

static int field_is(const char *p, uint32_t len, const char *want)
{
	return p != NULL && len == strlen(want) && memcmp(p, want, len) == 0;
}

static void test_valid(void)
{
	bson_t doc;
	tdr_cevent ev;
	char reason[TDR_REASON_MAX];

	bson_init(&doc);
	build(&doc, NULL);
	if (expect_valid(&doc, &defcfg, &ev, "full event (ObjectId, username, properties)")) {
		ok(field_is(ev.insert_id, ev.insert_id_len, "ins-000001") && field_is(ev.event, ev.event_len, "page_view") &&
			   field_is(ev.distinct_id, ev.distinct_id_len, "dev-42") &&
			   field_is(ev.username, ev.username_len, "alice") && ev.created_at_ms == GOLDEN_MS,
		   "full event: every cevent field");
		ok(inside(&doc, ev.insert_id, ev.insert_id_len) && inside(&doc, ev.event, ev.event_len) &&
			   inside(&doc, ev.distinct_id, ev.distinct_id_len) && inside(&doc, ev.username, ev.username_len),
		   "full event: the strings point into the document");
	}
	bson_destroy(&doc);

	/* Minimal: string _id, no username, no properties, a date before 1970. */
	bson_init(&doc);
	BSON_APPEND_UTF8(&doc, "_id", "evt-000001");
	BSON_APPEND_UTF8(&doc, "insert_id", "i");
	BSON_APPEND_UTF8(&doc, "event", "e");
	BSON_APPEND_UTF8(&doc, "distinct_id", "d");
	BSON_APPEND_DATE_TIME(&doc, "created_at", -1);
	memset(&ev, 0x55, sizeof(ev));
	if (expect_valid(&doc, &defcfg, &ev, "minimal event (string _id, no username, no properties)")) {
		ok(ev.username == NULL && ev.username_len == 0, "minimal event: username NULL, length 0");
		ok(field_is(ev.insert_id, ev.insert_id_len, "i") && field_is(ev.event, ev.event_len, "e") &&
			   field_is(ev.distinct_id, ev.distinct_id_len, "d") && ev.created_at_ms == -1,
		   "minimal event: the other fields");
	}
	bson_destroy(&doc);

	/* Field order does not matter; unknown fields and part are kept, not judged. */
	bson_init(&doc);
	BSON_APPEND_DATE_TIME(&doc, "created_at", 0);
	BSON_APPEND_INT32(&doc, "part", 5);
	BSON_APPEND_UTF8(&doc, "distinct_id", "dev-\xe4\xb8\xad\xe6\x96\x87");
	BSON_APPEND_UTF8(&doc, "extra", "kept \x01 anything");
	BSON_APPEND_UTF8(&doc, "username", "b\xc3\xb6" "b");
	BSON_APPEND_UTF8(&doc, "event", "daily_sign_in");
	BSON_APPEND_UTF8(&doc, "insert_id", "ins-\xf0\x9f\x98\x80");
	BSON_APPEND_UTF8(&doc, "_id", "\xc3\xa9vt");
	if (expect_valid(&doc, &defcfg, &ev, "fields in another order, part and an unknown field")) {
		ok(field_is(ev.username, ev.username_len, "b\xc3\xb6" "b") &&
			   field_is(ev.insert_id, ev.insert_id_len, "ins-\xf0\x9f\x98\x80") && ev.created_at_ms == 0,
		   "reordered event: username, insert_id, created_at 0");
	}
	bson_destroy(&doc);

	/* A failed validation must not leave a usable-looking reason buffer unterminated. */
	bson_init(&doc);
	build(&doc, "event");
	memset(reason, 'x', sizeof(reason));
	ok(tdr_event_validate(&doc, &defcfg, &ev, reason, sizeof(reason)) == -1 &&
		   memchr(reason, '\0', sizeof(reason)) != NULL,
	   "reason is NUL-terminated");
	{
		char tiny[8];

		memset(tiny, 'x', sizeof(tiny));
		ok(tdr_event_validate(&doc, &defcfg, &ev, tiny, sizeof(tiny)) == -1 && tiny[sizeof(tiny) - 1] == '\0',
		   "reason truncated to a small buffer");
	}
	bson_destroy(&doc);
}

/* ------------------------------------------------------------------------ */
/* 3. The allow-list                                                        */
/* ------------------------------------------------------------------------ */

static void allow_case(const tdr_config *cfg, const char *name, const char *want, const char *what)
{
	bson_t doc;
	tdr_cevent ev;
	char label[160];

	bson_init(&doc);
	build(&doc, "event");
	BSON_APPEND_UTF8(&doc, "event", name);
	snprintf(label, sizeof(label), "allow-list: '%s' %s", name, what);
	if (want)
		expect_reason(&doc, cfg, want, label);
	else
		expect_valid(&doc, cfg, &ev, label);
	bson_destroy(&doc);
}

static void test_allow_list(void)
{
	tdr_config cfg;
	tdr_err err;

	tdr_config_defaults(&cfg);
	ok(tdr_config_set(&cfg, "drain.allow_events=page_view, app.open ,daily_sign_in", &err) == 0,
	   "drain.allow_events set with spaces around names");
	allow_case(&cfg, "page_view", NULL, "first in the list");
	allow_case(&cfg, "app.open", NULL, "padded with spaces in the list");
	allow_case(&cfg, "daily_sign_in", NULL, "last in the list");
	allow_case(&cfg, "app", "event: not in allow-list", "a prefix of a listed name");
	allow_case(&cfg, "page_view2", "event: not in allow-list", "a listed name plus a suffix");
	allow_case(&cfg, "PAGE_VIEW", "event: not in allow-list", "another case");
	allow_case(&cfg, "purchase", "event: not in allow-list", "not listed");
	allow_case(&cfg, "page view", "event: invalid character", "malformed: well-formedness first");
	allow_case(&defcfg, "purchase", NULL, "empty list allows every well-formed name");
}

/* ------------------------------------------------------------------------ */
/* 4. The compact delta form                                                */
/* ------------------------------------------------------------------------ */

/* The compact document's keys in order and their types: "i e d [u] t", all strings but t (date). */
static int compact_shape(const bson_t *c, int with_user)
{
	static const char *const keys = "iedut";
	bson_iter_t it;
	size_t k = 0;

	if (!bson_iter_init(&it, c))
		return 0;
	while (bson_iter_next(&it)) {
		const char *key = bson_iter_key(&it);

		if (!with_user && keys[k] == 'u')
			k++;
		if (keys[k] == '\0' || key[0] != keys[k] || key[1] != '\0')
			return 0;
		if (keys[k] == 't' ? !BSON_ITER_HOLDS_DATE_TIME(&it) : !BSON_ITER_HOLDS_UTF8(&it))
			return 0;
		k++;
	}
	return keys[k] == '\0';
}

static int cevent_eq(const tdr_cevent *a, const tdr_cevent *b)
{
#define SEQ(f) (a->f##_len == b->f##_len && (a->f##_len == 0 || memcmp(a->f, b->f, a->f##_len) == 0))
	return SEQ(insert_id) && SEQ(event) && SEQ(distinct_id) && SEQ(username) &&
	       (a->username == NULL) == (b->username == NULL) && a->created_at_ms == b->created_at_ms;
#undef SEQ
}

static void round_trip(const bson_t *doc, int with_user, const char *what)
{
	bson_t parent, child;
	bson_iter_t it, sub;
	tdr_cevent ev, back;
	const uint8_t *data;
	uint32_t len;

	if (!expect_valid(doc, &defcfg, &ev, what))
		return;
	bson_init(&parent);
	tdr_cevent_append(&parent, "0", &ev);
	if (bson_iter_init_find(&it, &parent, "0") && BSON_ITER_HOLDS_DOCUMENT(&it)) {
		bson_iter_document(&it, &len, &data);
		bson_init_static(&child, data, len);
		ok(compact_shape(&child, with_user), "%s: compact keys i, e, d%s, t in order with their types", what,
		   with_user ? ", u" : "");
		ok(tdr_cevent_parse(&child, &back) == 0 && cevent_eq(&ev, &back), "%s: parse gives back every field",
		   what);
		ok(bson_iter_init(&sub, &child) && bson_iter_find(&sub, "u") == with_user,
		   "%s: u %s", what, with_user ? "present" : "absent (no username)");
	} else {
		ok(0, "%s: tdr_cevent_append wrote a document under \"0\"", what);
	}
	bson_destroy(&parent);
}

static void test_compact(void)
{
	bson_t doc, c;
	tdr_cevent back;

	bson_init(&doc);
	build(&doc, NULL);
	round_trip(&doc, 1, "compact: full event");
	bson_destroy(&doc);

	bson_init(&doc);
	build(&doc, "username");
	round_trip(&doc, 0, "compact: event without username");
	bson_destroy(&doc);

	bson_init(&doc);
	BSON_APPEND_UTF8(&doc, "_id", "evt-000001");
	BSON_APPEND_UTF8(&doc, "insert_id", "ins-\xf0\x9f\x98\x80");
	BSON_APPEND_UTF8(&doc, "event", "x:y/z-1.2_3");
	BSON_APPEND_UTF8(&doc, "distinct_id", "dev-\xe4\xb8\xad\xe6\x96\x87");
	BSON_APPEND_UTF8(&doc, "username", "b\xc3\xb6" "b");
	BSON_APPEND_DATE_TIME(&doc, "created_at", INT64_C(-62135596800000));
	round_trip(&doc, 1, "compact: multi-byte strings, year 1");
	bson_destroy(&doc);

	/* Compact documents that are not well-formed. */
	bson_init(&c);
	ok(tdr_cevent_parse(&c, &back) == -1, "compact parse: empty document rejected");
	bson_destroy(&c);
	bson_init(&c);
	BSON_APPEND_UTF8(&c, "i", "x");
	BSON_APPEND_UTF8(&c, "e", "e");
	BSON_APPEND_DATE_TIME(&c, "t", 1);
	ok(tdr_cevent_parse(&c, &back) == -1, "compact parse: missing d rejected");
	bson_destroy(&c);
	bson_init(&c);
	BSON_APPEND_INT32(&c, "i", 1);
	BSON_APPEND_UTF8(&c, "e", "e");
	BSON_APPEND_UTF8(&c, "d", "d");
	BSON_APPEND_DATE_TIME(&c, "t", 1);
	ok(tdr_cevent_parse(&c, &back) == -1, "compact parse: i not a string rejected");
	bson_destroy(&c);
	bson_init(&c);
	BSON_APPEND_UTF8(&c, "i", "x");
	BSON_APPEND_UTF8(&c, "e", "");
	BSON_APPEND_UTF8(&c, "d", "d");
	BSON_APPEND_DATE_TIME(&c, "t", 1);
	ok(tdr_cevent_parse(&c, &back) == -1, "compact parse: empty e rejected");
	bson_destroy(&c);
}

/* ------------------------------------------------------------------------ */
/* 5. Partitions                                                            */
/* ------------------------------------------------------------------------ */

static void test_partition(void)
{
	static const struct {
		const char *key;
		int32_t p16, p7;
	} strs[] = {
		{ "a", 12, 5 }, { "foobar", 8, 0 }, { "evt-000001", 2, 2 }, { "h\xc3\xa9llo", 0, 4 },
	};
	bson_value_t v;
	bson_t d = BSON_INITIALIZER;
	int good = 1;

	memset(&v, 0, sizeof(v));
	v.value_type = BSON_TYPE_OID;
	bson_oid_init_from_string(&v.value.v_oid, GOLDEN_OID);
	ok(tdr_event_partition(&v, 16) == 1 && tdr_event_partition(&v, 7) == 5,
	   "partition: ObjectId " GOLDEN_OID " -> 1 of 16, 5 of 7");
	v.value_type = BSON_TYPE_UTF8;
	v.value.v_utf8.str = (char *)"evt-000001";
	v.value.v_utf8.len = 10;
	ok(tdr_event_partition(&v, 16) == 2, "partition: \"evt-000001\" -> 2 of 16");
	for (size_t i = 0; i < sizeof(strs) / sizeof(strs[0]); i++) {
		v.value.v_utf8.str = (char *)strs[i].key;
		v.value.v_utf8.len = (uint32_t)strlen(strs[i].key);
		if (tdr_event_partition(&v, 16) != strs[i].p16 || tdr_event_partition(&v, 7) != strs[i].p7) {
			good = 0;
			diag("partition of \"%s\": %d of 16, %d of 7", strs[i].key, tdr_event_partition(&v, 16),
			     tdr_event_partition(&v, 7));
		}
	}
	ok(good, "partition: every string vector of docs/EVENTS.md (%% 16 and %% 7)");
	ok(tdr_event_partition(&v, 1) == 0, "partition: P = 1 puts everything in 0");
	ok(tdr_event_partition(&v, 0) == -1, "partition: P = 0 refused");

	v.value_type = BSON_TYPE_DOUBLE;
	v.value.v_double = 1.0;
	ok(tdr_event_partition(&v, 16) == -1, "partition: double _id -> -1");
	v.value_type = BSON_TYPE_NULL;
	ok(tdr_event_partition(&v, 16) == -1, "partition: null _id -> -1");
	v.value_type = BSON_TYPE_BOOL;
	v.value.v_bool = true;
	ok(tdr_event_partition(&v, 16) == -1, "partition: bool _id -> -1");
	v.value_type = BSON_TYPE_DATE_TIME;
	v.value.v_datetime = 5;
	ok(tdr_event_partition(&v, 16) == -1, "partition: date _id -> -1");
	BSON_APPEND_UTF8(&d, "k", "v");
	v.value_type = BSON_TYPE_DOCUMENT;
	v.value.v_doc.data = (uint8_t *)bson_get_data(&d);
	v.value.v_doc.data_len = d.len;
	ok(tdr_event_partition(&v, 16) == -1, "partition: document _id -> -1");
	bson_destroy(&d);
}

int main(void)
{
	tdr_err err;

	tdr_config_defaults(&defcfg);
	ok(tdr_config_validate(&defcfg, &err) == 0, "default configuration");
	test_missing();
	test_id();
	test_insert_id();
	test_event_name();
	test_person_field("distinct_id", TDR_DISTINCT_ID_MAX);
	test_person_field("username", TDR_USERNAME_MAX);
	test_created_at();
	test_properties();
	test_size();
	test_valid();
	test_allow_list();
	test_compact();
	test_partition();
	return tap_done();
}
