/* supervisor.c: main() of handler-worker: the supervisor that forks workers,
 * reaps them and reports how each one died. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "buf.h"
#include "proto.h"
#include "worker.h"

#define SUP_CTL_FD 3

typedef struct sup_child {
  uint32_t id;
  pid_t pid;
} sup_child;

typedef struct sup {
  int ctl;
  int sigfd;
  const char *path, *cpath;
  sup_child *kids;
  size_t nkids, capkids;
} sup;

/* Closes every descriptor from `from` up, except `keep`. The supervisor and
 * its workers must not hold the host's listening sockets, epoll fds or pipes. */
static void sup_close_from(int from, int keep) {
  DIR *d = opendir("/proc/self/fd");
  if (d != NULL) {
    int dfd = dirfd(d);
    struct dirent *e;
    int fds[256];
    int n = 0, i;
    /* Collect first: closing while reading the directory skips entries. */
    while ((e = readdir(d)) != NULL && n < 256) {
      int fd = atoi(e->d_name);
      if (e->d_name[0] < '0' || e->d_name[0] > '9') continue;
      if (fd >= from && fd != keep && fd != dfd) fds[n++] = fd;
    }
    closedir(d);
    for (i = 0; i < n; i++) close(fds[i]);
    if (n < 256) return;
  }
  /* No /proc, or very many descriptors: the slow sweep. */
  {
    long max = sysconf(_SC_OPEN_MAX);
    int fd;
    if (max < 0 || max > 1 << 20) max = 1 << 20;
    for (fd = from; fd < max; fd++)
      if (fd != keep) close(fd);
  }
}

static void sup_send(sup *s, const char *msg, size_t len) {
  while (send(s->ctl, msg, len, MSG_NOSIGNAL) < 0 && errno == EINTR) {
  }
}

static void sup_report(sup *s, int type, uint32_t id, uint32_t v) {
  char m[9];
  m[0] = (char)type;
  hd_put_u32(m + 1, id);
  hd_put_u32(m + 5, v);
  sup_send(s, m, sizeof m);
}

/* The bytecode header of this VM, so the parent can check that what it dumps
 * this worker can load (same LuaJIT, same GC64 setting). */
static size_t sup_bchead(char *out) {
  lua_State *L = luaL_newstate();
  size_t n = 0, len;
  const char *p;
  if (L == NULL) return 0;
  luaL_openlibs(L);
  lua_getglobal(L, "string");
  lua_getfield(L, -1, "dump");
  if (luaL_loadstring(L, "return") == 0 && lua_pcall(L, 1, 1, 0) == 0 &&
      (p = lua_tolstring(L, -1, &len)) != NULL) {
    n = len < HD_BCHEAD ? len : HD_BCHEAD;
    memcpy(out, p, n);
  }
  lua_close(L);
  return n;
}

static void sup_hello(sup *s) {
  char m[10 + HD_BCHEAD];
  size_t n = sup_bchead(m + 10);
  m[0] = HD_CTL_HELLO;
  hd_put_u32(m + 1, HD_PROTO_VERSION);
  hd_put_u32(m + 5, (uint32_t)getpid());
  m[9] = (char)n;
  sup_send(s, m, 10 + n);
}

static void sup_child_signals(void) {
  sigset_t all;
  int sig;
  sigemptyset(&all);
  sigprocmask(SIG_SETMASK, &all, NULL);
  for (sig = 1; sig < NSIG; sig++) signal(sig, SIG_DFL);
}

/* In the forked child: become a worker on `fd`. Never returns. */
static void sup_become_worker(sup *s, int fd, pid_t sup_pid) {
  sup_child_signals();
  /* The control socket is descriptor 3 too: it goes first. */
  close(s->ctl);
  close(s->sigfd);
  if (fd != HD_WORKER_FD) {
    if (dup2(fd, HD_WORKER_FD) < 0) _exit(73);
    close(fd);
  }
  /* The protocol socket must not leak into programs a job executes. */
  fcntl(HD_WORKER_FD, F_SETFD, FD_CLOEXEC);
  sup_close_from(HD_WORKER_FD + 1, -1);
  /* Dies with the supervisor; the supervisor dies with the host. */
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (getppid() != sup_pid) _exit(74);
  /* Its own process group, so a kill reaches what the job started too. */
  setpgid(0, 0);
  _exit(hd_worker_run(HD_WORKER_FD));
}

static void sup_spawn(sup *s, uint32_t id, int fd) {
  pid_t pid;
  if (s->nkids == s->capkids) {
    size_t cap = s->capkids ? s->capkids * 2 : 16;
    sup_child *k = realloc(s->kids, cap * sizeof *k);
    if (k == NULL) {
      close(fd);
      sup_report(s, HD_CTL_FAILED, id, ENOMEM);
      return;
    }
    s->kids = k;
    s->capkids = cap;
  }
  pid = fork();
  if (pid == 0) sup_become_worker(s, fd, getppid());
  close(fd);
  if (pid < 0) {
    sup_report(s, HD_CTL_FAILED, id, (uint32_t)errno);
    return;
  }
  s->kids[s->nkids].id = id;
  s->kids[s->nkids].pid = pid;
  s->nkids++;
  sup_report(s, HD_CTL_SPAWNED, id, (uint32_t)pid);
}

