/*
 * archive_line.c - the archive's line format (archive.h, pinned by
 * tests/unit/test_formats.c): one event document as one NDJSON line, and a
 * line back into the document (tdrainctl replay).  Pure functions of their
 * input, apart from archive.c, which owns the files, their rotation and the
 * sender thread.
 */
#include "config.h"

#include <inttypes.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "consumers/archive.h"
#include "lib/bsonx.h"
#include "lib/clock.h"

/* Floor division: days and time of day of dates before 1970 must not round toward zero. */
static void split_ms(int64_t ms, int64_t *days, int64_t *ms_of_day)
{
	const int64_t D = 86400000;
	int64_t q = ms / D, r = ms % D;

	if (r < 0) {
		q--;
		r += D;
	}
	*days = q;
	*ms_of_day = r;
}

/* "YYYY-MM-DD hh:mm:ss.mmm" in UTC (ClickHouse DateTime64(3) text form). */
static void format_created_at(int64_t ms, char *buf, size_t len)
{
	int64_t days, tod, y;
	unsigned mo, d;

	split_ms(ms, &days, &tod);
	tdr_civil_from_days(days, &y, &mo, &d);
	snprintf(buf, len, "%04" PRId64 "-%02u-%02u %02u:%02u:%02u.%03u", y, mo, d, (unsigned)(tod / 3600000),
		 (unsigned)(tod / 60000 % 60), (unsigned)(tod / 1000 % 60), (unsigned)(tod % 1000));
}

/* A required string field as a jansson string; NULL if absent, not a string or not UTF-8. */
static json_t *str_field(const bson_t *doc, const char *key)
{
	uint32_t len;
	const char *s = tdr_bson_str(doc, key, &len);

	/* json_stringn validates UTF-8 and returns NULL on invalid input. */
	return s ? json_stringn(s, len) : NULL;
}

/* Add v under key, taking the reference; fails (and frees nothing twice) if v is NULL. */
static int put(json_t *obj, const char *key, json_t *v)
{
	if (v == NULL)
		return -1;
	return json_object_set_new(obj, key, v) == 0 ? 0 : -1;
}

