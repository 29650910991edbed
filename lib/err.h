/*
 * err.h - the error out-parameter every fallible function fills.
 *
 * Convention (see docs/DESIGN.md "Code conventions"): a function returns 0 on
 * success and -1 (or a negative TDR_E* code) on failure, and on failure writes
 * one human sentence into *err when err is not NULL.  Library-like code never
 * logs the error it returns; the caller that decides what to do logs it once.
 */
#ifndef TDRAIN_ERR_H
#define TDRAIN_ERR_H

#include <stddef.h>

#define TDR_ERR_MAX 512

/* Failure classes: callers branch on these, never on message text. */
enum tdr_errcode {
	TDR_OK = 0,
	TDR_EFAIL = -1,      /* generic / permanent */
	TDR_ETRANSIENT = -2, /* store or network unavailable: retry later */
	TDR_EFENCED = -3,    /* our lease or epoch is no longer current */
	TDR_EDUP = -4,       /* unique key already present */
	TDR_ECONFIG = -5,    /* bad configuration */
	TDR_ENOMEM = -6,
};

typedef struct tdr_err {
	int code;
	char msg[TDR_ERR_MAX];
} tdr_err;

/* Fill err (if not NULL) and return code.  printf-style. */
int tdr_err_set(tdr_err *err, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Prefix an existing message: "ctx: old message". Returns err->code (or code if err NULL). */
int tdr_err_wrap(tdr_err *err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static inline void tdr_err_clear(tdr_err *err)
{
	if (err) {
		err->code = 0;
		err->msg[0] = '\0';
	}
}

#endif
