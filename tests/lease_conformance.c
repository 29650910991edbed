/*
 * lease_conformance.c - one test suite for the lease contract (coord/lease.h),
 * run unchanged against every backend:
 *
 *   lease_conformance --backend etcd --endpoint http://127.0.0.1:PORT [--auth user:pass] [--prefix /p/]
 *   lease_conformance --backend mongo --uri mongodb://127.0.0.1:PORT --db NAME
 *   common: [--ttl MS] (default 2000)
 *
 * Replicas are simulated by several backend instances with distinct holder
 * names in this one process; each uses its own connection like a replica
 * would.  Output is TAP.  Timing checks are bounds on behaviour, never
 * performance targets; measured figures are printed with diag().
 */
#include "config.h"

#include <arpa/inet.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "coord/lease.h"
#include "lib/clock.h"
#include "lib/conf.h"
#include "lib/log.h"
#include "lib/store.h"
#include "tests/unit/tap.h"

#define RACERS 8
#define RACE_ROUNDS 5
#define HANDOFFS 20
/* Takeover after expiry: not earlier than ttl - LOW_MARGIN, not later than ttl + HIGH_MARGIN. */
#define LOW_MARGIN_MS 50
#define HIGH_MARGIN_MS 1500
#define POLL_MS 25

enum { B_ETCD, B_MONGO };

struct suite {
	int kind;
	tdr_config cfg;
	tdr_store *store;
	int64_t ttl;
	char run[24]; /* this run's name prefix, so runs against one server never meet */
};

static const char *errname(int rc)
{
	switch (rc) {
	case 0:
		return "OK";
	case TDR_EFAIL:
		return "EFAIL";
	case TDR_ETRANSIENT:
		return "ETRANSIENT";
	case TDR_EFENCED:
		return "EFENCED";
	case TDR_EDUP:
		return "EDUP";
	case TDR_ECONFIG:
		return "ECONFIG";
	case TDR_ENOMEM:
		return "ENOMEM";
	default:
		return "?";
	}
}

static int new_backend_cfg(struct suite *s, const tdr_config *cfg, tdr_store *store, const char *holder,
			   tdr_lease_backend **be, tdr_err *err)
{
	if (s->kind == B_ETCD)
		return tdr_lease_etcd_new(be, cfg, holder, err);
	return tdr_lease_mongo_new(be, store, holder, err);
}

static tdr_lease_backend *new_backend(struct suite *s, const char *holder)
{
	tdr_lease_backend *be = NULL;
	tdr_err err;

	if (new_backend_cfg(s, &s->cfg, s->store, holder, &be, &err) < 0) {
		printf("Bail out! cannot create backend for holder %s: %s\n", holder, err.msg);
		return NULL;
	}
	return be;
}

static void lname(const struct suite *s, char *buf, size_t len, const char *what)
{
	snprintf(buf, len, "%s/%s", s->run, what);
}

static int acquire(tdr_lease_backend *be, const char *name, int64_t ttl, int64_t *epoch, tdr_err *err)
{
	return be->ops->acquire(be, name, ttl, epoch, err);
}

static int renew(tdr_lease_backend *be, const char *name, int64_t epoch, int64_t ttl, tdr_err *err)
{
	return be->ops->renew(be, name, epoch, ttl, err);
}

static int release(tdr_lease_backend *be, const char *name, int64_t epoch, tdr_err *err)
{
	return be->ops->release(be, name, epoch, err);
}

/* Find name in a list() result; NULL if absent. */
static const tdr_lease_info *find_info(const tdr_lease_info *v, size_t n, const char *name)
{
	for (size_t i = 0; i < n; i++)
		if (strcmp(v[i].name, name) == 0)
			return &v[i];
	return NULL;
}

/* ---------------------------------------------------------------- cases */

