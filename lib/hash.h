/*
 * hash.h - the partition hash.
 *
 * FNV-1a, 32-bit (offset basis 2166136261, prime 16777619): standard, with
 * implementations in every language, so a producer can compute an event's
 * partition itself.  Input is the canonical key of the event's _id:
 *   ObjectId -> its 24 lowercase hex characters;  string -> its UTF-8 bytes.
 * (tdr_id_key also renders integers, as decimal text, for tools; events with
 * integer _ids are dead-lettered: docs/EVENTS.md.)
 * partition = fnv1a32(key) % partition_count.  Test vectors: docs/EVENTS.md.
 */
#ifndef TDRAIN_HASH_H
#define TDRAIN_HASH_H

#include <stddef.h>
#include <stdint.h>

uint32_t tdr_fnv1a32(const void *data, size_t len);

/* Rendezvous (highest random weight) score of (member, partition). */
uint64_t tdr_hrw_score(const char *member, uint32_t partition);
/* The same score from the member's tdr_fnv1a32 hash, for callers that score one member many times. */
uint64_t tdr_hrw_score_hashed(uint32_t member_hash, uint32_t partition);

#endif
