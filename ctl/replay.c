/*
 * replay.c - tdrainctl replay: put archived events back into a collection.
 *
 *   tdrainctl replay --from TIME --to TIME [--shadow COLL] [--dir DIR] [--dry-run]
 *
 * Reads every closed archive file ("*.ndjson") in the archive directory and
 * its failed/ subdirectory, never the file still being written ("*.ndjson.open":
 * it is closed within archive.max_age_s, then a later replay sees it).  Every
 * line whose created_at is in [--from, --to) is inserted as the original
 * document (the line's "doc"):
 *   - by default into the FIFO, so the events are drained again; derived
 *     state does not double count because the fold deduplicates by
 *     insert_id, and an event still in the FIFO is a duplicate _id: counted
 *     as "already present", not an error;
 *   - with --shadow COLL into COLL only, which must not be the FIFO, a tdrain_
 *     collection or a derived collection: live data is never touched.
 * Before reading anything it prints the window, the target and every file
 * it will read (seed 003: an operator must see exactly what a replay touches).
 * Rerunning a replay is safe: what is already there is counted and skipped.
 */
#include "config.h"

#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "consumers/archive.h"
#include "ctl/ctl.h"
#include "lib/clock.h"
#include "lib/store.h"

#define EX_OK_ 0
#define EX_FAIL 1
#define EX_USAGE_ 64
#define EX_UNAVAILABLE_ 69

#define BULK_DOCS 1000
#define MAX_LINE_BYTES (64 * 1024 * 1024) /* a 16 MiB document escaped twice stays well below */

static void usage(FILE *f)
{
	fprintf(f, "usage: tdrainctl replay --from TIME --to TIME [--shadow COLL] [--dir DIR] [--dry-run]\n"
		   "  TIME: RFC 3339 (2026-11-22T10:00:00Z, 2026-11-22T10:00:00.250+01:00) or epoch milliseconds\n"
		   "  selects archived events with FROM <= created_at < TO from DIR (default archive.dir) and\n"
		   "  its failed/ subdirectory; open *.ndjson.open files are not read.\n"
		   "  --shadow COLL  insert into COLL instead of the FIFO (never a live collection)\n"
		   "  --dry-run      print what would be inserted; write nothing\n");
}

/* ------------------------------------------------------------------------ */
/* Time                                                                     */
/* ------------------------------------------------------------------------ */

/* Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's days_from_civil). */
static int64_t days_from_civil(int64_t y, unsigned m, unsigned d)
{
	int64_t era;
	unsigned yoe, doy, doe;

	y -= m <= 2;
	era = (y >= 0 ? y : y - 399) / 400;
	yoe = (unsigned)(y - era * 400);
	doy = (153 * (m > 2 ? m - 3 : m + 9) + 2) / 5 + d - 1;
	doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
	return era * 146097 + (int64_t)doe - 719468;
}

/* "2026-11-22T10:00:00.000Z": what the operator reads back, always UTC with milliseconds. */
static void format_rfc3339(int64_t ms, char *buf, size_t len)
{
	const int64_t D = 86400000;
	int64_t days = ms / D, tod = ms % D, y;
	unsigned mo, d;

	if (tod < 0) {
		days--;
		tod += D;
	}
	tdr_civil_from_days(days, &y, &mo, &d);
	snprintf(buf, len, "%04" PRId64 "-%02u-%02uT%02u:%02u:%02u.%03uZ", y, mo, d, (unsigned)(tod / 3600000),
		 (unsigned)(tod / 60000 % 60), (unsigned)(tod / 1000 % 60), (unsigned)(tod % 1000));
}

/* Exactly n decimal digits at s. */
static int digits(const char *s, int n, int *out)
{
	int v = 0;

	for (int i = 0; i < n; i++) {
		if (s[i] < '0' || s[i] > '9')
			return -1;
		v = v * 10 + (s[i] - '0');
	}
	*out = v;
	return 0;
}

/*
 * RFC 3339 date-time ("YYYY-MM-DDThh:mm:ss[.frac](Z|+hh:mm|-hh:mm)") or
 * epoch milliseconds.  A fraction finer than a millisecond must be zero:
 * silently rounding a bound would make the window ambiguous.
 */
