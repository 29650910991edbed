/*
 * test_etcd_json.c - the etcd gateway codec against real and hostile bodies.
 *
 * The "good" samples are copied from etcd 3.4.23's gateway (curl against a
 * local etcd), so a format drift shows up here first.
 */
#include "config.h"

#include <inttypes.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "coord/etcd_json.h"
#include "tests/unit/tap.h"

#define S(lit) (lit), (sizeof(lit) - 1)

static const char hdr[] =
    "\"header\":{\"cluster_id\":\"15118495548433857066\",\"member_id\":\"13668033151171901709\","
    "\"revision\":\"7\",\"raft_term\":\"2\"}";

static char *dupf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

static char *dupf(const char *fmt, ...)
{
	va_list ap;
	char *s;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(NULL, 0, fmt, ap);
	va_end(ap);
	if (n < 0 || (s = malloc((size_t)n + 1)) == NULL)
		return NULL;
	va_start(ap, fmt);
	vsnprintf(s, (size_t)n + 1, fmt, ap);
	va_end(ap);
	return s;
}

static void test_base64(void)
{
	static const struct {
		const char *in, *out;
	} v[] = { { "", "" },         { "f", "Zg==" },         { "fo", "Zm8=" },
		  { "foo", "Zm9v" }, { "foob", "Zm9vYg==" }, { "fooba", "Zm9vYmE=" },
		  { "foobar", "Zm9vYmFy" } };
	unsigned char all[256], back[300];
	char enc[400], small[5];
	size_t n, i;
	int good = 1;

	for (i = 0; i < sizeof(v) / sizeof(v[0]); i++) {
		unsigned char d[16];

		if (tdr_b64_encode(v[i].in, strlen(v[i].in), enc, sizeof(enc)) < 0 || strcmp(enc, v[i].out) != 0)
			good = 0;
		if (tdr_b64_decode(v[i].out, strlen(v[i].out), d, sizeof(d), &n) < 0 || n != strlen(v[i].in) ||
		    memcmp(d, v[i].in, n) != 0)
			good = 0;
	}
	ok(good, "base64: RFC 4648 test vectors encode and decode");
	for (i = 0; i < 256; i++)
		all[i] = (unsigned char)i;
	ok(tdr_b64_encode(all, 256, enc, sizeof(enc)) == 0 && tdr_b64_decode(enc, strlen(enc), back, 256, &n) == 0 &&
		   n == 256 && memcmp(all, back, 256) == 0,
	   "base64: every byte value round-trips");
	ok(tdr_b64_decode("Zm8", 3, back, sizeof(back), &n) == 0 && n == 2 && memcmp(back, "fo", 2) == 0,
	   "base64: missing padding is accepted");
	ok(tdr_b64_decode("Zg=", 3, back, sizeof(back), &n) < 0, "base64: truncated padding rejected");
	ok(tdr_b64_decode("Z", 1, back, sizeof(back), &n) < 0, "base64: impossible length rejected");
	ok(tdr_b64_decode("Zg==Zg==", 8, back, sizeof(back), &n) < 0, "base64: padding in the middle rejected");
	ok(tdr_b64_decode("====", 4, back, sizeof(back), &n) < 0, "base64: padding only rejected");
	ok(tdr_b64_decode("Zm9v=", 5, back, sizeof(back), &n) < 0, "base64: excess padding rejected");
	ok(tdr_b64_decode("Zm9v\n", 5, back, sizeof(back), &n) < 0 && tdr_b64_decode("Zm-v", 4, back, 10, &n) < 0 &&
		   tdr_b64_decode("Zm\0v", 4, back, 10, &n) < 0,
	   "base64: newline, URL alphabet and NUL rejected");
	ok(tdr_b64_decode("Zm9vYmFy", 8, back, 5, &n) < 0, "base64: output that would overflow is refused");
	ok(tdr_b64_encode("foob", 4, small, sizeof(small)) < 0 && tdr_b64_encode("foo", 3, small, sizeof(small)) == 0,
	   "base64: encode refuses a short buffer, fits an exact one");
	ok(tdr_b64_encoded_len(SIZE_MAX) == SIZE_MAX, "base64: absurd lengths do not overflow");
}

static void test_i64(void)
{
	int64_t v;

	ok(tdr_etcd_parse_i64(S("0"), &v) == 0 && v == 0, "i64: 0");
	ok(tdr_etcd_parse_i64(S("-1"), &v) == 0 && v == -1, "i64: -1");
	ok(tdr_etcd_parse_i64(S("9223372036854775807"), &v) == 0 && v == INT64_MAX, "i64: INT64_MAX");
	ok(tdr_etcd_parse_i64(S("-9223372036854775808"), &v) == 0 && v == INT64_MIN, "i64: INT64_MIN");
	ok(tdr_etcd_parse_i64(S("9223372036854775808"), &v) < 0, "i64: INT64_MAX + 1 rejected");
	ok(tdr_etcd_parse_i64(S("-9223372036854775809"), &v) < 0, "i64: INT64_MIN - 1 rejected");
	ok(tdr_etcd_parse_i64(S("18446744073709551616"), &v) < 0, "i64: 2^64 rejected");
	ok(tdr_etcd_parse_i64(S("000000000000000000001"), &v) < 0, "i64: more than 20 characters rejected");
	ok(tdr_etcd_parse_i64(S(""), &v) < 0 && tdr_etcd_parse_i64(S("-"), &v) < 0, "i64: empty and lone sign rejected");
	ok(tdr_etcd_parse_i64(S("+1"), &v) < 0 && tdr_etcd_parse_i64(S(" 1"), &v) < 0 &&
		   tdr_etcd_parse_i64(S("1 "), &v) < 0 && tdr_etcd_parse_i64(S("0x10"), &v) < 0 &&
		   tdr_etcd_parse_i64(S("1e3"), &v) < 0 && tdr_etcd_parse_i64(S("1.0"), &v) < 0,
	   "i64: sign, spaces, hex, exponent, fraction rejected");
}

