/* supervisor.c: main() of handler-worker: the supervisor that forks workers,
 * reaps them and reports how each one died. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <time.h>
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
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "fdpass.h"
#include "jail.h"
#include "rmtree.h"
#include "sandbox.h"
#include "wire.h"
#include "worker.h"

#define SUP_CTL_FD 3

/* Bytes read at a time from the list of our children: a pid is at most 10
 * digits, so a chunk always holds a whole one. */
#define SUP_CHILDREN_CHUNK 4096
/* Descriptors closed per pass over /proc/self/fd. */
#define SUP_FD_BATCH 256
/* After a worker died, what its jobs left behind is looked for this many
 * times, this often (a fork bomb keeps making more). */
#define SUP_SWEEPS 10
#define SUP_SWEEP_MS 100
/* At shutdown: sweeps, this far apart, until none is left. */
#define SUP_SHUTDOWN_SWEEPS 100
#define SUP_SHUTDOWN_SWEEP_NS 10000000L
/* The longest TMPDIR used (the host's clean-up uses the same rule). */
#define SUP_TMPDIR_MAX 100
/* Set in the host's environment (which the supervisor reads at start): a
 * sandboxed worker cannot be isolated, as where the system refuses
 * namespaces; for the specs of that failure. */
#define SUP_FORCE_NO_NAMESPACES "HANDLER_TEST_NO_USERNS"

/* What `ps` shows: the title replaces the command line (/proc/PID/cmdline),
 * the short name is the kernel's comm (/proc/PID/comm, at most 15 bytes). */
#define SUP_TITLE_SUPERVISOR "handler: supervisor"
#define SUP_TITLE_WORKER "handler: worker"
#define SUP_COMM_SUPERVISOR "handler-sup"
#define SUP_COMM_WORKER "handler-worker"

typedef struct sup_child {
  uint32_t id;
  pid_t pid;
  char dir[160]; /* its private working directory, removed when it is reaped */
} sup_child;

