/* metrics_http.c - the metrics.listen endpoint over libmicrohttpd; its bounds are argued in metrics_http.h. */

#include "config.h"

#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <microhttpd.h>

#include "lib/clock.h"
#include "lib/hostport.h"
#include "lib/log.h"
#include "worker/metrics_http.h"

/* The version of the text exposition format (Prometheus asks for it by name). */
#define CONTENT_TYPE "text/plain; version=0.0.4; charset=utf-8"

struct tdr_metrics_http {
	struct MHD_Daemon *d;
	pthread_mutex_t mu; /* guards snap and snap_len, held only to swap or copy them */
	char *snap;         /* NULL until the first publish */
	size_t snap_len;
	atomic_ullong requests;
	char listen[80];
};

/*
 * libmicrohttpd reports refused connections (limit reached, request too
 * large) through this hook: a hostile client could otherwise fill the journal
 * with them, so at most one line a minute, with the count of those skipped.
 */
static void mhd_log(void *cls, const char *fmt, va_list ap)
{
	static atomic_llong last_ms = -60000;
	static atomic_ullong skipped;
	char msg[256];
	size_t n;
	int64_t now = tdr_mono_ms(), prev = atomic_load(&last_ms);

	(void)cls;
	if (now - prev < 60000 || !atomic_compare_exchange_strong(&last_ms, &prev, now)) {
		atomic_fetch_add(&skipped, 1);
		return;
	}
	vsnprintf(msg, sizeof(msg), fmt, ap);
	n = strlen(msg);
	while (n > 0 && (msg[n - 1] == '\n' || msg[n - 1] == '\r'))
		msg[--n] = '\0';
	log_warn("metrics.listen: %s (%llu more since the last such line, not shown)", msg,
		 (unsigned long long)atomic_exchange(&skipped, 0));
}

static enum MHD_Result reply_text(struct MHD_Connection *c, unsigned status, const char *text)
{
	struct MHD_Response *r = MHD_create_response_from_buffer(strlen(text), (void *)text, MHD_RESPMEM_PERSISTENT);
	enum MHD_Result rc;

	if (r == NULL)
		return MHD_NO; /* no memory: MHD closes the connection */
	(void)MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, "text/plain; charset=utf-8");
	if (status == MHD_HTTP_METHOD_NOT_ALLOWED)
		(void)MHD_add_response_header(r, MHD_HTTP_HEADER_ALLOW, "GET, HEAD");
	rc = MHD_queue_response(c, status, r);
	MHD_destroy_response(r);
	return rc;
}

static enum MHD_Result handle(void *cls, struct MHD_Connection *c, const char *url, const char *method,
			      const char *version, const char *upload_data, size_t *upload_data_size, void **con_cls)
{
	tdr_metrics_http *h = cls;
	struct MHD_Response *r;
	enum MHD_Result rc;
	int is_get = strcmp(method, MHD_HTTP_METHOD_GET) == 0, is_head = strcmp(method, MHD_HTTP_METHOD_HEAD) == 0;

	(void)version;
	(void)upload_data;
	(void)upload_data_size;
	(void)con_cls;
	/*
	 * Every request is answered on the first call, when only its headers
	 * have been read: a body is never buffered (MHD discards it, or closes).
	 */
	atomic_fetch_add(&h->requests, 1);
	if (!is_get && !is_head)
		return reply_text(c, MHD_HTTP_METHOD_NOT_ALLOWED, "only GET and HEAD\n");
	if (strcmp(url, "/metrics") != 0) {
		if (strcmp(url, "/") == 0)
			return reply_text(c, MHD_HTTP_OK, "tdrain: metrics at /metrics\n");
		return reply_text(c, MHD_HTTP_NOT_FOUND, "not found: metrics at /metrics\n");
	}
	pthread_mutex_lock(&h->mu);
	if (h->snap == NULL) {
		pthread_mutex_unlock(&h->mu);
		return reply_text(c, MHD_HTTP_SERVICE_UNAVAILABLE, "no metrics yet: the replica is starting\n");
	}
	/* MUST_COPY: the response owns its bytes, so a publish may free the snapshot at any time. */
	r = MHD_create_response_from_buffer(h->snap_len, h->snap, MHD_RESPMEM_MUST_COPY);
	pthread_mutex_unlock(&h->mu);
	if (r == NULL)
		return MHD_NO;
	(void)MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, CONTENT_TYPE);
	(void)MHD_add_response_header(r, MHD_HTTP_HEADER_CACHE_CONTROL, "no-store");
	rc = MHD_queue_response(c, MHD_HTTP_OK, r);
	MHD_destroy_response(r);
	return rc;
}

