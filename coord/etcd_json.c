/*
 * etcd_json.c - build etcd v3 gateway requests and parse its responses.
 *
 * Everything here treats the response as hostile: a wrong type, an absurd
 * number or a truncated body is an error, never a crash or a guess.  Fields
 * are looked up by name in jansson objects (no indexing into caller memory),
 * decoded lengths are checked before any copy, and every buffer handed back
 * is NUL-terminated.
 */
#include "config.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "coord/etcd_json.h"

/* ---------------------------------------------------------------- base64 */

static const char b64_alphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

size_t tdr_b64_encoded_len(size_t n)
{
	if (n > (SIZE_MAX / 4 - 1) * 3)
		return SIZE_MAX;
	return (n + 2) / 3 * 4;
}

int tdr_b64_encode(const void *in, size_t n, char *out, size_t outcap)
{
	const unsigned char *p = in;
	size_t need = tdr_b64_encoded_len(n), o = 0, i;

	if (out == NULL || need == SIZE_MAX || outcap < need + 1)
		return -1;
	for (i = 0; i + 2 < n; i += 3) {
		uint32_t v = (uint32_t)p[i] << 16 | (uint32_t)p[i + 1] << 8 | p[i + 2];

		out[o++] = b64_alphabet[v >> 18 & 63];
		out[o++] = b64_alphabet[v >> 12 & 63];
		out[o++] = b64_alphabet[v >> 6 & 63];
		out[o++] = b64_alphabet[v & 63];
	}
	if (i < n) {
		uint32_t v = (uint32_t)p[i] << 16 | (i + 1 < n ? (uint32_t)p[i + 1] << 8 : 0);

		out[o++] = b64_alphabet[v >> 18 & 63];
		out[o++] = b64_alphabet[v >> 12 & 63];
		out[o++] = i + 1 < n ? b64_alphabet[v >> 6 & 63] : '=';
		out[o++] = '=';
	}
	out[o] = '\0';
	return 0;
}

static int b64_value(unsigned char c)
{
	if (c >= 'A' && c <= 'Z')
		return c - 'A';
	if (c >= 'a' && c <= 'z')
		return c - 'a' + 26;
	if (c >= '0' && c <= '9')
		return c - '0' + 52;
	if (c == '+')
		return 62;
	if (c == '/')
		return 63;
	return -1;
}

int tdr_b64_decode(const char *in, size_t n, unsigned char *out, size_t outcap, size_t *outlen)
{
	size_t pad = 0, m, need, o = 0, i;

	if (in == NULL && n > 0)
		return -1;
	/* Padding, if any, closes a full quantum and is one or two '='. */
	if (n > 0 && in[n - 1] == '=') {
		pad = (n > 1 && in[n - 2] == '=') ? 2 : 1;
		if (n % 4 != 0)
			return -1;
	}
	m = n - pad;
	if (m % 4 == 1 || (pad == 1 && m % 4 != 3) || (pad == 2 && m % 4 != 2))
		return -1;
	need = m / 4 * 3 + (m % 4 ? m % 4 - 1 : 0);
	if (need > outcap || (need > 0 && out == NULL))
		return -1;
	for (i = 0; i < m; i += 4) {
		size_t k = m - i < 4 ? m - i : 4;
		uint32_t v = 0;

		for (size_t j = 0; j < 4; j++) {
			int d = j < k ? b64_value((unsigned char)in[i + j]) : 0;

			if (d < 0)
				return -1;
			v = v << 6 | (uint32_t)d;
		}
		out[o++] = (unsigned char)(v >> 16);
		if (k > 2)
			out[o++] = (unsigned char)(v >> 8);
		if (k > 3)
			out[o++] = (unsigned char)v;
	}
	if (outlen)
		*outlen = o;
	return 0;
}

/* ----------------------------------------------------------------- int64 */

int tdr_etcd_parse_i64(const char *s, size_t n, int64_t *out)
{
	uint64_t v = 0, limit = INT64_MAX;
	size_t i = 0;
	int neg = 0;

	if (s == NULL || n == 0 || n > 20)
		return -1;
	if (s[0] == '-') {
		neg = 1;
		i = 1;
		limit = (uint64_t)INT64_MAX + 1;
		if (n == 1)
			return -1;
	}
	for (; i < n; i++) {
		unsigned d;

		if (s[i] < '0' || s[i] > '9')
			return -1;
		d = (unsigned)(s[i] - '0');
		if (v > (limit - d) / 10)
			return -1;
		v = v * 10 + d;
	}
	if (neg)
		*out = v == (uint64_t)INT64_MAX + 1 ? INT64_MIN : -(int64_t)v;
	else
		*out = (int64_t)v;
	return 0;
}

