/* scheduler.c: the scheduler of jobs: capacity, queues, worker processes,
 * deadlines, and each job's end, exactly once. */
#include "scheduler.h"

#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "affinity.h"
#include "conn.h"
#include "loop.h"
#include "num.h"
#include "queue.h"
#include "suplink.h"
#include "wire.h"

/* How long to wait for a killed process's exit report before ending its job
 * anyway; the supervisor reports within microseconds unless it is gone. */
#define SCHED_KILL_GRACE_MS 2000

/* A limit at or past this many ms is no limit (math.huge). Timers are
 * armed for at most SCHED_MAX_TIMER_MS, which fits in nanoseconds. */
#define SCHED_NO_LIMIT_MS 1e15
#define SCHED_MAX_TIMER_MS 1e12

/* Replies bigger than this are not copied: the job takes the read buffer. */
#define SCHED_TAKE_REPLY 65536

/* A job frame bigger than this, once sent, goes back to the loop's spare. */
#define SCHED_KEEP_FRAME (1u << 20)

/* Adaptive polling in a blocking wait: credit earned per hit, its ceiling,
 * its cost per miss, and how often a wait without credit polls anyway. */
#define SCHED_SPIN_CREDIT_MAX 8
#define SCHED_SPIN_CREDIT_START 4
#define SCHED_SPIN_MISS 4
#define SCHED_SPIN_PROBE_MASK 63
#define SCHED_SPIN_DEFAULT_NS 50000
#define SCHED_CPUS_EVERY 256
/* A loop that has not run for this long runs once before a job starts. */
#define SCHED_STALE_NS 20000000
/* ... and once after a job that had to queue. */
#define SCHED_BUSY_NS 5000

typedef enum { JOB_NEW, JOB_QUEUED, JOB_RUNNING, JOB_DONE } job_state;
typedef enum { PROC_IDLE, PROC_BUSY, PROC_DYING } proc_state;

typedef struct sched_proc sched_proc;

#define JOB_ITEM_HEAD 29

struct hd_job {
  hd_sched *sched;
  int refs;             /* the caller's, plus the scheduler's while not done or the timer is open */
  uint64_t id;
  job_state state;
  hd_outcome outcome;
  hd_outcome pending;   /* the outcome decided, waiting for the process to be gone */
  int status;           /* wait status for HD_OUT_EXIT, -1 when unknown */
  char detail[320];     /* for BADREPLY, FAILED and a host-side BADRESULT */
  hd_chains *chains;
  hd_pool *origin;      /* the pool it was started in (holds a reference) */
  char *task_name;
  hd_job_limits lim;
  double out_used;      /* bytes of output counted against lim.max_output */
  hd_buf captured;      /* HD_OUTPUT_CAPTURE: the output within the limit */
  hd_buf events;        /* events not yet taken: u32 length and codec message each */
  double event_bytes;   /* bytes of events so far, against max_result */
  int has_stats;        /* the worker's STATS frame came with the reply */
  uint64_t cpu_ns, heap_peak, wall_ns;
  hd_buf frame;         /* the job frame; after the end, the reply's message */
  size_t msg_off, msg_len;
  sched_proc *proc;
  uv_timer_t timer;     /* max_ms while running, pool_timeout while queued */
  uint64_t deadline;    /* uv_hrtime() when the timer is due */
  uint64_t submitted, started, ended; /* uv_hrtime() at each; started 0 until it starts */
  int timer_open;
  uv_timer_t cpu_timer;  /* max_cpu_ms while running: looks at the worker's CPU clock */
  int cpu_timer_open;
  uint64_t cpu_base;     /* the worker's CPU time (ns) when the job started */
  int notify;           /* hd_job_notify: the context's on_end is called at its end */
  uint32_t nitems;      /* items in its frame (0: a plain job) */
  uint32_t item;        /* the item running: how many have replied before it */
  int restarted;        /* started again once, its worker gone before reading it */
  uint64_t item_started;/* uv_hrtime() when the host heard the previous item end */
  uint32_t item_seek;   /* hd_job_item's last item, and where it is in `items` */
  size_t item_seek_at;
  hd_buf items;         /* each item's reply but the one the job ends with: JOB_ITEM_HEAD
                         * bytes (u32 message length, u8 status, u64 CPU ns, u64 heap
                         * peak, u64 wall ns), then its message */
  hd_queue pnode;       /* its pool's wait queue, while queued */
  hd_queue rnode;       /* the running jobs, while running */
};

struct sched_proc {
  hd_sched *sched;
  hd_pool *root;        /* the root pool it belongs to (holds a reference) */
  hd_conn *conn;
  uint32_t id;
  pid_t pid;            /* from the supervisor, for stats and tests only */
  int pidfd;            /* from the supervisor: signals exactly this process, or -1 */
  proc_state state;
  int exited;           /* the supervisor has reported its exit */
  int closed;           /* its connection is closed for good */
  int status;           /* its wait status */
  hd_job *job;
  int inited;           /* its root pool's init was sent to it */
  hd_buf boot;          /* the INIT frame and its first job's, while they are sent */
  uint64_t idle_since;  /* the loop's time when it became idle */
  hd_queue node;        /* all processes */
  hd_queue inode;       /* the idle ones, most recently used first */
};

/* What the scheduler keeps on each pool: jobs waiting there for capacity,
 * first come first served; a pool with waiting jobs is on `waiting`. */
typedef struct sched_pool {
  hd_queue jobs;
  hd_queue wnode;
} sched_pool;

struct hd_sched {
  hd_loop *loop;
  hd_sup *sup;
  int refs;             /* the caller's, jobs, processes; one more for good once forsaken */
  int closing;
  int forsaken;         /* this process is a fork of the one that made it: never used again */
  hd_queue anode;       /* every context alive in the process, while not forsaken */
  char bchead[HD_BCHEAD]; /* the host VM's bytecode header, for a renewal */
  size_t bchead_len;
  int in_loop;
  char *worker_path;
  char *lua_path, *lua_cpath; /* the host's package.path and cpath, for workers */
  hd_buf scratch;       /* job frames are built here, reused across submits */
  unsigned paths_gen;   /* bumped when they change */
  unsigned sup_gen;     /* the generation the supervisor's image has */
  double max_result;
  uint32_t next_proc;
  uint64_t next_job;
  hd_queue procs;
  hd_queue idle;
  hd_queue running;
  hd_queue waiting;     /* pools with waiting jobs */
  int active;           /* jobs queued or running */
  uint64_t last_run;    /* uv_hrtime() when the loop last ran */
  int fd_watched;       /* hd_sched_fd was asked for: a host waits on it */
  uv_timer_t *idle_timer;
  void (*on_end)(void *ud, hd_job *j); /* for jobs marked with hd_job_notify */
  void *on_end_ud;
  int in_pump, pump_again;
  uint64_t spin_ns;     /* how long a blocking wait polls before sleeping */
  int spin_credit;      /* recent waits the polling paid off for */
  unsigned spin_probe;
  unsigned waits;       /* blocking waits, for the periodic look at the CPUs */
  int one_cpu;          /* the host may run on one CPU only: it never polls */
};

static void sched_pump(hd_sched *s);
static void job_finish(hd_job *j, hd_outcome out);
static void proc_on_exited(sched_proc *p, int status);

/* ---- The context ------------------------------------------------------------ */

static void sched_on_spawned(void *ud, uint32_t id, pid_t pid, int pidfd);
static void sched_on_exited(void *ud, uint32_t id, int status);
static void sched_on_failed(void *ud, uint32_t id, const char *why);
static void sched_on_lost(void *ud, const char *why);

static const hd_sup_cbs sched_sup_cbs = {sched_on_spawned, sched_on_exited, sched_on_failed,
                                          sched_on_lost};

static void sched_idle_close_cb(uv_handle_t *h) {
  free(h);
}

/* ---- Forks -------------------------------------------------------------------
 *
 * A fork copies the context, and the copy shares every kernel object with
 * the original: the epoll instance of the loop, the supervisor's control
 * socket, each worker's pipes. The child must not use them: a libuv call
 * on its loop (uv_close, uv_poll_stop: epoll_ctl) would change the
 * parent's loop, a read would take the parent's reports and replies, and a
 * word to the supervisor would reach the parent's. So in the child, at the
 * fork itself, every context is forsaken: its copies of those descriptors
 * are closed (no libuv call), and it is never used or freed again (its
 * memory is the child's copy of the parent's). The layer above notices
 * (hd_sched_forsaken) and makes the child a context of its own, with its
 * own supervisor, started by the child and so with the child's
 * credentials (hd_sched_renew).
 *
 * Why pthread_atfork rather than comparing getpid() with the pid that made
 * the context: the closing happens at the fork, before the child can open
 * descriptors of its own under the same numbers (a daemon closes every
 * descriptor and opens its log; closing "ours" later would close that),
 * and while the parent still holds its copies, so a child that never calls
 * handler does not keep the parent's workers and supervisor from seeing
 * EOF; and a call then costs a load, not a system call. What it does not
 * see: a process made by the raw clone or fork system call, bypassing
 * libc's fork, and vfork (whose child may only exec or _exit). */

