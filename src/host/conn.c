/* conn.c: the host's connection to one worker process: its protocol pipes,
 * the frames on them, and the checks every reply passes; and the pipes that
 * are its stdout and stderr, read here and passed on to the host's. */
#include "conn.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "codec.h"
#include "wire.h"

/* An idle worker's reply pipe is looked at before it gets a job only once
 * its last reply is this old: a worker that just replied and ran no job
 * since has nothing to say, and the look is a system call on every round
 * trip. The time of the last bytes is the loop's, in whole milliseconds
 * (no clock read per reply): this is 1 to 2 ms of real time. */
#define CONN_FIT_NS 2000000u
/* The protocol pipes keep the kernel's default size, which per-user pipe
 * quotas count whether it is used or not. A frame bigger than that grows
 * its pipe to CONN_PIPE_BIG until the job's reply is in, so big transfers
 * move in a few large steps rather than many small ones. */
#define CONN_PIPE_SMALL 65536
#define CONN_PIPE_BIG (1 << 20)
enum { CONN_BIG_REPLY = 1, CONN_BIG_JOB = 2 };
/* Bytes asked of each read, and the size from which a read buffer is worth
 * taking from the loop's warm spare. */
#define CONN_READ 65536
/* A read buffer larger than this goes back to the loop after a reply. */
#define CONN_KEEP (1u << 20)
/* Output is read this many bytes at a time (on the stack), and at most
 * CONN_OUT_TURN bytes of it per wake-up of the loop, so a worker that
 * writes without end cannot hold the loop. */
#define CONN_OUT_CHUNK 16384
#define CONN_OUT_TURN (256u * 1024)
/* The worker's stdout and stderr. */
#define CONN_OUTS 2

/* Our read end of one of the worker's output pipes. */
typedef struct conn_out {
  hd_conn *conn;
  int fd;             /* -1 once closed */
  int which;          /* 0: stdout, 1: stderr (hd_loop_out_fd) */
  uv_poll_t poll;
  int poll_open;      /* initialised, and uv_close not yet called */
  int more;           /* the last read stopped short of EAGAIN */
} conn_out;

struct hd_conn {
  hd_loop *loop;
  hd_conn_cbs cbs;
  void *ud;
  int fd;             /* the reply pipe's read end, -1 once closed */
  int job_fd;         /* the job pipe's write end, -1 once closed */
  int job_keep;       /* its read end, kept so that a write never raises
                       * SIGPIPE in the host; never read */
  uv_poll_t poll;     /* fd, readable */
  int poll_open;      /* the handle is initialised and not yet closed */
  uv_poll_t wpoll;    /* job_fd, writable while a frame waits to go */
  int wpoll_open;     /* initialised, and uv_close not yet called */
  int wpoll_on;       /* started */
  uint64_t replied_at;/* the loop's time when bytes last came, in ns */
  int big;            /* CONN_BIG_*: pipes grown for the job in flight */
  int spliced;        /* the job in flight's frame went by vmsplice */
  int job_unread;     /* at EOF: the worker had read nothing of the job,
                       * which it got without the idle look (unchecked) */
  int unchecked;      /* the last hd_conn_fit skipped the look */
  int no_splice;      /* vmsplice was refused: frames are copied */
  int handles;        /* handles initialised and not yet closed */
  int orphan;         /* hd_conn_new failed: freed, not reported, once closed */
  int check_flags;    /* hd_validate_flags for replies: HD_VAL_NO_NAMES when sandboxed */
  conn_out out[CONN_OUTS];
  /* A reply read in the loop's poll phase is handed up in its check phase,
   * once every output pipe that was readable with it has been read. */
  uv_check_t check;
  int check_open;     /* initialised, and uv_close not yet called */
  int in_poll;        /* reading from the reply pipe's poll callback */
  int has_pending;    /* a checked reply waits in `in` */
  hd_frame pending;
  int closing;        /* no more I/O */
  pid_t pid;          /* from the hello */
  int hello;          /* the hello arrived */
  uint64_t id;        /* the job awaited, while `frame` is set */
  double max_result;
  const hd_buf *frame;/* the job frame being sent, NULL when idle */
  size_t out_off;     /* bytes of it sent */
  hd_buf in;          /* bytes read so far */
  size_t in_off;      /* bytes of `in` taken already: frames start there */
  int has_stats;      /* the job's STATS frame came */
  uint64_t cpu_ns, heap_peak, wall_ns;
  uint32_t replies;   /* replies still due for the job (one per item) */
  hd_buf item;        /* a copy of the item's reply being handed up */
  int delivering;     /* handing up a reply that more follow */
};

