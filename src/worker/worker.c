/* worker.c: the job loop of one worker process: a fresh lua_State per job. */
#include "worker.h"

#include <dlfcn.h>
#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>
#include <luajit.h>
#include <malloc.h>
#include <stdint.h>
#include <stdio.h>
#include <stdio_ext.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "affinity.h"
#include "alloc.h"
#include "buf.h"
#include "codec.h"
#include "hold.h"
#include "sandbox.h"
#include "weak.h"
#include "wire.h"

typedef struct hd_wk {
  int fd;               /* the reply pipe: frames to the host */
  int job_fd;           /* the job pipe: frames from the host */
  int solo;             /* confined to one CPU: waits without polling */
  unsigned jobs;        /* jobs served, for the periodic looks below */
  hd_alloc alloc;
  lua_State *L;
  char host_cwd[PATH_MAX]; /* the host's directory, before the private one */
  int env_set;          /* the job set environment variables */
  uint64_t data_limit;  /* the RLIMIT_DATA in force */
  int sandbox;          /* the sandbox profile is in force */
  int trim;             /* give memory back once idle */
  int out_spliced;      /* `out` went by vmsplice: unread by the host, maybe */
  int back_to_back;     /* the last job came right after the reply before it */
  uint64_t replied_at;  /* when the last reply went out, ns */
  hd_buf in;    /* the job frame being read */
  hd_buf out;   /* the reply being built */
  uint64_t job_id;
  size_t frame_len;     /* bytes of the job frame at the start of `in` */
  int inited;           /* its pool's init ran (or it has none and a job came) */
  uint64_t cpu_base;    /* the process's CPU time at a reply, ns */
  uint64_t cpu_base_at; /* CLOCK_MONOTONIC when cpu_base was read, ns */
  uint64_t cpu_since;   /* wall time since cpu_base that quick items took, ns */
  uint64_t job_start;   /* CLOCK_MONOTONIC when the job (item) began, ns */
  uint64_t sent_at;     /* CLOCK_MONOTONIC when held replies last went out */
  int no_hold;          /* the job's replies are not held (WK_HOLD_OUTPUT) */
  char init_err[512];   /* why the init failed, or "" */
} hd_wk;

/* Bytes a read from the job pipe asks for at least. */
#define WK_READ_CHUNK 65536
/* The pristine state's region: the standard libraries and what the image
 * adds fit in a fraction of it; pages never touched cost nothing. */
#define WK_REGION_BYTES (64u << 20)
/* malloc keeps big blocks in the heap and does not trim by itself: memory
 * stays warm across jobs and goes back when the worker is idle. */
#define WK_MMAP_THRESHOLD (256 << 20)
#define WK_TRIM_THRESHOLD (1 << 30)
/* The longest a reply is held (hold.c), within what the host allows. */
#define WK_HOLD_NS ((uint64_t)HD_ITEM_HOLD_MS * 1000000u)
/* The host counts an item's output from the reply before it, so output
 * that overtakes a held reply counts against the item before. A job whose
 * items may write less than this each holds nothing; above it, what the
 * items after a held reply write within a millisecond cannot come near
 * the limit. Output still buffered at an item's end goes out after the
 * replies held (hd_worker_run). */
#define WK_HOLD_OUTPUT (1u << 20)
/* A job that arrives within this long of the last reply came back to back. */
#define WK_BACK_TO_BACK_NS 200000
/* Idle for this long after a job whose heap grew by WK_TRIM_AFTER, or that
 * grew the I/O buffers, a worker gives memory back. After a smaller job
 * there is little to give, and waiting with a timeout costs a system call
 * on every round trip. */
#define WK_IDLE_TRIM_MS 200
#define WK_TRIM_AFTER (1u << 20)

/* The worker process's one context. It is a static because the pristine
 * state must sit at the same address in the supervisor, which builds it, and
 * in every worker forked from it; the Lua module itself keeps no globals. */
static hd_wk wk;

/* Mappings made while a job runs: the JIT's machine code areas. The restored
 * state no longer knows them, so they are unmapped with the restore. */
#define WK_MAPS 64
static struct {
  int tracking;
  int n;
  void *addr[WK_MAPS];
  size_t len[WK_MAPS];
} wk_maps;

/* libluajit calls mmap64 and munmap through the PLT; these definitions in
 * the executable come first, so the worker sees every mapping it makes. */
__attribute__((visibility("default"))) void *mmap64(void *addr, size_t len, int prot, int flags,
                                                    int fd, off_t off) {
  void *p = (void *)syscall(SYS_mmap, addr, len, prot, flags, fd, off);
  if (p != MAP_FAILED && wk_maps.tracking) {
    if (wk_maps.n < WK_MAPS) {
      wk_maps.addr[wk_maps.n] = p;
      wk_maps.len[wk_maps.n] = len;
      wk_maps.n++;
    } else {
      wk.alloc.taint = 1;
    }
  }
  return p;
}

__attribute__((visibility("default"))) int munmap(void *addr, size_t len) {
  int i;
  for (i = 0; i < wk_maps.n; i++) {
    if (wk_maps.addr[i] == addr) {
      wk_maps.n--;
      wk_maps.addr[i] = wk_maps.addr[wk_maps.n];
      wk_maps.len[i] = wk_maps.len[wk_maps.n];
      break;
    }
  }
  return (int)syscall(SYS_munmap, addr, len);
}

/* The JIT registers unwind information for each machine code area with
 * libgcc (__register_frame), which keeps it in process-global lists. A
 * restored state forgets the areas, so their registrations are dropped with
 * them; an unwinder walking a stale one would crash the next raised error. */
#define WK_FRAMES 64
static struct {
  void (*reg)(void *);
  void (*dereg)(void *);
  int n;
  void *info[WK_FRAMES];
} wk_frames;

static void wk_frames_resolve(void) {
  *(void **)&wk_frames.reg = dlvsym(RTLD_NEXT, "__register_frame", "GCC_3.0");
  *(void **)&wk_frames.dereg = dlvsym(RTLD_NEXT, "__deregister_frame", "GCC_3.0");
  if (wk_frames.reg == NULL) *(void **)&wk_frames.reg = dlsym(RTLD_NEXT, "__register_frame");
  if (wk_frames.dereg == NULL) *(void **)&wk_frames.dereg = dlsym(RTLD_NEXT, "__deregister_frame");
}

__attribute__((visibility("default"))) void __register_frame(void *info) {
  if (wk_frames.reg == NULL) wk_frames_resolve();
  if (wk_maps.tracking) {
    if (wk_frames.n < WK_FRAMES) wk_frames.info[wk_frames.n++] = info;
    else wk.alloc.taint = 1;
  }
  if (wk_frames.reg) wk_frames.reg(info);
}

__attribute__((visibility("default"))) void __deregister_frame(void *info) {
  int i;
  if (wk_frames.dereg == NULL) wk_frames_resolve();
  for (i = 0; i < wk_frames.n; i++) {
    if (wk_frames.info[i] == info) {
      wk_frames.info[i] = wk_frames.info[--wk_frames.n];
      break;
    }
  }
  if (wk_frames.dereg) wk_frames.dereg(info);
}

