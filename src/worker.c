/* worker.c: the job loop of one worker process: a fresh lua_State per job. */
#include "worker.h"

#include <errno.h>
#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "alloc.h"
#include "buf.h"
#include "codec.h"
#include "proto.h"

typedef struct hd_wk {
  int fd;
  const char *path, *cpath;
  hd_alloc alloc;
  lua_State *L;
  hd_buf in;    /* the job frame being read */
  hd_buf out;   /* the reply being built */
  uint64_t job_id;
} hd_wk;

static int wk_read_full(int fd, char *p, size_t n) {
  while (n > 0) {
    ssize_t r = read(fd, p, n);
    if (r > 0) {
      p += r;
      n -= (size_t)r;
    } else if (r == 0) {
      return -1;
    } else if (errno != EINTR) {
      return -1;
    }
  }
  return 0;
}

static int wk_write_full(int fd, const char *p, size_t n) {
  while (n > 0) {
    ssize_t r = send(fd, p, n, MSG_NOSIGNAL);
    if (r >= 0) {
      p += r;
      n -= (size_t)r;
    } else if (errno != EINTR) {
      return -1;
    }
  }
  return 0;
}

/* Builds the state the next job will run in. It is built right after the
 * previous reply went out, so its cost is off the next job's critical path. */
static int wk_new_state(hd_wk *w) {
  lua_State *L;
  w->alloc.used = 0;
  w->alloc.base = 0;
  w->alloc.limit = 0;
  w->alloc.tripped = 0;
  L = lua_newstate(hd_alloc_fn, &w->alloc);
  if (L == NULL) return -1;
  luaL_openlibs(L);
  lua_getglobal(L, "package");
  lua_pushstring(L, w->path);
  lua_setfield(L, -2, "path");
  lua_pushstring(L, w->cpath);
  lua_setfield(L, -2, "cpath");
  lua_pop(L, 1);
  w->L = L;
  return 0;
}

/* Message handler: keeps the raised value as it is and records a traceback
 * beside it. It may fail when the heap limit has tripped; the worker then
 * reports OOM anyway. */
static int wk_msgh(lua_State *L) {
  luaL_traceback(L, L, NULL, 1);
  lua_setfield(L, LUA_REGISTRYINDEX, "handler.traceback");
  return 1;
}

/* Runs in protected mode: decodes the closure and calls it.
 * L: msg(lightuserdata) len(number) → results... */
static int wk_call(lua_State *L) {
  const char *p = lua_touserdata(L, 1);
  size_t len = (size_t)lua_tonumber(L, 2);
  int n;
  lua_settop(L, 0);
  n = hd_decode(L, p, len, HD_DEC_TRUSTED);
  if (n < 1) return luaL_error(L, "handler: the job carried no function");
  lua_settop(L, 1);
  lua_call(L, 0, LUA_MULTRET);
  return lua_gettop(L);
}

/* Runs in protected mode: encodes every value on the stack below the two
 * arguments into the reply. L: v1 .. vn buf(lightuserdata) */
static int wk_encode(lua_State *L) {
  hd_buf *out = lua_touserdata(L, -1);
  int n = lua_gettop(L) - 1;
  hd_encode(L, 1, n, out, 0);
  return 0;
}

static void wk_put_uv(hd_buf *b, uint64_t v) {
  char tmp[10];
  size_t n = 0;
  do {
    unsigned char c = (unsigned char)(v & 0x7f);
    v >>= 7;
    if (v) c |= 0x80;
    tmp[n++] = (char)c;
  } while (v);
  hd_buf_append(b, tmp, n);
}

/* Starts a reply with a blank header and the status byte. */
static int wk_reply_begin(hd_wk *w, int status) {
  char h[HD_FRAME_HEADER + 1];
  w->out.len = 0;
  memset(h, 0, sizeof h);
  h[HD_FRAME_HEADER] = (char)status;
  return hd_buf_append(&w->out, h, sizeof h);
}

/* A reply whose message is the single string s. */
static void wk_reply_string(hd_wk *w, int status, const char *s, size_t len) {
  wk_reply_begin(w, status);
  wk_put_uv(&w->out, 1);
  hd_buf_append(&w->out, "\4", 1);
  wk_put_uv(&w->out, len);
  hd_buf_append(&w->out, s, len);
}

static int wk_reply_send(hd_wk *w) {
  uint64_t body;
  if (w->out.len < HD_FRAME_HEADER + 1) return -1; /* out of memory while building */
  body = w->out.len - HD_FRAME_HEADER;
  if (body > UINT32_MAX) {
    const char *m = "result is larger than 4 GiB";
    wk_reply_string(w, HD_REPLY_BADRESULT, m, strlen(m));
    body = w->out.len - HD_FRAME_HEADER;
  }
  hd_put_u32(w->out.data, (uint32_t)body);
  w->out.data[4] = HD_FRAME_REPLY;
  hd_put_u64(w->out.data + 5, w->job_id);
  return wk_write_full(w->fd, w->out.data, w->out.len);
}