static void case_basic(struct suite *s, tdr_lease_backend *a, tdr_lease_backend *b, tdr_lease_backend *c)
{
	char name[TDR_LEASE_NAME_MAX];
	int64_t e1 = 0, e2 = 0, ex = 0;
	tdr_lease_info *li = NULL;
	const tdr_lease_info *me;
	size_t n = 0;
	tdr_err err;
	int rc;

	lname(s, name, sizeof(name), "basic");
	rc = acquire(a, name, s->ttl, &e1, &err);
	ok(rc == 0 && e1 > 0, "a acquires a free lease: epoch %" PRId64 " > 0 (%s%s%s)", e1, errname(rc),
	   rc ? ": " : "", rc ? err.msg : "");
	rc = acquire(b, name, s->ttl, &ex, &err);
	ok(rc == TDR_EDUP, "b cannot acquire the lease a holds: %s (%s)", errname(rc), rc ? err.msg : "");
	rc = renew(a, name, e1, s->ttl, &err);
	ok(rc == 0, "a renews its lease: %s%s%s", errname(rc), rc ? ": " : "", rc ? err.msg : "");
	rc = renew(b, name, e1, s->ttl, &err);
	ok(rc == TDR_EFENCED, "b cannot renew a's lease at a's epoch: %s", errname(rc));
	rc = release(b, name, e1, &err);
	ok(rc == TDR_EFENCED, "b cannot release a's lease at a's epoch: %s", errname(rc));
	rc = renew(a, name, e1, s->ttl, &err);
	ok(rc == 0, "a still holds it after b's attempts: %s%s%s", errname(rc), rc ? ": " : "", rc ? err.msg : "");

	rc = c->ops->list(c, s->run, &li, &n, &err);
	me = rc == 0 ? find_info(li, n, name) : NULL;
	ok(me && strcmp(me->holder, "a") == 0 && me->epoch == e1 && !me->released && me->expires_in_ms > 0 &&
		   me->ttl_ms == s->ttl,
	   "list (by a third replica) shows holder a, epoch %" PRId64 ", ttl %" PRId64 ", unexpired: %s", e1, s->ttl,
	   me ? "found" : rc ? err.msg : "not found");
	if (me)
		diag("list: name=%s holder=%s epoch=%" PRId64 " ttl_ms=%" PRId64 " expires_in_ms=%" PRId64
		     " released=%d",
		     me->name, me->holder, me->epoch, me->ttl_ms, me->expires_in_ms, me->released);
	free(li);
	li = NULL;
	rc = c->ops->list(c, "no-such-prefix-", &li, &n, &err);
	ok(rc == 0 && n == 0, "list of an unused prefix is empty (%zu)", n);
	free(li);
	li = NULL;

	rc = release(a, name, e1, &err);
	ok(rc == 0, "a releases its lease: %s%s%s", errname(rc), rc ? ": " : "", rc ? err.msg : "");
	rc = c->ops->list(c, s->run, &li, &n, &err);
	me = rc == 0 ? find_info(li, n, name) : NULL;
	ok(rc == 0 && (me == NULL || me->released || me->expires_in_ms <= 0),
	   "after release list shows it absent or released: %s", rc ? err.msg : me ? "released" : "absent");
	free(li);
	li = NULL;

	int64_t t0 = tdr_mono_ms();

	rc = acquire(b, name, s->ttl, &e2, &err);
	ok(rc == 0 && e2 > e1, "b acquires the released lease at once (%" PRId64 " ms) with a greater epoch %" PRId64
			       " > %" PRId64 ": %s",
	   tdr_mono_ms() - t0, e2, e1, rc ? err.msg : "OK");
	rc = renew(a, name, e1, s->ttl, &err);
	ok(rc == TDR_EFENCED, "a's renew of its old epoch is fenced: %s", errname(rc));
	rc = release(a, name, e1, &err);
	ok(rc == TDR_EFENCED, "a's release of its old epoch is fenced: %s", errname(rc));
	rc = renew(b, name, e2, s->ttl, &err);
	ok(rc == 0, "b's hold is untouched by a's stale calls: %s%s%s", errname(rc), rc ? ": " : "",
	   rc ? err.msg : "");
	rc = release(b, name, e2, &err);
	ok(rc == 0, "b releases: %s", errname(rc));
	rc = release(b, name, e2, &err);
	ok(rc == TDR_EFENCED, "releasing twice is fenced the second time: %s", errname(rc));
}

