/* fuzz_frame.c: libFuzzer harness over the parent's side of the job
 * protocol: the frames a worker writes on its reply pipe, read, parsed and
 * turned into a job's end by src/host/conn.c and src/host/scheduler.c,
 * then decoded.
 *
 * The real host layers are linked in; only the functions of the supervisor
 * link (src/host/suplink.c, the parent's only link to its workers) that
 * reach the supervisor process are replaced, with the linker's --wrap:
 * spawning a worker hands this harness the worker's ends of the protocol
 * pipes, and killing one is answered with its exit report, through the
 * callbacks the scheduler registered with the link. The harness then plays the worker:
 * it writes the input's bytes on its reply pipe in chunks, runs the parent's
 * libuv loop between them, and finally reports the worker's exit, as the
 * supervisor would.
 *
 * Input: three option bytes, then the bytes the worker writes.
 *   byte 0  bits 0-1  chunk sizes: all at once, 1-16, 1-512, 1-4096 bytes
 *           bit 2     run the loop only after the last chunk
 *           bit 3     close the worker's end (EOF) before its exit report
 *           bit 4     report the exit before the loop has read the last
 *                     chunk (a reply written just before the worker died)
 *           bit 5     job 1 has max_result_bytes = 64
 *           bit 6     submit job 2 as soon as job 1 is done; the rest of
 *                     the bytes go to job 2's worker
 *           bit 7     job 1 has max_ms = 0: its deadline passes at once
 *   byte 1  seed of the chunk sizes
 *   byte 2  bits 0-1  how the worker exits: exit 0, exit 3, SIGKILL, SIGSEGV
 *           bit 2     the worker never reads its job frame
 *           bit 3     the user kills job 1 after the second chunk
 *           bit 4     the worker dies after the second chunk (its exit is
 *                     reported while the rest is never written)
 *           bit 5     job 2 (with bit 6 of byte 0) comes late: the bytes
 *                     after the first frame are written (and the worker's
 *                     end closed, with bit 3 of byte 0) but not read before
 *                     it is submitted, so the parent finds them when it
 *                     picks an idle worker
 *           bit 6     job 1 carries three items (pool:map's batches): it
 *                     is answered by up to three replies
 * Each worker first says hello (its pid), as the worker executable does
 * before it reads a job, so no job's code can withhold it. Job ids are 1
 * and 2 and the first worker's id is 1 on every input, so the seeds can
 * hold valid frames.
 *
 * Asserted after every input: each job ended exactly once and with a
 * consistent outcome (a reply body that decodes or is refused as "bad
 * message", a reason for BADREPLY); the pool's slots and bytes are back to
 * zero; every process the parent knew is gone and freed; every reference
 * the core counted is returned. LeakSanitizer checks the rest.
 * And a worker that broke the protocol is not kept for another job: once
 * the stream is read, no idle process holds unread bytes, and none is idle
 * after its job ended with a bad reply or a reply whose message does not
 * decode.
 */
#include <errno.h>
#include <math.h>
#include <fcntl.h>
#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "codec.h"
#include "pool.h"
#include "scheduler.h"
#include "suplink.h"
#include "wire.h"

#define FZ_MAXPROCS 8

typedef struct fz_worker {
  uint32_t id;
  int fd;       /* the worker's end of its reply pipe, -1 once closed */
  int job;      /* the worker's end of its job pipe, -1 once closed */
  int killed;   /* the parent asked the supervisor to kill it */
  int reported; /* its exit was reported */
} fz_worker;

static struct {
  fz_worker w[FZ_MAXPROCS];
  int n;
  int status; /* the wait status a worker that was not killed exits with */
  int unread; /* never read the job frame */
} fz_sup;

_Noreturn static void fz_fail(const char *what, unsigned long a) {
  fprintf(stderr, "fuzz_frame: ");
  fprintf(stderr, what, a);
  fprintf(stderr, "\n");
  abort();
}

/* ------------------------------------------------------------------------ */
/* The stand-in for the supervisor (linked with --wrap)                     */
/* ------------------------------------------------------------------------ */

hd_sup *__real_hd_sup_new(hd_loop *l, const char *worker_path, const hd_sup_cbs *cbs, void *ud);
hd_sup *__wrap_hd_sup_new(hd_loop *l, const char *worker_path, const hd_sup_cbs *cbs, void *ud);
int __wrap_hd_sup_ensure(hd_sup *s, const char *path, const char *cpath);
int __wrap_hd_sup_spawn(hd_sup *s, uint32_t id, int flags, const char *name,
                        const int fds[HD_SPAWN_FDS]);
