/*
 * tdrain - drain a MongoDB FIFO of telemetry events into derived state,
 * as one of N coordinated replicas.  See tdrain(8) and docs/DESIGN.md.
 *
 * main() owns process concerns only: configuration, signals, systemd
 * notification, the adaptive poll loop, status and metrics.  Signal handlers
 * set flags; the loop acts on them.
 */
#include "config.h"

#include <errno.h>
#include <getopt.h>
#include <pthread.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sysexits.h>
#include <unistd.h>

#include "consumers/archive.h"
#include "consumers/fold.h"
#include "coord/coord.h"
#include "lib/bsonx.h"
#include "lib/clock.h"
#include "lib/conf.h"
#include "lib/log.h"
#include "lib/store.h"
#include "worker/drain.h"
#include "worker/indexer.h"
#include "worker/metrics.h"
#include "worker/metrics_http.h"
#include "worker/notify.h"

static volatile sig_atomic_t got_stop, got_reload;
static volatile int wake_flag; /* any signal: ends the loop's idle sleep at once */
/* For the signal thread: a stop starts at once, not when the drain loop next looks (set before it can stop). */
static tdr_drain *volatile stop_drain;
static tdr_coord *volatile stop_coord;
static int64_t stop_at_ms; /* monotonic time of the first SIGTERM/SIGINT (__atomic) */
static volatile sig_atomic_t signal_thread_quit; /* set by main before its last pthread_kill() */

/*
 * SIGTERM, SIGINT and SIGHUP are blocked in every thread and taken here with
 * sigwait(), so the reply to a reload is immediate (systemctl reload waits
 * only if RELOADING=1 arrives before its kill returns) even while the drain
 * loop sits in a slow store call.  The loop acts on the flags.
 */
