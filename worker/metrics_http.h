/*
 * metrics_http.h - the HTTP endpoint of metrics.listen: GET /metrics in the
 * Prometheus text exposition format, served by libmicrohttpd.
 *
 * Why it cannot stall the drain or grow without bound (docs/OPERATIONS.md,
 * tdrain.conf(5)):
 *   - the drain loop never talks to a client: it renders the text (as it
 *     does for metrics.file) and hands the buffer over with
 *     tdr_metrics_http_publish(), which only swaps a pointer under a mutex;
 *   - libmicrohttpd answers from its own thread, with non-blocking sockets,
 *     copying the current snapshot under that mutex (a memcpy of a few KiB);
 *   - at most TDR_METRICS_HTTP_MAX_CONN connections (TDR_METRICS_HTTP_MAX_PER_IP
 *     from one address), each closed after TDR_METRICS_HTTP_TIMEOUT_S idle
 *     seconds and given TDR_METRICS_HTTP_CONN_MEM bytes for its request (a
 *     longer request line or header block is refused), so the endpoint's
 *     memory is at most MAX_CONN x (CONN_MEM + one snapshot);
 *   - only GET and HEAD of /metrics are served; request bodies are refused.
 */
#ifndef TDRAIN_METRICS_HTTP_H
#define TDRAIN_METRICS_HTTP_H

#include <stddef.h>

#include "lib/err.h"

#define TDR_METRICS_HTTP_MAX_CONN 16
#define TDR_METRICS_HTTP_MAX_PER_IP 8
#define TDR_METRICS_HTTP_TIMEOUT_S 10
#define TDR_METRICS_HTTP_CONN_MEM (32 * 1024)

typedef struct tdr_metrics_http tdr_metrics_http;

/*
 * Listen on listen ("HOST:PORT", lib/hostport.h) and serve from a thread of
 * its own.  Until the first publish, /metrics answers 503.  TDR_ECONFIG for a
 * bad address, TDR_ETRANSIENT when it cannot bind (e.g. the port is taken).
 */
int tdr_metrics_http_start(tdr_metrics_http **out, const char *listen, tdr_err *err);

/* Replace the served text by buf[0..len), taking ownership of buf (malloc'd). */
void tdr_metrics_http_publish(tdr_metrics_http *h, char *buf, size_t len);

/* Requests answered so far (for tests and diagnostics). */
unsigned long long tdr_metrics_http_requests(tdr_metrics_http *h);

/* Stop serving, close every connection, free everything; h may be NULL. */
void tdr_metrics_http_stop(tdr_metrics_http *h);

#endif
