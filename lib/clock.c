#include "config.h"

#include <time.h>

#include "lib/clock.h"

int64_t tdr_mono_us(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

int64_t tdr_mono_ms(void)
{
	return tdr_mono_us() / 1000;
}

void tdr_mono_deadline(struct timespec *ts, int64_t ms)
{
	clock_gettime(CLOCK_MONOTONIC, ts);
	ts->tv_sec += (time_t)(ms / 1000);
	ts->tv_nsec += (long)(ms % 1000) * 1000000L;
	if (ts->tv_nsec >= 1000000000L) {
		ts->tv_sec++;
		ts->tv_nsec -= 1000000000L;
	}
}

int64_t tdr_wall_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

void tdr_cond_init_mono(pthread_cond_t *cv)
{
	pthread_condattr_t ca;

	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(cv, &ca);
	pthread_condattr_destroy(&ca);
}

int tdr_cond_wait_deadline(pthread_cond_t *cv, pthread_mutex_t *mu, int64_t deadline_ms)
{
	struct timespec ts;
	int64_t left = deadline_ms - tdr_mono_ms();

	if (left <= 0)
		return 1;
	tdr_mono_deadline(&ts, left);
	pthread_cond_timedwait(cv, mu, &ts);
	return 0;
}

int tdr_sleep_ms(int64_t ms, volatile int *stop)
{
	/* Sleep in short slices so a signal flag is noticed promptly. */
	while (ms > 0) {
		int64_t slice = ms > 50 ? 50 : ms;
		struct timespec ts = { slice / 1000, (slice % 1000) * 1000000 };

		if (stop && *stop)
			return 1;
		nanosleep(&ts, NULL);
		ms -= slice;
	}
	return stop && *stop;
}

void tdr_utc_day(int64_t epoch_ms, char buf[11])
{
	time_t t = (time_t)(epoch_ms >= 0 ? epoch_ms / 1000 : (epoch_ms - 999) / 1000);
	struct tm tm;

	gmtime_r(&t, &tm);
	strftime(buf, 11, "%Y-%m-%d", &tm);
}

/*
 * Proleptic Gregorian date of a day count since 1970-01-01 (H. Hinnant's
 * civil_from_days).  Used instead of gmtime_r because it is defined for the
 * whole BSON date range: a valid event with an absurd date must still archive.
 */
void tdr_civil_from_days(int64_t z, int64_t *y, unsigned *m, unsigned *d)
{
	int64_t era, yy;
	unsigned doe, yoe, doy, mp;

	z += 719468;
	era = (z >= 0 ? z : z - 146096) / 146097;
	doe = (unsigned)(z - era * 146097);
	yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
	yy = (int64_t)yoe + era * 400;
	doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
	mp = (5 * doy + 2) / 153;
	*d = doy - (153 * mp + 2) / 5 + 1;
	*m = mp < 10 ? mp + 3 : mp - 9;
	*y = yy + (*m <= 2);
}
