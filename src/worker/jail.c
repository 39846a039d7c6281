/* jail.c: the isolation of a sandboxed worker. It is forked into namespaces
 * of its own (user unless the supervisor is root, PID, mount, IPC, network,
 * UTS, cgroup), given a file system of its own (a small read-only tmpfs
 * with the module directories bound in read-only, /dev/null and its kin,
 * its own /proc and a writable /tmp), and its privileges are dropped. The
 * references were bubblewrap and nsjail; SECURITY.md says what a job sees. */
#include "jail.h"

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <linux/capability.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "wire.h"
#include "worker.h"

/* How long the supervisor waits for a child to be jailed: a few ms are
 * usual; this is for a kernel that hangs. */
#define JAIL_READY_MS 10000

static struct {
  char **ro;      /* directories bound read-only, each at its own path */
  size_t nro;
  int userns;     /* not root: a user namespace gives the child its rights */
  int refuse;     /* the test hook: namespaces are "unavailable" */
  uid_t uid;      /* the supervisor's, mapped to HD_JAIL_UID in the userns */
  gid_t gid;
  pid_t outer;    /* in the child: its pid outside */
  char localtime[PATH_MAX]; /* /etc/localtime resolved, "" if none */
} jl;

/* Device nodes a job may open: bound from the host's /dev. */
static const char *const jail_devs[] = {"/dev/null", "/dev/zero", "/dev/urandom", "/dev/random",
                                        NULL};

/* Whether `dir` is `other` or lies under it. */
static int jail_under(const char *dir, const char *other) {
  size_t n = strlen(other);
  return strncmp(dir, other, n) == 0 && (dir[n] == '/' || dir[n] == '\0');
}

/* Removes "." and "" components from the absolute path in place and goes
 * up a level for ".." (lexically: the job names the path as written, not
 * where its symbolic links lead). */
static void jail_normalize(char *path) {
  char *out = path, *in = path;
  while (*in != '\0') {
    char *end;
    size_t n;
    while (*in == '/') in++;
    end = strchr(in, '/');
    n = end != NULL ? (size_t)(end - in) : strlen(in);
    if (n == 0 || (n == 1 && in[0] == '.')) {
      /* nothing */
    } else if (n == 2 && in[0] == '.' && in[1] == '.') {
      while (out > path && *--out != '/') {
      }
    } else {
      *out++ = '/';
      memmove(out, in, n);
      out += n;
    }
    in += n;
  }
  if (out == path) *out++ = '/';
  *out = '\0';
}

/* Adds the directory of one path template ("/a/b/?.lua" → "/a/b"): the
 * part before the last '/' that precedes the first '?'. The root itself
 * would be the whole file system: it is never bound. */
static int jail_add_template(const char *t, size_t n) {
  char dir[PATH_MAX];
  const char *q = memchr(t, '?', n);
  size_t len = q != NULL ? (size_t)(q - t) : n, i;
  struct stat st;
  while (len > 0 && t[len - 1] != '/') len--;
  while (len > 1 && t[len - 1] == '/') len--;
  if (len <= 1 || t[0] != '/' || len >= sizeof dir) return 0;
  memcpy(dir, t, len);
  dir[len] = '\0';
  jail_normalize(dir);
  /* The root would be the whole file system; /tmp would hide the job's
   * own /tmp under the host's. Neither is bound. */
  if (strcmp(dir, "/") == 0 || strcmp(dir, "/tmp") == 0) return 0;
  if (stat(dir, &st) != 0 || !S_ISDIR(st.st_mode)) return 0;
  /* A directory under one already bound is there; one above replaces it. */
  for (i = 0; i < jl.nro; i++)
    if (jail_under(dir, jl.ro[i])) return 0;
  for (i = 0; i < jl.nro;) {
    if (jail_under(jl.ro[i], dir)) {
      free(jl.ro[i]);
      jl.ro[i] = jl.ro[--jl.nro];
    } else {
      i++;
    }
  }
  {
    char **ro = realloc(jl.ro, (jl.nro + 1) * sizeof *ro);
    if (ro == NULL) return -1;
    jl.ro = ro;
    if ((jl.ro[jl.nro] = strdup(dir)) == NULL) return -1;
    jl.nro++;
  }
  return 0;
}