static pthread_mutex_t sched_all_lock = PTHREAD_MUTEX_INITIALIZER;
static hd_queue sched_all = {&sched_all, &sched_all};
static pthread_once_t sched_fork_once = PTHREAD_ONCE_INIT;
static int sched_fork_ok;

static void proc_forsake(void *p);

/* Closes the child's copies of a context's descriptors and retires it. */
static void sched_forsake(hd_sched *s) {
  hd_queue *q;
  s->forsaken = 1;
  s->refs++;
  for (q = s->procs.next; q != &s->procs; q = q->next) proc_forsake(q);
  hd_sup_forsake(s->sup);
  hd_loop_forsake(s->loop);
}

static void sched_fork_prepare(void) {
  pthread_mutex_lock(&sched_all_lock);
}

static void sched_fork_parent(void) {
  pthread_mutex_unlock(&sched_all_lock);
}

/* In the child, at the fork: only close() and list walks. */
static void sched_fork_child(void) {
  hd_queue *q;
  while ((q = hd_queue_head(&sched_all)) != NULL) {
    hd_queue_remove(q);
    sched_forsake(HD_QUEUE_DATA(q, hd_sched, anode));
  }
  pthread_mutex_unlock(&sched_all_lock);
}

static void sched_fork_init(void) {
  sched_fork_ok =
      pthread_atfork(sched_fork_prepare, sched_fork_parent, sched_fork_child) == 0;
}

hd_sched *hd_sched_new(const char *worker_path, char *err, size_t errlen) {
  hd_sched *s;
  pthread_once(&sched_fork_once, sched_fork_init);
  if (!sched_fork_ok) {
    snprintf(err, errlen, "cannot register a fork handler");
    return NULL;
  }
  s = calloc(1, sizeof *s);
  if (s == NULL) goto oom;
  s->loop = hd_loop_new();
  if (s->loop == NULL) {
    free(s);
    snprintf(err, errlen, "cannot create an event loop");
    return NULL;
  }
  s->sup = hd_sup_new(s->loop, worker_path, &sched_sup_cbs, s);
  s->idle_timer = malloc(sizeof *s->idle_timer);
  s->worker_path = strdup(worker_path);
  if (s->sup == NULL || s->idle_timer == NULL || s->worker_path == NULL ||
      uv_timer_init(hd_loop_uv(s->loop), s->idle_timer) != 0) {
    if (s->sup) hd_sup_free(s->sup);
    free(s->idle_timer);
    free(s->worker_path);
    hd_loop_free(s->loop);
    free(s);
    goto oom;
  }
  s->idle_timer->data = s;
  uv_unref((uv_handle_t *)s->idle_timer);
  s->refs = 1;
  s->max_result = 64.0 * 1024 * 1024;
  /* Polling 50 us before sleeping halves a short job's round trip on a
   * quiet machine; it backs off by itself when replies keep missing the
   * window (bench/RESULTS.md). handler.configure{ spin_us = 0 } turns it off. */
  s->spin_ns = SCHED_SPIN_DEFAULT_NS;
  s->spin_credit = SCHED_SPIN_CREDIT_START;
  hd_queue_init(&s->procs);
  hd_queue_init(&s->idle);
  hd_queue_init(&s->running);
  hd_queue_init(&s->waiting);
  pthread_mutex_lock(&sched_all_lock);
  hd_queue_insert_tail(&sched_all, &s->anode);
  pthread_mutex_unlock(&sched_all_lock);
  return s;
oom:
  snprintf(err, errlen, "out of memory");
  return NULL;
}

static void sched_free(hd_sched *s) {
  pthread_mutex_lock(&sched_all_lock);
  hd_queue_remove(&s->anode);
  pthread_mutex_unlock(&sched_all_lock);
  hd_sup_free(s->sup);
  hd_buf_free(&s->scratch);
  hd_loop_free(s->loop);
  free(s->worker_path);
  free(s->lua_path);
  free(s->lua_cpath);
  free(s);
}

void hd_sched_unref(hd_sched *s) {
  if (--s->refs == 0) sched_free(s);
}

int hd_sched_closing(const hd_sched *s) {
  return s->closing;
}

int hd_sched_forsaken(const hd_sched *s) {
  return s->forsaken;
}

hd_sched *hd_sched_renew(hd_sched *old, char *err, size_t errlen) {
  hd_sched *s = hd_sched_new(old->worker_path, err, errlen);
  if (s == NULL) return NULL;
  hd_sched_set_bchead(s, old->bchead, old->bchead_len);
  if (old->lua_path != NULL && old->lua_cpath != NULL)
    hd_sched_set_paths(s, old->lua_path, old->lua_cpath);
  s->max_result = old->max_result;
  s->spin_ns = old->spin_ns;
  return s;
}

void hd_sched_adopt_pool(hd_sched *s, hd_pool *p) {
  sched_pool *sp = hd_pool_data(p);
  (void)s;
  hd_pool_reset(p);
  /* Its queue held the parent's jobs; they stay with the forsaken context. */
  if (sp != NULL) {
    hd_queue_init(&sp->jobs);
    hd_queue_init(&sp->wnode);
  }
}

const char *hd_sched_worker_path(const hd_sched *s) {
  return s->worker_path;
}

hd_buf *hd_sched_scratch(hd_sched *s) {
  s->scratch.len = 0;
  if (s->scratch.data == NULL) hd_loop_take_buf(s->loop, &s->scratch, 0);
  return &s->scratch;
}

void hd_sched_set_bchead(hd_sched *s, const char *bc, size_t n) {
  s->bchead_len = n < HD_BCHEAD ? n : HD_BCHEAD;
  memcpy(s->bchead, bc, s->bchead_len);
  hd_sup_set_bchead(s->sup, bc, n);
}

void hd_sched_set_paths(hd_sched *s, const char *path, const char *cpath) {
  char *p, *cp;
  if (s->lua_path && !strcmp(s->lua_path, path) && s->lua_cpath && !strcmp(s->lua_cpath, cpath))
    return;
  p = strdup(path);
  cp = strdup(cpath);
  if (p == NULL || cp == NULL) {
    free(p);
    free(cp);
    return;
  }
  free(s->lua_path);
  free(s->lua_cpath);
  s->lua_path = p;
  s->lua_cpath = cp;
  s->paths_gen++;
}

const char *hd_sched_job_path(const hd_sched *s) {
  return hd_sup_pid(s->sup) > 0 && s->sup_gen != s->paths_gen ? s->lua_path : NULL;
}

const char *hd_sched_job_cpath(const hd_sched *s) {
  return hd_sup_pid(s->sup) > 0 && s->sup_gen != s->paths_gen ? s->lua_cpath : NULL;
}

void hd_sched_set_max_result(hd_sched *s, double bytes) {
  s->max_result = bytes;
}

void hd_sched_set_spin(hd_sched *s, uint64_t ns) {
  s->spin_ns = ns;
}

int hd_sched_in_loop(const hd_sched *s) {
  return s->in_loop;
}

int hd_sched_fd(hd_sched *s) {
  /* Someone will wait on it: from now on it must wake them for timers. */
  s->fd_watched = 1;
  hd_loop_sync_wake(s->loop);
  return hd_loop_fd(s->loop);
}

int hd_sched_timeout(hd_sched *s) {
  return hd_loop_timeout(s->loop);
}

/* After anything that may start a timer or leave work pending: the loop's
 * descriptor wakes a host for it (hd_loop_sync_wake). */
static void sched_sync(hd_sched *s) {
  /* Only for a host that waits on the descriptor: a blocking wait runs the
   * loop itself, and the wake timer would cost it system calls. */
  if (s->fd_watched && !s->in_loop && !s->forsaken) hd_loop_sync_wake(s->loop);
}

void hd_sched_step(hd_sched *s) {
  s->last_run = uv_hrtime();
  s->in_loop = 1;
  uv_run(hd_loop_uv(s->loop), UV_RUN_NOWAIT);
  s->in_loop = 0;
  hd_sup_reap(s->sup);
  sched_sync(s);
}

int hd_sched_active(const hd_sched *s) {
  return s->active;
}

