/*
 * metrics.h - Prometheus text exposition, written atomically to
 * metrics.file (node_exporter's textfile collector reads it) and served by
 * the HTTP endpoint of metrics.listen (worker/metrics_http.h).  Every metric
 * and the alert thresholds worth setting on it: docs/OPERATIONS.md.
 */
#ifndef TDRAIN_METRICS_H
#define TDRAIN_METRICS_H

#include <stdint.h>

#include "consumers/archive.h"
#include "consumers/fold.h"
#include "lib/err.h"
#include "worker/drain.h"

struct tdr_metrics {
	const char *replica;
	const char *mode;
	int64_t backlog;            /* events in the FIFO; -1 unknown */
	int backlog_capped;         /* backlog reached metrics.count_limit: it is a lower bound */
	int indexes_pending;        /* an index build is still pending (indexer.h) */
	int64_t oldest_age_ms;      /* created_at age of the FIFO head; -1 unknown */
	int64_t deadletter;         /* documents in tdrain_deadletter; -1 unknown */
	int64_t pending_deltas;     /* committed deltas not yet folded; -1 unknown */
	int is_leader;
	int64_t partitions_owned;
	int64_t members;
	int64_t failovers;
	int64_t share_min, share_max; /* partitions per live member (partitioned); imbalance = max - min */
	int64_t coord_requests;       /* coordination requests so far */
	struct tdr_drain_stats drain;
	struct tdr_fold_stats fold;
	struct tdr_archive_stats archive;
	int has_archive;
};

/* The exposition text of m in a malloc'd buffer (*out, *len), for the caller to free. */
int tdr_metrics_render(const struct tdr_metrics *m, char **out, size_t *len, tdr_err *err);
/* Write buf to path via "path.tmp" + rename, so a reader never sees half a file. */
int tdr_metrics_write_file(const char *path, const char *buf, size_t len, tdr_err *err);
/* Render m and write it to path (tdr_metrics_render + tdr_metrics_write_file). */
int tdr_metrics_write(const char *path, const struct tdr_metrics *m, tdr_err *err);

#endif
