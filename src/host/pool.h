/* pool.h: pools as accounting: worker slots and memory budgets, reserved
 * along a delegation chain and released exactly once, and the counters of
 * pool:stats(). Pools know nothing of jobs or processes. */
#ifndef HD_POOL_H
#define HD_POOL_H

#include <stddef.h>
#include <stdint.h>

#include "outcome.h"

typedef struct hd_pool hd_pool;

#define HD_MAX_CHAIN 16  /* pools in one delegation chain */
#define HD_MAX_CHAINS 32 /* candidate chains of one job */

/* The upper bounds, in seconds, of the buckets of a pool's histograms of
 * job times (queue and run), increasing; one more bucket, +Inf, takes the
 * rest. The one list of them: the binding hands it to the Lua side. */
#define HD_TIME_BOUNDS \
  0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60
#define HD_TIME_BUCKETS 17 /* the bounds above, and +Inf */

/* A pool's configuration. Root pools (no parent) own worker processes;
 * `sandbox` (HD_SPAWN_* flags) and `idle_ms` are theirs. */
typedef struct hd_pool_config {
  const char *name; /* may be NULL */
  double max_workers;
  double max_memory;
  double idle_ms;
  int sandbox;
  const char *init; /* root pools: the init closure's codec message, or NULL */
  size_t init_len;
  hd_pool *parent;  /* delegate_to, or NULL */
} hd_pool_config;

hd_pool *hd_pool_new(const hd_pool_config *cfg);
void hd_pool_ref(hd_pool *p);
void hd_pool_unref(hd_pool *p);

const char *hd_pool_name(const hd_pool *p);
hd_pool *hd_pool_parent(const hd_pool *p);
int hd_pool_sandbox(const hd_pool *p);

/* A root pool's init closure (its codec message): len 0 when it has none. */
void hd_pool_init(const hd_pool *p, const char **msg, size_t *len);
double hd_pool_idle_ms(const hd_pool *p);

/* A closed pool accepts no job. */
void hd_pool_set_closed(hd_pool *p);
int hd_pool_closed(const hd_pool *p);

/* In a forked child: the pool's counts were of the parent's jobs and
 * processes, which are not the child's; they all start again from zero.
 * Its configuration stays. */
void hd_pool_reset(hd_pool *p);

/* One pointer the layer above may keep on each pool; `drop` is called on
 * it when the pool is freed. */
void hd_pool_set_data(hd_pool *p, void *data, void (*drop)(void *));
void *hd_pool_data(const hd_pool *p);

/* What the layer above reports, for the counters. */
void hd_pool_note_queued(hd_pool *p, int delta);
void hd_pool_note_process(hd_pool *p, int delta, int started);

/* A snapshot of a pool's budget and counters. */
typedef struct hd_pool_stats {
  double running, queued, committed, max_workers, max_memory;
  double processes, processes_started;
  double started, succeeded, rejected;
  double by_outcome[HD_OUT_COUNT];
} hd_pool_stats;

void hd_pool_stats_of(const hd_pool *p, hd_pool_stats *out);

/* A snapshot of one histogram of job times: le[i] counts the jobs whose
 * time was at most bound i (cumulative; the last, +Inf, is `count`), `sum`
 * is their total in seconds. */
typedef struct hd_pool_hist {
  double le[HD_TIME_BUCKETS];
  double sum, count;
} hd_pool_hist;

/* The bucket bounds of HD_TIME_BOUNDS, HD_TIME_BUCKETS - 1 of them. */
const double *hd_pool_time_bounds(void);

/* The pool's histograms of the time its jobs waited for capacity (every
 * job that ended, rejected ones included) and of the time they ran (every
 * job that started and ended). */
void hd_pool_times_of(const hd_pool *p, hd_pool_hist *queue, hd_pool_hist *run);

/* The candidate chains of one job: lists of pools from the job's pool to a
 * root, each pool referenced; one of them reserves the job's capacity. */
typedef struct hd_chains hd_chains;

hd_chains *hd_chains_new(void);
void hd_chains_free(hd_chains *c);

/* Starts a new candidate chain; returns -1 past HD_MAX_CHAINS or when
 * memory runs out. */
int hd_chains_add(hd_chains *c);

/* Appends a pool to the last chain; -1 past HD_MAX_CHAIN. */
int hd_chains_push(hd_chains *c, hd_pool *p);

/* The chain of `p` and every pool it delegates to, as the only candidate. */
int hd_chains_follow(hd_chains *c, hd_pool *p);

int hd_chains_count(const hd_chains *c);
int hd_chains_len(const hd_chains *c, int i);

/* Reserves a slot and `heap` bytes in every pool of the first chain that
 * has room in all of them. Returns HD_OUT_NONE on success, or why the job
 * was not taken: the chain's own reason when there is one chain,
 * HD_OUT_NOWORKERS when no candidate of several accepted. */
hd_outcome hd_chains_reserve(hd_chains *c, uint64_t heap);

/* Gives back what hd_chains_reserve took; at most once. */
void hd_chains_release(hd_chains *c, uint64_t heap);

/* Whether waiting could ever help: some chain whose every pool could hold
 * `heap` if it were empty. */
int hd_chains_could_fit(const hd_chains *c, uint64_t heap);

/* The root pool of the reserving chain. */
hd_pool *hd_chains_root(const hd_chains *c);

/* Whether `p` is on the reserving chain (or, before a reservation, on any
 * candidate chain). */
int hd_chains_has(const hd_chains *c, const hd_pool *p);

/* Counts a job's start or outcome in the pools of the reserving chain, or,
 * for a job that never reserved, in `origin` alone. */
void hd_chains_count_start(hd_chains *c);
void hd_chains_count_outcome(hd_chains *c, hd_pool *origin, hd_outcome out);

/* Counts an ended job's times, in seconds, in the same pools as its
 * outcome: the time it waited for capacity, and the time it ran (negative
 * for a job that never started: it counts in the queue histogram only).
 * Called before hd_chains_release. */
void hd_chains_count_times(hd_chains *c, hd_pool *origin, double queue_s, double run_s);

#endif