/* Encodes the stack [1, top] as the reply's message; on failure the reply
 * becomes OOM or BADRESULT. Returns with the stack emptied. */
static void wk_reply_values(hd_wk *w, int status) {
  lua_State *L = w->L;
  int n = lua_gettop(L), rc;
  wk_reply_begin(w, status);
  lua_pushcfunction(L, wk_encode);
  lua_insert(L, 1);
  lua_pushlightuserdata(L, &w->out);
  rc = lua_pcall(L, n + 1, 0, 0);
  if (rc == 0 && !w->alloc.tripped) return;
  if (w->alloc.tripped || rc == LUA_ERRMEM) {
    wk_reply_begin(w, HD_REPLY_OOM);
    wk_put_uv(&w->out, 0);
  } else {
    size_t len = 0;
    const char *m = lua_tolstring(L, -1, &len);
    if (m == NULL) m = "result cannot travel";
    if (len == 0) len = strlen(m);
    wk_reply_string(w, HD_REPLY_BADRESULT, m, len);
  }
  lua_settop(L, 0);
}

/* Runs one job frame already in w->in. */
static void wk_job(hd_wk *w) {
  lua_State *L = w->L;
  const char *body = w->in.data + HD_FRAME_HEADER;
  size_t len = w->in.len - HD_FRAME_HEADER;
  uint64_t heap;
  int rc;
  if (len < 8) {
    const char *m = "bad job frame";
    wk_reply_string(w, HD_REPLY_BADRESULT, m, strlen(m));
    return;
  }
  heap = hd_get_u64(body);
  lua_settop(L, 0);
  lua_pushcfunction(L, wk_msgh);
  lua_pushcfunction(L, wk_call);
  lua_pushlightuserdata(L, (void *)(body + 8));
  lua_pushnumber(L, (lua_Number)(len - 8));
  /* The limit counts from here: the standard libraries are below the
   * baseline, the closure and everything it allocates are above it. */
  hd_alloc_arm(&w->alloc, heap > SIZE_MAX ? SIZE_MAX : (size_t)heap);
  rc = lua_pcall(L, 2, LUA_MULTRET, 1);
  lua_remove(L, 1);
  if (w->alloc.tripped || rc == LUA_ERRMEM) {
    wk_reply_begin(w, HD_REPLY_OOM);
    wk_put_uv(&w->out, 0);
    return;
  }
  if (rc == 0) {
    wk_reply_values(w, HD_REPLY_OK);
    return;
  }
  /* The raised value, then its traceback. A value that cannot travel is
   * replaced by its description, so the caller still learns what happened. */
  lua_getfield(L, LUA_REGISTRYINDEX, "handler.traceback");
  if (!lua_isstring(L, -1)) {
    lua_pop(L, 1);
    lua_pushliteral(L, "");
  }
  {
    int t = lua_type(L, 1);
    if (t != LUA_TNIL && t != LUA_TBOOLEAN && t != LUA_TNUMBER && t != LUA_TSTRING &&
        t != LUA_TTABLE) {
      lua_pushfstring(L, "%s: %p", lua_typename(L, t), lua_topointer(L, 1));
      lua_replace(L, 1);
    }
  }
  lua_settop(L, 2);
  wk_reply_values(w, HD_REPLY_ERROR);
  if (w->out.len > HD_FRAME_HEADER && w->out.data[HD_FRAME_HEADER] == HD_REPLY_BADRESULT) {
    /* The raised table held something that cannot travel: send its text. */
    const char *m = "error object cannot travel";
    wk_reply_string(w, HD_REPLY_ERROR, m, strlen(m));
  }
}

int hd_worker_run(int fd, const char *path, const char *cpath) {
  hd_wk w;
  char h[HD_FRAME_HEADER];
  memset(&w, 0, sizeof w);
  w.fd = fd;
  w.path = path;
  w.cpath = cpath;
  for (;;) {
    uint32_t blen;
    if (wk_new_state(&w) != 0) return 70;
    if (wk_read_full(fd, h, sizeof h) != 0) break;
    blen = hd_get_u32(h);
    if (h[4] != HD_FRAME_JOB || blen > HD_MAX_JOB_FRAME) return 71;
    w.in.len = 0;
    if (hd_buf_append(&w.in, h, sizeof h) != 0 || hd_buf_reserve(&w.in, blen) != 0) return 72;
    if (wk_read_full(fd, w.in.data + w.in.len, blen) != 0) break;
    w.in.len += blen;
    w.job_id = hd_get_u64(h + 5);
    wk_job(&w);
    /* A job's output reaches the host before its result does; the worker
     * leaves with _exit, which would drop anything still buffered. */
    fflush(NULL);
    if (wk_reply_send(&w) != 0) break;
    lua_close(w.L);
    w.L = NULL;
    /* Big frames are not kept around between jobs. */
    if (w.in.cap > (1u << 20)) hd_buf_free(&w.in);
    if (w.out.cap > (1u << 20)) hd_buf_free(&w.out);
  }
  if (w.L) lua_close(w.L);
  hd_buf_free(&w.in);
  hd_buf_free(&w.out);
  return 0;
}
