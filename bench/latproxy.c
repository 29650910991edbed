/*
 * latproxy.c - tdrain-latproxy: a TCP proxy that adds a fixed one-way delay
 * in each direction, for `make bench` rows at a store round trip of 1 ms.
 *
 *   tdrain-latproxy --target HOST:PORT [--listen HOST:PORT] [--delay-us US] [--stats FILE]
 *
 * The kernel here has no netem (tc qdisc ... netem), so the delay is added in
 * user space: every chunk read from one side is written to the other side
 * --delay-us microseconds after it was read (0: at once), in the order it was
 * read.  A round trip through the proxy therefore costs 2 x --delay-us more
 * than a direct one, plus the proxy's own cost, which `make bench` measures
 * with the raw reference through it at --delay-us 0.
 *
 * It prints "port=N" on stdout once it listens (--listen 127.0.0.1:0 by
 * default, so the kernel picks the port).  On SIGTERM or SIGINT it writes one
 * line of counters to --stats (or stderr) and exits: connections, bytes each
 * way, and MongoDB wire messages each way (each message starts with its int32
 * length, so the proxy can count them without parsing the rest): the
 * statements a run sent, monitoring and handshakes included.
 *
 * One thread, epoll, a timerfd for sub-millisecond deadlines (epoll_wait's
 * own timeout has 1 ms granularity, as much as the delay itself).
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define PROG "tdrain-latproxy"
#define CHUNK_MAX 65536
/* Stop reading a side while this much is queued towards its peer: the proxy's memory stays bounded. */
#define QUEUE_MAX (32u << 20)
#define MAX_EVENTS 64

static volatile sig_atomic_t stop_flag;

static void on_signal(int sig)
{
	(void)sig;
	stop_flag = 1;
}

struct chunk {
	struct chunk *next;
	int64_t due_ns;
	size_t len, off;
	char data[];
};

/* Bytes queued for one socket, oldest first; due times never decrease (constant delay). */
struct queue {
	struct chunk *head, *tail;
	size_t bytes;
};

/* Counts wire messages in one direction's byte stream: each starts with its int32 little-endian length. */
struct msgcount {
	uint64_t msgs;
	int64_t left;		/* bytes of the current message still to come */
	unsigned char hdr[4];
	unsigned nhdr;
};

struct conn;

struct side {
	struct conn *c;
	int fd;
	uint32_t mask;	 /* epoll interest now registered */
	int eof;	 /* read returned 0 or failed: nothing more comes from here */
	struct queue out; /* to be written to fd */
	struct msgcount mc; /* messages read from fd */
};

struct conn {
	struct conn *next, *prev;
	struct side s[2]; /* 0: the client, 1: the target */
	int dead;
};

static struct conn *conns;
static int epfd = -1, tfd = -1;
static int64_t delay_ns;
/*
 * How late, on average, a delayed chunk has been written after its due time
 * (an exponential average, 1/8 per chunk): waking up from the timer takes
 * 0.1-0.3 ms on this loaded 2-vCPU VM, which would add up to 60% to a 0.5 ms
 * delay.  New chunks are scheduled that much earlier, so the delay a chunk
 * really sees averages --delay-us (ping through the proxy, bench.sh prints it).
 */
static int64_t late_ns;
static uint64_t n_conns, bytes_up, bytes_down, msgs_up, msgs_down;

static int64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void msgcount_feed(struct msgcount *m, const unsigned char *p, size_t n)
{
	while (n > 0) {
		if (m->left > 0) {
			size_t take = (size_t)m->left < n ? (size_t)m->left : n;

			m->left -= (int64_t)take;
			p += take;
			n -= take;
			continue;
		}
		m->hdr[m->nhdr++] = *p++;
		n--;
		if (m->nhdr == 4) {
			int64_t len = (int64_t)((uint32_t)m->hdr[0] | (uint32_t)m->hdr[1] << 8 |
						(uint32_t)m->hdr[2] << 16 | (uint32_t)m->hdr[3] << 24);

			m->msgs++;
			m->nhdr = 0;
			/* A length below the header's own size is not the wire protocol: count bytes only from here. */
			m->left = len >= 4 ? len - 4 : INT64_MAX;
		}
	}
}

static int set_nonblock_nodelay(int fd)
{
	int one = 1, fl = fcntl(fd, F_GETFL);

	if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0)
		return -1;
	/* Small request and reply messages: Nagle would add its own delay to ours. */
	return setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

