/*
 * archive.c - the archive consumer (contract: consumers/archive.h): its files,
 * their rotation and the sender thread.  The line format is in archive_line.c.
 *
 * Two threads touch an archive:
 *   - the drain thread calls append/tick/stats/close; it alone owns the open
 *     file (fd, its name, its size);
 *   - the sender thread (only with archive.http_url) owns closed files: it
 *     POSTs them oldest first and unlinks them after a 2xx.
 * The directory is the hand-off: a file becomes the sender's when the drain
 * thread renames "<name>-<ms>-<seq>.ndjson.open" to "...ndjson".  a->lock
 * guards only what both threads read: counters, the open file's size, the
 * stop flag and the condition the sender sleeps on.
 */
#include "config.h"

#include <curl/curl.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "consumers/archive.h"
#include "lib/bsonx.h"
#include "lib/clock.h"
#include "lib/log.h"

#define SUFFIX_CLOSED ".ndjson"
#define SUFFIX_OPEN ".ndjson.open"
#define FAILED_SUBDIR "failed"
#define BACKOFF_MIN_MS 100
#define BACKOFF_MAX_MS 30000
#define IDLE_RESCAN_MS 1000        /* sender rescans at least this often when idle */
#define FAIL_LOG_EVERY_MS 10000    /* repeat a "still failing" warning at most this often */
#define RESP_SNIPPET_MAX 256       /* bytes of an error response body kept for the log */
#define FILE_NAME_MAX 192          /* "<name>-<ms>-<seq>.ndjson.open" with a 63-byte name fits */

#ifndef IOV_MAX
#define IOV_MAX 1024
#endif

/* ------------------------------------------------------------------------ */
/* File names                                                               */
/* ------------------------------------------------------------------------ */

/* A decimal with no sign and no leading zero (so the name can be rebuilt exactly). */
static const char *parse_u64(const char *s, uint64_t *out)
{
	uint64_t v = 0;
	const char *p = s;

	if (*p < '0' || *p > '9' || (*p == '0' && p[1] >= '0' && p[1] <= '9'))
		return NULL;
	for (; *p >= '0' && *p <= '9'; p++) {
		if (v > (UINT64_MAX - 9) / 10)
			return NULL;
		v = v * 10 + (uint64_t)(*p - '0');
	}
	*out = v;
	return p;
}

/*
 * Is fname "<name>-<ms>-<seq><suffix>"?  The tail grammar is strict, so
 * replica "a" never takes replica "a-1"'s files ("a-1-<ms>-<seq>" has three
 * numbers after "a-"): two replicas can share one directory.
 */
static int match_name(const char *fname, const char *name, const char *suffix, uint64_t *ms, uint64_t *seq)
{
	size_t sl = strlen(suffix), fl = strlen(fname), nl = strlen(name);
	const char *p;

	if (fl <= sl || strcmp(fname + fl - sl, suffix) != 0)
		return 0;
	if (strncmp(fname, name, nl) != 0 || fname[nl] != '-')
		return 0;
	p = parse_u64(fname + nl + 1, ms);
	if (p == NULL || *p != '-')
		return 0;
	p = parse_u64(p + 1, seq);
	return p != NULL && strcmp(p, suffix) == 0;
}

/* ------------------------------------------------------------------------ */
/* The archive                                                              */
/* ------------------------------------------------------------------------ */

struct spool_file {
	uint64_t ms, seq;
	int64_t size;
};

struct tdr_archive {
	char dir[512];
	char name[64];
	int64_t max_bytes, max_age_ms, max_backlog, http_timeout_ms;
	char url[512];          /* may hold credentials: only ever given to curl */
	char url_safe[512];     /* redacted: the only form put in messages */
	int dirfd;

	/* The open file: drain thread only (open_size is also read under lock). */
	int fd;
	char open_name[FILE_NAME_MAX];
	uint64_t open_ms, open_seq;
	int64_t open_mono;       /* tdr_mono_ms() at creation, for age rotation */
	int64_t good_size;       /* bytes known durable and whole; file beyond it must be cut */
	int need_trunc;          /* a failed write left bytes past good_size that we could not cut */
	uint64_t next_seq;
	int over_backlog;        /* backpressure state, for logging transitions only */

	pthread_mutex_t lock;
	pthread_cond_t cond;     /* sender sleeps on it; rotation and close signal it */
	int stop;                /* under lock; mirrored in stop_flag for curl's callback */
	atomic_int stop_flag;
	int64_t open_size;       /* under lock */
	int64_t pending_bytes;   /* closed, unsent files of this replica; under lock */
	struct tdr_archive_stats st; /* under lock (backlog_bytes computed on read) */

	int sender_running;
	pthread_t sender;
};

static pthread_once_t curl_once = PTHREAD_ONCE_INIT;
static CURLcode curl_init_rc = CURLE_FAILED_INIT;