static int parse_time(const char *s, int64_t *out, char *why, size_t whylen)
{
	static const unsigned mdays[] = { 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31 };
	int Y, M, D, h, mi, sec, frac_ms = 0, off = 0;
	const char *p;
	int64_t ms;

	if (*s == '\0') {
		snprintf(why, whylen, "empty time");
		return -1;
	}
	/* Epoch milliseconds: digits only (optionally negative). */
	p = s + (*s == '-');
	if (*p && strspn(p, "0123456789") == strlen(p)) {
		char *end;

		errno = 0;
		ms = strtoll(s, &end, 10);
		if (errno || *end) {
			snprintf(why, whylen, "'%s' is out of range", s);
			return -1;
		}
		*out = ms;
		return 0;
	}
	if (strlen(s) < 20 || digits(s, 4, &Y) || s[4] != '-' || digits(s + 5, 2, &M) || s[7] != '-' ||
	    digits(s + 8, 2, &D) || (s[10] != 'T' && s[10] != 't') || digits(s + 11, 2, &h) || s[13] != ':' ||
	    digits(s + 14, 2, &mi) || s[16] != ':' || digits(s + 17, 2, &sec)) {
		snprintf(why, whylen, "'%s' is neither RFC 3339 (2026-11-22T10:00:00Z) nor epoch milliseconds", s);
		return -1;
	}
	if (M < 1 || M > 12 || D < 1 ||
	    (unsigned)D > mdays[M - 1] + (M == 2 && ((Y % 4 == 0 && Y % 100 != 0) || Y % 400 == 0)) || h > 23 ||
	    mi > 59 || sec > 59) {
		snprintf(why, whylen, "'%s' is not a valid date and time", s);
		return -1;
	}
	p = s + 19;
	if (*p == '.') {
		int n = 0;

		for (p++; *p >= '0' && *p <= '9'; p++, n++) {
			if (n < 3)
				frac_ms = frac_ms * 10 + (*p - '0');
			else if (*p != '0') {
				snprintf(why, whylen, "'%s': finer than a millisecond", s);
				return -1;
			}
		}
		if (n == 0) {
			snprintf(why, whylen, "'%s': empty fraction", s);
			return -1;
		}
		for (; n < 3; n++)
			frac_ms *= 10;
	}
	if ((*p == 'Z' || *p == 'z') && p[1] == '\0') {
		off = 0;
	} else if ((*p == '+' || *p == '-') && strlen(p) == 6 && p[3] == ':') {
		int oh, om;

		if (digits(p + 1, 2, &oh) || digits(p + 4, 2, &om) || oh > 23 || om > 59) {
			snprintf(why, whylen, "'%s': bad UTC offset", s);
			return -1;
		}
		off = (oh * 60 + om) * (*p == '+' ? 1 : -1);
	} else {
		snprintf(why, whylen, "'%s': needs a time zone (Z for UTC)", s);
		return -1;
	}
	ms = days_from_civil(Y, (unsigned)M, (unsigned)D) * 86400000 + (int64_t)h * 3600000 + (int64_t)mi * 60000 +
	     (int64_t)sec * 1000 + frac_ms - (int64_t)off * 60000;
	*out = ms;
	return 0;
}

/* ------------------------------------------------------------------------ */
/* Files                                                                    */
/* ------------------------------------------------------------------------ */

struct flist {
	char **v;
	size_t n, cap;
};

static int flist_add(struct flist *l, const char *dir, const char *name)
{
	size_t len = strlen(dir) + strlen(name) + 2;
	char *s;

	if (l->n == l->cap) {
		size_t nc = l->cap ? l->cap * 2 : 32;
		char **nv = realloc(l->v, nc * sizeof(*nv));

		if (nv == NULL)
			return -1;
		l->v = nv;
		l->cap = nc;
	}
	s = malloc(len);
	if (s == NULL)
		return -1;
	snprintf(s, len, "%s/%s", dir, name);
	l->v[l->n++] = s;
	return 0;
}

static void flist_free(struct flist *l)
{
	for (size_t i = 0; i < l->n; i++)
		free(l->v[i]);
	free(l->v);
}

static int ends_with(const char *s, const char *suffix)
{
	size_t a = strlen(s), b = strlen(suffix);

	return a > b && strcmp(s + a - b, suffix) == 0;
}

static int cmp_str(const void *x, const void *y)
{
	return strcmp(*(char *const *)x, *(char *const *)y);
}

