/*
 * test_formats.c - pins tdrain's wire formats with round-trip tests (seed 004):
 * change a format on one side only and this test fails.
 *
 *   1. The archive line (consumers/archive.h): every case in cases[] is
 *      rendered with tdr_archive_line(), checked to be one line of JSON with
 *      the exact field set, order and types, and parsed back with
 *      tdr_archive_parse_line() into a byte-identical document.  One golden
 *      line is pinned as a literal.
 *   2. The archive files around those lines: naming, rotation, recovery of a
 *      leftover ".open" file, truncation after a failed write, backpressure.
 *   3. The compact delta event: TODO, see the marked section at the end.
 *
 * Each case is a builder function, so a new format check is one loop over
 * cases[] (see check_archive_case and the TODO section).
 */
#include "config.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include "consumers/archive.h"
#include "lib/bsonx.h"
#include "lib/clock.h"
#include "lib/conf.h"
#include "lib/log.h"
#include "tests/unit/tap.h"

/* ------------------------------------------------------------------------ */
/* Representative event documents                                           */
/* ------------------------------------------------------------------------ */

struct fmt_case {
	const char *name;
	void (*build)(bson_t *doc);   /* appends the fields to an initialized, empty doc */
	const char *id_text;          /* expected "_id" (canonical key text) */
	const char *id_type;          /* expected "_id_type" */
	const char *created_at;       /* expected "created_at" */
	int64_t created_ms;           /* expected "created_at_ms" */
	const char *username;         /* expected "username", NULL for null */
};

static void append_oid(bson_t *doc, const char *hex)
{
	bson_oid_t oid;

	bson_oid_init_from_string(&oid, hex);
	BSON_APPEND_OID(doc, "_id", &oid);
}

/* ObjectId _id, signed in, simple properties: the common case (also the golden line). */
static void build_golden(bson_t *doc)
{
	bson_t p;

	append_oid(doc, "6745a1c0e4b0a1b2c3d4e5f6");
	BSON_APPEND_UTF8(doc, "insert_id", "ins-000001");
	BSON_APPEND_UTF8(doc, "event", "page_view");
	BSON_APPEND_UTF8(doc, "distinct_id", "dev-42");
	BSON_APPEND_UTF8(doc, "username", "alice");
	BSON_APPEND_DATE_TIME(doc, "created_at", 1795000000123);
	BSON_APPEND_DOCUMENT_BEGIN(doc, "properties", &p);
	BSON_APPEND_UTF8(&p, "path", "/home");
	BSON_APPEND_INT32(&p, "n", 3);
	BSON_APPEND_BOOL(&p, "ok", true);
	bson_append_document_end(doc, &p);
	BSON_APPEND_INT32(doc, "part", 5);
}

/* String _id with non-ASCII, no username, no properties, a date before 1970. */
static void build_string_id(bson_t *doc)
{
	BSON_APPEND_UTF8(doc, "_id", "évt-\xe2\x82\xac-000002");
	BSON_APPEND_UTF8(doc, "insert_id", "ins-\xf0\x9f\x98\x80");
	BSON_APPEND_UTF8(doc, "event", "app.open");
	BSON_APPEND_UTF8(doc, "distinct_id", "dev-\xe4\xb8\xad\xe6\x96\x87");
	BSON_APPEND_DATE_TIME(doc, "created_at", -1);
}

/* int32 _id, control characters and every awkward code point in strings and keys, nested properties. */
static void build_int_id(bson_t *doc)
{
	char ctl[40];
	bson_t p, q, arr, r;
	size_t i;

	/* U+0000..U+001F, DEL, quote, backslash, slash. */
	for (i = 0; i < 32; i++)
		ctl[i] = (char)i;
	ctl[32] = 0x7f;
	ctl[33] = '"';
	ctl[34] = '\\';
	ctl[35] = '/';
	BSON_APPEND_INT32(doc, "_id", 7);
	/* insert_id need only be valid UTF-8, so it may carry a tab and a quote. */
	BSON_APPEND_UTF8(doc, "insert_id", "ins\t\"7\"\\");
	BSON_APPEND_UTF8(doc, "event", "daily_sign_in");
	BSON_APPEND_UTF8(doc, "distinct_id", "dev-7");
	BSON_APPEND_UTF8(doc, "username", "b\xc3\xb6" "b \xe2\x80\xa8 \xc2\x85");
	BSON_APPEND_DATE_TIME(doc, "created_at", -86400001);
	BSON_APPEND_DOCUMENT_BEGIN(doc, "properties", &p);
	bson_append_utf8(&p, "ctl", -1, ctl, 36);
	BSON_APPEND_UTF8(&p, "line\nbreak \"key\"", "U+2028 \xe2\x80\xa8 U+2029 \xe2\x80\xa9 NEL \xc2\x85 emoji \xf0\x9f\x92\xa9");
	BSON_APPEND_DOCUMENT_BEGIN(&p, "nested", &q);
	BSON_APPEND_ARRAY_BEGIN(&q, "list", &arr);
	BSON_APPEND_INT32(&arr, "0", -1);
	BSON_APPEND_INT64(&arr, "1", 4611686018427387904LL);
	BSON_APPEND_DOUBLE(&arr, "2", 0.1);
	BSON_APPEND_DOUBLE(&arr, "3", -0.0);
	BSON_APPEND_NULL(&arr, "4");
	BSON_APPEND_DOCUMENT_BEGIN(&arr, "5", &r);
	BSON_APPEND_DATE_TIME(&r, "when", 1700000000000);
	BSON_APPEND_DATE_TIME(&r, "early", -62135596800000LL);
	bson_append_document_end(&arr, &r);
	bson_append_array_end(&q, &arr);
	BSON_APPEND_BOOL(&q, "f", false);
	bson_append_document_end(&p, &q);
	bson_append_document_end(doc, &p);
	/* Anything else in the document is kept (docs/EVENTS.md). */
	BSON_APPEND_UTF8(doc, "extra", "kept");
}