static int64_t takeover_ms = -1, takeover_send_ms = -1;

static void case_expiry(struct suite *s, tdr_lease_backend *a, tdr_lease_backend *b)
{
	char name[TDR_LEASE_NAME_MAX];
	int64_t ea = 0, eb = 0, t_sent, t_try, t_got = -1, t_got_send = -1, deadline;
	int attempts = 0, rc = -1, others = 0;
	tdr_err err;

	lname(s, name, sizeof(name), "expiry");
	/* The lease can outlive its holder's silence by no more than ttl from the moment the holder SENT. */
	t_sent = tdr_mono_ms();
	rc = acquire(a, name, s->ttl, &ea, &err);
	ok(rc == 0, "expiry: a acquires (epoch %" PRId64 ") and then stops renewing: %s", ea, rc ? err.msg : "OK");
	if (rc < 0)
		return;
	deadline = t_sent + s->ttl + HIGH_MARGIN_MS + 2000;
	while (tdr_mono_ms() < deadline) {
		t_try = tdr_mono_ms();
		rc = acquire(b, name, s->ttl, &eb, &err);
		attempts++;
		if (rc == 0) {
			t_got = tdr_mono_ms() - t_sent;
			t_got_send = t_try - t_sent;
			break;
		}
		if (rc != TDR_EDUP) {
			others++;
			diag("expiry: b's attempt %d: %s: %s", attempts, errname(rc), err.msg);
		}
		tdr_sleep_ms(POLL_MS, NULL);
	}
	takeover_ms = t_got;
	takeover_send_ms = t_got_send;
	ok(t_got >= 0 && others == 0, "expiry: b takes the lease over after a goes silent (%d attempts, %d not EDUP)",
	   attempts, others);
	ok(t_got < 0 || t_got >= s->ttl - LOW_MARGIN_MS,
	   "expiry: not before ttl - %d ms: taken %" PRId64 " ms after a's last send (ttl %" PRId64 ")",
	   LOW_MARGIN_MS, t_got, s->ttl);
	ok(t_got >= 0 && t_got <= s->ttl + HIGH_MARGIN_MS,
	   "expiry: within ttl + %d ms: taken %" PRId64 " ms after a's last send", HIGH_MARGIN_MS, t_got);
	diag("expiry takeover: %" PRId64 " ms after the holder's last send (successful attempt sent at %" PRId64
	     " ms), ttl %" PRId64 " ms",
	     t_got, t_got_send, s->ttl);
	ok(t_got < 0 || eb > ea, "expiry: the new epoch %" PRId64 " exceeds the expired one %" PRId64, eb, ea);
	rc = renew(a, name, ea, s->ttl, &err);
	ok(rc == TDR_EFENCED, "expiry: the silent holder's late renew is fenced: %s", errname(rc));
	if (t_got >= 0)
		(void)release(b, name, eb, &err);
}

static void case_handoffs(struct suite *s, tdr_lease_backend **rep, int nrep)
{
	char name[TDR_LEASE_NAME_MAX];
	int64_t prev = 0, first = 0, e;
	int acquired = 0, increasing = 1, released = 0;
	tdr_err err;

	lname(s, name, sizeof(name), "handoff");
	for (int i = 0; i < HANDOFFS; i++) {
		tdr_lease_backend *be = rep[i % nrep];
		int rc = acquire(be, name, s->ttl, &e, &err);

		if (rc < 0) {
			diag("handoff %d: %s acquire: %s: %s", i, be->holder, errname(rc), err.msg);
			continue;
		}
		acquired++;
		if (i == 0)
			first = e;
		if (e <= prev)
			increasing = 0;
		prev = e;
		if (renew(be, name, e, s->ttl, &err) == 0 && release(be, name, e, &err) == 0)
			released++;
		else
			diag("handoff %d: %s renew/release: %s", i, be->holder, err.msg);
	}
	ok(acquired == HANDOFFS && released == HANDOFFS, "handoffs: %d of %d acquisitions and %d releases succeeded",
	   acquired, HANDOFFS, released);
	ok(acquired == HANDOFFS && increasing, "handoffs: epochs strictly increase over %d handoffs (%" PRId64
					      " .. %" PRId64 ")",
	   HANDOFFS, first, prev);
}

