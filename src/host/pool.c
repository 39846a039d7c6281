/* pool.c: pools as accounting: worker slots and memory budgets, reserved
 * along a delegation chain and released exactly once. */
#include "pool.h"

#include <stdlib.h>
#include <string.h>

/* One histogram of job times, by bucket (not cumulative: a job counts in
 * one bucket); hd_pool_times_of cumulates them. */
typedef struct pool_hist {
  double n[HD_TIME_BUCKETS];
  double sum;
} pool_hist;

static const double pool_bounds[] = {HD_TIME_BOUNDS};

_Static_assert(sizeof pool_bounds / sizeof pool_bounds[0] == HD_TIME_BUCKETS - 1,
               "HD_TIME_BUCKETS is the number of HD_TIME_BOUNDS plus one, for +Inf");

struct hd_pool {
  int refs;             /* the Lua object, child pools, chains, the layer above */
  char *name;
  double max_workers;
  double max_memory;
  double idle_ms;
  int sandbox;
  char *init;           /* the init closure's codec message, or NULL */
  size_t init_len;
  hd_pool *parent;      /* holds a reference */
  int closed;
  double running;       /* slots reserved */
  double committed;     /* bytes reserved */
  double queued;
  double procs;         /* processes alive */
  double spawned;
  double started, succeeded, rejected;
  double by_outcome[HD_OUT_COUNT];
  pool_hist queue_time, run_time;
  void *data;
  void (*drop)(void *);
};

hd_pool *hd_pool_new(const hd_pool_config *cfg) {
  hd_pool *p = calloc(1, sizeof *p);
  if (p == NULL) return NULL;
  if (cfg->name != NULL && (p->name = strdup(cfg->name)) == NULL) {
    free(p);
    return NULL;
  }
  p->refs = 1;
  p->max_workers = cfg->max_workers;
  p->max_memory = cfg->max_memory;
  p->idle_ms = cfg->idle_ms;
  p->sandbox = cfg->sandbox;
  if (cfg->init != NULL && cfg->init_len > 0) {
    p->init = malloc(cfg->init_len);
    if (p->init == NULL) {
      free(p->name);
      free(p);
      return NULL;
    }
    memcpy(p->init, cfg->init, cfg->init_len);
    p->init_len = cfg->init_len;
  }
  p->parent = cfg->parent;
  if (p->parent) hd_pool_ref(p->parent);
  return p;
}

void hd_pool_ref(hd_pool *p) {
  p->refs++;
}

void hd_pool_unref(hd_pool *p) {
  if (--p->refs > 0) return;
  if (p->drop) p->drop(p->data);
  if (p->parent) hd_pool_unref(p->parent);
  free(p->init);
  free(p->name);
  free(p);
}

const char *hd_pool_name(const hd_pool *p) {
  return p->name;
}

hd_pool *hd_pool_parent(const hd_pool *p) {
  return p->parent;
}

int hd_pool_sandbox(const hd_pool *p) {
  return p->sandbox;
}

void hd_pool_init(const hd_pool *p, const char **msg, size_t *len) {
  *msg = p->init;
  *len = p->init ? p->init_len : 0;
}

double hd_pool_idle_ms(const hd_pool *p) {
  return p->idle_ms;
}

void hd_pool_reset(hd_pool *p) {
  p->running = p->committed = p->queued = p->procs = p->spawned = 0;
  p->started = p->succeeded = p->rejected = 0;
  memset(p->by_outcome, 0, sizeof p->by_outcome);
  memset(&p->queue_time, 0, sizeof p->queue_time);
  memset(&p->run_time, 0, sizeof p->run_time);
}

void hd_pool_set_closed(hd_pool *p) {
  p->closed = 1;
}

int hd_pool_closed(const hd_pool *p) {
  return p->closed;
}

void hd_pool_set_data(hd_pool *p, void *data, void (*drop)(void *)) {
  p->data = data;
  p->drop = drop;
}

void *hd_pool_data(const hd_pool *p) {
  return p->data;
}

void hd_pool_note_queued(hd_pool *p, int delta) {
  p->queued += delta;
}