/* int64 _id, far-future date, every BSON type canonical extended JSON knows, username not a string. */
static void build_int64_id(bson_t *doc)
{
	static const uint8_t bin[] = { 0, 1, 2, 0xff };
	bson_decimal128_t dec;
	bson_oid_t oid;
	bson_t p;

	bson_decimal128_from_string("1.10", &dec);
	bson_oid_init_from_string(&oid, "000000000000000000000001");
	BSON_APPEND_INT64(doc, "_id", -9007199254740993LL);
	BSON_APPEND_UTF8(doc, "insert_id", "ins-4");
	BSON_APPEND_UTF8(doc, "event", "x:y/z-1.2_3");
	BSON_APPEND_UTF8(doc, "distinct_id", "dev-4");
	BSON_APPEND_NULL(doc, "username");
	BSON_APPEND_DATE_TIME(doc, "created_at", 253402300800000LL);
	BSON_APPEND_DOCUMENT_BEGIN(doc, "properties", &p);
	BSON_APPEND_DOUBLE(&p, "inf", INFINITY);
	BSON_APPEND_DOUBLE(&p, "ninf", -INFINITY);
	BSON_APPEND_DOUBLE(&p, "big", 1e300);
	BSON_APPEND_DOUBLE(&p, "third", 1.0 / 3.0);
	BSON_APPEND_BINARY(&p, "bin", BSON_SUBTYPE_BINARY, bin, sizeof(bin));
	BSON_APPEND_REGEX(&p, "re", "^a.*\\d$", "i");
	BSON_APPEND_DECIMAL128(&p, "dec", &dec);
	BSON_APPEND_TIMESTAMP(&p, "ts", 4294967295u, 1);
	BSON_APPEND_OID(&p, "oid", &oid);
	BSON_APPEND_MINKEY(&p, "min");
	BSON_APPEND_MAXKEY(&p, "max");
	BSON_APPEND_CODE(&p, "code", "function(){}");
	bson_append_document_end(doc, &p);
	/* properties is opaque: a second, non-document "properties"-like field is just kept. */
	BSON_APPEND_DATE_TIME(doc, "received_at", -9223372036854775807LL);
}

/* The earliest and latest dates ClickHouse-style text can still show plainly. */
static void build_year_bounds(bson_t *doc)
{
	append_oid(doc, "ffffffffffffffffffffffff");
	BSON_APPEND_UTF8(doc, "insert_id", "i");
	BSON_APPEND_UTF8(doc, "event", "e");
	BSON_APPEND_UTF8(doc, "distinct_id", "d");
	BSON_APPEND_UTF8(doc, "username", "u");
	BSON_APPEND_DATE_TIME(doc, "created_at", 253402300799999LL);
	/* A properties field that is not a document: the flat column is {} and "doc" keeps the truth. */
	BSON_APPEND_UTF8(doc, "properties", "not a document");
}

static const struct fmt_case cases[] = {
	{ "golden: ObjectId _id, signed in", build_golden, "6745a1c0e4b0a1b2c3d4e5f6", "oid",
	  "2026-11-18 11:06:40.123", 1795000000123, "alice" },
	{ "string _id, unicode, no username, 1 ms before 1970", build_string_id, "évt-\xe2\x82\xac-000002", "string",
	  "1969-12-31 23:59:59.999", -1, NULL },
	{ "int32 _id, control characters, nested properties", build_int_id, "7", "int", "1969-12-30 23:59:59.999",
	  -86400001, "b\xc3\xb6" "b \xe2\x80\xa8 \xc2\x85" },
	{ "int64 _id, year 10000, every BSON type", build_int64_id, "-9007199254740993", "int",
	  "10000-01-01 00:00:00.000", 253402300800000LL, NULL },
	{ "last millisecond of 9999, properties not a document", build_year_bounds, "ffffffffffffffffffffffff", "oid",
	  "9999-12-31 23:59:59.999", 253402300799999LL, "u" },
};
#define NCASES (sizeof(cases) / sizeof(cases[0]))