/* 0: present and valid; 1: absent (*out = 0, the gateway omits zero values); -1: wrong type or range. */
static int get_i64(const json_t *obj, const char *field, int64_t *out)
{
	const json_t *v = json_object_get(obj, field);

	*out = 0;
	if (v == NULL)
		return 1;
	if (json_is_integer(v)) {
		*out = (int64_t)json_integer_value(v);
		return 0;
	}
	if (json_is_string(v))
		return tdr_etcd_parse_i64(json_string_value(v), json_string_length(v), out);
	return -1;
}

/* 0 with *out set; 1 absent (*out = 0); -1 not a boolean. */
static int get_bool(const json_t *obj, const char *field, int *out)
{
	const json_t *v = json_object_get(obj, field);

	*out = 0;
	if (v == NULL)
		return 1;
	if (!json_is_boolean(v))
		return -1;
	*out = json_is_true(v);
	return 0;
}

/* ------------------------------------------------------------- loading */

static json_t *load(const char *body, size_t len, size_t flags, const char *what, int quiet, tdr_err *err)
{
	json_error_t je;
	json_t *root;

	if (body == NULL || len == 0) {
		tdr_err_set(err, TDR_EFAIL, "etcd %s: empty response", what);
		return NULL;
	}
	if (len > TDR_ETCD_MAX_BODY) {
		tdr_err_set(err, TDR_EFAIL, "etcd %s: response of %zu bytes exceeds %zu", what, len,
			    TDR_ETCD_MAX_BODY);
		return NULL;
	}
	root = json_loadb(body, len, JSON_REJECT_DUPLICATES | flags, &je);
	if (root == NULL) {
		/* jansson quotes the offending token; a credential reply must not be echoed. */
		if (quiet)
			tdr_err_set(err, TDR_EFAIL, "etcd %s: malformed JSON response", what);
		else
			tdr_err_set(err, TDR_EFAIL, "etcd %s: malformed JSON response (%.80s)", what, je.text);
		return NULL;
	}
	if (!json_is_object(root)) {
		json_decref(root);
		tdr_err_set(err, TDR_EFAIL, "etcd %s: response is not a JSON object", what);
		return NULL;
	}
	return root;
}

/* Copy a server-supplied message, replacing anything unprintable so logs stay one clean line. */
static void copy_msg(char *dst, size_t cap, const char *src, size_t n)
{
	size_t o = 0;

	if (cap == 0)
		return;
	for (size_t i = 0; i < n && o + 1 < cap; i++) {
		unsigned char c = (unsigned char)src[i];

		dst[o++] = (c < 0x20 || c == 0x7f) ? '?' : (char)c;
	}
	dst[o] = '\0';
}

int tdr_etcd_parse_error(const char *body, size_t len, int *grpc_code, char *msg, size_t msgcap)
{
	json_t *root, *e, *m = NULL;
	int64_t code = -1;
	int is_error = 0;

	if (msg && msgcap)
		msg[0] = '\0';
	if (grpc_code)
		*grpc_code = -1;
	if (body == NULL || len == 0 || len > TDR_ETCD_MAX_BODY)
		return -1;
	/* A streamed error may be followed by more stream messages: read the first value only. */
	root = json_loadb(body, len, JSON_DISABLE_EOF_CHECK, NULL);
	if (root == NULL)
		return -1;
	if (!json_is_object(root)) {
		json_decref(root);
		return -1;
	}
	e = json_object_get(root, "error");
	if (json_is_string(e)) {
		/* {"error": "...", "message": "...", "code": N} */
		is_error = 1;
		m = json_object_get(root, "message");
		if (!json_is_string(m) || json_string_length(m) == 0)
			m = e;
		if (get_i64(root, "code", &code) != 0)
			code = -1;
	} else if (json_is_object(e)) {
		/* stream: {"error": {"grpc_code": N, "http_code": N, "message": "..."}} */
		is_error = 1;
		m = json_object_get(e, "message");
		if (get_i64(e, "grpc_code", &code) != 0 && get_i64(e, "code", &code) != 0)
			code = -1;
	}
	if (is_error) {
		if (grpc_code)
			*grpc_code = (code >= 0 && code <= 64) ? (int)code : -1;
		if (msg && msgcap && json_is_string(m))
			copy_msg(msg, msgcap, json_string_value(m), json_string_length(m));
	}
	json_decref(root);
	return is_error ? 0 : -1;
}