static void test_grant(void)
{
	tdr_err err;
	int64_t id = 0, ttl = 0;
	char *b;

	b = dupf("{%s,\"ID\":\"4111120158370626309\",\"TTL\":\"2\"}", hdr);
	ok(b && tdr_etcd_parse_grant(b, strlen(b), &id, &ttl, &err) == 0 && id == 4111120158370626309LL && ttl == 2,
	   "grant: real response, int64 as strings");
	free(b);
	ok(tdr_etcd_parse_grant(S("{\"ID\":7,\"TTL\":3}"), &id, &ttl, &err) == 0 && id == 7 && ttl == 3,
	   "grant: int64 as JSON numbers accepted");
	id = 99;
	ok(tdr_etcd_parse_grant(S("{\"TTL\":\"2\"}"), &id, &ttl, &err) == TDR_EFAIL && id == 99,
	   "grant: missing ID is an error and outputs are untouched");
	ok(tdr_etcd_parse_grant(S("{\"ID\":\"abc\",\"TTL\":\"2\"}"), &id, &ttl, &err) == TDR_EFAIL,
	   "grant: non-numeric ID string rejected");
	ok(tdr_etcd_parse_grant(S("{\"ID\":\"5\",\"TTL\":\"0\"}"), &id, &ttl, &err) == TDR_EFAIL,
	   "grant: TTL 0 rejected");
	ok(tdr_etcd_parse_grant(S("{\"ID\":\"-5\",\"TTL\":\"2\"}"), &id, &ttl, &err) == TDR_EFAIL,
	   "grant: negative ID rejected");
	ok(tdr_etcd_parse_grant(S("{\"ID\":1.5,\"TTL\":\"2\"}"), &id, &ttl, &err) == TDR_EFAIL &&
		   tdr_etcd_parse_grant(S("{\"ID\":true,\"TTL\":\"2\"}"), &id, &ttl, &err) == TDR_EFAIL &&
		   tdr_etcd_parse_grant(S("{\"ID\":[1],\"TTL\":\"2\"}"), &id, &ttl, &err) == TDR_EFAIL &&
		   tdr_etcd_parse_grant(S("{\"ID\":null,\"TTL\":\"2\"}"), &id, &ttl, &err) == TDR_EFAIL,
	   "grant: ID of the wrong type (real, bool, array, null) rejected");
	ok(tdr_etcd_parse_grant(S("{\"ID\":\"99999999999999999999\",\"TTL\":\"2\"}"), &id, &ttl, &err) == TDR_EFAIL,
	   "grant: ID beyond int64 (as string) rejected");
	ok(tdr_etcd_parse_grant(S("{\"ID\":99999999999999999999,\"TTL\":\"2\"}"), &id, &ttl, &err) == TDR_EFAIL,
	   "grant: ID beyond int64 (as number) rejected");
	ok(tdr_etcd_parse_grant(S("{\"ID\":1e400,\"TTL\":\"2\"}"), &id, &ttl, &err) == TDR_EFAIL,
	   "grant: huge real rejected");
	ok(tdr_etcd_parse_grant(S("{\"ID\":\"5\",\"TTL\":\"2\",\"error\":\"lessor: no space\"}"), &id, &ttl, &err) ==
			   TDR_EFAIL &&
		   strstr(err.msg, "no space") != NULL,
	   "grant: a non-empty error field fails with its message");
	ok(tdr_etcd_parse_grant(S("[1,2]"), &id, &ttl, &err) == TDR_EFAIL, "grant: array body rejected");
	ok(tdr_etcd_parse_grant(S("{\"ID\":\"5\",\"TT"), &id, &ttl, &err) == TDR_EFAIL, "grant: truncated body rejected");
	ok(tdr_etcd_parse_grant("", 0, &id, &ttl, &err) == TDR_EFAIL && tdr_etcd_parse_grant(NULL, 5, &id, &ttl, &err) ==
										 TDR_EFAIL,
	   "grant: empty and NULL body rejected");
	ok(tdr_etcd_parse_grant(S("{\"ID\":\"5\",\"ID\":\"6\",\"TTL\":\"2\"}"), &id, &ttl, &err) == TDR_EFAIL,
	   "grant: duplicate keys rejected");
	/* Not NUL-terminated: the parser must stop at len. */
	{
		char buf[32];

		memcpy(buf, "{\"ID\":\"5\",\"TTL\":\"2\"}XXXXXXXXXXX", 32);
		ok(tdr_etcd_parse_grant(buf, 20, &id, &ttl, &err) == 0 && id == 5 && ttl == 2,
		   "grant: body without NUL parsed within len");
	}
}