void hd_sched_on_end(hd_sched *s, void (*fn)(void *ud, hd_job *j), void *ud) {
  s->on_end = fn;
  s->on_end_ud = ud;
}

/* A short job's reply usually comes within a few tens of microseconds:
 * polling for that long first saves the host a sleep and a wake-up, which
 * cost more than the whole round trip on an idle machine. On a busy one
 * polling steals the CPU the worker needs, so it is adaptive: it stops
 * after replies keep missing the window, and is tried again every 64th
 * wait. A host that may run on one CPU only never polls: the worker runs
 * only once the host stops, so the polls are system calls for nothing.
 * The CPUs are looked at every SCHED_CPUS_EVERY waits. */
void hd_sched_wait(hd_sched *s, hd_job *j) {
  uv_loop_t *uv = hd_loop_uv(s->loop);
  uint64_t start;
  int spin;
  s->in_loop = 1;
  if ((s->waits++ % SCHED_CPUS_EVERY) == 0) s->one_cpu = hd_one_cpu();
  spin = s->spin_ns > 0 && !s->one_cpu &&
         (s->spin_credit > 0 || (++s->spin_probe & SCHED_SPIN_PROBE_MASK) == 0);
  start = spin ? uv_hrtime() : 0;
  while (spin && j->state != JOB_DONE && uv_hrtime() - start < s->spin_ns) {
    uv_run(uv, UV_RUN_NOWAIT);
    /* A worker that wants this CPU gets it. */
    if (j->state != JOB_DONE) sched_yield();
  }
  if (spin) {
    if (j->state == JOB_DONE)
      s->spin_credit = s->spin_credit < SCHED_SPIN_CREDIT_MAX ? s->spin_credit + 1
                                                              : SCHED_SPIN_CREDIT_MAX;
    else
      s->spin_credit = s->spin_credit > SCHED_SPIN_MISS ? s->spin_credit - SCHED_SPIN_MISS : 0;
  }
  while (j->state != JOB_DONE) uv_run(uv, UV_RUN_ONCE);
  s->in_loop = 0;
  /* The loop ran until the job ended, whose time was just read. */
  s->last_run = j->ended != 0 ? j->ended : uv_hrtime();
  hd_sup_reap(s->sup);
  sched_sync(s);
}

static void sched_wait_timer_cb(uv_timer_t *t) {
  *(int *)t->data = 1;
}

static void sched_wait_close_cb(uv_handle_t *h) {
  free(h);
}

static int sched_first_done(hd_job *const *jobs, int n, int events) {
  int i;
  for (i = 0; i < n; i++)
    if (jobs[i]->state == JOB_DONE || (events && jobs[i]->events.len > 0)) return i;
  return -1;
}

typedef struct {
  hd_job *const *jobs;
  int n, events, found;
} sched_any;

static int sched_any_ready(void *ud) {
  sched_any *a = ud;
  a->found = sched_first_done(a->jobs, a->n, a->events);
  return a->found >= 0;
}

int hd_sched_wait_any(hd_sched *s, hd_job *const *jobs, int n, double timeout_ms, int events) {
  sched_any a;
  int r;
  a.jobs = jobs;
  a.n = n;
  a.events = events;
  a.found = -1;
  if (sched_any_ready(&a)) return a.found;
  if (timeout_ms <= 0) {
    hd_sched_step(s);
    return sched_first_done(jobs, n, events);
  }
  r = hd_sched_wait_until(s, sched_any_ready, &a, timeout_ms);
  return r < 0 ? r : a.found;
}

int hd_sched_wait_until(hd_sched *s, int (*ready)(void *), void *ud, double timeout_ms) {
  uv_loop_t *uv = hd_loop_uv(s->loop);
  uv_timer_t *t = NULL;
  int expired = 0, r;
  if (ready(ud)) return 1;
  if (timeout_ms < SCHED_NO_LIMIT_MS) {
    t = malloc(sizeof *t);
    if (t == NULL) return -2;
    uv_timer_init(uv, t);
    t->data = &expired;
    uv_timer_start(t, sched_wait_timer_cb,
                   (uint64_t)(timeout_ms > SCHED_MAX_TIMER_MS ? SCHED_MAX_TIMER_MS
                              : timeout_ms > 0                ? timeout_ms
                                                              : 0),
                   0);
  }
  s->in_loop = 1;
  while (!(r = ready(ud)) && !expired) uv_run(uv, UV_RUN_ONCE);
  s->in_loop = 0;
  s->last_run = uv_hrtime();
  if (t != NULL) uv_close((uv_handle_t *)t, sched_wait_close_cb);
  hd_sup_reap(s->sup);
  sched_sync(s);
  return r;
}


void hd_sched_each_pid(hd_sched *s, void (*fn)(void *, pid_t), void *ud, pid_t *sup,
                       int *fds) {
  hd_queue *q;
  /* Pids come with the supervisor's reports: read those already sent. */
  hd_sup_drain(s->sup);
  hd_sup_reap(s->sup);
  *fds = 0;
  for (q = s->procs.next; q != &s->procs; q = q->next) {
    sched_proc *p = HD_QUEUE_DATA(q, sched_proc, node);
    pid_t pid = p->pid > 0 ? p->pid : hd_conn_pid(p->conn);
    if (!p->exited && pid > 0) fn(ud, pid);
    /* Descriptors the host holds for its workers: its ends of the
     * protocol and output pipes and the pidfd of each, pid known or not
     * yet. */
    *fds += hd_conn_fds(p->conn);
    if (p->pidfd >= 0) (*fds)++;
  }
  /* And the workers' ends, while their spawn orders wait to be sent. */
  *fds += hd_sup_held_fds(s->sup);
  *sup = hd_sup_pid(s->sup);
}

int hd_sched_refs(const hd_sched *s) {
  return s->refs;
}

void hd_sched_reset_ids(hd_sched *s) {
  s->next_job = 0;
  s->next_proc = 0;
}

/* ---- Pools ------------------------------------------------------------------- */

static void sched_pool_drop(void *data) {
  free(data);
}

/* The scheduler's part of a pool, made on first use. */
static sched_pool *sched_pool_of(hd_pool *p) {
  sched_pool *sp = hd_pool_data(p);
  if (sp == NULL) {
    sp = malloc(sizeof *sp);
    if (sp == NULL) return NULL;
    hd_queue_init(&sp->jobs);
    hd_queue_init(&sp->wnode);
    hd_pool_set_data(p, sp, sched_pool_drop);
  }
  return sp;
}

/* ---- Worker processes -------------------------------------------------------- */

static void proc_free_if_done(sched_proc *p) {
  hd_sched *s = p->sched;
  if (!p->exited || !p->closed) return;
  hd_queue_remove(&p->node);
  hd_conn_free(p->conn);
  if (p->pidfd >= 0) close(p->pidfd);
  hd_pool_unref(p->root);
  hd_buf_free(&p->boot);
  free(p);
  hd_sched_unref(s);
}

/* At a fork, in the child (see sched_forsake): q is the node of a process. */
static void proc_forsake(void *q) {
  sched_proc *p = HD_QUEUE_DATA((hd_queue *)q, sched_proc, node);
  hd_conn_forsake(p->conn);
  if (p->pidfd >= 0) close(p->pidfd);
  p->pidfd = -1;
}

static void proc_unidle(sched_proc *p) {
  if (hd_queue_linked(&p->inode)) hd_queue_remove(&p->inode);
}

/* An idle process is no longer wanted: closing its pipes makes it exit (its
 * read of the job pipe ends). */
static void proc_retire(sched_proc *p) {
  proc_unidle(p);
  p->state = PROC_DYING;
  p->job = NULL;
  hd_conn_close(p->conn);
}

/* Sends SIGKILL through the pidfd to exactly this process and, while it is
 * alive (its group exists then), to its group. */
static void proc_kill_by_pidfd(sched_proc *p) {
  if (p->pidfd < 0 || p->exited || syscall(SYS_pidfd_send_signal, p->pidfd, 0, NULL, 0) != 0)
    return;
  if (p->pid > 0) kill(-p->pid, SIGKILL);
  syscall(SYS_pidfd_send_signal, p->pidfd, SIGKILL, NULL, 0);
}

/* The process is broken or no longer wanted: the supervisor kills it (it is
 * the parent, so the pid cannot have been reused); if the order cannot be
 * sent, the pidfd does it. */
static void proc_kill(sched_proc *p) {
  proc_unidle(p);
  p->state = PROC_DYING;
  hd_conn_close(p->conn);
  if (p->exited) return;
  if (hd_sup_kill(p->sched->sup, p->id) != 0) proc_kill_by_pidfd(p);
}

static void sched_idle_cb(uv_timer_t *t);