int __wrap_hd_sup_kill(hd_sup *s, uint32_t id);

/* The callbacks the scheduler gave the link: the harness reports with them. */
static hd_sup_cbs fz_cbs;
static void *fz_cbs_ud;

hd_sup *__wrap_hd_sup_new(hd_loop *l, const char *worker_path, const hd_sup_cbs *cbs, void *ud) {
  fz_cbs = *cbs;
  fz_cbs_ud = ud;
  return __real_hd_sup_new(l, worker_path, cbs, ud);
}

/* As if the supervisor were up. */
int __wrap_hd_sup_ensure(hd_sup *s, const char *path, const char *cpath) {
  (void)s;
  (void)path;
  (void)cpath;
  return 0;
}

/* Writes to a worker's reply pipe as a worker would, except that a parent
 * gone does not end the harness: SIGPIPE is held off around the write, and
 * one it raised is taken back. The parent's own writes keep SIGPIPE's
 * default action, so one of them to a worker that is gone would show. */
static ssize_t fz_write(int fd, const void *p, size_t n) {
  sigset_t pipe_set, old;
  struct timespec zero = {0, 0};
  ssize_t r;
  sigemptyset(&pipe_set);
  sigaddset(&pipe_set, SIGPIPE);
  pthread_sigmask(SIG_BLOCK, &pipe_set, &old);
  r = write(fd, p, n);
  if (r < 0 && errno == EPIPE) {
    int e = errno;
    while (sigtimedwait(&pipe_set, NULL, &zero) < 0 && errno == EINTR) {
    }
    errno = e;
  }
  pthread_sigmask(SIG_SETMASK, &old, NULL);
  return r;
}

/* SPAWN hands over the worker's ends, which belong to this function as in
 * suplink.c, and says hello as every worker does first. The harness writes
 * no output: the pipes' write ends are closed at once (the parent sees EOF
 * on them, as when a worker's job closes its stdout and stderr). */
int __wrap_hd_sup_spawn(hd_sup *s, uint32_t id, int flags, const char *name,
                        const int fds[HD_SPAWN_FDS]) {
  fz_worker *w;
  char h[HD_HELLO_LEN];
  int fd = fds[HD_SPAWN_FD_REPLY];
  (void)s;
  (void)flags;
  (void)name;
  close(fds[HD_SPAWN_FD_STDOUT]);
  close(fds[HD_SPAWN_FD_STDERR]);
  if (fz_sup.n == FZ_MAXPROCS) fz_fail("more than %lu workers", FZ_MAXPROCS);
  w = &fz_sup.w[fz_sup.n++];
  w->id = id;
  w->fd = fd;
  w->job = fds[HD_SPAWN_FD_JOB];
  w->killed = w->reported = 0;
  fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
  fcntl(w->job, F_SETFL, fcntl(w->job, F_GETFL) | O_NONBLOCK);
  hd_wire_hello(h, 4242 + (pid_t)w->id);
  if (fz_write(fd, h, sizeof h) != (ssize_t)sizeof h) fz_fail("cannot say hello%lu", 0);
  return 0;
}

/* KILL marks the worker for an exit report. */
int __wrap_hd_sup_kill(hd_sup *s, uint32_t id) {
  int i;
  (void)s;
  for (i = 0; i < fz_sup.n; i++)
    if (fz_sup.w[i].id == id) fz_sup.w[i].killed = 1;
  return 0;
}

/* ------------------------------------------------------------------------ */
/* The harness                                                              */
/* ------------------------------------------------------------------------ */

static hd_sched *fz_core;
static lua_State *fz_L;

static void fz_init(void) {
  char err[256];
  hd_sched *c = hd_sched_new("/nonexistent/handler-worker", err, sizeof err);
  if (c == NULL) fz_fail("cannot make a core%lu", 0);
  hd_sched_set_max_result(c, 1 << 20);
  fz_core = c;
  fz_L = luaL_newstate();
  if (fz_L == NULL) fz_fail("cannot create a lua_State%lu", 0);
  luaL_openlibs(fz_L);
  /* SIGPIPE keeps its default action: a write of the parent's to a worker
   * that is gone must not kill the host. */
}

static void fz_close_worker(fz_worker *w) {
  if (w->fd >= 0) close(w->fd);
  if (w->job >= 0) close(w->job);
  w->fd = w->job = -1;
}