/* The archive line for the golden case, byte for byte.  Changing it is a format change: update docs too. */
static const char golden_line[] =
    "{\"_id\":\"6745a1c0e4b0a1b2c3d4e5f6\",\"_id_type\":\"oid\",\"insert_id\":\"ins-000001\","
    "\"event\":\"page_view\",\"distinct_id\":\"dev-42\",\"username\":\"alice\","
    "\"created_at\":\"2026-11-18 11:06:40.123\",\"created_at_ms\":1795000000123,"
    "\"properties\":{\"path\":\"/home\",\"n\":3,\"ok\":true},"
    "\"doc\":\"{ \\\"_id\\\" : { \\\"$oid\\\" : \\\"6745a1c0e4b0a1b2c3d4e5f6\\\" }, \\\"insert_id\\\" : "
    "\\\"ins-000001\\\", \\\"event\\\" : \\\"page_view\\\", \\\"distinct_id\\\" : \\\"dev-42\\\", "
    "\\\"username\\\" : \\\"alice\\\", \\\"created_at\\\" : { \\\"$date\\\" : { \\\"$numberLong\\\" : "
    "\\\"1795000000123\\\" } }, \\\"properties\\\" : { \\\"path\\\" : \\\"/home\\\", \\\"n\\\" : { "
    "\\\"$numberInt\\\" : \\\"3\\\" }, \\\"ok\\\" : true }, \\\"part\\\" : { \\\"$numberInt\\\" : \\\"5\\\" } "
    "}\"}";

/* ------------------------------------------------------------------------ */
/* 1. The archive line                                                      */
/* ------------------------------------------------------------------------ */

/* The exact field set, in order, and the JSON type each must have. */
static const struct {
	const char *key;
	json_type type;
} line_fields[] = {
	{ "_id", JSON_STRING },        { "_id_type", JSON_STRING },   { "insert_id", JSON_STRING },
	{ "event", JSON_STRING },      { "distinct_id", JSON_STRING }, { "username", JSON_STRING /* or null */ },
	{ "created_at", JSON_STRING }, { "created_at_ms", JSON_INTEGER }, { "properties", JSON_OBJECT },
	{ "doc", JSON_STRING },
};
#define NFIELDS (sizeof(line_fields) / sizeof(line_fields[0]))

static const char *sfield(const bson_t *doc, const char *key)
{
	const char *s = tdr_bson_str(doc, key, NULL);

	return s ? s : "";
}

static int str_is(json_t *obj, const char *key, const char *want)
{
	json_t *v = json_object_get(obj, key);

	return json_is_string(v) && json_string_length(v) == strlen(want) && strcmp(json_string_value(v), want) == 0;
}

/* Fields in document order (jansson keeps insertion order). */
static int check_field_order_and_types(json_t *obj, const char *what)
{
	const char *key;
	json_t *v;
	size_t i = 0;
	int good = json_object_size(obj) == NFIELDS;

	json_object_foreach(obj, key, v) {
		if (i >= NFIELDS || strcmp(key, line_fields[i].key) != 0) {
			diag("%s: field %zu is \"%s\"", what, i, key);
			good = 0;
		} else if (json_typeof(v) != line_fields[i].type &&
			   !(strcmp(key, "username") == 0 && json_is_null(v))) {
			diag("%s: field \"%s\" has JSON type %d", what, key, (int)json_typeof(v));
			good = 0;
		}
		i++;
	}
	return good;
}

/* Is properties the relaxed JSON of the document's properties (or {} when that is not a document)? */
static int properties_match(const bson_t *doc, json_t *props)
{
	bson_iter_t it;
	const uint8_t *data;
	uint32_t len;
	bson_t sub;
	char *rel;
	json_t *want;
	int same;

	if (!bson_iter_init_find(&it, doc, "properties") || !BSON_ITER_HOLDS_DOCUMENT(&it))
		return json_object_size(props) == 0;
	bson_iter_document(&it, &len, &data);
	if (!bson_init_static(&sub, data, len))
		return 0;
	rel = bson_as_relaxed_extended_json(&sub, NULL);
	want = rel ? json_loads(rel, JSON_ALLOW_NUL, NULL) : NULL;
	same = want && json_equal(want, props);
	json_decref(want);
	bson_free(rel);
	return same;
}

