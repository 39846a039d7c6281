/* codec.c: the one value codec: closures from parent to worker, results
 * back, and the checks that make a worker's reply safe to decode. */
#include "codec.h"

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Value tags of the wire format. */
enum {
  HD_T_NIL = 0,
  HD_T_FALSE = 1,
  HD_T_TRUE = 2,
  HD_T_NUM = 3,
  HD_T_STR = 4,
  HD_T_TABLE = 5,
  HD_T_TABLE_MT = 6,
  HD_T_END = 7,
  HD_T_REF = 8,
  HD_T_FUNC = 9,
  HD_T_UPJOIN = 10,
  HD_T_NAMED_MOD = 11,
  HD_T_NAMED_FIELD = 12
};

/* A C function may hold at most LUAI_MAXCSTACK Lua stack slots, counted
 * from its frame's base, so its caller's slots count too. The decoder keeps
 * to HD_DEC_SLOTS of them, counted from where it starts, whatever its caller
 * holds: whether a message decodes then depends on the message alone, which
 * is what lets hd_validate tell without a lua_State. The rest is left to the
 * caller (the decoders in lhandler.c, lcodec.c and worker.c hold one or two
 * slots). */
#ifndef LUAI_MAXCSTACK
#define LUAI_MAXCSTACK 8000
#endif
#define HD_DEC_SLOTS (LUAI_MAXCSTACK - 64)

/* The most top-level values in one message: all of them, the decoder's one
 * slot of its own and the 8 it keeps spare fit in HD_DEC_SLOTS. The encoder
 * refuses more too, so that what one side sends the other can take. */
#define HD_MAX_VALUES (HD_DEC_SLOTS - 9)

/* Why a hostile message is refused when a metatable reaches a host function
 * (see hd_mt_reach). */
#define HD_MSG_NAMED_MT "a named value in a metatable"

/* The most slots one table's size hint may preallocate. Hints only save
 * rehashing; a table that really is bigger still grows as it fills. */
#define HD_HINT_MAX (1u << 20)

/* The hash-size hint is backpatched after the entries are counted, so it is
 * written as a fixed three-byte varint and can hold at most this. */
#define HD_HINT3_MAX ((1u << 21) - 1)

/* How many bytes of a string key or a name an error message shows. */
#define HD_SHOWN 40

/* The name cache lives in the registry under this address. */
static const char hd_names_key = 0;
static const char hd_std_key = 0;

/* Raises the value on the top of the stack. lua_error never returns, but it
 * is not declared so; abort() tells the compiler. */
_Noreturn static void hd_throw(lua_State *L) {
  lua_error(L);
  abort();
}

_Noreturn static void hd_oom(lua_State *L) {
  lua_pushliteral(L, "handler: out of memory");
  hd_throw(L);
}

/* Writes v as an unsigned LEB128 varint at p (room for 10 bytes) and returns
 * how many bytes it took. */
static size_t hd_uv_write(unsigned char *p, uint64_t v) {
  size_t n = 0;
  while (v >= 0x80) {
    p[n++] = (unsigned char)(v | 0x80);
    v >>= 7;
  }
  p[n++] = (unsigned char)v;
  return n;
}

static size_t hd_uv_size(uint64_t v) {
  size_t n = 1;
  while (v >= 0x80) {
    v >>= 7;
    n++;
  }
  return n;
}

/* Pushes s as a quoted, escaped string, cut after HD_SHOWN bytes, for error
 * messages that must stay readable whatever bytes a key or name holds. */
static void hd_push_quoted(lua_State *L, const char *s, size_t len) {
  char buf[HD_SHOWN * 4 + 8];
  size_t i, o = 0, n = len < HD_SHOWN ? len : HD_SHOWN;
  buf[o++] = '"';
  for (i = 0; i < n; i++) {
    unsigned char c = (unsigned char)s[i];
    if (c == '"' || c == '\\') {
      buf[o++] = '\\';
      buf[o++] = (char)c;
    } else if (c == '\n') {
      buf[o++] = '\\';
      buf[o++] = 'n';
    } else if (c == '\r') {
      buf[o++] = '\\';
      buf[o++] = 'r';
    } else if (c == '\t') {
      buf[o++] = '\\';
      buf[o++] = 't';
    } else if (c < 32 || c >= 127) {
      buf[o++] = '\\';
      buf[o++] = (char)('0' + c / 100);
      buf[o++] = (char)('0' + c / 10 % 10);
      buf[o++] = (char)('0' + c % 10);
    } else {
      buf[o++] = (char)c;
    }
  }
  buf[o++] = '"';
  if (len > n) {
    memcpy(buf + o, "...", 3);
    o += 3;
  }
  lua_pushlstring(L, buf, o);
}

/* Whether a value of this type may be sent by name. */
static int hd_nameable(int type) {
  return type == LUA_TTABLE || type == LUA_TFUNCTION || type == LUA_TUSERDATA ||
         type == LUA_TLIGHTUSERDATA;
}

/* ------------------------------------------------------------------------ */
/* The name cache: which values travel by name, and under which name.     */
/* ------------------------------------------------------------------------ */

/* The cache is a table in the registry under &hd_names_key:
 *   [NAMES] value → its name: a module's name, or a field's name;
 *   [OWNER] value → the module's name, for values named as a field;
 *   [SEEN]  module name → the module value as it was indexed;
 *   [PRINT] the fingerprint of package.loaded when last indexed;
 *   [NSEEN] how many modules SEEN holds.
 * NAMES and OWNER have weak keys and SEEN weak values, so that the cache
 * pins nothing. Names are the strings package.loaded and the modules
 * already hold, so indexing allocates no strings. */
enum { HD_NC_NAMES = 1, HD_NC_OWNER, HD_NC_SEEN, HD_NC_PRINT, HD_NC_NSEEN };

/* The fingerprint of package.loaded (at `loaded`): its number of entries
 * mixed with the addresses of its keys and values, so that one module
 * unloaded and another loaded between two messages is noticed too. It is
 * folded to 52 bits so that a lua_Number holds it exactly. */
static lua_Number hd_loaded_print(lua_State *L, int loaded) {
  uint64_t sum = 0, count = 0;
  lua_pushnil(L);
  while (lua_next(L, loaded) != 0) {
    uint64_t k = (uint64_t)(uintptr_t)lua_topointer(L, -2);
    uint64_t v = (uint64_t)(uintptr_t)lua_topointer(L, -1);
    sum += (k * 0x9e3779b97f4a7c15u) ^ v;
    count++;
    lua_pop(L, 1);
  }
  sum += count << 40;
  return (lua_Number)((sum ^ (sum >> 52)) & ((UINT64_C(1) << 52) - 1));
}

/* Pushes a new empty table with the given __mode. */
static void hd_push_weak(lua_State *L, int narr, int nhash, const char *mode) {
  lua_createtable(L, narr, nhash);
  lua_createtable(L, 0, 1);
  lua_pushstring(L, mode);
  lua_setfield(L, -2, "__mode");
  lua_setmetatable(L, -2);
}

/* Pushes the set of names ("mod.field", and "mod") that a fresh state with
 * the standard libraries has, built once from a throwaway state. When a
 * value has two names (a host that aliased table.unpack = unpack), the one
 * a worker's fresh state also has is the one that can travel.
 * L: ... → ... set */
static void hd_std_push(lua_State *L) {
  lua_State *F;
  lua_pushlightuserdata(L, (void *)&hd_std_key);
  lua_rawget(L, LUA_REGISTRYINDEX);
  if (lua_istable(L, -1)) return;
  lua_pop(L, 1);
  lua_newtable(L);
  F = luaL_newstate();
  if (F != NULL) {
    luaL_openlibs(F);
    lua_getfield(F, LUA_REGISTRYINDEX, "_LOADED");
    lua_pushnil(F);
    while (lua_next(F, -2) != 0) {
      if (lua_type(F, -2) == LUA_TSTRING && lua_istable(F, -1)) {
        const char *mod = lua_tostring(F, -2);
        lua_pushstring(L, mod);
        lua_pushboolean(L, 1);
        lua_rawset(L, -3);
        lua_pushnil(F);
        while (lua_next(F, -2) != 0) {
          if (lua_type(F, -2) == LUA_TSTRING) {
            lua_pushfstring(L, "%s.%s", mod, lua_tostring(F, -2));
            lua_pushboolean(L, 1);
            lua_rawset(L, -3);
          }
          lua_pop(F, 1);
        }
      }
      lua_pop(F, 1);
    }
    lua_close(F);
  }
  lua_pushlightuserdata(L, (void *)&hd_std_key);
  lua_pushvalue(L, -2);
  lua_rawset(L, LUA_REGISTRYINDEX);
}

