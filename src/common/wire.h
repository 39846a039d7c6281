/* wire.h: the one wire format: job frames between the host and a worker,
 * control messages between the host and the supervisor. Every frame and
 * message is packed and unpacked by the functions here (wire.c); values
 * inside a frame are the codec's (codec.h). */
#ifndef HD_WIRE_H
#define HD_WIRE_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "buf.h"

/* Bumped whenever either protocol changes; the supervisor's hello carries it
 * so a worker executable from another build is refused with a clear error. */
#define HD_PROTO_VERSION 6

/* The protocol runs over two pipes, one each way: a pipe's write and read
 * cost about half of a unix socket's, which allocates and charges a buffer
 * for every send. The worker writes its frames to HD_WORKER_FD and reads
 * the host's from HD_WORKER_JOB_FD, always these descriptors, so a job's
 * print (fd 1) and its errors (fd 2) never touch the protocol. */
#define HD_WORKER_FD 3
#define HD_WORKER_JOB_FD 4

/* A SPAWN carries the worker's descriptors, in this order: the write end of
 * its reply pipe, the write ends of the pipes that become its stdout and
 * its stderr, and the read end of its job pipe. The host reads the other
 * ends of the first three: a job's output is metered there, at the
 * descriptor, whoever writes it. */
#define HD_SPAWN_FD_REPLY 0
#define HD_SPAWN_FD_STDOUT 1
#define HD_SPAWN_FD_STDERR 2
#define HD_SPAWN_FD_JOB 3
#define HD_SPAWN_FDS 4

/* A job frame, either direction, over the protocol pipes:
 *   u32 body length | u8 type | u64 job id | body
 * All integers are little-endian. */
#define HD_FRAME_HEADER 13
#define HD_FRAME_JOB 1   /* parent → worker: u64 max_heap_bytes, u64 max_output_bytes,
                          * u8 flags, [paths], [env], codec message. The
                          * output limit is the host's to enforce (it reads
                          * the worker's stdout and stderr); the worker is
                          * told for information only. */
/* Job flags. With HD_JOB_PATHS, package.path and package.cpath follow the
 * flags (u32 length and bytes each): the caller changed them after the
 * supervisor built its image. With HD_JOB_ENV, a u32 count of environment
 * variables follows, each a name and a value (u32 length and bytes each). */
#define HD_JOB_PATHS 1
#define HD_JOB_ENV 2
/* With HD_JOB_ITEMS, after the environment: a u32 count of items, each a
 * u32 length and the codec message of its arguments. The worker calls the
 * function once per item, each time from its pristine image, and replies
 * once per item (STATS and REPLY, the job's id), in order; a REPLY_LAST
 * ends the frame early (the items after it are not run). */
#define HD_JOB_ITEMS 4
/* The most items one job frame carries. */
#define HD_MAX_ITEMS 1024
/* A worker may hold an item's reply back this long, to send it with those
 * of the items after it in one write; the host gives each item of a job of
 * several this much time beyond its max_ms, so that a held reply never
 * counts against the item after it. */
#define HD_ITEM_HOLD_MS 1
#define HD_FRAME_REPLY 2 /* worker → parent: u8 status, codec message */
#define HD_FRAME_REPLY_LAST 3 /* the same, and the worker exits after it */
#define HD_FRAME_HELLO 4 /* worker → parent, first: u32 pid (job id 0) */
#define HD_FRAME_STATS 6 /* worker → parent, just before a reply (same id): u64 CPU time
                          * the job used (ns), u64 the peak of its heap above the
                          * baseline (bytes), u64 its wall time in the worker (ns);
                          * for job:stats(), believed as the worker's word */
#define HD_STATS_BODY 24
#define HD_STATS_LEN (HD_FRAME_HEADER + HD_STATS_BODY)
#define HD_FRAME_EVENT 7 /* worker → parent, while its job runs (same id): codec message,
                          * the value of require("handler.job").emit(value) */
#define HD_FRAME_INIT 5  /* parent → worker, before its first job (same id), when the
                          * worker's root pool has an init: codec message, the init
                          * closure, run once to make the worker's pristine image */

