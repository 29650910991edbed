/*
 * test_assign.c - coord/assign.c: the rendezvous owner, and the sticky
 * balanced target over many random memberships (n 1..64, P 1..4096, joins
 * and leaves): every member owns floor(P/n) or ceil(P/n) partitions, the
 * target is a fixed point, it does not depend on member order, and the
 * partitions that change owner are exactly the minimum a balanced target
 * needs, also when the move is carried out a few partitions at a time with
 * the target recomputed from every intermediate state (as replicas do, tick
 * by tick).  Prints the movement table (ASSIGN_TRIALS sets the trial count)
 * and named (n, P) rows; the minimum is also computed here independently.
 * Also the hand-back rule of one held partition, through the sequence a
 * flapping membership produces (t13 on FerretDB caught it: a partition that
 * became ours again after the worker had gone idle on it stayed held,
 * undrained, for good).
 */
#include "config.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "coord/assign.h"
#include "lib/hash.h"
#include "tests/unit/tap.h"

#define MAXN 64
#define MAXP 4096

static uint64_t rng_state = 0x1234567887654321ULL;

static uint64_t rnd(void)
{
	/* xorshift64*: reproducible without libc's rand() state. */
	rng_state ^= rng_state >> 12;
	rng_state ^= rng_state << 25;
	rng_state ^= rng_state >> 27;
	return rng_state * 2685821657736338717ULL;
}

static uint32_t rnd_below(uint32_t n)
{
	return (uint32_t)(rnd() % n);
}

struct world {
	char names[MAXN + 1][16];
	const char *members[MAXN + 1];
	size_t n;
	uint32_t P;
	int32_t own[MAXP]; /* current owner index, -1 free */
};

static int balanced(const struct world *w, const int32_t *t)
{
	size_t load[MAXN + 1] = { 0 }, f = w->P / w->n, c = f + (w->P % w->n ? 1 : 0), atc = 0;

	for (uint32_t p = 0; p < w->P; p++) {
		if (t[p] < 0 || (size_t)t[p] >= w->n)
			return 0;
		load[t[p]]++;
	}
	for (size_t i = 0; i < w->n; i++) {
		if (load[i] < f || load[i] > c)
			return 0;
		atc += load[i] == c && c > f;
	}
	return atc == (c > f ? w->P % w->n : 0);
}

/* Carry the move out a few partitions at a time, recomputing the target from each state. */
static int converge(struct world *w, int32_t *tmp, size_t *steps)
{
	tdr_err err;

	for (*steps = 0; *steps < 10000; (*steps)++) {
		size_t diff = 0;

		if (tdr_assign_balanced(w->members, w->n, w->P, w->own, tmp, &err) < 0)
			return -1;
		for (uint32_t p = 0; p < w->P; p++)
			diff += tmp[p] != w->own[p];
		if (diff == 0)
			return 0;
		for (uint32_t p = 0; p < w->P; p++) {
			if (tmp[p] == w->own[p] || rnd_below(3) != 0)
				continue;
			/* An owner gives back (the partition is free), or a free one is taken. */
			w->own[p] = w->own[p] >= 0 ? -1 : tmp[p];
		}
	}
	return -1;
}

static void remove_member(struct world *w, size_t k)
{
	for (uint32_t p = 0; p < w->P; p++) {
		if (w->own[p] == (int32_t)k)
			w->own[p] = -1;
		else if (w->own[p] > (int32_t)k)
			w->own[p]--;
	}
	for (size_t i = k; i + 1 < w->n; i++)
		memcpy(w->names[i], w->names[i + 1], sizeof(w->names[i]));
	w->n--;
	for (size_t i = 0; i < w->n; i++)
		w->members[i] = w->names[i];
}

static void add_member(struct world *w, unsigned id)
{
	snprintf(w->names[w->n], sizeof(w->names[w->n]), "r%u", id);
	w->n++;
	for (size_t i = 0; i < w->n; i++)
		w->members[i] = w->names[i];
}

/*
 * The minimum, computed here independently of tdr_assign_min_moves: a
 * balanced assignment gives r = P mod n members ceil(P/n) and the others
 * floor(P/n); a member can keep at most min(load, capacity), and the sum of
 * what is kept is largest when the ceil capacities go to the largest loads.
 * Everything not kept moves.
 */
