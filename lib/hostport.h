/*
 * hostport.h - "HOST:PORT" listen addresses (metrics.listen).
 *
 * HOST is a numeric IPv4 address, a numeric IPv6 address in brackets, or
 * empty (every address, IPv4 and IPv6).  Names are refused: a listen address
 * that depends on a resolver at start-up would bind somewhere different
 * from one restart to the next.  PORT is 1..65535.
 */
#ifndef TDRAIN_HOSTPORT_H
#define TDRAIN_HOSTPORT_H

#include <sys/socket.h>

#include "lib/err.h"

typedef struct tdr_hostport {
	struct sockaddr_storage addr; /* family AF_UNSPEC when HOST is empty */
	socklen_t addrlen;            /* 0 when HOST is empty */
	unsigned port;
} tdr_hostport;

/* Parse s into *hp; TDR_ECONFIG with a sentence naming s on failure. */
int tdr_hostport_parse(const char *s, tdr_hostport *hp, tdr_err *err);

#endif
