/*
 * map.h - string-keyed hash map (open addressing), for per-round aggregation.
 * Keys are copied; values are owned by the caller unless tdr_map_free is given
 * a destructor.
 */
#ifndef TDRAIN_MAP_H
#define TDRAIN_MAP_H

#include <stddef.h>

typedef struct tdr_map tdr_map;

tdr_map *tdr_map_new(size_t hint);
void tdr_map_free(tdr_map *m, void (*free_value)(void *));
/* Value for key, or NULL. */
void *tdr_map_get(const tdr_map *m, const char *key, size_t klen);
/* Insert or replace; returns 0, or -1 on allocation failure. */
int tdr_map_put(tdr_map *m, const char *key, size_t klen, void *value);
size_t tdr_map_count(const tdr_map *m);
/* Iterate: *pos starts at 0; returns 0 when done. */
int tdr_map_next(const tdr_map *m, size_t *pos, const char **ret_key, size_t *ret_klen, void **ret_value);
void tdr_map_clear(tdr_map *m, void (*free_value)(void *));

#endif
