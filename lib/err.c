#include "config.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "lib/err.h"

int tdr_err_set(tdr_err *err, int code, const char *fmt, ...)
{
	va_list ap;

	if (err == NULL)
		return code;
	err->code = code;
	va_start(ap, fmt);
	vsnprintf(err->msg, sizeof(err->msg), fmt, ap);
	va_end(ap);
	return code;
}

int tdr_err_wrap(tdr_err *err, const char *fmt, ...)
{
	char prefix[TDR_ERR_MAX], old[TDR_ERR_MAX];
	va_list ap;

	if (err == NULL)
		return TDR_EFAIL;
	va_start(ap, fmt);
	vsnprintf(prefix, sizeof(prefix), fmt, ap);
	va_end(ap);
	memcpy(old, err->msg, sizeof(old));
	snprintf(err->msg, sizeof(err->msg), "%s: %s", prefix, old);
	return err->code ? err->code : TDR_EFAIL;
}