static void test_keepalive(void)
{
	tdr_err err;
	int64_t id = -1, ttl = -1;
	int code;
	char msg[64];
	char *b;

	b = dupf("{\"result\":{%s,\"ID\":\"4111120158370626313\",\"TTL\":\"5\"}}\n", hdr);
	ok(b && tdr_etcd_parse_keepalive(b, strlen(b), &id, &ttl, &err) == 0 && id == 4111120158370626313LL &&
		   ttl == 5,
	   "keepalive: real response with trailing newline");
	free(b);
	b = dupf("{\"result\":{%s,\"ID\":\"4111120158370626313\"}}\n", hdr);
	ok(b && tdr_etcd_parse_keepalive(b, strlen(b), &id, &ttl, &err) == 0 && ttl == 0,
	   "keepalive: TTL absent (lease gone) gives 0");
	free(b);
	ok(tdr_etcd_parse_keepalive(S("{\"result\":{\"ID\":\"1\",\"TTL\":\"0\"}}"), &id, &ttl, &err) == 0 && ttl == 0,
	   "keepalive: TTL \"0\" gives 0");
	ok(tdr_etcd_parse_keepalive(S("{}"), &id, &ttl, &err) == 0 && ttl == 0, "keepalive: no result gives TTL 0");
	ok(tdr_etcd_parse_keepalive(S("{\"result\":{\"ID\":\"1\",\"TTL\":\"-3\"}}"), &id, &ttl, &err) == 0 && ttl == 0,
	   "keepalive: negative TTL treated as gone");
	ok(tdr_etcd_parse_keepalive(S("{\"result\":\"x\"}"), &id, &ttl, &err) == TDR_EFAIL,
	   "keepalive: result of the wrong type rejected");
	ok(tdr_etcd_parse_keepalive(S("{\"result\":{\"ID\":\"1\",\"TTL\":{}}}"), &id, &ttl, &err) == TDR_EFAIL,
	   "keepalive: TTL of the wrong type rejected");
	ok(tdr_etcd_parse_keepalive(S("{\"result\":{\"ID\":\"1\",\"TTL\":\"7\"}}\n{\"result\":{\"ID\":\"1\"}}\n"), &id,
				    &ttl, &err) == 0 &&
		   ttl == 7,
	   "keepalive: only the first stream message counts");
	ok(tdr_etcd_parse_keepalive(S("{\"error\":{\"grpc_code\":14,\"http_code\":503,\"message\":\"etcdserver: no "
				      "leader\",\"http_status\":\"Service Unavailable\"}}"),
				    &id, &ttl, &err) == TDR_EFAIL &&
		   strstr(err.msg, "no leader") != NULL,
	   "keepalive: streamed error fails with its message");
	ok(tdr_etcd_parse_error(S("{\"error\":{\"grpc_code\":14,\"http_code\":503,\"message\":\"etcdserver: no "
				  "leader\"}}"),
				&code, msg, sizeof(msg)) == 0 &&
		   code == 14 && tdr_etcd_grpc_transient(code) && strcmp(msg, "etcdserver: no leader") == 0,
	   "keepalive: streamed error classified transient");
	ok(tdr_etcd_parse_keepalive(S("garbage"), &id, &ttl, &err) == TDR_EFAIL, "keepalive: garbage rejected");
}

static void test_timetolive(void)
{
	tdr_err err;
	int64_t ttl = 0, g = 0;

	ok(tdr_etcd_parse_timetolive(S("{\"ID\":\"1\",\"TTL\":\"4\",\"grantedTTL\":\"5\"}"), &ttl, &g, &err) == 0 &&
		   ttl == 4 && g == 5,
	   "timetolive: real response");
	ok(tdr_etcd_parse_timetolive(S("{\"ID\":\"1\",\"TTL\":\"-1\"}"), &ttl, &g, &err) == 0 && ttl == -1 && g == 0,
	   "timetolive: expired lease gives -1");
	ok(tdr_etcd_parse_timetolive(S("{\"ID\":\"1\"}"), &ttl, &g, &err) == 0 && ttl == 0,
	   "timetolive: TTL absent (under a second left) gives 0");
	ok(tdr_etcd_parse_timetolive(S("{\"TTL\":\"-2\"}"), &ttl, &g, &err) == TDR_EFAIL &&
		   tdr_etcd_parse_timetolive(S("{\"TTL\":\"1\",\"grantedTTL\":false}"), &ttl, &g, &err) == TDR_EFAIL,
	   "timetolive: out-of-range TTL and wrong-typed grantedTTL rejected");
}

