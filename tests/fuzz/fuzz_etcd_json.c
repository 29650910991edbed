/*
 * fuzz_etcd_json.c - libFuzzer target for coord/etcd_json.c.
 *
 * The input goes, as a body that is not NUL-terminated (an exact-size heap
 * copy, so ASan sees any read past len), through every parser of
 * coord/etcd_json.h, and through the base64 and int64 codecs.  Checked
 * properties (a violation aborts, reported like a crash):
 *   - outputs are written only on success (etcd_json.h);
 *   - what a parser hands back respects its documented bounds and is
 *     NUL-terminated;
 *   - base64 decode(encode(x)) == x; tdr_etcd_parse_i64 agrees with strtoll;
 *   - a lease value built by tdr_etcd_lease_value parses back.
 *
 * Built and run by tests/fuzz/run.sh.
 */
#include "config.h"

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "coord/etcd_json.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define SENT INT64_C(0x5a5a5a5a5a5a5a5a)

static void die(const char *what)
{
	fprintf(stderr, "fuzz_etcd_json: %s\n", what);
	abort();
}

static int no_ctl(const char *s, size_t n)
{
	for (size_t i = 0; i < n; i++)
		if ((unsigned char)s[i] < 0x20 || s[i] == 0x7f)
			return 0;
	return 1;
}

static void check_kv(const tdr_etcd_kv *kv)
{
	if (kv->key == NULL || kv->key_len == 0 || kv->key_len > TDR_ETCD_MAX_KEY || kv->key[kv->key_len] != '\0')
		die("kv key out of bounds or not NUL-terminated");
	if (kv->value == NULL || kv->value_len > TDR_ETCD_MAX_VALUE || kv->value[kv->value_len] != '\0')
		die("kv value out of bounds or not NUL-terminated");
	if (kv->create_revision <= 0 || kv->mod_revision < kv->create_revision || kv->version < 0 || kv->lease < 0)
		die("kv revisions or lease out of range");
}

static void parsers(const char *b, size_t n)
{
	tdr_err err;
	int64_t a = SENT, c = SENT;
	int s = 0x5a, code;
	char msg[48], tok[40], holder[32], inst[16];

	/* error */
	memset(msg, 'x', sizeof(msg));
	(void)tdr_etcd_parse_error(b, n, &code, msg, sizeof(msg));
	if (memchr(msg, '\0', sizeof(msg)) == NULL || !no_ctl(msg, strlen(msg)))
		die("error message not NUL-terminated or has control characters");
	if (code < -1 || code > 64)
		die("grpc code out of range");
	(void)tdr_etcd_grpc_transient(code);
	(void)tdr_etcd_parse_error(b, n, NULL, NULL, 0);
	{
		char one[1] = { 'x' };

		(void)tdr_etcd_parse_error(b, n, &code, one, sizeof(one));
		if (one[0] != '\0')
			die("error message not NUL-terminated in a 1-byte buffer");
	}

	/* revision */
	if (tdr_etcd_parse_revision(b, n, &a, &err) == 0) {
		if (a <= 0)
			die("revision <= 0 accepted");
	} else if (a != SENT) {
		die("parse_revision wrote its output on failure");
	}

	/* grant */
	a = c = SENT;
	if (tdr_etcd_parse_grant(b, n, &a, &c, &err) == 0) {
		if (a <= 0 || c <= 0)
			die("grant: ID or TTL <= 0 accepted");
	} else if (a != SENT || c != SENT) {
		die("parse_grant wrote its outputs on failure");
	}

	/* keepalive */
	a = c = SENT;
	if (tdr_etcd_parse_keepalive(b, n, &a, &c, &err) == 0) {
		if (a < 0 || c < 0)
			die("keepalive: negative ID or TTL returned");
	} else if (a != SENT || c != SENT) {
		die("parse_keepalive wrote its outputs on failure");
	}

	/* timetolive */
	a = c = SENT;
	if (tdr_etcd_parse_timetolive(b, n, &a, &c, &err) == 0) {
		if (a < -1 || c < 0)
			die("timetolive: TTL < -1 or granted < 0 returned");
	} else if (a != SENT || c != SENT) {
		die("parse_timetolive wrote its outputs on failure");
	}

	/* txn, with and without the first kv */
	{
		tdr_etcd_kv kv;

		memset(&kv, 0x5a, sizeof(kv));
		a = SENT;
		s = 0x5a;
		if (tdr_etcd_parse_txn(b, n, &s, &a, &kv, &err) == 0) {
			if ((s != 0 && s != 1) || a <= 0)
				die("txn: bad succeeded or revision");
			if (kv.key != NULL)
				check_kv(&kv);
			tdr_etcd_kv_clear(&kv);
		} else if (a != SENT || s != 0x5a) {
			die("parse_txn wrote its outputs on failure");
		}
		(void)tdr_etcd_parse_txn(b, n, &s, &a, NULL, &err);
	}

	/* range */
	{
		tdr_etcd_kv *kvs = (tdr_etcd_kv *)&err; /* sentinel: any non-NULL address */
		size_t cnt = 12345;
		int more = 0x5a;

		if (tdr_etcd_parse_range(b, n, &kvs, &cnt, &more, &err) == 0) {
			if ((more != 0 && more != 1) || cnt > TDR_ETCD_MAX_KVS || (cnt == 0) != (kvs == NULL))
				die("range: bad more flag or count");
			for (size_t i = 0; i < cnt; i++)
				check_kv(&kvs[i]);
			tdr_etcd_kvs_free(kvs, cnt);
		} else if (kvs != (tdr_etcd_kv *)&err || cnt != 12345 || more != 0x5a) {
			die("parse_range wrote its outputs on failure");
		}
		kvs = NULL;
		if (tdr_etcd_parse_range(b, n, &kvs, &cnt, NULL, &err) == 0)
			tdr_etcd_kvs_free(kvs, cnt);
	}

	/* auth: a normal and a tiny token buffer */
	memset(tok, 0x5a, sizeof(tok));
	if (tdr_etcd_parse_auth(b, n, tok, sizeof(tok), &err) == 0) {
		size_t tl = strnlen(tok, sizeof(tok));

		if (tl == 0 || tl >= sizeof(tok))
			die("auth: token empty or not NUL-terminated");
		for (size_t i = 0; i < tl; i++)
			if (tok[i] < 0x21 || tok[i] > 0x7e)
				die("auth: token with a character unfit for an HTTP header");
	} else if (tok[0] != 0x5a) {
		die("parse_auth wrote its output on failure");
	}
	(void)tdr_etcd_parse_auth(b, n, tok, 2, &err);

	/* lease value, with and without inst */
	memset(holder, 0x5a, sizeof(holder));
	memset(inst, 0x5a, sizeof(inst));
	a = SENT;
	if (tdr_etcd_parse_lease_value(b, n, holder, sizeof(holder), inst, sizeof(inst), &a, &err) == 0) {
		size_t hl = strnlen(holder, sizeof(holder));

		if (hl == 0 || hl >= sizeof(holder) || !no_ctl(holder, hl) || strnlen(inst, sizeof(inst)) >= sizeof(inst) ||
		    a < 0)
			die("lease value: bad holder, inst or ttl_ms");
	} else if (holder[0] != 0x5a || inst[0] != 0x5a || a != SENT) {
		die("parse_lease_value wrote its outputs on failure");
	}
	(void)tdr_etcd_parse_lease_value(b, n, holder, sizeof(holder), NULL, 0, &a, &err);
}