/* Reports a worker's exit the way the supervisor does: killed workers died
 * of SIGKILL, the others with the input's status. */
static void fz_report(fz_worker *w) {
  if (w->reported) return;
  w->reported = 1;
  fz_close_worker(w);
  fz_cbs.exited(fz_cbs_ud, w->id, w->killed ? SIGKILL : fz_sup.status);
}

/* Reads and drops what the parent sent a worker (its job frames). Returns
 * whether the parent closed its end. */
static int fz_drain(fz_worker *w) {
  char buf[4096];
  ssize_t r;
  if (w->job < 0 || fz_sup.unread) return 0;
  while ((r = read(w->job, buf, sizeof buf)) > 0) {
  }
  return r == 0;
}

/* One turn of the parent's loop, then the supervisor's answers to kills. */
static void fz_turn(void) {
  int i;
  hd_sched_step(fz_core);
  for (i = 0; i < fz_sup.n; i++) {
    fz_drain(&fz_sup.w[i]);
    if (fz_sup.w[i].killed) fz_report(&fz_sup.w[i]);
  }
}

/* Submits a job; `proc` gets the id of the process it starts on. */
static hd_job *fz_submit(hd_pool *pool, double max_ms, double max_result, int items,
                         uint32_t *proc) {
  hd_job *j = hd_job_new(fz_core, pool);
  hd_job_limits lim = {.max_ms = max_ms, .pool_timeout = 0, .max_result = max_result,
                       .max_output = 0, .max_cpu_ms = HUGE_VAL, .output = HD_OUTPUT_INHERIT,
                       .max_heap = 1 << 20};
  hd_buf b = HD_BUF_INIT;
  if (j == NULL) fz_fail("out of memory%lu", 0);
  if (hd_chains_follow(hd_job_chains(j), pool) != 0) fz_fail("out of memory%lu", 0);
  hd_job_set_limits(j, &lim);
  /* A job frame with an empty message: the worker side is this harness. */
  if (hd_wire_job_begin(&b, hd_job_id(j), 1 << 20, 0, NULL, NULL) != 0)
    fz_fail("out of memory%lu", 0);
  if (items > 0) {
    int k;
    if (hd_wire_job_items(&b) != 0) fz_fail("out of memory%lu", 0);
    for (k = 0; k < items; k++) {
      long at = hd_wire_job_item_begin(&b);
      if (at < 0 || hd_wire_job_item_end(&b, at) != 0) fz_fail("out of memory%lu", 0);
    }
    hd_job_set_items(j, (uint32_t)items);
  }
  if (hd_wire_job_end(&b) != 0 || hd_job_set_frame(j, &b) != 0)
    fz_fail("out of memory%lu", 0);
  hd_buf_free(&b);
  hd_job_submit(j);
  *proc = !hd_job_done(j) && fz_sup.n > 0 ? fz_sup.w[fz_sup.n - 1].id : 0;
  return j;
}

/* Runs in protected mode, like lhandler.c's l_decode_reply. */
static int fz_decode(lua_State *L) {
  const char *p = lua_touserdata(L, 1);
  size_t len = (size_t)lua_tonumber(L, 2);
  lua_settop(L, 0);
  return hd_decode(L, p, len, 0);
}

/* The checks on a job that ended. Returns 0 when the job's reply was
 * refused, 1 otherwise. */
static int fz_decodes(hd_job *j, const char *msg, size_t len);

static int fz_check_job(hd_job *j) {
  int good = 1;
  const char *msg;
  size_t len;
  uint32_t i, done;
  if (!hd_job_done(j)) fz_fail("job %lu did not end though its worker is gone", hd_job_id(j));
  /* The replies of the items before the one the job ended with were
   * checked when they came: each is a status and a message that decodes. */
  done = hd_job_items_done(j);
  if (done > 2) fz_fail("job %lu: more items replied than it has", hd_job_id(j));
  for (i = 0; i < done; i++) {
    int status;
    uint64_t cpu, peak, wall;
    if (hd_job_item(j, i, &status, &msg, &len, &cpu, &peak, &wall) != 0)
      fz_fail("job %lu: an item's reply is missing", hd_job_id(j));
    if (status != HD_REPLY_OK && status != HD_REPLY_ERROR && status != HD_REPLY_OOM &&
        status != HD_REPLY_BADRESULT)
      fz_fail("job %lu: an item's reply has an unknown status", hd_job_id(j));
    if (status != HD_REPLY_OOM) good &= fz_decodes(j, msg, len);
  }
  switch (hd_job_outcome(j)) {
    case HD_OUT_OK:
    case HD_OUT_ERROR:
    case HD_OUT_BADRESULT:
      if (hd_job_outcome(j) == HD_OUT_BADRESULT && hd_job_detail(j)[0]) break;
      hd_job_message(j, &msg, &len);
      good &= fz_decodes(j, msg, len);
      break;
    case HD_OUT_BADREPLY:
    case HD_OUT_FAILED:
    case HD_OUT_OUTPUT:
      if (!hd_job_detail(j)[0]) fz_fail("job %lu failed without a reason", hd_job_id(j));
      good = 0;
      break;
    case HD_OUT_TIMEOUT:
    case HD_OUT_EXIT:
    case HD_OUT_KILLED:
    case HD_OUT_OOM:
      break;
    default:
      fz_fail("job ended with outcome %lu", hd_job_outcome(j));
  }
  return good;
}

