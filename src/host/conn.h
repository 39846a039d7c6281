/* conn.h: the host's connection to one worker process: its protocol pipes
 * and the frames on them, and the pipes its stdout and stderr are. Sends go
 * down; replies, output, breaches and EOF come up through callbacks. Every
 * reply is checked before it is reported. */
#ifndef HD_CONN_H
#define HD_CONN_H

#include <stdint.h>
#include <sys/types.h>

#include "buf.h"
#include "loop.h"
#include "wire.h"

typedef struct hd_conn hd_conn;

/* Why a connection failed. */
enum {
  HD_CONN_BREACH, /* the worker broke the protocol */
  HD_CONN_TOOBIG  /* its reply is larger than the limit it was given */
};

typedef struct hd_conn_cbs {
  /* A whole, valid reply to the job sent: its body (the status byte, then
   * the message) is `len` bytes at buf->data + off. The callee may take
   * buf's memory (leaving *buf empty). With `last` the worker exits after
   * it. The callee may send the next job from here. */
  void (*reply)(hd_conn *c, void *ud, hd_buf *buf, size_t off, size_t len, int last);
  /* The worker broke the protocol, or its reply is too big: `why` says
   * how. Nothing more is read. */
  void (*fail)(hd_conn *c, void *ud, int kind, const char *why);
  /* The worker closed its reply pipe: it is dying. Nothing more is read. */
  void (*eof)(hd_conn *c, void *ud);
  /* The connection is closed for good and may be freed (hd_conn_free). */
  void (*closed)(hd_conn *c, void *ud);
  /* `len` bytes at `p` the worker (or a process it started) wrote to its
   * stdout (which = 0) or stderr (1) have come. Returns how many of them,
   * from the first, go on to the host's own stdout or stderr; the rest are
   * dropped. The callee may close the connection. Output written before a
   * reply is reported before the reply. */
  size_t (*output)(hd_conn *c, void *ud, int which, const char *p, size_t len);
  /* An event of the job in flight (its codec message, `len` bytes at p,
   * validated), in the order the worker sent them, before its reply. The
   * callee copies what it keeps, and may close the connection. */
  void (*event)(hd_conn *c, void *ud, const char *p, size_t len);
} hd_conn_cbs;

/* A connection over four new pipes; peer gets the worker's ends, in the
 * order of wire.h's HD_SPAWN_FD_*: the write ends of its reply pipe, its
 * stdout and its stderr, and the read end of its job pipe. NULL, with why in err, when it cannot be
 * made. */
hd_conn *hd_conn_new(hd_loop *l, const hd_conn_cbs *cbs, void *ud, int peer[HD_SPAWN_FDS],
                     char *err, size_t errlen);

/* Sends a job frame (kept by the caller until the job's reply, a failure
 * or hd_conn_close) and awaits the reply to job `id`, at most `max_result`
 * bytes long. */
void hd_conn_send(hd_conn *c, uint64_t id, double max_result, const hd_buf *frame);

/* The job just sent is answered by `replies` replies (one per item, each
 * with its STATS frame), each reported with `last` 0 but the final one;
 * bytes after a reply that more follow are the next one's. */
void hd_conn_expect(hd_conn *c, uint32_t replies);

/* What the worker said of the job in flight, in its STATS frame: the CPU
 * time it used, the peak of its heap and its wall time. Returns 0 when it
 * said nothing (yet). */
int hd_conn_stats(const hd_conn *c, uint64_t *cpu_ns, uint64_t *heap_peak, uint64_t *wall_ns);

/* Whether an idle connection is still fit for a job: a worker that exited
 * or wrote something since its last reply is not (then fail or eof is
 * reported). One poll, once the last reply is 1 to 2 ms old at `now`
 * (uv_hrtime()); a worker that just replied is taken as it is. */
int hd_conn_fit(hd_conn *c, uint64_t now);

/* After eof: whether the worker had read nothing of the job in flight (it
 * died before: the job never ran), a job it got without the look
 * hd_conn_fit makes at an idle worker, which would have seen it dying;
 * reported only when the EOF came to the loop's poll. */
int hd_conn_job_unread(const hd_conn *c);

/* From now on a reply holding a value sent by name is a breach: the
 * worker is sandboxed, and a name would make the host hand its caller the
 * host's own table of that name. */
void hd_conn_refuse_names(hd_conn *c);

/* Reads what the worker has already written, now: its output, then its
 * frames. */
void hd_conn_drain(hd_conn *c);

/* Stops all I/O and closes our ends of the pipes at once
 * (what the worker or its children write after that fails with EPIPE);
 * `closed` comes from the loop later. Safe to call more than once. */
void hd_conn_close(hd_conn *c);

void hd_conn_free(hd_conn *c);

/* In a forked child, whose copy of the loop must not be touched (its epoll
 * instance is the parent's too): closes the child's copies of the pipes,
 * and nothing else; the connection is never used again. */
void hd_conn_forsake(hd_conn *c);

/* The worker's pid from its hello, or 0 before it. */
pid_t hd_conn_pid(const hd_conn *c);

/* Whether our end of the reply pipe is still open. */
int hd_conn_open(const hd_conn *c);

/* How many descriptors the connection holds now: its ends of the pipes
 * still open. */
int hd_conn_fds(const hd_conn *c);

#endif
