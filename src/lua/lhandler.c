/* lhandler.c: the Lua binding, module handler.core: pools, jobs, the loop. */
#include <dlfcn.h>
#include <math.h>
#include <lauxlib.h>
#include <lua.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>

#include "bell.h"
#include "codec.h"
#include "lcodec.h"
#include "num.h"
#include "pool.h"
#include "scheduler.h"
#include "weak.h"
#include "wire.h"

#define L_CTX "handler.ctx"
#define L_POOL "handler.pool"
#define L_JOB "handler.job"

/* The context of a Lua state: the scheduler, the ids of watched jobs that
 * ended since the host last asked (core.finished), and the bell, once a
 * host that needs one asked for it. */
typedef struct {
  hd_sched *s;
  double *ended;
  size_t n_ended, cap_ended;
  int ended_oom;
  hd_bell *bell;
} l_ctx;
typedef struct { hd_pool *p; } l_pool;
typedef struct { hd_job *j; } l_job;

#define L_EXPORT __attribute__((visibility("default")))

/* Arguments of one job, at most: a job's values are decoded on one stack. */
#define HD_MAX_ARGS 4000

L_EXPORT int luaopen_handler_core(lua_State *L);

/* Keys of private values: addresses, which no Lua string can equal. */
static char l_ctx_key;     /* registry: the context userdata */
static char l_jobs_key;    /* registry: weak table, job pointer -> job userdata */
static char l_killerr_key; /* a job userdata's fenv: the caller's kill error */
static char l_pools_key;   /* registry: weak-keyed table, pool userdata -> true */

/* A forked child's first call: the context copied from the parent was
 * forsaken at the fork (scheduler.c); the child gets one of its own, with
 * the same settings, and the pools of this state start counting afresh. */
static void l_on_end(void *ud, hd_job *j);

static hd_sched *l_renew(lua_State *L, l_ctx *x) {
  char err[256];
  hd_sched *s = hd_sched_renew(x->s, err, sizeof err);
  if (s == NULL) luaL_error(L, "handler: after a fork: %s", err);
  /* Never frees the forsaken context: it holds a reference for good. */
  hd_sched_unref(x->s);
  x->s = s;
  hd_sched_on_end(s, l_on_end, x);
  /* The parent's ended jobs and bell are the parent's. */
  x->n_ended = 0;
  if (x->bell != NULL) hd_bell_forsake(x->bell);
  x->bell = NULL;
  lua_pushlightuserdata(L, &l_pools_key);
  lua_rawget(L, LUA_REGISTRYINDEX);
  if (lua_istable(L, -1)) {
    lua_pushnil(L);
    while (lua_next(L, -2) != 0) {
      l_pool *u = lua_touserdata(L, -2);
      lua_pop(L, 1);
      if (u != NULL && u->p != NULL) hd_sched_adopt_pool(s, u->p);
    }
  }
  lua_pop(L, 1);
  return s;
}

/* Every function, the __gc methods included, has the context userdata as
 * upvalue 1. */
static hd_sched *l_core(lua_State *L) {
  l_ctx *x = lua_touserdata(L, lua_upvalueindex(1));
  if (x->s == NULL || hd_sched_closing(x->s))
    luaL_error(L, "handler: the module has been shut down");
  if (hd_sched_forsaken(x->s)) return l_renew(L, x);
  return x->s;
}

static hd_pool *l_checkpool(lua_State *L, int i) {
  l_pool *u = luaL_checkudata(L, i, L_POOL);
  if (u->p == NULL) luaL_argerror(L, i, "pool is gone");
  return u->p;
}

static hd_job *l_checkjob(lua_State *L, int i) {
  l_job *u = luaL_checkudata(L, i, L_JOB);
  if (u->j == NULL) luaL_argerror(L, i, "job is gone");
  return u->j;
}

static int l_ctx_gc(lua_State *L) {
  l_ctx *x = luaL_checkudata(L, 1, L_CTX);
  if (x->bell != NULL) {
    if (x->s != NULL && hd_sched_forsaken(x->s)) hd_bell_forsake(x->bell);
    else hd_bell_free(x->bell);
    x->bell = NULL;
  }
  if (x->s != NULL) {
    hd_sched *s = x->s;
    x->s = NULL;
    /* A forsaken context is the parent's: nothing of it is shut down. */
    if (!hd_sched_forsaken(s)) {
      hd_sched_on_end(s, NULL, NULL);
      hd_sched_shutdown(s);
    }
    hd_sched_unref(s);
  }
  free(x->ended);
  x->ended = NULL;
  x->n_ended = x->cap_ended = 0;
  return 0;
}

static int l_pool_gc(lua_State *L) {
  l_pool *u = luaL_checkudata(L, 1, L_POOL);
  l_ctx *x = lua_touserdata(L, lua_upvalueindex(1));
  if (u->p != NULL) {
    hd_pool *p = u->p;
    u->p = NULL;
    /* Nobody can start jobs here any more: idle processes go now, busy ones
     * when their jobs end. */
    if (x != NULL && x->s != NULL && !hd_sched_closing(x->s) && !hd_sched_forsaken(x->s))
      hd_sched_forget_pool(x->s, p);
    hd_pool_unref(p);
  }
  return 0;
}

/* The userdata lets its job go (once). */
static void l_job_release(l_job *u) {
  hd_job *j = u->j;
  if (j == NULL) return;
  u->j = NULL;
  hd_job_unref(j);
}

static int l_job_gc(lua_State *L) {
  l_job_release(luaL_checkudata(L, 1, L_JOB));
  return 0;
}

/* Runs in protected mode: encodes the function at 1 into the buffer at 2. */
static int l_encode_init(lua_State *L) {
  hd_buf *b = lua_touserdata(L, 2);
  lua_settop(L, 1);
  hd_encode(L, 1, 1, b, HD_ENC_FUNCTIONS | HD_ENC_HOST);
  return 0;
}

/* pool_new(name|nil, max_workers, max_memory, parent|nil, idle_ms, sandbox,
 *          init|nil) -> pool */