static void sup_kill(sup *s, uint32_t id) {
  size_t i;
  for (i = 0; i < s->nkids; i++) {
    if (s->kids[i].id == id) {
      /* The child is not reaped yet, so its pid cannot have been reused. */
      kill(-s->kids[i].pid, SIGKILL);
      kill(s->kids[i].pid, SIGKILL);
      return;
    }
  }
}

static void sup_reap(sup *s) {
  for (;;) {
    int st;
    size_t i;
    pid_t pid = waitpid(-1, &st, WNOHANG);
    if (pid <= 0) {
      if (pid < 0 && errno == EINTR) continue;
      return;
    }
    for (i = 0; i < s->nkids; i++) {
      if (s->kids[i].pid == pid) {
        uint32_t id = s->kids[i].id;
        s->kids[i] = s->kids[--s->nkids];
        /* Whatever the worker left in its group goes with it. */
        kill(-pid, SIGKILL);
        sup_report(s, HD_CTL_EXITED, id, (uint32_t)st);
        break;
      }
    }
  }
}

/* Reads one control packet. Returns -1 when the parent is gone. */
static int sup_read_ctl(sup *s) {
  char m[HD_CTL_MAX];
  char cbuf[CMSG_SPACE(sizeof(int) * 4)];
  struct iovec iov = {m, sizeof m};
  struct msghdr mh;
  struct cmsghdr *c;
  ssize_t n;
  int fd = -1;
  memset(&mh, 0, sizeof mh);
  mh.msg_iov = &iov;
  mh.msg_iovlen = 1;
  mh.msg_control = cbuf;
  mh.msg_controllen = sizeof cbuf;
  n = recvmsg(s->ctl, &mh, MSG_CMSG_CLOEXEC);
  if (n < 0) return (errno == EINTR || errno == EAGAIN) ? 0 : -1;
  if (n == 0) return -1;
  for (c = CMSG_FIRSTHDR(&mh); c != NULL; c = CMSG_NXTHDR(&mh, c)) {
    if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
      int *fds = (int *)CMSG_DATA(c);
      size_t k, nf = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      for (k = 0; k < nf; k++) {
        if (fd < 0) fd = fds[k];
        else close(fds[k]);
      }
    }
  }
  if (n >= 5 && m[0] == HD_CTL_SPAWN && fd >= 0) {
    sup_spawn(s, hd_get_u32(m + 1), fd);
    return 0;
  }
  if (fd >= 0) close(fd);
  if (n >= 5 && m[0] == HD_CTL_KILL) sup_kill(s, hd_get_u32(m + 1));
  return 0;
}

static void sup_shutdown(sup *s) {
  size_t i;
  for (i = 0; i < s->nkids; i++) {
    kill(-s->kids[i].pid, SIGKILL);
    kill(s->kids[i].pid, SIGKILL);
  }
  while (waitpid(-1, NULL, 0) > 0 || errno == EINTR) {
  }
}

int main(int argc, char **argv) {
  sup s;
  sigset_t chld;
  pid_t host;
  int devnull;
  if (argc < 5 || strcmp(argv[1], "--supervisor") != 0) {
    fprintf(stderr, "handler-worker: started by the handler Lua module, not by hand\n");
    return 2;
  }
  memset(&s, 0, sizeof s);
  s.ctl = SUP_CTL_FD;
  s.path = argv[2];
  s.cpath = argv[3];
  host = (pid_t)strtol(argv[4], NULL, 10);
  /* The host may block or ignore signals (OpenResty blocks SIGCHLD). */
  sup_child_signals();
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (getppid() != host) return 0;
  /* Orphans of a job become ours, so we can reap and kill them. */
  prctl(PR_SET_CHILD_SUBREAPER, 1);
  sup_close_from(SUP_CTL_FD + 1, -1);
  devnull = open("/dev/null", O_RDONLY | O_CLOEXEC);
  if (devnull >= 0) {
    dup2(devnull, 0);
    close(devnull);
  }
  sigemptyset(&chld);
  sigaddset(&chld, SIGCHLD);
  sigprocmask(SIG_BLOCK, &chld, NULL);
  s.sigfd = signalfd(-1, &chld, SFD_CLOEXEC | SFD_NONBLOCK);
  if (s.sigfd < 0) return 3;
  {
    int fl = fcntl(s.ctl, F_GETFD);
    if (fl >= 0) fcntl(s.ctl, F_SETFD, fl | FD_CLOEXEC);
  }
  if (hd_worker_prepare(s.path, s.cpath) != 0) {
    fprintf(stderr, "handler-worker: cannot build the pristine Lua state\n");
    return 4;
  }
  sup_hello(&s);
  for (;;) {
    struct pollfd p[2];
    p[0].fd = s.ctl;
    p[0].events = POLLIN;
    p[1].fd = s.sigfd;
    p[1].events = POLLIN;
    if (poll(p, 2, -1) < 0) {
      if (errno == EINTR) continue;
      break;
    }
    if (p[1].revents) {
      struct signalfd_siginfo si;
      while (read(s.sigfd, &si, sizeof si) > 0) {
      }
      sup_reap(&s);
    }
    if (p[0].revents & (POLLIN | POLLHUP | POLLERR)) {
      if (sup_read_ctl(&s) < 0) break;
    }
  }
  sup_shutdown(&s);
  free(s.kids);
  return 0;
}
