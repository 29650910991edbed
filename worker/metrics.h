/*
 * metrics.h - Prometheus text exposition, written atomically to
 * metrics.file (node_exporter's textfile collector reads it).  Every metric
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

/* Write to path via "path.tmp" + rename. */
int tdr_metrics_write(const char *path, const struct tdr_metrics *m, tdr_err *err);

#endif
