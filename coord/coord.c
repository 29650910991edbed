/*
 * coord.c - the coordinator.  See coord.h for the contract and
 * docs/DESIGN.md ("Leases", "Modes and partitions") for why it is safe.
 *
 * Two threads:
 *   heartbeat    renews the one lease this replica's liveness rests on (its
 *                session: "member/<name>" partitioned, "leader" single),
 *                every retry period, and nothing else, so its period never
 *                depends on how much the replica holds or how slow the other
 *                coordination requests are;
 *   coordinator  once per retry period reads every lease (one request),
 *                computes the balanced target (coord/assign.c), hands back in
 *                bulk what is no longer ours once the worker is idle there,
 *                and acquires in bulk what is ours and free.
 * In partitioned mode "leader" and every "part/<p>" are attached to the
 * session: they are writable exactly while the session is (valid_until).
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

/* A lease this replica holds in its own right (the session) or attached to it (leader, partitioned). */
struct held {
	int held;
	char name[TDR_LEASE_NAME_MAX];
	int64_t epoch;
	int64_t valid_until; /* session: monotonic ms, last renewal SENT + renew deadline */
	int64_t last_sent;   /* session: when the last successful renewal was sent */
	int64_t acquired_at; /* session: when it was acquired (monotonic ms) */
	int renew_failing;
};

struct part {
	int64_t epoch;
	unsigned char held, draining, idle;
};

struct tdr_coord {
	tdr_config cfg;
	tdr_store *st;
	tdr_lease_backend *be;
	pthread_t thread, hb_thread;
	pthread_mutex_t mu;
	pthread_cond_t cv;    /* the coordinator thread and stop waits */
	pthread_cond_t hb_cv; /* the heartbeat alone: nothing but its period and stop may wake it */
	int stop;        /* no more ticks: acquire nothing new */
	int release_now; /* the worker is done: give everything back and end */
	int hb_stop, hb_done, done;
	int running, hb_running;
	int partitioned;
	struct held session; /* member/<name> (partitioned) or leader (single) */
	struct held leader;  /* partitioned only: attached to the session */
	struct part *parts;  /* [P] */
	uint32_t P;
	size_t nheld_parts;
	size_t nmembers;
	int64_t share_min, share_max; /* partitions per live member, last tick */
	int64_t failovers;
	int want_fast; /* an acquisition is pending: tick sooner */
	int64_t next_expiry_ms; /* monotonic: the soonest another holder's lease can expire, as last observed */
	uint64_t parts_sig;     /* members_signature() at the last read of the partition leases */
	int64_t parts_read_at;  /* monotonic ms of that read, 0: never */
	uint64_t gen;           /* bumped whenever the partitions held change (tdr_coord_generation) */
	volatile int *wake;     /* set to 1 then: the worker's idle sleep ends (tdr_coord_set_wake) */
};

/* ------------------------------------------------------------ helpers */

static void log_one(struct tdr_coord *c, int prio, enum tdr_event ev, const char *name, int64_t epoch, int32_t part,
		    const char *holder, const char *why)
{
	char ep[24], parts[16];
	tdr_field f[4];
	size_t n = 0;

	snprintf(ep, sizeof(ep), "%" PRId64, epoch);
	f[n++] = (tdr_field){ "TDRAIN_LEASE", name };
	f[n++] = (tdr_field){ "TDRAIN_EPOCH", ep };
	f[n++] = (tdr_field){ "TDRAIN_HOLDER", holder ? holder : c->cfg.name };
	if (part >= 0) {
		snprintf(parts, sizeof(parts), "%d", part);
		f[n++] = (tdr_field){ "TDRAIN_PARTITIONS", parts };
	}
	tdr_log_event(prio, ev, f, n, "%s %s epoch %" PRId64 "%s%s", name, tdr_event_name(ev), epoch, why ? ": " : "",
		      why ? why : "");
}

static void log_part(struct tdr_coord *c, int prio, enum tdr_event ev, uint32_t p, int64_t epoch, const char *holder,
		     const char *why)
{
	char name[TDR_LEASE_NAME_MAX];

	snprintf(name, sizeof(name), "part/%u", p);
	log_one(c, prio, ev, name, epoch, (int32_t)p, holder, why);
}

/*
 * The partitions held changed (with mu held).  The worker's loop sleeps up to
 * drain.poll_max_ms when idle and publishes its status and metrics once a
 * second: woken here, it claims in a partition gained by a failover at once,
 * and what it publishes shows the takeover when it happens (t18 measures the
 * kill -9 failover from the survivors' metrics files).
 */
static void holdings_changed(struct tdr_coord *c)
{
	c->gen++;
	if (c->wake)
		__atomic_store_n(c->wake, 1, __ATOMIC_RELAXED);
}

static int session_valid(const struct tdr_coord *c, int64_t now)
{
	return c->session.held && now < c->session.valid_until;
}

/* Drop every partition (with mu held): the session they lived by is gone, or they were superseded. */
static void drop_part(struct tdr_coord *c, uint32_t p, int prio, const char *holder, const char *why)
{
	struct part *pp = &c->parts[p];

	if (!pp->held)
		return;
	log_part(c, prio, TDR_EV_PARTITION_REVOKED, p, pp->epoch, holder, why);
	memset(pp, 0, sizeof(*pp));
	c->nheld_parts--;
	holdings_changed(c);
}