/* Whether mod.field (strings at the two indices) is a standard name. */
static int hd_std_has(lua_State *L, int mod, int field) {
  int has;
  if (!lua_isstring(L, mod) || !lua_isstring(L, field)) return 0;
  if (!lua_checkstack(L, 4)) hd_oom(L);
  hd_std_push(L);
  lua_pushfstring(L, "%s.%s", lua_tostring(L, mod), lua_tostring(L, field));
  lua_rawget(L, -2);
  has = lua_toboolean(L, -1);
  lua_pop(L, 2);
  return has;
}

/* Names the reference-type fields of the module table at `mod`, whose name
 * is the string at `modkey`, unless a value has a name already. In the
 * globals table only C functions and userdata are named: its tables that
 * matter are modules, named already, while the Lua functions and tables a
 * script puts there exist on its side only, so they must travel by value.
 * L: ... → same */
static void hd_names_fields(lua_State *L, int names, int owner, int modkey, int mod,
                            int globals) {
  lua_pushnil(L);
  while (lua_next(L, mod) != 0) {
    int vt = lua_type(L, -1);
    if (lua_type(L, -2) == LUA_TSTRING && hd_nameable(vt) &&
        (!globals || vt == LUA_TUSERDATA || vt == LUA_TLIGHTUSERDATA ||
         (vt == LUA_TFUNCTION && lua_iscfunction(L, -1)))) {
      int kidx = lua_gettop(L) - 1, vidx = kidx + 1, take;
      lua_pushvalue(L, vidx);
      lua_rawget(L, names);
      take = lua_isnil(L, -1);
      if (!take) {
        /* A second name: it wins only if it is standard and the first is
         * not. */
        lua_pushvalue(L, vidx);
        lua_rawget(L, owner);
        take = !hd_std_has(L, lua_gettop(L), lua_gettop(L) - 1) && hd_std_has(L, modkey, kidx);
        lua_pop(L, 1);
      }
      lua_pop(L, 1);
      if (take) {
        lua_pushvalue(L, vidx);
        lua_pushvalue(L, kidx);
        lua_rawset(L, names);
        lua_pushvalue(L, vidx);
        lua_pushvalue(L, modkey);
        lua_rawset(L, owner);
      }
    }
    lua_pop(L, 1);
  }
}

/* Indexes the modules of package.loaded (at `loaded`) that the cache (at
 * `nc`) has not seen: modules first, then fields of module tables, the
 * globals table last so that string.format is named after string, not
 * after _G. The first name found wins, except that a module's own name
 * beats a field's. L: ... → same */
static void hd_names_index(lua_State *L, int nc, int loaded) {
  int names, owner, seen, pass;
  lua_Number nseen;
  if (!lua_checkstack(L, 12)) hd_oom(L);
  lua_rawgeti(L, nc, HD_NC_NAMES);
  names = lua_gettop(L);
  lua_rawgeti(L, nc, HD_NC_OWNER);
  owner = names + 1;
  lua_rawgeti(L, nc, HD_NC_SEEN);
  seen = names + 2;
  lua_rawgeti(L, nc, HD_NC_NSEEN);
  nseen = lua_tonumber(L, -1);
  lua_pop(L, 1);
  for (pass = 0; pass < 3; pass++) {
    lua_pushnil(L);
    while (lua_next(L, loaded) != 0) {
      int k = lua_gettop(L) - 1, v = k + 1, fresh;
      if (lua_type(L, k) != LUA_TSTRING) {
        lua_pop(L, 1);
        continue;
      }
      lua_pushvalue(L, k);
      lua_rawget(L, seen);
      fresh = lua_isnil(L, -1);
      lua_pop(L, 1);
      if (fresh && pass == 0 && hd_nameable(lua_type(L, v))) {
        lua_pushvalue(L, v);
        lua_pushvalue(L, k);
        lua_rawset(L, names);
        lua_pushvalue(L, v);
        lua_rawget(L, owner);
        if (!lua_isnil(L, -1)) {
          lua_pushvalue(L, v);
          lua_pushnil(L);
          lua_rawset(L, owner);
        }
        lua_pop(L, 1);
      } else if (fresh && pass > 0 && lua_istable(L, v)) {
        int globals;
        lua_pushvalue(L, LUA_GLOBALSINDEX);
        globals = lua_rawequal(L, -1, v);
        lua_pop(L, 1);
        if (globals == pass - 1) hd_names_fields(L, names, owner, k, v, globals);
      }
      lua_pop(L, 1);
    }
  }
  /* Only now are the new modules marked seen: the passes above told them
   * from the old ones by their absence from SEEN. */
  lua_pushnil(L);
  while (lua_next(L, loaded) != 0) {
    if (lua_type(L, -2) == LUA_TSTRING) {
      lua_pushvalue(L, -2);
      lua_rawget(L, seen);
      if (lua_isnil(L, -1)) {
        lua_pushvalue(L, -3);
        lua_pushvalue(L, -3);
        lua_rawset(L, seen);
        nseen++;
      }
      lua_pop(L, 1);
    }
    lua_pop(L, 1);
  }
  lua_pushnumber(L, hd_loaded_print(L, loaded));
  lua_rawseti(L, nc, HD_NC_PRINT);
  lua_pushnumber(L, nseen);
  lua_rawseti(L, nc, HD_NC_NSEEN);
  lua_pop(L, 3);
}

/* Builds the name cache afresh, stores it in the registry and pushes it.
 * package.loaded is the registry's _LOADED, the table require uses.
 * L: ... → ... nc */
static void hd_names_build(lua_State *L) {
  int nc;
  if (!lua_checkstack(L, 8)) hd_oom(L);
  lua_createtable(L, 5, 0);
  nc = lua_gettop(L);
  hd_push_weak(L, 0, 64, "k");
  lua_rawseti(L, nc, HD_NC_NAMES);
  hd_push_weak(L, 0, 64, "k");
  lua_rawseti(L, nc, HD_NC_OWNER);
  hd_push_weak(L, 0, 16, "v");
  lua_rawseti(L, nc, HD_NC_SEEN);
  lua_pushnumber(L, 0);
  lua_rawseti(L, nc, HD_NC_NSEEN);
  lua_getfield(L, LUA_REGISTRYINDEX, "_LOADED");
  if (lua_istable(L, -1)) hd_names_index(L, nc, nc + 1);
  lua_pop(L, 1);
  lua_pushlightuserdata(L, (void *)&hd_names_key);
  lua_pushvalue(L, nc);
  lua_rawset(L, LUA_REGISTRYINDEX);
}

/* Pushes the name cache, brought up to date. The cheap check is the
 * fingerprint of package.loaded, one walk over its entries only. When it
 * changed and every module seen before is still there, unchanged, only the
 * new modules are indexed; otherwise the cache is rebuilt. Returns 1 when
 * it was rebuilt. L: ... → ... nc */
static int hd_names_push(lua_State *L) {
  lua_Number fp, same = 0;
  int nc, loaded, seen, stale = 0;
  if (!lua_checkstack(L, 8)) hd_oom(L);
  lua_pushlightuserdata(L, (void *)&hd_names_key);
  lua_rawget(L, LUA_REGISTRYINDEX);
  nc = lua_gettop(L);
  if (!lua_istable(L, nc)) {
    lua_pop(L, 1);
    hd_names_build(L);
    return 1;
  }
  lua_getfield(L, LUA_REGISTRYINDEX, "_LOADED");
  loaded = nc + 1;
  if (!lua_istable(L, loaded)) {
    lua_pop(L, 1);
    return 0;
  }
  fp = hd_loaded_print(L, loaded);
  lua_rawgeti(L, nc, HD_NC_PRINT);
  if (lua_tonumber(L, -1) == fp) {
    lua_pop(L, 2);
    return 0;
  }
  lua_pop(L, 1);
  lua_rawgeti(L, nc, HD_NC_SEEN);
  seen = loaded + 1;
  lua_pushnil(L);
  while (lua_next(L, loaded) != 0) {
    if (lua_type(L, -2) == LUA_TSTRING) {
      lua_pushvalue(L, -2);
      lua_rawget(L, seen);
      if (!lua_isnil(L, -1)) {
        if (lua_rawequal(L, -1, -2))
          same++;
        else
          stale = 1;
      }
      lua_pop(L, 1);
    }
    lua_pop(L, 1);
  }
  lua_rawgeti(L, nc, HD_NC_NSEEN);
  if (!stale && lua_tonumber(L, -1) == same) {
    /* Modules were only added: index just those. */
    lua_pop(L, 2);
    hd_names_index(L, nc, loaded);
    lua_pop(L, 1);
    return 0;
  }
  lua_pop(L, 4);
  hd_names_build(L);
  return 1;
}

