/*
 * assign.h - which live replica owns which partition (pure functions).
 *
 * Rendezvous hashing (highest random weight): partition p belongs to the
 * member with the greatest tdr_hrw_score(member, p).  Every replica computes
 * the same answer from the same member set, without talking to the others,
 * and when a member joins or leaves only the partitions it wins or held move
 * (about P/n of them: the minimum).
 */
#ifndef TDRAIN_ASSIGN_H
#define TDRAIN_ASSIGN_H

#include <stddef.h>
#include <stdint.h>

/* Index into members[] of p's owner, or -1 if n == 0. */
int tdr_assign_owner(const char *const *members, size_t n, uint32_t p);

/* Fill mine[] with the partitions of [0, P) that member "me" owns; returns how many. */
size_t tdr_assign_mine(const char *const *members, size_t n, const char *me, uint32_t P, uint32_t *mine);

/* How many of P partitions change owner between two member sets. */
size_t tdr_assign_moves(const char *const *a, size_t na, const char *const *b, size_t nb, uint32_t P);

#endif
