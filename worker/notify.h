/*
 * notify.h - sd_notify, done carefully (docs/OPERATIONS.md).  Every call is a
 * no-op when not started by systemd ($NOTIFY_SOCKET unset).
 */
#ifndef TDRAIN_NOTIFY_H
#define TDRAIN_NOTIFY_H

#include <stdint.h>

void tdr_notify_init(void);
int tdr_notify_enabled(void);
void tdr_notify_ready(const char *status);
void tdr_notify_status(const char *status);
/* Ping the watchdog from the drain loop; sends at most every half period. */
void tdr_notify_watchdog(void);
void tdr_notify_reloading(void);
void tdr_notify_stopping(int64_t extend_usec);

#endif