static int split_hostport(const char *s, char *host, size_t hlen, char *port, size_t plen)
{
	const char *colon = strrchr(s, ':');

	if (colon == NULL || (size_t)(colon - s) >= hlen || strlen(colon + 1) >= plen || colon[1] == '\0')
		return -1;
	memcpy(host, s, (size_t)(colon - s));
	host[colon - s] = '\0';
	strcpy(port, colon + 1);
	return 0;
}

/* A socket listening on, or connected to, HOST:PORT; -1 with a message on stderr on failure. */
static int open_socket(const char *hostport, int listening)
{
	char host[256], port[16];
	struct addrinfo hints, *res = NULL, *ai;
	int fd = -1, rc;

	if (split_hostport(hostport, host, sizeof(host), port, sizeof(port)) < 0) {
		fprintf(stderr, PROG ": %s: expected HOST:PORT\n", hostport);
		return -1;
	}
	memset(&hints, 0, sizeof(hints));
	hints.ai_family = AF_UNSPEC;
	hints.ai_socktype = SOCK_STREAM;
	hints.ai_flags = listening ? AI_PASSIVE : 0;
	rc = getaddrinfo(host, port, &hints, &res);
	if (rc != 0) {
		fprintf(stderr, PROG ": %s: %s\n", hostport, gai_strerror(rc));
		return -1;
	}
	for (ai = res; ai != NULL; ai = ai->ai_next) {
		int one = 1;

		fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
		if (fd < 0)
			continue;
		if (listening) {
			if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) == 0 &&
			    bind(fd, ai->ai_addr, ai->ai_addrlen) == 0 && listen(fd, 128) == 0)
				break;
		} else if (connect(fd, ai->ai_addr, ai->ai_addrlen) == 0) {
			break;
		}
		close(fd);
		fd = -1;
	}
	if (fd < 0)
		fprintf(stderr, PROG ": %s: %s\n", hostport, strerror(errno));
	freeaddrinfo(res);
	return fd;
}

static void queue_free(struct queue *q)
{
	while (q->head) {
		struct chunk *n = q->head->next;

		free(q->head);
		q->head = n;
	}
	q->tail = NULL;
	q->bytes = 0;
}

static void conn_close(struct conn *c)
{
	for (int i = 0; i < 2; i++) {
		if (c->s[i].fd >= 0)
			close(c->s[i].fd); /* also leaves the epoll set */
		queue_free(&c->s[i].out);
	}
	if (c->prev)
		c->prev->next = c->next;
	else
		conns = c->next;
	if (c->next)
		c->next->prev = c->prev;
	free(c);
}

/* Register the interest side s needs now: read while its peer's queue has room, write while due bytes wait. */
static int side_update(struct side *s, int64_t now)
{
	struct side *peer = &s->c->s[s == &s->c->s[0] ? 1 : 0];
	uint32_t want = 0;

	if (!s->eof && peer->out.bytes < QUEUE_MAX)
		want |= EPOLLIN;
	if (s->out.head && s->out.head->due_ns <= now)
		want |= EPOLLOUT;
	if (want != s->mask) {
		struct epoll_event ev = { .events = want, .data.ptr = s };

		if (epoll_ctl(epfd, EPOLL_CTL_MOD, s->fd, &ev) < 0)
			return -1;
		s->mask = want;
	}
	return 0;
}

/* Read one chunk from s and queue it for its peer, due delay_ns from now.  -1: s is done (EOF or error). */
static int side_read(struct side *s, int64_t now)
{
	struct side *peer = &s->c->s[s == &s->c->s[0] ? 1 : 0];
	struct chunk *ch = malloc(sizeof(*ch) + CHUNK_MAX);
	ssize_t n;

	if (ch == NULL)
		return -1;
	n = read(s->fd, ch->data, CHUNK_MAX);
	if (n <= 0) {
		free(ch);
		if (n < 0 && (errno == EAGAIN || errno == EINTR))
			return 0;
		s->eof = 1;
		return -1;
	}
	if (n < CHUNK_MAX / 4) {
		/* Most chunks are small messages: do not hold 64 KiB for each while it waits. */
		struct chunk *small = realloc(ch, sizeof(*ch) + (size_t)n);

		if (small != NULL)
			ch = small;
	}
	ch->next = NULL;
	ch->due_ns = now + (delay_ns > late_ns ? delay_ns - late_ns : 0);
	if (delay_ns == 0)
		ch->due_ns = now;
	ch->len = (size_t)n;
	ch->off = 0;
	msgcount_feed(&s->mc, (const unsigned char *)ch->data, (size_t)n);
	if (s == &s->c->s[0])
		bytes_up += (uint64_t)n;
	else
		bytes_down += (uint64_t)n;
	if (peer->out.tail)
		peer->out.tail->next = ch;
	else
		peer->out.head = ch;
	peer->out.tail = ch;
	peer->out.bytes += (size_t)n;
	return 0;
}

