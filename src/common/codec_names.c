/* codec_names.c: the name cache (which values travel by name, under which name) and how a name shows in a message. */
#include <lauxlib.h>
#include <limits.h>
#include <lua.h>
#include <lualib.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#include "codec_int.h"

/* The name cache lives in the registry under this address; under the
 * others, the set of standard names, the set of standard modules, and the
 * verdicts on which modules a worker can load. */
static const char nc_names_key = 0;
static const char nc_std_key = 0;
static const char nc_stdmod_key = 0;
static const char nc_verdicts_key = 0;

/* Set by the code that writes the cache's tables and filter (nc_index) and
 * makes the standard sets (nc_std_fill): hd_codec_names_fixed. */
static int nc_touched;

/* The Lua stack slots the cache's functions make sure of: indexing a module
 * table, looking a standard name up, building or fetching the cache. */
#define NC_INDEX_SLOTS 12
#define NC_STD_SLOTS 4
#define NC_SLOTS 8

/* The most characters one byte shows as: \ddd. */
#define NC_ESC_MAX 4

void cx_push_quoted(lua_State *L, const char *s, size_t len) {
  char buf[CX_SHOWN * NC_ESC_MAX + 8]; /* quotes and "..." */
  size_t i, o = 0, n = len < CX_SHOWN ? len : CX_SHOWN;
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

/* ------------------------------------------------------------------------ */
/* The name cache                                                           */
/* ------------------------------------------------------------------------ */

/* Whether a value of this type may be sent by name. */
static int nc_nameable(int type) {
  return type == LUA_TTABLE || type == LUA_TFUNCTION || type == LUA_TUSERDATA ||
         type == LUA_TLIGHTUSERDATA;
}

/* The cache is a table in the registry under &nc_names_key:
 *   [NAMES] value → its name: a module's name, or a field's name;
 *   [OWNER] value → the module's name, for values named as a field;
 *   [SEEN]  module name → the module value as it was indexed;
 *   [PRINT] the fingerprint of package.loaded when last indexed;
 *   [NSEEN] how many modules SEEN holds;
 *   [FILTER] a bit per value NAMES has held (cx_nc_maybe), so that the
 *            encoder looks up only the values that may have a name.
 * NAMES and OWNER have weak keys and SEEN weak values, so that the cache
 * pins nothing. Names are the strings package.loaded and the modules
 * already hold, so indexing allocates no strings. Its fields are numbered
 * CX_NC_* (codec_int.h). */

static uint64_t nc_mix(uint64_t sum, uint64_t k, uint64_t v) {
  return sum + ((k * 0x9e3779b97f4a7c15u) ^ v);
}

/* The fingerprint of package.loaded (at `loaded`): its number of entries
 * mixed with the identities of its keys and values, so that one module
 * unloaded and another loaded between two messages is noticed too. It is
 * folded to 52 bits so that a lua_Number holds it exactly. Every message
 * that may hold a name takes it, so where the table's layout is known
 * (codec_tab.c) its slots are read in place, a value's 8 bytes (tag and
 * address) standing for it: a walk with lua_next cost 0.3 us a message
 * with some thirty modules loaded. Either way the same function of the
 * table's contents in one process, which is all a comparison needs. */
static lua_Number nc_loaded_print(lua_State *L, int loaded) {
  uint64_t sum = 0, count = 0;
  if (cx_tab_fast(L)) {
    const void *t = lua_topointer(L, loaded);
    uint32_t asize, hmask, i;
    const uint64_t *a = cx_tab_array(t, &asize), *n = cx_tab_nodes(t, &hmask);
    for (i = 0; i < asize; i++) {
      if (a[i] == CX_TAB_NIL) continue;
      sum = nc_mix(sum, i, a[i]);
      count++;
    }
    for (i = 0; i <= hmask; i++) {
      if (n[3 * i] == CX_TAB_NIL) continue;
      sum = nc_mix(sum, n[3 * i + 1], n[3 * i]);
      count++;
    }
  } else {
    lua_pushnil(L);
    while (lua_next(L, loaded) != 0) {
      sum = nc_mix(sum, (uint64_t)(uintptr_t)lua_topointer(L, -2),
                   (uint64_t)(uintptr_t)lua_topointer(L, -1));
      count++;
      lua_pop(L, 1);
    }
  }
  sum += count << 40;
  return (lua_Number)((sum ^ (sum >> 52)) & ((UINT64_C(1) << 52) - 1));
}

/* Pushes a new empty table with the given __mode. */
static void nc_push_weak(lua_State *L, int narr, int nhash, const char *mode) {
  lua_createtable(L, narr, nhash);
  lua_createtable(L, 0, 1);
  lua_pushstring(L, mode);
  lua_setfield(L, -2, "__mode");
  lua_setmetatable(L, -2);
}

/* Fills, from F, a fresh state with the standard libraries, the sets
 * stored in L's registry: the names ("mod.field", and "mod") it has, and
 * the modules its package.loaded and package.preload hold. Runs in
 * protected mode (lua_cpcall), so that running out of memory in L leaves F
 * to its caller to close. */
static int nc_std_fill(lua_State *L) {
  lua_State *F = lua_touserdata(L, 1);
  int names, mods, k;
  lua_settop(L, 0);
  lua_newtable(L);
  lua_newtable(L);
  names = 1;
  mods = 2;
  lua_getfield(F, LUA_REGISTRYINDEX, "_LOADED");
  lua_pushnil(F);
  while (lua_next(F, -2) != 0) {
    if (lua_type(F, -2) == LUA_TSTRING) {
      const char *mod = lua_tostring(F, -2);
      lua_pushstring(L, mod);
      lua_pushboolean(L, 1);
      lua_rawset(L, mods);
      if (lua_istable(F, -1)) {
        lua_pushstring(L, mod);
        lua_pushboolean(L, 1);
        lua_rawset(L, names);
        lua_pushnil(F);
        while (lua_next(F, -2) != 0) {
          if (lua_type(F, -2) == LUA_TSTRING) {
            lua_pushfstring(L, "%s.%s", mod, lua_tostring(F, -2));
            lua_pushboolean(L, 1);
            lua_rawset(L, names);
          }
          lua_pop(F, 1);
        }
      }
    }
    lua_pop(F, 1);
  }
  lua_getfield(F, -1, "package");
  if (lua_istable(F, -1)) {
    lua_getfield(F, -1, "preload");
    if (lua_istable(F, -1)) {
      lua_pushnil(F);
      while (lua_next(F, -2) != 0) {
        if (lua_type(F, -2) == LUA_TSTRING) {
          lua_pushstring(L, lua_tostring(F, -2));
          lua_pushboolean(L, 1);
          lua_rawset(L, mods);
        }
        lua_pop(F, 1);
      }
    }
    lua_pop(F, 1);
  }
  lua_pop(F, 2);
  nc_touched = 1;
  for (k = 0; k < 2; k++) {
    lua_pushlightuserdata(L, (void *)(k == 0 ? &nc_std_key : &nc_stdmod_key));
    lua_pushvalue(L, k == 0 ? names : mods);
    lua_rawset(L, LUA_REGISTRYINDEX);
  }
  return 0;
}

/* Pushes one of the sets nc_std_fill makes (key: &nc_std_key or
 * &nc_stdmod_key), built once from a throwaway state. L: ... → ... set */
static void nc_std_get(lua_State *L, const char *key) {
  lua_State *F;
  int rc;
  lua_pushlightuserdata(L, (void *)key);
  lua_rawget(L, LUA_REGISTRYINDEX);
  if (lua_istable(L, -1)) return;
  lua_pop(L, 1);
  F = luaL_newstate();
  if (F == NULL) cx_oom(L);
  luaL_openlibs(F);
  rc = lua_cpcall(L, nc_std_fill, F);
  lua_close(F);
  if (rc != 0) cx_throw(L);
  lua_pushlightuserdata(L, (void *)key);
  lua_rawget(L, LUA_REGISTRYINDEX);
}

/* Pushes the set of names ("mod.field", and "mod") that a fresh state with
 * the standard libraries has. When a value has two names (a host that
 * aliased table.unpack = unpack), the one a worker's fresh state also has
 * is the one that can travel. L: ... → ... set */
static void nc_std_push(lua_State *L) {
  nc_std_get(L, &nc_std_key);
}

/* Whether mod.field (strings at the two indices) is a standard name. */
static int nc_std_has(lua_State *L, int mod, int field) {
  int has;
  if (!lua_isstring(L, mod) || !lua_isstring(L, field)) return 0;
  if (!lua_checkstack(L, NC_STD_SLOTS)) cx_oom(L);
  nc_std_push(L);
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
/* Sets the filter bit of the value at idx, which NAMES now holds. */
static void nc_mark(lua_State *L, unsigned char *filter, int idx) {
  size_t b = cx_nc_bit(lua_topointer(L, idx));
  filter[b / 8] |= (unsigned char)(1u << (b % 8));
}

static void nc_fields(lua_State *L, int names, int owner, int modkey, int mod,
                            int globals, unsigned char *filter) {
  lua_pushnil(L);
  while (lua_next(L, mod) != 0) {
    int vt = lua_type(L, -1);
    if (lua_type(L, -2) == LUA_TSTRING && nc_nameable(vt) &&
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
        take = !nc_std_has(L, lua_gettop(L), lua_gettop(L) - 1) && nc_std_has(L, modkey, kidx);
        lua_pop(L, 1);
      }
      lua_pop(L, 1);
      if (take) {
        nc_mark(L, filter, vidx);
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
static void nc_index(lua_State *L, int nc, int loaded) {
  int names, owner, seen, pass;
  lua_Number nseen;
  unsigned char *filter;
  if (!lua_checkstack(L, NC_INDEX_SLOTS)) cx_oom(L);
  nc_touched = 1;
  lua_rawgeti(L, nc, CX_NC_FILTER);
  filter = lua_touserdata(L, -1);
  lua_pop(L, 1); /* the cache at nc keeps it */
  lua_rawgeti(L, nc, CX_NC_NAMES);
  names = lua_gettop(L);
  lua_rawgeti(L, nc, CX_NC_OWNER);
  owner = names + 1;
  lua_rawgeti(L, nc, CX_NC_SEEN);
  seen = names + 2;
  lua_rawgeti(L, nc, CX_NC_NSEEN);
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
      if (fresh && pass == 0 && nc_nameable(lua_type(L, v))) {
        nc_mark(L, filter, v);
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
        if (globals == pass - 1) nc_fields(L, names, owner, k, v, globals, filter);
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
  lua_pushnumber(L, nc_loaded_print(L, loaded));
  lua_rawseti(L, nc, CX_NC_PRINT);
  lua_pushnumber(L, nseen);
  lua_rawseti(L, nc, CX_NC_NSEEN);
  lua_pop(L, 3);
}

/* Builds the name cache afresh, stores it in the registry and pushes it.
 * package.loaded is the registry's _LOADED, the table require uses.
 * L: ... → ... nc */
void cx_names_build(lua_State *L) {
  int nc;
  if (!lua_checkstack(L, NC_SLOTS)) cx_oom(L);
  lua_createtable(L, 6, 0);
  nc = lua_gettop(L);
  nc_push_weak(L, 0, 64, "k");
  lua_rawseti(L, nc, CX_NC_NAMES);
  nc_push_weak(L, 0, 64, "k");
  lua_rawseti(L, nc, CX_NC_OWNER);
  nc_push_weak(L, 0, 16, "v");
  lua_rawseti(L, nc, CX_NC_SEEN);
  lua_pushnumber(L, 0);
  lua_rawseti(L, nc, CX_NC_NSEEN);
  memset(lua_newuserdata(L, CX_NC_FILTER_BITS / 8), 0, CX_NC_FILTER_BITS / 8);
  lua_rawseti(L, nc, CX_NC_FILTER);
  lua_getfield(L, LUA_REGISTRYINDEX, "_LOADED");
  if (lua_istable(L, -1)) nc_index(L, nc, nc + 1);
  lua_pop(L, 1);
  lua_pushlightuserdata(L, (void *)&nc_names_key);
  lua_pushvalue(L, nc);
  lua_rawset(L, LUA_REGISTRYINDEX);
}

/* Pushes the name cache, brought up to date. The cheap check is the
 * fingerprint of package.loaded, one walk over its entries only. When it
 * changed and every module seen before is still there, unchanged, only the
 * new modules are indexed; otherwise the cache is rebuilt. Returns 1 when
 * it was rebuilt. L: ... → ... nc */
int cx_names_push(lua_State *L) {
  lua_Number fp, same = 0;
  int nc, loaded, seen, stale = 0;
  if (!lua_checkstack(L, NC_SLOTS)) cx_oom(L);
  lua_pushlightuserdata(L, (void *)&nc_names_key);
  lua_rawget(L, LUA_REGISTRYINDEX);
  nc = lua_gettop(L);
  if (!lua_istable(L, nc)) {
    lua_pop(L, 1);
    cx_names_build(L);
    return 1;
  }
  lua_getfield(L, LUA_REGISTRYINDEX, "_LOADED");
  loaded = nc + 1;
  if (!lua_istable(L, loaded)) {
    lua_pop(L, 1);
    return 0;
  }
  fp = nc_loaded_print(L, loaded);
  lua_rawgeti(L, nc, CX_NC_PRINT);
  if (lua_tonumber(L, -1) == fp) {
    lua_pop(L, 2);
    return 0;
  }
  lua_pop(L, 1);
  lua_rawgeti(L, nc, CX_NC_SEEN);
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
  lua_rawgeti(L, nc, CX_NC_NSEEN);
  if (!stale && lua_tonumber(L, -1) == same) {
    /* Modules were only added: index just those. */
    lua_pop(L, 2);
    nc_index(L, nc, loaded);
    lua_pop(L, 1);
    return 0;
  }
  lua_pop(L, 4);
  cx_names_build(L);
  return 1;
}


/* Reports the hash part of the table at idx, when it has one of its own
 * (an empty one points into the VM's global state). */
static void nc_fix_nodes(lua_State *L, int idx, void (*fix)(void *, const void *, size_t),
                         void *ud) {
  uint32_t hmask;
  const uint64_t *n = cx_tab_nodes(lua_topointer(L, idx), &hmask);
  if (hmask > 0) fix(ud, n, ((size_t)hmask + 1) * 3 * sizeof *n);
}

int hd_codec_names_fixed(lua_State *L, void (*fix)(void *ud, const void *p, size_t n),
                         void *ud) {
  static const char *const sets[] = {&nc_std_key, &nc_stdmod_key};
  int nc, k;
  if (!cx_tab_fast(L) || !lua_checkstack(L, 4)) return -1;
  lua_pushlightuserdata(L, (void *)&nc_names_key);
  lua_rawget(L, LUA_REGISTRYINDEX);
  nc = lua_gettop(L);
  if (!lua_istable(L, nc)) {
    lua_pop(L, 1);
    return -1;
  }
  for (k = CX_NC_NAMES; k <= CX_NC_SEEN; k++) {
    lua_rawgeti(L, nc, k);
    if (lua_istable(L, -1)) {
      /* Strong: a collection never clears an entry then. What the entries
       * hold is in the image, which keeps it anyway. */
      lua_pushnil(L);
      lua_setmetatable(L, -2);
      nc_fix_nodes(L, lua_gettop(L), fix, ud);
    }
    lua_pop(L, 1);
  }
  lua_rawgeti(L, nc, CX_NC_FILTER);
  if (lua_touserdata(L, -1) != NULL) fix(ud, lua_touserdata(L, -1), CX_NC_FILTER_BITS / 8);
  lua_pop(L, 2);
  for (k = 0; k < 2; k++) {
    lua_pushlightuserdata(L, (void *)sets[k]);
    lua_rawget(L, LUA_REGISTRYINDEX);
    if (lua_istable(L, -1)) nc_fix_nodes(L, lua_gettop(L), fix, ud);
    lua_pop(L, 1);
  }
  nc_touched = 0;
  return 0;
}

int hd_codec_names_touched(void) {
  int t = nc_touched;
  nc_touched = 0;
  return t;
}

/* ------------------------------------------------------------------------ */
/* Which modules a worker can load                                          */
/* ------------------------------------------------------------------------ */

/* A worker requires a module sent by name as any state would: from its
 * package.loaded and package.preload (the standard libraries: a fresh
 * state's, cx_names_std_modules), then through package.path and
 * package.cpath, which are the host's (the scheduler passes them on), and
 * last the C root of a submodule (a.b.c from the library a). A module the host got otherwise (a
 * table its C code put in package.loaded, a preload function of its own,
 * a loader it added) exists in the host only: a job that names it would
 * fail in its worker, so the encoder refuses it in the caller instead.
 *
 * The verdicts are kept in a table in the registry: the paths as they were
 * when it was made, and module name → boolean. The paths are the strings
 * package holds, compared by identity (Lua strings are interned): when they
 * change, the table is replaced. A verdict is not revised when a module's
 * file appears or goes while the paths stay the same. */

#ifndef PATH_MAX
#define PATH_MAX 4096
#endif

/* Whether a template of `paths` (";"-separated, each "?" standing for the
 * name with its dots made slashes) names a file this process can read:
 * package.searchpath, without a Lua string. A candidate longer than
 * PATH_MAX could not be opened by the worker either. */
static int nc_search(const char *name, size_t len, const char *paths, size_t plen) {
  char buf[PATH_MAX];
  const char *p = paths, *end = paths + plen;
  if (memchr(name, '\0', len) != NULL) return 0;
  while (p < end) {
    const char *t = p, *te = memchr(p, ';', (size_t)(end - p));
    size_t o = 0, i;
    int fits = 1;
    if (te == NULL) te = end;
    p = te < end ? te + 1 : end;
    for (; t < te && fits; t++) {
      if (*t != '?') {
        if (o + 1 >= sizeof buf) fits = 0;
        else buf[o++] = *t;
        continue;
      }
      if (len >= sizeof buf - o) {
        fits = 0;
        break;
      }
      for (i = 0; i < len; i++) buf[o++] = name[i] == '.' ? '/' : name[i];
    }
    if (!fits || o == 0) continue;
    buf[o] = '\0';
    if (access(buf, R_OK) == 0) return 1;
  }
  return 0;
}

/* The verdict table's fields: the paths it holds verdicts for, the
 * package table they are read from, and the keys that reach them (kept,
 * so that reading the paths for every message looks up and interns no
 * string). The package table is the one package.loaded held when the
 * first verdicts were made: the one require's own searchers read, whatever
 * replaces it in package.loaded later. */
enum { NC_V_PATH = 1, NC_V_CPATH, NC_V_PACKAGE, NC_V_KEYS };

/* Pushes package.path and package.cpath (nil where not a string) of the
 * package table at pkg (nil: none), taking the keys' strings from the
 * table at keys (from NC_V_KEYS on) or, when keys is 0, making them.
 * L: ... → ... path cpath */
static void nc_push_paths(lua_State *L, int pkg, int keys) {
  int k;
  for (k = 0; k < 2; k++) {
    if (!lua_istable(L, pkg)) {
      lua_pushnil(L);
      continue;
    }
    if (keys != 0)
      lua_rawgeti(L, keys, NC_V_KEYS + k);
    else
      lua_pushstring(L, k == 0 ? "path" : "cpath");
    lua_rawget(L, pkg);
    if (lua_type(L, -1) != LUA_TSTRING) {
      lua_pop(L, 1);
      lua_pushnil(L);
    }
  }
}

void cx_names_verdicts(lua_State *L) {
  int v, k;
  if (!lua_checkstack(L, NC_SLOTS)) cx_oom(L);
  lua_pushlightuserdata(L, (void *)&nc_verdicts_key);
  lua_rawget(L, LUA_REGISTRYINDEX);
  v = lua_gettop(L);
  if (lua_istable(L, v)) {
    int same;
    lua_rawgeti(L, v, NC_V_PACKAGE);
    nc_push_paths(L, v + 1, v);
    lua_rawgeti(L, v, NC_V_PATH);
    lua_rawgeti(L, v, NC_V_CPATH);
    same = lua_rawequal(L, v + 2, v + 4) && lua_rawequal(L, v + 3, v + 5);
    lua_settop(L, same ? v : v + 1);
    if (same) return;
  } else {
    lua_getfield(L, LUA_REGISTRYINDEX, "_LOADED");
    if (lua_istable(L, -1)) {
      lua_pushliteral(L, "package");
      lua_rawget(L, -2);
    } else {
      lua_pushnil(L);
    }
    lua_remove(L, -2);
  }
  /* L: ... old package: new verdicts, on the same package table. */
  lua_createtable(L, NC_V_KEYS + 1, 8);
  lua_pushvalue(L, v + 1);
  lua_rawseti(L, -2, NC_V_PACKAGE);
  nc_push_paths(L, v + 1, 0);
  lua_rawseti(L, -3, NC_V_CPATH);
  lua_rawseti(L, -2, NC_V_PATH);
  for (k = 0; k < 2; k++) {
    lua_pushstring(L, k == 0 ? "path" : "cpath");
    lua_rawseti(L, -2, NC_V_KEYS + k);
  }
  lua_pushlightuserdata(L, (void *)&nc_verdicts_key);
  lua_pushvalue(L, -2);
  lua_rawset(L, LUA_REGISTRYINDEX);
  lua_replace(L, v);
  lua_settop(L, v);
}

void cx_names_std_modules(lua_State *L) {
  if (!lua_checkstack(L, NC_STD_SLOTS)) cx_oom(L);
  nc_std_get(L, &nc_stdmod_key);
}

/* Whether package.path or package.cpath (in the table at `verdicts`) finds
 * module `mod` (a string). */
static int nc_found(lua_State *L, int verdicts, int mod) {
  size_t len, plen, cplen;
  const char *name = lua_tolstring(L, mod, &len), *path, *cpath, *dot;
  int ok;
  lua_rawgeti(L, verdicts, NC_V_PATH);
  lua_rawgeti(L, verdicts, NC_V_CPATH);
  path = lua_tolstring(L, -2, &plen);
  cpath = lua_tolstring(L, -1, &cplen);
  dot = memchr(name, '.', len);
  ok = (path != NULL && nc_search(name, len, path, plen)) ||
       (cpath != NULL && nc_search(name, len, cpath, cplen)) ||
       (cpath != NULL && dot != NULL && nc_search(name, (size_t)(dot - name), cpath, cplen));
  lua_pop(L, 2);
  return ok;
}

int cx_names_found(lua_State *L, int verdicts, int mod) {
  int ok;
  if (!lua_checkstack(L, NC_SLOTS)) cx_oom(L);
  lua_pushvalue(L, mod);
  lua_rawget(L, verdicts);
  if (lua_type(L, -1) == LUA_TBOOLEAN) {
    ok = lua_toboolean(L, -1);
    lua_pop(L, 1);
    return ok;
  }
  lua_pop(L, 1);
  ok = nc_found(L, verdicts, mod);
  lua_pushvalue(L, mod);
  lua_pushboolean(L, ok);
  lua_rawset(L, verdicts);
  return ok;
}
