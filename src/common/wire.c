/* wire.c: packs and unpacks every job frame and control message. */
#include "wire.h"

#include <stdio.h>
#include <string.h>

#include "codec.h"

/* Offsets in a job frame's body: the limits, then the flags byte. */
#define WIRE_JOB_HEAP 0
#define WIRE_JOB_OUTPUT 8
#define WIRE_JOB_FLAGS 16
#define WIRE_JOB_FIXED 17

/* Offsets in a control message: the type byte, then its fields. */
#define WIRE_CTL_ID 1
#define WIRE_CTL_ARG 5
#define WIRE_CTL_HELLO_PID 5
#define WIRE_CTL_HELLO_N 9
#define WIRE_CTL_HELLO_BC 10

void hd_wire_frame(const char *p, hd_frame *f) {
  f->len = hd_get_u32(p);
  f->type = (unsigned char)p[4];
  f->id = hd_get_u64(p + 5);
}

static void wire_put_head(char *p, int type, uint64_t id, uint32_t len) {
  hd_put_u32(p, len);
  p[4] = (char)type;
  hd_put_u64(p + 5, id);
}

/* Appends a u32 length and the bytes. */
static int wire_put_str(hd_buf *b, const char *s, size_t n) {
  char h[4];
  if (n > UINT32_MAX) return -1;
  hd_put_u32(h, (uint32_t)n);
  return hd_buf_append(b, h, sizeof h) || hd_buf_append(b, s, n) ? -1 : 0;
}

int hd_wire_job_begin(hd_buf *b, uint64_t id, uint64_t max_heap, uint64_t max_output,
                      const char *path, const char *cpath) {
  char *h;
  b->len = 0;
  if (hd_buf_reserve(b, HD_FRAME_HEADER + WIRE_JOB_FIXED) != 0) return -1;
  h = b->data;
  wire_put_head(h, HD_FRAME_JOB, id, 0);
  hd_put_u64(h + HD_FRAME_HEADER + WIRE_JOB_HEAP, max_heap);
  hd_put_u64(h + HD_FRAME_HEADER + WIRE_JOB_OUTPUT, max_output);
  h[HD_FRAME_HEADER + WIRE_JOB_FLAGS] = 0;
  b->len = HD_FRAME_HEADER + WIRE_JOB_FIXED;
  if (path == NULL) return 0;
  b->data[HD_FRAME_HEADER + WIRE_JOB_FLAGS] |= HD_JOB_PATHS;
  return wire_put_str(b, path, strlen(path)) || wire_put_str(b, cpath ? cpath : "", cpath ? strlen(cpath) : 0) ? -1 : 0;
}

/* The environment's count sits right after the fixed part and the paths:
 * where it is, read back from the frame built so far. */
static size_t wire_env_at(const hd_buf *b) {
  size_t at = HD_FRAME_HEADER + WIRE_JOB_FIXED;
  int k;
  if (b->data[HD_FRAME_HEADER + WIRE_JOB_FLAGS] & HD_JOB_PATHS)
    for (k = 0; k < 2; k++) at += 4 + hd_get_u32(b->data + at);
  return at;
}

int hd_wire_job_env(hd_buf *b, const char *k, size_t kn, const char *v, size_t vn) {
  size_t at = wire_env_at(b);
  if (!(b->data[HD_FRAME_HEADER + WIRE_JOB_FLAGS] & HD_JOB_ENV)) {
    char zero[4] = {0, 0, 0, 0};
    if (b->len != at || hd_buf_append(b, zero, sizeof zero) != 0) return -1;
    b->data[HD_FRAME_HEADER + WIRE_JOB_FLAGS] |= HD_JOB_ENV;
  }
  if (wire_put_str(b, k, kn) != 0 || wire_put_str(b, v, vn) != 0) return -1;
  hd_put_u32(b->data + at, hd_get_u32(b->data + at) + 1);
  return 0;
}

/* Where the item count sits: right after the environment, which (when
 * there is one) is the last thing before it. Recorded in the frame's
 * header's length field until hd_wire_job_end fills that in. */
int hd_wire_job_items(hd_buf *b) {
  char zero[4] = {0, 0, 0, 0};
  if (b->data[HD_FRAME_HEADER + WIRE_JOB_FLAGS] & HD_JOB_ITEMS) return -1;
  if (b->len - HD_FRAME_HEADER > UINT32_MAX) return -1;
  hd_put_u32(b->data, (uint32_t)(b->len - HD_FRAME_HEADER));
  if (hd_buf_append(b, zero, sizeof zero) != 0) return -1;
  b->data[HD_FRAME_HEADER + WIRE_JOB_FLAGS] |= HD_JOB_ITEMS;
  return 0;
}