static int l_pool_new(lua_State *L) {
  hd_pool_config cfg;
  hd_buf init = HD_BUF_INIT;
  l_pool *u;
  l_core(L);
  cfg.name = luaL_optstring(L, 1, NULL);
  cfg.max_workers = luaL_checknumber(L, 2);
  cfg.max_memory = luaL_checknumber(L, 3);
  cfg.parent = lua_isnoneornil(L, 4) ? NULL : l_checkpool(L, 4);
  cfg.idle_ms = luaL_checknumber(L, 5);
  cfg.sandbox = (int)luaL_optinteger(L, 6, 0) & (HD_SPAWN_LUA | HD_SPAWN_SECCOMP);
  cfg.init = NULL;
  cfg.init_len = 0;
  if (!lua_isnoneornil(L, 7)) {
    /* Encoded once, sent to each worker before its first job. */
    lua_pushcfunction(L, l_encode_init);
    lua_pushvalue(L, 7);
    lua_pushlightuserdata(L, &init);
    if (lua_pcall(L, 2, 0, 0) != 0) {
      hd_buf_free(&init);
      return luaL_error(L, "handler.pool: init %s", lua_tostring(L, -1));
    }
    cfg.init = init.data;
    cfg.init_len = init.len;
  }
  u = lua_newuserdata(L, sizeof *u);
  u->p = NULL;
  luaL_getmetatable(L, L_POOL);
  lua_setmetatable(L, -2);
  /* The pool keeps the Lua object of its parent alive. */
  lua_createtable(L, 1, 0);
  lua_pushvalue(L, 4);
  lua_rawseti(L, -2, 1);
  lua_setfenv(L, -2);
  u->p = hd_pool_new(&cfg);
  hd_buf_free(&init);
  if (u->p == NULL) return luaL_error(L, "handler: out of memory");
  /* A host that runs untrusted code closes its /proc/<pid>/mem (and
   * ptrace) to processes of its own user, its non-sandboxed workers
   * included: it is no longer dumpable. */
  if (cfg.sandbox != 0 && prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0)
    return luaL_error(L, "handler: cannot make the host non-dumpable");
  /* Listed, so that a forked child can reset every pool of this state. */
  lua_pushlightuserdata(L, &l_pools_key);
  lua_rawget(L, LUA_REGISTRYINDEX);
  lua_pushvalue(L, -2);
  lua_pushboolean(L, 1);
  lua_rawset(L, -3);
  lua_pop(L, 1);
  return 1;
}

static void l_chain_add(lua_State *L, hd_chains *ch, hd_pool *p) {
  if (hd_chains_push(ch, p) != 0)
    luaL_error(L, "handler: delegation chain longer than %d pools", HD_MAX_CHAIN);
}

/* Fills the job's candidate chains: from `chains` (a list of lists of pools,
 * computed by the Lua side when delegate_fun is involved) or by following
 * delegate_to from the pool. */
static void l_fill_chains(lua_State *L, hd_chains *ch, hd_pool *pool, int chains_idx) {
  if (lua_istable(L, chains_idx)) {
    int i, n = (int)lua_objlen(L, chains_idx);
    if (n > HD_MAX_CHAINS)
      luaL_error(L, "handler: more than %d candidate delegation chains", HD_MAX_CHAINS);
    for (i = 1; i <= n; i++) {
      int k, m;
      if (hd_chains_add(ch) != 0) luaL_error(L, "handler: out of memory");
      lua_rawgeti(L, chains_idx, i);
      m = (int)lua_objlen(L, -1);
      for (k = 1; k <= m; k++) {
        lua_rawgeti(L, -1, k);
        l_chain_add(L, ch, l_checkpool(L, -1));
        lua_pop(L, 1);
      }
      lua_pop(L, 1);
      if (m == 0) luaL_error(L, "handler: empty delegation chain");
    }
    /* n == 0: delegate_fun offered no candidate; the job is rejected. */
  } else if (hd_chains_follow(ch, pool) != 0) {
    luaL_error(L, "handler: delegation chain longer than %d pools", HD_MAX_CHAIN);
  }
}

static void l_set_paths(lua_State *L, hd_sched *s) {
  const char *path, *cpath;
  lua_getglobal(L, "package");
  if (!lua_istable(L, -1)) {
    lua_pop(L, 1);
    return;
  }
  lua_getfield(L, -1, "path");
  lua_getfield(L, -2, "cpath");
  path = lua_tostring(L, -2);
  cpath = lua_tostring(L, -1);
  hd_sched_set_paths(s, path ? path : "", cpath ? cpath : "");
  lua_pop(L, 3);
}

static const char *const l_reject_names[] = {"NoWorkersAvailable", "InsufficientMemory",
                                             "PoolTimeout"};


/* Builds the job frame: the limits, the paths when the workers' image has
 * older ones, the environment, then the closure. Encoding raises on a value
 * that cannot travel. env is a flat list: name, value, name, value... */
/* The job frame: limits, paths, env, then the function at index 3 and, when
 * `args` (a stack index, or 0) is given, its arguments args[1 .. args.n or
 * #args], which the worker passes to it. */
/* Pushes the values of the argument list at index t (t[1 .. t.n or #t]);
 * returns how many. */
static int l_push_args(lua_State *L, int t) {
  int i, n;
  lua_getfield(L, t, "n");
  n = lua_isnumber(L, -1) ? (int)lua_tointeger(L, -1) : (int)lua_objlen(L, t);
  lua_pop(L, 1);
  if (n < 0 || n > HD_MAX_ARGS) luaL_error(L, "handler: args: at most %d arguments", HD_MAX_ARGS);
  luaL_checkstack(L, n + 2, "handler: args");
  for (i = 1; i <= n; i++) lua_rawgeti(L, t, i);
  return n;
}

/* The items at index t (an array of values, each the one argument of its
 * run), into the frame. */
static void l_build_items(lua_State *L, hd_buf *b, hd_job *j, int t) {
  int k, n = (int)lua_objlen(L, t), top = lua_gettop(L);
  if (n < 1 || n > HD_MAX_ITEMS)
    luaL_error(L, "handler: items: between 1 and %d items", HD_MAX_ITEMS);
  if (hd_wire_job_items(b) != 0) luaL_error(L, "handler: out of memory");
  for (k = 1; k <= n; k++) {
    long at = hd_wire_job_item_begin(b);
    if (at < 0) luaL_error(L, "handler: out of memory");
    lua_rawgeti(L, t, k);
    hd_encode(L, top + 1, 1, b, HD_ENC_FUNCTIONS | HD_ENC_HOST | HD_ENC_ITEM);
    if (hd_wire_job_item_end(b, at) != 0) luaL_error(L, "handler: out of memory");
    lua_settop(L, top);
  }
  hd_job_set_items(j, (uint32_t)n);
}

