/*
 * lease_etcd.c - leases as etcd keys, through the v3 JSON gateway (libcurl).
 *
 * A lease named N is the key <prefix>lease/<N>, attached to an etcd lease
 * granted for it alone, holding {"holder","inst","ttl_ms"}.
 *
 *   acquire  grant a lease, then txn "create_revision(key) == 0 -> put key
 *            with that lease": etcd serialises txns, so exactly one contender
 *            creates the key.  The epoch is the key's create_revision, which
 *            is the txn's header.revision: etcd's revision is global and
 *            monotonic, so every acquisition's epoch exceeds all earlier ones.
 *   renew    keepalive our etcd lease (TTL 0 or absent: it is gone), then
 *            read the key back: it must still be the one created at our
 *            epoch and attached to our lease.
 *   release  txn "create_revision == epoch and lease == ours -> delete", then
 *            revoke our lease.
 *   expiry   is etcd's: the server deletes the key when the lease runs out.
 *            The TTL clock starts when the server handles a grant/keepalive,
 *            never before we sent it, so a holder that stops writing
 *            renew_deadline (< ttl) after sending its last renewal stops before
 *            anyone else can create the key.  TTLs are whole seconds, rounded
 *            up (and etcd may raise very short ones to its minimum): the lease
 *            only ever lasts longer than asked, which is the safe direction.
 *
 * Like the mongo backend, a key held under our holder name by another
 * incarnation ("inst") is taken over at once: holder names are unique per
 * replica, so that incarnation is a dead predecessor of ours.
 *
 * Attached leases (acquire_many: "leader" and "part/<p>" in partitioned
 * mode) are keys created with the etcd lease of their session (the
 * "member/<replica>" key), as etcd's concurrency sessions do: one keepalive
 * keeps them all, and when it lapses the server deletes them all at once.
 * Bulk creation and deletion are txns of nested one-key txns, 100 to a
 * request (etcd refuses more than 128 operations in one txn by default).
 *
 * The backend keeps name -> (etcd lease ID, epoch) for what it acquired; an
 * epoch it did not acquire itself is never ours (TDR_EFENCED).  One mutex
 * serialises use of the curl handle and that table: the coordinator thread
 * and a control request may call in concurrently.  Each operation, however
 * many requests it makes, finishes within store.timeout_ms.
 */
#include "config.h"

#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <unistd.h>

#include <curl/curl.h>

#include "coord/etcd_json.h"
#include "coord/lease.h"
#include "lib/clock.h"
#include "lib/conf.h"
#include "lib/log.h"

#define INST_MAX 24
#define KEY_MAX 256
/* A best-effort cleanup (revoking a lease we no longer need) gets at least this much time. */
#define CLEANUP_MS 1000

struct held {
	char name[TDR_LEASE_NAME_MAX];
	int64_t lease_id;
	int64_t epoch;
};

struct etcd_backend {
	tdr_lease_backend base;
	pthread_mutex_t lock;
	CURL *curl;
	struct curl_slist *headers;
	char endpoint[256];      /* no trailing '/' */
	char endpoint_safe[256]; /* redacted: the only form put in messages */
	char prefix[128];
	char user[128];
	char password[128];
	char token[TDR_ETCD_MAX_TOKEN + 1];
	char inst[INST_MAX];
	int64_t timeout_ms;
	struct held *held;
	size_t nheld, capheld;
	/* The session attached leases were last acquired under (acquire_many). */
	char sess_name[TDR_LEASE_NAME_MAX];
	int64_t sess_epoch, sess_lease;
	char *resp;
	size_t resp_len, resp_cap;
	int resp_overflow;
	char curl_err[CURL_ERROR_SIZE];
};

static pthread_once_t curl_once = PTHREAD_ONCE_INIT;
static CURLcode curl_init_rc = CURLE_FAILED_INIT;

static void curl_init_once(void)
{
	/* Once per process, before any handle: curl_global_init is not safe to race. */
	curl_init_rc = curl_global_init(CURL_GLOBAL_DEFAULT);
}

static size_t on_write(char *p, size_t size, size_t nmemb, void *ud)
{
	struct etcd_backend *eb = ud;
	size_t n = size * nmemb;

	if (n > TDR_ETCD_MAX_BODY - eb->resp_len) {
		eb->resp_overflow = 1;
		return 0; /* aborts the transfer: we refuse, never truncate */
	}
	if (eb->resp_len + n + 1 > eb->resp_cap) {
		size_t cap = eb->resp_cap ? eb->resp_cap : 4096;
		char *nb;

		while (cap < eb->resp_len + n + 1)
			cap *= 2;
		nb = realloc(eb->resp, cap);
		if (nb == NULL) {
			eb->resp_overflow = 2;
			return 0;
		}
		eb->resp = nb;
		eb->resp_cap = cap;
	}
	memcpy(eb->resp + eb->resp_len, p, n);
	eb->resp_len += n;
	eb->resp[eb->resp_len] = '\0';
	return n;
}

static int set_headers(struct etcd_backend *eb, tdr_err *err)
{
	struct curl_slist *h = NULL, *t;
	char auth[sizeof(eb->token) + 32];

	curl_slist_free_all(eb->headers);
	eb->headers = NULL;
	/* "Expect:" stops curl waiting for a 100-continue the gateway never sends. */
	if ((t = curl_slist_append(h, "Content-Type: application/json")) == NULL)
		goto oom;
	h = t;
	if ((t = curl_slist_append(h, "Expect:")) == NULL)
		goto oom;
	h = t;
	if (eb->token[0]) {
		snprintf(auth, sizeof(auth), "Authorization: %s", eb->token);
		t = curl_slist_append(h, auth);
		explicit_bzero(auth, sizeof(auth));
		if (t == NULL)
			goto oom;
		h = t;
	}
	eb->headers = h;
	return 0;
oom:
	curl_slist_free_all(h);
	return tdr_err_set(err, TDR_ENOMEM, "out of memory");
}