static size_t independent_min(const struct world *w, const int32_t *own)
{
	size_t load[MAXN + 1] = { 0 }, f = w->P / w->n, c = f + (w->P % w->n ? 1 : 0), r = w->P % w->n, keep = 0;

	for (uint32_t p = 0; p < w->P; p++)
		if (own[p] >= 0 && (size_t)own[p] < w->n)
			load[own[p]]++;
	/* Selection order, largest first (n <= 64). */
	for (size_t i = 0; i < w->n; i++) {
		size_t best = i, tmp;

		for (size_t j = i + 1; j < w->n; j++)
			if (load[j] > load[best])
				best = j;
		tmp = load[i];
		load[i] = load[best];
		load[best] = tmp;
		keep += load[i] < (i < r ? c : f) ? load[i] : (i < r ? c : f);
	}
	return w->P - keep;
}

/* Movement table rows: by P bucket and change kind. */
struct row {
	uint64_t changes, moved, minimum, extra_max;
};

/* One held partition through every order of target changes and idle reports. */
static void test_handback(void)
{
	unsigned char draining = 0, idle = 0;
	int bad = 0;

	ok(tdr_assign_handback(1, &draining, &idle) == 0 && !draining && !idle, "ours: kept and claimed");
	ok(tdr_assign_handback(0, &draining, &idle) == 0 && draining && !idle,
	   "another member's in the target: draining, kept until the worker is idle there");
	idle = 1; /* tdr_coord_scope_idle */
	ok(tdr_assign_handback(1, &draining, &idle) == 0 && !draining && !idle,
	   "ours again after the worker went idle on it: claimed again, not left held and undrained");
	ok(tdr_assign_handback(0, &draining, &idle) == 0 && draining && !idle,
	   "another member's again: draining again, and an idle report from before does not count");
	idle = 1;
	ok(tdr_assign_handback(0, &draining, &idle) == 1, "another member's and idle: released");
	/* Random flapping: whenever the rule keeps a partition, the worker claims it iff it is ours. */
	draining = idle = 0;
	for (int i = 0; i < 100000; i++) {
		int ours = (int)rnd_below(2), rel;

		if (draining && rnd_below(3) == 0)
			idle = 1;
		rel = tdr_assign_handback(ours, &draining, &idle);
		if (rel) {
			bad += ours;
			draining = idle = 0; /* released, then held afresh later */
			continue;
		}
		bad += ours == draining || (idle && !draining);
	}
	ok(bad == 0, "100,000 random target flips and idle reports: a kept partition is claimed exactly when it is "
	   "ours, and an ours partition is never released (%d not)", bad);
}

