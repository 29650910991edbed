#include "config.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "worker/metrics.h"

static void gauge(FILE *f, const char *name, const char *help, const char *labels, double v)
{
	fprintf(f, "# HELP %s %s\n# TYPE %s gauge\n%s{%s} %.17g\n", name, help, name, name, labels, v);
}

static void counter(FILE *f, const char *name, const char *help, const char *labels, int64_t v)
{
	fprintf(f, "# HELP %s %s\n# TYPE %s counter\n%s{%s} %lld\n", name, help, name, name, labels, (long long)v);
}

static void histogram(FILE *f, const char *name, const char *help, const char *labels, const struct tdr_hist *h)
{
	uint64_t cum = 0;

	fprintf(f, "# HELP %s %s\n# TYPE %s histogram\n", name, help, name);
	for (int i = 0; i < TDR_HIST_BUCKETS; i++) {
		cum += h->bucket[i];
		if (i < TDR_HIST_BUCKETS - 1)
			fprintf(f, "%s_bucket{%s,le=\"%g\"} %llu\n", name, labels, tdr_hist_bounds[i],
				(unsigned long long)cum);
		else
			fprintf(f, "%s_bucket{%s,le=\"+Inf\"} %llu\n", name, labels, (unsigned long long)cum);
	}
	fprintf(f, "%s_sum{%s} %.9g\n%s_count{%s} %llu\n", name, labels, h->sum_s, name, labels,
		(unsigned long long)h->count);
}

/*
 * Render into memory, once per refresh: the same bytes go to metrics.file and
 * to the HTTP endpoint's snapshot, and neither a disk nor a client is ever
 * waited for while the text is produced.
 */
int tdr_metrics_render(const struct tdr_metrics *m, char **out, size_t *len, tdr_err *err)
{
	char labels[200];
	char *buf = NULL;
	size_t n = 0;
	FILE *f;

	*out = NULL;
	*len = 0;
	snprintf(labels, sizeof(labels), "replica=\"%s\"", m->replica ? m->replica : "");
	f = open_memstream(&buf, &n);
	if (f == NULL)
		return tdr_err_set(err, TDR_ENOMEM, "metrics: open_memstream: %s", strerror(errno));
	if (m->backlog >= 0)
		gauge(f, "tdrain_backlog_events", "Events in the FIFO, pending or in flight (an exact count).", labels, (double)m->backlog);
	if (m->backlog >= 0)
		gauge(f, "tdrain_backlog_capped",
		      "1 if the backlog count stopped at metrics.count_limit (tdrain_backlog_events is a lower bound).",
		      labels, m->backlog_capped);
	gauge(f, "tdrain_indexes_pending", "1 while an index build this replica asked for is pending (it drains meanwhile).",
	      labels, m->indexes_pending);
	if (m->oldest_age_ms >= 0)
		gauge(f, "tdrain_oldest_pending_age_seconds", "Age (created_at) of the oldest event in the FIFO.", labels,
		      (double)m->oldest_age_ms / 1000.0);
	if (m->deadletter >= 0)
		gauge(f, "tdrain_deadletter_events", "Documents in the dead-letter collection.", labels,
		      (double)m->deadletter);
	if (m->pending_deltas >= 0)
		gauge(f, "tdrain_fold_pending_deltas", "Committed batch deltas not yet folded.", labels,
		      (double)m->pending_deltas);
	gauge(f, "tdrain_is_leader", "1 if this replica holds the leader lease.", labels, m->is_leader);
	gauge(f, "tdrain_partitions_owned", "Partitions (or the single-mode scope) this replica holds.", labels,
	      (double)m->partitions_owned);
	gauge(f, "tdrain_members", "Live replicas seen by this one.", labels, (double)m->members);
	if (strcmp(m->mode, "partitioned") == 0) {
		gauge(f, "tdrain_partition_share_max", "Most partitions any live member owns, as this replica sees it.",
		      labels, (double)m->share_max);
		gauge(f, "tdrain_partition_share_min", "Fewest partitions any live member owns, as this replica sees it.",
		      labels, (double)m->share_min);
		gauge(f, "tdrain_partition_imbalance",
		      "share_max - share_min: 0 or 1 once a stable membership has converged; more while partitions move.",
		      labels, (double)(m->share_max - m->share_min));
	}
	counter(f, "tdrain_coord_requests_total",
		"Coordination requests made (lease statements, or etcd calls): a constant number per retry period.",
		labels, m->coord_requests);
	counter(f, "tdrain_failovers_total", "Leases this replica took over from another holder.", labels, m->failovers);
	counter(f, "tdrain_batches_total", "Batches acknowledged.", labels, m->drain.batches);
	counter(f, "tdrain_events_claimed_total", "Events claimed (re-claims included).", labels, m->drain.claimed);
	counter(f, "tdrain_events_processed_total", "Events whose batch was acknowledged.", labels, m->drain.acked);
	counter(f, "tdrain_events_deadlettered_total", "Events sent to dead letter.", labels, m->drain.deadlettered);
	counter(f, "tdrain_events_orphaned_total", "Events recovered from a previous holder's claims.", labels,
		m->drain.orphans);
	counter(f, "tdrain_batches_fenced_total", "Batches abandoned because the lease ended.", labels, m->drain.fenced);
	counter(f, "tdrain_store_errors_total",
		"Failed store operations of the drain (claims, abandoned batches, FIFO deletes), all retried.", labels,
		m->drain.store_errors);
	gauge(f, "tdrain_batch_size", "Events in the last batch.", labels, (double)m->drain.last_batch);
	gauge(f, "tdrain_events_per_second", "Acknowledged events per second (smoothed).", labels, m->drain.rate);
	histogram(f, "tdrain_claim_seconds", "Time to read a batch.", labels, &m->drain.h_claim);
	histogram(f, "tdrain_consume_seconds",
		  "Time to record the claim, validate and archive a batch (the delta commit is in tdrain_ack_seconds).", labels,
		  &m->drain.h_consume);
	histogram(f, "tdrain_ack_seconds", "Time to acknowledge a batch.", labels, &m->drain.h_ack);
	gauge(f, "tdrain_fold_active", "1 while this replica folds (leader).", labels, m->fold.active);
	gauge(f, "tdrain_fold_lag_seconds", "Age of the oldest delta at the last fold round.", labels,
	      (double)m->fold.lag_ms / 1000.0);
	counter(f, "tdrain_fold_rounds_total", "Fold rounds completed.", labels, m->fold.rounds);
	counter(f, "tdrain_fold_redo_total", "Fold rounds redone after a leader died mid-round.", labels,
		m->fold.redo_rounds);
	counter(f, "tdrain_fold_events_total", "New events folded into derived state.", labels, m->fold.events);
	counter(f, "tdrain_fold_duplicates_total", "Events skipped as duplicates (same insert_id).", labels,
		m->fold.duplicates);
	counter(f, "tdrain_triaged_total", "Events given a partition by the leader.", labels, m->fold.triaged);
	gauge(f, "tdrain_fold_cache_bytes", "Derived documents the leader keeps in memory (fold.cache_mb).", labels,
	      (double)m->fold.cache_bytes);
	counter(f, "tdrain_fold_cache_loads_total", "Times the fold's copy started over from the store.", labels,
		m->fold.cache_loads);
	counter(f, "tdrain_fold_cache_misses_total", "Derived keys the fold had to read from the store.", labels,
		m->fold.cache_misses);
	fprintf(f, "# HELP tdrain_fold_phase_seconds_total Time committed fold rounds spent in each phase.\n"
		   "# TYPE tdrain_fold_phase_seconds_total counter\n");
	for (int p = 0; p < TDR_FOLD_NPHASES; p++)
		fprintf(f, "tdrain_fold_phase_seconds_total{%s,phase=\"%s\"} %.6f\n", labels, tdr_fold_phase_names[p],
			(double)m->fold.phase_us[p] / 1e6);
	counter(f, "tdrain_fold_images_total", "Derived documents written by committed fold rounds.", labels,
		m->fold.images);
	if (m->has_archive) {
		gauge(f, "tdrain_archive_backlog_bytes", "Archive bytes not yet delivered to the HTTP sink.", labels,
		      (double)m->archive.backlog_bytes);
		counter(f, "tdrain_archive_lines_total", "Archive lines written.", labels, m->archive.lines_written);
		counter(f, "tdrain_archive_send_failures_total", "Failed HTTP sink deliveries (retried).", labels,
			m->archive.send_failures);
	}
	/* A memstream fails only for memory; fclose sets buf and n for the last time. */
	if (ferror(f)) {
		fclose(f);
		free(buf);
		return tdr_err_set(err, TDR_ENOMEM, "metrics: out of memory while rendering");
	}
	if (fclose(f) != 0 || buf == NULL) {
		free(buf);
		return tdr_err_set(err, TDR_ENOMEM, "metrics: out of memory while rendering");
	}
	*out = buf;
	*len = n;
	return 0;
}