/* ---- The start-up self-test of the interposition -----------------------
 * Unmapping a job's machine code works only if LuaJIT's calls reach the
 * definitions above: a libluajit linked with direct calls, or a static one
 * bound to the C library's, would bypass them, and every job's traces would
 * stay mapped for the life of the worker. The supervisor checks once, in a
 * throwaway state, that compiling a trace goes through them (about 0.3 ms);
 * if not, it says so on stderr and the image runs with the JIT off. */

/* Set in the host's environment (which the supervisor inherits): the
 * self-test fails, for the specs of the fallback. */
#define WK_FORCE_NO_INTERPOSE "HANDLER_TEST_NO_INTERPOSE"

/* Hot enough to compile one trace with the default parameters (hotloop=56);
 * returns the trace's machine code address, 0 when the JIT is off (nothing
 * to track then), or nothing when no trace was made. */
static const char wk_selftest_chunk[] =
    "if not jit.status() then return 0 end\n"
    "local s = 0\n"
    "for i = 1, 1000 do s = s + i end\n"
    "local _, addr = require('jit.util').tracemc(1)\n"
    "return addr\n";

/* libgcc's lookup of unwind information: it finds what was registered with
 * __register_frame, whether or not that went through the definition above. */
struct wk_eh_bases {
  void *tbase, *dbase, *func;
};
typedef const void *(*wk_find_fde_fn)(void *pc, struct wk_eh_bases *bases);

static void *wk_plain_alloc(void *ud, void *ptr, size_t osize, size_t nsize) {
  (void)ud;
  (void)osize;
  if (nsize == 0) {
    free(ptr);
    return NULL;
  }
  return realloc(ptr, nsize);
}

/* Whether the code at addr lies in a mapping made through mmap64 above, and
 * its unwind information, if the JIT registered any, through
 * __register_frame above. */
static int wk_tracked(uintptr_t addr) {
  wk_find_fde_fn find;
  struct wk_eh_bases bases;
  int i, mapped = 0;
  for (i = 0; i < wk_maps.n; i++)
    if (addr >= (uintptr_t)wk_maps.addr[i] && addr - (uintptr_t)wk_maps.addr[i] < wk_maps.len[i])
      mapped = 1;
  if (!mapped) return 0;
  *(void **)&find = dlsym(RTLD_DEFAULT, "_Unwind_Find_FDE");
  if (find != NULL && wk_frames.n == 0 && find((void *)(addr + 1), &bases) != NULL) return 0;
  return 1;
}

/* Returns 1 when jobs may use the JIT: its machine code is tracked. */
static int wk_jit_selftest(void) {
  const char *force = getenv(WK_FORCE_NO_INTERPOSE);
  lua_State *L;
  int ok = 0;
  if (force != NULL && strcmp(force, "1") == 0) return 0;
  L = lua_newstate(wk_plain_alloc, NULL);
  if (L == NULL) return 0;
  luaL_openlibs(L);
  wk_maps.n = 0;
  wk_frames.n = 0;
  wk_maps.tracking = 1;
  if (luaL_loadbuffer(L, wk_selftest_chunk, sizeof wk_selftest_chunk - 1, "=selftest") == 0 &&
      lua_pcall(L, 0, 1, 0) == 0 && lua_isnumber(L, -1)) {
    lua_Number addr = lua_tonumber(L, -1);
    ok = addr == 0 || (addr > 0 && wk_tracked((uintptr_t)addr));
  }
  wk_maps.tracking = 0;
  /* Closing unmaps the trace through munmap above, which forgets it. */
  lua_close(L);
  wk_maps.n = 0;
  wk_frames.n = 0;
  return ok;
}

static void wk_unmap_job(void) {
  int i;
  for (i = 0; i < wk_frames.n; i++)
    if (wk_frames.dereg) wk_frames.dereg(wk_frames.info[i]);
  wk_frames.n = 0;
  for (i = 0; i < wk_maps.n; i++) syscall(SYS_munmap, wk_maps.addr[i], wk_maps.len[i]);
  wk_maps.n = 0;
}

/* Reads what the job pipe has, at least one byte; -1 at EOF or error. One
 * read usually brings a whole job frame. */
static int wk_fill(hd_wk *w) {
  for (;;) {
    ssize_t r;
    if (hd_buf_reserve(&w->in, WK_READ_CHUNK) != 0) return -1;
    r = read(w->job_fd, w->in.data + w->in.len, w->in.cap - w->in.len);
    if (r > 0) {
      w->in.len += (size_t)r;
      return 0;
    }
    if (r == 0 || errno != EINTR) return -1;
  }
}

/* Writes n bytes to the reply pipe, whole; with `splice`, by vmsplice: the
 * pipe takes the pages, not a copy, and they must not change until the host
 * has read them (WK_SPLICE_MIN). A write once the host has gone raises
 * SIGPIPE, which ends the worker: nothing is left to serve. */
static int wk_write_full(int fd, const char *p, size_t n, int splice) {
  while (n > 0) {
    ssize_t r;
    if (splice) {
      struct iovec iov;
      iov.iov_base = (void *)p;
      iov.iov_len = n;
      r = vmsplice(fd, &iov, 1, 0);
    } else {
      r = write(fd, p, n);
    }
    if (r > 0) {
      p += r;
      n -= (size_t)r;
    } else if (r == 0 || errno != EINTR) {
      return -1;
    }
  }
  return 0;
}

/* Calls the wrapped function (upvalue 1) with the wrapper's arguments and
 * returns what it returns. */
static int wk_call_wrapped(lua_State *L) {
  lua_pushvalue(L, lua_upvalueindex(1));
  lua_insert(L, 1);
  lua_call(L, lua_gettop(L) - 1, LUA_MULTRET);
  return lua_gettop(L);
}

/* Marks the worker tainted: it exits after this job's reply. What the
 * items before this one replied goes out first (hold.c): the command, C
 * library or FFI call about to run may write output, signal the worker or
 * sleep, and none of that must land on an earlier item. */
static void wk_taint(lua_State *L) {
  void *ud;
  lua_getallocf(L, &ud);
  ((hd_alloc *)ud)->taint = 1;
  (void)hd_hold_send();
  hd_hold_timer(0);
}

/* A wrapper that marks the worker tainted, then calls the wrapped function
 * (upvalue 1). Functions that reach state outside the Lua heap (files,
 * processes, C libraries, the FFI, the locale) are wrapped: after a job that
 * called one, the worker closes its state properly and exits, and a fresh
 * process takes its place. */
static int wk_tainting(lua_State *L) {
  wk_taint(L);
  return wk_call_wrapped(L);
}

/* debug.getupvalue and setupvalue taint for a C function: the upvalues of
 * the wrappers here are the functions they wrap (the real getregistry,
 * the FFI's loader), which would otherwise reach the job untainted. */
static int wk_c_upvalue_guard(lua_State *L) {
  if (lua_iscfunction(L, 1)) wk_taint(L);
  return wk_call_wrapped(L);
}

/* A level on the caller's own stack (a number first argument) counts one
 * frame more for the wrapped function: the wrapper's frame sits between. */
static void wk_level_past_wrapper(lua_State *L) {
  if (lua_type(L, 1) != LUA_TNUMBER) return;
  lua_pushnumber(L, lua_tonumber(L, 1) + 1);
  lua_replace(L, 1);
}