int tdr_etcd_grpc_transient(int grpc_code)
{
	switch (grpc_code) {
	case TDR_GRPC_CANCELLED:
	case TDR_GRPC_DEADLINE_EXCEEDED:
	case TDR_GRPC_RESOURCE_EXHAUSTED:
	case TDR_GRPC_ABORTED:
	case TDR_GRPC_UNAVAILABLE:
		return 1;
	default:
		return 0;
	}
}

/* header.revision: required, > 0 (etcd's first revision is 1). */
static int header_revision(const json_t *root, const char *what, int64_t *rev, tdr_err *err)
{
	const json_t *h = json_object_get(root, "header");

	if (!json_is_object(h))
		return tdr_err_set(err, TDR_EFAIL, "etcd %s: response has no header", what);
	if (get_i64(h, "revision", rev) != 0 || *rev <= 0)
		return tdr_err_set(err, TDR_EFAIL, "etcd %s: missing or invalid header.revision", what);
	return 0;
}

int tdr_etcd_parse_revision(const char *body, size_t len, int64_t *revision, tdr_err *err)
{
	json_t *root = load(body, len, 0, "response", 0, err);
	int64_t rev;
	int rc;

	if (root == NULL)
		return TDR_EFAIL;
	rc = header_revision(root, "response", &rev, err);
	json_decref(root);
	if (rc == 0)
		*revision = rev;
	return rc;
}

/* ----------------------------------------------------------------- kvs */

void tdr_etcd_kv_clear(tdr_etcd_kv *kv)
{
	if (kv == NULL)
		return;
	free(kv->key);
	free(kv->value);
	memset(kv, 0, sizeof(*kv));
}

void tdr_etcd_kvs_free(tdr_etcd_kv *kvs, size_t n)
{
	if (kvs == NULL)
		return;
	for (size_t i = 0; i < n; i++)
		tdr_etcd_kv_clear(&kvs[i]);
	free(kvs);
}

/*
 * Decode a base64 field into a fresh NUL-terminated buffer of at most max
 * bytes.  Absent (the gateway omits empty bytes) gives "" unless required.
 */
static int get_bytes(const json_t *obj, const char *field, size_t max, int required, char **out, size_t *outlen)
{
	const json_t *v = json_object_get(obj, field);
	const char *s = "";
	size_t n = 0, cap, got = 0;
	char *buf;

	if (v == NULL) {
		if (required)
			return -1;
	} else {
		if (!json_is_string(v))
			return -1;
		s = json_string_value(v);
		n = json_string_length(v);
	}
	if (n > tdr_b64_encoded_len(max))
		return -1;
	cap = n / 4 * 3 + 3; /* >= decoded length for any valid input */
	buf = malloc(cap + 1);
	if (buf == NULL)
		return -2;
	if (tdr_b64_decode(s, n, (unsigned char *)buf, cap, &got) < 0 || got > max || (required && got == 0)) {
		free(buf);
		return -1;
	}
	buf[got] = '\0';
	*out = buf;
	*outlen = got;
	return 0;
}

static int parse_kv(const json_t *o, tdr_etcd_kv *kv, const char *what, tdr_err *err)
{
	int r;

	memset(kv, 0, sizeof(*kv));
	if (!json_is_object(o))
		return tdr_err_set(err, TDR_EFAIL, "etcd %s: kv is not an object", what);
	r = get_bytes(o, "key", TDR_ETCD_MAX_KEY, 1, &kv->key, &kv->key_len);
	if (r == -2)
		return tdr_err_set(err, TDR_ENOMEM, "out of memory");
	if (r < 0)
		return tdr_err_set(err, TDR_EFAIL, "etcd %s: kv has a missing, invalid or oversized key", what);
	r = get_bytes(o, "value", TDR_ETCD_MAX_VALUE, 0, &kv->value, &kv->value_len);
	if (r == -2) {
		tdr_etcd_kv_clear(kv);
		return tdr_err_set(err, TDR_ENOMEM, "out of memory");
	}
	if (r < 0) {
		tdr_etcd_kv_clear(kv);
		return tdr_err_set(err, TDR_EFAIL, "etcd %s: kv has an invalid or oversized value", what);
	}
	if (get_i64(o, "create_revision", &kv->create_revision) != 0 || kv->create_revision <= 0 ||
	    get_i64(o, "mod_revision", &kv->mod_revision) != 0 || kv->mod_revision < kv->create_revision ||
	    get_i64(o, "version", &kv->version) < 0 || kv->version < 0 || get_i64(o, "lease", &kv->lease) < 0 ||
	    kv->lease < 0) {
		tdr_etcd_kv_clear(kv);
		return tdr_err_set(err, TDR_EFAIL, "etcd %s: kv has missing or invalid revisions or lease", what);
	}
	return 0;
}

