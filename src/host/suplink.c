/* suplink.c: the host's link to the supervisor process: starting it, the
 * control socket, its reports, and its end. */
#include "suplink.h"

#include <errno.h>
#include <fcntl.h>
#include <glob.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "fdpass.h"
#include "queue.h"
#include "rmtree.h"
#include "wire.h"

extern char **environ;

/* waitid's id type for a pidfd (Linux 5.4); glibc's headers may lack it. */
#ifndef P_PIDFD
#define P_PIDFD 3
#endif

/* The supervisor's end of the control socket, in the supervisor. */
#define SUP_CHILD_FD 3

/* How long closing the link waits for the supervisor to exit. */
#define SUP_EXIT_WAIT_MS 1000

/* A queued control message, with the descriptors it carries. */
typedef struct sup_msg {
  hd_queue node;
  size_t len;
  int nfds;
  int fds[HD_SPAWN_FDS];
  char data[HD_CTL_MAX];
} sup_msg;

/* A supervisor that was let go while still exiting, to be reaped. */
typedef struct sup_gone {
  hd_queue node;
  pid_t pid;
  int pidfd;
} sup_gone;

struct hd_sup {
  hd_loop *loop;
  hd_sup_cbs cbs;
  void *ud;
  char *worker_path;
  char bchead[HD_BCHEAD];
  size_t bchead_len;
  int up;               /* the link works */
  pid_t pid;            /* the running supervisor, or -1 */
  int pidfd;            /* names exactly it: waited on, never a recycled pid */
  int fd;               /* our end of the control socket, or -1 */
  uv_poll_t *poll;      /* watching fd; freed by its close callback */
  int poll_events;
  char error[256];      /* why it cannot be used, when it cannot */
  hd_queue out;         /* messages not yet sent */
  hd_queue gone;        /* supervisors to reap */
};

hd_sup *hd_sup_new(hd_loop *l, const char *worker_path, const hd_sup_cbs *cbs, void *ud) {
  hd_sup *s = calloc(1, sizeof *s);
  if (s == NULL) return NULL;
  s->worker_path = strdup(worker_path);
  if (s->worker_path == NULL) {
    free(s);
    return NULL;
  }
  s->loop = l;
  s->cbs = *cbs;
  s->ud = ud;
  s->pid = -1;
  s->pidfd = -1;
  s->fd = -1;
  hd_queue_init(&s->out);
  hd_queue_init(&s->gone);
  return s;
}

void hd_sup_set_bchead(hd_sup *s, const char *bc, size_t n) {
  s->bchead_len = n < HD_BCHEAD ? n : HD_BCHEAD;
  memcpy(s->bchead, bc, s->bchead_len);
}

const char *hd_sup_error(const hd_sup *s) {
  return s->error[0] ? s->error : "the supervisor is gone";
}

int hd_sup_held_fds(const hd_sup *s) {
  const hd_queue *q;
  int n = 0;
  for (q = s->out.next; q != &s->out; q = q->next) n += HD_QUEUE_DATA(q, sup_msg, node)->nfds;
  return n;
}

pid_t hd_sup_pid(const hd_sup *s) {
  return s->up ? s->pid : -1;
}

/* Removes the private directories of a dead supervisor's workers. The
 * supervisor removes each when it reaps the worker; this is for one that
 * was killed before it could. */
static void sup_rm_dirs(pid_t pid) {
  const char *t = getenv("TMPDIR");
  char pattern[256];
  glob_t g;
  size_t i;
  if (pid <= 0) return;
  snprintf(pattern, sizeof pattern, "%s/handler-%d-??????",
           t != NULL && t[0] == '/' && strlen(t) < 100 ? t : "/tmp", (int)pid);
  if (glob(pattern, GLOB_NOSORT, NULL, &g) != 0) return;
  for (i = 0; i < g.gl_pathc; i++) hd_rm_tree(g.gl_pathv[i]);
  globfree(&g);
}