static void check_archive_case(const struct fmt_case *c)
{
	bson_t doc = BSON_INITIALIZER, back;
	char *line = NULL;
	size_t len = 0, i;
	int64_t ms = 0;
	tdr_err err = { 0 };
	json_t *obj;
	int raw_ctl = 0;

	c->build(&doc);
	ok(tdr_archive_line(&doc, &line, &len, &err) == 0, "%s: line built %s", c->name, err.msg);
	if (line == NULL) {
		bson_destroy(&doc);
		return;
	}
	ok(len == strlen(line) && len > 0, "%s: reported length is the string length", c->name);
	/* One line: no raw byte below 0x20 at all (so no '\n' or '\r' either). */
	for (i = 0; i < len; i++)
		if ((unsigned char)line[i] < 0x20)
			raw_ctl++;
	ok(raw_ctl == 0, "%s: no raw control byte in the line (%d found)", c->name, raw_ctl);

	obj = json_loadb(line, len, JSON_ALLOW_NUL | JSON_REJECT_DUPLICATES, NULL);
	ok(json_is_object(obj), "%s: the line is one valid JSON object", c->name);
	if (json_is_object(obj)) {
		ok(check_field_order_and_types(obj, c->name), "%s: exact field set, order and types", c->name);
		ok(str_is(obj, "_id", c->id_text) && str_is(obj, "_id_type", c->id_type), "%s: _id \"%s\" (%s)",
		   c->name, c->id_text, c->id_type);
		ok(str_is(obj, "created_at", c->created_at), "%s: created_at \"%s\"", c->name, c->created_at);
		ok(json_integer_value(json_object_get(obj, "created_at_ms")) == c->created_ms,
		   "%s: created_at_ms %lld", c->name, (long long)c->created_ms);
		ok(c->username ? str_is(obj, "username", c->username) : json_is_null(json_object_get(obj, "username")),
		   "%s: username %s", c->name, c->username ? "as in the document" : "null");
		ok(str_is(obj, "insert_id", sfield(&doc, "insert_id")) &&
		   str_is(obj, "event", sfield(&doc, "event")) &&
		   str_is(obj, "distinct_id", sfield(&doc, "distinct_id")),
		   "%s: insert_id, event, distinct_id verbatim", c->name);
		ok(properties_match(&doc, json_object_get(obj, "properties")),
		   "%s: properties is the relaxed extended JSON of the document's", c->name);
	}
	json_decref(obj);

	ok(tdr_archive_parse_line(line, len, &back, &ms, &err) == 0, "%s: parsed back %s", c->name, err.msg);
	if (err.code == 0) {
		ok(back.len == doc.len && bson_equal(&back, &doc), "%s: parsed document is byte-identical", c->name);
		ok(ms == c->created_ms, "%s: parse returns created_at_ms", c->name);
		bson_destroy(&back);
	}
	free(line);
	bson_destroy(&doc);
}

static void check_golden(void)
{
	bson_t doc = BSON_INITIALIZER;
	char *line = NULL;
	size_t len = 0;

	build_golden(&doc);
	if (tdr_archive_line(&doc, &line, &len, NULL) < 0)
		line = NULL;
	ok(line && strcmp(line, golden_line) == 0, "golden archive line unchanged");
	if (line && strcmp(line, golden_line) != 0)
		diag("got:  %s\n# want: %s", line, golden_line);
	free(line);
	bson_destroy(&doc);
}

