/*
 * ctl.h - tdrainctl subcommands.  Each returns a process exit status
 * (0 ok, 1 failure, 64 usage, 69 store unreachable) and prints its own errors.
 */
#ifndef TDRAIN_CTL_H
#define TDRAIN_CTL_H

#include "lib/conf.h"
#include "lib/store.h"

/* tdrainctl replay --from TIME --to TIME [--shadow COLL] [--dir DIR] [--dry-run] */
int ctl_replay(tdr_store *st, const tdr_config *cfg, int argc, char **argv);

#endif