/*
 * One POST.  0 when an HTTP response arrived (any status, body in eb->resp);
 * TDR_ETRANSIENT when the server did not answer within the deadline.
 */
static int http_post(struct etcd_backend *eb, const char *path, const char *body, int64_t deadline, long *status,
		     tdr_err *err)
{
	char url[sizeof(eb->endpoint) + 64];
	int64_t left = deadline - tdr_mono_ms();
	CURLcode cc;

	if (left <= 0)
		return tdr_err_set(err, TDR_ETRANSIENT, "etcd %s%s: no time left within store.timeout_ms (%" PRId64 " ms)",
				   eb->endpoint_safe, path, eb->timeout_ms);
	snprintf(url, sizeof(url), "%s%s", eb->endpoint, path);
	eb->resp_len = 0;
	eb->resp_overflow = 0;
	eb->curl_err[0] = '\0';
	if (eb->resp)
		eb->resp[0] = '\0';
	curl_easy_setopt(eb->curl, CURLOPT_URL, url);
	curl_easy_setopt(eb->curl, CURLOPT_POSTFIELDS, body);
	curl_easy_setopt(eb->curl, CURLOPT_POSTFIELDSIZE, (long)strlen(body));
	curl_easy_setopt(eb->curl, CURLOPT_HTTPHEADER, eb->headers);
	curl_easy_setopt(eb->curl, CURLOPT_TIMEOUT_MS, (long)left);
	curl_easy_setopt(eb->curl, CURLOPT_CONNECTTIMEOUT_MS, (long)left);
	cc = curl_easy_perform(eb->curl);
	/* The body may hold a password: do not leave curl pointing at it. */
	curl_easy_setopt(eb->curl, CURLOPT_POSTFIELDS, "");
	curl_easy_setopt(eb->curl, CURLOPT_POSTFIELDSIZE, 0L);
	if (eb->resp_overflow == 1)
		return tdr_err_set(err, TDR_EFAIL, "etcd %s%s: response exceeds %zu bytes", eb->endpoint_safe, path,
				   TDR_ETCD_MAX_BODY);
	if (eb->resp_overflow == 2)
		return tdr_err_set(err, TDR_ENOMEM, "out of memory");
	if (cc != CURLE_OK)
		return tdr_err_set(err, TDR_ETRANSIENT, "etcd %s%s: %s", eb->endpoint_safe, path,
				   eb->curl_err[0] ? eb->curl_err : curl_easy_strerror(cc));
	*status = 0;
	curl_easy_getinfo(eb->curl, CURLINFO_RESPONSE_CODE, status);
	return 0;
}

static int authenticate(struct etcd_backend *eb, int64_t deadline, tdr_err *err)
{
	char *body;
	long status;
	int rc;

	eb->token[0] = '\0';
	if ((rc = set_headers(eb, err)) < 0)
		return rc;
	body = tdr_etcd_req_auth(eb->user, eb->password, err);
	if (body == NULL)
		return TDR_EFAIL;
	rc = http_post(eb, "/v3/auth/authenticate", body, deadline, &status, err);
	explicit_bzero(body, strlen(body));
	free(body);
	if (rc < 0)
		return rc;
	if (status != 200) {
		char msg[200];
		int code;

		(void)tdr_etcd_parse_error(eb->resp, eb->resp_len, &code, msg, sizeof(msg));
		/* The server's message names no credential; ours names only the user. */
		return tdr_err_set(err, (status >= 500 || tdr_etcd_grpc_transient(code)) ? TDR_ETRANSIENT : TDR_EFAIL,
				   "etcd %s: authentication as user \"%s\" failed: HTTP %ld: %s", eb->endpoint_safe,
				   eb->user, status, msg[0] ? msg : "no reason given");
	}
	rc = tdr_etcd_parse_auth(eb->resp, eb->resp_len, eb->token, sizeof(eb->token), err);
	explicit_bzero(eb->resp, eb->resp_len);
	if (rc < 0)
		return rc;
	return set_headers(eb, err);
}

/*
 * A gateway call: authenticates first if needed (again once if the token
 * was refused), returns 0 on HTTP 200 with the body in eb->resp, or a
 * classified error: 5xx, 408, 429 or a transient gRPC code -> TDR_ETRANSIENT.
 * *grpc_code (may be NULL) receives the error's code, -1 if none.
 */
static int call(struct etcd_backend *eb, const char *path, const char *body, int64_t deadline, int *grpc_code,
		tdr_err *err)
{
	char msg[200];
	long status;
	int code, rc, retried = 0;

	if (grpc_code)
		*grpc_code = -1;
again:
	if (eb->user[0] && eb->token[0] == '\0' && (rc = authenticate(eb, deadline, err)) < 0)
		return rc;
	tdr_lease_count(&eb->base, 1);
	if ((rc = http_post(eb, path, body, deadline, &status, err)) < 0)
		return rc;
	if (status == 200)
		return 0;
	(void)tdr_etcd_parse_error(eb->resp, eb->resp_len, &code, msg, sizeof(msg));
	if (grpc_code)
		*grpc_code = code;
	if (status == 401 && eb->user[0] && !retried) {
		/* Tokens expire (simple tokens after --auth-token-ttl): get a new one, once. */
		log_debug("etcd %s: auth token refused (%s), authenticating again", eb->endpoint_safe, msg);
		retried = 1;
		eb->token[0] = '\0';
		goto again;
	}
	if (status == 401 || (status == 400 && eb->user[0] == '\0' && strstr(msg, "user name is empty")))
		return tdr_err_set(err, TDR_EFAIL, "etcd %s%s: authentication required or refused (%s)%s",
				   eb->endpoint_safe, path, msg[0] ? msg : "HTTP 401",
				   eb->user[0] ? "" : "; set coord.etcd_auth");
	if (status == 404 && code < 0)
		/* Plain "Not Found": no gateway at /v3/ (etcd before 3.4 served /v3beta or /v3alpha). */
		return tdr_err_set(err, TDR_EFAIL, "etcd %s%s: HTTP 404: no v3 JSON gateway there (etcd 3.4 or later?)",
				   eb->endpoint_safe, path);
	rc = (status >= 500 || status == 408 || status == 429 || tdr_etcd_grpc_transient(code)) ? TDR_ETRANSIENT
												   : TDR_EFAIL;
	return tdr_err_set(err, rc, "etcd %s%s: HTTP %ld: %s", eb->endpoint_safe, path, status,
			   msg[0] ? msg : "no reason given");
}