/* Closed files into *closed, open ones into *open (if not NULL). A missing dir is empty. */
static int scan(const char *dir, struct flist *closed, struct flist *open_files)
{
	struct dirent *de;
	DIR *d = opendir(dir);

	if (d == NULL)
		return errno == ENOENT ? 0 : -errno;
	while ((de = readdir(d)) != NULL) {
		char path[1100];
		struct stat sb;

		if (de->d_name[0] == '.')
			continue;
		snprintf(path, sizeof(path), "%s/%s", dir, de->d_name);
		if (stat(path, &sb) < 0 || !S_ISREG(sb.st_mode))
			continue;
		if (ends_with(de->d_name, ".ndjson")) {
			if (flist_add(closed, dir, de->d_name) < 0)
				goto nomem;
		} else if (open_files && ends_with(de->d_name, ".ndjson.open")) {
			if (flist_add(open_files, dir, de->d_name) < 0)
				goto nomem;
		}
	}
	closedir(d);
	return 0;
nomem:
	closedir(d);
	return -ENOMEM;
}

/* ------------------------------------------------------------------------ */
/* The replay                                                               */
/* ------------------------------------------------------------------------ */

struct run {
	tdr_store *st;
	mongoc_client_t *client;
	mongoc_collection_t *coll;
	mongoc_bulk_operation_t *bulk;
	size_t in_bulk;
	int dry_run;
	int64_t from, to;
	int64_t selected, inserted, dups, skipped, malformed;
	int store_rc;     /* tdr_errcode of the failure that stopped the run, 0 if none */
};

static int flush(struct run *r)
{
	bson_t reply;
	tdr_err err = { 0 };
	bson_iter_t it;
	int64_t dups = 0;
	int rc;

	if (r->bulk == NULL || r->in_bulk == 0)
		return 0;
	rc = tdr_bulk_run(r->bulk, "replay insert", &dups, &reply, &err);
	if (bson_iter_init_find(&it, &reply, "nInserted"))
		r->inserted += bson_iter_as_int64(&it);
	bson_destroy(&reply);
	mongoc_bulk_operation_destroy(r->bulk);
	r->bulk = NULL;
	r->in_bulk = 0;
	r->dups += dups;
	if (rc < 0) {
		fprintf(stderr, "tdrainctl replay: %s\n", err.msg);
		r->store_rc = rc;
		return rc;
	}
	return 0;
}

static int add_doc(struct run *r, const bson_t *doc)
{
	bson_error_t be;

	r->selected++;
	if (r->dry_run)
		return 0;
	if (r->bulk == NULL) {
		/* Unordered: one duplicate must not stop the rest of the batch. */
		r->bulk = tdr_bulk_new(r->coll, 0);
		if (r->bulk == NULL) {
			fprintf(stderr, "tdrainctl replay: cannot create a bulk operation\n");
			r->store_rc = TDR_EFAIL;
			return -1;
		}
	}
	/* The bulk copies the document: the caller may free it at once. */
	if (!mongoc_bulk_operation_insert_with_opts(r->bulk, doc, NULL, &be)) {
		fprintf(stderr, "tdrainctl replay: insert: %s\n", be.message);
		r->store_rc = TDR_EFAIL;
		return -1;
	}
	if (++r->in_bulk >= BULK_DOCS)
		return flush(r);
	return 0;
}

/* 0 when the whole file was read (malformed lines are counted, not fatal), -1 to stop the replay. */
static int replay_file(struct run *r, const char *path)
{
	char *line = NULL;
	size_t cap = 0;
	ssize_t n;
	int64_t lineno = 0;
	int rc = 0;
	FILE *f = fopen(path, "re");

	if (f == NULL) {
		fprintf(stderr, "tdrainctl replay: %s: %s\n", path, strerror(errno));
		return -1;
	}
	while (rc == 0 && (n = getline(&line, &cap, f)) > 0) {
		tdr_err err = { 0 };
		int64_t ms;
		bson_t doc;

		lineno++;
		if (n == 1 && line[0] == '\n')
			continue;
		if (n > MAX_LINE_BYTES) {
			fprintf(stderr, "tdrainctl replay: %s:%" PRId64 ": line longer than %d bytes: skipped\n", path,
				lineno, MAX_LINE_BYTES);
			r->malformed++;
			continue;
		}
		if (line[n - 1] != '\n') {
			/* Closed files end with a newline; a cut line is not a whole event. */
			fprintf(stderr, "tdrainctl replay: %s:%" PRId64 ": unterminated last line: skipped\n", path,
				lineno);
			r->malformed++;
			continue;
		}
		if (tdr_archive_parse_line(line, (size_t)n, &doc, &ms, &err) < 0) {
			fprintf(stderr, "tdrainctl replay: %s:%" PRId64 ": %s: skipped\n", path, lineno, err.msg);
			r->malformed++;
			continue;
		}
		if (ms < r->from || ms >= r->to)
			r->skipped++;
		else
			rc = add_doc(r, &doc);
		bson_destroy(&doc);
	}
	if (rc == 0 && ferror(f)) {
		fprintf(stderr, "tdrainctl replay: %s: read error: %s\n", path, strerror(errno));
		rc = -1;
	}
	free(line);
	fclose(f);
	return rc;
}

