/*
 * fold_identity.c - device -> username links (docs/DESIGN.md, "Identity and
 * the username projection"): the tie-break between two signed-in events, and
 * the identity_map and username_metrics updates of a round, which move a
 * device's whole count when it is (re)linked so nothing re-reads history.
 */
#include "config.h"

#include <stdlib.h>
#include <string.h>

#include "consumers/fold_internal.h"
#include "consumers/projections.h"
#include "lib/bsonx.h"

struct userdelta {
	int64_t count, devices;
};

int fold_cmp_link(int64_t ta, const char *ua, size_t la, int64_t tb, const char *ub, size_t lb)
{
	/* Later created_at wins; ties go to the greater username (docs/EVENTS.md). */
	int c;

	if (ta != tb)
		return ta < tb ? -1 : 1;
	c = memcmp(ua, ub, la < lb ? la : lb);
	if (c)
		return c;
	return la < lb ? -1 : la > lb;
}

static struct userdelta *user_delta(tdr_map *users, const char *u, size_t ulen)
{
	struct userdelta *ud = tdr_map_get(users, u, ulen);

	if (ud == NULL) {
		ud = calloc(1, sizeof(*ud));
		if (ud == NULL || tdr_map_put(users, u, ulen, ud) < 0) {
			free(ud);
			return NULL;
		}
	}
	return ud;
}

/*
 * Resolve each touched device's link from its current identity_map and
 * device_metrics documents, and record identity_map and username_metrics
 * updates.  username_metrics.count stays the sum of device_metrics.count over
 * the devices linked to it: a (re)link moves the device's whole count as one
 * forward delta, and nothing re-reads history.
 */
int fold_resolve_identities(tdr_map *devs, const struct fold_cache *fc, bson_t *writes, uint32_t *idx, tdr_err *err)
{
	tdr_map *users = tdr_map_new(256);
	size_t pos = 0, klen;
	const char *key;
	void *v;
	int rc = 0;

	if (users == NULL)
		return tdr_err_set(err, TDR_ENOMEM, "out of memory");
	while (tdr_map_next(devs, &pos, &key, &klen, &v)) {
		struct devround *dr = v;
		bson_t itmp, dtmp;
		const bson_t *idoc = fold_cache_doc(fc, fold_coll_index(TDR_C_IDENTITIES), key, klen, &itmp),
			     *ddoc = fold_cache_doc(fc, fold_coll_index(TDR_C_DEVICES), key, klen, &dtmp);
		const char *old_u = idoc ? tdr_bson_str(idoc, "username", NULL) : NULL;
		uint32_t old_ulen = 0;
		int64_t old_t = 0, before = ddoc ? tdr_bson_i64(ddoc, "count", 0) : 0;
		int improves, changes_user;
		bson_iter_t it;

		if (old_u) {
			old_u = tdr_bson_str(idoc, "username", &old_ulen);
			if (bson_iter_init_find(&it, idoc, "linked_at") && BSON_ITER_HOLDS_DATE_TIME(&it))
				old_t = bson_iter_date_time(&it);
		}
		improves = dr->best_u &&
			   (!old_u || fold_cmp_link(dr->best_t, dr->best_u, dr->best_ulen, old_t, old_u, old_ulen) > 0);
		changes_user = improves && !(old_u && old_ulen == dr->best_ulen && memcmp(old_u, dr->best_u, old_ulen) == 0);
		if (changes_user) {
			struct userdelta *ud;

			if (old_u) {
				if ((ud = user_delta(users, old_u, old_ulen)) == NULL)
					goto oom;
				ud->count -= before;
				ud->devices -= 1;
			}
			if ((ud = user_delta(users, dr->best_u, dr->best_ulen)) == NULL)
				goto oom;
			ud->count += before + dr->inc;
			ud->devices += 1;
		} else if (old_u) {
			struct userdelta *ud = user_delta(users, old_u, old_ulen);

			if (ud == NULL)
				goto oom;
			ud->count += dr->inc;
		}
		if (improves) {
			bson_t u = BSON_INITIALIZER, set;

			BSON_APPEND_DOCUMENT_BEGIN(&u, "set", &set);
			bson_append_utf8(&set, "username", -1, dr->best_u, (int)dr->best_ulen);
			BSON_APPEND_DATE_TIME(&set, "linked_at", dr->best_t);
			bson_append_document_end(&u, &set);
			tdr_projection_record(writes, idx, TDR_C_IDENTITIES, key, klen, &u);
			bson_destroy(&u);
		}
	}
	pos = 0;
	while (tdr_map_next(users, &pos, &key, &klen, &v)) {
		struct userdelta *ud = v;
		bson_t u = BSON_INITIALIZER, d;

		if (ud->count == 0 && ud->devices == 0)
			continue;
		BSON_APPEND_DOCUMENT_BEGIN(&u, "inc", &d);
		BSON_APPEND_INT64(&d, "count", ud->count);
		BSON_APPEND_INT64(&d, "devices", ud->devices);
		bson_append_document_end(&u, &d);
		tdr_projection_record(writes, idx, TDR_C_USERS, key, klen, &u);
		bson_destroy(&u);
	}
	tdr_map_free(users, free);
	return rc;
oom:
	tdr_map_free(users, free);
	return tdr_err_set(err, TDR_ENOMEM, "out of memory");
}