typedef struct sup {
  int ctl;
  int sigfd;
  char *path, *cpath;
  char tmpdir[SUP_TMPDIR_MAX + 1];
  int dir_failed;   /* said once that a worker's directory cannot be made */
  int jail_failed;  /* said once that a sandboxed worker cannot be isolated */
  int orphans_seen; /* sweeps still to do after a worker died */
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
    int fds[SUP_FD_BATCH];
    int n = 0, i;
    /* Collect first: closing while reading the directory skips entries. */
    while ((e = readdir(d)) != NULL && n < SUP_FD_BATCH) {
      int fd = atoi(e->d_name);
      if (e->d_name[0] < '0' || e->d_name[0] > '9') continue;
      if (fd >= from && fd != keep && fd != dfd) fds[n++] = fd;
    }
    closedir(d);
    for (i = 0; i < n; i++) close(fds[i]);
    if (n < SUP_FD_BATCH) return;
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

/* ---- The process title ---------------------------------------------------
 * The kernel shows a process's command line from the memory its argv strings
 * were copied to at exec, and the environment strings follow them there. As
 * nginx and PostgreSQL do, the supervisor takes argv's strings for a short
 * title once it has copied what it needs from them; a title longer than
 * they are runs on over the environment's, which are moved out of the way
 * first (only then: /proc/PID/environ keeps telling what the process was
 * started with). Workers inherit the area, at the same address, and write
 * their own title over it. */
static struct {
  char *area;
  size_t argv_len; /* argv's strings */
  size_t full_len; /* and the environment's right after them */
  int moved;       /* the environment was moved: the area is full_len long */
} sup_title;

/* Copies the environment out of the area; 0, or -1 when memory runs out
 * (the environment then stays where it is, and the title keeps out of it). */
static int sup_move_environ(void) {
  char **env;
  size_t n = 0, k;
  while (environ != NULL && environ[n] != NULL) n++;
  if ((env = malloc((n + 1) * sizeof *env)) == NULL) return -1;
  for (k = 0; k < n; k++) {
    if ((env[k] = strdup(environ[k])) == NULL) {
      while (k > 0) free(env[--k]);
      free(env);
      return -1;
    }
  }
  env[n] = NULL;
  environ = env;
  return 0;
}

/* Claims the strings of argv, and those of the environment right after
 * them, for the title. Nothing may read argv's strings afterwards. */
static void sup_title_init(int argc, char **argv) {
  char *end, *name;
  size_t k;
  int i;
  if (argc < 1 || argv[0] == NULL) return;
  /* glibc's own messages name the program through this pointer into argv. */
  if ((name = strdup(argv[0])) != NULL) {
    char *slash = strrchr(name, '/');
    program_invocation_name = name;
    program_invocation_short_name = slash != NULL ? slash + 1 : name;
  }
  end = argv[0] + strlen(argv[0]) + 1;
  for (i = 1; i < argc && argv[i] == end; i++) end += strlen(argv[i]) + 1;
  sup_title.area = argv[0];
  sup_title.argv_len = (size_t)(end - argv[0]);
  if (i == argc && environ != NULL)
    for (k = 0; environ[k] != NULL && environ[k] == end; k++) end += strlen(environ[k]) + 1;
  sup_title.full_len = (size_t)(end - argv[0]);
  for (i = 1; i < argc; i++) argv[i] = NULL;
}

/* Writes the title over the area (cut to fit, the rest zeroed: the kernel
 * then shows exactly the title) and sets the kernel's short name. */
static void sup_title_set(const char *title, const char *comm) {
  size_t n = strlen(title), len = sup_title.moved ? sup_title.full_len : sup_title.argv_len;
  if (n >= len && !sup_title.moved && sup_title.full_len > len && sup_move_environ() == 0) {
    sup_title.moved = 1;
    len = sup_title.full_len;
  }
  if (len > 0) {
    if (n >= len) n = len - 1;
    memcpy(sup_title.area, title, n);
    memset(sup_title.area + n, 0, len - n);
  }
  prctl(PR_SET_NAME, comm, 0, 0, 0);
}

/* The host's environment leaves this process's memory, which every worker
 * is a copy of: the strings are zeroed where they are (the kernel shows
 * /proc/PID/environ from their original place) and the variables cleared.
 * Their area is then the title's to use. */
static void sup_wipe_environ(void) {
  size_t k;
  for (k = 0; environ != NULL && environ[k] != NULL; k++) memset(environ[k], 0, strlen(environ[k]));
  clearenv();
  if (sup_title.area != NULL) sup_title.moved = 1;
}

/* "handler: worker (NAME)", or without the name when the host sent none.
 * The name is the pool's, any string: control bytes are shown as '?', and a
 * UTF-8 sequence the wire cut in half is dropped. */
static void sup_worker_title(const char *name) {
  char title[sizeof SUP_TITLE_WORKER + sizeof " ()" + HD_CTL_NAME];
  size_t n = strnlen(name, HD_CTL_NAME), k, lead;
  if (n == 0) {
    sup_title_set(SUP_TITLE_WORKER, SUP_COMM_WORKER);
    return;
  }
  /* The last sequence: its lead byte, and whether all its bytes are here. */
  lead = n;
  while (lead > 0 && ((unsigned char)name[lead - 1] & 0xC0) == 0x80) lead--;
  if (lead > 0 && (unsigned char)name[lead - 1] >= 0xC0) {
    unsigned char c = (unsigned char)name[lead - 1];
    size_t want = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : 2;
    if (n - (lead - 1) < want) n = lead - 1;
  }
  k = (size_t)snprintf(title, sizeof title, "%s (", SUP_TITLE_WORKER);
  memcpy(title + k, name, n);
  for (; n > 0; n--, k++)
    if ((unsigned char)title[k] < 0x20 || title[k] == 0x7F) title[k] = '?';
  memcpy(title + k, ")", sizeof ")");
  sup_title_set(title, SUP_COMM_WORKER);
}

/* Descriptors 0 to 2 are open: standard input on /dev/null, and output on
 * /dev/null where the host had it closed. A closed one would be taken by
 * the next descriptor opened: the signalfd here, a file a job opens in a
 * worker, which print would then write into. */
static void sup_std_fds(void) {
  int fd;
  for (fd = STDIN_FILENO; fd <= STDERR_FILENO; fd++) {
    int null;
    if (fd != STDIN_FILENO && fcntl(fd, F_GETFD) >= 0) continue;
    null = open("/dev/null", fd == STDIN_FILENO ? O_RDONLY : O_WRONLY);
    if (null < 0 || null == fd) continue;
    dup2(null, fd);
    close(null);
  }
}

static void sup_send(sup *s, const char *msg, size_t len) {
  while (send(s->ctl, msg, len, MSG_NOSIGNAL) < 0 && errno == EINTR) {
  }
}

static void sup_report(sup *s, int type, uint32_t id, uint32_t v) {
  hd_ctl m = {0};
  char out[HD_CTL_MAX];
  m.type = type;
  m.id = id;
  m.arg = v;
  sup_send(s, out, hd_wire_ctl_pack(&m, HD_CTL_UP, out));
}

/* SPAWNED with a pidfd of the worker attached: the host can then signal
 * exactly this process even after the supervisor is gone. Opened here,
 * before the child can have been reaped, so it cannot name another process. */
static void sup_report_spawned(sup *s, uint32_t id, pid_t pid) {
  char out[HD_CTL_MAX];
  int pfd = (int)syscall(SYS_pidfd_open, pid, 0);
  hd_ctl m;
  memset(&m, 0, sizeof m);
  m.type = HD_CTL_SPAWNED;
  m.id = id;
  m.pid = (uint32_t)pid;
  hd_send_fd(s->ctl, out, hd_wire_ctl_pack(&m, HD_CTL_UP, out), pfd, 0);
  if (pfd >= 0) close(pfd);
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
  hd_ctl m = {0};
  char out[HD_CTL_MAX];
  m.type = HD_CTL_HELLO;
  m.arg = HD_PROTO_VERSION;
  m.pid = (uint32_t)getpid();
  m.bchead_len = sup_bchead(m.bchead);
  sup_send(s, out, hd_wire_ctl_pack(&m, HD_CTL_UP, out));
}

static void sup_child_signals(void) {
  sigset_t all;
  int sig;
  sigemptyset(&all);
  sigprocmask(SIG_SETMASK, &all, NULL);
  for (sig = 1; sig < NSIG; sig++) signal(sig, SIG_DFL);
}

/* In the forked child: the pipes the host reads become descriptors 1 and
 * 2, so every byte written to them, by the job, the FFI or a command it
 * runs, passes the host's meter. They are above 2 (0 to 2 are open in the
 * supervisor) and are closed once in place. */
static void sup_worker_stdio(const int std[2]) {
  if (dup2(std[0], STDOUT_FILENO) < 0 || dup2(std[1], STDERR_FILENO) < 0)
    _exit(HD_EXIT_NO_SOCKET);
  close(std[0]);
  close(std[1]);
}

/* In the forked child: the protocol pipes become descriptors 3 (replies)
 * and 4 (jobs), close-on-exec so that they do not leak into programs a job
 * executes. Each is first moved above 4, so neither lands on the other. */
static void sup_worker_protocol(int reply, int job) {
  int hi_reply = fcntl(reply, F_DUPFD, HD_WORKER_JOB_FD + 1);
  int hi_job = fcntl(job, F_DUPFD, HD_WORKER_JOB_FD + 1);
  if (hi_reply < 0 || hi_job < 0 || dup2(hi_reply, HD_WORKER_FD) < 0 ||
      dup2(hi_job, HD_WORKER_JOB_FD) < 0)
    _exit(HD_EXIT_NO_SOCKET);
  fcntl(HD_WORKER_FD, F_SETFD, FD_CLOEXEC);
  fcntl(HD_WORKER_JOB_FD, F_SETFD, FD_CLOEXEC);
}

/* In the forked child: become a worker on the pipes `fd` (replies) and
 * `job`, writing output to `std`. Never returns. */
static void sup_become_worker(sup *s, int fd, int job, const int std[2], pid_t sup_pid,
                              const char *dir, int flags, const char *name, int jailed) {
  struct rlimit rl;
  sup_worker_title(name);
  sup_child_signals();
  /* The control socket may be descriptor 3 or 4: it goes first. */
  close(s->ctl);
  close(s->sigfd);
  sup_worker_stdio(std);
  sup_worker_protocol(fd, job);
  sup_close_from(HD_WORKER_JOB_FD + 1, -1);
  /* Dies with the supervisor; the supervisor dies with the host. A jailed
   * worker armed this before its jail, and its parent is outside its PID
   * namespace (getppid says 0). */
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (!jailed && getppid() != sup_pid) _exit(HD_EXIT_ORPHAN);
  /* Its own process group, so a kill reaches what the job started too. And
   * a subreaper: what a running job starts stays under this worker even
   * when it slips out of the group, so the supervisor's sweep after another
   * worker's death cannot take it; when this worker dies, it all comes to
   * the supervisor, which kills it. */
  setpgid(0, 0);
  prctl(PR_SET_CHILD_SUBREAPER, 1);
  /* What a job sees: no host environment (a job may ask for an allow-list),
   * a private working directory (a jailed one is in its /tmp already), no
   * core files, bounded file size. */
  clearenv();
  if (!jailed && chdir(dir) != 0) _exit(HD_EXIT_NO_DIR);
  rl.rlim_cur = rl.rlim_max = 0;
  setrlimit(RLIMIT_CORE, &rl);
  rl.rlim_cur = rl.rlim_max = HD_WORKER_FSIZE;
  setrlimit(RLIMIT_FSIZE, &rl);
  _exit(hd_worker_run(HD_WORKER_FD, flags, jailed ? hd_jail_outer_pid() : getpid()));
}

/* Removes a worker's private directory and what its jobs left in it. */
static void sup_rmdir(const char *dir) {
  if (dir[0] != '\0') hd_rm_tree(dir);
}

/* Kills our children that are not workers: what a dead worker's job left
 * behind reparents to us (we are a subreaper), including processes that
 * called setsid to slip out of the worker's group. They are our children
 * and not yet reaped, so their pids cannot have been reused. Returns
 * whether it found any. */
static int sup_is_kid(sup *s, pid_t pid) {
  size_t i;
  for (i = 0; i < s->nkids; i++)
    if (s->kids[i].pid == pid) return 1;
  return 0;
}

static int sup_kill_orphan(sup *s, pid_t pid) {
  if (pid <= 0 || sup_is_kid(s, pid)) return 0;
  kill(-pid, SIGKILL);
  kill(pid, SIGKILL);
  return 1;
}

/* Kills the orphans among the pids written in [p, end), space-separated. */
static int sup_kill_listed(sup *s, const char *p, const char *end) {
  int found = 0;
  while (p < end) {
    long pid = 0;
    int digits = 0;
    while (p < end && (*p < '0' || *p > '9')) p++;
    for (; p < end && *p >= '0' && *p <= '9'; p++, digits = 1)
      if (pid <= (long)INT32_MAX / 10) pid = pid * 10 + (*p - '0');
    if (digits) found |= sup_kill_orphan(s, (pid_t)pid);
  }
  return found;
}

/* The fast way: the kernel's list of this thread's children, one small
 * file. Returns -1 where the kernel does not have it. */
static int sup_sweep_children(sup *s) {
  char path[64], buf[SUP_CHILDREN_CHUNK];
  int fd, found = 0;
  size_t keep = 0;
  snprintf(path, sizeof path, "/proc/self/task/%d/children", (int)getpid());
  fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return -1;
  for (;;) {
    size_t len, done;
    ssize_t n = read(fd, buf + keep, sizeof buf - keep);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    len = keep + (size_t)n;
    /* A number the read cut short is kept for the next one: read as it
     * stands, it would name some other process. */
    for (done = len; done > 0 && buf[done - 1] >= '0' && buf[done - 1] <= '9'; done--) {
    }
    found |= sup_kill_listed(s, buf, buf + done);
    keep = len - done;
    memmove(buf, buf + done, keep);
  }
  /* At the end of the file the last number is whole. */
  found |= sup_kill_listed(s, buf, buf + keep);
  close(fd);
  return found;
}

static int sup_sweep_orphans(sup *s) {
  DIR *d;
  int fast = sup_sweep_children(s);
  struct dirent *e;
  pid_t me = getpid();
  int found = 0;
  if (fast >= 0) return fast;
  d = opendir("/proc");
  if (d == NULL) return 0;
  while ((e = readdir(d)) != NULL) {
    char path[64], buf[512];
    const char *rp;
    pid_t pid;
    int ppid, fd;
    ssize_t n;
    if (e->d_name[0] < '1' || e->d_name[0] > '9') continue;
    pid = (pid_t)strtol(e->d_name, NULL, 10);
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) continue;
    n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) continue;
    buf[n] = '\0';
    rp = strrchr(buf, ')');
    if (rp == NULL || sscanf(rp + 1, " %*c %d", &ppid) != 1 || ppid != (int)me) continue;
    found |= sup_kill_orphan(s, pid);
  }
  closedir(d);
  return found;
}