/* The session is lost (with mu held): everything attached to it goes with it. */
static void lose_session(struct tdr_coord *c, const char *why)
{
	if (!c->session.held)
		return;
	log_one(c, LOG_ERR, TDR_EV_LEASE_LOST, c->session.name, c->session.epoch, -1, NULL, why);
	if (c->leader.held)
		log_one(c, LOG_ERR, TDR_EV_LEASE_LOST, c->leader.name, c->leader.epoch, -1, NULL,
			"its session was lost");
	memset(&c->leader, 0, sizeof(c->leader));
	for (uint32_t p = 0; p < c->P; p++)
		drop_part(c, p, LOG_WARNING, NULL, "its session was lost");
	memset(&c->session, 0, sizeof(c->session));
}

/* ------------------------------------------------------------ heartbeat */

/*
 * One renewal of the session.  Safety (docs/DESIGN.md, "The safety rule"):
 * valid_until is measured from when the renewal was SENT, and a renewal
 * answered a TTL or more after the previous one was sent may have raced with
 * a takeover, so it does not count.
 */
static void heartbeat_once(struct tdr_coord *c)
{
	struct held s;
	tdr_err err;
	int64_t sent;
	int rc;

	pthread_mutex_lock(&c->mu);
	s = c->session;
	pthread_mutex_unlock(&c->mu);
	if (!s.held)
		return;
	sent = tdr_mono_ms();
	if (sent >= s.valid_until) {
		pthread_mutex_lock(&c->mu);
		if (c->session.held && c->session.epoch == s.epoch && sent >= c->session.valid_until)
			lose_session(c, "renew deadline passed");
		pthread_mutex_unlock(&c->mu);
		return;
	}
	rc = c->be->ops->renew(c->be, s.name, s.epoch, c->cfg.lease_ttl_ms, &err);
	pthread_mutex_lock(&c->mu);
	if (!c->session.held || c->session.epoch != s.epoch) {
		pthread_mutex_unlock(&c->mu);
		return;
	}
	if (rc == 0 && tdr_mono_ms() >= c->session.last_sent + c->cfg.lease_ttl_ms) {
		lose_session(c, "renewal answered after the lease could expire");
	} else if (rc == 0) {
		c->session.valid_until = sent + c->cfg.renew_deadline_ms;
		c->session.last_sent = sent;
		if (c->session.renew_failing)
			log_info("lease %s epoch %" PRId64 " renewed again", c->session.name, c->session.epoch);
		c->session.renew_failing = 0;
	} else if (rc == TDR_EFENCED) {
		lose_session(c, err.msg);
	} else {
		if (!c->session.renew_failing)
			log_one(c, LOG_WARNING, TDR_EV_LEASE_RENEW_FAILED, c->session.name, c->session.epoch, -1, NULL,
				err.msg);
		c->session.renew_failing = 1;
		/* Stop before anyone else can consider it expired. */
		if (tdr_mono_ms() >= c->session.valid_until)
			lose_session(c, "renew deadline passed");
	}
	pthread_mutex_unlock(&c->mu);
}

static void *heartbeat_thread(void *arg)
{
	struct tdr_coord *c = arg;

	pthread_mutex_lock(&c->mu);
	while (!c->hb_stop) {
		struct timespec ts;

		tdr_mono_deadline(&ts, c->cfg.retry_period_ms);
		while (!c->hb_stop && pthread_cond_timedwait(&c->hb_cv, &c->mu, &ts) != ETIMEDOUT)
			;
		if (c->hb_stop)
			break;
		pthread_mutex_unlock(&c->mu);
		heartbeat_once(c);
		pthread_mutex_lock(&c->mu);
	}
	c->hb_done = 1;
	pthread_cond_broadcast(&c->cv);
	pthread_mutex_unlock(&c->mu);
	return NULL;
}

/* ------------------------------------------------------------ one tick */

static const tdr_lease_info *find_info(const tdr_lease_info *infos, size_t n, const char *name)
{
	for (size_t i = 0; i < n; i++)
		if (strcmp(infos[i].name, name) == 0)
			return &infos[i];
	return NULL;
}

static int info_live(const tdr_lease_info *li)
{
	return li && !li->released && li->expires_in_ms > 0;
}

/* Acquire the session lease (plain, renewed by the heartbeat). */
static void acquire_session(struct tdr_coord *c, const tdr_lease_info *infos, size_t n)
{
	char name[TDR_LEASE_NAME_MAX];
	const tdr_lease_info *prev;
	int64_t sent = tdr_mono_ms(), epoch = 0;
	tdr_err err;
	int rc;

	if (c->partitioned)
		snprintf(name, sizeof(name), "member/%s", c->cfg.name);
	else
		snprintf(name, sizeof(name), "leader");
	rc = c->be->ops->acquire(c->be, name, c->cfg.lease_ttl_ms, &epoch, &err);
	if (rc < 0) {
		if (rc != TDR_EDUP)
			log_debug("acquire %s: %s", name, err.msg);
		return;
	}
	prev = find_info(infos, n, name);
	pthread_mutex_lock(&c->mu);
	memset(&c->session, 0, sizeof(c->session));
	c->session.held = 1;
	snprintf(c->session.name, sizeof(c->session.name), "%s", name);
	c->session.epoch = epoch;
	c->session.valid_until = sent + c->cfg.renew_deadline_ms;
	c->session.last_sent = sent;
	c->session.acquired_at = sent;
	/* A failover is taking a lease its holder did not give back (single mode: the leader). */
	if (!c->partitioned && prev && strcmp(prev->holder, c->cfg.name) != 0 && !prev->released)
		c->failovers++;
	pthread_mutex_unlock(&c->mu);
	log_one(c, LOG_NOTICE, TDR_EV_LEASE_ACQUIRED, name, epoch, -1, NULL,
		prev && !prev->released && strcmp(prev->holder, c->cfg.name) != 0 ? "taken over" : NULL);
}