/* The bytes read and not yet taken. Frames are taken by moving in_off, not
 * the bytes: a read brings many item replies at once, and moving what
 * follows each one would cost the square of their number. */
static const char *conn_unread(const hd_conn *c) {
  return c->in.data + c->in_off;
}

static size_t conn_unread_len(const hd_conn *c) {
  return c->in.len - c->in_off;
}

static void conn_take(hd_conn *c, size_t n) {
  c->in_off += n;
  if (c->in_off == c->in.len) c->in.len = c->in_off = 0;
}

/* Moves what is not taken to the start of `in`, before a read or before
 * it grows: only a part of one frame is ever moved. */
static void conn_compact(hd_conn *c) {
  if (c->in_off == 0) return;
  hd_buf_consume(&c->in, c->in_off);
  c->in_off = 0;
}

static void conn_poll_cb(uv_poll_t *h, int status, int events);
static void conn_out_cb(uv_poll_t *h, int status, int events);
static void conn_check_cb(uv_check_t *h);

static int conn_nonblock(int fd) {
  int fl = fcntl(fd, F_GETFL);
  return fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) != 0 ? -1 : 0;
}

/* Moves *fd above 2: in a host that closed its standard descriptors, a new
 * one takes their place, and job output passed on to "stdout" would land
 * in our own pipe. Returns -1 (with *fd closed) when it cannot. */
static int conn_above_std(int *fd) {
  int moved;
  if (*fd > STDERR_FILENO) return 0;
  moved = fcntl(*fd, F_DUPFD_CLOEXEC, STDERR_FILENO + 1);
  close(*fd);
  *fd = moved;
  return moved < 0 ? -1 : 0;
}

static void conn_close_fds(int *fds, int n) {
  int k;
  for (k = 0; k < n; k++) {
    if (fds[k] >= 0) close(fds[k]);
    fds[k] = -1;
  }
}

hd_conn *hd_conn_new(hd_loop *l, const hd_conn_cbs *cbs, void *ud, int peer[HD_SPAWN_FDS],
                     char *err, size_t errlen) {
  /* Ours: the read ends of the reply and output pipes, the job pipe's write
   * end; the worker's: peer. Every pipe's other end is in the other array
   * at the same index. */
  int mine[HD_SPAWN_FDS] = {-1, -1, -1, -1}, theirs[HD_SPAWN_FDS] = {-1, -1, -1, -1};
  int pp[2], k;
  hd_conn *c = calloc(1, sizeof *c);
  if (c == NULL) {
    snprintf(err, errlen, "out of memory");
    return NULL;
  }
  for (k = 0; k < HD_SPAWN_FDS; k++) {
    if (pipe2(pp, O_CLOEXEC) != 0) {
      snprintf(err, errlen, "pipe: %s", strerror(errno));
      goto fail;
    }
    mine[k] = k == HD_SPAWN_FD_JOB ? pp[1] : pp[0];
    theirs[k] = k == HD_SPAWN_FD_JOB ? pp[0] : pp[1];
  }
  for (k = 0; k < HD_SPAWN_FDS; k++) {
    if (conn_above_std(&mine[k]) != 0 || conn_above_std(&theirs[k]) != 0 ||
        conn_nonblock(mine[k]) != 0) {
      snprintf(err, errlen, "fcntl: %s", strerror(errno));
      goto fail;
    }
  }
  c->job_keep = fcntl(theirs[HD_SPAWN_FD_JOB], F_DUPFD_CLOEXEC, STDERR_FILENO + 1);
  if (c->job_keep < 0) {
    snprintf(err, errlen, "fcntl: %s", strerror(errno));
    goto fail;
  }
  if (uv_poll_init(hd_loop_uv(l), &c->poll, mine[HD_SPAWN_FD_REPLY]) != 0) {
    snprintf(err, errlen, "cannot watch a pipe");
    close(c->job_keep);
    goto fail;
  }
  /* Cannot fail (a check handle only joins the loop's list). */
  uv_check_init(hd_loop_uv(l), &c->check);
  c->check.data = c;
  c->check_open = 1;
  c->loop = l;
  c->cbs = *cbs;
  c->ud = ud;
  c->fd = mine[HD_SPAWN_FD_REPLY];
  c->job_fd = mine[HD_SPAWN_FD_JOB];
  c->poll.data = c;
  c->poll_open = 1;
  c->handles = 2;
  for (k = 0; k < CONN_OUTS; k++) {
    conn_out *o = &c->out[k];
    o->conn = c;
    o->fd = mine[HD_SPAWN_FD_STDOUT + k];
    o->which = k;
  }
  /* The job pipe is watched only while a frame waits for room in it. The
   * output is watched from the start, job or not: a worker blocked on a
   * full pipe must not wait for a job to be sent. */
  if (uv_poll_init(hd_loop_uv(l), &c->wpoll, c->job_fd) != 0) {
    c->job_fd = -1;
    close(mine[HD_SPAWN_FD_JOB]);
    goto orphan;
  }
  c->wpoll.data = c;
  c->wpoll_open = 1;
  c->handles++;
  for (k = 0; k < CONN_OUTS; k++) {
    conn_out *o = &c->out[k];
    if (uv_poll_init(hd_loop_uv(l), &o->poll, o->fd) != 0) goto orphan;
    o->poll.data = o;
    o->poll_open = 1;
    c->handles++;
    uv_poll_start(&o->poll, UV_READABLE, conn_out_cb);
  }
  uv_poll_start(&c->poll, UV_READABLE, conn_poll_cb);
  memcpy(peer, theirs, sizeof theirs);
  return c;
orphan:
  snprintf(err, errlen, "cannot watch a pipe");
  conn_close_fds(theirs, HD_SPAWN_FDS);
  /* Handles already made must be closed by the loop: the connection frees
   * itself then. */
  c->orphan = 1;
  hd_conn_close(c);
  return NULL;
fail:
  conn_close_fds(mine, HD_SPAWN_FDS);
  conn_close_fds(theirs, HD_SPAWN_FDS);
  free(c);
  return NULL;
}

