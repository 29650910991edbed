/*
 * assign.c - sticky balanced assignment.  See assign.h and docs/DESIGN.md
 * ("Who owns what") for the rules and why they move the fewest partitions.
 */
#include "config.h"

#include <stdlib.h>
#include <string.h>

#include "coord/assign.h"
#include "lib/hash.h"

int tdr_assign_owner(const char *const *members, size_t n, uint32_t p)
{
	uint64_t best = 0;
	int owner = -1;

	for (size_t i = 0; i < n; i++) {
		uint64_t s = tdr_hrw_score(members[i], p);

		/* Ties (astronomically rare) go to the smaller name so every replica agrees. */
		if (owner < 0 || s > best || (s == best && strcmp(members[i], members[owner]) < 0)) {
			best = s;
			owner = (int)i;
		}
	}
	return owner;
}

struct keep_ctx {
	uint32_t hash;
	uint32_t p;
	uint64_t s;
};

static int cmp_score_desc(const void *a, const void *b)
{
	const struct keep_ctx *x = a, *y = b;

	if (x->s != y->s)
		return x->s > y->s ? -1 : 1;
	return x->p < y->p ? -1 : x->p > y->p;
}

struct named {
	const char *name;
	size_t idx;
};

static int cmp_named(const void *a, const void *b)
{
	return strcmp(((const struct named *)a)->name, ((const struct named *)b)->name);
}

int tdr_assign_balanced(const char *const *members, size_t n, uint32_t P, const int32_t *cur, int32_t *target,
			tdr_err *err)
{
	struct named *names = NULL;
	size_t *order = NULL, *load = NULL, *cap = NULL, *start = NULL, *fill = NULL;
	uint32_t *hash = NULL, *byowner = NULL;
	struct keep_ctx *tmp = NULL;
	size_t f, r, c, slots;
	int rc = 0;

	if (n == 0) {
		for (uint32_t p = 0; p < P; p++)
			target[p] = -1;
		return 0;
	}
	names = calloc(n, sizeof(*names));
	order = calloc(n, sizeof(*order));
	load = calloc(n, sizeof(*load));
	cap = calloc(n, sizeof(*cap));
	start = calloc(n + 1, sizeof(*start));
	fill = calloc(n, sizeof(*fill));
	hash = calloc(n, sizeof(*hash));
	byowner = calloc(P ? P : 1, sizeof(*byowner));
	tmp = calloc(P ? P : 1, sizeof(*tmp));
	if (!names || !order || !load || !cap || !start || !fill || !hash || !byowner || !tmp) {
		rc = tdr_err_set(err, TDR_ENOMEM, "out of memory");
		goto out;
	}
	for (size_t i = 0; i < n; i++) {
		names[i] = (struct named){ members[i], i };
		hash[i] = tdr_fnv1a32(members[i], strlen(members[i]));
	}
	/* Name order, so the answer does not depend on the order members[] came in. */
	qsort(names, n, sizeof(*names), cmp_named);
	for (size_t i = 0; i < n; i++)
		order[i] = names[i].idx;

	for (uint32_t p = 0; p < P; p++)
		if (cur[p] >= 0 && (size_t)cur[p] < n)
			load[cur[p]]++;
	f = P / n;
	r = P % n;
	c = r ? f + 1 : f;

	/*
	 * 1. The r c-slots: members already at c or more first, then the others,
	 *    each group in name order.  The first group only loses members that
	 *    were not chosen (they shed to f), and the second only gains chosen
	 *    ones, so the choice holds while a move is under way.
	 */
	for (size_t i = 0; i < n; i++)
		cap[i] = f;
	slots = r;
	for (size_t pass = 0; pass < 2 && slots; pass++)
		for (size_t k = 0; k < n && slots; k++) {
			size_t i = order[k];
			int in_set = r && load[i] >= c;

			if (in_set == (pass == 0) && cap[i] == f) {
				cap[i] = c;
				slots--;
			}
		}

	/* 2. Keep min(load, cap) per member: the highest rendezvous scores of what it owns. */
	for (size_t i = 0; i < n; i++)
		start[i + 1] = start[i] + load[i];
	for (uint32_t p = 0; p < P; p++) {
		target[p] = -1;
		if (cur[p] >= 0 && (size_t)cur[p] < n)
			byowner[start[cur[p]] + fill[cur[p]]++] = p;
	}
	for (size_t i = 0; i < n; i++) {
		size_t k = load[i];

		if (k <= cap[i]) {
			for (size_t j = 0; j < k; j++)
				target[byowner[start[i] + j]] = (int32_t)i;
			continue;
		}
		for (size_t j = 0; j < k; j++) {
			uint32_t p = byowner[start[i] + j];

			tmp[j] = (struct keep_ctx){ hash[i], p, tdr_hrw_score_hashed(hash[i], p) };
		}
		qsort(tmp, k, sizeof(*tmp), cmp_score_desc);
		for (size_t j = 0; j < cap[i]; j++)
			target[tmp[j].p] = (int32_t)i;
	}
	for (size_t i = 0; i < n; i++)
		fill[i] = load[i] < cap[i] ? load[i] : cap[i];

	/* 3. Each free partition, in order, to the member with room and the highest score for it. */
	for (uint32_t p = 0; p < P; p++) {
		uint64_t best = 0;
		size_t bi = n;

		if (target[p] >= 0)
			continue;
		for (size_t k = 0; k < n; k++) {
			size_t i = order[k];
			uint64_t s;

			if (fill[i] >= cap[i])
				continue;
			s = tdr_hrw_score_hashed(hash[i], p);
			/* Strictly greater: ties go to the first in name order. */
			if (bi == n || s > best) {
				best = s;
				bi = i;
			}
		}
		/* Capacities sum to P, so some member always has room. */
		if (bi < n) {
			target[p] = (int32_t)bi;
			fill[bi]++;
		}
	}
out:
	free(names);
	free(order);
	free(load);
	free(cap);
	free(start);
	free(fill);
	free(hash);
	free(byowner);
	free(tmp);
	return rc;
}

static int cmp_size_desc(const void *a, const void *b)
{
	size_t x = *(const size_t *)a, y = *(const size_t *)b;

	return x > y ? -1 : x < y;
}

size_t tdr_assign_min_moves(size_t n, uint32_t P, const int32_t *cur)
{
	size_t *load, keep = 0, f, r;

	if (n == 0)
		return SIZE_MAX;
	load = calloc(n, sizeof(*load));
	if (load == NULL)
		return SIZE_MAX;
	for (uint32_t p = 0; p < P; p++)
		if (cur[p] >= 0 && (size_t)cur[p] < n)
			load[cur[p]]++;
	/* Keeping min(load, capacity) is the most any balanced target keeps; c-slots to the largest loads. */
	qsort(load, n, sizeof(*load), cmp_size_desc);
	f = P / n;
	r = P % n;
	for (size_t i = 0; i < n; i++) {
		size_t capi = f + (i < r ? 1 : 0);

		keep += load[i] < capi ? load[i] : capi;
	}
	free(load);
	return P - keep;
}

int tdr_assign_handback(int ours, unsigned char *draining, unsigned char *idle)
{
	if (ours) {
		*draining = 0;
		*idle = 0;
		return 0;
	}
	*draining = 1;
	return *idle;
}
