#include "config.h"

#include <stdio.h>
#include <string.h>

#include "consumers/event.h"
#include "lib/bsonx.h"
#include "lib/hash.h"

/* Event names: what can sit in an _id and a field path without escaping. */
static int name_char_ok(unsigned char ch)
{
	return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') || ch == '_' ||
	       ch == '.' || ch == ':' || ch == '/' || ch == '-';
}

/* Unicode category Cc: C0 (NUL included), DEL, and C1 (U+0080-U+009F = C2 80..C2 9F in UTF-8). */
static int has_control(const char *s, uint32_t len)
{
	for (uint32_t i = 0; i < len; i++) {
		unsigned char c = (unsigned char)s[i];

		if (c < 0x20 || c == 0x7f)
			return 1;
		if (c == 0xc2 && i + 1 < len && (unsigned char)s[i + 1] >= 0x80 && (unsigned char)s[i + 1] <= 0x9f)
			return 1;
	}
	return 0;
}

/*
 * Strict UTF-8 that lets raw NUL bytes through (the control check rejects
 * them) but not C0 80, the overlong NUL that bson_utf8_validate() accepts
 * when allow_null is true.  A NUL byte never sits inside a valid multi-byte
 * sequence, so validating the pieces between NULs is exact.
 */
static int utf8_ok(const char *s, uint32_t len)
{
	const char *p = s, *end = s + len, *z;
	uint32_t i = 0;

	/* Telemetry strings are nearly always ASCII without NUL: that needs no decoder. */
	while (i < len && (unsigned char)s[i] - 1u < 0x7fu)
		i++;
	if (i == len)
		return 1;

	while ((z = memchr(p, '\0', (size_t)(end - p))) != NULL) {
		if (!bson_utf8_validate(p, (size_t)(z - p), false))
			return 0;
		p = z + 1;
	}
	return bson_utf8_validate(p, (size_t)(end - p), false);
}

#define FAIL(...)                                              \
	do {                                                   \
		snprintf(reason, reasonlen, __VA_ARGS__);     \
		return -1;                                     \
	} while (0)

/*
 * A string field: present, a string, non-empty, bounded, then either in the
 * event-name charset (charset set: checked before UTF-8, which it implies)
 * or valid UTF-8.
 */
static int string_field(const bson_iter_t *it, const char *key, uint32_t max, int required, int charset,
			const char **ret, uint32_t *ret_len, char *reason, size_t reasonlen)
{
	const char *s;
	uint32_t len;

	*ret = NULL;
	*ret_len = 0;
	if (it == NULL) {
		if (required)
			FAIL("%s: missing", key);
		return 0;
	}
	if (!BSON_ITER_HOLDS_UTF8(it))
		FAIL("%s: not a string", key);
	s = bson_iter_utf8(it, &len);
	if (len == 0)
		FAIL("%s: empty", key);
	if (len > max)
		FAIL("%s: too long (%u bytes, at most %u)", key, len, max);
	if (charset) {
		for (uint32_t i = 0; i < len; i++)
			if (!name_char_ok((unsigned char)s[i]))
				FAIL("%s: invalid character at byte %u", key, i);
	} else if (!utf8_ok(s, len)) {
		/* an embedded NUL passes here; the control check rejects it where it applies */
		FAIL("%s: invalid UTF-8", key);
	}
	*ret = s;
	*ret_len = len;
	return 0;
}

/* The top-level fields the contract names, found in one pass (first occurrence, as bson_iter_find). */
enum { F_ID, F_INSERT_ID, F_EVENT, F_DISTINCT_ID, F_USERNAME, F_CREATED_AT, F_PROPERTIES, F_N };
static const char *const contract_fields[F_N] = { "_id",      "insert_id",  "event",     "distinct_id",
						  "username", "created_at", "properties" };

/* An int32 element "part": type byte, "part\0", 4 value bytes. */
#define PART_ELEMENT_BYTES (1 + 5 + 4)

int64_t tdr_event_size(const bson_t *doc)
{
	bson_iter_t it;
	int64_t len = (int64_t)doc->len;

	/*
	 * The leader's triage writes `part` into documents that lack it (on stores
	 * with atomic updates only), and a requeue removes it: whether an event
	 * fits must not depend on which of those happened, nor on the store.
	 */
	if (bson_iter_init_find(&it, doc, "part") && BSON_ITER_HOLDS_INT32(&it))
		len -= PART_ELEMENT_BYTES;
	return len;
}