static void test_txn(void)
{
	tdr_err err;
	tdr_etcd_kv kv;
	int64_t rev = 0;
	int s = -1;
	char *b;

	b = dupf("{\"header\":{\"cluster_id\":\"1\",\"revision\":\"2\"},\"succeeded\":true,\"responses\":[{"
		 "\"response_put\":{\"header\":{\"revision\":\"2\"}}}]}%s",
		 "");
	ok(b && tdr_etcd_parse_txn(b, strlen(b), &s, &rev, &kv, &err) == 0 && s == 1 && rev == 2 && kv.key == NULL,
	   "txn: succeeded put, revision from header");
	free(b);
	b = dupf("{%s}", hdr);
	ok(b && tdr_etcd_parse_txn(b, strlen(b), &s, &rev, NULL, &err) == 0 && s == 0 && rev == 7,
	   "txn: \"succeeded\" absent means false");
	free(b);
	/* failure branch read the key back: holder "b" at create_revision 5 */
	b = dupf("{%s,\"responses\":[{\"response_range\":{\"header\":{\"revision\":\"7\"},\"kvs\":[{\"key\":"
		 "\"L3QvbGVhc2UveA==\",\"create_revision\":\"5\",\"mod_revision\":\"5\",\"version\":\"1\",\"value\":"
		 "\"eyJob2xkZXIiOiJiIn0=\",\"lease\":\"694d7d\"}],\"count\":\"1\"}}]}",
		 hdr);
	ok(b && tdr_etcd_parse_txn(b, strlen(b), &s, &rev, &kv, &err) == TDR_EFAIL,
	   "txn: kv lease that is not a number rejected");
	free(b);
	b = dupf("{%s,\"responses\":[{\"response_range\":{\"header\":{\"revision\":\"7\"},\"kvs\":[{\"key\":"
		 "\"L3QvbGVhc2UveA==\",\"create_revision\":\"5\",\"mod_revision\":\"5\",\"version\":\"1\",\"value\":"
		 "\"eyJob2xkZXIiOiJiIn0=\",\"lease\":\"6917\"}],\"count\":\"1\"}}]}",
		 hdr);
	memset(&kv, 0, sizeof(kv));
	ok(b && tdr_etcd_parse_txn(b, strlen(b), &s, &rev, &kv, &err) == 0 && s == 0 && kv.key &&
		   strcmp(kv.key, "/t/lease/x") == 0 && kv.create_revision == 5 && kv.lease == 6917 &&
		   strcmp(kv.value, "{\"holder\":\"b\"}") == 0,
	   "txn: failed compare returns the current kv");
	tdr_etcd_kv_clear(&kv);
	free(b);
	ok(tdr_etcd_parse_txn(S("{\"succeeded\":true}"), &s, &rev, NULL, &err) == TDR_EFAIL,
	   "txn: missing header rejected");
	ok(tdr_etcd_parse_txn(S("{\"header\":{\"revision\":\"0\"},\"succeeded\":true}"), &s, &rev, NULL, &err) ==
		   TDR_EFAIL,
	   "txn: revision 0 rejected");
	ok(tdr_etcd_parse_txn(S("{\"header\":{\"revision\":\"3\"},\"succeeded\":\"true\"}"), &s, &rev, NULL, &err) ==
		   TDR_EFAIL,
	   "txn: \"succeeded\" as a string rejected");
	ok(tdr_etcd_parse_txn(S("{\"header\":[],\"succeeded\":true}"), &s, &rev, NULL, &err) == TDR_EFAIL,
	   "txn: header of the wrong type rejected");
	ok(tdr_etcd_parse_txn(S("{\"header\":{\"revision\":\"3\"},\"responses\":{}}"), &s, &rev, &kv, &err) ==
			   TDR_EFAIL &&
		   tdr_etcd_parse_txn(S("{\"header\":{\"revision\":\"3\"},\"responses\":[7]}"), &s, &rev, &kv, &err) ==
			   TDR_EFAIL &&
		   tdr_etcd_parse_txn(S("{\"header\":{\"revision\":\"3\"},\"responses\":[{\"response_range\":{\"kvs\":"
					"\"x\"}}]}"),
				      &s, &rev, &kv, &err) == TDR_EFAIL,
	   "txn: responses / kvs of the wrong type rejected");
}