/* Our observed leases against what we hold: superseded, gone, or ours but unknown to us (adopt). */
static void reconcile(struct tdr_coord *c, const tdr_lease_info *infos, size_t n, int with_parts)
{
	pthread_mutex_lock(&c->mu);
	if (c->session.held) {
		const tdr_lease_info *s = find_info(infos, n, c->session.name);

		/* A newer epoch means we were judged expired, whatever our renewals say. */
		if (s && s->epoch > c->session.epoch)
			lose_session(c, "superseded");
	}
	if (c->partitioned && c->leader.held) {
		const tdr_lease_info *l = find_info(infos, n, "leader");

		if (l == NULL || l->epoch != c->leader.epoch || l->released) {
			log_one(c, LOG_WARNING, TDR_EV_LEASE_LOST, "leader", c->leader.epoch, -1, l ? l->holder : NULL,
				l ? "superseded" : "gone");
			memset(&c->leader, 0, sizeof(c->leader));
		}
	}
	for (size_t i = 0; c->partitioned && with_parts && i < n; i++) {
		const tdr_lease_info *li = &infos[i];
		char *end;
		unsigned long p;

		if (strncmp(li->name, "part/", 5) != 0)
			continue;
		p = strtoul(li->name + 5, &end, 10);
		if (*end != '\0' || p >= c->P)
			continue;
		if (c->parts[p].held && li->epoch > c->parts[p].epoch)
			drop_part(c, (uint32_t)p, LOG_WARNING, li->holder, "superseded");
		else if (!c->parts[p].held && li->mine && c->session.held && li->session_epoch == c->session.epoch &&
			 !li->released && strcmp(li->session, c->session.name) == 0) {
			/*
			 * Created by us under this session, but the answer was lost: it is ours
			 * (no one else can create it while our session lives).  Adopt it; the
			 * target decides below whether we keep it.
			 */
			c->parts[p].held = 1;
			c->parts[p].epoch = li->epoch;
			c->nheld_parts++;
			holdings_changed(c);
			log_part(c, LOG_NOTICE, TDR_EV_PARTITION_ASSIGNED, (uint32_t)p, li->epoch, NULL,
				 "adopted (its acquisition's answer was lost)");
		}
	}
	/* A held partition missing from a read that started after we acquired it is gone. */
	if (c->partitioned && with_parts) {
		unsigned char *seen = calloc(c->P ? c->P : 1, 1);

		if (seen) {
			for (size_t i = 0; i < n; i++) {
				char *end;
				unsigned long p;

				if (strncmp(infos[i].name, "part/", 5) != 0)
					continue;
				p = strtoul(infos[i].name + 5, &end, 10);
				if (*end == '\0' && p < c->P)
					seen[p] = 1;
			}
			for (uint32_t p = 0; p < c->P; p++)
				if (c->parts[p].held && !seen[p])
					drop_part(c, p, LOG_WARNING, NULL, "gone from the lease store");
			free(seen);
		}
	}
	pthread_mutex_unlock(&c->mu);
}

static int cmp_str(const void *a, const void *b)
{
	return strcmp(*(const char *const *)a, *(const char *const *)b);
}

static int find_member(const char *const *members, size_t nm, const char *name)
{
	size_t lo = 0, hi = nm;

	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;
		int r = strcmp(members[mid], name);

		if (r == 0)
			return (int)mid;
		if (r < 0)
			lo = mid + 1;
		else
			hi = mid;
	}
	return -1;
}

/* Attached acquisitions in bulk; returns how many were won. */
static size_t acquire_attached(struct tdr_coord *c, tdr_lease_req *reqs, size_t k,
			       const tdr_lease_info *const *prevs)
{
	char sname[TDR_LEASE_NAME_MAX];
	int64_t sepoch;
	size_t won = 0;
	tdr_err err;
	int rc;

	if (k == 0)
		return 0;
	pthread_mutex_lock(&c->mu);
	if (!session_valid(c, tdr_mono_ms()) || c->stop) {
		pthread_mutex_unlock(&c->mu);
		return 0;
	}
	snprintf(sname, sizeof(sname), "%s", c->session.name);
	sepoch = c->session.epoch;
	pthread_mutex_unlock(&c->mu);
	rc = c->be->ops->acquire_many(c->be, sname, sepoch, c->cfg.lease_ttl_ms, reqs, k, &err);
	if (rc < 0 && rc != TDR_EDUP)
		log_debug("acquire %zu leases: %s", k, err.msg);
	pthread_mutex_lock(&c->mu);
	for (size_t i = 0; i < k; i++) {
		const tdr_lease_info *prev;
		int taken_over;

		if (reqs[i].rc != 0)
			continue;
		/* The session may have been lost meanwhile: then these died with it. */
		if (!c->session.held || c->session.epoch != sepoch)
			break;
		prev = prevs[i];
		taken_over = prev && !prev->released && strcmp(prev->holder, c->cfg.name) != 0;
		if (strcmp(reqs[i].name, "leader") == 0) {
			c->leader.held = 1;
			snprintf(c->leader.name, sizeof(c->leader.name), "leader");
			c->leader.epoch = reqs[i].epoch;
			log_one(c, LOG_NOTICE, TDR_EV_LEASE_ACQUIRED, "leader", reqs[i].epoch, -1, NULL,
				taken_over ? "taken over" : NULL);
		} else {
			uint32_t p = (uint32_t)strtoul(reqs[i].name + 5, NULL, 10);

			if (p >= c->P || c->parts[p].held)
				continue;
			c->parts[p].held = 1;
			c->parts[p].epoch = reqs[i].epoch;
			c->parts[p].draining = c->parts[p].idle = 0;
			c->nheld_parts++;
			holdings_changed(c);
			if (taken_over)
				c->failovers++;
			log_part(c, LOG_NOTICE, TDR_EV_PARTITION_ASSIGNED, p, reqs[i].epoch, NULL,
				 taken_over ? "taken over" : NULL);
		}
		won++;
	}
	pthread_mutex_unlock(&c->mu);
	return won;
}

