/* scheduler.h: the scheduler of jobs, the one module that knows them: it
 * reserves capacity in pools, queues, starts jobs on worker processes,
 * times them out, and ends each exactly once. It owns the host's context:
 * the loop, the supervisor link and the worker processes. */
#ifndef HD_SCHEDULER_H
#define HD_SCHEDULER_H

#include <stdint.h>
#include <sys/types.h>

#include "buf.h"
#include "outcome.h"
#include "pool.h"

typedef struct hd_sched hd_sched;
typedef struct hd_job hd_job;

/* ---- The context ------------------------------------------------------------ */

hd_sched *hd_sched_new(const char *worker_path, char *err, size_t errlen);

/* Ends everything: jobs are killed, processes end with the supervisor, and
 * every handle is closed. The context lives on while jobs or pools hold it;
 * it is freed when the last reference goes (hd_sched_unref). */
void hd_sched_shutdown(hd_sched *s);
void hd_sched_unref(hd_sched *s);
int hd_sched_closing(const hd_sched *s);

/* Whether this process is a fork of the one that made the context: then
 * the context was forsaken at the fork (its copies of the parent's
 * descriptors closed, no libuv call made on it) and must never be used or
 * freed; its jobs, pools and processes are the parent's. */
int hd_sched_forsaken(const hd_sched *s);

/* A new context for a forked child, with the settings of the forsaken one
 * (worker, bytecode header, module paths, limits): its own loop, and its
 * own supervisor once a job needs one. NULL, with why in err, when it
 * cannot be made. */
hd_sched *hd_sched_renew(hd_sched *forsaken, char *err, size_t errlen);

/* A pool the forked child goes on using under its new context: its counts
 * of the parent's jobs and processes, and its queue, start afresh. */
void hd_sched_adopt_pool(hd_sched *s, hd_pool *p);

const char *hd_sched_worker_path(const hd_sched *s);

/* An empty buffer to build a job frame in, reused across submits. */
hd_buf *hd_sched_scratch(hd_sched *s);

/* The host VM's bytecode header, which the workers' must match. */
void hd_sched_set_bchead(hd_sched *s, const char *bc, size_t n);

/* The host's module paths, for workers started from now on. */
void hd_sched_set_paths(hd_sched *s, const char *path, const char *cpath);

/* The paths a job frame must carry: NULL when the running supervisor's
 * image has the current ones. */
const char *hd_sched_job_path(const hd_sched *s);
const char *hd_sched_job_cpath(const hd_sched *s);

void hd_sched_set_max_result(hd_sched *s, double bytes);

/* How long a blocking wait polls for a short job's reply before it sleeps. */
void hd_sched_set_spin(hd_sched *s, uint64_t ns);

/* Whether the loop is running now (from a callback, or a wait): nothing
 * may then start a job, wait or step. */
int hd_sched_in_loop(const hd_sched *s);

/* The loop, for hosts that drive it: a descriptor that becomes readable
 * when there is work, the ms until the next timer (-1: none), and a step
 * that runs what is ready without blocking. */
int hd_sched_fd(hd_sched *s);
int hd_sched_timeout(hd_sched *s);
void hd_sched_step(hd_sched *s);

/* Blocks until the job is done. */
void hd_sched_wait(hd_sched *s, hd_job *j);

/* Blocks until one of the n jobs is done (or, with `events`, has events
 * waiting), or timeout_ms passes (math.huge: no limit; 0: one step, no
 * wait). Returns the index of the first such job in the array, -1 on
 * timeout, -2 when memory runs out. */
int hd_sched_wait_any(hd_sched *s, hd_job *const *jobs, int n, double timeout_ms, int events);

/* Blocks until ready(ud) holds (it is asked after each turn of the loop),
 * or timeout_ms passes (math.huge: no limit). Returns 1 when it held, 0 on
 * timeout, -2 when memory runs out. */
int hd_sched_wait_until(hd_sched *s, int (*ready)(void *), void *ud, double timeout_ms);

/* How many jobs are queued or running. */
int hd_sched_active(const hd_sched *s);

/* fn(ud, job) is called as each job marked with hd_job_notify ends, from
 * inside the loop or from the call that ended it (a kill, a reject): for
 * hosts that wake their own waiters. */
void hd_sched_on_end(hd_sched *s, void (*fn)(void *ud, hd_job *j), void *ud);

/* Calls fn with the pid of each worker process alive; *sup gets the
 * supervisor's pid (or -1) and *fds the descriptors the host holds for its
 * workers. For tests and dashboards. */
void hd_sched_each_pid(hd_sched *s, void (*fn)(void *, pid_t), void *ud, pid_t *sup,
                       int *fds);

/* For tests and the fuzzers: the references held on the context (the
 * caller's, one per job and per process), and ids counted from 1 again. */
int hd_sched_refs(const hd_sched *s);
void hd_sched_reset_ids(hd_sched *s);

/* ---- Pools ------------------------------------------------------------------- */

/* A pool nobody can start jobs in any more (its Lua object is gone): idle
 * processes end now, busy ones when their jobs end. */
void hd_sched_forget_pool(hd_sched *s, hd_pool *p);

/* pool:close(): kills the pool's jobs, then forgets it. */
void hd_sched_close_pool(hd_sched *s, hd_pool *p);

/* ---- Jobs -------------------------------------------------------------------- */

/* Where a job's output goes (within max_output, however it goes): on to
 * the host's stdout and stderr, kept for hd_job_output, or nowhere. */
