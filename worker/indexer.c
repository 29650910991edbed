/* indexer.c - the index-build retry thread; the contract and the reasons are in indexer.h. */

#include "config.h"

#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lib/clock.h"
#include "lib/log.h"
#include "worker/indexer.h"

struct tdr_indexer {
	tdr_store *st; /* our own pool: socket timeout TDR_INDEX_TIMEOUT_MS */
	char replica[128];
	pthread_t thread;
	pthread_mutex_t mu;
	pthread_cond_t cv;
	int running, stop, exited; /* under mu */
	struct tdr_indexer_state s; /* under mu */
};

int tdr_indexes_publish(tdr_store *st, mongoc_client_t *c, const char *replica, unsigned missing,
			int64_t attempts, const char *error, tdr_err *err)
{
	mongoc_collection_t *coll = tdr_store_coll(st, c, TDR_C_STATE);
	bson_t sel = BSON_INITIALIZER, doc = BSON_INITIALIZER, arr, opts = BSON_INITIALIZER;
	bson_error_t be;
	char id[160];
	int rc = 0, k = 0;

	snprintf(id, sizeof(id), "indexes/%s", replica);
	BSON_APPEND_UTF8(&sel, "_id", id);
	BSON_APPEND_UTF8(&doc, "_id", id);
	BSON_APPEND_UTF8(&doc, "replica", replica);
	BSON_APPEND_BOOL(&doc, "pending", missing != 0);
	BSON_APPEND_ARRAY_BEGIN(&doc, "missing", &arr);
	for (int i = 0; i < TDR_NINDEXES; i++) {
		char key[16];

		if (!(missing & (1u << i)))
			continue;
		snprintf(key, sizeof(key), "%d", k++);
		BSON_APPEND_UTF8(&arr, key, tdr_index_specs[i].name);
	}
	bson_append_array_end(&doc, &arr);
	BSON_APPEND_INT64(&doc, "attempts", attempts);
	BSON_APPEND_UTF8(&doc, "error", error ? error : "");
	BSON_APPEND_DATE_TIME(&doc, "at", tdr_wall_ms());
	/* This replica is the only writer of its document: a plain upsert. */
	BSON_APPEND_BOOL(&opts, "upsert", true);
	if (!mongoc_collection_replace_one(coll, &sel, &doc, &opts, NULL, &be))
		rc = tdr_store_error(&be, "tdrain_state indexes", err);
	bson_destroy(&opts);
	bson_destroy(&doc);
	bson_destroy(&sel);
	mongoc_collection_destroy(coll);
	return rc;
}

/* Wait until the monotonic instant at, or a stop; returns non-zero on stop.  Called with mu held. */
static int wait_until_locked(tdr_indexer *ix, int64_t at)
{
	while (!ix->stop && !tdr_cond_wait_deadline(&ix->cv, &ix->mu, at))
		;
	return ix->stop;
}

static void *indexer_main(void *arg)
{
	tdr_indexer *ix = arg;
	int64_t delay = TDR_INDEX_RETRY_FIRST_MS, last_warn = 0;

	pthread_mutex_lock(&ix->mu);
	ix->s.next_retry_ms = tdr_mono_ms() + delay;
	while (ix->s.missing && !wait_until_locked(ix, ix->s.next_retry_ms)) {
		unsigned want = ix->s.missing, missing = want;
		mongoc_client_t *c;
		tdr_err e;
		int rc;

		ix->s.building = 1;
		ix->s.next_retry_ms = 0;
		ix->s.attempts++;
		pthread_mutex_unlock(&ix->mu);

		tdr_err_clear(&e);
		c = tdr_store_pop(ix->st);
		rc = tdr_store_create_indexes(ix->st, c, want, &missing, &e);
		/* Published for tdrainctl status; a failure here only makes its view older. */
		(void)tdr_indexes_publish(ix->st, c, ix->replica, rc < 0 ? missing : 0, ix->s.attempts,
					  rc < 0 ? e.msg : "", NULL);
		tdr_store_push(ix->st, c);

		pthread_mutex_lock(&ix->mu);
		ix->s.building = 0;
		if (rc == 0) {
			char names[128], att[24];
			tdr_field f[2] = { { "TDRAIN_INDEXES", names }, { "TDRAIN_ATTEMPTS", att } };

			ix->s.missing = 0;
			ix->s.error[0] = '\0';
			tdr_store_index_names(want, names, sizeof(names));
			snprintf(att, sizeof(att), "%" PRId64, ix->s.attempts);
			tdr_log_event(LOG_INFO, TDR_EV_INDEXES_READY, f, 2, "indexes ready: %s (after %" PRId64 " attempts)",
				      names, ix->s.attempts);
			break;
		}
		ix->s.missing = missing;
		snprintf(ix->s.error, sizeof(ix->s.error), "%s", e.msg);
		/* One warning per 10 min at the longest backoff; the metric and status say the rest. */
		if (last_warn == 0 || tdr_mono_ms() - last_warn >= 600000) {
			log_warn("index build still pending (attempt %" PRId64 ", next in %" PRId64 " s): %s",
				 ix->s.attempts, delay * 2 > TDR_INDEX_RETRY_MAX_MS ? TDR_INDEX_RETRY_MAX_MS / 1000
										     : delay * 2 / 1000,
				 e.msg);
			last_warn = tdr_mono_ms();
		}
		delay = delay * 2 > TDR_INDEX_RETRY_MAX_MS ? TDR_INDEX_RETRY_MAX_MS : delay * 2;
		ix->s.next_retry_ms = tdr_mono_ms() + delay;
	}
	ix->s.next_retry_ms = 0;
	ix->exited = 1;
	pthread_cond_broadcast(&ix->cv);
	pthread_mutex_unlock(&ix->mu);
	return NULL;
}

