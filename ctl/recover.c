/*
 * recover.c - tdrainctl recover: delete the claim records of deposed epochs
 * now, instead of at the next holder's acquisition, so their events are plain
 * pending events again.  Each delete is fenced by the record's own {_id,
 * epoch}; recover_scope() argues why that is safe next to live replicas.
 */
#include "config.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sysexits.h>

#include "coord/coord.h"
#include "ctl/ctl.h"
#include "lib/bsonx.h"
#include "lib/store.h"

/*
 * Delete the orphaned claim records of one scope.  With a live holder at
 * epoch E, the orphans are the records of epochs < E: their writers were
 * deposed, and a deposed epoch never becomes current again, so nobody will
 * ever acknowledge them; the holder itself deletes exactly these on its next
 * acquisition.  With no live holder, every record of the scope is orphaned.
 * Each delete is fenced by {_id, epoch}.  The events named by a deleted
 * record are still in the FIFO (acknowledgement deletes the record before
 * the events), so they are plain pending events again and the holder claims
 * them with its next batch; the fold counts each insert_id once.
 */
static int recover_scope(struct ctl *c, int32_t part, const struct claimrec *recs, size_t nrecs,
			 const tdr_lease_info *leases, size_t nleases, int64_t *tot_recs, int64_t *tot_events,
			 tdr_err *err)
{
	char name[32], who[TDR_HOLDER_MAX + 64], scope[32], recids[128] = "";
	const tdr_lease_info *li;
	mongoc_collection_t *co;
	mongoc_bulk_operation_t *bulk;
	bson_t reply;
	int64_t nsel = 0, events = 0, removed;
	size_t el = 0;
	int live, rc, cut = 0;

	scope_lease_name(&c->cfg, part, name, sizeof(name));
	li = find_lease(leases, nleases, name);
	live = lease_live(li);
	if (c->cfg.mode == TDR_MODE_PARTITIONED)
		snprintf(scope, sizeof(scope), "partition %d", (int)part);
	else
		snprintf(scope, sizeof(scope), "single-mode scope");
	if (live) {
		char h[TDR_HOLDER_MAX];

		clean_text(li->holder, strlen(li->holder), h, sizeof(h));
		snprintf(who, sizeof(who), "held by %s at epoch %" PRId64, h, li->epoch);
	} else if (li) {
		snprintf(who, sizeof(who), "no holder (%s %s at epoch %" PRId64 ")", name, lease_state(li), li->epoch);
	} else {
		snprintf(who, sizeof(who), "no holder (no %s lease)", name);
	}

	co = tdr_store_coll(c->st, c->client, TDR_C_CLAIMS);
	bulk = tdr_bulk_new(co, 0);
	for (size_t i = 0; i < nrecs; i++) {
		bson_t f = BSON_INITIALIZER;

		if (recs[i].part != part || (live && recs[i].epoch >= li->epoch))
			continue;
		BSON_APPEND_UTF8(&f, "_id", recs[i].id);
		BSON_APPEND_INT64(&f, "epoch", recs[i].epoch);
		mongoc_bulk_operation_remove_one(bulk, &f);
		bson_destroy(&f);
		nsel++;
		events += recs[i].nids;
		/* The first few record ids, for the operator's log; "..." says there were more. */
		if (!cut && el + strlen(recs[i].id) + 5 < sizeof(recids)) {
			el += (size_t)snprintf(recids + el, sizeof(recids) - el, "%s%s", el ? " " : "", recs[i].id);
		} else if (!cut) {
			snprintf(recids + el, sizeof(recids) - el, " ...");
			cut = 1;
		}
	}
	if (nsel == 0) {
		mongoc_bulk_operation_destroy(bulk);
		mongoc_collection_destroy(co);
		printf("%s: %s: no orphaned claim records\n", scope, who);
		return 0;
	}
	/* tdr_bulk_run fills reply whether or not the bulk succeeded. */
	rc = tdr_bulk_run(bulk, "delete orphaned claim records", NULL, &reply, err);
	removed = rc == 0 ? tdr_bson_i64(&reply, "nRemoved", 0) : 0;
	bson_destroy(&reply);
	mongoc_bulk_operation_destroy(bulk);
	mongoc_collection_destroy(co);
	if (rc < 0)
		return rc;
	printf("%s: %s: deleted %" PRId64 " orphaned claim record%s (%" PRId64 " events pending again) [%s]",
	       scope, who, removed, removed == 1 ? "" : "s", events, recids);
	if (removed < nsel)
		printf("; %" PRId64 " already gone (acknowledged or recovered meanwhile)", nsel - removed);
	printf("\n");
	*tot_recs += removed;
	/* Events are counted per selected record: a record acknowledged meanwhile took its events with it. */
	*tot_events += removed == nsel ? events : events * removed / nsel;
	return 0;
}

