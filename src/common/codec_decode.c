/* codec_decode.c: the decoder: a message to Lua values, built by hooks on the walker of codec_walk.h. */
#include <lauxlib.h>
#include <lua.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "codec_int.h"
#include "codec_walk.h"

/* The Lua stack slots the decoder makes sure of: when it starts; for an
 * error message, or the metatable pass's words; for a message about a name
 * (two quoted parts and a dot). */
#define DEC_SLOTS 8
#define DEC_FAIL_SLOTS 4
#define DEC_NAME_SLOTS 8

/* The first byte of LuaJIT bytecode ("\033LJ"). */
#define DEC_BYTECODE_MARK '\033'

/* Where in the ref table the list of metatables to set waits (DEC_MTS:
 * table, metatable, table, metatable...; and metatable → true once it has
 * been made plain data). The strings of KSET's slots are at 1..CX_KSLOTS,
 * the tables and functions after them (DEC_REF), named-value keys are
 * negative. */
#define DEC_MTS 0
#define DEC_REF(ref) ((int)(ref) + CX_KSLOTS + 1)

typedef struct dec_state {
  lua_State *L;
  int flags;
  int named_last;    /* the value just read is a named value (not one of the message's tables) */
  int refs;          /* stack slot: DEC_REF(ref) → object, slot + 1 → string, -(k + 1) → true when
                      * named value k is a function inside a table, DEC_MTS → the
                      * metatables to set; nil until needed */
  int have_refs;     /* the ref table is made */
  uint64_t named_fn; /* named values that are functions inside a table (hostile only) */
  uint64_t budget;   /* bytes of table parts that size hints may still preallocate */
  int tab_fast;      /* numbers go into array parts in place (cx_tab_fast) */
  uint64_t *arr;     /* the array part of the table on the top of the stack, */
  uint32_t asize;    /* its size; arr NULL: look it up (a table opened or
                      * closed, or an item set through the API) */
} dec_state;

#define DEC(w) ((dec_state *)(w)->ud)

/* Raises "handler: bad message: <what> at byte <at>". */
_Noreturn static void dec_bad_at(lua_State *L, const char *what, size_t at) {
  char tail[48];
  (void)lua_checkstack(L, DEC_FAIL_SLOTS);
  snprintf(tail, sizeof tail, " at byte %zu", at);
  lua_pushfstring(L, CX_MSG_BAD "%s%s", what, tail);
  cx_throw(L);
}

/* The same, where the walk is. */
_Noreturn static void dec_bad(cx_walk *w, const char *what) {
  dec_bad_at(DEC(w)->L, what, (size_t)(w->p - w->start));
}

/* Raises "handler: bad message: <what> <quoted name...> at byte <offset>"
 * for messages about a named value. */
_Noreturn static void dec_bad_name(cx_walk *w, const char *what, const unsigned char *mod,
                                   size_t mlen, const unsigned char *field, size_t flen) {
  lua_State *L = DEC(w)->L;
  (void)lua_checkstack(L, DEC_NAME_SLOTS);
  cx_push_quoted(L, (const char *)mod, mlen);
  if (field) {
    lua_pushliteral(L, ".");
    cx_push_quoted(L, (const char *)field, flen);
    lua_concat(L, 3);
  }
  dec_bad(w, lua_pushfstring(L, "%s %s", what, lua_tostring(L, -1)));
}

static int dec_room(cx_walk *w, int slots) {
  return !lua_checkstack(DEC(w)->L, slots);
}

static void dec_scalar(cx_walk *w, int tag, const unsigned char *s, size_t len) {
  lua_State *L = DEC(w)->L;
  DEC(w)->named_last = 0;
  switch (tag) {
    case CX_T_NIL:
      lua_pushnil(L);
      return;
    case CX_T_FALSE:
    case CX_T_TRUE:
      lua_pushboolean(L, tag == CX_T_TRUE);
      return;
    case CX_T_NULL:
      lua_pushlightuserdata(L, NULL);
      return;
    case CX_T_NUM: {
      uint64_t bits = hd_get_u64((const char *)s);
      lua_Number n;
      memcpy(&n, &bits, sizeof n);
      /* lua_pushnumber canonicalizes NaNs, so no payload can pose as one
       * of the VM's tagged values. */
      lua_pushnumber(L, n);
      return;
    }
    default: /* CX_T_STR */
      lua_pushlstring(L, (const char *)s, len);
      return;
  }
}

