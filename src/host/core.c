/* core.c: the parent's context: its own libuv loop and the link to the
 * supervisor process that forks, reaps and kills the workers. */
#include "core.h"

#include <errno.h>
#include <ftw.h>
#include <glob.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "fdpass.h"
#include "wire.h"

extern char **environ;

static void core_idle_cb(uv_timer_t *t) {
  hd_proc_sweep_idle(t->data);
}

void hd_core_arm_idle(hd_core *c, double ms) {
  if (!c->idle_timer_open) return;
  if (ms < 0) ms = 0;
  uv_timer_start(&c->idle_timer, core_idle_cb, (uint64_t)ms, 0);
}

hd_core *hd_core_new(const char *worker_path, char *err, size_t errlen) {
  hd_core *c = calloc(1, sizeof *c);
  if (c == NULL) {
    snprintf(err, errlen, "out of memory");
    return NULL;
  }
  c->worker_path = strdup(worker_path);
  if (c->worker_path == NULL) {
    free(c);
    snprintf(err, errlen, "out of memory");
    return NULL;
  }
  if (uv_loop_init(&c->loop) != 0) {
    free(c->worker_path);
    free(c);
    snprintf(err, errlen, "cannot create an event loop");
    return NULL;
  }
  c->loop.data = c;
  c->refs = 1;
  c->sup_fd = -1;
  c->sup_pid = -1;
  c->max_result_bytes = 64.0 * 1024 * 1024;
  /* Polling 50 us before sleeping halves a short job's round trip on a
   * quiet machine; it backs off by itself when replies keep missing the
   * window (bench/RESULTS.md). handler.configure{ spin_us = 0 } turns it off. */
  c->spin_ns = 50000;
  c->spin_credit = 4;
  uv_timer_init(&c->loop, &c->idle_timer);
  c->idle_timer.data = c;
  uv_unref((uv_handle_t *)&c->idle_timer);
  c->idle_timer_open = 1;
  return c;
}

/* Records the host's module paths; workers forked from now on get them. A
 * running supervisor keeps the paths it was started with. */
void hd_core_set_paths(hd_core *c, const char *path, const char *cpath) {
  char *p, *cp;
  if (c->lua_path && !strcmp(c->lua_path, path) && c->lua_cpath && !strcmp(c->lua_cpath, cpath))
    return;
  p = strdup(path);
  cp = strdup(cpath);
  if (p == NULL || cp == NULL) {
    free(p);
    free(cp);
    return;
  }
  free(c->lua_path);
  free(c->lua_cpath);
  c->lua_path = p;
  c->lua_cpath = cp;
  c->paths_gen++;
}

/* Big buffers are expensive to make (every page faults in) and frequent
 * when jobs move big data: the biggest one freed is kept for the next big
 * transfer, and let go by the idle sweep when a sweep interval passes
 * without one. Takes b's memory; b is left empty. */
void hd_core_give_buf(hd_core *c, hd_buf *b) {
  if (b->cap >= 65536 && b->cap <= (256u << 20) && b->cap > c->spare.cap) {
    hd_buf_free(&c->spare);
    c->spare = *b;
    c->spare.len = 0;
  } else {
    hd_buf_free(b);
  }
  b->data = NULL;
  b->len = b->cap = 0;
}

/* Moves the spare into the empty buffer b when it holds at least `need`. */
int hd_core_take_buf(hd_core *c, hd_buf *b, size_t need) {
  if (c->spare.data == NULL || c->spare.cap < need || b->len != 0) return 0;
  hd_buf_free(b);
  *b = c->spare;
  c->spare.data = NULL;
  c->spare.len = c->spare.cap = 0;
  c->spare_used = 1;
  return 1;
}

uint64_t hd_core_now(hd_core *c) {
  return uv_now(&c->loop);
}

static void core_free(hd_core *c) {
  /* Close callbacks of the last handles run here; then the loop is empty. */
  while (uv_loop_close(&c->loop) == UV_EBUSY) uv_run(&c->loop, UV_RUN_NOWAIT);
  hd_buf_free(&c->scratch);
  hd_buf_free(&c->spare);
  free(c->lua_path);
  free(c->lua_cpath);
  free(c->worker_path);
  free(c);
}

void hd_core_unref(hd_core *c) {
  if (--c->refs == 0) core_free(c);
}

static void core_rm_sup_dirs(pid_t pid);

/* Waits a little for an exited supervisor, so it does not stay a zombie. The
 * host may reap it first (nginx reaps every child); ECHILD is fine then. */
