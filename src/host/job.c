/* job.c: a job's life: reserve, queue, start, time out, end exactly once. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core.h"
#include "wire.h"

/* How long to wait for a killed process's exit report before ending its job
 * anyway; the supervisor reports within microseconds unless it is gone. */
#define HD_KILL_GRACE_MS 2000

hd_job *hd_job_new(hd_core *c) {
  hd_job *j = calloc(1, sizeof *j);
  if (j == NULL) return NULL;
  j->core = c;
  j->refs = 1;
  j->id = ++c->next_job;
  j->chain = -1;
  j->status = -1;
  j->chains = j->chain0;
  c->refs++;
  return j;
}

static void job_free(hd_job *j) {
  int i, k;
  hd_core *c = j->core;
  for (i = 0; i < j->nchains; i++)
    for (k = 0; k < j->chain_len[i]; k++) hd_pool_unref(j->chains[i][k]);
  if (j->chains != j->chain0) free(j->chains);
  if (j->origin) hd_pool_unref(j->origin);
  free(j->task_name);
  hd_core_give_buf(c, &j->frame);
  free(j);
  hd_core_unref(c);
}

void hd_job_unref(hd_job *j) {
  if (--j->refs == 0) job_free(j);
}

static void job_timer_close_cb(uv_handle_t *h) {
  hd_job *j = h->data;
  j->timer_open = 0;
  hd_job_unref(j);
}

static void job_timer_cb(uv_timer_t *t);

static void job_timer_start(hd_job *j, double ms) {
  /* libuv counts whole milliseconds from the loop's cached time, so a timer
   * can fire up to a millisecond early; the deadline in nanoseconds is what
   * the callback checks. */
  j->deadline = uv_hrtime() + (uint64_t)(ms * 1e6);
  if (!j->timer_open) {
    uv_timer_init(&j->core->loop, &j->timer);
    j->timer.data = j;
    j->timer_open = 1;
    j->refs++;
  }
  if (ms < 0) ms = 0;
  if (ms > 1e15) ms = 1e15;
  uv_timer_start(&j->timer, job_timer_cb, (uint64_t)ms, 0);
}

static hd_pool *job_origin(hd_job *j) {
  return j->origin;
}

static void job_unqueue(hd_job *j) {
  hd_core *c = j->core;
  hd_pool *o = job_origin(j);
  if (j->qprev) j->qprev->qnext = j->qnext;
  else c->queue_head = j->qnext;
  if (j->qnext) j->qnext->qprev = j->qprev;
  else c->queue_tail = j->qprev;
  j->qnext = j->qprev = NULL;
  if (j->pprev) j->pprev->pnext = j->pnext;
  else o->qhead = j->pnext;
  if (j->pnext) j->pnext->pprev = j->pprev;
  else o->qtail = j->pprev;
  j->pnext = j->pprev = NULL;
  o->queued--;
  if (o->qhead == NULL && o->waiting) {
    if (o->wprev) o->wprev->wnext = o->wnext;
    else c->waiting = o->wnext;
    if (o->wnext) o->wnext->wprev = o->wprev;
    o->wnext = o->wprev = NULL;
    o->waiting = 0;
  }
}

static void job_enqueue(hd_job *j) {
  hd_core *c = j->core;
  hd_pool *o = job_origin(j);
  j->state = HD_JOB_QUEUED;
  j->qprev = c->queue_tail;
  j->qnext = NULL;
  if (c->queue_tail) c->queue_tail->qnext = j;
  else c->queue_head = j;
  c->queue_tail = j;
  j->pprev = o->qtail;
  j->pnext = NULL;
  if (o->qtail) o->qtail->pnext = j;
  else o->qhead = j;
  o->qtail = j;
  o->queued++;
  if (!o->waiting) {
    o->waiting = 1;
    o->wprev = NULL;
    o->wnext = c->waiting;
    if (c->waiting) c->waiting->wprev = o;
    c->waiting = o;
  }
}

