#include "config.h"

#include <ctype.h>
#include <errno.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "lib/conf.h"
#include "lib/hostport.h"
#include "lib/log.h"

enum kind { K_STR, K_INT, K_ENUM };

struct key {
	const char *name;
	enum kind kind;
	size_t off;
	size_t size;          /* string buffer size */
	const char *def;
	int64_t min, max;     /* K_INT bounds */
	const char *const *choices; /* K_ENUM: index is the value */
	int secret;
	const char *help;
};

static const char *const backends[] = { "mongo", "etcd", NULL };
static const char *const modes[] = { "single", "partitioned", NULL };

#define S(field) offsetof(tdr_config, field), sizeof(((tdr_config *)0)->field)
#define I(field) offsetof(tdr_config, field), 0

static const struct key keys[] = {
	{ "name", K_STR, S(name), "", 0, 0, NULL, 0, "replica name, unique among replicas (default: hostname-pid)" },
	{ "store.uri", K_STR, S(store_uri), "mongodb://127.0.0.1:27017", 0, 0, NULL, 1, "MongoDB connection URI (TLS options go here)" },
	{ "store.database", K_STR, S(store_db), "tdrain", 0, 0, NULL, 0, "database holding the FIFO and derived collections" },
	{ "store.events", K_STR, S(events_coll), "events", 0, 0, NULL, 0, "the FIFO collection producers insert into" },
	{ "store.timeout_ms", K_INT, I(store_timeout_ms), "5000", 100, 600000, NULL, 0, "per-operation store timeout" },
	{ "coord.backend", K_ENUM, I(backend), "mongo", 0, 0, backends, 0, "coordination backend: mongo or etcd" },
	{ "coord.mode", K_ENUM, I(mode), "single", 0, 0, modes, 0, "single (one leader drains) or partitioned (hash(_id) % partitions)" },
	{ "coord.partitions", K_INT, I(partitions), "16", 1, 4096, NULL, 0, "partition count P (partitioned mode); fixed for a deployment" },
	{ "coord.lease_ttl_ms", K_INT, I(lease_ttl_ms), "15000", 1000, 3600000, NULL, 0, "lease duration" },
	{ "coord.renew_deadline_ms", K_INT, I(renew_deadline_ms), "10000", 500, 3600000, NULL, 0, "a holder that has not renewed within this stops writing" },
	{ "coord.retry_period_ms", K_INT, I(retry_period_ms), "2000", 100, 600000, NULL, 0, "renew / acquire / observe period" },
	{ "coord.etcd_endpoint", K_STR, S(etcd_endpoint), "http://127.0.0.1:2379", 0, 0, NULL, 1, "etcd v3 JSON gateway URL (https:// for TLS)" },
	{ "coord.etcd_prefix", K_STR, S(etcd_prefix), "/tdrain/", 0, 0, NULL, 0, "key prefix in etcd" },
	{ "coord.etcd_auth", K_STR, S(etcd_auth), "", 0, 0, NULL, 1, "etcd credentials user:password (never logged)" },
	{ "drain.batch_size", K_INT, I(batch_size), "1000", 1, 50000, NULL, 0, "events claimed per batch" },
	{ "drain.poll_max_ms", K_INT, I(poll_max_ms), "1000", 1, 60000, NULL, 0, "longest idle wait between empty claims" },
	{ "drain.max_attempts", K_INT, I(max_attempts), "5", 1, 1000, NULL, 0, "claims of one event before it is dead-lettered" },
	{ "drain.max_event_bytes", K_INT, I(max_event_bytes), "262144", 1024, 16777216, NULL, 0, "larger event documents are dead-lettered" },
	{ "drain.allow_events", K_STR, S(allow_events), "", 0, 0, NULL, 0, "comma-separated event names; others dead-lettered (empty: all)" },
	{ "fold.interval_ms", K_INT, I(fold_interval_ms), "200", 10, 60000, NULL, 0, "how often the leader folds deltas into projections" },
	{ "fold.max_deltas", K_INT, I(fold_max_deltas), "256", 1, 1000, NULL, 0, "batch deltas folded per round (a round also stops at 100000 events, or fewer when its images would not fit in one redo record)" },
	{ "fold.timeout_ms", K_INT, I(fold_timeout_ms), "30000", 1000, 600000, NULL, 0, "per-operation store timeout of the fold (its writes are fenced, so it may outlive the lease)" },
	{ "fold.cache_mb", K_INT, I(fold_cache_mb), "256", 0, 65536, NULL, 0, "MiB of derived documents the leader keeps in memory (0: read them every round)" },
	{ "archive.dir", K_STR, S(archive_dir), "", 0, 0, NULL, 0, "NDJSON archive directory (empty: archive off)" },
	{ "archive.max_bytes", K_INT, I(archive_max_bytes), "67108864", 4096, INT64_MAX, NULL, 0, "rotate an archive file at this size" },
	{ "archive.max_age_s", K_INT, I(archive_max_age_s), "3600", 1, 86400 * 31, NULL, 0, "rotate an archive file at this age" },
	{ "archive.http_url", K_STR, S(archive_http_url), "", 0, 0, NULL, 1, "POST closed archive files here as NDJSON (empty: off)" },
	{ "archive.http_timeout_ms", K_INT, I(archive_http_timeout_ms), "10000", 100, 600000, NULL, 0, "HTTP sink request timeout" },
	{ "archive.max_backlog_bytes", K_INT, I(archive_max_backlog_bytes), "1073741824", 4096, INT64_MAX, NULL, 0, "unsent archive bytes before draining pauses" },
	{ "metrics.file", K_STR, S(metrics_file), "", 0, 0, NULL, 0, "Prometheus textfile path, written atomically (empty: off)" },
	{ "metrics.listen", K_STR, S(metrics_listen), "", 0, 0, NULL, 0, "serve GET /metrics over HTTP on HOST:PORT, e.g. 127.0.0.1:9464 (empty: off)" },
	{ "metrics.interval_ms", K_INT, I(metrics_interval_ms), "5000", 100, 600000, NULL, 0, "metrics file refresh period" },
	{ "metrics.backlog_alert", K_INT, I(backlog_alert), "100000", 0, INT64_MAX, NULL, 0, "log backlog_alert when pending exceeds this (0: never)" },
	{ "metrics.count_limit", K_INT, I(count_limit), "1000000", 1000, INT64_MAX, NULL, 0, "exact backlog counts stop at this many documents (shown as at least this)" },
	{ "log.level", K_STR, S(log_level), "info", 0, 0, NULL, 0, "error, warning, info or debug" },
	{ "test.trace_file", K_STR, S(trace_file), "", 0, 0, NULL, 0, "test aid: append one line per event dispatched" },
};

