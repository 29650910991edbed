/*
 * loadgen.h - what loadgen.c (the stream, the options, the inserts) and
 * corpus.c (the malformed corpus) of tdrain-loadgen share.
 */
#ifndef TDRAIN_BENCH_LOADGEN_H
#define TDRAIN_BENCH_LOADGEN_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include <bson/bson.h>

struct opts;
struct device;

/* The generator's state, one per run. */
struct gen {
	const struct opts *o;
	struct device *dev;
	int64_t ndev;
	int64_t base, span;
	int64_t made;        /* unique events generated (including tie partners) */
	int64_t dups;        /* duplicate documents generated */
	int64_t bad;         /* malformed corpus documents generated */
	int64_t edge;        /* valid limit-case corpus documents generated */
	size_t ci;           /* next corpus entry */
	int skip_bad_utf8;   /* the store rewrites invalid UTF-8: leave those kinds out */
	bson_t *pending;     /* a tie partner's body, emitted next */
	/* Pending duplicates: a binary min-heap on the event number they are due at. */
	struct dup {
		int64_t due;
		bson_t *body;
	} *heap;
	size_t nheap, capheap;
	FILE *manifest;
};

/* loadgen.c: a uuid-like insert_id, unique across processes. */
void make_insert_id(char buf[37]);
/* Prefix a body with an _id (a fresh ObjectId when id is NULL) and append part. */
int finish_doc(const struct gen *g, bson_t *doc, const bson_t *body, const bson_value_t *id);

/* corpus.c: one entry per way a document can break docs/EVENTS.md. */
struct corpus_kind {
	const char *kind;
	const char *reason; /* NULL: a valid limit case */
	int bad_utf8;       /* holds invalid UTF-8: skipped on stores that rewrite it (FerretDB) */
};
extern const struct corpus_kind corpus[];
extern const size_t ncorpus;
/* Corpus entry k as a whole document; fills the manifest's _id JSON. */
int corpus_doc(struct gen *g, size_t k, bson_t *doc, char *idjson, size_t idlen);

#endif