/* --------------------------------------------------------------- leases */

int tdr_etcd_parse_grant(const char *body, size_t len, int64_t *id, int64_t *ttl, tdr_err *err)
{
	json_t *root = load(body, len, 0, "lease grant", 0, err);
	const json_t *e;
	int64_t i, t;
	int rc = 0;

	if (root == NULL)
		return TDR_EFAIL;
	e = json_object_get(root, "error");
	if (e != NULL && (!json_is_string(e) || json_string_length(e) > 0)) {
		char m[200] = "";

		if (json_is_string(e))
			copy_msg(m, sizeof(m), json_string_value(e), json_string_length(e));
		rc = tdr_err_set(err, TDR_EFAIL, "etcd lease grant: %s", m[0] ? m : "error");
	} else if (get_i64(root, "ID", &i) != 0 || i <= 0) {
		rc = tdr_err_set(err, TDR_EFAIL, "etcd lease grant: missing or invalid ID");
	} else if (get_i64(root, "TTL", &t) != 0 || t <= 0) {
		rc = tdr_err_set(err, TDR_EFAIL, "etcd lease grant: missing or invalid TTL");
	} else {
		*id = i;
		*ttl = t;
	}
	json_decref(root);
	return rc;
}

int tdr_etcd_parse_keepalive(const char *body, size_t len, int64_t *id, int64_t *ttl, tdr_err *err)
{
	/* The gateway streams one JSON object per message: the first is ours. */
	json_t *root = load(body, len, JSON_DISABLE_EOF_CHECK, "lease keepalive", 0, err);
	const json_t *r;
	int64_t i = 0, t = 0;
	int rc = 0;

	if (root == NULL)
		return TDR_EFAIL;
	r = json_object_get(root, "result");
	if (json_object_get(root, "error") != NULL) {
		char m[200] = "";
		int code;

		(void)tdr_etcd_parse_error(body, len, &code, m, sizeof(m));
		rc = tdr_err_set(err, TDR_EFAIL, "etcd lease keepalive: %s", m[0] ? m : "error");
	} else if (r != NULL) {
		if (!json_is_object(r) || get_i64(r, "ID", &i) < 0 || i < 0 || get_i64(r, "TTL", &t) < 0)
			rc = tdr_err_set(err, TDR_EFAIL, "etcd lease keepalive: malformed result");
	}
	json_decref(root);
	if (rc == 0) {
		*id = i;
		*ttl = t > 0 ? t : 0;
	}
	return rc;
}

int tdr_etcd_parse_timetolive(const char *body, size_t len, int64_t *ttl, int64_t *granted, tdr_err *err)
{
	json_t *root = load(body, len, 0, "lease timetolive", 0, err);
	int64_t t, g;
	int rc = 0;

	if (root == NULL)
		return TDR_EFAIL;
	if (get_i64(root, "TTL", &t) < 0 || t < -1 || get_i64(root, "grantedTTL", &g) < 0 || g < 0)
		rc = tdr_err_set(err, TDR_EFAIL, "etcd lease timetolive: invalid TTL");
	json_decref(root);
	if (rc == 0) {
		*ttl = t;
		*granted = g;
	}
	return rc;
}

/* ------------------------------------------------------------- kv reads */