/* debug.getlocal and setlocal: a C frame's slots hold what C code holds
 * (a finalizer running inside the encoder could read its tables). */
static int wk_level_tainting(lua_State *L) {
  wk_taint(L);
  wk_level_past_wrapper(L);
  return wk_call_wrapped(L);
}

/* debug.getinfo of a frame (by level, from a hook or a finalizer, say)
 * taints when it gives out a C function: while a wrapper runs, the
 * function it wraps has a frame of its own, and its `func` is that
 * function, unwrapped. */
static int wk_getinfo_guard(lua_State *L) {
  int by_level = lua_type(L, 1) == LUA_TNUMBER ||
                 (lua_type(L, 1) == LUA_TTHREAD && lua_type(L, 2) == LUA_TNUMBER);
  int n;
  wk_level_past_wrapper(L);
  n = wk_call_wrapped(L);
  if (by_level && n > 0 && lua_istable(L, -1)) {
    lua_getfield(L, -1, "func");
    if (lua_iscfunction(L, -1)) wk_taint(L);
    lua_pop(L, 1);
  }
  return n;
}

/* load and loadstring taint only for bytecode or a reader function. */
static int wk_load_guard(lua_State *L) {
  const char *s = lua_tostring(L, 1);
  if (s == NULL || s[0] == LUA_SIGNATURE[0]) {
    wk_taint(L);
  }
  return wk_call_wrapped(L);
}

/* Replaces t[name] (t at index idx) by a wrapper around it. */
static void wk_wrap(lua_State *L, int idx, const char *name, lua_CFunction w) {
  lua_getfield(L, idx, name);
  if (lua_isnil(L, -1)) {
    lua_pop(L, 1);
    return;
  }
  lua_pushcclosure(L, w, 1);
  lua_setfield(L, idx < 0 ? idx - 1 : idx, name);
}

/* Files a job opens are tracked (a weak table in the registry, part of the
 * image, so empty at every job's start) and closed after the job: flushed
 * before the caller sees the result, and no descriptor outlives the job. */
static char wk_files_key;

static void wk_track_file(lua_State *L, int idx) {
  if (lua_type(L, idx) != LUA_TUSERDATA || !lua_getmetatable(L, idx)) return;
  luaL_getmetatable(L, "FILE*");
  if (lua_rawequal(L, -1, -2)) {
    lua_pushlightuserdata(L, &wk_files_key);
    lua_rawget(L, LUA_REGISTRYINDEX);
    lua_pushvalue(L, idx);
    lua_pushboolean(L, 1);
    lua_rawset(L, -3);
    lua_pop(L, 1);
  }
  lua_pop(L, 2);
}

/* io.open, io.tmpfile: the original (upvalue 1), then the file is tracked. */
static int wk_file_opener(lua_State *L) {
  lua_pushvalue(L, lua_upvalueindex(1));
  lua_insert(L, 1);
  lua_call(L, lua_gettop(L) - 1, LUA_MULTRET);
  if (lua_gettop(L) >= 1) wk_track_file(L, 1);
  return lua_gettop(L);
}

/* io.input, io.output: with a file name they open one, which they return. */
static int wk_default_file(lua_State *L) {
  int named = lua_type(L, 1) == LUA_TSTRING;
  lua_pushvalue(L, lua_upvalueindex(1));
  lua_insert(L, 1);
  lua_call(L, lua_gettop(L) - 1, LUA_MULTRET);
  if (named && lua_gettop(L) >= 1) wk_track_file(L, 1);
  return lua_gettop(L);
}

/* Whether the value at idx is io.stdin, io.stdout or io.stderr (upvalues 2-4). */
static int wk_is_stdio(lua_State *L, int idx) {
  int k;
  for (k = 2; k <= 4; k++)
    if (lua_rawequal(L, idx, lua_upvalueindex(k))) return 1;
  return 0;
}

/* io.close and a file's close and setvbuf: the process's stdio is process
 * state (the next job prints through it); other files are the job's own. */
static int wk_stdio_guard(lua_State *L) {
  int top = lua_gettop(L);
  if (top == 0 || wk_is_stdio(L, 1)) {
    wk_taint(L);
  }
  lua_pushvalue(L, lua_upvalueindex(1));
  lua_insert(L, 1);
  lua_call(L, top, LUA_MULTRET);
  return lua_gettop(L);
}

static void wk_wrap_stdio(lua_State *L, int t, const char *name, int io) {
  lua_getfield(L, t, name);
  if (lua_isnil(L, -1)) {
    lua_pop(L, 1);
    return;
  }
  lua_getfield(L, io, "stdin");
  lua_getfield(L, io, "stdout");
  lua_getfield(L, io, "stderr");
  lua_pushcclosure(L, wk_stdio_guard, 4);
  lua_setfield(L, t, name);
}

/* Runs in protected mode after a job: closes the files it left open. */
static int wk_close_files_p(lua_State *L) {
  lua_pushlightuserdata(L, &wk_files_key);
  lua_rawget(L, LUA_REGISTRYINDEX);
  lua_pushnil(L);
  while (lua_next(L, -2) != 0) {
    /* L: files file true */
    lua_pop(L, 1);
    lua_getfield(L, -1, "close");
    lua_pushvalue(L, -2);
    /* L: files file close file. Closed already is fine: io.type says
     * "closed file" then. */
    lua_getglobal(L, "io");
    lua_getfield(L, -1, "type");
    lua_pushvalue(L, -3);
    /* L: files file close file io type file */
    lua_call(L, 1, 1);
    if (lua_isstring(L, -1) && strcmp(lua_tostring(L, -1), "file") == 0) {
      lua_pop(L, 2);
      lua_call(L, 1, 0);
    } else {
      lua_pop(L, 4);
    }
  }
  return 0;
}

