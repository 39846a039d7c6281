/* lhandler.c: the Lua binding, module handler.core: pools, jobs, the loop. */
#include <dlfcn.h>
#include <lauxlib.h>
#include <lua.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>

#include "codec.h"
#include "core.h"
#include "lcodec.h"
#include "wire.h"

#define L_CTX "handler.ctx"
#define L_POOL "handler.pool"
#define L_JOB "handler.job"

typedef struct { hd_core *c; } l_ctx;
typedef struct { hd_pool *p; } l_pool;
typedef struct { hd_job *j; } l_job;

#define L_EXPORT __attribute__((visibility("default")))

L_EXPORT int luaopen_handler_core(lua_State *L);

/* Keys of private values: addresses, which no Lua string can equal. */
static char l_ctx_key;     /* registry: the context userdata */
static char l_jobs_key;    /* registry: weak table, job pointer -> job userdata */
static char l_killerr_key; /* a job userdata's fenv: the caller's kill error */

/* Every function has the context userdata as upvalue 1. */
static hd_core *l_core(lua_State *L) {
  l_ctx *x = lua_touserdata(L, lua_upvalueindex(1));
  if (x->c == NULL || x->c->closing) luaL_error(L, "handler: the module has been shut down");
  return x->c;
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
  if (x->c != NULL) {
    hd_core *c = x->c;
    x->c = NULL;
    hd_core_shutdown(c);
    hd_core_unref(c);
  }
  return 0;
}

static int l_pool_gc(lua_State *L) {
  l_pool *u = luaL_checkudata(L, 1, L_POOL);
  if (u->p != NULL) {
    hd_pool *p = u->p;
    u->p = NULL;
    /* Nobody can start jobs here any more: idle processes go now, busy ones
     * when their jobs end. */
    if (!p->core->closing) {
      hd_proc *q;
      p->closed = 1;
      while ((q = p->idle) != NULL) hd_proc_retire(q);
    }
    hd_pool_unref(p);
  }
  return 0;
}

static int l_job_gc(lua_State *L) {
  l_job *u = luaL_checkudata(L, 1, L_JOB);
  if (u->j != NULL) {
    hd_job *j = u->j;
    u->j = NULL;
    hd_job_unref(j);
  }
  return 0;
}

/* pool_new(name|nil, max_workers, max_memory, parent|nil, idle_ms, sandbox) -> pool */
static int l_pool_new(lua_State *L) {
  hd_core *c = l_core(L);
  const char *name = luaL_optstring(L, 1, NULL);
  double workers = luaL_checknumber(L, 2);
  double memory = luaL_checknumber(L, 3);
  hd_pool *parent = lua_isnoneornil(L, 4) ? NULL : l_checkpool(L, 4);
  double idle = luaL_checknumber(L, 5);
  int sandbox = (int)luaL_optinteger(L, 6, 0) & (HD_SPAWN_LUA | HD_SPAWN_SECCOMP);
  l_pool *u = lua_newuserdata(L, sizeof *u);
  u->p = NULL;
  luaL_getmetatable(L, L_POOL);
  lua_setmetatable(L, -2);
  /* The pool keeps the Lua object of its parent alive. */
  lua_createtable(L, 1, 0);
  lua_pushvalue(L, 4);
  lua_rawseti(L, -2, 1);
  lua_setfenv(L, -2);
  u->p = hd_pool_new(c, name, workers, memory, parent, idle, sandbox);
  if (u->p == NULL) return luaL_error(L, "handler: out of memory");
  return 1;
}

static void l_chain_add(lua_State *L, hd_job *j, int chain, hd_pool *p) {
  if (j->chain_len[chain] >= HD_MAX_CHAIN)
    luaL_error(L, "handler: delegation chain longer than %d pools", HD_MAX_CHAIN);
  hd_pool_ref(p);
  j->chains[chain][j->chain_len[chain]++] = p;
}

/* Fills the job's candidate chains: from `chains` (a list of lists of pools,
 * computed by the Lua side when delegate_fun is involved) or by following
 * delegate_to from the pool. */
