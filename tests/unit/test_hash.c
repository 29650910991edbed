/*
 * test_hash.c - the partition hash (lib/hash.h) against docs/EVENTS.md.
 *
 * The vectors are the contract with producers that compute `part` themselves:
 * if one changes, every producer's partitions move.  The spread checks guard
 * the assumption that consecutive ObjectIds (one producer, one second: only
 * the counter differs) still fill every partition evenly.
 */
#include "config.h"

#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <bson/bson.h>

#include "lib/hash.h"
#include "tests/unit/tap.h"

static uint32_t fnv(const char *s)
{
	return tdr_fnv1a32(s, strlen(s));
}

/* docs/EVENTS.md, "The partition hash". */
static void test_vectors(void)
{
	static const struct {
		const char *key;
		uint32_t h;
		uint32_t m16, m7;
	} v[] = {
		{ "", 2166136261u, 5, 2 },
		{ "a", 3826002220u, 12, 5 },
		{ "foobar", 3214735720u, 8, 0 },
		{ "6745a1c0e4b0a1b2c3d4e5f6", 948678897u, 1, 5 },
		{ "evt-000001", 1916839906u, 2, 2 },
		{ "h\xc3\xa9llo", 1252296000u, 0, 4 },
	};

	for (size_t i = 0; i < sizeof(v) / sizeof(v[0]); i++) {
		uint32_t h = fnv(v[i].key);

		ok(h == v[i].h, "fnv1a32(\"%s\") = %u (got %u)", v[i].key, v[i].h, h);
		ok(h % 16 == v[i].m16 && h % 7 == v[i].m7, "fnv1a32(\"%s\") %% 16 = %u, %% 7 = %u", v[i].key,
		   v[i].m16, v[i].m7);
	}
	ok(tdr_fnv1a32(NULL, 0) == 2166136261u, "empty input is the offset basis");
	/* Length, not NUL, ends the key: a string _id may contain any byte. */
	ok(tdr_fnv1a32("a\0b", 3) != tdr_fnv1a32("a", 1), "bytes after a NUL are hashed");
}

/* An ObjectId's key is its 24 lowercase hex characters, whatever case it was written in. */
static void test_objectid(void)
{
	bson_oid_t oid;
	char hex[25];

	ok(bson_oid_is_valid("6745A1C0E4B0A1B2C3D4E5F6", 24), "upper-case ObjectId text is valid");
	bson_oid_init_from_string(&oid, "6745A1C0E4B0A1B2C3D4E5F6");
	bson_oid_to_string(&oid, hex);
	ok(strcmp(hex, "6745a1c0e4b0a1b2c3d4e5f6") == 0, "canonical text is lower-case hex (%s)", hex);
	ok(tdr_fnv1a32(hex, 24) % 16 == 1, "ObjectId 6745a1c0e4b0a1b2c3d4e5f6 is in partition 1 of 16");
	ok(tdr_fnv1a32(hex, 24) % 7 == 5, "ObjectId 6745a1c0e4b0a1b2c3d4e5f6 is in partition 5 of 7");
	ok(fnv("6745A1C0E4B0A1B2C3D4E5F6") != fnv(hex), "the key is case-sensitive: producers must use lower case");
}

/* Consecutive ObjectIds from one producer spread over every partition. */
static void test_spread(void)
{
	static const int parts[] = { 7, 16, 64 };
	const int n = 16000;

	for (size_t k = 0; k < sizeof(parts) / sizeof(parts[0]); k++) {
		int p = parts[k], count[64] = { 0 }, lo = n, hi = 0;
		double mean = (double)n / p;

		for (int i = 0; i < n; i++) {
			char hex[25];

			snprintf(hex, sizeof(hex), "6745a1c0e4b0a1b2c3%06x", i);
			count[tdr_fnv1a32(hex, 24) % (uint32_t)p]++;
		}
		for (int i = 0; i < p; i++) {
			lo = count[i] < lo ? count[i] : lo;
			hi = count[i] > hi ? count[i] : hi;
		}
		ok(lo > mean * 0.85 && hi < mean * 1.15, "%d sequential ObjectIds over %d partitions: %d..%d per partition",
		   n, p, lo, hi);
	}
}

/* Rendezvous hashing: deterministic, member-sensitive, balanced and minimally disruptive. */
static void test_hrw(void)
{
	static const char *const m[] = { "replica-a", "replica-b", "replica-c" };
	enum { NP = 1024 };
	int owner3[NP], owner2[NP], load[3] = { 0 }, moved = 0, kept = 1, distinct = 1;

	ok(tdr_hrw_score("replica-a", 3) == tdr_hrw_score("replica-a", 3), "score is deterministic");
	ok(tdr_hrw_score("replica-a", 3) != tdr_hrw_score("replica-b", 3), "score depends on the member");
	ok(tdr_hrw_score("replica-a", 3) != tdr_hrw_score("replica-a", 4), "score depends on the partition");
	for (uint32_t p = 1; p < NP && distinct; p++)
		distinct = tdr_hrw_score("replica-a", p) != tdr_hrw_score("replica-a", p - 1);
	ok(distinct, "adjacent partitions get different scores");

	for (int p = 0; p < NP; p++) {
		int best = 0, best2 = 0;

		for (int i = 1; i < 3; i++)
			if (tdr_hrw_score(m[i], (uint32_t)p) > tdr_hrw_score(m[best], (uint32_t)p))
				best = i;
		/* The same fleet without replica-c. */
		if (tdr_hrw_score(m[1], (uint32_t)p) > tdr_hrw_score(m[0], (uint32_t)p))
			best2 = 1;
		owner3[p] = best;
		owner2[p] = best2;
		load[best]++;
	}
	for (int i = 0; i < 3; i++)
		ok(load[i] > NP / 3 * 0.8 && load[i] < NP / 3 * 1.2, "%s owns %d of %d partitions", m[i], load[i], NP);
	for (int p = 0; p < NP; p++) {
		if (owner3[p] == 2)
			moved++;
		else if (owner3[p] != owner2[p])
			kept = 0;
	}
	ok(kept, "removing a member moves only its own partitions");
	ok(moved == load[2], "all %d of its partitions move to the others", moved);

	/* Two members whose names differ in one character still split evenly. */
	{
		int a = 0;

		for (uint32_t p = 0; p < NP; p++)
			a += tdr_hrw_score("node1", p) > tdr_hrw_score("node2", p);
		ok(a > NP / 2 * 0.85 && a < NP / 2 * 1.15, "node1 vs node2: %d of %d", a, NP);
	}
}

int main(void)
{
	test_vectors();
	test_objectid();
	test_spread();
	test_hrw();
	return tap_done();
}
