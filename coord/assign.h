/*
 * assign.h - which live replica owns which partition (pure functions).
 *
 * Sticky balanced assignment (docs/DESIGN.md, "Who owns what"): from the
 * live member set and the current live owner of every partition, every
 * replica computes the same target, in which each member owns
 * floor(P/n) or ceil(P/n) partitions and the fewest partitions change owner
 * that any such balanced target allows from the current one.  Rendezvous
 * scores (lib/hash.h, tdr_hrw_score) break every choice deterministically:
 * which partitions an overloaded member keeps, and who receives a free one.
 *
 * The rendezvous owner (tdr_assign_owner) is kept for tools and tests that
 * compare against plain highest-random-weight hashing.
 */
#ifndef TDRAIN_ASSIGN_H
#define TDRAIN_ASSIGN_H

#include <stddef.h>
#include <stdint.h>

#include "lib/err.h"

/* Index into members[] of p's rendezvous (highest score) owner, or -1 if n == 0. */
int tdr_assign_owner(const char *const *members, size_t n, uint32_t p);

/*
 * The sticky balanced target.  members[0..n) are distinct names in any order;
 * cur[p] is the index in members[] of p's current live owner, or -1 when p is
 * free (unowned, or owned by a replica that is not a live member).  Fills
 * target[p] (an index into members[], or -1 only when n == 0).  cur and
 * target may not overlap.  Returns 0, or TDR_ENOMEM.
 */
int tdr_assign_balanced(const char *const *members, size_t n, uint32_t P, const int32_t *cur, int32_t *target,
			tdr_err *err);

/*
 * The fewest partitions that must change owner to go from cur (owners as
 * above, -1 for free) to any assignment where each member owns floor(P/n) or
 * ceil(P/n).  Free partitions always count.  SIZE_MAX if n == 0.
 */
size_t tdr_assign_min_moves(size_t n, uint32_t P, const int32_t *cur);

/*
 * The hand-back rule for one partition this replica holds (docs/DESIGN.md,
 * "Who owns what").  draining: we stopped claiming it because the target gave
 * it to another member; idle: the worker has said nothing of it is in flight.
 * Given ours (the current target gives it to us), updates both flags and
 * returns 1 when the partition is to be released now.  A partition that is
 * ours again is claimed again whatever it was doing: idle only ever meant
 * "nothing in flight", so keeping it after the target changed back would
 * leave the partition held and never drained.
 */
int tdr_assign_handback(int ours, unsigned char *draining, unsigned char *idle);

#endif
