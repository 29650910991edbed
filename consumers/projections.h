/* projections.h - the built-in independent projections (see consumer.h). */
#ifndef TDRAIN_PROJECTIONS_H
#define TDRAIN_PROJECTIONS_H

#include "consumers/consumer.h"

/* Terminated by an entry with name == NULL. */
extern const tdr_projection tdr_projections[];

/*
 * Append one {c: coll, k: key, u: update} record to writes at *idx: what
 * emit() writes, and what the fold's identity updates write too.
 */
void tdr_projection_record(bson_t *writes, uint32_t *idx, const char *coll, const char *key, size_t klen,
			   const bson_t *update);

#endif
