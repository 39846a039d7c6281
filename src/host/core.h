/* core.h: the parent side: the loop, the supervisor link, worker processes,
 * jobs and pools. Internal to the module; the Lua binding is lhandler.c. */
#ifndef HD_CORE_H
#define HD_CORE_H

#include <stdint.h>
#include <sys/types.h>
#include <uv.h>

#include "buf.h"

typedef struct hd_core hd_core;
typedef struct hd_pool hd_pool;
typedef struct hd_job hd_job;
typedef struct hd_proc hd_proc;
typedef struct hd_ctlmsg hd_ctlmsg;

/* How a job ended. The first four come from the worker's reply. */
typedef enum hd_outcome {
  HD_OUT_NONE = 0,
  HD_OUT_OK,
  HD_OUT_ERROR,     /* the job raised; reply holds reason and traceback */
  HD_OUT_OOM,
  HD_OUT_BADRESULT, /* reply holds why the results cannot travel */
  HD_OUT_TIMEOUT,
  HD_OUT_EXIT,      /* the process died: `status` is its wait status, or -1 */
  HD_OUT_KILLED,    /* a user killed it */
  HD_OUT_BADREPLY,  /* the worker broke the protocol; `detail` says how */
  HD_OUT_FAILED,    /* the worker could not be started; `detail` says why */
  HD_OUT_NOWORKERS, /* rejected: no slot */
  HD_OUT_NOMEMORY,  /* rejected: no memory budget */
  HD_OUT_POOLTIMEOUT,
  HD_OUT_COUNT
} hd_outcome;

#define HD_MAX_CHAIN 16  /* pools in one delegation chain */
#define HD_MAX_CHAINS 32 /* candidate chains of one job */

typedef enum { HD_JOB_NEW, HD_JOB_QUEUED, HD_JOB_RUNNING, HD_JOB_DONE } hd_job_state;

struct hd_job {
  hd_core *core;
  int refs;             /* the Lua userdata, plus the core while not done or the timer is open */
  uint64_t id;
  hd_job_state state;
  hd_outcome outcome;
  int status;           /* wait status for HD_OUT_EXIT, -1 when unknown */
  char detail[320];     /* for BADREPLY and FAILED */
  /* The candidate chains, each from the job's pool to a root pool; `chain`
   * is the one that accepted it. Every pool here holds a reference. */
  hd_pool *(*chains)[HD_MAX_CHAIN]; /* chain0, or an allocated array */
  hd_pool *chain0[1][HD_MAX_CHAIN];
  int chain_len[HD_MAX_CHAINS];
  int nchains;
  int chain;            /* index of the reserving chain, or -1 */
  hd_pool *origin;      /* the pool it was started in (holds a reference) */
  char *task_name;
  double max_ms;
  double pool_timeout;
  double max_result;    /* max_result_bytes; 0: the core's default */
  uint64_t max_heap;
  hd_outcome pending;   /* the outcome decided, waiting for the process to be gone */
  hd_buf frame;         /* the job frame; after the end, the reply message */
  size_t frame_off;     /* where the reply message starts in `frame` */
  hd_proc *proc;
  uv_timer_t timer;     /* max_ms while running, pool_timeout while queued */
  uint64_t deadline;    /* uv_hrtime() when the timer is due */
  int timer_open;
  hd_job *qnext, *qprev;     /* the core's wait queue, in arrival order */
  hd_job *pnext, *pprev;     /* its pool's wait queue */
  hd_job *rnext, *rprev;     /* the core's list of running jobs */
};

typedef enum { HD_PROC_IDLE, HD_PROC_BUSY, HD_PROC_DYING } hd_proc_state;

struct hd_proc {
  hd_core *core;
  hd_pool *root;        /* the root pool it belongs to (holds a reference) */
  uint32_t id;
  pid_t pid;            /* from the supervisor, for stats and tests only */
  int pidfd;            /* from the supervisor: signals exactly this process, or -1 */
  int fd;               /* our end of the protocol socket, -1 once closed */
  uv_poll_t poll;
  int poll_open, poll_events;
  hd_proc_state state;
  int exited;           /* the supervisor has reported its exit */
  int status;           /* its wait status */
  int eof;
  int hello;            /* its hello frame arrived */
  hd_job *job;
  hd_buf in;            /* reply bytes read so far */
  hd_buf out;           /* frame bytes not yet written */
  size_t out_off;
  uint64_t idle_since;  /* uv_now when it became idle */
  hd_proc *next, *prev;         /* the core's list */
  hd_proc *inext;               /* its root's idle stack */
};

/* Counters for pool:stats(). */
typedef struct hd_counts {
  double started, succeeded, rejected;
  double by_outcome[HD_OUT_COUNT];
} hd_counts;

struct hd_pool {
  hd_core *core;
  int refs;             /* the Lua userdata, child pools, jobs, processes */
  char *name;
  double max_workers;
  double max_memory;
  double running;       /* slots reserved */
  double committed;     /* bytes reserved */
  double queued;
  double idle_ms;
  hd_pool *parent;      /* delegate_to, resolved; holds a reference */
  int sandbox;          /* root pools: HD_SPAWN_* flags of their workers */
  int closed;
  /* Root pools only: their processes. */
  hd_proc *idle;        /* idle processes, most recently used first */
  /* Jobs waiting (pool_timeout) that started here, first come first served;
   * a pool with waiting jobs is on the core's `waiting` list. */
  hd_job *qhead, *qtail;
  hd_pool *wnext, *wprev;
  int waiting;
  double procs;         /* processes alive (any state) */
  double spawned;
  hd_counts counts;
};