/* Reaps the supervisor named by pidfd (or, without one, pid) if it has
 * exited, waiting up to wait_ms. A pidfd names exactly that process, so a
 * host that reaped it first (nginx reaps every child) makes this ECHILD,
 * never the reaping of another child that got its pid. Returns whether it
 * is gone. */
static int sup_try_reap(pid_t pid, int pidfd, int wait_ms) {
  int gone;
  if (pidfd >= 0) {
    siginfo_t si;
    struct pollfd pf = {pidfd, POLLIN, 0};
    if (wait_ms > 0) poll(&pf, 1, wait_ms);
    memset(&si, 0, sizeof si);
    gone = waitid((idtype_t)P_PIDFD, (id_t)pidfd, &si, WEXITED | WNOHANG) != 0 || si.si_pid != 0;
  } else {
    gone = waitpid(pid, NULL, WNOHANG) != 0;
  }
  if (gone) sup_rm_dirs(pid);
  return gone;
}

/* Lets the current supervisor go: reaped now if it has exited, else later
 * from hd_sup_reap. */
static void sup_let_go(hd_sup *s, int wait_ms) {
  if (s->pid <= 0) return;
  if (sup_try_reap(s->pid, s->pidfd, wait_ms)) {
    if (s->pidfd >= 0) close(s->pidfd);
  } else {
    sup_gone *g = malloc(sizeof *g);
    if (g != NULL) {
      g->pid = s->pid;
      g->pidfd = s->pidfd;
      hd_queue_insert_tail(&s->gone, &g->node);
    } else if (s->pidfd >= 0) {
      close(s->pidfd);
    }
  }
  s->pid = -1;
  s->pidfd = -1;
}

void hd_sup_reap(hd_sup *s) {
  hd_queue *q, *n;
  HD_QUEUE_EACH(q, n, &s->gone) {
    sup_gone *g = HD_QUEUE_DATA(q, sup_gone, node);
    if (sup_try_reap(g->pid, g->pidfd, 0)) {
      hd_queue_remove(q);
      if (g->pidfd >= 0) close(g->pidfd);
      free(g);
    }
  }
}

static void sup_close_fds(const int *fds, int nfds) {
  int k;
  for (k = 0; k < nfds; k++)
    if (fds[k] >= 0) close(fds[k]);
}

static void sup_free_msgs(hd_sup *s) {
  while (!hd_queue_empty(&s->out)) {
    sup_msg *m = HD_QUEUE_DATA(hd_queue_head(&s->out), sup_msg, node);
    hd_queue_remove(&m->node);
    sup_close_fds(m->fds, m->nfds);
    free(m);
  }
}

static void sup_poll_close_cb(uv_handle_t *h) {
  free(h);
}

/* Takes the link down: the socket closes, the queue goes. */
static void sup_down(hd_sup *s) {
  s->up = 0;
  sup_free_msgs(s);
  if (s->poll != NULL) {
    uv_poll_stop(s->poll);
    uv_close((uv_handle_t *)s->poll, sup_poll_close_cb);
    s->poll = NULL;
  }
  if (s->fd >= 0) close(s->fd);
  s->fd = -1;
}

/* The supervisor is gone or unusable: the layer above learns that every
 * process it held is gone with it (workers die with their supervisor). */
static void sup_broken(hd_sup *s, const char *why) {
  if (!s->up) return;
  if (why != NULL && s->error[0] == '\0') snprintf(s->error, sizeof s->error, "%s", why);
  sup_down(s);
  sup_let_go(s, 0);
  s->cbs.lost(s->ud, s->error);
}

static void sup_poll_update(hd_sup *s);

/* 0 sent, 1 not now (the socket is full), -1 the link is broken. */
static int sup_sendmsg(hd_sup *s, const char *msg, size_t len, const int *fds, int nfds) {
  if (hd_send_fds(s->fd, msg, len, fds, nfds, MSG_DONTWAIT) >= 0) return 0;
  if (errno == EAGAIN || errno == EWOULDBLOCK || errno == ENOBUFS) return 1;
  return -1;
}