/* ------------------------------------------------------------------------ */
/* Encoder                                                                  */
/* ------------------------------------------------------------------------ */

/* One step of the path from a top-level value to the value being encoded.
 * Steps only point at stack slots, which stay put while the encoder is
 * below them, so the happy path never builds a string. */
enum {
  HD_STEP_TOP,   /* n: the value's position among the top-level values */
  HD_STEP_KEY,   /* idx: the key under which the value sits */
  HD_STEP_KEYOF, /* idx: the key itself is the value */
  HD_STEP_MT,    /* the value is the metatable */
  HD_STEP_UPVAL  /* idx: the function; n: the upvalue number */
};

typedef struct hd_step {
  int kind;
  int idx;
  int n;
} hd_step;

typedef struct hd_enc {
  lua_State *L;
  hd_buf *out;
  int flags;
  int refs;   /* stack slot: object → ref index; nil until first needed */
  int uvids;  /* stack slot: upvalue id → func ref * 256 + upvalue number */
  int nc;     /* stack slot: the name cache; nil until first needed */
  int names;  /* stack slot: the cache's value → name table */
  int names_state; /* 0: not fetched, 1: fetched, 2: rebuilt in this call */
  lua_Number nrefs;
  int depth;
  int nsteps;
  /* One step for the top level and one per container entered; entering
   * more than HD_MAX_DEPTH containers is an error before a step is added. */
  hd_step steps[HD_MAX_DEPTH + 2];
} hd_enc;

static unsigned char *hd_room(hd_enc *e, size_t n) {
  if (hd_buf_reserve(e->out, n) != 0) hd_oom(e->L);
  return (unsigned char *)e->out->data + e->out->len;
}

static void hd_put_tag(hd_enc *e, int tag) {
  *hd_room(e, 1) = (unsigned char)tag;
  e->out->len++;
}

static void hd_put_uv(hd_enc *e, uint64_t v) {
  unsigned char *p = hd_room(e, 10);
  e->out->len += hd_uv_write(p, v);
}

static void hd_step_push(hd_enc *e, int kind, int idx, int n) {
  hd_step *s;
  /* Cannot overflow: hd_enc_enter bounds the nesting first. */
  if (e->nsteps >= (int)(sizeof e->steps / sizeof e->steps[0])) return;
  s = &e->steps[e->nsteps++];
  s->kind = kind;
  s->idx = idx;
  s->n = n;
}

static int hd_is_ident(const char *s, size_t len) {
  static const char *const keywords[] = {
      "and",  "break", "do",  "else", "elseif", "end",   "false", "for",
      "function", "goto", "if", "in", "local", "nil", "not", "or",
      "repeat", "return", "then", "true", "until", "while"};
  size_t i;
  if (len == 0 || len > HD_SHOWN) return 0;
  for (i = 0; i < len; i++) {
    unsigned char c = (unsigned char)s[i];
    int alpha = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
    if (!alpha && (i == 0 || c < '0' || c > '9')) return 0;
  }
  for (i = 0; i < sizeof keywords / sizeof keywords[0]; i++)
    if (strlen(keywords[i]) == len && memcmp(keywords[i], s, len) == 0) return 0;
  return 1;
}

/* Pushes how a path shows the key at k: .name, ["str"], [3], [true],
 * [table key]. */
static void hd_push_key(lua_State *L, int k) {
  switch (lua_type(L, k)) {
    case LUA_TSTRING: {
      size_t len;
      const char *s = lua_tolstring(L, k, &len);
      if (hd_is_ident(s, len)) {
        lua_pushliteral(L, ".");
        lua_pushlstring(L, s, len);
      } else {
        lua_pushliteral(L, "[");
        hd_push_quoted(L, s, len);
        lua_pushliteral(L, "]");
        lua_concat(L, 2);
      }
      lua_concat(L, 2);
      break;
    }
    case LUA_TNUMBER: {
      char buf[64];
      snprintf(buf, sizeof buf, "[%.14g]", (double)lua_tonumber(L, k));
      lua_pushstring(L, buf);
      break;
    }
    case LUA_TBOOLEAN:
      lua_pushstring(L, lua_toboolean(L, k) ? "[true]" : "[false]");
      break;
    default:
      lua_pushfstring(L, "[%s key]", luaL_typename(L, k));
      break;
  }
}

/* Pushes "upvalue 'name' of function at src:line" for upvalue n of the Lua
 * function at f. Stripped functions have no upvalue names: "upvalue #n". */
static void hd_push_upvalue_step(lua_State *L, int f, int n) {
  lua_Debug ar;
  const char *name = lua_getupvalue(L, f, n);
  if (name) lua_pop(L, 1);
  lua_pushvalue(L, f);
  if (lua_getinfo(L, ">S", &ar) == 0) {
    ar.short_src[0] = '?';
    ar.short_src[1] = '\0';
    ar.linedefined = 0;
  }
  if (name && *name)
    lua_pushfstring(L, "upvalue '%s' of function at %s:%d", name, ar.short_src,
                    ar.linedefined);
  else
    lua_pushfstring(L, "upvalue #%d of function at %s:%d", n, ar.short_src,
                    ar.linedefined);
}

/* Appends the path to the string on the top of the stack. Top-level values
 * and upvalues are joined with " -> "; keys run on like Lua code (.a[2]). A
 * top-level function whose upvalue is at fault is named by that upvalue.
 * L: ... msg → ... msg..path */
static void hd_concat_path(hd_enc *e) {
  lua_State *L = e->L;
  int i, any = 0, after_big = 0;
  for (i = 0; i < e->nsteps; i++) {
    hd_step *s = &e->steps[i];
    switch (s->kind) {
      case HD_STEP_TOP:
        if (i + 1 < e->nsteps && e->steps[i + 1].kind == HD_STEP_UPVAL) continue;
        lua_pushfstring(L, "value #%d", s->n);
        after_big = 1;
        break;
      case HD_STEP_UPVAL:
        if (any) {
          lua_pushliteral(L, " -> ");
          lua_concat(L, 2);
        }
        hd_push_upvalue_step(L, s->idx, s->n);
        after_big = 1;
        break;
      default:
        if (after_big) {
          lua_pushliteral(L, " -> ");
          lua_concat(L, 2);
        }
        if (s->kind == HD_STEP_MT) {
          lua_pushliteral(L, "(metatable)");
        } else {
          hd_push_key(L, s->idx);
          if (s->kind == HD_STEP_KEYOF) {
            lua_pushliteral(L, "(key)");
            lua_concat(L, 2);
          }
        }
        after_big = 0;
        break;
    }
    lua_concat(L, 2);
    any = 1;
  }
}

/* Raises "handler: cannot send a <type><why>: <path>" for the value at idx. */
_Noreturn static void hd_enc_fail(hd_enc *e, int idx, const char *why) {
  lua_State *L = e->L;
  /* Failing to grow the stack here would only turn this error into a
   * stack overflow error; there is nothing better to do about it. */
  (void)lua_checkstack(L, 12);
  lua_pushfstring(L, "handler: cannot send a %s%s: ", luaL_typename(L, idx), why);
  hd_concat_path(e);
  hd_throw(L);
}

static void hd_enc_enter(hd_enc *e, int idx) {
  lua_State *L = e->L;
  if (++e->depth > HD_MAX_DEPTH) {
    (void)lua_checkstack(L, 12);
    lua_pushfstring(L, "handler: cannot send a %s nested deeper than %d levels: ",
                    luaL_typename(L, idx), HD_MAX_DEPTH);
    hd_concat_path(e);
    hd_throw(L);
  }
  if (!lua_checkstack(L, 8)) hd_oom(L);
}

/* Gives the table or function at idx the next ref index and returns it. */
static lua_Number hd_enc_register(hd_enc *e, int idx) {
  lua_State *L = e->L;
  lua_Number ref = e->nrefs++;
  if (lua_isnil(L, e->refs)) {
    lua_newtable(L);
    lua_replace(L, e->refs);
  }
  lua_pushvalue(L, idx);
  lua_pushnumber(L, ref);
  lua_rawset(L, e->refs);
  return ref;
}

/* Writes a REF when the object at idx was sent before; returns 1 if so. */
static int hd_enc_ref(hd_enc *e, int idx) {
  lua_State *L = e->L;
  if (lua_isnil(L, e->refs)) return 0;
  lua_pushvalue(L, idx);
  lua_rawget(L, e->refs);
  if (lua_type(L, -1) == LUA_TNUMBER) {
    lua_Number ref = lua_tonumber(L, -1);
    lua_pop(L, 1);
    hd_put_tag(e, HD_T_REF);
    hd_put_uv(e, (uint64_t)ref);
    return 1;
  }
  lua_pop(L, 1);
  return 0;
}

