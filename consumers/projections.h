/* projections.h - the built-in independent projections (see consumer.h). */
#ifndef TDRAIN_PROJECTIONS_H
#define TDRAIN_PROJECTIONS_H

#include "consumers/consumer.h"

/* Terminated by an entry with name == NULL. */
extern const tdr_projection tdr_projections[];

#endif