static void *signal_thread(void *arg)
{
	const sigset_t *set = arg;

	for (;;) {
		int sig;

		if (sigwait(set, &sig) != 0)
			continue;
		if (signal_thread_quit)
			break;
		if (sig == SIGHUP) {
			tdr_notify_reloading();
			got_reload = 1;
		} else {
			int64_t zero = 0, now = tdr_mono_ms();

			/* The stop's time budget (store.timeout_ms + 2 s) counts from the first signal. */
			__atomic_compare_exchange_n(&stop_at_ms, &zero, now, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
			got_stop = 1;
			tdr_drain_request_stop(stop_drain);
			tdr_coord_request_stop(stop_coord);
		}
		wake_flag = 1;
	}
	return NULL;
}

static void usage(FILE *out)
{
	fprintf(out, "usage: tdrain [-c FILE] [-N NAME] [--set KEY=VALUE]... [-n] [--print-config] [-V] [-h]\n"
		     "  -c FILE          configuration file (key = value lines)\n"
		     "  -N NAME          replica name (overrides the 'name' key)\n"
		     "  --set KEY=VALUE  override one key (after the file and TDRAIN_* variables)\n"
		     "  -n               check the configuration, print \"configuration OK\" and exit\n"
		     "  --print-config   print every key with its effective value (secrets redacted)\n"
		     "  -V               print the version\n");
}

struct args {
	const char *file;
	const char *name;
	char **sets;
	int nsets;
	int check_only, print_config;
};

/* Build the configuration from its sources, in precedence order. */
static int load_config(const struct args *a, tdr_config *cfg, tdr_err *err)
{
	tdr_config_defaults(cfg);
	if (a->file && tdr_config_load_file(cfg, a->file, err) < 0)
		return TDR_ECONFIG;
	if (tdr_config_load_env(cfg, err) < 0)
		return TDR_ECONFIG;
	for (int i = 0; i < a->nsets; i++)
		if (tdr_config_set(cfg, a->sets[i], err) < 0)
			return tdr_err_wrap(err, "--set");
	if (a->name) {
		if (strlen(a->name) >= sizeof(cfg->name))
			return tdr_err_set(err, TDR_ECONFIG, "-N: name longer than %zu bytes", sizeof(cfg->name) - 1);
		snprintf(cfg->name, sizeof(cfg->name), "%s", a->name);
	}
	if (cfg->name[0] == '\0') {
		char host[48] = "tdrain";

		(void)gethostname(host, sizeof(host));
		host[sizeof(host) - 1] = '\0';
		snprintf(cfg->name, sizeof(cfg->name), "%s-%d", host, (int)getpid());
	}
	return tdr_config_validate(cfg, err);
}

/*
 * What this replica knows of the leader's published counts: a follower uses
 * them while they keep changing, judged on its own monotonic clock as leases
 * are (no two hosts' wall clocks are compared).
 */
struct observer {
	int64_t seq;           /* the leader's: counts published so far */
	char key[200];         /* holder/epoch/seq of the last document seen */
	int64_t changed_ms;    /* monotonic time it last changed */
};

#define STATE_BACKLOG_ID "backlog"

static int64_t head_created_at(tdr_store *st, mongoc_client_t *c)
{
	mongoc_collection_t *coll = tdr_store_coll(st, c, st->events);
	bson_t filter = BSON_INITIALIZER, fo = BSON_INITIALIZER;
	mongoc_cursor_t *cur;
	const bson_t *doc;
	bson_iter_t it;
	int64_t at = -1;

	BSON_APPEND_INT64(&fo, "limit", 1);
	BSON_APPEND_INT64(&fo, "maxTimeMS", st->timeout_ms);
	cur = mongoc_collection_find_with_opts(coll, &filter, &fo, NULL);
	if (mongoc_cursor_next(cur, &doc) && bson_iter_init_find(&it, doc, "created_at") &&
	    BSON_ITER_HOLDS_DATE_TIME(&it))
		at = bson_iter_date_time(&it);
	mongoc_cursor_destroy(cur);
	bson_destroy(&filter);
	bson_destroy(&fo);
	mongoc_collection_destroy(coll);
	return at;
}

/* Exact counts, each bounded by tdr_count_limit(): -1 for a count that failed. */
static void count_store(tdr_store *st, mongoc_client_t *c, const tdr_config *cfg, struct tdr_metrics *m,
			int64_t *head_at)
{
	const char *colls[3] = { st->events, TDR_C_DEADLETTER, TDR_C_DELTAS };
	int64_t *outs[3] = { &m->backlog, &m->deadletter, &m->pending_deltas };
	int caps[3] = { 0, 0, 0 };

	for (int i = 0; i < 3; i++)
		if (got_stop || tdr_store_count(st, c, colls[i], tdr_count_limit(cfg), outs[i], &caps[i], NULL) < 0)
			*outs[i] = -1;
	m->backlog_capped = m->backlog >= 0 && caps[0];
	*head_at = m->backlog > 0 && !got_stop ? head_created_at(st, c) : -1;
}

/* The leader's counts for the others: tdrain_state "backlog", of which the leader is the one writer. */
static void publish_counts(tdr_store *st, mongoc_client_t *c, const tdr_config *cfg, int64_t epoch,
			   struct observer *ob, const struct tdr_metrics *m, int64_t head_at)
{
	mongoc_collection_t *coll = tdr_store_coll(st, c, TDR_C_STATE);
	bson_t sel = BSON_INITIALIZER, doc = BSON_INITIALIZER, opts = BSON_INITIALIZER;

	BSON_APPEND_UTF8(&sel, "_id", STATE_BACKLOG_ID);
	BSON_APPEND_UTF8(&doc, "_id", STATE_BACKLOG_ID);
	BSON_APPEND_INT64(&doc, "fifo", m->backlog);
	BSON_APPEND_BOOL(&doc, "fifo_capped", m->backlog_capped);
	BSON_APPEND_INT64(&doc, "deadletters", m->deadletter);
	BSON_APPEND_INT64(&doc, "deltas", m->pending_deltas);
	BSON_APPEND_INT64(&doc, "limit", tdr_count_limit(cfg));
	if (head_at >= 0)
		BSON_APPEND_DATE_TIME(&doc, "head_created_at", head_at);
	BSON_APPEND_UTF8(&doc, "holder", cfg->name);
	BSON_APPEND_INT64(&doc, "epoch", epoch);
	BSON_APPEND_INT64(&doc, "seq", ++ob->seq);
	BSON_APPEND_DATE_TIME(&doc, "at", tdr_wall_ms());
	BSON_APPEND_BOOL(&opts, "upsert", true);
	/*
	 * Best effort: a follower that finds no fresh document counts for
	 * itself.  A deposed leader's late write is stamped with its epoch and
	 * is superseded at the next interval.
	 */
	(void)mongoc_collection_replace_one(coll, &sel, &doc, &opts, NULL, NULL);
	bson_destroy(&opts);
	bson_destroy(&doc);
	bson_destroy(&sel);
	mongoc_collection_destroy(coll);
}

/* A follower: the leader's published counts if they are still being refreshed; 0 if used. */
static int read_published(tdr_store *st, mongoc_client_t *c, const tdr_config *cfg, struct observer *ob,
			  struct tdr_metrics *m, int64_t *head_at)
{
	mongoc_collection_t *coll = tdr_store_coll(st, c, TDR_C_STATE);
	bson_t filter = BSON_INITIALIZER, fo = BSON_INITIALIZER;
	mongoc_cursor_t *cur;
	const bson_t *doc;
	int rc = -1;

	BSON_APPEND_UTF8(&filter, "_id", STATE_BACKLOG_ID);
	BSON_APPEND_INT64(&fo, "limit", 1);
	BSON_APPEND_INT64(&fo, "maxTimeMS", st->timeout_ms);
	cur = mongoc_collection_find_with_opts(coll, &filter, &fo, NULL);
	if (mongoc_cursor_next(cur, &doc)) {
		bson_iter_t it;
		char key[200];
		const char *holder = "";
		int64_t epoch = 0, seq = 0, now = tdr_mono_ms();

		if (bson_iter_init_find(&it, doc, "holder") && BSON_ITER_HOLDS_UTF8(&it))
			holder = bson_iter_utf8(&it, NULL);
		if (bson_iter_init_find(&it, doc, "epoch") && BSON_ITER_HOLDS_NUMBER(&it))
			epoch = bson_iter_as_int64(&it);
		if (bson_iter_init_find(&it, doc, "seq") && BSON_ITER_HOLDS_NUMBER(&it))
			seq = bson_iter_as_int64(&it);
		snprintf(key, sizeof(key), "%s/%" PRId64 "/%" PRId64, holder, epoch, seq);
		if (strcmp(key, ob->key) != 0) {
			snprintf(ob->key, sizeof(ob->key), "%s", key);
			ob->changed_ms = now;
		}
		/* The leader writes every metrics.interval_ms: three missed intervals and we count ourselves. */
		if (now - ob->changed_ms <= 3 * cfg->metrics_interval_ms + 1000 &&
		    bson_iter_init_find(&it, doc, "fifo") && BSON_ITER_HOLDS_NUMBER(&it)) {
			m->backlog = bson_iter_as_int64(&it);
			m->backlog_capped = bson_iter_init_find(&it, doc, "fifo_capped") && bson_iter_as_bool(&it);
			m->deadletter = bson_iter_init_find(&it, doc, "deadletters") && BSON_ITER_HOLDS_NUMBER(&it)
						? bson_iter_as_int64(&it)
						: -1;
			m->pending_deltas = bson_iter_init_find(&it, doc, "deltas") && BSON_ITER_HOLDS_NUMBER(&it)
						    ? bson_iter_as_int64(&it)
						    : -1;
			*head_at = bson_iter_init_find(&it, doc, "head_created_at") && BSON_ITER_HOLDS_DATE_TIME(&it)
					   ? bson_iter_date_time(&it)
					   : -1;
			rc = 0;
		}
	}
	mongoc_cursor_destroy(cur);
	bson_destroy(&filter);
	bson_destroy(&fo);
	mongoc_collection_destroy(coll);
	return rc;
}

/*
 * The FIFO's size, its head's age, dead letters and unfolded deltas (for
 * STATUS, metrics and backlog_alert), exact (never the store's statistics:
 * DocumentDB's say 85,000 for an empty FIFO).  A count costs up to
 * metrics.count_limit documents read, so only the leader counts, once per
 * metrics.interval_ms, and publishes; the others read one small document.
 */
static void observe_store(tdr_store *st, const tdr_config *cfg, int is_leader, int64_t leader_epoch,
			  struct observer *ob, struct tdr_metrics *m)
{
	mongoc_client_t *c = tdr_store_pop(st);
	int64_t head_at = -1;

	m->backlog_capped = 0;
	/*
	 * Each statement here is bounded by store.timeout_ms, but there are up to
	 * five of them: after SIGTERM the rest are skipped (got_stop), so a stop
	 * with the store gone waits for at most the one in flight, not for all
	 * (the stop's budget is store.timeout_ms + 2 s).
	 */
	if (is_leader) {
		count_store(st, c, cfg, m, &head_at);
		if (!got_stop)
			publish_counts(st, c, cfg, leader_epoch, ob, m, head_at);
	} else if (!got_stop && read_published(st, c, cfg, ob, m, &head_at) < 0) {
		count_store(st, c, cfg, m, &head_at);
	}
	m->oldest_age_ms = m->backlog > 0 && head_at >= 0 ? tdr_wall_ms() - head_at : -1;
	tdr_store_push(st, c);
}

static void status_line(char *buf, size_t len, const tdr_config *cfg, const tdr_coord_view *v,
			const struct tdr_metrics *m)
{
	char parts[256];

	tdr_parts_format(v->scopes, v->nscopes, parts, sizeof(parts));
	snprintf(buf, len, "%s%s, %s: partitions [%s], backlog %s%lld, %.0f events/s, fold lag %.1fs%s",
		 v->is_leader ? "leader" : "follower",
		 cfg->mode == TDR_MODE_PARTITIONED ? "" : (v->is_leader ? " (draining)" : " (standby)"),
		 tdr_mode_name(cfg->mode), parts, m->backlog_capped ? ">=" : "", (long long)m->backlog, m->drain.rate,
		 (double)m->fold.lag_ms / 1000.0, m->indexes_pending ? ", indexes pending (claims scan until built)" : "");
}

int main(int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "set", required_argument, NULL, 's' },
		{ "print-config", no_argument, NULL, 'P' },
		{ "help", no_argument, NULL, 'h' },
		{ "version", no_argument, NULL, 'V' },
		{ NULL, 0, NULL, 0 },
	};
	struct args a = { 0 };
	tdr_config cfg;
	tdr_err err;
	tdr_store *st = NULL, *fold_st = NULL;
	int fold_abandoned = 0, coord_abandoned = 0;
	tdr_coord *coord = NULL;
	tdr_archive *ar = NULL;
	tdr_drain *drain = NULL;
	tdr_fold *fold = NULL;
	tdr_indexer *ix = NULL;
	int ix_abandoned = 0, close_abandoned = 0;
	int64_t stop_deadline = INT64_MAX; /* set once the stop begins: what may still block must end by then */
	tdr_metrics_http *mh = NULL;
	static sigset_t sigs;
	pthread_t sigthr;
	int opt, status = EX_OK;
	char redacted[1100];

	a.sets = calloc((size_t)argc + 1, sizeof(*a.sets));
	if (a.sets == NULL)
		return EX_OSERR;
	while ((opt = getopt_long(argc, argv, "c:N:nhV", longopts, NULL)) != -1) {
		switch (opt) {
		case 'c':
			a.file = optarg;
			break;
		case 'N':
			a.name = optarg;
			break;
		case 's':
			a.sets[a.nsets++] = optarg;
			break;
		case 'n':
			a.check_only = 1;
			break;
		case 'P':
			a.print_config = 1;
			break;
		case 'V':
			printf("tdrain %s\n", PACKAGE_VERSION);
			free(a.sets);
			return EX_OK;
		case 'h':
			usage(stdout);
			free(a.sets);
			return EX_OK;
		default:
			usage(stderr);
			free(a.sets);
			return EX_USAGE;
		}
	}
	if (optind != argc) {
		usage(stderr);
		free(a.sets);
		return EX_USAGE;
	}
	tdr_err_clear(&err);
	if (load_config(&a, &cfg, &err) < 0) {
		fprintf(stderr, "tdrain: configuration error: %s\n", err.msg);
		free(a.sets);
		return EX_CONFIG;
	}
	if (a.print_config) {
		tdr_config_print(&cfg, stdout);
		free(a.sets);
		return EX_OK;
	}
	if (a.check_only) {
		printf("configuration OK\n");
		free(a.sets);
		return EX_OK;
	}

	tdr_log_init("tdrain", tdr_log_level_parse(cfg.log_level));
	tdr_log_set_context(cfg.name);
	tdr_notify_init();
	/* Before any other thread exists, so all of them inherit the mask. */
	sigemptyset(&sigs);
	sigaddset(&sigs, SIGTERM);
	sigaddset(&sigs, SIGINT);
	sigaddset(&sigs, SIGHUP);
	pthread_sigmask(SIG_BLOCK, &sigs, NULL);
	signal(SIGPIPE, SIG_IGN);
	if (pthread_create(&sigthr, NULL, signal_thread, &sigs) != 0) {
		fprintf(stderr, "tdrain: cannot start the signal thread: %s\n", strerror(errno));
		free(a.sets);
		return EX_OSERR;
	}


	tdr_redact_uri(cfg.store_uri, redacted, sizeof(redacted));
	if (tdr_store_open(&st, &cfg, "tdrain", &err) < 0) {
		log_err("configuration error: %s", err.msg);
		status = EX_CONFIG;
		goto out;
	}
	if (tdr_store_ping(st, &err) < 0) {
		log_err("store %s unreachable: %s", redacted, err.msg);
		status = EX_UNAVAILABLE;
		goto out;
	}
	{
		/*
		 * One attempt within store.timeout_ms.  Indexes make claims fast but
		 * no rule depends on them, so if the build is slow (a populated FIFO:
		 * minutes on MongoDB, the next minute's job on DocumentDB) or fails,
		 * we drain without them and retry in the background (indexer.h).
		 */
		mongoc_client_t *c = tdr_store_pop(st);
		unsigned missing = 0;
		int rc = tdr_store_create_indexes(st, c, tdr_store_indexes_wanted(st), &missing, &err);

		/* Also replaces a "pending" left by this replica's previous incarnation. */
		(void)tdr_indexes_publish(st, c, cfg.name, rc < 0 ? missing : 0, 1, rc < 0 ? err.msg : "", NULL);
		tdr_store_push(st, c);
		if (rc < 0) {
			char names[128], retry[24];
			tdr_field f[3] = { { "TDRAIN_INDEXES", names },
					   { "TDRAIN_RETRY_S", retry },
					   { "TDRAIN_ERROR", err.msg } };
			tdr_err e2;

			tdr_store_index_names(missing, names, sizeof(names));
			snprintf(retry, sizeof(retry), "%d", TDR_INDEX_RETRY_FIRST_MS / 1000);
			tdr_log_event(LOG_WARNING, TDR_EV_INDEXES_PENDING, f, 3,
				      "indexes pending: %s not built yet (%s); draining without them, retrying in %s s",
				      names, err.msg, retry);
			if (tdr_indexer_start(&ix, &cfg, st, missing, err.msg, &e2) < 0) {
				log_err("%s", e2.msg);
				status = EX_OSERR;
				goto out;
			}
		}
	}
	if (tdr_coord_new(&coord, &cfg, st, &err) < 0) {
		log_err("coordinator: %s", err.msg);
		status = err.code == TDR_ECONFIG ? EX_CONFIG : EX_UNAVAILABLE;
		goto out;
	}
	{
		/* The coordinator must answer before we claim to be ready. */
		tdr_lease_backend *be = tdr_coord_backend(coord);
		tdr_lease_info *infos = NULL;
		size_t n = 0;

		if (be->ops->list(be, "", &infos, &n, &err) < 0) {
			log_err("coordination backend %s unreachable: %s", tdr_backend_name(cfg.backend), err.msg);
			status = EX_UNAVAILABLE;
			goto out;
		}
		free(infos);
	}
	if (tdr_archive_open(&ar, &cfg, &err) < 0) {
		log_err("archive: %s", err.msg);
		status = EX_CANTCREAT;
		goto out;
	}
	{
		/*
		 * The fold has its own connections and timeout (fold.timeout_ms): on
		 * FerretDB its statements scan whole collections and can take longer
		 * than a claim may, and its writes are fenced, so a slow one is safe.
		 */
		tdr_config fcfg = cfg;

		fcfg.store_timeout_ms = cfg.fold_timeout_ms;
		if (tdr_store_open(&fold_st, &fcfg, "tdrain-fold", &err) < 0) {
			log_err("configuration error: %s", err.msg);
			status = EX_CONFIG;
			goto out;
		}
		fold_st->is_ferretdb = st->is_ferretdb;
		fold_st->is_documentdb = st->is_documentdb; /* the fold's statement shapes (fold_image.c) */
		fold_st->max_bson = st->max_bson;
	}
	if (tdr_drain_new(&drain, &cfg, st, coord, ar, &err) < 0 || tdr_fold_new(&fold, &cfg, fold_st, coord, &err) < 0) {
		log_err("%s", err.msg);
		status = err.code == TDR_ECONFIG ? EX_CONFIG : EX_SOFTWARE;
		goto out;
	}
	/* A partition gained or lost ends the idle sleep: a failover's partitions are drained at once. */
	tdr_coord_set_wake(coord, &wake_flag);
	if (tdr_coord_start(coord, &err) < 0 || tdr_fold_start(fold, &err) < 0) {
		log_err("%s", err.msg);
		status = EX_OSERR;
		goto out;
	}
	/* Before READY=1, so that a replica that says it runs can be scraped. */
	if (cfg.metrics_listen[0] && tdr_metrics_http_start(&mh, cfg.metrics_listen, &err) < 0) {
		log_err("%s", err.msg);
		status = err.code == TDR_ECONFIG ? EX_CONFIG : EX_UNAVAILABLE;
		goto out;
	}
	stop_drain = drain;
	stop_coord = coord;
	if (got_stop) {
		/* A signal that came during start-up found neither. */
		tdr_drain_request_stop(drain);
		tdr_coord_request_stop(coord);
	}
	{
		tdr_field f[3] = { { "TDRAIN_MODE", tdr_mode_name(cfg.mode) },
				   { "TDRAIN_BACKEND", tdr_backend_name(cfg.backend) },
				   { "TDRAIN_STORE", redacted } };

		tdr_log_event(LOG_INFO, TDR_EV_STARTED, f, 3, "tdrain %s started: %s mode, %s coordination, store %s",
			      PACKAGE_VERSION, tdr_mode_name(cfg.mode), tdr_backend_name(cfg.backend), redacted);
	}

	{
		struct tdr_metrics m;
		struct observer ob;
		int64_t backoff = 0, last_status = 0, last_observe = 0, last_err_log = 0, errors = 0;
		uint64_t last_gen = 0, gen;
		int ready = 0, alerted = 0;

		memset(&m, 0, sizeof(m));
		memset(&ob, 0, sizeof(ob));
		m.backlog = m.oldest_age_ms = m.deadletter = m.pending_deltas = -1;
		while (!got_stop) {
			int full = 0, rc;
			int64_t n = 0, now, wait;

			if (got_reload) {
				tdr_config nc;

				got_reload = 0;
				if (load_config(&a, &nc, &err) < 0) {
					log_err("reload: configuration error, keeping the running one: %s", err.msg);
				} else {
					tdr_drain_reload(drain, &nc);
					tdr_fold_reload(fold, &nc);
					tdr_log_set_level(tdr_log_level_parse(nc.log_level));
					cfg.batch_size = nc.batch_size;
					cfg.poll_max_ms = nc.poll_max_ms;
					cfg.metrics_interval_ms = nc.metrics_interval_ms;
					cfg.backlog_alert = nc.backlog_alert;
					cfg.count_limit = nc.count_limit;
					memcpy(cfg.metrics_file, nc.metrics_file, sizeof(cfg.metrics_file));
					if (strcmp(cfg.metrics_listen, nc.metrics_listen) != 0) {
						/* The old address is let go first: the new one may be the same port. */
						tdr_metrics_http_stop(mh);
						mh = NULL;
						memcpy(cfg.metrics_listen, nc.metrics_listen, sizeof(cfg.metrics_listen));
						if (cfg.metrics_listen[0] &&
						    tdr_metrics_http_start(&mh, cfg.metrics_listen, &err) < 0)
							log_err("reload: %s; the endpoint stays off until the next reload",
								err.msg);
						else
							log_info("metrics.listen: %s", cfg.metrics_listen[0] ? cfg.metrics_listen
													    : "off");
					}
					memcpy(cfg.log_level, nc.log_level, sizeof(cfg.log_level));
					log_info("configuration reloaded (keys needing a restart are unchanged)");
				}
				tdr_notify_ready("reloaded");
			}

			rc = tdr_drain_step(drain, &full, &n, &err);
			now = tdr_mono_ms();
			if (rc < 0) {
				errors++;
				/* One line per 10 s while the store is down, not one per retry. */
				if (now - last_err_log >= 10000) {
					log_warn("drain step failed, will retry (%lld failures): %s", (long long)errors,
						 err.msg);
					last_err_log = now;
				}
				backoff = backoff ? (backoff * 2 > cfg.poll_max_ms * 4 ? cfg.poll_max_ms * 4 : backoff * 2)
						  : 50;
				wait = backoff;
			} else {
				if (errors && now - last_err_log < 60000)
					log_info("drain steps succeed again after %lld failures", (long long)errors);
				errors = 0;
				tdr_fold_drain_busy(fold, full);
				/* Straight on after a full batch; back off towards poll_max_ms when idle. */
				if (full)
					backoff = 0;
				else if (n > 0)
					backoff = 0;
				else
					backoff = backoff ? (backoff * 2 > cfg.poll_max_ms ? cfg.poll_max_ms : backoff * 2) : 10;
				wait = full || n > 0 ? 0 : backoff;
			}
			/* Alive and looping: a hung store call would stop these pings, and systemd restarts us. */
			tdr_notify_watchdog();
			if (ar)
				tdr_archive_tick(ar);

			/* Once a second, and at once when the partitions held changed (metrics show a takeover then). */
			gen = tdr_coord_generation(coord);
			if (!ready || now - last_status >= 1000 || gen != last_gen) {
				tdr_coord_view v;
				int have_view = tdr_coord_view_get(coord, &v) == 0;

				if ((now - last_observe >= cfg.metrics_interval_ms || !ready) && !got_stop) {
					observe_store(st, &cfg, have_view && v.is_leader, have_view ? v.leader_epoch : 0,
						      &ob, &m);
					last_observe = now;
				}
				if (ix) {
					struct tdr_indexer_state is;

					tdr_indexer_get(ix, &is);
					m.indexes_pending = is.missing != 0;
				}
				tdr_drain_stats_get(drain, &m.drain);
				tdr_fold_stats_get(fold, &m.fold);
				if (ar) {
					tdr_archive_stats_get(ar, &m.archive);
					m.has_archive = 1;
				}
				if (have_view) {
					char line[512];

					m.replica = cfg.name;
					m.mode = tdr_mode_name(cfg.mode);
					m.is_leader = v.is_leader;
					m.partitions_owned = (int64_t)v.nscopes;
					m.members = (int64_t)v.nmembers;
					m.failovers = v.failovers;
					m.share_min = v.share_min;
					m.share_max = v.share_max;
					m.coord_requests = v.coord_requests;
					status_line(line, sizeof(line), &cfg, &v, &m);
					if (!ready) {
						tdr_notify_ready(line);
						ready = 1;
					} else {
						tdr_notify_status(line);
					}
					tdr_coord_view_free(&v);
				}
				if (cfg.metrics_file[0] || mh) {
					char *text;
					size_t len;

					if (tdr_metrics_render(&m, &text, &len, &err) < 0) {
						log_warn("%s", err.msg);
					} else {
						if (cfg.metrics_file[0] &&
						    tdr_metrics_write_file(cfg.metrics_file, text, len, &err) < 0)
							log_warn("%s", err.msg);
						if (mh)
							tdr_metrics_http_publish(mh, text, len); /* takes text */
						else
							free(text);
					}
				}
				if (cfg.backlog_alert > 0 && m.is_leader && m.backlog > cfg.backlog_alert && !alerted) {
					char b[24];
					tdr_field f[1] = { { "TDRAIN_BACKLOG", b } };

					snprintf(b, sizeof(b), "%s%lld", m.backlog_capped ? ">=" : "", (long long)m.backlog);
					tdr_log_event(LOG_WARNING, TDR_EV_BACKLOG_ALERT, f, 1,
						      "backlog %s exceeds metrics.backlog_alert %lld", b,
						      (long long)cfg.backlog_alert);
					alerted = 1;
				} else if (m.backlog >= 0 && m.backlog < cfg.backlog_alert / 2) {
					alerted = 0;
				}
				last_status = now;
				last_gen = gen;
			}
			if (wait > 0 && !got_reload)
				tdr_sleep_ms(wait, &wake_flag);
			wake_flag = 0;
		}
	}

	/* The in-flight batch has finished (the loop is synchronous): give everything back. */
	{
		/*
		 * Bounded: SIGTERM + store.timeout_ms + 1 s, even with the store or
		 * etcd gone (each release is one bulk request; what is not released
		 * by then expires as after a crash).
		 */
		int64_t t0 = __atomic_load_n(&stop_at_ms, __ATOMIC_SEQ_CST), deadline, left;

		if (t0 == 0)
			t0 = tdr_mono_ms();
		deadline = stop_deadline = t0 + cfg.store_timeout_ms + 1000;
		tdr_notify_stopping((cfg.store_timeout_ms + 2000) * 1000);
		tdr_log_event(LOG_INFO, TDR_EV_STOPPING, NULL, 0, "stopping: releasing leases");
		/*
		 * Release first, then wait for the fold: a fold statement may take up to
		 * fold.timeout_ms, and the next leader should not wait for it (whatever
		 * it writes after the release is fenced like a deposed leader's).
		 */
		tdr_fold_request_stop(fold);
		if (tdr_coord_stop_within(coord, deadline) < 0) {
			log_warn("coordinator: still waiting on the coordination backend at the stop deadline (%lld ms "
				 "after the signal); exiting without it: what it did not release expires",
				 (long long)(tdr_mono_ms() - t0));
			coord_abandoned = 1;
		}
		left = deadline - tdr_mono_ms();
		if (tdr_fold_stop_within(fold, left > 0 ? left : 0) < 0) {
			log_warn("fold: still waiting on the store at the stop deadline; exiting without it (its writes "
				 "are fenced)");
			fold_abandoned = 1;
		}
	}
	/*
	 * A pending build is not worth a slower stop: createIndexes is
	 * idempotent and whoever starts next tries again.
	 */
	if (tdr_indexer_stop_within(ix, 100) < 0) {
		log_info("indexes: a build request is still pending in the store; exiting without waiting for it");
		ix_abandoned = 1;
	}
