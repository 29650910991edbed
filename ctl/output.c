/*
 * output.c - what tdrainctl prints, and how: producer strings made safe for a
 * terminal and for JSON, times, durations and _ids as text, aligned tables,
 * and the jansson helpers of --json.  status and dlq list share them
 * (ctl.h).
 */
#include "config.h"

#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ctl/ctl.h"
#include "lib/bsonx.h"

/* ------------------------------------------------------------------ text */

/* Length of the valid UTF-8 sequence at s (n bytes available), 0 if invalid (jansson's rules). */
static size_t utf8_seq(const unsigned char *s, size_t n, uint32_t *cp)
{
	uint32_t c;
	size_t len;

	if (s[0] < 0x80) {
		*cp = s[0];
		return 1;
	}
	if (s[0] >= 0xc2 && s[0] <= 0xdf)
		len = 2, c = s[0] & 0x1f;
	else if (s[0] >= 0xe0 && s[0] <= 0xef)
		len = 3, c = s[0] & 0x0f;
	else if (s[0] >= 0xf0 && s[0] <= 0xf4)
		len = 4, c = s[0] & 0x07;
	else
		return 0;
	if (len > n)
		return 0;
	for (size_t i = 1; i < len; i++) {
		if ((s[i] & 0xc0) != 0x80)
			return 0;
		c = (c << 6) | (s[i] & 0x3f);
	}
	if ((len == 3 && c < 0x800) || (len == 4 && (c < 0x10000 || c > 0x10ffff)) || (c >= 0xd800 && c <= 0xdfff))
		return 0;
	*cp = c;
	return len;
}

/*
 * Copy s[0..n) into out as printable, valid UTF-8: invalid bytes and control
 * characters become '?', and a copy that does not fit ends in "...".  Every
 * string tdrainctl shows goes through here: ids, reasons and documents come
 * from producers, and neither a terminal nor jansson (which refuses invalid
 * UTF-8) should see them raw.
 */
void clean_text(const char *s, size_t n, char *out, size_t outlen)
{
	const unsigned char *p = (const unsigned char *)s;
	size_t o = 0, i, need = 0, cap;

	if (outlen == 0)
		return;
	/* Two passes: the clean form's length decides between whole and cut. */
	for (int pass = 0; pass < 2; pass++) {
		if (pass == 1)
			cap = need <= outlen - 1 ? outlen - 1 : (outlen > 4 ? outlen - 4 : 0); /* room for "..." */
		for (i = 0; i < n;) {
			uint32_t cp = 0;
			size_t len = utf8_seq(p + i, n - i, &cp);
			int bad = len == 0 || cp < 0x20 || cp == 0x7f || (cp >= 0x80 && cp < 0xa0);
			size_t adv = len ? len : 1, take = bad ? 1 : len;

			if (pass == 0) {
				need += take;
			} else {
				if (o + take > cap)
					break;
				if (bad)
					out[o] = '?';
				else
					memcpy(out + o, p + i, len);
				o += take;
			}
			i += adv;
		}
	}
	if (i < n && o + 3 < outlen) {
		memcpy(out + o, "...", 3);
		o += 3;
	}
	out[o] = '\0';
}

/* "2026-11-22T10:00:00.123Z" */
void fmt_time(int64_t ms, char *buf, size_t len)
{
	time_t t = (time_t)(ms >= 0 ? ms / 1000 : (ms - 999) / 1000);
	int frac = (int)(ms - (int64_t)t * 1000);
	struct tm tm;

	if (gmtime_r(&t, &tm) == NULL) {
		snprintf(buf, len, "?");
		return;
	}
	snprintf(buf, len, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday,
		 tm.tm_hour, tm.tm_min, tm.tm_sec, frac);
}

/* A duration for people: 850ms, 3.6s, 42s, 5m07s, 2h03m, 3d04h. */
void fmt_dur(int64_t ms, char *buf, size_t len)
{
	int64_t s = ms / 1000;

	if (ms == INT64_MAX)
		snprintf(buf, len, "never");
	else if (ms < 0)
		snprintf(buf, len, "-%s", "");
	else if (ms < 1000)
		snprintf(buf, len, "%" PRId64 "ms", ms);
	else if (ms < 10000)
		snprintf(buf, len, "%.1fs", (double)ms / 1000.0);
	else if (s < 60)
		snprintf(buf, len, "%" PRId64 "s", s);
	else if (s < 3600)
		snprintf(buf, len, "%" PRId64 "m%02" PRId64 "s", s / 60, s % 60);
	else if (s < 86400)
		snprintf(buf, len, "%" PRId64 "h%02" PRId64 "m", s / 3600, (s % 3600) / 60);
	else
		snprintf(buf, len, "%" PRId64 "d%02" PRId64 "h", s / 86400, (s % 86400) / 3600);
}

