/*
 * fuzz_config.c - libFuzzer target for lib/conf.c.
 *
 * The input is used three ways:
 *   1. as a configuration file: written to a memfd and read back through
 *      /proc/self/fd/N by tdr_config_load_file();
 *   2. split into lines, each given to tdr_config_set() as "key=value";
 *   3. each line as an event name for tdr_config_event_allowed().
 * Then tdr_config_validate() and tdr_config_print().  Checked properties
 * (a violation aborts, reported like a crash):
 *   - every string field stays NUL-terminated inside its buffer;
 *   - a failure leaves a one-line, NUL-terminated error message;
 *   - coord.etcd_auth never appears in the printed configuration;
 *   - a validated configuration obeys the lease timing chain.
 *
 * Built and run by tests/fuzz/run.sh.
 */
#include "config.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "lib/conf.h"
#include "lib/err.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void die(const char *what, const char *detail)
{
	fprintf(stderr, "fuzz_config: %s%s%s\n", what, detail ? ": " : "", detail ? detail : "");
	abort();
}

static void check_terminated(const tdr_config *c)
{
#define T(f)                                                   \
	if (memchr(c->f, '\0', sizeof(c->f)) == NULL)          \
		die("string field not NUL-terminated", #f);
	T(name) T(store_uri) T(store_db) T(events_coll) T(etcd_endpoint) T(etcd_prefix) T(etcd_auth)
	T(allow_events) T(archive_dir) T(archive_http_url) T(metrics_file) T(log_level) T(trace_file)
#undef T
}

static void check_err(const tdr_err *err)
{
	if (memchr(err->msg, '\0', sizeof(err->msg)) == NULL)
		die("error message not NUL-terminated", NULL);
	if (err->code != TDR_ECONFIG)
		die("configuration error without TDR_ECONFIG", err->msg);
}

/* Print into memory; the caller frees. */
static char *print_mem(const tdr_config *c)
{
	char *buf = NULL;
	size_t len = 0;
	FILE *f = open_memstream(&buf, &len);

	if (f == NULL)
		return NULL;
	tdr_config_print(c, f);
	fclose(f);
	return buf;
}

static void check_print(const tdr_config *c)
{
	tdr_config blank;
	char *out, *out_blank;

	out = print_mem(c);
	if (out == NULL)
		return;
	/*
	 * The etcd credentials must not show.  They may legitimately occur in
	 * the output for another reason (another key's value, the help text):
	 * compare with the same configuration printed without them.
	 */
	if (strlen(c->etcd_auth) >= 4 && strstr(out, c->etcd_auth) != NULL) {
		blank = *c;
		blank.etcd_auth[0] = '\0';
		out_blank = print_mem(&blank);
		if (out_blank && strstr(out_blank, c->etcd_auth) == NULL)
			die("coord.etcd_auth printed", c->etcd_auth);
		free(out_blank);
	}
	free(out);
}

static FILE *devnull;
static int memfd = -1;

static void run(tdr_config *cfg, const uint8_t *data, size_t size)
{
	tdr_err err;
	char path[64];
	char *copy;
	int rc;

	/* 1. as a file */
	if (memfd >= 0 && ftruncate(memfd, 0) == 0 && pwrite(memfd, data, size, 0) == (ssize_t)size) {
		snprintf(path, sizeof(path), "/proc/self/fd/%d", memfd);
		memset(&err, 0, sizeof(err));
		rc = tdr_config_load_file(cfg, path, &err);
		if (rc != 0 && rc != TDR_ECONFIG)
			die("tdr_config_load_file returned an unexpected code", err.msg);
		if (rc != 0)
			check_err(&err);
		check_terminated(cfg);
	}

	/* 2 and 3. line by line */
	copy = malloc(size + 1);
	if (copy == NULL)
		return;
	memcpy(copy, data, size);
	copy[size] = '\0';
	for (char *line = copy, *next; line != NULL; line = next) {
		next = strchr(line, '\n');
		if (next)
			*next++ = '\0';
		memset(&err, 0, sizeof(err));
		if (tdr_config_set(cfg, line, &err) != 0)
			check_err(&err);
		check_terminated(cfg);
		(void)tdr_config_event_allowed(cfg, line);
	}
	free(copy);

	memset(&err, 0, sizeof(err));
	if (tdr_config_validate(cfg, &err) == 0) {
		if (!(cfg->lease_ttl_ms > cfg->renew_deadline_ms) ||
		    !(cfg->renew_deadline_ms * 10 > cfg->retry_period_ms * 12) ||
		    !(cfg->store_timeout_ms < cfg->renew_deadline_ms))
			die("a configuration breaking the lease timing chain validated", NULL);
	} else {
		check_err(&err);
	}
	if (devnull)
		tdr_config_print(cfg, devnull);
	check_print(cfg);
	(void)tdr_config_event_allowed(cfg, "page_view");
	(void)tdr_config_event_allowed(cfg, "");
	(void)tdr_mode_name(cfg->mode);
	(void)tdr_backend_name(cfg->backend);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static int ready;
	tdr_config cfg;

	if (!ready) {
		devnull = fopen("/dev/null", "w");
		memfd = memfd_create("fuzz_config", MFD_CLOEXEC);
		ready = 1;
	}
	tdr_config_defaults(&cfg);
	run(&cfg, data, size);
	return 0;
}
