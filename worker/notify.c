#include "config.h"

#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include <systemd/sd-daemon.h>

#include "lib/clock.h"
#include "worker/notify.h"

static struct {
	int enabled;
	uint64_t watchdog_usec;
	int64_t last_ping_us;
} N;

void tdr_notify_init(void)
{
	N.enabled = getenv("NOTIFY_SOCKET") != NULL;
	if (sd_watchdog_enabled(0, &N.watchdog_usec) <= 0)
		N.watchdog_usec = 0;
}

int tdr_notify_enabled(void)
{
	return N.enabled;
}

void tdr_notify_ready(const char *status)
{
	if (N.enabled)
		sd_notifyf(0, "READY=1\nSTATUS=%s", status);
}

void tdr_notify_status(const char *status)
{
	if (N.enabled)
		sd_notifyf(0, "STATUS=%s", status);
}

void tdr_notify_watchdog(void)
{
	int64_t now;

	if (!N.enabled || N.watchdog_usec == 0)
		return;
	now = tdr_mono_us();
	if (now - N.last_ping_us < (int64_t)N.watchdog_usec / 2)
		return;
	N.last_ping_us = now;
	sd_notify(0, "WATCHDOG=1");
}

void tdr_notify_reloading(void)
{
	struct timespec ts;

	if (!N.enabled)
		return;
	/* MONOTONIC_USEC lets systemctl reload know which reload this is (sd_notify(3)). */
	clock_gettime(CLOCK_MONOTONIC, &ts);
	sd_notifyf(0, "RELOADING=1\nMONOTONIC_USEC=%llu",
		   (unsigned long long)ts.tv_sec * 1000000ULL + (unsigned long long)ts.tv_nsec / 1000ULL);
}

void tdr_notify_stopping(int64_t extend_usec)
{
	if (!N.enabled)
		return;
	if (extend_usec > 0)
		sd_notifyf(0, "STOPPING=1\nEXTEND_TIMEOUT_USEC=%lld", (long long)extend_usec);
	else
		sd_notify(0, "STOPPING=1");
}