int tdr_etcd_parse_txn(const char *body, size_t len, int *succeeded, int64_t *revision, tdr_etcd_kv *first_kv,
		       tdr_err *err)
{
	json_t *root = load(body, len, 0, "txn", 0, err);
	const json_t *resps;
	int64_t rev = 0;
	int s = 0, rc;
	tdr_etcd_kv kv;

	memset(&kv, 0, sizeof(kv));
	if (root == NULL)
		return TDR_EFAIL;
	rc = header_revision(root, "txn", &rev, err);
	if (rc == 0 && get_bool(root, "succeeded", &s) < 0)
		rc = tdr_err_set(err, TDR_EFAIL, "etcd txn: \"succeeded\" is not a boolean");
	resps = json_object_get(root, "responses");
	if (rc == 0 && resps != NULL && !json_is_array(resps))
		rc = tdr_err_set(err, TDR_EFAIL, "etcd txn: \"responses\" is not an array");
	if (rc == 0 && first_kv != NULL && resps != NULL) {
		for (size_t i = 0; i < json_array_size(resps); i++) {
			const json_t *r = json_array_get(resps, i), *rr, *kvs;

			if (!json_is_object(r)) {
				rc = tdr_err_set(err, TDR_EFAIL, "etcd txn: response is not an object");
				break;
			}
			rr = json_object_get(r, "response_range");
			if (rr == NULL)
				continue;
			if (!json_is_object(rr)) {
				rc = tdr_err_set(err, TDR_EFAIL, "etcd txn: response_range is not an object");
				break;
			}
			kvs = json_object_get(rr, "kvs");
			if (kvs != NULL && !json_is_array(kvs)) {
				rc = tdr_err_set(err, TDR_EFAIL, "etcd txn: kvs is not an array");
				break;
			}
			if (json_array_size(kvs) > 0)
				rc = parse_kv(json_array_get(kvs, 0), &kv, "txn", err);
			break;
		}
	}
	json_decref(root);
	if (rc < 0) {
		tdr_etcd_kv_clear(&kv);
		return rc;
	}
	*succeeded = s;
	*revision = rev;
	if (first_kv)
		*first_kv = kv;
	return 0;
}

int tdr_etcd_parse_range(const char *body, size_t len, tdr_etcd_kv **kvs, size_t *n, int *more, tdr_err *err)
{
	json_t *root = load(body, len, 0, "range", 0, err);
	const json_t *a;
	tdr_etcd_kv *v = NULL;
	size_t cnt = 0, i;
	int64_t rev;
	int m = 0, rc;

	if (root == NULL)
		return TDR_EFAIL;
	rc = header_revision(root, "range", &rev, err);
	a = json_object_get(root, "kvs");
	if (rc == 0 && get_bool(root, "more", &m) < 0)
		rc = tdr_err_set(err, TDR_EFAIL, "etcd range: \"more\" is not a boolean");
	else if (rc == 0 && a != NULL && !json_is_array(a))
		rc = tdr_err_set(err, TDR_EFAIL, "etcd range: kvs is not an array");
	else if (rc == 0 && json_array_size(a) > TDR_ETCD_MAX_KVS)
		rc = tdr_err_set(err, TDR_EFAIL, "etcd range: more than %d kvs", TDR_ETCD_MAX_KVS);
	if (rc == 0 && json_array_size(a) > 0) {
		cnt = json_array_size(a);
		v = calloc(cnt, sizeof(*v));
		if (v == NULL)
			rc = tdr_err_set(err, TDR_ENOMEM, "out of memory");
		for (i = 0; rc == 0 && i < cnt; i++)
			rc = parse_kv(json_array_get(a, i), &v[i], "range", err);
	}
	json_decref(root);
	if (rc < 0) {
		tdr_etcd_kvs_free(v, cnt);
		return rc;
	}
	*kvs = v;
	*n = cnt;
	if (more)
		*more = m;
	return 0;
}

/* ---------------------------------------------------------------- auth */

int tdr_etcd_parse_auth(const char *body, size_t len, char *token, size_t tokcap, tdr_err *err)
{
	json_t *root = load(body, len, 0, "authenticate", 1, err);
	const json_t *t;
	const char *s;
	size_t n;
	int rc = 0;

	if (root == NULL)
		return TDR_EFAIL;
	t = json_object_get(root, "token");
	if (!json_is_string(t)) {
		rc = tdr_err_set(err, TDR_EFAIL, "etcd authenticate: response has no token");
	} else {
		s = json_string_value(t);
		n = json_string_length(t);
		if (n == 0 || n >= tokcap || n > TDR_ETCD_MAX_TOKEN)
			rc = tdr_err_set(err, TDR_EFAIL, "etcd authenticate: token empty or too long");
		for (size_t i = 0; rc == 0 && i < n; i++)
			if (s[i] < 0x21 || s[i] > 0x7e) /* it becomes an HTTP header: no CR/LF, no spaces */
				rc = tdr_err_set(err, TDR_EFAIL, "etcd authenticate: token has invalid characters");
		if (rc == 0) {
			memcpy(token, s, n);
			token[n] = '\0';
		}
	}
	json_decref(root);
	return rc;
}