/* Returns the backend's status: a failed release still logs each partition as given up. */
static int release_parts(struct tdr_coord *c, tdr_lease_req *reqs, size_t k)
{
	tdr_err err;
	int rc;

	if (k == 0)
		return 0;
	rc = c->be->ops->release_many(c->be, reqs, k, &err);
	if (rc < 0)
		log_warn("release of %zu partitions: %s (they expire with the session if not given back)", k,
			 err.msg);
	for (size_t i = 0; i < k; i++) {
		uint32_t p = (uint32_t)strtoul(reqs[i].name + 5, NULL, 10);

		log_part(c, LOG_NOTICE, TDR_EV_PARTITION_REVOKED, p, reqs[i].epoch, NULL, "released");
	}
	return rc < 0 ? rc : 0;
}

static void rebalance(struct tdr_coord *c, const tdr_lease_info *infos, size_t n)
{
	uint32_t P = c->P;
	const char **members = calloc(n + 1, sizeof(*members));
	int32_t *cur = calloc(P, sizeof(*cur)), *target = calloc(P, sizeof(*target));
	int64_t *seen_epoch = calloc(P, sizeof(*seen_epoch));
	tdr_lease_req *reqs = calloc(P + 1, sizeof(*reqs));
	const tdr_lease_info **pinfo = calloc(P + 1, sizeof(*pinfo)), **prevs = calloc(P + 1, sizeof(*prevs));
	size_t nm = 0, nreq = 0, *share = NULL;
	int self = -1, is_member, settled;
	tdr_err err;

	if (!members || !cur || !target || !seen_epoch || !reqs || !pinfo || !prevs)
		goto out;
	pthread_mutex_lock(&c->mu);
	is_member = session_valid(c, tdr_mono_ms());
	/*
	 * A new session waits one retry period before taking partitions, as
	 * Kafka's initial rebalance delay: replicas started together then see
	 * each other first and take their shares once, instead of each taking
	 * everything and giving most of it back a tick later.
	 */
	settled = is_member && tdr_mono_ms() - c->session.acquired_at >= c->cfg.retry_period_ms;
	pthread_mutex_unlock(&c->mu);

	/* The live member set: every live session, ours only while we hold it. */
	for (size_t i = 0; i < n; i++) {
		const char *nm_ = infos[i].name + strlen("member/");

		if (strncmp(infos[i].name, "member/", 7) != 0 || !info_live(&infos[i]))
			continue;
		if (strcmp(nm_, c->cfg.name) == 0)
			continue;
		members[nm++] = nm_;
	}
	if (is_member)
		members[nm++] = c->cfg.name;
	qsort(members, nm, sizeof(*members), cmp_str);
	self = find_member(members, nm, c->cfg.name);

	/* Current live owners: what the lease store shows, and what we hold ourselves. */
	for (uint32_t p = 0; p < P; p++)
		cur[p] = -1;
	for (size_t i = 0; i < n; i++) {
		char *end;
		unsigned long p;

		if (strncmp(infos[i].name, "part/", 5) != 0)
			continue;
		p = strtoul(infos[i].name + 5, &end, 10);
		if (*end != '\0' || p >= P)
			continue;
		seen_epoch[p] = infos[i].epoch;
		pinfo[p] = &infos[i];
		if (info_live(&infos[i]) && strcmp(infos[i].holder, c->cfg.name) != 0) {
			int o = find_member(members, nm, infos[i].holder);

			/*
			 * Held by a live lease whose holder we do not see as a member (views
			 * disagree for a moment): not free; -2 keeps it out of everyone's target.
			 */
			cur[p] = o >= 0 ? o : -2;
		}
	}
	pthread_mutex_lock(&c->mu);
	for (uint32_t p = 0; p < P; p++)
		if (c->parts[p].held)
			cur[p] = self;
	pthread_mutex_unlock(&c->mu);
	{
		/* assign.c knows only members and free: a partition of an unseen holder counts as free there. */
		int32_t *cur2 = malloc(P * sizeof(*cur2));

		if (cur2 == NULL)
			goto out;
		for (uint32_t p = 0; p < P; p++)
			cur2[p] = cur[p] == -2 ? -1 : cur[p];
		if (tdr_assign_balanced(members, nm, P, cur2, target, &err) < 0) {
			free(cur2);
			goto out;
		}
		free(cur2);
	}

	/* Shares, for status and metrics: live ownership now (held or not yet moved). */
	share = calloc(nm ? nm : 1, sizeof(*share));
	if (share) {
		int64_t mn = -1, mx = 0;

		for (uint32_t p = 0; p < P; p++)
			if (cur[p] >= 0)
				share[cur[p]]++;
		for (size_t i = 0; i < nm; i++) {
			if (mn < 0 || (int64_t)share[i] < mn)
				mn = (int64_t)share[i];
			if ((int64_t)share[i] > mx)
				mx = (int64_t)share[i];
		}
		pthread_mutex_lock(&c->mu);
		c->share_min = mn < 0 ? 0 : mn;
		c->share_max = mx;
		pthread_mutex_unlock(&c->mu);
	}

	pthread_mutex_lock(&c->mu);
	/* When a join or a leave is seen here: a failover's timeline starts at this line. */
	if (nm != c->nmembers)
		log_info("live members: %zu (were %zu); %zu leases read", nm, c->nmembers, n);
	c->nmembers = nm;
	c->want_fast = 0;
	/* Hand back what is no longer ours once the worker says it is idle there; keep what is ours again. */
	for (uint32_t p = 0; p < P; p++) {
		struct part *pp = &c->parts[p];
		int was_draining = pp->draining;
		tdr_lease_req *r;

		if (!pp->held)
			continue;
		if (!tdr_assign_handback(self >= 0 && target[p] == self, &pp->draining, &pp->idle)) {
			if (was_draining != pp->draining)
				log_info("partition %u %s", p, pp->draining ? "wanted by another member: draining"
									     : "is ours again: no longer draining");
			continue;
		}
		r = &reqs[nreq++];
		snprintf(r->name, sizeof(r->name), "part/%u", p);
		r->epoch = pp->epoch;
		memset(pp, 0, sizeof(*pp));
		c->nheld_parts--;
		holdings_changed(c);
	}
	/* Draining partitions wait for the worker: look again soon (scope_idle also wakes us). */
	for (uint32_t p = 0; p < P; p++)
		if (c->parts[p].held && c->parts[p].draining) {
			c->want_fast = 1;
			break;
		}
	pthread_mutex_unlock(&c->mu);
	release_parts(c, reqs, nreq);

	/* Take what is ours and free (in bulk), and the leader lease if nobody holds it. */
	nreq = 0;
	pthread_mutex_lock(&c->mu);
	if (is_member && !c->leader.held) {
		const tdr_lease_info *l = find_info(infos, n, "leader");

		if (!info_live(l)) {
			snprintf(reqs[nreq].name, sizeof(reqs[nreq].name), "leader");
			prevs[nreq] = l;
			reqs[nreq++].epoch = l ? l->epoch : 0;
		}
	}
	for (uint32_t p = 0; settled && p < P; p++)
		if (target[p] == self && !c->parts[p].held && cur[p] == -1) {
			snprintf(reqs[nreq].name, sizeof(reqs[nreq].name), "part/%u", p);
			prevs[nreq] = pinfo[p];
			reqs[nreq++].epoch = seen_epoch[p];
		}
	pthread_mutex_unlock(&c->mu);
	if (is_member && !settled) {
		pthread_mutex_lock(&c->mu);
		c->want_fast = 1;
		pthread_mutex_unlock(&c->mu);
	}
	if (nreq > 0) {
		size_t won = acquire_attached(c, reqs, nreq, prevs);

		if (won < nreq) {
			pthread_mutex_lock(&c->mu);
			c->want_fast = 1;
			pthread_mutex_unlock(&c->mu);
		}
	}
	/* Ours in the target but still held by another: it is draining there; look again soon. */
	for (uint32_t p = 0; is_member && p < P; p++)
		if (target[p] == self && cur[p] != self && cur[p] != -1) {
			pthread_mutex_lock(&c->mu);
			c->want_fast = 1;
			pthread_mutex_unlock(&c->mu);
			break;
		}
out:
	free(members);
	free(cur);
	free(target);
	free(seen_epoch);
	free(reqs);
	free(pinfo);
	free(prevs);
	free(share);
}

