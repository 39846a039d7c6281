/* codec_encode.c: the encoder: Lua values to a message, and a message of plain strings without a lua_State. */
#include <lauxlib.h>
#include <lua.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "codec_int.h"
#include "weak.h"

/* The Lua stack slots the encoder makes sure of: when it starts (its eight
 * slots of its own, and room), per table or function it enters, and to
 * build an error message. */
#define ENC_SLOTS 16
#define ENC_ENTER_SLOTS 8
#define ENC_FAIL_SLOTS 12

/* Entries of the encoder's cache from a key string's address to its KREF
 * slot (a power of two). */
#define ENC_KFAST 128

/* The first size of the map of objects already sent (a power of two); it
 * grows fourfold when it is half full. */
#define ENC_MAP_MIN 64

/* Writes v as an unsigned LEB128 varint at p (room for CX_UV_MAX bytes) and
 * returns how many bytes it took. */
static size_t enc_uv_write(unsigned char *p, uint64_t v) {
  size_t n = 0;
  while (v >= CX_UV_MORE) {
    p[n++] = (unsigned char)(v | CX_UV_MORE);
    v >>= CX_UV_BITS;
  }
  p[n++] = (unsigned char)v;
  return n;
}

static size_t enc_uv_size(uint64_t v) {
  size_t n = 1;
  while (v >= CX_UV_MORE) {
    v >>= CX_UV_BITS;
    n++;
  }
  return n;
}

/* One step of the path from a top-level value to the value being encoded.
 * Steps only point at stack slots, which stay put while the encoder is
 * below them, so the happy path never builds a string. */
enum {
  ENC_STEP_TOP,   /* n: the value's position among the top-level values */
  ENC_STEP_KEY,   /* idx: the key under which the value sits */
  ENC_STEP_KEYOF, /* idx: the key itself is the value */
  ENC_STEP_MT,    /* the value is the metatable */
  ENC_STEP_UPVAL  /* idx: the function; n: the upvalue number */
};

typedef struct enc_step {
  int kind;
  int idx;
  int n;
} enc_step;

/* The objects (tables and functions) already sent, by address, and their
 * ref numbers: open addressing, linear probing, at most half full. A slot
 * belongs to the message whose generation it carries: the map is kept in
 * the registry for the next message, which takes the next generation
 * instead of clearing it. It lives in a userdata, so that an error leaves
 * it to the collector (and marks it busy: the next message makes a fresh
 * one, as one made while another is being made does).
 *
 * An address stays its object's while the message is made: every object
 * in the map is reachable from the values being sent, the encoder runs no
 * Lua code, and the little it allocates (a few tables, the name cache)
 * cannot make the collector finish two cycles, which freeing an object
 * reachable at the start of the message would take. */
typedef struct enc_map_slot {
  const void *p;
  uint32_t gen; /* the slot is empty unless this is the map's */
  uint32_t ref; /* below CX_MAX_REFS */
} enc_map_slot;

typedef struct enc_map {
  size_t mask; /* slots - 1 */
  size_t n;    /* slots of this generation */
  uint32_t gen;
  int busy;    /* a message is being made with it */
  enc_map_slot slot[];
} enc_map;

/* The largest map kept for the next message (slots): 4 MB. */
#define ENC_MAP_KEEP ((size_t)1 << 18)

/* The kept map is in the registry under this address. */
static const char enc_map_key = 0;

typedef struct enc_state {
  lua_State *L;
  hd_buf *out;
  int flags;
  int map;    /* stack slot: the enc_map userdata; nil until first needed */
  enc_map *m;
  int anchor; /* stack slot: slot + 1 → the string a KSET sent; nil until first needed */
  const unsigned char *filter; /* the name cache's filter (cx_nc_maybe), once fetched */
  /* The KREF slots (filled only once a key string comes): */
  int kready;                  /* kptr and kfast are cleared */
  const char *kptr[CX_KSLOTS]; /* the string each slot holds, by its address */
  unsigned kturn;              /* which of a key's two slots a miss takes next */
  const char *kfast[ENC_KFAST]; /* by address: a string a slot held... */
  unsigned char kfslot[ENC_KFAST]; /* ...and that slot */
  int uvids;  /* stack slot: upvalue id → func ref * CX_UPS_PER_REF + upvalue number */
  int nc;     /* stack slot: the name cache; nil until first needed */
  int names;  /* stack slot: the cache's value → name table */
  int names_state; /* 0: not fetched, 1: fetched, 2: rebuilt in this call */
  int stdmods;  /* stack slot: the standard modules (HD_ENC_HOST); nil until needed */
  int verdicts; /* stack slot: other module name → whether a worker can load it
                 * (HD_ENC_HOST); nil until first needed */
  int refused;  /* stack slot: value → why it must not travel (hd_refuse) */
  int refused_state; /* 0: not fetched, 1: no table, 2: fetched */
  lua_Number nrefs;
  int depth;
  int nsteps;
  int tab_fast; /* array parts are read in place (cx_tab_fast) */
  /* One step for the top level and one per container entered; entering
   * more than HD_MAX_DEPTH containers is an error before a step is added. */
  enc_step steps[HD_MAX_DEPTH + 2];
} enc_state;

/* Makes room for n more bytes and returns where they go. The test that
 * there is room is inline: most values find it. */