static void test_range(void)
{
	tdr_err err;
	tdr_etcd_kv *kvs = NULL;
	size_t n = 99;
	int more = -1;
	char *b;

	b = dupf("{%s,\"kvs\":[{\"key\":\"L3QvbGVhc2UveA==\",\"create_revision\":\"2\",\"mod_revision\":\"2\","
		 "\"version\":\"1\",\"value\":\"eyJob2xkZXIiOiJhIn0=\",\"lease\":\"4111120158370626313\"},{\"key\":"
		 "\"L3QvbGVhc2UveQ==\",\"create_revision\":\"3\",\"mod_revision\":\"4\",\"version\":\"2\"}],"
		 "\"count\":\"2\"}",
		 hdr);
	ok(b && tdr_etcd_parse_range(b, strlen(b), &kvs, &n, &more, &err) == 0 && n == 2 && more == 0 &&
		   strcmp(kvs[0].key, "/t/lease/x") == 0 && kvs[0].key_len == 10 && kvs[0].lease == 4111120158370626313LL &&
		   strcmp(kvs[0].value, "{\"holder\":\"a\"}") == 0 && kvs[1].create_revision == 3 &&
		   kvs[1].mod_revision == 4 && kvs[1].lease == 0 && kvs[1].value_len == 0 && kvs[1].value[0] == '\0',
	   "range: real response; absent value and lease are empty and 0");
	tdr_etcd_kvs_free(kvs, n);
	free(b);
	b = dupf("{%s}", hdr);
	kvs = (tdr_etcd_kv *)1;
	ok(b && tdr_etcd_parse_range(b, strlen(b), &kvs, &n, &more, &err) == 0 && n == 0 && kvs == NULL,
	   "range: no kvs is an empty result");
	free(b);
	ok(tdr_etcd_parse_range(S("{\"header\":{\"revision\":\"3\"},\"kvs\":[],\"more\":true}"), &kvs, &n, &more,
				&err) == 0 &&
		   more == 1 && n == 0,
	   "range: more flag");
	ok(tdr_etcd_parse_range(S("{\"header\":{\"revision\":\"3\"},\"kvs\":{}}"), &kvs, &n, NULL, &err) == TDR_EFAIL,
	   "range: kvs not an array rejected");
	ok(tdr_etcd_parse_range(S("{\"header\":{\"revision\":\"3\"},\"kvs\":[{\"key\":\"!!!!\",\"create_revision\":"
				  "\"2\",\"mod_revision\":\"2\"}]}"),
				&kvs, &n, NULL, &err) == TDR_EFAIL,
	   "range: key that is not base64 rejected");
	ok(tdr_etcd_parse_range(S("{\"header\":{\"revision\":\"3\"},\"kvs\":[{\"create_revision\":\"2\","
				  "\"mod_revision\":\"2\"}]}"),
				&kvs, &n, NULL, &err) == TDR_EFAIL,
	   "range: kv without key rejected");
	ok(tdr_etcd_parse_range(S("{\"header\":{\"revision\":\"3\"},\"kvs\":[{\"key\":\"YQ==\",\"mod_revision\":"
				  "\"2\"}]}"),
				&kvs, &n, NULL, &err) == TDR_EFAIL,
	   "range: kv without create_revision rejected");
	ok(tdr_etcd_parse_range(S("{\"header\":{\"revision\":\"3\"},\"kvs\":[{\"key\":\"YQ==\",\"create_revision\":"
				  "\"3\",\"mod_revision\":\"2\"}]}"),
				&kvs, &n, NULL, &err) == TDR_EFAIL,
	   "range: mod_revision below create_revision rejected");
	ok(tdr_etcd_parse_range(S("{\"header\":{\"revision\":\"3\"},\"kvs\":[{\"key\":\"YQ==\",\"create_revision\":"
				  "\"2\",\"mod_revision\":\"2\"},{\"key\":5}]}"),
				&kvs, &n, NULL, &err) == TDR_EFAIL,
	   "range: one bad kv after a good one fails the whole response (no leak: see valgrind)");
	{
		/* A value over TDR_ETCD_MAX_VALUE (64 KiB) decoded. */
		size_t vlen = TDR_ETCD_MAX_VALUE + 3, elen = tdr_b64_encoded_len(vlen);
		char *val = malloc(vlen), *enc = malloc(elen + 1), *body = malloc(elen + 200);

		if (val && enc && body) {
			memset(val, 'v', vlen);
			tdr_b64_encode(val, vlen, enc, elen + 1);
			snprintf(body, elen + 200,
				 "{\"header\":{\"revision\":\"3\"},\"kvs\":[{\"key\":\"YQ==\",\"create_revision\":\"2\","
				 "\"mod_revision\":\"2\",\"value\":\"%s\"}]}",
				 enc);
			ok(tdr_etcd_parse_range(body, strlen(body), &kvs, &n, NULL, &err) == TDR_EFAIL,
			   "range: oversized value rejected");
		} else {
			ok(0, "range: oversized value rejected (no memory for the test)");
		}
		free(val);
		free(enc);
		free(body);
	}
	{
		/* A body over TDR_ETCD_MAX_BODY is refused before parsing. */
		size_t big = TDR_ETCD_MAX_BODY + 1;
		char *body = malloc(big);

		if (body) {
			memset(body, ' ', big);
			body[0] = '{';
			body[big - 1] = '}';
			ok(tdr_etcd_parse_range(body, big, &kvs, &n, NULL, &err) == TDR_EFAIL &&
				   strstr(err.msg, "exceeds") != NULL,
			   "range: body over the size bound refused");
		} else {
			ok(0, "range: body over the size bound refused (no memory for the test)");
		}
		free(body);
	}
	{
		/* Deep nesting must not recurse without bound. */
		size_t depth = 100000;
		char *body = malloc(2 * depth + 1);

		if (body) {
			memset(body, '[', depth);
			memset(body + depth, ']', depth);
			body[2 * depth] = '\0';
			ok(tdr_etcd_parse_range(body, 2 * depth, &kvs, &n, NULL, &err) == TDR_EFAIL,
			   "range: 100000-deep nesting rejected without crashing");
		} else {
			ok(0, "range: deep nesting (no memory for the test)");
		}
		free(body);
	}
}

