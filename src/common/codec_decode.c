/* codec_decode.c: the decoder: a message to Lua values. */
#include <lauxlib.h>
#include <lua.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "codec_int.h"

typedef struct dec_state {
  lua_State *L;
  const unsigned char *start, *p, *end;
  int flags;
  int base;     /* stack top when decoding began: the slots used count from here */
  int refs;     /* stack slot: ref index + 1 → object, and -(k + 1) → true when
                 * named value k is a function inside a table; nil until needed */
  int nrefs;
  int depth;
  int saw_mt;        /* a table had a metatable */
  uint64_t nnamed;   /* named values so far */
  uint64_t named_fn; /* of which functions inside a table (hostile only) */
  size_t budget; /* table slots that size hints may still preallocate */
} dec_state;

/* Raises "handler: bad message: <what> at byte <offset>". */
_Noreturn static void dec_bad(dec_state *d, const char *what) {
  lua_State *L = d->L;
  char at[48];
  (void)lua_checkstack(L, 4);
  snprintf(at, sizeof at, " at byte %zu", (size_t)(d->p - d->start));
  lua_pushfstring(L, "handler: bad message: %s%s", what, at);
  cx_throw(L);
}

/* Raises "handler: bad message: <what> <quoted name...> at byte <offset>"
 * for messages about a named value. */
_Noreturn static void dec_bad_name(dec_state *d, const char *what, const char *mod,
                                  size_t mlen, const char *field, size_t flen) {
  lua_State *L = d->L;
  (void)lua_checkstack(L, 8);
  cx_push_quoted(L, mod, mlen);
  if (field) {
    lua_pushliteral(L, ".");
    cx_push_quoted(L, field, flen);
    lua_concat(L, 3);
  }
  dec_bad(d, lua_pushfstring(L, "%s %s", what, lua_tostring(L, -1)));
}

static uint64_t dec_get_uv(dec_state *d, const char *what) {
  uint64_t v = 0;
  int i;
  for (i = 0; i < 10; i++) {
    unsigned c;
    if (d->p >= d->end) dec_bad(d, what);
    c = *d->p++;
    /* The tenth byte holds bit 63 only. */
    if (i == 9 && c > 1) {
      d->p--;
      dec_bad(d, "varint too long");
    }
    v |= (uint64_t)(c & 0x7f) << (7 * i);
    if (!(c & 0x80)) return v;
  }
  dec_bad(d, "varint too long");
}

/* Reads a length and the bytes it announces. */
static const char *dec_get_bytes(dec_state *d, size_t *len, const char *what) {
  const char *s;
  uint64_t n = dec_get_uv(d, what);
  if (n > (uint64_t)(d->end - d->p)) dec_bad(d, what);
  s = (const char *)d->p;
  d->p += n;
  *len = (size_t)n;
  return s;
}

/* The slot count is checked before lua_checkstack, so that only a caller
 * holding many slots of its own, or no memory, makes a message that
 * hd_validate accepts fail here. */
static void dec_enter(dec_state *d) {
  if (++d->depth > HD_MAX_DEPTH) dec_bad(d, "nested too deep");
  if (lua_gettop(d->L) - d->base + 8 > CX_DEC_SLOTS || !lua_checkstack(d->L, 8))
    dec_bad(d, "nested too deep for the Lua stack");
}

static void dec_register(dec_state *d, int idx) {
  lua_State *L = d->L;
  if (d->nrefs == INT32_MAX) dec_bad(d, "too many tables");
  if (lua_isnil(L, d->refs)) {
    lua_newtable(L);
    lua_replace(L, d->refs);
  }
  lua_pushvalue(L, idx);
  lua_rawseti(L, d->refs, ++d->nrefs);
}

/* A size hint, cut to what the rest of the message could fill and to what
 * is left of the message's whole budget, so no header makes us allocate. */
static int dec_hint(dec_state *d, uint64_t hint) {
  uint64_t room = (uint64_t)(d->end - d->p) / 2;
  if (hint > room) hint = room;
  if (hint > CX_HINT_MAX) hint = CX_HINT_MAX;
  if (hint > d->budget) hint = d->budget;
  d->budget -= (size_t)hint;
  return (int)hint;
}

static void dec_value(dec_state *d);

static void dec_table(dec_state *d, int with_mt) {
  lua_State *L = d->L;
  int narr, nhash, t;
  dec_enter(d);
  narr = dec_hint(d, dec_get_uv(d, "truncated table"));
  nhash = dec_hint(d, dec_get_uv(d, "truncated table"));
  lua_createtable(L, narr, nhash);
  t = lua_gettop(L);
  dec_register(d, t);
  for (;;) {
    if (d->p >= d->end) dec_bad(d, "truncated table");
    if (*d->p == CX_T_END) {
      d->p++;
      break;
    }
    dec_value(d);
    if (lua_isnil(L, -1)) dec_bad(d, "nil table key");
    if (lua_type(L, -1) == LUA_TNUMBER) {
      lua_Number k = lua_tonumber(L, -1);
      if (k != k) dec_bad(d, "NaN table key");
    }
    dec_value(d);
    lua_rawset(L, t);
  }
  if (with_mt) {
    d->saw_mt = 1;
    dec_value(d);
    if (!lua_istable(L, -1)) dec_bad(d, "metatable is not a table");
    lua_setmetatable(L, t);
  }
  d->depth--;
}