static void l_build_frame(lua_State *L, hd_sched *s, hd_job *j, uint64_t heap, double max_output,
                          int env, int args, int items) {
  hd_buf *b = hd_sched_scratch(s);
  if (hd_wire_job_begin(b, hd_job_id(j), heap, hd_u64_of(max_output),
                        hd_sched_job_path(s), hd_sched_job_cpath(s)) != 0)
    luaL_error(L, "handler: out of memory");
  if (env) {
    int i, n = (int)lua_objlen(L, env);
    for (i = 1; i + 1 <= n; i += 2) {
      size_t kn, vn;
      const char *k, *v;
      lua_rawgeti(L, env, i);
      lua_rawgeti(L, env, i + 1);
      k = lua_tolstring(L, -2, &kn);
      v = lua_tolstring(L, -1, &vn);
      if (k == NULL || v == NULL) luaL_error(L, "handler: env entries must be strings");
      if (hd_wire_job_env(b, k, kn, v, vn) != 0) luaL_error(L, "handler: out of memory");
      lua_pop(L, 2);
    }
  }
  if (items) l_build_items(L, b, j, items);
  if (lua_type(L, 3) == LUA_TSTRING) {
    /* A job encoded elsewhere (core.encode_job, by a handler.remote
     * producer): its bytes go to the worker as they are. The host never
     * decodes them (they hold bytecode); the worker decodes them as it
     * decodes every job, and a malformed message fails that job alone. */
    size_t len;
    const char *msg = lua_tolstring(L, 3, &len);
    if (args || items) luaL_error(L, "handler: an encoded job carries its own arguments");
    if (hd_buf_append(b, msg, len) != 0) luaL_error(L, "handler: out of memory");
  } else if (args) {
    int n, top = lua_gettop(L);
    lua_pushvalue(L, 3);
    n = l_push_args(L, args);
    hd_encode(L, top + 1, n + 1, b, HD_ENC_FUNCTIONS | HD_ENC_HOST | HD_ENC_ARGS);
    lua_settop(L, top);
  } else {
    hd_encode(L, 3, 1, b, HD_ENC_FUNCTIONS | HD_ENC_HOST);
  }
  if (hd_wire_job_end(b) != 0)
    luaL_error(L, "handler: the function and its upvalues encode to more than %d bytes",
               (int)HD_MAX_JOB_FRAME);
  if (hd_job_set_frame(j, b) != 0) luaL_error(L, "handler: out of memory");
}

/* submit(pool, chains|nil, fn, max_ms, max_heap, task_name|nil, pool_timeout,
 *        max_result, max_output, env|nil, args|nil, max_cpu_ms|nil, output|nil,
 *        items|nil)
 *   -> job | nil, reject_type
 * items: an array of values; the function runs once per item, with it. */
static int l_submit(lua_State *L) {
  hd_sched *s = l_core(L);
  hd_pool *pool = l_checkpool(L, 1);
  hd_job_limits lim;
  const char *task = luaL_optstring(L, 6, NULL);
  double max_output = luaL_optnumber(L, 9, 16.0 * 1024 * 1024);
  int env = lua_istable(L, 10) ? 10 : 0;
  int args = lua_istable(L, 11) ? 11 : 0;
  int items = lua_istable(L, 14) ? 14 : 0;
  hd_job *j;
  l_job *u;
  lim.max_ms = luaL_checknumber(L, 4);
  lim.max_heap = hd_u64_of(luaL_checknumber(L, 5));
  lim.pool_timeout = luaL_optnumber(L, 7, 0);
  lim.max_result = luaL_optnumber(L, 8, 0);
  lim.max_output = max_output;
  lim.max_cpu_ms = luaL_optnumber(L, 12, HUGE_VAL);
  lim.output = (int)luaL_optinteger(L, 13, HD_OUTPUT_INHERIT);
  if (lim.output < HD_OUTPUT_INHERIT || lim.output > HD_OUTPUT_DISCARD)
    return luaL_argerror(L, 13, "bad output mode");
  luaL_checkany(L, 3);
  if (hd_sched_in_loop(s)) return luaL_error(L, "handler: cannot start a job from inside the loop");
  u = lua_newuserdata(L, sizeof *u);
  u->j = NULL;
  luaL_getmetatable(L, L_JOB);
  lua_setmetatable(L, -2);
  j = hd_job_new(s, pool);
  if (j == NULL) return luaL_error(L, "handler: out of memory");
  u->j = j;
  lua_pushlightuserdata(L, &l_jobs_key);
  lua_rawget(L, LUA_REGISTRYINDEX);
  lua_pushlightuserdata(L, j);
  lua_pushvalue(L, -3);
  lua_rawset(L, -3);
  lua_pop(L, 1);
  hd_job_set_limits(j, &lim);
  if (hd_job_set_task(j, task) != 0) return luaL_error(L, "handler: out of memory");
  l_fill_chains(L, hd_job_chains(j), pool, 2);
  l_set_paths(L, s);
  /* On an error from here on, the job userdata frees the job. */
  l_build_frame(L, s, j, lim.max_heap, max_output, env, args, items);
  hd_job_submit(j);
  if (hd_job_done(j) && HD_OUT_IS_REJECT(hd_job_outcome(j))) {
    lua_pushnil(L);
    lua_pushstring(L, l_reject_names[hd_job_outcome(j) - HD_OUT_NOWORKERS]);
    return 2;
  }
  return 1;
}

/* Runs in protected mode: decodes a worker's reply as hostile input. */
static int l_decode_reply(lua_State *L) {
  const char *p = lua_touserdata(L, 1);
  size_t len = (size_t)lua_tonumber(L, 2);
  lua_settop(L, 0);
  return hd_decode(L, p, len, 0);
}

static int l_push_message(lua_State *L, const char *msg, size_t len) {
  int top = lua_gettop(L);
  lua_pushcfunction(L, l_decode_reply);
  lua_pushlightuserdata(L, (void *)msg);
  lua_pushnumber(L, (lua_Number)len);
  if (lua_pcall(L, 2, LUA_MULTRET, 0) != 0) {
    const char *m = lua_tostring(L, -1);
    lua_settop(L, top);
    lua_pushboolean(L, 0);
    lua_pushliteral(L, "badreply");
    lua_pushstring(L, m ? m : "undecodable reply");
    return -1;
  }
  return lua_gettop(L) - top;
}

static int l_push_signal(lua_State *L, int sig) {
  const char *abbrev = sigabbrev_np(sig);
  if (abbrev) lua_pushfstring(L, "SIG%s", abbrev);
  else lua_pushfstring(L, "signal %d", sig);
  return 1;
}

/* Pushes the outcome of a reply (status, message): as l_push_outcome does. */
static int l_push_reply(lua_State *L, int status, const char *msg, size_t len) {
  int n;
  switch (status) {
    case HD_REPLY_OK:
      lua_pushboolean(L, 1);
      n = l_push_message(L, msg, len);
      return n < 0 ? 3 : n + 1;
    case HD_REPLY_ERROR:
      lua_pushboolean(L, 0);
      lua_pushliteral(L, "error");
      n = l_push_message(L, msg, len);
      if (n < 0) return 3;
      lua_settop(L, lua_gettop(L) - n + 2);
      return 4;
    case HD_REPLY_OOM:
      lua_pushboolean(L, 0);
      lua_pushliteral(L, "oom");
      return 2;
    default:
      lua_pushboolean(L, 0);
      lua_pushliteral(L, "badresult");
      n = l_push_message(L, msg, len);
      if (n < 0) return 3;
      lua_settop(L, lua_gettop(L) - n + 1);
      return 3;
  }
}