static void conn_wpoll_cb(uv_poll_t *h, int status, int events);
static void conn_read(hd_conn *c);

/* The protocol pipe CONN_BIG_REPLY or CONN_BIG_JOB names: our end of it. */
static int conn_pipe_fd(const hd_conn *c, int which) {
  return which == CONN_BIG_REPLY ? c->fd : c->job_fd;
}

/* Grows a protocol pipe for a big frame (best effort: a quota may refuse),
 * or gives the room back. */
static void conn_pipe_grow(hd_conn *c, int which) {
  int fd = conn_pipe_fd(c, which);
  if ((c->big & which) || fd < 0) return;
  if (fcntl(fd, F_SETPIPE_SZ, CONN_PIPE_BIG) >= 0) c->big |= which;
}

static void conn_pipes_shrink(hd_conn *c) {
  int which;
  for (which = CONN_BIG_REPLY; which <= CONN_BIG_JOB; which <<= 1) {
    int fd = conn_pipe_fd(c, which);
    /* Fails only while the pipe holds more than fits: it stays big. */
    if ((c->big & which) && fd >= 0 && fcntl(fd, F_SETPIPE_SZ, CONN_PIPE_SMALL) >= 0)
      c->big &= ~which;
  }
}

/* The job pipe is watched while a frame waits for room in it. */
static void conn_update_poll(hd_conn *c) {
  int on;
  if (c->closing || !c->wpoll_open) return;
  on = c->frame && c->out_off < c->frame->len;
  if (on == c->wpoll_on) return;
  c->wpoll_on = on;
  if (on) uv_poll_start(&c->wpoll, UV_WRITABLE, conn_wpoll_cb);
  else uv_poll_stop(&c->wpoll);
}

/* One of the connection's handles is closed; after the last, the
 * connection is closed for good. */
static void conn_handle_closed(hd_conn *c) {
  if (--c->handles > 0) return;
  if (c->orphan) hd_conn_free(c);
  else c->cbs.closed(c, c->ud);
}

static void conn_close_cb(uv_handle_t *h) {
  hd_conn *c = h->data;
  c->poll_open = 0;
  conn_handle_closed(c);
}

static void conn_out_close_cb(uv_handle_t *h) {
  conn_out *o = h->data;
  conn_handle_closed(o->conn);
}

static void conn_check_close_cb(uv_handle_t *h) {
  conn_handle_closed(h->data);
}

static void conn_wpoll_close_cb(uv_handle_t *h) {
  conn_handle_closed(h->data);
}

/* What a poll of fd for input says now (its revents; 0: nothing). */
static short conn_poll_now(int fd) {
  struct pollfd pf;
  pf.fd = fd;
  pf.events = POLLIN;
  pf.revents = 0;
  return poll(&pf, 1, 0) > 0 ? pf.revents : 0;
}