static void sched_arm_idle(hd_sched *s, double ms) {
  if (s->closing) return;
  if (ms < 0) ms = 0;
  if (ms > SCHED_MAX_TIMER_MS) ms = SCHED_MAX_TIMER_MS;
  uv_timer_start(s->idle_timer, sched_idle_cb, (uint64_t)ms, 0);
}

/* Ends processes idle for longer than their pool's idle_ms. */
static void sched_idle_cb(uv_timer_t *t) {
  hd_sched *s = t->data;
  hd_queue *q, *n;
  uint64_t now = hd_loop_now(s->loop);
  double soonest = -1;
  hd_loop_age_buf(s->loop);
  HD_QUEUE_EACH(q, n, &s->idle) {
    sched_proc *p = HD_QUEUE_DATA(q, sched_proc, inode);
    double age = (double)(now - p->idle_since);
    double limit = hd_pool_idle_ms(p->root);
    if (age >= limit) proc_retire(p);
    else if (soonest < 0 || limit - age < soonest) soonest = limit - age;
  }
  if (soonest >= 0) sched_arm_idle(s, soonest + 1);
}

/* A process done with its job waits for the next one, most recently used
 * first, unless its pool is gone. */
static void proc_make_idle(sched_proc *p) {
  hd_sched *s = p->sched;
  double idle_ms = hd_pool_idle_ms(p->root);
  if (hd_pool_closed(p->root) || s->closing) {
    proc_retire(p);
    return;
  }
  p->state = PROC_IDLE;
  p->idle_since = hd_loop_now(s->loop);
  hd_queue_insert_head(&s->idle, &p->inode);
  /* Pools have their own idle_ms: the sweep must come no later than this
   * process's. */
  if (!uv_is_active((uv_handle_t *)s->idle_timer) ||
      (double)uv_timer_get_due_in(s->idle_timer) > idle_ms)
    sched_arm_idle(s, idle_ms);
}

/* The process died with a job on it: the job ends with its cause. */
static void proc_job_died(sched_proc *p) {
  hd_job *j = p->job;
  if (j == NULL) return;
  p->job = NULL;
  j->proc = NULL;
  j->status = p->status;
  job_finish(j, j->pending != HD_OUT_NONE ? j->pending : HD_OUT_EXIT);
}

static void job_on_reply(hd_job *j, hd_buf *buf, size_t off, size_t len);

/* Whether a root pool's workers serve one job each: the "syscalls" profile
 * keeps the FFI, so its job may reach the protocol pipes and memory. */
static int sched_one_job(const hd_pool *root) {
  return hd_pool_sandbox(root) == HD_SPAWN_SECCOMP;
}

static void job_item_replied(hd_job *j, sched_proc *p, const char *body, size_t len);

static void proc_on_reply(hd_conn *c, void *ud, hd_buf *buf, size_t off, size_t len, int last) {
  sched_proc *p = ud;
  hd_job *j = p->job;
  if (j->nitems > 0 && j->item + 1 < j->nitems && !last && j->pending == HD_OUT_NONE &&
      !sched_one_job(p->root)) {
    /* An item's reply, and more items follow: the job goes on, on the same
     * worker. */
    job_item_replied(j, p, buf->data + off, len);
    return;
  }
  p->job = NULL;
  j->proc = NULL;
  j->has_stats = hd_conn_stats(c, &j->cpu_ns, &j->heap_peak, &j->wall_ns);
  /* A job of the "syscalls" profile has the FFI: it may have written this
   * reply itself, and whatever the frame says, its process is not given
   * another job. */
  if (last || sched_one_job(p->root)) {
    /* The job touched process state: this worker exits after the reply.
     * It is killed as well: a job that wrote the reply itself could go on
     * running, and nothing would end it. */
    proc_kill(p);
  } else {
    proc_make_idle(p);
  }
  job_on_reply(j, buf, off, len);
}

static void proc_on_fail(hd_conn *c, void *ud, int kind, const char *why) {
  sched_proc *p = ud;
  hd_job *j = p->job;
  (void)c;
  if (j == NULL) {
    proc_kill(p);
    return;
  }
  /* Ending the job kills the process that still holds it. */
  snprintf(j->detail, sizeof j->detail, "%s", why);
  job_finish(j, kind == HD_CONN_TOOBIG ? HD_OUT_BADRESULT : HD_OUT_BADREPLY);
}

static void job_start(hd_job *j);

/* EOF: the process closed its reply pipe, which means it is dying. The
 * cause comes with the supervisor's report; until then its job waits. A
 * job it got without the idle look (its last reply was under 1-2 ms old)
 * and read nothing of never ran: it starts again on another worker, once.
 * Its worker had replied to the job before and exited, or was killed
 * while idle: the look would have seen that. */
static void proc_on_eof(hd_conn *c, void *ud) {
  sched_proc *p = ud;
  hd_job *j = p->job;
  proc_unidle(p);
  if (j != NULL && !j->restarted && j->pending == HD_OUT_NONE && !p->sched->closing &&
      hd_conn_job_unread(c)) {
    p->job = NULL;
    j->proc = NULL;
    proc_kill(p);
    /* What the process wrote was no part of this job. */
    j->out_used = 0;
    j->captured.len = 0;
    j->restarted = 1;
    job_start(j);
    return;
  }
  if (p->state != PROC_BUSY) p->state = PROC_DYING;
  if (p->exited) proc_job_died(p);
}

/* An event of the job: kept for the caller, who is woken for it. All of a
 * job's events together may be as big as its results. */
static void proc_on_event(hd_conn *c, void *ud, const char *msg, size_t len) {
  sched_proc *p = ud;
  hd_job *j = p->job;
  char n[4];
  (void)c;
  if (j == NULL || j->pending != HD_OUT_NONE) return;
  j->event_bytes += (double)len;
  if (j->event_bytes > (j->lim.max_result > 0 ? j->lim.max_result : j->sched->max_result)) {
    snprintf(j->detail, sizeof j->detail, "events larger than max_result_bytes together");
    job_finish(j, HD_OUT_BADRESULT);
    return;
  }
  hd_put_u32(n, (uint32_t)len);
  if (hd_buf_append(&j->events, n, sizeof n) != 0 || hd_buf_append(&j->events, msg, len) != 0) {
    snprintf(j->detail, sizeof j->detail, "out of memory keeping an event");
    job_finish(j, HD_OUT_FAILED);
    return;
  }
  if (j->notify && j->sched->on_end != NULL) j->sched->on_end(j->sched->on_end_ud, j);
}

static void proc_on_closed(hd_conn *c, void *ud) {
  sched_proc *p = ud;
  (void)c;
  p->closed = 1;
  proc_free_if_done(p);
}

/* Output from the process, on its stdout or stderr: counted against the
 * max_output of the job it runs, which ends (and the process is killed)
 * once past it; only the bytes within the limit go on. Output while no job
 * runs there (before the first, or from a child a job left) goes on and is
 * counted for nobody. */
/* What of `pass` bytes of output goes on: all, none (kept or dropped). */
static size_t job_output_pass(hd_job *j, const char *buf, size_t pass) {
  if (j->lim.output == HD_OUTPUT_INHERIT) return pass;
  /* Memory for it is bounded by max_output; when it runs out, the rest is
   * dropped, not the job. */
  if (j->lim.output == HD_OUTPUT_CAPTURE) (void)hd_buf_append(&j->captured, buf, pass);
  return 0;
}

static size_t proc_on_output(hd_conn *c, void *ud, int which, const char *buf, size_t len) {
  sched_proc *p = ud;
  hd_job *j = p->job;
  double left;
  size_t pass;
  (void)c;
  (void)which;
  if (j == NULL) return len;
  left = j->lim.max_output - j->out_used;
  if ((double)len <= left) {
    j->out_used += (double)len;
    return job_output_pass(j, buf, len);
  }
  j->out_used = j->lim.max_output;
  /* What fits goes first: the job may be gone once it is finished. */
  pass = job_output_pass(j, buf, left > 0 ? (size_t)left : 0);
  /* A job already decided (its process is being killed) keeps its end. */
  if (j->pending == HD_OUT_NONE) {
    snprintf(j->detail, sizeof j->detail, "wrote more than %.0f bytes to stdout and stderr",
             j->lim.max_output);
    job_finish(j, HD_OUT_OUTPUT);
  }
  return pass;
}

static const hd_conn_cbs proc_conn_cbs = {proc_on_reply, proc_on_fail, proc_on_eof,
                                          proc_on_closed, proc_on_output, proc_on_event};

static sched_proc *proc_find(hd_sched *s, uint32_t id) {
  hd_queue *q;
  for (q = s->procs.next; q != &s->procs; q = q->next) {
    sched_proc *p = HD_QUEUE_DATA(q, sched_proc, node);
    if (p->id == id) return p;
  }
  return NULL;
}