/* Racers wait on one start signal so their acquires hit the store together. */
struct start_gate {
	pthread_mutex_t mu;
	pthread_cond_t cv;
	int open;
};

struct racer {
	tdr_lease_backend *be;
	struct start_gate *gate;
	const char *name;
	int64_t ttl, epoch;
	int rc;
	tdr_err err;
};

static void *race_main(void *arg)
{
	struct racer *r = arg;

	pthread_mutex_lock(&r->gate->mu);
	while (!r->gate->open)
		pthread_cond_wait(&r->gate->cv, &r->gate->mu);
	pthread_mutex_unlock(&r->gate->mu);
	r->rc = r->be->ops->acquire(r->be, r->name, r->ttl, &r->epoch, &r->err);
	return NULL;
}

static void case_race(struct suite *s)
{
	tdr_lease_backend *be[RACERS] = { 0 };
	struct racer r[RACERS];
	pthread_t th[RACERS];
	char name[TDR_LEASE_NAME_MAX], holder[16];
	int one_each = 1, losers_dup = 1, setup = 1, rounds = 0;
	int64_t last_epoch = 0;
	int epochs_up = 1;
	tdr_err err;

	lname(s, name, sizeof(name), "race");
	for (int i = 0; i < RACERS; i++) {
		snprintf(holder, sizeof(holder), "r%d", i);
		if ((be[i] = new_backend(s, holder)) == NULL)
			setup = 0;
	}
	for (int round = 0; setup && round < RACE_ROUNDS; round++) {
		int winners = 0, w = -1, started = 0;

		struct start_gate gate = { PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0 };

		for (int i = 0; i < RACERS; i++) {
			r[i] = (struct racer){ .be = be[i], .gate = &gate, .name = name, .ttl = s->ttl, .rc = 1 };
			if (pthread_create(&th[i], NULL, race_main, &r[i]) != 0) {
				r[i].rc = TDR_EFAIL;
				snprintf(r[i].err.msg, sizeof(r[i].err.msg), "pthread_create failed");
				continue;
			}
			started |= 1 << i;
		}
		tdr_sleep_ms(20, NULL); /* let every thread reach the gate */
		pthread_mutex_lock(&gate.mu);
		gate.open = 1;
		pthread_cond_broadcast(&gate.cv);
		pthread_mutex_unlock(&gate.mu);
		for (int i = 0; i < RACERS; i++)
			if (started & (1 << i))
				pthread_join(th[i], NULL);
		pthread_mutex_destroy(&gate.mu);
		pthread_cond_destroy(&gate.cv);
		for (int i = 0; i < RACERS; i++) {
			if (r[i].rc == 0) {
				winners++;
				w = i;
			} else if (r[i].rc != TDR_EDUP) {
				losers_dup = 0;
				diag("race round %d: %s got %s: %s", round, be[i]->holder, errname(r[i].rc), r[i].err.msg);
			}
		}
		if (winners != 1) {
			one_each = 0;
			diag("race round %d: %d winners", round, winners);
		}
		if (w >= 0) {
			if (r[w].epoch <= last_epoch)
				epochs_up = 0;
			last_epoch = r[w].epoch;
			diag("race round %d: %s won epoch %" PRId64, round, be[w]->holder, r[w].epoch);
			for (int i = 0; i < RACERS; i++)
				if (r[i].rc == 0 && release(be[i], name, r[i].epoch, &err) < 0)
					diag("race round %d: release by %s: %s", round, be[i]->holder, err.msg);
		}
		rounds++;
	}
	ok(setup && rounds == RACE_ROUNDS && one_each,
	   "race: %d threads acquiring one free lease at once: exactly one winner in each of %d rounds", RACERS,
	   rounds);
	ok(setup && losers_dup, "race: every loser gets TDR_EDUP");
	ok(setup && epochs_up, "race: winners' epochs increase round after round");
	for (int i = 0; i < RACERS; i++)
		tdr_lease_backend_free(be[i]);
}