#define NKEYS (sizeof(keys) / sizeof(keys[0]))

static const struct key *find_key(const char *name, size_t len)
{
	for (size_t i = 0; i < NKEYS; i++)
		if (strlen(keys[i].name) == len && strncmp(keys[i].name, name, len) == 0)
			return &keys[i];
	return NULL;
}

static int apply(tdr_config *cfg, const struct key *k, const char *val, tdr_err *err)
{
	char *base = (char *)cfg;

	switch (k->kind) {
	case K_STR:
		if (strlen(val) >= k->size)
			return tdr_err_set(err, TDR_ECONFIG, "%s: value longer than %zu bytes", k->name, k->size - 1);
		memcpy(base + k->off, val, strlen(val) + 1);
		if (strcmp(k->name, "log.level") == 0 && tdr_log_level_parse(val) < 0)
			return tdr_err_set(err, TDR_ECONFIG, "log.level: '%s' is not error, warning, info or debug", val);
		return 0;
	case K_INT: {
		char *end;
		long long v;

		errno = 0;
		v = strtoll(val, &end, 10);
		if (errno || end == val || *end != '\0')
			return tdr_err_set(err, TDR_ECONFIG, "%s: '%s' is not an integer", k->name, val);
		if (v < k->min || v > k->max)
			return tdr_err_set(err, TDR_ECONFIG, "%s: %lld is outside [%lld, %lld]", k->name, v,
					   (long long)k->min, (long long)k->max);
		*(int64_t *)(void *)(base + k->off) = v;
		return 0;
	}
	case K_ENUM:
		for (int i = 0; k->choices[i]; i++)
			if (strcmp(k->choices[i], val) == 0) {
				*(int *)(void *)(base + k->off) = i;
				return 0;
			}
		return tdr_err_set(err, TDR_ECONFIG, "%s: '%s' is not one of the allowed values", k->name, val);
	}
	return tdr_err_set(err, TDR_ECONFIG, "%s: internal error", k->name);
}