long hd_wire_job_item_begin(hd_buf *b) {
  char zero[4] = {0, 0, 0, 0};
  size_t at = b->len;
  if (!(b->data[HD_FRAME_HEADER + WIRE_JOB_FLAGS] & HD_JOB_ITEMS)) return -1;
  if (hd_buf_append(b, zero, sizeof zero) != 0) return -1;
  return (long)at;
}

int hd_wire_job_item_end(hd_buf *b, long at) {
  size_t count = HD_FRAME_HEADER + hd_get_u32(b->data);
  size_t len = b->len - (size_t)at - 4;
  uint32_t n = hd_get_u32(b->data + count);
  if (len > UINT32_MAX || n >= HD_MAX_ITEMS) return -1;
  hd_put_u32(b->data + at, (uint32_t)len);
  hd_put_u32(b->data + count, n + 1);
  return 0;
}

int hd_wire_job_end(hd_buf *b) {
  size_t body = b->len - HD_FRAME_HEADER;
  if (body > HD_MAX_JOB_FRAME) return -1;
  hd_put_u32(b->data, (uint32_t)body);
  return 0;
}

/* Reads a frame's parts, checking every length against what is left. */
typedef struct wire_rd {
  const char *p;
  size_t left;
  int bad;
} wire_rd;

static const char *wire_take(wire_rd *r, size_t n) {
  const char *p = r->p;
  if (r->bad || n > r->left) {
    r->bad = 1;
    return NULL;
  }
  r->p += n;
  r->left -= n;
  return p;
}

static uint32_t wire_take_u32(wire_rd *r) {
  const char *p = wire_take(r, 4);
  return p ? hd_get_u32(p) : 0;
}

/* A u32 length and that many bytes; returns them, or NULL. */
static const char *wire_take_str(wire_rd *r, uint32_t *n) {
  *n = wire_take_u32(r);
  return wire_take(r, *n);
}

int hd_wire_job_parse(const char *frame, size_t len, hd_wire_job *j) {
  wire_rd r;
  hd_frame f;
  const char *fixed;
  int flags;
  memset(j, 0, sizeof *j);
  if (len < HD_FRAME_HEADER) return -1;
  hd_wire_frame(frame, &f);
  if (f.type != HD_FRAME_JOB || (size_t)f.len != len - HD_FRAME_HEADER) return -1;
  r.p = frame + HD_FRAME_HEADER;
  r.left = f.len;
  r.bad = 0;
  j->id = f.id;
  fixed = wire_take(&r, WIRE_JOB_FIXED);
  if (fixed == NULL) return -1;
  j->max_heap = hd_get_u64(fixed + WIRE_JOB_HEAP);
  j->max_output = hd_get_u64(fixed + WIRE_JOB_OUTPUT);
  flags = (unsigned char)fixed[WIRE_JOB_FLAGS];
  if (flags & HD_JOB_PATHS) {
    j->path = wire_take_str(&r, &j->path_len);
    j->cpath = wire_take_str(&r, &j->cpath_len);
  }
  if (flags & HD_JOB_ENV) {
    uint32_t i;
    j->nenv = wire_take_u32(&r);
    j->env = r.p;
    /* Checked now, so that hd_wire_env_next cannot fail halfway. */
    for (i = 0; i < j->nenv && !r.bad; i++) {
      uint32_t n;
      wire_take_str(&r, &n);
      wire_take_str(&r, &n);
    }
    j->env_len = (size_t)(r.p - j->env);
  }
  if (flags & HD_JOB_ITEMS) {
    uint32_t i;
    j->nitems = wire_take_u32(&r);
    j->items = r.p;
    /* An empty list is no list: a frame has at least one item to run. */
    if (j->nitems == 0 || j->nitems > HD_MAX_ITEMS) return -1;
    for (i = 0; i < j->nitems && !r.bad; i++) {
      uint32_t n;
      wire_take_str(&r, &n);
    }
    j->items_len = (size_t)(r.p - j->items);
  }
  if (r.bad) return -1;
  j->msg = r.p;
  j->msg_len = r.left;
  return 0;
}

int hd_wire_env_next(hd_wire_job *j, const char **k, uint32_t *kn, const char **v,
                     uint32_t *vn) {
  wire_rd r;
  if (j->nenv == 0) return -1;
  r.p = j->env;
  r.left = j->env_len;
  r.bad = 0;
  *k = wire_take_str(&r, kn);
  *v = wire_take_str(&r, vn);
  if (r.bad) return -1;
  j->nenv--;
  j->env = r.p;
  j->env_len = r.left;
  return 0;
}

