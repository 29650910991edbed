/*
 * coord.c - the coordinator thread.  See coord.h for the contract and
 * docs/DESIGN.md ("Leases", "Partitions") for why it is safe.
 */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "coord/assign.h"
#include "coord/coord.h"
#include "lib/clock.h"
#include "lib/log.h"

enum held_kind { HELD_LEADER, HELD_MEMBER, HELD_PART };

struct held {
	char name[TDR_LEASE_NAME_MAX];
	enum held_kind kind;
	int32_t part;
	int64_t epoch;
	int64_t valid_until; /* monotonic ms: last renewal SENT + renew deadline */
	int draining;
	int idle;
	int renew_failing;
};

struct tdr_coord {
	tdr_config cfg;
	tdr_store *st;
	tdr_lease_backend *be;
	pthread_t thread;
	pthread_mutex_t mu;
	pthread_cond_t cv;
	int stop;
	int running;
	struct held *held;
	size_t nheld, capheld;
	size_t nmembers;
	int64_t failovers;
	int want_fast; /* an acquisition is pending: tick sooner */
};

/* ------------------------------------------------------------ helpers */

static void fmt_i64(char *buf, size_t len, int64_t v)
{
	snprintf(buf, len, "%" PRId64, v);
}

static void log_lease(struct tdr_coord *c, int prio, enum tdr_event ev, const struct held *h, const char *holder,
		      const char *why)
{
	char epoch[24], parts[16];
	tdr_field f[4];
	size_t n = 0;

	fmt_i64(epoch, sizeof(epoch), h->epoch);
	f[n++] = (tdr_field){ "TDRAIN_LEASE", h->name };
	f[n++] = (tdr_field){ "TDRAIN_EPOCH", epoch };
	f[n++] = (tdr_field){ "TDRAIN_HOLDER", holder ? holder : c->cfg.name };
	if (h->kind == HELD_PART) {
		snprintf(parts, sizeof(parts), "%d", h->part);
		f[n++] = (tdr_field){ "TDRAIN_PARTITIONS", parts };
	}
	tdr_log_event(prio, ev, f, n, "%s %s epoch %" PRId64 "%s%s", h->name, tdr_event_name(ev), h->epoch,
		      why ? ": " : "", why ? why : "");
}

static struct held *find_held(struct tdr_coord *c, const char *name)
{
	for (size_t i = 0; i < c->nheld; i++)
		if (strcmp(c->held[i].name, name) == 0)
			return &c->held[i];
	return NULL;
}

static int add_held(struct tdr_coord *c, const struct held *h)
{
	if (c->nheld == c->capheld) {
		size_t ncap = c->capheld ? c->capheld * 2 : 8;
		struct held *n = realloc(c->held, ncap * sizeof(*n));

		if (n == NULL)
			return -1;
		c->held = n;
		c->capheld = ncap;
	}
	c->held[c->nheld++] = *h;
	return 0;
}

static void remove_held(struct tdr_coord *c, const char *name)
{
	for (size_t i = 0; i < c->nheld; i++)
		if (strcmp(c->held[i].name, name) == 0) {
			c->held[i] = c->held[--c->nheld];
			return;
		}
}

static int has_kind(struct tdr_coord *c, enum held_kind k)
{
	for (size_t i = 0; i < c->nheld; i++)
		if (c->held[i].kind == k)
			return 1;
	return 0;
}

/* ------------------------------------------------------------ one round */