/* ------------------------------------------------------------ requests */

static void lease_revoke_quietly(struct etcd_backend *eb, int64_t id, int64_t deadline);

static int grant(struct etcd_backend *eb, int64_t ttl_s, int64_t deadline, int64_t *id, tdr_err *err)
{
	char *body = tdr_etcd_req_grant(ttl_s, err);
	int64_t ttl;
	int rc;

	if (body == NULL)
		return TDR_EFAIL;
	rc = call(eb, "/v3/lease/grant", body, deadline, NULL, err);
	free(body);
	if (rc == 0)
		rc = tdr_etcd_parse_grant(eb->resp, eb->resp_len, id, &ttl, err);
	if (rc == 0 && ttl < ttl_s) {
		/* A shorter lease than asked would let a holder write past its expiry. */
		lease_revoke_quietly(eb, *id, deadline);
		rc = tdr_err_set(err, TDR_EFAIL, "etcd granted a %" PRId64 " s lease for a %" PRId64 " s request", ttl,
				 ttl_s);
	}
	return rc;
}

/* Revoking a lease that no longer exists is success: what we wanted is true. */
static int lease_revoke(struct etcd_backend *eb, int64_t id, int64_t deadline, tdr_err *err)
{
	char *body = tdr_etcd_req_lease_id(id, err);
	int code, rc;

	if (body == NULL)
		return TDR_EFAIL;
	rc = call(eb, "/v3/lease/revoke", body, deadline, &code, err);
	free(body);
	if (rc < 0 && code == TDR_GRPC_NOT_FOUND)
		rc = 0;
	return rc;
}

/* Revoke a lease we no longer need; failure only leaves it to expire by itself. */
static void lease_revoke_quietly(struct etcd_backend *eb, int64_t id, int64_t deadline)
{
	int64_t floor = tdr_mono_ms() + (eb->timeout_ms < CLEANUP_MS ? eb->timeout_ms : CLEANUP_MS);
	tdr_err e;

	if (lease_revoke(eb, id, deadline > floor ? deadline : floor, &e) < 0)
		log_debug("etcd lease %" PRId64 " not revoked, it will expire: %s", id, e.msg);
}

static int keepalive(struct etcd_backend *eb, int64_t id, int64_t deadline, int64_t *ttl, tdr_err *err)
{
	char *body = tdr_etcd_req_lease_id(id, err);
	int64_t got_id;
	char msg[200];
	int rc, code;

	if (body == NULL)
		return TDR_EFAIL;
	rc = call(eb, "/v3/lease/keepalive", body, deadline, NULL, err);
	free(body);
	if (rc < 0)
		return rc;
	rc = tdr_etcd_parse_keepalive(eb->resp, eb->resp_len, &got_id, ttl, err);
	/* An error inside the stream (HTTP 200) is classified like one in the status line. */
	if (rc < 0 && tdr_etcd_parse_error(eb->resp, eb->resp_len, &code, msg, sizeof(msg)) == 0 &&
	    tdr_etcd_grpc_transient(code))
		rc = tdr_err_set(err, TDR_ETRANSIENT, "etcd lease keepalive: %s", msg);
	if (rc == 0 && *ttl > 0 && got_id != id)
		rc = tdr_err_set(err, TDR_EFAIL, "etcd lease keepalive: answer for lease %" PRId64 ", asked %" PRId64,
				 got_id, id);
	return rc;
}

/* Read one key: *found = 0 if absent, else *kv (caller clears it). */
static int get_key(struct etcd_backend *eb, const char *key, int64_t deadline, tdr_etcd_kv *kv, int *found,
		   tdr_err *err)
{
	char *body = tdr_etcd_req_range(key, strlen(key), NULL, 0, 0, err);
	tdr_etcd_kv *kvs = NULL;
	size_t n = 0;
	int rc;

	*found = 0;
	if (body == NULL)
		return TDR_EFAIL;
	rc = call(eb, "/v3/kv/range", body, deadline, NULL, err);
	free(body);
	if (rc == 0)
		rc = tdr_etcd_parse_range(eb->resp, eb->resp_len, &kvs, &n, NULL, err);
	if (rc < 0)
		return rc;
	if (n > 0 && kvs[0].key_len == strlen(key) && memcmp(kvs[0].key, key, kvs[0].key_len) == 0) {
		*kv = kvs[0];
		memset(&kvs[0], 0, sizeof(kvs[0]));
		*found = 1;
	}
	tdr_etcd_kvs_free(kvs, n);
	return 0;
}