static void test_errors_auth_value(void)
{
	tdr_err err;
	char msg[64], tok[64], holder[64], inst[24];
	int64_t ttl = -1;
	int code;

	ok(tdr_etcd_parse_error(S("{\"error\":\"etcdserver: requested lease not found\",\"message\":\"etcdserver: "
				  "requested lease not found\",\"code\":5}"),
				&code, msg, sizeof(msg)) == 0 &&
		   code == 5 && strcmp(msg, "etcdserver: requested lease not found") == 0 && !tdr_etcd_grpc_transient(code),
	   "error: top-level gateway error parsed, NotFound not transient");
	ok(tdr_etcd_parse_error(S("{\"error\":\"x\",\"code\":\"14\"}"), &code, msg, sizeof(msg)) == 0 && code == 14 &&
		   tdr_etcd_grpc_transient(code),
	   "error: code as string, Unavailable transient");
	ok(tdr_etcd_parse_error(S("{\"error\":\"a\\nb\\u0001c\"}"), &code, msg, sizeof(msg)) == 0 && code == -1 &&
		   strcmp(msg, "a?b?c") == 0,
	   "error: control characters in the message are neutralised");
	ok(tdr_etcd_parse_error(S("{\"header\":{}}"), &code, msg, sizeof(msg)) < 0 &&
		   tdr_etcd_parse_error(S("Not Found\n"), &code, msg, sizeof(msg)) < 0 &&
		   tdr_etcd_parse_error(S("{\"error\":7}"), &code, msg, sizeof(msg)) < 0,
	   "error: non-error bodies, plain text and wrong types are not errors");
	{
		char tiny[4];

		ok(tdr_etcd_parse_error(S("{\"error\":\"abcdefgh\"}"), &code, tiny, sizeof(tiny)) == 0 &&
			   strcmp(tiny, "abc") == 0,
		   "error: message truncated to the buffer");
	}
	ok(tdr_etcd_parse_auth(S("{\"header\":{},\"token\":\"SlsrqZgchHJKseke.8\"}"), tok, sizeof(tok), &err) == 0 &&
		   strcmp(tok, "SlsrqZgchHJKseke.8") == 0,
	   "auth: token parsed");
	ok(tdr_etcd_parse_auth(S("{\"token\":\"abc\\r\\nX-Evil: 1\"}"), tok, sizeof(tok), &err) == TDR_EFAIL &&
		   tdr_etcd_parse_auth(S("{\"token\":\"a b\"}"), tok, sizeof(tok), &err) == TDR_EFAIL,
	   "auth: token with CR/LF or space (header injection) rejected");
	ok(tdr_etcd_parse_auth(S("{\"token\":\"\"}"), tok, sizeof(tok), &err) == TDR_EFAIL &&
		   tdr_etcd_parse_auth(S("{}"), tok, sizeof(tok), &err) == TDR_EFAIL &&
		   tdr_etcd_parse_auth(S("{\"token\":\"0123456789abcdef\"}"), tok, 16, &err) == TDR_EFAIL,
	   "auth: empty, missing and oversized tokens rejected");
	ok(tdr_etcd_parse_auth(S("{\"token\":\"sekrit-token"), tok, sizeof(tok), &err) == TDR_EFAIL &&
		   strstr(err.msg, "sekrit") == NULL,
	   "auth: a malformed reply is not echoed into the error");
	ok(tdr_etcd_parse_lease_value(S("{\"holder\":\"a\",\"inst\":\"00ff\",\"ttl_ms\":2000}"), holder,
				      sizeof(holder), inst, sizeof(inst), &ttl, &err) == 0 &&
		   strcmp(holder, "a") == 0 && strcmp(inst, "00ff") == 0 && ttl == 2000,
	   "value: holder, inst, ttl_ms");
	ok(tdr_etcd_parse_lease_value(S("{\"holder\":\"a\"}"), holder, sizeof(holder), inst, sizeof(inst), &ttl,
				      &err) == 0 &&
		   inst[0] == '\0' && ttl == 0,
	   "value: inst and ttl_ms optional");
	ok(tdr_etcd_parse_lease_value(S("{\"holder\":\"a\",\"inst\":\"00ff\",\"ttl_ms\":\"2000\"}"), holder,
				      sizeof(holder), NULL, 0, &ttl, &err) == 0 &&
		   strcmp(holder, "a") == 0 && ttl == 2000,
	   "value: inst not wanted (NULL) is skipped; ttl_ms as a string");
	ok(tdr_etcd_parse_lease_value(S("{\"ttl_ms\":1}"), holder, sizeof(holder), NULL, 0, &ttl, &err) == TDR_EFAIL &&
		   tdr_etcd_parse_lease_value(S("{\"holder\":\"a\\nb\"}"), holder, sizeof(holder), NULL, 0, &ttl,
					      &err) == TDR_EFAIL &&
		   tdr_etcd_parse_lease_value(S("{\"holder\":\"a\",\"ttl_ms\":-1}"), holder, sizeof(holder), NULL, 0,
					      &ttl, &err) == TDR_EFAIL &&
		   tdr_etcd_parse_lease_value(S("{\"holder\":\"a\",\"inst\":3}"), holder, sizeof(holder), inst,
					      sizeof(inst), &ttl, &err) == TDR_EFAIL &&
		   tdr_etcd_parse_lease_value(S("{\"holder\":\"0123456789\"}"), holder, 8, NULL, 0, &ttl, &err) ==
			   TDR_EFAIL,
	   "value: missing holder, control characters, negative ttl, bad inst, oversized holder rejected");
}

/* Decode base64 field f of object o and compare with want. */
static int b64_field_is(const json_t *o, const char *f, const char *want, size_t wantlen)
{
	const char *s = json_string_value(json_object_get(o, f));
	unsigned char buf[512];
	size_t n;

	return s && tdr_b64_decode(s, strlen(s), buf, sizeof(buf), &n) == 0 && n == wantlen &&
	       memcmp(buf, want, n) == 0;
}