static void curl_init_once(void)
{
	/* Once per process and before any handle: curl_global_init must not race. */
	curl_init_rc = curl_global_init(CURL_GLOBAL_DEFAULT);
}

static void file_name(char *buf, size_t len, const char *name, uint64_t ms, uint64_t seq, const char *suffix)
{
	snprintf(buf, len, "%s-%" PRIu64 "-%" PRIu64 "%s", name, ms, seq, suffix);
}

/* mkdir -p with mode for every level we create. */
static int mkdir_p(const char *path, mode_t mode)
{
	char tmp[512];
	size_t len = strlen(path);

	if (len == 0 || len >= sizeof(tmp))
		return -ENAMETOOLONG;
	memcpy(tmp, path, len + 1);
	for (char *p = tmp + 1; *p; p++) {
		if (*p != '/')
			continue;
		*p = '\0';
		if (mkdir(tmp, mode) < 0 && errno != EEXIST)
			return -errno;
		*p = '/';
	}
	if (mkdir(tmp, mode) < 0 && errno != EEXIST)
		return -errno;
	return 0;
}

/* Rename without replacing: a closed file is never overwritten by another. */
static int rename_noreplace(int fromfd, const char *from, int tofd, const char *to)
{
#ifdef RENAME_NOREPLACE
	if (renameat2(fromfd, from, tofd, to, RENAME_NOREPLACE) == 0)
		return 0;
	if (errno != EINVAL && errno != ENOSYS)
		return -errno;
#endif
	/* Filesystem without RENAME_NOREPLACE: check, then rename (only we write these names). */
	if (faccessat(tofd, to, F_OK, AT_SYMLINK_NOFOLLOW) == 0)
		return -EEXIST;
	return renameat(fromfd, from, tofd, to) == 0 ? 0 : -errno;
}

static int64_t backlog_locked(const tdr_archive *a)
{
	return a->url[0] ? a->pending_bytes + a->open_size : 0;
}

/*
 * Give the open file (fd, open_name) its closed name; an empty file is
 * removed instead.  On failure the file stays open and can be retried.
 */
static int close_open_file(tdr_archive *a, tdr_err *err)
{
	char closed[FILE_NAME_MAX];
	int64_t size = a->good_size;
	int r;

	if (a->fd < 0)
		return 0;
	if (a->need_trunc) {
		if (ftruncate(a->fd, (off_t)a->good_size) < 0)
			return tdr_err_set(err, TDR_ETRANSIENT, "archive: cannot cut %s back to %" PRId64 " bytes: %s",
					   a->open_name, a->good_size, strerror(errno));
		a->need_trunc = 0;
	}
	if (size == 0) {
		if (unlinkat(a->dirfd, a->open_name, 0) < 0 && errno != ENOENT)
			return tdr_err_set(err, TDR_ETRANSIENT, "archive: cannot remove empty %s: %s", a->open_name,
					   strerror(errno));
	} else {
		for (int tries = 0;; tries++) {
			file_name(closed, sizeof(closed), a->name, a->open_ms, a->open_seq, SUFFIX_CLOSED);
			r = rename_noreplace(a->dirfd, a->open_name, a->dirfd, closed);
			if (r == 0)
				break;
			/* Someone else's file under our name (a copied spool?): take the next sequence number. */
			if (r != -EEXIST || tries > 1000)
				return tdr_err_set(err, TDR_ETRANSIENT, "archive: cannot close %s: %s", a->open_name,
						   strerror(-r));
			a->open_seq = a->next_seq++;
		}
		/* Best effort: a lost rename only leaves a ".open" that the next start closes. */
		(void)fsync(a->dirfd);
	}
	close(a->fd);
	a->fd = -1;
	a->good_size = 0;
	pthread_mutex_lock(&a->lock);
	a->open_size = 0;
	if (size > 0) {
		a->st.files_closed++;
		if (a->url[0])
			a->pending_bytes += size;
	}
	pthread_cond_broadcast(&a->cond);
	pthread_mutex_unlock(&a->lock);
	return 0;
}

static int create_open_file(tdr_archive *a, tdr_err *err)
{
	char closed[FILE_NAME_MAX];

	for (int tries = 0; tries < 1000; tries++) {
		uint64_t ms = (uint64_t)tdr_wall_ms(), seq = a->next_seq++;
		int fd;

		file_name(a->open_name, sizeof(a->open_name), a->name, ms, seq, SUFFIX_OPEN);
		file_name(closed, sizeof(closed), a->name, ms, seq, SUFFIX_CLOSED);
		if (faccessat(a->dirfd, closed, F_OK, AT_SYMLINK_NOFOLLOW) == 0)
			continue;
		fd = openat(a->dirfd, a->open_name, O_WRONLY | O_CREAT | O_EXCL | O_APPEND | O_CLOEXEC, 0640);
		if (fd < 0) {
			if (errno == EEXIST)
				continue;
			return tdr_err_set(err, TDR_ETRANSIENT, "archive: cannot create %s/%s: %s", a->dir,
					   a->open_name, strerror(errno));
		}
		/* The new name must survive a crash as surely as the lines we will fdatasync into it. */
		if (fsync(a->dirfd) < 0) {
			int e = errno;

			close(fd);
			(void)unlinkat(a->dirfd, a->open_name, 0);
			return tdr_err_set(err, TDR_ETRANSIENT, "archive: fsync %s: %s", a->dir, strerror(e));
		}
		a->fd = fd;
		a->open_ms = ms;
		a->open_seq = seq;
		a->open_mono = tdr_mono_ms();
		a->good_size = 0;
		a->need_trunc = 0;
		return 0;
	}
	return tdr_err_set(err, TDR_ETRANSIENT, "archive: no free file name in %s", a->dir);
}

