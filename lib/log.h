/*
 * log.h - the one place tdrain writes diagnostics.
 *
 * Under journald (stderr is the journal stream named by $JOURNAL_STREAM) each
 * line is sent with sd_journal_send() and carries structured fields; anywhere
 * else it is one plain line on stderr: "tdrain[pid]: level: message k=v ...".
 * Lease and partition transitions are "events": they carry TDRAIN_EVENT and a
 * MESSAGE_ID that systemd/tdrain.catalog explains (journalctl -x).
 * Never pass credentials: redact URIs with tdr_redact_uri() first.
 */
#ifndef TDRAIN_LOG_H
#define TDRAIN_LOG_H

#include <stddef.h>
#include <syslog.h>

enum tdr_event {
	TDR_EV_NONE = 0,
	TDR_EV_LEASE_ACQUIRED,
	TDR_EV_LEASE_RENEW_FAILED,
	TDR_EV_LEASE_LOST,
	TDR_EV_LEASE_RELEASED,
	TDR_EV_PARTITION_ASSIGNED,
	TDR_EV_PARTITION_REVOKED,
	TDR_EV_ORPHANS_RECOVERED,
	TDR_EV_DEADLETTER,
	TDR_EV_STARTED,
	TDR_EV_STOPPING,
	TDR_EV_BACKLOG_ALERT,
	TDR_EV_INDEXES_PENDING,
	TDR_EV_INDEXES_READY,
	TDR_EV__MAX
};

/* One structured field: KEY must be [A-Z0-9_]+, not starting with '_'. */
typedef struct tdr_field {
	const char *key;
	const char *val;
} tdr_field;

void tdr_log_init(const char *ident, int max_priority);
void tdr_log_set_level(int max_priority);
int tdr_log_level_parse(const char *s); /* "debug" -> LOG_DEBUG; -1 if unknown */
int tdr_log_under_journal(void);

/* Set fields added to every message (e.g. TDRAIN_REPLICA); copies them. */
void tdr_log_set_context(const char *replica);

void tdr_log(int priority, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void tdr_log_event(int priority, enum tdr_event ev, const tdr_field *fields, size_t nfields,
		   const char *fmt, ...) __attribute__((format(printf, 5, 6)));

const char *tdr_event_name(enum tdr_event ev);
const char *tdr_event_message_id(enum tdr_event ev);

#define log_err(...) tdr_log(LOG_ERR, __VA_ARGS__)
#define log_warn(...) tdr_log(LOG_WARNING, __VA_ARGS__)
#define log_info(...) tdr_log(LOG_INFO, __VA_ARGS__)
#define log_debug(...) tdr_log(LOG_DEBUG, __VA_ARGS__)

/*
 * Copy uri into out with any password replaced by "***"
 * ("mongodb://u:p@h" -> "mongodb://u:***@h"); always NUL-terminates.
 */
void tdr_redact_uri(const char *uri, char *out, size_t outlen);

#endif