struct hd_ctlmsg {
  hd_ctlmsg *next;
  size_t len;
  int fd;               /* attached descriptor, or -1 */
  char data[16];
};

typedef enum { HD_SUP_NONE, HD_SUP_UP, HD_SUP_BROKEN } hd_sup_state;

struct hd_core {
  uv_loop_t loop;
  int refs;             /* the Lua context userdata, pools, jobs, processes */
  int closing;
  char *worker_path;
  char *lua_path, *lua_cpath; /* the host's package.path and cpath, for workers */
  unsigned paths_gen;   /* bumped when they change */
  unsigned sup_paths_gen; /* the generation the supervisor's image has */
  char bchead[8];       /* the host VM's bytecode header */
  size_t bchead_len;
  /* The supervisor. */
  hd_sup_state sup;
  pid_t sup_pid;
  int sup_fd;
  uv_poll_t sup_poll;
  int sup_poll_open, sup_poll_events;
  int sup_hello;        /* its hello arrived and matched */
  char sup_error[256];  /* why it cannot be used, when it cannot */
  hd_ctlmsg *ctl_head, *ctl_tail;
  /* Ids. */
  uint32_t next_proc;
  uint64_t next_job;
  /* Everything alive. */
  hd_proc *procs;
  hd_job *queue_head, *queue_tail;
  hd_pool *waiting;     /* pools with waiting jobs */
  hd_job *running;
  uv_timer_t idle_timer;
  int idle_timer_open;
  double max_result_bytes;
  hd_buf scratch;       /* encode buffer reused across submits */
  hd_buf spare;         /* one big buffer kept warm between big transfers */
  int spare_used;       /* taken since the last idle sweep */
  int in_loop;
  uint64_t spin_ns;     /* how long a blocking wait polls before sleeping */
  int spin_credit;      /* recent waits the polling paid off for */
  unsigned spin_probe;
  int in_pump;
  pid_t pending[8];     /* supervisors let go while still exiting, to reap */
  int npending;
  int pump_again;
};

/* core.c */
hd_core *hd_core_new(const char *worker_path, char *err, size_t errlen);
void hd_core_unref(hd_core *c);
void hd_core_shutdown(hd_core *c);
int hd_core_sup_ensure(hd_core *c);
void hd_core_set_paths(hd_core *c, const char *path, const char *cpath);
int hd_core_ctl_send(hd_core *c, const char *msg, size_t len, int fd);
void hd_core_sup_broken(hd_core *c, const char *why);
void hd_core_drain_ctl(hd_core *c);
void hd_core_reap_pending(hd_core *c);
void hd_core_give_buf(hd_core *c, hd_buf *b);
int hd_core_take_buf(hd_core *c, hd_buf *b, size_t need);
uint64_t hd_core_now(hd_core *c);
void hd_core_arm_idle(hd_core *c, double ms);

/* proc.c */
hd_proc *hd_proc_spawn(hd_core *c, hd_pool *root, char *err, size_t errlen);
void hd_proc_start_job(hd_proc *p, hd_job *j);
void hd_proc_kill(hd_proc *p);
void hd_proc_drain(hd_proc *p);
int hd_proc_fit(hd_proc *p);
void hd_proc_retire(hd_proc *p);
void hd_proc_on_spawned(hd_core *c, uint32_t id, pid_t pid, int pidfd);
void hd_proc_on_exited(hd_core *c, uint32_t id, int status, int known);
void hd_proc_sweep_idle(hd_core *c);

/* job.c */
hd_job *hd_job_new(hd_core *c);
void hd_job_unref(hd_job *j);
void hd_job_submit(hd_job *j);
void hd_job_finish(hd_job *j, hd_outcome out);
void hd_job_on_reply(hd_job *j, hd_proc *p, const char *body, size_t len);
void hd_job_kill(hd_job *j);
/* Kills every queued or running job `match` accepts, calling `each` on it
 * first (may be NULL). Returns how many. */
int hd_job_kill_where(hd_core *c, int (*match)(hd_job *, void *),
                      void (*each)(hd_job *, void *), void *ud);
void hd_job_pump_queue(hd_core *c);

/* pool.c */
hd_pool *hd_pool_new(hd_core *c, const char *name, double max_workers, double max_memory,
                     hd_pool *parent, double idle_ms, int sandbox);
void hd_pool_ref(hd_pool *p);
void hd_pool_unref(hd_pool *p);
hd_outcome hd_pool_try_reserve(hd_job *j);
int hd_pool_could_ever_fit(hd_job *j);
void hd_pool_release(hd_job *j);
int hd_pool_in_chain(hd_job *j, hd_pool *p);
hd_pool *hd_job_root(hd_job *j);
void hd_pool_close(hd_pool *p);

#endif