static void sup_flush(hd_sup *s) {
  while (!hd_queue_empty(&s->out)) {
    sup_msg *m = HD_QUEUE_DATA(hd_queue_head(&s->out), sup_msg, node);
    int r = sup_sendmsg(s, m->data, m->len, m->fds, m->nfds);
    if (r == 1) break;
    if (r < 0) {
      sup_broken(s, "lost the supervisor process");
      return;
    }
    hd_queue_remove(&m->node);
    sup_close_fds(m->fds, m->nfds);
    free(m);
  }
  if (s->up) sup_poll_update(s);
}

static void sup_on_hello(hd_sup *s, const hd_ctl *m) {
  char why[256];
  if (m->bchead_len == (size_t)-1 || m->arg != HD_PROTO_VERSION) {
    snprintf(why, sizeof why, "worker executable %s speaks protocol %u, this module speaks %u",
             s->worker_path, m->arg, HD_PROTO_VERSION);
    sup_broken(s, why);
  } else if (m->bchead_len != s->bchead_len || memcmp(m->bchead, s->bchead, s->bchead_len) != 0) {
    snprintf(why, sizeof why,
             "worker executable %s was built for another LuaJIT (its bytecode differs)",
             s->worker_path);
    sup_broken(s, why);
  }
}

static void sup_on_report(hd_sup *s, const char *buf, ssize_t n, int fd) {
  hd_ctl m;
  if (hd_wire_ctl_unpack(buf, (size_t)n, HD_CTL_UP, &m) != 0) m.type = 0;
  if (m.type != HD_CTL_SPAWNED && fd >= 0) {
    close(fd);
    fd = -1;
  }
  switch (m.type) {
    case HD_CTL_HELLO: sup_on_hello(s, &m); return;
    case HD_CTL_SPAWNED: s->cbs.spawned(s->ud, m.id, (pid_t)m.pid, fd); return;
    case HD_CTL_EXITED: s->cbs.exited(s->ud, m.id, (int)m.arg); return;
    case HD_CTL_FAILED: {
      char why[256];
      hd_wire_fail_text(m.arg, why, sizeof why);
      s->cbs.failed(s->ud, m.id, why);
      s->cbs.exited(s->ud, m.id, -1);
      return;
    }
    default: return;
  }
}