/* Fetches the name cache into the encoder's slots. L: ... nc → ... */
static void hd_enc_names_set(hd_enc *e) {
  lua_State *L = e->L;
  lua_rawgeti(L, -1, HD_NC_NAMES);
  lua_replace(L, e->names);
  lua_replace(L, e->nc);
}

/* Writes the value's NAMED record when it has a name; returns 1 if so. A
 * miss with `rebuild` set rebuilds the cache once per message, since a
 * module table may have gained a field since it was indexed. */
static int hd_enc_named(hd_enc *e, int idx, int rebuild) {
  lua_State *L = e->L;
  size_t nlen, mlen;
  const char *name, *mod;
  unsigned char *p;
  if (e->names_state == 0) {
    e->names_state = hd_names_push(L) ? 2 : 1;
    hd_enc_names_set(e);
  }
  lua_pushvalue(L, idx);
  lua_rawget(L, e->names);
  if (lua_type(L, -1) != LUA_TSTRING && rebuild && e->names_state == 1) {
    lua_pop(L, 1);
    hd_names_build(L);
    hd_enc_names_set(e);
    e->names_state = 2;
    lua_pushvalue(L, idx);
    lua_rawget(L, e->names);
  }
  if (lua_type(L, -1) != LUA_TSTRING) {
    lua_pop(L, 1);
    return 0;
  }
  name = lua_tolstring(L, -1, &nlen);
  lua_rawgeti(L, e->nc, HD_NC_OWNER);
  lua_pushvalue(L, idx);
  lua_rawget(L, -2);
  if (lua_type(L, -1) == LUA_TSTRING) {
    /* A field: NAMED_FIELD, module name, field name. */
    mod = lua_tolstring(L, -1, &mlen);
    if (nlen > SIZE_MAX / 2 - mlen) hd_oom(L);
    p = hd_room(e, 21 + mlen + nlen);
    p[0] = HD_T_NAMED_FIELD;
    e->out->len += 1 + hd_uv_write(p + 1, mlen);
    memcpy(e->out->data + e->out->len, mod, mlen);
    e->out->len += mlen;
    p = (unsigned char *)e->out->data + e->out->len;
    e->out->len += hd_uv_write(p, nlen);
  } else {
    p = hd_room(e, 11 + nlen);
    p[0] = HD_T_NAMED_MOD;
    e->out->len += 1 + hd_uv_write(p + 1, nlen);
  }
  memcpy(e->out->data + e->out->len, name, nlen);
  e->out->len += nlen;
  lua_pop(L, 3);
  return 1;
}

static void hd_enc_value(hd_enc *e, int idx);

static void hd_enc_table(hd_enc *e, int t) {
  lua_State *L = e->L;
  int mt = 0;
  size_t narr, hpos;
  uint64_t count = 0, nhash;
  unsigned char *p;
  hd_enc_enter(e, t);
  hd_enc_register(e, t);
  if (lua_getmetatable(L, t)) mt = lua_gettop(L);
  narr = lua_objlen(L, t);
  p = hd_room(e, 1 + 10 + 3);
  *p = (unsigned char)(mt ? HD_T_TABLE_MT : HD_T_TABLE);
  e->out->len += 1 + hd_uv_write(p + 1, narr);
  /* The hash hint is known only after the walk: leave three bytes. */
  hpos = e->out->len;
  e->out->len += 3;
  lua_pushnil(L);
  while (lua_next(L, t) != 0) {
    int k = lua_gettop(L) - 1;
    hd_step_push(e, HD_STEP_KEYOF, k, 0);
    hd_enc_value(e, k);
    e->steps[e->nsteps - 1].kind = HD_STEP_KEY;
    hd_enc_value(e, k + 1);
    e->nsteps--;
    lua_pop(L, 1);
    count++;
  }
  hd_put_tag(e, HD_T_END);
  nhash = count > narr ? count - narr : 0;
  if (nhash > HD_HINT3_MAX) nhash = HD_HINT3_MAX;
  p = (unsigned char *)e->out->data + hpos;
  p[0] = (unsigned char)(0x80 | (nhash & 0x7f));
  p[1] = (unsigned char)(0x80 | ((nhash >> 7) & 0x7f));
  p[2] = (unsigned char)((nhash >> 14) & 0x7f);
  if (mt) {
    hd_step_push(e, HD_STEP_MT, mt, 0);
    hd_enc_value(e, mt);
    e->nsteps--;
    lua_pop(L, 1);
  }
  e->depth--;
}

typedef struct hd_dump {
  hd_buf *out;
  int oom;
} hd_dump;

/* lua_dump's writer. It runs inside the VM's protected call, so it reports
 * running out of memory by its return value rather than by raising. */
static int hd_dump_writer(lua_State *L, const void *p, size_t sz, void *ud) {
  hd_dump *d = ud;
  (void)L;
  if (hd_buf_append(d->out, p, sz) != 0) {
    d->oom = 1;
    return 1;
  }
  return 0;
}

static void hd_enc_function(hd_enc *e, int f) {
  lua_State *L = e->L;
  lua_Debug ar;
  lua_Number ref;
  hd_dump dump;
  size_t start, bclen, k;
  int i, nups;
  hd_enc_enter(e, f);
  ref = hd_enc_register(e, f);
  hd_put_tag(e, HD_T_FUNC);
  /* Dump the bytecode (with debug info, for tracebacks) straight into the
   * buffer, then slide it over to make room for its length in front. */
  start = e->out->len;
  dump.out = e->out;
  dump.oom = 0;
  lua_pushvalue(L, f);
  if (lua_dump(L, hd_dump_writer, &dump) != 0) {
    if (dump.oom) hd_oom(L);
    hd_enc_fail(e, f, " (its bytecode could not be dumped)");
  }
  lua_pop(L, 1);
  bclen = e->out->len - start;
  k = hd_uv_size(bclen);
  hd_room(e, k);
  memmove(e->out->data + start + k, e->out->data + start, bclen);
  hd_uv_write((unsigned char *)e->out->data + start, bclen);
  e->out->len += k;

  lua_pushvalue(L, f);
  lua_getinfo(L, ">u", &ar);
  nups = ar.nups;
  hd_put_uv(e, (uint64_t)nups);
  if (nups > 0 && lua_isnil(L, e->uvids)) {
    lua_newtable(L);
    lua_replace(L, e->uvids);
  }
  for (i = 1; i <= nups; i++) {
    void *id;
    lua_getupvalue(L, f, i);
    id = lua_upvalueid(L, f, i);
    lua_pushlightuserdata(L, id);
    lua_rawget(L, e->uvids);
    if (lua_type(L, -1) == LUA_TNUMBER) {
      /* Shared with a closure sent earlier: join it to that one's. */
      uint64_t code = (uint64_t)lua_tonumber(L, -1);
      lua_pop(L, 2);
      hd_put_tag(e, HD_T_UPJOIN);
      hd_put_uv(e, code >> 8);
      hd_put_uv(e, code & 0xff);
      continue;
    }
    lua_pop(L, 1);
    /* Recorded before the value is sent: a recursive local function's
     * upvalue holds the function itself. */
    lua_pushlightuserdata(L, id);
    lua_pushnumber(L, ref * 256 + i);
    lua_rawset(L, e->uvids);
    hd_step_push(e, HD_STEP_UPVAL, f, i);
    hd_enc_value(e, lua_gettop(L));
    e->nsteps--;
    lua_pop(L, 1);
  }
  e->depth--;
}