int tdr_metrics_write_file(const char *path, const char *buf, size_t len, tdr_err *err)
{
	char tmp[600];
	FILE *f;
	int rc = 0;

	if ((size_t)snprintf(tmp, sizeof(tmp), "%s.tmp", path) >= sizeof(tmp))
		return tdr_err_set(err, TDR_EFAIL, "metrics %s: path too long", path);
	f = fopen(tmp, "we");
	if (f == NULL)
		return tdr_err_set(err, TDR_EFAIL, "metrics %s: %s", tmp, strerror(errno));
	if (len > 0 && fwrite(buf, 1, len, f) != len)
		rc = tdr_err_set(err, TDR_EFAIL, "metrics %s: %s", tmp, strerror(errno));
	if (rc == 0 && (fflush(f) != 0 || ferror(f)))
		rc = tdr_err_set(err, TDR_EFAIL, "metrics %s: %s", tmp, strerror(errno));
	if (fclose(f) != 0 && rc == 0)
		rc = tdr_err_set(err, TDR_EFAIL, "metrics %s: %s", tmp, strerror(errno));
	if (rc == 0 && rename(tmp, path) != 0)
		rc = tdr_err_set(err, TDR_EFAIL, "metrics %s: %s", path, strerror(errno));
	if (rc < 0)
		unlink(tmp);
	return rc;
}

int tdr_metrics_write(const char *path, const struct tdr_metrics *m, tdr_err *err)
{
	char *buf;
	size_t len;
	int rc;

	if (tdr_metrics_render(m, &buf, &len, err) < 0)
		return TDR_ENOMEM;
	rc = tdr_metrics_write_file(path, buf, len, err);
	free(buf);
	return rc;
}