static void sup_poll_cb(uv_poll_t *h, int status, int events) {
  hd_sup *s = h->data;
  if (status < 0) {
    sup_broken(s, "lost the supervisor process");
    return;
  }
  if (events & UV_WRITABLE) sup_flush(s);
  while (s->up && (events & UV_READABLE)) {
    char m[HD_CTL_MAX];
    int fd;
    ssize_t n = hd_recv_fd(s->fd, m, sizeof m, &fd, MSG_DONTWAIT);
    if (n > 0) {
      sup_on_report(s, m, n, fd);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
    sup_broken(s, "the supervisor process exited");
  }
}

void hd_sup_drain(hd_sup *s) {
  if (s->up && s->poll != NULL) sup_poll_cb(s->poll, 0, UV_READABLE);
}

static void sup_poll_update(hd_sup *s) {
  int ev = UV_READABLE | (hd_queue_empty(&s->out) ? 0 : UV_WRITABLE);
  if (ev != s->poll_events) {
    s->poll_events = ev;
    uv_poll_start(s->poll, ev, sup_poll_cb);
  }
}

/* Sends a packed message with nfds descriptors (at most HD_SPAWN_FDS),
 * queueing what the socket does not take now. The descriptors are closed
 * here once sent, or at once when it cannot be. */
static int sup_send(hd_sup *s, const hd_ctl *c, const int *fds, int nfds) {
  sup_msg *m;
  char data[HD_CTL_MAX];
  size_t len = hd_wire_ctl_pack(c, HD_CTL_DOWN, data);
  if (!s->up) {
    sup_close_fds(fds, nfds);
    return -1;
  }
  if (hd_queue_empty(&s->out)) {
    int r = sup_sendmsg(s, data, len, fds, nfds);
    if (r <= 0) sup_close_fds(fds, nfds);
    if (r == 0) return 0;
    if (r < 0) {
      sup_broken(s, "lost the supervisor process");
      return -1;
    }
  }
  m = malloc(sizeof *m);
  if (m == NULL) {
    sup_close_fds(fds, nfds);
    return -1;
  }
  m->len = len;
  m->nfds = nfds;
  if (nfds > 0) memcpy(m->fds, fds, sizeof(int) * (size_t)nfds);
  memcpy(m->data, data, len);
  hd_queue_insert_tail(&s->out, &m->node);
  sup_poll_update(s);
  return 0;
}

int hd_sup_spawn(hd_sup *s, uint32_t id, int flags, const char *name,
                 const int fds[HD_SPAWN_FDS]) {
  hd_ctl m;
  memset(&m, 0, sizeof m);
  m.type = HD_CTL_SPAWN;
  m.id = id;
  m.arg = (uint32_t)flags;
  if (name != NULL) snprintf(m.name, sizeof m.name, "%s", name);
  return sup_send(s, &m, fds, HD_SPAWN_FDS);
}

int hd_sup_kill(hd_sup *s, uint32_t id) {
  hd_ctl m;
  memset(&m, 0, sizeof m);
  m.type = HD_CTL_KILL;
  m.id = id;
  return sup_send(s, &m, NULL, 0);
}

/* posix_spawn's attributes: no signal blocked, every one at its default
 * (the host may block or ignore some; OpenResty blocks SIGCHLD). */
static int sup_spawn_attrs(posix_spawnattr_t *at) {
  sigset_t none, all;
  if (sigemptyset(&none) != 0 || sigfillset(&all) != 0 || sigdelset(&all, SIGKILL) != 0 ||
      sigdelset(&all, SIGSTOP) != 0)
    return EINVAL;
  if (posix_spawnattr_setsigmask(at, &none) != 0 || posix_spawnattr_setsigdefault(at, &all) != 0)
    return EINVAL;
  return posix_spawnattr_setflags(at, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
}

/* Execs the supervisor with its end of the control socket as descriptor
 * SUP_CHILD_FD. posix_spawn: no fork of a possibly big host. */
static int sup_exec(hd_sup *s, int child, const char *path, const char *cpath, pid_t *pid) {
  char hostpid[32];
  char *argv[6];
  posix_spawn_file_actions_t fa;
  posix_spawnattr_t at;
  int rc;
  snprintf(hostpid, sizeof hostpid, "%ld", (long)getpid());
  argv[0] = s->worker_path;
  argv[1] = (char *)"--supervisor";
  argv[2] = (char *)path;
  argv[3] = (char *)cpath;
  argv[4] = hostpid;
  argv[5] = NULL;
  if ((rc = posix_spawn_file_actions_init(&fa)) != 0) return rc;
  if ((rc = posix_spawnattr_init(&at)) != 0) goto error_fa;
  if ((rc = posix_spawn_file_actions_adddup2(&fa, child, SUP_CHILD_FD)) != 0) goto error;
  if ((rc = sup_spawn_attrs(&at)) != 0) goto error;
  rc = posix_spawn(pid, s->worker_path, &fa, &at, argv, environ);
error:
  posix_spawnattr_destroy(&at);
error_fa:
  posix_spawn_file_actions_destroy(&fa);
  return rc;
}

int hd_sup_ensure(hd_sup *s, const char *path, const char *cpath) {
  int sv[2] = {-1, -1}, child, rc, fl;
  pid_t pid;
  if (!hd_queue_empty(&s->gone)) hd_sup_reap(s);
  if (s->up) return 0;
  s->error[0] = '\0';
  if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) != 0) {
    snprintf(s->error, sizeof s->error, "socketpair: %s", strerror(errno));
    return -1;
  }
  child = sv[1];
  if (child == SUP_CHILD_FD) {
    /* dup2(3, 3) would keep close-on-exec set; move it first. */
    child = fcntl(sv[1], F_DUPFD_CLOEXEC, SUP_CHILD_FD + 1);
    close(sv[1]);
    if (child < 0) {
      close(sv[0]);
      snprintf(s->error, sizeof s->error, "fcntl: %s", strerror(errno));
      return -1;
    }
  }
  fl = fcntl(sv[0], F_GETFL);
  if (fl < 0 || fcntl(sv[0], F_SETFL, fl | O_NONBLOCK) != 0) {
    rc = errno;
    close(sv[0]);
    close(child);
    snprintf(s->error, sizeof s->error, "fcntl: %s", strerror(rc));
    return -1;
  }
  rc = sup_exec(s, child, path ? path : "", cpath ? cpath : "", &pid);
  close(child);
  if (rc != 0) {
    close(sv[0]);
    snprintf(s->error, sizeof s->error, "cannot start worker executable %s: %s", s->worker_path,
             strerror(rc));
    return -1;
  }
  s->pid = pid;
  s->pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
  if (s->pidfd >= 0) fcntl(s->pidfd, F_SETFD, FD_CLOEXEC);
  s->fd = sv[0];
  s->poll = malloc(sizeof *s->poll);
  if (s->poll == NULL || uv_poll_init(hd_loop_uv(s->loop), s->poll, s->fd) != 0) {
    free(s->poll);
    s->poll = NULL;
    /* Closing the socket makes the new supervisor exit. */
    close(s->fd);
    s->fd = -1;
    sup_let_go(s, 0);
    snprintf(s->error, sizeof s->error, "cannot watch the supervisor's socket");
    return -1;
  }
  s->poll->data = s;
  s->poll_events = 0;
  s->up = 1;
  sup_poll_update(s);
  return 1;
}

