/*
 * clock.h - time sources.
 *
 * Lease safety is measured only on the monotonic clock (CLOCK_MONOTONIC): it
 * never jumps, and its rate error between hosts is assumed small (NTP keeps
 * it within 500 ppm).  Wall-clock time is used only for what humans read
 * (created_at days, log lines, informational lease fields).
 */
#ifndef TDRAIN_CLOCK_H
#define TDRAIN_CLOCK_H

#include <pthread.h>
#include <stdint.h>
#include <time.h>

int64_t tdr_mono_ms(void);  /* monotonic milliseconds */
int64_t tdr_mono_us(void);  /* monotonic microseconds */
int64_t tdr_wall_ms(void);  /* milliseconds since the Unix epoch, UTC */

/*
 * The CLOCK_MONOTONIC instant ms from now, for pthread_cond_timedwait() on a
 * condition variable created with pthread_condattr_setclock(CLOCK_MONOTONIC).
 */
void tdr_mono_deadline(struct timespec *ts, int64_t ms);

/* pthread_cond_init() of a condition variable whose timed waits use CLOCK_MONOTONIC. */
void tdr_cond_init_mono(pthread_cond_t *cv);

/*
 * One pthread_cond_timedwait() on mu (held) towards the monotonic instant
 * deadline_ms; returns non-zero, without waiting, once it has passed.  Loop on
 * it with the predicate: while (!done && !tdr_cond_wait_deadline(...)).
 */
int tdr_cond_wait_deadline(pthread_cond_t *cv, pthread_mutex_t *mu, int64_t deadline_ms);

/* Sleep up to ms, returning early (non-zero) if *stop becomes set. */
int tdr_sleep_ms(int64_t ms, volatile int *stop);

/* "2026-11-22" for a UTC epoch-ms timestamp; buf must hold 11 bytes. */
void tdr_utc_day(int64_t epoch_ms, char buf[11]);

/* The proleptic Gregorian date (UTC) of day z since 1970-01-01, for the whole BSON date range. */
void tdr_civil_from_days(int64_t z, int64_t *y, unsigned *m, unsigned *d);

#endif