static int jail_add_paths(const char *paths) {
  const char *p = paths;
  for (;;) {
    const char *end = strchr(p, ';');
    size_t n = end != NULL ? (size_t)(end - p) : strlen(p);
    if (n > 0 && jail_add_template(p, n) != 0) return -1;
    if (end == NULL) return 0;
    p = end + 1;
  }
}

int hd_jail_init(const char *path, const char *cpath, int refuse) {
  struct stat st;
  jl.uid = getuid();
  jl.gid = getgid();
  jl.userns = geteuid() != 0;
  jl.refuse = refuse;
  if (realpath("/etc/localtime", jl.localtime) == NULL || stat(jl.localtime, &st) != 0 ||
      !S_ISREG(st.st_mode))
    jl.localtime[0] = '\0';
  if (jail_add_paths(path) != 0 || jail_add_paths(cpath) != 0) return -1;
  return 0;
}

pid_t hd_jail_outer_pid(void) {
  return jl.outer;
}

/* ---- In the child ---------------------------------------------------------- */

static int jail_write_file(const char *path, const char *text) {
  int fd = open(path, O_WRONLY | O_CLOEXEC);
  size_t n = strlen(text);
  ssize_t w;
  if (fd < 0) return -1;
  w = write(fd, text, n);
  if (close(fd) != 0 || w != (ssize_t)n) return -1;
  return 0;
}

/* The user namespace's one mapping: the supervisor's user and group are
 * HD_JAIL_UID and HD_JAIL_GID inside, and nothing else exists there. */
static int jail_map_ids(void) {
  char map[64];
  if (jail_write_file("/proc/self/setgroups", "deny") != 0) return -1;
  snprintf(map, sizeof map, "%d %d 1\n", HD_JAIL_UID, (int)jl.uid);
  if (jail_write_file("/proc/self/uid_map", map) != 0) return -1;
  snprintf(map, sizeof map, "%d %d 1\n", HD_JAIL_GID, (int)jl.gid);
  return jail_write_file("/proc/self/gid_map", map);
}

/* Whether a tracer is attached (TracerPid in /proc/self/status); errors
 * count as traced. */
static int jail_traced(void) {
  char buf[2048];
  const char *t;
  int fd = open("/proc/self/status", O_RDONLY | O_CLOEXEC);
  ssize_t n;
  if (fd < 0) return 1;
  n = read(fd, buf, sizeof buf - 1);
  close(fd);
  if (n <= 0) return 1;
  buf[n] = '\0';
  t = strstr(buf, "TracerPid:");
  return t == NULL || strtol(t + sizeof "TracerPid:" - 1, NULL, 10) != 0;
}

/* mkdir -p of `path` (absolute, under the new root); a file when `file`. */
static int jail_make(char *path, int file) {
  char *s;
  for (s = path + 1; *s != '\0'; s++) {
    if (*s != '/') continue;
    *s = '\0';
    if (mkdir(path, 0755) != 0 && errno != EEXIST) {
      *s = '/';
      return -1;
    }
    *s = '/';
  }
  if (file) {
    int fd = open(path, O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0 || close(fd) != 0) return -1;
    return 0;
  }
  return mkdir(path, 0755) != 0 && errno != EEXIST ? -1 : 0;
}

/* Binds `src` at the same path under `root`; read-only unless `rw`. A
 * remount must keep the flags the kernel locks on the source (a user
 * namespace may not clear nosuid, noexec and the like), so they are read
 * back and kept. */
static int jail_bind(const char *root, const char *src, const char *at, int file, int rw) {
  char dst[PATH_MAX];
  struct statvfs sv;
  unsigned long fl = MS_BIND | MS_REMOUNT | MS_NOSUID | MS_NODEV;
  if (snprintf(dst, sizeof dst, "%s%s", root, at) >= (int)sizeof dst) {
    errno = ENAMETOOLONG;
    return -1;
  }
  if (jail_make(dst, file) != 0) return -1;
  if (mount(src, dst, NULL, MS_BIND, NULL) != 0) return -1;
  if (statvfs(dst, &sv) != 0) return -1;
  if (!rw) fl |= MS_RDONLY;
  if (sv.f_flag & ST_NOEXEC) fl |= MS_NOEXEC;
  if (sv.f_flag & ST_NOATIME) fl |= MS_NOATIME;
  if (sv.f_flag & ST_NODIRATIME) fl |= MS_NODIRATIME;
  if (sv.f_flag & ST_RELATIME) fl |= MS_RELATIME;
  if (file && rw) fl &= ~(unsigned long)MS_NODEV; /* device nodes stay usable */
  return mount(NULL, dst, NULL, fl, NULL);
}