/* Makes the ref table, the first time one is needed. */
static void dec_refs(dec_state *d) {
  if (!d->have_refs) {
    lua_newtable(d->L);
    lua_replace(d->L, d->refs);
    d->have_refs = 1;
  }
}

/* Makes the table or function on the top of the stack ref number w->nrefs
 * (the walker has checked that it is below CX_MAX_REFS). */
static void dec_register(cx_walk *w) {
  dec_state *d = DEC(w);
  lua_State *L = d->L;
  dec_refs(d);
  lua_pushvalue(L, -1);
  lua_rawseti(L, d->refs, DEC_REF(w->nrefs));
}

static void dec_integer(cx_walk *w, uint64_t zz) {
  DEC(w)->named_last = 0;
  lua_pushnumber(DEC(w)->L, (lua_Number)walk_int(zz));
}

/* A KSET: the string, kept in its slot; a KREF: the string its slot keeps. */
static void dec_kstr(cx_walk *w, int slot, const unsigned char *s, size_t len) {
  dec_state *d = DEC(w);
  lua_State *L = d->L;
  d->named_last = 0;
  dec_refs(d);
  if (s == NULL) {
    lua_rawgeti(L, d->refs, slot + 1);
    return;
  }
  lua_pushlstring(L, (const char *)s, len);
  lua_pushvalue(L, -1);
  lua_rawseti(L, d->refs, slot + 1);
}

/* The smallest power of two at or above n (n at most CX_HINT_MAX). */
static uint64_t dec_pow2(uint64_t n) {
  uint64_t p = 1;
  while (p < n) p <<= 1;
  return p;
}

/* The largest power of two at or below n, or 0 for 0. */
static uint64_t dec_pow2_floor(uint64_t n) {
  uint64_t p = 1;
  if (n == 0) return 0;
  while (p <= n / 2) p <<= 1;
  return p;
}

/* A table's size hints, cut to the entries the bytes after each could hold
 * and to what is left of the message's budget (CX_HINT_BYTES_PER_BYTE per
 * byte), counted in the bytes LuaJIT allocates for them: so a message of n
 * bytes preallocates at most CX_HINT_BYTES_PER_BYTE * n bytes through its
 * hints, whatever they claim. */
static void dec_table(cx_walk *w, int at, int array, uint64_t narr, uint64_t nhash,
                      size_t narr_left) {
  dec_state *d = DEC(w);
  uint64_t cap, cost;
  size_t left = (size_t)(w->end - w->p);
  (void)at;
  cap = (uint64_t)narr_left / (array ? CX_MIN_ITEM : CX_MIN_ARRAY_ENTRY);
  if (narr > cap) narr = cap;
  cap = (uint64_t)left / CX_MIN_HASH_ENTRY;
  if (nhash > cap) nhash = cap;
  if (narr > CX_HINT_MAX) narr = CX_HINT_MAX;
  if (nhash > CX_HINT_MAX) nhash = CX_HINT_MAX;
  if (nhash > 0) {
    cost = CX_HASH_NODE_BYTES * dec_pow2(nhash);
    if (cost > d->budget) {
      nhash = dec_pow2_floor(d->budget / CX_HASH_NODE_BYTES);
      cost = CX_HASH_NODE_BYTES * nhash;
    }
    d->budget -= cost;
  }
  if (narr > 0) {
    /* LuaJIT's array part has a slot 0 too. */
    cost = CX_ARRAY_SLOT_BYTES * (narr + 1);
    if (cost > d->budget) {
      narr = d->budget / CX_ARRAY_SLOT_BYTES;
      narr = narr > 0 ? narr - 1 : 0;
      cost = narr > 0 ? CX_ARRAY_SLOT_BYTES * (narr + 1) : 0;
    }
    d->budget -= cost;
  }
  lua_createtable(d->L, (int)narr, (int)nhash);
  dec_register(w);
  d->arr = NULL;
}

static void dec_field(cx_walk *w) {
  lua_rawset(DEC(w)->L, -3);
}