int tdr_etcd_parse_lease_value(const char *value, size_t len, char *holder, size_t holdercap, char *inst,
			       size_t instcap, int64_t *ttl_ms, tdr_err *err)
{
	json_t *root;
	const json_t *h, *in;
	int64_t t;
	int rc = 0;

	if (holder == NULL || holdercap == 0 || (inst != NULL && instcap == 0))
		return tdr_err_set(err, TDR_EFAIL, "etcd lease value: no room for the result");
	root = load(value, len, 0, "lease value", 0, err);
	if (root == NULL)
		return TDR_EFAIL;
	h = json_object_get(root, "holder");
	in = json_object_get(root, "inst");
	if (!json_is_string(h) || json_string_length(h) == 0 || json_string_length(h) >= holdercap) {
		rc = tdr_err_set(err, TDR_EFAIL, "etcd lease value: missing, empty or oversized holder");
	} else if (in != NULL && (!json_is_string(in) || (inst && json_string_length(in) >= instcap))) {
		rc = tdr_err_set(err, TDR_EFAIL, "etcd lease value: invalid inst");
	} else if (get_i64(root, "ttl_ms", &t) < 0 || t < 0) {
		rc = tdr_err_set(err, TDR_EFAIL, "etcd lease value: invalid ttl_ms");
	} else {
		const char *s = json_string_value(h);

		for (size_t i = 0; rc == 0 && i < json_string_length(h); i++)
			if ((unsigned char)s[i] < 0x20 || s[i] == 0x7f)
				rc = tdr_err_set(err, TDR_EFAIL, "etcd lease value: holder has control characters");
		if (rc == 0) {
			memcpy(holder, s, json_string_length(h) + 1);
			if (inst) {
				if (in != NULL)
					memcpy(inst, json_string_value(in), json_string_length(in) + 1);
				else
					inst[0] = '\0';
			}
			*ttl_ms = t;
		}
	}
	json_decref(root);
	return rc;
}

/* ------------------------------------------------------------- requests */

/* Serialise and free root; NULL (with err) if either step failed. */
static char *dump(json_t *root, tdr_err *err)
{
	char *s;

	if (root == NULL) {
		tdr_err_set(err, TDR_EFAIL, "etcd request: cannot build JSON (invalid UTF-8 or out of memory)");
		return NULL;
	}
	s = json_dumps(root, JSON_COMPACT);
	json_decref(root);
	if (s == NULL)
		tdr_err_set(err, TDR_ENOMEM, "etcd request: out of memory");
	return s;
}

/* base64 of a key in a fresh buffer; NULL if too long or no memory. */
static char *b64_dup(const char *p, size_t n, size_t max, tdr_err *err)
{
	size_t need;
	char *s;

	if (n > max) {
		tdr_err_set(err, TDR_EFAIL, "etcd request: %zu bytes exceed the limit of %zu", n, max);
		return NULL;
	}
	need = tdr_b64_encoded_len(n) + 1;
	s = malloc(need);
	if (s == NULL) {
		tdr_err_set(err, TDR_ENOMEM, "out of memory");
		return NULL;
	}
	(void)tdr_b64_encode(p, n, s, need);
	return s;
}

static void i64_str(char buf[24], int64_t v)
{
	snprintf(buf, 24, "%" PRId64, v);
}

char *tdr_etcd_req_grant(int64_t ttl_s, tdr_err *err)
{
	char t[24];

	if (ttl_s <= 0) {
		tdr_err_set(err, TDR_EFAIL, "etcd lease grant: TTL must be positive");
		return NULL;
	}
	i64_str(t, ttl_s);
	return dump(json_pack("{s:s}", "TTL", t), err);
}

char *tdr_etcd_req_lease_id(int64_t id, tdr_err *err)
{
	char t[24];

	i64_str(t, id);
	return dump(json_pack("{s:s}", "ID", t), err);
}

