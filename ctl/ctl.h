/*
 * ctl.h - tdrainctl subcommands, and what they share.  Each subcommand
 * returns a process exit status (0 ok, 1 failure, 64 usage, 69 store
 * unreachable, 78 configuration) and prints its own errors.
 *
 *   tdrainctl.c  main: options, configuration, dispatch
 *   common.c     connections, lease listings, shared store reads, option parsing
 *   output.c     clean text, times, _ids, tables, JSON
 *   status.c, dlq.c, recover.c, replay.c: one subcommand each
 */
#ifndef TDRAIN_CTL_H
#define TDRAIN_CTL_H

#include <stdint.h>
#include <stdio.h>

#include <jansson.h>

#include "coord/lease.h"
#include "lib/conf.h"
#include "lib/err.h"
#include "lib/store.h"

#define PROG "tdrainctl"
#define EX_FAILURE 1

#define ID_TEXT_MAX 160 /* an _id as shown: canonical key, or Extended JSON for other types */
#define DLQ_LIMIT_DEFAULT 50

/* One invocation: its configuration and, once connected, the store and the lease backend. */
struct ctl {
	tdr_config cfg;
	tdr_store *st;
	mongoc_client_t *client;
	tdr_lease_backend *be;
	char uri_safe[1100];
	char coord_safe[1100];
};

/* tdrainctl.c: one usage error, a line naming it, then the summary; returns 64 for the caller to exit with. */
int usage_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* ------------------------------------------------------------ subcommands */

/* tdrainctl status [--json] [--interval MS] [--no-rate] */
int cmd_status(struct ctl *c, int argc, char **argv);
/* tdrainctl dlq list [--limit N] [--json] */
int cmd_dlq_list(struct ctl *c, int argc, char **argv);
/* tdrainctl dlq requeue (--all | ID...) [--dry-run] */
int cmd_dlq_requeue(struct ctl *c, int argc, char **argv);
/* tdrainctl recover (--partition P | --all) */
int cmd_recover(struct ctl *c, int argc, char **argv);
/* tdrainctl replay --from TIME --to TIME [--shadow COLL] [--dir DIR] [--dry-run] */
int ctl_replay(tdr_store *st, const tdr_config *cfg, int argc, char **argv);

/* ------------------------------------------------------------ common.c */

/* The exit status for a failed store or coordinator call: 69 when it is unreachable, else 1. */
int exit_for(const tdr_err *err);
/* Open (and with ping, ping) the store; on failure print one line and return the exit status. */
int connect_store(struct ctl *c, int ping);
/* The lease backend, for list() only. */
int connect_coord(struct ctl *c);
void disconnect(struct ctl *c);

int list_leases(struct ctl *c, tdr_lease_info **ret, size_t *ret_n, tdr_err *err);
const tdr_lease_info *find_lease(const tdr_lease_info *v, size_t n, const char *name);
int lease_live(const tdr_lease_info *li);
const char *lease_state(const tdr_lease_info *li);
/* qsort order: leader, member/..., part/N in numeric order, then anything else. */
int cmp_lease(const void *x, const void *y);

int exact_count(struct ctl *c, const char *coll, int64_t *ret, int *capped, tdr_err *err);
int count_docs(struct ctl *c, const char *coll, const bson_t *filter, int64_t *ret, tdr_err *err);
int find_first(struct ctl *c, const char *coll, const bson_t *filter, const bson_t *projection, bson_t *out, int *found,
	       tdr_err *err);

/* One claim record, as much as tdrainctl needs of it. */
struct claimrec {
	char id[96];
	int32_t part;
	int64_t epoch;
	int64_t nids;
};

int read_claims(struct ctl *c, struct claimrec **ret, size_t *ret_n, tdr_err *err);
void scope_lease_name(const tdr_config *cfg, int32_t part, char *buf, size_t len);
int part_in_mode(const tdr_config *cfg, int32_t part);
int claim_orphaned(const tdr_config *cfg, const struct claimrec *r, const tdr_lease_info *leases, size_t nl);

/* --opt VALUE or --opt=VALUE; *i advanced past what was used.  1 matched, 0 not this option, -1 missing value. */
int opt_value(int argc, char **argv, int *i, const char *name, const char **val);

/* ------------------------------------------------------------ output.c */

/* s[0..n) as printable, valid UTF-8 in out ('?' for bad bytes, "..." when cut). */
void clean_text(const char *s, size_t n, char *out, size_t outlen);
void fmt_time(int64_t ms, char *buf, size_t len);
void fmt_dur(int64_t ms, char *buf, size_t len);
void id_text(const bson_value_t *v, char *buf, size_t len);
const char *id_type(const bson_value_t *v);

#define TCOLS 7
#define TCELL 100

struct table {
	size_t ncols, nrows, cap;
	char (*rows)[TCOLS][TCELL]; /* row 0 is the header */
};

int table_init(struct table *t, size_t ncols, tdr_err *err);
void table_free(struct table *t);
/* Append a row of ncols cells (const char *, already clean text). */
int table_add(struct table *t, tdr_err *err, ...);
void table_print(const struct table *t, FILE *out, const char *indent);

void jput(json_t *o, const char *k, json_t *v, int *oom);
void jappend(json_t *a, json_t *v, int *oom);
json_t *jstr(const char *s);
json_t *jint_or_null(int64_t v, int present);
json_t *jtime(int64_t ms, int present);
/* Print root to standard output (or fail with oom set while it was built). */
int json_emit(json_t *root, int oom, tdr_err *err);

#endif