/* Pushes a finished job's outcome: true, results... | false, kind, a, b */
static int l_push_outcome(lua_State *L, hd_job *j, int ud) {
  int status = hd_job_status(j);
  hd_outcome out = hd_job_outcome(j);
  if (hd_job_forsaken(j)) {
    /* Started before a fork: its worker and its reply are the parent's. */
    lua_pushboolean(L, 0);
    lua_pushliteral(L, "forked");
    return 2;
  }
  switch (out) {
    case HD_OUT_OK:
    case HD_OUT_ERROR:
    case HD_OUT_OOM:
    case HD_OUT_BADRESULT: {
      const char *msg;
      size_t len;
      if (out == HD_OUT_BADRESULT && hd_job_detail(j)[0]) {
        lua_pushboolean(L, 0);
        lua_pushliteral(L, "badresult");
        lua_pushstring(L, hd_job_detail(j));
        return 3;
      }
      hd_job_message(j, &msg, &len);
      return l_push_reply(L, out == HD_OUT_OK ? HD_REPLY_OK : out == HD_OUT_ERROR ? HD_REPLY_ERROR
                             : out == HD_OUT_OOM ? HD_REPLY_OOM : HD_REPLY_BADRESULT,
                          msg, len);
    }
    case HD_OUT_TIMEOUT:
      lua_pushboolean(L, 0);
      lua_pushliteral(L, "timeout");
      return 2;
    case HD_OUT_CPUTIME:
      lua_pushboolean(L, 0);
      lua_pushliteral(L, "cputime");
      return 2;
    case HD_OUT_EXIT:
      lua_pushboolean(L, 0);
      if (status >= 0 && WIFSIGNALED(status)) {
        lua_pushliteral(L, "signal");
        return 2 + l_push_signal(L, WTERMSIG(status));
      }
      lua_pushliteral(L, "exit");
      if (status >= 0 && WIFEXITED(status)) lua_pushinteger(L, WEXITSTATUS(status));
      else lua_pushnil(L);
      return 3;
    case HD_OUT_KILLED:
      lua_pushboolean(L, 0);
      lua_pushliteral(L, "killed");
      lua_getfenv(L, ud);
      if (lua_istable(L, -1)) {
        lua_pushlightuserdata(L, &l_killerr_key);
        lua_rawget(L, -2);
        lua_remove(L, -2);
      } else {
        lua_pop(L, 1);
        lua_pushnil(L);
      }
      return 3;
    case HD_OUT_OUTPUT:
      lua_pushboolean(L, 0);
      lua_pushliteral(L, "output");
      lua_pushstring(L, hd_job_detail(j));
      return 3;
    case HD_OUT_BADREPLY:
    case HD_OUT_FAILED:
      lua_pushboolean(L, 0);
      lua_pushstring(L, out == HD_OUT_FAILED ? "failed" : "badreply");
      lua_pushstring(L, hd_job_detail(j));
      return 3;
    case HD_OUT_NOWORKERS:
    case HD_OUT_NOMEMORY:
    case HD_OUT_POOLTIMEOUT:
      lua_pushboolean(L, 0);
      lua_pushstring(L, l_reject_names[out - HD_OUT_NOWORKERS]);
      return 2;
    default:
      return luaL_error(L, "handler: job in an impossible state");
  }
}

/* Blocks until the job is done. A job of a forsaken context is over for
 * this process (l_push_outcome). */
static void l_wait(lua_State *L, hd_sched *s, hd_job *j) {
  if (hd_job_forsaken(j)) return;
  if (hd_sched_in_loop(s)) luaL_error(L, "handler: cannot wait from inside the loop");
  hd_sched_wait(s, j);
}

/* await(job) -> true, results... | false, kind, ... */
static int l_await(lua_State *L) {
  hd_sched *s = l_core(L);
  hd_job *j = l_checkjob(L, 1);
  l_wait(L, s, j);
  lua_settop(L, 1);
  return l_push_outcome(L, j, 1);
}

/* The job userdata at `at` is no one's once run returns: the job goes now,
 * and the userdata loses its finalizer (the collector finalizes an object
 * with __gc in a separate step, a protected call each, and keeps it a cycle
 * longer) and its entry in the registry's table of jobs. */
static void l_job_drop(lua_State *L, int at) {
  l_job *u = lua_touserdata(L, at);
  lua_pushlightuserdata(L, &l_jobs_key);
  lua_rawget(L, LUA_REGISTRYINDEX);
  lua_pushlightuserdata(L, u->j);
  lua_pushnil(L);
  lua_rawset(L, -3);
  lua_pop(L, 1);
  lua_pushnil(L);
  lua_setmetatable(L, at);
  l_job_release(u);
}

/* run(pool, chains|nil, fn, max_ms, max_heap, task_name, pool_timeout,
 *     max_result) -> like await, rejects included */
static int l_run(lua_State *L) {
  hd_sched *s = l_core(L);
  hd_job *j;
  int n = l_submit(L), at;
  if (n == 2) {
    lua_pushboolean(L, 0);
    lua_replace(L, -3);
    return 2;
  }
  at = lua_gettop(L);
  j = ((l_job *)lua_touserdata(L, at))->j;
  l_wait(L, s, j);
  n = l_push_outcome(L, j, at);
  /* No one can ask for this job's result again: a big reply's buffer is
   * the warm spare for the next big transfer, not garbage for the GC. */
  if (!hd_job_forsaken(j)) hd_job_release_message(j);
  l_job_drop(L, at);
  return n;
}

static int l_done(lua_State *L) {
  hd_job *j;
  l_core(L);
  j = l_checkjob(L, 1);
  lua_pushboolean(L, hd_job_forsaken(j) || hd_job_done(j));
  return 1;
}

/* What item_result and item_stats take: (job, i). Sets the item's number
 * and how many items replied before the one the job ended with; `stored`
 * says whether item i is one of those, and then `it` holds its reply. */
typedef struct {
  uint32_t i, done;
  int stored, status;
  const char *msg;
  size_t len;
  uint64_t cpu, peak, wall;
} l_item;

static hd_job *l_item_args(lua_State *L, l_item *it) {
  hd_job *j;
  l_core(L);
  j = l_checkjob(L, 1);
  it->i = (uint32_t)luaL_checkinteger(L, 2);
  it->done = hd_job_items_done(j);
  it->stored = it->i >= 1 && it->i <= it->done &&
               hd_job_item(j, it->i - 1, &it->status, &it->msg, &it->len, &it->cpu, &it->peak,
                           &it->wall) == 0;
  return j;
}

