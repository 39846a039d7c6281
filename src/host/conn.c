/* conn.c: the host's connection to one worker process: its protocol socket,
 * the frames on it, and the checks every reply passes. */
#include "conn.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "codec.h"
#include "wire.h"

/* Socket buffers: big transfers move in a few large steps rather than many
 * small ones; the kernel allocates the space only as data is queued. */
#define CONN_SOCKBUF (1 << 20)
/* Bytes asked of each read, and the size from which a read buffer is worth
 * taking from the loop's warm spare. */
#define CONN_READ 65536
/* A read buffer larger than this goes back to the loop after a reply. */
#define CONN_KEEP (1u << 20)

struct hd_conn {
  hd_loop *loop;
  hd_conn_cbs cbs;
  void *ud;
  int fd;             /* our end, -1 once closed */
  uv_poll_t poll;
  int poll_events;
  int poll_open;      /* the handle is initialised and not yet closed */
  int closing;        /* no more I/O */
  pid_t pid;          /* from the hello */
  int hello;          /* the hello arrived */
  uint64_t id;        /* the job awaited, while `frame` is set */
  double max_result;
  const hd_buf *frame;/* the job frame being sent, NULL when idle */
  size_t out_off;     /* bytes of it sent */
  hd_buf in;          /* bytes read so far */
};

static void conn_poll_cb(uv_poll_t *h, int status, int events);

hd_conn *hd_conn_new(hd_loop *l, const hd_conn_cbs *cbs, void *ud, int *peer, char *err,
                     size_t errlen) {
  int sv[2], k, fl, sz = CONN_SOCKBUF;
  hd_conn *c = calloc(1, sizeof *c);
  if (c == NULL) {
    snprintf(err, errlen, "out of memory");
    return NULL;
  }
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) {
    snprintf(err, errlen, "socketpair: %s", strerror(errno));
    free(c);
    return NULL;
  }
  fl = fcntl(sv[0], F_GETFL);
  if (fl < 0 || fcntl(sv[0], F_SETFL, fl | O_NONBLOCK) != 0 ||
      uv_poll_init(hd_loop_uv(l), &c->poll, sv[0]) != 0) {
    snprintf(err, errlen, "cannot watch a socket");
    close(sv[0]);
    close(sv[1]);
    free(c);
    return NULL;
  }
  /* Best effort: the defaults work, only slower for big transfers. */
  for (k = 0; k < 2; k++) {
    setsockopt(sv[k], SOL_SOCKET, SO_SNDBUF, &sz, sizeof sz);
    setsockopt(sv[k], SOL_SOCKET, SO_RCVBUF, &sz, sizeof sz);
  }
  c->loop = l;
  c->cbs = *cbs;
  c->ud = ud;
  c->fd = sv[0];
  c->poll.data = c;
  c->poll_open = 1;
  *peer = sv[1];
  return c;
}

static void conn_update_poll(hd_conn *c) {
  int ev;
  if (c->closing) return;
  ev = UV_READABLE | (c->frame && c->out_off < c->frame->len ? UV_WRITABLE : 0);
  if (ev != c->poll_events) {
    c->poll_events = ev;
    uv_poll_start(&c->poll, ev, conn_poll_cb);
  }
}

static void conn_close_cb(uv_handle_t *h) {
  hd_conn *c = h->data;
  c->poll_open = 0;
  c->cbs.closed(c, c->ud);
}

void hd_conn_close(hd_conn *c) {
  if (c->closing) return;
  c->closing = 1;
  c->frame = NULL;
  uv_poll_stop(&c->poll);
  /* The descriptor goes at once (a stopped poll no longer watches it), so
   * the host's descriptor count does not wait for the loop to run again. */
  if (c->fd >= 0) close(c->fd);
  c->fd = -1;
  uv_close((uv_handle_t *)&c->poll, conn_close_cb);
}

void hd_conn_forsake(hd_conn *c) {
  c->closing = 1;
  c->frame = NULL;
  if (c->fd >= 0) close(c->fd);
  c->fd = -1;
}

void hd_conn_free(hd_conn *c) {
  hd_buf_free(&c->in);
  free(c);
}

pid_t hd_conn_pid(const hd_conn *c) {
  return c->pid;
}

int hd_conn_open(const hd_conn *c) {
  return c->fd >= 0;
}

static void conn_fail(hd_conn *c, int kind, const char *why) {
  hd_conn_close(c);
  c->cbs.fail(c, c->ud, kind, why);
}

static void conn_eof(hd_conn *c) {
  hd_conn_close(c);
  c->cbs.eof(c, c->ud);
}

/* Sends as much of the job frame as the socket takes now. */
static void conn_write(hd_conn *c) {
  while (c->frame && c->out_off < c->frame->len) {
    ssize_t r = send(c->fd, c->frame->data + c->out_off, c->frame->len - c->out_off,
                     MSG_NOSIGNAL | MSG_DONTWAIT);
    if (r > 0) {
      c->out_off += (size_t)r;
      continue;
    }
    if (r < 0 && errno == EINTR) continue;
    if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
    /* EPIPE and friends: the worker is gone; its exit report says why. */
    c->out_off = c->frame->len;
  }
}