int tdr_metrics_http_start(tdr_metrics_http **out, const char *listen, tdr_err *err)
{
	tdr_metrics_http *h;
	tdr_hostport hp;
	unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_AUTO | MHD_USE_ERROR_LOG;

	*out = NULL;
	if (tdr_hostport_parse(listen, &hp, err) < 0)
		return tdr_err_wrap(err, "metrics.listen");
	h = calloc(1, sizeof(*h));
	if (h == NULL)
		return tdr_err_set(err, TDR_ENOMEM, "metrics.listen: out of memory");
	if (pthread_mutex_init(&h->mu, NULL) != 0) {
		free(h);
		return tdr_err_set(err, TDR_ENOMEM, "metrics.listen: cannot create a mutex");
	}
	snprintf(h->listen, sizeof(h->listen), "%s", listen);
	if (hp.addrlen == 0)
		flags |= MHD_USE_DUAL_STACK; /* empty HOST: every IPv4 and IPv6 address */
	else if (hp.addr.ss_family == AF_INET6)
		flags |= MHD_USE_IPv6;
	errno = 0;
	/* The logger first, so that start-up messages go through it too. */
	h->d = MHD_start_daemon(flags, (uint16_t)hp.port, NULL, NULL, handle, h,
				MHD_OPTION_EXTERNAL_LOGGER, mhd_log, NULL,
				MHD_OPTION_CONNECTION_LIMIT, (unsigned)TDR_METRICS_HTTP_MAX_CONN,
				MHD_OPTION_PER_IP_CONNECTION_LIMIT, (unsigned)TDR_METRICS_HTTP_MAX_PER_IP,
				MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)TDR_METRICS_HTTP_TIMEOUT_S,
				MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t)TDR_METRICS_HTTP_CONN_MEM,
				MHD_OPTION_LISTEN_BACKLOG_SIZE, (unsigned)TDR_METRICS_HTTP_MAX_CONN,
				/* Last: with an empty HOST this is the end, and the address is ignored. */
				hp.addrlen ? MHD_OPTION_SOCK_ADDR : MHD_OPTION_END, (struct sockaddr *)&hp.addr,
				MHD_OPTION_END);
	if (h->d == NULL) {
		int e = errno;

		pthread_mutex_destroy(&h->mu);
		free(h);
		return tdr_err_set(err, TDR_ETRANSIENT, "metrics.listen: cannot listen on %s%s%s", listen,
				   e ? ": " : "", e ? strerror(e) : "");
	}
	*out = h;
	return 0;
}

void tdr_metrics_http_publish(tdr_metrics_http *h, char *buf, size_t len)
{
	char *old;

	pthread_mutex_lock(&h->mu);
	old = h->snap;
	h->snap = buf;
	h->snap_len = len;
	pthread_mutex_unlock(&h->mu);
	free(old); /* outside the lock: the MHD thread never waits for free() */
}

unsigned long long tdr_metrics_http_requests(tdr_metrics_http *h)
{
	return atomic_load(&h->requests);
}

void tdr_metrics_http_stop(tdr_metrics_http *h)
{
	if (h == NULL)
		return;
	MHD_stop_daemon(h->d);
	pthread_mutex_destroy(&h->mu);
	free(h->snap);
	free(h);
}
