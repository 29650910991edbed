#include "config.h"

#include <stdio.h>
#include <string.h>

#include "lib/hash.h"

uint32_t tdr_fnv1a32(const void *data, size_t len)
{
	const unsigned char *p = data;
	uint32_t h = 2166136261u;

	for (size_t i = 0; i < len; i++) {
		h ^= p[i];
		h *= 16777619u;
	}
	return h;
}

/* splitmix64 finaliser: spreads FNV's weak low bits before comparing scores. */
static uint64_t mix64(uint64_t x)
{
	x ^= x >> 30;
	x *= 0xbf58476d1ce4e5b9ULL;
	x ^= x >> 27;
	x *= 0x94d049bb133111ebULL;
	x ^= x >> 31;
	return x;
}

uint64_t tdr_hrw_score_hashed(uint32_t member_hash, uint32_t partition)
{
	return mix64(((uint64_t)member_hash << 32) ^ partition ^ 0x9e3779b97f4a7c15ULL);
}

uint64_t tdr_hrw_score(const char *member, uint32_t partition)
{
	return tdr_hrw_score_hashed(tdr_fnv1a32(member, strlen(member)), partition);
}