static void wk_wrap_all(lua_State *L) {
  static const char *const io_taint[] = {"popen", "lines", NULL};
  int i, io;
  hd_weak_registry(L, &wk_files_key, "k");
  lua_getglobal(L, "io");
  io = lua_gettop(L);
  for (i = 0; io_taint[i]; i++) wk_wrap(L, io, io_taint[i], wk_tainting);
  wk_wrap(L, io, "open", wk_file_opener);
  wk_wrap(L, io, "tmpfile", wk_file_opener);
  wk_wrap(L, io, "input", wk_default_file);
  wk_wrap(L, io, "output", wk_default_file);
  wk_wrap_stdio(L, io, "close", io);
  luaL_getmetatable(L, "FILE*");
  if (lua_istable(L, -1)) {
    lua_getfield(L, -1, "__index");
    if (lua_istable(L, -1)) {
      wk_wrap_stdio(L, lua_gettop(L), "close", io);
      wk_wrap_stdio(L, lua_gettop(L), "setvbuf", io);
    }
    lua_pop(L, 1);
  }
  lua_pop(L, 2);
  lua_getglobal(L, "os");
  wk_wrap(L, -1, "execute", wk_tainting);
  wk_wrap(L, -1, "setlocale", wk_tainting);
  lua_pop(L, 1);
  /* The registry holds the codec's name cache, which the restore leaves
   * out while only the codec writes to it (wk_snapshot). A job reaches
   * the registry, or values C code holds, through these: the registry
   * itself, a C function's upvalues, and the slots of C frames (a
   * finalizer running inside the encoder could read its tables). */
  lua_getglobal(L, "debug");
  if (lua_istable(L, -1)) {
    wk_wrap(L, -1, "getregistry", wk_tainting);
    wk_wrap(L, -1, "getlocal", wk_level_tainting);
    wk_wrap(L, -1, "setlocal", wk_level_tainting);
    wk_wrap(L, -1, "getupvalue", wk_c_upvalue_guard);
    wk_wrap(L, -1, "setupvalue", wk_c_upvalue_guard);
    wk_wrap(L, -1, "getinfo", wk_getinfo_guard);
  }
  lua_pop(L, 1);
  lua_getglobal(L, "package");
  wk_wrap(L, -1, "loadlib", wk_tainting);
  lua_getfield(L, -1, "loaders");
  if (lua_istable(L, -1)) {
    /* 3 and 4 load C libraries. */
    for (i = 3; i <= 4; i++) {
      lua_rawgeti(L, -1, i);
      if (lua_isfunction(L, -1)) {
        lua_pushcclosure(L, wk_tainting, 1);
        lua_rawseti(L, -2, i);
      } else {
        lua_pop(L, 1);
      }
    }
  }
  lua_pop(L, 1);
  lua_getfield(L, -1, "preload");
  if (lua_istable(L, -1)) {
    wk_wrap(L, -1, "ffi", wk_tainting);
    wk_wrap(L, -1, "jit.profile", wk_tainting);
  }
  lua_pop(L, 2);
  lua_pushvalue(L, LUA_GLOBALSINDEX);
  wk_wrap(L, -1, "loadfile", wk_tainting);
  wk_wrap(L, -1, "dofile", wk_tainting);
  wk_wrap(L, -1, "load", wk_load_guard);
  wk_wrap(L, -1, "loadstring", wk_load_guard);
  lua_pop(L, 1);
}

/* The image without the JIT: the engine off, and jit.on a function that
 * taints, so a job that turns it back on takes its worker with it. */
static void wk_jit_off(lua_State *L) {
  luaJIT_setmode(L, 0, LUAJIT_MODE_ENGINE | LUAJIT_MODE_OFF);
  lua_getglobal(L, "jit");
  if (lua_istable(L, -1)) wk_wrap(L, -1, "on", wk_tainting);
  lua_pop(L, 1);
}

/* ---- The address space limit ---------------------------------------------
 * RLIMIT_DATA does not see shared mappings (mmap of MAP_SHARED|MAP_ANONYMOUS
 * memory is as real as malloc's, and counts against no one's heap):
 * RLIMIT_AS does, every mapping a job or a command it runs makes. It is
 * sized like the data limit, on top of what the worker maps at rest: the
 * image's region, the libraries, the stack (about 70 MB, nearly all of it
 * the region, on x86-64 with LuaJIT 2.1). */

/* Headroom beside 3 x max_heap_bytes, as for RLIMIT_DATA: the JIT's machine
 * code, the reply buffer, malloc's slack, a locale archive (200 MB on some
 * systems). */
#define WK_AS_HEADROOM (256ull << 20)
/* The base when /proc cannot tell: the region and a generous rest. */
#define WK_AS_BASE_GUESS (64ull << 20)

static struct {
  uint64_t base;  /* the worker's address space at rest */
  uint64_t limit; /* the RLIMIT_AS in force, 0: none set */
} wk_as;

/* Measures the address space once the image is built, in the supervisor:
 * every worker forked from it starts the same. */
static void wk_measure_as_base(void) {
  unsigned long long pages = 0;
  long page = sysconf(_SC_PAGESIZE);
  FILE *f = fopen("/proc/self/statm", "re");
  if (f != NULL) {
    if (fscanf(f, "%llu", &pages) != 1) pages = 0;
    fclose(f);
  }
  if (pages > 0 && page > 0 && pages < (UINT64_MAX >> 20))
    wk_as.base = (uint64_t)pages * (uint64_t)page;
  else
    wk_as.base = (uint64_t)wk.alloc.region_cap + WK_AS_BASE_GUESS;
}

static void wk_fix(void *ud, const void *p, size_t n) {
  hd_alloc_fix(ud, p, n);
}

/* Takes the image. The codec's name cache (40 KB of an 80 KB image, 28 KB
 * of it hash parts and the filter's bits) is left out of the per-job
 * restore but when the codec wrote to it during the job (a job that
 * changed package.loaded): a restore copies every
 * byte of the image it covers, and on one CPU that is on the round trip.
 * The debug functions that could reach it otherwise taint (wk_wrap_all):
 * the worker exits after such a job. */
static int wk_snapshot(hd_wk *w, lua_State *L) {
  hd_alloc_unfix(&w->alloc);
  (void)hd_codec_names_fixed(L, wk_fix, &w->alloc);
  return hd_alloc_snapshot(&w->alloc);
}

/* The per-job RLIMIT_AS: base + 256 MiB + 3 x max_heap_bytes. A job past it
 * sees mmap and malloc fail inside the worker (an allocation of the Lua
 * heap failing ends the job as OOM); the machine's OOM killer never has to
 * choose. Lowered after a bigger job, the memory that job left in malloc
 * goes back first, so the next job does not start above its own limit. */
static void wk_set_as_limit(uint64_t heap) {
#if defined(__SANITIZE_ADDRESS__)
  /* AddressSanitizer reserves terabytes of shadow memory. */
  (void)heap;
#else
  struct rlimit rl;
  uint64_t lim = wk_as.base + WK_AS_HEADROOM;
  lim += heap > (UINT64_MAX - lim) / 3 ? (UINT64_MAX - lim) : 3 * heap;
  if (lim == wk_as.limit) return;
  if (getrlimit(RLIMIT_AS, &rl) != 0) return;
  if (wk_as.limit != 0 && lim < wk_as.limit) malloc_trim(0);
  /* The soft limit, which the worker may raise again for the next job; in
   * the sandbox the hard one too, so a job cannot lift it. */
  rl.rlim_cur = (rlim_t)lim;
  if (rl.rlim_max != RLIM_INFINITY && rl.rlim_cur > rl.rlim_max) rl.rlim_cur = rl.rlim_max;
  if (wk.sandbox) rl.rlim_max = rl.rlim_cur;
  if (setrlimit(RLIMIT_AS, &rl) == 0) wk_as.limit = lim;
#endif
}

static int wk_encode(lua_State *L);
static int wk_job_module(lua_State *L);