static void job_count(hd_job *j, hd_outcome out) {
  int k;
  if (j->chain < 0) {
    hd_pool *o = job_origin(j);
    o->counts.by_outcome[out]++;
    if (out == HD_OUT_NOWORKERS || out == HD_OUT_NOMEMORY || out == HD_OUT_POOLTIMEOUT)
      o->counts.rejected++;
    return;
  }
  for (k = 0; k < j->chain_len[j->chain]; k++) {
    hd_pool *p = j->chains[j->chain][k];
    p->counts.by_outcome[out]++;
    if (out == HD_OUT_OK) p->counts.succeeded++;
  }
}

void hd_job_finish(hd_job *j, hd_outcome out) {
  hd_core *c = j->core;
  int was_running = j->state == HD_JOB_RUNNING;
  if (j->state == HD_JOB_DONE) return;
  if (j->state == HD_JOB_QUEUED) job_unqueue(j);
  if (was_running) {
    if (j->rprev) j->rprev->rnext = j->rnext;
    else c->running = j->rnext;
    if (j->rnext) j->rnext->rprev = j->rprev;
    j->rnext = j->rprev = NULL;
  }
  if (j->proc != NULL) {
    /* It ended while its process still held it: that process is not fit to
     * run another job. */
    hd_proc *p = j->proc;
    p->job = NULL;
    j->proc = NULL;
    hd_proc_kill(p);
  }
  j->state = HD_JOB_DONE;
  j->outcome = out;
  job_count(j, out);
  if (j->chain >= 0) hd_pool_release(j);
  if (j->timer_open && !uv_is_closing((uv_handle_t *)&j->timer)) {
    uv_timer_stop(&j->timer);
    uv_close((uv_handle_t *)&j->timer, job_timer_close_cb);
  }
  if (was_running) hd_job_pump_queue(c);
  /* The core's reference, taken at submit. */
  hd_job_unref(j);
}

static void job_start(hd_job *j) {
  hd_core *c = j->core;
  hd_pool *root = hd_job_root(j);
  hd_proc *p;
  int k;
  /* The most recently used idle process that is still fit. */
  while ((p = root->idle) != NULL && !hd_proc_fit(p)) {
  }
  j->state = HD_JOB_RUNNING;
  j->rnext = c->running;
  j->rprev = NULL;
  if (c->running) c->running->rprev = j;
  c->running = j;
  for (k = 0; k < j->chain_len[j->chain]; k++) j->chains[j->chain][k]->counts.started++;
  if (p == NULL) {
    char err[256];
    p = hd_proc_spawn(c, root, err, sizeof err);
    if (p == NULL) {
      snprintf(j->detail, sizeof j->detail, "cannot start a worker: %s", err);
      hd_job_finish(j, HD_OUT_FAILED);
      return;
    }
  }
  /* max_ms = 0 times out at once; only math.huge means no limit. */
  if (j->max_ms < 1e15) {
    uv_update_time(&c->loop);
    job_timer_start(j, j->max_ms);
  }
  hd_proc_start_job(p, j);
}

static void job_timer_cb(uv_timer_t *t) {
  hd_job *j = t->data;
  uint64_t now = uv_hrtime();
  if (now < j->deadline) {
    /* Early: wait for the rest, rounded up to the next millisecond. */
    uint64_t left = j->deadline - now;
    uint64_t deadline = j->deadline;
    job_timer_start(j, (double)((left + 999999) / 1000000));
    j->deadline = deadline;
    return;
  }
  if (j->state == HD_JOB_QUEUED) {
    hd_job_finish(j, HD_OUT_POOLTIMEOUT);
    return;
  }
  if (j->state != HD_JOB_RUNNING) return;
  if (j->pending != HD_OUT_NONE || j->proc == NULL) {
    /* The exit report did not come in time; end the job anyway. */
    hd_job_finish(j, j->pending != HD_OUT_NONE ? j->pending : HD_OUT_TIMEOUT);
    return;
  }
  /* The rule when the host ran its loop late: a reply the worker had
   * already written when the deadline is handled is the result; otherwise
   * the job is a Timeout. Never both, never neither. */
  hd_proc_drain(j->proc);
  if (j->state != HD_JOB_RUNNING) return;
  /* Time is up. The job ends when the process is confirmed gone, so a caller
   * that sees Timeout knows the worker no longer runs. */
  j->pending = HD_OUT_TIMEOUT;
  job_timer_start(j, HD_KILL_GRACE_MS);
  hd_proc_kill(j->proc);
}