void hd_conn_send(hd_conn *c, uint64_t id, double max_result, const hd_buf *frame) {
  c->id = id;
  c->max_result = max_result;
  c->frame = frame;
  c->out_off = 0;
  c->in.len = 0;
  conn_write(c);
  conn_update_poll(c);
}

int hd_conn_fit(hd_conn *c) {
  char b;
  ssize_t r;
  if (c->closing) return 0;
  r = recv(c->fd, &b, 1, MSG_PEEK | MSG_DONTWAIT);
  if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return 1;
  if (r > 0) conn_fail(c, HD_CONN_BREACH, "bytes from an idle worker");
  else conn_eof(c);
  return 0;
}

/* Grows the read buffer toward the whole frame as bytes arrive, never
 * ahead of them; a warm spare that holds what has come so far is taken
 * instead. */
static void conn_grow(hd_conn *c, size_t whole) {
  size_t want = c->in.len * 2;
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

/* A whole reply frame is in: checked, then reported. The read buffer is
 * handed to the callback, which may keep it or send the next job. */
static void conn_reply(hd_conn *c, const hd_frame *f) {
  char why[HD_VALIDATE_ERRLEN];
  const char *body = c->in.data + HD_FRAME_HEADER;
  hd_buf in;
  /* Before it is believed: nothing may follow it, and it must be a valid
   * reply; else the worker is broken and goes before another job. */
  if (c->in.len > HD_FRAME_HEADER + (size_t)f->len) {
    conn_fail(c, HD_CONN_BREACH, "bytes after the reply");
    return;
  }
  if (hd_wire_reply_check(body, f->len, why, sizeof why) != 0) {
    conn_fail(c, HD_CONN_BREACH, why);
    return;
  }
  c->frame = NULL;
  in = c->in;
  c->in.data = NULL;
  c->in.len = c->in.cap = 0;
  c->cbs.reply(c, c->ud, &in, HD_FRAME_HEADER, f->len, f->type == HD_FRAME_REPLY_LAST);
  /* What the callee left of the buffer serves the next reply. */
  in.len = 0;
  if (c->in.data == NULL && in.cap <= CONN_KEEP) {
    c->in = in;
  } else {
    hd_loop_give_buf(c->loop, &in);
  }
}

/* Parses complete frames out of c->in. Returns -1 when reading must stop. */
static int conn_parse(hd_conn *c) {
  while (c->in.len >= HD_FRAME_HEADER) {
    hd_frame f;
    hd_wire_frame(c->in.data, &f);
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
      if (c->in.len < HD_HELLO_LEN) return 0;
      c->hello = 1;
      c->pid = hd_wire_hello_pid(c->in.data + HD_FRAME_HEADER);
      hd_buf_consume(&c->in, HD_HELLO_LEN);
      continue;
    }
    if (c->frame == NULL) {
      conn_fail(c, HD_CONN_BREACH, "unexpected frame from an idle worker");
      return -1;
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
    if (c->in.len - HD_FRAME_HEADER < f.len) {
      conn_grow(c, HD_FRAME_HEADER + (size_t)f.len);
      return 0;
    }
    conn_reply(c, &f);
    return c->closing ? -1 : 0;
  }
  /* An idle worker has nothing to say: even a partial frame is a breach. */
  if (c->frame == NULL && c->hello && c->in.len > 0) {
    conn_fail(c, HD_CONN_BREACH, "bytes from an idle worker");
    return -1;
  }
  return 0;
}

/* Reads what is there. */
static void conn_read(hd_conn *c) {
  while (!c->closing) {
    ssize_t r;
    if (hd_buf_reserve(&c->in, CONN_READ) != 0) {
      conn_fail(c, HD_CONN_BREACH, "out of memory reading a reply");
      return;
    }
    r = recv(c->fd, c->in.data + c->in.len, c->in.cap - c->in.len, MSG_DONTWAIT);
    if (r > 0) {
      c->in.len += (size_t)r;
      if (conn_parse(c) < 0) return;
      /* The reply is in and nothing else is due: another recv would only
       * say EAGAIN. The poll is level-triggered, so later bytes or EOF are
       * not missed. */
      if (c->frame == NULL && c->in.len == 0) return;
      continue;
    }
    if (r < 0 && errno == EINTR) continue;
    if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
    conn_eof(c);
    return;
  }
}

void hd_conn_drain(hd_conn *c) {
  if (!c->closing) conn_read(c);
}

static void conn_poll_cb(uv_poll_t *h, int status, int events) {
  hd_conn *c = h->data;
  if (status < 0) events = UV_READABLE;
  if ((events & UV_WRITABLE) && c->frame) conn_write(c);
  if (events & (UV_READABLE | UV_DISCONNECT)) conn_read(c);
  conn_update_poll(c);
}