/* An _id as text: its canonical key (docs/EVENTS.md), or relaxed Extended JSON for other types. */
void id_text(const bson_value_t *v, char *buf, size_t len)
{
	char key[ID_TEXT_MAX];
	bson_t tmp = BSON_INITIALIZER;
	char *json;
	int n = tdr_id_key(v, key, sizeof(key));

	if (n >= 0) {
		clean_text(key, (size_t)n, buf, len);
		return;
	}
	bson_append_value(&tmp, "v", 1, v);
	json = bson_as_relaxed_extended_json(&tmp, NULL);
	bson_destroy(&tmp);
	if (json == NULL) {
		snprintf(buf, len, "?");
		return;
	}
	/* libbson writes { "v" : X }: keep X, i.e. drop the key and exactly one closing brace. */
	{
		const char *s = strchr(json, ':');
		size_t l;

		s = s ? s + 1 : json;
		while (*s == ' ')
			s++;
		l = strlen(s);
		while (l > 0 && s[l - 1] == ' ')
			l--;
		if (l > 0 && s[l - 1] == '}')
			l--;
		while (l > 0 && s[l - 1] == ' ')
			l--;
		clean_text(s, l, buf, len);
	}
	bson_free(json);
}

const char *id_type(const bson_value_t *v)
{
	switch (v->value_type) {
	case BSON_TYPE_OID:
		return "objectId";
	case BSON_TYPE_UTF8:
		return "string";
	case BSON_TYPE_INT32:
		return "int32";
	case BSON_TYPE_INT64:
		return "int64";
	case BSON_TYPE_DOUBLE:
		return "double";
	case BSON_TYPE_DOCUMENT:
		return "document";
	default:
		return "other";
	}
}

/* ------------------------------------------------------------------ tables */

int table_init(struct table *t, size_t ncols, tdr_err *err)
{
	memset(t, 0, sizeof(*t));
	t->ncols = ncols;
	t->cap = 16;
	t->rows = calloc(t->cap, sizeof(*t->rows));
	if (t->rows == NULL)
		return tdr_err_set(err, TDR_ENOMEM, "out of memory");
	return 0;
}

void table_free(struct table *t)
{
	free(t->rows);
	t->rows = NULL;
}

/* Append a row of ncols cells (already clean text). */
int table_add(struct table *t, tdr_err *err, ...)
{
	va_list ap;

	if (t->nrows == t->cap) {
		size_t ncap = t->cap * 2;
		char(*nr)[TCOLS][TCELL] = realloc(t->rows, ncap * sizeof(*nr));

		if (nr == NULL)
			return tdr_err_set(err, TDR_ENOMEM, "out of memory");
		t->rows = nr;
		t->cap = ncap;
	}
	va_start(ap, err);
	for (size_t i = 0; i < t->ncols; i++) {
		const char *s = va_arg(ap, const char *);

		snprintf(t->rows[t->nrows][i], TCELL, "%s", s ? s : "");
	}
	va_end(ap);
	t->nrows++;
	return 0;
}

/* Display width of clean UTF-8 text: one column per character. */
static size_t text_width(const char *s)
{
	size_t w = 0;

	for (; *s; s++)
		w += ((unsigned char)*s & 0xc0) != 0x80;
	return w;
}

void table_print(const struct table *t, FILE *out, const char *indent)
{
	size_t w[TCOLS] = { 0 };

	for (size_t r = 0; r < t->nrows; r++)
		for (size_t c = 0; c < t->ncols; c++)
			if (text_width(t->rows[r][c]) > w[c])
				w[c] = text_width(t->rows[r][c]);
	for (size_t r = 0; r < t->nrows; r++) {
		fputs(indent, out);
		for (size_t c = 0; c < t->ncols; c++) {
			const char *s = t->rows[r][c];

			if (c + 1 == t->ncols) {
				fputs(s, out);
				break;
			}
			fprintf(out, "%s%*s  ", s, (int)(w[c] - text_width(s)), "");
		}
		fputc('\n', out);
	}
}

/* ------------------------------------------------------------------ JSON */

/* Set o[k] = v, stealing v; remember a failure (NULL v is jansson's out-of-memory) in *oom. */
void jput(json_t *o, const char *k, json_t *v, int *oom)
{
	if (v == NULL || json_object_set_new(o, k, v) != 0)
		*oom = 1;
}

void jappend(json_t *a, json_t *v, int *oom)
{
	if (v == NULL || json_array_append_new(a, v) != 0)
		*oom = 1;
}

/* A string that is known to be clean UTF-8 (clean_text output or our own literals). */
json_t *jstr(const char *s)
{
	return s ? json_string(s) : json_null();
}

json_t *jint_or_null(int64_t v, int present)
{
	return present ? json_integer((json_int_t)v) : json_null();
}

json_t *jtime(int64_t ms, int present)
{
	char buf[40];

	if (!present)
		return json_null();
	fmt_time(ms, buf, sizeof(buf));
	return json_string(buf);
}

int json_emit(json_t *root, int oom, tdr_err *err)
{
	if (oom)
		return tdr_err_set(err, TDR_ENOMEM, "out of memory building JSON");
	if (json_dumpf(root, stdout, JSON_INDENT(2) | JSON_PRESERVE_ORDER) != 0 || fputc('\n', stdout) == EOF ||
	    fflush(stdout) != 0)
		return tdr_err_set(err, TDR_EFAIL, "writing JSON to standard output failed");
	return 0;
}