static int txn(struct etcd_backend *eb, const char *body, int64_t deadline, int *succeeded, int64_t *rev,
	       tdr_etcd_kv *first_kv, tdr_err *err)
{
	int rc = call(eb, "/v3/kv/txn", body, deadline, NULL, err);

	if (rc == 0)
		rc = tdr_etcd_parse_txn(eb->resp, eb->resp_len, succeeded, rev, first_kv, err);
	return rc;
}

/* --------------------------------------------------------- local state */

static struct held *held_find(struct etcd_backend *eb, const char *name)
{
	for (size_t i = 0; i < eb->nheld; i++)
		if (strcmp(eb->held[i].name, name) == 0)
			return &eb->held[i];
	return NULL;
}

static void held_drop(struct etcd_backend *eb, const char *name)
{
	struct held *h = held_find(eb, name);

	if (h) {
		*h = eb->held[eb->nheld - 1];
		eb->nheld--;
	}
}

static int held_put(struct etcd_backend *eb, const char *name, int64_t lease_id, int64_t epoch, tdr_err *err)
{
	struct held *h = held_find(eb, name);

	if (h == NULL) {
		if (eb->nheld == eb->capheld) {
			size_t cap = eb->capheld ? eb->capheld * 2 : 8;
			struct held *nh = realloc(eb->held, cap * sizeof(*nh));

			if (nh == NULL)
				return tdr_err_set(err, TDR_ENOMEM, "out of memory");
			eb->held = nh;
			eb->capheld = cap;
		}
		h = &eb->held[eb->nheld++];
		snprintf(h->name, sizeof(h->name), "%s", name);
	}
	h->lease_id = lease_id;
	h->epoch = epoch;
	return 0;
}

/* Names and holders end up in keys, values and log lines: printable, bounded. */
static int valid_text(const char *s, size_t max)
{
	size_t n;

	if (s == NULL)
		return 0;
	n = strnlen(s, max);
	if (n == 0 || n >= max)
		return 0;
	for (size_t i = 0; i < n; i++)
		if ((unsigned char)s[i] < 0x20 || s[i] == 0x7f)
			return 0;
	return 1;
}

static int lease_key(struct etcd_backend *eb, const char *name, char key[KEY_MAX], tdr_err *err)
{
	if (!valid_text(name, TDR_LEASE_NAME_MAX))
		return tdr_err_set(err, TDR_EFAIL, "invalid lease name (1 to %d printable bytes)",
				   TDR_LEASE_NAME_MAX - 1);
	snprintf(key, KEY_MAX, "%slease/%s", eb->prefix, name);
	return 0;
}

/* ------------------------------------------------------------------ ops */

/*
 * Grant a lease and create key with it.  TDR_EDUP if the key exists; then
 * *cur holds it (when the server sent it back) and the caller clears it.
 */
static int try_create(struct etcd_backend *eb, const char *key, int64_t ttl_ms, int64_t deadline, int64_t *ret_id,
		      int64_t *ret_epoch, tdr_etcd_kv *cur, tdr_err *err)
{
	char *value = NULL, *body = NULL;
	int64_t id, rev;
	int ok, rc;

	rc = grant(eb, (ttl_ms + 999) / 1000, deadline, &id, err);
	if (rc < 0)
		return rc;
	value = tdr_etcd_lease_value(eb->base.holder, eb->inst, ttl_ms, err);
	if (value)
		body = tdr_etcd_req_create_txn(key, value, id, err);
	rc = body ? txn(eb, body, deadline, &ok, &rev, cur, err) : TDR_EFAIL;
	free(value);
	free(body);
	if (rc < 0 || !ok) {
		/* If an unanswered txn did create the key, revoking the lease deletes it again. */
		lease_revoke_quietly(eb, id, deadline);
		return rc < 0 ? rc : TDR_EDUP;
	}
	*ret_id = id;
	*ret_epoch = rev;
	return 0;
}

static int e_acquire(tdr_lease_backend *be, const char *name, int64_t ttl_ms, int64_t *ret_epoch, tdr_err *err)
{
	struct etcd_backend *eb = (struct etcd_backend *)be;
	int64_t deadline = tdr_mono_ms() + eb->timeout_ms, id = 0, epoch = 0;
	char key[KEY_MAX], holder[TDR_HOLDER_MAX] = "", inst[INST_MAX] = "";
	tdr_etcd_kv cur;
	struct held *old;
	int rc;

	memset(&cur, 0, sizeof(cur));
	if ((rc = lease_key(eb, name, key, err)) < 0)
		return rc;
	if (ttl_ms <= 0 || ttl_ms > ((int64_t)1 << 40))
		return tdr_err_set(err, TDR_EFAIL, "lease %s: ttl_ms %" PRId64 " out of range", name, ttl_ms);
	pthread_mutex_lock(&eb->lock);
	rc = try_create(eb, key, ttl_ms, deadline, &id, &epoch, &cur, err);
	if (rc == TDR_EDUP && cur.key != NULL) {
		tdr_err e;

		if (tdr_etcd_parse_lease_value(cur.value, cur.value_len, holder, sizeof(holder), inst, sizeof(inst),
					       &(int64_t){ 0 }, &e) < 0)
			snprintf(holder, sizeof(holder), "?");
		if (strcmp(holder, be->holder) == 0 && inst[0] && strcmp(inst, eb->inst) != 0) {
			/* A dead predecessor of ours: delete exactly its key, then compete as usual. */
			char *body = tdr_etcd_req_delete_txn(key, cur.create_revision, cur.lease, err);
			int64_t rev;
			int ok = 0;

			rc = body ? txn(eb, body, deadline, &ok, &rev, NULL, err) : TDR_EFAIL;
			free(body);
			if (rc == 0 && ok && cur.lease)
				lease_revoke_quietly(eb, cur.lease, deadline);
			tdr_etcd_kv_clear(&cur);
			if (rc == 0)
				rc = try_create(eb, key, ttl_ms, deadline, &id, &epoch, &cur, err);
			if (rc == TDR_EDUP && cur.key != NULL &&
			    tdr_etcd_parse_lease_value(cur.value, cur.value_len, holder, sizeof(holder), inst,
						       sizeof(inst), &(int64_t){ 0 }, &e) < 0)
				snprintf(holder, sizeof(holder), "?");
		}
	}
	if (rc == TDR_EDUP)
		tdr_err_set(err, TDR_EDUP, "lease %s held by %s at epoch %" PRId64, name, holder[0] ? holder : "?",
			    cur.create_revision);
	if (rc == 0) {
		old = held_find(eb, name);
		if (old && old->lease_id != id)
			lease_revoke_quietly(eb, old->lease_id, deadline); /* an earlier hold that lapsed */
		if ((rc = held_put(eb, name, id, epoch, err)) < 0)
			lease_revoke_quietly(eb, id, deadline); /* we could never renew it: give it up */
	}
	pthread_mutex_unlock(&eb->lock);
	tdr_etcd_kv_clear(&cur);
	if (rc == 0)
		*ret_epoch = epoch;
	return rc;
}