static void renew_all(struct tdr_coord *c)
{
	struct held *snap;
	size_t n;

	pthread_mutex_lock(&c->mu);
	n = c->nheld;
	snap = n ? malloc(n * sizeof(*snap)) : NULL;
	if (snap)
		memcpy(snap, c->held, n * sizeof(*snap));
	pthread_mutex_unlock(&c->mu);
	if (snap == NULL)
		return;

	for (size_t i = 0; i < n; i++) {
		tdr_err err;
		int64_t sent = tdr_mono_ms();
		int rc;
		struct held *h;

		/*
		 * Past its deadline a lease is lost, whatever a late renewal would say: others may
		 * already judge it expired (with the store down, each earlier renewal in this loop
		 * can take store.timeout_ms, so the loop can outlast the TTL).
		 */
		if (sent >= snap[i].valid_until) {
			pthread_mutex_lock(&c->mu);
			h = find_held(c, snap[i].name);
			if (h && h->epoch == snap[i].epoch && sent >= h->valid_until) {
				log_lease(c, LOG_ERR, TDR_EV_LEASE_LOST, h, NULL, "renew deadline passed");
				remove_held(c, h->name);
			}
			pthread_mutex_unlock(&c->mu);
			continue;
		}
		rc = c->be->ops->renew(c->be, snap[i].name, snap[i].epoch, c->cfg.lease_ttl_ms, &err);
		pthread_mutex_lock(&c->mu);
		h = find_held(c, snap[i].name);
		if (h == NULL || h->epoch != snap[i].epoch) {
			pthread_mutex_unlock(&c->mu);
			continue;
		}
		/*
		 * A renewal answered a TTL or more after the previous one was sent may have raced
		 * with a takeover (an observer may have read the lease before it landed): lost.
		 */
		if (rc == 0 && tdr_mono_ms() >= h->valid_until - c->cfg.renew_deadline_ms + c->cfg.lease_ttl_ms) {
			log_lease(c, LOG_ERR, TDR_EV_LEASE_LOST, h, NULL, "renewal answered after the lease could expire");
			remove_held(c, h->name);
			pthread_mutex_unlock(&c->mu);
			continue;
		}
		if (rc == 0) {
			/* Measured from when the renewal was sent, never from its reply. */
			h->valid_until = sent + c->cfg.renew_deadline_ms;
			if (h->renew_failing)
				log_info("lease %s epoch %" PRId64 " renewed again", h->name, h->epoch);
			h->renew_failing = 0;
		} else if (rc == TDR_EFENCED) {
			log_lease(c, LOG_WARNING, h->kind == HELD_PART ? TDR_EV_PARTITION_REVOKED : TDR_EV_LEASE_LOST, h,
				  NULL, err.msg);
			remove_held(c, h->name);
		} else {
			if (!h->renew_failing)
				log_lease(c, LOG_WARNING, TDR_EV_LEASE_RENEW_FAILED, h, NULL, err.msg);
			h->renew_failing = 1;
			if (tdr_mono_ms() >= h->valid_until) {
				/* Stop before anyone else can consider it expired. */
				log_lease(c, LOG_ERR, TDR_EV_LEASE_LOST, h, NULL, "renew deadline passed");
				remove_held(c, h->name);
			}
		}
		pthread_mutex_unlock(&c->mu);
	}
	free(snap);
}

static int try_acquire(struct tdr_coord *c, const char *name, enum held_kind kind, int32_t part,
		       const tdr_lease_info *infos, size_t ninfos)
{
	struct held h;
	tdr_err err;
	int64_t sent = tdr_mono_ms(), epoch = 0;
	const char *previous = NULL;
	int rc;

	rc = c->be->ops->acquire(c->be, name, c->cfg.lease_ttl_ms, &epoch, &err);
	if (rc < 0) {
		if (rc != TDR_EDUP)
			log_debug("acquire %s: %s", name, err.msg);
		return rc;
	}
	/* A failover is taking a lease its holder did not give back. */
	for (size_t i = 0; i < ninfos; i++)
		if (strcmp(infos[i].name, name) == 0 && strcmp(infos[i].holder, c->cfg.name) != 0 && !infos[i].released)
			previous = infos[i].holder;
	memset(&h, 0, sizeof(h));
	snprintf(h.name, sizeof(h.name), "%s", name);
	h.kind = kind;
	h.part = part;
	h.epoch = epoch;
	h.valid_until = sent + c->cfg.renew_deadline_ms;
	pthread_mutex_lock(&c->mu);
	if (add_held(c, &h) < 0) {
		pthread_mutex_unlock(&c->mu);
		/* Could not record it: give it back rather than hold it blind. */
		(void)c->be->ops->release(c->be, name, epoch, &err);
		return TDR_ENOMEM;
	}
	if (previous && kind != HELD_MEMBER)
		c->failovers++;
	pthread_mutex_unlock(&c->mu);
	log_lease(c, LOG_NOTICE, kind == HELD_PART ? TDR_EV_PARTITION_ASSIGNED : TDR_EV_LEASE_ACQUIRED, &h, NULL,
		  previous ? "taken over" : NULL);
	return 0;
}