void hd_sup_close(hd_sup *s) {
  pid_t pid = s->pid;
  int pidfd = s->pidfd;
  if (!s->up) return;
  /* Closing the control socket makes the supervisor kill its workers, reap
   * them and exit; it is waited for, after the layer above has heard. */
  s->pid = -1;
  s->pidfd = -1;
  sup_broken(s, "shut down");
  s->pid = pid;
  s->pidfd = pidfd;
  sup_let_go(s, SUP_EXIT_WAIT_MS);
}

void hd_sup_forsake(hd_sup *s) {
  hd_queue *q;
  s->up = 0;
  if (s->fd >= 0) close(s->fd);
  if (s->pidfd >= 0) close(s->pidfd);
  s->fd = s->pidfd = -1;
  s->pid = -1;
  for (q = s->out.next; q != &s->out; q = q->next) {
    sup_msg *m = HD_QUEUE_DATA(q, sup_msg, node);
    sup_close_fds(m->fds, m->nfds);
    m->nfds = 0;
  }
  for (q = s->gone.next; q != &s->gone; q = q->next) {
    sup_gone *g = HD_QUEUE_DATA(q, sup_gone, node);
    if (g->pidfd >= 0) close(g->pidfd);
    g->pidfd = -1;
    g->pid = -1;
  }
}

void hd_sup_free(hd_sup *s) {
  hd_sup_close(s);
  hd_sup_reap(s);
  /* Those still exiting are let go for good. */
  while (!hd_queue_empty(&s->gone)) {
    sup_gone *g = HD_QUEUE_DATA(hd_queue_head(&s->gone), sup_gone, node);
    hd_queue_remove(&g->node);
    if (g->pidfd >= 0) close(g->pidfd);
    free(g);
  }
  free(s->worker_path);
  free(s);
}