static void hd_enc_value(hd_enc *e, int idx) {
  lua_State *L = e->L;
  switch (lua_type(L, idx)) {
    case LUA_TNIL:
      hd_put_tag(e, HD_T_NIL);
      return;
    case LUA_TBOOLEAN:
      hd_put_tag(e, lua_toboolean(L, idx) ? HD_T_TRUE : HD_T_FALSE);
      return;
    case LUA_TNUMBER: {
      lua_Number n = lua_tonumber(L, idx);
      uint64_t bits;
      unsigned char *p = hd_room(e, 9);
      memcpy(&bits, &n, sizeof bits);
      p[0] = HD_T_NUM;
      hd_put_u64((char *)p + 1, bits);
      e->out->len += 9;
      return;
    }
    case LUA_TSTRING: {
      size_t len;
      const char *s = lua_tolstring(L, idx, &len);
      unsigned char *p;
      if (len > SIZE_MAX - 11) hd_oom(L);
      p = hd_room(e, 11 + len);
      p[0] = HD_T_STR;
      e->out->len += 1 + hd_uv_write(p + 1, len);
      memcpy(e->out->data + e->out->len, s, len);
      e->out->len += len;
      return;
    }
    case LUA_TTABLE:
      if (hd_enc_ref(e, idx) || hd_enc_named(e, idx, 0)) return;
      hd_enc_table(e, idx);
      return;
    case LUA_TFUNCTION:
      if (hd_enc_ref(e, idx)) return;
      if (!lua_iscfunction(L, idx) && (e->flags & HD_ENC_FUNCTIONS)) {
        if (hd_enc_named(e, idx, 0)) return;
        hd_enc_function(e, idx);
        return;
      }
      if (hd_enc_named(e, idx, 1)) return;
      hd_enc_fail(e, idx,
                  lua_iscfunction(L, idx)
                      ? " (C function not found in package.loaded)"
                      : " (only data and names from package.loaded travel back)");
    case LUA_TUSERDATA:
    case LUA_TLIGHTUSERDATA:
      if (hd_enc_named(e, idx, 1)) return;
      hd_enc_fail(e, idx, "");
    default:
      /* Threads, cdata and whatever else the VM has. */
      hd_enc_fail(e, idx, "");
  }
}

void hd_encode(lua_State *L, int first, int n, hd_buf *out, int flags) {
  hd_enc e;
  int base, i;
  if (first < 0 && first > LUA_REGISTRYINDEX) first = lua_gettop(L) + first + 1;
  if (n < 0) n = 0;
  if (n > HD_MAX_VALUES) {
    lua_pushfstring(L, "handler: cannot send %d values (at most %d)", n, HD_MAX_VALUES);
    hd_throw(L);
  }
  if (!lua_checkstack(L, 12)) hd_oom(L);
  base = lua_gettop(L);
  /* Slots for the ref map, the upvalue map and the name cache, each made
   * only when a message needs it, so that scalars cost nothing extra. */
  lua_pushnil(L);
  lua_pushnil(L);
  lua_pushnil(L);
  lua_pushnil(L);
  e.L = L;
  e.out = out;
  e.flags = flags;
  e.refs = base + 1;
  e.uvids = base + 2;
  e.nc = base + 3;
  e.names = base + 4;
  e.names_state = 0;
  e.nrefs = 0;
  e.depth = 0;
  e.nsteps = 0;
  hd_put_uv(&e, (uint64_t)n);
  for (i = 0; i < n; i++) {
    e.nsteps = 0;
    hd_step_push(&e, HD_STEP_TOP, 0, i + 1);
    hd_enc_value(&e, first + i);
  }
  lua_settop(L, base);
}

static int hd_v_uv(const unsigned char **pp, const unsigned char *end, uint64_t *out);

int hd_encode_strings(hd_buf *out, int n, const char *const *s, const size_t *len) {
  unsigned char tmp[10];
  int i;
  if (hd_buf_append(out, tmp, hd_uv_write(tmp, (uint64_t)(n < 0 ? 0 : n))) != 0) return -1;
  for (i = 0; i < n; i++) {
    tmp[0] = HD_T_STR;
    if (hd_buf_append(out, tmp, 1) != 0 ||
        hd_buf_append(out, tmp, hd_uv_write(tmp, (uint64_t)len[i])) != 0 ||
        hd_buf_append(out, s[i], len[i]) != 0)
      return -1;
  }
  return 0;
}

void hd_msg_info_of(const char *p, size_t len, hd_msg_info *info) {
  const unsigned char *u = (const unsigned char *)p, *end = u + len;
  info->count = 0;
  info->first_is_string = 0;
  if (hd_v_uv(&u, end, &info->count) != 0) return;
  info->first_is_string = info->count > 0 && u < end && *u == HD_T_STR;
}

/* ------------------------------------------------------------------------ */
/* Metatables in hostile messages                                           */
/* ------------------------------------------------------------------------ */

/* A result is data, but a metatable makes ordinary uses of it (t.x,
 * tostring(t), t == u) call functions, and the only functions a hostile
 * message can hold are the host's own, sent by name. So a hostile message
 * is refused when a metatable reaches a named value it counts (hd_decode:
 * one that turned out to be a function; hd_validate, which cannot look
 * names up: any). A metatable reaches the tables nested in it, their
 * metatables, and through references whatever those reach, wherever it was
 * first sent: reach rather than nesting, so that the verdict does not depend
 * on where the encoder happened to write a shared table first. Data-only
 * metatables, and named values no metatable reaches, still travel.
 *
 * hd_mt_reach checks this in one more pass over a message already known to
 * be well formed, needed only when it has a metatable and a counted named
 * value inside a table. A table's reach is its subtree (the tables nested in
 * it, metatables included) and the reach of every table a reference inside
 * that subtree points to. References point back only: to a table complete
 * already, whose verdict is known, or to one still open around the
 * reference, whose reach then equals this table's own; such a table is
 * linked to the outermost one and shares its verdict once that one closes
 * (union-find, so linear time). Per table it keeps one word: */
#define HD_MR_ROOT (UINT64_C(1) << 63) /* used as a metatable */
#define HD_MR_LINK (UINT64_C(1) << 61) /* verdict is that of the table numbered below */
#define HD_MR_OPEN (UINT64_C(2) << 61) /* still open, at the depth below */
#define HD_MR_TAG (UINT64_C(3) << 61)  /* none of these: closed, and below is the verdict */
#define HD_MR_VAL ((UINT64_C(1) << 61) - 1)

/* Where an open table is: reading a key, reading a value, reading its
 * metatable; HD_VS_MT_NEXT marks a table whose metatable follows its END. */
enum { HD_VS_KEY = 0, HD_VS_VALUE = 1, HD_VS_MT = 2, HD_VS_MT_NEXT = 4 };

/* Whether named value number k (from 0, in message order) counts. */
typedef int (*hd_counts_fn)(void *ud, uint64_t k);

typedef struct hd_mr_frame {
  uint64_t ref;
  uint64_t acc; /* offset just after a counted named value it reaches, or 0 */
  int up;       /* depth of the outermost open table a reference in it leads to */
  unsigned state;
} hd_mr_frame;

/* Reads a varint like hd_get_uv: 0 when read, 1 when the message ends
 * first, 2 when it is too long (*pp then at the bad byte). */
static int hd_v_uv(const unsigned char **pp, const unsigned char *end, uint64_t *out) {
  const unsigned char *p = *pp;
  uint64_t v = 0;
  int i;
  for (i = 0; i < 10; i++) {
    unsigned c;
    if (p >= end) {
      *pp = p;
      return 1;
    }
    c = *p;
    if (i == 9 && c > 1) {
      *pp = p;
      return 2;
    }
    p++;
    v |= (uint64_t)(c & 0x7f) << (7 * i);
    if (!(c & 0x80)) {
      *pp = p;
      *out = v;
      return 0;
    }
  }
  *pp = p;
  return 2;
}

/* Follows the links from table x to the table whose verdict it shares,
 * shortening the path on the way. */
static uint64_t hd_mr_find(uint64_t *st, uint64_t x) {
  uint64_t r = x, next;
  while ((st[r] & HD_MR_TAG) == HD_MR_LINK) r = st[r] & HD_MR_VAL;
  while (x != r) {
    next = st[x] & HD_MR_VAL;
    st[x] = (st[x] & HD_MR_ROOT) | HD_MR_LINK | r;
    x = next;
  }
  return r;
}

/* Returns 0 when no metatable of the message (well formed, of ntables
 * tables) reaches a named value that `counts` (NULL: every one), otherwise
 * the offset just after such a named value. st has room for ntables words.
 * It still checks every bound: what it cannot parse, it refuses. */