static void release_one(struct tdr_coord *c, const struct held *h)
{
	tdr_err err;

	if (c->be->ops->release(c->be, h->name, h->epoch, &err) < 0)
		log_warn("release %s epoch %" PRId64 ": %s", h->name, h->epoch, err.msg);
	log_lease(c, LOG_NOTICE, h->kind == HELD_PART ? TDR_EV_PARTITION_REVOKED : TDR_EV_LEASE_RELEASED, h, NULL,
		  "released");
}

static int cmp_str(const void *a, const void *b)
{
	return strcmp(*(const char *const *)a, *(const char *const *)b);
}

static void rebalance(struct tdr_coord *c, const tdr_lease_info *infos, size_t n)
{
	const char **members = calloc(n + 1, sizeof(*members));
	uint32_t P = (uint32_t)c->cfg.partitions;
	uint32_t *mine = calloc(P, sizeof(*mine));
	char *want = calloc(P, 1);
	size_t nm = 0, nmine;
	int is_member;

	if (members == NULL || mine == NULL || want == NULL)
		goto out;
	pthread_mutex_lock(&c->mu);
	is_member = has_kind(c, HELD_MEMBER);
	pthread_mutex_unlock(&c->mu);
	for (size_t i = 0; i < n; i++) {
		const char *nm_ = infos[i].name + strlen("member/");

		if (strncmp(infos[i].name, "member/", 7) != 0 || infos[i].released || infos[i].expires_in_ms <= 0)
			continue;
		if (strcmp(nm_, c->cfg.name) == 0 && !is_member)
			continue;
		members[nm++] = nm_;
	}
	if (is_member) {
		int self = 0;

		for (size_t i = 0; i < nm; i++)
			self |= strcmp(members[i], c->cfg.name) == 0;
		if (!self)
			members[nm++] = c->cfg.name;
	}
	qsort(members, nm, sizeof(*members), cmp_str);
	nmine = is_member ? tdr_assign_mine(members, nm, c->cfg.name, P, mine) : 0;
	for (size_t i = 0; i < nmine; i++)
		want[mine[i]] = 1;

	pthread_mutex_lock(&c->mu);
	c->nmembers = nm;
	c->want_fast = 0;
	pthread_mutex_unlock(&c->mu);

	/* Hand back what is no longer ours once the worker says it is idle. */
	for (;;) {
		struct held victim;
		int found = 0;

		pthread_mutex_lock(&c->mu);
		for (size_t i = 0; i < c->nheld; i++) {
			struct held *h = &c->held[i];

			if (h->kind != HELD_PART || want[h->part])
				continue;
			if (!h->draining) {
				h->draining = 1;
				log_info("partition %d wanted by another member: draining", h->part);
			}
			if (h->idle) {
				victim = *h;
				remove_held(c, h->name);
				found = 1;
				break;
			}
		}
		pthread_mutex_unlock(&c->mu);
		if (!found)
			break;
		release_one(c, &victim);
	}
	/* Take what is ours. */
	for (size_t i = 0; i < nmine; i++) {
		char name[TDR_LEASE_NAME_MAX];
		int held;

		snprintf(name, sizeof(name), "part/%u", mine[i]);
		pthread_mutex_lock(&c->mu);
		held = find_held(c, name) != NULL;
		pthread_mutex_unlock(&c->mu);
		if (!held && try_acquire(c, name, HELD_PART, (int32_t)mine[i], infos, n) < 0) {
			pthread_mutex_lock(&c->mu);
			c->want_fast = 1;
			pthread_mutex_unlock(&c->mu);
		}
	}
out:
	free(members);
	free(mine);
	free(want);
}

