/*
 * config.h - tdrain's configuration: one table of keys, three sources.
 *
 * Precedence, lowest first: built-in default, the file (-c, "key = value"
 * lines, '#' comments), environment (TDRAIN_<KEY> with '.' -> '_', upper case,
 * e.g. TDRAIN_STORE_URI), then command-line "--set key=value".  Every key is
 * documented in docs/CONFIG.md and tdrain.conf(5); tdr_config_describe()
 * prints the table so the docs can be checked against the code.
 */
#ifndef TDRAIN_CONF_H
#define TDRAIN_CONF_H

#include <stdint.h>
#include <stdio.h>

#include "lib/err.h"

enum tdr_coord_backend { TDR_BACKEND_MONGO = 0, TDR_BACKEND_ETCD = 1 };
enum tdr_coord_mode { TDR_MODE_SINGLE = 0, TDR_MODE_PARTITIONED = 1 };

#define TDR_MAX_ALLOW 64

typedef struct tdr_config {
	char name[64];            /* replica name: unique per replica */
	char store_uri[1024];
	char store_db[64];
	char events_coll[64];
	int64_t store_timeout_ms;

	int backend;              /* enum tdr_coord_backend */
	int mode;                 /* enum tdr_coord_mode */
	int64_t partitions;
	int64_t lease_ttl_ms;
	int64_t renew_deadline_ms;
	int64_t retry_period_ms;
	char etcd_endpoint[256];
	char etcd_prefix[128];
	char etcd_auth[128];      /* "user:password" or empty; never logged */

	int64_t batch_size;
	int64_t poll_max_ms;
	int64_t max_attempts;
	int64_t max_event_bytes;
	char allow_events[1024];  /* comma-separated allow-list; empty = all well-formed */

	int64_t fold_interval_ms;
	int64_t fold_max_deltas;
	int64_t fold_cache_mb;
	int64_t fold_timeout_ms;

	char archive_dir[512];
	int64_t archive_max_bytes;
	int64_t archive_max_age_s;
	char archive_http_url[512];
	int64_t archive_http_timeout_ms;
	int64_t archive_max_backlog_bytes;

	char metrics_file[512];
	char metrics_listen[80];  /* HOST:PORT of the HTTP /metrics endpoint; empty = off */
	int64_t metrics_interval_ms;
	int64_t backlog_alert;
	int64_t count_limit;       /* exact counts stop here; see tdr_count_limit() */

	char log_level[16];
	char trace_file[512];     /* test aid: one line per dispatched event */
} tdr_config;

void tdr_config_defaults(tdr_config *cfg);

/* Apply "key = value" from file; unknown keys and bad values are errors. */
int tdr_config_load_file(tdr_config *cfg, const char *path, tdr_err *err);
/* Apply every TDRAIN_* variable that names a key. */
int tdr_config_load_env(tdr_config *cfg, tdr_err *err);
/* Apply one "key=value". */
int tdr_config_set(tdr_config *cfg, const char *kv, tdr_err *err);
/* Cross-field checks (lease timings etc). */
int tdr_config_validate(const tdr_config *cfg, tdr_err *err);

/*
 * Where exact counts stop: metrics.count_limit, raised above
 * metrics.backlog_alert so that a capped backlog still trips the alert.
 */
static inline int64_t tdr_count_limit(const tdr_config *cfg)
{
	if (cfg->backlog_alert <= 0 || cfg->backlog_alert < cfg->count_limit)
		return cfg->count_limit;
	return cfg->backlog_alert < INT64_MAX ? cfg->backlog_alert + 1 : INT64_MAX;
}

/* Print every key, its current value (secrets redacted) and its meaning. */
void tdr_config_print(const tdr_config *cfg, FILE *out);

/* The allow-list: 1 if no list configured or name is in it. */
int tdr_config_event_allowed(const tdr_config *cfg, const char *name);

const char *tdr_mode_name(int mode);
const char *tdr_backend_name(int backend);

/* s as a whole decimal integer within [lo, hi] in *ret; -1 if it is not one (command-line option values). */
int tdr_parse_i64(const char *s, int64_t lo, int64_t hi, int64_t *ret);

#endif