/* A job frame went by vmsplice, so the job pipe holds the caller's pages,
 * which the caller may reuse once the job has ended. A worker that has not
 * read them all yet and is still being killed must not read them then:
 * with the job pipe's write end closed, what is left is taken out through
 * the read end kept here, as long as a poll says there is some. */
static void conn_job_pipe_empty(hd_conn *c) {
  char buf[CONN_OUT_CHUNK];
  if (c->job_fd >= 0) close(c->job_fd);
  c->job_fd = -1;
  while (c->job_keep >= 0 && (conn_poll_now(c->job_keep) & POLLIN)) {
    ssize_t r = read(c->job_keep, buf, sizeof buf);
    if (r > 0 || (r < 0 && errno == EINTR)) continue;
    break;
  }
  c->spliced = 0;
}

/* The protocol pipes' descriptors. */
static void conn_close_protocol(hd_conn *c) {
  int *fds[3] = {&c->fd, &c->job_fd, &c->job_keep};
  int k;
  for (k = 0; k < 3; k++) {
    if (*fds[k] >= 0) close(*fds[k]);
    *fds[k] = -1;
  }
}

/* Closes one output pipe: its descriptor at once, its handle from the loop. */
static void conn_out_close(conn_out *o) {
  if (o->poll_open) {
    uv_poll_stop(&o->poll);
    o->poll_open = 0;
    uv_close((uv_handle_t *)&o->poll, conn_out_close_cb);
  }
  if (o->fd >= 0) close(o->fd);
  o->fd = -1;
}

void hd_conn_close(hd_conn *c) {
  int k;
  if (c->closing) return;
  c->closing = 1;
  c->frame = NULL;
  uv_poll_stop(&c->poll);
  if (c->wpoll_open) {
    uv_poll_stop(&c->wpoll);
    c->wpoll_open = 0;
    uv_close((uv_handle_t *)&c->wpoll, conn_wpoll_close_cb);
  }
  /* The descriptors go at once (a stopped poll no longer watches them), so
   * the host's descriptor count does not wait for the loop to run again. */
  if (c->spliced) conn_job_pipe_empty(c);
  conn_close_protocol(c);
  for (k = 0; k < CONN_OUTS; k++) conn_out_close(&c->out[k]);
  c->has_pending = 0;
  if (c->check_open) {
    uv_check_stop(&c->check);
    c->check_open = 0;
    uv_close((uv_handle_t *)&c->check, conn_check_close_cb);
  }
  uv_close((uv_handle_t *)&c->poll, conn_close_cb);
}

void hd_conn_refuse_names(hd_conn *c) {
  c->check_flags |= HD_VAL_NO_NAMES;
}

void hd_conn_forsake(hd_conn *c) {
  int k;
  c->closing = 1;
  c->frame = NULL;
  conn_close_protocol(c);
  for (k = 0; k < CONN_OUTS; k++) {
    if (c->out[k].fd >= 0) close(c->out[k].fd);
    c->out[k].fd = -1;
  }
}

void hd_conn_free(hd_conn *c) {
  hd_buf_free(&c->in);
  hd_buf_free(&c->item);
  free(c);
}

pid_t hd_conn_pid(const hd_conn *c) {
  return c->pid;
}

int hd_conn_open(const hd_conn *c) {
  return c->fd >= 0;
}

int hd_conn_fds(const hd_conn *c) {
  int k, n = (c->fd >= 0) + (c->job_fd >= 0) + (c->job_keep >= 0);
  for (k = 0; k < CONN_OUTS; k++) n += c->out[k].fd >= 0;
  return n;
}

/* Writes n bytes of a worker's output to the host's stdout or stderr (fd,
 * a copy: see hd_loop_out_fd), as the worker's own write to it would have:
 * blocking if fd is, and dropping
 * what it does not take (EAGAIN, EPIPE). A closed reader must not kill the
 * host: SIGPIPE is blocked around the write, and one it raised is taken
 * back unless it was pending already. */
static void conn_forward(int fd, const char *p, size_t n) {
  sigset_t pipe_set, old, pending;
  int had;
  if (n == 0 || fd < 0) return;
  sigemptyset(&pipe_set);
  sigaddset(&pipe_set, SIGPIPE);
  if (pthread_sigmask(SIG_BLOCK, &pipe_set, &old) != 0) return;
  had = sigpending(&pending) == 0 && sigismember(&pending, SIGPIPE) == 1;
  while (n > 0) {
    ssize_t r = write(fd, p, n);
    if (r > 0) {
      p += r;
      n -= (size_t)r;
      continue;
    }
    if (r < 0 && errno == EINTR) continue;
    if (r < 0 && errno == EPIPE && !had) {
      struct timespec zero = {0, 0};
      while (sigtimedwait(&pipe_set, NULL, &zero) < 0 && errno == EINTR) {
      }
    }
    break;
  }
  pthread_sigmask(SIG_SETMASK, &old, NULL);
}