/* Decodes a reply's message as the host does. Returns 0 when it is refused
 * (the worker must go), 1 otherwise. */
static int fz_decodes(hd_job *j, const char *msg, size_t len) {
  int good = 1;
  lua_settop(fz_L, 0);
  lua_pushcfunction(fz_L, fz_decode);
  lua_pushlightuserdata(fz_L, (void *)msg);
  lua_pushnumber(fz_L, (lua_Number)len);
  if (lua_pcall(fz_L, 2, LUA_MULTRET, 0) != 0) {
    const char *e = lua_tostring(fz_L, -1);
    if (e == NULL || (strncmp(e, "handler: bad message: ", 22) != 0 &&
                      strncmp(e, "handler: out of memory", 22) != 0)) {
      fprintf(stderr, "fuzz_frame: %s\n", e ? e : "(non-string error)");
      fz_fail("decoding job %lu's reply raised an unexpected error", hd_job_id(j));
    }
    /* A name this host has not loaded is a value this host cannot take,
     * not a worker breaking the protocol: a real worker sends
     * require("cjson") to a host that never required cjson. The worker
     * may stay. Anything else refused means it goes. */
    if (e == NULL || strstr(e, " in package.loaded named ") == NULL) good = 0;
  }
  lua_settop(fz_L, 0);
  return good;
}

/* A process is kept for more work only if it did nothing wrong: once job j
 * (on process `id`) ended with its reply refused, the parent has killed
 * that worker or closed its job pipe. */
static void fz_check_kept(hd_job *j, uint32_t id, int good) {
  int i;
  if (!hd_job_done(j) || good) return;
  for (i = 0; i < fz_sup.n; i++) {
    fz_worker *w = &fz_sup.w[i];
    if (w->id != id || w->killed || w->reported || w->fd < 0 || fz_sup.unread) continue;
    if (!fz_drain(w)) fz_fail("a worker whose reply was refused is kept (job %lu)", hd_job_id(j));
  }
}

static void fz_no_pid(void *ud, pid_t pid) {
  (void)ud;
  fz_fail("a process outlived its exit report (pid %lu)", (unsigned long)pid);
}

/* The pool's budget and processes, all back to zero. */
static void fz_check_pool(hd_pool *pool) {
  hd_pool_stats st;
  hd_pool_stats_of(pool, &st);
  if (st.running != 0 || st.committed != 0 || st.queued != 0 || st.processes != 0)
    fz_fail("the pool's budget is not back to zero (%lu running)", (unsigned long)st.running);
}

