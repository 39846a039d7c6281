/* proc.c: a worker process as the parent sees it: its protocol socket, the
 * frames on it, and its death. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "core.h"
#include "codec.h"
#include "wire.h"

static void proc_poll_cb(uv_poll_t *h, int status, int events);
static void proc_breach(hd_proc *p, const char *why);

static void proc_free_if_done(hd_proc *p) {
  hd_core *c = p->core;
  if (!p->exited || p->poll_open) return;
  if (p->prev) p->prev->next = p->next;
  else c->procs = p->next;
  if (p->next) p->next->prev = p->prev;
  hd_buf_free(&p->in);
  if (p->pidfd >= 0) close(p->pidfd);
  hd_pool_unref(p->root);
  free(p);
  hd_core_unref(c);
}

static void proc_poll_close_cb(uv_handle_t *h) {
  hd_proc *p = h->data;
  if (p->fd >= 0) close(p->fd);
  p->fd = -1;
  p->poll_open = 0;
  proc_free_if_done(p);
}

/* Stops all I/O with the process and closes our end of its socket. The
 * descriptor goes at once (a stopped poll no longer watches it), so the
 * host's descriptor count does not wait for the loop to run again. */
static void proc_close_io(hd_proc *p) {
  if (p->poll_open && !uv_is_closing((uv_handle_t *)&p->poll)) {
    uv_poll_stop(&p->poll);
    if (p->fd >= 0) close(p->fd);
    p->fd = -1;
    uv_close((uv_handle_t *)&p->poll, proc_poll_close_cb);
  }
}

/* Whether an idle process is still fit for a job: a worker that exited or
 * wrote something since its last reply is not. One non-blocking peek. */
int hd_proc_fit(hd_proc *p) {
  char b;
  ssize_t r;
  if (p->fd < 0) return 0;
  r = recv(p->fd, &b, 1, MSG_PEEK | MSG_DONTWAIT);
  if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return 1;
  if (r > 0) {
    proc_breach(p, "bytes from an idle worker");
  } else {
    p->eof = 1;
    hd_proc_retire(p);
  }
  return 0;
}

static void proc_update_poll(hd_proc *p) {
  int ev;
  if (!p->poll_open || uv_is_closing((uv_handle_t *)&p->poll)) return;
  ev = UV_READABLE | (p->job && p->out_off < p->job->frame.len ? UV_WRITABLE : 0);
  if (ev != p->poll_events) {
    p->poll_events = ev;
    uv_poll_start(&p->poll, ev, proc_poll_cb);
  }
}

static void proc_unidle(hd_proc *p) {
  hd_proc **pp;
  for (pp = &p->root->idle; *pp != NULL; pp = &(*pp)->inext) {
    if (*pp == p) {
      *pp = p->inext;
      break;
    }
  }
  p->inext = NULL;
}

hd_proc *hd_proc_spawn(hd_core *c, hd_pool *root, char *err, size_t errlen) {
  int sv[2];
  char m[6];
  hd_proc *p;
  if (hd_core_sup_ensure(c) != 0) {
    snprintf(err, errlen, "%s", c->sup_error);
    return NULL;
  }
  p = calloc(1, sizeof *p);
  if (p == NULL) {
    snprintf(err, errlen, "out of memory");
    return NULL;
  }
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) {
    snprintf(err, errlen, "socketpair: %s", strerror(errno));
    free(p);
    return NULL;
  }
  {
    int fl = fcntl(sv[0], F_GETFL), k, sz = 1 << 20;
    fcntl(sv[0], F_SETFL, fl | O_NONBLOCK);
    /* Big transfers move in a few large steps rather than many small ones;
     * the kernel allocates the space only as data is queued. */
    for (k = 0; k < 2; k++) {
      setsockopt(sv[k], SOL_SOCKET, SO_SNDBUF, &sz, sizeof sz);
      setsockopt(sv[k], SOL_SOCKET, SO_RCVBUF, &sz, sizeof sz);
    }
  }
  p->core = c;
  p->root = root;
  p->id = ++c->next_proc;
  p->fd = sv[0];
  p->state = HD_PROC_IDLE;
  p->status = -1;
  p->pidfd = -1;
  if (uv_poll_init(&c->loop, &p->poll, p->fd) != 0) {
    snprintf(err, errlen, "cannot watch a socket");
    close(sv[0]);
    close(sv[1]);
    free(p);
    return NULL;
  }
  p->poll.data = p;
  p->poll_open = 1;
  hd_pool_ref(root);
  c->refs++;
  p->next = c->procs;
  if (c->procs) c->procs->prev = p;
  c->procs = p;
  root->procs++;
  root->spawned++;
  m[0] = HD_CTL_SPAWN;
  hd_put_u32(m + 1, p->id);
  m[5] = (char)root->sandbox;
  if (hd_core_ctl_send(c, m, sizeof m, sv[1]) != 0) {
    /* The supervisor went away: this process is as good as dead. */
    snprintf(err, errlen, "%s", c->sup_error[0] ? c->sup_error : "the supervisor is gone");
    if (!p->exited) hd_proc_on_exited(c, p->id, -1, 0);
    return NULL;
  }
  proc_update_poll(p);
  return p;
}