int hd_worker_prepare(const char *path, const char *cpath) {
  lua_State *L;
  int jit;
  wk_frames_resolve();
  jit = wk_jit_selftest();
  if (!jit)
    fprintf(stderr, "handler-worker: the JIT's machine code cannot be tracked across jobs; "
                    "workers run with the JIT off\n");
  if (getcwd(wk.host_cwd, sizeof wk.host_cwd) == NULL) wk.host_cwd[0] = '\0';
  if (hd_alloc_init(&wk.alloc, WK_REGION_BYTES) != 0) return -1;
  L = lua_newstate(hd_alloc_fn, &wk.alloc);
  if (L == NULL) return -1;
  luaL_openlibs(L);
  if (!jit) wk_jit_off(L);
  lua_getglobal(L, "package");
  lua_pushstring(L, path);
  lua_setfield(L, -2, "path");
  lua_pushstring(L, cpath);
  lua_setfield(L, -2, "cpath");
  lua_pop(L, 1);
  wk_wrap_all(L);
  /* require("handler.job"), in every profile: the strict one keeps preload. */
  lua_getglobal(L, "package");
  lua_getfield(L, -1, "preload");
  lua_pushcfunction(L, wk_job_module);
  lua_setfield(L, -2, "handler.job");
  lua_settop(L, 0);
  /* Encoding a named value builds the codec's name cache: built here, it is
   * part of the image, so no job pays for it or has it counted. */
  {
    hd_buf tmp = HD_BUF_INIT;
    lua_getglobal(L, "print");
    hd_encode(L, 1, 1, &tmp, 0);
    hd_buf_free(&tmp);
    lua_settop(L, 0);
  }
  lua_gc(L, LUA_GCCOLLECT, 0);
  if (wk_snapshot(&wk, L) != 0) return -1;
  wk.L = L;
  wk_measure_as_base();
  return 0;
}

/* require("handler.job").emit(value): sends value to the caller's on_event
 * now, in an EVENT frame, under the rules of results. Raises when the
 * value cannot travel. */
static int wk_emit(lua_State *L) {
  hd_wk *w = &wk;
  hd_buf b = HD_BUF_INIT;
  char h[HD_FRAME_HEADER] = {0};
  int rc;
  lua_settop(L, 1);
  if (hd_buf_append(&b, h, sizeof h) != 0) return luaL_error(L, "handler: out of memory");
  lua_pushcfunction(L, wk_encode);
  lua_insert(L, 1);
  lua_pushlightuserdata(L, &b);
  rc = lua_pcall(L, 2, 0, 0);
  if (rc != 0) {
    hd_buf_free(&b);
    return lua_error(L);
  }
  if (b.len - HD_FRAME_HEADER > UINT32_MAX) {
    hd_buf_free(&b);
    return luaL_error(L, "handler: the event is larger than 4 GiB");
  }
  hd_wire_head(b.data, HD_FRAME_EVENT, w->job_id, (uint32_t)(b.len - HD_FRAME_HEADER));
  /* Output written before the event reaches the caller before it, and so
   * do the replies of the items before it. */
  fflush(NULL);
  rc = hd_hold_send();
  if (rc == 0) rc = wk_write_full(w->fd, b.data, b.len, 0);
  hd_buf_free(&b);
  if (rc != 0) return luaL_error(L, "handler: cannot send the event");
  return 0;
}

static int wk_job_module(lua_State *L) {
  lua_createtable(L, 0, 1);
  lua_pushcfunction(L, wk_emit);
  lua_setfield(L, -2, "emit");
  return 1;
}

/* Message handler: keeps the raised value as it is and records a traceback
 * beside it. It may fail when the heap limit has tripped; the worker then
 * reports OOM anyway. */
static int wk_msgh(lua_State *L) {
  /* After a stack overflow there may be no room for a traceback: the
   * raised value goes back alone rather than as "error in error handling". */
  if (!lua_checkstack(L, LUA_MINSTACK)) return 1;
  luaL_traceback(L, L, NULL, 1);
  lua_setfield(L, LUA_REGISTRYINDEX, "handler.traceback");
  return 1;
}

/* Runs in protected mode: decodes the closure and calls it.
 * L: msg(lightuserdata) len(number) [item(lightuserdata) item_len(number)]
 *    → results... */