/* item_result(job, i) -> item i's outcome (as result gives a job's), or
 * false, "notrun" for an item after the one the job ended with. */
static int l_item_result(lua_State *L) {
  l_item it;
  hd_job *j = l_item_args(L, &it);
  uint32_t i = it.i, done = it.done;
  if (!hd_job_done(j)) return luaL_error(L, "handler: the job is not done");
  if (it.stored) return l_push_reply(L, it.status, it.msg, it.len);
  if (i == done + 1) return l_push_outcome(L, j, 1);
  lua_pushboolean(L, 0);
  lua_pushliteral(L, "notrun");
  return 2;
}

/* item_text(job, i [, write]) -> whether item i ended well returning true
 * and a string; with `write`, the string and a newline go to the process's
 * stdout (the FILE io.stdout is) without becoming a Lua string. */
static int l_item_text(lua_State *L) {
  l_item it;
  hd_job *j = l_item_args(L, &it);
  const char *msg = NULL, *s;
  size_t len = 0, slen;
  int ok = 0;
  if (!hd_job_done(j)) return luaL_error(L, "handler: the job is not done");
  if (it.stored) {
    ok = it.status == HD_REPLY_OK;
    msg = it.msg;
    len = it.len;
  } else if (it.i == it.done + 1 && !hd_job_forsaken(j) && hd_job_outcome(j) == HD_OUT_OK) {
    hd_job_message(j, &msg, &len);
    ok = 1;
  }
  ok = ok && hd_decode_true_string(msg, len, &s, &slen) == 0;
  if (ok && lua_toboolean(L, 3)) {
    fwrite(s, 1, slen, stdout);
    putc('\n', stdout);
  }
  lua_pushboolean(L, ok);
  return 1;
}

static void l_setnum(lua_State *L, const char *k, double v);

/* item_stats(job, i) -> as job_stats, for item i of those that ran. */
static int l_item_stats(lua_State *L) {
  l_item it;
  hd_job *j = l_item_args(L, &it);
  uint64_t cpu, peak;
  lua_createtable(L, 0, 5);
  if (it.stored) {
    /* Replies read together are seen by the host at one time: the wall
     * time is never less than the CPU time the worker said. */
    l_setnum(L, "wall_ms", (double)(it.wall > it.cpu ? it.wall : it.cpu) / 1e6);
    l_setnum(L, "cpu_ms", (double)it.cpu / 1e6);
    l_setnum(L, "heap_peak_bytes", (double)it.peak);
    return 1;
  }
  if (it.i == it.done + 1) {
    l_setnum(L, "wall_ms", (double)hd_job_item_wall(j) / 1e6);
    l_setnum(L, "output_bytes", hd_job_output_bytes(j));
    if (hd_job_worker_stats(j, &cpu, &peak)) {
      l_setnum(L, "cpu_ms", (double)cpu / 1e6);
      l_setnum(L, "heap_peak_bytes", (double)peak);
    }
  }
  return 1;
}

static int l_result(lua_State *L) {
  hd_job *j;
  l_core(L);
  j = l_checkjob(L, 1);
  if (!hd_job_forsaken(j) && !hd_job_done(j)) return luaL_error(L, "handler: job is not done");
  lua_settop(L, 1);
  return l_push_outcome(L, j, 1);
}

/* output(job) -> what a job with output = "capture" wrote so far, and the
 * bytes of output it was counted for. */
static int l_output(lua_State *L) {
  const char *p;
  size_t len;
  hd_job *j;
  l_core(L);
  j = l_checkjob(L, 1);
  hd_job_output(j, &p, &len);
  lua_pushlstring(L, p, len);
  lua_pushnumber(L, hd_job_output_bytes(j));
  return 2;
}

static void l_setnum(lua_State *L, const char *k, double v) {
  lua_pushnumber(L, v);
  lua_setfield(L, -2, k);
}

/* Runs in protected mode: decodes the events at 1 (a buffer of u32 length
 * and message each, 2 bytes long) into the table at 3, as hostile input. */
static int l_decode_events(lua_State *L) {
  const char *p = lua_touserdata(L, 1);
  size_t len = (size_t)lua_tonumber(L, 2), at = 0;
  int k = 0;
  while (at + 4 <= len) {
    size_t n = hd_get_u32(p + at);
    int top = lua_gettop(L);
    if (n > len - at - 4) break;
    hd_decode(L, p + at + 4, n, 0);
    /* One value each; anything else is nothing. */
    if (lua_gettop(L) == top) lua_pushnil(L);
    lua_settop(L, top + 1);
    lua_rawseti(L, 3, ++k);
    at += 4 + n;
  }
  lua_pushinteger(L, k);
  lua_setfield(L, 3, "n");
  return 0;
}

/* events(job) -> nil | { values..., n = count }: the job's events not yet
 * taken, in the order they came. */
static int l_events(lua_State *L) {
  hd_buf b = HD_BUF_INIT;
  hd_job *j;
  int rc;
  l_core(L);
  j = l_checkjob(L, 1);
  if (!hd_job_has_events(j)) return 0;
  hd_job_take_events(j, &b);
  lua_settop(L, 0);
  lua_pushcfunction(L, l_decode_events);
  lua_pushlightuserdata(L, b.data);
  lua_pushnumber(L, (lua_Number)b.len);
  lua_newtable(L);
  lua_pushvalue(L, -1);
  lua_insert(L, 1);
  rc = lua_pcall(L, 3, 0, 0);
  hd_buf_free(&b);
  if (rc != 0) return lua_error(L);
  return 1;
}

/* A yes-or-no question about the job at 1. */
static int l_job_is(lua_State *L, int (*is)(const hd_job *)) {
  hd_job *j;
  l_core(L);
  j = l_checkjob(L, 1);
  lua_pushboolean(L, is(j));
  return 1;
}

static int l_started(lua_State *L) {
  return l_job_is(L, hd_job_started);
}

static int l_has_events(lua_State *L) {
  return l_job_is(L, hd_job_has_events);
}

/* job_stats(job) -> { wall_ms, cpu_ms, queued_ms, heap_peak_bytes,
 * output_bytes }: cpu_ms and heap_peak_bytes are the worker's word, and
 * missing when the job ended without a reply. */
static int l_job_stats(lua_State *L) {
  uint64_t queued, run, cpu, peak;
  hd_job *j;
  l_core(L);
  j = l_checkjob(L, 1);
  hd_job_times(j, &queued, &run);
  lua_createtable(L, 0, 5);
  l_setnum(L, "wall_ms", (double)run / 1e6);
  l_setnum(L, "queued_ms", (double)queued / 1e6);
  l_setnum(L, "output_bytes", hd_job_output_bytes(j));
  if (hd_job_worker_stats(j, &cpu, &peak)) {
    l_setnum(L, "cpu_ms", (double)cpu / 1e6);
    l_setnum(L, "heap_peak_bytes", (double)peak);
  }
  return 1;
}