int tdr_event_validate(const bson_t *doc, const tdr_config *cfg, tdr_cevent *out, char *reason, size_t reasonlen)
{
	bson_iter_t it;
	struct {
		bson_iter_t it; /* bson_iter_t is over-aligned: no plain arrays of it */
	} field[F_N];
	const bson_iter_t *at[F_N] = { 0 };
	char key[TDR_ID_MAX + 8];

	memset(out, 0, sizeof(*out));
	if (tdr_event_size(doc) > cfg->max_event_bytes)
		FAIL("document: too large (%lld bytes, at most %lld)", (long long)tdr_event_size(doc),
		     (long long)cfg->max_event_bytes);
	if (bson_iter_init(&it, doc))
		while (bson_iter_next(&it)) {
			const char *k = bson_iter_key(&it);

			for (int i = 0; i < F_N; i++)
				if (at[i] == NULL && strcmp(k, contract_fields[i]) == 0) {
					field[i].it = it;
					at[i] = &field[i].it;
					break;
				}
		}
	if (at[F_ID] == NULL)
		FAIL("_id: missing");
	/* ObjectId or string only (docs/EVENTS.md): what every producer language hashes alike. */
	if (BSON_ITER_HOLDS_UTF8(at[F_ID])) {
		uint32_t len;

		(void)bson_iter_utf8(at[F_ID], &len);
		if (len == 0)
			FAIL("_id: empty");
		if (len > TDR_ID_MAX)
			FAIL("_id: too long (%u bytes, at most %u)", len, TDR_ID_MAX);
	} else if (!BSON_ITER_HOLDS_OID(at[F_ID])) {
		FAIL("_id: unsupported type");
	}
	if (tdr_id_key(bson_iter_value(&field[F_ID].it), key, sizeof(key)) < 0)
		FAIL("_id: unsupported type");
	if (string_field(at[F_INSERT_ID], "insert_id", TDR_INSERT_ID_MAX, 1, 0, &out->insert_id,
			 &out->insert_id_len, reason, reasonlen) < 0)
		return -1;
	if (has_control(out->insert_id, out->insert_id_len))
		FAIL("insert_id: control character");
	if (string_field(at[F_EVENT], "event", TDR_EVENT_NAME_MAX, 1, 1, &out->event, &out->event_len, reason,
			 reasonlen) < 0)
		return -1;
	if (string_field(at[F_DISTINCT_ID], "distinct_id", TDR_DISTINCT_ID_MAX, 1, 0, &out->distinct_id,
			 &out->distinct_id_len, reason, reasonlen) < 0)
		return -1;
	if (has_control(out->distinct_id, out->distinct_id_len))
		FAIL("distinct_id: control character");
	if (string_field(at[F_USERNAME], "username", TDR_USERNAME_MAX, 0, 0, &out->username, &out->username_len,
			 reason, reasonlen) < 0)
		return -1;
	if (out->username && has_control(out->username, out->username_len))
		FAIL("username: control character");
	if (at[F_CREATED_AT] == NULL)
		FAIL("created_at: missing");
	if (!BSON_ITER_HOLDS_DATE_TIME(at[F_CREATED_AT]))
		FAIL("created_at: not a date");
	out->created_at_ms = bson_iter_date_time(at[F_CREATED_AT]);
	if (at[F_PROPERTIES] && !BSON_ITER_HOLDS_DOCUMENT(at[F_PROPERTIES]))
		FAIL("properties: not a document");
	{
		size_t off = 0;

		/* Any other string (properties, extra fields) must be UTF-8 too: the archive writes JSON. */
		if (!bson_validate(doc, BSON_VALIDATE_UTF8 | BSON_VALIDATE_UTF8_ALLOW_NULL, &off))
			FAIL("document: invalid UTF-8 or malformed BSON near byte %zu", off);
	}
	{
		char name[TDR_EVENT_NAME_MAX + 1];

		memcpy(name, out->event, out->event_len);
		name[out->event_len] = '\0';
		if (!tdr_config_event_allowed(cfg, name))
			FAIL("event: not in allow-list");
	}
	return 0;
}

void tdr_cevent_append(bson_t *parent, const char *key, const tdr_cevent *ev)
{
	bson_t c;

	bson_append_document_begin(parent, key, -1, &c);
	bson_append_utf8(&c, "i", 1, ev->insert_id, (int)ev->insert_id_len);
	bson_append_utf8(&c, "e", 1, ev->event, (int)ev->event_len);
	bson_append_utf8(&c, "d", 1, ev->distinct_id, (int)ev->distinct_id_len);
	if (ev->username)
		bson_append_utf8(&c, "u", 1, ev->username, (int)ev->username_len);
	bson_append_date_time(&c, "t", 1, ev->created_at_ms);
	bson_append_document_end(parent, &c);
}

int tdr_cevent_parse(const bson_t *compact, tdr_cevent *out)
{
	bson_iter_t it;

	memset(out, 0, sizeof(*out));
	if (!bson_iter_init(&it, compact))
		return -1;
	while (bson_iter_next(&it)) {
		const char *k = bson_iter_key(&it);

		if (k[0] == '\0' || k[1] != '\0')
			continue;
		switch (k[0]) {
		case 'i':
			if (BSON_ITER_HOLDS_UTF8(&it))
				out->insert_id = bson_iter_utf8(&it, &out->insert_id_len);
			break;
		case 'e':
			if (BSON_ITER_HOLDS_UTF8(&it))
				out->event = bson_iter_utf8(&it, &out->event_len);
			break;
		case 'd':
			if (BSON_ITER_HOLDS_UTF8(&it))
				out->distinct_id = bson_iter_utf8(&it, &out->distinct_id_len);
			break;
		case 'u':
			if (BSON_ITER_HOLDS_UTF8(&it))
				out->username = bson_iter_utf8(&it, &out->username_len);
			break;
		case 't':
			if (BSON_ITER_HOLDS_DATE_TIME(&it))
				out->created_at_ms = bson_iter_date_time(&it);
			break;
		}
	}
	if (!out->insert_id || !out->event || !out->distinct_id || out->insert_id_len == 0 || out->event_len == 0 ||
	    out->distinct_id_len == 0)
		return -1;
	return 0;
}

int32_t tdr_event_partition(const bson_value_t *id, uint32_t P)
{
	char key[512];
	int len = tdr_id_key(id, key, sizeof(key));

	if (len < 0 || P == 0)
		return -1;
	return (int32_t)(tdr_fnv1a32(key, (size_t)len) % P);
}
