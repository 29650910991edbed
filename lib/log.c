#include "config.h"

#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include <systemd/sd-journal.h>

#include "lib/log.h"

static const struct {
	const char *name;
	const char *message_id;
} events[TDR_EV__MAX] = {
	[TDR_EV_NONE] = { "", "" },
	[TDR_EV_LEASE_ACQUIRED] = { "lease_acquired", "724d891925b54df2b184781b9e84e662" },
	[TDR_EV_LEASE_RENEW_FAILED] = { "lease_renew_failed", "76387427406c495c9366c289d81455a1" },
	[TDR_EV_LEASE_LOST] = { "lease_lost", "8d2ca0ee902c4e7283f4d07f3fb35838" },
	[TDR_EV_LEASE_RELEASED] = { "lease_released", "f3ead17f1c404e6783284e3e307fa03b" },
	[TDR_EV_PARTITION_ASSIGNED] = { "partition_assigned", "a1652a54fd2e4ed0bfee0d97a565984c" },
	[TDR_EV_PARTITION_REVOKED] = { "partition_revoked", "7f4f59c19f7b4acf81b4b46e2f6eb518" },
	[TDR_EV_ORPHANS_RECOVERED] = { "orphans_recovered", "62cf12af6ec84b6389e58306a8330756" },
	[TDR_EV_DEADLETTER] = { "deadletter", "4e698e68b2d343f1840feec925469ede" },
	[TDR_EV_STARTED] = { "started", "a60005e59140411387b49bdc24ea306d" },
	[TDR_EV_STOPPING] = { "stopping", "91012c0437d2437e9f24178dffbd9443" },
	[TDR_EV_BACKLOG_ALERT] = { "backlog_alert", "081a2c01a75b4c22a33d4856590ee44c" },
	[TDR_EV_INDEXES_PENDING] = { "indexes_pending", "f21f840be9b143079c4ee36e892abd61" },
	[TDR_EV_INDEXES_READY] = { "indexes_ready", "c8aa769d1e1d4017b650a60a438d8c3b" },
};

static struct {
	char ident[32];
	char replica[128];
	int max_priority;
	int journal; /* 1 when stderr is connected to journald */
	pthread_mutex_t lock;
} L = { "tdrain", "", LOG_INFO, 0, PTHREAD_MUTEX_INITIALIZER };

static const char *prio_names[] = { "emerg", "alert", "crit", "error", "warning", "notice", "info", "debug" };

const char *tdr_event_name(enum tdr_event ev)
{
	return (ev > TDR_EV_NONE && ev < TDR_EV__MAX) ? events[ev].name : "";
}

const char *tdr_event_message_id(enum tdr_event ev)
{
	return (ev > TDR_EV_NONE && ev < TDR_EV__MAX) ? events[ev].message_id : "";
}

/* journald sets JOURNAL_STREAM=dev:ino for the stream it gave us (systemd.exec(5)). */
static int stderr_is_journal(void)
{
	const char *js = getenv("JOURNAL_STREAM");
	unsigned long long dev, ino;
	struct stat st;

	if (js == NULL || sscanf(js, "%llu:%llu", &dev, &ino) != 2)
		return 0;
	if (fstat(STDERR_FILENO, &st) < 0)
		return 0;
	return (unsigned long long)st.st_dev == dev && (unsigned long long)st.st_ino == ino;
}

void tdr_log_init(const char *ident, int max_priority)
{
	snprintf(L.ident, sizeof(L.ident), "%s", ident ? ident : "tdrain");
	L.max_priority = max_priority;
	L.journal = stderr_is_journal();
}

void tdr_log_set_level(int max_priority)
{
	L.max_priority = max_priority;
}

int tdr_log_under_journal(void)
{
	return L.journal;
}

void tdr_log_set_context(const char *replica)
{
	snprintf(L.replica, sizeof(L.replica), "%s", replica ? replica : "");
}

int tdr_log_level_parse(const char *s)
{
	for (int i = 0; i < 8; i++)
		if (strcmp(s, prio_names[i]) == 0)
			return i;
	if (strcmp(s, "err") == 0)
		return LOG_ERR;
	if (strcmp(s, "warn") == 0)
		return LOG_WARNING;
	return -1;
}

#define MAX_FIELDS 16

