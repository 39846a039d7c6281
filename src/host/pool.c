/* pool.c: pools: worker slots and memory budgets, reserved along a
 * delegation chain and released exactly once. */
#include <stdlib.h>
#include <string.h>

#include "core.h"

hd_pool *hd_pool_new(hd_core *c, const char *name, double max_workers, double max_memory,
                     hd_pool *parent, double idle_ms, int sandbox) {
  hd_pool *p = calloc(1, sizeof *p);
  if (p == NULL) return NULL;
  if (name != NULL && (p->name = strdup(name)) == NULL) {
    free(p);
    return NULL;
  }
  p->core = c;
  p->refs = 1;
  p->max_workers = max_workers;
  p->max_memory = max_memory;
  p->idle_ms = idle_ms;
  p->sandbox = sandbox;
  p->parent = parent;
  if (parent) hd_pool_ref(parent);
  c->refs++;
  return p;
}

void hd_pool_ref(hd_pool *p) {
  p->refs++;
}

void hd_pool_unref(hd_pool *p) {
  hd_core *c;
  if (--p->refs > 0) return;
  c = p->core;
  if (p->parent) hd_pool_unref(p->parent);
  free(p->name);
  free(p);
  hd_core_unref(c);
}

/* Why one pool cannot take the job now, checked as upstream does: slots
 * first, then memory. */
static hd_outcome pool_check(hd_pool *p, uint64_t heap) {
  if (p->closed || p->running + 1 > p->max_workers) return HD_OUT_NOWORKERS;
  if (p->committed + (double)heap > p->max_memory) return HD_OUT_NOMEMORY;
  return HD_OUT_NONE;
}

/* Reserves a slot and max_heap bytes in every pool of the first candidate
 * chain that has room in all of them. Returns HD_OUT_NONE on success, or
 * why the job was not taken: the chain's own reason when there is one
 * chain, NoWorkersAvailable when no candidate of several accepted. */
hd_outcome hd_pool_try_reserve(hd_job *j) {
  int i, k;
  hd_outcome first = HD_OUT_NOWORKERS;
  /* delegate_fun gave no candidate: nobody can take it. */
  if (j->nchains == 0) return HD_OUT_NOWORKERS;
  for (i = 0; i < j->nchains; i++) {
    hd_outcome why = HD_OUT_NONE;
    for (k = 0; k < j->chain_len[i] && why == HD_OUT_NONE; k++)
      why = pool_check(j->chains[i][k], j->max_heap);
    if (why == HD_OUT_NONE) {
      for (k = 0; k < j->chain_len[i]; k++) {
        j->chains[i][k]->running += 1;
        j->chains[i][k]->committed += (double)j->max_heap;
      }
      j->chain = i;
      return HD_OUT_NONE;
    }
    if (i == 0) first = why;
  }
  return j->nchains == 1 ? first : HD_OUT_NOWORKERS;
}

/* Whether waiting could ever help: some chain whose every pool could hold
 * the job if it were empty. */
int hd_pool_could_ever_fit(hd_job *j) {
  int i, k;
  for (i = 0; i < j->nchains; i++) {
    int ok = 1;
    for (k = 0; k < j->chain_len[i]; k++) {
      hd_pool *p = j->chains[i][k];
      if (p->closed || p->max_workers < 1 || (double)j->max_heap > p->max_memory) ok = 0;
    }
    if (ok) return 1;
  }
  return 0;
}

void hd_pool_release(hd_job *j) {
  int k;
  if (j->chain < 0) return;
  for (k = 0; k < j->chain_len[j->chain]; k++) {
    hd_pool *p = j->chains[j->chain][k];
    p->running -= 1;
    p->committed -= (double)j->max_heap;
    if (p->running < 0.5) {
      /* Sums of doubles drift; an empty pool is exactly empty. */
      p->running = 0;
      p->committed = 0;
    }
  }
  j->chain = -1;
}

/* Whether `p` is the job's own pool or one it was (or may be) delegated to. */
int hd_pool_in_chain(hd_job *j, hd_pool *p) {
  int i, k;
  for (i = 0; i < j->nchains; i++) {
    if (j->state == HD_JOB_RUNNING && i != j->chain) continue;
    for (k = 0; k < j->chain_len[i]; k++)
      if (j->chains[i][k] == p) return 1;
  }
  return 0;
}

hd_pool *hd_job_root(hd_job *j) {
  return j->chains[j->chain][j->chain_len[j->chain] - 1];
}

/* Kills the pool's jobs and ends its idle processes; busy ones end when
 * their jobs do. */
static int pool_holds(hd_job *j, void *p) {
  return hd_pool_in_chain(j, p);
}

void hd_pool_close(hd_pool *p) {
  hd_proc *q;
  p->closed = 1;
  hd_job_kill_where(p->core, pool_holds, NULL, p);
  while ((q = p->idle) != NULL) hd_proc_retire(q);
}