/* Closes the n descriptors of fds that are open. */
static void sup_close_fds(const int *fds, int n) {
  int k;
  for (k = 0; k < n; k++)
    if (fds[k] >= 0) close(fds[k]);
}

/* fds: the SPAWN's descriptors (wire.h's HD_SPAWN_FD_*), closed here. */
static void sup_spawn(sup *s, uint32_t id, const int *fds, int flags, const char *name) {
  pid_t pid, me;
  int fd = fds[HD_SPAWN_FD_REPLY], job = fds[HD_SPAWN_FD_JOB];
  const int std[2] = {fds[HD_SPAWN_FD_STDOUT], fds[HD_SPAWN_FD_STDERR]};
  int jailed = (flags & (HD_SPAWN_LUA | HD_SPAWN_SECCOMP)) != 0;
  if (s->nkids == s->capkids) {
    size_t cap = s->capkids ? s->capkids * 2 : 16;
    sup_child *k = realloc(s->kids, cap * sizeof *k);
    if (k == NULL) {
      sup_close_fds(fds, HD_SPAWN_FDS);
      sup_report(s, HD_CTL_FAILED, id, ENOMEM);
      return;
    }
    s->kids = k;
    s->capkids = cap;
  }
  /* Named after the supervisor, so the host can clean up after a
   * supervisor that was killed before it could. A worker without one would
   * run in the host's directory: it is not started. */
  snprintf(s->kids[s->nkids].dir, sizeof s->kids[s->nkids].dir, "%s/handler-%d-XXXXXX",
           s->tmpdir, (int)getpid());
  if (mkdtemp(s->kids[s->nkids].dir) == NULL) {
    int err = errno;
    if (!s->dir_failed)
      fprintf(stderr, "handler-worker: cannot make a worker's directory in %s: %s\n", s->tmpdir,
              strerror(err));
    s->dir_failed = 1;
    sup_close_fds(fds, HD_SPAWN_FDS);
    sup_report(s, HD_CTL_FAILED, id, (uint32_t)err);
    return;
  }
  /* The supervisor's pid, taken before the fork: the child checks that its
   * parent is still this process once its death signal is armed. Taken in
   * the child, it would be whoever adopted the child if we died first. */
  me = getpid();
  if (jailed) {
    /* A sandboxed worker sees nothing of the host: its own namespaces and
     * file system (jail.c), made before it is reported. */
    uint32_t why;
    pid = hd_jail_fork(s->kids[s->nkids].dir, &why);
    if (pid < 0) {
      char text[256];
      hd_wire_fail_text(why, text, sizeof text);
      if (!s->jail_failed) fprintf(stderr, "handler-worker: %s\n", text);
      s->jail_failed = 1;
      sup_close_fds(fds, HD_SPAWN_FDS);
      sup_rmdir(s->kids[s->nkids].dir);
      sup_report(s, HD_CTL_FAILED, id, why);
      return;
    }
  } else {
    pid = fork();
  }
  if (pid == 0)
    sup_become_worker(s, fd, job, std, me, s->kids[s->nkids].dir, flags, name, jailed);
  sup_close_fds(fds, HD_SPAWN_FDS);
  if (pid < 0) {
    sup_rmdir(s->kids[s->nkids].dir);
    sup_report(s, HD_CTL_FAILED, id, (uint32_t)errno);
    return;
  }
  s->kids[s->nkids].id = id;
  s->kids[s->nkids].pid = pid;
  s->nkids++;
  sup_report_spawned(s, id, pid);
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
        /* Whatever the worker left in its group and its directory goes
         * with it. */
        kill(-pid, SIGKILL);
        sup_rmdir(s->kids[i].dir);
        s->kids[i] = s->kids[--s->nkids];
        sup_report(s, HD_CTL_EXITED, id, (uint32_t)st);
        s->orphans_seen = SUP_SWEEPS;
        break;
      }
    }
  }
}