static void check_line_errors(void)
{
	bson_t doc;
	char *line = (char *)"untouched";
	size_t len = 0;
	int64_t ms = 0;
	tdr_err err = { 0 };
	int rc;

	bson_init(&doc);
	build_string_id(&doc);
	bson_destroy(&doc);

	/* A document missing a required field cannot become a row. */
	bson_init(&doc);
	BSON_APPEND_UTF8(&doc, "_id", "x");
	BSON_APPEND_UTF8(&doc, "event", "e");
	BSON_APPEND_UTF8(&doc, "distinct_id", "d");
	BSON_APPEND_DATE_TIME(&doc, "created_at", 0);
	rc = tdr_archive_line(&doc, &line, &len, &err);
	ok(rc == TDR_EFAIL && strstr(err.msg, "insert_id") && strcmp(line, "untouched") == 0,
	   "no insert_id: EFAIL naming it, *ret untouched (%s)", err.msg);
	bson_destroy(&doc);

	bson_init(&doc);
	BSON_APPEND_DOUBLE(&doc, "_id", 1.5);
	rc = tdr_archive_line(&doc, &line, &len, &err);
	ok(rc == TDR_EFAIL && strstr(err.msg, "_id"), "double _id refused (%s)", err.msg);
	bson_destroy(&doc);

	bson_init(&doc);
	BSON_APPEND_UTF8(&doc, "_id", "x");
	BSON_APPEND_UTF8(&doc, "insert_id", "i");
	BSON_APPEND_UTF8(&doc, "event", "e");
	BSON_APPEND_UTF8(&doc, "distinct_id", "d");
	BSON_APPEND_UTF8(&doc, "created_at", "2026-01-01");
	rc = tdr_archive_line(&doc, &line, &len, &err);
	ok(rc == TDR_EFAIL && strstr(err.msg, "created_at"), "created_at not a date refused (%s)", err.msg);
	bson_destroy(&doc);

	/* Invalid UTF-8 anywhere (here in opaque properties) has no JSON form: the validator must dead-letter it. */
	bson_init(&doc);
	{
		bson_t p;

		BSON_APPEND_UTF8(&doc, "_id", "x");
		BSON_APPEND_UTF8(&doc, "insert_id", "i");
		BSON_APPEND_UTF8(&doc, "event", "e");
		BSON_APPEND_UTF8(&doc, "distinct_id", "d");
		BSON_APPEND_DATE_TIME(&doc, "created_at", 0);
		BSON_APPEND_DOCUMENT_BEGIN(&doc, "properties", &p);
		bson_append_utf8(&p, "bad", -1, "\xff\xfe", 2);
		bson_append_document_end(&doc, &p);
	}
	rc = tdr_archive_line(&doc, &line, &len, &err);
	ok(rc == TDR_EFAIL && strstr(err.msg, "UTF-8"), "invalid UTF-8 refused (%s)", err.msg);
	bson_destroy(&doc);

	ok(tdr_archive_parse_line("not json", 8, &doc, &ms, &err) == TDR_EFAIL, "parse: not JSON (%s)", err.msg);
	ok(tdr_archive_parse_line("{\"doc\":5}", 9, &doc, &ms, &err) == TDR_EFAIL, "parse: doc not a string (%s)",
	   err.msg);
	ok(tdr_archive_parse_line("{\"doc\":\"{ bad\"}", 15, &doc, &ms, &err) == TDR_EFAIL,
	   "parse: doc not extended JSON (%s)", err.msg);
	ok(tdr_archive_parse_line("{\"doc\":\"{}\"}", 12, &doc, &ms, &err) == TDR_EFAIL,
	   "parse: no created_at anywhere (%s)", err.msg);
	/* A line as read from a file, newline included, parses too. */
	{
		char buf[sizeof(golden_line)];

		memcpy(buf, golden_line, sizeof(golden_line) - 1);
		buf[sizeof(golden_line) - 1] = '\n';
		rc = tdr_archive_parse_line(buf, sizeof(golden_line), &doc, &ms, &err);
		ok(rc == 0 && ms == 1795000000123, "parse: trailing newline accepted");
		if (rc == 0)
			bson_destroy(&doc);
	}
}

/* ------------------------------------------------------------------------ */
/* 2. Archive files                                                         */
/* ------------------------------------------------------------------------ */

static char tmpdir[256];

struct dir_scan {
	int open_files, closed_files, other_files;
	int64_t lines, bad_lines, max_size;
	char first_open[256];
};

/* Count files by kind and parse every line of this replica's files. */
static void scan_dir(const char *dir, const char *prefix, struct dir_scan *s)
{
	struct dirent *de;
	DIR *d = opendir(dir);

	memset(s, 0, sizeof(*s));
	if (d == NULL)
		return;
	while ((de = readdir(d)) != NULL) {
		char path[1024], *line = NULL;
		size_t cap = 0, nl = strlen(de->d_name);
		ssize_t n;
		struct stat sb;
		FILE *f;
		int is_open = nl > 12 && strcmp(de->d_name + nl - 12, ".ndjson.open") == 0;
		int is_closed = nl > 7 && strcmp(de->d_name + nl - 7, ".ndjson") == 0;

		if (de->d_name[0] == '.' || strncmp(de->d_name, prefix, strlen(prefix)) != 0)
			continue;
		snprintf(path, sizeof(path), "%s/%s", dir, de->d_name);
		if (stat(path, &sb) < 0 || !S_ISREG(sb.st_mode))
			continue;
		if (is_open) {
			s->open_files++;
			snprintf(s->first_open, sizeof(s->first_open), "%s", de->d_name);
		} else if (is_closed)
			s->closed_files++;
		else
			s->other_files++;
		if (sb.st_size > s->max_size)
			s->max_size = sb.st_size;
		f = fopen(path, "re");
		if (f == NULL)
			continue;
		while ((n = getline(&line, &cap, f)) > 0) {
			bson_t doc;

			if (line[n - 1] == '\n' && tdr_archive_parse_line(line, (size_t)n, &doc, NULL, NULL) == 0) {
				s->lines++;
				bson_destroy(&doc);
			} else
				s->bad_lines++;
		}
		free(line);
		fclose(f);
	}
	closedir(d);
}