/* Write what is due to s.  -1: the socket failed. */
static int side_flush(struct side *s, int64_t now)
{
	while (s->out.head && s->out.head->due_ns <= now) {
		struct chunk *ch = s->out.head;
		ssize_t n = write(s->fd, ch->data + ch->off, ch->len - ch->off);

		if (n < 0) {
			if (errno == EAGAIN || errno == EINTR)
				return 0;
			return -1;
		}
		if (ch->off == 0 && delay_ns > 0) {
			/* Against the due time it was given: the wake-up's own lateness. */
			int64_t late = now - ch->due_ns;

			late_ns += (late - late_ns) / 8;
			if (late_ns < 0)
				late_ns = 0;
		}
		ch->off += (size_t)n;
		s->out.bytes -= (size_t)n;
		if (ch->off < ch->len)
			return 0;
		s->out.head = ch->next;
		if (s->out.head == NULL)
			s->out.tail = NULL;
		free(ch);
	}
	return 0;
}

static void do_accept(int lfd, const char *target)
{
	for (;;) {
		int cfd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC), tfd2;
		struct conn *c;

		if (cfd < 0)
			return;
		/* A blocking connect: the target is local, and a slow connect only delays this connection's start. */
		tfd2 = open_socket(target, 0);
		c = calloc(1, sizeof(*c));
		if (tfd2 < 0 || c == NULL || set_nonblock_nodelay(cfd) < 0 || set_nonblock_nodelay(tfd2) < 0) {
			close(cfd);
			if (tfd2 >= 0)
				close(tfd2);
			free(c);
			continue;
		}
		c->s[0].fd = cfd;
		c->s[1].fd = tfd2;
		for (int i = 0; i < 2; i++) {
			struct epoll_event ev = { .events = EPOLLIN, .data.ptr = &c->s[i] };

			c->s[i].c = c;
			c->s[i].mask = EPOLLIN;
			if (epoll_ctl(epfd, EPOLL_CTL_ADD, c->s[i].fd, &ev) < 0)
				c->dead = 1;
		}
		c->next = conns;
		if (conns)
			conns->prev = c;
		conns = c;
		n_conns++;
		if (c->dead)
			conn_close(c);
	}
}

/* Arm the timer for the earliest chunk not yet due (or disarm it). */
static void arm_timer(int64_t now)
{
	int64_t next = INT64_MAX;
	struct itimerspec its;

	for (struct conn *c = conns; c; c = c->next)
		for (int i = 0; i < 2; i++)
			if (c->s[i].out.head && c->s[i].out.head->due_ns > now && c->s[i].out.head->due_ns < next)
				next = c->s[i].out.head->due_ns;
	memset(&its, 0, sizeof(its));
	if (next != INT64_MAX) {
		its.it_value.tv_sec = next / 1000000000;
		its.it_value.tv_nsec = next % 1000000000;
	}
	timerfd_settime(tfd, TFD_TIMER_ABSTIME, &its, NULL);
}

static void usage(FILE *out)
{
	fprintf(out, "usage: " PROG " --target HOST:PORT [--listen HOST:PORT] [--delay-us US] [--stats FILE]\n");
}