static void proc_on_exited(sched_proc *p, int status) {
  if (p->exited) return;
  p->exited = 1;
  p->status = status;
  hd_pool_note_process(p->root, -1, 0);
  /* A reply written just before the exit is already in the pipe: read it
   * before deciding the job died. */
  if (p->job) hd_conn_drain(p->conn);
  proc_unidle(p);
  p->state = PROC_DYING;
  proc_job_died(p);
  hd_conn_close(p->conn);
  proc_free_if_done(p);
}

static void sched_on_spawned(void *ud, uint32_t id, pid_t pid, int pidfd) {
  sched_proc *p = proc_find(ud, id);
  if (p == NULL || p->exited) {
    if (pidfd >= 0) close(pidfd);
    return;
  }
  p->pid = pid;
  if (p->pidfd >= 0) close(p->pidfd);
  p->pidfd = pidfd;
}

static void sched_on_exited(void *ud, uint32_t id, int status) {
  sched_proc *p = proc_find(ud, id);
  if (p != NULL) proc_on_exited(p, status);
}

/* The worker could not be started: its job, if it has one, says why. */
static void sched_on_failed(void *ud, uint32_t id, const char *why) {
  sched_proc *p = proc_find(ud, id);
  if (p == NULL || p->exited || p->job == NULL || p->job->pending != HD_OUT_NONE) return;
  snprintf(p->job->detail, sizeof p->job->detail, "cannot start a worker: %s", why);
  p->job->pending = HD_OUT_FAILED;
}

/* The supervisor is gone: every process it held is gone with it (workers
 * die with their supervisor), so their jobs end now. */
static void sched_on_lost(void *ud, const char *why) {
  hd_sched *s = ud;
  hd_queue *q, *n;
  /* None of them may take a job that a freed slot starts meanwhile. */
  HD_QUEUE_EACH(q, n, &s->procs) proc_unidle(HD_QUEUE_DATA(q, sched_proc, node));
  HD_QUEUE_EACH(q, n, &s->procs) {
    sched_proc *p = HD_QUEUE_DATA(q, sched_proc, node);
    /* Workers die with their supervisor, unless a job cleared that. */
    proc_kill_by_pidfd(p);
    if (p->job != NULL && p->job->pending == HD_OUT_NONE) {
      /* The job's caller learns why, not just that the worker is gone. */
      snprintf(p->job->detail, sizeof p->job->detail, "worker lost: %s", why);
      p->job->pending = HD_OUT_FAILED;
    }
    proc_on_exited(p, -1);
  }
}

/* A new worker process for `root`, or NULL with why in err; *lost is set
 * when the order could not reach the supervisor. */
static sched_proc *proc_spawn_once(hd_sched *s, hd_pool *root, char *err, size_t errlen,
                                   int *lost) {
  sched_proc *p;
  int peer[HD_SPAWN_FDS], r = hd_sup_ensure(s->sup, s->lua_path, s->lua_cpath);
  if (r < 0) {
    snprintf(err, errlen, "%s", hd_sup_error(s->sup));
    return NULL;
  }
  if (r == 1) s->sup_gen = s->paths_gen;
  p = calloc(1, sizeof *p);
  if (p == NULL) {
    snprintf(err, errlen, "out of memory");
    return NULL;
  }
  p->conn = hd_conn_new(s->loop, &proc_conn_cbs, p, peer, err, errlen);
  if (p->conn == NULL) {
    free(p);
    return NULL;
  }
  p->sched = s;
  p->root = root;
  p->id = ++s->next_proc;
  p->state = PROC_IDLE;
  p->status = -1;
  p->pidfd = -1;
  hd_queue_init(&p->inode);
  hd_queue_insert_head(&s->procs, &p->node);
  hd_pool_ref(root);
  s->refs++;
  hd_pool_note_process(root, 1, 1);
  if (hd_pool_sandbox(root) != 0) hd_conn_refuse_names(p->conn);
  if (hd_sup_spawn(s->sup, p->id, hd_pool_sandbox(root), hd_pool_name(root), peer) != 0) {
    /* The supervisor went away: this process is as good as dead. */
    snprintf(err, errlen, "%s", hd_sup_error(s->sup));
    proc_on_exited(p, -1);
    *lost = 1;
    return NULL;
  }
  return p;
}

/* A supervisor that died while nothing ran the loop (a host idle between
 * requests) is noticed by the first order it cannot take: a new supervisor
 * is started then, once, and the job that needed a worker never sees it. */
static sched_proc *proc_spawn(hd_sched *s, hd_pool *root, char *err, size_t errlen) {
  int lost = 0;
  sched_proc *p = proc_spawn_once(s, root, err, errlen, &lost);
  if (p == NULL && lost) p = proc_spawn_once(s, root, err, errlen, &lost);
  return p;
}

/* The most recently used idle process of `root` that is still fit. */
static sched_proc *proc_idle_of(hd_sched *s, hd_pool *root, uint64_t now) {
  hd_queue *q, *n;
  HD_QUEUE_EACH(q, n, &s->idle) {
    sched_proc *p = HD_QUEUE_DATA(q, sched_proc, inode);
    if (p->root == root && hd_conn_fit(p->conn, now)) return p;
  }
  return NULL;
}

/* ---- Jobs -------------------------------------------------------------------- */

hd_job *hd_job_new(hd_sched *s, hd_pool *origin) {
  hd_job *j = calloc(1, sizeof *j);
  if (j == NULL) return NULL;
  j->chains = hd_chains_new();
  if (j->chains == NULL) {
    free(j);
    return NULL;
  }
  j->sched = s;
  j->refs = 1;
  j->id = ++s->next_job;
  j->status = -1;
  j->origin = origin;
  hd_pool_ref(origin);
  hd_queue_init(&j->pnode);
  hd_queue_init(&j->rnode);
  s->refs++;
  return j;
}

static void job_free(hd_job *j) {
  hd_sched *s = j->sched;
  hd_chains_free(j->chains);
  hd_pool_unref(j->origin);
  free(j->task_name);
  hd_loop_give_buf(s->loop, &j->frame);
  hd_buf_free(&j->captured);
  hd_buf_free(&j->events);
  hd_buf_free(&j->items);
  free(j);
  hd_sched_unref(s);
}

void hd_job_unref(hd_job *j) {
  if (--j->refs == 0) job_free(j);
}

void hd_job_set_items(hd_job *j, uint32_t n) {
  j->nitems = n;
}

uint32_t hd_job_items_done(const hd_job *j) {
  return j->nitems > 0 ? j->item : 0;
}

int hd_job_item(hd_job *j, uint32_t i, int *status, const char **msg, size_t *len,
                uint64_t *cpu_ns, uint64_t *heap_peak, uint64_t *wall_ns) {
  size_t at = 0;
  uint32_t k = 0;
  if (i >= hd_job_items_done(j)) return -1;
  /* Items are read in order: the search starts where the last one ended. */
  if (i >= j->item_seek) {
    k = j->item_seek;
    at = j->item_seek_at;
  }
  for (;; k++) {
    const char *h = j->items.data + at;
    size_t n = hd_get_u32(h);
    if (k == i) {
      *status = (unsigned char)h[4];
      *cpu_ns = hd_get_u64(h + 5);
      *heap_peak = hd_get_u64(h + 13);
      *wall_ns = hd_get_u64(h + 21);
      *msg = h + JOB_ITEM_HEAD;
      *len = n;
      j->item_seek = k;
      j->item_seek_at = at;
      return 0;
    }
    at += JOB_ITEM_HEAD + n;
  }
}

uint64_t hd_job_item_wall(const hd_job *j) {
  uint64_t begun = j->item_started != 0 ? j->item_started : j->started;
  uint64_t end = j->state == JOB_DONE ? j->ended : uv_hrtime();
  if (j->started == 0 || end <= begun) return 0;
  /* As for the items before it: the worker's word, within the job's time. */
  if (j->nitems > 1 && j->state == JOB_DONE && j->has_stats)
    return j->wall_ns < end - j->started ? j->wall_ns : end - j->started;
  return end - begun;
}

void hd_job_set_limits(hd_job *j, const hd_job_limits *lim) {
  j->lim = *lim;
}

int hd_job_set_task(hd_job *j, const char *task_name) {
  free(j->task_name);
  j->task_name = task_name ? strdup(task_name) : NULL;
  return task_name && j->task_name == NULL ? -1 : 0;
}

const char *hd_job_task(const hd_job *j) {
  return j->task_name;
}

uint64_t hd_job_id(const hd_job *j) {
  return j->id;
}