/* The live member set, as a hash of (name, epoch) in name order: partitions can move only when it changes. */
static uint64_t members_signature(const tdr_lease_info *infos, size_t n)
{
	uint64_t h = 1469598103934665603ULL;

	for (size_t i = 0; i < n; i++) {
		char buf[TDR_LEASE_NAME_MAX + 32];
		int w;

		if (strncmp(infos[i].name, "member/", 7) != 0 || !info_live(&infos[i]))
			continue;
		w = snprintf(buf, sizeof(buf), "%s#%" PRId64 ";", infos[i].name, infos[i].epoch);
		for (int k = 0; k < w && k < (int)sizeof(buf); k++)
			h = (h ^ (unsigned char)buf[k]) * 1099511628211ULL;
	}
	return h;
}

/* A full read of the partition leases at least this often, even when nothing seems to change. */
#define PARTS_REFRESH_PERIODS 10

static void tick(struct tdr_coord *c)
{
	tdr_lease_info *infos = NULL, *all = NULL;
	size_t n = 0, nall = 0;
	int64_t t_read = tdr_mono_ms();
	uint64_t sig;
	tdr_err err;
	int have, need, early, same_session;

	/*
	 * Every tick: the sessions and the leader (a few leases, one request),
	 * which refreshes our observations of them.  The partition leases only
	 * when they can have changed: the member set changed, a move of ours is
	 * under way (want_fast), or PARTS_REFRESH_PERIODS have passed.  A
	 * partition changes owner only after a member joins or leaves (the
	 * target is a function of members and owners), so in steady state a
	 * tick costs the same at any P.
	 */
	/*
	 * When the partition leases will be read anyway (a lease of another
	 * holder is due to expire: a failover; a move of ours is under way; the
	 * periodic refresh), read them in this first read: a failover then costs
	 * one read of tdrain_leases fewer between the expiry and the takeover.
	 */
	pthread_mutex_lock(&c->mu);
	early = c->partitioned && (c->want_fast || c->parts_read_at == 0 ||
				   t_read - c->parts_read_at >= PARTS_REFRESH_PERIODS * c->cfg.retry_period_ms ||
				   (c->next_expiry_ms != INT64_MAX && t_read >= c->next_expiry_ms));
	pthread_mutex_unlock(&c->mu);
	if (c->be->ops->observe(c->be, early, &infos, &n, &err) < 0) {
		log_debug("read leases: %s", err.msg);
		return;
	}
	reconcile(c, infos, n, early);
	{
		/*
		 * Tick again right when the first lease of another holder would expire:
		 * a dead replica's partitions then move within TTL + one retry period of
		 * its last renewal being seen, not up to a period later.
		 */
		int64_t soonest = INT64_MAX;

		for (size_t i = 0; i < n; i++)
			if (info_live(&infos[i]) && !infos[i].mine && infos[i].session[0] == '\0' &&
			    strcmp(infos[i].holder, c->cfg.name) != 0 && infos[i].expires_in_ms < soonest)
				soonest = infos[i].expires_in_ms;
		pthread_mutex_lock(&c->mu);
		c->next_expiry_ms = soonest == INT64_MAX ? INT64_MAX : t_read + soonest;
		pthread_mutex_unlock(&c->mu);
	}
	pthread_mutex_lock(&c->mu);
	have = c->session.held;
	pthread_mutex_unlock(&c->mu);
	if (!have && !c->stop)
		acquire_session(c, infos, n);
	if (!c->partitioned) {
		free(infos);
		return;
	}
	sig = members_signature(infos, n);
	pthread_mutex_lock(&c->mu);
	need = c->want_fast || sig != c->parts_sig || c->parts_read_at == 0 ||
	       t_read - c->parts_read_at >= PARTS_REFRESH_PERIODS * c->cfg.retry_period_ms || c->session.held != have;
	same_session = c->session.held == have;
	pthread_mutex_unlock(&c->mu);
	if (early && same_session) {
		/* The first read had the partition leases, and our session did not change since: plan from it. */
		rebalance(c, infos, n);
		pthread_mutex_lock(&c->mu);
		c->parts_sig = sig;
		c->parts_read_at = t_read;
		pthread_mutex_unlock(&c->mu);
	} else if (need) {
		if (c->be->ops->observe(c->be, 1, &all, &nall, &err) < 0) {
			log_debug("read partition leases: %s", err.msg);
		} else {
			reconcile(c, all, nall, 1);
			rebalance(c, all, nall);
			pthread_mutex_lock(&c->mu);
			c->parts_sig = members_signature(all, nall);
			c->parts_read_at = t_read;
			pthread_mutex_unlock(&c->mu);
			free(all);
		}
	}
	free(infos);
}