static void case_held(struct suite *s, tdr_lease_backend *a, tdr_lease_backend *b)
{
	char name[TDR_LEASE_NAME_MAX];
	int64_t e = 0, ex, start, last_renew, until;
	int rc, attempts = 0, stolen = 0, other = 0, renews = 0, renew_fail = 0;
	tdr_err err;

	lname(s, name, sizeof(name), "held");
	rc = acquire(a, name, s->ttl, &e, &err);
	ok(rc == 0, "held: a acquires (epoch %" PRId64 "): %s", e, rc ? err.msg : "OK");
	if (rc < 0)
		return;
	start = last_renew = tdr_mono_ms();
	until = start + s->ttl + s->ttl / 2;
	while (tdr_mono_ms() < until) {
		if (tdr_mono_ms() - last_renew >= s->ttl / 4) {
			int64_t sent = tdr_mono_ms();

			renews++;
			if (renew(a, name, e, s->ttl, &err) == 0)
				last_renew = sent;
			else {
				renew_fail++;
				diag("held: renew: %s", err.msg);
			}
		}
		rc = acquire(b, name, s->ttl, &ex, &err);
		attempts++;
		if (rc == 0) {
			stolen++;
			diag("held: b acquired a held lease at epoch %" PRId64 " after %" PRId64 " ms", ex,
			     tdr_mono_ms() - start);
			(void)release(b, name, ex, &err);
		} else if (rc != TDR_EDUP) {
			other++;
			diag("held: b's attempt: %s: %s", errname(rc), err.msg);
		}
		tdr_sleep_ms(100, NULL);
	}
	ok(renews > 0 && renew_fail == 0, "held: every one of a's %d renewals (each ttl/4) succeeded", renews);
	ok(stolen == 0 && other == 0,
	   "held: b's %d acquire attempts over 1.5 x ttl all got TDR_EDUP while a kept renewing", attempts);
	(void)release(a, name, e, &err);
}

/* A replica restarted under the same name takes its own lease over at once; the old incarnation is fenced. */
static void case_restart(struct suite *s, tdr_lease_backend *a)
{
	char name[TDR_LEASE_NAME_MAX];
	tdr_lease_backend *a2 = new_backend(s, a->holder);
	int64_t e1 = 0, e2 = 0, t0;
	int rc;
	tdr_err err;

	lname(s, name, sizeof(name), "restart");
	rc = acquire(a, name, s->ttl, &e1, &err);
	t0 = tdr_mono_ms();
	rc = (rc == 0 && a2) ? acquire(a2, name, s->ttl, &e2, &err) : -1;
	ok(rc == 0 && e2 > e1, "restart: a new incarnation of holder a takes a's lease at once (%" PRId64
			       " ms), epoch %" PRId64 " > %" PRId64 ": %s",
	   tdr_mono_ms() - t0, e2, e1, rc ? err.msg : "OK");
	rc = renew(a, name, e1, s->ttl, &err);
	ok(rc == TDR_EFENCED, "restart: the old incarnation's renew is fenced: %s", errname(rc));
	if (a2) {
		(void)release(a2, name, e2, &err);
		tdr_lease_backend_free(a2);
	}
}