/* Reads one control packet. Returns -1 when the parent is gone. */
static int sup_read_ctl(sup *s) {
  char buf[HD_CTL_MAX];
  hd_ctl m;
  int fds[HD_SPAWN_FDS], k;
  ssize_t n = hd_recv_fds(s->ctl, buf, sizeof buf, fds, HD_SPAWN_FDS, 0);
  if (n < 0) return (errno == EINTR || errno == EAGAIN) ? 0 : -1;
  if (n == 0) return -1;
  if (hd_wire_ctl_unpack(buf, (size_t)n, HD_CTL_DOWN, &m) == 0) {
    if (m.type == HD_CTL_SPAWN) {
      /* A SPAWN comes with the worker's protocol and output pipes; without
       * them (the kernel drops descriptors we have no room for) the host
       * must still hear back, or the job waiting for that worker waits for
       * ever. */
      for (k = 0; k < HD_SPAWN_FDS && fds[k] >= 0; k++) {
      }
      if (k == HD_SPAWN_FDS) {
        sup_spawn(s, m.id, fds, (int)m.arg, m.name);
      } else {
        sup_close_fds(fds, HD_SPAWN_FDS);
        sup_report(s, HD_CTL_FAILED, m.id, EMFILE);
      }
      return 0;
    }
    if (m.type == HD_CTL_KILL) sup_kill(s, m.id);
  }
  sup_close_fds(fds, HD_SPAWN_FDS);
  return 0;
}