static void core_reap_sup(hd_core *c, int wait_ms) {
  int i;
  if (c->sup_pid <= 0) return;
  for (i = 0; i <= wait_ms; i++) {
    pid_t r = waitpid(c->sup_pid, NULL, WNOHANG);
    if (r != 0) {
      core_rm_sup_dirs(c->sup_pid);
      c->sup_pid = -1;
      return;
    }
    if (i < wait_ms) {
      struct timespec ts = {0, 1000000};
      nanosleep(&ts, NULL);
    }
  }
  /* Still exiting: reaped later, from hd_core_reap_pending. */
  if (c->npending < (int)(sizeof c->pending / sizeof c->pending[0]))
    c->pending[c->npending++] = c->sup_pid;
  c->sup_pid = -1;
}

/* Reaps supervisors that were still exiting when they were let go. */
void hd_core_reap_pending(hd_core *c) {
  int i = 0;
  while (i < c->npending) {
    pid_t pid = c->pending[i];
    if (waitpid(pid, NULL, WNOHANG) != 0) {
      core_rm_sup_dirs(pid);
      c->pending[i] = c->pending[--c->npending];
    } else {
      i++;
    }
  }
}

static int core_rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw) {
  (void)st;
  (void)flag;
  (void)ftw;
  remove(path);
  return 0;
}

/* Removes the private directories of a dead supervisor's workers. The
 * supervisor removes each when it reaps the worker; this is for one that
 * was killed before it could. */
static void core_rm_sup_dirs(pid_t pid) {
  const char *t = getenv("TMPDIR");
  char pattern[256];
  glob_t g;
  size_t i;
  if (pid <= 0) return;
  snprintf(pattern, sizeof pattern, "%s/handler-%d-??????",
           t != NULL && t[0] == '/' && strlen(t) < 100 ? t : "/tmp", (int)pid);
  if (glob(pattern, GLOB_NOSORT, NULL, &g) != 0) return;
  for (i = 0; i < g.gl_pathc; i++) nftw(g.gl_pathv[i], core_rm_entry, 16, FTW_DEPTH | FTW_PHYS);
  globfree(&g);
}

static void core_ctl_free_all(hd_core *c) {
  while (c->ctl_head) {
    hd_ctlmsg *m = c->ctl_head;
    c->ctl_head = m->next;
    if (m->fd >= 0) close(m->fd);
    free(m);
  }
  c->ctl_tail = NULL;
}

static void core_sup_poll_close_cb(uv_handle_t *h) {
  hd_core *c = h->data;
  if (c->sup_fd >= 0) close(c->sup_fd);
  c->sup_fd = -1;
  c->sup_poll_open = 0;
  hd_core_unref(c);
}

/* The supervisor is gone or unusable: every process it held is gone with
 * it (workers die with their supervisor), so their jobs end now. */
void hd_core_sup_broken(hd_core *c, const char *why) {
  hd_proc *p, *next;
  if (c->sup != HD_SUP_UP) return;
  c->sup = HD_SUP_NONE;
  if (why != NULL && c->sup_error[0] == '\0')
    snprintf(c->sup_error, sizeof c->sup_error, "%s", why);
  core_ctl_free_all(c);
  if (c->sup_poll_open) {
    uv_poll_stop(&c->sup_poll);
    if (c->sup_fd >= 0) close(c->sup_fd);
    c->sup_fd = -1;
    uv_close((uv_handle_t *)&c->sup_poll, core_sup_poll_close_cb);
  }
  c->sup_hello = 0;
  core_reap_sup(c, 0);
  for (p = c->procs; p != NULL; p = next) {
    next = p->next;
    /* Workers die with their supervisor, unless a job cleared that: the
     * pidfd still names exactly this process, alive or not, so it is safe
     * to signal; while it is alive its group exists, so the group too. */
    if (p->pidfd >= 0 && !p->exited && syscall(SYS_pidfd_send_signal, p->pidfd, 0, NULL, 0) == 0) {
      if (p->pid > 0) kill(-p->pid, SIGKILL);
      syscall(SYS_pidfd_send_signal, p->pidfd, SIGKILL, NULL, 0);
    }
    if (p->job != NULL && p->job->pending == HD_OUT_NONE) {
      /* The job's caller learns why, not just that the worker is gone. */
      snprintf(p->job->detail, sizeof p->job->detail, "worker lost: %s", c->sup_error);
      p->job->pending = HD_OUT_FAILED;
    }
    if (!p->exited) hd_proc_on_exited(c, p->id, -1, 0);
  }
}

static void core_ctl_flush(hd_core *c);