/*
 * A leftover ".open" of ours (crash or kill): cut any half line a crash left
 * at its end (that batch was never acknowledged, so it will be archived
 * again), then close it like a rotation would.
 */
static int recover_open_file(tdr_archive *a, const char *fname, uint64_t ms, uint64_t seq, tdr_err *err)
{
	char buf[4096];
	struct stat sb;
	off_t end, keep = 0;
	int fd = openat(a->dirfd, fname, O_RDWR | O_CLOEXEC | O_NOFOLLOW);

	if (fd < 0)
		return tdr_err_set(err, TDR_EFAIL, "archive: open leftover %s: %s", fname, strerror(errno));
	if (fstat(fd, &sb) < 0) {
		close(fd);
		return tdr_err_set(err, TDR_EFAIL, "archive: stat leftover %s: %s", fname, strerror(errno));
	}
	end = sb.st_size;
	/* Scan backwards for the last '\n': everything after it is an unfinished line. */
	while (end > 0 && keep == 0) {
		size_t chunk = end > (off_t)sizeof(buf) ? sizeof(buf) : (size_t)end;
		ssize_t r = pread(fd, buf, chunk, end - (off_t)chunk);

		if (r != (ssize_t)chunk) {
			close(fd);
			return tdr_err_set(err, TDR_EFAIL, "archive: read leftover %s: %s", fname,
					   r < 0 ? strerror(errno) : "short read");
		}
		for (size_t i = chunk; i > 0; i--)
			if (buf[i - 1] == '\n') {
				keep = end - (off_t)chunk + (off_t)i;
				break;
			}
		end -= (off_t)chunk;
	}
	if (keep != sb.st_size) {
		log_warn("archive: %s/%s ends with an unfinished line: cutting %lld bytes (that batch was not "
			 "acknowledged and will be archived again)", a->dir, fname, (long long)(sb.st_size - keep));
		if (ftruncate(fd, keep) < 0 || fdatasync(fd) < 0) {
			int e = errno;

			close(fd);
			return tdr_err_set(err, TDR_EFAIL, "archive: cut leftover %s: %s", fname, strerror(e));
		}
	}
	/* Reuse the rotation path: it renames (or removes an empty file) and counts the backlog. */
	a->fd = fd;
	a->open_ms = ms;
	a->open_seq = seq;
	snprintf(a->open_name, sizeof(a->open_name), "%s", fname);
	a->good_size = (int64_t)keep;
	a->need_trunc = 0;
	if (close_open_file(a, err) < 0) {
		close(a->fd);
		a->fd = -1;
		return TDR_EFAIL;
	}
	return 0;
}

static int spool_cmp(const void *x, const void *y)
{
	const struct spool_file *p = x, *q = y;

	if (p->ms != q->ms)
		return p->ms < q->ms ? -1 : 1;
	if (p->seq != q->seq)
		return p->seq < q->seq ? -1 : 1;
	return 0;
}

/*
 * List this replica's closed files, oldest first.  *ret is malloc'ed (NULL
 * when none).  The list holds numbers only; names are rebuilt from them.
 */
static int list_closed(tdr_archive *a, struct spool_file **ret, size_t *ret_n)
{
	struct spool_file *v = NULL;
	size_t n = 0, cap = 0;
	struct dirent *de;
	DIR *d = opendir(a->dir);

	if (d == NULL)
		return -errno;
	while ((de = readdir(d)) != NULL) {
		struct spool_file f;
		struct stat sb;

		if (!match_name(de->d_name, a->name, SUFFIX_CLOSED, &f.ms, &f.seq))
			continue;
		if (fstatat(a->dirfd, de->d_name, &sb, AT_SYMLINK_NOFOLLOW) < 0 || !S_ISREG(sb.st_mode))
			continue;
		f.size = (int64_t)sb.st_size;
		if (n == cap) {
			size_t nc = cap ? cap * 2 : 64;
			struct spool_file *nv = realloc(v, nc * sizeof(*v));

			if (nv == NULL) {
				free(v);
				closedir(d);
				return -ENOMEM;
			}
			v = nv;
			cap = nc;
		}
		v[n++] = f;
	}
	closedir(d);
	if (n > 1)
		qsort(v, n, sizeof(*v), spool_cmp);
	*ret = v;
	*ret_n = n;
	return 0;
}