static int e_renew(tdr_lease_backend *be, const char *name, int64_t epoch, int64_t ttl_ms, tdr_err *err)
{
	struct etcd_backend *eb = (struct etcd_backend *)be;
	int64_t deadline = tdr_mono_ms() + eb->timeout_ms, ttl = 0, id;
	char key[KEY_MAX];
	struct held *h;
	tdr_etcd_kv kv;
	int rc, found = 0;

	/*
	 * ttl_ms cannot change an etcd lease: keepalive restores the TTL it was
	 * granted with (acquire's ttl_ms rounded up to seconds).  Asking for more
	 * is refused below; asking for less is safe.
	 */
	memset(&kv, 0, sizeof(kv));
	if ((rc = lease_key(eb, name, key, err)) < 0)
		return rc;
	pthread_mutex_lock(&eb->lock);
	h = held_find(eb, name);
	if (h == NULL || h->epoch != epoch) {
		rc = tdr_err_set(err, TDR_EFENCED, "lease %s epoch %" PRId64 " is not held by %s", name, epoch,
				 be->holder);
		goto out;
	}
	id = h->lease_id;
	if ((rc = keepalive(eb, id, deadline, &ttl, err)) < 0)
		goto out;
	if (ttl <= 0) {
		held_drop(eb, name);
		rc = tdr_err_set(err, TDR_EFENCED, "lease %s epoch %" PRId64 ": etcd lease expired", name, epoch);
		goto out;
	}
	if (ttl_ms > ttl * 1000) {
		/* Renewed, but for less than the caller will rely on: it must not count this as a renewal. */
		rc = tdr_err_set(err, TDR_EFAIL,
				 "lease %s: its etcd lease lasts %" PRId64 " s and cannot be renewed for %" PRId64
				 " ms; acquire it again",
				 name, ttl, ttl_ms);
		goto out;
	}
	/* Alive lease, but is the key still the one we created? (it may have been deleted or replaced) */
	if ((rc = get_key(eb, key, deadline, &kv, &found, err)) < 0)
		goto out;
	if (!found || kv.create_revision != epoch || kv.lease != id) {
		held_drop(eb, name);
		lease_revoke_quietly(eb, id, deadline);
		rc = tdr_err_set(err, TDR_EFENCED, "lease %s epoch %" PRId64 ": key %s", name, epoch,
				 found ? "now belongs to a later epoch" : "is gone");
	}
out:
	pthread_mutex_unlock(&eb->lock);
	tdr_etcd_kv_clear(&kv);
	return rc;
}

static int e_release(tdr_lease_backend *be, const char *name, int64_t epoch, tdr_err *err)
{
	struct etcd_backend *eb = (struct etcd_backend *)be;
	int64_t deadline = tdr_mono_ms() + eb->timeout_ms, id, rev;
	char key[KEY_MAX], *body;
	struct held *h;
	int rc, ok = 0;
	tdr_err e;

	if ((rc = lease_key(eb, name, key, err)) < 0)
		return rc;
	pthread_mutex_lock(&eb->lock);
	h = held_find(eb, name);
	if (h == NULL || h->epoch != epoch) {
		rc = tdr_err_set(err, TDR_EFENCED, "lease %s epoch %" PRId64 " is not held by %s", name, epoch,
				 be->holder);
		goto out;
	}
	id = h->lease_id;
	body = tdr_etcd_req_delete_txn(key, epoch, id, err);
	rc = body ? txn(eb, body, deadline, &ok, &rev, NULL, err) : TDR_EFAIL;
	free(body);
	if (lease_revoke(eb, id, deadline > tdr_mono_ms() + CLEANUP_MS ? deadline : tdr_mono_ms() + CLEANUP_MS, &e) == 0) {
		/*
		 * With our lease revoked nothing of ours remains, even if the txn's
		 * answer was lost: the release has happened either way.
		 */
		held_drop(eb, name);
		if (rc < 0)
			rc = 0;
	} else if (rc == 0) {
		log_debug("etcd lease %" PRId64 " not revoked, it will expire: %s", id, e.msg);
		held_drop(eb, name);
	}
	if (rc == 0 && !ok)
		rc = tdr_err_set(err, TDR_EFENCED, "lease %s epoch %" PRId64 ": key no longer ours", name, epoch);
out:
	pthread_mutex_unlock(&eb->lock);
	return rc;
}

struct ttl_seen {
	int64_t lease, ttl, granted;
};