static size_t hd_mt_reach(const unsigned char *start, size_t len, uint64_t *st,
                          uint64_t ntables, hd_counts_fn counts, void *ud) {
  const unsigned char *p = start, *end = start + len;
  hd_mr_frame frames[HD_MAX_DEPTH];
  hd_mr_frame *f = NULL;
  uint64_t n, i = 0, x, ntab = 0, nnamed = 0;
  int depth = 0, tag;

  if (hd_v_uv(&p, end, &n) != 0) goto odd;
  if (n == 0) goto done;
read:
  if (p >= end) goto odd;
  tag = *p++;
  switch (tag) {
    case HD_T_NIL:
    case HD_T_FALSE:
    case HD_T_TRUE:
      break;
    case HD_T_NUM:
      if (end - p < 8) goto odd;
      p += 8;
      break;
    case HD_T_STR:
      if (hd_v_uv(&p, end, &x) != 0 || x > (uint64_t)(end - p)) goto odd;
      p += x;
      break;
    case HD_T_TABLE:
    case HD_T_TABLE_MT:
      if (depth >= HD_MAX_DEPTH || ntab >= ntables) goto odd;
      if (hd_v_uv(&p, end, &x) != 0 || hd_v_uv(&p, end, &x) != 0) goto odd;
      st[ntab] = HD_MR_OPEN | (uint64_t)depth |
                 (depth > 0 && (f->state & 3) == HD_VS_MT ? HD_MR_ROOT : 0);
      f = &frames[depth];
      f->ref = ntab++;
      f->acc = 0;
      f->up = depth++;
      f->state = tag == HD_T_TABLE_MT ? HD_VS_MT_NEXT : HD_VS_KEY;
      goto entry;
    case HD_T_REF:
      if (hd_v_uv(&p, end, &x) != 0 || x >= ntab) goto odd;
      if (depth > 0) {
        uint64_t r = hd_mr_find(st, x);
        if ((f->state & 3) == HD_VS_MT) st[x] |= HD_MR_ROOT;
        if ((st[r] & HD_MR_TAG) == HD_MR_OPEN) {
          if ((int)(st[r] & HD_MR_VAL) < f->up) f->up = (int)(st[r] & HD_MR_VAL);
        } else if (f->acc == 0) {
          f->acc = st[r] & HD_MR_VAL;
        }
      }
      break;
    case HD_T_NAMED_MOD:
    case HD_T_NAMED_FIELD:
      if (hd_v_uv(&p, end, &x) != 0 || x > (uint64_t)(end - p)) goto odd;
      p += x;
      if (tag == HD_T_NAMED_FIELD) {
        if (hd_v_uv(&p, end, &x) != 0 || x > (uint64_t)(end - p)) goto odd;
        p += x;
      }
      if (depth > 0 && (counts == NULL || counts(ud, nnamed))) {
        /* A named metatable is refused at once; otherwise the table it is
         * in now reaches it. */
        if ((f->state & 3) == HD_VS_MT) return (size_t)(p - start);
        if (f->acc == 0) f->acc = (uint64_t)(p - start);
      }
      nnamed++;
      break;
    default:
      goto odd;
  }

settle: /* A value was read: hand it to its table, or count it. */
  if (depth == 0) {
    if (++i < n) goto read;
    goto done;
  }
  switch (f->state & 3) {
    case HD_VS_KEY:
      f->state |= HD_VS_VALUE;
      goto read;
    case HD_VS_VALUE:
      f->state &= ~(unsigned)HD_VS_VALUE;
      goto entry;
    default:
      goto close;
  }

entry: /* The open table f expects a key or its END. */
  if (p >= end) goto odd;
  if (*p != HD_T_END) goto read;
  p++;
  if (f->state & HD_VS_MT_NEXT) {
    f->state = HD_VS_MT;
    goto read;
  }

close: /* Table f is complete: settle its verdict, or link it. */
  {
    uint64_t *s = &st[f->ref];
    int d = --depth;
    if (f->up < d)
      *s = (*s & HD_MR_ROOT) | HD_MR_LINK | frames[f->up].ref;
    else
      *s = (*s & HD_MR_ROOT) | f->acc;
    if (d > 0) {
      hd_mr_frame *outer = &frames[d - 1];
      if (outer->acc == 0) outer->acc = f->acc;
      if (f->up < outer->up) outer->up = f->up;
      f = outer;
    } else {
      f = NULL;
    }
  }
  goto settle;

done:
  for (x = 0; x < ntab; x++) {
    if (st[x] & HD_MR_ROOT) {
      uint64_t v = st[hd_mr_find(st, x)] & HD_MR_VAL;
      if (v != 0) return (size_t)v;
    }
  }
  return 0;
odd:
  return p > start ? (size_t)(p - start) : 1;
}

/* ------------------------------------------------------------------------ */
/* Decoder                                                                  */
/* ------------------------------------------------------------------------ */

typedef struct hd_dec {
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
} hd_dec;

/* Raises "handler: bad message: <what> at byte <offset>". */
_Noreturn static void hd_bad(hd_dec *d, const char *what) {
  lua_State *L = d->L;
  char at[48];
  (void)lua_checkstack(L, 4);
  snprintf(at, sizeof at, " at byte %zu", (size_t)(d->p - d->start));
  lua_pushfstring(L, "handler: bad message: %s%s", what, at);
  hd_throw(L);
}

/* Raises "handler: bad message: <what> <quoted name...> at byte <offset>"
 * for messages about a named value. */
_Noreturn static void hd_bad_name(hd_dec *d, const char *what, const char *mod,
                                  size_t mlen, const char *field, size_t flen) {
  lua_State *L = d->L;
  (void)lua_checkstack(L, 8);
  hd_push_quoted(L, mod, mlen);
  if (field) {
    lua_pushliteral(L, ".");
    hd_push_quoted(L, field, flen);
    lua_concat(L, 3);
  }
  hd_bad(d, lua_pushfstring(L, "%s %s", what, lua_tostring(L, -1)));
}

static uint64_t hd_get_uv(hd_dec *d, const char *what) {
  uint64_t v = 0;
  int i;
  for (i = 0; i < 10; i++) {
    unsigned c;
    if (d->p >= d->end) hd_bad(d, what);
    c = *d->p++;
    /* The tenth byte holds bit 63 only. */
    if (i == 9 && c > 1) {
      d->p--;
      hd_bad(d, "varint too long");
    }
    v |= (uint64_t)(c & 0x7f) << (7 * i);
    if (!(c & 0x80)) return v;
  }
  hd_bad(d, "varint too long");
}

/* Reads a length and the bytes it announces. */
static const char *hd_get_bytes(hd_dec *d, size_t *len, const char *what) {
  const char *s;
  uint64_t n = hd_get_uv(d, what);
  if (n > (uint64_t)(d->end - d->p)) hd_bad(d, what);
  s = (const char *)d->p;
  d->p += n;
  *len = (size_t)n;
  return s;
}

/* The slot count is checked before lua_checkstack, so that only a caller
 * holding many slots of its own, or no memory, makes a message that
 * hd_validate accepts fail here. */
static void hd_dec_enter(hd_dec *d) {
  if (++d->depth > HD_MAX_DEPTH) hd_bad(d, "nested too deep");
  if (lua_gettop(d->L) - d->base + 8 > HD_DEC_SLOTS || !lua_checkstack(d->L, 8))
    hd_bad(d, "nested too deep for the Lua stack");
}

static void hd_dec_register(hd_dec *d, int idx) {
  lua_State *L = d->L;
  if (d->nrefs == INT32_MAX) hd_bad(d, "too many tables");
  if (lua_isnil(L, d->refs)) {
    lua_newtable(L);
    lua_replace(L, d->refs);
  }
  lua_pushvalue(L, idx);
  lua_rawseti(L, d->refs, ++d->nrefs);
}

/* A size hint, cut to what the rest of the message could fill and to what
 * is left of the message's whole budget, so no header makes us allocate. */
static int hd_dec_hint(hd_dec *d, uint64_t hint) {
  uint64_t room = (uint64_t)(d->end - d->p) / 2;
  if (hint > room) hint = room;
  if (hint > HD_HINT_MAX) hint = HD_HINT_MAX;
  if (hint > d->budget) hint = d->budget;
  d->budget -= (size_t)hint;
  return (int)hint;
}

static void hd_dec_value(hd_dec *d);

static void hd_dec_table(hd_dec *d, int with_mt) {
  lua_State *L = d->L;
  int narr, nhash, t;
  hd_dec_enter(d);
  narr = hd_dec_hint(d, hd_get_uv(d, "truncated table"));
  nhash = hd_dec_hint(d, hd_get_uv(d, "truncated table"));
  lua_createtable(L, narr, nhash);
  t = lua_gettop(L);
  hd_dec_register(d, t);
  for (;;) {
    if (d->p >= d->end) hd_bad(d, "truncated table");
    if (*d->p == HD_T_END) {
      d->p++;
      break;
    }
    hd_dec_value(d);
    if (lua_isnil(L, -1)) hd_bad(d, "nil table key");
    if (lua_type(L, -1) == LUA_TNUMBER) {
      lua_Number k = lua_tonumber(L, -1);
      if (k != k) hd_bad(d, "NaN table key");
    }
    hd_dec_value(d);
    lua_rawset(L, t);
  }
  if (with_mt) {
    d->saw_mt = 1;
    hd_dec_value(d);
    if (!lua_istable(L, -1)) hd_bad(d, "metatable is not a table");
    lua_setmetatable(L, t);
  }
  d->depth--;
}

