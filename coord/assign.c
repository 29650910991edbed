#include "config.h"

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

size_t tdr_assign_mine(const char *const *members, size_t n, const char *me, uint32_t P, uint32_t *mine)
{
	size_t k = 0;

	for (uint32_t p = 0; p < P; p++) {
		int o = tdr_assign_owner(members, n, p);

		if (o >= 0 && strcmp(members[o], me) == 0)
			mine[k++] = p;
	}
	return k;
}

size_t tdr_assign_moves(const char *const *a, size_t na, const char *const *b, size_t nb, uint32_t P)
{
	size_t moved = 0;

	for (uint32_t p = 0; p < P; p++) {
		int oa = tdr_assign_owner(a, na, p), ob = tdr_assign_owner(b, nb, p);

		if (oa < 0 || ob < 0 || strcmp(a[oa], b[ob]) != 0)
			moved++;
	}
	return moved;
}