int hd_wire_item_next(hd_wire_job *j, const char **msg, uint32_t *len) {
  wire_rd r;
  if (j->nitems == 0) return -1;
  r.p = j->items;
  r.left = j->items_len;
  r.bad = 0;
  *msg = wire_take_str(&r, len);
  if (r.bad) return -1;
  j->nitems--;
  j->items = r.p;
  j->items_len = r.left;
  return 0;
}

void hd_wire_head(char *out, int type, uint64_t id, uint32_t len) {
  wire_put_head(out, type, id, len);
}

void hd_wire_stats(char *out, uint64_t id, uint64_t cpu_ns, uint64_t heap_peak,
                   uint64_t wall_ns) {
  wire_put_head(out, HD_FRAME_STATS, id, HD_STATS_BODY);
  hd_put_u64(out + HD_FRAME_HEADER, cpu_ns);
  hd_put_u64(out + HD_FRAME_HEADER + 8, heap_peak);
  hd_put_u64(out + HD_FRAME_HEADER + 16, wall_ns);
}

void hd_wire_stats_read(const char *body, uint64_t *cpu_ns, uint64_t *heap_peak,
                        uint64_t *wall_ns) {
  *cpu_ns = hd_get_u64(body);
  *heap_peak = hd_get_u64(body + 8);
  *wall_ns = hd_get_u64(body + 16);
}

int hd_wire_init_frame(hd_buf *b, uint64_t id, const char *msg, size_t len) {
  char h[HD_FRAME_HEADER];
  if (len > HD_MAX_JOB_FRAME) return -1;
  wire_put_head(h, HD_FRAME_INIT, id, (uint32_t)len);
  return hd_buf_append(b, h, sizeof h) || hd_buf_append(b, msg, len) ? -1 : 0;
}

int hd_wire_reply_begin(hd_buf *b, int status) {
  char h[HD_FRAME_HEADER + 1];
  b->len = 0;
  memset(h, 0, sizeof h);
  h[HD_FRAME_HEADER] = (char)status;
  return hd_buf_append(b, h, sizeof h);
}

int hd_wire_reply_strings(hd_buf *b, int status, int n, const char *const *s,
                          const size_t *len) {
  if (hd_wire_reply_begin(b, status) != 0 || hd_encode_strings(b, n, s, len) != 0) {
    b->len = 0;
    return -1;
  }
  return 0;
}

int hd_wire_reply_end(hd_buf *b, uint64_t id, int last) {
  uint64_t body;
  if (b->len < HD_FRAME_HEADER + 1) return -1; /* out of memory while building */
  body = b->len - HD_FRAME_HEADER;
  if (body > UINT32_MAX) return -1;
  wire_put_head(b->data, last ? HD_FRAME_REPLY_LAST : HD_FRAME_REPLY, id, (uint32_t)body);
  return 0;
}

/* Whether a valid message has the shape its status calls for: OOM carries
 * nothing, BADRESULT one string, ERROR the raised value and its traceback. */
static int wire_reply_shaped(int status, const char *msg, size_t len) {
  hd_msg_info mi;
  hd_msg_info_of(msg, len, &mi);
  switch (status) {
    case HD_REPLY_OOM: return mi.count == 0;
    case HD_REPLY_BADRESULT: return mi.count == 1 && mi.first_is_string;
    case HD_REPLY_ERROR: return mi.count == 2;
    default: return 1;
  }
}

int hd_wire_reply_check(const char *body, size_t len, int flags, char *why, size_t whylen) {
  int status;
  if (len < 1) {
    snprintf(why, whylen, "empty reply");
    return -1;
  }
  status = (unsigned char)body[0];
  if (status > HD_REPLY_BADRESULT) {
    snprintf(why, whylen, "unknown reply status %u", (unsigned)status);
    return -1;
  }
  /* About a nanosecond a byte, no Lua state needed. */
  if (hd_validate_flags(body + 1, len - 1, flags, why, whylen) != 0) return -1;
  if (!wire_reply_shaped(status, body + 1, len - 1)) {
    snprintf(why, whylen, "reply of the wrong shape for its status");
    return -1;
  }
  return 0;
}