/* ------------------------------------------------------------------------ */
/* The sender                                                               */
/* ------------------------------------------------------------------------ */

struct post {
	tdr_archive *a;
	int fd;
	char resp[RESP_SNIPPET_MAX + 1];
	size_t resp_len;
};

static size_t on_read(char *buf, size_t size, size_t nmemb, void *ud)
{
	struct post *p = ud;
	ssize_t r;

	do
		r = read(p->fd, buf, size * nmemb);
	while (r < 0 && errno == EINTR);
	return r < 0 ? CURL_READFUNC_ABORT : (size_t)r;
}

/* curl rewinds the body when it must resend it (e.g. a reused connection was closed). */
static int on_seek(void *ud, curl_off_t off, int origin)
{
	struct post *p = ud;

	return lseek(p->fd, (off_t)off, origin) < 0 ? CURL_SEEKFUNC_FAIL : CURL_SEEKFUNC_OK;
}

static size_t on_write(char *data, size_t size, size_t nmemb, void *ud)
{
	struct post *p = ud;
	size_t n = size * nmemb, room = RESP_SNIPPET_MAX - p->resp_len;

	/* Keep only the start of the body, for the log; the rest is read and dropped. */
	if (room > 0) {
		size_t k = n < room ? n : room;

		memcpy(p->resp + p->resp_len, data, k);
		p->resp_len += k;
		p->resp[p->resp_len] = '\0';
	}
	return n;
}

/* Called often during a transfer: a non-zero return aborts it, so close() is prompt. */
static int on_progress(void *ud, curl_off_t dt, curl_off_t dn, curl_off_t ut, curl_off_t un)
{
	struct post *p = ud;

	(void)dt, (void)dn, (void)ut, (void)un;
	return atomic_load(&p->a->stop_flag) ? 1 : 0;
}

/* Printable, single-line copy of a response snippet for the log. */
static void sanitize(char *s)
{
	for (; *s; s++)
		if ((unsigned char)*s < 0x20 || *s == 0x7f)
			*s = ' ';
}

enum post_outcome { SENT, REJECTED, RETRY, GONE, STOPPED };

static enum post_outcome post_file(tdr_archive *a, CURL *h, const char *fname, int64_t *size, char *why,
				   size_t whylen)
{
	struct curl_slist *hdrs = NULL, *h2;
	struct post p = { .a = a, .fd = -1 };
	char cerr[CURL_ERROR_SIZE] = "";
	enum post_outcome out = RETRY;
	struct stat sb;
	long status = 0;
	CURLcode cc;

	p.fd = openat(a->dirfd, fname, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
	if (p.fd < 0) {
		snprintf(why, whylen, "open: %s", strerror(errno));
		return errno == ENOENT ? GONE : RETRY;
	}
	if (fstat(p.fd, &sb) < 0) {
		snprintf(why, whylen, "stat: %s", strerror(errno));
		close(p.fd);
		return RETRY;
	}
	*size = (int64_t)sb.st_size;
	hdrs = curl_slist_append(NULL, "Content-Type: application/x-ndjson");
	/* No "Expect: 100-continue": it would add a round trip (or a 1 s stall) per file. */
	h2 = hdrs ? curl_slist_append(hdrs, "Expect:") : NULL;
	if (h2 == NULL) {
		snprintf(why, whylen, "out of memory");
		curl_slist_free_all(hdrs);
		close(p.fd);
		return RETRY;
	}
	hdrs = h2;
	curl_easy_reset(h);
	curl_easy_setopt(h, CURLOPT_URL, a->url);
#if LIBCURL_VERSION_NUM >= 0x075500
	curl_easy_setopt(h, CURLOPT_PROTOCOLS_STR, "http,https");
#else
	curl_easy_setopt(h, CURLOPT_PROTOCOLS, (long)(CURLPROTO_HTTP | CURLPROTO_HTTPS));
#endif
	curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, (long)a->http_timeout_ms);
	curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT_MS, (long)a->http_timeout_ms);
	curl_easy_setopt(h, CURLOPT_POST, 1L);
	curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)sb.st_size);
	curl_easy_setopt(h, CURLOPT_READFUNCTION, on_read);
	curl_easy_setopt(h, CURLOPT_READDATA, &p);
	curl_easy_setopt(h, CURLOPT_SEEKFUNCTION, on_seek);
	curl_easy_setopt(h, CURLOPT_SEEKDATA, &p);
	curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_write);
	curl_easy_setopt(h, CURLOPT_WRITEDATA, &p);
	curl_easy_setopt(h, CURLOPT_NOPROGRESS, 0L);
	curl_easy_setopt(h, CURLOPT_XFERINFOFUNCTION, on_progress);
	curl_easy_setopt(h, CURLOPT_XFERINFODATA, &p);
	curl_easy_setopt(h, CURLOPT_HTTPHEADER, hdrs);
	curl_easy_setopt(h, CURLOPT_ERRORBUFFER, cerr);
	curl_easy_setopt(h, CURLOPT_FOLLOWLOCATION, 0L);

	cc = curl_easy_perform(h);
	if (cc == CURLE_ABORTED_BY_CALLBACK && atomic_load(&a->stop_flag)) {
		out = STOPPED;
	} else if (cc != CURLE_OK) {
		/* curl's messages name host and port, never the userinfo. */
		snprintf(why, whylen, "%s", cerr[0] ? cerr : curl_easy_strerror(cc));
		out = RETRY;
	} else {
		curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &status);
		sanitize(p.resp);
		snprintf(why, whylen, "HTTP %ld%s%s", status, p.resp_len ? ": " : "", p.resp);
		if (status >= 200 && status < 300)
			out = SENT;
		else if (status >= 400 && status < 500 && status != 408 && status != 429)
			out = REJECTED; /* this file's content was refused: retrying it cannot help */
		else
			out = RETRY;    /* 5xx, 408, 429, and anything unexpected (3xx: no redirects followed) */
	}
	/* Detach our stack objects from the reused handle before they go out of scope. */
	curl_easy_setopt(h, CURLOPT_HTTPHEADER, NULL);
	curl_easy_setopt(h, CURLOPT_ERRORBUFFER, NULL);
	curl_slist_free_all(hdrs);
	close(p.fd);
	return out;
}