static void l_fill_chains(lua_State *L, hd_job *j, hd_pool *pool, int chains_idx) {
  if (lua_istable(L, chains_idx)) {
    int i, n = (int)lua_objlen(L, chains_idx);
    if (n > HD_MAX_CHAINS)
      luaL_error(L, "handler: more than %d candidate delegation chains", HD_MAX_CHAINS);
    if (n > 1) {
      j->chains = calloc((size_t)n, sizeof *j->chains);
      if (j->chains == NULL) {
        j->chains = j->chain0;
        luaL_error(L, "handler: out of memory");
      }
    }
    for (i = 1; i <= n; i++) {
      int k, m;
      lua_rawgeti(L, chains_idx, i);
      m = (int)lua_objlen(L, -1);
      j->nchains = i;
      for (k = 1; k <= m; k++) {
        lua_rawgeti(L, -1, k);
        l_chain_add(L, j, i - 1, l_checkpool(L, -1));
        lua_pop(L, 1);
      }
      lua_pop(L, 1);
      if (m == 0) luaL_error(L, "handler: empty delegation chain");
    }
    /* n == 0: delegate_fun offered no candidate; the job is rejected. */
  } else {
    hd_pool *p;
    j->nchains = 1;
    for (p = pool; p != NULL; p = p->parent) l_chain_add(L, j, 0, p);
  }
}

static void l_set_paths(lua_State *L, hd_core *c) {
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
  hd_core_set_paths(c, path ? path : "", cpath ? cpath : "");
  lua_pop(L, 3);
}

static const char *const l_reject_names[] = {"NoWorkersAvailable", "InsufficientMemory",
                                             "PoolTimeout"};

static int l_is_reject(hd_outcome o) {
  return o == HD_OUT_NOWORKERS || o == HD_OUT_NOMEMORY || o == HD_OUT_POOLTIMEOUT;
}

/* Appends a u32 length and the bytes. */
static int l_put_str(hd_buf *b, const char *s, size_t n) {
  char h[4];
  hd_put_u32(h, (uint32_t)n);
  return hd_buf_append(b, h, 4) || hd_buf_append(b, s, n);
}

/* submit(pool, chains|nil, fn, max_ms, max_heap, task_name|nil, pool_timeout,
 *        max_result, max_output, env|nil) -> job | nil, reject_type
 * env is a flat list: name, value, name, value... */