/* The new root: a tmpfs at dir/root holding only what is bound into it,
 * then made the root, the host's file system detached, and itself
 * read-only. The private directory's tmp/ is the job's writable /tmp. */
static int jail_mounts(const char *dir) {
  char root[PATH_MAX], tmp[PATH_MAX], at[PATH_MAX];
  size_t i;
  if (snprintf(root, sizeof root, "%s/root", dir) >= (int)sizeof root ||
      snprintf(tmp, sizeof tmp, "%s/tmp", dir) >= (int)sizeof tmp) {
    errno = ENAMETOOLONG;
    return -1;
  }
  /* Nothing done here propagates back to the host's mounts. */
  if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) != 0) return -1;
  if (mkdir(root, 0700) != 0 || mkdir(tmp, 0700) != 0) return -1;
  if (!jl.userns && chown(tmp, HD_JAIL_UID, HD_JAIL_GID) != 0) return -1;
  if (mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,nr_inodes=256,mode=0755") != 0)
    return -1;
  /* /tmp first: a module directory under the host's /tmp (a checkout in
   * /tmp, say) is then bound inside it, where the job finds it, rather
   * than hidden under it. */
  if (jail_bind(root, tmp, "/tmp", 0, 1) != 0) return -1;
  for (i = 0; i < jl.nro; i++)
    if (jail_bind(root, jl.ro[i], jl.ro[i], 0, 0) != 0) return -1;
  for (i = 0; jail_devs[i] != NULL; i++)
    if (jail_bind(root, jail_devs[i], jail_devs[i], 1, 1) != 0) return -1;
  if (jl.localtime[0] != '\0' && jail_bind(root, jl.localtime, "/etc/localtime", 1, 0) != 0)
    return -1;
  /* /proc of the new PID namespace: only this process is in it. subset=pid
   * leaves out the files about the machine (Linux 5.8; without it where
   * the kernel does not know the option). */
  if (snprintf(at, sizeof at, "%s/proc", root) >= (int)sizeof at) {
    errno = ENAMETOOLONG;
    return -1;
  }
  if (jail_make(at, 0) != 0) return -1;
  if (mount("proc", at, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "subset=pid") != 0 &&
      (errno != EINVAL ||
       mount("proc", at, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) != 0))
    return -1;
  /* pivot_root(".", ".") stacks the old root on the new one; detaching it
   * leaves the new root alone. */
  if (chdir(root) != 0 || syscall(SYS_pivot_root, ".", ".") != 0) return -1;
  if (umount2(".", MNT_DETACH) != 0 || chdir("/") != 0) return -1;
  if (mount(NULL, "/", NULL, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, NULL) != 0)
    return -1;
  return chdir("/tmp");
}

/* No capabilities, in any set, for good; no way to gain any; and, when
 * the supervisor is root, no longer root. */
static int jail_drop_privileges(void) {
  struct __user_cap_header_struct hdr = {_LINUX_CAPABILITY_VERSION_3, 0};
  struct __user_cap_data_struct data[_LINUX_CAPABILITY_U32S_3];
  int cap;
  for (cap = 0; prctl(PR_CAPBSET_READ, cap, 0, 0, 0) >= 0; cap++)
    if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0) return -1;
  if (!jl.userns) {
    gid_t g = HD_JAIL_GID;
    if (setgroups(1, &g) != 0 || setresgid(g, g, g) != 0) return -1;
    if (setresuid(HD_JAIL_UID, HD_JAIL_UID, HD_JAIL_UID) != 0) return -1;
  }
  if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0 && errno != EINVAL) return -1;
  memset(data, 0, sizeof data);
  if (syscall(SYS_capset, &hdr, data) != 0) return -1;
  if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) return -1;
  /* Not traceable, its /proc files not readable, by other processes of the
   * same user (inherited from the supervisor; a change of uid sets it too). */
  return prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
}