static void base_config(tdr_config *cfg, const char *sub, const char *name)
{
	tdr_config_defaults(cfg);
	snprintf(cfg->archive_dir, sizeof(cfg->archive_dir), "%s/%s", tmpdir, sub);
	snprintf(cfg->name, sizeof(cfg->name), "%s", name);
	cfg->archive_max_bytes = 4096;
	cfg->archive_max_age_s = 3600;
}

static int append_golden(tdr_archive *a, size_t n, tdr_err *err)
{
	bson_t docs[16];
	const bson_t *ptrs[16];
	int rc;

	if (n > 16)
		n = 16;
	for (size_t i = 0; i < n; i++) {
		bson_init(&docs[i]);
		build_golden(&docs[i]);
		ptrs[i] = &docs[i];
	}
	rc = tdr_archive_append(a, ptrs, n, err);
	for (size_t i = 0; i < n; i++)
		bson_destroy(&docs[i]);
	return rc;
}

static void write_file(const char *dir, const char *name, const char *content, size_t len)
{
	char path[1024];
	int fd;

	snprintf(path, sizeof(path), "%s/%s", dir, name);
	fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0640);
	if (fd < 0)
		return;
	if (write(fd, content, len) != (ssize_t)len)
		diag("short write to %s", path);
	close(fd);
}