/*
 * fast: for the coordinator (no timetolive).  no_parts: stop before
 * "lease/part/": keys sort "leader" < "member/..." < "part/...", so the range
 * [lease/, lease/part/) is the sessions and the leader alone, whatever P.
 */
static int list_keys(struct etcd_backend *eb, const char *prefix, int fast, int no_parts, tdr_lease_info **ret,
		     size_t *ret_n, tdr_err *err)
{
	int64_t deadline = tdr_mono_ms() + eb->timeout_ms;
	char base[KEY_MAX], end[KEY_MAX], *body;
	size_t baselen, blen, endlen, n = 0, k = 0;
	tdr_etcd_kv *kvs = NULL;
	tdr_lease_info *out = NULL;
	struct ttl_seen *ttls = NULL;
	size_t nttl = 0;
	int rc;

	if (prefix == NULL)
		prefix = "";
	if (strlen(prefix) >= TDR_LEASE_NAME_MAX)
		return tdr_err_set(err, TDR_EFAIL, "lease list: prefix too long");
	baselen = (size_t)snprintf(base, sizeof(base), "%slease/", eb->prefix);
	blen = (size_t)snprintf(base, sizeof(base), "%slease/%s", eb->prefix, prefix);
	if (tdr_etcd_prefix_end(base, blen, end, sizeof(end), &endlen) < 0)
		return tdr_err_set(err, TDR_EFAIL, "lease list: prefix too long");
	if (no_parts && prefix[0] == '\0')
		endlen = (size_t)snprintf(end, sizeof(end), "%slease/part/", eb->prefix);
	body = tdr_etcd_req_range(base, blen, end, endlen, 0, err);
	if (body == NULL)
		return TDR_EFAIL;
	pthread_mutex_lock(&eb->lock);
	rc = call(eb, "/v3/kv/range", body, deadline, NULL, err);
	free(body);
	if (rc == 0)
		rc = tdr_etcd_parse_range(eb->resp, eb->resp_len, &kvs, &n, NULL, err);
	if (rc == 0 && ((out = calloc(n ? n : 1, sizeof(*out))) == NULL ||
			(ttls = calloc(n ? n : 1, sizeof(*ttls))) == NULL))
		rc = tdr_err_set(err, TDR_ENOMEM, "out of memory");
	for (size_t i = 0; rc == 0 && i < n; i++) {
		tdr_lease_info *li = &out[k];
		const char *nm = kvs[i].key + baselen;
		int64_t ttl = 0, granted = 0, vttl = 0;
		tdr_err e;

		/* Keys outside our range or names we could not have written are not leases of ours. */
		if (kvs[i].key_len <= baselen || memcmp(kvs[i].key, base, blen) != 0 ||
		    strlen(kvs[i].key) != kvs[i].key_len || !valid_text(nm, TDR_LEASE_NAME_MAX))
			continue;
		snprintf(li->name, sizeof(li->name), "%s", nm);
		if (tdr_etcd_parse_lease_value(kvs[i].value, kvs[i].value_len, li->holder, sizeof(li->holder), NULL, 0,
					       &vttl, &e) < 0)
			li->holder[0] = '\0';
		li->epoch = kvs[i].create_revision;
		li->released = 0; /* a released lease's key is deleted */
		if (kvs[i].lease == 0) {
			/* Written without a lease (not by tdrain): it never expires. */
			li->ttl_ms = vttl;
			li->expires_in_ms = INT64_MAX;
		} else if (fast) {
			/* The key exists, so its etcd lease is alive: the server deletes a lapsed lease's keys. */
			li->ttl_ms = vttl;
			li->expires_in_ms = vttl > 0 ? vttl : 1;
		} else {
			size_t j;

			/* One timetolive per etcd lease, not per key: a session's keys share it. */
			for (j = 0; j < nttl; j++)
				if (ttls[j].lease == kvs[i].lease)
					break;
			if (j == nttl) {
				char *tb = tdr_etcd_req_lease_id(kvs[i].lease, err);

				rc = tb ? call(eb, "/v3/lease/timetolive", tb, deadline, NULL, err) : TDR_EFAIL;
				free(tb);
				if (rc == 0)
					rc = tdr_etcd_parse_timetolive(eb->resp, eb->resp_len, &ttl, &granted, err);
				if (rc < 0)
					break;
				ttls[nttl++] = (struct ttl_seen){ kvs[i].lease, ttl, granted };
			}
			ttl = ttls[j].ttl;
			granted = ttls[j].granted;
			li->ttl_ms = vttl > 0 ? vttl : granted * 1000;
			/* TTL is truncated to whole seconds: 0 means alive for less than a second. */
			li->expires_in_ms = ttl > 0 ? ttl * 1000 : ttl == 0 ? 1 : 0;
		}
		if (kvs[i].lease != 0 && kvs[i].lease == eb->sess_lease) {
			li->mine = 1;
			snprintf(li->session, sizeof(li->session), "%s", eb->sess_name);
			li->session_epoch = eb->sess_epoch;
		}
		k++;
	}
	pthread_mutex_unlock(&eb->lock);
	tdr_etcd_kvs_free(kvs, n);
	free(ttls);
	if (rc < 0) {
		free(out);
		return rc;
	}
	*ret = out;
	*ret_n = k;
	return 0;
}

static int e_list(tdr_lease_backend *be, const char *prefix, tdr_lease_info **ret, size_t *ret_n, tdr_err *err)
{
	return list_keys((struct etcd_backend *)be, prefix, 0, 0, ret, ret_n, err);
}

/* One range request: existence is liveness for attached keys. */
static int e_observe(tdr_lease_backend *be, int with_parts, tdr_lease_info **ret, size_t *ret_n, tdr_err *err)
{
	return list_keys((struct etcd_backend *)be, "", 1, !with_parts, ret, ret_n, err);
}