void tdr_config_defaults(tdr_config *cfg)
{
	memset(cfg, 0, sizeof(*cfg));
	for (size_t i = 0; i < NKEYS; i++)
		(void)apply(cfg, &keys[i], keys[i].def, NULL);
}

static char *trim(char *s)
{
	char *e;

	while (isspace((unsigned char)*s))
		s++;
	e = s + strlen(s);
	while (e > s && isspace((unsigned char)e[-1]))
		*--e = '\0';
	return s;
}

static int set_kv(tdr_config *cfg, const char *key, size_t keylen, const char *val, tdr_err *err)
{
	const struct key *k = find_key(key, keylen);

	if (k == NULL)
		return tdr_err_set(err, TDR_ECONFIG, "unknown key '%.*s'", (int)keylen, key);
	return apply(cfg, k, val, err);
}

int tdr_config_set(tdr_config *cfg, const char *kv, tdr_err *err)
{
	const char *eq = strchr(kv, '=');

	if (eq == NULL)
		return tdr_err_set(err, TDR_ECONFIG, "'%s': expected key=value", kv);
	return set_kv(cfg, kv, (size_t)(eq - kv), eq + 1, err);
}

int tdr_config_load_file(tdr_config *cfg, const char *path, tdr_err *err)
{
	char line[4096];
	int lineno = 0, rc = 0;
	FILE *f = fopen(path, "re");

	if (f == NULL)
		return tdr_err_set(err, TDR_ECONFIG, "%s: %s", path, strerror(errno));
	while (fgets(line, sizeof(line), f)) {
		char *s, *eq, *key, *val;

		lineno++;
		if (strchr(line, '\n') == NULL && !feof(f)) {
			rc = tdr_err_set(err, TDR_ECONFIG, "%s:%d: line too long", path, lineno);
			break;
		}
		s = trim(line);
		if (*s == '\0' || *s == '#')
			continue;
		eq = strchr(s, '=');
		if (eq == NULL) {
			rc = tdr_err_set(err, TDR_ECONFIG, "%s:%d: expected 'key = value'", path, lineno);
			break;
		}
		*eq = '\0';
		key = trim(s);
		val = trim(eq + 1);
		/* Allow "quoted values" so leading/trailing spaces can be kept. */
		if (strlen(val) >= 2 && val[0] == '"' && val[strlen(val) - 1] == '"') {
			val[strlen(val) - 1] = '\0';
			val++;
		}
		if (set_kv(cfg, key, strlen(key), val, err) < 0) {
			rc = tdr_err_wrap(err, "%s:%d", path, lineno);
			break;
		}
	}
	fclose(f);
	return rc;
}

int tdr_config_load_env(tdr_config *cfg, tdr_err *err)
{
	for (size_t i = 0; i < NKEYS; i++) {
		char env[96] = "TDRAIN_";
		size_t n = strlen(env);
		const char *v;

		for (const char *p = keys[i].name; *p && n < sizeof(env) - 1; p++)
			env[n++] = *p == '.' ? '_' : (char)toupper((unsigned char)*p);
		env[n] = '\0';
		v = getenv(env);
		if (v && apply(cfg, &keys[i], v, err) < 0)
			return tdr_err_wrap(err, "environment %s", env);
	}
	return 0;
}

