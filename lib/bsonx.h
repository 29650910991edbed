/*
 * bsonx.h - small, checked accessors over libbson, and the canonical _id key.
 */
#ifndef TDRAIN_BSONX_H
#define TDRAIN_BSONX_H

#include <bson/bson.h>
#include <stdint.h>

/* Field value if it is a UTF-8 string (len set), else NULL. */
const char *tdr_bson_str(const bson_t *b, const char *key, uint32_t *len);
/* Field as int64 if it is an int32/int64/double, else def. */
int64_t tdr_bson_i64(const bson_t *b, const char *key, int64_t def);
int tdr_bson_bool(const bson_t *b, const char *key, int def);

/*
 * The canonical text of an _id (docs/EVENTS.md): ObjectId -> 24 lowercase hex,
 * string -> itself, int32/int64 -> decimal.  Returns its length, or -1 if the
 * type is unsupported or it does not fit in buflen (NUL included).
 */
int tdr_id_key(const bson_value_t *id, char *buf, size_t buflen);

/* Append an _id value back to a document under key. */
void tdr_bson_append_value(bson_t *b, const char *key, const bson_value_t *v);

/* Same BSON type and value. */
int tdr_bson_value_eq(const bson_value_t *a, const bson_value_t *b);

#endif