hd_chains *hd_job_chains(hd_job *j) {
  return j->chains;
}

int hd_job_set_frame(hd_job *j, hd_buf *b) {
  hd_sched *s = j->sched;
  if (b->len > SCHED_TAKE_REPLY) {
    /* A big frame is not copied: the job takes the buffer. */
    hd_buf_free(&j->frame);
    j->frame = *b;
    b->data = NULL;
    b->len = b->cap = 0;
    return 0;
  }
  j->frame.len = 0;
  if (hd_buf_append(&j->frame, b->data, b->len) != 0) return -1;
  /* A big buffer serving small frames goes back to the loop's spare, where
   * the idle sweep can let it go. */
  if (b->cap > SCHED_KEEP_FRAME) hd_loop_give_buf(s->loop, b);
  return 0;
}

int hd_job_started(const hd_job *j) {
  return j->state == JOB_RUNNING || (j->state == JOB_DONE && j->started != 0);
}

int hd_job_done(const hd_job *j) {
  return j->state == JOB_DONE;
}

hd_outcome hd_job_outcome(const hd_job *j) {
  return j->outcome;
}

int hd_job_status(const hd_job *j) {
  return j->status;
}

const char *hd_job_detail(const hd_job *j) {
  return j->detail;
}

void hd_job_message(const hd_job *j, const char **p, size_t *len) {
  *p = j->frame.data ? j->frame.data + j->msg_off : "";
  *len = j->msg_len;
}

void hd_job_release_message(hd_job *j) {
  if (j->state != JOB_DONE || j->frame.cap <= SCHED_KEEP_FRAME) return;
  hd_loop_give_buf(j->sched->loop, &j->frame);
  j->msg_off = 0;
  j->msg_len = 0;
}

int hd_job_forsaken(const hd_job *j) {
  return j->sched->forsaken;
}

int hd_job_in_pool(const hd_job *j, const hd_pool *p) {
  return hd_chains_has(j->chains, p);
}

void hd_job_times(const hd_job *j, uint64_t *queued_ns, uint64_t *run_ns) {
  uint64_t end = j->state == JOB_DONE ? j->ended : uv_hrtime();
  *queued_ns = *run_ns = 0;
  if (j->state == JOB_NEW) return;
  if (j->started == 0) {
    *queued_ns = end - j->submitted;
    return;
  }
  *queued_ns = j->started - j->submitted;
  *run_ns = end - j->started;
}

static void job_cpu_close_cb(uv_handle_t *h) {
  hd_job *j = h->data;
  j->cpu_timer_open = 0;
  hd_job_unref(j);
}

/* The CPU time (ns) the process has used, or -1 when it cannot be read
 * (its pid is not known yet, or it is gone). */