/* Give everything back: partitions in bulk, then leadership, then the session (the others re-plan once). */
static void release_all(struct tdr_coord *c)
{
	tdr_lease_req *reqs = calloc(c->P + 1, sizeof(*reqs));
	struct held leader, session;
	size_t k = 0;
	int64_t now = tdr_mono_ms();
	tdr_err err;

	pthread_mutex_lock(&c->mu);
	for (uint32_t p = 0; reqs && p < c->P; p++)
		if (c->parts[p].held) {
			if (session_valid(c, now)) {
				snprintf(reqs[k].name, sizeof(reqs[k].name), "part/%u", p);
				reqs[k++].epoch = c->parts[p].epoch;
			}
			memset(&c->parts[p], 0, sizeof(c->parts[p]));
		}
	c->nheld_parts = 0;
	leader = c->leader;
	session = c->session;
	memset(&c->leader, 0, sizeof(c->leader));
	memset(&c->session, 0, sizeof(c->session));
	pthread_mutex_unlock(&c->mu);
	/* Past the session's deadline others may hold them already: nothing of ours to give back. */
	if (k > 0 && release_parts(c, reqs, k) == TDR_ETRANSIENT) {
		/*
		 * The backend is unreachable: the leader and session releases would
		 * each wait out store.timeout_ms again (server selection) and fail
		 * the same way, past the stop's budget.  Both expire with the TTL,
		 * as after a crash.
		 */
		log_warn("coordination backend unreachable at stop: leader and session leases left to expire");
		free(reqs);
		return;
	}
	free(reqs);
	if (leader.held && session.held && tdr_mono_ms() < session.valid_until) {
		tdr_lease_req r;

		memset(&r, 0, sizeof(r));
		snprintf(r.name, sizeof(r.name), "leader");
		r.epoch = leader.epoch;
		if (c->be->ops->release_many(c->be, &r, 1, &err) < 0)
			log_warn("release leader epoch %" PRId64 ": %s", leader.epoch, err.msg);
		log_one(c, LOG_NOTICE, TDR_EV_LEASE_RELEASED, "leader", leader.epoch, -1, NULL, "released");
	}
	if (session.held && tdr_mono_ms() < session.valid_until) {
		if (c->be->ops->release(c->be, session.name, session.epoch, &err) < 0)
			log_warn("release %s epoch %" PRId64 ": %s", session.name, session.epoch, err.msg);
		log_one(c, LOG_NOTICE, TDR_EV_LEASE_RELEASED, session.name, session.epoch, -1, NULL, "released");
	}
}

