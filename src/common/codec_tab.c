/* codec_tab.c: the probe that lets the codec read and write tables in
 * place, without a Lua C-API call per element (codec_int.h, cx_tab_*).
 *
 * LuaJIT keeps t[0] .. t[asize - 1] of a table in an array of 8-byte
 * values, and its other keys in a hash part of nodes (value, key, chain);
 * on 64-bit builds with 64-bit GC references (GC64, the default on x86-64
 * and arm64) a number is its double, nil is all bits set, and every other
 * value is a NaN pattern with a tag and an address (a string's bytes and
 * length sit in its object). The table object holds where both parts are
 * and their sizes at fixed offsets. None of this is LuaJIT's API, so it is
 * used only after a probe on the running VM has found every one of these
 * facts true (tab_probe); otherwise the codec goes through the API as
 * before. The encoder only reads. The decoder writes numbers only, into
 * the array part of a table it has just made: a number needs no write
 * barrier, and a NaN is never written (its bits could pose as a tagged
 * value), so nothing the collector tracks changes. */
#include <lauxlib.h>
#include <string.h>

#include "codec_int.h"

/* GCtab on GC64: the offsets of codec_int.h (CX_TAB_*); the type byte
 * at byte 9 is 11 (~LJ_TTAB). */
#define TAB_GCT 9
#define TAB_GCT_TABLE 11

/* 0 not probed yet, 1 usable, -1 not. The same answer in every state of
 * the process: it is the VM's layout. */
static int tab_state;

unsigned cx_tab_len_at = 16;

static const unsigned char *tab_obj(lua_State *L, int idx) {
  return (const unsigned char *)lua_topointer(L, idx);
}


static double tab_num(uint64_t bits) {
  double d;
  memcpy(&d, &bits, sizeof d);
  return d;
}

/* Whether the table at idx shows `n` items 1.5, 2.5 ... in an array part
 * of at least n + 1 slots, then nils up to slot nil_to - 1; with `no_hash`,
 * no hash part. */
static int tab_shows(lua_State *L, int idx, uint32_t n, uint32_t nil_to, int no_hash) {
  const unsigned char *t = tab_obj(L, idx);
  uint32_t asize, hm, i;
  uint64_t *a;
  if (t == NULL || t[TAB_GCT] != TAB_GCT_TABLE) return 0;
  a = cx_tab_array(t, &asize);
  memcpy(&hm, t + CX_TAB_HMASK, sizeof hm);
  if ((a == NULL && asize != 0) || (n > 0 && asize <= n) || asize < nil_to ||
      (no_hash && hm != 0))
    return 0;
  for (i = 1; i <= n; i++)
    if (tab_num(a[i]) != (double)i + 0.5) return 0;
  for (; i < nil_to; i++)
    if (a[i] != CX_TAB_NIL) return 0;
  return 1;
}

/* Finds where a string keeps its length: the offset at which a string of
 * 7 bytes and one of 1,001 show their lengths. */
static int tab_probe_len(lua_State *L) {
  static const unsigned at[2] = {16, 20};
  char big[1001];
  int k;
  memset(big, 'x', sizeof big);
  lua_pushliteral(L, "handler");
  lua_pushlstring(L, big, sizeof big);
  for (k = 0; k < 2; k++) {
    const char *a = lua_tostring(L, -2), *b = lua_tostring(L, -1);
    uint32_t na, nb;
    memcpy(&na, a - 24 + at[k], sizeof na);
    memcpy(&nb, b - 24 + at[k], sizeof nb);
    if (na == 7 && nb == sizeof big) {
      cx_tab_len_at = at[k];
      lua_pop(L, 2);
      return 1;
    }
  }
  lua_pop(L, 2);
  return 0;
}

/* Whether a record's hash part shows its two fields as cx_tab_nodes and
 * cx_tab_str read them: "alpha" = 1.5 and "beta" = "gamma", the strings
 * at the addresses lua_tolstring gives. */
static int tab_probe_hash(lua_State *L) {
  const char *alpha, *beta, *gamma, *s;
  const uint64_t *n;
  uint32_t hmask, j;
  size_t len;
  int seen = 0, ok = 1;
  if (!lua_checkstack(L, 5)) return 0;
  if (!tab_probe_len(L)) return 0;
  lua_createtable(L, 0, 4);
  lua_pushliteral(L, "alpha");
  alpha = lua_tostring(L, -1);
  lua_pushnumber(L, 1.5);
  lua_rawset(L, -3);
  lua_pushliteral(L, "beta");
  beta = lua_tostring(L, -1);
  lua_pushliteral(L, "gamma");
  gamma = lua_tostring(L, -1);
  lua_rawset(L, -3);
  n = cx_tab_nodes(tab_obj(L, -1), &hmask);
  if (n == NULL || hmask != 3) ok = 0;
  for (j = 0; ok && j <= hmask; j++) {
    const uint64_t *node = n + 3 * j;
    if (node[0] == CX_TAB_NIL) continue;
    s = cx_tab_str(node[1], &len);
    if (s == alpha && len == 5 && tab_num(node[0]) == 1.5) {
      seen |= 1;
    } else if (s == beta && len == 4 && cx_tab_str(node[0], &len) == gamma && len == 5) {
      seen |= 2;
    } else {
      ok = 0;
    }
  }
  lua_pop(L, 1);
  return ok && seen == 3 && cx_tab_str(CX_TAB_NIL, &len) == NULL;
}

/* Tries the layout on tables made for it: one of a fixed array size with a
 * hash part, one grown item by item (its array moved), one whose items a
 * write through here must show to the API. */
static int tab_probe(lua_State *L) {
  uint32_t asize, i;
  uint64_t *a;
  double two = 2.25;
  int ok;
  if (sizeof(void *) != 8 || !lua_checkstack(L, 4)) return 0;
  lua_createtable(L, 7, 1);
  for (i = 1; i <= 3; i++) {
    lua_pushnumber(L, (lua_Number)i + 0.5);
    lua_rawseti(L, -2, (int)i);
  }
  lua_pushboolean(L, 1);
  lua_setfield(L, -2, "x");
  ok = tab_shows(L, -1, 3, 8, 0);
  lua_newtable(L);
  ok = ok && tab_shows(L, -1, 0, 0, 1);
  lua_pop(L, 1);
  lua_newtable(L);
  for (i = 1; i <= 100; i++) {
    lua_pushnumber(L, (lua_Number)i + 0.5);
    lua_rawseti(L, -2, (int)i);
  }
  ok = ok && tab_shows(L, -1, 100, 0, 1);
  if (ok) {
    a = cx_tab_array(tab_obj(L, -2), &asize);
    memcpy(&a[2], &two, sizeof two);
    lua_rawgeti(L, -2, 2);
    ok = lua_type(L, -1) == LUA_TNUMBER && lua_tonumber(L, -1) == two;
    lua_pop(L, 1);
    lua_rawgeti(L, -2, 5);
    ok = ok && lua_isnil(L, -1);
    lua_pop(L, 1);
  }
  lua_pop(L, 2);
  return ok && tab_probe_hash(L);
}

int cx_tab_fast(lua_State *L) {
  if (tab_state == 0) tab_state = tab_probe(L) ? 1 : -1;
  return tab_state > 0;
}