static int64_t proc_cpu_ns(const sched_proc *p) {
  clockid_t clk;
  struct timespec ts;
  pid_t pid = p->pid > 0 ? p->pid : hd_conn_pid(p->conn);
  if (pid <= 0 || p->exited || clock_getcpuclockid(pid, &clk) != 0 ||
      clock_gettime(clk, &ts) != 0)
    return -1;
  return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void job_cpu_cb(uv_timer_t *t);
static void job_timer_start(hd_job *j, double ms);

static void job_cpu_start(hd_job *j, double ms) {
  if (ms < 1) ms = 1;
  if (ms > SCHED_MAX_TIMER_MS) ms = SCHED_MAX_TIMER_MS;
  if (!j->cpu_timer_open) {
    uv_timer_init(hd_loop_uv(j->sched->loop), &j->cpu_timer);
    j->cpu_timer.data = j;
    j->cpu_timer_open = 1;
    j->refs++;
  }
  uv_timer_start(&j->cpu_timer, job_cpu_cb, (uint64_t)ms, 0);
}

/* The limit `ms` of a job (an item), as it is counted: for the items of a
 * job of several, the time their replies may be held (HD_ITEM_HOLD_MS) on
 * top, in which the items after a held reply use time the host counts
 * against the item it heard of last. A limit of 0 stays 0 (at once). */
static double job_limit(const hd_job *j, double ms) {
  return ms + (j->nitems > 1 && ms > 0 ? HD_ITEM_HOLD_MS : 0);
}

static double job_cpu_limit(const hd_job *j) {
  return job_limit(j, j->lim.max_cpu_ms);
}

/* CPU time runs no faster than the wall clock (one thread): the job's
 * limit cannot pass before max_cpu_ms of wall time, and then it is
 * looked at again when what is left of it could have passed. */
static void job_cpu_cb(uv_timer_t *t) {
  hd_job *j = t->data;
  uint32_t item;
  int64_t now;
  double used_ms;
  if (j->state != JOB_RUNNING || j->proc == NULL || j->pending != HD_OUT_NONE) return;
  now = proc_cpu_ns(j->proc);
  if (now < 0) {
    job_cpu_start(j, 1);
    return;
  }
  used_ms = (double)((uint64_t)now - j->cpu_base) / 1e6;
  if (used_ms < job_cpu_limit(j)) {
    job_cpu_start(j, job_cpu_limit(j) - used_ms);
    return;
  }
  /* A reply already written is the result, as at a deadline. */
  item = j->item;
  hd_conn_drain(j->proc->conn);
  if (j->state != JOB_RUNNING || j->proc == NULL || j->item != item) return;
  j->pending = HD_OUT_CPUTIME;
  job_timer_start(j, SCHED_KILL_GRACE_MS);
  proc_kill(j->proc);
}

static void job_timer_close_cb(uv_handle_t *h) {
  hd_job *j = h->data;
  j->timer_open = 0;
  hd_job_unref(j);
}

static void job_timer_cb(uv_timer_t *t);

/* The timer, with its deadline `ms` after `now` (uv_hrtime()). */
static void job_timer_start_at(hd_job *j, double ms, uint64_t now) {
  if (!(ms > 0)) ms = 0;
  if (ms > SCHED_MAX_TIMER_MS) ms = SCHED_MAX_TIMER_MS;
  /* libuv counts whole milliseconds from the loop's cached time, so a timer
   * can fire up to a millisecond early; the deadline in nanoseconds is what
   * the callback checks. */
  j->deadline = now + (uint64_t)(ms * 1e6);
  if (!j->timer_open) {
    uv_timer_init(hd_loop_uv(j->sched->loop), &j->timer);
    j->timer.data = j;
    j->timer_open = 1;
    j->refs++;
  }
  uv_timer_start(&j->timer, job_timer_cb, (uint64_t)ms, 0);
}

static void job_timer_start(hd_job *j, double ms) {
  job_timer_start_at(j, ms, uv_hrtime());
}

static void job_unqueue(hd_job *j) {
  hd_sched *s = j->sched;
  sched_pool *sp = hd_pool_data(j->origin);
  hd_queue_remove(&j->pnode);
  hd_pool_note_queued(j->origin, -1);
  if (hd_queue_empty(&sp->jobs) && hd_queue_linked(&sp->wnode)) hd_queue_remove(&sp->wnode);
  (void)s;
}

/* Returns -1 when memory for the pool's queue runs out. */
static int job_enqueue(hd_job *j) {
  hd_sched *s = j->sched;
  sched_pool *sp = sched_pool_of(j->origin);
  if (sp == NULL) return -1;
  j->state = JOB_QUEUED;
  s->active++;
  hd_queue_insert_tail(&sp->jobs, &j->pnode);
  hd_pool_note_queued(j->origin, 1);
  if (!hd_queue_linked(&sp->wnode)) hd_queue_insert_tail(&s->waiting, &sp->wnode);
  return 0;
}

/* Counts an ended job's times in the pools its outcome counts in; a job
 * that never started has no run time. */
static void job_count_times(hd_job *j) {
  uint64_t queued, run;
  hd_job_times(j, &queued, &run);
  hd_chains_count_times(j->chains, j->origin, (double)queued / 1e9,
                        j->started != 0 ? (double)run / 1e9 : -1);
}

static void job_finish(hd_job *j, hd_outcome out) {
  hd_sched *s = j->sched;
  int was_running = j->state == JOB_RUNNING;
  if (j->state == JOB_DONE) return;
  if (j->state == JOB_QUEUED || was_running) s->active--;
  if (j->state == JOB_QUEUED) job_unqueue(j);
  if (was_running) hd_queue_remove(&j->rnode);
  if (j->proc != NULL) {
    /* It ended while its process still held it: that process is not fit to
     * run another job. */
    sched_proc *p = j->proc;
    p->job = NULL;
    j->proc = NULL;
    proc_kill(p);
  }
  j->ended = uv_hrtime();
  j->state = JOB_DONE;
  j->outcome = out;
  hd_chains_count_outcome(j->chains, j->origin, out);
  job_count_times(j);
  hd_chains_release(j->chains, j->lim.max_heap);
  if (j->timer_open && !uv_is_closing((uv_handle_t *)&j->timer)) {
    uv_timer_stop(&j->timer);
    uv_close((uv_handle_t *)&j->timer, job_timer_close_cb);
  }
  if (j->cpu_timer_open && !uv_is_closing((uv_handle_t *)&j->cpu_timer)) {
    uv_timer_stop(&j->cpu_timer);
    uv_close((uv_handle_t *)&j->cpu_timer, job_cpu_close_cb);
  }
  if (was_running) sched_pump(s);
  if (j->notify && s->on_end != NULL) s->on_end(s->on_end_ud, j);
  /* The scheduler's reference, taken at submit. */
  hd_job_unref(j);
}

/* A worker that serves one job ("syscalls" profile) is started in the
 * background while its predecessor runs, so the next job of its pool finds
 * it ready: one idle spare per such pool, no more. A spare that cannot be
 * had now is simply not there; a job then starts its own worker. */
static void sched_keep_spare(hd_sched *s, hd_pool *root) {
  char err[256];
  sched_proc *p;
  hd_queue *q;
  if (!sched_one_job(root) || s->closing || hd_pool_closed(root)) return;
  for (q = s->idle.next; q != &s->idle; q = q->next)
    if (HD_QUEUE_DATA(q, sched_proc, inode)->root == root) return;
  p = proc_spawn(s, root, err, sizeof err);
  if (p != NULL && !p->exited) proc_make_idle(p);
}

/* What the job's process is sent: the job frame, after its root pool's
 * INIT frame when the process has not had it yet. The process keeps that
 * first buffer until its next job. */
static const hd_buf *proc_frame_of(sched_proc *p, hd_job *j) {
  const char *init;
  size_t len;
  hd_buf_free(&p->boot);
  if (p->inited) return &j->frame;
  p->inited = 1;
  hd_pool_init(p->root, &init, &len);
  if (len == 0) return &j->frame;
  if (hd_wire_init_frame(&p->boot, j->id, init, len) != 0 ||
      hd_buf_append(&p->boot, j->frame.data, j->frame.len) != 0) {
    hd_buf_free(&p->boot);
    return NULL;
  }
  return &p->boot;
}

static void job_start(hd_job *j) {
  const hd_buf *frame;
  hd_sched *s = j->sched;
  hd_pool *root = hd_chains_root(j->chains);
  sched_proc *p;
  /* Started from its submit, it waited for nothing: one clock read less. */
  j->started = j->state == JOB_NEW ? j->submitted : uv_hrtime();
  p = proc_idle_of(s, root, j->started);
  if (j->state == JOB_NEW) s->active++;
  /* A running job starts again only when its worker died before reading
   * it (proc_on_eof): it is running and counted already. */
  if (j->state != JOB_RUNNING) {
    j->state = JOB_RUNNING;
    hd_queue_insert_head(&s->running, &j->rnode);
    hd_chains_count_start(j->chains);
  }
  if (p == NULL) {
    char err[256];
    p = proc_spawn(s, root, err, sizeof err);
    if (p == NULL) {
      snprintf(j->detail, sizeof j->detail, "cannot start a worker: %s", err);
      job_finish(j, HD_OUT_FAILED);
      return;
    }
  }
  /* max_ms = 0 times out at once; only math.huge means no limit. */
  if (j->lim.max_ms < SCHED_NO_LIMIT_MS) {
    uv_update_time(hd_loop_uv(s->loop));
    /* From its start: read a moment ago. */
    job_timer_start_at(j, job_limit(j, j->lim.max_ms), j->started);
  }
  if (j->lim.max_cpu_ms < SCHED_NO_LIMIT_MS) {
    int64_t base = proc_cpu_ns(p);
    /* A new worker's start counts: its clock is read from zero. */
    j->cpu_base = base > 0 ? (uint64_t)base : 0;
    uv_update_time(hd_loop_uv(s->loop));
    job_cpu_start(j, job_cpu_limit(j));
  }
  proc_unidle(p);
  p->state = PROC_BUSY;
  p->job = j;
  j->proc = p;
  frame = proc_frame_of(p, j);
  if (frame == NULL) {
    /* Without its init the worker cannot have the image its jobs expect. */
    snprintf(j->detail, sizeof j->detail, "out of memory sending the pool's init");
    job_finish(j, HD_OUT_FAILED);
    return;
  }
  hd_conn_send(p->conn, j->id, j->lim.max_result > 0 ? j->lim.max_result : s->max_result, frame);
  if (j->nitems > 1) hd_conn_expect(p->conn, j->nitems);
  sched_keep_spare(s, root);
}

static void job_timer_cb(uv_timer_t *t) {
  hd_job *j = t->data;
  uint64_t now = uv_hrtime();
  uint32_t item;
  if (now < j->deadline) {
    /* Early: wait for the rest, rounded up to the next millisecond. */
    uint64_t left = j->deadline - now;
    uint64_t deadline = j->deadline;
    job_timer_start(j, (double)((left + 999999) / 1000000));
    j->deadline = deadline;
    return;
  }
  if (j->state == JOB_QUEUED) {
    job_finish(j, HD_OUT_POOLTIMEOUT);
    return;
  }
  if (j->state != JOB_RUNNING) return;
  if (j->pending != HD_OUT_NONE || j->proc == NULL) {
    /* The exit report did not come in time; end the job anyway. */
    job_finish(j, j->pending != HD_OUT_NONE ? j->pending : HD_OUT_TIMEOUT);
    return;
  }
  /* The rule when the host ran its loop late: a reply the worker had
   * already written when the deadline is handled is the result; otherwise
   * the job is a Timeout. Never both, never neither. */
  item = j->item;
  hd_conn_drain(j->proc->conn);
  if (j->state != JOB_RUNNING) return;
  if (j->item != item) {
    /* A drained item's reply started the next item's time: wait for it. */
    uint64_t deadline = j->deadline;
    now = uv_hrtime();
    job_timer_start(j, deadline > now ? (double)((deadline - now + 999999) / 1000000) : 0);
    j->deadline = deadline;
    return;
  }
  /* Time is up. The job ends when the process is confirmed gone, so a caller
   * that sees Timeout knows the worker no longer runs. */
  j->pending = HD_OUT_TIMEOUT;
  job_timer_start(j, SCHED_KILL_GRACE_MS);
  if (j->proc != NULL) proc_kill(j->proc);
}

static void job_submit(hd_job *j, uint64_t now);

void hd_job_submit(hd_job *j) {
  hd_sched *s = j->sched;
  uint64_t now = uv_hrtime();
  /* A host that has not run the loop for a while (nginx between requests)
   * hears the news first: a supervisor or worker that died meanwhile is
   * replaced, not handed the job. */
  if (now - s->last_run > SCHED_STALE_NS) {
    hd_sched_step(s);
    now = uv_hrtime();
  }
  job_submit(j, now);
  /* A host submitting many jobs in a row (async after async) does not run
   * the loop meanwhile: workers that finished would sit idle until it
   * waits. While jobs queue, a look at the loop now and then (one system
   * call, when it has not run for SCHED_BUSY_NS) hands them the next. */
  if (j->state == JOB_QUEUED && !s->in_loop && uv_hrtime() - s->last_run > SCHED_BUSY_NS)
    hd_sched_step(s);
  sched_sync(s);
}

static void job_submit(hd_job *j, uint64_t now) {
  hd_sched *s = j->sched;
  sched_pool *sp = hd_pool_data(j->origin);
  uint64_t heap = j->lim.max_heap;
  hd_outcome out;
  j->submitted = now;
  j->refs++; /* the scheduler's, until the job is done */
  /* A job that is willing to wait queues behind those already waiting in
   * its pool, first come first served; one that is not takes capacity if
   * there is some. */
  if (j->lim.pool_timeout > 0 && sp != NULL && !hd_queue_empty(&sp->jobs))
    out = hd_chains_could_fit(j->chains, heap) ? HD_OUT_NOWORKERS
                                               : hd_chains_reserve(j->chains, heap);
  else
    out = hd_chains_reserve(j->chains, heap);
  if (out == HD_OUT_NONE) {
    job_start(j);
    return;
  }
  if (j->lim.pool_timeout > 0 && hd_chains_could_fit(j->chains, heap) && job_enqueue(j) == 0) {
    /* pool_timeout = math.huge waits as long as it takes. */
    if (j->lim.pool_timeout < SCHED_NO_LIMIT_MS) {
      uv_update_time(hd_loop_uv(s->loop));
      job_timer_start(j, j->lim.pool_timeout);
    }
    return;
  }
  job_finish(j, out);
}

/* An item of the job has replied (body: status byte, message) and the next
 * one runs: the reply is kept, and the next item gets limits of its own,
 * counted from now. */
static void job_item_replied(hd_job *j, sched_proc *p, const char *body, size_t len) {
  char h[JOB_ITEM_HEAD];
  uint64_t cpu = 0, heap = 0, now = uv_hrtime();
  uint64_t begun = j->item_started != 0 ? j->item_started : j->started;
  uint64_t wall = now - begun;
  /* The worker sends the replies of quick items together (HD_ITEM_HOLD_MS):
   * its word says how long each took, within the job's time. */
  if (hd_conn_stats(p->conn, &cpu, &heap, &wall) && wall > now - j->started)
    wall = now - j->started;
  hd_put_u32(h, (uint32_t)(len - 1));
  h[4] = body[0];
  hd_put_u64(h + 5, cpu);
  hd_put_u64(h + 13, heap);
  hd_put_u64(h + 21, wall);
  if (hd_buf_append(&j->items, h, sizeof h) != 0 ||
      hd_buf_append(&j->items, body + 1, len - 1) != 0) {
    snprintf(j->detail, sizeof j->detail, "out of memory storing an item's reply");
    job_finish(j, HD_OUT_BADREPLY);
    return;
  }
  j->item++;
  j->item_started = now;
  j->out_used = 0;
  /* The timer stays as it is: due no later than the new deadline, it finds
   * the deadline moved and waits for the rest (one store per item, not a
   * timer restart). */
  if (j->lim.max_ms < SCHED_NO_LIMIT_MS) {
    double ms = job_limit(j, j->lim.max_ms);
    j->deadline = now + (uint64_t)((ms < SCHED_MAX_TIMER_MS ? ms : SCHED_MAX_TIMER_MS) * 1e6);
  }
  if (j->lim.max_cpu_ms < SCHED_NO_LIMIT_MS) {
    int64_t base = proc_cpu_ns(p);
    if (base > 0) j->cpu_base = (uint64_t)base;
    uv_update_time(hd_loop_uv(j->sched->loop));
    job_cpu_start(j, job_cpu_limit(j));
  }
}

static void job_on_reply(hd_job *j, hd_buf *buf, size_t off, size_t len) {
  hd_outcome out;
  switch ((unsigned char)buf->data[off]) {
    case HD_REPLY_OK: out = HD_OUT_OK; break;
    case HD_REPLY_ERROR: out = HD_OUT_ERROR; break;
    case HD_REPLY_OOM: out = HD_OUT_OOM; break;
    default: out = HD_OUT_BADRESULT; break;
  }
  if (j->pending != HD_OUT_NONE) out = j->pending;
  j->msg_off = 0;
  j->msg_len = 0;
  if (len > SCHED_TAKE_REPLY) {
    /* A big reply is not copied: the job takes the read buffer, and the
     * connection gets the job frame's, which is no longer needed. */
    hd_buf spare = j->frame;
    j->frame = *buf;
    *buf = spare;
    buf->len = 0;
    j->msg_off = off + 1;
    j->msg_len = len - 1;
  } else {
    j->frame.len = 0;
    if (j->frame.cap > SCHED_KEEP_FRAME) hd_loop_give_buf(j->sched->loop, &j->frame);
    if (hd_buf_append(&j->frame, buf->data + off + 1, len - 1) != 0) {
      snprintf(j->detail, sizeof j->detail, "out of memory storing the reply");
      out = HD_OUT_BADREPLY;
    } else {
      j->msg_len = len - 1;
    }
  }
  job_finish(j, out);
}

void hd_job_kill(hd_job *j) {
  job_finish(j, HD_OUT_KILLED);
  sched_sync(j->sched);
}

void hd_job_output(const hd_job *j, const char **p, size_t *len) {
  *p = j->captured.data ? j->captured.data : "";
  *len = j->captured.len;
}

void hd_job_take_events(hd_job *j, hd_buf *out) {
  *out = j->events;
  j->events.data = NULL;
  j->events.len = j->events.cap = 0;
}

int hd_job_has_events(const hd_job *j) {
  return j->events.len > 0;
}

int hd_job_worker_stats(const hd_job *j, uint64_t *cpu_ns, uint64_t *heap_peak) {
  if (!j->has_stats) return 0;
  *cpu_ns = j->cpu_ns;
  *heap_peak = j->heap_peak;
  return 1;
}

double hd_job_output_bytes(const hd_job *j) {
  return j->out_used;
}

void hd_job_notify(hd_job *j) {
  j->notify = 1;
}

/* The first queued or running job `match` accepts, or NULL. */
static hd_job *sched_find(hd_sched *s, int (*match)(hd_job *, void *), void *ud) {
  hd_queue *w, *q;
  for (w = s->waiting.next; w != &s->waiting; w = w->next) {
    sched_pool *sp = HD_QUEUE_DATA(w, sched_pool, wnode);
    for (q = sp->jobs.next; q != &sp->jobs; q = q->next) {
      hd_job *j = HD_QUEUE_DATA(q, hd_job, pnode);
      if (match(j, ud)) return j;
    }
  }
  for (q = s->running.next; q != &s->running; q = q->next) {
    hd_job *j = HD_QUEUE_DATA(q, hd_job, rnode);
    if (match(j, ud)) return j;
  }
  return NULL;
}

int hd_sched_kill_where(hd_sched *s, int (*match)(hd_job *, void *),
                        void (*each)(hd_job *, void *), void *ud) {
  int n = 0;
  hd_job *j;
  /* Each kill may change both lists (a freed slot starts a queued job),
   * so the search starts over after each. */
  while ((j = sched_find(s, match, ud)) != NULL) {
    if (each != NULL) each(j, ud);
    hd_job_kill(j);
    n++;
  }
  return n;
}

/* Starts queued jobs that fit now, first come first served within each
 * pool: a job that does not fit holds back the later jobs of its own pool,
 * not those of other pools. */
static void sched_pump(hd_sched *s) {
  if (s->in_pump) {
    s->pump_again = 1;
    return;
  }
  s->in_pump = 1;
  do {
    hd_queue *w, *wn;
    s->pump_again = 0;
    HD_QUEUE_EACH(w, wn, &s->waiting) {
      sched_pool *sp = HD_QUEUE_DATA(w, sched_pool, wnode);
      hd_queue *q;
      while ((q = hd_queue_head(&sp->jobs)) != NULL) {
        hd_job *j = HD_QUEUE_DATA(q, hd_job, pnode);
        if (hd_chains_reserve(j->chains, j->lim.max_heap) != HD_OUT_NONE) break;
        job_unqueue(j);
        if (j->timer_open) uv_timer_stop(&j->timer);
        job_start(j);
        /* Starting may have emptied this pool's queue and unlinked it. */
        if (!hd_queue_linked(&sp->wnode)) break;
      }
    }
  } while (s->pump_again);
  s->in_pump = 0;
}

static int sched_match_pool(hd_job *j, void *p) {
  return hd_chains_has(j->chains, p);
}

void hd_sched_forget_pool(hd_sched *s, hd_pool *p) {
  hd_queue *q, *n;
  hd_pool_set_closed(p);
  HD_QUEUE_EACH(q, n, &s->idle) {
    sched_proc *sp = HD_QUEUE_DATA(q, sched_proc, inode);
    if (sp->root == p) proc_retire(sp);
  }
  sched_sync(s);
}

void hd_sched_close_pool(hd_sched *s, hd_pool *p) {
  hd_pool_set_closed(p);
  hd_sched_kill_where(s, sched_match_pool, NULL, p);
  hd_sched_forget_pool(s, p);
}

void hd_sched_shutdown(hd_sched *s) {
  hd_queue *q;
  if (s->closing) return;
  s->closing = 1;
  while (!hd_queue_empty(&s->waiting)) {
    sched_pool *sp = HD_QUEUE_DATA(hd_queue_head(&s->waiting), sched_pool, wnode);
    job_finish(HD_QUEUE_DATA(hd_queue_head(&sp->jobs), hd_job, pnode), HD_OUT_KILLED);
  }
  while ((q = hd_queue_head(&s->running)) != NULL) hd_job_kill(HD_QUEUE_DATA(q, hd_job, rnode));
  hd_sup_close(s->sup);
  uv_run(hd_loop_uv(s->loop), UV_RUN_NOWAIT);
  uv_close((uv_handle_t *)s->idle_timer, sched_idle_close_cb);
  s->idle_timer = NULL;
  uv_run(hd_loop_uv(s->loop), UV_RUN_NOWAIT);
}