static int l_job_id(lua_State *L) {
  lua_pushnumber(L, (lua_Number)hd_job_id(l_checkjob(L, 1)));
  return 1;
}

/* Records the caller's error for a job about to be killed, on its userdata,
 * where await finds it. `err` is a stack index, or 0 for the default. */
static void l_set_kill_err(lua_State *L, hd_job *j, int err) {
  if (err == 0) return;
  lua_pushlightuserdata(L, &l_jobs_key);
  lua_rawget(L, LUA_REGISTRYINDEX);
  lua_pushlightuserdata(L, j);
  lua_rawget(L, -2);
  if (lua_isuserdata(L, -1)) {
    lua_createtable(L, 0, 1);
    lua_pushlightuserdata(L, &l_killerr_key);
    lua_pushvalue(L, err);
    lua_rawset(L, -3);
    lua_setfenv(L, -2);
  }
  lua_pop(L, 2);
}

/* What l_kill_matching kills, and the error the caller gave for them. */
typedef struct {
  lua_State *L;
  hd_pool *pool;
  const char *name; /* NULL: every job */
  int err;          /* stack index of the caller's error, or 0 */
} l_killing;

static int l_matches(hd_job *j, void *ud) {
  l_killing *k = ud;
  const char *task = hd_job_task(j);
  return hd_job_in_pool(j, k->pool) && (!k->name || (task && !strcmp(task, k->name)));
}

static void l_before_kill(hd_job *j, void *ud) {
  l_killing *k = ud;
  l_set_kill_err(k->L, j, k->err);
}

/* Kills the pool's jobs matching `name` (all when NULL); returns how many. */
static int l_kill_matching(lua_State *L, hd_sched *s, hd_pool *p, const char *name, int err) {
  l_killing k;
  k.L = L;
  k.pool = p;
  k.name = name;
  k.err = err;
  lua_pushinteger(L, hd_sched_kill_where(s, l_matches, l_before_kill, &k));
  return 1;
}

/* kill(pool, task_name [, err]) -> count */
static int l_kill(lua_State *L) {
  hd_sched *s = l_core(L);
  return l_kill_matching(L, s, l_checkpool(L, 1), luaL_checkstring(L, 2),
                         lua_isnoneornil(L, 3) ? 0 : 3);
}

/* flush(pool [, err]) -> count */
static int l_flush(lua_State *L) {
  hd_sched *s = l_core(L);
  return l_kill_matching(L, s, l_checkpool(L, 1), NULL, lua_isnoneornil(L, 2) ? 0 : 2);
}

/* kill_job(pool, job [, err]) -> boolean */
static int l_kill_job(lua_State *L) {
  hd_pool *p;
  hd_job *j;
  l_core(L);
  p = l_checkpool(L, 1);
  j = l_checkjob(L, 2);
  if (hd_job_forsaken(j) || hd_job_done(j) || !hd_job_in_pool(j, p)) {
    lua_pushboolean(L, 0);
    return 1;
  }
  if (!lua_isnoneornil(L, 3)) l_set_kill_err(L, j, 3);
  hd_job_kill(j);
  lua_pushboolean(L, 1);
  return 1;
}

static int l_close(lua_State *L) {
  hd_sched *s = l_core(L);
  hd_sched_close_pool(s, l_checkpool(L, 1));
  return 0;
}


static int l_stats(lua_State *L) {
  hd_pool_stats st;
  const double *o = st.by_outcome;
  l_core(L);
  hd_pool_stats_of(l_checkpool(L, 1), &st);
  lua_createtable(L, 0, 24);
  l_setnum(L, "running", st.running);
  l_setnum(L, "queued", st.queued);
  l_setnum(L, "bytes_committed", st.committed);
  l_setnum(L, "max_workers", st.max_workers);
  l_setnum(L, "max_memory_bytes", st.max_memory);
  l_setnum(L, "processes", st.processes);
  l_setnum(L, "processes_started", st.processes_started);
  l_setnum(L, "started", st.started);
  l_setnum(L, "succeeded", st.succeeded);
  l_setnum(L, "failed_timeout", o[HD_OUT_TIMEOUT]);
  l_setnum(L, "failed_cpu_timeout", o[HD_OUT_CPUTIME]);
  l_setnum(L, "failed_oom", o[HD_OUT_OOM]);
  l_setnum(L, "failed_error", o[HD_OUT_ERROR]);
  l_setnum(L, "failed_exit", o[HD_OUT_EXIT]);
  l_setnum(L, "failed_other",
           o[HD_OUT_BADRESULT] + o[HD_OUT_BADREPLY] + o[HD_OUT_FAILED] + o[HD_OUT_OUTPUT]);
  l_setnum(L, "killed", o[HD_OUT_KILLED]);
  l_setnum(L, "failed", o[HD_OUT_TIMEOUT] + o[HD_OUT_CPUTIME] + o[HD_OUT_OOM] + o[HD_OUT_ERROR] + o[HD_OUT_EXIT] +
                            o[HD_OUT_BADRESULT] + o[HD_OUT_BADREPLY] + o[HD_OUT_FAILED] +
                            o[HD_OUT_OUTPUT] + o[HD_OUT_KILLED]);
  l_setnum(L, "rejected", st.rejected);
  l_setnum(L, "rejected_no_workers", o[HD_OUT_NOWORKERS]);
  l_setnum(L, "rejected_insufficient_memory", o[HD_OUT_NOMEMORY]);
  l_setnum(L, "rejected_pool_timeout", o[HD_OUT_POOLTIMEOUT]);
  return 1;
}

/* Pushes a histogram: { le_1, ..., le_n, +Inf, sum = s, count = n }, the
 * cumulative counts of hd_pool_hist in the order of time_bounds. */
static void l_push_hist(lua_State *L, const hd_pool_hist *h) {
  int i;
  lua_createtable(L, HD_TIME_BUCKETS, 2);
  for (i = 0; i < HD_TIME_BUCKETS; i++) {
    lua_pushnumber(L, h->le[i]);
    lua_rawseti(L, -2, i + 1);
  }
  l_setnum(L, "sum", h->sum);
  l_setnum(L, "count", h->count);
}

/* times(pool) -> queue, run: the pool's histograms of job times. */
static int l_times(lua_State *L) {
  hd_pool_hist queue, run;
  l_core(L);
  hd_pool_times_of(l_checkpool(L, 1), &queue, &run);
  l_push_hist(L, &queue);
  l_push_hist(L, &run);
  return 2;
}

