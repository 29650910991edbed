/*
 * tdrainctl.c - the operator's view of a deployment, and its repairs: main,
 * the global options, the configuration, and dispatch to one file per command.
 *
 *   tdrainctl [-c FILE] [--set key=value]... [-N NAME] COMMAND ...
 *     status [--json] [--interval MS] [--no-rate]       (ctl/status.c)
 *     dlq list [--limit N] [--json]                     (ctl/dlq.c)
 *     dlq requeue (--all | ID...) [--dry-run]           (ctl/dlq.c)
 *     recover (--partition P | --all)                   (ctl/recover.c)
 *     replay ...                                        (ctl/replay.c)
 *
 * tdrainctl needs no running replica: it reads the same configuration as the
 * daemon and talks to the store and the coordination backend directly.  It
 * holds no lease and takes part in no election; the lease backend is created
 * only to list() leases (holder name "tdrainctl", never used to acquire).
 *
 * What it writes, and why that is safe next to live replicas, is argued at
 * each write (dlq.c, recover.c) and in tdrainctl(8):
 *   dlq requeue  removes a dead letter, then re-inserts its document into the
 *                FIFO (that order: see requeue_one());
 *   recover      deletes claim records of deposed epochs, each fenced by its
 *                own {_id, epoch}.
 *
 * Exit status: 0 ok, 1 failure, 64 usage, 69 store or coordinator unreachable,
 * 78 bad configuration (sysexits.h).
 */
#include "config.h"

#include <getopt.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sysexits.h>
#include <unistd.h>

#include "ctl/ctl.h"
#include "lib/conf.h"
#include "lib/log.h"
#include "lib/store.h"

/* The unit's configuration (tdrain@.service passes the same path to the daemon). */
#define DEFAULT_CONF "/etc/tdrain/tdrain.conf"

static void usage(FILE *out)
{
	fprintf(out,
		"usage: " PROG " [-c FILE] [--set KEY=VALUE]... [-N NAME] COMMAND [ARGS]\n"
		"  -c FILE          configuration file (default " DEFAULT_CONF " if it exists)\n"
		"  --set KEY=VALUE  override one key (after the file and TDRAIN_* variables)\n"
		"  -N NAME          the name key (accepted for symmetry with tdrain; unused)\n"
		"commands:\n"
		"  status [--json] [--interval MS] [--no-rate]\n"
		"                   members, leases, partition map, backlog, dead letters, fold, drain rate\n"
		"  dlq list [--limit N] [--json]\n"
		"                   dead-lettered events (default limit %d)\n"
		"  dlq requeue (--all | ID...) [--dry-run]\n"
		"                   move dead-lettered documents back into the FIFO\n"
		"  recover (--partition P | --all)\n"
		"                   delete claim records of deposed epochs: their events become plain pending\n"
		"  replay --from TIME --to TIME [--shadow COLL] [--dir DIR] [--dry-run]\n"
		"                   re-insert archived events (tdrainctl replay --help)\n"
		"exit status: 0 ok, 1 failure, 64 usage, 69 store or coordinator unreachable, 78 configuration\n",
		DLQ_LIMIT_DEFAULT);
}