out:
	/* Its store connections are closed by the stop deadline too (an abandoned close skips mongoc_cleanup). */
	if (tdr_indexer_free(ix, stop_deadline) < 0)
		ix_abandoned = 1;
	tdr_metrics_http_stop(mh);
	stop_drain = NULL;
	stop_coord = NULL;
	tdr_fold_free(fold);
	tdr_drain_free(drain);
	tdr_archive_close(ar);
	/* An abandoned coordinator thread still uses its backend and the store's pool: leave both to exit. */
	if (!coord_abandoned && !fold_abandoned) /* an abandoned fold thread still asks the coordinator */
		tdr_coord_free(coord);
	/*
	 * Closing ends the pools' server sessions (endSessions): with the store
	 * gone that waits out server selection, past the stop's budget (seen in
	 * t18: 3 s after the coordinator had finished).  Bounded by the deadline.
	 */
	if (!fold_abandoned && tdr_store_close_by(fold_st, stop_deadline) < 0) /* else the fold thread uses it */
		close_abandoned = 1;
	if (!coord_abandoned && tdr_store_close_by(st, stop_deadline) < 0)
		close_abandoned = 1;
	if (close_abandoned)
		log_info("store: connections still closing at the stop deadline; exiting without waiting for them");
	if (!fold_abandoned && !coord_abandoned && !ix_abandoned && !close_abandoned)
		mongoc_cleanup();
	/*
	 * End the signal thread so nothing outlives main: it returns from sigwait()
	 * with the signal we send it and sees the flag.  Not pthread_cancel(): the
	 * cancellation unwind leaves the thread's frame poisoned under
	 * AddressSanitizer, which then reports its own sigaltstack() call at thread
	 * exit (a false stack-buffer-underflow, seen in CI).
	 */
	signal_thread_quit = 1;
	pthread_kill(sigthr, SIGTERM);
	pthread_join(sigthr, NULL);
	free(a.sets);
	return status;
}