static void *coord_thread(void *arg)
{
	struct tdr_coord *c = arg;

	pthread_mutex_lock(&c->mu);
	while (!c->stop) {
		struct timespec ts;
		int64_t wait = c->want_fast ? c->cfg.retry_period_ms / 4 : c->cfg.retry_period_ms;

		if (c->next_expiry_ms != INT64_MAX) {
			/* 20 ms past it: a lease is expired only once its TTL has fully run on our clock. */
			int64_t until = c->next_expiry_ms + 20 - tdr_mono_ms();

			if (until < wait)
				wait = until > 10 ? until : 10;
		}
		tdr_mono_deadline(&ts, wait);
		pthread_cond_timedwait(&c->cv, &c->mu, &ts);
		if (c->stop)
			break;
		pthread_mutex_unlock(&c->mu);
		tick(c);
		pthread_mutex_lock(&c->mu);
	}
	/* Keep the session renewed until the worker is done, then give everything back. */
	while (!c->release_now)
		pthread_cond_wait(&c->cv, &c->mu);
	c->hb_stop = 1;
	pthread_cond_broadcast(&c->hb_cv);
	/* A renewal in flight writes the session document too: one writer at a time (FerretDB). */
	while (c->hb_running && !c->hb_done)
		pthread_cond_wait(&c->cv, &c->mu);
	pthread_mutex_unlock(&c->mu);
	release_all(c);
	pthread_mutex_lock(&c->mu);
	c->done = 1;
	pthread_cond_broadcast(&c->cv);
	pthread_mutex_unlock(&c->mu);
	return NULL;
}

/* ------------------------------------------------------------ API */

int tdr_coord_new(tdr_coord **ret, const tdr_config *cfg, tdr_store *st, tdr_err *err)
{
	struct tdr_coord *c = calloc(1, sizeof(*c));
	int rc;

	if (c == NULL)
		return tdr_err_set(err, TDR_ENOMEM, "out of memory");
	c->cfg = *cfg;
	c->st = st;
	c->partitioned = cfg->mode == TDR_MODE_PARTITIONED;
	c->P = c->partitioned ? (uint32_t)cfg->partitions : 0;
	c->next_expiry_ms = INT64_MAX;
	if (c->P > 0 && (c->parts = calloc(c->P, sizeof(*c->parts))) == NULL) {
		free(c);
		return tdr_err_set(err, TDR_ENOMEM, "out of memory");
	}
	if (cfg->backend == TDR_BACKEND_ETCD)
		rc = tdr_lease_etcd_new(&c->be, cfg, cfg->name, err);
	else
		rc = tdr_lease_mongo_new(&c->be, st, cfg->name, err);
	if (rc < 0) {
		free(c->parts);
		free(c);
		return rc;
	}
	pthread_mutex_init(&c->mu, NULL);
	tdr_cond_init_mono(&c->cv);
	tdr_cond_init_mono(&c->hb_cv);
	*ret = c;
	return 0;
}

int tdr_coord_start(tdr_coord *c, tdr_err *err)
{
	/* The heartbeat first: the session acquired below must be renewed however long the rest takes. */
	if (pthread_create(&c->hb_thread, NULL, heartbeat_thread, c) != 0)
		return tdr_err_set(err, TDR_EFAIL, "cannot start the heartbeat thread: %s", strerror(errno));
	c->hb_running = 1;
	/* One round so startup knows its role (single mode: leader or standby). */
	tick(c);
	if (pthread_create(&c->thread, NULL, coord_thread, c) != 0) {
		pthread_mutex_lock(&c->mu);
		c->hb_stop = 1;
		pthread_cond_broadcast(&c->hb_cv);
		pthread_mutex_unlock(&c->mu);
		pthread_join(c->hb_thread, NULL);
		c->hb_running = 0;
		return tdr_err_set(err, TDR_EFAIL, "cannot start coordinator thread: %s", strerror(errno));
	}
	c->running = 1;
	return 0;
}

void tdr_coord_request_stop(tdr_coord *c)
{
	if (c == NULL)
		return;
	pthread_mutex_lock(&c->mu);
	c->stop = 1;
	pthread_cond_broadcast(&c->cv);
	pthread_mutex_unlock(&c->mu);
}

int tdr_coord_stop_within(tdr_coord *c, int64_t deadline_ms)
{
	int done;

	if (c == NULL)
		return 0;
	pthread_mutex_lock(&c->mu);
	c->stop = 1;
	c->release_now = 1;
	pthread_cond_broadcast(&c->cv);
	while (c->running && !c->done && !tdr_cond_wait_deadline(&c->cv, &c->mu, deadline_ms))
		;
	done = !c->running || c->done;
	pthread_mutex_unlock(&c->mu);
	if (!done)
		return TDR_ETRANSIENT; /* still in a store call: the caller exits without it */
	if (c->running)
		pthread_join(c->thread, NULL);
	if (c->hb_running)
		pthread_join(c->hb_thread, NULL);
	c->running = c->hb_running = 0;
	if (!c->done)
		release_all(c); /* never started: nothing but the synchronous rounds' leases */
	c->done = 1;
	return 0;
}