/* Sleep up to ms or until close(); 1 if stopping. */
static int sender_wait(tdr_archive *a, int64_t ms, int wake_on_rotation)
{
	struct timespec ts;
	int stop;

	tdr_mono_deadline(&ts, ms);
	pthread_mutex_lock(&a->lock);
	while (!a->stop) {
		if (pthread_cond_timedwait(&a->cond, &a->lock, &ts) == ETIMEDOUT || wake_on_rotation)
			break;
	}
	stop = a->stop;
	pthread_mutex_unlock(&a->lock);
	return stop;
}

static void account_removed(tdr_archive *a, int64_t size, int sent)
{
	pthread_mutex_lock(&a->lock);
	a->pending_bytes -= size;
	if (a->pending_bytes < 0)
		a->pending_bytes = 0;
	if (sent)
		a->st.files_sent++;
	pthread_mutex_unlock(&a->lock);
}

/* 0 once fname is in failed/ (no longer backlog), -1 if it is still in the spool. */
static int move_to_failed(tdr_archive *a, const char *fname, const char *why)
{
	char fdir[600];
	int ffd, r;

	snprintf(fdir, sizeof(fdir), "%s/%s", a->dir, FAILED_SUBDIR);
	if (mkdir(fdir, 0750) < 0 && errno != EEXIST) {
		log_err("archive: %s rejected by %s (%s) and cannot create %s: %s", fname, a->url_safe, why, fdir,
			strerror(errno));
		return -1;
	}
	ffd = open(fdir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (ffd < 0) {
		log_err("archive: %s rejected by %s (%s) and cannot open %s: %s", fname, a->url_safe, why, fdir,
			strerror(errno));
		return -1;
	}
	r = rename_noreplace(a->dirfd, fname, ffd, fname);
	if (r == 0)
		(void)fsync(ffd);
	close(ffd);
	if (r < 0) {
		log_err("archive: %s rejected by %s (%s) and cannot be moved to %s: %s", fname, a->url_safe, why, fdir,
			strerror(-r));
		return -1;
	}
	log_err("archive: %s permanently rejected by %s (%s): moved to %s/ (tdrainctl replay reads it)", fname,
		a->url_safe, why, fdir);
	return 0;
}

static void *sender_main(void *arg)
{
	tdr_archive *a = arg;
	CURL *h = curl_easy_init();
	int64_t backoff = 0, failing_since = 0, last_fail_log = 0, failures = 0;

	if (h == NULL) {
		log_err("archive: cannot create an HTTP handle: nothing will be sent to %s", a->url_safe);
		return NULL;
	}
	while (!atomic_load(&a->stop_flag)) {
		struct spool_file *files = NULL;
		size_t n = 0;
		int r = list_closed(a, &files, &n);

		if (r < 0) {
			log_warn("archive: cannot list %s: %s", a->dir, strerror(-r));
			if (sender_wait(a, IDLE_RESCAN_MS, 0))
				break;
			continue;
		}
		if (n == 0) {
			free(files);
			if (sender_wait(a, IDLE_RESCAN_MS, 1))
				break;
			continue;
		}
		for (size_t i = 0; i < n && !atomic_load(&a->stop_flag); i++) {
			char fname[FILE_NAME_MAX], why[RESP_SNIPPET_MAX + 128] = "";
			int64_t size = files[i].size;
			enum post_outcome o;

			file_name(fname, sizeof(fname), a->name, files[i].ms, files[i].seq, SUFFIX_CLOSED);
			o = post_file(a, h, fname, &size, why, sizeof(why));
			if (o == STOPPED)
				break;
			if (o == GONE) {
				/* Removed behind our back: it is no longer backlog. */
				account_removed(a, files[i].size, 0);
				continue;
			}
			if (o == SENT) {
				if (unlinkat(a->dirfd, fname, 0) < 0 && errno != ENOENT) {
					/* Sent but still here: it would be sent again; say so loudly, then back off. */
					log_err("archive: %s was sent but cannot be removed: %s", fname, strerror(errno));
					o = RETRY;
				} else {
					account_removed(a, size, 1);
					if (failures > 0)
						log_info("archive: sending to %s works again after %" PRId64
							 " failed attempts over %" PRId64 " ms", a->url_safe, failures,
							 tdr_mono_ms() - failing_since);
					failures = 0;
					backoff = 0;
					continue;
				}
			}
			pthread_mutex_lock(&a->lock);
			a->st.send_failures++;
			pthread_mutex_unlock(&a->lock);
			/* A permanent rejection must not block the files behind it. */
			if (o == REJECTED && move_to_failed(a, fname, why) == 0) {
				account_removed(a, size, 0);
				continue;
			}
			/* Retry the same file (oldest first) after a capped exponential backoff. */
			if (failures++ == 0) {
				failing_since = tdr_mono_ms();
				last_fail_log = failing_since;
				log_warn("archive: sending %s to %s failed (%s): retrying with backoff", fname, a->url_safe,
					 why);
			} else if (tdr_mono_ms() - last_fail_log >= FAIL_LOG_EVERY_MS) {
				last_fail_log = tdr_mono_ms();
				log_warn("archive: sending to %s still failing after %" PRId64 " attempts (%s)",
					 a->url_safe, failures, why);
			}
			backoff = backoff ? backoff * 2 : BACKOFF_MIN_MS;
			if (backoff > BACKOFF_MAX_MS)
				backoff = BACKOFF_MAX_MS;
			if (sender_wait(a, backoff, 0))
				break;
			break; /* rescan: the list may be stale after a long wait */
		}
		free(files);
	}
	curl_easy_cleanup(h);
	return NULL;
}

/* ------------------------------------------------------------------------ */
/* Public API                                                               */
/* ------------------------------------------------------------------------ */

int tdr_archive_open(tdr_archive **ret, const tdr_config *cfg, tdr_err *err)
{
	pthread_condattr_t ca;
	tdr_archive *a;
	struct dirent *de;
	DIR *d;
	int r, rc;

	if (cfg->archive_dir[0] == '\0') {
		*ret = NULL;
		return 0;
	}
	a = calloc(1, sizeof(*a));
	if (a == NULL)
		return tdr_err_set(err, TDR_ENOMEM, "archive: out of memory");
	a->fd = -1;
	a->dirfd = -1;
	snprintf(a->dir, sizeof(a->dir), "%s", cfg->archive_dir);
	/* The replica name is in every file name: it is what lets replicas share a directory. */
	if (cfg->name[0])
		snprintf(a->name, sizeof(a->name), "%s", cfg->name);
	else if (gethostname(a->name, sizeof(a->name) - 1) < 0 || a->name[0] == '\0')
		snprintf(a->name, sizeof(a->name), "tdrain");
	if (strchr(a->name, '/') || a->name[0] == '.') {
		rc = tdr_err_set(err, TDR_ECONFIG, "archive: replica name '%s' cannot be part of a file name", a->name);
		free(a);
		return rc;
	}
	a->max_bytes = cfg->archive_max_bytes;
	a->max_age_ms = cfg->archive_max_age_s * 1000;
	a->max_backlog = cfg->archive_max_backlog_bytes;
	a->http_timeout_ms = cfg->archive_http_timeout_ms;
	snprintf(a->url, sizeof(a->url), "%s", cfg->archive_http_url);
	tdr_redact_uri(a->url, a->url_safe, sizeof(a->url_safe));
	atomic_init(&a->stop_flag, 0);

	r = mkdir_p(a->dir, 0750);
	if (r < 0) {
		rc = tdr_err_set(err, TDR_ECONFIG, "archive.dir %s: cannot create: %s", a->dir, strerror(-r));
		free(a);
		return rc;
	}
	a->dirfd = open(a->dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (a->dirfd < 0) {
		rc = tdr_err_set(err, TDR_ECONFIG, "archive.dir %s: %s", a->dir, strerror(errno));
		free(a);
		return rc;
	}
	if (pthread_mutex_init(&a->lock, NULL) != 0) {
		close(a->dirfd);
		free(a);
		return tdr_err_set(err, TDR_ENOMEM, "archive: cannot create a mutex");
	}
	/* Monotonic waits: a wall-clock step must not stretch the sender's backoff. */
	if (pthread_condattr_init(&ca) != 0 || pthread_condattr_setclock(&ca, CLOCK_MONOTONIC) != 0 ||
	    pthread_cond_init(&a->cond, &ca) != 0) {
		pthread_mutex_destroy(&a->lock);
		close(a->dirfd);
		free(a);
		return tdr_err_set(err, TDR_ENOMEM, "archive: cannot create a condition variable");
	}
	pthread_condattr_destroy(&ca);

	/* Leftover ".open" files of this replica: close them first, so the sender takes them. */
	d = opendir(a->dir);
	if (d == NULL) {
		rc = tdr_err_set(err, TDR_ECONFIG, "archive.dir %s: %s", a->dir, strerror(errno));
		goto fail;
	}
	while ((de = readdir(d)) != NULL) {
		uint64_t ms, seq;

		if (!match_name(de->d_name, a->name, SUFFIX_OPEN, &ms, &seq))
			continue;
		if (recover_open_file(a, de->d_name, ms, seq, err) < 0) {
			closedir(d);
			rc = TDR_EFAIL;
			goto fail;
		}
		log_info("archive: closed leftover %s/%s", a->dir, de->d_name);
	}
	closedir(d);
	/* The backlog counted from the disk: unsent files from earlier runs are backlog too. */
	if (a->url[0]) {
		struct spool_file *files = NULL;
		size_t n = 0;

		r = list_closed(a, &files, &n);
		if (r < 0) {
			rc = tdr_err_set(err, TDR_EFAIL, "archive.dir %s: %s", a->dir, strerror(-r));
			goto fail;
		}
		a->pending_bytes = 0;
		for (size_t i = 0; i < n; i++)
			a->pending_bytes += files[i].size;
		free(files);
	}

	if (a->url[0]) {
		sigset_t all, old;

		pthread_once(&curl_once, curl_init_once);
		if (curl_init_rc != CURLE_OK) {
			rc = tdr_err_set(err, TDR_EFAIL, "archive: curl_global_init: %s", curl_easy_strerror(curl_init_rc));
			goto fail;
		}
		/* Signals are for the main thread: the sender must never run a handler. */
		sigfillset(&all);
		pthread_sigmask(SIG_SETMASK, &all, &old);
		r = pthread_create(&a->sender, NULL, sender_main, a);
		pthread_sigmask(SIG_SETMASK, &old, NULL);
		if (r != 0) {
			rc = tdr_err_set(err, TDR_EFAIL, "archive: cannot start the sender thread: %s", strerror(r));
			goto fail;
		}
		a->sender_running = 1;
	}
	*ret = a;
	return 0;

fail:
	pthread_cond_destroy(&a->cond);
	pthread_mutex_destroy(&a->lock);
	close(a->dirfd);
	free(a);
	return rc;
}

/* Cut the open file back to its last whole, durable line after a failed write. */
static void cut_back(tdr_archive *a)
{
	if (ftruncate(a->fd, (off_t)a->good_size) < 0) {
		a->need_trunc = 1;
		return;
	}
	a->need_trunc = 0;
	(void)fdatasync(a->fd);
}

static int write_lines(int fd, struct iovec *iov, size_t cnt)
{
	while (cnt > 0) {
		int c = cnt > IOV_MAX ? IOV_MAX : (int)cnt;
		ssize_t w = writev(fd, iov, c);

		if (w < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (w == 0)
			return -EIO;
		while (cnt > 0 && (size_t)w >= iov->iov_len) {
			w -= (ssize_t)iov->iov_len;
			iov++;
			cnt--;
		}
		if (cnt > 0 && w > 0) {
			iov->iov_base = (char *)iov->iov_base + w;
			iov->iov_len -= (size_t)w;
		}
	}
	return 0;
}

int tdr_archive_append(tdr_archive *a, const bson_t *const *docs, size_t n, tdr_err *err)
{
	static char nl[] = "\n";
	struct iovec *iov = NULL;
	char **lines = NULL;
	size_t *lens = NULL, made = 0;
	int64_t total = 0, backlog;
	int rc = 0, r;

	if (a == NULL || n == 0)
		return 0;

	/* Backpressure first: refusing costs nothing and the FIFO holds the events meanwhile. */
	pthread_mutex_lock(&a->lock);
	backlog = backlog_locked(a);
	pthread_mutex_unlock(&a->lock);
	if (a->url[0] && backlog > a->max_backlog) {
		if (!a->over_backlog) {
			a->over_backlog = 1;
			log_warn("archive: backlog %" PRId64 " bytes exceeds archive.max_backlog_bytes %" PRId64
				 ": draining pauses until %s accepts the spool", backlog, a->max_backlog, a->url_safe);
		}
		/* The open file must become sendable, or the backlog could never shrink. */
		if (a->fd >= 0 && a->good_size > 0 && close_open_file(a, NULL) < 0)
			log_debug("archive: could not close the open file while paused; will retry");
		return tdr_err_set(err, TDR_ETRANSIENT, "archive backlog %" PRId64
				   " bytes exceeds archive.max_backlog_bytes", backlog);
	}
	if (a->over_backlog) {
		a->over_backlog = 0;
		log_info("archive: backlog %" PRId64 " bytes is under archive.max_backlog_bytes again: draining resumes",
			 backlog);
	}

	lines = calloc(n, sizeof(*lines));
	lens = calloc(n, sizeof(*lens));
	iov = calloc(2 * n, sizeof(*iov));
	if (lines == NULL || lens == NULL || iov == NULL) {
		rc = tdr_err_set(err, TDR_ENOMEM, "archive: out of memory for %zu lines", n);
		goto out;
	}
	for (made = 0; made < n; made++) {
		rc = tdr_archive_line(docs[made], &lines[made], &lens[made], err);
		if (rc < 0)
			goto out;
		iov[2 * made].iov_base = lines[made];
		iov[2 * made].iov_len = lens[made];
		iov[2 * made + 1].iov_base = nl;
		iov[2 * made + 1].iov_len = 1;
		total += (int64_t)lens[made] + 1;
	}

	if (a->need_trunc) {
		if (ftruncate(a->fd, (off_t)a->good_size) < 0) {
			rc = tdr_err_set(err, TDR_ETRANSIENT, "archive: cannot cut %s back after a failed write: %s",
					 a->open_name, strerror(errno));
			goto out;
		}
		a->need_trunc = 0;
	}
	/* Rotate before writing when the file is too old, or would pass max_bytes (a file holds whole batches). */
	if (a->fd >= 0 && a->good_size > 0 &&
	    (tdr_mono_ms() - a->open_mono >= a->max_age_ms || a->good_size + total > a->max_bytes)) {
		rc = close_open_file(a, err);
		if (rc < 0)
			goto out;
	}
	if (a->fd < 0) {
		rc = create_open_file(a, err);
		if (rc < 0)
			goto out;
	}

	r = write_lines(a->fd, iov, 2 * n);
	if (r == 0 && fdatasync(a->fd) < 0)
		r = -errno;
	if (r < 0) {
		/*
		 * Nothing of this batch may stay: it is not acknowledged and will be
		 * archived again.  After a failed fdatasync the page cache state is
		 * unknown, so the file is also closed and the retry starts a new one.
		 */
		rc = tdr_err_set(err, TDR_ETRANSIENT, "archive: write %s/%s: %s", a->dir, a->open_name, strerror(-r));
		cut_back(a);
		if (!a->need_trunc)
			(void)close_open_file(a, NULL);
		goto out;
	}
	a->good_size += total;
	pthread_mutex_lock(&a->lock);
	a->open_size = a->good_size;
	a->st.lines_written += (int64_t)n;
	pthread_mutex_unlock(&a->lock);
	/* Full: close now so the sender can take it without waiting for the next batch. */
	if (a->good_size >= a->max_bytes) {
		tdr_err e2;

		if (close_open_file(a, &e2) < 0)
			log_warn("%s (lines are durable; will retry)", e2.msg);
	}
out:
	if (lines)
		for (size_t i = 0; i < made; i++)
			free(lines[i]);
	free(lines);
	free(lens);
	free(iov);
	return rc;
}

void tdr_archive_tick(tdr_archive *a)
{
	tdr_err e;

	if (a == NULL || a->fd < 0)
		return;
	if (a->good_size == 0 || tdr_mono_ms() - a->open_mono < a->max_age_ms)
		return;
	if (close_open_file(a, &e) < 0)
		log_warn("%s (will retry)", e.msg);
}

void tdr_archive_stats_get(tdr_archive *a, struct tdr_archive_stats *out)
{
	memset(out, 0, sizeof(*out));
	if (a == NULL)
		return;
	pthread_mutex_lock(&a->lock);
	*out = a->st;
	out->backlog_bytes = backlog_locked(a);
	pthread_mutex_unlock(&a->lock);
}

void tdr_archive_close(tdr_archive *a)
{
	tdr_err e;

	if (a == NULL)
		return;
	if (a->sender_running) {
		pthread_mutex_lock(&a->lock);
		a->stop = 1;
		atomic_store(&a->stop_flag, 1);
		pthread_cond_broadcast(&a->cond);
		pthread_mutex_unlock(&a->lock);
		pthread_join(a->sender, NULL);
	}
	/* Closed, the last file is sent by the next start (or taken by replay). */
	if (a->fd >= 0 && close_open_file(a, &e) < 0) {
		log_warn("%s: leaving it open; the next start closes it", e.msg);
		close(a->fd);
	}
	pthread_cond_destroy(&a->cond);
	pthread_mutex_destroy(&a->lock);
	close(a->dirfd);
	free(a);
}