/* Reads at most `max` bytes of output from o, now: each read is reported,
 * and what the layer above lets through goes on. At EOF (no writer is
 * left) the pipe is closed. */
static void conn_out_read(conn_out *o, size_t max) {
  hd_conn *c = o->conn;
  char buf[CONN_OUT_CHUNK];
  while (max > 0 && o->fd >= 0) {
    ssize_t r = read(o->fd, buf, max < sizeof buf ? max : sizeof buf);
    if (r > 0) {
      size_t pass = c->cbs.output(c, c->ud, o->which, buf, (size_t)r);
      max -= (size_t)r;
      conn_forward(hd_loop_out_fd(c->loop, o->which), buf, pass < (size_t)r ? pass : (size_t)r);
      continue;
    }
    if (r < 0 && errno == EINTR) continue;
    if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      o->more = 0;
      return;
    }
    conn_out_close(o);
    return;
  }
  o->more = o->fd >= 0;
}

static void conn_out_cb(uv_poll_t *h, int status, int events) {
  conn_out *o = h->data;
  (void)status;
  (void)events;
  /* An error or a hang-up shows in the read. */
  conn_out_read(o, CONN_OUT_TURN);
}

/* Reads the output already in the pipes, and no more: what the worker
 * wrote before the reply (or the exit) now being handled. One poll when
 * there is none. */
static void conn_out_drain(hd_conn *c) {
  struct pollfd pf[CONN_OUTS];
  conn_out *os[CONN_OUTS];
  int k, n = 0;
  for (k = 0; k < CONN_OUTS; k++) {
    if (c->out[k].fd < 0) continue;
    pf[n].fd = c->out[k].fd;
    pf[n].events = POLLIN;
    pf[n].revents = 0;
    os[n++] = &c->out[k];
  }
  if (n == 0 || poll(pf, (nfds_t)n, 0) <= 0) return;
  for (k = 0; k < n; k++) {
    int avail = 0;
    /* Reading one pipe may have closed the connection. */
    if (!(pf[k].revents & POLLIN) || os[k]->fd < 0) continue;
    if (ioctl(os[k]->fd, FIONREAD, &avail) != 0) avail = CONN_OUT_CHUNK;
    if (avail > 0) conn_out_read(os[k], (size_t)avail);
  }
}

static void conn_fail(hd_conn *c, int kind, const char *why) {
  hd_conn_close(c);
  c->cbs.fail(c, c->ud, kind, why);
}

/* Whether the worker read nothing of the job in flight: every byte
 * written is still in the job pipe, which the host holds a read end of. */
static int conn_job_unread(const hd_conn *c) {
  int n = 0;
  if (c->frame == NULL || c->out_off == 0 || c->job_keep < 0) return 0;
  if (ioctl(c->job_keep, FIONREAD, &n) != 0 || n < 0) return 0;
  return (size_t)n == c->out_off;
}

static void conn_eof(hd_conn *c) {
  /* What the worker wrote before it went is still its job's. */
  conn_out_drain(c);
  if (c->closing) return;
  /* Only as the loop polls: a drain from a timer's callback, or from the
   * report of a lost supervisor, is ending the job anyway. */
  c->job_unread = c->in_poll && c->unchecked && conn_job_unread(c);
  hd_conn_close(c);
  c->cbs.eof(c, c->ud);
}

int hd_conn_job_unread(const hd_conn *c) {
  return c->job_unread;
}

/* Writes as much of the job frame as the job pipe takes now. The host
 * holds a read end of that pipe itself, so the write cannot raise SIGPIPE;
 * a worker that died shows as EOF on its reply pipe. More than a pipe's
 * default size goes by vmsplice: the pipe takes the frame's pages, not a
 * copy (a copy into a pipe moves about 2.7 GB/s here, vmsplice 10). The
 * caller keeps the frame unchanged until the job's reply, by which time
 * the worker has read it all; a job that ends otherwise ends its worker. */