int tdr_archive_line(const bson_t *doc, char **ret, size_t *ret_len, tdr_err *err)
{
	char idbuf[129], when[48];
	const char *id_type = NULL, *bad = NULL;
	json_t *obj = NULL, *props = NULL;
	char *canon = NULL, *relaxed = NULL, *line = NULL;
	bson_iter_t it;
	int64_t created_ms;
	int rc = TDR_EFAIL, n;

	/* _id: its canonical key text (docs/EVENTS.md) plus its type, so the flat row is unambiguous. */
	if (!bson_iter_init_find(&it, doc, "_id"))
		return tdr_err_set(err, TDR_EFAIL, "archive line: document has no _id");
	switch (bson_iter_type(&it)) {
	case BSON_TYPE_OID:
		id_type = "oid";
		break;
	case BSON_TYPE_UTF8:
		id_type = "string";
		break;
	case BSON_TYPE_INT32:
	case BSON_TYPE_INT64:
		id_type = "int";
		break;
	default:
		return tdr_err_set(err, TDR_EFAIL, "archive line: _id has unsupported BSON type %d",
				   (int)bson_iter_type(&it));
	}
	n = tdr_id_key(bson_iter_value(&it), idbuf, sizeof(idbuf));
	if (n < 0)
		return tdr_err_set(err, TDR_EFAIL, "archive line: _id is longer than 128 bytes");
	if (!bson_iter_init_find(&it, doc, "created_at") || !BSON_ITER_HOLDS_DATE_TIME(&it))
		return tdr_err_set(err, TDR_EFAIL, "archive line: _id %s: created_at is not a date", idbuf);
	created_ms = bson_iter_date_time(&it);
	format_created_at(created_ms, when, sizeof(when));

	/* The lossless copy first: it fails exactly when some string or key is not valid UTF-8. */
	canon = bson_as_canonical_extended_json(doc, NULL);
	if (canon == NULL) {
		rc = tdr_err_set(err, TDR_EFAIL, "archive line: _id %s: document is not representable as JSON "
				 "(invalid UTF-8?)", idbuf);
		goto out;
	}

	obj = json_object();
	if (obj == NULL)
		goto nomem;
	if (put(obj, "_id", json_stringn(idbuf, (size_t)n)) < 0 || put(obj, "_id_type", json_string(id_type)) < 0) {
		bad = "_id";
		goto fail;
	}
	if (put(obj, "insert_id", str_field(doc, "insert_id")) < 0) {
		bad = "insert_id";
		goto fail;
	}
	if (put(obj, "event", str_field(doc, "event")) < 0) {
		bad = "event";
		goto fail;
	}
	if (put(obj, "distinct_id", str_field(doc, "distinct_id")) < 0) {
		bad = "distinct_id";
		goto fail;
	}
	/* username is optional: anything but a string is "not signed in" (null). */
	{
		json_t *u = tdr_bson_str(doc, "username", NULL) ? str_field(doc, "username") : json_null();

		if (put(obj, "username", u) < 0) {
			bad = "username";
			goto fail;
		}
	}
	if (put(obj, "created_at", json_string(when)) < 0 || put(obj, "created_at_ms", json_integer(created_ms)) < 0)
		goto nomem;

	/*
	 * properties: libbson's relaxed extended JSON (dates as {"$date": ...},
	 * int64 as plain numbers), re-encoded by jansson so the line is compact
	 * and has one escaping style.  Absent or not a document: {} so the
	 * column's type never varies; "doc" still says exactly what was there.
	 */
	if (bson_iter_init_find(&it, doc, "properties") && BSON_ITER_HOLDS_DOCUMENT(&it)) {
		const uint8_t *data;
		uint32_t dlen;
		bson_t sub;
		json_error_t je;

		bson_iter_document(&it, &dlen, &data);
		if (!bson_init_static(&sub, data, dlen)) {
			bad = "properties";
			goto fail;
		}
		relaxed = bson_as_relaxed_extended_json(&sub, NULL);
		if (relaxed == NULL) {
			bad = "properties";
			goto fail;
		}
		/* JSON_ALLOW_NUL: U+0000 is valid UTF-8 and BSON strings may hold it. */
		props = json_loads(relaxed, JSON_ALLOW_NUL, &je);
		if (props == NULL || !json_is_object(props)) {
			rc = tdr_err_set(err, TDR_EFAIL, "archive line: _id %s: properties: %s", idbuf,
					 props ? "not an object" : je.text);
			goto out;
		}
	} else {
		props = json_object();
		if (props == NULL)
			goto nomem;
	}
	if (json_object_set(obj, "properties", props) < 0)
		goto nomem;
	if (put(obj, "doc", json_string(canon)) < 0)
		goto nomem;

	/*
	 * Compact, UTF-8 kept as is (not \u-escaped): jansson escapes '"', '\\'
	 * and every control character below 0x20, so a line never contains a raw
	 * newline.  Readers must split on '\n' only (NDJSON), not on U+2028 etc.
	 */
	line = json_dumps(obj, JSON_COMPACT | JSON_ENCODE_ANY);
	if (line == NULL)
		goto nomem;
	*ret_len = strlen(line);
	*ret = line;
	rc = 0;
	goto out;

nomem:
	rc = tdr_err_set(err, TDR_ENOMEM, "archive line: _id %s: out of memory", idbuf);
	goto out;
fail:
	rc = tdr_err_set(err, TDR_EFAIL, "archive line: _id %s: %s is missing, not a string or not UTF-8", idbuf,
			 bad ? bad : "a field");
out:
	json_decref(props);
	json_decref(obj);
	bson_free(relaxed);
	bson_free(canon);
	return rc;
}

int tdr_archive_parse_line(const char *line, size_t len, bson_t *ret_doc, int64_t *ret_created_ms, tdr_err *err)
{
	json_t *root, *jdoc, *jms;
	json_error_t je;
	bson_error_t be;
	bson_iter_t it;
	bson_t doc;
	int64_t ms;
	int rc = 0;

	while (len > 0 && (line[len - 1] == '\n' || line[len - 1] == '\r'))
		len--;
	root = json_loadb(line, len, JSON_ALLOW_NUL, &je);
	if (root == NULL)
		return tdr_err_set(err, TDR_EFAIL, "not JSON: %s at column %d", je.text, je.column);
	jdoc = json_object_get(root, "doc");
	if (!json_is_string(jdoc)) {
		json_decref(root);
		return tdr_err_set(err, TDR_EFAIL, "no \"doc\" string");
	}
	if (!bson_init_from_json(&doc, json_string_value(jdoc), (ssize_t)json_string_length(jdoc), &be)) {
		tdr_err_set(err, TDR_EFAIL, "\"doc\" is not extended JSON: %s", be.message);
		json_decref(root);
		return TDR_EFAIL;
	}
	/* The document is the truth; the flat field only stands in if the document lacks a date. */
	if (bson_iter_init_find(&it, &doc, "created_at") && BSON_ITER_HOLDS_DATE_TIME(&it)) {
		ms = bson_iter_date_time(&it);
	} else {
		jms = json_object_get(root, "created_at_ms");
		if (!json_is_integer(jms)) {
			rc = tdr_err_set(err, TDR_EFAIL, "no created_at date in \"doc\" and no created_at_ms");
			bson_destroy(&doc);
			json_decref(root);
			return rc;
		}
		ms = (int64_t)json_integer_value(jms);
	}
	json_decref(root);
	bson_steal(ret_doc, &doc);
	if (ret_created_ms)
		*ret_created_ms = ms;
	return 0;
}