/* Reply statuses. */
#define HD_REPLY_OK 0        /* message: the results */
#define HD_REPLY_ERROR 1     /* message: the raised value, its traceback */
#define HD_REPLY_OOM 2       /* message: empty */
#define HD_REPLY_BADRESULT 3 /* message: one string, why the results cannot travel */

/* The largest job frame a worker accepts; the parent's own limit on replies
 * is max_result_bytes. */
#define HD_MAX_JOB_FRAME (1u << 30)

/* Control messages over a SOCK_SEQPACKET pair, one message per packet:
 * u8 type, then fields. */
#define HD_CTL_SPAWN 1   /* parent → supervisor: u32 worker id, u8 flags, name; HD_SPAWN_FDS fds attached */
#define HD_SPAWN_LUA 1     /* sandbox: the stripped Lua environment */
#define HD_SPAWN_SECCOMP 2 /* sandbox: limits and the system call filter */
#define HD_CTL_KILL 2    /* parent → supervisor: u32 worker id */
#define HD_CTL_HELLO 1   /* supervisor → parent: u32 version, u32 pid, u8 n, n bytes of bytecode header */
#define HD_CTL_SPAWNED 2 /* supervisor → parent: u32 worker id, u32 pid; a pidfd attached */
#define HD_CTL_EXITED 3  /* supervisor → parent: u32 worker id, i32 wait status */
#define HD_CTL_FAILED 4  /* supervisor → parent: u32 worker id, u32 why: an errno, or an
                          * HD_FAIL_* kind or'ed with the errno of its failed step */
#define HD_CTL_MAX 64

/* Why a sandboxed worker could not be started (FAILED): its namespaces,
 * its user and group mapping, its file system, or dropping its privileges. */
#define HD_FAIL_JAIL_NS (1u << 16)
#define HD_FAIL_JAIL_IDS (2u << 16)
#define HD_FAIL_JAIL_MOUNT (3u << 16)
#define HD_FAIL_JAIL_PRIVS (4u << 16)
#define HD_FAIL_ERRNO 0xFFFFu

/* What a FAILED's `why` says, as a sentence, into out. */
void hd_wire_fail_text(uint32_t why, char *out, size_t n);

/* Every worker's file size limit (RLIMIT_FSIZE). */
#define HD_WORKER_FSIZE (1ull << 30)

/* Bytes of a bytecode dump that identify the VM's bytecode format. */
#define HD_BCHEAD 5

/* ---- Job frames ---------------------------------------------------------- */

/* A frame's header. */
typedef struct hd_frame {
  uint32_t len; /* body bytes after the header */
  int type;     /* HD_FRAME_* */
  uint64_t id;  /* the job's id; 0 for HELLO */
} hd_frame;

/* Reads the header at p, which holds at least HD_FRAME_HEADER bytes. */
void hd_wire_frame(const char *p, hd_frame *f);

/* A job frame as the worker reads it; pointers are into the frame. */
typedef struct hd_wire_job {
  uint64_t id, max_heap, max_output;
  const char *path, *cpath; /* NULL: the image's own paths */
  uint32_t path_len, cpath_len;
  uint32_t nenv;            /* environment variables, read with hd_wire_env_next */
  const char *env;
  size_t env_len;
  uint32_t nitems;          /* items (HD_JOB_ITEMS), read with hd_wire_item_next */
  const char *items;
  size_t items_len;
  const char *msg;          /* the codec message: the closure */
  size_t msg_len;
} hd_wire_job;

/* Starts a job frame in the empty buffer b: the header (its length is
 * filled in by hd_wire_job_end), the limits, and the module paths when
 * `path` is not NULL. Returns 0, or -1 when memory runs out. */
int hd_wire_job_begin(hd_buf *b, uint64_t id, uint64_t max_heap, uint64_t max_output,
                      const char *path, const char *cpath);

/* Adds one environment variable (after the paths, before the message). */
int hd_wire_job_env(hd_buf *b, const char *k, size_t kn, const char *v, size_t vn);

/* Starts the item list (after the environment, before the message): a u32
 * count that hd_wire_job_item_end raises. Returns 0, or -1. */
int hd_wire_job_items(hd_buf *b);

/* An item's codec message is appended between these two: begin writes its
 * length's place and returns where it is (or -1); end fills it in. */
long hd_wire_job_item_begin(hd_buf *b);
int hd_wire_job_item_end(hd_buf *b, long at);