static void tick(struct tdr_coord *c)
{
	tdr_lease_info *infos = NULL;
	size_t n = 0;
	tdr_err err;

	renew_all(c);
	/* One read of every lease: it refreshes our observations of all of them. */
	if (c->be->ops->list(c->be, "", &infos, &n, &err) < 0) {
		log_debug("list leases: %s", err.msg);
		return;
	}
	/* A newer epoch of something we hold means we were judged expired. */
	pthread_mutex_lock(&c->mu);
	for (size_t i = 0; i < n; i++) {
		struct held *h = find_held(c, infos[i].name);

		if (h && infos[i].epoch > h->epoch) {
			log_lease(c, LOG_WARNING, h->kind == HELD_PART ? TDR_EV_PARTITION_REVOKED : TDR_EV_LEASE_LOST, h,
				  infos[i].holder, "superseded");
			remove_held(c, h->name);
		}
	}
	pthread_mutex_unlock(&c->mu);

	if (c->cfg.mode == TDR_MODE_PARTITIONED) {
		char member[TDR_LEASE_NAME_MAX];

		snprintf(member, sizeof(member), "member/%s", c->cfg.name);
		pthread_mutex_lock(&c->mu);
		int is_member = has_kind(c, HELD_MEMBER);
		pthread_mutex_unlock(&c->mu);
		if (!is_member)
			(void)try_acquire(c, member, HELD_MEMBER, -1, infos, n);
	}
	pthread_mutex_lock(&c->mu);
	int leader = has_kind(c, HELD_LEADER);
	pthread_mutex_unlock(&c->mu);
	if (!leader)
		(void)try_acquire(c, "leader", HELD_LEADER, TDR_SCOPE_ALL, infos, n);
	if (c->cfg.mode == TDR_MODE_PARTITIONED)
		rebalance(c, infos, n);
	free(infos);
}

static void *coord_thread(void *arg)
{
	struct tdr_coord *c = arg;

	pthread_mutex_lock(&c->mu);
	while (!c->stop) {
		struct timespec ts;
		int64_t wait = c->want_fast ? c->cfg.retry_period_ms / 4 : c->cfg.retry_period_ms;

		tdr_mono_deadline(&ts, wait);
		pthread_cond_timedwait(&c->cv, &c->mu, &ts);
		if (c->stop)
			break;
		pthread_mutex_unlock(&c->mu);
		tick(c);
		pthread_mutex_lock(&c->mu);
	}
	pthread_mutex_unlock(&c->mu);
	return NULL;
}

/* ------------------------------------------------------------ API */

int tdr_coord_new(tdr_coord **ret, const tdr_config *cfg, tdr_store *st, tdr_err *err)
{
	struct tdr_coord *c = calloc(1, sizeof(*c));
	pthread_condattr_t ca;
	int rc;

	if (c == NULL)
		return tdr_err_set(err, TDR_ENOMEM, "out of memory");
	c->cfg = *cfg;
	c->st = st;
	if (cfg->backend == TDR_BACKEND_ETCD)
		rc = tdr_lease_etcd_new(&c->be, cfg, cfg->name, err);
	else
		rc = tdr_lease_mongo_new(&c->be, st, cfg->name, err);
	if (rc < 0) {
		free(c);
		return rc;
	}
	pthread_mutex_init(&c->mu, NULL);
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(&c->cv, &ca);
	pthread_condattr_destroy(&ca);
	*ret = c;
	return 0;
}

int tdr_coord_start(tdr_coord *c, tdr_err *err)
{
	tick(c);
	if (pthread_create(&c->thread, NULL, coord_thread, c) != 0)
		return tdr_err_set(err, TDR_EFAIL, "cannot start coordinator thread: %s", strerror(errno));
	c->running = 1;
	return 0;
}

void tdr_coord_stop(tdr_coord *c)
{
	if (c == NULL)
		return;
	pthread_mutex_lock(&c->mu);
	c->stop = 1;
	pthread_cond_broadcast(&c->cv);
	pthread_mutex_unlock(&c->mu);
	if (c->running)
		pthread_join(c->thread, NULL);
	c->running = 0;
	/* Partitions first, then leadership, then membership: the others re-plan once. */
	for (int kind = HELD_PART; kind >= HELD_LEADER; kind--)
		for (size_t i = 0; i < c->nheld;) {
			if ((int)c->held[i].kind == kind && tdr_mono_ms() < c->held[i].valid_until) {
				struct held h = c->held[i];

				remove_held(c, h.name);
				release_one(c, &h);
				continue;
			}
			i++;
		}
	c->nheld = 0;
}