int cmd_recover(struct ctl *c, int argc, char **argv)
{
	int all = 0, have_part = 0, rc;
	int64_t part = 0, recs_done = 0, events_done = 0, stray = 0;
	struct claimrec *recs = NULL;
	tdr_lease_info *leases = NULL;
	size_t nrecs = 0, nleases = 0;
	tdr_err err;

	for (int i = 1; i < argc; i++) {
		const char *v = NULL;
		int m;

		if (strcmp(argv[i], "--all") == 0) {
			all = 1;
		} else if ((m = opt_value(argc, argv, &i, "--partition", &v)) != 0) {
			if (m < 0 || tdr_parse_i64(v, 0, INT32_MAX, &part) < 0)
				return usage_error("recover: --partition needs a partition number");
			have_part = 1;
		} else {
			return usage_error("recover: unknown argument '%s'", argv[i]);
		}
	}
	if (all == have_part)
		return usage_error("recover: give --partition P or --all (not both)");
	if (have_part && c->cfg.mode != TDR_MODE_PARTITIONED)
		return usage_error("recover: single mode has one scope and no partitions: use --all");
	if (have_part && part >= c->cfg.partitions)
		return usage_error("recover: partition %lld is outside [0, %lld) (coord.partitions)", (long long)part,
				   (long long)c->cfg.partitions);
	if ((rc = connect_store(c, 1)) != 0 || (rc = connect_coord(c)) != 0)
		return rc;
	tdr_err_clear(&err);
	/* Claim records first, then leases: see gather_status() for why this order is the safe one. */
	if (read_claims(c, &recs, &nrecs, &err) < 0 || list_leases(c, &leases, &nleases, &err) < 0)
		goto fail;
	if (c->cfg.mode == TDR_MODE_SINGLE) {
		if (recover_scope(c, TDR_SCOPE_ALL, recs, nrecs, leases, nleases, &recs_done, &events_done, &err) < 0)
			goto fail;
	} else {
		int64_t lo = all ? 0 : part, hi = all ? c->cfg.partitions : part + 1;

		for (int64_t p = lo; p < hi; p++)
			if (recover_scope(c, (int32_t)p, recs, nrecs, leases, nleases, &recs_done, &events_done, &err) < 0)
				goto fail;
	}
	for (size_t i = 0; i < nrecs; i++)
		stray += !part_in_mode(&c->cfg, recs[i].part);
	printf("recovered %" PRId64 " claim record%s holding %" PRId64 " events: they are pending again and the "
	       "current holders claim them next\n",
	       recs_done, recs_done == 1 ? "" : "s", events_done);
	if (stray)
		printf("left alone: %" PRId64 " claim record%s of partitions that do not exist in %s mode with %lld "
		       "partitions: check coord.mode and coord.partitions against the replicas'\n",
		       stray, stray == 1 ? "" : "s", tdr_mode_name(c->cfg.mode), (long long)c->cfg.partitions);
	free(recs);
	free(leases);
	return EX_OK;
fail:
	fprintf(stderr, PROG ": recover: %s\n", err.msg);
	free(recs);
	free(leases);
	return exit_for(&err);
}