/* The number of upvalues of the function at idx. */
static int dec_nups(lua_State *L, int idx) {
  lua_Debug ar;
  lua_pushvalue(L, idx);
  lua_getinfo(L, ">u", &ar);
  return ar.nups;
}

/* Loads a function's bytecode and sets its upvalues. Trusted input only:
 * LuaJIT does not verify bytecode, so loading it is as good as running
 * native code. */
static void dec_function(dec_state *d) {
  lua_State *L = d->L;
  size_t len;
  const char *bc;
  uint64_t nups;
  int f, i;
  dec_enter(d);
  bc = dec_get_bytes(d, &len, "truncated function");
  /* Only bytecode: source text would be compiled rather than refused. */
  if (len == 0 || bc[0] != '\033') dec_bad(d, "function is not bytecode");
  if (luaL_loadbufferx(L, bc, len, "=handler", "b") != 0) {
    const char *msg = lua_tostring(L, -1);
    dec_bad(d, lua_pushfstring(L, "cannot load function (%s)", msg ? msg : "?"));
  }
  f = lua_gettop(L);
  /* The ref comes before the upvalues, which may refer back to it. */
  dec_register(d, f);
  nups = dec_get_uv(d, "truncated function");
  if (nups != (uint64_t)dec_nups(L, f)) dec_bad(d, "function upvalue count mismatch");
  for (i = 1; i <= (int)nups; i++) {
    if (d->p < d->end && *d->p == CX_T_UPJOIN) {
      uint64_t g, n;
      d->p++;
      g = dec_get_uv(d, "truncated upvalue join");
      n = dec_get_uv(d, "truncated upvalue join");
      if (g >= (uint64_t)d->nrefs) dec_bad(d, "bad reference in upvalue join");
      lua_rawgeti(L, d->refs, (int)g + 1);
      if (!lua_isfunction(L, -1) || lua_iscfunction(L, -1) || n < 1 ||
          n > (uint64_t)dec_nups(L, lua_gettop(L)))
        dec_bad(d, "bad upvalue join");
      lua_upvaluejoin(L, f, i, lua_gettop(L), (int)n);
      lua_pop(L, 1);
    } else {
      dec_value(d);
      lua_setupvalue(L, f, i);
    }
  }
  d->depth--;
}

/* Pushes package.loaded[mod], require()ing it first when trusted. */
static void dec_module(dec_state *d, const char *mod, size_t mlen) {
  lua_State *L = d->L;
  lua_getfield(L, LUA_REGISTRYINDEX, "_LOADED");
  if (!lua_istable(L, -1)) dec_bad(d, "package.loaded is missing");
  lua_pushlstring(L, mod, mlen);
  lua_rawget(L, -2);
  lua_remove(L, -2);
  if (!lua_isnil(L, -1)) return;
  if (!(d->flags & HD_DEC_TRUSTED))
    dec_bad_name(d, "no module in package.loaded named", mod, mlen, NULL, 0);
  lua_pop(L, 1);
  lua_getfield(L, LUA_GLOBALSINDEX, "require");
  lua_pushlstring(L, mod, mlen);
  if (lua_pcall(L, 1, 1, 0) != 0) {
    const char *msg = lua_tostring(L, -1);
    cx_push_quoted(L, mod, mlen);
    lua_pushfstring(L, "handler: cannot load module %s: %s", lua_tostring(L, -1),
                    msg ? msg : luaL_typename(L, -2));
    cx_throw(L);
  }
  if (lua_isnil(L, -1))
    dec_bad_name(d, "require returned nothing for module", mod, mlen, NULL, 0);
}

static void dec_named(dec_state *d, int with_field) {
  lua_State *L = d->L;
  size_t mlen, flen = 0;
  const char *field = NULL;
  const char *mod = dec_get_bytes(d, &mlen, "truncated name");
  if (with_field) field = dec_get_bytes(d, &flen, "truncated name");
  dec_module(d, mod, mlen);
  if (!with_field) return;
  if (!lua_istable(L, -1))
    dec_bad_name(d, "module is not a table:", mod, mlen, NULL, 0);
  lua_pushlstring(L, field, flen);
  /* Trusted modules may fill fields lazily through __index; hostile input
   * must not make us call anything. */
  if (d->flags & HD_DEC_TRUSTED)
    lua_gettable(L, -2);
  else
    lua_rawget(L, -2);
  if (lua_isnil(L, -1)) dec_bad_name(d, "no value in package.loaded named", mod, mlen, field, flen);
  lua_remove(L, -2);
}