static int e_acquire_many(tdr_lease_backend *be, const char *session, int64_t session_epoch, int64_t ttl_ms,
			  tdr_lease_req *reqs, size_t n, tdr_err *err)
{
	struct etcd_backend *eb = (struct etcd_backend *)be;
	int64_t deadline = tdr_mono_ms() + eb->timeout_ms, lease;
	char (*keys)[KEY_MAX] = NULL;
	const char *kp[TDR_ETCD_TXN_MAX];
	int ok[TDR_ETCD_TXN_MAX];
	char *value = NULL;
	struct held *s;
	int rc = 0;

	for (size_t i = 0; i < n; i++)
		reqs[i].rc = TDR_ETRANSIENT;
	if (n == 0)
		return 0;
	pthread_mutex_lock(&eb->lock);
	s = held_find(eb, session);
	if (s == NULL || s->epoch != session_epoch) {
		rc = tdr_err_set(err, TDR_EFENCED, "session %s epoch %" PRId64 " is not held by %s", session,
				 session_epoch, be->holder);
		goto out;
	}
	lease = s->lease_id;
	snprintf(eb->sess_name, sizeof(eb->sess_name), "%s", session);
	eb->sess_epoch = session_epoch;
	eb->sess_lease = lease;
	if ((keys = calloc(TDR_ETCD_TXN_MAX, sizeof(*keys))) == NULL ||
	    (value = tdr_etcd_lease_value(be->holder, eb->inst, ttl_ms, err)) == NULL) {
		rc = keys ? TDR_EFAIL : tdr_err_set(err, TDR_ENOMEM, "out of memory");
		goto out;
	}
	for (size_t i0 = 0; i0 < n && rc == 0; i0 += TDR_ETCD_TXN_MAX) {
		size_t k = n - i0 < TDR_ETCD_TXN_MAX ? n - i0 : TDR_ETCD_TXN_MAX;
		int64_t rev = 0;
		char *body;

		for (size_t j = 0; j < k && rc == 0; j++) {
			rc = lease_key(eb, reqs[i0 + j].name, keys[j], err);
			kp[j] = keys[j];
		}
		if (rc < 0)
			break;
		body = tdr_etcd_req_create_many_txn(kp, value, k, lease, err);
		rc = body ? call(eb, "/v3/kv/txn", body, deadline, NULL, err) : TDR_EFAIL;
		free(body);
		if (rc == 0)
			rc = tdr_etcd_parse_txn_many(eb->resp, eb->resp_len, k, ok, &rev, err);
		if (rc < 0)
			break; /* this chunk and the rest: unknown; an unanswered create is adopted from the next read */
		for (size_t j = 0; j < k; j++) {
			tdr_lease_req *r = &reqs[i0 + j];

			if (!ok[j]) {
				r->rc = TDR_EDUP;
				continue;
			}
			/* Every key a txn creates has the txn's revision as its create_revision: the epoch. */
			if (held_put(eb, r->name, lease, rev, err) < 0)
				continue; /* not recorded: stays ETRANSIENT, and expires with the session */
			r->epoch = rev;
			r->rc = 0;
		}
	}
out:
	pthread_mutex_unlock(&eb->lock);
	free(keys);
	free(value);
	return rc;
}

static int e_release_many(tdr_lease_backend *be, tdr_lease_req *reqs, size_t n, tdr_err *err)
{
	struct etcd_backend *eb = (struct etcd_backend *)be;
	int64_t deadline = tdr_mono_ms() + eb->timeout_ms, lease = 0;
	char (*keys)[KEY_MAX] = NULL;
	const char *kp[TDR_ETCD_TXN_MAX];
	int64_t revs[TDR_ETCD_TXN_MAX];
	int ok[TDR_ETCD_TXN_MAX];
	int rc = 0;

	if (n == 0)
		return 0;
	if ((keys = calloc(TDR_ETCD_TXN_MAX, sizeof(*keys))) == NULL)
		return tdr_err_set(err, TDR_ENOMEM, "out of memory");
	pthread_mutex_lock(&eb->lock);
	for (size_t i0 = 0; i0 < n && rc == 0; i0 += TDR_ETCD_TXN_MAX) {
		size_t k = 0;
		int64_t rev;
		char *body;

		for (size_t j = i0; j < n && j < i0 + TDR_ETCD_TXN_MAX; j++) {
			struct held *h = held_find(eb, reqs[j].name);

			reqs[j].rc = 0;
			if (h == NULL || h->epoch != reqs[j].epoch || lease_key(eb, reqs[j].name, keys[k], NULL) < 0)
				continue; /* not ours at that epoch: nothing to give back */
			lease = h->lease_id;
			revs[k] = reqs[j].epoch;
			kp[k] = keys[k];
			k++;
			held_drop(eb, reqs[j].name);
		}
		if (k == 0)
			continue;
		/* Attached keys share the session's lease: the LEASE compare keeps it to keys we created. */
		body = tdr_etcd_req_delete_many_txn(kp, revs, k, lease, err);
		rc = body ? call(eb, "/v3/kv/txn", body, deadline, NULL, err) : TDR_EFAIL;
		free(body);
		if (rc == 0)
			rc = tdr_etcd_parse_txn_many(eb->resp, eb->resp_len, k, ok, &rev, err);
	}
	pthread_mutex_unlock(&eb->lock);
	free(keys);
	for (size_t i = 0; rc < 0 && i < n; i++)
		reqs[i].rc = rc;
	return rc;
}