int main(void)
{
	static struct world w;
	static int32_t t[MAXP], t2[MAXP], before[MAXP], perm_t[MAXP];
	const char *three[] = { "a", "b", "c" };
	const char *pbucket[] = { "1-16", "17-256", "257-1024", "1025-4096" };
	struct row rows[4][2];
	unsigned next_id = 0;
	size_t trials = 300, bad_balance = 0, bad_fixed = 0, bad_perm = 0, bad_min = 0, bad_bound = 0, bad_conv = 0;
	size_t worst_extra = 0, changes = 0, bad_indep = 0;
	const char *env = getenv("ASSIGN_TRIALS");
	tdr_err err;

	memset(rows, 0, sizeof(rows));
	if (env && atoi(env) > 0)
		trials = (size_t)atoi(env);

	/* Rendezvous owner (kept for tools). */
	ok(tdr_assign_owner(three, 0, 1) == -1, "no members, no owner");
	ok(tdr_assign_owner(three, 3, 7) == tdr_assign_owner(three, 3, 7), "rendezvous owner is deterministic");
	{
		int best = 0;

		for (int i = 1; i < 3; i++)
			if (tdr_hrw_score(three[i], 7) > tdr_hrw_score(three[best], 7))
				best = i;
		ok(tdr_assign_owner(three, 3, 7) == best, "rendezvous owner has the highest tdr_hrw_score");
	}

	/* Small cases the issue names: P = n gives one each; 8 over 2 is 4/4; 16 over 4 is 4 each. */
	{
		static const struct {
			size_t n;
			uint32_t P;
		} cs[] = { { 2, 8 }, { 4, 16 }, { 8, 8 }, { 3, 8 }, { 5, 3 } };

		for (size_t k = 0; k < sizeof(cs) / sizeof(cs[0]); k++) {
			memset(&w, 0, sizeof(w));
			w.P = cs[k].P;
			for (size_t i = 0; i < cs[k].n; i++)
				add_member(&w, (unsigned)i);
			for (uint32_t p = 0; p < w.P; p++)
				w.own[p] = -1;
			int rc = tdr_assign_balanced(w.members, w.n, w.P, w.own, t, &err);
			ok(rc == 0 && balanced(&w, t), "%u partitions over %zu members from scratch: floor/ceil shares", w.P,
			   w.n);
		}
	}

	/* Random memberships with joins and leaves. */
	for (size_t trial = 0; trial < trials; trial++) {
		uint32_t P;
		size_t n0, nchg;

		switch (rnd_below(4)) {
		case 0:
			P = 1 + rnd_below(16);
			break;
		case 1:
			P = 17 + rnd_below(240);
			break;
		case 2:
			P = 257 + rnd_below(768);
			break;
		default:
			P = 1025 + rnd_below(3072);
			break;
		}
		if (trial % 16 == 0)
			P = trial % 32 == 0 ? 4096 : 1024;
		memset(&w, 0, sizeof(w));
		w.P = P;
		n0 = 1 + rnd_below(MAXN);
		for (size_t i = 0; i < n0; i++)
			add_member(&w, next_id++);
		for (uint32_t p = 0; p < P; p++)
			w.own[p] = -1;
		if (tdr_assign_balanced(w.members, w.n, P, w.own, t, &err) < 0) {
			ok(0, "assign failed: %s", err.msg);
			break;
		}
		memcpy(w.own, t, sizeof(int32_t) * P);
		nchg = 1 + rnd_below(4);
		for (size_t ch = 0; ch < nchg; ch++) {
			int join = w.n == 1 || (w.n < MAXN && rnd_below(2));
			size_t minimum, moved = 0, steps, c, extra;
			int b = P <= 16 ? 0 : P <= 256 ? 1 : P <= 1024 ? 2 : 3;

			if (join)
				add_member(&w, next_id++);
			else
				remove_member(&w, rnd_below((uint32_t)w.n));
			memcpy(before, w.own, sizeof(int32_t) * P);
			minimum = tdr_assign_min_moves(w.n, P, w.own);
			bad_indep += minimum != independent_min(&w, w.own);
			if (tdr_assign_balanced(w.members, w.n, P, w.own, t, &err) < 0)
				break;
			bad_balance += !balanced(&w, t);
			/* A fixed point: a balanced state stays as it is. */
			if (tdr_assign_balanced(w.members, w.n, P, t, t2, &err) < 0 || memcmp(t, t2, sizeof(int32_t) * P))
				bad_fixed++;
			/* Member order does not matter (the target names the same members). */
			{
				const char *rev[MAXN + 1];
				int32_t rown[MAXP];

				for (size_t i = 0; i < w.n; i++)
					rev[i] = w.members[w.n - 1 - i];
				for (uint32_t p = 0; p < P; p++)
					rown[p] = w.own[p] < 0 ? -1 : (int32_t)(w.n - 1 - (size_t)w.own[p]);
				if (tdr_assign_balanced(rev, w.n, P, rown, perm_t, &err) < 0)
					break;
				for (uint32_t p = 0; p < P; p++)
					if (strcmp(rev[perm_t[p]], w.members[t[p]]) != 0) {
						bad_perm++;
						break;
					}
			}
			/* Carried out step by step: the same minimum, and balanced at the end. */
			if (converge(&w, t2, &steps) < 0) {
				bad_conv++;
				break;
			}
			bad_balance += !balanced(&w, w.own);
			for (uint32_t p = 0; p < P; p++)
				moved += w.own[p] != before[p];
			c = (P + w.n - 1) / w.n;
			extra = moved > minimum ? moved - minimum : 0;
			bad_min += moved != minimum;
			bad_bound += moved > minimum + c + 1;
			if (extra > worst_extra)
				worst_extra = extra;
			rows[b][join].changes++;
			rows[b][join].moved += moved;
			rows[b][join].minimum += minimum;
			if (extra > rows[b][join].extra_max)
				rows[b][join].extra_max = extra;
			changes++;
		}
	}
	ok(bad_indep == 0, "tdr_assign_min_moves agrees with the test's own minimum (%zu differ)", bad_indep);
	ok(bad_balance == 0, "%zu membership changes over %zu trials: every member owns floor(P/n) or ceil(P/n) "
	   "(%zu violations)", changes, trials, bad_balance);
	ok(bad_fixed == 0, "a balanced assignment is a fixed point (%zu not)", bad_fixed);
	ok(bad_perm == 0, "the target does not depend on member order (%zu differ)", bad_perm);
	ok(bad_conv == 0, "moves carried out a few at a time converge (%zu did not)", bad_conv);
	ok(bad_bound == 0, "moved <= minimum + ceil(P/n) + 1 in every change (%zu over)", bad_bound);
	ok(bad_min == 0, "moved == minimum in every change, step by step (%zu not; worst extra %zu)", bad_min,
	   worst_extra);
	diag("movement against the minimum (sum over changes; extra = moved - minimum):");
	diag("%-10s %-6s %8s %10s %10s %10s", "P", "change", "changes", "moved", "minimum", "max extra");
	for (int b = 0; b < 4; b++)
		for (int j = 1; j >= 0; j--)
			diag("%-10s %-6s %8" PRIu64 " %10" PRIu64 " %10" PRIu64 " %10" PRIu64, pbucket[b], j ? "join" : "leave",
			     rows[b][j].changes, rows[b][j].moved, rows[b][j].minimum, rows[b][j].extra_max);

	/*
	 * Named rows: from a balanced start of n members at P (built from
	 * scratch, then one join, then one leave of the first member), what moved
	 * against the minimum and the ceil(P/n) bound.
	 */
	{
		static const struct {
			size_t n;
			uint32_t P;
		} cs[] = { { 1, 1024 }, { 2, 1024 }, { 7, 1024 }, { 8, 1024 }, { 63, 1024 }, { 1, 4096 },
			   { 2, 4096 }, { 8, 4096 }, { 64, 4096 }, { 3, 7 }, { 64, 1 } };
		size_t bad_rows = 0;

		diag("%-6s %-7s %-6s %6s %8s %6s %6s", "P", "n", "change", "moved", "minimum", "ceil", "max");
		for (size_t k = 0; k < sizeof(cs) / sizeof(cs[0]); k++) {
			memset(&w, 0, sizeof(w));
			w.P = cs[k].P;
			for (size_t i = 0; i < cs[k].n; i++)
				add_member(&w, 1000 + (unsigned)i);
			for (uint32_t p = 0; p < w.P; p++)
				w.own[p] = -1;
			if (tdr_assign_balanced(w.members, w.n, w.P, w.own, t, &err) < 0)
				break;
			memcpy(w.own, t, sizeof(int32_t) * w.P);
			for (int j = 0; j < 2; j++) {
				size_t minimum, moved = 0, steps, mx = 0, load[MAXN + 1] = { 0 }, c;
				char chg[24];

				if (j == 0 && w.n < MAXN)
					add_member(&w, 2000 + (unsigned)k);
				else if (j == 1 && w.n > 1)
					remove_member(&w, 0);
				else
					continue;
				memcpy(before, w.own, sizeof(int32_t) * w.P);
				minimum = independent_min(&w, w.own);
				if (converge(&w, t2, &steps) < 0) {
					bad_rows++;
					continue;
				}
				for (uint32_t p = 0; p < w.P; p++) {
					moved += w.own[p] != before[p];
					load[w.own[p]]++;
				}
				for (size_t i = 0; i < w.n; i++)
					mx = load[i] > mx ? load[i] : mx;
				c = (w.P + w.n - 1) / w.n;
				bad_rows += mx > c || moved > minimum + c + 1;
				snprintf(chg, sizeof(chg), "%zu->%zu", j == 0 ? w.n - 1 : w.n + 1, w.n);
				diag("%-6u %-7s %-6s %6zu %8zu %6zu %6zu", w.P, chg, j == 0 ? "join" : "leave", moved,
				     minimum, c, mx);
			}
		}
		ok(bad_rows == 0, "named joins and leaves (P 1..4096, n 1..64): max share <= ceil(P/n), moved <= "
		   "minimum + ceil(P/n) + 1 (%zu not)", bad_rows);
	}
	test_handback();
	return tap_done();
}