/* Ends the frame once the codec message is appended. Returns -1 when the
 * body is larger than HD_MAX_JOB_FRAME. */
int hd_wire_job_end(hd_buf *b);

/* Reads a whole job frame (header included) of `len` bytes, checking every
 * length against what is left. Returns 0, or -1 when it is malformed. */
int hd_wire_job_parse(const char *frame, size_t len, hd_wire_job *j);

/* The next environment variable of j; 0, or -1 when there is none left. */
int hd_wire_env_next(hd_wire_job *j, const char **k, uint32_t *kn, const char **v,
                     uint32_t *vn);

/* The next item's message; 0, or -1 when there is none left. */
int hd_wire_item_next(hd_wire_job *j, const char **msg, uint32_t *len);

/* Appends an INIT frame for job `id` holding the codec message `msg`.
 * Returns 0, or -1 when memory runs out or it is too big. */
int hd_wire_init_frame(hd_buf *b, uint64_t id, const char *msg, size_t len);

/* Writes a frame header (HD_FRAME_HEADER bytes) at out. */
void hd_wire_head(char *out, int type, uint64_t id, uint32_t len);

/* A STATS frame for job `id`: HD_STATS_LEN bytes at out. */
void hd_wire_stats(char *out, uint64_t id, uint64_t cpu_ns, uint64_t heap_peak,
                   uint64_t wall_ns);
void hd_wire_stats_read(const char *body, uint64_t *cpu_ns, uint64_t *heap_peak,
                        uint64_t *wall_ns);

/* Starts a reply in b (emptied first): a blank header and the status byte;
 * the codec message follows. Returns 0, or -1 when memory runs out. */
int hd_wire_reply_begin(hd_buf *b, int status);

/* A whole reply whose message is n strings (n may be 0). */
int hd_wire_reply_strings(hd_buf *b, int status, int n, const char *const *s,
                          const size_t *len);

/* Fills in the reply's header. Returns -1 when the body does not fit the
 * header's 32-bit length. */
int hd_wire_reply_end(hd_buf *b, uint64_t id, int last);

/* Checks a whole reply body (status byte, message) from a hostile worker:
 * a status we know, a message that decodes (hd_validate_flags, with
 * `flags`), and the shape its status calls for. Returns 0, or -1 with why in `why`. */
int hd_wire_reply_check(const char *body, size_t len, int flags, char *why, size_t whylen);

/* The worker's first frame, its pid: HD_HELLO_LEN bytes at out. */
#define HD_HELLO_BODY 4
#define HD_HELLO_LEN (HD_FRAME_HEADER + HD_HELLO_BODY)
void hd_wire_hello(char *out, pid_t pid);
pid_t hd_wire_hello_pid(const char *body);

/* ---- Control messages ---------------------------------------------------- */

/* One control message. Which fields a type uses:
 *   SPAWN    id, arg = HD_SPAWN_* flags, name = the pool's name for the
 *            worker's process title, cut to HD_CTL_NAME bytes (the
 *            worker's reply pipe, stdout, stderr and job pipe attached:
 *            HD_SPAWN_FDS)
 *   KILL     id
 *   HELLO    arg = protocol version, pid, bchead
 *   SPAWNED  id, pid (a pidfd attached)
 *   EXITED   id, arg = wait status
 *   FAILED   id, arg = errno */
#define HD_CTL_NAME 40

typedef struct hd_ctl {
  int type;
  char name[HD_CTL_NAME + 1]; /* NUL-terminated */
  uint32_t id;
  uint32_t arg;
  uint32_t pid;
  size_t bchead_len;
  char bchead[HD_BCHEAD];
} hd_ctl;

/* Type numbers are per direction: a message is packed and unpacked as one
 * that goes down (host to supervisor) or up (supervisor to host). */
enum { HD_CTL_DOWN, HD_CTL_UP };

/* Packs m, going `dir`, into out (HD_CTL_MAX bytes); returns the length. */
size_t hd_wire_ctl_pack(const hd_ctl *m, int dir, char *out);

/* Unpacks n bytes that went `dir`; -1 when the message is of an unknown
 * type or too short for it. */
int hd_wire_ctl_unpack(const char *p, size_t n, int dir, hd_ctl *m);

#endif
