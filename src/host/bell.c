/* bell.c: a doorbell for hosts that can wait only on sockets they connect
 * themselves (nginx's cosockets): a thread watches a descriptor and, once
 * the host has armed it, writes one byte to a unix socket the host
 * connected when the descriptor becomes readable. */
#include "bell.h"

#include <dirent.h>
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "queue.h"

#define BELL_STACK (64 * 1024)

struct hd_bell {
  int watch;          /* the descriptor watched (not ours) */
  int listen_fd;      /* the bound socket */
  int stop_fd;        /* an eventfd: the thread ends when it is readable */
  pthread_t thread;
  char dir[96];       /* the private directory */
  char path[112];     /* the socket in it */
  hd_queue node;      /* every bell of the process */
};

/* Every bell, so a forked child closes its copies of their descriptors at
 * the fork itself. */
static hd_queue bell_all = {&bell_all, &bell_all};
static pthread_mutex_t bell_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_once_t bell_once = PTHREAD_ONCE_INIT;
static int bell_fork_ok;

static void bell_fork_prepare(void) {
  pthread_mutex_lock(&bell_lock);
}

static void bell_fork_parent(void) {
  pthread_mutex_unlock(&bell_lock);
}

static void bell_fork_child(void) {
  hd_queue *q;
  for (q = bell_all.next; q != &bell_all; q = q->next) {
    hd_bell *b = HD_QUEUE_DATA(q, hd_bell, node);
    close(b->listen_fd);
    close(b->stop_fd);
    b->listen_fd = b->stop_fd = -1;
  }
  /* The child's bells are forsaken, never listed again. */
  hd_queue_init(&bell_all);
  pthread_mutex_unlock(&bell_lock);
}

static void bell_fork_init(void) {
  bell_fork_ok = pthread_atfork(bell_fork_prepare, bell_fork_parent, bell_fork_child) == 0;
}

static void bell_close(int *fd) {
  if (*fd >= 0) close(*fd);
  *fd = -1;
}

/* The thread: accepts the host's connection, reads its arming bytes, and
 * rings once per arming when the watched descriptor is readable. */
static void *bell_main(void *arg) {
  hd_bell *b = arg;
  int conn = -1, armed = 0;
  for (;;) {
    struct pollfd p[4];
    int n = 0, ic = -1, iw = -1;
    p[n].fd = b->stop_fd;
    p[n++].events = POLLIN;
    p[n].fd = b->listen_fd;
    p[n++].events = POLLIN;
    if (conn >= 0) {
      ic = n;
      p[n].fd = conn;
      p[n++].events = POLLIN;
    }
    if (armed) {
      iw = n;
      p[n].fd = b->watch;
      p[n++].events = POLLIN;
    }
    if (poll(p, (nfds_t)n, -1) < 0) {
      if (errno == EINTR) continue;
      break;
    }
    if (p[0].revents) break;
    if (p[1].revents & POLLIN) {
      /* Every connection waiting, the newest kept: the host connects anew
       * each time it starts waiting, and may have closed the ones before
       * (unaccepted, they would fill the backlog and its next connect
       * would fail). */
      int c, got = 0;
      while ((c = accept4(b->listen_fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK)) >= 0) {
        bell_close(&conn);
        conn = c;
        armed = 0;
        got = 1;
      }
      if (got) continue;
    }
    if (ic >= 0 && p[ic].revents) {
      char buf[64];
      ssize_t r = read(conn, buf, sizeof buf);
      if (r > 0) {
        armed = 1;
      } else if (r == 0 || (errno != EAGAIN && errno != EINTR)) {
        bell_close(&conn);
        armed = 0;
      }
      continue;
    }
    if (iw >= 0 && (p[iw].revents & (POLLIN | POLLERR | POLLHUP))) {
      ssize_t w;
      do w = send(conn, "w", 1, MSG_NOSIGNAL);
      while (w < 0 && errno == EINTR);
      if (w < 0 && errno != EAGAIN) bell_close(&conn);
      armed = 0;
    }
  }
  bell_close(&conn);
  return NULL;
}

static const char *bell_tmpdir(void) {
  const char *t = getenv("TMPDIR");
  return t != NULL && t[0] == '/' ? t : "/tmp";
}

/* The directories of bells whose process died without removing them (a
 * host killed with SIGKILL): ours by owner, and named for a pid that no
 * longer exists. */