/* Why COLL must not be a shadow target, or NULL if it may. */
static const char *shadow_refusal(const tdr_config *cfg, const char *coll)
{
	static const char *const derived[] = { TDR_C_COUNTERS, TDR_C_DEVICES, TDR_C_DEVICE_EVENTS,
					       TDR_C_IDENTITIES, TDR_C_USERS, TDR_C_SIGNINS };

	if (coll[0] == '\0')
		return "an empty name";
	if (strcmp(coll, cfg->events_coll) == 0)
		return "the live FIFO (store.events)";
	if (strncmp(coll, "tdrain_", 7) == 0)
		return "a tdrain_ collection";
	for (size_t i = 0; i < sizeof(derived) / sizeof(derived[0]); i++)
		if (strcmp(coll, derived[i]) == 0)
			return "a derived collection";
	if (strncmp(coll, "system.", 7) == 0 || strchr(coll, '$'))
		return "not a plain collection name";
	return NULL;
}

int ctl_replay(tdr_store *st, const tdr_config *cfg, int argc, char **argv)
{
	const char *from_s = NULL, *to_s = NULL, *shadow = NULL, *dir = NULL, *refusal;
	struct flist closed = { 0 }, open_files = { 0 };
	struct run r = { 0 };
	char failed_dir[600], from_txt[48], to_txt[48], why[256];
	const char *target;
	int dry_run = 0, rc = EX_OK_, i, e;
	int64_t files_read = 0;

	/* argv[0] is the subcommand name ("replay") when present. */
	i = argc > 0 && argv[0][0] != '-' ? 1 : 0;
	for (; i < argc; i++) {
		const char *v = NULL;
		int m;

		if (strcmp(argv[i], "-h") == 0 || strcmp(argv[i], "--help") == 0) {
			usage(stdout);
			return EX_OK_;
		}
		if (strcmp(argv[i], "--dry-run") == 0) {
			dry_run = 1;
			continue;
		}
		if ((m = opt_value(argc, argv, &i, "--from", &v)) != 0)
			from_s = v;
		else if ((m = opt_value(argc, argv, &i, "--to", &v)) != 0)
			to_s = v;
		else if ((m = opt_value(argc, argv, &i, "--shadow", &v)) != 0)
			shadow = v;
		else if ((m = opt_value(argc, argv, &i, "--dir", &v)) != 0)
			dir = v;
		else {
			fprintf(stderr, "tdrainctl replay: unknown argument '%s'\n", argv[i]);
			usage(stderr);
			return EX_USAGE_;
		}
		if (m < 0) {
			fprintf(stderr, "tdrainctl replay: %s needs a value\n", argv[i]);
			return EX_USAGE_;
		}
	}
	if (from_s == NULL || to_s == NULL) {
		fprintf(stderr, "tdrainctl replay: --from and --to are both required\n");
		usage(stderr);
		return EX_USAGE_;
	}
	if (parse_time(from_s, &r.from, why, sizeof(why)) < 0 || parse_time(to_s, &r.to, why, sizeof(why)) < 0) {
		fprintf(stderr, "tdrainctl replay: %s\n", why);
		return EX_USAGE_;
	}
	if (r.from >= r.to) {
		fprintf(stderr, "tdrainctl replay: --from must be before --to (the window is [from, to))\n");
		return EX_USAGE_;
	}
	if (shadow && (refusal = shadow_refusal(cfg, shadow)) != NULL) {
		fprintf(stderr, "tdrainctl replay: refusing --shadow %s: it is %s; a shadow collection must not hold "
				"live data\n", shadow, refusal);
		return EX_USAGE_;
	}
	if (dir == NULL)
		dir = cfg->archive_dir;
	if (dir[0] == '\0') {
		fprintf(stderr, "tdrainctl replay: no archive directory: set archive.dir or pass --dir\n");
		return EX_USAGE_;
	}
	target = shadow ? shadow : cfg->events_coll;

	/* Everything that will be read, listed before anything is read or written. */
	snprintf(failed_dir, sizeof(failed_dir), "%s/failed", dir);
	{
		struct stat sb;
		int se = stat(dir, &sb) < 0 ? errno : S_ISDIR(sb.st_mode) ? 0 : ENOTDIR;

		/* A mistyped --dir must not look like "nothing to replay". */
		if (se) {
			fprintf(stderr, "tdrainctl replay: archive directory %s: %s\n", dir, strerror(se));
			return EX_FAIL;
		}
	}
	if ((e = scan(dir, &closed, &open_files)) < 0 || (e = scan(failed_dir, &closed, NULL)) < 0) {
		fprintf(stderr, "tdrainctl replay: cannot list %s: %s\n", e == -ENOMEM ? "files" : dir, strerror(-e));
		rc = EX_FAIL;
		goto out;
	}
	if (closed.n > 1)
		qsort(closed.v, closed.n, sizeof(*closed.v), cmp_str);
	if (open_files.n > 1)
		qsort(open_files.v, open_files.n, sizeof(*open_files.v), cmp_str);
	format_rfc3339(r.from, from_txt, sizeof(from_txt));
	format_rfc3339(r.to, to_txt, sizeof(to_txt));
	printf("replay: window: created_at >= %s (%" PRId64 " ms) and < %s (%" PRId64 " ms)\n", from_txt, r.from,
	       to_txt, r.to);
	if (shadow)
		printf("replay: target: %s.%s (shadow collection; the FIFO and derived collections are not touched)\n",
		       cfg->store_db, target);
	else
		printf("replay: target: %s.%s (the live FIFO: the events are drained again; derived state counts each "
		       "insert_id once)\n", cfg->store_db, target);
	printf("replay: reading %zu closed archive file%s from %s and %s/ (open *.ndjson.open files are NOT read)%s\n",
	       closed.n, closed.n == 1 ? "" : "s", dir, failed_dir, closed.n ? ":" : "");
	for (size_t k = 0; k < closed.n; k++) {
		struct stat sb;

		printf("replay:   %s (%lld bytes)\n", closed.v[k],
		       stat(closed.v[k], &sb) == 0 ? (long long)sb.st_size : -1LL);
	}
	for (size_t k = 0; k < open_files.n; k++)
		printf("replay:   not read (still open; closed within archive.max_age_s): %s\n", open_files.v[k]);
	if (dry_run)
		printf("replay: dry run: nothing will be written\n");
	fflush(stdout);

	r.dry_run = dry_run;
	r.st = st;
	if (!dry_run) {
		tdr_err err = { 0 };

		if (st == NULL) {
			fprintf(stderr, "tdrainctl replay: no store connection\n");
			rc = EX_UNAVAILABLE_;
			goto out;
		}
		if (tdr_store_ping(st, &err) < 0) {
			fprintf(stderr, "tdrainctl replay: %s\n", err.msg);
			rc = EX_UNAVAILABLE_;
			goto out;
		}
		r.client = tdr_store_pop(st);
		r.coll = tdr_store_coll(st, r.client, target);
	}
	for (size_t k = 0; k < closed.n; k++) {
		if (replay_file(&r, closed.v[k]) < 0) {
			rc = r.store_rc == TDR_ETRANSIENT ? EX_UNAVAILABLE_ : EX_FAIL;
			break;
		}
		files_read++;
	}
	if (rc == EX_OK_ && flush(&r) < 0)
		rc = r.store_rc == TDR_ETRANSIENT ? EX_UNAVAILABLE_ : EX_FAIL;
	if (rc != EX_OK_ && !dry_run)
		fprintf(stderr, "tdrainctl replay: stopped after inserting %" PRId64 " events (%" PRId64
				" already present); rerunning is safe: what is there is counted and skipped\n",
			r.inserted, r.dups);
	if (r.malformed)
		fprintf(stderr, "tdrainctl replay: %" PRId64 " malformed line%s skipped (see above)\n", r.malformed,
			r.malformed == 1 ? "" : "s");
	if (rc == EX_OK_) {
		if (dry_run)
			printf("dry run: would replay %" PRId64 " archived events from %" PRId64 " files into %s.%s (%" PRId64
			       " skipped outside window; events already present are not checked)\n",
			       r.selected, files_read, cfg->store_db, target, r.skipped);
		else
			printf("replayed %" PRId64 " events from %" PRId64 " files into %s.%s (%" PRId64
			       " already present, %" PRId64 " skipped outside window)\n",
			       r.inserted, files_read, cfg->store_db, target, r.dups, r.skipped);
		if (r.malformed)
			rc = EX_FAIL;
	}

out:
	if (r.bulk)
		mongoc_bulk_operation_destroy(r.bulk);
	if (r.coll)
		mongoc_collection_destroy(r.coll);
	if (r.client)
		tdr_store_push(st, r.client);
	flist_free(&closed);
	flist_free(&open_files);
	return rc;
}