static void codecs(const char *b, size_t n)
{
	/* base64: decode anything; encode then decode must give the input back */
	{
		size_t cap = n / 4 * 3 + 3, got = 0, elen = tdr_b64_encoded_len(n);
		unsigned char *out = malloc(cap ? cap : 1), *back = malloc(n ? n : 1);
		char *enc = malloc(elen + 1);

		if (out && back && enc) {
			if (tdr_b64_decode(b, n, out, cap, &got) == 0 && got > cap)
				die("b64 decode wrote more than its capacity");
			(void)tdr_b64_decode(b, n, out, n / 4, &got);
			if (tdr_b64_encode(b, n, enc, elen + 1) != 0 || strlen(enc) != elen)
				die("b64 encode failed or has the wrong length");
			if (tdr_b64_decode(enc, elen, back, n, &got) != 0 || got != n || memcmp(back, b, n) != 0)
				die("b64 decode(encode(x)) != x");
			if (n > 0 && tdr_b64_encode(b, n, enc, elen) == 0)
				die("b64 encode accepted a buffer without room for the NUL");
		}
		free(out);
		free(back);
		free(enc);
	}

	/* int64: agree with strtoll on whatever it accepts */
	if (n <= 24) {
		char z[32];
		int64_t v = SENT;

		memcpy(z, b, n);
		z[n] = '\0';
		if (tdr_etcd_parse_i64(b, n, &v) == 0) {
			char *end;
			long long w;

			errno = 0;
			w = strtoll(z, &end, 10);
			if (errno != 0 || end != z + n || w != v || z[0] == '+' || z[0] == ' ')
				die("parse_i64 disagrees with strtoll");
		} else if (v != SENT) {
			die("parse_i64 wrote its output on failure");
		}
	}

	/* prefix end */
	if (n <= TDR_ETCD_MAX_KEY) {
		char end[TDR_ETCD_MAX_KEY + 1];
		size_t el = 0;

		if (tdr_etcd_prefix_end(b, n, end, sizeof(end), &el) != 0 || el == 0 || el > (n ? n : 1))
			die("prefix end failed or has a bad length");
		(void)tdr_etcd_prefix_end(b, n, end, n / 2, &el);
	}
}

/* Requests built from the bytes (as keys, holder, password) must be JSON that parses back. */
static void requests(const char *b, size_t n)
{
	tdr_err err;
	char *z, *s;

	s = tdr_etcd_req_range(b, n, b, n, (int64_t)n, &err);
	free(s);
	z = malloc(n + 1);
	if (z == NULL)
		return;
	memcpy(z, b, n);
	z[n] = '\0';
	free(tdr_etcd_req_create_txn(z, z, 7, &err));
	free(tdr_etcd_req_delete_txn(z, 5, 7, &err));
	free(tdr_etcd_req_auth(z, z, &err));
	s = tdr_etcd_lease_value(z, "00ff", 2000, &err);
	if (s != NULL) {
		char holder[TDR_ETCD_MAX_KEY + 1], inst[8];
		int64_t t = -1;
		size_t zl = strlen(z);

		if (zl > 0 && zl <= TDR_ETCD_MAX_KEY && no_ctl(z, zl)) {
			if (tdr_etcd_parse_lease_value(s, strlen(s), holder, sizeof(holder), inst, sizeof(inst), &t,
						       &err) != 0 ||
			    strcmp(holder, z) != 0 || strcmp(inst, "00ff") != 0 || t != 2000)
				die("a lease value built by tdr_etcd_lease_value does not parse back");
		}
		free(s);
	}
	free(z);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	char *b = malloc(size ? size : 1);

	if (b == NULL)
		return 0;
	memcpy(b, data, size);
	parsers(b, size);
	codecs(b, size);
	requests(b, size);
	free(b);
	return 0;
}
