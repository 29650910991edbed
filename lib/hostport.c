/* hostport.c - parsing of "HOST:PORT" listen addresses; the accepted forms are in hostport.h. */

#include "config.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>

#include "lib/hostport.h"

int tdr_hostport_parse(const char *s, tdr_hostport *hp, tdr_err *err)
{
	char host[64];
	const char *colon, *ps;
	size_t hlen;
	char *end;
	long port;

	memset(hp, 0, sizeof(*hp));
	if (s[0] == '[') {
		const char *close = strchr(s, ']');

		if (close == NULL || close[1] != ':')
			return tdr_err_set(err, TDR_ECONFIG, "'%s': expected [IPV6]:PORT", s);
		hlen = (size_t)(close - s - 1);
		if (hlen == 0 || hlen >= sizeof(host))
			return tdr_err_set(err, TDR_ECONFIG, "'%s': bad IPv6 address", s);
		memcpy(host, s + 1, hlen);
		host[hlen] = '\0';
		ps = close + 2;
	} else {
		colon = strrchr(s, ':');
		if (colon == NULL)
			return tdr_err_set(err, TDR_ECONFIG, "'%s': expected HOST:PORT (e.g. 127.0.0.1:9464)", s);
		hlen = (size_t)(colon - s);
		if (hlen >= sizeof(host) || memchr(s, ':', hlen) != NULL)
			return tdr_err_set(err, TDR_ECONFIG, "'%s': write an IPv6 address as [ADDRESS]:PORT", s);
		memcpy(host, s, hlen);
		host[hlen] = '\0';
		ps = colon + 1;
	}
	errno = 0;
	port = strtol(ps, &end, 10);
	if (errno || end == ps || *end != '\0' || port < 1 || port > 65535)
		return tdr_err_set(err, TDR_ECONFIG, "'%s': the port must be a number in [1, 65535]", s);
	hp->port = (unsigned)port;
	if (host[0] == '\0')
		return 0; /* every address */
	if (s[0] == '[') {
		struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)(void *)&hp->addr;

		if (inet_pton(AF_INET6, host, &a6->sin6_addr) != 1)
			return tdr_err_set(err, TDR_ECONFIG, "'%s': '%s' is not a numeric IPv6 address", s, host);
		a6->sin6_family = AF_INET6;
		a6->sin6_port = htons((uint16_t)port);
		hp->addrlen = sizeof(*a6);
	} else {
		struct sockaddr_in *a4 = (struct sockaddr_in *)(void *)&hp->addr;

		if (inet_pton(AF_INET, host, &a4->sin_addr) != 1)
			return tdr_err_set(err, TDR_ECONFIG, "'%s': '%s' is not a numeric IPv4 address (names are not resolved)",
					   s, host);
		a4->sin_family = AF_INET;
		a4->sin_port = htons((uint16_t)port);
		hp->addrlen = sizeof(*a4);
	}
	return 0;
}