/* The next chunk size: xorshift over the seed byte. */
static size_t fz_chunk(unsigned *seed, int mode, size_t left) {
  static const size_t max[4] = {0, 16, 512, 4096};
  size_t n;
  if (mode == 0) return left;
  *seed ^= *seed << 13;
  *seed ^= *seed >> 17;
  *seed ^= *seed << 5;
  n = 1 + *seed % max[mode];
  return n < left ? n : left;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  hd_sched *c;
  hd_pool_config cfg = {.name = NULL, .max_workers = 4, .max_memory = 1e12, .idle_ms = 1000,
                        .sandbox = 0, .init = NULL, .init_len = 0, .parent = NULL};
  pid_t sup;
  int fds;
  hd_pool *pool;
  hd_job *j1, *j2 = NULL;
  const uint8_t *s;
  size_t len, pos = 0, end;
  unsigned seed;
  int o, o2, refs0, i, spins = 0, chunks = 0, late;
  uint32_t p1 = 0, p2 = 0;
  static const int statuses[4] = {0, 3 << 8, SIGKILL, SIGSEGV};
  if (fz_core == NULL) fz_init();
  c = fz_core;
  if (size < 3) return 0;
  o = data[0];
  seed = 0x9e3779b9u ^ data[1];
  o2 = data[2];
  s = data + 3;
  len = size - 3;
  memset(&fz_sup, 0, sizeof fz_sup);
  fz_sup.status = statuses[o2 & 3];
  fz_sup.unread = (o2 & 4) != 0;
  late = (o & 0x40) && (o2 & 32);
  hd_sched_reset_ids(c);
  refs0 = hd_sched_refs(c);

  pool = hd_pool_new(&cfg);
  if (pool == NULL) fz_fail("out of memory%lu", 0);
  j1 = fz_submit(pool, (o & 0x80) ? 0 : 1e16, (o & 0x20) ? 64 : 0, (o2 & 0x40) ? 3 : 0, &p1);
  if (fz_sup.n != 1) fz_fail("job 1 did not get a worker (%lu)", fz_sup.n);

  /* In late mode the loop reads only the first frame. */
  end = len;
  if (late && len >= 4 && HD_FRAME_HEADER + (size_t)hd_get_u32((const char *)s) < len)
    end = HD_FRAME_HEADER + (size_t)hd_get_u32((const char *)s);
  while (pos < end) {
    fz_worker *w = &fz_sup.w[fz_sup.n - 1];
    size_t n = fz_chunk(&seed, o & 3, end - pos);
    ssize_t r;
    if (w->fd < 0) break;
    r = fz_write(w->fd, s + pos, n);
    if (r > 0) {
      pos += (size_t)r;
      chunks++;
    }
    else if (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) break;
    if (r <= 0 && ++spins > 1000) fz_fail("the parent stopped reading (%lu)", pos);
    if (pos == len && (o & 0x10)) break; /* the exit report comes first */
    if (!(o & 4) || pos == end || r <= 0) fz_turn();
    if (chunks == 2 && r > 0 && (o2 & 8)) hd_job_kill(j1);
    if (chunks == 2 && r > 0 && (o2 & 16)) {
      fz_report(w);
      fz_turn();
      break;
    }
    if ((o & 0x40) && !late && j2 == NULL && hd_job_done(j1)) {
      j2 = fz_submit(pool, 1e16, 0, 0, &p2);
      fz_turn();
    }
  }
  if (late) {
    fz_worker *w = &fz_sup.w[fz_sup.n - 1];
    while (pos < len && w->fd >= 0) {
      ssize_t r = fz_write(w->fd, s + pos, len - pos);
      if (r <= 0) break;
      pos += (size_t)r;
    }
    if (o & 8) fz_close_worker(w);
    j2 = fz_submit(pool, 1e16, 0, 0, &p2);
    fz_turn();
  }
  if (!(o & 0x10)) {
    fz_turn();
    if (hd_job_done(j1)) fz_check_kept(j1, p1, fz_check_job(j1));
    if (j2 != NULL && hd_job_done(j2)) fz_check_kept(j2, p2, fz_check_job(j2));
  }
  /* The worker's end: EOF first or not, then the exit report. */
  if ((o & 8) && !late) {
    fz_close_worker(&fz_sup.w[fz_sup.n - 1]);
    if (!(o & 0x10)) fz_turn();
  }
  fz_report(&fz_sup.w[fz_sup.n - 1]);
  fz_turn();
  /* Every process the supervisor started ends; idle ones were waiting for
   * work. Then no job may be left waiting. */
  for (i = 0; i < fz_sup.n; i++) {
    fz_worker *w = &fz_sup.w[i];
    fz_drain(w);
    fz_report(w);
  }
  for (i = 0; i < 100 && hd_sched_refs(c) > refs0 + 1 + (j2 != NULL); i++)
    hd_sched_step(c);
  fz_check_job(j1);
  if (j2 != NULL) fz_check_job(j2);
  fz_check_pool(pool);
  hd_sched_each_pid(c, fz_no_pid, NULL, &sup, &fds);
  if (fds != 0) fz_fail("a process outlived its exit report (%lu descriptors)", (unsigned long)fds);
  hd_job_unref(j1);
  if (j2 != NULL) hd_job_unref(j2);
  hd_pool_unref(pool);
  if (hd_sched_refs(c) != refs0)
    fz_fail("the core holds %lu references more than before", hd_sched_refs(c) - refs0);
  return 0;
}