static void e_destroy(tdr_lease_backend *be)
{
	struct etcd_backend *eb = (struct etcd_backend *)be;

	/* Leases we still hold are left to expire: destroying a backend is not a release. */
	if (eb->curl)
		curl_easy_cleanup(eb->curl);
	curl_slist_free_all(eb->headers);
	pthread_mutex_destroy(&eb->lock);
	free(eb->held);
	if (eb->resp)
		explicit_bzero(eb->resp, eb->resp_cap);
	free(eb->resp);
	explicit_bzero(eb, sizeof(*eb));
	free(eb);
}

static const struct tdr_lease_ops etcd_ops = {
	.acquire = e_acquire,
	.renew = e_renew,
	.release = e_release,
	.list = e_list,
	.acquire_many = e_acquire_many,
	.release_many = e_release_many,
	.observe = e_observe,
	.destroy = e_destroy,
};

int tdr_lease_etcd_new(tdr_lease_backend **ret, const struct tdr_config *cfg, const char *holder, tdr_err *err)
{
	struct etcd_backend *eb;
	const char *colon;
	size_t n;
	uint64_t r = 0;
	int rc;

	pthread_once(&curl_once, curl_init_once);
	if (curl_init_rc != CURLE_OK)
		return tdr_err_set(err, TDR_EFAIL, "libcurl initialisation failed: %s", curl_easy_strerror(curl_init_rc));
	if (!valid_text(holder, TDR_HOLDER_MAX))
		return tdr_err_set(err, TDR_ECONFIG, "invalid holder name (1 to %d printable bytes)", TDR_HOLDER_MAX - 1);
	if (strncmp(cfg->etcd_endpoint, "http://", 7) != 0 && strncmp(cfg->etcd_endpoint, "https://", 8) != 0)
		return tdr_err_set(err, TDR_ECONFIG, "coord.etcd_endpoint must start with http:// or https://");
	if (strnlen(cfg->etcd_prefix, sizeof(cfg->etcd_prefix)) + strlen("lease/") + TDR_LEASE_NAME_MAX >= KEY_MAX)
		return tdr_err_set(err, TDR_ECONFIG, "coord.etcd_prefix is too long");
	if ((eb = calloc(1, sizeof(*eb))) == NULL)
		return tdr_err_set(err, TDR_ENOMEM, "out of memory");
	snprintf(eb->endpoint, sizeof(eb->endpoint), "%s", cfg->etcd_endpoint);
	n = strlen(eb->endpoint);
	while (n > 0 && eb->endpoint[n - 1] == '/')
		eb->endpoint[--n] = '\0';
	tdr_redact_uri(eb->endpoint, eb->endpoint_safe, sizeof(eb->endpoint_safe));
	snprintf(eb->prefix, sizeof(eb->prefix), "%s", cfg->etcd_prefix);
	if (cfg->etcd_auth[0]) {
		colon = strchr(cfg->etcd_auth, ':');
		if (colon == NULL || colon == cfg->etcd_auth || (size_t)(colon - cfg->etcd_auth) >= sizeof(eb->user)) {
			free(eb);
			return tdr_err_set(err, TDR_ECONFIG, "coord.etcd_auth must be user:password");
		}
		memcpy(eb->user, cfg->etcd_auth, (size_t)(colon - cfg->etcd_auth));
		snprintf(eb->password, sizeof(eb->password), "%s", colon + 1);
	}
	eb->timeout_ms = cfg->store_timeout_ms > 0 ? cfg->store_timeout_ms : 5000;
	/* Tells this incarnation from an earlier process that used the same holder name. */
	if (getrandom(&r, sizeof(r), 0) != sizeof(r))
		r = (uint64_t)tdr_wall_ms() ^ ((uint64_t)getpid() << 32) ^ (uint64_t)tdr_mono_us();
	snprintf(eb->inst, sizeof(eb->inst), "%016" PRIx64, r);
	eb->base.ops = &etcd_ops;
	snprintf(eb->base.holder, sizeof(eb->base.holder), "%s", holder);
	if (pthread_mutex_init(&eb->lock, NULL) != 0) {
		explicit_bzero(eb, sizeof(*eb));
		free(eb);
		return tdr_err_set(err, TDR_EFAIL, "pthread_mutex_init failed");
	}
	eb->curl = curl_easy_init();
	if (eb->curl == NULL) {
		e_destroy(&eb->base);
		return tdr_err_set(err, TDR_ENOMEM, "curl_easy_init failed");
	}
	if ((rc = set_headers(eb, err)) < 0) {
		e_destroy(&eb->base);
		return rc;
	}
	/* Signals are the daemon's: curl must not install SIGALRM for timeouts from a worker thread. */
	curl_easy_setopt(eb->curl, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(eb->curl, CURLOPT_POST, 1L);
	curl_easy_setopt(eb->curl, CURLOPT_WRITEFUNCTION, on_write);
	curl_easy_setopt(eb->curl, CURLOPT_WRITEDATA, eb);
	curl_easy_setopt(eb->curl, CURLOPT_ERRORBUFFER, eb->curl_err);
	curl_easy_setopt(eb->curl, CURLOPT_FOLLOWLOCATION, 0L);
	curl_easy_setopt(eb->curl, CURLOPT_SSL_VERIFYPEER, 1L);
	curl_easy_setopt(eb->curl, CURLOPT_SSL_VERIFYHOST, 2L);
	curl_easy_setopt(eb->curl, CURLOPT_TCP_KEEPALIVE, 1L);
#if LIBCURL_VERSION_NUM >= 0x075500
	curl_easy_setopt(eb->curl, CURLOPT_PROTOCOLS_STR, "http,https");
#else
	curl_easy_setopt(eb->curl, CURLOPT_PROTOCOLS, (long)(CURLPROTO_HTTP | CURLPROTO_HTTPS));
#endif
	*ret = &eb->base;
	return 0;
}