/* The bucket bounds of the histograms (HD_TIME_BOUNDS), a list of seconds. */
static void l_push_time_bounds(lua_State *L) {
  const double *b = hd_pool_time_bounds();
  int i;
  lua_createtable(L, HD_TIME_BUCKETS - 1, 0);
  for (i = 0; i < HD_TIME_BUCKETS - 1; i++) {
    lua_pushnumber(L, b[i]);
    lua_rawseti(L, -2, i + 1);
  }
}

/* The loop, for hosts that drive it: a pollable fd, the next timeout, and a
 * non-blocking step. */
static int l_fd(lua_State *L) {
  lua_pushinteger(L, hd_sched_fd(l_core(L)));
  return 1;
}

static int l_timeout(lua_State *L) {
  lua_pushinteger(L, hd_sched_timeout(l_core(L)));
  return 1;
}

static int l_step(lua_State *L) {
  hd_sched *s = l_core(L);
  if (hd_sched_in_loop(s)) return luaL_error(L, "handler: cannot step from inside the loop");
  hd_sched_step(s);
  return 0;
}

/* A watched job ended: its id is kept for core.finished. */
static void l_on_end(void *ud, hd_job *j) {
  l_ctx *x = ud;
  if (x->n_ended == x->cap_ended) {
    size_t cap = x->cap_ended ? 2 * x->cap_ended : 16;
    double *e = realloc(x->ended, cap * sizeof *e);
    if (e == NULL) {
      /* core.finished then says so, and the host checks every job. */
      x->ended_oom = 1;
      return;
    }
    x->ended = e;
    x->cap_ended = cap;
  }
  x->ended[x->n_ended++] = (double)hd_job_id(j);
}

/* watch(job) -> done: marks the job, so its id is among core.finished()'s
 * when it ends; true when it is done already (then it is not marked). */
static int l_watch(lua_State *L) {
  hd_job *j;
  l_core(L);
  j = l_checkjob(L, 1);
  if (hd_job_forsaken(j) || hd_job_done(j)) {
    lua_pushboolean(L, 1);
    return 1;
  }
  hd_job_notify(j);
  lua_pushboolean(L, 0);
  return 1;
}

/* finished() -> nil | { ids of watched jobs that ended since the last
 * call } | false when memory ran out on the way (then check every job). */
static int l_finished(lua_State *L) {
  l_ctx *x = lua_touserdata(L, lua_upvalueindex(1));
  size_t i;
  l_core(L);
  if (x->ended_oom) {
    x->ended_oom = 0;
    x->n_ended = 0;
    lua_pushboolean(L, 0);
    return 1;
  }
  if (x->n_ended == 0) return 0;
  lua_createtable(L, (int)x->n_ended, 0);
  for (i = 0; i < x->n_ended; i++) {
    lua_pushnumber(L, x->ended[i]);
    lua_rawseti(L, -2, (int)i + 1);
  }
  x->n_ended = 0;
  return 1;
}

/* wait_any({ job, ... }, timeout_ms [, events]) -> index | nil: blocks until
 * a job of the array is done (with `events`, or has events waiting) -- the
 * lowest index of those -- or the time passes. */
static int l_wait_any(lua_State *L) {
  hd_sched *s = l_core(L);
  double timeout = luaL_checknumber(L, 2);
  int events = lua_toboolean(L, 3);
  int n, i, r;
  hd_job **jobs;
  luaL_checktype(L, 1, LUA_TTABLE);
  n = (int)lua_objlen(L, 1);
  if (hd_sched_in_loop(s)) return luaL_error(L, "handler: cannot wait from inside the loop");
  jobs = lua_newuserdata(L, (size_t)(n > 0 ? n : 1) * sizeof *jobs);
  for (i = 0; i < n; i++) {
    lua_rawgeti(L, 1, i + 1);
    jobs[i] = l_checkjob(L, -1);
    lua_pop(L, 1);
    /* A job of the parent's, before a fork, is over here. */
    if (hd_job_forsaken(jobs[i])) {
      lua_pushinteger(L, i + 1);
      return 1;
    }
  }
  r = hd_sched_wait_any(s, jobs, n, timeout, events);
  if (r == -2) return luaL_error(L, "handler: out of memory");
  if (r < 0) return 0;
  lua_pushinteger(L, r + 1);
  return 1;
}

/* active() -> how many jobs are queued or running in this process. */
static int l_active(lua_State *L) {
  lua_pushinteger(L, hd_sched_active(l_core(L)));
  return 1;
}

static int l_any_ended(void *ud) {
  l_ctx *x = ud;
  return x->n_ended > 0 || x->ended_oom;
}

/* wait_ended(timeout_ms) -> whether a watched job ended (core.finished then
 * lists it): blocks until one does, or the time passes. */
static int l_wait_ended(lua_State *L) {
  l_ctx *x = lua_touserdata(L, lua_upvalueindex(1));
  hd_sched *s = l_core(L);
  double timeout = luaL_optnumber(L, 1, HUGE_VAL);
  int r;
  if (hd_sched_in_loop(s)) return luaL_error(L, "handler: cannot wait from inside the loop");
  r = hd_sched_wait_until(s, l_any_ended, x, timeout);
  if (r == -2) return luaL_error(L, "handler: out of memory");
  lua_pushboolean(L, r == 1);
  return 1;
}

/* bell() -> path: the unix socket a host connects to, to be woken when the
 * loop has work (bell.h). Made on first use. */
static int l_bell(lua_State *L) {
  l_ctx *x = lua_touserdata(L, lua_upvalueindex(1));
  hd_sched *s = l_core(L);
  if (x->bell == NULL) {
    char err[256];
    x->bell = hd_bell_new(hd_sched_fd(s), err, sizeof err);
    if (x->bell == NULL) return luaL_error(L, "handler: %s", err);
  }
  lua_pushstring(L, hd_bell_path(x->bell));
  return 1;
}

/* bell_close(): ends the bell (its thread, socket and directory); the next
 * bell() makes a new one. For tests, which must leave the process as they
 * found it. */
static int l_bell_close(lua_State *L) {
  l_ctx *x = lua_touserdata(L, lua_upvalueindex(1));
  l_core(L);
  if (x->bell != NULL) hd_bell_free(x->bell);
  x->bell = NULL;
  return 0;
}

typedef struct {
  lua_State *L;
  int n;
} l_pids;

static void l_add_pid(void *ud, pid_t pid) {
  l_pids *p = ud;
  lua_pushinteger(p->L, pid);
  lua_rawseti(p->L, -2, ++p->n);
}

/* procs() -> { supervisor = pid|nil, sockets = n, pids... }: for tests and
 * dashboards. */