static void check_files(void)
{
	tdr_config cfg;
	tdr_archive *a = NULL;
	struct tdr_archive_stats st;
	struct dir_scan s;
	struct stat sb;
	tdr_err err = { 0 };
	char path[1024];
	int rc, all_ok = 1;

	tdr_config_defaults(&cfg);
	ok(tdr_archive_open(&a, &cfg, &err) == 0 && a == NULL, "archive.dir empty: archive off (NULL)");
	tdr_archive_close(NULL);
	tdr_archive_tick(NULL);

	/* Open creates the directory (and its parents) 0750. */
	base_config(&cfg, "spool/deep", "unit-a");
	rc = tdr_archive_open(&a, &cfg, &err);
	ok(rc == 0 && a != NULL, "open creates %s %s", cfg.archive_dir, err.msg);
	if (a == NULL)
		return;
	ok(stat(cfg.archive_dir, &sb) == 0 && S_ISDIR(sb.st_mode) && (sb.st_mode & 07777) == 0750,
	   "archive dir is 0750");
	rc = append_golden(a, 1, &err);
	scan_dir(cfg.archive_dir, "unit-a-", &s);
	ok(rc == 0 && s.open_files == 1 && s.closed_files == 0 && s.lines == 1,
	   "one batch: one line in one open file (%s)", s.first_open);
	snprintf(path, sizeof(path), "%s/%s", cfg.archive_dir, s.first_open);
	ok(stat(path, &sb) == 0 && (sb.st_mode & 07777) == 0640 && sb.st_size == (off_t)sizeof(golden_line),
	   "open file is 0640 and holds exactly the golden line and a newline");
	{
		unsigned long long ms, seq;
		char tail[32] = "";

		ok(sscanf(s.first_open, "unit-a-%llu-%llu%31s", &ms, &seq, tail) == 3 &&
		   strcmp(tail, ".ndjson.open") == 0 && (int64_t)ms <= tdr_wall_ms() && (int64_t)ms > tdr_wall_ms() - 60000,
		   "named <name>-<start-ms>-<seq>.ndjson.open");
	}
	tdr_archive_stats_get(a, &st);
	ok(st.lines_written == 1 && st.backlog_bytes == 0, "stats: 1 line, no backlog without a URL");

	/* Size rotation: files hold whole batches and never pass max_bytes for small batches. */
	for (int i = 0; i < 20 && rc == 0; i++)
		rc = append_golden(a, 1, &err);
	rc = rc ? rc : append_golden(a, 5, &err);
	scan_dir(cfg.archive_dir, "unit-a-", &s);
	ok(rc == 0 && s.closed_files >= 3 && s.open_files <= 1 && s.lines == 26 && s.bad_lines == 0,
	   "rotation by size: %d closed + %d open files, %lld lines", s.closed_files, s.open_files,
	   (long long)s.lines);
	ok(s.max_size <= 4096, "no file passes archive.max_bytes (largest %lld)", (long long)s.max_size);
	tdr_archive_stats_get(a, &st);
	ok(st.lines_written == 26 && st.files_closed == s.closed_files, "stats: %lld lines, %lld files closed",
	   (long long)st.lines_written, (long long)st.files_closed);
	tdr_archive_close(a);
	a = NULL;
	scan_dir(cfg.archive_dir, "unit-a-", &s);
	ok(s.open_files == 0 && s.lines == 26 && s.other_files == 0, "close: no open file left, every line kept");

	/* Age rotation through tick(). */
	cfg.archive_max_age_s = 1;
	rc = tdr_archive_open(&a, &cfg, &err);
	if (rc == 0) {
		int before;

		scan_dir(cfg.archive_dir, "unit-a-", &s);
		before = s.closed_files;
		rc = append_golden(a, 1, &err);
		tdr_archive_tick(a);
		scan_dir(cfg.archive_dir, "unit-a-", &s);
		ok(rc == 0 && s.open_files == 1, "tick before max_age keeps the file open");
		tdr_sleep_ms(1100, NULL);
		tdr_archive_tick(a);
		scan_dir(cfg.archive_dir, "unit-a-", &s);
		ok(s.open_files == 0 && s.closed_files == before + 1, "tick after max_age closes it");
		tdr_archive_tick(a); /* nothing open: nothing happens */
		tdr_archive_close(a);
		a = NULL;
	}

	/* Recovery: leftovers of this replica are cut to whole lines and closed; others are not touched. */
	base_config(&cfg, "recover", "unit-a");
	(void)mkdir(cfg.archive_dir, 0750);
	{
		char buf[3 * sizeof(golden_line)];
		size_t gl = sizeof(golden_line) - 1;

		memcpy(buf, golden_line, gl);
		buf[gl] = '\n';
		memcpy(buf + gl + 1, golden_line, gl);
		buf[2 * gl + 1] = '\n';
		memcpy(buf + 2 * gl + 2, golden_line, 40); /* a crash in the middle of a line */
		write_file(cfg.archive_dir, "unit-a-1000-0.ndjson.open", buf, 2 * gl + 42);
		write_file(cfg.archive_dir, "unit-a-999-3.ndjson.open", golden_line, 40);
		write_file(cfg.archive_dir, "unit-a-1-1000-0.ndjson.open", buf, 2 * gl + 2);
		write_file(cfg.archive_dir, "unit-b-1000-0.ndjson.open", buf, 2 * gl + 2);
		rc = tdr_archive_open(&a, &cfg, &err);
		ok(rc == 0, "open with leftovers %s", err.msg);
		snprintf(path, sizeof(path), "%s/unit-a-1000-0.ndjson", cfg.archive_dir);
		ok(stat(path, &sb) == 0 && sb.st_size == (off_t)(2 * gl + 2), "leftover cut to its whole lines and closed");
		snprintf(path, sizeof(path), "%s/unit-a-999-3.ndjson.open", cfg.archive_dir);
		ok(stat(path, &sb) < 0, "leftover holding only a half line removed");
		snprintf(path, sizeof(path), "%s/unit-a-999-3.ndjson", cfg.archive_dir);
		ok(stat(path, &sb) < 0, "... and not closed as an empty file");
		snprintf(path, sizeof(path), "%s/unit-a-1-1000-0.ndjson.open", cfg.archive_dir);
		ok(stat(path, &sb) == 0, "replica unit-a-1's open file untouched (name prefix is exact)");
		snprintf(path, sizeof(path), "%s/unit-b-1000-0.ndjson.open", cfg.archive_dir);
		ok(stat(path, &sb) == 0, "replica unit-b's open file untouched");
		tdr_archive_close(a);
		a = NULL;
	}

	/* A failed write (here: file size limit, EFBIG) leaves no half line and loses nothing acknowledged. */
	base_config(&cfg, "efbig", "unit-a");
	rc = tdr_archive_open(&a, &cfg, &err);
	if (rc == 0) {
		struct rlimit old, lim;
		void (*oldh)(int);

		rc = append_golden(a, 1, &err);
		getrlimit(RLIMIT_FSIZE, &old);
		lim = old;
		lim.rlim_cur = sizeof(golden_line) + 100; /* the next batch is cut mid-line */
		oldh = signal(SIGXFSZ, SIG_IGN);
		setrlimit(RLIMIT_FSIZE, &lim);
		rc = append_golden(a, 3, &err);
		setrlimit(RLIMIT_FSIZE, &old);
		signal(SIGXFSZ, oldh);
		ok(rc == TDR_ETRANSIENT, "failed write is TDR_ETRANSIENT (%s)", err.msg);
		scan_dir(cfg.archive_dir, "unit-a-", &s);
		ok(s.lines == 1 && s.bad_lines == 0 && s.max_size == (int64_t)sizeof(golden_line),
		   "partial write cut back: %lld whole lines, no half line", (long long)s.lines);
		rc = append_golden(a, 3, &err);
		scan_dir(cfg.archive_dir, "unit-a-", &s);
		ok(rc == 0 && s.lines == 4 && s.bad_lines == 0, "retry of the batch succeeds: %lld lines",
		   (long long)s.lines);
		tdr_archive_stats_get(a, &st);
		ok(st.lines_written == 4, "stats count only durable lines (%lld)", (long long)st.lines_written);
		tdr_archive_close(a);
		a = NULL;
	}

	/* Backpressure: endpoint refusing connections, tiny backlog limit. */
	base_config(&cfg, "backlog", "unit-a");
	snprintf(cfg.archive_http_url, sizeof(cfg.archive_http_url), "http://user:secret@127.0.0.1:1/ingest");
	tdr_err_clear(&err);
	cfg.archive_max_backlog_bytes = 4096;
	cfg.archive_http_timeout_ms = 500;
	rc = tdr_archive_open(&a, &cfg, &err);
	ok(rc == 0, "open with an unreachable URL %s", err.msg);
	if (rc == 0) {
		int64_t t0;
		int i;

		for (i = 0; i < 20; i++) {
			rc = append_golden(a, 1, &err);
			if (rc < 0)
				break;
		}
		tdr_archive_stats_get(a, &st);
		ok(rc == TDR_ETRANSIENT && strstr(err.msg, "exceeds archive.max_backlog_bytes") &&
		   st.backlog_bytes > 4096 && i < 20,
		   "append refused after %d batches: \"%s\" (backlog %lld)", i, err.msg, (long long)st.backlog_bytes);
		scan_dir(cfg.archive_dir, "unit-a-", &s);
		ok(s.open_files == 0 && s.lines == i, "refusal closes the open file so it can be sent; %lld lines kept",
		   (long long)s.lines);
		ok(strstr(err.msg, "secret") == NULL, "no credentials in the message");
		t0 = tdr_mono_ms();
		while (tdr_mono_ms() - t0 < 3000) {
			tdr_archive_stats_get(a, &st);
			if (st.send_failures >= 2)
				break;
			tdr_sleep_ms(50, NULL);
		}
		ok(st.send_failures >= 2 && st.files_sent == 0, "sender retries (%lld failures)",
		   (long long)st.send_failures);
		rc = append_golden(a, 1, &err);
		ok(rc == TDR_ETRANSIENT, "still refused while the endpoint is down");
		t0 = tdr_mono_ms();
		tdr_archive_close(a);
		a = NULL;
		ok(tdr_mono_ms() - t0 < 2000, "close is prompt (%lld ms)", (long long)(tdr_mono_ms() - t0));
		scan_dir(cfg.archive_dir, "unit-a-", &s);
		ok(s.lines == i && s.open_files == 0, "nothing lost: %lld lines still spooled", (long long)s.lines);

		/* Without a URL the spool is someone else's business: no backlog, no refusal. */
		cfg.archive_http_url[0] = '\0';
		rc = tdr_archive_open(&a, &cfg, &err);
		if (rc == 0) {
			rc = append_golden(a, 1, &err);
			tdr_archive_stats_get(a, &st);
			ok(rc == 0 && st.backlog_bytes == 0, "no URL: backlog 0 and append accepted");
			tdr_archive_close(a);
			a = NULL;
		}
	}
	(void)all_ok;
}