static void dec_item(cx_walk *w, uint64_t i);

/* A number that is item i of the table on the top of the stack: written in
 * its array part in place when the part has room (codec_tab.c; a NaN
 * never is, lua_pushnumber canonicalizes it), else set through the API. */
static void dec_num_item(cx_walk *w, uint64_t i, double n) {
  dec_state *d = DEC(w);
  lua_State *L = d->L;
  d->named_last = 0;
  if (d->tab_fast && n == n) {
    if (d->arr == NULL) {
      if (lua_type(L, -1) != LUA_TTABLE) goto api;
      d->arr = cx_tab_array(lua_topointer(L, -1), &d->asize);
    }
    if (i < d->asize) {
      memcpy(&d->arr[i], &n, sizeof n);
      return;
    }
  }
api:
  lua_pushnumber(L, (lua_Number)n);
  dec_item(w, i);
}

static void dec_item(cx_walk *w, uint64_t i) {
  lua_State *L = DEC(w)->L;
  DEC(w)->arr = NULL;
  if (i <= (uint64_t)INT32_MAX) {
    lua_rawseti(L, -2, (int)i);
    return;
  }
  /* Past INT32_MAX items (a message of gigabytes): a number key. */
  lua_pushnumber(L, (lua_Number)i);
  lua_insert(L, -2);
  lua_rawset(L, -3);
}

/* Metatables are set once the whole message is read (dec_set_metatables):
 * until then none is in force, so none can make a table weak while it is
 * being filled, and a metatable that is one of the message's tables is
 * complete, whatever refers to it before its last field. Here the pair is
 * noted. L: ... table metatable → ... table */
static void dec_metatable(cx_walk *w) {
  dec_state *d = DEC(w);
  lua_State *L = d->L;
  int n;
  lua_rawgeti(L, d->refs, DEC_MTS);
  if (lua_isnil(L, -1)) {
    lua_pop(L, 1);
    lua_newtable(L);
    lua_pushvalue(L, -1);
    lua_rawseti(L, d->refs, DEC_MTS);
  }
  n = (int)lua_objlen(L, -1);
  lua_pushvalue(L, -3);
  lua_rawseti(L, -2, n + 1);
  lua_pushvalue(L, -2);
  lua_rawseti(L, -2, n + 2);
  /* A named metatable is the host's own table: never changed, only set. */
  if (d->named_last) {
    lua_pushvalue(L, -2);
    lua_pushboolean(L, 1);
    lua_rawset(L, -3);
  }
  lua_pop(L, 2);
}

static void dec_close(cx_walk *w) {
  DEC(w)->named_last = 0;
  DEC(w)->arr = NULL;
}

/* The metamethods LuaJIT looks up (lj_obj.h, MMDEF, with the FFI's and
 * Lua 5.2's). In a hostile message none may be a function (functions never
 * come back, named ones are refused in metatables), so each is data the VM
 * would act on: __mode makes a table weak, __metatable protects it, and
 * the others make an ordinary use raise (tostring with a string
 * __tostring) or change what it means. Only __index and __newindex with a
 * table are plain data: lookups and writes that go on in another table of
 * the message. */
static const char *const dec_metamethods[] = {
    "__index", "__newindex", "__gc",  "__mode", "__eq",  "__len",     "__lt",
    "__le",    "__concat",   "__call", "__add", "__sub", "__mul",     "__div",
    "__mod",   "__pow",      "__unm", "__metatable", "__tostring", "__new", "__pairs",
    "__ipairs", "__close",   NULL};

/* Whether key (at -2, value at -1) is a metamethod a result may not carry. */
static int dec_forbidden(lua_State *L) {
  size_t len;
  const char *k;
  int i;
  if (lua_type(L, -2) != LUA_TSTRING) return 0;
  k = lua_tolstring(L, -2, &len);
  if (len < 4 || k[0] != '_' || k[1] != '_') return 0;
  for (i = 0; dec_metamethods[i] != NULL; i++) {
    if (strcmp(k, dec_metamethods[i]) == 0) {
      /* __index, __newindex: a table is data. */
      return i >= 2 || !lua_istable(L, -1);
    }
  }
  return 0;
}