int tdr_indexer_start(tdr_indexer **ret, const tdr_config *cfg, const tdr_store *like, unsigned missing,
		      const char *first_error, tdr_err *err)
{
	tdr_indexer *ix = calloc(1, sizeof(*ix));
	tdr_config icfg = *cfg;
	int rc;

	if (ix == NULL)
		return tdr_err_set(err, TDR_ENOMEM, "out of memory");
	/*
	 * A longer socket timeout than any other statement: the build may be
	 * answered only when the store has finished it.  Only this thread waits.
	 */
	icfg.store_timeout_ms = TDR_INDEX_TIMEOUT_MS;
	if ((rc = tdr_store_open(&ix->st, &icfg, "tdrain-indexes", err)) < 0) {
		free(ix);
		return rc;
	}
	ix->st->is_ferretdb = like->is_ferretdb;
	ix->st->max_bson = like->max_bson;
	snprintf(ix->replica, sizeof(ix->replica), "%s", cfg->name);
	ix->s.missing = missing;
	ix->s.attempts = 1; /* main()'s */
	snprintf(ix->s.error, sizeof(ix->s.error), "%s", first_error ? first_error : "");
	pthread_mutex_init(&ix->mu, NULL);
	tdr_cond_init_mono(&ix->cv);
	if ((rc = pthread_create(&ix->thread, NULL, indexer_main, ix)) != 0) {
		pthread_cond_destroy(&ix->cv);
		pthread_mutex_destroy(&ix->mu);
		tdr_store_close(ix->st);
		free(ix);
		return tdr_err_set(err, TDR_EFAIL, "index thread: %s", strerror(rc));
	}
	ix->running = 1;
	*ret = ix;
	return 0;
}

void tdr_indexer_get(tdr_indexer *ix, struct tdr_indexer_state *out)
{
	pthread_mutex_lock(&ix->mu);
	*out = ix->s;
	pthread_mutex_unlock(&ix->mu);
}

int tdr_indexer_stop_within(tdr_indexer *ix, int64_t ms)
{
	struct timespec ts;
	int exited;

	if (ix == NULL || !ix->running)
		return 0;
	tdr_mono_deadline(&ts, ms);
	pthread_mutex_lock(&ix->mu);
	ix->stop = 1;
	pthread_cond_broadcast(&ix->cv);
	while (!ix->exited && pthread_cond_timedwait(&ix->cv, &ix->mu, &ts) == 0)
		;
	exited = ix->exited;
	pthread_mutex_unlock(&ix->mu);
	if (!exited)
		return -1;
	pthread_join(ix->thread, NULL);
	ix->running = 0;
	return 0;
}

int tdr_indexer_free(tdr_indexer *ix, int64_t close_deadline_ms)
{
	int rc;

	if (ix == NULL)
		return 0;
	/*
	 * Still in a store call after tdr_indexer_stop_within gave up (or after
	 * 1 s if nobody asked): the process is exiting, leave the thread its memory.
	 */
	if (tdr_indexer_stop_within(ix, ix->stop ? 0 : 1000) < 0)
		return -1;
	pthread_cond_destroy(&ix->cv);
	pthread_mutex_destroy(&ix->mu);
	rc = tdr_store_close_by(ix->st, close_deadline_ms);
	free(ix);
	return rc < 0 ? -1 : 0;
}