static void test_requests(void)
{
	tdr_err err;
	json_t *j, *c;
	char *s, end[16];
	size_t n;

	s = tdr_etcd_req_grant(2, &err);
	ok(s && strcmp(s, "{\"TTL\":\"2\"}") == 0, "request: grant");
	free(s);
	ok(tdr_etcd_req_grant(0, &err) == NULL, "request: grant refuses TTL 0");
	s = tdr_etcd_req_lease_id(4111120158370626313LL, &err);
	ok(s && strcmp(s, "{\"ID\":\"4111120158370626313\"}") == 0, "request: lease ID as an exact string");
	free(s);

	s = tdr_etcd_req_create_txn("/t/lease/x", "{\"holder\":\"a\"}", 77, &err);
	j = s ? json_loads(s, 0, NULL) : NULL;
	c = json_array_get(json_object_get(j, "compare"), 0);
	ok(j && b64_field_is(c, "key", S("/t/lease/x")) &&
		   strcmp(json_string_value(json_object_get(c, "target")), "CREATE") == 0 &&
		   strcmp(json_string_value(json_object_get(c, "create_revision")), "0") == 0 &&
		   b64_field_is(json_object_get(json_array_get(json_object_get(j, "success"), 0), "request_put"), "value",
				S("{\"holder\":\"a\"}")) &&
		   strcmp(json_string_value(json_object_get(
				  json_object_get(json_array_get(json_object_get(j, "success"), 0), "request_put"),
				  "lease")),
			  "77") == 0 &&
		   json_object_get(json_array_get(json_object_get(j, "failure"), 0), "request_range") != NULL,
	   "request: create txn compares create_revision 0, puts with the lease, reads back on failure");
	json_decref(j);
	free(s);

	s = tdr_etcd_req_delete_txn("/t/lease/x", 12, 77, &err);
	j = s ? json_loads(s, 0, NULL) : NULL;
	ok(j && json_array_size(json_object_get(j, "compare")) == 2 &&
		   strcmp(json_string_value(json_object_get(json_array_get(json_object_get(j, "compare"), 0),
							    "create_revision")),
			  "12") == 0 &&
		   strcmp(json_string_value(json_object_get(json_array_get(json_object_get(j, "compare"), 1), "target")),
			  "LEASE") == 0 &&
		   json_object_get(json_array_get(json_object_get(j, "success"), 0), "request_delete_range") != NULL,
	   "request: delete txn compares create_revision and lease");
	json_decref(j);
	free(s);
	s = tdr_etcd_req_delete_txn("/t/lease/x", 12, 0, &err);
	j = s ? json_loads(s, 0, NULL) : NULL;
	ok(j && json_array_size(json_object_get(j, "compare")) == 1, "request: delete txn without lease compare");
	json_decref(j);
	free(s);

	/* Bulk txns: each nested txn is the single-key one (the create's without its failure branch). */
	{
		const char *keys[3] = { "/t/lease/part/0", "/t/lease/part/1", "/t/lease/part/4095" };
		const int64_t revs[3] = { 5, 6, 7 };
		int same = 1;

		s = tdr_etcd_req_create_many_txn(keys, "{\"holder\":\"a\"}", 3, 77, &err);
		j = s ? json_loads(s, 0, NULL) : NULL;
		ok(j && json_object_size(j) == 1 && json_array_size(json_object_get(j, "success")) == 3,
		   "request: create bulk txn has one success op per key and nothing else");
		for (size_t i = 0; j && i < 3; i++) {
			json_t *inner = json_object_get(json_array_get(json_object_get(j, "success"), i), "request_txn");
			char *one = tdr_etcd_req_create_txn(keys[i], "{\"holder\":\"a\"}", 77, &err);
			json_t *jo = one ? json_loads(one, 0, NULL) : NULL;

			if (jo)
				json_object_del(jo, "failure");
			same = same && inner && jo && json_equal(inner, jo);
			json_decref(jo);
			free(one);
		}
		ok(j && same, "request: create bulk txn nests each key's create txn, without a failure branch");
		json_decref(j);
		free(s);

		same = 1;
		s = tdr_etcd_req_delete_many_txn(keys, revs, 3, 77, &err);
		j = s ? json_loads(s, 0, NULL) : NULL;
		for (size_t i = 0; j && i < 3; i++) {
			json_t *inner = json_object_get(json_array_get(json_object_get(j, "success"), i), "request_txn");
			char *one = tdr_etcd_req_delete_txn(keys[i], revs[i], 77, &err);
			json_t *jo = one ? json_loads(one, 0, NULL) : NULL;

			same = same && inner && jo && json_equal(inner, jo);
			json_decref(jo);
			free(one);
		}
		ok(j && json_array_size(json_object_get(j, "success")) == 3 && same,
		   "request: delete bulk txn nests each key's fenced delete txn");
		json_decref(j);
		free(s);

		ok(tdr_etcd_req_create_many_txn(keys, "v", 0, 77, &err) == NULL &&
			   tdr_etcd_req_delete_many_txn(keys, revs, TDR_ETCD_TXN_MAX + 1, 77, &err) == NULL,
		   "request: bulk txn of 0 or more than TDR_ETCD_TXN_MAX keys refused");
	}
	{
		char big[TDR_ETCD_MAX_KEY + 2];
		const char *keys[2] = { "/t/lease/part/0", big };
		const int64_t revs[2] = { 1, 2 };

		memset(big, 'k', sizeof(big) - 1);
		big[sizeof(big) - 1] = '\0';
		ok(tdr_etcd_req_create_many_txn(keys, "v", 2, 77, &err) == NULL &&
			   tdr_etcd_req_delete_many_txn(keys, revs, 2, 77, &err) == NULL,
		   "request: bulk txn with one oversized key refused as a whole");
	}

	s = tdr_etcd_req_range("/t/lease/", 9, "/t/lease0", 9, 0, &err);
	j = s ? json_loads(s, 0, NULL) : NULL;
	ok(j && b64_field_is(j, "key", S("/t/lease/")) && b64_field_is(j, "range_end", S("/t/lease0")) &&
		   json_object_get(j, "limit") == NULL,
	   "request: range with range_end");
	json_decref(j);
	free(s);
	s = tdr_etcd_req_range("k", 1, NULL, 0, 10, &err);
	ok(s && strcmp(s, "{\"key\":\"aw==\",\"limit\":\"10\"}") == 0, "request: single-key range with limit");
	free(s);
	{
		char big[TDR_ETCD_MAX_KEY + 2];

		memset(big, 'k', sizeof(big) - 1);
		big[sizeof(big) - 1] = '\0';
		ok(tdr_etcd_req_range(big, strlen(big), NULL, 0, 0, &err) == NULL, "request: oversized key refused");
	}
	s = tdr_etcd_req_auth("root", "p\"w", &err);
	j = s ? json_loads(s, 0, NULL) : NULL;
	ok(j && strcmp(json_string_value(json_object_get(j, "password")), "p\"w") == 0,
	   "request: auth body escapes the password");
	json_decref(j);
	free(s);
	s = tdr_etcd_lease_value("a", "00ff", 2000, &err);
	ok(s && strcmp(s, "{\"holder\":\"a\",\"inst\":\"00ff\",\"ttl_ms\":2000}") == 0, "request: lease value");
	free(s);
	ok(tdr_etcd_lease_value("\xff\xfe", "", 1, &err) == NULL, "request: invalid UTF-8 holder refused");

	ok(tdr_etcd_prefix_end(S("abc"), end, sizeof(end), &n) == 0 && n == 3 && memcmp(end, "abd", 3) == 0,
	   "prefix end: last byte incremented");
	ok(tdr_etcd_prefix_end(S("a\xff\xff"), end, sizeof(end), &n) == 0 && n == 1 && end[0] == 'b',
	   "prefix end: trailing 0xff dropped");
	ok(tdr_etcd_prefix_end(S("\xff"), end, sizeof(end), &n) == 0 && n == 1 && end[0] == '\0',
	   "prefix end: all 0xff means the whole keyspace");
	ok(tdr_etcd_prefix_end(S("abc"), end, 2, &n) < 0, "prefix end: refuses a short buffer");
}