/* The host is gone: every worker and everything they started goes too. */
static void sup_shutdown(sup *s) {
  size_t i;
  int round;
  for (i = 0; i < s->nkids; i++) {
    kill(-s->kids[i].pid, SIGKILL);
    kill(s->kids[i].pid, SIGKILL);
  }
  for (i = 0; i < s->nkids; i++) {
    waitpid(s->kids[i].pid, NULL, 0);
    sup_rmdir(s->kids[i].dir);
  }
  s->nkids = 0;
  /* Orphans reparent to us as their parents die: sweep until none is left,
   * for at most a second (a fork bomb keeps making them). */
  for (round = 0; round < SUP_SHUTDOWN_SWEEPS; round++) {
    struct timespec ts = {0, SUP_SHUTDOWN_SWEEP_NS};
    int found = sup_sweep_orphans(s);
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
    if (!found) break;
    nanosleep(&ts, NULL);
  }
}

int main(int argc, char **argv) {
  sup s;
  sigset_t chld;
  pid_t host;
  /* The system calls a sandboxed worker may make, for the specs. */
  if (argc == 2 && strcmp(argv[1], "--sandbox-allowlist") == 0) {
    hd_sandbox_allowlist(stdout);
    return 0;
  }
  if (argc < 5 || strcmp(argv[1], "--supervisor") != 0) {
    fprintf(stderr, "handler-worker: started by the handler Lua module, not by hand\n");
    return 2;
  }
  memset(&s, 0, sizeof s);
  s.ctl = SUP_CTL_FD;
  /* Not traceable, its memory (/proc/PID/mem) and descriptors closed to
   * other processes of its user, workers that are not sandboxed included.
   * Workers inherit it. */
  prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
  host = (pid_t)strtol(argv[4], NULL, 10);
  /* The host may block or ignore signals (OpenResty blocks SIGCHLD). */
  sup_child_signals();
  /* SIGTERM when the host dies, read from the signalfd below: the
   * supervisor then shuts down properly, taking every worker and what
   * their jobs started with it. */
  prctl(PR_SET_PDEATHSIG, SIGTERM);
  if (getppid() != host) return 0;
  /* Workers run in private directories: relative module paths are made
   * absolute against the host's directory first. */
  s.path = hd_worker_abspaths(argv[2], NULL);
  s.cpath = hd_worker_abspaths(argv[3], NULL);
  if (s.path == NULL || s.cpath == NULL) return 5;
  /* argv is read: its area becomes the title. */
  sup_title_init(argc, argv);
  sup_title_set(SUP_TITLE_SUPERVISOR, SUP_COMM_SUPERVISOR);
  {
    const char *t = getenv("TMPDIR");
    snprintf(s.tmpdir, sizeof s.tmpdir, "%s",
             t != NULL && t[0] == '/' && strlen(t) < SUP_TMPDIR_MAX ? t : "/tmp");
  }
  {
    const char *no = getenv(SUP_FORCE_NO_NAMESPACES);
    if (hd_jail_init(s.path, s.cpath, no != NULL && strcmp(no, "1") == 0) != 0) return 5;
  }
  /* Orphans of a job become ours, so we can reap and kill them. */
  prctl(PR_SET_CHILD_SUBREAPER, 1);
  sup_close_from(SUP_CTL_FD + 1, -1);
  sup_std_fds();
  /* A terminal's Ctrl-C or Ctrl-\ goes to the whole foreground group, the
   * host's and so ours: the host decides what it means, and this process
   * ends when the host does. */
  signal(SIGINT, SIG_IGN);
  signal(SIGQUIT, SIG_IGN);
  sigemptyset(&chld);
  sigaddset(&chld, SIGCHLD);
  sigaddset(&chld, SIGTERM);
  sigaddset(&chld, SIGHUP);
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
  /* Everything the environment had to say is read. */
  sup_wipe_environ();
  sup_hello(&s);
  for (;;) {
    struct pollfd p[2];
    p[0].fd = s.ctl;
    p[0].events = POLLIN;
    p[1].fd = s.sigfd;
    p[1].events = POLLIN;
    if (poll(p, 2, s.orphans_seen > 0 ? SUP_SWEEP_MS : -1) < 0) {
      if (errno == EINTR) continue;
      break;
    }
    if (p[1].revents) {
      struct signalfd_siginfo si;
      int stop = 0;
      while (read(s.sigfd, &si, sizeof si) == (ssize_t)sizeof si)
        if (si.ssi_signo == SIGTERM || si.ssi_signo == SIGHUP) stop = 1;
      if (stop) break;
      sup_reap(&s);
    }
    if (s.orphans_seen > 0) {
      /* For a second after a worker died, look for what it left behind. */
      if (sup_sweep_orphans(&s)) s.orphans_seen = SUP_SWEEPS;
      else s.orphans_seen--;
    }
    if (p[0].revents & (POLLIN | POLLHUP | POLLERR)) {
      if (sup_read_ctl(&s) < 0) break;
    }
  }
  sup_shutdown(&s);
  free(s.kids);
  free(s.path);
  free(s.cpath);
  return 0;
}