/* The child's whole setup; 0, or an HD_FAIL_* code with errno. */
static uint32_t jail_enter(const char *dir) {
  char self[32];
  ssize_t n;
  /* Its pid outside, read through the host's /proc before its own one
   * hides it: the worker says this one in its hello. */
  n = readlink("/proc/self", self, sizeof self - 1);
  if (n <= 0) return HD_FAIL_JAIL_MOUNT | (uint32_t)errno;
  self[n] = '\0';
  jl.outer = (pid_t)strtol(self, NULL, 10);
  if (jl.userns) {
    /* A process that is not dumpable has its /proc files owned by root, the
     * maps among them: it is dumpable just for writing them. Whoever
     * attached to it meanwhile shows as its tracer, and it gives up. */
    int rc;
    if (prctl(PR_SET_DUMPABLE, 1, 0, 0, 0) != 0) return HD_FAIL_JAIL_IDS | (uint32_t)errno;
    rc = jail_map_ids();
    if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0 || rc != 0) return HD_FAIL_JAIL_IDS | (uint32_t)errno;
    if (jail_traced()) return HD_FAIL_JAIL_IDS | EPERM;
  }
  if (sethostname("handler", 7) != 0) return HD_FAIL_JAIL_MOUNT | (uint32_t)errno;
  if (jail_mounts(dir) != 0) return HD_FAIL_JAIL_MOUNT | (uint32_t)errno;
  if (jail_drop_privileges() != 0) return HD_FAIL_JAIL_PRIVS | (uint32_t)errno;
  return 0;
}

/* ---- Fork -------------------------------------------------------------------- */

/* fork(), into new namespaces. The raw system call: the C library's clone
 * wants a new stack, and this child goes on on a copy of ours, as after a
 * fork (the supervisor has one thread). */
static pid_t jail_clone(unsigned long flags) {
  return (pid_t)syscall(SYS_clone, flags | SIGCHLD, NULL, NULL, NULL, NULL);
}

pid_t hd_jail_fork(const char *dir, uint32_t *why) {
  unsigned long flags = CLONE_NEWPID | CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWNET | CLONE_NEWUTS |
                        CLONE_NEWCGROUP;
  int p[2], st;
  uint32_t code = 0;
  pid_t pid;
  ssize_t n;
  struct pollfd pf;
  *why = 0;
  if (jl.refuse) {
    *why = HD_FAIL_JAIL_NS | EPERM;
    return -1;
  }
  if (jl.userns) flags |= CLONE_NEWUSER;
  if (pipe2(p, O_CLOEXEC) != 0) {
    *why = HD_FAIL_JAIL_NS | (uint32_t)errno;
    return -1;
  }
  pid = jail_clone(flags);
  if (pid == 0) {
    /* Dies with the supervisor, armed first: a supervisor already gone
     * shows as the pipe's closed end below (SIGPIPE). */
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    close(p[0]);
    code = jail_enter(dir);
    n = write(p[1], &code, sizeof code);
    close(p[1]);
    if (code != 0 || n != (ssize_t)sizeof code) _exit(HD_EXIT_JAILED);
    return 0;
  }
  close(p[1]);
  if (pid < 0) {
    /* EPERM, ENOSPC, EUSERS, EINVAL: namespaces are not to be had here. */
    *why = HD_FAIL_JAIL_NS | (uint32_t)errno;
    close(p[0]);
    return -1;
  }
  pf.fd = p[0];
  pf.events = POLLIN;
  do {
    n = poll(&pf, 1, JAIL_READY_MS);
  } while (n < 0 && errno == EINTR);
  if (n > 0) {
    do {
      n = read(p[0], &code, sizeof code);
    } while (n < 0 && errno == EINTR);
  }
  close(p[0]);
  if (n == (ssize_t)sizeof code && code == 0) return pid;
  /* It failed (and exits), or never said: either way it goes. */
  kill(pid, SIGKILL);
  while (waitpid(pid, &st, 0) < 0 && errno == EINTR) {
  }
  *why = n == (ssize_t)sizeof code ? code : HD_FAIL_JAIL_NS | (n == 0 ? ECHILD : ETIMEDOUT);
  return -1;
}