/* Sends as much of the job frame as the socket takes now. */
static int proc_write(hd_proc *p) {
  hd_job *j = p->job;
  while (j && p->out_off < j->frame.len) {
    ssize_t r = send(p->fd, j->frame.data + p->out_off, j->frame.len - p->out_off,
                     MSG_NOSIGNAL | MSG_DONTWAIT);
    if (r > 0) {
      p->out_off += (size_t)r;
      continue;
    }
    if (r < 0 && errno == EINTR) continue;
    if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
    /* EPIPE and friends: the worker is gone; its exit report says why. */
    p->out_off = j->frame.len;
    return -1;
  }
  return 0;
}

void hd_proc_start_job(hd_proc *p, hd_job *j) {
  proc_unidle(p);
  p->state = HD_PROC_BUSY;
  p->job = j;
  j->proc = p;
  p->out_off = 0;
  p->in.len = 0;
  proc_write(p);
  proc_update_poll(p);
}

/* The process is broken or no longer wanted: the supervisor kills it (it is
 * the parent, so the pid cannot have been reused). */
void hd_proc_kill(hd_proc *p) {
  char m[5];
  if (p->state == HD_PROC_IDLE) proc_unidle(p);
  p->state = HD_PROC_DYING;
  proc_close_io(p);
  if (p->exited) return;
  m[0] = HD_CTL_KILL;
  hd_put_u32(m + 1, p->id);
  hd_core_ctl_send(p->core, m, sizeof m, -1);
}

/* An idle process is no longer wanted: closing its socket makes it exit. */
void hd_proc_retire(hd_proc *p) {
  if (p->state == HD_PROC_IDLE) proc_unidle(p);
  p->state = HD_PROC_DYING;
  p->job = NULL;
  proc_close_io(p);
}

/* Whether a valid message has the shape its status calls for: OOM carries
 * nothing, BADRESULT one string (its first value is then tag 4, STR),
 * ERROR the raised value and its traceback. The count is the message's
 * first varint; counts this small fit in its first byte. */
static int proc_reply_shaped(char status, const char *msg, size_t len) {
  unsigned char count = len > 0 ? (unsigned char)msg[0] : 0xff;
  switch (status) {
    case HD_REPLY_OOM: return len == 1 && count == 0;
    case HD_REPLY_BADRESULT: return len > 2 && count == 1 && msg[1] == 4;
    case HD_REPLY_ERROR: return len > 1 && count == 2;
    default: return 1;
  }
}

/* The worker broke the protocol: its job fails saying `why`, and it goes. */
static void proc_breach(hd_proc *p, const char *why) {
  hd_job *j = p->job;
  if (j != NULL) {
    /* Ending the job kills the process that still holds it. */
    snprintf(j->detail, sizeof j->detail, "%s", why);
    hd_job_finish(j, HD_OUT_BADREPLY);
  } else {
    hd_proc_kill(p);
  }
}