/* The number of upvalues of the function at idx. */
static int hd_nups(lua_State *L, int idx) {
  lua_Debug ar;
  lua_pushvalue(L, idx);
  lua_getinfo(L, ">u", &ar);
  return ar.nups;
}

/* Loads a function's bytecode and sets its upvalues. Trusted input only:
 * LuaJIT does not verify bytecode, so loading it is as good as running
 * native code. */
static void hd_dec_function(hd_dec *d) {
  lua_State *L = d->L;
  size_t len;
  const char *bc;
  uint64_t nups;
  int f, i;
  hd_dec_enter(d);
  bc = hd_get_bytes(d, &len, "truncated function");
  /* Only bytecode: source text would be compiled rather than refused. */
  if (len == 0 || bc[0] != '\033') hd_bad(d, "function is not bytecode");
  if (luaL_loadbufferx(L, bc, len, "=handler", "b") != 0) {
    const char *msg = lua_tostring(L, -1);
    hd_bad(d, lua_pushfstring(L, "cannot load function (%s)", msg ? msg : "?"));
  }
  f = lua_gettop(L);
  /* The ref comes before the upvalues, which may refer back to it. */
  hd_dec_register(d, f);
  nups = hd_get_uv(d, "truncated function");
  if (nups != (uint64_t)hd_nups(L, f)) hd_bad(d, "function upvalue count mismatch");
  for (i = 1; i <= (int)nups; i++) {
    if (d->p < d->end && *d->p == HD_T_UPJOIN) {
      uint64_t g, n;
      d->p++;
      g = hd_get_uv(d, "truncated upvalue join");
      n = hd_get_uv(d, "truncated upvalue join");
      if (g >= (uint64_t)d->nrefs) hd_bad(d, "bad reference in upvalue join");
      lua_rawgeti(L, d->refs, (int)g + 1);
      if (!lua_isfunction(L, -1) || lua_iscfunction(L, -1) || n < 1 ||
          n > (uint64_t)hd_nups(L, lua_gettop(L)))
        hd_bad(d, "bad upvalue join");
      lua_upvaluejoin(L, f, i, lua_gettop(L), (int)n);
      lua_pop(L, 1);
    } else {
      hd_dec_value(d);
      lua_setupvalue(L, f, i);
    }
  }
  d->depth--;
}

/* Pushes package.loaded[mod], require()ing it first when trusted. */
static void hd_dec_module(hd_dec *d, const char *mod, size_t mlen) {
  lua_State *L = d->L;
  lua_getfield(L, LUA_REGISTRYINDEX, "_LOADED");
  if (!lua_istable(L, -1)) hd_bad(d, "package.loaded is missing");
  lua_pushlstring(L, mod, mlen);
  lua_rawget(L, -2);
  lua_remove(L, -2);
  if (!lua_isnil(L, -1)) return;
  if (!(d->flags & HD_DEC_TRUSTED))
    hd_bad_name(d, "no module in package.loaded named", mod, mlen, NULL, 0);
  lua_pop(L, 1);
  lua_getfield(L, LUA_GLOBALSINDEX, "require");
  lua_pushlstring(L, mod, mlen);
  if (lua_pcall(L, 1, 1, 0) != 0) {
    const char *msg = lua_tostring(L, -1);
    hd_push_quoted(L, mod, mlen);
    lua_pushfstring(L, "handler: cannot load module %s: %s", lua_tostring(L, -1),
                    msg ? msg : luaL_typename(L, -2));
    hd_throw(L);
  }
  if (lua_isnil(L, -1))
    hd_bad_name(d, "require returned nothing for module", mod, mlen, NULL, 0);
}

static void hd_dec_named(hd_dec *d, int with_field) {
  lua_State *L = d->L;
  size_t mlen, flen = 0;
  const char *field = NULL;
  const char *mod = hd_get_bytes(d, &mlen, "truncated name");
  if (with_field) field = hd_get_bytes(d, &flen, "truncated name");
  hd_dec_module(d, mod, mlen);
  if (!with_field) return;
  if (!lua_istable(L, -1))
    hd_bad_name(d, "module is not a table:", mod, mlen, NULL, 0);
  lua_pushlstring(L, field, flen);
  /* Trusted modules may fill fields lazily through __index; hostile input
   * must not make us call anything. */
  if (d->flags & HD_DEC_TRUSTED)
    lua_gettable(L, -2);
  else
    lua_rawget(L, -2);
  if (lua_isnil(L, -1)) hd_bad_name(d, "no value in package.loaded named", mod, mlen, field, flen);
  lua_remove(L, -2);
}

/* Notes, in hostile mode, whether the named value just pushed is a function
 * inside a table, for hd_dec_mt_check. A table is open, so the ref table
 * exists. */
static void hd_dec_named_note(hd_dec *d) {
  lua_State *L = d->L;
  uint64_t k = d->nnamed++;
  if ((d->flags & HD_DEC_TRUSTED) || d->depth == 0 || !lua_isfunction(L, -1)) return;
  d->named_fn++;
  /* Past INT32_MAX (messages of gigabytes) every named value counts. */
  if (k >= INT32_MAX) return;
  lua_pushboolean(L, 1);
  lua_rawseti(L, d->refs, -(int)k - 1);
}

static int hd_dec_counts(void *ud, uint64_t k) {
  hd_dec *d = ud;
  int fn;
  if (k >= INT32_MAX) return 1;
  lua_rawgeti(d->L, d->refs, -(int)k - 1);
  fn = lua_toboolean(d->L, -1);
  lua_pop(d->L, 1);
  return fn;
}

/* Refuses a hostile message whose metatables reach a named function (see
 * hd_mt_reach), once the message is known to be well formed. */
static void hd_dec_mt_check(hd_dec *d) {
  lua_State *L = d->L;
  size_t at;
  uint64_t *st;
  if (!lua_checkstack(L, 4)) hd_oom(L);
  st = lua_newuserdata(L, (size_t)d->nrefs * sizeof *st);
  at = hd_mt_reach(d->start, (size_t)(d->end - d->start), st, (uint64_t)d->nrefs,
                   hd_dec_counts, d);
  lua_pop(L, 1);
  if (at != 0) {
    d->p = d->start + at;
    hd_bad(d, HD_MSG_NAMED_MT);
  }
}

static void hd_dec_value(hd_dec *d) {
  lua_State *L = d->L;
  int tag;
  if (d->p >= d->end) hd_bad(d, "truncated value");
  tag = *d->p++;
  switch (tag) {
    case HD_T_NIL:
      lua_pushnil(L);
      return;
    case HD_T_FALSE:
      lua_pushboolean(L, 0);
      return;
    case HD_T_TRUE:
      lua_pushboolean(L, 1);
      return;
    case HD_T_NUM: {
      uint64_t bits;
      lua_Number n;
      if (d->end - d->p < 8) hd_bad(d, "truncated number");
      bits = hd_get_u64((const char *)d->p);
      d->p += 8;
      memcpy(&n, &bits, sizeof n);
      /* lua_pushnumber canonicalizes NaNs, so no payload can pose as one
       * of the VM's tagged values. */
      lua_pushnumber(L, n);
      return;
    }
    case HD_T_STR: {
      size_t len;
      const char *s = hd_get_bytes(d, &len, "truncated string");
      lua_pushlstring(L, s, len);
      return;
    }
    case HD_T_TABLE:
    case HD_T_TABLE_MT:
      hd_dec_table(d, tag == HD_T_TABLE_MT);
      return;
    case HD_T_REF: {
      uint64_t ref = hd_get_uv(d, "truncated reference");
      if (ref >= (uint64_t)d->nrefs) {
        d->p--;
        hd_bad(d, "reference to a value not yet sent");
      }
      lua_rawgeti(L, d->refs, (int)ref + 1);
      return;
    }
    case HD_T_FUNC:
      if (!(d->flags & HD_DEC_TRUSTED)) {
        d->p--;
        hd_bad(d, "function where data was expected");
      }
      hd_dec_function(d);
      return;
    case HD_T_NAMED_MOD:
    case HD_T_NAMED_FIELD:
      hd_dec_named(d, tag == HD_T_NAMED_FIELD);
      hd_dec_named_note(d);
      return;
    case HD_T_END:
      d->p--;
      hd_bad(d, "table end where a value was expected");
    case HD_T_UPJOIN:
      d->p--;
      hd_bad(d, "upvalue join where a value was expected");
    default:
      d->p--;
      hd_bad(d, lua_pushfstring(L, "unknown tag %d", tag));
  }
}