static void core_on_ctl(hd_core *c, const char *m, ssize_t n, int fd) {
  if (n < 1 || m[0] != HD_CTL_SPAWNED || n < 9) {
    if (fd >= 0) close(fd);
    if (n < 1) return;
  }
  switch (m[0]) {
    case HD_CTL_HELLO:
      if (n < 10 || hd_get_u32(m + 1) != HD_PROTO_VERSION) {
        char why[256];
        snprintf(why, sizeof why, "worker executable %s speaks protocol %u, this module speaks %u",
                 c->worker_path, n >= 5 ? hd_get_u32(m + 1) : 0, HD_PROTO_VERSION);
        hd_core_sup_broken(c, why);
        return;
      }
      if ((size_t)(unsigned char)m[9] != c->bchead_len || (ssize_t)(10 + c->bchead_len) > n ||
          memcmp(m + 10, c->bchead, c->bchead_len) != 0) {
        char why[256];
        snprintf(why, sizeof why,
                 "worker executable %s was built for another LuaJIT (its bytecode differs)",
                 c->worker_path);
        hd_core_sup_broken(c, why);
        return;
      }
      c->sup_hello = 1;
      return;
    case HD_CTL_SPAWNED:
      if (n >= 9) hd_proc_on_spawned(c, hd_get_u32(m + 1), (pid_t)hd_get_u32(m + 5), fd);
      return;
    case HD_CTL_EXITED:
      if (n >= 9) hd_proc_on_exited(c, hd_get_u32(m + 1), (int)hd_get_u32(m + 5), 1);
      return;
    case HD_CTL_FAILED:
      if (n >= 9) hd_proc_on_exited(c, hd_get_u32(m + 1), -1, 0);
      return;
    default:
      return;
  }
}

