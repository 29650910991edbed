#include "config.h"

#include <stdio.h>
#include <string.h>

#include "coord/assign.h"
#include "tests/unit/tap.h"

int main(void)
{
	const char *three[] = { "a", "b", "c" };
	const char *four[] = { "a", "b", "c", "d" };
	const char *two[] = { "a", "c" };
	uint32_t P = 64, mine[64];
	size_t total = 0, counts[4] = { 0 };

	ok(tdr_assign_owner(three, 0, 1) == -1, "no members, no owner");
	for (size_t i = 0; i < 3; i++) {
		counts[i] = tdr_assign_mine(three, 3, three[i], P, mine);
		total += counts[i];
	}
	ok(total == P, "every partition has exactly one owner among 3 (%zu)", total);
	ok(counts[0] > 8 && counts[1] > 8 && counts[2] > 8, "spread is reasonable: %zu/%zu/%zu", counts[0],
	   counts[1], counts[2]);

	/* Order of the member list must not matter. */
	const char *shuffled[] = { "c", "a", "b" };
	int same = 1;
	for (uint32_t p = 0; p < P; p++)
		if (strcmp(three[tdr_assign_owner(three, 3, p)], shuffled[tdr_assign_owner(shuffled, 3, p)]) != 0)
			same = 0;
	ok(same, "assignment independent of member order");

	/* Join: only partitions won by the newcomer move. */
	size_t moved = tdr_assign_moves(three, 3, four, 4, P);
	size_t won = tdr_assign_mine(four, 4, "d", P, mine);
	ok(moved == won, "join moves exactly the partitions the newcomer wins (%zu == %zu)", moved, won);
	ok(moved >= P / 8 && moved <= P / 2, "join moves about P/4 (%zu of %u)", moved, P);

	/* Leave: only the leaver's partitions move. */
	size_t held_b = tdr_assign_mine(three, 3, "b", P, mine);
	moved = tdr_assign_moves(three, 3, two, 2, P);
	ok(moved == held_b, "leave moves exactly the leaver's partitions (%zu == %zu)", moved, held_b);

	/* Determinism across calls (pinned so a change of hash is noticed). */
	int o1 = tdr_assign_owner(three, 3, 7), o2 = tdr_assign_owner(three, 3, 7);
	ok(o1 == o2, "owner is deterministic");
	return tap_done();
}
