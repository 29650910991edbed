#include "config.h"

#include <stdio.h>
#include <string.h>

#include "lib/bsonx.h"

const char *tdr_bson_str(const bson_t *b, const char *key, uint32_t *len)
{
	bson_iter_t it;

	if (!bson_iter_init_find(&it, b, key) || !BSON_ITER_HOLDS_UTF8(&it))
		return NULL;
	return bson_iter_utf8(&it, len);
}

int64_t tdr_bson_i64(const bson_t *b, const char *key, int64_t def)
{
	bson_iter_t it;

	if (!bson_iter_init_find(&it, b, key))
		return def;
	if (BSON_ITER_HOLDS_INT32(&it) || BSON_ITER_HOLDS_INT64(&it) || BSON_ITER_HOLDS_DOUBLE(&it))
		return bson_iter_as_int64(&it);
	return def;
}

int tdr_bson_bool(const bson_t *b, const char *key, int def)
{
	bson_iter_t it;

	if (!bson_iter_init_find(&it, b, key))
		return def;
	return bson_iter_as_bool(&it) ? 1 : 0;
}

int tdr_id_key(const bson_value_t *id, char *buf, size_t buflen)
{
	int n;

	switch (id->value_type) {
	case BSON_TYPE_OID:
		if (buflen < 25)
			return -1;
		bson_oid_to_string(&id->value.v_oid, buf);
		return 24;
	case BSON_TYPE_UTF8:
		if (id->value.v_utf8.len + 1 > buflen)
			return -1;
		memcpy(buf, id->value.v_utf8.str, id->value.v_utf8.len);
		buf[id->value.v_utf8.len] = '\0';
		return (int)id->value.v_utf8.len;
	case BSON_TYPE_INT32:
		n = snprintf(buf, buflen, "%d", id->value.v_int32);
		return n > 0 && (size_t)n < buflen ? n : -1;
	case BSON_TYPE_INT64:
		n = snprintf(buf, buflen, "%lld", (long long)id->value.v_int64);
		return n > 0 && (size_t)n < buflen ? n : -1;
	default:
		return -1;
	}
}

void tdr_bson_append_value(bson_t *b, const char *key, const bson_value_t *v)
{
	bson_append_value(b, key, -1, v);
}

int tdr_bson_value_eq(const bson_value_t *a, const bson_value_t *b)
{
	bson_t da = BSON_INITIALIZER, db = BSON_INITIALIZER;
	int eq;

	if (a->value_type != b->value_type)
		return 0;
	bson_append_value(&da, "v", 1, a);
	bson_append_value(&db, "v", 1, b);
	eq = bson_equal(&da, &db);
	bson_destroy(&da);
	bson_destroy(&db);
	return eq;
}