static void core_sup_poll_cb(uv_poll_t *h, int status, int events) {
  hd_core *c = h->data;
  if (status < 0) {
    hd_core_sup_broken(c, "lost the supervisor process");
    return;
  }
  if (events & UV_WRITABLE) core_ctl_flush(c);
  if (c->sup != HD_SUP_UP) return;
  if (events & UV_READABLE) {
    for (;;) {
      char m[HD_CTL_MAX];
      int fd;
      ssize_t n = hd_recv_fd(c->sup_fd, m, sizeof m, &fd, MSG_DONTWAIT);
      if (n > 0) {
        core_on_ctl(c, m, n, fd);
        if (c->sup != HD_SUP_UP) return;
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
      hd_core_sup_broken(c, "the supervisor process exited");
      return;
    }
  }
}

/* Reads the control messages already waiting, without blocking. */
void hd_core_drain_ctl(hd_core *c) {
  if (c->sup == HD_SUP_UP && c->sup_poll_open) core_sup_poll_cb(&c->sup_poll, 0, UV_READABLE);
}

static void core_sup_poll_update(hd_core *c) {
  int ev = UV_READABLE | (c->ctl_head ? UV_WRITABLE : 0);
  if (ev != c->sup_poll_events) {
    c->sup_poll_events = ev;
    uv_poll_start(&c->sup_poll, ev, core_sup_poll_cb);
  }
}

static int core_sendmsg(hd_core *c, const char *msg, size_t len, int fd) {
  if (hd_send_fd(c->sup_fd, msg, len, fd, MSG_DONTWAIT) >= 0) return 0;
  if (errno == EAGAIN || errno == EWOULDBLOCK || errno == ENOBUFS) return 1;
  return -1;
}

static void core_ctl_flush(hd_core *c) {
  while (c->ctl_head) {
    hd_ctlmsg *m = c->ctl_head;
    int r = core_sendmsg(c, m->data, m->len, m->fd);
    if (r == 1) break;
    if (r < 0) {
      hd_core_sup_broken(c, "lost the supervisor process");
      return;
    }
    c->ctl_head = m->next;
    if (c->ctl_head == NULL) c->ctl_tail = NULL;
    if (m->fd >= 0) close(m->fd);
    free(m);
  }
  if (c->sup == HD_SUP_UP) core_sup_poll_update(c);
}

/* Sends a control message; `fd`, when not -1, is attached and then closed
 * here, whatever happens. Returns -1 when the supervisor is not there. */
int hd_core_ctl_send(hd_core *c, const char *msg, size_t len, int fd) {
  hd_ctlmsg *m;
  if (c->sup != HD_SUP_UP || len > sizeof m->data) {
    if (fd >= 0) close(fd);
    return -1;
  }
  if (c->ctl_head == NULL) {
    int r = core_sendmsg(c, msg, len, fd);
    if (r == 0) {
      if (fd >= 0) close(fd);
      return 0;
    }
    if (r < 0) {
      if (fd >= 0) close(fd);
      hd_core_sup_broken(c, "lost the supervisor process");
      return -1;
    }
  }
  m = malloc(sizeof *m);
  if (m == NULL) {
    if (fd >= 0) close(fd);
    return -1;
  }
  m->next = NULL;
  m->len = len;
  m->fd = fd;
  memcpy(m->data, msg, len);
  if (c->ctl_tail) c->ctl_tail->next = m;
  else c->ctl_head = m;
  c->ctl_tail = m;
  core_sup_poll_update(c);
  return 0;
}

/* Starts the supervisor unless it runs. It is exec'd with posix_spawn (no
 * fork of a possibly big host) and gets no SIGCHLD handler from us: hosts
 * like nginx reap children themselves, so deaths are learned from the
 * supervisor's reports and from EOF on the control socket. */
int hd_core_sup_ensure(hd_core *c) {
  int sv[2] = {-1, -1}, child = -1, rc;
  char hostpid[32];
  char *argv[6];
  posix_spawn_file_actions_t fa;
  posix_spawnattr_t at;
  sigset_t none, all;
  pid_t pid;
  if (c->npending) hd_core_reap_pending(c);
  if (c->sup == HD_SUP_UP) return 0;
  if (c->sup_poll_open) {
    /* The last one is still closing: let its close callback run. */
    uv_run(&c->loop, UV_RUN_NOWAIT);
    if (c->sup_poll_open) {
      snprintf(c->sup_error, sizeof c->sup_error, "the supervisor is restarting");
      return -1;
    }
  }
  core_reap_sup(c, 0);
  c->sup_error[0] = '\0';
  if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) != 0) {
    snprintf(c->sup_error, sizeof c->sup_error, "socketpair: %s", strerror(errno));
    return -1;
  }
  child = sv[1];
  if (child == 3) {
    /* dup2(3, 3) would keep close-on-exec set; move it first. */
    child = fcntl(sv[1], F_DUPFD_CLOEXEC, 4);
    close(sv[1]);
    if (child < 0) {
      close(sv[0]);
      snprintf(c->sup_error, sizeof c->sup_error, "fcntl: %s", strerror(errno));
      return -1;
    }
  }
  fcntl(sv[0], F_SETFL, fcntl(sv[0], F_GETFL) | O_NONBLOCK);
  snprintf(hostpid, sizeof hostpid, "%ld", (long)getpid());
  argv[0] = c->worker_path;
  argv[1] = (char *)"--supervisor";
  c->sup_paths_gen = c->paths_gen;
  argv[2] = c->lua_path ? c->lua_path : (char *)"";
  argv[3] = c->lua_cpath ? c->lua_cpath : (char *)"";
  argv[4] = hostpid;
  argv[5] = NULL;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_adddup2(&fa, child, 3);
  posix_spawnattr_init(&at);
  sigemptyset(&none);
  sigfillset(&all);
  sigdelset(&all, SIGKILL);
  sigdelset(&all, SIGSTOP);
  posix_spawnattr_setsigmask(&at, &none);
  posix_spawnattr_setsigdefault(&at, &all);
  posix_spawnattr_setflags(&at, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
  rc = posix_spawn(&pid, c->worker_path, &fa, &at, argv, environ);
  posix_spawn_file_actions_destroy(&fa);
  posix_spawnattr_destroy(&at);
  close(child);
  if (rc != 0) {
    close(sv[0]);
    snprintf(c->sup_error, sizeof c->sup_error, "cannot start worker executable %s: %s",
             c->worker_path, strerror(rc));
    return -1;
  }
  c->sup_pid = pid;
  c->sup_fd = sv[0];
  uv_poll_init(&c->loop, &c->sup_poll, c->sup_fd);
  c->sup_poll.data = c;
  c->sup_poll_open = 1;
  c->sup_poll_events = 0;
  c->refs++;
  c->sup = HD_SUP_UP;
  core_sup_poll_update(c);
  return 0;
}

/* Ends everything: jobs are killed, processes end with the supervisor, and
 * every handle is closed before the loop is. */
void hd_core_shutdown(hd_core *c) {
  hd_job *j;
  if (c->closing) return;
  c->closing = 1;
  while ((j = c->queue_head) != NULL) hd_job_finish(j, HD_OUT_KILLED);
  while ((j = c->running) != NULL) hd_job_kill(j);
  if (c->sup == HD_SUP_UP) {
    /* Closing the control socket makes the supervisor kill its workers,
     * reap them and exit. */
    pid_t pid = c->sup_pid;
    hd_core_sup_broken(c, "shut down");
    c->sup_pid = pid;
    uv_run(&c->loop, UV_RUN_NOWAIT);
    core_reap_sup(c, 1000);
  }
  if (c->idle_timer_open) {
    c->idle_timer_open = 0;
    uv_close((uv_handle_t *)&c->idle_timer, NULL);
  }
  uv_run(&c->loop, UV_RUN_NOWAIT);
}