static void bell_sweep(const char *tmp) {
  DIR *d = opendir(tmp);
  struct dirent *e;
  if (d == NULL) return;
  while ((e = readdir(d)) != NULL) {
    char path[256], sock[272];
    struct stat st;
    long pid;
    char *end;
    if (strncmp(e->d_name, "handler-bell-", 13) != 0) continue;
    pid = strtol(e->d_name + 13, &end, 10);
    if (pid <= 0 || *end != '-') continue;
    if (kill((pid_t)pid, 0) == 0 || errno != ESRCH) continue;
    if (snprintf(path, sizeof path, "%s/%s", tmp, e->d_name) >= (int)sizeof path) continue;
    if (lstat(path, &st) != 0 || !S_ISDIR(st.st_mode) || st.st_uid != geteuid()) continue;
    snprintf(sock, sizeof sock, "%s/s", path);
    unlink(sock);
    rmdir(path);
  }
  closedir(d);
}

hd_bell *hd_bell_new(int fd, char *err, size_t errlen) {
  struct sockaddr_un sa;
  sigset_t all, old;
  pthread_attr_t attr;
  hd_bell *b;
  int rc;
  pthread_once(&bell_once, bell_fork_init);
  if (!bell_fork_ok) {
    snprintf(err, errlen, "cannot register a fork handler");
    return NULL;
  }
  b = calloc(1, sizeof *b);
  if (b == NULL) {
    snprintf(err, errlen, "out of memory");
    return NULL;
  }
  b->watch = fd;
  b->listen_fd = b->stop_fd = -1;
  bell_sweep(bell_tmpdir());
  if (snprintf(b->dir, sizeof b->dir, "%s/handler-bell-%ld-XXXXXX", bell_tmpdir(),
               (long)getpid()) >=
          (int)sizeof b->dir ||
      snprintf(b->path, sizeof b->path, "%s/s", b->dir) >= (int)sizeof sa.sun_path) {
    snprintf(err, errlen, "TMPDIR is too long for a unix socket's path");
    free(b);
    return NULL;
  }
  if (mkdtemp(b->dir) == NULL) {
    snprintf(err, errlen, "cannot make a directory in %s: %s", bell_tmpdir(), strerror(errno));
    free(b);
    return NULL;
  }
  snprintf(b->path, sizeof b->path, "%s/s", b->dir);
  memset(&sa, 0, sizeof sa);
  sa.sun_family = AF_UNIX;
  memcpy(sa.sun_path, b->path, strlen(b->path) + 1);
  b->listen_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  b->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (b->listen_fd < 0 || b->stop_fd < 0 ||
      bind(b->listen_fd, (struct sockaddr *)&sa, sizeof sa) != 0 || listen(b->listen_fd, 64) != 0) {
    snprintf(err, errlen, "cannot listen on %s: %s", b->path, strerror(errno));
    goto fail;
  }
  /* The thread takes no signal: the host's handlers run on its own
   * threads, as they expect. */
  sigfillset(&all);
  pthread_attr_init(&attr);
  pthread_attr_setstacksize(&attr, BELL_STACK);
  pthread_sigmask(SIG_SETMASK, &all, &old);
  rc = pthread_create(&b->thread, &attr, bell_main, b);
  pthread_sigmask(SIG_SETMASK, &old, NULL);
  pthread_attr_destroy(&attr);
  if (rc != 0) {
    snprintf(err, errlen, "cannot start a thread: %s", strerror(rc));
    goto fail;
  }
  pthread_mutex_lock(&bell_lock);
  hd_queue_insert_tail(&bell_all, &b->node);
  pthread_mutex_unlock(&bell_lock);
  return b;
fail:
  bell_close(&b->listen_fd);
  bell_close(&b->stop_fd);
  unlink(b->path);
  rmdir(b->dir);
  free(b);
  return NULL;
}

const char *hd_bell_path(const hd_bell *b) {
  return b->path;
}

void hd_bell_free(hd_bell *b) {
  uint64_t one = 1;
  ssize_t w;
  pthread_mutex_lock(&bell_lock);
  hd_queue_remove(&b->node);
  pthread_mutex_unlock(&bell_lock);
  do w = write(b->stop_fd, &one, sizeof one);
  while (w < 0 && errno == EINTR);
  pthread_join(b->thread, NULL);
  bell_close(&b->listen_fd);
  bell_close(&b->stop_fd);
  unlink(b->path);
  rmdir(b->dir);
  free(b);
}

void hd_bell_forsake(hd_bell *b) {
  free(b);
}
