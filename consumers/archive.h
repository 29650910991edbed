/*
 * archive.h - the archive consumer: every valid event as one NDJSON line.
 *
 * Runs on the partition holder, inside the batch cycle, BEFORE the batch is
 * acknowledged: tdr_archive_append() returns 0 only once the lines are durable
 * on disk (written and fdatasync'ed).  Files rotate by size (archive.max_bytes)
 * and age (archive.max_age_s); a closed file is "<dir>/<replica>-<start-ms>-<seq>.ndjson".
 *
 * With archive.http_url set, a sender thread POSTs closed files, oldest first,
 * as application/x-ndjson (ClickHouse JSONEachRow-compatible lines), retrying
 * 5xx, timeouts and connection failures with capped exponential backoff; a file
 * is removed only after a 2xx.  So the files are the spool: nothing is lost
 * while the endpoint is down, and its backlog is the unsent bytes on disk.
 * When that backlog passes archive.max_backlog_bytes, append() refuses with
 * TDR_ETRANSIENT and the drain stops acknowledging: the FIFO holds the rest
 * (backpressure instead of unbounded growth, seed 003).
 *
 * Line format (pinned by tests/unit/test_formats.c), one JSON object per line:
 *   {"_id": "<canonical id>", "_id_type": "oid"|"string"|"int",
 *    "insert_id": "...", "event": "...", "distinct_id": "...",
 *    "username": "..." | null, "created_at": "YYYY-MM-DD hh:mm:ss.mmm" (UTC),
 *    "created_at_ms": <int>, "properties": {... relaxed extended JSON ...},
 *    "doc": "<the original document as canonical extended JSON>"}
 * "doc" makes replay lossless; the flat fields are what a ClickHouse table reads.
 */
#ifndef TDRAIN_ARCHIVE_H
#define TDRAIN_ARCHIVE_H

#include <bson/bson.h>
#include <stddef.h>
#include <stdint.h>

#include "lib/conf.h"
#include "lib/err.h"

typedef struct tdr_archive tdr_archive;

struct tdr_archive_stats {
	int64_t lines_written;
	int64_t files_closed;
	int64_t files_sent;
	int64_t send_failures;
	int64_t backlog_bytes; /* closed + open file bytes not yet sent (or not sent-able when no URL: 0) */
};

/* *ret = NULL and 0 when archive.dir is empty (archive off). */
int tdr_archive_open(tdr_archive **ret, const tdr_config *cfg, tdr_err *err);

/* Append docs (already validated events) durably; see above for TDR_ETRANSIENT. */
int tdr_archive_append(tdr_archive *a, const bson_t *const *docs, size_t n, tdr_err *err);

/* Rotate if the open file is older than archive.max_age_s (call from the idle loop). */
void tdr_archive_tick(tdr_archive *a);

void tdr_archive_stats_get(tdr_archive *a, struct tdr_archive_stats *out);

/* Close the open file, stop the sender thread (waits at most the HTTP timeout). NULL-safe. */
void tdr_archive_close(tdr_archive *a);

/* One line for doc (no trailing newline); caller frees *ret. */
int tdr_archive_line(const bson_t *doc, char **ret, size_t *ret_len, tdr_err *err);

/* Parse a line back into the original document (for replay). */
int tdr_archive_parse_line(const char *line, size_t len, bson_t *ret_doc, int64_t *ret_created_ms, tdr_err *err);

#endif
