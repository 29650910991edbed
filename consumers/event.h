/*
 * event.h - what a valid event is, and its compact form.
 *
 * tdr_event_validate() applies docs/EVENTS.md to one raw FIFO document and
 * either fills a tdr_cevent (pointers into the document: valid while it
 * lives) or writes the dead-letter reason "<field>: <problem>".
 * The compact form is what a batch delta carries to the fold:
 *   {i: insert_id, e: event, d: distinct_id, u: username (absent if none), t: created_at}
 */
#ifndef TDRAIN_EVENT_H
#define TDRAIN_EVENT_H

#include <bson/bson.h>
#include <stddef.h>
#include <stdint.h>

#include "lib/conf.h"

#define TDR_ID_MAX 128
#define TDR_INSERT_ID_MAX 128
#define TDR_EVENT_NAME_MAX 128
#define TDR_DISTINCT_ID_MAX 256
#define TDR_USERNAME_MAX 256
#define TDR_REASON_MAX 160

typedef struct tdr_cevent {
	const char *insert_id;
	const char *event;
	const char *distinct_id;
	const char *username; /* NULL when absent */
	uint32_t insert_id_len, event_len, distinct_id_len, username_len;
	int64_t created_at_ms;
} tdr_cevent;

/*
 * The size drain.max_event_bytes limits: the document's, without an int32
 * `part` field (tdrain's own, which triage may add and a requeue removes).
 */
int64_t tdr_event_size(const bson_t *doc);

/* 0 and *out filled, or -1 and reason filled. */
int tdr_event_validate(const bson_t *doc, const tdr_config *cfg, tdr_cevent *out, char *reason, size_t reasonlen);

/* Append ev in compact form as a document under key (e.g. array index). */
void tdr_cevent_append(bson_t *parent, const char *key, const tdr_cevent *ev);

/* Read a compact document back; 0 on success, -1 if it is not well-formed. */
int tdr_cevent_parse(const bson_t *compact, tdr_cevent *out);

/* Partition of an event _id: fnv1a32(canonical key) % P, or -1 for an unsupported _id type. */
int32_t tdr_event_partition(const bson_value_t *id, uint32_t P);

#endif