static void enc_grow(enc_state *e, size_t n) {
  if (hd_buf_reserve(e->out, n) != 0) cx_oom(e->L);
}

static inline unsigned char *enc_room(enc_state *e, size_t n) {
  if (n > e->out->cap - e->out->len) enc_grow(e, n);
  return (unsigned char *)e->out->data + e->out->len;
}

/* Writes v, cut to CX_HINT3_MAX, as a varint of CX_HINT3_BYTES bytes at p. */
static void enc_hint3(unsigned char *p, uint64_t v) {
  int j;
  if (v > CX_HINT3_MAX) v = CX_HINT3_MAX;
  for (j = 0; j < CX_HINT3_BYTES; j++, v >>= CX_UV_BITS)
    p[j] = (unsigned char)((v & (CX_UV_MORE - 1)) | (j + 1 < CX_HINT3_BYTES ? CX_UV_MORE : 0));
}

static void enc_put_tag(enc_state *e, int tag) {
  *enc_room(e, 1) = (unsigned char)tag;
  e->out->len++;
}

static void enc_put_uv(enc_state *e, uint64_t v) {
  unsigned char *p = enc_room(e, CX_UV_MAX);
  e->out->len += enc_uv_write(p, v);
}

static void enc_step_push(enc_state *e, int kind, int idx, int n) {
  enc_step *s;
  /* Cannot overflow: enc_enter bounds the nesting first. */
  if (e->nsteps >= (int)(sizeof e->steps / sizeof e->steps[0])) return;
  s = &e->steps[e->nsteps++];
  s->kind = kind;
  s->idx = idx;
  s->n = n;
}