void tdr_coord_stop(tdr_coord *c)
{
	/* Unbounded: every store call is bounded by store.timeout_ms anyway. */
	(void)tdr_coord_stop_within(c, INT64_MAX / 2);
}

void tdr_coord_free(tdr_coord *c)
{
	if (c == NULL)
		return;
	if (c->running || !c->done)
		tdr_coord_stop(c);
	tdr_lease_backend_free(c->be);
	pthread_mutex_destroy(&c->mu);
	pthread_cond_destroy(&c->cv);
	pthread_cond_destroy(&c->hb_cv);
	free(c->parts);
	free(c);
}

int tdr_coord_view_get(tdr_coord *c, tdr_coord_view *out)
{
	int64_t now = tdr_mono_ms();
	int valid;

	memset(out, 0, sizeof(*out));
	/* Allocated before taking mu: the heartbeat waits on it, and P entries is what P needs anyway. */
	if (c->partitioned) {
		out->scope_of = malloc((c->P ? c->P : 1) * sizeof(*out->scope_of));
		if (out->scope_of == NULL)
			return TDR_ENOMEM;
		for (uint32_t p = 0; p < c->P; p++)
			out->scope_of[p] = -1;
		out->nparts = c->P;
	}
	pthread_mutex_lock(&c->mu);
	valid = session_valid(c, now);
	out->scopes = calloc(c->nheld_parts ? c->nheld_parts : 1, sizeof(*out->scopes));
	if (out->scopes == NULL) {
		pthread_mutex_unlock(&c->mu);
		free(out->scope_of);
		out->scope_of = NULL;
		return TDR_ENOMEM;
	}
	if (!c->partitioned && valid) {
		out->is_leader = 1;
		out->leader_epoch = c->session.epoch;
		out->scopes[out->nscopes++] = (tdr_scope){ TDR_SCOPE_ALL, c->session.epoch, 0 };
	}
	if (c->partitioned && valid) {
		if (c->leader.held) {
			out->is_leader = 1;
			out->leader_epoch = c->leader.epoch;
		}
		for (uint32_t p = 0; p < c->P && out->nscopes < c->nheld_parts; p++)
			if (c->parts[p].held) {
				out->scope_of[p] = (int32_t)out->nscopes;
				out->scopes[out->nscopes++] =
				    (tdr_scope){ (int32_t)p, c->parts[p].epoch, c->parts[p].draining };
			}
	}
	out->nmembers = c->partitioned ? c->nmembers : 1;
	out->failovers = c->failovers;
	out->share_min = c->partitioned ? c->share_min : 0;
	out->share_max = c->partitioned ? c->share_max : 0;
	out->coord_requests = tdr_lease_requests(c->be);
	pthread_mutex_unlock(&c->mu);
	return 0;
}

void tdr_coord_view_free(tdr_coord_view *v)
{
	free(v->scopes);
	free(v->scope_of);
	v->scopes = NULL;
	v->scope_of = NULL;
	v->nscopes = 0;
	v->nparts = 0;
}

int tdr_coord_may_write(tdr_coord *c, int32_t part, int64_t epoch)
{
	int ok = 0;
	int64_t now = tdr_mono_ms();

	pthread_mutex_lock(&c->mu);
	if (session_valid(c, now)) {
		if (!c->partitioned)
			ok = part == TDR_SCOPE_ALL && c->session.epoch == epoch;
		else if (part >= 0 && (uint32_t)part < c->P)
			ok = c->parts[part].held && c->parts[part].epoch == epoch;
	}
	pthread_mutex_unlock(&c->mu);
	return ok;
}

int tdr_coord_may_lead(tdr_coord *c, int64_t epoch)
{
	int ok = 0;
	int64_t now = tdr_mono_ms();

	pthread_mutex_lock(&c->mu);
	if (session_valid(c, now))
		ok = c->partitioned ? c->leader.held && c->leader.epoch == epoch : c->session.epoch == epoch;
	pthread_mutex_unlock(&c->mu);
	return ok;
}

void tdr_coord_scope_idle(tdr_coord *c, int32_t part, int64_t epoch)
{
	pthread_mutex_lock(&c->mu);
	if (c->partitioned && part >= 0 && (uint32_t)part < c->P) {
		struct part *pp = &c->parts[part];

		if (pp->held && pp->epoch == epoch && pp->draining && !pp->idle) {
			pp->idle = 1;
			pthread_cond_broadcast(&c->cv);
		}
	}
	pthread_mutex_unlock(&c->mu);
}

void tdr_coord_set_wake(tdr_coord *c, volatile int *flag)
{
	pthread_mutex_lock(&c->mu);
	c->wake = flag;
	pthread_mutex_unlock(&c->mu);
}

uint64_t tdr_coord_generation(tdr_coord *c)
{
	uint64_t g;

	pthread_mutex_lock(&c->mu);
	g = c->gen;
	pthread_mutex_unlock(&c->mu);
	return g;
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
