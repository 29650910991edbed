/*
 * tap.h - minimal Test Anything Protocol output for unit tests.
 * Usage: ok(cond, "what"); ... return tap_done();
 */
#ifndef TDRAIN_TAP_H
#define TDRAIN_TAP_H

#include <stdio.h>

static int tap_n, tap_failed;

#define ok(cond, ...)                                                                        \
	do {                                                                                 \
		int ok_c_ = (cond) ? 1 : 0;                                                  \
		tap_n++;                                                                     \
		if (!ok_c_)                                                                  \
			tap_failed++;                                                        \
		printf("%s %d - ", ok_c_ ? "ok" : "not ok", tap_n);                          \
		printf(__VA_ARGS__);                                                         \
		printf("\n");                                                                \
		if (!ok_c_)                                                                  \
			printf("#   failed at %s:%d\n", __FILE__, __LINE__);                     \
	} while (0)

#define diag(...)                                                                            \
	do {                                                                                 \
		printf("# ");                                                                \
		printf(__VA_ARGS__);                                                         \
		printf("\n");                                                                \
	} while (0)

static inline int tap_done(void)
{
	printf("1..%d\n", tap_n);
	return tap_failed ? 1 : 0;
}

#endif