/* A bound socket that does not listen: connecting to it is refused at once. */
static int closed_port(int *fd)
{
	struct sockaddr_in sa;
	socklen_t len = sizeof(sa);

	*fd = socket(AF_INET, SOCK_STREAM, 0);
	if (*fd < 0)
		return -1;
	memset(&sa, 0, sizeof(sa));
	sa.sin_family = AF_INET;
	sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (bind(*fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 || getsockname(*fd, (struct sockaddr *)&sa, &len) < 0) {
		close(*fd);
		*fd = -1;
		return -1;
	}
	return ntohs(sa.sin_port);
}

static void case_unreachable(struct suite *s)
{
	tdr_config cfg = s->cfg;
	tdr_store *st = NULL;
	tdr_lease_backend *be = NULL;
	int64_t e, t0, took = -1;
	int fd, port = closed_port(&fd), rc = 1;
	tdr_err err;

	cfg.store_timeout_ms = 1000;
	if (port > 0) {
		if (s->kind == B_ETCD)
			snprintf(cfg.etcd_endpoint, sizeof(cfg.etcd_endpoint), "http://127.0.0.1:%d", port);
		else
			snprintf(cfg.store_uri, sizeof(cfg.store_uri), "mongodb://127.0.0.1:%d/", port);
		if ((s->kind == B_ETCD || tdr_store_open(&st, &cfg, "lease_conformance", &err) == 0) &&
		    new_backend_cfg(s, &cfg, st, "d", &be, &err) == 0) {
			t0 = tdr_mono_ms();
			rc = acquire(be, "unreachable", s->ttl, &e, &err);
			took = tdr_mono_ms() - t0;
		}
	}
	ok(rc == TDR_ETRANSIENT && took <= cfg.store_timeout_ms + 1500,
	   "unreachable store: acquire fails TDR_ETRANSIENT within store.timeout_ms (%s after %" PRId64 " ms)",
	   errname(rc), took);
	tdr_lease_backend_free(be);
	tdr_store_close(st);
	if (fd >= 0)
		close(fd);
}

/* libmongoc's own handler writes to stdout, which is our TAP stream: route it through lib/log.h. */
static void on_mongoc_log(mongoc_log_level_t level, const char *domain, const char *message, void *data)
{
	int prio = level <= MONGOC_LOG_LEVEL_ERROR ? LOG_ERR : level == MONGOC_LOG_LEVEL_WARNING ? LOG_WARNING
												: LOG_DEBUG;

	(void)data;
	if (level == MONGOC_LOG_LEVEL_TRACE)
		return;
	tdr_log(prio, "mongoc %s: %s", domain, message);
}

static void usage(void)
{
	fprintf(stderr, "usage: lease_conformance --backend etcd --endpoint URL [--auth user:pass] [--prefix P] "
			"[--ttl MS] [--log-level L]\n"
			"       lease_conformance --backend mongo --uri URI --db NAME [--ttl MS] [--log-level L]\n");
}

int main(int argc, char **argv)
{
	struct suite s;
	const char *backend = NULL, *endpoint = NULL, *uri = NULL, *db = NULL, *auth = NULL, *prefix = NULL;
	tdr_lease_backend *a = NULL, *b = NULL, *c = NULL;
	tdr_err err;
	int rc = 1, loglevel = LOG_WARNING;

	memset(&s, 0, sizeof(s));
	s.ttl = 2000;
	for (int i = 1; i < argc; i += 2) {
		const char *v = i + 1 < argc ? argv[i + 1] : NULL;

		if (v == NULL) {
			usage();
			return 2;
		}
		if (strcmp(argv[i], "--backend") == 0)
			backend = v;
		else if (strcmp(argv[i], "--endpoint") == 0)
			endpoint = v;
		else if (strcmp(argv[i], "--uri") == 0)
			uri = v;
		else if (strcmp(argv[i], "--db") == 0)
			db = v;
		else if (strcmp(argv[i], "--auth") == 0)
			auth = v;
		else if (strcmp(argv[i], "--prefix") == 0)
			prefix = v;
		else if (strcmp(argv[i], "--ttl") == 0)
			s.ttl = strtoll(v, NULL, 10);
		else if (strcmp(argv[i], "--log-level") == 0)
			loglevel = tdr_log_level_parse(v);
		else {
			usage();
			return 2;
		}
	}
	if (backend == NULL || s.ttl < 1000 || loglevel < 0 || (strcmp(backend, "etcd") == 0 && endpoint == NULL) ||
	    (strcmp(backend, "mongo") == 0 && (uri == NULL || db == NULL)) ||
	    (strcmp(backend, "etcd") != 0 && strcmp(backend, "mongo") != 0)) {
		usage();
		return 2;
	}
	setvbuf(stdout, NULL, _IOLBF, 0);
	tdr_log_init("lease_conformance", loglevel);
	mongoc_log_set_handler(on_mongoc_log, NULL);
	tdr_config_defaults(&s.cfg);
	s.cfg.store_timeout_ms = 3000;
	s.cfg.lease_ttl_ms = s.ttl;
	/* Unique per run: pid and time, so reruns against one server do not collide. */
	snprintf(s.run, sizeof(s.run), "c%x.%x", (unsigned)getpid() & 0xfffff, (unsigned)(tdr_wall_ms() & 0xffffff));
	if (strcmp(backend, "etcd") == 0) {
		s.kind = B_ETCD;
		snprintf(s.cfg.etcd_endpoint, sizeof(s.cfg.etcd_endpoint), "%s", endpoint);
		snprintf(s.cfg.etcd_prefix, sizeof(s.cfg.etcd_prefix), "%s", prefix ? prefix : "/tdrain-conformance/");
		if (auth)
			snprintf(s.cfg.etcd_auth, sizeof(s.cfg.etcd_auth), "%s", auth);
		diag("backend etcd at %s, prefix %s%s, ttl %" PRId64 " ms, run %s", endpoint, s.cfg.etcd_prefix,
		     auth ? ", with auth" : "", s.ttl, s.run);
	} else {
		char safe[1024];

		s.kind = B_MONGO;
		snprintf(s.cfg.store_uri, sizeof(s.cfg.store_uri), "%s", uri);
		snprintf(s.cfg.store_db, sizeof(s.cfg.store_db), "%s", db);
		tdr_redact_uri(uri, safe, sizeof(safe));
		if (tdr_store_open(&s.store, &s.cfg, "lease_conformance", &err) < 0 ||
		    tdr_store_ping(s.store, &err) < 0 || tdr_store_ensure_indexes(s.store, &err) < 0) {
			printf("Bail out! store %s: %s\n", safe, err.msg);
			goto out;
		}
		diag("backend mongo at %s, db %s, ttl %" PRId64 " ms, run %s", safe, db, s.ttl, s.run);
	}
	if ((a = new_backend(&s, "a")) == NULL || (b = new_backend(&s, "b")) == NULL ||
	    (c = new_backend(&s, "c")) == NULL)
		goto out;

	case_basic(&s, a, b, c);
	case_expiry(&s, a, b);
	{
		tdr_lease_backend *rep[3] = { a, b, c };

		case_handoffs(&s, rep, 3);
	}
	case_race(&s);
	case_held(&s, a, b);
	case_restart(&s, a);
	case_unreachable(&s);
	diag("summary: backend=%s ttl_ms=%" PRId64 " takeover_ms=%" PRId64 " (attempt sent at %" PRId64
	     " ms) bounds=[%" PRId64 ", %" PRId64 "]",
	     backend, s.ttl, takeover_ms, takeover_send_ms, s.ttl - LOW_MARGIN_MS, s.ttl + HIGH_MARGIN_MS);
	rc = tap_done();
out:
	tdr_lease_backend_free(a);
	tdr_lease_backend_free(b);
	tdr_lease_backend_free(c);
	if (s.store) {
		tdr_store_close(s.store);
		mongoc_cleanup();
	}
	return rc;
}