void hd_wire_fail_text(uint32_t why, char *out, size_t n) {
  const char *kind;
  int err = (int)(why & HD_FAIL_ERRNO);
  switch (why & ~HD_FAIL_ERRNO) {
    case HD_FAIL_JAIL_NS:
      kind = "a sandboxed worker needs namespaces of its own, and this system refused them "
             "(unprivileged user namespaces disabled: kernel.unprivileged_userns_clone = 0 "
             "or user.max_user_namespaces = 0?)";
      break;
    case HD_FAIL_JAIL_IDS: kind = "a sandboxed worker's user and group could not be mapped"; break;
    case HD_FAIL_JAIL_MOUNT: kind = "a sandboxed worker's file system could not be set up"; break;
    case HD_FAIL_JAIL_PRIVS: kind = "a sandboxed worker's privileges could not be dropped"; break;
    default: kind = NULL; break;
  }
  if (kind != NULL) snprintf(out, n, "%s: %s", kind, strerror(err));
  else snprintf(out, n, "%s", strerror((int)why));
}

void hd_wire_hello(char *out, pid_t pid) {
  wire_put_head(out, HD_FRAME_HELLO, 0, HD_HELLO_BODY);
  hd_put_u32(out + HD_FRAME_HEADER, (uint32_t)pid);
}

pid_t hd_wire_hello_pid(const char *body) {
  return (pid_t)hd_get_u32(body);
}

size_t hd_wire_ctl_pack(const hd_ctl *m, int dir, char *out) {
  out[0] = (char)m->type;
  if (dir == HD_CTL_UP && m->type == HD_CTL_HELLO) {
    size_t n = m->bchead_len < HD_BCHEAD ? m->bchead_len : HD_BCHEAD;
    hd_put_u32(out + WIRE_CTL_ID, m->arg);
    hd_put_u32(out + WIRE_CTL_HELLO_PID, m->pid);
    out[WIRE_CTL_HELLO_N] = (char)n;
    memcpy(out + WIRE_CTL_HELLO_BC, m->bchead, n);
    return WIRE_CTL_HELLO_BC + n;
  }
  hd_put_u32(out + WIRE_CTL_ID, m->id);
  if (dir == HD_CTL_DOWN) {
    size_t n;
    if (m->type == HD_CTL_KILL) return WIRE_CTL_ARG;
    n = strnlen(m->name, HD_CTL_NAME);
    out[WIRE_CTL_ARG] = (char)m->arg;
    memcpy(out + WIRE_CTL_ARG + 1, m->name, n);
    return WIRE_CTL_ARG + 1 + n;
  }
  hd_put_u32(out + WIRE_CTL_ARG, m->type == HD_CTL_SPAWNED ? m->pid : m->arg);
  return WIRE_CTL_ARG + 4;
}

int hd_wire_ctl_unpack(const char *p, size_t n, int dir, hd_ctl *m) {
  memset(m, 0, sizeof *m);
  if (n < 1) return -1;
  m->type = (unsigned char)p[0];
  if (dir == HD_CTL_DOWN) {
    if (n < WIRE_CTL_ARG || (m->type != HD_CTL_SPAWN && m->type != HD_CTL_KILL)) return -1;
    m->id = hd_get_u32(p + WIRE_CTL_ID);
    if (m->type == HD_CTL_SPAWN && n > WIRE_CTL_ARG) {
      size_t k = n - WIRE_CTL_ARG - 1;
      m->arg = (unsigned char)p[WIRE_CTL_ARG];
      if (k > HD_CTL_NAME) k = HD_CTL_NAME;
      memcpy(m->name, p + WIRE_CTL_ARG + 1, k);
      m->name[k] = '\0';
    }
    return 0;
  }
  if (m->type == HD_CTL_HELLO) {
    /* A short or odd hello is still a hello: the host refuses it by its
     * version or its bytecode header, saying which. */
    if (n >= WIRE_CTL_ID + 4) m->arg = hd_get_u32(p + WIRE_CTL_ID);
    if (n >= WIRE_CTL_HELLO_BC) {
      size_t k = (unsigned char)p[WIRE_CTL_HELLO_N];
      m->pid = hd_get_u32(p + WIRE_CTL_HELLO_PID);
      m->bchead_len = k;
      if (k > HD_BCHEAD || WIRE_CTL_HELLO_BC + k > n) m->bchead_len = (size_t)-1;
      else memcpy(m->bchead, p + WIRE_CTL_HELLO_BC, k);
    } else {
      m->bchead_len = (size_t)-1;
    }
    return 0;
  }
  if (n < WIRE_CTL_ARG + 4 ||
      (m->type != HD_CTL_SPAWNED && m->type != HD_CTL_EXITED && m->type != HD_CTL_FAILED))
    return -1;
  m->id = hd_get_u32(p + WIRE_CTL_ID);
  if (m->type == HD_CTL_SPAWNED) m->pid = hd_get_u32(p + WIRE_CTL_ARG);
  else m->arg = hd_get_u32(p + WIRE_CTL_ARG);
  return 0;
}