int hd_decode(lua_State *L, const char *p, size_t len, int flags) {
  hd_dec d;
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
  if (!lua_checkstack(L, 8)) hd_oom(L);
  d.base = lua_gettop(L);
  lua_pushnil(L);
  base = d.refs = lua_gettop(L);
  n = hd_get_uv(&d, "truncated value count");
  if (n > HD_MAX_VALUES) hd_bad(&d, "too many values");
  /* Every value takes at least one byte. */
  if (n > (uint64_t)(d.end - d.p)) hd_bad(&d, "truncated message");
  if (!lua_checkstack(L, (int)n + 8)) hd_bad(&d, "too many values for the Lua stack");
  for (i = 0; i < n; i++) hd_dec_value(&d);
  if (d.p != d.end) hd_bad(&d, "trailing bytes");
  if (d.saw_mt && d.named_fn > 0) hd_dec_mt_check(&d);
  lua_remove(L, base);
  return (int)n;
}

/* ------------------------------------------------------------------------ */
/* Validator                                                                */
/* ------------------------------------------------------------------------ */

/* hd_validate walks a message the way hd_decode(…, 0) reads it, with the
 * same checks in the same order and the same messages, but builds nothing:
 * an explicit stack of the open tables stands for the decoder's recursion,
 * and the decoder's Lua stack use is counted to apply HD_DEC_SLOTS. The
 * metatable rule takes hd_mt_reach's second pass, only for messages that
 * have a metatable and a named value inside a table. */

/* What a value turned out to be, as far as its table needs to know. */
enum { HD_V_NIL, HD_V_NAN, HD_V_TABLE, HD_V_NAMED, HD_V_OTHER };

/* hd_mt_reach's words for this many tables fit on the C stack. */
#define HD_V_REACH_INLINE 512

typedef struct hd_vframe {
  unsigned state; /* HD_VS_* */
} hd_vframe;

/* Reads a varint into x, failing with `msg` when the message ends first. */
#define HD_V_UV(x, msg)                              \
  do {                                               \
    if (p < end && *p < 0x80) {                      \
      (x) = *p++;                                    \
    } else {                                         \
      int rc_ = hd_v_uv(&p, end, &(x));              \
      if (rc_ != 0) {                                \
        what = rc_ == 1 ? (msg) : "varint too long"; \
        goto bad;                                    \
      }                                              \
    }                                                \
  } while (0)

#define HD_V_FAIL(msg) \
  do {                 \
    what = (msg);      \
    goto bad;          \
  } while (0)

int hd_validate(const char *msg, size_t len, char *err, size_t errlen) {
  const unsigned char *start = (const unsigned char *)msg, *p = start, *end = start + len;
  hd_vframe frames[HD_MAX_DEPTH];
  hd_vframe *f = NULL;
  uint64_t n, i = 0, x, nrefs = 0;
  const char *what = NULL;
  int depth = 0, nvalue = 0, kind = HD_V_OTHER, tag = 0, has_mt = 0, has_named = 0;

  HD_V_UV(n, "truncated value count");
  if (n > HD_MAX_VALUES) HD_V_FAIL("too many values");
  if (n > (uint64_t)(end - p)) HD_V_FAIL("truncated message");
  if (n == 0) goto finish;

read: /* One value, at p. */
  if (p >= end) HD_V_FAIL("truncated value");
  tag = *p++;
  switch (tag) {
    case HD_T_NIL:
      kind = HD_V_NIL;
      break;
    case HD_T_FALSE:
    case HD_T_TRUE:
      kind = HD_V_OTHER;
      break;
    case HD_T_NUM: {
      uint64_t bits;
      if (end - p < 8) HD_V_FAIL("truncated number");
      bits = hd_get_u64((const char *)p);
      p += 8;
      kind = (bits & UINT64_C(0x7ff0000000000000)) == UINT64_C(0x7ff0000000000000) &&
                     (bits & UINT64_C(0x000fffffffffffff)) != 0
                 ? HD_V_NAN
                 : HD_V_OTHER;
      break;
    }
    case HD_T_STR:
      HD_V_UV(x, "truncated string");
      if (x > (uint64_t)(end - p)) HD_V_FAIL("truncated string");
      p += x;
      kind = HD_V_OTHER;
      break;
    case HD_T_TABLE:
    case HD_T_TABLE_MT:
      /* hd_dec_enter. The decoder's stack then holds its ref slot, the
       * top-level values read so far, and per open table the table and,
       * while its value is read, the key. */
      if (depth >= HD_MAX_DEPTH) HD_V_FAIL("nested too deep");
      if (1 + i + (uint64_t)depth + (uint64_t)nvalue + 8 > HD_DEC_SLOTS)
        HD_V_FAIL("nested too deep for the Lua stack");
      HD_V_UV(x, "truncated table");
      HD_V_UV(x, "truncated table");
      if (nrefs == INT32_MAX) HD_V_FAIL("too many tables");
      nrefs++;
      f = &frames[depth++];
      f->state = tag == HD_T_TABLE_MT ? HD_VS_MT_NEXT : HD_VS_KEY;
      goto entry;
    case HD_T_REF:
      HD_V_UV(x, "truncated reference");
      if (x >= nrefs) {
        p--;
        HD_V_FAIL("reference to a value not yet sent");
      }
      kind = HD_V_TABLE;
      break;
    case HD_T_FUNC:
      p--;
      HD_V_FAIL("function where data was expected");
    case HD_T_NAMED_MOD:
    case HD_T_NAMED_FIELD:
      HD_V_UV(x, "truncated name");
      if (x > (uint64_t)(end - p)) HD_V_FAIL("truncated name");
      p += x;
      if (tag == HD_T_NAMED_FIELD) {
        HD_V_UV(x, "truncated name");
        if (x > (uint64_t)(end - p)) HD_V_FAIL("truncated name");
        p += x;
      }
      has_named |= depth > 0;
      kind = HD_V_NAMED;
      break;
    case HD_T_END:
      p--;
      HD_V_FAIL("table end where a value was expected");
    case HD_T_UPJOIN:
      p--;
      HD_V_FAIL("upvalue join where a value was expected");
    default:
      p--;
      goto bad;
  }

settle: /* A value of `kind` was read: hand it to its table, or count it. */
  if (depth == 0) {
    if (++i < n) goto read;
    goto finish;
  }
  switch (f->state & 3) {
    case HD_VS_KEY:
      if (kind == HD_V_NIL) HD_V_FAIL("nil table key");
      if (kind == HD_V_NAN) HD_V_FAIL("NaN table key");
      f->state |= HD_VS_VALUE;
      nvalue++;
      goto read;
    case HD_VS_VALUE:
      f->state &= ~(unsigned)HD_VS_VALUE;
      nvalue--;
      goto entry;
    default: /* HD_VS_MT */
      /* Only a lookup could tell whether a named value is a table; the
       * decoder takes named tables and refuses named functions here, and
       * hd_mt_reach refuses both. */
      if (kind != HD_V_TABLE && kind != HD_V_NAMED) HD_V_FAIL("metatable is not a table");
      f = --depth > 0 ? &frames[depth - 1] : NULL;
      kind = HD_V_TABLE;
      goto settle;
  }

entry: /* The open table f expects a key or its END. */
  if (p >= end) HD_V_FAIL("truncated table");
  if (*p != HD_T_END) goto read;
  p++;
  if (f->state & HD_VS_MT_NEXT) {
    f->state = HD_VS_MT;
    has_mt = 1;
    goto read;
  }
  f = --depth > 0 ? &frames[depth - 1] : NULL;
  kind = HD_V_TABLE;
  goto settle;

finish:
  if (p != end) HD_V_FAIL("trailing bytes");
  if (has_mt && has_named) {
    uint64_t inline_st[HD_V_REACH_INLINE], *st = inline_st;
    size_t at;
    /* A table takes four bytes at least, so this is at most 2 * len. */
    if (nrefs > HD_V_REACH_INLINE && (st = malloc((size_t)nrefs * sizeof *st)) == NULL) {
      if (err != NULL && errlen > 0) snprintf(err, errlen, "handler: out of memory");
      return -1;
    }
    at = hd_mt_reach(start, len, st, nrefs, NULL, NULL);
    if (st != inline_st) free(st);
    if (at != 0) {
      p = start + at;
      HD_V_FAIL(HD_MSG_NAMED_MT);
    }
  }
  return 0;

bad:
  if (err != NULL && errlen > 0) {
    if (what != NULL)
      snprintf(err, errlen, "handler: bad message: %s at byte %zu", what, (size_t)(p - start));
    else
      snprintf(err, errlen, "handler: bad message: unknown tag %d at byte %zu", tag,
               (size_t)(p - start));
  }
  return -1;
}