static void emit(int priority, enum tdr_event ev, const tdr_field *fields, size_t nfields, const char *msg)
{
	if (priority > L.max_priority)
		return;
	if (nfields > MAX_FIELDS)
		nfields = MAX_FIELDS;

	if (L.journal) {
		/* MESSAGE, PRIORITY, SYSLOG_IDENTIFIER, TDRAIN_REPLICA, event pair, fields. */
		char bufs[6 + MAX_FIELDS][640];
		struct iovec iov[6 + MAX_FIELDS];
		int n = 0;

		snprintf(bufs[n], sizeof(bufs[n]), "MESSAGE=%s", msg);
		n++;
		snprintf(bufs[n], sizeof(bufs[n]), "PRIORITY=%d", priority);
		n++;
		snprintf(bufs[n], sizeof(bufs[n]), "SYSLOG_IDENTIFIER=%s", L.ident);
		n++;
		if (L.replica[0]) {
			snprintf(bufs[n], sizeof(bufs[n]), "TDRAIN_REPLICA=%s", L.replica);
			n++;
		}
		if (ev != TDR_EV_NONE) {
			snprintf(bufs[n], sizeof(bufs[n]), "TDRAIN_EVENT=%s", events[ev].name);
			n++;
			snprintf(bufs[n], sizeof(bufs[n]), "MESSAGE_ID=%s", events[ev].message_id);
			n++;
		}
		for (size_t i = 0; i < nfields; i++) {
			snprintf(bufs[n], sizeof(bufs[n]), "%s=%s", fields[i].key, fields[i].val ? fields[i].val : "");
			n++;
		}
		for (int i = 0; i < n; i++) {
			iov[i].iov_base = bufs[i];
			iov[i].iov_len = strlen(bufs[i]);
		}
		if (sd_journal_sendv(iov, n) >= 0)
			return;
		/* fall through to stderr if the journal socket is gone */
	}

	char line[4096];
	size_t off = 0;
	int w;

	w = snprintf(line, sizeof(line), "%s[%d]: %s: %s", L.ident, (int)getpid(),
		     prio_names[priority & 7], msg);
	off = w > 0 ? ((size_t)w < sizeof(line) ? (size_t)w : sizeof(line) - 1) : 0;
	if (ev != TDR_EV_NONE && off < sizeof(line)) {
		w = snprintf(line + off, sizeof(line) - off, " event=%s", events[ev].name);
		if (w > 0)
			off = off + (size_t)w < sizeof(line) ? off + (size_t)w : sizeof(line) - 1;
	}
	for (size_t i = 0; i < nfields && off < sizeof(line) - 1; i++) {
		w = snprintf(line + off, sizeof(line) - off, " %s=%s", fields[i].key, fields[i].val ? fields[i].val : "");
		if (w > 0)
			off = off + (size_t)w < sizeof(line) ? off + (size_t)w : sizeof(line) - 1;
	}
	pthread_mutex_lock(&L.lock);
	fprintf(stderr, "%s\n", line);
	pthread_mutex_unlock(&L.lock);
}

void tdr_log(int priority, const char *fmt, ...)
{
	char msg[2048];
	va_list ap;

	if (priority > L.max_priority)
		return;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	emit(priority, TDR_EV_NONE, NULL, 0, msg);
}

void tdr_log_event(int priority, enum tdr_event ev, const tdr_field *fields, size_t nfields, const char *fmt, ...)
{
	char msg[2048];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	emit(priority, ev, fields, nfields, msg);
}

void tdr_redact_uri(const char *uri, char *out, size_t outlen)
{
	const char *scheme, *at, *colon, *slash;

	if (outlen == 0)
		return;
	snprintf(out, outlen, "%s", uri ? uri : "");
	if (uri == NULL)
		return;
	scheme = strstr(uri, "://");
	if (scheme == NULL)
		return;
	scheme += 3;
	slash = strchr(scheme, '/');
	/* The userinfo ends at the last '@' before the path: passwords may contain '@'. */
	at = NULL;
	for (const char *p = scheme; *p && (slash == NULL || p < slash); p++)
		if (*p == '@')
			at = p;
	if (at == NULL)
		return;
	colon = memchr(scheme, ':', (size_t)(at - scheme));
	if (colon == NULL)
		return;
	snprintf(out, outlen, "%.*s:***%s", (int)(colon - uri), uri, at);
}