/* Parses complete frames out of p->in. Returns -1 if the process was dropped. */
static int proc_parse(hd_proc *p) {
  hd_core *c = p->core;
  if (p->job == NULL && p->hello && p->in.len > 0) {
    /* An idle worker has nothing to say: even a partial frame is a breach. */
    proc_breach(p, "bytes from an idle worker");
    return -1;
  }
  while (p->in.len >= HD_FRAME_HEADER) {
    uint32_t blen = hd_get_u32(p->in.data);
    hd_job *j = p->job;
    double limit = j ? (j->max_result > 0 ? j->max_result : c->max_result_bytes) : 0;
    if (!p->hello && p->in.data[4] != HD_FRAME_HELLO) {
      /* The worker executable says hello before it reads a job. */
      proc_breach(p, "frame before the worker's hello");
      return -1;
    }
    if (p->in.data[4] == HD_FRAME_HELLO && !p->hello) {
      /* Once, first: the worker's pid. */
      if (blen != 4) {
        proc_breach(p, "bad hello frame");
        return -1;
      }
      if (p->in.len < HD_FRAME_HEADER + 4) return 0;
      p->hello = 1;
      if (p->pid <= 0) p->pid = (pid_t)hd_get_u32(p->in.data + HD_FRAME_HEADER);
      hd_buf_consume(&p->in, HD_FRAME_HEADER + 4);
      continue;
    }
    if (j == NULL) {
      proc_breach(p, "unexpected frame from an idle worker");
      return -1;
    }
    if (p->in.data[4] != HD_FRAME_REPLY && p->in.data[4] != HD_FRAME_REPLY_LAST) {
      char why[64];
      snprintf(why, sizeof why, "bad frame type %u", (unsigned char)p->in.data[4]);
      proc_breach(p, why);
      return -1;
    }
    if (hd_get_u64(p->in.data + 5) != j->id) {
      proc_breach(p, "reply for the wrong job");
      return -1;
    }
    if ((double)blen > limit + 1) {
      snprintf(j->detail, sizeof j->detail, "result larger than max_result_bytes (%.0f)", limit);
      hd_job_finish(j, HD_OUT_BADRESULT);
      return -1;
    }
    if (blen < 1) {
      proc_breach(p, "empty reply");
      return -1;
    }
    if (p->in.len - HD_FRAME_HEADER < blen) {
      /* Grow toward the whole frame as bytes arrive, never ahead of them;
       * a warm spare that holds what has come so far is taken instead. */
      size_t want = p->in.len * 2;
      if (want > HD_FRAME_HEADER + (size_t)blen) want = HD_FRAME_HEADER + (size_t)blen;
      if (want > p->in.cap && want > 65536) {
        hd_buf cur = p->in;
        p->in.data = NULL;
        p->in.len = p->in.cap = 0;
        if (hd_core_take_buf(c, &p->in, HD_FRAME_HEADER + (size_t)blen)) {
          memcpy(p->in.data, cur.data, cur.len);
          p->in.len = cur.len;
          hd_buf_free(&cur);
        } else {
          p->in = cur;
        }
      }
      if (want > p->in.cap) hd_buf_reserve(&p->in, want - p->in.len);
      return 0;
    }
    /* A whole reply. Before it is believed: nothing may follow it, and
     * its status must be one we know; else the worker is broken, the job
     * fails and the worker goes. */
    if (p->in.len > HD_FRAME_HEADER + (size_t)blen) {
      proc_breach(p, "bytes after the reply");
      return -1;
    }
    if ((unsigned char)p->in.data[HD_FRAME_HEADER] > HD_REPLY_BADRESULT) {
      char why[64];
      snprintf(why, sizeof why, "unknown reply status %u",
               (unsigned char)p->in.data[HD_FRAME_HEADER]);
      proc_breach(p, why);
      return -1;
    }
    /* The message must decode, checked now (about a nanosecond a byte, no
     * Lua state needed): a worker that sends one that does not is killed
     * before it can be given another job. Its shape is the status's too. */
    {
      char why[HD_VALIDATE_ERRLEN];
      const char *msg = p->in.data + HD_FRAME_HEADER + 1;
      if (hd_validate(msg, blen - 1, why, sizeof why) != 0) {
        proc_breach(p, why);
        return -1;
      }
      if (!proc_reply_shaped(p->in.data[HD_FRAME_HEADER], msg, blen - 1)) {
        proc_breach(p, "reply of the wrong shape for its status");
        return -1;
      }
    }
    p->job = NULL;
    j->proc = NULL;
    p->state = HD_PROC_IDLE;
    if (p->in.data[4] == HD_FRAME_REPLY_LAST) {
      /* The job touched process state: this worker exits after the reply. */
      p->state = HD_PROC_DYING;
    }
    hd_job_on_reply(j, p, p->in.data + HD_FRAME_HEADER, blen);
    hd_buf_consume(&p->in, HD_FRAME_HEADER + blen);
    if (p->in.cap > (1u << 20)) hd_core_give_buf(c, &p->in);
    if (p->state == HD_PROC_DYING) {
      proc_close_io(p);
      return -1;
    }
    if (p->state == HD_PROC_IDLE) {
      if (p->root->closed || c->closing) {
        hd_proc_retire(p);
        return -1;
      }
      p->idle_since = hd_core_now(c);
      p->inext = p->root->idle;
      p->root->idle = p;
      /* Pools have their own idle_ms: the sweep must come no later than
       * this process's. */
      if (!uv_is_active((uv_handle_t *)&c->idle_timer) ||
          uv_timer_get_due_in(&c->idle_timer) > p->root->idle_ms)
        hd_core_arm_idle(c, p->root->idle_ms);
      hd_job_pump_queue(c);
    }
    return 0;
  }
  return 0;
}