static void conn_write(hd_conn *c) {
  while (c->frame && c->out_off < c->frame->len && c->job_fd >= 0) {
    const char *p = c->frame->data + c->out_off;
    size_t n = c->frame->len - c->out_off;
    ssize_t r = -1;
    if (n > CONN_PIPE_SMALL && !c->no_splice) {
      struct iovec iov;
      iov.iov_base = (void *)p;
      iov.iov_len = n;
      r = vmsplice(c->job_fd, &iov, 1, SPLICE_F_NONBLOCK);
      if (r > 0) c->spliced = 1;
      /* Refused (memory, say): the rest is copied. */
      if (r < 0 && errno != EINTR && errno != EAGAIN && errno != EWOULDBLOCK) c->no_splice = 1;
    }
    if (r < 0 && (n <= CONN_PIPE_SMALL || c->no_splice)) r = write(c->job_fd, p, n);
    if (r > 0) {
      c->out_off += (size_t)r;
      continue;
    }
    if (r < 0 && errno == EINTR) continue;
    if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
    /* The worker is gone: its exit report says why. */
    c->out_off = c->frame->len;
  }
}

void hd_conn_send(hd_conn *c, uint64_t id, double max_result, const hd_buf *frame) {
  c->id = id;
  c->has_stats = 0;
  c->max_result = max_result;
  c->frame = frame;
  c->replies = 1;
  c->out_off = 0;
  c->in.len = c->in_off = 0;
  if (frame->len > CONN_PIPE_SMALL) conn_pipe_grow(c, CONN_BIG_JOB);
  conn_write(c);
  conn_update_poll(c);
}

void hd_conn_expect(hd_conn *c, uint32_t replies) {
  c->replies = replies > 0 ? replies : 1;
}

int hd_conn_stats(const hd_conn *c, uint64_t *cpu_ns, uint64_t *heap_peak, uint64_t *wall_ns) {
  if (!c->has_stats) return 0;
  *cpu_ns = c->cpu_ns;
  *heap_peak = c->heap_peak;
  *wall_ns = c->wall_ns;
  return 1;
}

int hd_conn_fit(hd_conn *c, uint64_t now) {
  if (c->closing) return 0;
  c->unchecked = now - c->replied_at < CONN_FIT_NS;
  if (c->unchecked || conn_poll_now(c->fd) == 0) return 1;
  /* Bytes are a breach (conn_parse says so for an idle connection); EOF
   * means it is dying. */
  conn_read(c);
  return 0;
}

/* Grows the read buffer toward the whole frame as bytes arrive, never
 * ahead of them; a warm spare that holds what has come so far is taken
 * instead. */
static void conn_grow(hd_conn *c, size_t whole) {
  size_t want;
  if (whole > CONN_PIPE_SMALL) conn_pipe_grow(c, CONN_BIG_REPLY);
  conn_compact(c);
  want = c->in.len * 2;
  if (want > whole) want = whole;
  if (want > c->in.cap && want > CONN_READ) {
    hd_buf cur = c->in;
    c->in.data = NULL;
    c->in.len = c->in.cap = 0;
    if (hd_loop_take_buf(c->loop, &c->in, whole)) {
      memcpy(c->in.data, cur.data, cur.len);
      c->in.len = cur.len;
      hd_buf_free(&cur);
    } else {
      c->in = cur;
    }
  }
  if (want > c->in.cap) hd_buf_reserve(&c->in, want - c->in.len);
}

/* Hands up the checked reply waiting in `in`. The worker flushes its output
 * before it replies, so output in the pipes now is this job's and counts
 * before its result does. From the check phase (`exact` 0) the pipes need
 * no look: the poll phase that brought the reply brought every pipe that
 * was readable with it (level-triggered epoll reports all ready
 * descriptors, and the output was written first), and their callbacks have
 * run. Elsewhere, and when a pipe's read stopped short, they are drained
 * here. The read buffer is handed to the callback, which may keep it or
 * send the next job. */
static int conn_parse(hd_conn *c);
static void conn_deliver(hd_conn *c, int exact);

/* Hands up a reply that more replies of the same job follow (an item's):
 * a copy of its frame, taken out of `in`, where the next ones may already
 * be. Then looks at what is left, handing up each further reply in turn. */
static void conn_deliver_item(hd_conn *c) {
  do {
    hd_frame f = c->pending;
    size_t whole = HD_FRAME_HEADER + (size_t)f.len;
    hd_buf *one = &c->item;
    c->has_pending = 0;
    one->len = 0;
    if (hd_buf_append(one, conn_unread(c), whole) != 0) {
      conn_fail(c, HD_CONN_BREACH, "out of memory reading a reply");
      return;
    }
    conn_take(c, whole);
    c->replies--;
    c->delivering = 1;
    c->cbs.reply(c, c->ud, one, HD_FRAME_HEADER, f.len, 0);
    c->has_stats = 0;
    /* Kept for the next item, unless it grew big. */
    if (one->cap > CONN_KEEP) hd_buf_free(one);
    if (!c->closing) conn_parse(c);
    c->delivering = 0;
  } while (!c->closing && c->has_pending && c->replies > 1 &&
           c->pending.type == HD_FRAME_REPLY);
  if (!c->closing && c->has_pending) conn_deliver(c, 1);
}