void hd_job_submit(hd_job *j) {
  hd_core *c = j->core;
  hd_outcome out;
  j->refs++; /* the core's, until the job is done */
  /* A job that is willing to wait queues behind those already waiting in
   * its pool, first come first served; one that is not takes capacity if
   * there is some. */
  if (j->pool_timeout > 0 && job_origin(j)->qhead != NULL)
    out = hd_pool_could_ever_fit(j) ? HD_OUT_NOWORKERS : hd_pool_try_reserve(j);
  else
    out = hd_pool_try_reserve(j);
  if (out == HD_OUT_NONE) {
    job_start(j);
    return;
  }
  if (j->pool_timeout > 0 && hd_pool_could_ever_fit(j)) {
    job_enqueue(j);
    uv_update_time(&c->loop);
    job_timer_start(j, j->pool_timeout);
    return;
  }
  hd_job_finish(j, out);
}

void hd_job_on_reply(hd_job *j, hd_proc *p, const char *body, size_t len) {
  hd_outcome out;
  switch ((unsigned char)body[0]) {
    case HD_REPLY_OK: out = HD_OUT_OK; break;
    case HD_REPLY_ERROR: out = HD_OUT_ERROR; break;
    case HD_REPLY_OOM: out = HD_OUT_OOM; break;
    case HD_REPLY_BADRESULT: out = HD_OUT_BADRESULT; break;
    default:
      snprintf(j->detail, sizeof j->detail, "unknown reply status %u", (unsigned char)body[0]);
      out = HD_OUT_BADREPLY;
      break;
  }
  if (j->pending != HD_OUT_NONE) out = j->pending;
  j->frame.len = 0;
  j->frame_off = 0;
  if (out != HD_OUT_BADREPLY && p != NULL && len > 65536 && body >= p->in.data &&
      body < p->in.data + p->in.len) {
    /* A big reply is not copied: the job takes the process's read buffer,
     * the process takes the job frame's, which is no longer needed. */
    hd_buf spare = j->frame;
    j->frame = p->in;
    j->frame_off = (size_t)(body + 1 - p->in.data);
    p->in = spare;
    p->in.len = 0;
  } else if (out != HD_OUT_BADREPLY && hd_buf_append(&j->frame, body + 1, len - 1) != 0) {
    snprintf(j->detail, sizeof j->detail, "out of memory storing the reply");
    out = HD_OUT_BADREPLY;
  }
  hd_job_finish(j, out);
}

/* A user kill: the job ends now, and hd_job_finish kills its process. */
void hd_job_kill(hd_job *j) {
  hd_job_finish(j, HD_OUT_KILLED);
}

int hd_job_kill_where(hd_core *c, int (*match)(hd_job *, void *),
                      void (*each)(hd_job *, void *), void *ud) {
  int n = 0;
  for (;;) {
    hd_job *j;
    /* Each kill may change both lists (a freed slot starts a queued job),
     * so the walk starts over after each. */
    for (j = c->queue_head; j != NULL && !match(j, ud); j = j->qnext) {
    }
    if (j == NULL)
      for (j = c->running; j != NULL && !match(j, ud); j = j->rnext) {
      }
    if (j == NULL) return n;
    if (each != NULL) each(j, ud);
    hd_job_kill(j);
    n++;
  }
}

/* Starts queued jobs that fit now, first come first served within each
 * pool: a job that does not fit holds back the later jobs of its own pool,
 * not those of other pools. */
void hd_job_pump_queue(hd_core *c) {
  if (c->in_pump) {
    c->pump_again = 1;
    return;
  }
  c->in_pump = 1;
  do {
    hd_pool *p, *next;
    c->pump_again = 0;
    for (p = c->waiting; p != NULL; p = next) {
      hd_job *j;
      next = p->wnext;
      while ((j = p->qhead) != NULL && hd_pool_try_reserve(j) == HD_OUT_NONE) {
        job_unqueue(j);
        uv_timer_stop(&j->timer);
        job_start(j);
      }
    }
  } while (c->pump_again);
  c->in_pump = 0;
}