char *tdr_etcd_req_range(const char *key, size_t key_len, const char *range_end, size_t range_end_len,
			 int64_t limit, tdr_err *err)
{
	char *k = NULL, *e = NULL, *s = NULL, l[24];
	json_t *root;

	if ((k = b64_dup(key, key_len, TDR_ETCD_MAX_KEY, err)) == NULL)
		return NULL;
	if (range_end && (e = b64_dup(range_end, range_end_len, TDR_ETCD_MAX_KEY, err)) == NULL)
		goto out;
	root = json_pack("{s:s}", "key", k);
	if (root && e && json_object_set_new(root, "range_end", json_string(e)) < 0)
		json_decref(root), root = NULL;
	if (root && limit > 0) {
		i64_str(l, limit);
		if (json_object_set_new(root, "limit", json_string(l)) < 0)
			json_decref(root), root = NULL;
	}
	s = dump(root, err);
out:
	free(k);
	free(e);
	return s;
}

/*
 * One key's create txn: put (key, value under lease) if the key does not
 * exist.  k and v are base64 already; with_failure adds a range of the key to
 * the failure branch (who holds it), which nested txns do without: a lost
 * race is told by "succeeded" alone.
 */
static json_t *create_txn_json(const char *k, const char *v, int64_t lease, int with_failure)
{
	char l[24];
	json_t *root;

	i64_str(l, lease);
	root = json_pack("{s:[{s:s,s:s,s:s,s:s}],s:[{s:{s:s,s:s,s:s}}]}",
			 "compare", "key", k, "target", "CREATE", "result", "EQUAL", "create_revision", "0",
			 "success", "request_put", "key", k, "value", v, "lease", l);
	if (root && with_failure &&
	    json_object_set_new(root, "failure", json_pack("[{s:{s:s}}]", "request_range", "key", k)) < 0)
		json_decref(root), root = NULL;
	return root;
}

/* One key's delete txn: delete it if it is still the incarnation create_rev (and, if lease != 0, ours). */
static json_t *delete_txn_json(const char *k, int64_t create_rev, int64_t lease)
{
	char c[24], l[24];
	json_t *root, *cmp;

	i64_str(c, create_rev);
	i64_str(l, lease);
	root = json_pack("{s:[{s:s,s:s,s:s,s:s}],s:[{s:{s:s}}]}",
			 "compare", "key", k, "target", "CREATE", "result", "EQUAL", "create_revision", c,
			 "success", "request_delete_range", "key", k);
	if (root && lease != 0) {
		/* Also our lease: a create_revision alone could be guessed by a non-holder. */
		cmp = json_pack("{s:s,s:s,s:s,s:s}", "key", k, "target", "LEASE", "result", "EQUAL", "lease", l);
		if (cmp == NULL || json_array_append_new(json_object_get(root, "compare"), cmp) < 0)
			json_decref(root), root = NULL;
	}
	return root;
}

char *tdr_etcd_req_create_txn(const char *key, const char *value, int64_t lease, tdr_err *err)
{
	char *k, *v, *s = NULL;

	if ((k = b64_dup(key, strlen(key), TDR_ETCD_MAX_KEY, err)) == NULL)
		return NULL;
	if ((v = b64_dup(value, strlen(value), TDR_ETCD_MAX_VALUE, err)) != NULL) {
		s = dump(create_txn_json(k, v, lease, 1), err);
		free(v);
	}
	free(k);
	return s;
}

char *tdr_etcd_req_delete_txn(const char *key, int64_t create_rev, int64_t lease, tdr_err *err)
{
	char *k, *s;

	if ((k = b64_dup(key, strlen(key), TDR_ETCD_MAX_KEY, err)) == NULL)
		return NULL;
	s = dump(delete_txn_json(k, create_rev, lease), err);
	free(k);
	return s;
}

/* What a bulk txn's i-th nested txn is built from. */
struct many_args {
	const char *const *keys;
	const char *value_b64;		/* create: the one value every key gets */
	const int64_t *create_revs;	/* delete: each key's incarnation */
	int64_t lease;
};

/*
 * {"success": [{"request_txn": <one-key txn>}, ...]}: each nested txn
 * succeeds or fails on its own.  Built straight into one JSON tree; NULL
 * (with err) on a bad key, a bad count or no memory.
 */