static void conn_deliver(hd_conn *c, int exact) {
  hd_frame f = c->pending;
  hd_buf in;
  size_t at;
  int k;
  uv_check_stop(&c->check);
  for (k = 0; k < CONN_OUTS; k++) exact |= c->out[k].more;
  if (exact) conn_out_drain(c);
  if (c->closing) return;
  if (c->replies > 1 && f.type == HD_FRAME_REPLY) {
    conn_deliver_item(c);
    return;
  }
  c->has_pending = 0;
  c->frame = NULL;
  c->replies = 0;
  /* The worker has read the whole frame: it replied. */
  c->spliced = 0;
  if (c->big) conn_pipes_shrink(c);
  /* The reply is the last frame (conn_reply): the buffer goes up with it,
   * wherever it starts. */
  at = c->in_off;
  c->in_off = 0;
  in = c->in;
  c->in.data = NULL;
  c->in.len = c->in.cap = 0;
  c->cbs.reply(c, c->ud, &in, at + HD_FRAME_HEADER, f.len, f.type == HD_FRAME_REPLY_LAST);
  /* What the callee left of the buffer serves the next reply. */
  in.len = 0;
  if (c->in.data == NULL && in.cap <= CONN_KEEP) {
    c->in = in;
  } else {
    hd_loop_give_buf(c->loop, &in);
  }
}

static void conn_check_cb(uv_check_t *h) {
  hd_conn *c = h->data;
  uv_check_stop(h);
  if (c->has_pending && !c->closing) conn_deliver(c, 0);
}

/* A whole reply frame is in: checked, then handed up, in the check phase
 * when it was read in the poll phase, else now. Nothing more is read
 * until then. */
static void conn_reply(hd_conn *c, const hd_frame *f) {
  char why[HD_VALIDATE_ERRLEN];
  const char *body = conn_unread(c) + HD_FRAME_HEADER;
  /* Before it is believed: nothing may follow it, and it must be a valid
   * reply; else the worker is broken and goes before another job. */
  int more = c->replies > 1 && f->type == HD_FRAME_REPLY;
  if (!more && conn_unread_len(c) > HD_FRAME_HEADER + (size_t)f->len) {
    conn_fail(c, HD_CONN_BREACH, "bytes after the reply");
    return;
  }
  if (hd_wire_reply_check(body, f->len, c->check_flags, why, sizeof why) != 0) {
    conn_fail(c, HD_CONN_BREACH, why);
    return;
  }
  c->pending = *f;
  c->has_pending = 1;
  if (c->in_poll) uv_check_start(&c->check, conn_check_cb);
  else if (!c->delivering) conn_deliver(c, 1);
}