int tdr_config_validate(const tdr_config *cfg, tdr_err *err)
{
	/* The lease timing chain of docs/DESIGN.md: TTL > renew deadline > 1.2 x retry period. */
	if (!(cfg->lease_ttl_ms > cfg->renew_deadline_ms))
		return tdr_err_set(err, TDR_ECONFIG, "coord.lease_ttl_ms (%lld) must exceed coord.renew_deadline_ms (%lld)",
				   (long long)cfg->lease_ttl_ms, (long long)cfg->renew_deadline_ms);
	if (!(cfg->renew_deadline_ms * 10 > cfg->retry_period_ms * 12))
		return tdr_err_set(err, TDR_ECONFIG,
				   "coord.renew_deadline_ms (%lld) must exceed 1.2 x coord.retry_period_ms (%lld)",
				   (long long)cfg->renew_deadline_ms, (long long)cfg->retry_period_ms);
	if (cfg->store_timeout_ms >= cfg->renew_deadline_ms)
		return tdr_err_set(err, TDR_ECONFIG, "store.timeout_ms (%lld) must be below coord.renew_deadline_ms (%lld)",
				   (long long)cfg->store_timeout_ms, (long long)cfg->renew_deadline_ms);
	if (strncmp(cfg->store_uri, "mongodb://", 10) != 0 && strncmp(cfg->store_uri, "mongodb+srv://", 14) != 0)
		return tdr_err_set(err, TDR_ECONFIG, "store.uri must start with mongodb:// or mongodb+srv://");
	if (cfg->backend == TDR_BACKEND_ETCD && strncmp(cfg->etcd_endpoint, "http://", 7) != 0 &&
	    strncmp(cfg->etcd_endpoint, "https://", 8) != 0)
		return tdr_err_set(err, TDR_ECONFIG, "coord.etcd_endpoint must start with http:// or https://");
	for (const char *p = cfg->name; *p; p++)
		if (!isalnum((unsigned char)*p) && *p != '-' && *p != '_' && *p != '.' && *p != '@')
			return tdr_err_set(err, TDR_ECONFIG, "name '%s': use letters, digits, '-', '_', '.', '@'", cfg->name);
	if (cfg->archive_http_url[0] && cfg->archive_dir[0] == '\0')
		return tdr_err_set(err, TDR_ECONFIG, "archive.http_url needs archive.dir (the spool)");
	for (const char *p = cfg->store_db; *p; p++)
		if (*p == '.' || *p == '/' || *p == ' ' || *p == '$')
			return tdr_err_set(err, TDR_ECONFIG, "store.database '%s' has a character MongoDB forbids", cfg->store_db);
	if (cfg->metrics_listen[0]) {
		tdr_hostport hp;

		if (tdr_hostport_parse(cfg->metrics_listen, &hp, err) < 0)
			return tdr_err_wrap(err, "metrics.listen");
	}
	if (cfg->store_db[0] == '\0' || cfg->events_coll[0] == '\0')
		return tdr_err_set(err, TDR_ECONFIG, "store.database and store.events must not be empty");
	return 0;
}

void tdr_config_print(const tdr_config *cfg, FILE *out)
{
	const char *base = (const char *)cfg;

	for (size_t i = 0; i < NKEYS; i++) {
		const struct key *k = &keys[i];
		char val[1100];

		switch (k->kind) {
		case K_STR:
			if (k->secret && strncmp(k->name, "coord.etcd_auth", 15) == 0)
				snprintf(val, sizeof(val), "%s", base[k->off] ? "***" : "");
			else if (k->secret)
				tdr_redact_uri(base + k->off, val, sizeof(val));
			else
				snprintf(val, sizeof(val), "%s", base + k->off);
			break;
		case K_INT:
			snprintf(val, sizeof(val), "%lld", (long long)*(const int64_t *)(const void *)(base + k->off));
			break;
		case K_ENUM:
			snprintf(val, sizeof(val), "%s", k->choices[*(const int *)(const void *)(base + k->off)]);
			break;
		}
		fprintf(out, "%-28s = %-32s # %s\n", k->name, val, k->help);
	}
}

int tdr_config_event_allowed(const tdr_config *cfg, const char *name)
{
	const char *p = cfg->allow_events;
	size_t n = strlen(name);

	if (*p == '\0')
		return 1;
	while (*p) {
		const char *comma = strchr(p, ',');
		size_t len = comma ? (size_t)(comma - p) : strlen(p);

		while (len && *p == ' ') {
			p++;
			len--;
		}
		while (len && p[len - 1] == ' ')
			len--;
		if (len == n && strncmp(p, name, n) == 0)
			return 1;
		if (comma == NULL)
			break;
		p = comma + 1;
	}
	return 0;
}

const char *tdr_mode_name(int mode)
{
	return modes[mode == TDR_MODE_PARTITIONED];
}

const char *tdr_backend_name(int backend)
{
	return backends[backend == TDR_BACKEND_ETCD];
}

int tdr_parse_i64(const char *s, int64_t lo, int64_t hi, int64_t *ret)
{
	char *end;
	long long v;

	errno = 0;
	v = strtoll(s, &end, 10);
	if (errno || end == s || *end || v < lo || v > hi)
		return -1;
	*ret = v;
	return 0;
}