/* Makes the metatable at the top of the stack plain data: removes the
 * metamethods dec_forbidden names. Clearing fields while lua_next walks
 * them is allowed. L: ... mt → ... mt */
static void dec_plain(lua_State *L) {
  lua_pushnil(L);
  while (lua_next(L, -2) != 0) {
    if (dec_forbidden(L)) {
      lua_pop(L, 1);
      lua_pushvalue(L, -1);
      lua_pushnil(L);
      lua_rawset(L, -4);
    } else {
      lua_pop(L, 1);
    }
  }
}

/* Sets the metatables dec_metatable noted, each made plain data first when
 * the message is hostile. */
static void dec_set_metatables(dec_state *d) {
  lua_State *L = d->L;
  int i, n;
  if (!lua_checkstack(L, DEC_FAIL_SLOTS)) cx_oom(L);
  lua_rawgeti(L, d->refs, DEC_MTS);
  n = (int)lua_objlen(L, -1);
  for (i = 1; i + 1 <= n; i += 2) {
    lua_rawgeti(L, -1, i);
    lua_rawgeti(L, -2, i + 1);
    if (!(d->flags & HD_DEC_TRUSTED)) {
      /* Each metatable once; a named one never. */
      lua_pushvalue(L, -1);
      lua_rawget(L, -4);
      if (!lua_toboolean(L, -1)) {
        lua_pop(L, 1);
        dec_plain(L);
        lua_pushvalue(L, -1);
        lua_pushboolean(L, 1);
        lua_rawset(L, -5);
      } else {
        lua_pop(L, 1);
      }
    }
    lua_setmetatable(L, -2);
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
}

/* The number of upvalues of the function at idx. */
static int dec_nups_of(lua_State *L, int idx) {
  lua_Debug ar;
  lua_pushvalue(L, idx);
  lua_getinfo(L, ">u", &ar);
  return ar.nups;
}

/* Loads a function's bytecode (trusted input only: LuaJIT does not verify
 * bytecode, so loading it is as good as running native code). The ref comes
 * before the upvalues, which may refer back to it. */
static void dec_func(cx_walk *w, const unsigned char *bc, size_t len) {
  lua_State *L = DEC(w)->L;
  /* Only bytecode: source text would be compiled rather than refused. */
  if (len == 0 || bc[0] != DEC_BYTECODE_MARK) dec_bad(w, "function is not bytecode");
  if (luaL_loadbufferx(L, (const char *)bc, len, "=handler", "b") != 0) {
    const char *msg = lua_tostring(L, -1);
    dec_bad(w, lua_pushfstring(L, "cannot load function (%s)", msg ? msg : "?"));
  }
  dec_register(w);
}

static void dec_nups(cx_walk *w, uint64_t nups) {
  lua_State *L = DEC(w)->L;
  if (nups != (uint64_t)dec_nups_of(L, lua_gettop(L)))
    dec_bad(w, "function upvalue count mismatch");
}

static void dec_upjoin(cx_walk *w, int i, uint64_t ref, uint64_t n) {
  dec_state *d = DEC(w);
  lua_State *L = d->L;
  int f = lua_gettop(L);
  lua_rawgeti(L, d->refs, DEC_REF(ref));
  if (!lua_isfunction(L, -1) || lua_iscfunction(L, -1) || n < 1 ||
      n > (uint64_t)dec_nups_of(L, f + 1))
    dec_bad(w, "bad upvalue join");
  lua_upvaluejoin(L, f, i, f + 1, (int)n);
  lua_pop(L, 1);
}

static void dec_upvalue(cx_walk *w, int i) {
  lua_setupvalue(DEC(w)->L, -2, i);
}

static int dec_ref(cx_walk *w, int at, uint64_t ref) {
  dec_state *d = DEC(w);
  (void)at;
  d->named_last = 0;
  lua_rawgeti(d->L, d->refs, DEC_REF(ref));
  return lua_istable(d->L, -1) ? CX_K_TABLE : CX_K_OTHER;
}

/* Pushes package.loaded[mod], require()ing it first when trusted. */
static void dec_module(cx_walk *w, const unsigned char *mod, size_t mlen) {
  dec_state *d = DEC(w);
  lua_State *L = d->L;
  lua_getfield(L, LUA_REGISTRYINDEX, "_LOADED");
  if (!lua_istable(L, -1)) dec_bad(w, "package.loaded is missing");
  lua_pushlstring(L, (const char *)mod, mlen);
  lua_rawget(L, -2);
  lua_remove(L, -2);
  if (!lua_isnil(L, -1)) return;
  if (!(d->flags & HD_DEC_TRUSTED))
    dec_bad_name(w, "no module in package.loaded named", mod, mlen, NULL, 0);
  lua_pop(L, 1);
  lua_getfield(L, LUA_GLOBALSINDEX, "require");
  lua_pushlstring(L, (const char *)mod, mlen);
  if (lua_pcall(L, 1, 1, 0) != 0) {
    const char *msg = lua_tostring(L, -1);
    cx_push_quoted(L, (const char *)mod, mlen);
    lua_pushfstring(L, "handler: cannot load module %s: %s", lua_tostring(L, -1),
                    msg ? msg : luaL_typename(L, -2));
    cx_throw(L);
  }
  if (lua_isnil(L, -1))
    dec_bad_name(w, "require returned nothing for module", mod, mlen, NULL, 0);
}

/* Pushes the named value. In hostile mode, notes whether it is a function
 * inside a table, for dec_mt_check (a table is open, so the ref table
 * exists). */
static int dec_named(cx_walk *w, int at, const unsigned char *mod, size_t mlen,
                     const unsigned char *field, size_t flen) {
  dec_state *d = DEC(w);
  lua_State *L = d->L;
  uint64_t k = w->nnamed;
  (void)at;
  d->named_last = 1;
  dec_module(w, mod, mlen);
  if (field != NULL) {
    if (!lua_istable(L, -1)) dec_bad_name(w, "module is not a table:", mod, mlen, NULL, 0);
    lua_pushlstring(L, (const char *)field, flen);
    /* Trusted modules may fill fields lazily through __index; hostile input
     * must not make us call anything. */
    if (d->flags & HD_DEC_TRUSTED)
      lua_gettable(L, -2);
    else
      lua_rawget(L, -2);
    if (lua_isnil(L, -1))
      dec_bad_name(w, "no value in package.loaded named", mod, mlen, field, flen);
    lua_remove(L, -2);
  }
  if (!(d->flags & HD_DEC_TRUSTED) && w->depth > 0 && lua_isfunction(L, -1)) {
    d->named_fn++;
    /* Past INT32_MAX (messages of gigabytes) every named value counts. */
    if (k < INT32_MAX) {
      lua_pushboolean(L, 1);
      lua_rawseti(L, d->refs, -(int)k - 1);
    }
  }
  if (lua_istable(L, -1)) return CX_K_TABLE;
  if (lua_type(L, -1) == LUA_TNUMBER && lua_tonumber(L, -1) != lua_tonumber(L, -1))
    return CX_K_NAN;
  return CX_K_OTHER;
}

static int dec_counts(void *ud, uint64_t k) {
  dec_state *d = ud;
  int fn;
  if (k >= INT32_MAX) return 1;
  lua_rawgeti(d->L, d->refs, -(int)k - 1);
  fn = lua_toboolean(d->L, -1);
  lua_pop(d->L, 1);
  return fn;
}

/* Refuses a hostile message whose metatables reach a named function (see
 * cx_mt_reach), once the message is known to be well formed. */
static void dec_mt_check(dec_state *d, const cx_walk *w) {
  lua_State *L = d->L;
  size_t at;
  uint64_t *st;
  if (!lua_checkstack(L, DEC_FAIL_SLOTS)) cx_oom(L);
  st = lua_newuserdata(L, (size_t)w->nrefs * sizeof *st);
  at = cx_mt_reach(w->start, (size_t)(w->end - w->start), st, w->nrefs, dec_counts, d);
  lua_pop(L, 1);
  if (at != 0) dec_bad_at(L, CX_MSG_NAMED_MT, at);
}

static const cx_ops dec_ops = {
    .room = dec_room,
    .scalar = dec_scalar,
    .integer = dec_integer,
    .kstr = dec_kstr,
    .table = dec_table,
    .func = dec_func,
    .nups = dec_nups,
    .ref = dec_ref,
    .named = dec_named,
    .upjoin = dec_upjoin,
    .field = dec_field,
    .item = dec_item,
    .num_item = dec_num_item,
    .metatable = dec_metatable,
    .upvalue = dec_upvalue,
    .close = dec_close,
};

static int dec_run(lua_State *L, const char *p, size_t len, int flags) {
  dec_state d;
  cx_walk w;
  int base, n;
  d.L = L;
  d.flags = flags;
  d.named_fn = 0;
  d.named_last = 0;
  d.have_refs = 0;
  d.budget = (uint64_t)len * CX_HINT_BYTES_PER_BYTE;
  if (!lua_checkstack(L, DEC_SLOTS)) cx_oom(L);
  d.tab_fast = cx_tab_fast(L);
  d.arr = NULL;
  d.asize = 0;
  lua_pushnil(L);
  base = d.refs = lua_gettop(L);
  cx_walk_init(&w, p, len, (flags & HD_DEC_TRUSTED) != 0, &d);
  if (cx_walk_run(&w, &dec_ops) != CX_WALK_OK) {
    if (w.what == NULL) dec_bad_at(L, lua_pushfstring(L, "unknown tag %d", w.tag), w.at);
    dec_bad_at(L, w.what, w.at);
  }
  if (w.saw_mt && d.named_fn > 0) dec_mt_check(&d, &w);
  if (w.saw_mt) dec_set_metatables(&d);
  n = lua_gettop(L) - base;
  lua_remove(L, base);
  return n;
}

/* With HD_DEC_NOGC, messages at least this long are decoded with the
 * collector paused. */
#define DEC_NOGC_BYTES (64 * 1024)

typedef struct dec_args {
  const char *p;
  size_t len;
  int flags;
} dec_args;

/* dec_run in protected mode. L: args(lightuserdata) → values... */
static int dec_paused(lua_State *L) {
  const dec_args *a = lua_touserdata(L, 1);
  lua_settop(L, 0);
  return dec_run(L, a->p, a->len, a->flags);
}

/* HD_DEC_NOGC: every value a job's message holds stays live while the job
 * runs, so the incremental collector's steps during the decode (one per
 * table and string made) mark and sweep for nothing; in a worker they took
 * a quarter of the decode of the 100,000 records. The message is decoded
 * with the collector paused, in protected mode so that an error cannot
 * leave it paused (the error goes on as a runtime error, whatever it was),
 * and the collector restarts as if the decoded values had been there
 * before. Not for the host: its collector must keep up with the garbage it
 * had before the decode (made up later, it slowed each later job down). A
 * collector the caller had stopped stays stopped. */
int hd_decode(lua_State *L, const char *p, size_t len, int flags) {
  dec_args a;
  int top, rc;
  if (!(flags & HD_DEC_NOGC) || len < DEC_NOGC_BYTES || !lua_gc(L, LUA_GCISRUNNING, 0))
    return dec_run(L, p, len, flags);
  a.p = p;
  a.len = len;
  a.flags = flags;
  if (!lua_checkstack(L, DEC_SLOTS)) cx_oom(L);
  top = lua_gettop(L);
  lua_pushcfunction(L, dec_paused);
  lua_pushlightuserdata(L, &a);
  lua_gc(L, LUA_GCSTOP, 0);
  rc = lua_pcall(L, 1, LUA_MULTRET, 0);
  lua_gc(L, LUA_GCRESTART, 0);
  if (rc != 0) cx_throw(L);
  return lua_gettop(L) - top;
}

int hd_decode_true_string(const char *p, size_t len, const char **s, size_t *slen) {
  const unsigned char *q = (const unsigned char *)p, *end = q + len;
  uint64_t n;
  if (cx_uv_read(&q, end, &n) != 0 || n != 2) return -1;
  if (end - q < 2 || q[0] != CX_T_TRUE || q[1] != CX_T_STR) return -1;
  q += 2;
  if (cx_uv_read(&q, end, &n) != 0 || n != (uint64_t)(end - q)) return -1;
  *s = (const char *)q;
  *slen = (size_t)n;
  return 0;
}