/* Parses complete frames out of c->in. Returns -1 when reading must stop. */
static int conn_parse(hd_conn *c) {
  while (conn_unread_len(c) >= HD_FRAME_HEADER) {
    hd_frame f;
    hd_wire_frame(conn_unread(c), &f);
    if (!c->hello) {
      /* The worker executable says hello (its pid) before it reads a job. */
      if (f.type != HD_FRAME_HELLO) {
        conn_fail(c, HD_CONN_BREACH, "frame before the worker's hello");
        return -1;
      }
      if (f.len != HD_HELLO_BODY) {
        conn_fail(c, HD_CONN_BREACH, "bad hello frame");
        return -1;
      }
      if (conn_unread_len(c) < HD_HELLO_LEN) return 0;
      c->hello = 1;
      c->pid = hd_wire_hello_pid(conn_unread(c) + HD_FRAME_HEADER);
      conn_take(c, HD_HELLO_LEN);
      continue;
    }
    if (c->frame == NULL) {
      conn_fail(c, HD_CONN_BREACH, "unexpected frame from an idle worker");
      return -1;
    }
    if (f.type == HD_FRAME_STATS) {
      /* One, of its size, for this job, before its reply. */
      if (f.len != HD_STATS_BODY || f.id != c->id || c->has_stats) {
        conn_fail(c, HD_CONN_BREACH, "bad stats frame");
        return -1;
      }
      if (conn_unread_len(c) < HD_STATS_LEN) return 0;
      hd_wire_stats_read(conn_unread(c) + HD_FRAME_HEADER, &c->cpu_ns, &c->heap_peak,
                         &c->wall_ns);
      c->has_stats = 1;
      conn_take(c, HD_STATS_LEN);
      continue;
    }
    if (f.type == HD_FRAME_EVENT) {
      char why[HD_VALIDATE_ERRLEN];
      if (f.id != c->id) {
        conn_fail(c, HD_CONN_BREACH, "event for the wrong job");
        return -1;
      }
      if ((double)f.len > c->max_result) {
        snprintf(why, sizeof why, "event larger than max_result_bytes (%.0f)", c->max_result);
        conn_fail(c, HD_CONN_TOOBIG, why);
        return -1;
      }
      if (conn_unread_len(c) - HD_FRAME_HEADER < f.len) {
        conn_grow(c, HD_FRAME_HEADER + (size_t)f.len);
        return 0;
      }
      if (hd_validate_flags(conn_unread(c) + HD_FRAME_HEADER, f.len, c->check_flags, why,
                            sizeof why) != 0) {
        conn_fail(c, HD_CONN_BREACH, why);
        return -1;
      }
      c->cbs.event(c, c->ud, conn_unread(c) + HD_FRAME_HEADER, f.len);
      if (c->closing) return -1;
      conn_take(c, HD_FRAME_HEADER + (size_t)f.len);
      continue;
    }
    if (f.type != HD_FRAME_REPLY && f.type != HD_FRAME_REPLY_LAST) {
      char why[64];
      snprintf(why, sizeof why, "bad frame type %u", (unsigned)f.type);
      conn_fail(c, HD_CONN_BREACH, why);
      return -1;
    }
    if (f.id != c->id) {
      conn_fail(c, HD_CONN_BREACH, "reply for the wrong job");
      return -1;
    }
    if ((double)f.len > c->max_result + 1) {
      char why[96];
      snprintf(why, sizeof why, "result larger than max_result_bytes (%.0f)", c->max_result);
      conn_fail(c, HD_CONN_TOOBIG, why);
      return -1;
    }
    if (f.len < 1) {
      conn_fail(c, HD_CONN_BREACH, "empty reply");
      return -1;
    }
    if (conn_unread_len(c) - HD_FRAME_HEADER < f.len) {
      conn_grow(c, HD_FRAME_HEADER + (size_t)f.len);
      return 0;
    }
    conn_reply(c, &f);
    return c->closing || c->has_pending ? -1 : 0;
  }
  /* An idle worker has nothing to say: even a partial frame is a breach. */
  if (c->frame == NULL && c->hello && conn_unread_len(c) > 0) {
    conn_fail(c, HD_CONN_BREACH, "bytes from an idle worker");
    return -1;
  }
  return 0;
}

/* Reads what is there. */
static void conn_read(hd_conn *c) {
  while (!c->closing && !c->has_pending) {
    ssize_t r;
    conn_compact(c);
    if (hd_buf_reserve(&c->in, CONN_READ) != 0) {
      conn_fail(c, HD_CONN_BREACH, "out of memory reading a reply");
      return;
    }
    r = read(c->fd, c->in.data + c->in.len, c->in.cap - c->in.len);
    if (r > 0) {
      c->in.len += (size_t)r;
      c->replied_at = hd_loop_now(c->loop) * 1000000u;
      if (conn_parse(c) < 0) return;
      /* The reply is in and nothing else is due: another read would only
       * say EAGAIN. The poll is level-triggered, so later bytes or EOF are
       * not missed. */
      if (c->frame == NULL && conn_unread_len(c) == 0) return;
      continue;
    }
    if (r < 0 && errno == EINTR) continue;
    if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
    conn_eof(c);
    return;
  }
}

void hd_conn_drain(hd_conn *c) {
  if (c->closing) return;
  if (c->has_pending) {
    conn_deliver(c, 1);
    return;
  }
  conn_out_drain(c);
  if (!c->closing) conn_read(c);
}

static void conn_poll_cb(uv_poll_t *h, int status, int events) {
  hd_conn *c = h->data;
  (void)status;
  (void)events;
  /* An error or a hang-up shows in the read. */
  c->in_poll = 1;
  conn_read(c);
  c->in_poll = 0;
}

static void conn_wpoll_cb(uv_poll_t *h, int status, int events) {
  hd_conn *c = h->data;
  (void)status;
  (void)events;
  /* An error shows as a failed write; the worker's end as EOF on fd. */
  if (c->frame) conn_write(c);
  conn_update_poll(c);
}