void hd_pool_note_process(hd_pool *p, int delta, int started) {
  p->procs += delta;
  if (started) p->spawned++;
}

void hd_pool_stats_of(const hd_pool *p, hd_pool_stats *out) {
  out->running = p->running;
  out->queued = p->queued;
  out->committed = p->committed;
  out->max_workers = p->max_workers;
  out->max_memory = p->max_memory;
  out->processes = p->procs;
  out->processes_started = p->spawned;
  out->started = p->started;
  out->succeeded = p->succeeded;
  out->rejected = p->rejected;
  memcpy(out->by_outcome, p->by_outcome, sizeof out->by_outcome);
}

const double *hd_pool_time_bounds(void) {
  return pool_bounds;
}

static void pool_hist_snapshot(const pool_hist *h, hd_pool_hist *out) {
  double acc = 0;
  int i;
  for (i = 0; i < HD_TIME_BUCKETS; i++) {
    acc += h->n[i];
    out->le[i] = acc;
  }
  out->count = acc;
  out->sum = h->sum;
}

void hd_pool_times_of(const hd_pool *p, hd_pool_hist *queue, hd_pool_hist *run) {
  pool_hist_snapshot(&p->queue_time, queue);
  pool_hist_snapshot(&p->run_time, run);
}

/* The bucket of a time: the first whose bound it does not pass (a bound is
 * inclusive, as Prometheus's `le`). */
static int pool_bucket(double s) {
  int i = 0;
  while (i < HD_TIME_BUCKETS - 1 && s > pool_bounds[i]) i++;
  return i;
}

static void pool_hist_add(pool_hist *h, int bucket, double s) {
  h->n[bucket]++;
  h->sum += s;
}

/* ---- Chains ---------------------------------------------------------------- */

struct hd_chains {
  int n;                          /* candidate chains */
  int reserved;                   /* the chain that reserved, or -1 */
  int len[HD_MAX_CHAINS];
  hd_pool *(*pools)[HD_MAX_CHAIN]; /* one0, or an allocated array */
  int cap;
  hd_pool *one0[1][HD_MAX_CHAIN];
};

hd_chains *hd_chains_new(void) {
  hd_chains *c = calloc(1, sizeof *c);
  if (c == NULL) return NULL;
  c->reserved = -1;
  c->pools = c->one0;
  c->cap = 1;
  return c;
}

void hd_chains_free(hd_chains *c) {
  int i, k;
  if (c == NULL) return;
  for (i = 0; i < c->n; i++)
    for (k = 0; k < c->len[i]; k++) hd_pool_unref(c->pools[i][k]);
  if (c->pools != c->one0) free(c->pools);
  free(c);
}

int hd_chains_add(hd_chains *c) {
  if (c->n >= HD_MAX_CHAINS) return -1;
  if (c->n == c->cap) {
    hd_pool *(*more)[HD_MAX_CHAIN] = calloc(HD_MAX_CHAINS, sizeof *more);
    if (more == NULL) return -1;
    memcpy(more, c->pools, (size_t)c->n * sizeof *more);
    if (c->pools != c->one0) free(c->pools);
    c->pools = more;
    c->cap = HD_MAX_CHAINS;
  }
  c->len[c->n++] = 0;
  return 0;
}

int hd_chains_push(hd_chains *c, hd_pool *p) {
  int i = c->n - 1;
  if (i < 0 || c->len[i] >= HD_MAX_CHAIN) return -1;
  hd_pool_ref(p);
  c->pools[i][c->len[i]++] = p;
  return 0;
}

int hd_chains_follow(hd_chains *c, hd_pool *p) {
  if (hd_chains_add(c) != 0) return -1;
  for (; p != NULL; p = p->parent)
    if (hd_chains_push(c, p) != 0) return -1;
  return 0;
}

int hd_chains_count(const hd_chains *c) {
  return c->n;
}

int hd_chains_len(const hd_chains *c, int i) {
  return c->len[i];
}

/* Why one pool cannot take the job now, checked as upstream does: slots
 * first, then memory. */