static char *many_txn(const struct many_args *a, size_t n, tdr_err *err)
{
	json_t *root, *ops;

	if (n == 0 || n > TDR_ETCD_TXN_MAX) {
		tdr_err_set(err, TDR_EFAIL, "etcd bulk txn: %zu keys (1 to %d)", n, TDR_ETCD_TXN_MAX);
		return NULL;
	}
	root = json_object();
	ops = json_array();
	/* jansson's *_new and "o" steal their reference even when they fail. */
	if (root == NULL || ops == NULL) {
		json_decref(root);
		json_decref(ops);
		return dump(NULL, err);
	}
	if (json_object_set_new(root, "success", ops) < 0) {
		json_decref(root);
		return dump(NULL, err);
	}
	for (size_t i = 0; i < n; i++) {
		char *k = b64_dup(a->keys[i], strlen(a->keys[i]), TDR_ETCD_MAX_KEY, err);
		json_t *t, *op;

		if (k == NULL) {
			json_decref(root);
			return NULL;
		}
		t = a->value_b64 ? create_txn_json(k, a->value_b64, a->lease, 0)
				 : delete_txn_json(k, a->create_revs[i], a->lease);
		free(k);
		op = t ? json_pack("{s:o}", "request_txn", t) : NULL;
		if (op == NULL || json_array_append_new(ops, op) < 0) {
			json_decref(root);
			return dump(NULL, err);
		}
	}
	return dump(root, err);
}

char *tdr_etcd_req_create_many_txn(const char *const *keys, const char *value, size_t n, int64_t lease,
				   tdr_err *err)
{
	struct many_args a = { .keys = keys, .lease = lease };
	char *v, *s;

	if ((v = b64_dup(value, strlen(value), TDR_ETCD_MAX_VALUE, err)) == NULL)
		return NULL;
	a.value_b64 = v;
	s = many_txn(&a, n, err);
	free(v);
	return s;
}

char *tdr_etcd_req_delete_many_txn(const char *const *keys, const int64_t *create_revs, size_t n, int64_t lease,
				   tdr_err *err)
{
	struct many_args a = { .keys = keys, .create_revs = create_revs, .lease = lease };

	return many_txn(&a, n, err);
}

int tdr_etcd_parse_txn_many(const char *body, size_t len, size_t n, int *succeeded, int64_t *revision, tdr_err *err)
{
	json_t *root = load(body, len, 0, "bulk txn", 0, err);
	const json_t *resps;
	int64_t rev = 0;
	int s = 0, rc;

	if (root == NULL)
		return TDR_EFAIL;
	rc = header_revision(root, "bulk txn", &rev, err);
	if (rc == 0 && get_bool(root, "succeeded", &s) < 0)
		rc = tdr_err_set(err, TDR_EFAIL, "etcd bulk txn: \"succeeded\" is not a boolean");
	resps = json_object_get(root, "responses");
	/* The outer txn has no compare, so it always succeeds with one response per nested txn. */
	if (rc == 0 && (!s || !json_is_array(resps) || json_array_size(resps) != n))
		rc = tdr_err_set(err, TDR_EFAIL, "etcd bulk txn: expected %zu nested responses", n);
	for (size_t i = 0; rc == 0 && i < n; i++) {
		const json_t *r = json_array_get(resps, i), *t = json_is_object(r) ? json_object_get(r, "response_txn")
										    : NULL;
		int ok = 0;

		if (!json_is_object(t) || get_bool(t, "succeeded", &ok) < 0)
			rc = tdr_err_set(err, TDR_EFAIL, "etcd bulk txn: nested response %zu is not a txn response", i);
		else
			succeeded[i] = ok;
	}
	json_decref(root);
	if (rc < 0)
		return rc;
	*revision = rev;
	return 0;
}

char *tdr_etcd_req_auth(const char *user, const char *password, tdr_err *err)
{
	return dump(json_pack("{s:s,s:s}", "name", user, "password", password), err);
}

char *tdr_etcd_lease_value(const char *holder, const char *inst, int64_t ttl_ms, tdr_err *err)
{
	return dump(json_pack("{s:s,s:s,s:I}", "holder", holder, "inst", inst ? inst : "", "ttl_ms",
			      (json_int_t)ttl_ms),
		    err);
}

int tdr_etcd_prefix_end(const char *prefix, size_t n, char *out, size_t outcap, size_t *outlen)
{
	size_t i = n;

	while (i > 0 && (unsigned char)prefix[i - 1] == 0xff)
		i--;
	if (i == 0) {
		/* Every byte is 0xff (or none): the range runs to the end of the keyspace. */
		if (outcap < 1)
			return -1;
		out[0] = '\0';
		*outlen = 1;
		return 0;
	}
	if (outcap < i)
		return -1;
	memcpy(out, prefix, i);
	out[i - 1] = (char)((unsigned char)out[i - 1] + 1);
	*outlen = i;
	return 0;
}