/*
 * Mutation smoke test: truncations and byte flips of real responses through
 * every parser.  Passing means no crash; valgrind/ASan runs make it strict.
 */
static void test_mutations(void)
{
	static const char *samples[] = {
		("{\"header\":{\"revision\":\"2\"},\"succeeded\":true,\"responses\":[{\"response_range\":{\"kvs\":[{"
		 "\"key\":\"L3QvbGVhc2UveA==\",\"create_revision\":\"5\",\"mod_revision\":\"5\",\"value\":"
		 "\"eyJob2xkZXIiOiJiIn0=\",\"lease\":\"6917\"}]}}]}"),
		"{\"result\":{\"header\":{\"revision\":\"2\"},\"ID\":\"4111120158370626313\",\"TTL\":\"5\"}}",
		"{\"error\":{\"grpc_code\":14,\"http_code\":503,\"message\":\"etcdserver: no leader\"}}",
		("{\"header\":{\"revision\":\"1\"},\"ID\":\"4111120158370626309\",\"TTL\":\"2\",\"token\":\"abc.1\","
		 "\"holder\":\"a\",\"ttl_ms\":\"2000\",\"grantedTTL\":\"5\"}"),
	};
	uint32_t rng = 12345;
	unsigned long runs = 0;

	for (size_t si = 0; si < sizeof(samples) / sizeof(samples[0]); si++) {
		size_t len = strlen(samples[si]);
		char *buf = malloc(len);

		if (buf == NULL)
			break;
		for (size_t iter = 0; iter < 3000; iter++) {
			size_t cut = iter < len ? iter : len;
			tdr_err err;
			tdr_etcd_kv kv, *kvs = NULL;
			size_t n = 0;
			int64_t a, b;
			int s, code;
			char m[32], t[32], h[16], in[8];

			memcpy(buf, samples[si], len);
			if (iter >= len) {
				/* flip 1..3 random bytes to random values */
				for (int k = 0; k < 1 + (int)(iter % 3); k++) {
					rng = rng * 1103515245u + 12345u;
					buf[(rng >> 8) % len] = (char)(rng >> 24);
				}
				cut = len;
			}
			memset(&kv, 0, sizeof(kv));
			(void)tdr_etcd_parse_grant(buf, cut, &a, &b, &err);
			(void)tdr_etcd_parse_keepalive(buf, cut, &a, &b, &err);
			(void)tdr_etcd_parse_timetolive(buf, cut, &a, &b, &err);
			if (tdr_etcd_parse_txn(buf, cut, &s, &a, &kv, &err) == 0)
				tdr_etcd_kv_clear(&kv);
			if (tdr_etcd_parse_range(buf, cut, &kvs, &n, &s, &err) == 0)
				tdr_etcd_kvs_free(kvs, n);
			(void)tdr_etcd_parse_error(buf, cut, &code, m, sizeof(m));
			(void)tdr_etcd_parse_auth(buf, cut, t, sizeof(t), &err);
			(void)tdr_etcd_parse_lease_value(buf, cut, h, sizeof(h), in, sizeof(in), &a, &err);
			(void)tdr_etcd_parse_revision(buf, cut, &a, &err);
			runs++;
		}
		free(buf);
	}
	ok(runs == 4 * 3000, "mutations: %lu truncated/corrupted bodies through every parser without a crash", runs);
}

int main(void)
{
	test_base64();
	test_i64();
	test_grant();
	test_keepalive();
	test_timetolive();
	test_txn();
	test_range();
	test_errors_auth_value();
	test_requests();
	test_mutations();
	return tap_done();
}