static hd_outcome pool_check(const hd_pool *p, uint64_t heap) {
  if (p->closed || p->running + 1 > p->max_workers) return HD_OUT_NOWORKERS;
  if (p->committed + (double)heap > p->max_memory) return HD_OUT_NOMEMORY;
  return HD_OUT_NONE;
}

hd_outcome hd_chains_reserve(hd_chains *c, uint64_t heap) {
  int i, k;
  hd_outcome first = HD_OUT_NOWORKERS;
  /* delegate_fun gave no candidate: nobody can take it. */
  if (c->n == 0) return HD_OUT_NOWORKERS;
  for (i = 0; i < c->n; i++) {
    hd_outcome why = HD_OUT_NONE;
    for (k = 0; k < c->len[i] && why == HD_OUT_NONE; k++) why = pool_check(c->pools[i][k], heap);
    if (why == HD_OUT_NONE) {
      for (k = 0; k < c->len[i]; k++) {
        c->pools[i][k]->running += 1;
        c->pools[i][k]->committed += (double)heap;
      }
      c->reserved = i;
      return HD_OUT_NONE;
    }
    if (i == 0) first = why;
  }
  return c->n == 1 ? first : HD_OUT_NOWORKERS;
}

void hd_chains_release(hd_chains *c, uint64_t heap) {
  int k;
  if (c->reserved < 0) return;
  for (k = 0; k < c->len[c->reserved]; k++) {
    hd_pool *p = c->pools[c->reserved][k];
    p->running -= 1;
    p->committed -= (double)heap;
    if (p->running < 0.5) {
      /* Sums of doubles drift; an empty pool is exactly empty. */
      p->running = 0;
      p->committed = 0;
    }
  }
  c->reserved = -1;
}

int hd_chains_could_fit(const hd_chains *c, uint64_t heap) {
  int i, k;
  for (i = 0; i < c->n; i++) {
    int ok = 1;
    for (k = 0; k < c->len[i]; k++) {
      const hd_pool *p = c->pools[i][k];
      if (p->closed || p->max_workers < 1 || (double)heap > p->max_memory) ok = 0;
    }
    if (ok) return 1;
  }
  return 0;
}

hd_pool *hd_chains_root(const hd_chains *c) {
  return c->pools[c->reserved][c->len[c->reserved] - 1];
}

int hd_chains_has(const hd_chains *c, const hd_pool *p) {
  int i, k;
  for (i = 0; i < c->n; i++) {
    if (c->reserved >= 0 && i != c->reserved) continue;
    for (k = 0; k < c->len[i]; k++)
      if (c->pools[i][k] == p) return 1;
  }
  return 0;
}

void hd_chains_count_start(hd_chains *c) {
  int k;
  for (k = 0; k < c->len[c->reserved]; k++) c->pools[c->reserved][k]->started++;
}

void hd_chains_count_outcome(hd_chains *c, hd_pool *origin, hd_outcome out) {
  int k;
  if (c->reserved < 0) {
    origin->by_outcome[out]++;
    if (HD_OUT_IS_REJECT(out)) origin->rejected++;
    return;
  }
  for (k = 0; k < c->len[c->reserved]; k++) {
    hd_pool *p = c->pools[c->reserved][k];
    p->by_outcome[out]++;
    if (out == HD_OUT_OK) p->succeeded++;
  }
}

void hd_chains_count_times(hd_chains *c, hd_pool *origin, double queue_s, double run_s) {
  int k, qb = pool_bucket(queue_s), rb = run_s >= 0 ? pool_bucket(run_s) : -1;
  if (c->reserved < 0) {
    pool_hist_add(&origin->queue_time, qb, queue_s);
    if (rb >= 0) pool_hist_add(&origin->run_time, rb, run_s);
    return;
  }
  for (k = 0; k < c->len[c->reserved]; k++) {
    hd_pool *p = c->pools[c->reserved][k];
    pool_hist_add(&p->queue_time, qb, queue_s);
    if (rb >= 0) pool_hist_add(&p->run_time, rb, run_s);
  }
}