#define HD_OUTPUT_INHERIT 0
#define HD_OUTPUT_CAPTURE 1
#define HD_OUTPUT_DISCARD 2

typedef struct hd_job_limits {
  double max_ms;        /* math.huge: none */
  double pool_timeout;  /* ms to wait for capacity; 0: none */
  double max_result;    /* bytes; 0: the context's default */
  double max_output;    /* bytes the job may write to stdout and stderr */
  double max_cpu_ms;    /* CPU time; math.huge: none */
  int output;           /* HD_OUTPUT_*: where the job's stdout and stderr go */
  uint64_t max_heap;
} hd_job_limits;

/* A new job started in `origin`, with one reference (the caller's). */
hd_job *hd_job_new(hd_sched *s, hd_pool *origin);
void hd_job_unref(hd_job *j);

void hd_job_set_limits(hd_job *j, const hd_job_limits *lim);

/* The job's frame carries n items (wire.h's HD_JOB_ITEMS): the worker runs
 * its function once per item, each with the job's limits counted afresh
 * from the previous item's reply. The reply the job ends with is its last
 * item's, or the job ends (Timeout, a death...) while item
 * hd_job_items_done(j) runs; the items after it did not run. */
void hd_job_set_items(hd_job *j, uint32_t n);

/* How many items replied before the one the job ended with. */
uint32_t hd_job_items_done(const hd_job *j);

/* Item i's reply (i < hd_job_items_done): its status (HD_REPLY_*), codec
 * message, the CPU time and heap peak the worker said, its wall time as the
 * host saw it. Returns 0, or -1 when there is no such item. */
int hd_job_item(hd_job *j, uint32_t i, int *status, const char **msg, size_t *len,
                uint64_t *cpu_ns, uint64_t *heap_peak, uint64_t *wall_ns);

/* The wall time (ns) of the item the job ended with, as the host saw it:
 * from the previous item's reply (or the job's start) to the job's end. */
uint64_t hd_job_item_wall(const hd_job *j);
int hd_job_set_task(hd_job *j, const char *task_name);
const char *hd_job_task(const hd_job *j);
uint64_t hd_job_id(const hd_job *j);

/* The job's candidate chains, to fill before it is submitted. */
hd_chains *hd_job_chains(hd_job *j);

/* The job frame (see wire.h), built in `b` (hd_sched_scratch): the job
 * copies it, or takes b's memory when it is big. Returns -1 when memory
 * runs out. */
int hd_job_set_frame(hd_job *j, hd_buf *b);

/* Reserves capacity and starts the job, queues it, or ends it rejected. */
void hd_job_submit(hd_job *j);

int hd_job_done(const hd_job *j);

/* Whether the job was given a worker (it may have ended since). */
int hd_job_started(const hd_job *j);
hd_outcome hd_job_outcome(const hd_job *j);

/* Once done: the wait status of a process that died (-1 when unknown), the
 * detail of BADREPLY, FAILED and a BADRESULT the host decided, and the
 * reply's message (len 0 when there is none). */
int hd_job_status(const hd_job *j);
const char *hd_job_detail(const hd_job *j);
void hd_job_message(const hd_job *j, const char **p, size_t *len);
/* Lets a done job's big reply buffer go back to the loop's warm spare, for
 * the next big transfer, once its message has been decoded and will not be
 * read again: the message is empty after this. */
void hd_job_release_message(hd_job *j);

/* Whether the job is of a forsaken context: started before a fork, in
 * another process. */
int hd_job_forsaken(const hd_job *j);

/* Whether `p` is the job's own pool or one it was (or may be) delegated to. */
int hd_job_in_pool(const hd_job *j, const hd_pool *p);

/* What a job with HD_OUTPUT_CAPTURE wrote to its stdout and stderr so far,
 * in the order it was read (len 0 for other jobs); and the bytes of output
 * counted against max_output. */
void hd_job_output(const hd_job *j, const char **p, size_t *len);
double hd_job_output_bytes(const hd_job *j);

/* What the worker said of a job that replied: the CPU time it used and the
 * peak of its heap. Returns 0 when the job has no reply. */
int hd_job_worker_stats(const hd_job *j, uint64_t *cpu_ns, uint64_t *heap_peak);

/* The job's events not yet taken, moved into the empty buffer out: each a
 * u32 length and a validated codec message of one value. The context's
 * on_end callback is also called, for a job marked with hd_job_notify, as
 * each event arrives. */
void hd_job_take_events(hd_job *j, hd_buf *out);
int hd_job_has_events(const hd_job *j);

/* Marks the job for the context's on_end callback (hd_sched_on_end). */
void hd_job_notify(hd_job *j);

/* How long the job waited for capacity (from its submit to its start, or
 * to its end when it never started) and how long it ran (from its start,
 * when it was given to a worker, to its end), in ns; a job not done yet
 * counts up to now. Both 0 before it is submitted. */
void hd_job_times(const hd_job *j, uint64_t *queued_ns, uint64_t *run_ns);

/* A user kill: the job ends now, as KILLED; its process is killed. */
void hd_job_kill(hd_job *j);

/* Kills every queued or running job `match` accepts, calling `each` on it
 * first (may be NULL). Returns how many. */
int hd_sched_kill_where(hd_sched *s, int (*match)(hd_job *, void *),
                        void (*each)(hd_job *, void *), void *ud);

#endif