void tdr_coord_free(tdr_coord *c)
{
	if (c == NULL)
		return;
	if (c->running)
		tdr_coord_stop(c);
	tdr_lease_backend_free(c->be);
	pthread_mutex_destroy(&c->mu);
	pthread_cond_destroy(&c->cv);
	free(c->held);
	free(c);
}

int tdr_coord_view_get(tdr_coord *c, tdr_coord_view *out)
{
	int64_t now = tdr_mono_ms();

	memset(out, 0, sizeof(*out));
	pthread_mutex_lock(&c->mu);
	out->scopes = calloc(c->nheld ? c->nheld : 1, sizeof(*out->scopes));
	if (out->scopes == NULL) {
		pthread_mutex_unlock(&c->mu);
		return TDR_ENOMEM;
	}
	for (size_t i = 0; i < c->nheld; i++) {
		const struct held *h = &c->held[i];

		if (now >= h->valid_until)
			continue;
		if (h->kind == HELD_LEADER) {
			out->is_leader = 1;
			out->leader_epoch = h->epoch;
		}
		if (h->kind == HELD_PART || (h->kind == HELD_LEADER && c->cfg.mode == TDR_MODE_SINGLE)) {
			tdr_scope *s = &out->scopes[out->nscopes++];

			s->part = h->part;
			s->epoch = h->epoch;
			s->draining = h->draining;
		}
	}
	out->nmembers = c->cfg.mode == TDR_MODE_SINGLE ? 1 : c->nmembers;
	out->failovers = c->failovers;
	pthread_mutex_unlock(&c->mu);
	return 0;
}

void tdr_coord_view_free(tdr_coord_view *v)
{
	free(v->scopes);
	v->scopes = NULL;
	v->nscopes = 0;
}

int tdr_coord_may_write(tdr_coord *c, int32_t part, int64_t epoch)
{
	int ok = 0;
	int64_t now = tdr_mono_ms();

	pthread_mutex_lock(&c->mu);
	for (size_t i = 0; i < c->nheld; i++) {
		const struct held *h = &c->held[i];

		if (h->epoch == epoch && h->part == part &&
		    (h->kind == HELD_PART || (h->kind == HELD_LEADER && part == TDR_SCOPE_ALL)))
			ok = now < h->valid_until;
	}
	pthread_mutex_unlock(&c->mu);
	return ok;
}

int tdr_coord_may_lead(tdr_coord *c, int64_t epoch)
{
	int ok = 0;
	int64_t now = tdr_mono_ms();

	pthread_mutex_lock(&c->mu);
	for (size_t i = 0; i < c->nheld; i++)
		if (c->held[i].kind == HELD_LEADER && c->held[i].epoch == epoch)
			ok = now < c->held[i].valid_until;
	pthread_mutex_unlock(&c->mu);
	return ok;
}

void tdr_coord_scope_idle(tdr_coord *c, int32_t part, int64_t epoch)
{
	pthread_mutex_lock(&c->mu);
	for (size_t i = 0; i < c->nheld; i++) {
		struct held *h = &c->held[i];

		if (h->kind == HELD_PART && h->part == part && h->epoch == epoch && h->draining && !h->idle) {
			h->idle = 1;
			pthread_cond_broadcast(&c->cv);
		}
	}
	pthread_mutex_unlock(&c->mu);
}

tdr_lease_backend *tdr_coord_backend(tdr_coord *c)
{
	return c->be;
}

void tdr_parts_format(const tdr_scope *s, size_t n, char *buf, size_t len)
{
	size_t off = 0;

	if (len == 0)
		return;
	buf[0] = '\0';
	for (size_t i = 0; i < n && off + 12 < len; i++) {
		int w = s[i].part == TDR_SCOPE_ALL ? snprintf(buf + off, len - off, "%sall", i ? "," : "")
						    : snprintf(buf + off, len - off, "%s%d", i ? "," : "", s[i].part);
		if (w < 0)
			break;
		off += (size_t)w;
	}
}