/* ------------------------------------------------------------------------ */
/* 3. The compact delta event                                               */
/* ------------------------------------------------------------------------ */

/*
 * TODO(lead): pin the compact delta event format here (docs/EVENTS.md,
 * consumers/event.h):
 *   {i: insert_id, e: event, d: distinct_id, u: username (absent if none), t: created_at}
 * Suggested shape, reusing cases[] above:
 *   static void check_delta_case(const struct fmt_case *c)
 *   {
 *           build the doc with c->build; tdr_event_validate() it (cases with a
 *           control character in username or a non-string username are
 *           expected to be dead-lettered: compare with the reason instead);
 *           tdr_cevent_append() it under "0" in a parent; check the compact
 *           document's exact keys, order and BSON types; tdr_cevent_parse()
 *           it back and compare every tdr_cevent field with the original.
 *   }
 *   plus one golden compact document pinned as its canonical extended JSON
 *   (bson_as_canonical_extended_json) string literal, like golden_line.
 * Then call check_delta_case() in the loop marked in main().
 */

int main(void)
{
	char tmpl[] = "/tmp/tdr-test-formats-XXXXXX";
	size_t i;

	tdr_log_init("test_formats", LOG_ERR);
	/* 1. archive line */
	for (i = 0; i < NCASES; i++)
		check_archive_case(&cases[i]);
	check_golden();
	check_line_errors();

	/* 2. archive files */
	if (mkdtemp(tmpl) == NULL) {
		ok(0, "mkdtemp: %s", strerror(errno));
		return tap_done();
	}
	snprintf(tmpdir, sizeof(tmpdir), "%s", tmpl);
	umask(022);
	check_files();
	{
		char cmd[400];

		snprintf(cmd, sizeof(cmd), "rm -rf '%s'", tmpdir);
		if (system(cmd) != 0)
			diag("could not remove %s", tmpdir);
	}

	/* 3. compact delta event: for (i = 0; i < NCASES; i++) check_delta_case(&cases[i]);  (TODO above) */
	return tap_done();
}