static int wk_call(lua_State *L) {
  const char *p = lua_touserdata(L, 1);
  size_t len = (size_t)lua_tonumber(L, 2);
  const char *item = lua_touserdata(L, 3);
  size_t item_len = (size_t)lua_tonumber(L, 4);
  int n;
  lua_settop(L, 0);
  /* The job's values live until it ends, and its heap goes then. */
  n = hd_decode(L, p, len, HD_DEC_TRUSTED | HD_DEC_NOGC);
  if (n < 1) return luaL_error(L, "handler: the job carried no function");
  /* An item's arguments follow the function's own. */
  if (item != NULL) n += hd_decode(L, item, item_len, HD_DEC_TRUSTED | HD_DEC_NOGC);
  /* The function, then its arguments (the args option). */
  lua_call(L, n - 1, LUA_MULTRET);
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

/* A reply whose message is the single string s. */
static void wk_reply_string(hd_wk *w, int status, const char *s, size_t len) {
  hd_wire_reply_strings(&w->out, status, 1, &s, &len);
}

/* An OOM reply: no values. */
static void wk_reply_oom(hd_wk *w) {
  hd_wire_reply_strings(&w->out, HD_REPLY_OOM, 0, NULL, NULL);
}

static uint64_t wk_now_ns(void);

static uint64_t wk_cpu_ns(void) {
  struct timespec ts;
  if (clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts) != 0) return 0;
  return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Writes a then b, whole, in as few system calls as the pipe allows. */
static int wk_write2(int fd, const char *a, size_t an, const char *b, size_t bn) {
  while (an + bn > 0) {
    struct iovec iov[2];
    int k = 0;
    ssize_t r;
    if (an > 0) {
      iov[k].iov_base = (void *)a;
      iov[k++].iov_len = an;
    }
    if (bn > 0) {
      iov[k].iov_base = (void *)b;
      iov[k++].iov_len = bn;
    }
    r = writev(fd, iov, k);
    if (r < 0) {
      if (errno == EINTR) continue;
      return -1;
    }
    if ((size_t)r >= an) {
      b += (size_t)r - an;
      bn -= (size_t)r - an;
      an = 0;
    } else {
      a += r;
      an -= (size_t)r;
    }
  }
  return 0;
}

/* Jobs shorter than this report their time in the worker as their CPU
 * time: reading a CPU clock is a system call (0.4 us here), which a trivial
 * job would pay on its round trip. */
#define WK_CPU_CLOCK_NS 100000

/* The CPU time the job used, in ns, at `now`: from the CPU clock read
 * at a reply before (wk_cpu_rebase), so what the worker did between
 * (restoring its state, polling for this job: at most WK_SPIN_NS) counts
 * too. Quick items read no clock: the wall time they took is kept, and
 * taken off the next clock reading. */
static uint64_t wk_job_cpu(hd_wk *w, uint64_t now) {
  uint64_t wall = now - w->job_start, cpu, used;
  if (wall < WK_CPU_CLOCK_NS) {
    w->cpu_since += wall;
    return wall;
  }
  cpu = wk_cpu_ns();
  used = cpu > w->cpu_base + w->cpu_since ? cpu - w->cpu_base - w->cpu_since : 0;
  w->cpu_base = cpu;
  w->cpu_base_at = now;
  w->cpu_since = 0;
  return used;
}

/* The CPU clock is read again after a reply only once the last reading is
 * this old: a read is a system call on every round trip. What the worker
 * did between quick jobs (restoring its state, polling for the next one)
 * since that reading is charged to the next job that reads the clock: at
 * most this much. */
#define WK_CPU_REBASE_NS 200000

static void wk_cpu_rebase(hd_wk *w, uint64_t now) {
  if (now - w->cpu_base_at < WK_CPU_REBASE_NS) return;
  w->cpu_base = wk_cpu_ns();
  w->cpu_base_at = now;
  w->cpu_since = 0;
}

/* A job's last reply bigger than this goes by vmsplice: the pipe takes the
 * reply buffer's pages, not a copy (a copy into a pipe moves about 2.7
 * GB/s here, vmsplice 10). The buffer is not written again before the next
 * job, which comes once the host has read the whole reply. Replies that
 * items follow are copied: the next item's reply reuses the buffer. */
#define WK_SPLICE_MIN 65536

/* The job's STATS frame, then its reply. With `hold`, more items of the
 * job follow: the two are held (hold.c) and go out with the replies after
 * them, or when WK_HOLD_NS has passed since the last send. `final`: no
 * reply of this job follows. */
static int wk_reply_send(hd_wk *w, int last, int hold, int final) {
  char stats[HD_STATS_LEN];
  uint64_t now = wk_now_ns();
  uint64_t cpu = wk_job_cpu(w, now);
  int rc;
  if (w->out.len > HD_FRAME_HEADER && w->out.len - HD_FRAME_HEADER > UINT32_MAX) {
    const char *m = "result is larger than 4 GiB";
    wk_reply_string(w, HD_REPLY_BADRESULT, m, strlen(m));
  }
  if (hd_wire_reply_end(&w->out, w->job_id, last) != 0) return -1;
  hd_wire_stats(stats, w->job_id, cpu,
                w->alloc.peak > w->alloc.base ? w->alloc.peak - w->alloc.base : 0,
                now - w->job_start);
  /* The next item's time runs from here, so the items' wall times cover
   * the worker's: what wk_job_cpu takes off a clock reading. */
  w->job_start = now;
  if (!hold && hd_hold_bytes() == 0) {
    /* The STATS frame is on the stack: copied, never spliced. */
    if (final && w->out.len > WK_SPLICE_MIN) {
      w->out_spliced = 1;
      return wk_write_full(w->fd, stats, sizeof stats, 0) != 0 ||
                     wk_write_full(w->fd, w->out.data, w->out.len, 1) != 0
                 ? -1
                 : 0;
    }
    return wk_write2(w->fd, stats, sizeof stats, w->out.data, w->out.len);
  }
  rc = hd_hold_add(stats, sizeof stats, w->out.data, w->out.len);
  if (rc == -2) return -1;
  if (rc == -1) {
    /* Too big to hold: what is held goes first. */
    if (hd_hold_send() != 0 ||
        wk_write2(w->fd, stats, sizeof stats, w->out.data, w->out.len) != 0)
      return -1;
  } else if (hold && now - w->sent_at < WK_HOLD_NS) {
    if (!hd_hold_armed()) hd_hold_timer(WK_HOLD_NS - (now - w->sent_at));
    return 0;
  } else if (hd_hold_send() != 0) {
    return -1;
  }
  w->sent_at = now;
  hd_hold_timer(0);
  return 0;
}

/* Encodes the stack [1, top] as the reply's message; on failure the reply
 * becomes OOM or BADRESULT. Returns with the stack emptied. */
static void wk_reply_values(hd_wk *w, int status) {
  lua_State *L = w->L;
  int n = lua_gettop(L), rc;
  hd_wire_reply_begin(&w->out, status);
  lua_pushcfunction(L, wk_encode);
  lua_insert(L, 1);
  lua_pushlightuserdata(L, &w->out);
  rc = lua_pcall(L, n + 1, 0, 0);
  if (rc == 0 && !w->alloc.tripped) return;
  if (w->alloc.tripped || rc == LUA_ERRMEM) {
    wk_reply_oom(w);
  } else {
    size_t len = 0;
    const char *m = lua_tolstring(L, -1, &len);
    if (m == NULL) m = "result cannot travel";
    if (len == 0) len = strlen(m);
    wk_reply_string(w, HD_REPLY_BADRESULT, m, len);
  }
  lua_settop(L, 0);
}

/* Applies the job's package paths (the caller changed them after the image
 * was built): relative entries are the caller's, made absolute against the
 * host's directory. */
static void wk_set_paths(lua_State *L, const hd_wire_job *j) {
  const char *s[2] = {j->path, j->cpath};
  uint32_t n[2] = {j->path_len, j->cpath_len};
  int k;
  lua_getglobal(L, "package");
  for (k = 0; k < 2; k++) {
    char *raw = strndup(s[k], n[k]);
    char *abs = raw ? hd_worker_abspaths(raw, wk.host_cwd) : NULL;
    lua_pushstring(L, abs ? abs : raw ? raw : "");
    lua_setfield(L, -2, k == 0 ? "path" : "cpath");
    free(abs);
    free(raw);
  }
  lua_pop(L, 1);
}

/* Sets the environment the job asked for (the worker's is empty otherwise). */
static void wk_set_env(hd_wire_job *j) {
  const char *k, *v;
  uint32_t kn, vn;
  while (hd_wire_env_next(j, &k, &kn, &v, &vn) == 0) {
    char *ks = strndup(k, kn), *vs = strndup(v, vn);
    if (ks && vs && ks[0] != '\0' && strchr(ks, '=') == NULL) setenv(ks, vs, 1);
    free(ks);
    free(vs);
  }
  wk.env_set = 1;
}

/* The process-level memory backstop: the Lua heap limit does not see
 * ffi.C.malloc or C modules, RLIMIT_DATA does. Generous beside the heap
 * limit (the reply buffer, malloc's own slack), tight beside gigabytes. */
static void wk_set_data_limit(uint64_t heap) {
#if defined(__SANITIZE_ADDRESS__)
  /* AddressSanitizer maps terabytes of shadow memory and its own heap: a
   * data limit makes it fail. Sanitized builds are for testing only. */
  (void)heap;
#else
  struct rlimit rl;
  uint64_t lim = (uint64_t)wk.alloc.region_cap + (256ull << 20);
  lim += heap > (UINT64_MAX - lim) / 3 ? (UINT64_MAX - lim) : 3 * heap;
  if (lim == wk.data_limit) return;
  if (getrlimit(RLIMIT_DATA, &rl) != 0) return;
  /* The soft limit, which the worker may raise again for the next job; in
   * the sandbox the hard one too, so a job cannot lift it. */
  rl.rlim_cur = (rlim_t)lim;
  if (rl.rlim_max != RLIM_INFINITY && rl.rlim_cur > rl.rlim_max) rl.rlim_cur = rl.rlim_max;
  if (wk.sandbox) rl.rlim_max = rl.rlim_cur;
  if (setrlimit(RLIMIT_DATA, &rl) == 0) wk.data_limit = lim;
#endif
}

/* Runs one job frame already in w->in. */
/* Runs the job j (parsed), or one of its items (`item`, or NULL: the job's
 * own arguments only), into the reply. */
static void wk_job(hd_wk *w, hd_wire_job *j, const char *item, size_t item_len) {
  lua_State *L = w->L;
  uint64_t heap;
  int rc;
  heap = j->max_heap;
  /* j->max_output is not enforced here: the host reads this process's
   * stdout and stderr and counts every byte, whoever writes it. */
  if (j->path != NULL) wk_set_paths(L, j);
  if (j->nenv > 0) wk_set_env(j);
  wk_set_data_limit(heap);
  wk_set_as_limit(heap);
  lua_settop(L, 0);
  lua_pushcfunction(L, wk_msgh);
  lua_pushcfunction(L, wk_call);
  lua_pushlightuserdata(L, (void *)j->msg);
  lua_pushnumber(L, (lua_Number)j->msg_len);
  lua_pushlightuserdata(L, (void *)item);
  lua_pushnumber(L, (lua_Number)item_len);
  /* The limit counts from here: the standard libraries are below the
   * baseline, the closure and everything it allocates are above it. */
  hd_alloc_arm(&w->alloc, heap > SIZE_MAX ? SIZE_MAX : (size_t)heap);
  rc = lua_pcall(L, 4, LUA_MULTRET, 1);
  lua_remove(L, 1);
  if (w->alloc.tripped || rc == LUA_ERRMEM) {
    wk_reply_oom(w);
    return;
  }
  if (rc == 0) {
    wk_reply_values(w, HD_REPLY_OK);
    return;
  }
  if (rc == LUA_ERRERR) {
    /* LuaJIT could not even call the message handler: out of stack (out of
     * memory was handled above). The original value is gone; say what
     * happened. */
    lua_settop(L, 0);
    lua_pushliteral(L, "stack overflow (no room left to handle the error)");
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
    /* ERROR carries two values: the message, and an empty traceback. */
    const char *m[2] = {"error object cannot travel", ""};
    size_t len[2] = {strlen(m[0]), 0};
    hd_wire_reply_strings(&w->out, HD_REPLY_ERROR, 2, m, len);
  }
}

/* Runs the pool's init (the codec message of a closure) once, before the
 * first job: what it leaves (globals, package.loaded, C modules it loaded)
 * becomes this worker's pristine image, which every job then starts from.
 * Nothing of it taints the worker: C libraries it loads are part of the
 * image. When it fails, why is kept, and every job gets it as its error. */
static void wk_init(hd_wk *w, const char *msg, size_t len) {
  lua_State *L = w->L;
  hd_buf tmp = HD_BUF_INIT;
  hd_alloc_rebuild(&w->alloc);
  lua_settop(L, 0);
  lua_pushcfunction(L, wk_msgh);
  lua_pushcfunction(L, wk_call);
  lua_pushlightuserdata(L, (void *)msg);
  lua_pushnumber(L, (lua_Number)len);
  if (lua_pcall(L, 2, 0, 1) != 0) {
    const char *e = lua_tostring(L, -1);
    if (e != NULL)
      snprintf(w->init_err, sizeof w->init_err, "init failed: %s", e);
    else
      snprintf(w->init_err, sizeof w->init_err, "init failed: (a %s raised)",
               luaL_typename(L, -1));
  }
  lua_settop(L, 0);
  w->alloc.taint = 0;
  /* The codec's name cache follows package.loaded, which init may have
   * added to. */
  lua_getglobal(L, "print");
  hd_encode(L, lua_gettop(L), 1, &tmp, 0);
  hd_buf_free(&tmp);
  lua_settop(L, 0);
  lua_gc(L, LUA_GCCOLLECT, 0);
  if (wk_snapshot(w, L) != 0 && w->init_err[0] == '\0')
    snprintf(w->init_err, sizeof w->init_err, "init failed: out of memory for the image");
  fflush(NULL);
}

/* Applies the sandbox profile (HD_SPAWN_* flags): the stripped Lua
 * environment becomes this worker's image, then the process is sealed.
 * Runs once, before the first job. */
static int wk_sandbox(hd_wk *w, int flags) {
  lua_State *L = w->L;
  hd_buf tmp = HD_BUF_INIT;
  w->sandbox = 1;
  if (!(flags & HD_SPAWN_LUA)) return (flags & HD_SPAWN_SECCOMP) ? hd_sandbox_process() : 0;
  hd_alloc_rebuild(&w->alloc);
  hd_sandbox_lua(L);
  /* The codec's name cache follows the stripped package.loaded. */
  lua_getglobal(L, "print");
  hd_encode(L, lua_gettop(L), 1, &tmp, 0);
  hd_buf_free(&tmp);
  lua_settop(L, 0);
  lua_gc(L, LUA_GCCOLLECT, 0);
  if (wk_snapshot(w, L) != 0) return -1;
  return (flags & HD_SPAWN_SECCOMP) ? hd_sandbox_process() : 0;
}

/* Closes the files the job left open, before its caller sees the result.
 * The heap limit is off for this: closing must not fail for want of memory
 * the job used up. If it fails anyway, the worker is tainted. */
static void wk_close_files(hd_wk *w) {
  lua_State *L = w->L;
  int empty;
  if (w->alloc.taint) return;
  lua_settop(L, 0);
  lua_pushlightuserdata(L, &wk_files_key);
  lua_rawget(L, LUA_REGISTRYINDEX);
  lua_pushnil(L);
  empty = !lua_istable(L, 1) || lua_next(L, 1) == 0;
  lua_settop(L, 0);
  if (empty) return;
  w->alloc.limit = 0;
  lua_pushcfunction(L, wk_close_files_p);
  if (lua_pcall(L, 0, 0, 0) != 0) w->alloc.taint = 1;
  lua_settop(L, 0);
}

static uint64_t wk_now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Between back-to-back jobs the next one usually arrives within tens of
 * microseconds; a sleeping worker takes far longer than that to wake on a
 * quiet machine (its CPU idles deeply). So it polls for up to 50 us first,
 * but only while jobs have been coming back to back. */
#define WK_SPIN_NS 50000
/* How often (in jobs) a worker looks at the CPUs it may run on. */
#define WK_CPUS_EVERY 256

/* Whether the job pipe is readable (or closed: the read that follows says
 * which) within `ms` milliseconds. */
static int wk_job_ready(const hd_wk *w, int ms) {
  struct pollfd pf;
  pf.fd = w->job_fd;
  pf.events = POLLIN;
  pf.revents = 0;
  return poll(&pf, 1, ms) != 0;
}

static void wk_spin_for_job(hd_wk *w) {
  uint64_t start;
  if ((w->jobs++ % WK_CPUS_EVERY) == 0) w->solo = hd_one_cpu();
  if (w->solo || !w->back_to_back || w->in.len != 0) return;
  start = wk_now_ns();
  while (wk_now_ns() - start < WK_SPIN_NS) {
    if (wk_job_ready(w, 0)) return;
    /* Whoever else wants this CPU (the host, another worker) gets it. */
    sched_yield();
  }
}

/* A job that used a lot of memory leaves it in malloc, where the next job
 * reuses it without faulting pages in again; a worker that then sits idle
 * gives it back, so idle workers stay small. */
static void wk_trim_when_idle(hd_wk *w) {
  if (wk_job_ready(w, WK_IDLE_TRIM_MS)) return;
  /* The I/O buffers too: cheap to make again, and every page counts for an
   * idle worker. Not a reply buffer the pipe may still hold pages of: the
   * host may not have read it yet, and freeing writes malloc's own data
   * into it (it goes once the next job has come). */
  hd_buf_free(&w->in);
  if (!w->out_spliced) hd_buf_free(&w->out);
  malloc_trim(0);
  w->trim = 0;
}

int hd_worker_run(int fd, int flags, pid_t pid) {
  hd_wk *w = &wk;
  char h[HD_HELLO_LEN];
  /* The "syscalls" profile keeps the FFI: a job can reach any memory and
   * descriptor of its process, the protocol pipes included, so no other
   * job may follow it there. One job, then the worker exits. */
  int once = (flags & HD_SPAWN_SECCOMP) && !(flags & HD_SPAWN_LUA);
  w->fd = fd;
  w->job_fd = HD_WORKER_JOB_FD;
  /* Replies are held (hold.c) only where jobs of several items run: not in
   * the one-job workers of the "syscalls" profile. There a job has the FFI
   * and may signal itself, and its worker is the first process of its PID
   * namespace, which drops a signal it sends itself: a crash handler that
   * raised the signal again would let the job go on. */
  if (!once && hd_hold_setup(fd) != 0) return HD_EXIT_SANDBOX;
  if (flags != 0 && wk_sandbox(w, flags) != 0) return HD_EXIT_SANDBOX;
  mallopt(M_MMAP_THRESHOLD, WK_MMAP_THRESHOLD);
  mallopt(M_TRIM_THRESHOLD, WK_TRIM_THRESHOLD);
  /* The worker says who it is before anything else, so the parent knows its
   * pid by the time any reply of it arrives. */
  hd_wire_hello(h, pid);
  if (wk_write_full(fd, h, sizeof h, 0) != 0) return 0;
  w->cpu_base = wk_cpu_ns();
  w->cpu_base_at = wk_now_ns();
  for (;;) {
    hd_frame f;
    hd_wire_job job, items;
    uint64_t arrived;
    int last, pending;
    wk_spin_for_job(w);
    if (w->trim && w->in.len == 0) wk_trim_when_idle(w);
    while (w->in.len < HD_FRAME_HEADER)
      if (wk_fill(w) != 0) goto done;
    /* One clock read for the job's arrival and its start (unless the
     * rest of its frame has to be read first). */
    arrived = wk_now_ns();
    w->back_to_back = w->replied_at != 0 && arrived - w->replied_at < WK_BACK_TO_BACK_NS;
    /* A job comes only after the host has read the last reply whole. */
    w->out_spliced = 0;
    hd_wire_frame(w->in.data, &f);
    /* An INIT comes first or never. */
    if ((f.type != HD_FRAME_JOB && (f.type != HD_FRAME_INIT || w->inited)) ||
        f.len > HD_MAX_JOB_FRAME)
      return HD_EXIT_BAD_FRAME;
    w->frame_len = HD_FRAME_HEADER + (size_t)f.len;
    if (w->in.len < w->frame_len && hd_buf_reserve(&w->in, w->frame_len - w->in.len) != 0)
      return HD_EXIT_NO_MEMORY;
    if (w->in.len < w->frame_len) {
      while (w->in.len < w->frame_len)
        if (wk_fill(w) != 0) goto done;
      /* A big frame took a while to read: the job starts now. */
      arrived = wk_now_ns();
    }
    w->job_id = f.id;
    w->inited = 1;
    if (f.type == HD_FRAME_INIT) {
      wk_init(w, w->in.data + HD_FRAME_HEADER, f.len);
      hd_buf_consume(&w->in, w->frame_len);
      continue;
    }
    /* Nothing more is read here: a job that takes the process over cannot
     * read another job's frame, whatever the host sends. */
    if (once) {
      close(w->job_fd);
      w->job_fd = -1;
    }
    if (hd_wire_job_parse(w->in.data, w->frame_len, &job) != 0) return HD_EXIT_BAD_FRAME;
    items = job;
    w->job_start = w->sent_at = arrived;
    w->no_hold = job.max_output < WK_HOLD_OUTPUT;
    do {
      const char *item = NULL;
      uint32_t item_len = 0;
      hd_wire_job each = job;
      if (job.nitems > 0 && hd_wire_item_next(&items, &item, &item_len) != 0)
        return HD_EXIT_BAD_FRAME;
      w->alloc.peak = w->alloc.base = w->alloc.used;
      wk_maps.tracking = 1;
      if (w->init_err[0] != '\0') {
        /* ERROR carries two values: the message, and an empty traceback. */
        const char *m[2] = {w->init_err, ""};
        size_t len[2] = {strlen(w->init_err), 0};
        hd_wire_reply_strings(&w->out, HD_REPLY_ERROR, 2, m, len);
        w->alloc.taint = 1;
      } else {
        wk_job(w, &each, item, item_len);
      }
      wk_close_files(w);
      wk_maps.tracking = 0;
      /* A job's output reaches the host before its result does; the worker
       * leaves with _exit, which would drop anything still buffered. The
       * replies held go before this item's output. */
      pending = __fpending(stdout) > 0 || __fpending(stderr) > 0;
      if (pending && hd_hold_bytes() > 0) (void)hd_hold_send();
      last = w->alloc.taint || once;
      /* Untainted, the job had no stream but these (its files are closed):
       * walking every stream costs more than looking at two. */
      if (last) {
        fflush(NULL);
      } else if (pending) {
        fflush(stdout);
        fflush(stderr);
      }
      if (w->env_set) {
        clearenv();
        w->env_set = 0;
      }
      /* Replies of items are held while more items follow (hold.c). */
      if (wk_reply_send(w, last, items.nitems > 0 && !last && !w->no_hold,
                        items.nitems == 0 || last) != 0)
        goto done;
      if (items.nitems == 0 || last) {
        /* The reply's time, as its STATS frame says (wk_reply_send). */
        w->replied_at = w->job_start;
        wk_cpu_rebase(w, w->replied_at);
      }
      if (last) {
        /* Not lua_close: a pipe the job left open would wait in pclose for
         * its command. Output is flushed already; the supervisor kills the
         * process group, commands included, when it reaps us. The items
         * after this one are not run: the host knows from REPLY_LAST. */
        return 0;
      }
      /* Off the critical path: the reply is out. Memory the job used goes
       * back to the system once the worker has been idle for a while. */
      if (w->alloc.peak - w->alloc.base >= WK_TRIM_AFTER || w->in.cap > 4 * WK_READ_CHUNK ||
          w->out.cap > 4 * WK_READ_CHUNK)
        w->trim = 1;
      hd_alloc_restore(&w->alloc, hd_codec_names_touched());
      wk_unmap_job();
    } while (items.nitems > 0);
    hd_buf_consume(&w->in, w->frame_len);
  }
done:
  return 0;
}

char *hd_worker_abspaths(const char *paths, const char *cwd) {
  char here[PATH_MAX];
  hd_buf out = HD_BUF_INIT;
  const char *p = paths;
  if (cwd == NULL || cwd[0] == '\0') {
    if (getcwd(here, sizeof here) == NULL) return strdup(paths);
    cwd = here;
  }
  for (;;) {
    const char *end = strchr(p, ';');
    size_t n = end ? (size_t)(end - p) : strlen(p);
    /* Empty entries (";;") stand for the defaults and stay as they are. */
    if (n > 0 && p[0] != '/') {
      if (hd_buf_append(&out, cwd, strlen(cwd)) || hd_buf_append(&out, "/", 1)) goto oom;
    }
    if (hd_buf_append(&out, p, n)) goto oom;
    if (end == NULL) break;
    if (hd_buf_append(&out, ";", 1)) goto oom;
    p = end + 1;
  }
  if (hd_buf_append(&out, "", 1)) goto oom;
  return out.data;
oom:
  hd_buf_free(&out);
  return NULL;
}
