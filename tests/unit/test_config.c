/*
 * test_config.c - lib/conf.c: defaults, the file format, the environment,
 * "--set", precedence, cross-field validation, printing (secrets redacted)
 * and the event allow-list.
 *
 * Scratch files go to $TMPDIR (default /tmp) and are removed.
 */
#include "config.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "lib/conf.h"
#include "lib/err.h"
#include "tests/unit/tap.h"

static char path[512];

/* Write the file at path with printf-style content. */
static void write_file(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

static void write_file(const char *fmt, ...)
{
	va_list ap;
	FILE *f = fopen(path, "w");

	if (f == NULL) {
		perror(path);
		exit(99);
	}
	va_start(ap, fmt);
	vfprintf(f, fmt, ap);
	va_end(ap);
	fclose(f);
}

/* Load the file over defaults into *cfg; returns the rc. */
static int load(tdr_config *cfg, tdr_err *err, const char *content)
{
	write_file("%s", content);
	tdr_config_defaults(cfg);
	tdr_err_clear(err);
	return tdr_config_load_file(cfg, path, err);
}

/* One --set over defaults. */
static int set1(tdr_config *cfg, tdr_err *err, const char *kv)
{
	tdr_config_defaults(cfg);
	tdr_err_clear(err);
	return tdr_config_set(cfg, kv, err);
}

static int has(const char *hay, const char *needle)
{
	return strstr(hay, needle) != NULL;
}

static void test_defaults(void)
{
	tdr_config cfg;
	tdr_err err;

	tdr_config_defaults(&cfg);
	tdr_err_clear(&err);
	ok(tdr_config_validate(&cfg, &err) == 0, "defaults validate%s%s", err.msg[0] ? ": " : "", err.msg);
	ok(strcmp(cfg.store_uri, "mongodb://127.0.0.1:27017") == 0 && strcmp(cfg.store_db, "tdrain") == 0 &&
		   strcmp(cfg.events_coll, "events") == 0 && cfg.store_timeout_ms == 5000,
	   "defaults: store.*");
	ok(cfg.backend == TDR_BACKEND_MONGO && cfg.mode == TDR_MODE_SINGLE && cfg.partitions == 16 &&
		   cfg.lease_ttl_ms == 15000 && cfg.renew_deadline_ms == 10000 && cfg.retry_period_ms == 2000 &&
		   strcmp(cfg.etcd_prefix, "/tdrain/") == 0 && cfg.etcd_auth[0] == '\0',
	   "defaults: coord.*");
	ok(cfg.batch_size == 1000 && cfg.poll_max_ms == 1000 && cfg.max_attempts == 5 && cfg.max_event_bytes == 262144 &&
		   cfg.allow_events[0] == '\0',
	   "defaults: drain.*");
	ok(strcmp(cfg.log_level, "info") == 0 && cfg.archive_dir[0] == '\0' && cfg.metrics_file[0] == '\0',
	   "defaults: log.level info, archive and metrics off");
	ok(strcmp(tdr_mode_name(TDR_MODE_PARTITIONED), "partitioned") == 0 &&
		   strcmp(tdr_mode_name(TDR_MODE_SINGLE), "single") == 0 &&
		   strcmp(tdr_backend_name(TDR_BACKEND_ETCD), "etcd") == 0 &&
		   strcmp(tdr_backend_name(TDR_BACKEND_MONGO), "mongo") == 0,
	   "mode and backend names");
}

static void test_file(void)
{
	tdr_config cfg;
	tdr_err err;
	char *big;

	ok(load(&cfg, &err,
		"# tdrain configuration\n"
		"\n"
		"   \t\n"
		"    # an indented comment\n"
		"drain.batch_size = 250\n"
		"drain.poll_max_ms=20\n"
		"   coord.partitions   =   32   \n"
		"\tstore.database\t=\tanalytics\t\n"
		"store.uri = mongodb://h1,h2/?replicaSet=rs0&w=majority\n"
		"log.level = \"debug\"\n"
		"drain.allow_events = \" a , b \"\n"
		"archive.dir = \"\"\n"
		"coord.backend = etcd\n"
		"coord.mode = partitioned\n") == 0,
	   "file: comments, blank lines, spacing, quotes%s%s", err.msg[0] ? ": " : "", err.msg);
	ok(cfg.batch_size == 250 && cfg.poll_max_ms == 20 && cfg.partitions == 32, "file: integers, with and without spaces");
	ok(strcmp(cfg.store_db, "analytics") == 0, "file: tabs around key and value trimmed");
	ok(strcmp(cfg.store_uri, "mongodb://h1,h2/?replicaSet=rs0&w=majority") == 0,
	   "file: only the first '=' splits key from value");
	ok(strcmp(cfg.log_level, "debug") == 0, "file: quotes removed");
	ok(strcmp(cfg.allow_events, " a , b ") == 0, "file: quotes keep leading and trailing spaces");
	ok(cfg.archive_dir[0] == '\0', "file: \"\" is the empty string");
	ok(cfg.backend == TDR_BACKEND_ETCD && cfg.mode == TDR_MODE_PARTITIONED, "file: enum values");

	ok(load(&cfg, &err, "") == 0 && cfg.batch_size == 1000, "file: empty file keeps the defaults");
	ok(load(&cfg, &err, "drain.batch_size = 7") == 0 && cfg.batch_size == 7, "file: last line without newline");
	ok(load(&cfg, &err, "drain.batch_size = 7\r\n") == 0 && cfg.batch_size == 7, "file: CRLF line ending");

	/* Errors name the file, the line and the key. */
	ok(load(&cfg, &err,
		"# first\n"
		"drain.batch_size = 10\n"
		"\n"
		"drain.bogus_key = 1\n"
		"drain.poll_max_ms = 5\n") == TDR_ECONFIG &&
		   err.code == TDR_ECONFIG && has(err.msg, path) && has(err.msg, ":4:") && has(err.msg, "drain.bogus_key"),
	   "file: unknown key names the file, line 4 and the key (%s)", err.msg);
	ok(cfg.poll_max_ms == 1000, "file: reading stops at the first error");
	ok(load(&cfg, &err, "drain.batch_size 10\n") < 0 && has(err.msg, ":1:") && has(err.msg, "key = value"),
	   "file: a line without '=' (%s)", err.msg);
	ok(load(&cfg, &err, " = 10\n") < 0 && has(err.msg, "unknown key"), "file: an empty key (%s)", err.msg);
	ok(load(&cfg, &err, "Drain.Batch_Size = 10\n") < 0 && has(err.msg, "Drain.Batch_Size"),
	   "file: keys are case-sensitive (%s)", err.msg);

	/* Integers. */
	ok(load(&cfg, &err, "\n\ndrain.batch_size = abc\n") < 0 && has(err.msg, ":3:") &&
		   has(err.msg, "drain.batch_size") && has(err.msg, "not an integer"),
	   "file: bad integer (%s)", err.msg);
	ok(load(&cfg, &err, "drain.batch_size = 12abc\n") < 0, "file: trailing garbage after an integer");
	ok(load(&cfg, &err, "drain.batch_size = 1.5\n") < 0, "file: a fraction is not an integer");
	ok(load(&cfg, &err, "drain.batch_size =\n") < 0 && has(err.msg, "drain.batch_size"),
	   "file: empty integer (%s)", err.msg);
	ok(load(&cfg, &err, "metrics.backlog_alert = 99999999999999999999\n") < 0 &&
		   has(err.msg, "metrics.backlog_alert"),
	   "file: integer overflow (%s)", err.msg);
	ok(load(&cfg, &err, "drain.batch_size = 0\n") < 0 && has(err.msg, "outside") && has(err.msg, "[1, 50000]"),
	   "file: below the range (%s)", err.msg);
	ok(load(&cfg, &err, "drain.batch_size = 50001\n") < 0, "file: above the range");
	ok(load(&cfg, &err, "drain.batch_size = 1\n") == 0 && load(&cfg, &err, "drain.batch_size = 50000\n") == 0 &&
		   cfg.batch_size == 50000,
	   "file: both ends of the range accepted");
	ok(load(&cfg, &err, "coord.partitions = 4097\n") < 0 && load(&cfg, &err, "coord.partitions = -1\n") < 0 &&
		   load(&cfg, &err, "drain.max_event_bytes = 1023\n") < 0,
	   "file: partitions 4097 and -1, max_event_bytes 1023 refused");

	/* Enums and log.level. */
	ok(load(&cfg, &err, "coord.backend = zookeeper\n") < 0 && has(err.msg, "coord.backend") &&
		   has(err.msg, "zookeeper"),
	   "file: unknown enum value (%s)", err.msg);
	ok(load(&cfg, &err, "coord.mode = \n") < 0, "file: empty enum value refused");
	ok(load(&cfg, &err, "log.level = verbose\n") < 0 && has(err.msg, "log.level"), "file: unknown log level (%s)",
	   err.msg);
	ok(load(&cfg, &err, "log.level = warning\nlog.level = error\n") == 0 && strcmp(cfg.log_level, "error") == 0,
	   "file: a later line overrides an earlier one");

	/* Too-long values: name is char[64], store.uri char[1024]. */
	big = malloc(5000);
	if (big == NULL)
		exit(99);
	memset(big, 'n', 63);
	big[63] = '\0';
	write_file("name = %s\n", big);
	tdr_config_defaults(&cfg);
	ok(tdr_config_load_file(&cfg, path, &err) == 0 && strlen(cfg.name) == 63, "file: a 63-byte name fits");
	memset(big, 'n', 64);
	big[64] = '\0';
	write_file("name = %s\n", big);
	tdr_config_defaults(&cfg);
	ok(tdr_config_load_file(&cfg, path, &err) < 0 && has(err.msg, "name") && has(err.msg, "longer than 63"),
	   "file: a 64-byte name is refused, not truncated (%s)", err.msg);
	memcpy(big, "mongodb://", 10);
	memset(big + 10, 'h', 1013);
	big[1023] = '\0';
	write_file("store.uri = %s\n", big);
	tdr_config_defaults(&cfg);
	ok(tdr_config_load_file(&cfg, path, &err) == 0 && strlen(cfg.store_uri) == 1023, "file: a 1023-byte store.uri fits");
	big[1023] = 'h';
	big[1024] = '\0';
	write_file("store.uri = %s\n", big);
	tdr_config_defaults(&cfg);
	ok(tdr_config_load_file(&cfg, path, &err) < 0 && has(err.msg, "store.uri"),
	   "file: a 1024-byte store.uri is refused (%s)", err.msg);
	memset(big, 'x', 4999);
	big[4999] = '\0';
	write_file("# ok\nname = %s\n", big);
	tdr_config_defaults(&cfg);
	ok(tdr_config_load_file(&cfg, path, &err) < 0 && has(err.msg, ":2:") && has(err.msg, "too long"),
	   "file: a line over 4 KiB is refused with its number (%s)", err.msg);
	free(big);

	ok(tdr_config_load_file(&cfg, "/nonexistent/tdrain.conf", &err) < 0 &&
		   has(err.msg, "/nonexistent/tdrain.conf"),
	   "file: a missing file names the path (%s)", err.msg);
}

static void test_set(void)
{
	tdr_config cfg;
	tdr_err err;

	ok(set1(&cfg, &err, "drain.batch_size=42") == 0 && cfg.batch_size == 42, "set: key=value");
	ok(set1(&cfg, &err, "store.uri=mongodb://h/?w=1&j=true") == 0 &&
		   strcmp(cfg.store_uri, "mongodb://h/?w=1&j=true") == 0,
	   "set: the value keeps later '=' signs");
	ok(set1(&cfg, &err, "drain.batch_size") < 0 && has(err.msg, "key=value"), "set: no '=' (%s)", err.msg);
	ok(set1(&cfg, &err, "nope.key=1") < 0 && has(err.msg, "nope.key"), "set: unknown key named (%s)", err.msg);
	ok(set1(&cfg, &err, "=1") < 0, "set: empty key refused");
	ok(set1(&cfg, &err, "drain.batch_size=") < 0 && has(err.msg, "drain.batch_size"), "set: empty integer refused");
	ok(set1(&cfg, &err, "coord.mode=partitioned") == 0 && cfg.mode == TDR_MODE_PARTITIONED, "set: enum");
	ok(set1(&cfg, &err, "archive.dir=") == 0 && cfg.archive_dir[0] == '\0', "set: empty string value");
}

static void test_env(void)
{
	tdr_config cfg;
	tdr_err err;

	setenv("TDRAIN_DRAIN_BATCH_SIZE", "77", 1);
	setenv("TDRAIN_STORE_URI", "mongodb://env-host:27017", 1);
	setenv("TDRAIN_COORD_MODE", "partitioned", 1);
	setenv("TDRAIN_ARCHIVE_MAX_AGE_S", "60", 1);
	setenv("TDRAIN_NOT_A_KEY", "whatever", 1);
	tdr_config_defaults(&cfg);
	ok(tdr_config_load_env(&cfg, &err) == 0 && cfg.batch_size == 77 &&
		   strcmp(cfg.store_uri, "mongodb://env-host:27017") == 0 && cfg.mode == TDR_MODE_PARTITIONED &&
		   cfg.archive_max_age_s == 60,
	   "env: TDRAIN_<KEY> with '.' -> '_' and upper case applies");
	ok(cfg.poll_max_ms == 1000, "env: keys without a variable keep their value");
	setenv("TDRAIN_DRAIN_BATCH_SIZE", "abc", 1);
	tdr_config_defaults(&cfg);
	ok(tdr_config_load_env(&cfg, &err) < 0 && has(err.msg, "TDRAIN_DRAIN_BATCH_SIZE") &&
		   has(err.msg, "not an integer"),
	   "env: a bad value names the variable (%s)", err.msg);
	unsetenv("TDRAIN_DRAIN_BATCH_SIZE");
	unsetenv("TDRAIN_STORE_URI");
	unsetenv("TDRAIN_COORD_MODE");
	unsetenv("TDRAIN_ARCHIVE_MAX_AGE_S");
	unsetenv("TDRAIN_NOT_A_KEY");

	/* Precedence: default < file < env < set. */
	write_file("drain.batch_size = 10\ndrain.poll_max_ms = 20\ndrain.max_attempts = 3\n");
	setenv("TDRAIN_DRAIN_BATCH_SIZE", "11", 1);
	setenv("TDRAIN_DRAIN_POLL_MAX_MS", "21", 1);
	tdr_config_defaults(&cfg);
	ok(tdr_config_load_file(&cfg, path, &err) == 0 && tdr_config_load_env(&cfg, &err) == 0 &&
		   tdr_config_set(&cfg, "drain.batch_size=12", &err) == 0,
	   "precedence: file, env, set all load");
	ok(cfg.batch_size == 12, "precedence: set beats env and file (batch_size %lld)", (long long)cfg.batch_size);
	ok(cfg.poll_max_ms == 21, "precedence: env beats file (poll_max_ms %lld)", (long long)cfg.poll_max_ms);
	ok(cfg.max_attempts == 3, "precedence: file beats default (max_attempts %lld)", (long long)cfg.max_attempts);
	ok(cfg.fold_max_deltas == 256, "precedence: default when nothing else sets it");
	unsetenv("TDRAIN_DRAIN_BATCH_SIZE");
	unsetenv("TDRAIN_DRAIN_POLL_MAX_MS");
}

/* Defaults, then each "k=v" of a NULL-terminated list, then validate. */
static int validate_with(tdr_err *err, ...)
{
	tdr_config cfg;
	va_list ap;
	const char *kv;
	int rc = 0;

	tdr_config_defaults(&cfg);
	tdr_err_clear(err);
	va_start(ap, err);
	while (rc == 0 && (kv = va_arg(ap, const char *)) != NULL)
		rc = tdr_config_set(&cfg, kv, err);
	va_end(ap);
	if (rc < 0) {
		diag("set failed: %s", err->msg);
		return -100;
	}
	return tdr_config_validate(&cfg, err);
}

static void test_validate(void)
{
	tdr_err err;

	/* ttl > renew deadline */
	ok(validate_with(&err, "coord.lease_ttl_ms=10000", NULL) == TDR_ECONFIG && has(err.msg, "coord.lease_ttl_ms") &&
		   has(err.msg, "coord.renew_deadline_ms"),
	   "lease: ttl == renew deadline refused (%s)", err.msg);
	ok(validate_with(&err, "coord.lease_ttl_ms=10001", NULL) == 0, "lease: ttl = renew deadline + 1 accepted");
	ok(validate_with(&err, "coord.lease_ttl_ms=5000", NULL) < 0, "lease: ttl below renew deadline refused");
	/* renew deadline > 1.2 x retry period (exactly 1.2 x is not enough) */
	ok(validate_with(&err, "store.timeout_ms=1000", "coord.renew_deadline_ms=2400", "coord.retry_period_ms=2000",
			 NULL) == TDR_ECONFIG &&
		   has(err.msg, "coord.retry_period_ms"),
	   "lease: renew deadline == 1.2 x retry period refused (%s)", err.msg);
	ok(validate_with(&err, "store.timeout_ms=1000", "coord.renew_deadline_ms=2401", "coord.retry_period_ms=2000",
			 NULL) == 0,
	   "lease: renew deadline just over 1.2 x retry period accepted%s%s", err.msg[0] ? ": " : "", err.msg);
	ok(validate_with(&err, "coord.retry_period_ms=9000", NULL) < 0, "lease: retry period too close to the deadline");
	ok(validate_with(&err, "store.timeout_ms=500", "coord.lease_ttl_ms=1001", "coord.renew_deadline_ms=1000",
			 "coord.retry_period_ms=833", NULL) == 0,
	   "lease: the tightest chain (1001 > 1000 > 1.2 x 833) accepted");
	/* store timeout < renew deadline */
	ok(validate_with(&err, "store.timeout_ms=10000", NULL) == TDR_ECONFIG && has(err.msg, "store.timeout_ms"),
	   "store.timeout_ms == renew deadline refused (%s)", err.msg);
	ok(validate_with(&err, "store.timeout_ms=9999", NULL) == 0, "store.timeout_ms just below renew deadline accepted");

	/* metrics.listen: numeric HOST:PORT, [IPv6]:PORT or :PORT; empty is off */
	ok(validate_with(&err, "metrics.listen=127.0.0.1:9464", NULL) == 0 &&
		   validate_with(&err, "metrics.listen=[::1]:9464", NULL) == 0 &&
		   validate_with(&err, "metrics.listen=:9464", NULL) == 0 && validate_with(&err, "metrics.listen=", NULL) == 0,
	   "metrics.listen: 127.0.0.1:9464, [::1]:9464, :9464 and empty accepted%s%s", err.msg[0] ? ": " : "", err.msg);
	ok(validate_with(&err, "metrics.listen=localhost:9464", NULL) == TDR_ECONFIG && has(err.msg, "metrics.listen") &&
		   has(err.msg, "numeric"),
	   "metrics.listen: a host name refused (%s)", err.msg);
	ok(validate_with(&err, "metrics.listen=127.0.0.1", NULL) < 0 && validate_with(&err, "metrics.listen=::1:9464", NULL) < 0 &&
		   validate_with(&err, "metrics.listen=127.0.0.1:0", NULL) < 0 &&
		   validate_with(&err, "metrics.listen=127.0.0.1:65536", NULL) < 0 &&
		   validate_with(&err, "metrics.listen=127.0.0.1:94x", NULL) < 0 && validate_with(&err, "metrics.listen=[::1]9464", NULL) < 0,
	   "metrics.listen: no port, unbracketed IPv6, port 0, 65536, 94x and [::1]9464 refused (%s)", err.msg);

	/* URIs */
	ok(validate_with(&err, "store.uri=http://127.0.0.1:27017", NULL) < 0 && has(err.msg, "store.uri"),
	   "uri: http:// store.uri refused (%s)", err.msg);
	ok(validate_with(&err, "store.uri=", NULL) < 0, "uri: empty store.uri refused");
	ok(validate_with(&err, "store.uri=127.0.0.1:27017", NULL) < 0, "uri: store.uri without scheme refused");
	ok(validate_with(&err, "store.uri=mongodb:/h", NULL) < 0, "uri: mongodb:/ (one slash) refused");
	ok(validate_with(&err, "store.uri=mongodb+srv://cluster0.example.net/?tls=true", NULL) == 0,
	   "uri: mongodb+srv:// accepted");
	ok(validate_with(&err, "coord.backend=etcd", "coord.etcd_endpoint=ftp://etcd:2379", NULL) < 0 &&
		   has(err.msg, "coord.etcd_endpoint"),
	   "uri: etcd endpoint ftp:// refused with the etcd backend (%s)", err.msg);
	ok(validate_with(&err, "coord.backend=etcd", "coord.etcd_endpoint=etcd:2379", NULL) < 0,
	   "uri: etcd endpoint without scheme refused");
	ok(validate_with(&err, "coord.backend=etcd", "coord.etcd_endpoint=https://etcd:2379", NULL) == 0,
	   "uri: https etcd endpoint accepted");
	ok(validate_with(&err, "coord.etcd_endpoint=ftp://etcd:2379", NULL) == 0,
	   "uri: etcd endpoint not checked with the mongo backend");

	/* Other cross-field checks. */
	ok(validate_with(&err, "name=node-1.a@b_c", NULL) == 0, "name: letters, digits, - _ . @ accepted");
	ok(validate_with(&err, "name=bad name", NULL) < 0 && validate_with(&err, "name=a/b", NULL) < 0,
	   "name: space and '/' refused");
	ok(validate_with(&err, "archive.http_url=https://sink/x", NULL) < 0 && has(err.msg, "archive.dir"),
	   "archive.http_url without archive.dir refused (%s)", err.msg);
	ok(validate_with(&err, "archive.http_url=https://sink/x", "archive.dir=/var/spool/tdrain", NULL) == 0,
	   "archive.http_url with archive.dir accepted");
	ok(validate_with(&err, "store.database=a.b", NULL) < 0 && validate_with(&err, "store.database=a$b", NULL) < 0 &&
		   validate_with(&err, "store.database=", NULL) < 0 && validate_with(&err, "store.events=", NULL) < 0,
	   "store.database with '.', '$', or empty names refused");
}

/* Print cfg into a malloc'd string. */
static char *print_to_string(const tdr_config *cfg)
{
	char *buf = NULL;
	size_t len = 0;
	FILE *f = open_memstream(&buf, &len);

	if (f == NULL)
		exit(99);
	tdr_config_print(cfg, f);
	fclose(f);
	return buf;
}

/* The printed line of key (up to its newline), copied into line. */
static int printed_line(const char *out, const char *key, char *line, size_t cap)
{
	size_t klen = strlen(key);

	for (const char *p = out; p && *p;) {
		const char *nl = strchr(p, '\n');
		size_t n = nl ? (size_t)(nl - p) : strlen(p);

		if (n > klen && strncmp(p, key, klen) == 0 && p[klen] == ' ') {
			snprintf(line, cap, "%.*s", (int)n, p);
			return 1;
		}
		p = nl ? nl + 1 : NULL;
	}
	line[0] = '\0';
	return 0;
}

static void test_print(void)
{
	static const char *const keys[] = {
		"name", "store.uri", "store.database", "store.events", "store.timeout_ms", "coord.backend",
		"coord.mode", "coord.partitions", "coord.lease_ttl_ms", "coord.renew_deadline_ms",
		"coord.retry_period_ms", "coord.etcd_endpoint", "coord.etcd_prefix", "coord.etcd_auth",
		"drain.batch_size", "drain.poll_max_ms", "drain.max_attempts", "drain.max_event_bytes",
		"drain.allow_events", "fold.interval_ms", "fold.max_deltas", "fold.cache_mb", "fold.timeout_ms", "archive.dir", "archive.max_bytes",
		"archive.max_age_s", "archive.http_url", "archive.http_timeout_ms", "archive.max_backlog_bytes",
		"metrics.file", "metrics.listen", "metrics.interval_ms", "metrics.backlog_alert", "log.level", "test.trace_file",
	};
	tdr_config cfg;
	tdr_err err;
	char *out, line[1400];
	int all = 1;

	tdr_config_defaults(&cfg);
	ok(tdr_config_set(&cfg, "store.uri=mongodb://tdrain:s3cr3tPW@db1:27017,db2/tdrain?authSource=admin", &err) ==
			   0 &&
		   tdr_config_set(&cfg, "coord.etcd_auth=etcdroot:etcdPW99", &err) == 0 &&
		   tdr_config_set(&cfg, "archive.http_url=https://sink:httpPW77@collector.example/ingest", &err) == 0 &&
		   tdr_config_set(&cfg, "coord.etcd_endpoint=https://ep:endpointPW@etcd:2379", &err) == 0,
	   "print: secrets set");
	out = print_to_string(&cfg);
	for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++)
		if (!printed_line(out, keys[i], line, sizeof(line))) {
			diag("print: no line for %s", keys[i]);
			all = 0;
		}
	ok(all, "print: every key has a line");
	ok(!has(out, "s3cr3tPW") && !has(out, "httpPW77") && !has(out, "endpointPW"), "print: no URI password printed");
	ok(printed_line(out, "store.uri", line, sizeof(line)) && has(line, "mongodb://tdrain:***@db1:27017,db2/tdrain"),
	   "print: store.uri keeps user and hosts, password redacted (%s)", line);
	ok(!has(out, "etcdPW99") && !has(out, "etcdroot"), "print: coord.etcd_auth never printed, user included");
	ok(printed_line(out, "coord.etcd_auth", line, sizeof(line)) && has(line, "***"),
	   "print: coord.etcd_auth shown as *** when set");
	ok(printed_line(out, "drain.batch_size", line, sizeof(line)) && has(line, "1000") &&
		   printed_line(out, "coord.backend", line, sizeof(line)) && has(line, "mongo"),
	   "print: ordinary values shown");
	free(out);

	/* '@' inside the password (the userinfo ends at the last '@' before the path). */
	tdr_config_defaults(&cfg);
	ok(tdr_config_set(&cfg, "store.uri=mongodb://u:p@ss@word@h1/db", &err) == 0, "print: password with '@' set");
	out = print_to_string(&cfg);
	ok(!has(out, "ss@word") && !has(out, "p@ss") && printed_line(out, "store.uri", line, sizeof(line)) &&
		   has(line, "mongodb://u:***@h1/db"),
	   "print: a password containing '@' is redacted whole (%s)", line);
	free(out);

	/* Nothing to redact. */
	tdr_config_defaults(&cfg);
	out = print_to_string(&cfg);
	ok(printed_line(out, "store.uri", line, sizeof(line)) && has(line, "mongodb://127.0.0.1:27017") &&
		   printed_line(out, "coord.etcd_auth", line, sizeof(line)) && !has(line, "***"),
	   "print: URI without credentials unchanged, empty etcd_auth not starred");
	free(out);
}