/* Reads what is there. Returns 1 at EOF, -1 if the process was dropped. */
static int proc_read(hd_proc *p) {
  for (;;) {
    ssize_t r;
    if (hd_buf_reserve(&p->in, 65536) != 0) {
      proc_breach(p, "out of memory reading a reply");
      return -1;
    }
    r = recv(p->fd, p->in.data + p->in.len, p->in.cap - p->in.len, MSG_DONTWAIT);
    if (r > 0) {
      p->in.len += (size_t)r;
      if (proc_parse(p) < 0) return -1;
      if (p->fd < 0 || !p->poll_open) return -1;
      /* The reply is in and nothing else is due: another recv would only
       * say EAGAIN. The poll is level-triggered, so later bytes or EOF are
       * not missed. */
      if (p->job == NULL && p->in.len == 0) return 0;
      continue;
    }
    if (r < 0 && errno == EINTR) continue;
    if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return 0;
    return 1;
  }
}

/* The process died with a job on it: the job ends with its cause. */
static void proc_job_died(hd_proc *p) {
  hd_job *j = p->job;
  if (j == NULL) return;
  p->job = NULL;
  j->proc = NULL;
  j->status = p->status;
  hd_job_finish(j, j->pending != HD_OUT_NONE ? j->pending : HD_OUT_EXIT);
}

static void proc_poll_cb(uv_poll_t *h, int status, int events) {
  hd_proc *p = h->data;
  int r = 0;
  if (status < 0) events = UV_READABLE;
  if ((events & UV_WRITABLE) && p->job) proc_write(p);
  if (events & (UV_READABLE | UV_DISCONNECT)) r = proc_read(p);
  if (r < 0) return;
  if (r == 1) {
    /* EOF: the process closed its socket, which means it is dying. The cause
     * comes with the supervisor's report; until then the job waits. */
    p->eof = 1;
    if (p->state == HD_PROC_IDLE) proc_unidle(p);
    if (p->state != HD_PROC_BUSY) p->state = HD_PROC_DYING;
    proc_close_io(p);
    if (p->exited) proc_job_died(p);
    return;
  }
  proc_update_poll(p);
}

/* Reads whatever the process has already written, now. */
void hd_proc_drain(hd_proc *p) {
  if (p->poll_open && !uv_is_closing((uv_handle_t *)&p->poll) && p->fd >= 0) proc_read(p);
}

static hd_proc *proc_find(hd_core *c, uint32_t id) {
  hd_proc *p;
  for (p = c->procs; p != NULL; p = p->next)
    if (p->id == id) return p;
  return NULL;
}

void hd_proc_on_spawned(hd_core *c, uint32_t id, pid_t pid, int pidfd) {
  hd_proc *p = proc_find(c, id);
  if (p == NULL || p->exited) {
    if (pidfd >= 0) close(pidfd);
    return;
  }
  p->pid = pid;
  if (p->pidfd >= 0) close(p->pidfd);
  p->pidfd = pidfd;
}

void hd_proc_on_exited(hd_core *c, uint32_t id, int status, int known) {
  hd_proc *p = proc_find(c, id);
  if (p == NULL || p->exited) return;
  p->exited = 1;
  p->status = known ? status : -1;
  p->root->procs--;
  /* A reply written just before the exit is already in the socket: read it
   * before deciding the job died. */
  if (p->job && p->poll_open && !uv_is_closing((uv_handle_t *)&p->poll)) {
    if (proc_read(p) < 0) {
      proc_free_if_done(p);
      return;
    }
  }
  if (p->state == HD_PROC_IDLE) proc_unidle(p);
  p->state = HD_PROC_DYING;
  proc_job_died(p);
  proc_close_io(p);
  proc_free_if_done(p);
}

/* Ends processes idle for longer than their pool's idle_ms. */
void hd_proc_sweep_idle(hd_core *c) {
  hd_proc *p, *next;
  uint64_t now = hd_core_now(c);
  double soonest = -1;
  if (!c->spare_used) hd_buf_free(&c->spare);
  c->spare_used = 0;
  for (p = c->procs; p != NULL; p = next) {
    next = p->next;
    if (p->state == HD_PROC_IDLE) {
      double age = (double)(now - p->idle_since);
      double limit = p->root->idle_ms;
      if (age >= limit) hd_proc_retire(p);
      else if (soonest < 0 || limit - age < soonest) soonest = limit - age;
    }
  }
  if (soonest >= 0) hd_core_arm_idle(c, soonest + 1);
}
