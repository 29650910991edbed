#include "config.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "lib/hash.h"
#include "lib/map.h"

struct slot {
	char *key; /* NULL: empty */
	size_t klen;
	uint32_t hash;
	void *value;
};

struct tdr_map {
	struct slot *slots;
	size_t cap, count;
};

tdr_map *tdr_map_new(size_t hint)
{
	tdr_map *m = calloc(1, sizeof(*m));
	size_t cap = 16;

	if (m == NULL)
		return NULL;
	while (cap < hint * 2)
		cap *= 2;
	m->slots = calloc(cap, sizeof(*m->slots));
	if (m->slots == NULL) {
		free(m);
		return NULL;
	}
	m->cap = cap;
	return m;
}

void tdr_map_clear(tdr_map *m, void (*free_value)(void *))
{
	for (size_t i = 0; i < m->cap; i++)
		if (m->slots[i].key) {
			if (free_value)
				free_value(m->slots[i].value);
			free(m->slots[i].key);
			m->slots[i].key = NULL;
		}
	m->count = 0;
}

void tdr_map_free(tdr_map *m, void (*free_value)(void *))
{
	if (m == NULL)
		return;
	tdr_map_clear(m, free_value);
	free(m->slots);
	free(m);
}

static struct slot *lookup(const tdr_map *m, const char *key, size_t klen, uint32_t h)
{
	size_t i = h & (m->cap - 1);

	for (;;) {
		struct slot *s = &m->slots[i];

		if (s->key == NULL || (s->hash == h && s->klen == klen && memcmp(s->key, key, klen) == 0))
			return s;
		i = (i + 1) & (m->cap - 1);
	}
}

void *tdr_map_get(const tdr_map *m, const char *key, size_t klen)
{
	struct slot *s = lookup(m, key, klen, tdr_fnv1a32(key, klen));

	return s->key ? s->value : NULL;
}

static int grow(tdr_map *m)
{
	struct slot *old = m->slots;
	size_t ocap = m->cap;

	m->slots = calloc(ocap * 2, sizeof(*m->slots));
	if (m->slots == NULL) {
		m->slots = old;
		return -1;
	}
	m->cap = ocap * 2;
	for (size_t i = 0; i < ocap; i++)
		if (old[i].key)
			*lookup(m, old[i].key, old[i].klen, old[i].hash) = old[i];
	free(old);
	return 0;
}

int tdr_map_put(tdr_map *m, const char *key, size_t klen, void *value)
{
	uint32_t h = tdr_fnv1a32(key, klen);
	struct slot *s;

	if ((m->count + 1) * 4 > m->cap * 3 && grow(m) < 0)
		return -1;
	s = lookup(m, key, klen, h);
	if (s->key == NULL) {
		s->key = malloc(klen + 1);
		if (s->key == NULL)
			return -1;
		memcpy(s->key, key, klen);
		s->key[klen] = '\0';
		s->klen = klen;
		s->hash = h;
		m->count++;
	}
	s->value = value;
	return 0;
}

size_t tdr_map_count(const tdr_map *m)
{
	return m->count;
}

int tdr_map_next(const tdr_map *m, size_t *pos, const char **ret_key, size_t *ret_klen, void **ret_value)
{
	while (*pos < m->cap) {
		struct slot *s = &m->slots[(*pos)++];

		if (s->key) {
			*ret_key = s->key;
			*ret_klen = s->klen;
			*ret_value = s->value;
			return 1;
		}
	}
	return 0;
}