static int l_submit(lua_State *L) {
  hd_core *c = l_core(L);
  hd_pool *pool = l_checkpool(L, 1);
  double max_ms = luaL_checknumber(L, 4);
  double heap = luaL_checknumber(L, 5);
  const char *task = luaL_optstring(L, 6, NULL);
  double pool_timeout = luaL_optnumber(L, 7, 0);
  double max_result = luaL_optnumber(L, 8, 0);
  double max_output = luaL_optnumber(L, 9, 16.0 * 1024 * 1024);
  int env = lua_istable(L, 10) ? 10 : 0;
  hd_job *j;
  l_job *u;
  char *h;
  luaL_checkany(L, 3);
  if (c->in_loop) return luaL_error(L, "handler: cannot start a job from inside the loop");
  u = lua_newuserdata(L, sizeof *u);
  u->j = NULL;
  luaL_getmetatable(L, L_JOB);
  lua_setmetatable(L, -2);
  j = hd_job_new(c);
  if (j == NULL) return luaL_error(L, "handler: out of memory");
  u->j = j;
  lua_pushlightuserdata(L, &l_jobs_key);
  lua_rawget(L, LUA_REGISTRYINDEX);
  lua_pushlightuserdata(L, j);
  lua_pushvalue(L, -3);
  lua_rawset(L, -3);
  lua_pop(L, 1);
  j->max_ms = max_ms;
  j->max_heap = heap <= 0 ? 0 : (uint64_t)heap;
  j->pool_timeout = pool_timeout;
  j->max_result = max_result;
  if (task != NULL && (j->task_name = strdup(task)) == NULL)
    return luaL_error(L, "handler: out of memory");
  hd_pool_ref(pool);
  j->origin = pool;
  l_fill_chains(L, j, pool, 2);
  /* The frame: header, max_heap_bytes, then the closure. Encoding raises on
   * a value that cannot travel; the job userdata then frees the job. */
  l_set_paths(L, c);
  c->scratch.len = 0;
  if (c->scratch.data == NULL) hd_core_take_buf(c, &c->scratch, 0);
  if (hd_buf_reserve(&c->scratch, HD_FRAME_HEADER + 17) != 0)
    return luaL_error(L, "handler: out of memory");
  h = c->scratch.data;
  h[4] = HD_FRAME_JOB;
  hd_put_u64(h + 5, j->id);
  hd_put_u64(h + HD_FRAME_HEADER, j->max_heap);
  hd_put_u64(h + HD_FRAME_HEADER + 8, max_output <= 0 ? 0 : (uint64_t)max_output);
  h[HD_FRAME_HEADER + 16] = 0;
  c->scratch.len = HD_FRAME_HEADER + 17;
  if (c->sup == HD_SUP_UP && c->sup_paths_gen != c->paths_gen) {
    /* The image has older paths: this job carries the current ones. */
    c->scratch.data[HD_FRAME_HEADER + 16] |= HD_JOB_PATHS;
    if (l_put_str(&c->scratch, c->lua_path, strlen(c->lua_path)) ||
        l_put_str(&c->scratch, c->lua_cpath, strlen(c->lua_cpath)))
      return luaL_error(L, "handler: out of memory");
  }
  if (env) {
    int i, n = (int)lua_objlen(L, env);
    char cnt[4];
    c->scratch.data[HD_FRAME_HEADER + 16] |= HD_JOB_ENV;
    hd_put_u32(cnt, (uint32_t)(n / 2));
    if (hd_buf_append(&c->scratch, cnt, 4)) return luaL_error(L, "handler: out of memory");
    for (i = 1; i + 1 <= n; i += 2) {
      size_t kn, vn;
      const char *k, *v;
      lua_rawgeti(L, env, i);
      lua_rawgeti(L, env, i + 1);
      k = lua_tolstring(L, -2, &kn);
      v = lua_tolstring(L, -1, &vn);
      if (k == NULL || v == NULL) return luaL_error(L, "handler: env entries must be strings");
      if (l_put_str(&c->scratch, k, kn) || l_put_str(&c->scratch, v, vn))
        return luaL_error(L, "handler: out of memory");
      lua_pop(L, 2);
    }
  }
  hd_encode(L, 3, 1, &c->scratch, HD_ENC_FUNCTIONS);
  if (c->scratch.len - HD_FRAME_HEADER > HD_MAX_JOB_FRAME)
    return luaL_error(L, "handler: the function and its upvalues encode to more than %d bytes",
                      (int)HD_MAX_JOB_FRAME);
  hd_put_u32(c->scratch.data, (uint32_t)(c->scratch.len - HD_FRAME_HEADER));
  if (c->scratch.len > 65536) {
    /* A big frame is not copied: the job takes the scratch buffer. */
    hd_buf_free(&j->frame);
    j->frame = c->scratch;
    c->scratch.data = NULL;
    c->scratch.len = c->scratch.cap = 0;
  } else if (hd_buf_append(&j->frame, c->scratch.data, c->scratch.len) != 0) {
    return luaL_error(L, "handler: out of memory");
  } else if (c->scratch.cap > (1u << 20)) {
    /* A big buffer serving small frames goes back to the spare slot, where
     * the idle sweep can let it go. */
    hd_core_give_buf(c, &c->scratch);
  }
  hd_job_submit(j);
  if (j->state == HD_JOB_DONE && l_is_reject(j->outcome)) {
    lua_pushnil(L);
    lua_pushstring(L, l_reject_names[j->outcome - HD_OUT_NOWORKERS]);
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

static int l_push_decoded(lua_State *L, hd_job *j) {
  int top = lua_gettop(L);
  lua_pushcfunction(L, l_decode_reply);
  lua_pushlightuserdata(L, j->frame.data + j->frame_off);
  lua_pushnumber(L, (lua_Number)(j->frame.len - j->frame_off));
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

/* Pushes a finished job's outcome: true, results... | false, kind, a, b */
static int l_push_outcome(lua_State *L, hd_job *j, int ud) {
  int n;
  switch (j->outcome) {
    case HD_OUT_OK:
      lua_pushboolean(L, 1);
      n = l_push_decoded(L, j);
      return n < 0 ? 3 : n + 1;
    case HD_OUT_ERROR:
      lua_pushboolean(L, 0);
      lua_pushliteral(L, "error");
      n = l_push_decoded(L, j);
      if (n < 0) return 3;
      lua_settop(L, lua_gettop(L) - n + 2);
      return 4;
    case HD_OUT_OOM:
      lua_pushboolean(L, 0);
      lua_pushliteral(L, "oom");
      return 2;
    case HD_OUT_BADRESULT:
      lua_pushboolean(L, 0);
      lua_pushliteral(L, "badresult");
      if (j->detail[0]) {
        lua_pushstring(L, j->detail);
        return 3;
      }
      n = l_push_decoded(L, j);
      if (n < 0) return 3;
      lua_settop(L, lua_gettop(L) - n + 1);
      return 3;
    case HD_OUT_TIMEOUT:
      lua_pushboolean(L, 0);
      lua_pushliteral(L, "timeout");
      return 2;
    case HD_OUT_EXIT:
      lua_pushboolean(L, 0);
      if (j->status >= 0 && WIFSIGNALED(j->status)) {
        lua_pushliteral(L, "signal");
        return 2 + l_push_signal(L, WTERMSIG(j->status));
      }
      lua_pushliteral(L, "exit");
      if (j->status >= 0 && WIFEXITED(j->status)) lua_pushinteger(L, WEXITSTATUS(j->status));
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
    case HD_OUT_BADREPLY:
    case HD_OUT_FAILED:
      lua_pushboolean(L, 0);
      lua_pushstring(L, j->outcome == HD_OUT_FAILED ? "failed" : "badreply");
      lua_pushstring(L, j->detail);
      return 3;
    case HD_OUT_NOWORKERS:
    case HD_OUT_NOMEMORY:
    case HD_OUT_POOLTIMEOUT:
      lua_pushboolean(L, 0);
      lua_pushstring(L, l_reject_names[j->outcome - HD_OUT_NOWORKERS]);
      return 2;
    default:
      return luaL_error(L, "handler: job in an impossible state");
  }
}

/* Blocks until the job is done. A short job's reply usually comes within a
 * few tens of microseconds: polling for that long first saves the host a
 * sleep and a wake-up, which cost more than the whole round trip on an idle
 * machine. On a busy one polling steals the CPU the worker needs, so it is
 * adaptive: it stops after replies keep missing the window, and is tried
 * again every 64th wait. */
static void l_wait(lua_State *L, hd_core *c, hd_job *j) {
  uint64_t start;
  int spin;
  if (c->in_loop) luaL_error(L, "handler: cannot wait from inside the loop");
  c->in_loop = 1;
  spin = c->spin_ns > 0 && (c->spin_credit > 0 || (++c->spin_probe & 63) == 0);
  start = uv_hrtime();
  while (spin && j->state != HD_JOB_DONE && uv_hrtime() - start < c->spin_ns) {
    uv_run(&c->loop, UV_RUN_NOWAIT);
    /* A worker that wants this CPU gets it. */
    if (j->state != HD_JOB_DONE) sched_yield();
  }
  if (spin) {
    if (j->state == HD_JOB_DONE) c->spin_credit = c->spin_credit < 8 ? c->spin_credit + 1 : 8;
    else c->spin_credit = c->spin_credit > 4 ? c->spin_credit - 4 : 0;
  }
  while (j->state != HD_JOB_DONE) uv_run(&c->loop, UV_RUN_ONCE);
  c->in_loop = 0;
  if (c->npending) hd_core_reap_pending(c);
}

/* await(job) -> true, results... | false, kind, ... */
static int l_await(lua_State *L) {
  hd_core *c = l_core(L);
  hd_job *j = l_checkjob(L, 1);
  l_wait(L, c, j);
  lua_settop(L, 1);
  return l_push_outcome(L, j, 1);
}

/* run(pool, chains|nil, fn, max_ms, max_heap, task_name, pool_timeout,
 *     max_result) -> like await, rejects included */
static int l_run(lua_State *L) {
  hd_core *c = l_core(L);
  hd_job *j;
  int n = l_submit(L);
  if (n == 2) {
    lua_pushboolean(L, 0);
    lua_replace(L, -3);
    return 2;
  }
  j = ((l_job *)lua_touserdata(L, -1))->j;
  l_wait(L, c, j);
  return l_push_outcome(L, j, lua_gettop(L));
}

static int l_done(lua_State *L) {
  l_core(L);
  lua_pushboolean(L, l_checkjob(L, 1)->state == HD_JOB_DONE);
  return 1;
}

static int l_result(lua_State *L) {
  hd_job *j;
  l_core(L);
  j = l_checkjob(L, 1);
  if (j->state != HD_JOB_DONE) return luaL_error(L, "handler: job is not done");
  lua_settop(L, 1);
  return l_push_outcome(L, j, 1);
}

static int l_job_id(lua_State *L) {
  lua_pushnumber(L, (lua_Number)l_checkjob(L, 1)->id);
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
  return hd_pool_in_chain(j, k->pool) &&
         (!k->name || (j->task_name && !strcmp(j->task_name, k->name)));
}

static void l_before_kill(hd_job *j, void *ud) {
  l_killing *k = ud;
  l_set_kill_err(k->L, j, k->err);
}

/* Kills the pool's jobs matching `name` (all when NULL); returns how many. */
static int l_kill_matching(lua_State *L, hd_core *c, hd_pool *p, const char *name, int err) {
  l_killing k;
  k.L = L;
  k.pool = p;
  k.name = name;
  k.err = err;
  lua_pushinteger(L, hd_job_kill_where(c, l_matches, l_before_kill, &k));
  return 1;
}

/* kill(pool, task_name [, err]) -> count */
static int l_kill(lua_State *L) {
  hd_core *c = l_core(L);
  return l_kill_matching(L, c, l_checkpool(L, 1), luaL_checkstring(L, 2),
                         lua_isnoneornil(L, 3) ? 0 : 3);
}

/* flush(pool [, err]) -> count */
static int l_flush(lua_State *L) {
  hd_core *c = l_core(L);
  return l_kill_matching(L, c, l_checkpool(L, 1), NULL, lua_isnoneornil(L, 2) ? 0 : 2);
}

/* kill_job(pool, job [, err]) -> boolean */
static int l_kill_job(lua_State *L) {
  hd_pool *p;
  hd_job *j;
  l_core(L);
  p = l_checkpool(L, 1);
  j = l_checkjob(L, 2);
  if (j->state == HD_JOB_DONE || !hd_pool_in_chain(j, p)) {
    lua_pushboolean(L, 0);
    return 1;
  }
  if (!lua_isnoneornil(L, 3)) l_set_kill_err(L, j, 3);
  hd_job_kill(j);
  lua_pushboolean(L, 1);
  return 1;
}

static int l_close(lua_State *L) {
  l_core(L);
  hd_pool_close(l_checkpool(L, 1));
  return 0;
}

static void l_setnum(lua_State *L, const char *k, double v) {
  lua_pushnumber(L, v);
  lua_setfield(L, -2, k);
}

static int l_stats(lua_State *L) {
  hd_pool *p;
  const hd_counts *k;
  l_core(L);
  p = l_checkpool(L, 1);
  k = &p->counts;
  lua_createtable(L, 0, 24);
  l_setnum(L, "running", p->running);
  l_setnum(L, "queued", p->queued);
  l_setnum(L, "bytes_committed", p->committed);
  l_setnum(L, "max_workers", p->max_workers);
  l_setnum(L, "max_memory_bytes", p->max_memory);
  l_setnum(L, "processes", p->procs);
  l_setnum(L, "processes_started", p->spawned);
  l_setnum(L, "started", k->started);
  l_setnum(L, "succeeded", k->succeeded);
  l_setnum(L, "failed_timeout", k->by_outcome[HD_OUT_TIMEOUT]);
  l_setnum(L, "failed_oom", k->by_outcome[HD_OUT_OOM]);
  l_setnum(L, "failed_error", k->by_outcome[HD_OUT_ERROR]);
  l_setnum(L, "failed_exit", k->by_outcome[HD_OUT_EXIT]);
  l_setnum(L, "failed_other", k->by_outcome[HD_OUT_BADRESULT] + k->by_outcome[HD_OUT_BADREPLY] +
                                  k->by_outcome[HD_OUT_FAILED]);
  l_setnum(L, "killed", k->by_outcome[HD_OUT_KILLED]);
  l_setnum(L, "failed", k->by_outcome[HD_OUT_TIMEOUT] + k->by_outcome[HD_OUT_OOM] +
                            k->by_outcome[HD_OUT_ERROR] + k->by_outcome[HD_OUT_EXIT] +
                            k->by_outcome[HD_OUT_BADRESULT] + k->by_outcome[HD_OUT_BADREPLY] +
                            k->by_outcome[HD_OUT_FAILED] + k->by_outcome[HD_OUT_KILLED]);
  l_setnum(L, "rejected", k->rejected);
  l_setnum(L, "rejected_no_workers", k->by_outcome[HD_OUT_NOWORKERS]);
  l_setnum(L, "rejected_insufficient_memory", k->by_outcome[HD_OUT_NOMEMORY]);
  l_setnum(L, "rejected_pool_timeout", k->by_outcome[HD_OUT_POOLTIMEOUT]);
  return 1;
}

/* The loop, for hosts that drive it: a pollable fd, the next timeout, and a
 * non-blocking step. */
static int l_fd(lua_State *L) {
  lua_pushinteger(L, uv_backend_fd(&l_core(L)->loop));
  return 1;
}

static int l_timeout(lua_State *L) {
  lua_pushinteger(L, uv_backend_timeout(&l_core(L)->loop));
  return 1;
}

static int l_step(lua_State *L) {
  hd_core *c = l_core(L);
  if (c->in_loop) return luaL_error(L, "handler: cannot step from inside the loop");
  c->in_loop = 1;
  uv_run(&c->loop, UV_RUN_NOWAIT);
  c->in_loop = 0;
  if (c->npending) hd_core_reap_pending(c);
  return 0;
}

/* procs() -> { supervisor = pid|nil, pids... }: for tests and dashboards. */
static int l_procs(lua_State *L) {
  hd_core *c = l_core(L);
  hd_proc *p;
  int n = 0;
  /* Pids come with the supervisor's reports: read those already sent. */
  hd_core_drain_ctl(c);
  if (c->npending) hd_core_reap_pending(c);
  lua_newtable(L);
  for (p = c->procs; p != NULL; p = p->next) {
    if (p->exited || p->pid <= 0) continue;
    lua_pushinteger(L, p->pid);
    lua_rawseti(L, -2, ++n);
  }
  if (c->sup == HD_SUP_UP && c->sup_pid > 0) {
    lua_pushinteger(L, c->sup_pid);
    lua_setfield(L, -2, "supervisor");
  }
  /* Descriptors the host holds for its workers: the socket's end and the
   * pidfd of each, pid known or not yet. */
  n = 0;
  for (p = c->procs; p != NULL; p = p->next) {
    if (p->fd >= 0) n++;
    if (p->pidfd >= 0) n++;
  }
  lua_pushinteger(L, n);
  lua_setfield(L, -2, "sockets");
  return 1;
}

/* set_spin(us): how long a blocking wait polls before it sleeps. */
static int l_set_spin(lua_State *L) {
  double us = luaL_checknumber(L, 1);
  l_core(L)->spin_ns = us > 0 ? (uint64_t)(us * 1000) : 0;
  return 0;
}

static int l_set_max_result(lua_State *L) {
  l_core(L)->max_result_bytes = luaL_checknumber(L, 1);
  return 0;
}

static const luaL_Reg l_funcs[] = {
    {"pool_new", l_pool_new}, {"submit", l_submit},     {"run", l_run},
    {"await", l_await},       {"done", l_done},         {"result", l_result},
    {"job_id", l_job_id},     {"kill", l_kill},         {"kill_job", l_kill_job},
    {"flush", l_flush},       {"close", l_close},       {"stats", l_stats},
    {"fd", l_fd},             {"timeout", l_timeout},   {"step", l_step},
    {"procs", l_procs},       {"set_max_result", l_set_max_result},
    {"set_spin", l_set_spin},
    {"validate", hd_l_validate},
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
static void l_bchead(lua_State *L, hd_core *c) {
  size_t len;
  const char *p;
  int top = lua_gettop(L);
  lua_getglobal(L, "string");
  lua_getfield(L, -1, "dump");
  if (luaL_loadstring(L, "return") == 0 && lua_pcall(L, 1, 1, 0) == 0 &&
      (p = lua_tolstring(L, -1, &len)) != NULL) {
    c->bchead_len = len < HD_BCHEAD ? len : HD_BCHEAD;
    memcpy(c->bchead, p, c->bchead_len);
  }
  lua_settop(L, top);
}

static void l_newmeta(lua_State *L, const char *name, lua_CFunction gc) {
  luaL_newmetatable(L, name);
  lua_pushcfunction(L, gc);
  lua_setfield(L, -2, "__gc");
  lua_pushliteral(L, "handler");
  lua_setfield(L, -2, "__metatable");
  lua_pop(L, 1);
}

L_EXPORT int luaopen_handler_core(lua_State *L) {
  char path[4096], err[256];
  l_ctx *x;
  hd_core *c;
  lua_settop(L, 0);
  l_worker_path(path, sizeof path);
  /* One core per Lua state: loading the module again (package.loaded
   * cleared, as test runners do) reuses the context and its workers. */
  lua_pushlightuserdata(L, &l_ctx_key);
  lua_rawget(L, LUA_REGISTRYINDEX);
  if (lua_isuserdata(L, 1) && ((l_ctx *)lua_touserdata(L, 1))->c != NULL) {
    c = ((l_ctx *)lua_touserdata(L, 1))->c;
  } else {
    lua_settop(L, 0);
    l_newmeta(L, L_POOL, l_pool_gc);
    l_newmeta(L, L_JOB, l_job_gc);
    l_newmeta(L, L_CTX, l_ctx_gc);
    x = lua_newuserdata(L, sizeof *x);
    x->c = NULL;
    luaL_getmetatable(L, L_CTX);
    lua_setmetatable(L, -2);
    c = hd_core_new(path, err, sizeof err);
    if (c == NULL) return luaL_error(L, "handler: %s", err);
    x->c = c;
    /* Kept in the registry, so the context outlives every module table and
     * is closed last, when the state is. */
    lua_pushlightuserdata(L, &l_ctx_key);
    lua_pushvalue(L, 1);
    lua_rawset(L, LUA_REGISTRYINDEX);
    lua_pushlightuserdata(L, &l_jobs_key);
    lua_newtable(L);
    lua_createtable(L, 0, 1);
    lua_pushliteral(L, "v");
    lua_setfield(L, -2, "__mode");
    lua_setmetatable(L, -2);
    lua_rawset(L, LUA_REGISTRYINDEX);
    l_bchead(L, c);
  }
  lua_newtable(L);
  lua_pushvalue(L, 1);
  luaL_openlib(L, NULL, l_funcs, 1);
  lua_pushcfunction(L, hd_l_encode);
  lua_setfield(L, -2, "encode");
  lua_pushcfunction(L, hd_l_decode);
  lua_setfield(L, -2, "decode");
  lua_pushstring(L, c->worker_path);
  lua_setfield(L, -2, "worker_path");
#if defined(__SANITIZE_ADDRESS__)
  /* Built with AddressSanitizer: workers have no RLIMIT_DATA backstop. */
  lua_pushboolean(L, 1);
#else
  lua_pushboolean(L, 0);
#endif
  lua_setfield(L, -2, "sanitized");
  return 1;
}