static void test_allow(void)
{
	tdr_config cfg;
	tdr_err err;

	tdr_config_defaults(&cfg);
	ok(tdr_config_event_allowed(&cfg, "anything") && tdr_config_event_allowed(&cfg, "page_view"),
	   "allow: empty list allows everything");
	ok(tdr_config_set(&cfg, "drain.allow_events=page_view, app.open ,  daily_sign_in  ,x", &err) == 0,
	   "allow: list with spaces set");
	ok(tdr_config_event_allowed(&cfg, "page_view"), "allow: first name");
	ok(tdr_config_event_allowed(&cfg, "app.open"), "allow: name with a space on each side");
	ok(tdr_config_event_allowed(&cfg, "daily_sign_in"), "allow: name with two spaces on each side");
	ok(tdr_config_event_allowed(&cfg, "x"), "allow: last name, one character");
	ok(!tdr_config_event_allowed(&cfg, "page"), "allow: a prefix of a listed name is not listed");
	ok(!tdr_config_event_allowed(&cfg, "page_view_2"), "allow: a listed name plus a suffix is not listed");
	ok(!tdr_config_event_allowed(&cfg, "app"), "allow: 'app' is not 'app.open'");
	ok(!tdr_config_event_allowed(&cfg, "y"), "allow: an unlisted name");
	ok(!tdr_config_event_allowed(&cfg, "Page_View"), "allow: names are case-sensitive");
	ok(tdr_config_set(&cfg, "drain.allow_events=,a,,b,", &err) == 0 && tdr_config_event_allowed(&cfg, "a") &&
		   tdr_config_event_allowed(&cfg, "b") && !tdr_config_event_allowed(&cfg, "c"),
	   "allow: empty items between commas are ignored");
	ok(tdr_config_set(&cfg, "drain.allow_events=solo", &err) == 0 && tdr_config_event_allowed(&cfg, "solo") &&
		   !tdr_config_event_allowed(&cfg, "sol"),
	   "allow: a single name");

	/* Through the file, quoted with outer spaces. */
	write_file("drain.allow_events = \"  page_view ,app.open  \"\n");
	tdr_config_defaults(&cfg);
	ok(tdr_config_load_file(&cfg, path, &err) == 0 && tdr_config_event_allowed(&cfg, "page_view") &&
		   tdr_config_event_allowed(&cfg, "app.open") && !tdr_config_event_allowed(&cfg, "other"),
	   "allow: quoted list from a file");
}

int main(void)
{
	const char *dir = getenv("TMPDIR");
	int fd;

	if (dir == NULL || *dir == '\0')
		dir = "/tmp";
	snprintf(path, sizeof(path), "%s/tdr-test-config-XXXXXX", dir);
	fd = mkstemp(path);
	if (fd < 0) {
		perror(path);
		printf("1..0 # SKIP cannot create a scratch file\n");
		return 0;
	}
	close(fd);
	/* No TDRAIN_* from the caller's environment may leak into the env tests. */
	unsetenv("TDRAIN_DRAIN_BATCH_SIZE");
	unsetenv("TDRAIN_DRAIN_POLL_MAX_MS");

	test_defaults();
	test_file();
	test_set();
	test_env();
	test_validate();
	test_print();
	test_allow();
	unlink(path);
	return tap_done();
}