static int enc_is_ident(const char *s, size_t len) {
  static const char *const keywords[] = {
      "and",  "break", "do",  "else", "elseif", "end",   "false", "for",
      "function", "goto", "if", "in", "local", "nil", "not", "or",
      "repeat", "return", "then", "true", "until", "while"};
  size_t i;
  if (len == 0 || len > CX_SHOWN) return 0;
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
static void enc_push_key(lua_State *L, int k) {
  switch (lua_type(L, k)) {
    case LUA_TSTRING: {
      size_t len;
      const char *s = lua_tolstring(L, k, &len);
      if (enc_is_ident(s, len)) {
        lua_pushliteral(L, ".");
        lua_pushlstring(L, s, len);
      } else {
        lua_pushliteral(L, "[");
        cx_push_quoted(L, s, len);
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
static void enc_push_upvalue_step(lua_State *L, int f, int n) {
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
static void enc_concat_path(enc_state *e) {
  lua_State *L = e->L;
  int i, any = 0, after_big = 0;
  for (i = 0; i < e->nsteps; i++) {
    enc_step *s = &e->steps[i];
    switch (s->kind) {
      case ENC_STEP_TOP:
        if (i + 1 < e->nsteps && e->steps[i + 1].kind == ENC_STEP_UPVAL) continue;
        if ((e->flags & HD_ENC_ARGS) && s->n > 1)
          lua_pushfstring(L, "argument #%d", s->n - 1);
        else if (e->flags & HD_ENC_ITEM)
          lua_pushfstring(L, "argument #%d", s->n);
        else
          lua_pushfstring(L, "value #%d", s->n);
        after_big = 1;
        break;
      case ENC_STEP_UPVAL:
        if (any) {
          lua_pushliteral(L, " -> ");
          lua_concat(L, 2);
        }
        enc_push_upvalue_step(L, s->idx, s->n);
        after_big = 1;
        break;
      default:
        if (after_big) {
          lua_pushliteral(L, " -> ");
          lua_concat(L, 2);
        }
        if (s->kind == ENC_STEP_MT) {
          lua_pushliteral(L, "(metatable)");
        } else {
          enc_push_key(L, s->idx);
          if (s->kind == ENC_STEP_KEYOF) {
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
_Noreturn static void enc_fail(enc_state *e, int idx, const char *why) {
  lua_State *L = e->L;
  /* Failing to grow the stack here would only turn this error into a
   * stack overflow error; there is nothing better to do about it. */
  (void)lua_checkstack(L, ENC_FAIL_SLOTS);
  lua_pushfstring(L, "handler: cannot send a %s%s: ", luaL_typename(L, idx), why);
  enc_concat_path(e);
  cx_throw(L);
}

/* Raises "handler: cannot send a <type>: <path> is <what>" for the value
 * at idx, `what` being the string on the top of the stack. */
_Noreturn static void enc_fail_is(enc_state *e, int idx) {
  lua_State *L = e->L;
  int what;
  (void)lua_checkstack(L, ENC_FAIL_SLOTS);
  what = lua_gettop(L);
  lua_pushfstring(L, "handler: cannot send a %s: ", luaL_typename(L, idx));
  enc_concat_path(e);
  lua_pushliteral(L, " is ");
  lua_pushvalue(L, what);
  lua_concat(L, 3);
  cx_throw(L);
}

static void enc_enter(enc_state *e, int idx) {
  lua_State *L = e->L;
  if (++e->depth > HD_MAX_DEPTH) {
    (void)lua_checkstack(L, ENC_FAIL_SLOTS);
    enc_fail(e, idx, lua_pushfstring(L, " nested deeper than %d levels", HD_MAX_DEPTH));
  }
  if (!lua_checkstack(L, ENC_ENTER_SLOTS)) cx_oom(L);
}

/* Where address p sits, or would, in a map of mask + 1 slots. */
static size_t enc_map_home(const void *p, size_t mask) {
  uint64_t h = (uint64_t)(uintptr_t)p * UINT64_C(0x9E3779B97F4A7C15);
  return (size_t)(h >> 32) & mask;
}

/* The slot of p: its own, or the empty one where it would go. */
static enc_map_slot *enc_map_find(enc_map *m, const void *p) {
  size_t i = enc_map_home(p, m->mask);
  while (m->slot[i].gen == m->gen && m->slot[i].p != p) i = (i + 1) & m->mask;
  return &m->slot[i];
}

static int enc_map_has(const enc_map *m, const enc_map_slot *s) {
  return s->gen == m->gen;
}

/* Makes a map of `slots` slots holding what the current one holds (if
 * any) and makes it the encoder's. L: ... → ... */
static void enc_map_new(enc_state *e, size_t slots) {
  lua_State *L = e->L;
  enc_map *m, *old = e->m;
  size_t i;
  if (slots > (SIZE_MAX - sizeof *m) / sizeof m->slot[0]) cx_oom(L);
  m = lua_newuserdata(L, sizeof *m + slots * sizeof m->slot[0]);
  memset(m->slot, 0, slots * sizeof m->slot[0]);
  m->mask = slots - 1;
  m->n = 0;
  m->gen = 1;
  m->busy = 1;
  if (old != NULL) {
    for (i = 0; i <= old->mask; i++) {
      if (old->slot[i].gen == old->gen) {
        enc_map_slot *s = enc_map_find(m, old->slot[i].p);
        *s = old->slot[i];
        s->gen = m->gen;
      }
    }
    m->n = old->n;
    old->busy = 0;
  }
  lua_replace(L, e->map);
  e->m = m;
}

/* Takes the kept map for this message, or makes one when there is none or
 * it is busy (another message is being made with it, or one raised while
 * it was). L: ... → ... */
static void enc_map_take(enc_state *e) {
  lua_State *L = e->L;
  enc_map *m;
  lua_pushlightuserdata(L, (void *)&enc_map_key);
  lua_rawget(L, LUA_REGISTRYINDEX);
  m = lua_touserdata(L, -1);
  if (m == NULL || m->busy) {
    lua_pop(L, 1);
    enc_map_new(e, ENC_MAP_MIN);
    lua_pushlightuserdata(L, (void *)&enc_map_key);
    lua_pushvalue(L, e->map);
    lua_rawset(L, LUA_REGISTRYINDEX);
    return;
  }
  lua_replace(L, e->map);
  if (++m->gen == 0) {
    /* 2^32 messages later: the old generations could come round again. */
    memset(m->slot, 0, (m->mask + 1) * sizeof m->slot[0]);
    m->gen = 1;
  }
  m->n = 0;
  m->busy = 1;
  e->m = m;
}

/* Hands the map back for the next message, or keeps the one there when it
 * grew too big. L: ... → ... */
static void enc_map_give(enc_state *e) {
  lua_State *L = e->L;
  if (e->m == NULL) return;
  e->m->busy = 0;
  if (e->m->mask + 1 > ENC_MAP_KEEP) return;
  lua_pushlightuserdata(L, (void *)&enc_map_key);
  lua_pushvalue(L, e->map);
  lua_rawset(L, LUA_REGISTRYINDEX);
}

/* The slot of the object at address p (its own or where it would go). */
static enc_map_slot *enc_slot(enc_state *e, const void *p) {
  if (e->m == NULL) enc_map_take(e);
  return enc_map_find(e->m, p);
}

/* Gives the table or function at idx (at address p, whose slot s is) the
 * next ref index and returns it. */
static uint64_t enc_register(enc_state *e, int idx, const void *p, enc_map_slot *s) {
  uint64_t ref = e->nrefs++;
  if (ref >= CX_MAX_REFS) enc_fail(e, idx, " (more tables and functions than a message holds)");
  if (e->m->n + 1 > (e->m->mask + 1) / 2) {
    /* Four times the slots: a message of many tables rehashes fewer
     * times (a worker's map starts small for every reply). */
    if (e->m->mask + 1 > SIZE_MAX / 4 / sizeof e->m->slot[0]) cx_oom(e->L);
    enc_map_new(e, 4 * (e->m->mask + 1));
    s = enc_map_find(e->m, p);
  }
  s->p = p;
  s->gen = e->m->gen;
  s->ref = (uint32_t)ref;
  e->m->n++;
  return ref;
}

/* Writes a REF when the object whose slot is s was sent before; returns 1
 * if so. */
static int enc_ref(enc_state *e, const enc_map_slot *s) {
  if (!enc_map_has(e->m, s)) return 0;
  enc_put_tag(e, CX_T_REF);
  enc_put_uv(e, s->ref);
  return 1;
}

/* The marks hd_refuse makes, in the registry under this address. Until
 * the first mark in this process the encoder does not look for them. */
static const char enc_refuse_key = 0;
static int enc_refusing;

void hd_refuse(lua_State *L, int value, int what) {
  if (value < 0 && value > LUA_REGISTRYINDEX) value = lua_gettop(L) + value + 1;
  if (what < 0 && what > LUA_REGISTRYINDEX) what = lua_gettop(L) + what + 1;
  if (!lua_checkstack(L, 4)) cx_oom(L);
  lua_pushlightuserdata(L, (void *)&enc_refuse_key);
  lua_rawget(L, LUA_REGISTRYINDEX);
  if (!lua_istable(L, -1)) {
    lua_pop(L, 1);
    if (lua_isnil(L, what)) return;
    hd_weak_registry(L, (void *)&enc_refuse_key, "k");
    lua_pushlightuserdata(L, (void *)&enc_refuse_key);
    lua_rawget(L, LUA_REGISTRYINDEX);
  }
  lua_pushvalue(L, value);
  lua_pushvalue(L, what);
  lua_rawset(L, -3);
  lua_pop(L, 1);
  enc_refusing = 1;
}

/* Raises when the table, function or userdata at idx has been refused.
 * The table of marks is fetched once per message, at the first value that
 * needs it. */
static void enc_check_refused(enc_state *e, int idx) {
  lua_State *L = e->L;
  if (e->refused_state == 0) {
    lua_pushlightuserdata(L, (void *)&enc_refuse_key);
    lua_rawget(L, LUA_REGISTRYINDEX);
    lua_replace(L, e->refused);
    e->refused_state = lua_istable(L, e->refused) ? 2 : 1;
  }
  if (e->refused_state != 2) return;
  lua_pushvalue(L, idx);
  lua_rawget(L, e->refused);
  if (lua_type(L, -1) == LUA_TSTRING) enc_fail_is(e, idx);
  lua_pop(L, 1);
}

/* Whether the refused values must be looked for. */
#define ENC_REFUSING(e) (enc_refusing && ((e)->flags & HD_ENC_HOST))

/* Pushes how a module's name shows in a message: as it is when it is made
 * of printable characters that need no quoting, otherwise quoted and
 * escaped. Sets *plain to which. */
static void enc_push_modname(lua_State *L, int mod, int *plain) {
  size_t len, i;
  const char *s = lua_tolstring(L, mod, &len);
  *plain = len > 0 && len <= 2 * CX_SHOWN;
  for (i = 0; i < len && *plain; i++)
    if (s[i] <= ' ' || s[i] > '~' || s[i] == '\'' || s[i] == '"' || s[i] == '\\') *plain = 0;
  if (*plain)
    lua_pushvalue(L, mod);
  else
    cx_push_quoted(L, s, len);
}

/* With HD_ENC_HOST, raises unless a worker can load module `mod` (the
 * string there), which the value at idx is (field 0) or is field `field`
 * (the string there) of. */
static void enc_check_loadable(enc_state *e, int idx, int mod, int field) {
  lua_State *L = e->L;
  int plain;
  /* Most names are of the standard libraries, which need no paths. */
  if (lua_isnil(L, e->stdmods)) {
    cx_names_std_modules(L);
    lua_replace(L, e->stdmods);
  }
  lua_pushvalue(L, mod);
  lua_rawget(L, e->stdmods);
  plain = lua_toboolean(L, -1);
  lua_pop(L, 1);
  if (plain) return;
  if (lua_isnil(L, e->verdicts)) {
    cx_names_verdicts(L);
    lua_replace(L, e->verdicts);
  }
  if (cx_names_found(L, e->verdicts, mod)) return;
  (void)lua_checkstack(L, ENC_FAIL_SLOTS);
  if (field != 0) {
    enc_push_modname(L, mod, &plain);
    enc_push_key(L, field);
    lua_pushliteral(L, ", of ");
    lua_concat(L, 3);
  } else {
    lua_pushliteral(L, "");
  }
  lua_pushliteral(L, "module ");
  enc_push_modname(L, mod, &plain);
  if (plain) {
    lua_pushliteral(L, "'");
    lua_insert(L, -2);
    lua_pushliteral(L, "'");
    lua_concat(L, 3);
  }
  lua_pushliteral(L, ", which exists only in this process "
                     "(it is not on package.path or package.cpath)");
  lua_concat(L, 4);
  enc_fail_is(e, idx);
}

/* Fetches the name cache into the encoder's slots. L: ... nc → ... */
static void enc_names_set(enc_state *e) {
  lua_State *L = e->L;
  lua_rawgeti(L, -1, CX_NC_NAMES);
  lua_replace(L, e->names);
  lua_rawgeti(L, -1, CX_NC_FILTER);
  /* The cache, in its slot, keeps the filter. */
  e->filter = lua_touserdata(L, -1);
  lua_pop(L, 1);
  lua_replace(L, e->nc);
}

/* Whether the table or Lua function at address p may have a name: when its
 * filter bit is clear it has none, and no lookup is needed. */
static int enc_maybe_named(enc_state *e, const void *p) {
  if (e->names_state == 0) {
    e->names_state = cx_names_push(e->L) ? 2 : 1;
    enc_names_set(e);
  }
  return e->filter == NULL || cx_nc_maybe(e->filter, p);
}

/* Writes the value's NAMED record when it has a name; returns 1 if so. A
 * miss with `rebuild` set rebuilds the cache once per message, since a
 * module table may have gained a field since it was indexed. */
static int enc_named(enc_state *e, int idx, int rebuild) {
  lua_State *L = e->L;
  size_t nlen, mlen;
  const char *name, *mod;
  unsigned char *p;
  if (e->names_state == 0) {
    e->names_state = cx_names_push(L) ? 2 : 1;
    enc_names_set(e);
  }
  lua_pushvalue(L, idx);
  lua_rawget(L, e->names);
  if (lua_type(L, -1) != LUA_TSTRING && rebuild && e->names_state == 1) {
    lua_pop(L, 1);
    cx_names_build(L);
    enc_names_set(e);
    e->names_state = 2;
    lua_pushvalue(L, idx);
    lua_rawget(L, e->names);
  }
  if (lua_type(L, -1) != LUA_TSTRING) {
    lua_pop(L, 1);
    return 0;
  }
  name = lua_tolstring(L, -1, &nlen);
  lua_rawgeti(L, e->nc, CX_NC_OWNER);
  lua_pushvalue(L, idx);
  lua_rawget(L, -2);
  if (e->flags & HD_ENC_HOST) {
    int top = lua_gettop(L), field = lua_type(L, top) == LUA_TSTRING;
    enc_check_loadable(e, idx, field ? top : top - 2, field ? top - 2 : 0);
  }
  if (lua_type(L, -1) == LUA_TSTRING) {
    /* A field: NAMED_FIELD, module name, field name. */
    mod = lua_tolstring(L, -1, &mlen);
    if (nlen > SIZE_MAX / 2 - mlen) cx_oom(L);
    p = enc_room(e, 1 + 2 * CX_UV_MAX + mlen + nlen);
    p[0] = CX_T_NAMED_FIELD;
    e->out->len += 1 + enc_uv_write(p + 1, mlen);
    memcpy(e->out->data + e->out->len, mod, mlen);
    e->out->len += mlen;
    p = (unsigned char *)e->out->data + e->out->len;
    e->out->len += enc_uv_write(p, nlen);
  } else {
    p = enc_room(e, 1 + CX_UV_MAX + nlen);
    p[0] = CX_T_NAMED_MOD;
    e->out->len += 1 + enc_uv_write(p + 1, nlen);
  }
  memcpy(e->out->data + e->out->len, name, nlen);
  e->out->len += nlen;
  lua_pop(L, 3);
  return 1;
}

static void enc_typed(enc_state *e, int idx, int type);
static void enc_value(enc_state *e, int idx);

/* Writes a number: an integer (not -0) as INT, a zigzag varint, which for
 * most takes 2 to 4 bytes rather than 9; any other as NUM. The range check
 * comes first, so that the cast is defined. */
static void enc_number(enc_state *e, lua_Number n) {
  unsigned char *p = enc_room(e, 1 + CX_UV_MAX + CX_NUM_BYTES);
  uint64_t bits;
  if (n >= -CX_INT_MAX && n <= CX_INT_MAX && n == (lua_Number)(int64_t)n &&
      (n != 0 || !signbit(n))) {
    int64_t i = (int64_t)n;
    uint64_t zz = i < 0 ? ((uint64_t)(-(i + 1)) << 1) | 1 : (uint64_t)i << 1;
    p[0] = CX_T_INT;
    e->out->len += 1 + enc_uv_write(p + 1, zz);
    return;
  }
  memcpy(&bits, &n, sizeof bits);
  p[0] = CX_T_NUM;
  hd_put_u64((char *)p + 1, bits);
  e->out->len += 1 + CX_NUM_BYTES;
}

static void enc_string(enc_state *e, const char *s, size_t len) {
  unsigned char *p;
  if (len > SIZE_MAX - (1 + CX_UV_MAX)) cx_oom(e->L);
  p = enc_room(e, 1 + CX_UV_MAX + len);
  p[0] = CX_T_STR;
  e->out->len += 1 + enc_uv_write(p + 1, len);
  memcpy(e->out->data + e->out->len, s, len);
  e->out->len += len;
}

/* The slot pair of a key string: from a hash of its bytes (FNV-1a), so
 * that the same keys in the same order make the same message. */
static unsigned enc_kslot(const char *s, size_t len) {
  uint32_t h = 2166136261u;
  size_t i;
  for (i = 0; i < len; i++) h = (h ^ (unsigned char)s[i]) * 16777619u;
  return (unsigned)(h >> 26); /* CX_KSLOTS = 64 */
}

/* The slot of the pair of the key string s (len bytes) that holds it, or
 * the one a miss would take first (then kptr[slot] != s); *f is s's kfast
 * entry. */
static unsigned enc_kslot_of(enc_state *e, const char *s, size_t len, size_t *f) {
  unsigned slot;
  *f = (size_t)(((uint64_t)(uintptr_t)s * UINT64_C(0x9E3779B97F4A7C15)) >> 57) & (ENC_KFAST - 1);
  slot = e->kfslot[*f];
  if (e->kfast[*f] != s || e->kptr[slot] != s) {
    slot = enc_kslot(s, len);
    if (e->kptr[slot] != s && e->kptr[slot ^ 1] == s) slot ^= 1;
    e->kfast[*f] = s;
    e->kfslot[*f] = (unsigned char)slot;
  }
  return slot;
}

/* Writes the string at idx, a table key: a short one through the KREF
 * slots, where the keys of a list of records travel once. Its bytes pick
 * two slots; it is KSET into one (an empty one, else each in turn) and
 * sent as KREF while that slot holds it. A string is known by its address
 * (equal strings are one object in LuaJIT), and kfast maps addresses to
 * slots so that a repeated key is not hashed again; a KSET anchors its
 * string, so that the address stays its own while the message is made. */
static void enc_key_string(enc_state *e, int idx) {
  lua_State *L = e->L;
  size_t len, f;
  const char *s = lua_tolstring(L, idx, &len);
  unsigned slot;
  unsigned char *p;
  if (len > CX_KSHORT) {
    enc_string(e, s, len);
    return;
  }
  if (!e->kready) {
    memset((void *)e->kptr, 0, sizeof e->kptr);
    memset((void *)e->kfast, 0, sizeof e->kfast);
    e->kturn = 1;
    e->kready = 1;
  }
  slot = enc_kslot_of(e, s, len, &f);
  if (e->kptr[slot] == s) {
    p = enc_room(e, 2);
    p[0] = CX_T_KREF;
    p[1] = (unsigned char)slot;
    e->out->len += 2;
    return;
  }
  /* A miss: an empty slot of the two, else each in turn. */
  if (e->kptr[slot] != NULL) {
    if (e->kptr[slot ^ 1] == NULL) {
      slot ^= 1;
    } else {
      slot ^= e->kturn;
      e->kturn ^= 1;
    }
  }
  e->kfslot[f] = (unsigned char)slot;
  if (lua_isnil(L, e->anchor)) {
    lua_newtable(L);
    lua_replace(L, e->anchor);
  }
  lua_pushvalue(L, idx);
  lua_rawseti(L, e->anchor, (int)slot + 1);
  e->kptr[slot] = s;
  p = enc_room(e, 2 + CX_UV_MAX + len);
  p[0] = CX_T_KSET;
  p[1] = (unsigned char)slot;
  e->out->len += 2 + enc_uv_write(p + 2, len);
  memcpy(e->out->data + e->out->len, s, len);
  e->out->len += len;
}

/* Writes the items t[1], t[2]... of the table t (at `t`, object tp) that
 * its array part holds, up to the first nil, reading the numbers in place
 * (codec_tab.c): the other values go through the stack, key at slot k and
 * value above it, as lua_next leaves them. Returns how many. None when the
 * part holds t[0]: lua_next gives that first, a key before any item. */
static uint32_t enc_array_part(enc_state *e, int t, const void *tp, int k) {
  lua_State *L = e->L;
  uint32_t asize, i;
  uint64_t *a = cx_tab_array(tp, &asize);
  if (asize > 0 && a[0] != CX_TAB_NIL) return 0;
  for (i = 1; i < asize; i++) {
    uint64_t v = a[i];
    double d;
    memcpy(&d, &v, sizeof d);
    if (d == d) {
      enc_number(e, d);
      continue;
    }
    if (v == CX_TAB_NIL) break;
    lua_pushnumber(L, (lua_Number)i);
    lua_replace(L, k);
    lua_rawgeti(L, t, (int)i);
    enc_value(e, k + 1);
    lua_settop(L, k);
    /* Nothing the encoder does resizes t; read its array anew anyway. */
    a = cx_tab_array(tp, &asize);
  }
  return i - 1;
}

/* Writes the keyed entries of a record that needs no stack: after its
 * `run` items, nothing in its array part (t[0] included), and in its hash
 * part only keys
 * a KREF slot holds already, with numbers (not NaN) or strings for values,
 * read in place (codec_tab.c) in lua_next's order, as enc_key_string and
 * enc_value would write them; after a KEYS marker when it has `items`.
 * Returns how many, or -1 (nothing written) for another table. */
static long enc_hash_part(enc_state *e, const void *tp, uint32_t run, int items) {
  uint32_t asize, hmask, i, j;
  const uint64_t *a, *n;
  long count = 0;
  size_t len = 0, f;
  if (!e->kready) return -1;
  a = cx_tab_array(tp, &asize);
  if (asize > 0 && a[0] != CX_TAB_NIL) return -1;
  for (i = run + 1; i < asize; i++)
    if (a[i] != CX_TAB_NIL) return -1;
  n = cx_tab_nodes(tp, &hmask);
  for (j = 0; j <= hmask; j++) {
    const uint64_t *node = n + 3 * j;
    const char *s;
    double d;
    if (node[0] == CX_TAB_NIL) continue;
    s = cx_tab_str(node[1], &len);
    if (s == NULL || len > CX_KSHORT || e->kptr[enc_kslot_of(e, s, len, &f)] != s) return -1;
    memcpy(&d, &node[0], sizeof d);
    if (d != d && cx_tab_str(node[0], &len) == NULL) return -1;
    count++;
  }
  if (items && count > 0) enc_put_tag(e, CX_T_KEYS);
  for (j = 0; j <= hmask; j++) {
    const uint64_t *node = n + 3 * j;
    const char *s;
    unsigned char *p;
    double d;
    if (node[0] == CX_TAB_NIL) continue;
    s = cx_tab_str(node[1], &len);
    p = enc_room(e, 2);
    p[0] = CX_T_KREF;
    p[1] = (unsigned char)enc_kslot_of(e, s, len, &f);
    e->out->len += 2;
    memcpy(&d, &node[0], sizeof d);
    if (d == d) {
      enc_number(e, d);
    } else {
      s = cx_tab_str(node[0], &len);
      enc_string(e, s, len);
    }
  }
  return count;
}

/* Writes a table: its entries in lua_next's order. While they are t[1],
 * t[2]... in turn (LuaJIT's array part), they go as items, without their
 * keys, and the tag becomes ARRAY; the first other key ends the items (a
 * KEYS marker) and the rest go as keys and values. Both size hints are
 * backpatched once the entries are counted (so no lua_objlen, which for a
 * table without an array part looks t[1] up in its hash part). The items
 * the array part holds are read in place (enc_array_part), and so are the
 * fields of a record whose keys went before (enc_hash_part); else lua_next
 * goes on from the last item. */
static void enc_table(enc_state *e, int t, const void *tp, enc_map_slot *ts) {
  lua_State *L = e->L;
  int mt = 0, k, items = 0, keyed = 0, done = 0;
  size_t hpos, tpos;
  uint64_t nhash = 0;
  lua_Number run = 0;
  unsigned char *p;
  enc_step *step;
  enc_enter(e, t);
  enc_register(e, t, tp, ts);
  if (lua_getmetatable(L, t)) mt = lua_gettop(L);
  p = enc_room(e, 1 + 2 * CX_HINT3_BYTES);
  tpos = e->out->len;
  *p = (unsigned char)(mt ? CX_T_TABLE_MT : CX_T_TABLE);
  hpos = tpos + 1;
  e->out->len += 1 + 2 * CX_HINT3_BYTES;
  lua_pushnil(L);
  k = lua_gettop(L);
  enc_step_push(e, ENC_STEP_KEY, k, 0);
  step = &e->steps[e->nsteps - 1];
  if (e->tab_fast) {
    uint32_t n = enc_array_part(e, t, tp, k);
    long h;
    if (n > 0) {
      items = 1;
      e->out->data[tpos] = (char)(mt ? CX_T_ARRAY_MT : CX_T_ARRAY);
      run = (lua_Number)n;
      lua_pushnumber(L, run);
      lua_replace(L, k);
    }
    h = enc_hash_part(e, tp, n, items);
    if (h >= 0) {
      nhash = (uint64_t)h;
      done = 1;
    }
  }
  while (!done && lua_next(L, t) != 0) {
    int kt = lua_type(L, k);
    if (!keyed) {
      if (kt == LUA_TNUMBER && lua_tonumber(L, k) == run + 1) {
        if (!items) {
          items = 1;
          e->out->data[tpos] = (char)(mt ? CX_T_ARRAY_MT : CX_T_ARRAY);
        }
        run += 1;
        enc_value(e, k + 1);
        lua_settop(L, k);
        continue;
      }
      keyed = 1;
      if (items) enc_put_tag(e, CX_T_KEYS);
    }
    step->kind = ENC_STEP_KEYOF;
    if (kt == LUA_TSTRING)
      enc_key_string(e, k);
    else
      enc_value(e, k);
    step->kind = ENC_STEP_KEY;
    enc_value(e, k + 1);
    lua_settop(L, k);
    nhash++;
  }
  e->nsteps--;
  enc_put_tag(e, CX_T_END);
  p = (unsigned char *)e->out->data + hpos;
  enc_hint3(p, (uint64_t)run);
  enc_hint3(p + CX_HINT3_BYTES, nhash);
  if (mt) {
    enc_step_push(e, ENC_STEP_MT, mt, 0);
    enc_value(e, mt);
    e->nsteps--;
    lua_pop(L, 1);
  }
  e->depth--;
}

typedef struct enc_dump {
  hd_buf *out;
  int oom;
} enc_dump;

/* lua_dump's writer. It runs inside the VM's protected call, so it reports
 * running out of memory by its return value rather than by raising. */
static int enc_dump_writer(lua_State *L, const void *p, size_t sz, void *ud) {
  enc_dump *d = ud;
  (void)L;
  if (hd_buf_append(d->out, p, sz) != 0) {
    d->oom = 1;
    return 1;
  }
  return 0;
}

static void enc_function(enc_state *e, int f, const void *fp, enc_map_slot *fs) {
  lua_State *L = e->L;
  lua_Debug ar;
  lua_Number ref;
  enc_dump dump;
  size_t start, bclen, k;
  int i, nups;
  enc_enter(e, f);
  ref = (lua_Number)enc_register(e, f, fp, fs);
  enc_put_tag(e, CX_T_FUNC);
  /* Dump the bytecode (with debug info, for tracebacks) straight into the
   * buffer, then slide it over to make room for its length in front. */
  start = e->out->len;
  dump.out = e->out;
  dump.oom = 0;
  lua_pushvalue(L, f);
  if (lua_dump(L, enc_dump_writer, &dump) != 0) {
    if (dump.oom) cx_oom(L);
    enc_fail(e, f, " (its bytecode could not be dumped)");
  }
  lua_pop(L, 1);
  bclen = e->out->len - start;
  k = enc_uv_size(bclen);
  enc_room(e, k);
  memmove(e->out->data + start + k, e->out->data + start, bclen);
  enc_uv_write((unsigned char *)e->out->data + start, bclen);
  e->out->len += k;

  lua_pushvalue(L, f);
  lua_getinfo(L, ">u", &ar);
  nups = ar.nups;
  enc_put_uv(e, (uint64_t)nups);
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
      enc_put_tag(e, CX_T_UPJOIN);
      enc_put_uv(e, code / CX_UPS_PER_REF);
      enc_put_uv(e, code % CX_UPS_PER_REF);
      continue;
    }
    lua_pop(L, 1);
    /* Recorded before the value is sent: a recursive local function's
     * upvalue holds the function itself. */
    lua_pushlightuserdata(L, id);
    lua_pushnumber(L, ref * CX_UPS_PER_REF + i);
    lua_rawset(L, e->uvids);
    enc_step_push(e, ENC_STEP_UPVAL, f, i);
    enc_value(e, lua_gettop(L));
    e->nsteps--;
    lua_pop(L, 1);
  }
  e->depth--;
}

/* Writes the value at idx, of Lua type `type`. */
static void enc_typed(enc_state *e, int idx, int type) {
  lua_State *L = e->L;
  switch (type) {
    case LUA_TNIL:
      enc_put_tag(e, CX_T_NIL);
      return;
    case LUA_TBOOLEAN:
      enc_put_tag(e, lua_toboolean(L, idx) ? CX_T_TRUE : CX_T_FALSE);
      return;
    case LUA_TNUMBER:
      enc_number(e, lua_tonumber(L, idx));
      return;
    case LUA_TSTRING: {
      size_t len;
      const char *s = lua_tolstring(L, idx, &len);
      enc_string(e, s, len);
      return;
    }
    case LUA_TTABLE: {
      const void *p = lua_topointer(L, idx);
      enc_map_slot *s = enc_slot(e, p);
      if (enc_ref(e, s)) return;
      if (ENC_REFUSING(e)) enc_check_refused(e, idx);
      if (enc_maybe_named(e, p) && enc_named(e, idx, 0)) return;
      enc_table(e, idx, p, s);
      return;
    }
    case LUA_TFUNCTION: {
      const void *p = lua_topointer(L, idx);
      enc_map_slot *s = enc_slot(e, p);
      if (enc_ref(e, s)) return;
      if (ENC_REFUSING(e)) enc_check_refused(e, idx);
      if (!lua_iscfunction(L, idx) && (e->flags & HD_ENC_FUNCTIONS)) {
        if (enc_maybe_named(e, p) && enc_named(e, idx, 0)) return;
        enc_function(e, idx, p, s);
        return;
      }
    }
      if (enc_named(e, idx, 1)) return;
      enc_fail(e, idx,
                  lua_iscfunction(L, idx)
                      ? " (C function not found in package.loaded)"
                      : " (only data and names from package.loaded travel back)");
    case LUA_TLIGHTUSERDATA:
      /* NULL (cjson.null, ngx.null) is the same value in every process. */
      if (lua_touserdata(L, idx) == NULL) {
        enc_put_tag(e, CX_T_NULL);
        return;
      }
      if (enc_named(e, idx, 1)) return;
      enc_fail(e, idx, "");
    case LUA_TUSERDATA:
      if (ENC_REFUSING(e)) enc_check_refused(e, idx);
      if (enc_named(e, idx, 1)) return;
      enc_fail(e, idx, "");
    default:
      /* Threads, cdata and whatever else the VM has. */
      enc_fail(e, idx, "");
  }
}

static void enc_value(enc_state *e, int idx) {
  enc_typed(e, idx, lua_type(e->L, idx));
}

void hd_encode(lua_State *L, int first, int n, hd_buf *out, int flags) {
  enc_state e;
  int base, i;
  if (first < 0 && first > LUA_REGISTRYINDEX) first = lua_gettop(L) + first + 1;
  if (n < 0) n = 0;
  if (n > CX_MAX_VALUES) {
    lua_pushfstring(L, "handler: cannot send %d values (at most %d)", n, CX_MAX_VALUES);
    cx_throw(L);
  }
  if (!lua_checkstack(L, ENC_SLOTS)) cx_oom(L);
  base = lua_gettop(L);
  /* Slots for the ref map, the upvalue map, the name cache and its names,
   * the standard modules, the verdicts on others, the refused values and
   * the anchor table,
   * each filled only when a message needs it, so that scalars cost nothing
   * extra. */
  lua_settop(L, base + 8);
  e.L = L;
  e.out = out;
  e.flags = flags;
  e.map = base + 1;
  e.m = NULL;
  e.anchor = base + 8;
  e.filter = NULL;
  e.kready = 0;
  e.uvids = base + 2;
  e.nc = base + 3;
  e.names = base + 4;
  e.names_state = 0;
  e.stdmods = base + 5;
  e.verdicts = base + 6;
  e.refused = base + 7;
  e.refused_state = 0;
  e.nrefs = 0;
  e.depth = 0;
  e.nsteps = 0;
  e.tab_fast = cx_tab_fast(L);
  enc_put_uv(&e, (uint64_t)n);
  for (i = 0; i < n; i++) {
    e.nsteps = 0;
    enc_step_push(&e, ENC_STEP_TOP, 0, i + 1);
    enc_value(&e, first + i);
  }
  enc_map_give(&e);
  lua_settop(L, base);
}

int hd_encode_strings(hd_buf *out, int n, const char *const *s, const size_t *len) {
  unsigned char tmp[10];
  int i;
  if (hd_buf_append(out, tmp, enc_uv_write(tmp, (uint64_t)(n < 0 ? 0 : n))) != 0) return -1;
  for (i = 0; i < n; i++) {
    tmp[0] = CX_T_STR;
    if (hd_buf_append(out, tmp, 1) != 0 ||
        hd_buf_append(out, tmp, enc_uv_write(tmp, (uint64_t)len[i])) != 0 ||
        hd_buf_append(out, s[i], len[i]) != 0)
      return -1;
  }
  return 0;
}