/* Notes, in hostile mode, whether the named value just pushed is a function
 * inside a table, for dec_mt_check. A table is open, so the ref table
 * exists. */
static void dec_named_note(dec_state *d) {
  lua_State *L = d->L;
  uint64_t k = d->nnamed++;
  if ((d->flags & HD_DEC_TRUSTED) || d->depth == 0 || !lua_isfunction(L, -1)) return;
  d->named_fn++;
  /* Past INT32_MAX (messages of gigabytes) every named value counts. */
  if (k >= INT32_MAX) return;
  lua_pushboolean(L, 1);
  lua_rawseti(L, d->refs, -(int)k - 1);
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
static void dec_mt_check(dec_state *d) {
  lua_State *L = d->L;
  size_t at;
  uint64_t *st;
  if (!lua_checkstack(L, 4)) cx_oom(L);
  st = lua_newuserdata(L, (size_t)d->nrefs * sizeof *st);
  at = cx_mt_reach(d->start, (size_t)(d->end - d->start), st, (uint64_t)d->nrefs,
                   dec_counts, d);
  lua_pop(L, 1);
  if (at != 0) {
    d->p = d->start + at;
    dec_bad(d, CX_MSG_NAMED_MT);
  }
}

static void dec_value(dec_state *d) {
  lua_State *L = d->L;
  int tag;
  if (d->p >= d->end) dec_bad(d, "truncated value");
  tag = *d->p++;
  switch (tag) {
    case CX_T_NIL:
      lua_pushnil(L);
      return;
    case CX_T_FALSE:
      lua_pushboolean(L, 0);
      return;
    case CX_T_TRUE:
      lua_pushboolean(L, 1);
      return;
    case CX_T_NUM: {
      uint64_t bits;
      lua_Number n;
      if (d->end - d->p < 8) dec_bad(d, "truncated number");
      bits = hd_get_u64((const char *)d->p);
      d->p += 8;
      memcpy(&n, &bits, sizeof n);
      /* lua_pushnumber canonicalizes NaNs, so no payload can pose as one
       * of the VM's tagged values. */
      lua_pushnumber(L, n);
      return;
    }
    case CX_T_STR: {
      size_t len;
      const char *s = dec_get_bytes(d, &len, "truncated string");
      lua_pushlstring(L, s, len);
      return;
    }
    case CX_T_TABLE:
    case CX_T_TABLE_MT:
      dec_table(d, tag == CX_T_TABLE_MT);
      return;
    case CX_T_REF: {
      uint64_t ref = dec_get_uv(d, "truncated reference");
      if (ref >= (uint64_t)d->nrefs) {
        d->p--;
        dec_bad(d, "reference to a value not yet sent");
      }
      lua_rawgeti(L, d->refs, (int)ref + 1);
      return;
    }
    case CX_T_FUNC:
      if (!(d->flags & HD_DEC_TRUSTED)) {
        d->p--;
        dec_bad(d, "function where data was expected");
      }
      dec_function(d);
      return;
    case CX_T_NAMED_MOD:
    case CX_T_NAMED_FIELD:
      dec_named(d, tag == CX_T_NAMED_FIELD);
      dec_named_note(d);
      return;
    case CX_T_END:
      d->p--;
      dec_bad(d, "table end where a value was expected");
    case CX_T_UPJOIN:
      d->p--;
      dec_bad(d, "upvalue join where a value was expected");
    default:
      d->p--;
      dec_bad(d, lua_pushfstring(L, "unknown tag %d", tag));
  }
}

int hd_decode(lua_State *L, const char *p, size_t len, int flags) {
  dec_state d;
  uint64_t n, i;
  int base;
  d.L = L;
  d.start = d.p = (const unsigned char *)p;
  d.end = d.start + len;
  d.flags = flags;
  d.nrefs = 0;
  d.depth = 0;
  d.saw_mt = 0;
  d.nnamed = 0;
  d.named_fn = 0;
  d.budget = len / 2;
  if (!lua_checkstack(L, 8)) cx_oom(L);
  d.base = lua_gettop(L);
  lua_pushnil(L);
  base = d.refs = lua_gettop(L);
  n = dec_get_uv(&d, "truncated value count");
  if (n > CX_MAX_VALUES) dec_bad(&d, "too many values");
  /* Every value takes at least one byte. */
  if (n > (uint64_t)(d.end - d.p)) dec_bad(&d, "truncated message");
  if (!lua_checkstack(L, (int)n + 8)) dec_bad(&d, "too many values for the Lua stack");
  for (i = 0; i < n; i++) dec_value(&d);
  if (d.p != d.end) dec_bad(&d, "trailing bytes");
  if (d.saw_mt && d.named_fn > 0) dec_mt_check(&d);
  lua_remove(L, base);
  return (int)n;
}