int main(int argc, char **argv)
{
	static const struct option lo[] = {
		{ "target", required_argument, NULL, 't' }, { "listen", required_argument, NULL, 'l' },
		{ "delay-us", required_argument, NULL, 'd' }, { "stats", required_argument, NULL, 's' },
		{ "help", no_argument, NULL, 'h' },	    { NULL, 0, NULL, 0 },
	};
	const char *target = NULL, *listen_at = "127.0.0.1:0", *stats = NULL;
	struct sockaddr_storage sa;
	socklen_t salen = sizeof(sa);
	struct sigaction sig;
	int lfd, ch, port = -1;
	FILE *sf;

	while ((ch = getopt_long(argc, argv, "", lo, NULL)) != -1) {
		char *end;
		long long v;

		switch (ch) {
		case 't': target = optarg; break;
		case 'l': listen_at = optarg; break;
		case 's': stats = optarg; break;
		case 'd':
			errno = 0;
			v = strtoll(optarg, &end, 10);
			if (errno || *end || v < 0 || v > 10000000) {
				fprintf(stderr, PROG ": --delay-us: expected 0..10000000\n");
				return 2;
			}
			delay_ns = (int64_t)v * 1000;
			break;
		case 'h': usage(stdout); return 0;
		default: usage(stderr); return 2;
		}
	}
	if (target == NULL) {
		usage(stderr);
		return 2;
	}
	memset(&sig, 0, sizeof(sig));
	sig.sa_handler = on_signal; /* no SA_RESTART: epoll_wait returns EINTR */
	sigaction(SIGTERM, &sig, NULL);
	sigaction(SIGINT, &sig, NULL);
	signal(SIGPIPE, SIG_IGN);
	/* The default 50 us timer slack would land on every delayed chunk, twice per round trip. */
	prctl(PR_SET_TIMERSLACK, 1UL, 0UL, 0UL, 0UL);

	lfd = open_socket(listen_at, 1);
	if (lfd < 0)
		return 1;
	if (fcntl(lfd, F_SETFL, fcntl(lfd, F_GETFL) | O_NONBLOCK) < 0 || getsockname(lfd, (struct sockaddr *)&sa, &salen) < 0) {
		perror(PROG ": listen socket");
		return 1;
	}
	port = ntohs(sa.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&sa)->sin6_port : ((struct sockaddr_in *)&sa)->sin_port);
	epfd = epoll_create1(EPOLL_CLOEXEC);
	tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
	if (epfd < 0 || tfd < 0) {
		perror(PROG ": epoll/timerfd");
		return 1;
	}
	{
		struct epoll_event ev = { .events = EPOLLIN, .data.ptr = NULL };
		struct epoll_event tev = { .events = EPOLLIN, .data.ptr = &tfd };

		if (epoll_ctl(epfd, EPOLL_CTL_ADD, lfd, &ev) < 0 || epoll_ctl(epfd, EPOLL_CTL_ADD, tfd, &tev) < 0) {
			perror(PROG ": epoll_ctl");
			return 1;
		}
	}
	printf("port=%d\n", port);
	fflush(stdout);

	while (!stop_flag) {
		struct epoll_event evs[MAX_EVENTS];
		int n = epoll_wait(epfd, evs, MAX_EVENTS, -1);
		int64_t now;

		if (n < 0) {
			if (errno == EINTR)
				continue;
			perror(PROG ": epoll_wait");
			break;
		}
		now = now_ns();
		for (int i = 0; i < n; i++) {
			struct side *s = evs[i].data.ptr;

			if (s == NULL) {
				do_accept(lfd, target);
			} else if ((void *)s == (void *)&tfd) {
				uint64_t exp;

				(void)!read(tfd, &exp, sizeof(exp));
			} else if (!s->c->dead) {
				if ((evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) && side_read(s, now) < 0)
					s->eof = 1;
				if ((evs[i].events & EPOLLOUT) && side_flush(s, now) < 0)
					s->c->dead = 1;
			}
		}
		/*
		 * Every connection, every pass: write what has come due (the
		 * timer fired, or the delay is 0), then close a connection once a
		 * side has ended and what it sent has been delivered.
		 */
		now = now_ns();
		for (struct conn *c = conns, *next; c; c = next) {
			next = c->next;
			for (int k = 0; k < 2 && !c->dead; k++)
				if (side_flush(&c->s[k], now) < 0)
					c->dead = 1;
			for (int k = 0; k < 2 && !c->dead; k++)
				if (c->s[k].eof && c->s[k ? 0 : 1].out.head == NULL)
					c->dead = 1;
			for (int k = 0; k < 2 && !c->dead; k++)
				if (side_update(&c->s[k], now) < 0)
					c->dead = 1;
			if (c->dead) {
				msgs_up += c->s[0].mc.msgs;
				msgs_down += c->s[1].mc.msgs;
				conn_close(c);
			}
		}
		arm_timer(now);
	}
	for (struct conn *c = conns; c; c = c->next) {
		msgs_up += c->s[0].mc.msgs;
		msgs_down += c->s[1].mc.msgs;
	}
	while (conns)
		conn_close(conns);
	sf = stats ? fopen(stats, "we") : stderr;
	if (sf != NULL) {
		fprintf(sf, "connections=%" PRIu64 " msgs_up=%" PRIu64 " msgs_down=%" PRIu64 " bytes_up=%" PRIu64
			    " bytes_down=%" PRIu64 " delay_us=%" PRId64 "\n",
			n_conns, msgs_up, msgs_down, bytes_up, bytes_down, delay_ns / 1000);
		if (sf != stderr)
			fclose(sf);
	}
	close(tfd);
	close(epfd);
	close(lfd);
	return 0;
}