/* One usage error: a line naming it, then the summary; the caller exits 64. */
int usage_error(const char *fmt, ...)
{
	va_list ap;

	fputs(PROG ": ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	usage(stderr);
	return EX_USAGE;
}

/* libmongoc's own diagnostics: warnings and worse go through our log, the rest is noise for an operator. */
static void on_mongoc_log(mongoc_log_level_t level, const char *domain, const char *message, void *data)
{
	(void)data;
	if (level > MONGOC_LOG_LEVEL_WARNING)
		return;
	tdr_log(level <= MONGOC_LOG_LEVEL_CRITICAL ? LOG_ERR : LOG_WARNING, "libmongoc %s: %s", domain, message);
}

/* ------------------------------------------------------------------ main */

struct args {
	const char *file;
	const char *name;
	char **sets;
	int nsets;
};

/* The daemon's precedence: default, file, TDRAIN_* environment, --set (then -N). */
static int load_config(const struct args *a, tdr_config *cfg, tdr_err *err)
{
	const char *file = a->file;

	tdr_config_defaults(cfg);
	/* The shared file by default, when there is one: the environment alone is a valid configuration too. */
	if (file == NULL && access(DEFAULT_CONF, F_OK) == 0)
		file = DEFAULT_CONF;
	if (file && tdr_config_load_file(cfg, file, err) < 0)
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
	return tdr_config_validate(cfg, err);
}

int main(int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "set", required_argument, NULL, 's' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	struct args a = { 0 };
	struct ctl c;
	tdr_err err;
	const char *cmd;
	int opt, status;

	memset(&c, 0, sizeof(c));
	a.sets = calloc((size_t)argc + 1, sizeof(*a.sets));
	if (a.sets == NULL) {
		fprintf(stderr, PROG ": out of memory\n");
		return EX_OSERR;
	}
	/* '+': options end at the command, whose own options are its business. */
	opterr = 0;
	while ((opt = getopt_long(argc, argv, "+c:N:h", longopts, NULL)) != -1) {
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
		case 'h':
			usage(stdout);
			free(a.sets);
			return EX_OK;
		default:
			if (optopt && strchr("cN", optopt))
				status = usage_error("-%c needs a value", optopt);
			else if (optopt == 's' || (optopt == 0 && strncmp(argv[optind - 1], "--set", 5) == 0))
				status = usage_error("--set needs KEY=VALUE");
			else
				status = usage_error("unknown option '%s'", argv[optind - 1]);
			free(a.sets);
			return status;
		}
	}
	if (optind >= argc) {
		free(a.sets);
		return usage_error("no command given");
	}
	cmd = argv[optind];
	if (strcmp(cmd, "help") == 0) {
		usage(stdout);
		free(a.sets);
		return EX_OK;
	}
	if (strcmp(cmd, "status") != 0 && strcmp(cmd, "dlq") != 0 && strcmp(cmd, "recover") != 0 &&
	    strcmp(cmd, "replay") != 0) {
		status = usage_error("unknown command '%s'", cmd);
		free(a.sets);
		return status;
	}
	if (strcmp(cmd, "dlq") == 0 &&
	    (optind + 1 >= argc || (strcmp(argv[optind + 1], "list") != 0 && strcmp(argv[optind + 1], "requeue") != 0))) {
		status = usage_error("dlq needs a subcommand: list or requeue");
		free(a.sets);
		return status;
	}

	tdr_err_clear(&err);
	if (load_config(&a, &c.cfg, &err) < 0) {
		fprintf(stderr, PROG ": configuration error: %s\n", err.msg);
		free(a.sets);
		return EX_CONFIG;
	}
	free(a.sets);
	/* Warnings and errors only: an operator's terminal is not a debug log. */
	tdr_log_init(PROG, LOG_WARNING);
	mongoc_log_set_handler(on_mongoc_log, NULL);
	tdr_redact_uri(c.cfg.store_uri, c.uri_safe, sizeof(c.uri_safe));
	if (c.cfg.backend == TDR_BACKEND_ETCD)
		tdr_redact_uri(c.cfg.etcd_endpoint, c.coord_safe, sizeof(c.coord_safe));
	else
		snprintf(c.coord_safe, sizeof(c.coord_safe), "%s", c.uri_safe);

	argc -= optind;
	argv += optind;
	if (strcmp(cmd, "status") == 0) {
		status = cmd_status(&c, argc, argv);
	} else if (strcmp(cmd, "recover") == 0) {
		status = cmd_recover(&c, argc, argv);
	} else if (strcmp(cmd, "replay") == 0) {
		/* replay checks its arguments and pings the store itself, only when it will write. */
		status = connect_store(&c, 0);
		if (status == 0)
			status = ctl_replay(c.st, &c.cfg, argc, argv);
	} else if (strcmp(argv[1], "list") == 0) {
		status = cmd_dlq_list(&c, argc, argv);
	} else {
		status = cmd_dlq_requeue(&c, argc, argv);
	}
	disconnect(&c);
	mongoc_cleanup();
	return status;
}