static int l_procs(lua_State *L) {
  hd_sched *s = l_core(L);
  l_pids acc;
  pid_t sup;
  int fds;
  acc.L = L;
  acc.n = 0;
  lua_newtable(L);
  hd_sched_each_pid(s, l_add_pid, &acc, &sup, &fds);
  if (sup > 0) {
    lua_pushinteger(L, sup);
    lua_setfield(L, -2, "supervisor");
  }
  lua_pushinteger(L, fds);
  lua_setfield(L, -2, "sockets");
  return 1;
}

/* set_spin(us): how long a blocking wait polls before it sleeps. */
static int l_set_spin(lua_State *L) {
  double us = luaL_checknumber(L, 1);
  hd_sched_set_spin(l_core(L), hd_u64_of(us * 1000));
  return 0;
}

static int l_set_max_result(lua_State *L) {
  hd_sched_set_max_result(l_core(L), luaL_checknumber(L, 1));
  return 0;
}

static const luaL_Reg l_funcs[] = {
    {"pool_new", l_pool_new}, {"submit", l_submit},     {"run", l_run},
    {"await", l_await},       {"done", l_done},         {"result", l_result},
    {"job_id", l_job_id},     {"kill", l_kill},         {"kill_job", l_kill_job},
    {"flush", l_flush},       {"close", l_close},       {"stats", l_stats},
    {"times", l_times},
    {"fd", l_fd},             {"timeout", l_timeout},   {"step", l_step},
    {"procs", l_procs},       {"set_max_result", l_set_max_result},
    {"set_spin", l_set_spin}, {"watch", l_watch},     {"finished", l_finished},
    {"wait_any", l_wait_any}, {"bell", l_bell},       {"active", l_active},
    {"bell_close", l_bell_close}, {"output", l_output},
    {"job_stats", l_job_stats}, {"item_result", l_item_result}, {"item_stats", l_item_stats},
    {"item_text", l_item_text}, {"events", l_events},
    {"has_events", l_has_events}, {"wait_ended", l_wait_ended},
    {"started", l_started},
    {"validate", hd_l_validate}, {"refuse", hd_l_refuse},
    {NULL, NULL}};

/* Where the worker executable is: $HANDLER_WORKER, else beside this module. */
static void l_worker_path(char *out, size_t len) {
  const char *env = getenv("HANDLER_WORKER");
  Dl_info info;
  if (env != NULL && env[0] != '\0') {
    snprintf(out, len, "%s", env);
    return;
  }
  if (dladdr((void *)luaopen_handler_core, &info) != 0 && info.dli_fname != NULL) {
    const char *slash = strrchr(info.dli_fname, '/');
    if (slash != NULL) {
      snprintf(out, len, "%.*s/handler-worker", (int)(slash - info.dli_fname), info.dli_fname);
      return;
    }
  }
  snprintf(out, len, "handler-worker");
}

/* The bytecode header of the host VM, to compare with the worker's. */
static void l_bchead(lua_State *L, hd_sched *s) {
  size_t len;
  const char *p;
  int top = lua_gettop(L);
  lua_getglobal(L, "string");
  lua_getfield(L, -1, "dump");
  if (luaL_loadstring(L, "return") == 0 && lua_pcall(L, 1, 1, 0) == 0 &&
      (p = lua_tolstring(L, -1, &len)) != NULL) {
    hd_sched_set_bchead(s, p, len);
  }
  lua_settop(L, top);
}

/* A metatable whose __gc has the context userdata (at ctx) as upvalue 1. */
static void l_newmeta(lua_State *L, const char *name, lua_CFunction gc, int ctx) {
  luaL_newmetatable(L, name);
  lua_pushvalue(L, ctx);
  lua_pushcclosure(L, gc, 1);
  lua_setfield(L, -2, "__gc");
  lua_pushliteral(L, "handler");
  lua_setfield(L, -2, "__metatable");
  lua_pop(L, 1);
}

L_EXPORT int luaopen_handler_core(lua_State *L) {
  char path[4096], err[256];
  l_ctx *x;
  hd_sched *s;
  lua_settop(L, 0);
  l_worker_path(path, sizeof path);
  /* One core per Lua state: loading the module again (package.loaded
   * cleared, as test runners do) reuses the context and its workers. */
  lua_pushlightuserdata(L, &l_ctx_key);
  lua_rawget(L, LUA_REGISTRYINDEX);
  if (lua_isuserdata(L, 1) && ((l_ctx *)lua_touserdata(L, 1))->s != NULL) {
    s = ((l_ctx *)lua_touserdata(L, 1))->s;
  } else {
    lua_settop(L, 0);
    x = lua_newuserdata(L, sizeof *x);
    memset(x, 0, sizeof *x);
    l_newmeta(L, L_POOL, l_pool_gc, 1);
    l_newmeta(L, L_JOB, l_job_gc, 1);
    l_newmeta(L, L_CTX, l_ctx_gc, 1);
    luaL_getmetatable(L, L_CTX);
    lua_setmetatable(L, 1);
    s = hd_sched_new(path, err, sizeof err);
    if (s == NULL) return luaL_error(L, "handler: %s", err);
    x->s = s;
    hd_sched_on_end(s, l_on_end, x);
    /* Kept in the registry, so the context outlives every module table and
     * is closed last, when the state is. */
    lua_pushlightuserdata(L, &l_ctx_key);
    lua_pushvalue(L, 1);
    lua_rawset(L, LUA_REGISTRYINDEX);
    hd_weak_registry(L, &l_jobs_key, "v");
    hd_weak_registry(L, &l_pools_key, "k");
    l_bchead(L, s);
  }
  lua_newtable(L);
  lua_pushvalue(L, 1);
  luaL_openlib(L, NULL, l_funcs, 1);
  lua_pushcfunction(L, hd_l_encode);
  lua_setfield(L, -2, "encode");
  lua_pushcfunction(L, hd_l_decode);
  lua_setfield(L, -2, "decode");
  lua_pushcfunction(L, hd_l_encode_job);
  lua_setfield(L, -2, "encode_job");
  /* The protocol version the worker's hello carries: a handler.remote
   * entry carries it too, so that a consumer of another build refuses the
   * entry as the handshake refuses a worker. */
  lua_pushinteger(L, HD_PROTO_VERSION);
  lua_setfield(L, -2, "protocol");
  lua_pushstring(L, hd_sched_worker_path(s));
  lua_setfield(L, -2, "worker_path");
  l_push_time_bounds(L);
  lua_setfield(L, -2, "time_bounds");
#if defined(__SANITIZE_ADDRESS__)
  /* Built with AddressSanitizer: workers have no RLIMIT_DATA backstop. */
  lua_pushboolean(L, 1);
#else
  lua_pushboolean(L, 0);
#endif
  lua_setfield(L, -2, "sanitized");
  return 1;
}
